"""Offload policies (issue 6): where a task runs (device, gateway, cloud) by handler, input size, data
class and live measurements; the shipped default-offload policy; explanations that say which rule
decided and why; errors that name file:line:col and field."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cwsnet.policy import PolicyError, load_policies  # registers every kind, offload too
from cwsnet.policy.offload import NodeMetrics, OffloadEngine, TaskInfo, explain_task, human_size, size

SHIPPED = Path(__file__).resolve().parents[1] / "policies"


def shipped() -> OffloadEngine:
    return OffloadEngine(load_policies([SHIPPED]))


def engine(tmp_path: Path, text: str, *, with_shipped: bool = False) -> OffloadEngine:
    (tmp_path / "site.yaml").write_text(text)
    return OffloadEngine(load_policies([SHIPPED, tmp_path] if with_shipped else [tmp_path]))


def task(size_: int = 1000, *, data_class: str | None = None, handler: str = "sha256", origin: str = "dev-1",
         role: str = "device", site: str = "home", tid: str = "t-42") -> TaskInfo:
    return TaskInfo(tid, handler, size_, data_class, site, origin, role)


def dev(node: str = "dev-1", *, cpu: float | None = 0.2, online: bool = True, site: str = "home",
        queue: int | None = 0, **kw) -> NodeMetrics:
    return NodeMetrics(node, "device", site, online, cpu=cpu, queue=queue, **kw)


def gw(node: str = "gw-1", *, online: bool = True, site: str = "home", queue: int | None = 0,
       cpu: float | None = 0.1, **kw) -> NodeMetrics:
    return NodeMetrics(node, "gateway", site, online, cpu=cpu, queue=queue, **kw)


def cloud(node: str = "cloud-1", *, online: bool = True, **kw) -> NodeMetrics:
    return NodeMetrics(node, "cloud", "", online, **kw)


def src(line: int) -> str:
    return f"policies/offload.yaml:{line})"


# ---- the shipped default ------------------------------------------------------------------------

def test_the_shipped_offload_policy_loads_with_the_other_shipped_policies() -> None:
    pset = load_policies([SHIPPED])
    kinds = {lp.policy.kind for lp in pset.policies}
    assert {"access", "offload"} <= kinds
    (off,) = pset.of_kind("offload")
    assert off.policy.name == "default-offload" and off.policy.keep_on_site == ["health"]
    assert [r.name for r in off.policy.rules] == ["big-input-offloads", "saturated-device-offloads", "default"]
    assert off.rule_sources["default"].endswith("offload.yaml:24")


def test_default_small_tasks_stay_on_the_device_they_were_sent_to() -> None:
    p = shipped().place(task(2000), [dev("dev-1", cpu=0.4, queue=3), dev("dev-2", cpu=0.0), gw(), cloud()])
    assert (p.action, p.tier, p.node, p.rule) == ("run", "device", "dev-1", "default")
    text = p.explain()
    assert text.startswith("RUN ON device dev-1: task t-42 sha256 (2 KB) from device dev-1 (site home)\n"
                           "  decided by default-offload/default (")
    assert src(24) in text
    assert "matches every task" in text and "dev-1: chosen, its origin (queue 3, cpu 0.40)" in text
    assert "dev-2: qualifies, more loaded (queue 0, cpu 0.00)" in text
    assert "gateway tier: not needed" in text and "cloud tier: not needed" in text


def test_default_a_saturated_device_offloads_to_the_gateway() -> None:
    p = shipped().place(task(2000), [dev("dev-1", cpu=0.95), gw("gw-1"), cloud()])
    assert (p.action, p.tier, p.node, p.rule) == ("run", "gateway", "gw-1", "saturated-device-offloads")
    text = p.explain()
    assert text.startswith("RUN ON gateway gw-1: task t-42 sha256")
    assert src(18) in text
    assert 'when "cpu" in origin && origin.cpu > 0.85: true (origin.cpu = 0.95)' in text
    assert "preference: gateway, cloud" in text and "gw-1: chosen (queue 0, cpu 0.10)" in text
    assert "cloud tier: not needed" in text and "dev-1: tier device not allowed by the rule" in text
    assert ("dev-1", "tier device not allowed by the rule") in p.rejected


def test_default_a_big_input_goes_to_the_gateway_even_from_an_idle_device() -> None:
    p = shipped().place(task(80 * 1024), [dev("dev-1", cpu=0.05), gw(), cloud()])
    assert (p.tier, p.node, p.rule) == ("gateway", "gw-1", "big-input-offloads")
    assert src(13) in p.explain() and "matched origin_role device, min_input 64 KB (80 KB)" in p.explain()
    # just under the threshold it stays on the device
    assert shipped().place(task(64 * 1024 - 1), [dev("dev-1", cpu=0.05), gw(), cloud()]).node == "dev-1"


def test_a_device_whose_cpu_is_not_reported_is_not_taken_for_saturated() -> None:
    p = shipped().place(task(100), [dev("dev-1", cpu=None), gw(), cloud()])
    assert p.rule == "default" and p.node == "dev-1" and p.notes == []


def test_gateway_down_a_saturated_device_goes_to_the_cloud_and_with_the_uplink_cut_runs_locally() -> None:
    e = shipped()
    p = e.place(task(100), [dev("dev-1", cpu=0.95), gw(online=False), cloud()])
    assert (p.tier, p.node) == ("cloud", "cloud-1") and "gw-1: offline" in p.explain()
    p = e.place(task(100), [dev("dev-1", cpu=0.95), gw(online=False), cloud(online=False)])
    assert (p.action, p.tier, p.node) == ("run", "device", "dev-1")
    assert "no listed tier can take it: runs on its origin dev-1 (if_unreachable: local)" in p.explain()


def test_with_the_uplink_cut_a_big_input_waits_for_the_gateway_or_the_cloud() -> None:
    p = shipped().place(task(200_000), [dev("dev-1"), gw(online=False), cloud(online=False)])
    assert (p.action, p.tier, p.node) == ("wait", None, None)
    text = p.explain()
    assert text.startswith("WAIT: task t-42 sha256 (195.3 KB) from device dev-1 (site home)")
    assert "gw-1: offline" in text and "cloud-1: offline" in text
    assert "no listed tier can take it now: waits (if_unreachable: wait)" in text


def test_a_busy_gateway_queue_spills_over_to_the_cloud() -> None:
    p = shipped().place(task(100_000), [dev(), gw("gw-1", queue=25), cloud()])
    assert p.node == "cloud-1"
    assert "gw-1: require !(\"queue\" in node) || node.queue < 20 is false (node.queue = 25)" in p.explain()


@pytest.mark.parametrize(("origin_online", "cpu", "size_", "gw_online", "cloud_online"),
                         list(itertools.product([True, False], [0.1, 0.95, None], [100, 100_000], [True, False],
                                                [True, False])))
def test_health_data_is_never_placed_in_the_cloud(origin_online: bool, cpu: float | None, size_: int,
                                                  gw_online: bool, cloud_online: bool) -> None:
    nodes = [dev("dev-1", cpu=cpu, online=origin_online), gw(online=gw_online), cloud(online=cloud_online)]
    p = shipped().place(task(size_, data_class="health"), nodes)
    assert p.tier != "cloud" and p.node != "cloud-1", p.explain()
    plain = shipped().place(task(size_), nodes)  # the same task without the class may use the cloud
    if plain.tier == "cloud":
        assert ("cloud-1", "data class health must stay on site (default-offload keep_on_site health)") \
            in p.rejected


def test_health_waits_when_everything_on_site_is_down_though_the_cloud_is_up() -> None:
    p = shipped().place(task(100, data_class="health"), [dev(online=False), gw(online=False), cloud()])
    assert p.action == "wait"
    text = p.explain()
    assert "cloud-1: data class health must stay on site (default-offload keep_on_site health)" in text
    assert text.startswith("WAIT: task t-42 sha256 (100 B, data class health) from device dev-1")


# ---- choosing within a tier ---------------------------------------------------------------------

GATEWAYS_FIRST = """\
kind: offload
name: lab
rules:
  - name: gateways
    run_on: [gateway, cloud]
