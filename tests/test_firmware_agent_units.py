"""The firmware agent's logic on CPython (the firmware runs unchanged there): hostile or odd
downlink payloads never crash it, a flash that refuses writes costs messages (counted), not the
agent, and the replay window and custody-ack handling do what docs/protocol.md says."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import nacl.bindings
import nacl.public
import pytest

FIRMWARE_LIB = Path(__file__).resolve().parents[1] / "firmware" / "micropython" / "lib"
sys.path.insert(0, str(FIRMWARE_LIB))
from cws import agent as fw_agent  # noqa: E402
from cws import envelope as fw_envelope  # noqa: E402

sys.path.remove(str(FIRMWARE_LIB))

CLOUD = nacl.public.PrivateKey.generate()
GATEWAY = nacl.public.PrivateKey.generate()
DEVICE = nacl.public.PrivateKey.generate()


def shared(a: nacl.public.PrivateKey, b: nacl.public.PrivateKey) -> bytes:
    return nacl.bindings.crypto_box_beforenm(bytes(b.public_key), bytes(a))


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> fw_agent.Agent:
    monkeypatch.chdir(tmp_path)
    os.makedirs("cwsnet/state")
    s = SimpleNamespace(node="dev-1", site="home", gateway="gw-home", kv=1, host="127.0.0.1", port=1883,
                        username="dev-1", password="t", keepalive=30, tls=False, ca_file=None, ssl_ctx=None, retransmit=5.0, max_packet=8192, log_stores=False, watchdog=0,
                        segment_bytes=4096, max_segments=4, window=8, max_readings=3, max_delay=60.0,
                        status_interval=30.0, health_timeout=120.0,
                        k_cloud=shared(DEVICE, CLOUD), k_gw=shared(DEVICE, GATEWAY))
    return fw_agent.Agent(s)


def from_gateway(body, seq: int = 1, channel: str = "ack", kind: str = "ack") -> tuple[str, bytes]:
    topic = f"cws/v1/home/dev-1/{channel}"
    return topic, fw_envelope.seal(topic, {"from": "gw-home", "to": "dev-1", "seq": seq, "ts": 1, "kind": kind},
                                   body, shared(GATEWAY, DEVICE))


def from_cloud(body, seq: int, channel: str = "task/cmd", kind: str = "task_cmd") -> tuple[str, bytes]:
    topic = f"cws/v1/home/dev-1/{channel}"
    return topic, fw_envelope.seal(topic, {"from": "cloud", "to": "dev-1", "seq": seq, "ts": 1, "kind": kind},
                                   body, shared(CLOUD, DEVICE))


@pytest.mark.parametrize("body", [
    None, 5, "x", [1, 2], {"custody": 5}, {"custody": [[1]]}, {"custody": [["a", "b"]]}, {"custody": [[1, 2, 3]]},
    {"acks": "x"}, {"acks": [[1, 2]]}, {"busy": "soon"}, {"busy": 5, "refused": 7}, {"busy": 5, "refused": [["a", 1]]},
    {"custody": [[2**62, 2**63 - 1]]}, {"custody": [[-5, -1]]},
])
def test_odd_ack_bodies_change_nothing_and_never_raise(agent: fw_agent.Agent, body) -> None:
    seq = agent.store("telemetry/env", "telemetry", {"stream": "env", "readings": []}, fw_agent.CLS_TELEMETRY)
    asyncio.run(agent.on_message(*from_gateway(body), False))
    assert len(agent.buf) == 1 and agent.buf.get(seq) is not None


def test_custody_ranges_free_exactly_what_they_name(agent: fw_agent.Agent) -> None:
    seqs = [agent.store("event/x", "event", {"type": "x", "severity": "info", "message": str(i), "data": {}},
                        fw_agent.CLS_EVENT) for i in range(6)]
    agent.inflight = {s: [0, 0] for s in seqs}
    asyncio.run(agent.on_message(*from_gateway({"custody": [[seqs[0], seqs[1]], [seqs[4], seqs[4]]]}), False))
    assert sorted(s for s, _ in agent.buf.pending(10)) == [seqs[2], seqs[3], seqs[5]]
    assert sorted(agent.inflight) == [seqs[2], seqs[3], seqs[5]]


@pytest.mark.parametrize("payload", [b"", b"\x00" * 10, b"\xa3ahAanAacA", os.urandom(300)])
def test_garbage_on_every_channel_is_rejected_and_counted(agent: fw_agent.Agent, payload: bytes) -> None:
    for channel in ("ack", "task/cmd", "config", "ota/data"):
        asyncio.run(agent.on_message(f"cws/v1/home/dev-1/{channel}", payload, False))
    assert agent.stats["rejected"] == 3  # ota/data is not an envelope: checked by hash, ignored without an update


def test_a_forged_command_is_rejected_and_a_replayed_one_not_run_twice(agent: fw_agent.Agent) -> None:
    runs = []
    agent.tasks = SimpleNamespace(submit=runs.append, connected=lambda: None)
    topic, good = from_cloud({"task_id": "t1", "handler": "echo", "args": {}}, seq=10)
    forged = fw_envelope.seal(topic, {"from": "cloud", "to": "dev-1", "seq": 11, "ts": 1, "kind": "task_cmd"},
                              {"task_id": "t2", "handler": "echo", "args": {}}, shared(GATEWAY, DEVICE))
    asyncio.run(agent.on_message(topic, good, False))
    asyncio.run(agent.on_message(topic, good, False))  # a replay
    asyncio.run(agent.on_message(topic, forged, False))  # sealed with the wrong key for 'cloud'
    assert [b["task_id"] for b in runs] == ["t1"]
    assert agent.stats["rejected"] == 1


def test_a_command_on_the_ack_channel_or_from_the_gateway_is_ignored(agent: fw_agent.Agent) -> None:
    runs = []
    agent.tasks = SimpleNamespace(submit=runs.append, connected=lambda: None)
    asyncio.run(agent.on_message(*from_gateway({"task_id": "t", "handler": "echo"}, channel="task/cmd",
                                               kind="task_cmd"), False))
    asyncio.run(agent.on_message(*from_cloud({"task_id": "t", "handler": "echo"}, 5, channel="ack"), False))
    assert runs == []


def test_a_flash_that_refuses_writes_costs_messages_not_the_agent(agent: fw_agent.Agent,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_a):
        raise OSError(28, "ENOSPC")

    with monkeypatch.context() as m:
        m.setattr(agent.buf, "put", full)
        for _ in range(3):
            agent.add_reading("env", {"t": 1.0})  # the third fills the batch: sealed, refused by the flash
        assert agent.status_body()["dropped"]["telemetry"] == 1
        assert agent.status_body()["storage"].startswith("error: telemetry")
    agent.add_reading("env", {"t": 2.0})
    agent.flush_batches(True)
    assert agent.status_body()["storage"] == "ok" and len(agent.buf) == 1


def test_replay_window_accepts_each_seq_once_within_1024() -> None:
    w = fw_agent.ReplayWindow()
    base = 1_767_225_600_000
    assert all(w.check(base + i) for i in (5, 3, 9, 4, 1000))
    assert not any(w.check(base + i) for i in (5, 3, 9, 4, 1000))
    assert w.check(base + 7) and not w.check(base + 7)
    assert w.check(base + 5000)  # a jump forward
    assert not w.check(base + 5000 - 1024)  # now too old to judge: refused
    assert w.check(base + 5000 - 1023)


def test_a_busy_gateway_pauses_telemetry_not_events_and_refused_messages_wait(agent: fw_agent.Agent) -> None:
    tele = [agent.store("telemetry/env", "telemetry", {"stream": "env", "readings": []}, fw_agent.CLS_TELEMETRY)
            for _ in range(12)]
    ev = agent.store("event/x", "event", {"type": "x", "severity": "info", "message": "m", "data": {}},
                     fw_agent.CLS_EVENT)
    refused_ev = agent.store("event/x", "event", {"type": "x", "severity": "info", "message": "n", "data": {}},
                             fw_agent.CLS_EVENT)
    agent.inflight = {s: [0, 0] for s in tele[:3]}
    body = {"custody": [], "busy": 30, "refused": [[tele[0], tele[2]], [refused_ev, refused_ev]]}
    asyncio.run(agent.on_message(*from_gateway(body), False))
    now = fw_agent.ticks_ms()
    assert agent.inflight == {}  # what it refused is no longer in flight
    assert [s for s, _ in agent.due(now)] == [ev]  # the event goes; telemetry and the refused event wait
    later = fw_agent.ticks_add(now, 31_000)
    assert [s for s, _ in agent.due(later)] == tele[:8]  # the pause is over: oldest first, a window's worth
    asyncio.run(agent.on_message(*from_gateway({"busy": float("inf")}, seq=2), False))  # clamped, not a crash
    assert fw_agent.ticks_diff(agent.busy_until, fw_agent.ticks_ms()) <= 3_600_000


def test_messages_the_gateway_never_acks_do_not_hold_the_window(agent: fw_agent.Agent) -> None:
    ghosts = [agent.store("event/x", "event", {"type": "x", "severity": "info", "message": "g", "data": {}},
                          fw_agent.CLS_EVENT) for _ in range(8)]
    fresh = agent.store("event/x", "event", {"type": "x", "severity": "info", "message": "f", "data": {}},
                        fw_agent.CLS_EVENT)
    now = fw_agent.ticks_ms()
    agent.inflight = {s: [now, 0] for s in ghosts}
    assert agent.due(now) == []  # a full window of first tries
    agent.inflight = {s: [now, 2] for s in ghosts}  # each retransmitted twice, never acked
    assert [s for s, _ in agent.due(now)] == [fresh]


def test_without_ntp_the_clock_is_set_from_an_authenticated_message(agent: fw_agent.Agent,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    set_to = []
    agent.hw = SimpleNamespace(set_clock=set_to.append, status=dict)
    monkeypatch.setattr(fw_agent, "clock_is_set", lambda: False)
    topic = "cws/v1/home/dev-1/ack"
    forged = fw_envelope.seal(topic, {"from": "gw-home", "to": "dev-1", "seq": 1, "ts": 1_900_000_000_000,
                                      "kind": "ack"}, {"custody": []}, shared(CLOUD, DEVICE))
    asyncio.run(agent.on_message(topic, forged, False))
    assert set_to == []  # a message that does not authenticate never sets the clock
    genuine = fw_envelope.seal(topic, {"from": "gw-home", "to": "dev-1", "seq": 2, "ts": 1_800_000_000_000,
                                       "kind": "ack"}, {"custody": []}, shared(GATEWAY, DEVICE))
    asyncio.run(agent.on_message(topic, genuine, False))
    assert set_to == [1_800_000_000_000]
