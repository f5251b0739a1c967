"""Unit tests of every public function and method of ``cwsnet/custody.py``, with exact values.

(The interleavings of a whole agent -> gateway -> cloud system built from these are explored in
``tests/test_custody_model.py``.)
"""

from __future__ import annotations

import itertools
import math

import pytest

from cwsnet.custody import (
    MAX_RANGES,
    CustodyAcks,
    SendWindow,
    acked_seqs,
    covers,
    expand,
    parse_ranges,
    ranges,
)

# ---- ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seqs", "expected"), [
    ([], []),
    ([5], [[5, 5]]),
    ({1, 2, 3, 7}, [[1, 3], [7, 7]]),
    ([7, 3, 1, 2], [[1, 3], [7, 7]]),  # unsorted
    ([4, 4, 5, 5, 4], [[4, 5]]),  # duplicates
    ([0, 2, 4], [[0, 0], [2, 2], [4, 4]]),  # a gap of one is still a gap
    ([10, 11, 13, 14, 15, 20], [[10, 11], [13, 15], [20, 20]]),
    ([0, 2**63 - 1, 2**63 - 2], [[0, 0], [2**63 - 2, 2**63 - 1]]),
])
def test_ranges_coalesces_consecutive_seqs(seqs: object, expected: list[list[int]]) -> None:
    assert ranges(seqs) == expected  # type: ignore[arg-type]


def test_ranges_takes_any_iterable_and_returns_fresh_lists() -> None:
    assert ranges(s for s in (3, 1, 2)) == [[1, 3]]
    assert ranges(range(1000)) == [[0, 999]]
    a, b = ranges([1]), ranges([1])
    a[0][1] = 9
    assert b == [[1, 1]]


# ---- parse_ranges ------------------------------------------------------------------------------


def test_parse_ranges_accepts_well_formed_ranges_as_tuples_in_order() -> None:
    assert parse_ranges([[5, 9], [1, 1], [0, 2**63 - 1]]) == [(5, 9), (1, 1), (0, 2**63 - 1)]
    assert parse_ranges([]) == []


@pytest.mark.parametrize("value", [None, 7, "1-3", {"first": 1, "last": 3}, ((1, 3),), b"\x01"])
def test_parse_ranges_of_a_non_list_is_empty(value: object) -> None:
    assert parse_ranges(value) == []


@pytest.mark.parametrize("bad", [
    [True, 2], [1, False], [True, True],  # bools are not seqs
    [-1, 2], [-5, -1],  # negative
    [3, 2],  # first > last
    [0, 2**63], [2**63, 2**63],  # not below 2**63
    [1], [1, 2, 3], [],  # wrong length
    (1, 2),  # a tuple is not a CBOR/JSON array here
    [1.0, 2], [1, 2.0], [None, 1], ["1", "2"], [[1], 2],  # wrong types
    "12", 12, None, {"0": 1},
])
def test_parse_ranges_skips_malformed_entries_and_keeps_the_rest(bad: object) -> None:
    assert parse_ranges([[1, 1], bad, [3, 4]]) == [(1, 1), (3, 4)]


def test_parse_ranges_looks_at_no_more_than_limit_entries() -> None:
    many = [[i, i] for i in range(MAX_RANGES + 5)]
    assert parse_ranges(many) == [(i, i) for i in range(MAX_RANGES)]
    assert parse_ranges(many, limit=3) == [(0, 0), (1, 1), (2, 2)]
    # the limit counts entries read, malformed or not
    assert parse_ranges([[-1, 0], [1, 1], [2, 2]], limit=2) == [(1, 1)]
    assert parse_ranges(many, limit=0) == []


# ---- covers / expand ---------------------------------------------------------------------------


def test_covers() -> None:
    rs = [(1, 3), (10, 10)]
    assert [s for s in range(12) if covers(rs, s)] == [1, 2, 3, 10]
    assert not covers([], 0)
    assert covers(iter([(5, 5)]), 5)