"""


def test_the_least_loaded_candidate_is_chosen_queue_then_cpu_then_node_id(tmp_path: Path) -> None:
    e = engine(tmp_path, GATEWAYS_FIRST)
    nodes = [dev(), gw("gw-c", queue=1, cpu=0.0), gw("gw-b", queue=0, cpu=0.5), gw("gw-a", queue=0, cpu=0.7)]
    assert e.place(task(), nodes).node == "gw-b"  # shortest queue, then lower cpu
    tie = [dev(), gw("gw-b", queue=0, cpu=0.3), gw("gw-a", queue=0, cpu=0.3)]
    assert e.place(task(), tie).node == "gw-a" and e.place(task(), list(reversed(tie))).node == "gw-a"
    unknown = [dev(), gw("gw-a", queue=None, cpu=None), gw("gw-z", queue=7, cpu=0.9)]
    p = e.place(task(), unknown)
    assert p.node == "gw-z"  # a known load beats an unknown one
    assert "gw-a: qualifies, more loaded (queue unknown, cpu unknown)" in p.explain()


def test_the_origin_is_preferred_within_its_own_tier(tmp_path: Path) -> None:
    e = engine(tmp_path, "kind: offload\nname: x\nrules:\n  - name: devices\n    run_on: [device]\n")
    nodes = [dev("dev-1", queue=5, cpu=0.7), dev("dev-0", queue=0, cpu=0.0)]
    assert e.place(task(), nodes).node == "dev-1"
    nodes[0] = dev("dev-1", online=False)
    p = e.place(task(), nodes)
    assert p.node == "dev-0" and ("dev-1", "offline") in p.rejected


def test_devices_and_gateways_of_another_site_are_never_chosen_the_cloud_is_site_independent(tmp_path: Path) -> None:
    e = engine(tmp_path, "kind: offload\nname: x\nrules:\n  - name: any\n    run_on: [device, gateway, cloud]\n")
    nodes = [dev("dev-1", online=False), dev("dev-9", site="lab", queue=0), gw("gw-lab", site="lab"),
             cloud("cloud-1")]
    p = e.place(task(), nodes)
    assert (p.tier, p.node) == ("cloud", "cloud-1")
    assert ("dev-9", "other site (lab)") in p.rejected and ("gw-lab", "other site (lab)") in p.rejected
    assert "dev-9: other site (lab)" in p.explain() and "gw-lab: other site (lab)" in p.explain()


def test_a_candidate_without_the_handler_is_skipped(tmp_path: Path) -> None:
    e = engine(tmp_path, GATEWAYS_FIRST)
    p = e.place(task(handler="resize"), [dev(), gw("gw-1", handlers=frozenset({"echo"})), cloud()])
    assert p.node == "cloud-1" and ("gw-1", "has no handler resize") in p.rejected
    p = e.place(task(), [dev(), cloud()])
    assert p.node == "cloud-1" and "gateway tier: no candidate" in p.explain()


REQUIRE = """\
kind: offload
name: lab
rules:
  - name: roomy-gateways
    run_on: [gateway]
    require: 'node.mem_free > 8000000 && link.latency_ms < 50'
    if_unreachable: fail
