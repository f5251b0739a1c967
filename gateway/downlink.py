"""Commands held by the gateway for its devices (SQLite, WAL, through sqlite-utils).

A command from the cloud for a device of this site (``task/cmd``, ``config``) is stored here
before it is forwarded, and kept until the device's sealed *receipt* names its ``seq``, or until
it expires: at the ``exp`` the cloud put in the clear header (a task's deadline), else
``max_age`` after it arrived. It is delivered at once if the device is online, again on every
birth of the device, and again every ``redeliver_after`` while no receipt came. The device runs
each task id at most once, so a repeat is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cwsnet.db import open_durable, transaction


@dataclass(frozen=True, slots=True)
class HeldCommand:
    node: str
    seq: int
    topic: str
    payload: bytes
    expires: float  # seconds since the epoch


class DownlinkStore:
    """Not thread-safe: the gateway calls it from its one database thread."""

    def __init__(self, path: Path) -> None:
        self.db = open_durable(path, any_thread=True)
        if "held" not in self.db.table_names():
            self.db["held"].create(
                {"node": str, "seq": int, "topic": str, "payload": bytes, "expires": float, "received": float,
                 "delivered": float},
                pk=("node", "seq"), not_null={"topic", "payload", "expires"},
            )
        self._depth = self.db.execute("select count(*) from held").fetchone()[0]

    def add(self, node: str, seq: int, topic: str, payload: bytes, expires: float, now: float) -> bool:
        """Hold a command; False if it was already held (a redelivery from the cloud)."""
        with transaction(self.db.conn):
            cur = self.db.conn.execute(
                "insert or ignore into held (node, seq, topic, payload, expires, received, delivered) "
                "values (?, ?, ?, ?, ?, ?, 0)", [node, seq, topic, payload, expires, now])
        self._depth += cur.rowcount
        return cur.rowcount == 1

    def for_node(self, node: str, now: float) -> list[HeldCommand]:
        """Unexpired commands held for ``node``, oldest first."""
        rows = self.db.execute("select node, seq, topic, payload, expires from held where node = ? and expires > ? "
                               "order by seq", [node, now]).fetchall()
        return [HeldCommand(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    def undelivered_since(self, before: float, now: float) -> list[HeldCommand]:
        """Unexpired commands last delivered before ``before`` (no receipt came back)."""
        rows = self.db.execute("select node, seq, topic, payload, expires from held where delivered < ? "
                               "and expires > ? order by node, seq", [before, now]).fetchall()
        return [HeldCommand(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    def delivered(self, items: list[tuple[str, int]], now: float) -> None:
        with transaction(self.db.conn):
            self.db.conn.executemany("update held set delivered = ? where node = ? and seq = ?",
                                     [(now, n, s) for n, s in items])

    def received(self, node: str, ranges: list[tuple[int, int]]) -> int:
        """The device's receipt: forget what it names; returns how many were held."""
        n = 0
        with transaction(self.db.conn):
            for first, last in ranges:
                n += self.db.conn.execute("delete from held where node = ? and seq between ? and ?",
                                          [node, first, last]).rowcount
        self._depth -= n
        return n

    def expire(self, now: float) -> list[tuple[str, int]]:
        """Drop commands past their expiry (never delivered after it); returns which."""
        with transaction(self.db.conn):
            rows = self.db.conn.execute("delete from held where expires <= ? returning node, seq", [now]).fetchall()
        self._depth -= len(rows)
        return [(r[0], r[1]) for r in rows]

    def depth(self) -> int:
        return self._depth

    def close(self) -> None:
        self.db.close()
