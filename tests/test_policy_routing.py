"""Routing policies: which streams stay at the gateway, the devices' route tables, the summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwsnet import topics
from cwsnet.policy import PolicyError, load_policies
from cwsnet.policy.routing import RoutingEngine, summarize
from cwsnet.policy.watch import shipped_policies
from gateway.local import SiteData

SITE = """kind: routing
name: site-routing
rules:
  - name: lab-env-local
    match: {streams: [env], site: lab}
    to: gateway
    summary: {every: 5m, stream: env.summary, stats: [mean, last]}
  - name: cam-to-cloud
    match: {streams: ["health.cam"]}
    class: video
    to: cloud
---
kind: routing
name: zz-audit
mode: audit
rules:
  - name: try-keeping-env
    match: {streams: [env]}
    to: gateway
"""


def engine(tmp_path: Path, text: str = SITE) -> RoutingEngine:
    (tmp_path / "site.yaml").write_text(text)
    return RoutingEngine(load_policies([shipped_policies(), tmp_path]))


def test_the_shipped_default_keeps_health_on_site_and_sends_the_rest_up(tmp_path: Path) -> None:
    e = RoutingEngine(load_policies([shipped_policies()]))
    kept = e.route("home", "dev-1", "health")
    assert (kept.to, kept.data_class, kept.decided_by) == ("gateway", "health", "default-routing/health-stays-on-site")
    assert kept.summary is not None and kept.summary.every == 3600 and kept.keep == 30 * 86400
    assert e.route("home", "dev-1", "health.spo2").to == "gateway"
    assert e.route("home", "dev-1", "healthy").to == "cloud"  # a pattern, not a prefix
    up = e.route("home", "dev-1", "env")
    assert up.to == "cloud" and up.rule is None
    assert "no enforced routing rule matches" in up.explain()


def test_first_match_in_policy_name_order_decides_and_audit_is_reported_only(tmp_path: Path) -> None:
    e = engine(tmp_path)
    # default-routing sorts before site-routing: its health.* rule decides health.cam
    cam = e.route("home", "dev-1", "health.cam")
    assert cam.decided_by == "default-routing/health-stays-on-site"
    lab = e.route("lab", "dev-7", "env")
    assert (lab.to, lab.decided_by) == ("gateway", "site-routing/lab-env-local")
    home = e.route("home", "dev-1", "env")
    assert home.to == "cloud" and home.audit == ["zz-audit/try-keeping-env would send it to the gateway"]
    text = lab.explain()
    assert text.startswith("KEEP AT GATEWAY: telemetry/env of dev-7 (site lab)")
    assert "site-routing/lab-env-local" in text and "site.yaml:4" in text
    assert "summaries (mean, last) every 5m go up as telemetry/env.summary" in text


def test_a_device_table_routes_exactly_like_the_engine(tmp_path: Path) -> None:
    e = engine(tmp_path)
    for site, node in (("lab", "dev-7"), ("home", "dev-1")):
        table = e.device_table(site, node)
        for stream in ("env", "health", "health.cam", "health.x", "system", "envx"):
            assert topics.route_in_table(table, stream) == e.route(site, node, stream).to, (site, stream)
    assert e.device_table("home", "dev-1") == [["health", "gateway"], ["health.*", "gateway"]]
    assert topics.route_in_table([], "health") == "cloud"


@pytest.mark.parametrize(("text", "expected"), [
    ("kind: routing\nname: r\nrules:\n  - name: a\n    to: moon\n",
     "site.yaml:5:5: rules.0.to: Input should be 'gateway' or 'cloud'"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    to: gateway\n    keep: forever\n",
     "site.yaml:6:5: rules.0.keep: Value error, keep must be a duration like 30s, 5m, 1h or 7d"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    summary: {every: 1h, stream: s}\n",
     "site.yaml:4:5: rules.0: summary and keep apply only to streams kept at the gateway"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    to: gateway\n    summary: {every: 1h, stream: s, stats: [p99]}\n",
     "site.yaml:6:37: rules.0.summary.stats.0: Input should be"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    class: Health\n", "site.yaml:5:5: rules.0.class: Value error"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    match: {streams: ['t[12]']}\n",
     "site.yaml:5:13: rules.0.match.streams: Value error, 't[12]': a stream pattern is 1-63 characters"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    to: gateway\n    keep: 1h\n    summary: {every: 1d, stream: s}\n",
     "site.yaml:4:5: rules.0: keep must be at least summary.every"),
])
def test_bad_routing_files_name_file_line_col_and_field(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "site.yaml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policies([tmp_path])
    assert any(p.replace(str(tmp_path) + "/", "").startswith(expected) for p in exc.value.problems), \
        exc.value.problems


def test_summaries_per_device_and_stream_over_numeric_values_only() -> None:
    rows = [("dev-1", "health", 1000, {"hr": 60, "ok": True, "note": "x"}),
            ("dev-1", "health", 2000, {"hr": 80.5, 7: 1, "big": 10**30}),  # odd keys and values are skipped
            ("dev-2", "health", 1500, {"hr": 70})]
    out = summarize(rows, 0, 5000, ["count", "min", "max", "mean", "last"])
    assert out == [
        {"ts": 5000, "values": {"node": "dev-1", "stream": "health", "window_s": 5, "count": 2, "first_ts": 1000,
                                "last_ts": 2000, "hr.count": 2, "hr.min": 60, "hr.max": 80.5, "hr.mean": 70.25,
                                "hr.last": 80.5}},
        {"ts": 5000, "values": {"node": "dev-2", "stream": "health", "window_s": 5, "count": 1, "first_ts": 1500,
                                "last_ts": 1500, "hr.count": 1, "hr.min": 70, "hr.max": 70, "hr.mean": 70.0,
                                "hr.last": 70}},
    ]
    assert summarize([], 0, 5000, ["mean"]) == []


def test_the_gateway_keeps_site_readings_once_windows_them_by_arrival_and_expires_them(tmp_path: Path) -> None:
    db = SiteData(tmp_path / "site.db")
    assert db.add_batch("dev-1", 7, "health", [(1000, {"hr": 60}), (2000, {"hr": 61})], received=10_000)
    assert not db.add_batch("dev-1", 7, "health", [(1000, {"hr": 60})], received=11_000)  # a re-send
    db.add_batch("dev-1", 8, "env", [(1500, {"t": 20})], received=10_500)
    # a reading stamped long ago that arrives late (buffered through an outage) counts when it arrives
    db.add_batch("dev-2", 3, "health", [(5, {"hr": 90})], received=20_000)
    assert [r[2] for r in db.window(["health*"], 10_000, 15_000)] == [1000, 2000]
    assert [r[:3] for r in db.window(["health*"], 15_000, 25_000)] == [("dev-2", "health", 5)]
    assert db.first_received(["health"], 10_001) == 20_000 and db.first_received(["health"], 20_001) is None
    db.put_mark("summary:x", 3600_000)
    db.close()
    db = SiteData(tmp_path / "site.db")  # durable
    assert db.get_mark("summary:x") == 3600_000 and db.count() == 4
    assert sorted(db.node_streams()) == [("dev-1", "env"), ("dev-1", "health"), ("dev-2", "health")]
    assert db.expire("dev-1", "health", 15_000) == 2 and db.count() == 2


def test_bad_readings_are_dropped_one_by_one_never_raised() -> None:
    from gateway.site_policy import _readings

    good, problem = _readings({"stream": "h", "readings": [
        {"ts": 1000, "values": {"hr": 60, "bad": float("nan"), "huge": 10**30, 3: "x", "ok": "fine"}},
        {"ts": 2**63, "values": {"hr": 1}}, {"ts": -1, "values": {}}, {"ts": True, "values": {}},
        {"ts": 5, "values": []}, "junk"]})
    assert good == [(1000, {"hr": 60, "ok": "fine"})] and problem is not None
    assert _readings({"readings": [{"ts": 1, "values": {"a": 1}}]}) == ([(1, {"a": 1})], None)
    assert _readings("nope") == ([], "not {stream, readings: [{ts, values}]}")


def test_the_firmware_matches_route_patterns_exactly_like_the_gateway() -> None:
    """The ESP32 agent's own matcher (``*`` and ``?``, linear time) against fnmatch, and its check of
    a route table (a bad one is ignored, never stored or used)."""
    import os
    import subprocess
    import sys

    lib = Path(__file__).resolve().parents[1] / "firmware" / "micropython" / "lib"
    code = """
import fnmatch, random
from cws.agent import glob, routes_ok
rng = random.Random(1)
for _ in range(20000):
    p = ''.join(rng.choice('ab*?') for _ in range(rng.randint(0, 6)))
    s = ''.join(rng.choice('ab.') for _ in range(rng.randint(0, 7)))
    assert glob(p, s) == fnmatch.fnmatchcase(s, p), (p, s)
assert glob('*' * 30 + 'b', 'a' * 60) is False  # no exponential blow-up
assert routes_ok([['health', 'gateway'], ['*', 'cloud']]) and routes_ok([])
for bad in ([['a', 'b', 'c']], [[1, 'gateway']], [['a', 'moon']], 'x', [['a' * 64, 'cloud']]):
    assert not routes_ok(bad), bad
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(lib)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