"""


def test_require_filters_candidates_and_an_evaluation_error_is_noted(tmp_path: Path) -> None:
    e = engine(tmp_path, REQUIRE)
    nodes = [dev(), gw("gw-a", mem_free=100, latency_ms=5.0), gw("gw-b"),
             gw("gw-c", mem_free=16_000_000, latency_ms=12.0, queue=4)]
    p = e.place(task(), nodes)
    assert p.node == "gw-c"
    text = p.explain()
    assert "gw-a: require node.mem_free > 8000000 && link.latency_ms < 50 is false (node.mem_free = 100, " \
           "link.latency_ms = 5)" in text
    assert any(n.startswith("lab/roomy-gateways: require failed to evaluate for gw-b ('mem_free' is not known")
               for n in p.notes), p.notes
    assert "note: lab/roomy-gateways: require failed to evaluate for gw-b" in text
    nodes[3] = gw("gw-c", mem_free=16_000_000, latency_ms=80.0)
    p = e.place(task(), nodes)
    assert (p.action, p.node) == ("fail", None)
    assert p.explain().startswith("FAIL: task t-42") and "fails (if_unreachable: fail)" in p.explain()


def test_a_when_that_cannot_be_evaluated_does_not_match_and_is_noted(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
kind: offload
name: lab
rules:
  - name: on-battery
    when: 'origin.battery < 0.2'
    run_on: [gateway]
  - name: typed
    when: 'origin.queue > 0.5'
    run_on: [gateway]
  - name: rest
    run_on: [device]
""")
    p = e.place(task(), [dev("dev-1", queue=3), gw()])
    assert p.rule == "rest" and p.node == "dev-1"
    assert "note: lab/on-battery: when failed to evaluate ('battery' is not known" in p.explain()
    assert any(n.startswith("lab/typed: when failed to evaluate (type mismatch") for n in p.notes), p.notes
    p = e.place(task(), [dev("dev-1", battery=0.1), gw()])
    assert p.rule == "on-battery" and p.node == "gw-1" and "(origin.battery = 0.1)" in p.explain()


