"""Replay windows and sequence counters: sans-I/O, state is plain data the caller persists."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ReplayWindow:
    """Sliding anti-replay window over a sender's ``seq`` (the IPsec/DTLS bitmap scheme).

    ``check(seq)`` says whether ``seq`` is new; ``accept(seq)`` records it. Sequence numbers may
    arrive out of order within ``size`` of the highest seen; older ones are refused as too old.
    """

    size: int = 1024
    highest: int = -1
    bitmap: int = 0  # bit i set = (highest - i) seen

    def check(self, seq: int) -> str:
        """Return ``"new"``, ``"duplicate"`` or ``"too_old"`` without changing the window."""
        if seq > self.highest:
            return "new"
        offset = self.highest - seq
        if offset >= self.size:
            return "too_old"
        return "duplicate" if (self.bitmap >> offset) & 1 else "new"

    def accept(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = seq
        else:
            self.bitmap |= 1 << (self.highest - seq)

    def to_state(self) -> dict[str, int]:
        return {"size": self.size, "highest": self.highest, "bitmap": self.bitmap}

    @classmethod
    def from_state(cls, state: dict[str, int] | None, size: int = 1024) -> ReplayWindow:
        if not state:
            return cls(size=size)
        return cls(size=int(state["size"]), highest=int(state["highest"]), bitmap=int(state["bitmap"]))


class SeqCounter:
    """A per-sender sequence counter that never repeats a value across crashes.

    It reserves blocks: before handing out a value past the reserved mark it calls
    ``persist(new_mark)`` (which must be durable before returning), so after a crash the next run
    starts at the persisted mark. Gaps are allowed by the protocol; repeats are not.
    """

    def __init__(self, start: int, persist: Callable[[int], None], block: int = 1000,
                 wall_ms: Callable[[], int] | None = None) -> None:
        self._next = start
        self._mark = start
        self._persist = persist
        self._block = block
        self._wall_ms = wall_ms

    def next(self) -> int:
        if self._next >= self._mark:
            mark = self._next + self._block
            try:
                self._persist(mark)
            except Exception:
                # The reservation cannot be stored (disk full). A node starts each run at or above
                # its wall clock in ms, so a value more than a second below the wall clock cannot be
                # reused after a restart either: hand it out and try to reserve again next time.
                # Otherwise nothing is handed out.
                if self._wall_ms is None or self._next >= self._wall_ms() - 1000:
                    raise
            else:
                self._mark = mark
        value = self._next
        self._next += 1
        return value

    @property
    def peek(self) -> int:
        return self._next
