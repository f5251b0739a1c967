"""Task args and results larger than one message travel in parts (cwsnet/parts.py, protocol §3 "Parts")."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
from pathlib import Path

import cbor2
import pytest

from cwsnet import parts
from cwsnet.envelope import MAX_PAYLOAD


def big(n: int, seed: int = 1) -> dict:
    return {"blob": random.Random(seed).randbytes(n), "name": "camera-1"}


def test_a_value_that_fits_one_message_goes_inline_and_a_bigger_one_in_parts_that_rejoin() -> None:
    assert parts.plan({"x": 1}, "v", allowed=False) == (None, [])
    value = big(600_000)
    ref, ps = parts.plan(value, "v", allowed=True)
    encoded = cbor2.dumps(value)
    assert ref == parts.Ref(hashlib.sha256(encoded).hexdigest(), len(encoded), 5)
    assert [p.i for p in ps] == [0, 1, 2, 3, 4] and all(p.n == 5 for p in ps)
    # each part's message is well inside one envelope
    assert max(len(cbor2.dumps({"task_id": "t" * 32, "attempt": 9, "part": p.body()})) for p in ps) < MAX_PAYLOAD - 4096
    assert parts.join(ref, [p.data for p in ps]) == value


def test_what_cannot_travel_is_refused_with_its_reason() -> None:
    with pytest.raises(parts.PartError, match="takes no parts"):
        parts.plan(big(600_000), "the handler's result", allowed=False)
    # without parts, what fits one message still goes (up to the body's limit, not the parts threshold)
    assert parts.plan({"b": b"x" * (parts.INLINE_MAX + 100)}, "r", allowed=False) == (None, [])
    with pytest.raises(parts.PartError, match=f"at most {parts.MAX_PARTED} travel in parts"):
        parts.plan({"b": b"\0" * (parts.MAX_PARTED + 1)}, "the args", allowed=True)
    with pytest.raises(parts.PartError, match="not a finite number"):
        parts.plan({"x": float("nan")}, "the args", allowed=True)


def test_joined_parts_must_make_exactly_the_value_the_ref_names() -> None:
    ref, ps = parts.split(big(300_000))
    datas = [p.data for p in ps]
    with pytest.raises(parts.PartError, match="SHA-256"):
        parts.join(ref, [datas[0], datas[1][:-1] + b"x", datas[2]])
    with pytest.raises(parts.PartError, match="make 262144 bytes"):
        parts.join(ref, datas[:2])
    bad = cbor2.dumps([1, 2, 3])
    with pytest.raises(parts.PartError, match="must be a map"):
        parts.join(parts.Ref(hashlib.sha256(bad).hexdigest(), len(bad), 1), [bad])


@pytest.mark.parametrize(("part", "why"), [
    ({"blob": "A" * 64, "i": 0, "n": 1, "data": b"x"}, "blob must be 64 lowercase hex"),
    ({"blob": "a" * 64, "i": 1, "n": 1, "data": b"x"}, r"i must be 0..n-1"),
    ({"blob": "a" * 64, "i": 0, "n": parts.MAX_PARTS + 1, "data": b"x"}, "n must be"),
    ({"blob": "a" * 64, "i": 0, "n": 1, "data": b""}, "data must be"),
    ({"blob": "a" * 64, "i": 0, "n": 1, "data": "text"}, "data must be"),
    ({"blob": "a" * 64, "i": True, "n": 2, "data": b"x"}, "i must be"),
    ([1], "must be a map"),
])
def test_a_bad_part_is_refused_naming_its_field(part: object, why: str) -> None:
    with pytest.raises(parts.PartError, match=why):
        parts.Part.parse(part, "task t part")


@pytest.mark.parametrize(("ref", "why"), [
    ({"sha256": "a" * 64, "size": 0, "parts": 0}, "size must be"),
    ({"sha256": "a" * 64, "size": 300_000, "parts": 2}, r"parts must be size / 131072 rounded up \(3\)"),
    ({"sha256": "a" * 63, "size": 10, "parts": 1}, "sha256 must be"),
    ({"sha256": "a" * 64, "size": parts.MAX_PARTED + 1, "parts": 129}, "size must be"),
])
def test_a_bad_ref_is_refused_naming_its_field(ref: object, why: str) -> None:
    with pytest.raises(parts.PartError, match=why):
        parts.Ref.parse(ref, "args_ref")


def test_parts_in_any_order_complete_the_message_that_waits_for_them_and_survive_a_reopen(tmp_path: Path) -> None:
    value = big(400_000, seed=7)
    ref, ps = parts.split(value)
    store = parts.PartStore(tmp_path / "parts.db")
    assert store.add("cloud", "t/1", ps[2], 100.0) == (None, [])
    assert store.take("cloud", "t/1", ref) is None  # parts missing: the message waits
    store.wait("cloud", "t/1", ref, {"task_id": "t", "args_ref": ref.body()}, 100.0)
    assert store.add("cloud", "t/1", ps[0], 101.0) == (None, [])
    assert store.add("cloud", "t/1", ps[0], 101.5) == (None, [])  # a repeat is absorbed
    store.close()
    store = parts.PartStore(tmp_path / "parts.db")  # a restart keeps what arrived
    assert store.add("cloud", "t/1", ps[3], 102.0) == (None, [])
    assert store.ready() == []
    waiting, dropped = store.add("cloud", "t/1", ps[1], 103.0)
    assert waiting == {"task_id": "t", "args_ref": ref.body()} and dropped == []
    assert store.ready() == [("cloud", "t/1", waiting)]  # (until taken: a crash now loses nothing)
    assert store.take("cloud", "t/1", ref) == value
    assert store.conn.execute("select count(*) from parts").fetchone()[0] == 0  # forgotten once taken
    assert store.ready() == [] and store.waiting_names("cloud", 0.0) == []
    store.close()


def test_two_messages_with_the_same_big_value_each_keep_their_own_parts(tmp_path: Path) -> None:
    """Two tasks with the same large args (or two results that happen to be equal), interleaved."""
    value = big(300_000, seed=9)
    ref, ps = parts.split(value)
    store = parts.PartStore(tmp_path / "parts.db")
    for p in ps:
        store.add("cloud", "t1/1", p, 1.0)
        store.add("cloud", "t2/1", p, 1.0)
    store.wait("cloud", "t2/1", ref, {"task_id": "t2"}, 1.0)
    assert store.take("cloud", "t1/1", ref) == value
    assert store.take("cloud", "t2/1", ref) == value  # not taken away by t1


def test_parts_are_kept_per_sender_so_one_peer_cannot_complete_anothers(tmp_path: Path) -> None:
    value = big(200_000)
    ref, ps = parts.split(value)
    store = parts.PartStore(tmp_path / "parts.db")
    store.add("dev-1", "t/1", ps[0], 1.0)
    store.add("dev-2", "t/1", ps[1], 1.0)
    assert store.take("dev-1", "t/1", ref) is None and store.take("dev-2", "t/1", ref) is None
    store.add("dev-1", "t/1", ps[1], 2.0)
    assert store.take("dev-1", "t/1", ref) == value


def test_parts_that_do_not_make_the_value_fail_once_and_are_forgotten(tmp_path: Path) -> None:
    ref, ps = parts.split(big(200_000))
    store = parts.PartStore(tmp_path / "parts.db")
    store.add("dev-1", "t/1", ps[0], 1.0)
    store.add("dev-1", "t/1", parts.Part(ps[1].blob, 1, 2, ps[1].data[:-1] + b"!"), 1.0)
    with pytest.raises(parts.PartError, match="SHA-256"):
        store.take("dev-1", "t/1", ref)
    assert store.conn.execute("select count(*) from parts").fetchone()[0] == 0


def test_incomplete_parts_age_out_and_a_sender_is_bounded_least_recently_fed_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = parts.PartStore(tmp_path / "parts.db", max_age=60.0)
    ref_old, old = parts.split(big(300_000, seed=1))
    store.add("dev-1", "old/1", old[0], 0.0)
    store.wait("dev-1", "old/1", ref_old, {"task_id": "old"}, 0.0)
    _, new = parts.split(big(300_000, seed=2))
    store.add("dev-1", "new/1", new[0], 50.0)
    # the waiting message whose parts stopped coming is given back, so its task fails rather than waits
    assert store.prune(70.0) == [("dev-1", "old/1", {"task_id": "old"})]
    assert store.conn.execute("select name from parts").fetchall() == [("new/1",)]
    assert store.conn.execute("select count(*) from parts_waiting").fetchone()[0] == 0

    monkeypatch.setattr(parts, "SENDER_MAX_BYTES", 3 * parts.PART_BYTES)
    ref3, third = parts.split(big(300_000, seed=3))
    store.wait("dev-1", "new/1", parts.Ref(new[0].blob, 300_000, 3), {"task_id": "new"}, 50.0)
    dropped = store.add("dev-1", "third/1", third[0], 80.0)[1]
    assert store.add("dev-2", "third/1", third[0], 81.0) == (None, [])  # another sender's do not count for dev-1
    dropped += store.add("dev-1", "third/1", third[1], 81.0)[1]
    dropped += store.add("dev-1", "third/1", third[2], 82.0)[1]  # over the bound: dev-1's stalest other goes
    assert dropped == [("dev-1", "new/1", {"task_id": "new"})]
    names = {n for (n,) in store.conn.execute("select name from parts where sender = 'dev-1'")}
    assert names == {"third/1"}
    assert store.conn.execute("select count(*) from parts where sender = 'dev-2'").fetchone()[0] == 1
    assert store.waiting_names("dev-1", 0.0) == []


def test_command_messages_send_the_parts_first_and_the_command_last_with_its_ref() -> None:
    cmd = {"task_id": "t1", "handler": "echo", "args": big(300_000), "deadline": None, "attempt": 2, "lease": 5.0,
           "checkpoint": None, "parts": True}
    msgs = parts.command_messages(cmd)
    assert [sorted(m) for m in msgs[:-1]] == [["attempt", "part", "task_id"]] * 3
    last = msgs[-1]
    assert last["args"] is None and parts.Ref.parse(last["args_ref"]).parts == 3
    assert {k: v for k, v in last.items() if k not in ("args", "args_ref")} == \
        {k: v for k, v in cmd.items() if k != "args"}
    small = dict(cmd, args={"x": 1})
    assert parts.command_messages(small) == [small]


def test_the_store_never_commits_half_a_call(tmp_path: Path) -> None:
    """A failure inside a call rolls it back (the caller's transaction rule)."""
    store = parts.PartStore(tmp_path / "parts.db")
    _, ps = parts.split(big(200_000))
    store.conn.execute("create trigger boom after insert on parts begin select raise(abort, 'disk full'); end")
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        store.add("dev-1", "t/1", ps[0], 1.0)
    assert store.conn.execute("select count(*) from parts").fetchone()[0] == 0
    assert os.path.exists(tmp_path / "parts.db")
