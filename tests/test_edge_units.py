"""Agent and gateway pieces in memory: handlers, sensors, the uplink outbox, the CLI's docs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from pathlib import Path

import pytest

from cwsnet.cli import build_parser
from cwsnet.config import SensorConfig
from cwsnet.errors import ConfigError
from edge_agent import handlers
from edge_agent.sensors import SimulatedSensor, SystemSensor, system_snapshot
from gateway.outbox import UplinkOutbox


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_builtin_handlers() -> None:
    assert run(handlers.echo({"a": [1, 2]})) == {"a": [1, 2]}
    data = b"hello"
    out = run(handlers.sha256({"data": base64.b64encode(data).decode()}))
    assert out == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": 5}
    assert run(handlers.sleep({"seconds": 0})) == {"slept": 0}


@pytest.mark.parametrize(("handler", "args", "msg"), [
    ("sha256", {}, "needs args"), ("sha256", {"data": "!!notbase64"}, "not valid base64"),
    ("sleep", {"seconds": "1"}, "needs args"), ("sleep", {"seconds": -1}, "between 0"),
    ("sleep", {"seconds": True}, "needs args"),
])
def test_handlers_refuse_bad_args_clearly(handler: str, args: dict, msg: str) -> None:
    with pytest.raises(handlers.TaskFailed, match=msg):
        run(handlers.BUILTIN[handler](args))


def test_unknown_handler_in_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown handler"):
        handlers.registry(["echo", "rm-rf"])


def test_simulated_patterns_are_deterministic_and_bounded() -> None:
    for pattern in ("sine", "ramp", "random", "constant"):
        cfg = SensorConfig(type="simulated", stream="s", pattern=pattern, fields=["a", "b"], amplitude=5,
                           offset=10, period=10, seed=1)
        s1, s2 = SimulatedSensor(cfg, start=0), SimulatedSensor(cfg, start=0)
        r1 = [s1.read(t) for t in range(20)]
        assert r1 == [s2.read(t) for t in range(20)]
        for r in r1:
            assert set(r) == {"a", "b"} and all(5 - 1e-9 <= v <= 15 + 1e-9 for v in r.values()), (pattern, r)
    sine = SimulatedSensor(SensorConfig(type="simulated", stream="s", period=4, amplitude=1, offset=0), start=0)
    assert sine.read(1)["value"] == pytest.approx(1.0)


def test_system_sensor_reads_host() -> None:
    snap = system_snapshot()
    assert 0 <= snap["mem"] <= 100 and len(snap["load"]) == 3 and 0 <= snap["disk"] <= 100
    values = SystemSensor(SensorConfig(type="system", stream="system")).read(0)
    assert {"cpu", "mem", "load1", "disk"} <= set(values)


def test_outbox_dedupes_retransmits_and_frees_on_ack(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    assert ob.add_many([("d1", 1, "t", b"a", False), ("d1", 2, "t", b"b", True), ("d1", 1, "t", b"a", False)],
                       now=100.0) == [True, True, False]
    assert ob.depth() == 2
    due = ob.due(now=100.0, retransmit_after=5, window=10)
    assert [(i.seq, i.payload, i.retain) for i in due] == [(1, b"a", False), (2, b"b", True)]
    ob.mark_sent([i.id for i in due], now=100.0)
    assert ob.due(now=104.0, retransmit_after=5, window=10) == []  # in flight
    again = ob.due(now=105.0, retransmit_after=5, window=10)
    assert len(again) == 2  # first retransmission after retransmit_after
    ob.mark_sent([i.id for i in again], now=105.0)
    assert ob.due(now=114.0, retransmit_after=5, window=10) == []  # then the wait doubles
    assert len(ob.due(now=115.0, retransmit_after=5, window=10)) == 2
    assert ob.ack([("d1", 1, 1), ("d9", 0, 99)]) == 1
    ob.close()
    reopened = UplinkOutbox(tmp_path / "o.db")  # durable across a restart, and due again at once
    assert reopened.depth() == 1 and reopened.due(0.0, 5, 10)[0].seq == 2
    digest = hashlib.sha256(b"b").digest()[:16]
    assert reopened.reject([("d1", 2, hashlib.sha256(b"other bytes").digest()[:16])]) == []  # not that one
    assert reopened.reject([("d1", 2, digest), ("d1", 3, digest)]) == [("d1", 2)] and reopened.depth() == 0


def test_outbox_window_limits_unacked_messages(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    ob.add_many([("d", i, "t", b"x", False) for i in range(10)], now=0)
    first = ob.due(now=0.0, retransmit_after=5, window=4)
    assert [i.seq for i in first] == [0, 1, 2, 3]
    ob.mark_sent([i.id for i in first], now=0.0)
    assert ob.due(now=1.0, retransmit_after=5, window=4) == []  # window full until acks arrive
    ob.ack([("d", 0, 1)])
    assert [i.seq for i in ob.due(now=1.0, retransmit_after=5, window=4)] == [4, 5]
    assert ob.inflight() == 2


def test_every_cli_command_is_in_the_readme_and_has_help() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sp in sub.choices.items():
        assert re.search(rf"`cwsnet {name}\b", readme), f"`cwsnet {name}` is not documented in README.md"
        assert sp.description or sp.format_help(), name
        for action in sp._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"cwsnet {name} {action.option_strings[0]} has no help text"


def test_messages_the_cloud_never_acks_do_not_stall_the_window(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    ob.add_many([("ghost", i, "t", b"x", False) for i in range(3)], now=0)  # e.g. an unregistered sender
    first = ob.due(now=0.0, retransmit_after=5, window=3)
    ob.mark_sent([i.id for i in first], now=0.0)
    ob.add_many([("dev-1", 1, "t", b"y", False)], now=1)
    assert ob.due(now=1.0, retransmit_after=5, window=3) == []  # window full while acks may still come
    retx = ob.due(now=5.0, retransmit_after=5, window=3)
    assert {i.sender for i in retx} == {"ghost"}  # retransmitted (next try in 10 s: the wait doubles)
    ob.mark_sent([i.id for i in retx], now=5.0)
    later = ob.due(now=11.0, retransmit_after=5, window=3)
    assert [(i.sender, i.seq) for i in later] == [("dev-1", 1)]  # overdue ghosts no longer hold the window
    ob.mark_sent([i.id for i in later], now=11.0)
    ob.resend_unacked()  # uplink reconnected: everything unacked is due again at once
    assert len(ob.due(now=12.0, retransmit_after=5, window=10)) == 4


def test_a_chatty_device_cannot_starve_the_others(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    ob.add_many([("chatty", i, "t", b"x", False) for i in range(1000)], now=0)
    ob.add_many([("quiet-1", 1, "t", b"x", False), ("quiet-2", 1, "t", b"x", False),
                 ("quiet-2", 2, "t", b"x", False)], now=1)
    window = ob.due(now=1.0, retransmit_after=5, window=5)
    picked = [(i.sender, i.seq) for i in window]
    assert {("quiet-1", 1), ("quiet-2", 1), ("quiet-2", 2)} <= set(picked)  # not behind 1,000 chatty ones
    assert [s for n, s in picked if n == "chatty"] == [0, 1]  # each sender's own order is kept
