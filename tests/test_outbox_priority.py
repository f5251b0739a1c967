"""Uplink priorities (issue 6): the gateway's outbox sends task results and events before bulk
telemetry after an outage, keeps each sender's order within a class, starves no class, and migrates
outbox databases written before priorities."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlite_utils

from cwsnet import topics
from cwsnet.policy.loader import load_policies
from cwsnet.policy.qos import QosEngine
from cwsnet.policy.watch import shipped_policies
from gateway.bridge import Gateway
from gateway.outbox import UplinkOutbox

TEL, RESULT = 3, 8  # the shipped policy's classes


def shipped_engine() -> QosEngine:
    return QosEngine(load_policies([shipped_policies()]))


def telemetry(node: str, seq: int, prio: int | None = TEL) -> tuple[Any, ...]:
    row = (node, seq, topics.telemetry("home", node, "env"), b"t%d" % seq, False)
    return row if prio is None else (*row, prio)


def result(node: str, seq: int) -> tuple[Any, ...]:
    return (node, seq, topics.task_result("home", node), b"r%d" % seq, False, RESULT)


def send_round(ob: UplinkOutbox, now: float, window: int) -> list[Any]:
    """One pump round in which the cloud acks everything sent."""
    items = ob.due(now, retransmit_after=5, window=window)
    ob.mark_sent([i.id for i in items], now)
    ob.ack([(i.sender, i.seq, i.seq) for i in items])
    return items


def backlog(ob: UplinkOutbox, devices: int, telemetry_each: int, prioritized: bool = True) -> None:
    """Each device's telemetry, then one task result from every device (the seqs follow on)."""
    ob.add_many([telemetry(f"dev-{d}", s, TEL if prioritized else None)
                 for s in range(telemetry_each) for d in range(devices)], now=0)
    ob.add_many([result(f"dev-{d}", telemetry_each) if prioritized else result(f"dev-{d}", telemetry_each)[:5]
                 for d in range(devices)], now=1)


def rounds_until_results_sent(tmp: Path, *, prioritized: bool, devices: int = 10, telemetry_each: int = 1000,
                              window: int = 1000) -> int:
    """In which ``due()`` round the last of ``devices`` task results goes out, each queued behind
    ``telemetry_each`` telemetry readings of its device (window: the gateway's max_inflight)."""
    ob = UplinkOutbox(tmp / f"m-{prioritized}-{window}.db")
    backlog(ob, devices, telemetry_each, prioritized)
    waiting = {f"dev-{d}" for d in range(devices)}
    rounds = 0
    while waiting:
        rounds += 1
        waiting -= {i.sender for i in send_round(ob, float(rounds), window) if i.topic.endswith("/task/result")}
    ob.close()
    return rounds


# ---- ordering ---------------------------------------------------------------------------------------

