"""QoS policies (issue 6): rate limits per device and channel, priorities, retention.

The engine is sans-I/O: every test drives ``now`` by hand, so rates are checked exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwsnet.policy import PolicyError, load_policies, qos  # importing qos registers the kind
from cwsnet.policy.qos import DEFAULT_PRIORITY, QosEngine
from cwsnet.policy.watch import shipped_policies

SHIPPED = shipped_policies()


def engine(tmp_path: Path, text: str, *, shipped: bool = False, **kw: object) -> QosEngine:
    (tmp_path / "site.yaml").write_text(text)
    return QosEngine(load_policies([SHIPPED, tmp_path] if shipped else [tmp_path]), **kw)  # type: ignore[arg-type]


def send(e: QosEngine, node: str, now: float, *, channel: str = "telemetry", stream: str | None = "env",
         site: str = "home", n: int = 1) -> qos.Verdict:
    return e.admit(site=site, node=node, role="device", channel=channel, stream=stream, now=now, n=n)


TEN_A_SECOND = """\
kind: qos
name: lab-limits
rules:
  - name: ten-a-second
    limit: {rate: 10/s, burst: 5, over: pause}
    match: {role: device, channels: [telemetry]}
"""


# ---- rate limits --------------------------------------------------------------------------------

def test_a_burst_then_the_steady_rate_is_honoured_exactly(tmp_path: Path) -> None:
    e = engine(tmp_path, TEN_A_SECOND)
    assert [send(e, "dev-1", 0.0).action for _ in range(6)] == ["admit"] * 5 + ["pause"]  # the burst, then refused
    v = send(e, "dev-1", 0.05)
    assert (v.allowed, v.action, v.rule) == (False, "pause", "ten-a-second")
    assert v.retry_after == 1.0  # the next token is 0.05 s away: never tell a device less than 1 s
    assert v.explain().splitlines() == [
        "PAUSE: device dev-1 (site home) telemetry/env",
        f"  decided by lab-limits/ten-a-second ({tmp_path}/site.yaml:4)",
        "  over 10/s (burst 5): bucket empty, next token in 0.05 s",
        "  the device keeps the message and waits 1.0 s"]
    # a device sending as fast as it can from then on gets exactly one message through per 0.1 s
    admitted = 0
    for k in range(1, 1001):  # 10 s in steps of 10 ms
        admitted += sum(send(e, "dev-1", k / 100).allowed for _ in range(3))
    assert admitted == 100
    assert e.stats()["lab-limits/ten-a-second"] == {"mode": "enforce", "admitted": 105, "refused": 2 + 2900,
                                                    "dropped": 0}
    # idle long enough, the bucket is full again: exactly the burst, not more
    assert [send(e, "dev-1", 60.0).allowed for _ in range(6)] == [True] * 5 + [False]


def test_a_long_pause_is_the_time_to_the_next_token(tmp_path: Path) -> None:
    e = engine(tmp_path, TEN_A_SECOND.replace("10/s, burst: 5", "60/h, burst: 1"))
    assert send(e, "dev-1", 0.0).allowed
    v = send(e, "dev-1", 0.0)
    assert v.action == "pause" and v.retry_after == 60.0
    assert send(e, "dev-1", 59.9).action == "pause" and send(e, "dev-1", 60.0).allowed


def test_a_misbehaving_device_is_capped_without_slowing_the_others(tmp_path: Path) -> None:
    e = engine(tmp_path, SHIPPED.joinpath("qos.yaml").read_text())
    bad_admitted = good_admitted = 0
    for ms in range(10_000):  # 10 s: dev-bad sends 10 messages every millisecond (10,000/s)
        t = ms / 1000
        bad_admitted += sum(send(e, "dev-bad", t).allowed for _ in range(10))
        if ms % 20 == 0:  # 99 well-behaved devices, 50 messages/s each (half the limit)
            good_admitted += sum(send(e, f"dev-{i}", t, stream="power").allowed for i in range(99))
    assert good_admitted == 99 * 500  # not one of theirs refused
    assert bad_admitted == 500 + 100 * 10 - 1  # the burst, then 100/s (the last token arrives at t = 10.0)
    assert e.stats()["default-qos/device-rate"]["refused"] == 100_000 - bad_admitted


def test_drop_takes_and_discards_where_pause_refuses(tmp_path: Path) -> None:
    e = engine(tmp_path, TEN_A_SECOND.replace("over: pause", "over: drop"))
    verdicts = [send(e, "dev-1", 0.0) for _ in range(7)]
    v = verdicts[-1]
    assert [x.action for x in verdicts] == ["admit"] * 5 + ["drop"] * 2
    assert not v.allowed and v.retry_after == 0.0
    assert "the message is taken and discarded" in v.explain()
    assert e.stats()["lab-limits/ten-a-second"] == {"mode": "enforce", "admitted": 5, "refused": 0, "dropped": 2}


def test_the_match_picks_which_messages_count_and_each_device_has_its_own_bucket(tmp_path: Path) -> None:
    e = engine(tmp_path, TEN_A_SECOND.replace("channels: [telemetry]", 'channels: [telemetry], streams: ["cam*"], '
                                              'site: lab'))
    for _ in range(20):
        assert send(e, "dev-1", 0.0, stream="env", site="lab").allowed  # another stream: no limit
        assert send(e, "dev-1", 0.0, stream="cam1", site="home").allowed  # another site
        assert send(e, "dev-1", 0.0, channel="status", stream=None, site="lab").allowed  # another channel
    assert sum(send(e, "dev-1", 0.0, stream="cam1", site="lab").allowed for _ in range(20)) == 5
    assert sum(send(e, "dev-2", 0.0, stream="cam2", site="lab").allowed for _ in range(20)) == 5
    v = send(e, "dev-1", 0.0, stream="env", site="lab")
    assert v.rule is None and "no enforced limit rule matches" in v.explain()


def test_a_batch_bigger_than_the_burst_waits_for_a_full_bucket_then_the_rate_holds(tmp_path: Path) -> None:
    e = engine(tmp_path, TEN_A_SECOND)
    assert send(e, "dev-1", 0.0, n=3).allowed
    assert send(e, "dev-1", 0.0, n=8).action == "pause"  # 2 tokens left: needs a full bucket
    assert send(e, "dev-1", 0.3, n=8).allowed  # full again: taken, 3 tokens in debt
    assert not send(e, "dev-1", 0.35).allowed and not send(e, "dev-1", 0.6).allowed
    assert send(e, "dev-1", 0.7).allowed  # debt paid at 0.6, the next token at 0.7


AUDIT = """\
kind: qos
name: trial-strict
mode: audit
rules:
  - name: one-a-second
    limit: {rate: 1/s, burst: 1, over: drop}
    match: {role: device, channels: [telemetry]}
  - name: telemetry-low
    priority: 1
    match: {channels: [telemetry]}
  - name: keep-a-week
    retention: 7d
    match: {channels: [telemetry], streams: [env]}
