"""The gateway's policy enforcement without processes: summaries by arrival window across restarts,
and the lock-out of a device that ignores its pause (a stand-in for the rest of the gateway)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cbor2

from cwsnet.policy.watch import shipped_policies
from gateway.local import SiteData
from gateway.site_policy import IGNORED_PAUSE, SitePolicies

ROUTING = """kind: routing
name: default-routing
rules:
  - name: health-stays-on-site
    match: {streams: [health]}
    to: gateway
    summary: {every: 10s, stream: health.summary, stats: [count, mean]}
"""
LIMIT = """kind: qos
name: a-limit
rules:
  - name: slow
    match: {node: dev-9, channels: [telemetry]}
    limit: {rate: 1/s, burst: 1, over: pause}
"""


class FakeGateway:
    """What SitePolicies uses of the gateway: config, clock, its site database, the outbox door."""

    def __init__(self, tmp: Path, now: list[float]) -> None:
        self.cfg = SimpleNamespace(policies_dir=tmp / "policies", data_dir=tmp, enforce_policies=True)
        self.clock = lambda: now[0]
        self.local = SiteData(tmp / "site-data.db")
        self.site, self.node = "home", "gw-1"
        self.sent: list[tuple[str, Any]] = []
        self.stats: dict[str, int] = {k: 0 for k in ("summaries_sent", "rate_limited", "rate_dropped",
                                                     "rate_lockouts", "events_sent")}
        self.broker = SimpleNamespace(locked=[])
        self.custody = SimpleNamespace(refused=lambda *a, **k: None)
        self.registry = SimpleNamespace(get=lambda n: SimpleNamespace(role="device", active=True, id=n, site="home"))

        async def lock_out(user: str, seconds: float, why: str) -> list[str]:
            self.broker.locked.append((user, seconds))
            return [user]

        self.broker.lock_out = lock_out

    async def db_call(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    async def emit_own(self, topic: str, kind: str, body: Any) -> None:
        self.sent.append((topic, cbor2.loads(cbor2.dumps(body))))

    def emit_event(self, kind: str, severity: str, message: str, data: dict) -> None:
        self.sent.append((f"event/{kind}", data))


def policies(tmp: Path, *texts: str) -> None:
    (tmp / "policies").mkdir(exist_ok=True)
    for i, t in enumerate(texts):
        (tmp / "policies" / f"p{i}.yaml").write_text(t)


def test_summaries_count_late_readings_and_a_restart_neither_skips_nor_repeats_a_window(tmp_path: Path) -> None:
    policies(tmp_path, ROUTING)
    now = [1000.0]
    gw = FakeGateway(tmp_path, now)
    sp = SitePolicies(gw, [shipped_policies(), tmp_path / "policies"])  # type: ignore[arg-type]
    run = asyncio.run
    run(sp._summaries(int(now[0] * 1000)))  # first round: starts with the open window
    gw.local.add_batch("dev-1", 1, "health", [(1_000_500, {"hr": 60}), (1_001_000, {"hr": 70})], 1_001_000)
    # stamped an hour ago (a device's clock, or a reading buffered through an outage), arrives now
    gw.local.add_batch("dev-2", 1, "health", [(996_400_000 // 1000, {"hr": 90})], 1_004_000)
    now[0] = 1010.5
    run(sp._summaries(int(now[0] * 1000)))
    assert len(gw.sent) == 1
    topic, body = gw.sent[0]
    assert topic == "cws/v1/home/gw-1/telemetry/health.summary"
    by_node = {r["values"]["node"]: r["values"] for r in body["readings"]}
    assert by_node["dev-1"]["count"] == 2 and by_node["dev-1"]["hr.mean"] == 65.0
    assert by_node["dev-2"]["count"] == 1 and by_node["dev-2"]["first_ts"] == 996_400
    # a restart: the mark is on disk; nothing is sent twice, the next window goes once
    gw.local.close()
    gw2 = FakeGateway(tmp_path, now)
    sp2 = SitePolicies(gw2, [shipped_policies(), tmp_path / "policies"])  # type: ignore[arg-type]
    run(sp2._summaries(int(now[0] * 1000)))
    assert gw2.sent == []
    gw2.local.add_batch("dev-1", 2, "health", [(1_012_000, {"hr": 80})], 1_012_000)
    now[0] = 1030.0  # two windows closed: one with a reading, one empty
    run(sp2._summaries(int(now[0] * 1000)))
    assert [r["values"]["count"] for _t, b in gw2.sent for r in b["readings"]] == [1]
    run(sp2._summaries(int(now[0] * 1000)))
    assert len(gw2.sent) == 1


def test_a_device_that_ignores_its_pause_is_locked_out_but_resends_of_one_message_count_once(tmp_path: Path) -> None:
    policies(tmp_path, LIMIT)
    gw = FakeGateway(tmp_path, [1000.0])
    sp = SitePolicies(gw, [shipped_policies(), tmp_path / "policies"])  # type: ignore[arg-type]
    parts = SimpleNamespace(site="home", channel="telemetry", sub="env")

    async def flood(seqs: list[int]) -> list[str]:
        return [sp.admit(SimpleNamespace(sender="dev-9", seq=s), parts) for s in seqs]

    # a well-behaved device re-sending the same window many times (lost acks, redeliveries): no lock-out
    verdicts = asyncio.run(flood([1, 2, 3, 4, 5] * 100))
    assert verdicts[0] == "admit" and verdicts.count("pause") >= 490
    assert gw.broker.locked == [] and gw.stats["rate_lockouts"] == 0
    # one that keeps sending new messages through its pause: locked out, the event names the rule
    asyncio.run(flood(list(range(100, 100 + IGNORED_PAUSE + 5))))
    assert gw.stats["rate_lockouts"] == 1
    assert gw.broker.locked == [("dev-9", 10.0)]
    ev = [d for t, d in gw.sent if t == "event/qos.locked_out"]
    assert ev and ev[0]["rule"] == "a-limit/slow" and ev[0]["seconds"] == 10.0


def test_births_and_statuses_are_never_rate_limited(tmp_path: Path) -> None:
    policies(tmp_path, LIMIT.replace("channels: [telemetry]", "channels: [status, telemetry]"))
    gw = FakeGateway(tmp_path, [1000.0])
    sp = SitePolicies(gw, [shipped_policies(), tmp_path / "policies"])  # type: ignore[arg-type]
    parts = SimpleNamespace(site="home", channel="status", sub=None)
    assert {sp.admit(SimpleNamespace(sender="dev-9", seq=s), parts) for s in range(50)} == {"admit"}
