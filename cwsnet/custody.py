"""The store-and-forward acknowledgement state machines, sans I/O (``docs/protocol.md`` §5).

Three hops, each with the same rule — *a message leaves a store only when the next store has
committed it*:

    agent outbox --custody ack--> gateway outbox --end-to-end ack--> cloud store

* :class:`SendWindow` is the sender's side of a hop: which held messages to send or re-send now
  (at most ``window`` in flight, re-sent after ``retransmit_after`` doubling per attempt up to
  ``max_backoff``, everything in flight due at once after a reconnect, nothing new while the
  receiver asked for a pause). It holds only volatile state: the messages themselves are in the
  sender's durable outbox, so after a crash a fresh window simply sends them all again and the
  receiver's ``(sender, seq)`` dedup absorbs the repeats.
* :class:`CustodyAcks` is the receiving gateway's side: seqs committed (or found already held) per
  device, coalesced into ranges, plus "busy" notices for messages it refused because its store is
  near its limit.
* :func:`ranges` / :func:`expand` turn seq sets into ``[[first, last], ...]`` and back.

The agent and the gateway drive these from their event loops; ``tests/test_custody_model.py``
explores every interleaving of sends, losses, duplicates, acks and crashes of a small system built
from them and checks that nothing acknowledged is lost and nothing is stored twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: at most this many ranges in one ack body (more go into further bodies)
MAX_RANGES = 1000


def ranges(seqs: Iterable[int]) -> list[list[int]]:
    """``{1, 2, 3, 7}`` -> ``[[1, 3], [7, 7]]`` (sorted, consecutive seqs collapsed)."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def parse_ranges(value: Any, *, limit: int = MAX_RANGES) -> list[tuple[int, int]]:
    """Validate ``[[first, last], ...]`` from an ack body; malformed entries are skipped."""
    out: list[tuple[int, int]] = []
    if not isinstance(value, list):
        return out
    for item in value[:limit]:
        if (isinstance(item, list) and len(item) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in item) and 0 <= item[0] <= item[1] < 2**63):
            out.append((item[0], item[1]))
    return out


def covers(rs: Iterable[tuple[int, int]], seq: int) -> bool:
    return any(first <= seq <= last for first, last in rs)


@dataclass(slots=True)
class _Flight:
    sent_at: float
    attempts: int


