"""A node's small durable state (seq reservation mark, replay windows, recent task ids) in SQLite.

WAL mode; each write commits before returning, so a SIGKILL never rolls a ``seq`` back.

Tasks: one row per task id seen (the latest ``attempt`` accepted for it, None for a command without
one, whether it finished, and which node assigned it: the cloud, or the device's gateway for a site
task), so a node runs each task id, or each ``(task id, attempt)`` of a scheduled task, at most once,
and reports what a restart interrupted to the node that gave it the task.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from cwsnet.replay import ReplayWindow, SeqCounter


@dataclass(frozen=True, slots=True)
class SeenTask:
    """What a node remembers of a task id: the latest attempt it accepted (None: a command without
    an attempt) and whether that run finished (its final result was delivered)."""

    attempt: int | None
    done: bool


@dataclass(frozen=True, slots=True)
class UnfinishedRun:
    """A task accepted here whose final result was never delivered: the node stopped meanwhile."""

    task_id: str
    trace: str | None
    attempt: int | None
    assigner: str  # the node that sent its task_cmd, to which its results are sealed ("cloud" or a gateway)


class NodeState:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(path)
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=FULL")
        if "kv" not in self.db.table_names():
            self.db["kv"].create({"key": str, "value": str}, pk="key")
        if "seen_tasks" not in self.db.table_names():
            self.db["seen_tasks"].create({"task_id": str, "ts": float, "done": int, "trace": str, "attempt": int,
                                          "assigner": str}, pk="task_id")
        else:
            columns = self.db["seen_tasks"].columns_dict
            if "done" not in columns:  # state files from 0.1.0 development builds
                self.db["seen_tasks"].add_column("done", int)
                self.db["seen_tasks"].add_column("trace", str)
            if "attempt" not in columns:  # state files from before scheduled tasks (attempts)
                self.db["seen_tasks"].add_column("attempt", int)
            if "assigner" not in columns:  # state files from before site tasks (every task came from the cloud)
                self.db["seen_tasks"].add_column("assigner", str)

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

    def task_record(self, task_id: str) -> SeenTask | None:
        """The latest attempt of ``task_id`` accepted here and whether it finished (None: never seen)."""
        row = self.db.execute("select attempt, coalesce(done, 1) from seen_tasks where task_id = ?",
                              [task_id]).fetchone()
        return None if row is None else SeenTask(row[0], bool(row[1]))

    def mark_task(self, task_id: str, keep: int = 10000, trace: str | None = None,
                  attempt: int | None = None, assigner: str = "cloud") -> None:
        """Record that ``task_id`` was accepted (before it runs: a node runs a task at most once),
        and from whom (``assigner``: its results, even a restart's "interrupted", are sealed to it).

        With an ``attempt`` (a scheduled task's lease number), a higher attempt than the one
        recorded replaces it (unfinished again: the task came back to this node); a lower or equal
        one changes nothing. Without one, a task id already recorded changes nothing."""
        with self.db.conn:
            if attempt is None:
                self.db.execute("insert or ignore into seen_tasks (task_id, ts, done, trace, assigner) "
                                "values (?, ?, 0, ?, ?)", [task_id, time.time(), trace, assigner])
            else:
                self.db.execute(
                    "insert into seen_tasks (task_id, ts, done, trace, attempt, assigner) values (?, ?, 0, ?, ?, ?) "
                    "on conflict (task_id) do update set ts = excluded.ts, done = 0, trace = excluded.trace, "
                    "attempt = excluded.attempt, assigner = excluded.assigner "
                    "where coalesce(seen_tasks.attempt, 0) < excluded.attempt",
                    [task_id, time.time(), trace, attempt, assigner])
            self.db.execute(
                "delete from seen_tasks where task_id not in "
                "(select task_id from seen_tasks order by ts desc limit ?)",
                [keep],
            )

    def refuse_attempt(self, task_id: str, attempt: int, keep: int = 10000) -> bool:
        """Remember ``attempt`` of ``task_id`` as done without running it (it was cancelled before
        its command arrived): a late command for it, or an older attempt, is then a repeat. Only a
        task not running here is changed (an unfinished run is never overwritten); True if recorded."""
        with self.db.conn:
            cur = self.db.execute(
                "insert into seen_tasks (task_id, ts, done, trace, attempt) values (?, ?, 1, null, ?) "
                "on conflict (task_id) do update set ts = excluded.ts, done = 1, attempt = excluded.attempt "
                "where coalesce(seen_tasks.attempt, 0) < excluded.attempt and coalesce(seen_tasks.done, 1) = 1",
                [task_id, time.time(), attempt])
            changed = cur.rowcount > 0
            self.db.execute(
                "delete from seen_tasks where task_id not in "
                "(select task_id from seen_tasks order by ts desc limit ?)",
                [keep],
            )
        return changed

    def finish_task(self, task_id: str) -> None:
        """``task_id`` finished, whatever its attempt."""
        with self.db.conn:
            self.db.execute("update seen_tasks set done = 1 where task_id = ?", [task_id])

    def finish_attempt(self, task_id: str, attempt: int | None) -> None:
        """That run of ``task_id`` finished; a newer attempt recorded meanwhile stays unfinished."""
        with self.db.conn:
            self.db.execute("update seen_tasks set done = 1 where task_id = ? and attempt is ?", [task_id, attempt])

    def unfinished_tasks(self) -> list[tuple[str, str | None]]:
        """Tasks accepted but never finished: the node stopped (crash, power cut) while running them."""
        return [(tid, trace) for tid, trace, _attempt in self.unfinished_attempts()]

    def unfinished_attempts(self) -> list[tuple[str, str | None, int | None]]:
        """Like :meth:`unfinished_tasks`, with the attempt each was accepted under (None: no attempt)."""
        return [(r[0], r[1], r[2]) for r in self.db.execute(
            "select task_id, trace, attempt from seen_tasks where coalesce(done, 1) = 0 order by ts").fetchall()]

    def unfinished_runs(self) -> list[UnfinishedRun]:
        """Like :meth:`unfinished_attempts`, with the node that assigned each (``cloud`` for rows
        recorded before site tasks)."""
        return [UnfinishedRun(r[0], r[1], r[2], r[3] or "cloud") for r in self.db.execute(
            "select task_id, trace, attempt, assigner from seen_tasks where coalesce(done, 1) = 0 order by ts")]

    def close(self) -> None:
        self.db.close()