"""


def test_an_audit_policy_is_evaluated_and_reported_never_applied(tmp_path: Path) -> None:
    e = engine(tmp_path, AUDIT, shipped=True)
    first, second = send(e, "dev-1", 0.0), send(e, "dev-1", 0.5)
    assert first.allowed and second.allowed and second.rule == "device-rate"  # the enforced limit decides
    assert [a.action for a in first.audit + second.audit] == ["admit", "drop"]
    assert "  audit: trial-strict/one-a-second would drop (over 1/s (burst 1), next token in 0.50 s); not enforced" \
        in second.explain()
    assert e.stats()["trial-strict/one-a-second"] == {"mode": "audit", "admitted": 1, "refused": 0, "dropped": 1}
    p = e.priority(site="home", node="dev-1", role="device", channel="telemetry", stream="env")
    assert p.priority == 3 and "trial-strict/telemetry-low would give priority 1; not enforced" in p.explain()
    r = e.retention(channel="telemetry", stream="env")
    assert r.keep_s == 90 * 86400 and "trial-strict/keep-a-week would keep it 7d; not enforced" in r.explain()
    assert [x.rule for x in e.retention_rules()] == ["keep-telemetry-90d"]  # the sweeper sees enforced rules only
    alone = engine(tmp_path, AUDIT)  # nothing enforced: all admitted, the audit verdicts reported
    assert all(send(alone, "dev-1", 0.0).allowed for _ in range(3))
    assert send(alone, "dev-1", 0.0).audit[0].action == "drop"


# ---- priority and retention -----------------------------------------------------------------------

TWO_POLICIES = """\
kind: qos
name: aa-site
rules:
  - name: camera-urgent
    priority: 9
    match: {channels: [telemetry], streams: ["cam*"]}
  - name: camera-later
    priority: 0
    match: {channels: [telemetry], streams: [camera]}
  - name: keep-cameras-a-day
    retention: 1d
    match: {channels: [telemetry], streams: ["cam*"]}