@dataclass
class SendWindow:
    """Sender side of one hop: what to (re)send now. Pure: the caller passes the clock in.

    ``due(held, now)`` takes the held seqs in ascending order (from the durable outbox) and
    returns those to publish now, oldest first: in-flight ones whose ack is overdue, then new ones
    while fewer than ``window`` are in flight. The caller publishes them and calls
    ``sent(seqs, now)``; ``acked(seqs)`` forgets them (the caller deletes them from its outbox).

    Back-pressure: ``pause`` stops new sends for a while, except seqs the caller marks ``urgent``
    (higher classes than bulk telemetry, which a receiver above its high water still takes);
    ``refused(seqs)`` takes messages the receiver refused out of flight (they no longer hold window
    room) and holds them back until the pause ends.
    """

    window: int = 100
    retransmit_after: float = 5.0
    max_backoff: float = 60.0
    inflight: dict[int, _Flight] = field(default_factory=dict)
    paused_until: float = 0.0
    deferred: dict[int, float] = field(default_factory=dict)  # refused seq -> not before

    def due(self, held: Iterable[int], now: float, urgent: frozenset[int] | set[int] = frozenset()) -> list[int]:
        out: list[int] = []
        fresh_room = self.window - len(self.inflight)
        seen_inflight = 0
        paused = now < self.paused_until
        for seq in held:
            f = self.inflight.get(seq)
            if f is not None:
                seen_inflight += 1
                if f.sent_at + self.backoff(f.attempts) <= now:
                    out.append(seq)
            elif self.deferred.get(seq, now) > now:
                continue  # refused: not before the pause ends
            elif fresh_room > 0 and (not paused or seq in urgent):
                out.append(seq)
                fresh_room -= 1
            elif seen_inflight >= len(self.inflight) and (fresh_room <= 0 or not urgent):
                break  # nothing more can go now, and every in-flight one was looked at
        return out

    def backoff(self, attempts: int) -> float:
        return min(self.max_backoff, self.retransmit_after * (1 << min(max(attempts - 1, 0), 16)))

    def sent(self, seqs: Iterable[int], now: float) -> None:
        for seq in seqs:
            self.deferred.pop(seq, None)
            f = self.inflight.get(seq)
            if f is None:
                self.inflight[seq] = _Flight(now, 1)
            else:
                f.sent_at, f.attempts = now, f.attempts + 1

    def acked(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self.inflight.pop(seq, None)
            self.deferred.pop(seq, None)

    def refused(self, seqs: Iterable[int]) -> None:
        """The receiver refused these (no room): out of flight, held back until the pause ends."""
        for seq in seqs:
            if self.inflight.pop(seq, None) is not None:
                self.deferred[seq] = self.paused_until

    def forget(self, keep: Iterable[int]) -> None:
        """Drop in-flight entries for seqs no longer held (acked elsewhere, dropped by policy)."""
        held = set(keep)
        for seq in [s for s in self.inflight if s not in held]:
            del self.inflight[seq]
        for seq in [s for s in self.deferred if s not in held]:
            del self.deferred[seq]

    def reconnected(self) -> None:
        """A new connection: whatever the old one carried may be gone, so all in flight is due now
        (attempt counts kept); a pause asked for by the old peer no longer holds."""
        for f in self.inflight.values():
            f.sent_at = float("-inf")
        self.paused_until = 0.0
        self.deferred.clear()

    def pause(self, now: float, seconds: float) -> None:
        """The receiver is near its storage limit: send nothing new for ``seconds`` (capped at
        ``max_backoff``). Messages in flight keep their retransmission timers, except that none
        waits past the end of the pause: the receiver refused some of them, and a long backoff
        would hold them up long after it has room again."""
        self.paused_until = max(self.paused_until, now + min(max(seconds, 0.0), self.max_backoff))
        for f in self.inflight.values():
            wait = self.backoff(f.attempts)
            if f.sent_at + wait > self.paused_until:
                f.sent_at = self.paused_until - wait

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until something may become due (a retransmission or the end of a pause)."""
        times = [f.sent_at + self.backoff(f.attempts) for f in self.inflight.values()]
        if self.paused_until > now:
            times.append(self.paused_until)
        times += [t for t in self.deferred.values() if t > now]
        if not times:
            return None
        return max(0.0, min(times) - now)


@dataclass
class CustodyAcks:
    """Receiver (gateway) side: custody acks and busy notices waiting to be sent, per device.

    ``body`` renders ``{"custody": [[first, last], ...]}`` plus ``"busy": seconds`` and
    ``"refused": [[first, last], ...]`` when the gateway refused some of that device's messages for
    lack of room (the device keeps them, holds them back and sends no new bulk telemetry for that
    long)."""

    busy_for: float = 5.0
    _custody: dict[str, set[int]] = field(default_factory=dict)
    _busy: dict[str, set[int]] = field(default_factory=dict)
    _pause: dict[str, float] = field(default_factory=dict)

    def stored(self, device: str, seq: int) -> None:
        """``(device, seq)`` is committed in the gateway's outbox (new or already held)."""
        self._custody.setdefault(device, set()).add(seq)

    def refused(self, device: str, seq: int | None = None, busy_for: float | None = None) -> None:
        """``busy_for``: this device's pause, if not the default (a rate limit's time to its next token)."""
        refused = self._busy.setdefault(device, set())
        if seq is not None:
            refused.add(seq)
        # the longest pause asked for wins (an outbox-full refusal's default beside a rate limit's 1 s)
        self._pause[device] = max(self._pause.get(device, 0.0), self.busy_for if busy_for is None else busy_for)

    def __bool__(self) -> bool:
        return bool(self._custody) or bool(self._busy)

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        """Take everything pending as ``(device, body)`` pairs, at most MAX_RANGES ranges a body
        (taken at once, so a caller that stops half way loses nothing: it puts back what it did
        not send)."""
        return list(self._drain())

    def _drain(self) -> Iterator[tuple[str, dict[str, Any]]]:
        custody, self._custody = self._custody, {}
        busy, self._busy = self._busy, {}
        pause, self._pause = self._pause, {}
        for device in sorted(set(custody) | set(busy)):
            rs = ranges(custody.get(device, ()))
            chunks = [rs[i:i + MAX_RANGES] for i in range(0, len(rs), MAX_RANGES)] or [[]]
            for i, chunk in enumerate(chunks):
                body: dict[str, Any] = {"custody": chunk}
                if device in busy and i == 0:
                    body["busy"] = pause.get(device, self.busy_for)
                    if busy[device]:
                        body["refused"] = ranges(busy[device])[:MAX_RANGES]
                yield device, body

    def put_back(self, device: str, body: dict[str, Any]) -> None:
        """An ack that could not be sent: keep it for the next flush."""
        for first, last in parse_ranges(body.get("custody")):
            self._custody.setdefault(device, set()).update(range(first, last + 1))
        if "busy" in body:
            refused = self._busy.setdefault(device, set())
            self._pause[device] = max(self._pause.get(device, 0.0), body["busy"])
            for first, last in parse_ranges(body.get("refused")):
                refused.update(range(first, last + 1))


def acked_seqs(body: Any, me: str) -> tuple[list[tuple[int, int]], float | None]:
    """Read an ack body addressed to node ``me``: the ranges it acknowledges and the pause (s).

    A gateway's custody ack is ``{"custody": [[first, last], ...], "busy"?: seconds}``; the cloud's
    end-to-end ack (to a device without a gateway) is ``{"acks": [[sender, first, last], ...]}``,
    of which only ``me``'s entries count."""
    if not isinstance(body, dict):
        return [], None
    rs = parse_ranges(body.get("custody"))
    for item in body.get("acks", [])[:MAX_RANGES] if isinstance(body.get("acks"), list) else []:
        if isinstance(item, list) and len(item) == 3 and item[0] == me:
            rs += parse_ranges([item[1:]])
    busy = body.get("busy")
    pause = float(busy) if isinstance(busy, int | float) and not isinstance(busy, bool) and 0 < busy < 3600 else None
    return rs, pause


def expand(rs: Iterable[tuple[int, int]], held: Iterable[int]) -> list[int]:
    """The held seqs that the ranges cover (ranges may be huge; the held set is small)."""
    rs = list(rs)
    return [s for s in held if covers(rs, s)]
