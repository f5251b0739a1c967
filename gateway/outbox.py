"""The gateway's durable uplink outbox (SQLite, WAL, through sqlite-utils).

A device message is stored here, committed, and only then acknowledged to the site broker. It is
sent to the cloud broker, re-sent if no cloud ack arrives within ``retransmit_after``, and deleted
only when the cloud's sealed ack says it is committed at the cloud. ``(sender, seq)`` is unique, so
a redelivered message (MQTT DUP, a retained status seen again) is stored once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cwsnet.db import open_durable, transaction


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    sender: str
    seq: int
    topic: str
    payload: bytes
    retain: bool
    attempts: int


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
                },
                pk="id",
                not_null={"sender", "seq", "topic", "payload"},
            )
            self.db["outbox"].create_index(["sender", "seq"], unique=True)
        self.db.execute("create index if not exists outbox_inflight on outbox(attempts) where attempts > 0")
        self.db.execute("create index if not exists outbox_fresh on outbox(sender, id) where attempts = 0")
        # Send times are this process's monotonic clock: after a restart everything unacked is due
        # at once (the cloud dedupes), and a wall clock stepping back cannot stall retransmission.
        self.resend_unacked()
        # senders that may have unsent messages (it only shrinks in due(), and grows in add_many)
        self._fresh_senders = {r[0] for r in self.db.execute("select distinct sender from outbox where attempts = 0")}
        self._depth, self._bytes = self.db.execute(
            "select count(*), coalesce(sum(length(payload)), 0) from outbox").fetchone()

    def add(self, sender: str, seq: int, topic: str, payload: bytes, retain: bool, now: float | None = None) -> bool:
        """Store one message durably; False if ``(sender, seq)`` was already held."""
        return self.add_many([(sender, seq, topic, payload, retain)], now)[0]

    def add_many(self, items: Sequence[tuple[str, int, str, bytes, bool]], now: float | None = None) -> list[bool]:
        """Store messages in one transaction (one fsync); per item, False if it was already held."""
        ts = time.time() if now is None else now
        out: list[bool] = []
        with self._tx():
            for sender, seq, topic, payload, retain in items:
                cur = self.db.conn.execute(
                    "insert or ignore into outbox (sender, seq, topic, payload, retain, received, sent_at, attempts)"
                    " values (?, ?, ?, ?, ?, ?, 0, 0)",
                    [sender, seq, topic, payload, int(retain), ts],
                )
                out.append(cur.rowcount == 1)
                if cur.rowcount == 1:
                    self._fresh_senders.add(sender)
        self._depth += sum(out)
        self._bytes += sum(len(item[3]) for item, new in zip(items, out, strict=True) if new)
        return out

    def _tx(self):  # noqa: ANN202
        return transaction(self.db.conn)

    def resend_unacked(self) -> None:
        """Make every sent-but-unacked message due now (after a restart or an uplink reconnect:
        whatever the old connection carried may be gone), keeping its attempt count."""
        with self._tx():
            self.db.execute("update outbox set sent_at = -1e9 where attempts > 0")  # "long ago"

    def due(self, now: float, retransmit_after: float, window: int, max_backoff: float = 300.0) -> list[OutboxItem]:
        """What to send now (in arrival order within the round).

        Unacked messages are sent again after ``retransmit_after`` seconds, doubling with each
        attempt up to ``max_backoff``. New messages are sent only while fewer than ``window``
        messages were sent in the last ``retransmit_after`` seconds and are still unacked, so a
        backlog cannot be pushed out much faster than the cloud acks it; messages the cloud never
        acks (an unregistered sender) stop holding the window once their ack is overdue.
        """
        cols = "id, sender, seq, topic, payload, retain, attempts"
        retx = self.db.execute(
            f"select {cols} from outbox where attempts > 0 "
            "and sent_at + min(?, ? * (1 << min(attempts - 1, 16))) <= ? order by id limit ?",
            [max_backoff, retransmit_after, now, window],
        ).fetchall()
        inflight = self.db.execute("select count(*) from outbox where attempts > 0 and sent_at > ?",
                                   [now - retransmit_after]).fetchone()[0]
        room = max(0, window - inflight - len(retx))
        # Fair share: the window is filled round-robin across senders (each one's first unsent
        # message, then each one's second, ...), each sender's messages in order, so a chatty
        # device cannot starve the others. Each sender's first `room` unsent ids come from the
        # partial index, so a round costs O(senders x room), whatever the backlog.
        ranked: list[tuple[int, int]] = []
        for sender in list(self._fresh_senders) if room else []:
            ids = self.db.execute("select id from outbox where attempts = 0 and sender = ? order by id limit ?",
                                  [sender, room]).fetchall()
            if not ids:
                self._fresh_senders.discard(sender)
            ranked.extend((rank, r[0]) for rank, r in enumerate(ids))
        picked = [i for _rank, i in sorted(ranked)[:room]]
        fresh = self.db.execute(
            f"select {cols} from outbox where id in ({','.join('?' * len(picked))})", picked
        ).fetchall() if picked else []
        rows = sorted(retx + fresh, key=lambda r: r[0])
        return [OutboxItem(r[0], r[1], r[2], r[3], bytes(r[4]), bool(r[5]), r[6]) for r in rows]

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
