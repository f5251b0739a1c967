"""The agent's durable outbox: written before sending, bounded, and dropping by priority class."""

from __future__ import annotations

import random
from pathlib import Path

from edge_agent.outbox import PRIORITY, AgentOutbox


def test_survives_reopen_in_seq_order(tmp_path: Path) -> None:
    ob = AgentOutbox(tmp_path / "o.db")
    for seq, kind in ((5, "telemetry"), (6, "status"), (7, "task_result")):
        assert ob.add(seq, f"t/{seq}", b"x" * 10, kind == "status", kind)
    ob.remove(6)
    ob.close()
    again = AgentOutbox(tmp_path / "o.db")  # a reboot while offline
    assert [(h.seq, h.topic, h.retain) for h in again.oldest()] == [(5, "t/5", False), (7, "t/7", False)]
    assert again.depth() == 2 and again.size() == 2 * (10 + 3)


def test_overflow_drops_bulk_telemetry_oldest_first_and_counts(tmp_path: Path) -> None:
    ob = AgentOutbox(tmp_path / "o.db", max_messages=4)
    ob.add(1, "t", b"a", False, "telemetry")
    ob.add(2, "t", b"b", False, "task_result")
    ob.add(3, "t", b"c", False, "telemetry")
    ob.add(4, "t", b"d", False, "event")
    assert ob.add(5, "t", b"e", False, "event")  # full: the oldest telemetry goes
    assert [h.seq for h in ob.oldest()] == [2, 3, 4, 5]
    assert ob.add(6, "t", b"f", False, "task_result")  # then the next telemetry
    assert [h.seq for h in ob.oldest()] == [2, 4, 5, 6]
    assert not ob.add(7, "t", b"g", False, "telemetry")  # nothing lower left: the newcomer is dropped
    assert ob.drops() == {"telemetry": 3, "status": 0, "event": 0, "result": 0}
    assert ob.add(8, "t", b"h", False, "task_result")  # results push out events before results
    assert [h.seq for h in ob.oldest()] == [2, 5, 6, 8]
    assert ob.drops()["event"] == 1


def test_byte_bound_and_oversized_message(tmp_path: Path) -> None:
    ob = AgentOutbox(tmp_path / "o.db", max_messages=100, max_bytes=100)
    assert ob.add(1, "t", b"x" * 40, False, "telemetry") and ob.add(2, "t", b"x" * 40, False, "telemetry")
    assert ob.add(3, "t", b"x" * 40, False, "telemetry")  # frees the oldest to fit
    assert [h.seq for h in ob.oldest()] == [2, 3] and ob.size() <= 100
    assert not ob.add(4, "t", b"x" * 200, False, "task_result")  # can never fit: counted, nothing lost
    assert [h.seq for h in ob.oldest()] == [2, 3] and ob.drops()["result"] == 1


def test_policy_matches_a_reference_model(tmp_path: Path) -> None:
    rng = random.Random(3)
    ob = AgentOutbox(tmp_path / "o.db", max_messages=20, max_bytes=400)
    model: dict[int, tuple[int, int]] = {}  # seq -> (priority, size)
    kinds = list(PRIORITY)
    for seq in range(1, 600):
        kind = rng.choice(kinds)
        payload = b"p" * rng.randint(1, 60)
        size = len(payload) + 1
        prio = PRIORITY[kind]
        # reference: free lowest (priority, seq) of priority <= prio until it fits, else drop newcomer
        cand = sorted((p, s, z) for s, (p, z) in model.items() if p <= prio)
        count, total = len(model), sum(z for _, z in model.values())
        victims, ok = [], count + 1 <= 20 and total + size <= 400
        for _p, s, z in cand:
            if ok:
                break
            victims.append(s)
            count, total = count - 1, total - z
            ok = count + 1 <= 20 and total + size <= 400
        expected = ok and size <= 400
        if expected:
            for s in victims:
                del model[s]
            model[seq] = (prio, size)
        assert ob.add(seq, "t", payload, False, kind) == expected, seq
        if rng.random() < 0.2 and model:
            gone = rng.choice(sorted(model))
            ob.remove(gone)
            del model[gone]
        assert sorted(h.seq for h in ob.oldest(1000)) == sorted(model)
        assert ob.depth() == len(model) and ob.size() == sum(z for _, z in model.values())