---
kind: qos
name: zz-site
rules:
  - name: results-last
    priority: 1
    match: {channels: [task_result]}
  - name: keep-everything-a-year
    retention: 365d
    match: {channels: [telemetry, event]}
  - name: lab-events-a-week
    retention: 7d
    match: {channels: [event], site: lab}
"""


def test_priority_and_retention_take_the_first_match_in_policy_name_then_rule_order(tmp_path: Path) -> None:
    e = engine(tmp_path, TWO_POLICIES, shipped=True)

    def prio(channel: str, stream: str | None = None) -> qos.Verdict:
        return e.priority(site="home", node="dev-1", role="device", channel=channel, stream=stream)

    assert (prio("telemetry", "camera").priority, prio("telemetry", "camera").rule) == (9, "camera-urgent")
    assert prio("telemetry", "env").decided_by == "default-qos/telemetry-last"  # aa-site has no rule for it
    assert prio("task_result").decided_by == "default-qos/results-first"  # default-qos sorts before zz-site
    assert prio("status").priority == DEFAULT_PRIORITY and prio("status").rule is None
    assert prio("event", "door").explain().splitlines()[0] == "PRIORITY 7: device dev-1 (site home) event/door"

    assert e.retention(channel="telemetry", stream="cam1").keep_s == 86400
    assert e.retention(channel="telemetry", stream="env").decided_by == "default-qos/keep-telemetry-90d"
    assert e.retention(channel="event", stream="door").decided_by == "zz-site/keep-everything-a-year"
    # a rule for one site matches only when the site is given, and then only that site
    assert e.retention(channel="event", stream="door", site="lab").keep_s == 365 * 86400  # an earlier rule wins
    assert e.retention(channel="status", stream=None).explain().startswith("KEEP FOREVER: status\n")
    assert [(r.policy, r.rule, r.keep_s) for r in e.retention_rules()] == [
        ("aa-site", "keep-cameras-a-day", 86400), ("default-qos", "keep-telemetry-90d", 90 * 86400),
        ("zz-site", "keep-everything-a-year", 365 * 86400), ("zz-site", "lab-events-a-week", 7 * 86400)]


def test_a_condition_narrows_a_rule_and_a_failing_one_is_explained(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
kind: qos
name: conds
rules:
  - name: sensors-slow
    limit: {rate: 1/s, burst: 1}
    match: {when: 'subject.id.startsWith("sensor-") && stream != "alarm"'}
  - name: broken
    priority: 2
    match: {when: 'subject.nope.x == 1'}
""")
    assert send(e, "sensor-1", 0.0).allowed and not send(e, "sensor-1", 0.0).allowed
    assert send(e, "sensor-1", 0.0, stream="alarm").allowed and send(e, "sensor-1", 0.0, stream="alarm").allowed
    assert all(send(e, "dev-1", 0.0).allowed for _ in range(5))
    p = e.priority(site="home", node="dev-1", role="device", channel="status", stream=None)
    assert p.priority == DEFAULT_PRIORITY and "note: conds/broken: condition failed to evaluate" in p.explain()


# ---- state: bounded, carried over a reload -----------------------------------------------------------

def test_the_bucket_table_is_bounded_and_a_flooding_device_never_gets_a_fresh_burst(tmp_path: Path) -> None:
    e = engine(tmp_path, TEN_A_SECOND, max_buckets=100)
    flood = 0
    for i in range(1000):  # 1 s: a thousand devices, one message each, and dev-flood sending 1,000/s
        t = i / 1000
        assert send(e, f"dev-{i}", t).allowed
        flood += send(e, "dev-flood", t).allowed
        assert e.buckets <= 100
    assert flood == 5 + 10 - 1  # the burst and 10/s, as if the table were unbounded (last token at t = 1.0)


def test_a_reload_keeps_the_buckets_of_unchanged_rules(tmp_path: Path) -> None:
    e = engine(tmp_path, TEN_A_SECOND)
    assert sum(send(e, "dev-1", 0.0).allowed for _ in range(10)) == 5
    again = QosEngine(load_policies([tmp_path]), previous=e)
    assert not send(again, "dev-1", 0.0).allowed  # no fresh burst for the flooding device
    assert again.stats()["lab-limits/ten-a-second"]["admitted"] == 5
    changed = engine(tmp_path, TEN_A_SECOND.replace("burst: 5", "burst: 8"), previous=e)
    assert sum(send(changed, "dev-1", 0.0).allowed for _ in range(10)) == 8  # a changed rule starts afresh


