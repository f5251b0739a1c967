"""The gateway's durable uplink outbox (SQLite, WAL, through sqlite-utils).

A device message is stored here, committed, and only then acknowledged to the site broker. It is
sent to the cloud broker, re-sent if no cloud ack arrives within ``retransmit_after``, and deleted
only when the cloud's sealed ack says it is committed at the cloud. ``(sender, seq)`` is unique, so
a redelivered message (MQTT DUP, a retained status seen again) is stored once.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils


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
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(sqlite3.connect(path, check_same_thread=False, isolation_level=None))
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=FULL")
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
        self._depth = self.db.execute("select count(*) from outbox").fetchone()[0]

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
        self._depth += sum(out)
        return out

    def _tx(self):  # noqa: ANN202 - a context manager over an explicit BEGIN/COMMIT
        conn = self.db.conn

        class Tx:
            def __enter__(self) -> None:
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_: object) -> None:  # noqa: ANN001
                conn.execute("ROLLBACK" if exc_type else "COMMIT")

        return Tx()

    def due(self, now: float, retransmit_after: float, limit: int) -> list[OutboxItem]:
        """Messages never sent, or sent longer than ``retransmit_after`` ago, in arrival order."""
        rows = self.db.execute(
            "select id, sender, seq, topic, payload, retain, attempts from outbox "
            "where sent_at <= ? order by id limit ?",
            [now - retransmit_after, limit],
        ).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], bytes(r[4]), bool(r[5]), r[6]) for r in rows]

    def mark_sent(self, ids: list[int], now: float) -> None:
        if not ids:
            return
        with self._tx():
            self.db.conn.executemany(
                "update outbox set sent_at = ?, attempts = attempts + 1 where id = ?", [(now, i) for i in ids]
            )

    def ack(self, ranges: list[tuple[str, int, int]]) -> int:
        """Delete what the cloud has committed; returns how many messages were freed."""
        freed = 0
        with self._tx():
            for sender, first, last in ranges:
                cur = self.db.execute(
                    "delete from outbox where sender = ? and seq between ? and ?", [sender, first, last]
                )
                freed += cur.rowcount
        self._depth -= freed
        return freed

    def depth(self) -> int:
        return self._depth

    def close(self) -> None:
        self.db.close()