def test_when_sees_the_task_and_match_narrows_by_handler_class_site_and_size(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
kind: offload
name: lab
rules:
  - name: video
    match: {handler: "video-*", data_class: "cam*", site: home, max_input: 1MB}
    when: 'task.id.startsWith("t-") && data_class == "camera" && handler != "x" && site == "home"'
    run_on: [gateway]
  - name: rest
    run_on: [device]
""")
    nodes = [dev(), gw()]
    assert e.place(task(500_000, handler="video-scale", data_class="camera"), nodes).rule == "video"
    assert e.place(task(2 << 20, handler="video-scale", data_class="camera"), nodes).rule == "rest"  # too big
    assert e.place(task(500, handler="video-scale"), nodes).rule == "rest"  # no data class
    assert e.place(task(500, handler="video-scale", data_class="camera", site="lab"), nodes).rule == "rest"
    p = e.place(task(500, handler="video-scale", data_class="camera"), nodes)
    assert "matched handler video-* (video-scale), data_class cam* (camera), site home, max_input 1 MB (500 B)" \
        in p.explain()


# ---- order, audit, no match --------------------------------------------------------------------

def test_a_site_policys_specific_rule_beats_the_defaults_catch_all_whatever_its_name(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
kind: offload
name: zz-site
rules:
  - name: hashes-on-the-gateway
    match: {handler: sha256}
    run_on: [gateway]
""", with_shipped=True)
    p = e.place(task(100), [dev(), gw(), cloud()])
    assert p.decided_by == "zz-site/hashes-on-the-gateway" and p.node == "gw-1"
    assert e.place(task(100, handler="echo"), [dev(), gw(), cloud()]).decided_by == "default-offload/default"