# ---- errors name file, line, column and field ------------------------------------------------------

def _rule(body: str) -> str:
    return f"kind: qos\nname: x\nrules:\n  - name: r\n{body}"


BAD = [
    (_rule("    limit: {rate: fast}\n"),
     "bad.yaml:5:13: rules.0.limit.rate: Value error, rate must be a number of messages per second, minute or hour, "
     "like 50/s, 600/m or 1000/h (got 'fast')"),
    (_rule("    limit: {rate: 0/s}\n"), "bad.yaml:5:13: rules.0.limit.rate: Value error, rate must be more than 0"),
    (_rule("    limit: {rate: 5/d}\n"), "bad.yaml:5:13: rules.0.limit.rate: Value error, rate must be a number"),
    (_rule("    limit: {rate: 5/s, burst: 0}\n"), "bad.yaml:5:24: rules.0.limit.burst: Input should be greater than "
                                                  "or equal to 1"),
    (_rule("    limit: {rate: 5/s, over: block}\n"), "bad.yaml:5:24: rules.0.limit.over: Input should be 'pause' "
                                                     "or 'drop'"),
    (_rule("    priority: 10\n"), "bad.yaml:5:5: rules.0.priority: Input should be less than or equal to 9"),
    (_rule("    priority: high\n"), "bad.yaml:5:5: rules.0.priority: Input should be a valid integer"),
    (_rule("    retention: 30s\n"), "bad.yaml:5:5: rules.0.retention: Value error, retention must be at least 1m"),
    (_rule("    retention: soon\n"), "bad.yaml:5:5: rules.0.retention: Value error, retention must be a duration"),
    (_rule("    priority: 3\n    retention: 7d\n"), "bad.yaml:4:5: rules.0: exactly one of limit, priority, "
                                                   "retention"),
    (_rule("    match: {channels: [telemetry]}\n"), "bad.yaml:4:5: rules.0: exactly one of limit, priority, retention"),
    (_rule("    priority: 3\n    match: {channels: [cmd]}\n"),
     "bad.yaml:6:13: rules.0.match.channels.0: Input should be 'status', 'telemetry', 'event' or 'task_result'"),
    (_rule("    priority: 3\n    match: {role: robot}\n"), "bad.yaml:6:13: rules.0.match.role: Value error, must be "
                                                          "one of device"),
    (_rule("    priority: 3\n    match: {when: 'stream =='}\n"), "bad.yaml:6:13: rules.0.match.when: Value error, "
                                                                 "not a valid CEL expression"),
    (_rule("    priority: 3\n    speed: 9\n"), "bad.yaml:6:5: rules.0.speed: unknown key"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e.split(": ", 1)[1][:40] for _, e in BAD])
def test_an_invalid_qos_policy_is_refused_with_file_line_col_and_field(tmp_path: Path, text: str,
                                                                        expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policies([tmp_path])
    assert any(p.replace(str(tmp_path) + "/", "").startswith(expected) for p in exc.value.problems), \
        exc.value.problems


# ---- the shipped default ---------------------------------------------------------------------------

def test_the_shipped_default_loads_with_the_others_and_never_slows_a_normal_home_lab() -> None:
    pset = load_policies([SHIPPED])  # policies/: access.yaml, qos.yaml, routing.yaml
    assert {"default-access", "default-qos"} <= {lp.policy.name for lp in pset.policies}
    e = QosEngine(pset)
    # 100 CPython agents: a status every 10 s, a telemetry batch every 2 s, an event now and then, for
    # an hour; each starts by flushing a backlog of 400 messages after a gateway outage (its window is 100)
    refused = 0
    for i in range(100):
        node = f"dev-{i}"
        refused += sum(not send(e, node, 0.0).allowed for _ in range(400))
        for step in range(1, 3600 // 2 + 1):
            t = step * 2 + i / 100
            refused += not send(e, node, t, stream="env").allowed
            if step % 5 == 0:
                refused += not send(e, node, t, channel="status", stream=None).allowed
            if step % 60 == 0:
                refused += not send(e, node, t, channel="event", stream="door").allowed
    assert refused == 0
    assert e.stats()["default-qos/device-rate"]["refused"] == 0

    def prio(channel: str) -> int | None:
        return e.priority(site="home", node="dev-1", role="device", channel=channel, stream="x").priority

    assert prio("task_result") > prio("event") > prio("status") > prio("telemetry")
    assert e.retention(channel="telemetry", stream="env").keep_s == 90 * 86400