def test_expand_returns_the_covered_held_seqs_in_held_order() -> None:
    assert expand([(1, 3), (10, 2**63 - 1)], [0, 1, 2, 5, 10, 99]) == [1, 2, 10, 99]
    assert expand([(1, 3)], [3, 1, 7]) == [3, 1]
    assert expand([], [1, 2]) == []
    assert expand([(1, 2)], []) == []
    # the ranges may be a one-shot iterator: expand reads them once, not once per held seq
    assert expand(iter([(2, 2), (4, 5)]), range(7)) == [2, 4, 5]
    # a huge range costs nothing: only the held seqs are looked at
    assert expand([(0, 2**63 - 1)], [2**62]) == [2**62]


# ---- acked_seqs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [None, [], "custody", 3, [["dev-1", 1, 2]]])
def test_acked_seqs_of_a_non_map_is_nothing(body: object) -> None:
    assert acked_seqs(body, "dev-1") == ([], None)


def test_acked_seqs_reads_a_gateway_custody_ack() -> None:
    assert acked_seqs({"custody": [[1, 3], [7, 7]]}, "dev-1") == ([(1, 3), (7, 7)], None)
    assert acked_seqs({"custody": []}, "dev-1") == ([], None)
    assert acked_seqs({}, "dev-1") == ([], None)
    assert acked_seqs({"custody": [[1, 3], [5, 4], "x"]}, "dev-1") == ([(1, 3)], None)
    assert acked_seqs({"custody": "1-3"}, "dev-1") == ([], None)


def test_acked_seqs_reads_a_busy_notice_as_a_float_pause() -> None:
    rs, pause = acked_seqs({"custody": [[1, 2]], "busy": 5}, "dev-1")
    assert (rs, pause) == ([(1, 2)], 5.0) and type(pause) is float
    assert acked_seqs({"custody": [], "busy": 2.5}, "dev-1") == ([], 2.5)
    assert acked_seqs({"busy": 0.001}, "dev-1") == ([], 0.001)
    assert acked_seqs({"busy": 3599.5}, "dev-1") == ([], 3599.5)


@pytest.mark.parametrize("busy", [0, 0.0, -1, -0.5, 3600, 3600.0, 1e9, math.inf, -math.inf, math.nan,
                                  True, False, "5", None, [5], {"s": 5}])
def test_acked_seqs_ignores_a_busy_notice_out_of_bounds(busy: object) -> None:
    assert acked_seqs({"custody": [[4, 4]], "busy": busy}, "dev-1") == ([(4, 4)], None)


def test_acked_seqs_reads_only_my_entries_of_an_end_to_end_ack() -> None:
    body = {"acks": [["dev-1", 1, 3], ["dev-2", 4, 9], ["dev-1", 7, 7], ["dev-10", 8, 8]]}
    assert acked_seqs(body, "dev-1") == ([(1, 3), (7, 7)], None)
    assert acked_seqs(body, "dev-2") == ([(4, 9)], None)
    assert acked_seqs(body, "dev-3") == ([], None)


@pytest.mark.parametrize("bad", [
    ["dev-1", 3, 1], ["dev-1", -1, 1], ["dev-1", 1, 2**63], ["dev-1", True, 2], ["dev-1", 1.0, 2],
    ["dev-1", 1], ["dev-1", 1, 2, 3], ("dev-1", 1, 2), "dev-1", None, [1, 2, 3],
])
def test_acked_seqs_skips_malformed_end_to_end_entries(bad: object) -> None:
    body = {"acks": [bad, ["dev-1", 5, 6]]}
    assert acked_seqs(body, "dev-1") == ([(5, 6)], None)


@pytest.mark.parametrize("acks", [None, "dev-1", {"dev-1": [1, 2]}, 5, ("dev-1", 1, 2)])
def test_acked_seqs_ignores_acks_that_are_not_a_list(acks: object) -> None:
    assert acked_seqs({"acks": acks, "custody": [[9, 9]]}, "dev-1") == ([(9, 9)], None)


