"""The agent's durable outbox (SQLite, WAL, through sqlite-utils).

Every outgoing message is written here, committed, and only then sent; it stays until the gateway's
*custody ack* (the gateway has committed it) or the cloud's *end-to-end ack* covers its ``seq``, so
a reboot while offline loses nothing that was stored. After a reconnect the outbox is sent again
in ``seq`` order (``docs/protocol.md`` §5).

Capacity is bounded by count and by bytes. When a new message would exceed either bound, the
overflow policy drops, one at a time, the message of the **lowest priority class**, oldest first
within it, until the new one fits:

    0 telemetry   bulk readings (dropped first)
    1 status      periodic status; a newer one supersedes it anyway
    2 event       events and alarms
    3 result      task results, site task submissions and births/deaths (dropped last)

A message of a lower class than everything held is itself dropped when the outbox is full of
higher classes. Every drop is counted per class, durably, and reported in the agent's status.

The **delivery ledger** keeps the fate of the last ``ledger_keep`` messages — ``held``, ``acked``
or ``dropped`` — in the same transactions as the outbox itself, so "what did this device send and
what became of it" can be audited after any crash (the chaos test checks it against the cloud).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cwsnet.db import open_durable, transaction

#: a site task submission (task_submit) is work someone asked for: kept like a task result, never
#: held back as bulk telemetry under the gateway's back-pressure
PRIORITY = {"telemetry": 0, "status": 1, "event": 2, "task_result": 3, "task_submit": 3, "birth": 3, "death": 3}
CLASS_NAMES = {0: "telemetry", 1: "status", 2: "event", 3: "result"}


@dataclass(frozen=True, slots=True)
class Held:
    seq: int
    topic: str
    payload: bytes
    retain: bool
    priority: int


class AgentOutbox:
    def __init__(self, path: Path, *, max_messages: int = 10_000, max_bytes: int = 16 * 1024 * 1024,
                 ledger_keep: int = 100_000) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.ledger_keep = ledger_keep
        self._since_prune = 0
        #: seqs the overflow policy dropped since the owner last took them (see :meth:`take_dropped`)
        self.dropped_seqs: list[int] = []
        self.db = open_durable(path)
        if "outbox" not in self.db.table_names():
            self.db["outbox"].create(
                {"seq": int, "topic": str, "payload": bytes, "retain": int, "priority": int, "size": int},
                pk="seq", not_null={"topic", "payload", "priority", "size"},
            )
            self.db["outbox"].create_index(["priority", "seq"])
        if "drops" not in self.db.table_names():
            self.db["drops"].create({"class": str, "count": int}, pk="class")
        if "ledger" not in self.db.table_names():
            self.db["ledger"].create({"seq": int, "kind": str, "outcome": str}, pk="seq", not_null={"outcome"})
        self._count, self._bytes = self.db.execute("select count(*), coalesce(sum(size), 0) from outbox").fetchone()

    # ---- writing ------------------------------------------------------------------------------
    def add(self, seq: int, topic: str, payload: bytes, retain: bool, kind: str) -> bool:
        """Store a message before it is sent; False if the overflow policy dropped it at once."""
        priority = PRIORITY.get(kind, 0)
        size = len(payload) + len(topic)
        if size > self.max_bytes:
            self._count_drops({priority: 1}, seq, kind)
            return False
        need_count = self._count + 1 - self.max_messages
        need_bytes = self._bytes + size - self.max_bytes
        victims: list[tuple[int, int, int]] = []
        if need_count > 0 or need_bytes > 0:
            freed_count = freed_bytes = 0
            for row in self.db.execute("select seq, priority, size from outbox where priority <= ? "
                                       "order by priority, seq", [priority]):
                victims.append(row)
                freed_count += 1
                freed_bytes += row[2]
                if freed_count >= need_count and freed_bytes >= need_bytes:
                    break
            else:  # not enough of equal or lower priority: everything else matters more
                self._count_drops({priority: 1}, seq, kind)
                return False
        dropped: dict[int, int] = {}
        with self._tx():
            for vseq, vprio, _vsize in victims:
                self.db.execute("delete from outbox where seq = ?", [vseq])
                self._record(vseq, None, "dropped")
                dropped[vprio] = dropped.get(vprio, 0) + 1
            self.db.execute("insert into outbox (seq, topic, payload, retain, priority, size) values (?, ?, ?, ?, ?, ?)",
                            [seq, topic, payload, int(retain), priority, size])
            self._record(seq, kind, "held")
            self._add_drops(dropped)
        self._count += 1 - len(victims)
        self._bytes += size - sum(v[2] for v in victims)
        self.dropped_seqs.extend(v[0] for v in victims)
        self._maybe_prune()
        return True

    def remove(self, seq: int) -> None:
        """Forget a message that has been acknowledged."""
        self.remove_many([seq])

    def remove_many(self, seqs: list[int]) -> list[int]:
        """Forget acknowledged messages in one transaction; returns the seqs that were held."""
        removed: list[int] = []
        freed = 0
        with self._tx():
            for seq in seqs:
                row = self.db.execute("delete from outbox where seq = ? returning size", [seq]).fetchone()
                if row is not None:
                    removed.append(seq)
                    freed += row[0]
                    self._record(seq, None, "acked")
        self._count -= len(removed)
        self._bytes -= freed
        return removed

    def seqs_between(self, first: int, last: int) -> list[int]:
        """Held seqs in ``[first, last]`` (to resolve an ack range against what is held)."""
        return [r[0] for r in self.db.execute("select seq from outbox where seq between ? and ? order by seq",
                                              [first, last])]

    # ---- the delivery ledger ------------------------------------------------------------------
    def _record(self, seq: int, kind: str | None, outcome: str) -> None:
        if self.ledger_keep <= 0:
            return
        if kind is None:
            self.db.execute("update ledger set outcome = ? where seq = ?", [outcome, seq])
        else:
            self.db.execute("insert into ledger (seq, kind, outcome) values (?, ?, ?) on conflict(seq) do update "
                            "set outcome = excluded.outcome", [seq, kind, outcome])

    def _maybe_prune(self) -> None:
        self._since_prune += 1
        if self.ledger_keep <= 0 or self._since_prune < 1000:
            return
        self._since_prune = 0
        with self._tx():
            self.db.execute("delete from ledger where outcome != 'held' and seq < (select seq from ledger "
                            "order by seq desc limit 1 offset ?)", [self.ledger_keep])

    def ledger(self) -> list[tuple[int, str, str]]:
        """``(seq, kind, outcome)`` of the recent messages, oldest first."""
        return [tuple(r) for r in self.db.execute("select seq, kind, outcome from ledger order by seq")]

    # ---- reading ------------------------------------------------------------------------------
    def oldest(self, limit: int = 100) -> list[Held]:
        rows = self.db.execute(
            "select seq, topic, payload, retain, priority from outbox order by seq limit ?", [limit]).fetchall()
        return [Held(r[0], r[1], bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def oldest_entries(self, limit: int) -> list[tuple[int, int]]:
        """``(seq, priority)`` of the oldest held messages."""
        return [(r[0], r[1]) for r in self.db.execute("select seq, priority from outbox order by seq limit ?",
                                                      [limit])]

    def oldest_seqs(self, limit: int) -> list[int]:
        return [r[0] for r in self.db.execute("select seq from outbox order by seq limit ?", [limit])]

    def get(self, seqs: list[int]) -> list[Held]:
        """The held messages with these seqs, in seq order (those no longer held are skipped)."""
        rows = self.db.execute(
            f"select seq, topic, payload, retain, priority from outbox where seq in ({','.join('?' * len(seqs))}) "
            "order by seq", seqs).fetchall() if seqs else []
        return [Held(r[0], r[1], bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def holds(self, seq: int) -> bool:
        return self.db.execute("select 1 from outbox where seq = ?", [seq]).fetchone() is not None

    def depth(self) -> int:
        return self._count

    def size(self) -> int:
        return self._bytes

    def drops(self) -> dict[str, int]:
        out = {name: 0 for name in CLASS_NAMES.values()}
        out.update({r[0]: r[1] for r in self.db.execute("select class, count from drops")})
        return out

    def close(self) -> None:
        self.db.close()

    # ---- internals ----------------------------------------------------------------------------
    def _add_drops(self, dropped: dict[int, int]) -> None:
        for priority, n in dropped.items():
            self.db.execute("insert into drops (class, count) values (?, ?) "
                            "on conflict(class) do update set count = count + excluded.count",
                            [CLASS_NAMES[priority], n])

    def take_dropped(self) -> list[int]:
        out, self.dropped_seqs = self.dropped_seqs, []
        return out

    def _count_drops(self, dropped: dict[int, int], seq: int, kind: str) -> None:
        with self._tx():
            self._add_drops(dropped)
            self._record(seq, kind, "dropped")

    def _tx(self):  # noqa: ANN202
        return transaction(self.db.conn)

    def summary(self) -> str:
        return json.dumps({"depth": self._count, "bytes": self._bytes, "dropped": self.drops()})
