"""The gateway's durable uplink outbox (SQLite, WAL, through sqlite-utils).

A device message is stored here, committed, and only then acknowledged to the site broker. It is
sent to the cloud broker, re-sent if no cloud ack arrives within ``retransmit_after``, and deleted
only when the cloud's sealed ack says it is committed at the cloud. ``(sender, seq)`` is unique, so
a redelivered message (MQTT DUP, a retained status seen again) is stored once.

**Priorities.** Each message is stored with a priority class, 0 (lowest) .. 9 (highest), that the
``qos`` policies give its channel and stream when it arrives (:meth:`UplinkOutbox.priority_for`;
shipped: task results 8, events 7, statuses 5, telemetry 3; unmatched and old rows: 5). A policy
change applies to messages stored after it; what is held keeps the class it was stored with.

When :meth:`UplinkOutbox.due` fills the window with unsent messages, the classes share it by
*weighted fair queueing*: a class of priority ``p`` has weight ``2**p``, so each step up doubles a
class's share while both have messages waiting, and the class whose next message would finish
first in virtual time is served next. In practice:

- a backlog of higher-priority messages goes out ahead of bulk telemetry: 10 task results queued
  behind 10,000 telemetry readings all go in the first round after a reconnect (32 results are
  served for each telemetry message while both wait);
- nothing starves: every waiting class gets at least its weighted share of every window, however
  much of a higher class keeps arriving (telemetry still gets 1 in 33 sends under a flood of task
  results); a class that was idle starts at the current virtual time, so it cannot save up credit;
- within a class the window is filled round-robin across senders, each sender's messages in
  ``seq`` (arrival) order, so one chatty device cannot starve the others. Across classes a
  sender's messages may leave out of ``seq`` order (its task result before its older telemetry):
  the cloud stores by ``(sender, seq)`` and acks exact ranges, so order across classes carries no
  meaning. Messages of one class (a device's statuses, say) keep their order.

Strict priority was not chosen because a sustained stream of high-priority messages (an event
storm) would hold telemetry back for as long as it lasts. Retransmissions are chosen as before
(oldest first, by their backoff) and are not reordered into the fresh messages' share; a round is
returned highest class first, arrival order within a class.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cwsnet import topics
from cwsnet.db import open_durable, transaction
from cwsnet.policy.qos import CHANNELS, DEFAULT_PRIORITY

if TYPE_CHECKING:
    from cwsnet.policy.qos import QosEngine

#: priority classes: 0 (lowest) .. 9 (highest)
PRIORITIES = range(10)
#: virtual time one message of class p takes (its weight is 2**p): a class one step higher gets twice the share
STRIDE = {p: 1 << (PRIORITIES[-1] - p) for p in PRIORITIES}

Row = tuple[str, int, str, bytes, bool] | tuple[str, int, str, bytes, bool, int]


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    sender: str
    seq: int
    topic: str
    payload: bytes
    retain: bool
    attempts: int
    priority: int = DEFAULT_PRIORITY


class UplinkOutbox:
    """Not thread-safe: the gateway calls it from one dedicated thread (or the event loop)."""

    def __init__(self, path: Path) -> None:
        self.db = open_durable(path, any_thread=True)
        if "outbox" not in self.db.table_names():
            self.db["outbox"].create(
                {
                    "id": int,
                    "sender": str,
                    "seq": int,
                    "topic": str,
                    "payload": bytes,
                    "retain": int,
                    "received": float,
                    "sent_at": float,
                    "attempts": int,
                    "priority": int,
                },
                pk="id",
                not_null={"sender", "seq", "topic", "payload", "priority"},
                defaults={"priority": DEFAULT_PRIORITY},
            )
            self.db["outbox"].create_index(["sender", "seq"], unique=True)
        elif "priority" not in self.db["outbox"].columns_dict:
            # an outbox written before priorities: its rows keep their place as the default class
            with self._tx():
                self.db.execute(f"alter table outbox add column priority integer not null default {DEFAULT_PRIORITY}")
        self.db.execute("create index if not exists outbox_inflight on outbox(attempts) where attempts > 0")
        self.db.execute("drop index if exists outbox_fresh")  # (sender, id): replaced by the one below
        self.db.execute("create index if not exists outbox_fresh_class on outbox(sender, priority, id) "
                        "where attempts = 0")
        # Send times are this process's monotonic clock: after a restart everything unacked is due
        # at once (the cloud dedupes), and a wall clock stepping back cannot stall retransmission.
        self.resend_unacked()
        # per class, the senders that may have unsent messages (shrinks only in due(), grows in add_many)
        self._fresh: dict[int, set[str]] = {}
        for priority, sender in self.db.execute("select distinct priority, sender from outbox where attempts = 0"):
            self._fresh.setdefault(priority, set()).add(sender)
        # weighted fair queueing: the virtual time, and the virtual finish time of each waiting class's next message
        self._vtime = 0
        self._finish: dict[int, int] = {}
        self._depth, self._bytes = self.db.execute(
            "select count(*), coalesce(sum(length(payload)), 0) from outbox").fetchone()

    @staticmethod
    def priority_for(qos: QosEngine | None, topic: str, *, role: str = "device") -> int:
        """The priority class the ``qos`` policies give a message on ``topic`` (its site, node,
        channel and stream are read from the topic; ``role``: the sender's). :data:`DEFAULT_PRIORITY`
        without an engine or for a topic that is not an uplink channel; never raises."""
        if qos is None:
            return DEFAULT_PRIORITY
        try:
            parts = topics.parse(topic)
            channel = "task_result" if parts.channel == "task/result" else parts.channel
            if channel not in CHANNELS:
                return DEFAULT_PRIORITY
            p = qos.priority(site=parts.site, node=parts.node, role=role, channel=channel, stream=parts.sub).priority
        except Exception:  # noqa: BLE001 - a message is never refused for want of a priority
            return DEFAULT_PRIORITY
        return p if isinstance(p, int) and p in PRIORITIES else DEFAULT_PRIORITY

    def add(self, sender: str, seq: int, topic: str, payload: bytes, retain: bool, now: float | None = None,
            priority: int = DEFAULT_PRIORITY) -> bool:
        """Store one message durably; False if ``(sender, seq)`` was already held."""
        return self.add_many([(sender, seq, topic, payload, retain, priority)], now)[0]

    def add_many(self, items: Sequence[Row], now: float | None = None) -> list[bool]:
        """Store messages in one transaction (one fsync); per item, False if it was already held.

        Each item is ``(sender, seq, topic, payload, retain[, priority])``; without a priority, the
        default class (5). A message already held keeps the class it was stored with."""
        ts = time.time() if now is None else now
        rows = [(*item[:5], item[5] if len(item) > 5 else DEFAULT_PRIORITY) for item in items]
        for row in rows:
            if isinstance(row[5], bool) or not (isinstance(row[5], int) and row[5] in PRIORITIES):
                raise ValueError(f"priority of {row[0]} seq {row[1]} must be 0..9, not {row[5]!r}")
        out: list[bool] = []
        with self._tx():
            for sender, seq, topic, payload, retain, priority in rows:
                cur = self.db.conn.execute(
                    "insert or ignore into outbox (sender, seq, topic, payload, retain, received, sent_at, attempts,"
                    " priority) values (?, ?, ?, ?, ?, ?, 0, 0, ?)",
                    [sender, seq, topic, payload, int(retain), ts, priority],
                )
                out.append(cur.rowcount == 1)
        for (sender, *_rest, priority), new in zip(rows, out, strict=True):
            if new:  # only once committed: a failed transaction leaves nothing to send
                self._fresh.setdefault(priority, set()).add(sender)
        self._depth += sum(out)
        self._bytes += sum(len(row[3]) for row, new in zip(rows, out, strict=True) if new)
        return out

    def _tx(self):  # noqa: ANN202
        return transaction(self.db.conn)

    def resend_unacked(self) -> None:
        """Make every sent-but-unacked message due now (after a restart or an uplink reconnect:
        whatever the old connection carried may be gone), keeping its attempt count."""
        with self._tx():
            self.db.execute("update outbox set sent_at = -1e9 where attempts > 0")  # "long ago"

    def due(self, now: float, retransmit_after: float, window: int, max_backoff: float = 300.0) -> list[OutboxItem]:
        """What to send now: highest priority class first, arrival order within a class.

        Unacked messages are sent again after ``retransmit_after`` seconds, doubling with each
        attempt up to ``max_backoff``. New messages are sent only while fewer than ``window``
        messages were sent in the last ``retransmit_after`` seconds and are still unacked, so a
        backlog cannot be pushed out much faster than the cloud acks it; messages the cloud never
        acks (an unregistered sender) stop holding the window once their ack is overdue. The room
        left is shared by the waiting priority classes (weighted fair queueing, weight ``2**p``)
        and within a class round-robin across senders (see the module's description).
        """
        cols = "id, sender, seq, topic, payload, retain, attempts, priority"
        retx = self.db.execute(
            f"select {cols} from outbox where attempts > 0 "
            "and sent_at + min(?, ? * (1 << min(attempts - 1, 16))) <= ? order by id limit ?",
            [max_backoff, retransmit_after, now, window],
        ).fetchall()
        inflight = self.db.execute("select count(*) from outbox where attempts > 0 and sent_at > ?",
                                   [now - retransmit_after]).fetchone()[0]
        picked = self._pick_fresh(max(0, window - inflight - len(retx)))
        fresh = self.db.execute(
            f"select {cols} from outbox where id in ({','.join('?' * len(picked))})", picked
        ).fetchall() if picked else []
        rows = sorted(retx + fresh, key=lambda r: (-r[7], r[0]))
        return [OutboxItem(r[0], r[1], r[2], r[3], bytes(r[4]), bool(r[5]), r[6], r[7]) for r in rows]

    def _pick_fresh(self, room: int) -> list[int]:
        """The ids of up to ``room`` unsent messages, shared among the waiting classes."""
        live = {p for p, senders in self._fresh.items() if senders}
        if not room or not live:
            return []
        for p in live:  # a class that was idle starts now: it saved up no credit
            self._finish.setdefault(p, self._vtime + STRIDE[p])
        queues: dict[int, list[int]] = {}
        taken = dict.fromkeys(live, 0)
        picked: list[int] = []
        while len(picked) < room and live:
            p = min(live, key=lambda c: (self._finish[c], -c))
            queue = queues.get(p)
            if queue is None:
                queue = queues[p] = self._class_queue(p, room)
            if taken[p] >= len(queue):  # all of it picked (or nothing unsent after all): idle
                live.discard(p)
                del self._finish[p]
                continue
            picked.append(queue[taken[p]])
            taken[p] += 1
            self._vtime = self._finish[p]
            self._finish[p] += STRIDE[p]
        return picked

    def _class_queue(self, priority: int, room: int) -> list[int]:
        """Up to ``room`` unsent ids of one class, round-robin across its senders (each one's first
        unsent message, then each one's second, ...), each sender's in order. Each sender's first
        ``room`` ids come from the partial index, so this costs O(senders x room), whatever the backlog."""
        senders = self._fresh.get(priority, set())
        ranked: list[tuple[int, int]] = []
        for sender in list(senders):
            ids = self.db.execute("select id from outbox where attempts = 0 and sender = ? and priority = ? "
                                  "order by id limit ?", [sender, priority, room]).fetchall()
            if not ids:
                senders.discard(sender)
            ranked.extend((rank, r[0]) for rank, r in enumerate(ids))
        if not senders:
            self._fresh.pop(priority, None)
        return [i for _rank, i in sorted(ranked)[:room]]

    def inflight(self) -> int:
        return self.db.execute("select count(*) from outbox where attempts > 0").fetchone()[0]

    def reject(self, items: Sequence[tuple[str, int, bytes]]) -> list[tuple[str, int]]:
        """Delete messages the cloud refused for good (forged, malformed, ...); returns which.

        Each item names the refused payload by its digest (first 16 bytes of SHA-256): a held
        message with the same ``(sender, seq)`` but other bytes is not the one refused, and stays.
        """
        deleted: list[tuple[str, int]] = []
        with self._tx():
            for sender, seq, digest in items:
                row = self.db.execute("select id, payload from outbox where sender = ? and seq = ?",
                                      [sender, seq]).fetchone()
                if row is not None and hashlib.sha256(bytes(row[1])).digest()[:16] == digest:
                    self.db.execute("delete from outbox where id = ?", [row[0]])
                    deleted.append((sender, seq))
                    self._bytes -= len(row[1])
        self._depth -= len(deleted)
        return deleted

    def mark_sent(self, ids: list[int], now: float) -> None:
        if not ids:
            return
        with self._tx():
            self.db.conn.executemany(
                "update outbox set sent_at = ?, attempts = attempts + 1 where id = ?", [(now, i) for i in ids]
            )

    def ack(self, ranges: list[tuple[str, int, int]]) -> int:
        """Delete what the cloud has committed; returns how many messages were freed."""
        freed = freed_bytes = 0
        with self._tx():
            for sender, first, last in ranges:
                sizes = self.db.execute(
                    "delete from outbox where sender = ? and seq between ? and ? returning length(payload)",
                    [sender, first, last],
                ).fetchall()
                freed += len(sizes)
                freed_bytes += sum(s[0] for s in sizes)
        self._depth -= freed
        self._bytes -= freed_bytes
        return freed

    def depth(self) -> int:
        return self._depth

    def size(self) -> int:
        """Payload bytes held."""
        return self._bytes

    def close(self) -> None:
        self.db.close()