def test_acked_seqs_reads_custody_then_my_end_to_end_entries() -> None:
    body = {"custody": [[1, 1]], "acks": [["dev-1", 3, 4]], "busy": 7}
    assert acked_seqs(body, "dev-1") == ([(1, 1), (3, 4)], 7.0)


def test_acked_seqs_reads_at_most_max_ranges_end_to_end_entries() -> None:
    mine = [["me", i, i] for i in range(MAX_RANGES + 1)]
    rs, _ = acked_seqs({"acks": mine}, "me")
    assert rs == [(i, i) for i in range(MAX_RANGES)]
    # entries past the limit are not read even when the ones before are someone else's
    rs, _ = acked_seqs({"acks": [["other", 0, 0]] * MAX_RANGES + [["me", 5, 5]]}, "me")
    assert rs == []


# ---- SendWindow ----------------------------------------------------------------------------------


def test_send_window_defaults() -> None:
    w = SendWindow()
    assert (w.window, w.retransmit_after, w.max_backoff, w.inflight, w.paused_until) == (100, 5.0, 60.0, {}, 0.0)
    assert SendWindow().inflight is not w.inflight  # no shared default


def test_backoff_doubles_per_attempt_up_to_max_backoff() -> None:
    w = SendWindow(retransmit_after=5.0, max_backoff=60.0)
    assert [w.backoff(a) for a in range(8)] == [5.0, 5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert w.backoff(10**6) == 60.0
    # the doubling itself stops at 2**16 (no huge shifts), whatever max_backoff is
    w = SendWindow(retransmit_after=1.0, max_backoff=1e12)
    assert [w.backoff(a) for a in (16, 17, 18, 1000)] == [2.0**15, 2.0**16, 2.0**16, 2.0**16]


def test_due_sends_new_seqs_up_to_the_window_oldest_first_without_changing_state() -> None:
    w = SendWindow(window=3)
    assert w.due([], 0.0) == []
    assert w.due([1, 2, 3, 4, 5], 0.0) == [1, 2, 3]
    assert w.due([1, 2, 3, 4, 5], 0.0) == [1, 2, 3]  # due() is a question, sent() the answer
    assert w.inflight == {}
    assert w.due(iter([7, 8]), 0.0) == [7, 8]


def test_sent_records_time_and_attempts() -> None:
    w = SendWindow()
    w.sent([1, 2], 3.0)
    assert {s: (f.sent_at, f.attempts) for s, f in w.inflight.items()} == {1: (3.0, 1), 2: (3.0, 1)}
    w.sent(iter([2]), 8.0)
    assert {s: (f.sent_at, f.attempts) for s, f in w.inflight.items()} == {1: (3.0, 1), 2: (8.0, 2)}
    w.sent([], 9.0)
    assert len(w.inflight) == 2


def test_window_full_sends_nothing_new_until_an_ack() -> None:
    w = SendWindow(window=3, retransmit_after=5.0)
    w.sent([1, 2, 3], 0.0)
    assert w.due([1, 2, 3, 4, 5], 0.0) == []
    assert w.due([1, 2, 3, 4, 5], 4.999) == []
    w.acked([2])
    assert w.due([1, 3, 4, 5], 1.0) == [4]
    w.acked([1, 3])
    assert w.due([4, 5], 1.0) == [4, 5]
    # overdue messages still count against the window (no new ones while they are unacked)
    w = SendWindow(window=2, retransmit_after=5.0)
    w.sent([1, 2], 0.0)
    assert w.due([1, 2, 3], 100.0) == [1, 2]


def test_due_returns_overdue_retransmissions_and_new_seqs_in_held_order() -> None:
    w = SendWindow(window=2, retransmit_after=5.0)
    w.sent([1, 2], 0.0)
    w.acked([1])
    assert w.due([2, 3, 4], 4.0) == [3]  # 2 not overdue yet; one free slot
    assert w.due([2, 3, 4], 5.0) == [2, 3]  # overdue exactly at sent_at + backoff
    w = SendWindow(window=3, retransmit_after=5.0)
    w.sent([2], 0.0)
    assert w.due([1, 2, 3, 4], 5.0) == [1, 2, 3]


def test_retransmission_backs_off_doubling_up_to_max_backoff() -> None:
    w = SendWindow(window=10, retransmit_after=5.0, max_backoff=20.0)
    w.sent([1], 0.0)
    times = []
    now = 0.0
    for _ in range(5):  # step the clock until seq 1 is due again, re-send it, repeat
        while w.due([1], now) != [1]:
            now += 0.5
        times.append(now)
        w.sent([1], now)
    # intervals 5, 10, 20, then capped at 20
    assert times == [5.0, 15.0, 35.0, 55.0, 75.0]
    assert w.inflight[1].attempts == 6


def test_due_stops_reading_held_once_the_window_is_full_and_every_flight_was_seen() -> None:
    # an endless iterator of held seqs: due() must know when to stop
    w = SendWindow(window=3)
    assert w.due(itertools.count(1), 0.0) == [1, 2, 3]
    w.sent([1, 2, 3], 0.0)
    assert w.due(itertools.count(1), 0.0) == []
    assert w.due(itertools.count(1), 5.0) == [1, 2, 3]
    w.pause(5.0, 10.0)
    w.acked([1, 2, 3])
    assert w.due(itertools.count(1), 6.0) == []  # paused: nothing new, and nothing in flight


def test_acked_and_forget() -> None:
    w = SendWindow()
    w.sent([1, 2, 3, 4], 0.0)
    w.acked([2, 99])  # an ack for a seq not in flight is fine
    assert sorted(w.inflight) == [1, 3, 4]
    w.forget([3, 4, 7])
    assert sorted(w.inflight) == [3, 4]
    w.forget(s for s in [4])
    assert sorted(w.inflight) == [4]
    w.forget([])
    assert w.inflight == {}


def test_forget_frees_the_window_held_by_dropped_seqs() -> None:
    w = SendWindow(window=1)
    w.sent([1], 0.0)
    assert w.due([2], 100.0) == []  # seq 1 (no longer held) still holds the only slot
    w.forget([2])
    assert w.due([2], 100.0) == [2]


def test_reconnected_makes_everything_in_flight_due_now_and_keeps_attempts() -> None:
    w = SendWindow(window=3, retransmit_after=5.0, max_backoff=60.0)
    w.sent([1, 2], 0.0)
    w.sent([1], 5.0)
    w.pause(5.0, 30.0)
    w.reconnected()
    assert w.paused_until == 0.0
    assert {s: (f.sent_at, f.attempts) for s, f in w.inflight.items()} == {1: (-math.inf, 2), 2: (-math.inf, 1)}
    assert w.due([1, 2, 3, 4], 6.0) == [1, 2, 3]
    assert w.next_wakeup(6.0) == 0.0
    w.sent([1, 2, 3], 6.0)
    # the backoff goes on from the kept attempt counts: seq 1 (3rd attempt) 20, seq 2 and 3 10 and 5
    assert w.due([1, 2, 3], 10.9) == []
    assert w.due([1, 2, 3], 11.0) == [3]
    assert w.due([1, 2, 3], 16.0) == [2, 3]
    assert w.due([1, 2, 3], 26.0) == [1, 2, 3]


def test_pause_blocks_new_sends_only() -> None:
    w = SendWindow(window=5, retransmit_after=5.0, max_backoff=60.0)
    w.sent([1], 0.0)
    w.pause(0.0, 30.0)
    assert w.paused_until == 30.0
    assert w.due([1, 2], 4.0) == []
    assert w.due([1, 2], 5.0) == [1]  # the retransmission still goes out, seq 2 waits
    w.sent([1], 5.0)
    assert w.due([1, 2], 14.9) == []
    assert w.due([1, 2], 15.0) == [1]  # and backs off as usual (10 after the 2nd attempt)
    w.sent([1], 15.0)  # 3rd attempt: due again at 35
    assert w.due([1, 2], 29.9) == []
    assert w.due([1, 2], 30.0) == [2]  # the pause is over at exactly paused_until


def test_pause_is_capped_clamped_and_never_shortened() -> None:
    w = SendWindow(max_backoff=60.0)
    w.pause(100.0, 1000.0)
    assert w.paused_until == 160.0  # capped at max_backoff
    w.pause(101.0, 5.0)
    assert w.paused_until == 160.0  # a shorter pause does not shorten the current one
    w.pause(150.0, 30.0)
    assert w.paused_until == 180.0
    w = SendWindow()
    w.pause(100.0, -5.0)
    assert w.paused_until == 100.0  # a negative pause is no pause
    assert w.due([1], 100.0) == [1]


def test_pause_pulls_in_retransmissions_that_would_wait_past_its_end() -> None:
    w = SendWindow(window=5, retransmit_after=5.0, max_backoff=60.0)
    w.sent([1, 2], 0.0)
    w.sent([1], 5.0)
    w.sent([1], 15.0)  # seq 1: 3 attempts, next due at 15 + 20 = 35; seq 2: due at 5
    w.pause(16.0, 4.0)  # paused until 20
    assert w.inflight[1].sent_at + w.backoff(w.inflight[1].attempts) == 20.0
    assert w.inflight[1].attempts == 3
    assert (w.inflight[2].sent_at, w.inflight[2].attempts) == (0.0, 1)  # due before the end: untouched
    assert w.due([1, 2, 3], 19.9) == [2]
    assert w.due([1, 2, 3], 20.0) == [1, 2, 3]
    assert w.next_wakeup(16.0) == 0.0  # seq 2 is overdue


def test_next_wakeup() -> None:
    w = SendWindow(retransmit_after=5.0, max_backoff=60.0)
    assert w.next_wakeup(0.0) is None
    w.sent([1], 0.0)
    assert w.next_wakeup(0.0) == 5.0
    assert w.next_wakeup(3.0) == 2.0
    assert w.next_wakeup(10.0) == 0.0  # overdue: now, never negative
    w.sent([2], 2.0)
    assert w.next_wakeup(1.0) == 4.0  # the earliest of the two
    w.sent([1], 5.0)  # 2nd attempt of seq 1: due at 15; seq 2 due at 7
    assert w.next_wakeup(5.0) == 2.0
    w.acked([2])
    assert w.next_wakeup(5.0) == 10.0
    w.acked([1])
    assert w.next_wakeup(5.0) is None


def test_next_wakeup_includes_the_end_of_a_pause() -> None:
    w = SendWindow(retransmit_after=5.0)
    w.pause(0.0, 3.0)
    assert w.next_wakeup(1.0) == 2.0
    assert w.next_wakeup(3.0) is None  # the pause is over
    w.sent([1], 0.0)
    assert w.next_wakeup(1.0) == 2.0  # pause end (3) before the retransmission (5)
    assert w.next_wakeup(3.5) == 1.5  # pause over: the retransmission
    w.reconnected()
    assert w.next_wakeup(3.5) == 0.0


# ---- CustodyAcks ---------------------------------------------------------------------------------


def test_custody_acks_empty() -> None:
    a = CustodyAcks()
    assert a.busy_for == 5.0
    assert not a
    assert list(a.drain()) == []


def test_custody_acks_drain_coalesces_per_device_sorted_and_empties() -> None:
    a = CustodyAcks()
    for seq in (3, 1, 2, 7, 2):
        a.stored("dev-b", seq)
    a.stored("dev-a", 5)
    assert a
    assert list(a.drain()) == [("dev-a", {"custody": [[5, 5]]}), ("dev-b", {"custody": [[1, 3], [7, 7]]})]
    assert not a
    assert list(a.drain()) == []


def test_custody_acks_busy_notice() -> None:
    a = CustodyAcks(busy_for=2.5)
    a.refused("dev-c")
    assert a
    assert list(a.drain()) == [("dev-c", {"custody": [], "busy": 2.5})]
    a.stored("dev-a", 1)
    a.refused("dev-a")
    a.refused("dev-a")
    a.stored("dev-b", 4)
    assert list(a.drain()) == [("dev-a", {"custody": [[1, 1]], "busy": 2.5}), ("dev-b", {"custody": [[4, 4]]})]
    assert not a


def test_custody_acks_chunks_at_max_ranges_with_busy_on_the_first_chunk_only() -> None:
    a = CustodyAcks()
    seqs = range(0, 2 * (2 * MAX_RANGES + 5), 2)  # 2 * MAX_RANGES + 5 isolated seqs
    for seq in seqs:
        a.stored("dev-1", seq)
    a.refused("dev-1")
    a.stored("dev-2", 1)
    out = list(a.drain())
    assert [(d, len(b["custody"]), b.get("busy")) for d, b in out] == [
        ("dev-1", MAX_RANGES, 5.0), ("dev-1", MAX_RANGES, None), ("dev-1", 5, None), ("dev-2", 1, None)]
    assert [r for d, b in out if d == "dev-1" for r in b["custody"]] == [[s, s] for s in seqs]
    # exactly MAX_RANGES ranges: one body
    a = CustodyAcks()
    for seq in range(0, 2 * MAX_RANGES, 2):
        a.stored("dev-1", seq)
    assert [len(b["custody"]) for _, b in a.drain()] == [MAX_RANGES]


def test_custody_acks_put_back_restores_what_was_drained() -> None:
    a = CustodyAcks()
    for seq in range(0, 2 * (MAX_RANGES + 3), 2):
        a.stored("dev-1", seq)
    a.stored("dev-2", 9)
    a.refused("dev-1")
    first = list(a.drain())
    for device, body in first:
        a.put_back(device, body)
    assert list(a.drain()) == first


def test_custody_acks_put_back_merges_with_new_acks() -> None:
    a = CustodyAcks()
    a.stored("dev-1", 1)
    a.stored("dev-1", 2)
    ((device, body),) = a.drain()
    a.stored("dev-1", 3)
    a.stored("dev-1", 9)
    a.put_back(device, body)
    assert list(a.drain()) == [("dev-1", {"custody": [[1, 3], [9, 9]]})]


def test_custody_acks_put_back_of_a_busy_or_malformed_body() -> None:
    a = CustodyAcks(busy_for=4.0)
    a.put_back("dev-1", {"custody": []})
    assert not a  # nothing to send
    a.put_back("dev-1", {"custody": "junk", "busy": 4.0})
    assert list(a.drain()) == [("dev-1", {"custody": [], "busy": 4.0})]
    a.put_back("dev-1", {"custody": [[3, 1], [5, 6], [True, 2]]})
    assert list(a.drain()) == [("dev-1", {"custody": [[5, 6]]})]


def test_custody_acks_put_back_during_a_drain_waits_for_the_next_drain() -> None:
    """The publish-or-put-back loop: a body that could not be sent is not yielded again by the
    same drain (no endless loop), and acks stored meanwhile are kept too."""
    a = CustodyAcks()
    a.stored("dev-1", 1)
    a.stored("dev-2", 2)
    seen = []
    for device, body in a.drain():
        seen.append(device)
        a.put_back(device, body)
        a.stored("dev-3", 3)
    assert seen == ["dev-1", "dev-2"]
    assert list(a.drain()) == [("dev-1", {"custody": [[1, 1]]}), ("dev-2", {"custody": [[2, 2]]}),
                               ("dev-3", {"custody": [[3, 3]]})]


def test_custody_ack_bodies_read_back_with_acked_seqs() -> None:
    """What the gateway sends is what the agent reads."""
    a = CustodyAcks(busy_for=3.0)
    for seq in (1, 2, 3, 8):
        a.stored("dev-1", seq)
    a.refused("dev-1")
    ((_, body),) = a.drain()
    rs, pause = acked_seqs(body, "dev-1")
    assert (rs, pause) == ([(1, 3), (8, 8)], 3.0)
    assert expand(rs, [1, 2, 3, 4, 5, 8, 9]) == [1, 2, 3, 8]
