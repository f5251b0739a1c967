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
            " stream text not null, ts integer not null, vals blob not null, received integer not null default 0,"
            " primary key (node, seq, idx))")
        # summaries and expiry go by when the gateway received a reading, not by the device's clock: a
        # reading that arrives late (batched, buffered through an outage, paused) still counts
        self.db.execute("create index if not exists readings_received on readings(received)")
        self.db.execute("create index if not exists readings_stream on readings(stream, received)")
        self.db.execute("create table if not exists marks (key text primary key, value text not null)")

    def add_batch(self, node: str, seq: int, stream: str, readings: Sequence[tuple[int, dict[str, Any]]],
                  received: int) -> bool:
        """Store one batch of readings (ts ms, values), received at ``received`` (ms, the gateway's
        clock); False if this (node, seq) was stored before."""
        with transaction(self.db.conn):
            if self.db.execute("select 1 from readings where node = ? and seq = ? limit 1", (node, seq)).fetchone():
                return False
            self.db.conn.executemany(
                "insert or ignore into readings (node, seq, idx, stream, ts, vals, received) "
                "values (?, ?, ?, ?, ?, ?, ?)",
                [(node, seq, i, stream, ts, cbor2.dumps(vals), received) for i, (ts, vals) in enumerate(readings)],
            )
        return True

    def window(self, patterns: Sequence[str], start_ms: int, end_ms: int) -> list[tuple[str, str, int, dict[str, Any]]]:
        """(node, stream, ts, values) of the readings of streams matching ``patterns`` received in
        [start, end)."""
        streams = self._matching(patterns)
        if not streams:
            return []
        marks = ",".join("?" * len(streams))
        rows = self.db.execute(f"select node, stream, ts, vals from readings where received >= ? and received < ? "
                               f"and stream in ({marks}) order by ts", (start_ms, end_ms, *streams)).fetchall()
        return [(n, s, ts, cbor2.loads(v)) for n, s, ts, v in rows]

    def first_received(self, patterns: Sequence[str], from_ms: int) -> int | None:
        """The earliest arrival time >= ``from_ms`` of a reading of a stream matching ``patterns``."""
        streams = self._matching(patterns)
        if not streams:
            return None
        marks = ",".join("?" * len(streams))
        return self.db.execute(f"select min(received) from readings where received >= ? and stream in ({marks})",
                               (from_ms, *streams)).fetchone()[0]

    def _matching(self, patterns: Sequence[str]) -> list[str]:
        return [s for s in self.streams() if any(fnmatch.fnmatchcase(s, p) for p in patterns)]

    def streams(self) -> list[str]:
        return [r[0] for r in self.db.execute("select distinct stream from readings")]

    def node_streams(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.db.execute("select distinct node, stream from readings")]

    def expire(self, node: str, stream: str, before_ms: int) -> int:
        """Delete ``node``'s readings of ``stream`` received before ``before_ms``."""
        with transaction(self.db.conn):
            return self.db.execute("delete from readings where node = ? and stream = ? and received < ?",
                                   (node, stream, before_ms)).rowcount

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
