"""A node's small durable state (seq reservation mark, replay windows, recent task ids) in SQLite.

WAL mode; each write commits before returning, so a SIGKILL never rolls a ``seq`` back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from cwsnet.replay import ReplayWindow, SeqCounter


class NodeState:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(path)
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=FULL")
        if "kv" not in self.db.table_names():
            self.db["kv"].create({"key": str, "value": str}, pk="key")
        if "seen_tasks" not in self.db.table_names():
            self.db["seen_tasks"].create({"task_id": str, "ts": float, "done": int, "trace": str}, pk="task_id")
        elif "done" not in self.db["seen_tasks"].columns_dict:  # state files from 0.1.0 development builds
            self.db["seen_tasks"].add_column("done", int)
            self.db["seen_tasks"].add_column("trace", str)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return json.loads(self.db["kv"].get(key)["value"])
        except sqlite_utils.db.NotFoundError:
            return default

    def put(self, key: str, value: Any) -> None:
        with self.db.conn:
            self.db["kv"].upsert({"key": key, "value": json.dumps(value)}, pk="key")

    def seq_counter(self, block: int = 1000, now: float | None = None) -> SeqCounter:
        """The node's ``seq`` source: it starts at the durable mark or at the wall clock in
        milliseconds, whichever is larger, so a node whose state was wiped (re-flashed, new disk)
        still never reuses a ``seq`` the cloud has seen."""
        start = max(int(self.get("seq_mark", 0)), int((time.time() if now is None else now) * 1000))
        return SeqCounter(start, lambda mark: self.put("seq_mark", mark), block=block,
                          wall_ms=lambda: int(time.time() * 1000))

    def replay_window(self, peer: str) -> ReplayWindow:
        return ReplayWindow.from_state(self.get(f"replay:{peer}"))

    def save_replay_window(self, peer: str, window: ReplayWindow) -> None:
        self.put(f"replay:{peer}", window.to_state())

    def task_seen(self, task_id: str) -> bool:
        return self.db.execute("select 1 from seen_tasks where task_id = ?", [task_id]).fetchone() is not None

    def mark_task(self, task_id: str, keep: int = 10000, trace: str | None = None) -> None:
        """Record that ``task_id`` was accepted (before it runs: a node runs a task at most once)."""
        with self.db.conn:
            self.db.execute("insert or ignore into seen_tasks (task_id, ts, done, trace) values (?, ?, 0, ?)",
                            [task_id, time.time(), trace])
            self.db.execute(
                "delete from seen_tasks where task_id not in "
                "(select task_id from seen_tasks order by ts desc limit ?)",
                [keep],
            )

    def finish_task(self, task_id: str) -> None:
        with self.db.conn:
            self.db.execute("update seen_tasks set done = 1 where task_id = ?", [task_id])

    def unfinished_tasks(self) -> list[tuple[str, str | None]]:
        """Tasks accepted but never finished: the node stopped (crash, power cut) while running them."""
        return [(r[0], r[1]) for r in self.db.execute(
            "select task_id, trace from seen_tasks where coalesce(done, 1) = 0 order by ts").fetchall()]

    def close(self) -> None:
        self.db.close()
