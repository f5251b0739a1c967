"""Site tasks this device submitted to its gateway (docs/protocol.md §3, *Site tasks*), in SQLite.

One row per submission, keyed by the device's own ``key``: what was asked (handler, args, options),
where it stands (``new`` -> ``submitted`` -> ``succeeded`` | ``failed`` | ``cancelled`` | ``expired``)
and its outcome (result, error, the node that ran it), as the gateway's ``task_done`` reported it.

The file (``{data_dir}/submissions.db``) is shared by two kinds of processes: the running agent,
which sends what is ``new`` and records outcomes, and programs on the device (``cwsnet task
submit``), which insert ``new`` rows and poll them for the outcome. It is its own file, not the
agent's state DB, so such a program never touches the agent's ``seq`` marks or replay windows.
WAL lets readers and the one writer of the moment work at once; ``busy_timeout`` makes a writer
wait out the other process's (short) transaction instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from cwsnet.db import open_durable, transaction
from cwsnet.envelope import body_problem

log = logging.getLogger("cwsnet.agent.submissions")

FILE_NAME = "submissions.db"
#: states of a submission: waiting for the agent, handed to its outbox, and the final ones
STATES = ("new", "submitted", "succeeded", "failed", "cancelled", "expired")
FINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
MAX_ARGS = 60 * 1024  # bytes of CBOR: the submission (with its load and options) still fits one message
BUSY_TIMEOUT_MS = 5000

_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_DEFAULTS = {"priority": 5, "max_attempts": 3, "deadline": None, "data_class": None, "requirements": None}


def task_id_for(node: str, key: str) -> str:
    """The site task's id: ``s-`` and the first 24 hex digits of SHA-256(``{node}/{key}``), so a
    submission repeated after the gateway lost its state still names the same task (protocol §3)."""
    return "s-" + hashlib.sha256(f"{node}/{key}".encode()).hexdigest()[:24]


def new_key() -> str:
    return uuid.uuid4().hex


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def validate(key: str, handler: str, args: dict[str, Any] | None = None, *, priority: int = 5,
             max_attempts: int = 3, deadline: int | None = None, data_class: str | None = None,
             requirements: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a submission before it is recorded, with the rules the gateway applies (protocol §3), so
    a mistake is a ValueError here that names the field rather than a ``failed`` outcome later.
    Returns the options map that is stored and sent (priority, max_attempts, deadline, data_class,
    requirements)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"key {key!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -")
    if not isinstance(handler, str) or not handler.strip() or len(handler) > 63:
        raise ValueError(f"handler {handler!r}: must be the name of a task handler (text, 1-63 characters)")
    if args is not None:
        if not isinstance(args, dict):
            raise ValueError(f"args must be a map (a dict with text keys), not {type(args).__name__}")
        why = body_problem(args, "args", MAX_ARGS)
        if why is not None:
            raise ValueError(why)
    if not _uint(priority) or priority > 9:
        raise ValueError(f"priority must be 0..9 (got {priority!r})")
    if not _uint(max_attempts) or not 1 <= max_attempts <= 10:
        raise ValueError(f"max_attempts must be 1..10 (got {max_attempts!r})")
    if deadline is not None and not _uint(deadline):
        raise ValueError(f"deadline must be milliseconds since the Unix epoch (an unsigned integer) or None "
                         f"(got {deadline!r})")
    if data_class is not None and (not isinstance(data_class, str) or not 1 <= len(data_class) <= 63):
        raise ValueError(f"data_class must be text of 1-63 characters or None (got {data_class!r})")
    if requirements is not None:
        _check_requirements(requirements)
        try:
            json.dumps(requirements, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"requirements must be plain data (text, numbers, lists, maps): {exc}") from None
    return {"priority": priority, "max_attempts": max_attempts, "deadline": deadline, "data_class": data_class,
            "requirements": requirements}


def _check_requirements(req: Any) -> None:
    if not isinstance(req, dict):
        raise ValueError(f"requirements must be a map or None (got {type(req).__name__})")
    if not all(isinstance(k, str) for k in req):
        raise ValueError("requirements: keys must be text (capabilities, mem_free, cpu)")
    caps = req.get("capabilities")
    if caps is not None and not (isinstance(caps, list) and all(isinstance(c, str) and c for c in caps)):
        raise ValueError(f"requirements.capabilities must be a list of text (got {caps!r})")
    mem = req.get("mem_free")
    if mem is not None and not _uint(mem):
        raise ValueError(f"requirements.mem_free must be bytes (an unsigned integer) (got {mem!r})")
    cpu = req.get("cpu")
    if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int | float) or not 0 <= cpu <= 1):
        raise ValueError(f"requirements.cpu must be a number 0..1 (got {cpu!r})")


@dataclass(frozen=True, slots=True)
class Submission:
    """One row: what was submitted and, once the gateway said so, how it ended."""

    key: str
    task_id: str
    handler: str
    args: dict[str, Any]
    options: dict[str, Any]
    state: str
    result: Any
    error: str | None
    node: str | None  # where it ran (from the task_done)
    submitted_ms: int
    done_ms: int | None
    cancel: str | None = None  # the device asked to cancel it: "new" (not sent yet), then "sent"

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def cancel_body(self) -> dict[str, Any]:
        """The ``task_submit`` body that cancels it (protocol §3, site tasks)."""
        return {"key": self.key, "cancel": True}

    def body(self) -> dict[str, Any]:
        """The ``task_submit`` body, without ``load`` (the agent adds what it measures when it sends)."""
        return {"key": self.key, "handler": self.handler, "args": self.args} | {
            name: self.options.get(name, default) for name, default in _DEFAULTS.items()}

    def to_json(self) -> dict[str, Any]:
        """The row as JSON-able data (byte strings in a result become base64)."""
        return _jsonable({"key": self.key, "task_id": self.task_id, "handler": self.handler, "args": self.args,
                          **self.options, "state": self.state, "result": self.result, "error": self.error,
                          "node": self.node, "submitted_ms": self.submitted_ms, "done_ms": self.done_ms,
                          "cancel": self.cancel})


def _jsonable(value: Any) -> Any:
    import base64

    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


_COLUMNS = "key, task_id, handler, args, options, state, result, error, node, submitted_ms, done_ms, cancel"


def _row(r: tuple[Any, ...]) -> Submission:
    return Submission(key=r[0], task_id=r[1], handler=r[2], args=cbor2.loads(r[3]), options=json.loads(r[4]),
                      state=r[5], result=None if r[6] is None else cbor2.loads(r[6]), error=r[7], node=r[8],
                      submitted_ms=r[9], done_ms=r[10], cancel=r[11])


class Submissions:
    """The table and its small API; safe to open from several processes at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = open_durable(path)
        self.conn: sqlite3.Connection = self.db.conn
        self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        with transaction(self.conn):
            self.conn.execute(
                "create table if not exists submissions (key text primary key, task_id text not null, "
                "handler text not null, args blob not null, options text not null, state text not null, "
                "result blob, error text, node text, submitted_ms integer not null, done_ms integer)")
            self.conn.execute("create index if not exists submissions_state on submissions (state, submitted_ms)")
            columns = {r[1] for r in self.conn.execute("pragma table_info(submissions)")}
            if "cancel" not in columns:  # files from before cancels
                self.conn.execute("alter table submissions add column cancel text")
        self._data_version: int | None = None

    @classmethod
    def in_dir(cls, data_dir: Path) -> Submissions:
        return cls(Path(data_dir) / FILE_NAME)

    # ---- writing ------------------------------------------------------------------------------
    def add_new(self, node: str, key: str, handler: str, args: dict[str, Any] | None = None, *,
                priority: int = 5, max_attempts: int = 3, deadline: int | None = None,
                data_class: str | None = None, requirements: dict[str, Any] | None = None,
                now_ms: int | None = None) -> tuple[Submission, bool]:
        """Record a submission as ``new`` (the running agent sends it within a second); returns the
        row and whether it was added. The same key again with the same handler, args and options is
        the same submission: nothing is added (False); with anything different it is a ValueError,
        since the gateway would take the first and ignore the second."""
        options = validate(key, handler, args, priority=priority, max_attempts=max_attempts, deadline=deadline,
                           data_class=data_class, requirements=requirements)
        args = args or {}
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with transaction(self.conn):
            old = self._get(key)
            if old is None:
                self.conn.execute(
                    f"insert into submissions ({_COLUMNS}) values (?, ?, ?, ?, ?, 'new', null, null, null, ?, null, "
                    "null)",
                    [key, task_id_for(node, key), handler, cbor2.dumps(args), json.dumps(options), now])
        if old is None:
            got = self.get(key)
            assert got is not None
            return got, True
        same = (old.handler == handler and cbor2.dumps(old.args, canonical=True) == cbor2.dumps(args, canonical=True)
                and json.dumps(old.options, sort_keys=True) == json.dumps(options, sort_keys=True))
        if not same:
            raise ValueError(f"key {key!r} was already submitted as {old.handler} {json.dumps(_jsonable(old.args))} "
                             f"({old.state}); a key names one task: use another key for different work")
        return old, False

    def mark_sent(self, key: str) -> None:
        """The submission is in the agent's outbox (it goes to the gateway, and again until custody)."""
        with transaction(self.conn):
            self.conn.execute("update submissions set state = 'submitted' where key = ? and state = 'new'", [key])

    def request_cancel(self, key: str) -> Submission:
        """Ask the agent to cancel ``key`` (it tells the gateway within a second); the row as it is now.
        ValueError for a key never submitted here; a finished one is left as it is."""
        with transaction(self.conn):
            self.conn.execute("update submissions set cancel = 'new' where key = ? and cancel is null "
                              f"and state not in ({', '.join('?' * len(FINAL))})", [key, *sorted(FINAL)])
        row = self.get(key)
        if row is None:
            raise ValueError(f"no site task with key {key!r} was submitted from here ({self.path})")
        return row

    def take_cancels(self) -> list[Submission]:
        """The cancels asked for and not sent to the gateway yet, oldest first."""
        rows = self.conn.execute(f"select {_COLUMNS} from submissions where cancel = 'new' and state not in "
                                 f"({', '.join('?' * len(FINAL))}) order by submitted_ms, key", sorted(FINAL))
        return [_row(r) for r in rows.fetchall()]

    def mark_cancel_sent(self, key: str) -> None:
        with transaction(self.conn):
            self.conn.execute("update submissions set cancel = 'sent' where key = ? and cancel = 'new'", [key])

    def done(self, key: str, state: str, result: Any = None, error: str | None = None, node: str | None = None,
             now_ms: int | None = None) -> Submission | None:
        """Record the outcome (``state`` one of FINAL); None if ``key`` is not one of ours or already has
        its outcome (a repeated ``task_done`` changes nothing)."""
        if state not in FINAL:
            raise ValueError(f"state {state!r} is not a final state ({', '.join(sorted(FINAL))})")
        now = int(time.time() * 1000) if now_ms is None else now_ms
        with transaction(self.conn):
            cur = self.conn.execute(
                "update submissions set state = ?, result = ?, error = ?, node = ?, done_ms = ? where key = ? "
                f"and state not in ({', '.join('?' * len(FINAL))})",
                [state, None if result is None else cbor2.dumps(result), error, node, now, key, *sorted(FINAL)])
        return self.get(key) if cur.rowcount else None

    # ---- reading ------------------------------------------------------------------------------
    def _get(self, key: str) -> Submission | None:
        r = self.conn.execute(f"select {_COLUMNS} from submissions where key = ?", [key]).fetchone()
        return None if r is None else _row(r)

    def get(self, key: str) -> Submission | None:
        return self._get(key)

    def list(self, state: str | None = None) -> list[Submission]:
        """Every submission (or those in ``state``), oldest first."""
        if state is None:
            rows = self.conn.execute(f"select {_COLUMNS} from submissions order by submitted_ms, key")
        else:
            rows = self.conn.execute(f"select {_COLUMNS} from submissions where state = ? "
                                     "order by submitted_ms, key", [state])
        out: list[Submission] = []
        for r in rows.fetchall():
            try:
                out.append(_row(r))
            except Exception as exc:  # noqa: BLE001 - a row written by hand: skip it, keep the others
                log.warning("submission %r in %s cannot be read (%s: %s); skipped", r[0], self.path,
                            type(exc).__name__, exc)
        return out

    def take_new(self) -> list[Submission]:
        """The submissions still waiting to be sent, oldest first (they stay ``new`` until
        :meth:`mark_sent`)."""
        return self.list("new")

    def changed(self) -> bool:
        """Whether another connection (another process) committed to the file since the last call:
        SQLite's ``PRAGMA data_version``, which costs no table read. True on the first call."""
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        changed, self._data_version = version != self._data_version, version
        return changed

    def close(self) -> None:
        self.db.close()