def test_an_audit_policy_is_reported_not_enforced(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
kind: offload
name: trial
mode: audit
keep_on_site: ["sha*"]
rules:
  - name: all-to-cloud
    run_on: [cloud]
""", with_shipped=True)
    p = e.place(task(100), [dev(), gw(), cloud()])
    assert (p.node, p.decided_by) == ("dev-1", "default-offload/default")
    assert p.audit == ["trial/all-to-cloud would run it on cloud cloud-1"]
    assert "audit: trial/all-to-cloud would run it on cloud cloud-1; not enforced" in p.explain()
    p = e.place(task(100_000, data_class="sha-data"), [dev(), gw(online=False), cloud()])
    assert p.tier == "cloud"  # enforced: the audit policy's keep_on_site is only reported
    assert "audit: trial keep_on_site sha* would keep data class sha-data out of the cloud; not enforced" \
        in p.explain()
    assert "audit: trial/all-to-cloud would wait; not enforced" in p.explain()


def test_with_no_matching_rule_a_task_runs_on_its_origin_or_waits(tmp_path: Path) -> None:
    e = engine(tmp_path, "kind: offload\nname: x\nrules:\n  - {name: r, match: {handler: nope}, run_on: [cloud]}\n")
    p = e.place(task(), [dev(), gw()])
    assert (p.action, p.node, p.rule) == ("run", "dev-1", None)
    assert "no enforced offload rule matches: runs on its origin (the default)" in p.explain()
    p = e.place(task(), [dev(online=False), gw()])
    assert p.action == "wait" and "its origin cannot take it (offline): waits" in p.explain()
    assert OffloadEngine(None).place(task(), [dev()]).node == "dev-1" and OffloadEngine(None).empty


def test_local_falls_back_to_waiting_when_the_origin_cannot_run_it(tmp_path: Path) -> None:
    e = engine(tmp_path, "kind: offload\nname: x\nrules:\n  - {name: r, run_on: [gateway], if_unreachable: local}\n")
    p = e.place(task(), [dev(handlers=frozenset({"echo"})), gw(online=False)])
    assert p.action == "wait"
    assert "its origin dev-1 cannot (has no handler sha256): waits (if_unreachable: local)" in p.explain()
    assert e.place(task(), [gw(online=False)]).action == "wait"  # the origin is not among the candidates


def test_explain_task_renders_the_placement_and_long_lists_are_cut() -> None:
    nodes = [dev("dev-1", cpu=0.99)] + [dev(f"dev-{i:02d}") for i in range(2, 30)] + [gw()]
    text = explain_task(load_policies([SHIPPED]), task(100), nodes)
    assert text == shipped().place(task(100), nodes).explain()
    assert "... and 22 more in tiers not allowed" in text and len(text.splitlines()) < 20


def test_node_metrics_from_a_status_report() -> None:
    m = NodeMetrics.from_dict({"node": "gw-1", "tier": "gateway", "site": "home", "online": True, "cpu": 1,
                               "queue": 2.0, "battery": True, "handlers": ["echo"], "extra": 1})
    assert (m.cpu, m.queue, m.battery, m.handlers, m.mem_free) == (1.0, 2, None, frozenset({"echo"}), None)
    assert isinstance(m.cpu, float)
    with pytest.raises(ValueError, match="tier must be one of device, gateway, cloud"):
        NodeMetrics("x", "fog", "home", True)


# ---- sizes and bad files ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "n"), [("64KB", 65536), ("64 kb", 65536), ("64k", 65536), ("1MB", 1 << 20),
                                         ("1.5 MiB", 3 << 19), ("512B", 512), ("2G", 2 << 30), (100, 100),
                                         ("0", 0)])
def test_sizes(text: object, n: int) -> None:
    assert size(text) == n


@pytest.mark.parametrize("bad", ["lots", "-1", -1, True, "1TB", "2 TB", "", "KB", 2.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        size(bad)


def test_human_sizes() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 81920, 100_000, 3 << 20, 5 << 30)] == \
        ["0 B", "1023 B", "1 KB", "80 KB", "97.7 KB", "3 MB", "5 GB"]


HEAD = "kind: offload\nname: x\nrules:\n  - name: r\n"
BAD = [
    (HEAD + "    run_on: [moon]\n",
     "bad.yaml:5:5: rules.0.run_on.0: Input should be 'device', 'gateway' or 'cloud' (got 'moon')"),
    (HEAD + "    match: {min_input: lots}\n    run_on: [gateway]\n",
     "bad.yaml:5:13: rules.0.match.min_input: Value error, min_input must be a size like 64KB, 1MB or a number "
     "of bytes (got 'lots')"),
    (HEAD + "    match: {min_input: 1MB, max_input: 64KB}\n    run_on: [gateway]\n",
     "bad.yaml:5:5: rules.0.match: min_input (1 MB) is larger than max_input (64 KB)"),
    (HEAD + "    match: {origin_role: robot}\n    run_on: [gateway]\n",
     "bad.yaml:5:13: rules.0.match.origin_role: Value error, must be one of device, gateway, app, operator, "
     "cloud or '*'"),
    (HEAD + "    match: {colour: red}\n    run_on: [gateway]\n", "bad.yaml:5:13: rules.0.match.colour: unknown key"),
    (HEAD + "    when: 'origin.cpu >'\n    run_on: [gateway]\n",
     "bad.yaml:5:5: rules.0.when: Value error, not a valid CEL expression"),
    (HEAD + "    run_on: [gateway]\n    require: 'node.queue <<< 3'\n",
     "bad.yaml:6:5: rules.0.require: Value error, not a valid CEL expression"),
    (HEAD + "    run_on: [gateway]\n    if_unreachable: later\n",
     "bad.yaml:6:5: rules.0.if_unreachable: Input should be 'wait', 'local' or 'fail' (got 'later')"),
    (HEAD + "    run_on: [gateway, gateway]\n", "bad.yaml:5:5: rules.0.run_on: Value error, gateway is listed twice"),
    (HEAD + "    run_on: []\n", "bad.yaml:5:5: rules.0.run_on: List should have at least 1 item"),
    (HEAD + "    match: {data_class: health}\n", "bad.yaml:4:5: rules.0.run_on: required field is missing"),
    ("kind: offload\nname: x\nrules:\n  - {name: r, run_on: [cloud]}\n  - {name: r, run_on: [device]}\n",
     "bad.yaml:3:1: rules: Value error, two rules are named 'r'"),
    ("kind: offload\nname: x\n", "bad.yaml:1:1: rules: Value error, an offload policy needs at least one rule"),
    ("kind: offload\nname: x\nmode: dry-run\nkeep_on_site: [health]\n",
     "bad.yaml:3:1: mode: Input should be 'enforce' or 'audit' (got 'dry-run')"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e.split(": ", 1)[1][:40] for _, e in BAD])
def test_an_invalid_offload_policy_is_refused_with_file_line_col_and_field(tmp_path: Path, text: str,
                                                                          expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policies([tmp_path])
    assert any(p.replace(str(tmp_path) + "/", "").startswith(expected) for p in exc.value.problems), \
        exc.value.problems


def test_a_residency_only_policy_is_valid_and_applies_to_every_rule(tmp_path: Path) -> None:
    e = engine(tmp_path, "kind: offload\nname: cameras-stay\nkeep_on_site: [camera]\n", with_shipped=True)
    p = e.place(task(100_000, data_class="camera"), [dev(), gw(online=False), cloud()])
    assert p.action == "wait" and "cameras-stay keep_on_site camera" in p.explain()
