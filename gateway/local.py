"""What the gateway keeps for its site (SQLite, WAL): telemetry routed to it, and the marks and
automation state that must survive a restart.

Streams that a routing policy keeps on site (``to: gateway``, docs/policies.md) are sealed by the
devices to the gateway. The gateway opens them, stores the readings here (one row per reading,
unique on ``(node, seq, idx)`` so a re-sent batch is stored once), custody-acks them, runs its
automation rules over them, and sends only the summaries up. ``marks`` holds small durable
values: the end of the last summarised window of each summary rule (so a restart neither skips
nor repeats a window) and the automation engine's state (so a restart mid-episode does not fire
again).

Not thread-safe: the gateway calls it from its one database thread.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2

from cwsnet.db import open_durable, transaction


class SiteData:
    def __init__(self, path: Path) -> None:
        self.db = open_durable(path, any_thread=True)
        self.db.execute(
            "create table if not exists readings (node text not null, seq integer not null, idx integer not null,"
            " stream text not null, ts integer not null, vals blob not null, primary key (node, seq, idx))")
        self.db.execute("create index if not exists readings_ts on readings(ts)")
        self.db.execute("create table if not exists marks (key text primary key, value text not null)")

    def add_batch(self, node: str, seq: int, stream: str, readings: Sequence[tuple[int, dict[str, Any]]]) -> bool:
        """Store one batch of readings (ts ms, values); False if this (node, seq) was stored before."""
        with transaction(self.db.conn):
            if self.db.execute("select 1 from readings where node = ? and seq = ? limit 1", (node, seq)).fetchone():
                return False
            self.db.conn.executemany(
                "insert or ignore into readings (node, seq, idx, stream, ts, vals) values (?, ?, ?, ?, ?, ?)",
                [(node, seq, i, stream, ts, cbor2.dumps(vals)) for i, (ts, vals) in enumerate(readings)],
            )
        return True

    def window(self, patterns: Sequence[str], start_ms: int, end_ms: int) -> list[tuple[str, str, int, dict[str, Any]]]:
        """(node, stream, ts, values) of the readings of streams matching ``patterns`` in [start, end)."""
        rows = self.db.execute("select node, stream, ts, vals from readings where ts >= ? and ts < ? order by ts",
                               (start_ms, end_ms)).fetchall()
        return [(n, s, ts, cbor2.loads(v)) for n, s, ts, v in rows
                if any(fnmatch.fnmatchcase(s, p) for p in patterns)]

    def first_ts(self, patterns: Sequence[str], from_ms: int) -> int | None:
        """The earliest ts >= ``from_ms`` of a reading of a stream matching ``patterns``."""
        firsts = [ts for stream, ts in self.db.execute(
            "select stream, min(ts) from readings where ts >= ? group by stream", (from_ms,)).fetchall()
            if any(fnmatch.fnmatchcase(stream, p) for p in patterns)]
        return min(firsts, default=None)

    def streams(self) -> list[str]:
        return [r[0] for r in self.db.execute("select distinct stream from readings")]

    def expire(self, patterns: Sequence[str], before_ms: int) -> int:
        """Delete readings of streams matching ``patterns`` older than ``before_ms``."""
        doomed = [s for s in self.streams() if any(fnmatch.fnmatchcase(s, p) for p in patterns)]
        n = 0
        with transaction(self.db.conn):
            for s in doomed:
                n += self.db.execute("delete from readings where stream = ? and ts < ?", (s, before_ms)).rowcount
        return n

    def count(self) -> int:
        return self.db.execute("select count(*) from readings").fetchone()[0]

    def get_mark(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("select value from marks where key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put_mark(self, key: str, value: Any) -> None:
        with transaction(self.db.conn):
            self.db.execute("insert into marks (key, value) values (?, ?) on conflict(key) do update set value ="
                            " excluded.value", (key, json.dumps(value)))

    def close(self) -> None:
        self.db.close()