def test_task_results_go_before_a_telemetry_backlog_after_reconnect(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    backlog(ob, devices=5, telemetry_each=200)  # 1,000 telemetry readings, then 10 results from 5 devices
    ob.add_many([result(f"dev-{d}", 201) for d in range(5)], now=2)
    ob.resend_unacked()  # the uplink is back
    first = ob.due(now=10.0, retransmit_after=5, window=100)
    assert [(i.sender, i.priority) for i in first[:10]] == [(f"dev-{d}", RESULT) for d in range(5)] * 2
    assert sorted((i.sender, i.seq) for i in first[:10]) == sorted(
        (f"dev-{d}", s) for d in range(5) for s in (200, 201))
    rest = first[10:]
    assert len(rest) == 90 and {i.priority for i in rest} == {TEL}  # the window's rest: telemetry
    assert Counter(i.sender for i in rest) == {f"dev-{d}": 18 for d in range(5)}  # round-robin across devices


def test_a_window_in_flight_before_the_outage_is_resent_first_then_the_results(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    ob.add_many([telemetry("dev-1", s) for s in range(300)], now=0)
    ob.mark_sent([i.id for i in ob.due(0.0, 5, 100)], 0.0)  # 100 in flight when the uplink drops
    ob.add_many([result("dev-2", 1), result("dev-1", 300)], now=1)
    ob.resend_unacked()
    again = ob.due(now=2.0, retransmit_after=5, window=100)
    assert [i.seq for i in again] == list(range(100)) and all(i.attempts == 1 for i in again)  # retransmissions
    ob.mark_sent([i.id for i in again], 2.0)
    ob.ack([("dev-1", 0, 99)])
    nxt = ob.due(now=3.0, retransmit_after=5, window=100)
    assert [(i.sender, i.seq) for i in nxt[:2]] == [("dev-2", 1), ("dev-1", 300)]  # before telemetry 100..
    assert [i.seq for i in nxt[2:]] == list(range(100, 198))


def test_each_senders_messages_of_one_class_keep_seq_order(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    prios = [3, 3, 5, 8, 3, 7, 5, 5, 3, 8, 3, 7]
    seq: Counter[str] = Counter()
    sent: dict[tuple[str, int], list[int]] = defaultdict(list)

    def one_round(now: float) -> None:
        for i in send_round(ob, now, window=7):
            sent[(i.sender, i.priority)].append(i.seq)

    for batch in range(30):  # interleaved arrivals of every class from 4 devices, while rounds go out
        rows = []
        for d in range(4):
            for k in range(batch % 5 + 1):
                node = f"dev-{d}"
                seq[node] += 1
                rows.append((node, seq[node], topics.status("home", node), b"x", True, prios[(seq[node] + k) % 12]))
        ob.add_many(rows, now=batch)
        if batch % 3 == 0:
            one_round(float(batch))
    while ob.depth():
        one_round(100.0)
    assert sum(len(v) for v in sent.values()) == sum(seq.values()) and {p for _s, p in sent} == {3, 5, 7, 8}
    for key, seqs in sent.items():
        assert seqs == sorted(seqs), key


def test_rounds_are_listed_highest_class_first_in_arrival_order(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    ob.add_many([telemetry("a", 1), ("a", 2, topics.event("home", "a", "door"), b"e", False, 7), result("b", 1),
                 telemetry("b", 2), ("b", 3, topics.status("home", "b"), b"s", True)])
    assert [(i.sender, i.seq, i.priority) for i in ob.due(0.0, 5, 10)] == [
        ("b", 1, 8), ("a", 2, 7), ("b", 3, 5), ("a", 1, 3), ("b", 2, 3)]


# ---- fairness -------------------------------------------------------------------------------------

def test_a_flood_of_results_does_not_starve_telemetry(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    ob.add_many([telemetry("sensor", s) for s in range(1000)], now=0)
    sent: Counter[int] = Counter()
    for r in range(20):  # a runaway device keeps the results class full every round
        ob.add_many([result("runaway", r * 100 + k) for k in range(100)], now=r)
        sent.update(i.priority for i in send_round(ob, float(r), window=99))
    # weights 2**8 : 2**3: telemetry keeps 1 send in 33 (3 a round), results get the rest
    assert sent[TEL] == 60 and sent[RESULT] == 20 * 99 - 60


def test_a_class_that_was_idle_saves_up_no_credit(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    for r in range(50):  # only results for a long while: the virtual clock runs on
        ob.add_many([result("busy", r * 100 + k) for k in range(100)], now=r)
        send_round(ob, float(r), window=100)
    ob.add_many([telemetry("late", s) for s in range(1000)] + [result("busy", 5000 + k) for k in range(200)], now=60)
    first = send_round(ob, 60.0, window=99)
    assert Counter(i.priority for i in first) == {RESULT: 96, TEL: 3}  # its share, not a burst of 99


def test_within_one_class_a_chatty_device_cannot_starve_the_others(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    ob.add_many([result("chatty", s) for s in range(500)], now=0)
    ob.add_many([result("quiet", 1), telemetry("quiet", 2)], now=1)
    picked = [(i.sender, i.seq) for i in ob.due(1.0, 5, 4)]
    assert ("quiet", 1) in picked and [s for n, s in picked if n == "chatty"][:2] == [0, 1]


# ---- measured: how long results wait behind a telemetry backlog -----------------------------------

def test_results_wait_one_round_instead_of_the_whole_backlog(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    figures = {(p, w): rounds_until_results_sent(tmp_path, prioritized=p, window=w)
               for p in (False, True) for w in (1000, 100)}
    with capsys.disabled():
        for w in (1000, 100):
            print(f"\n10 task results behind 10,000 telemetry (10 devices), window {w}: sent in round "
                  f"{figures[(False, w)]} without priorities, round {figures[(True, w)]} with them")
    assert figures[(True, 1000)] == figures[(True, 100)] == 1
    assert figures[(False, 1000)] == 11 and figures[(False, 100)] == 101  # each result behind its device's 1,000


# ---- storage --------------------------------------------------------------------------------------

def old_outbox(path: Path) -> None:
    """An outbox as written before priorities (the previous release's schema and indexes)."""
    db = sqlite_utils.Database(path)
    db["outbox"].create({"id": int, "sender": str, "seq": int, "topic": str, "payload": bytes, "retain": int,
                         "received": float, "sent_at": float, "attempts": int},
                        pk="id", not_null={"sender", "seq", "topic", "payload"})
    db["outbox"].create_index(["sender", "seq"], unique=True)
    db.execute("create index outbox_inflight on outbox(attempts) where attempts > 0")
    db.execute("create index outbox_fresh on outbox(sender, id) where attempts = 0")
    rows = [("dev-1", 1, "t1", b"aa", 0, 1.0, 50.0, 2), ("dev-1", 2, "t2", b"bbb", 1, 1.0, 0, 0),
            ("dev-1", 3, "t3", b"c", 0, 1.0, 0, 0), ("dev-2", 7, "t7", b"dd", 0, 1.0, 0, 0)]
    db.conn.executemany("insert into outbox (sender, seq, topic, payload, retain, received, sent_at, attempts) "
                        "values (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.conn.commit()
    db.close()


def test_an_outbox_from_before_priorities_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "uplink-outbox.db"
    old_outbox(path)
    ob = UplinkOutbox(path)
    assert (ob.depth(), ob.size()) == (4, 8)
    ob.add_many([result("dev-3", 1), telemetry("dev-3", 2)], now=5)
    got = ob.due(now=10.0, retransmit_after=5, window=10)
    assert [(i.sender, i.seq, i.priority, i.attempts) for i in got] == [
        ("dev-3", 1, RESULT, 0), ("dev-1", 1, 5, 2),  # the in-flight one is due again at once (restart)
        ("dev-1", 2, 5, 0), ("dev-1", 3, 5, 0), ("dev-2", 7, 5, 0), ("dev-3", 2, TEL, 0)]
    assert got[2].retain and got[2].payload == b"bbb"
    ob.close()
    again = UplinkOutbox(path)  # migrating twice is a no-op
    assert again.depth() == 6 and again.ack([("dev-1", 1, 3)]) == 3
    indexes = {r[0] for r in sqlite3.connect(path).execute("select name from sqlite_master where type = 'index'")}
    assert "outbox_fresh_class" in indexes and "outbox_fresh" not in indexes


def test_unsent_messages_keep_their_class_across_a_restart(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    backlog(ob, devices=3, telemetry_each=50)
    ob.close()
    again = UplinkOutbox(tmp_path / "o.db")
    assert {(i.sender, i.priority) for i in again.due(0.0, 5, 3)} == {(f"dev-{d}", RESULT) for d in range(3)}


def test_rows_without_a_priority_get_the_default_and_bad_priorities_are_refused(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "o.db")
    assert ob.add("d", 1, "t", b"x", False) and ob.add_many([("d", 2, "t", b"y", False)]) == [True]
    assert ob.add_many([("d", 2, "t", b"y", False, 9)]) == [False]  # already held: keeps its class
    for bad in (10, -1, "8", True):
        with pytest.raises(ValueError, match="must be 0..9"):
            ob.add_many([("d", 3, "t", b"z", False, 9), ("d", 4, "t", b"z", False, bad)])
    assert ob.depth() == 2 and [i.priority for i in ob.due(0.0, 5, 10)] == [5, 5]


# ---- where the classes come from ----------------------------------------------------------------

def test_priority_comes_from_the_qos_policies(tmp_path: Path) -> None:
    q, p = shipped_engine(), UplinkOutbox.priority_for
    assert p(q, topics.task_result("home", "dev-1")) == 8
    assert p(q, topics.event("home", "dev-1", "door")) == 7
    assert p(q, topics.status("home", "dev-1")) == 5
    assert p(q, topics.telemetry("home", "gw-home", "env.summary"), role="gateway") == 3
    for odd in ("cws/v1/home/dev-1/ack", "not/a/topic", ""):
        assert p(q, odd) == 5
    assert p(None, topics.task_result("home", "dev-1")) == 5
    (tmp_path / "alarms.yaml").write_text(
        "kind: qos\nname: alarms\nrules:\n"
        "  - {name: alarm-first, priority: 9, match: {channels: [telemetry], streams: [alarm*]}}\n"
        "---\nkind: qos\nname: trial\nmode: audit\nrules:\n"
        "  - {name: env-top, priority: 9, match: {channels: [telemetry], streams: [env]}}\n")
    custom = QosEngine(load_policies([shipped_policies(), tmp_path]))
    assert p(custom, topics.telemetry("home", "dev-1", "alarm-smoke")) == 9
    assert p(custom, topics.telemetry("home", "dev-1", "env")) == 3  # audit mode: reported, not applied


def test_the_gateway_stores_device_and_own_messages_with_their_class(tmp_path: Path) -> None:
    """The bridge's committer and emit_own pass each message's class to the outbox."""
    gw: Any = Gateway.__new__(Gateway)
    gw.outbox = UplinkOutbox(tmp_path / "o.db")
    gw.site_policy = SimpleNamespace(qos=shipped_engine())
    gw.registry = SimpleNamespace(get=lambda n: SimpleNamespace(role="device") if n.startswith("dev") else None)
    gw._db = concurrent.futures.ThreadPoolExecutor(1)
    gw._incoming, gw._admit, gw.clock = asyncio.Queue(), lambda batch: batch, lambda: 0.0
    gw.stats, gw.store_error = Counter(), None
    gw.site_link = SimpleNamespace(ack=lambda m: None)
    gw.custody = SimpleNamespace(stored=lambda s, q: None)
    gw._custody_wake = gw._pump_wake = asyncio.Event()
    gw.node, gw.site = "gw-home", "home"
    gw.endpoint = SimpleNamespace(seal=lambda topic, kind, body, to, **kw: (b"sealed", SimpleNamespace(seq=1)))

    async def go() -> None:
        gw._custody_wake = gw._pump_wake = asyncio.Event()
        for seq, topic in enumerate([topics.telemetry("home", "dev-1", "env"), topics.task_result("home", "dev-1"),
                                     topics.status("home", "dev-2")]):
            gw._incoming.put_nowait((SimpleNamespace(topic=topic, payload=b"p"),
                                     SimpleNamespace(sender=topic.split("/")[3], seq=seq, trace=None), False))
        committer = asyncio.get_running_loop().create_task(gw._committer())
        await asyncio.wait_for(gw._pump_wake.wait(), 5)  # set once the batch is stored
        committer.cancel()
        assert gw.stats["received"] == 3
        await gw.emit_own(topics.event("home", "gw-home", "qos.limited"), "event", {})

    asyncio.run(go())
    gw._db.shutdown()
    assert [(i.sender, i.seq, i.priority) for i in gw.outbox.due(0.0, 5, 10)] == [
        ("dev-1", 1, 8), ("gw-home", 1, 7), ("dev-2", 2, 5), ("dev-1", 0, 3)]
