"""The cloud's storage: one repository interface (:class:`Store`) and its SQLite implementation.

Ingest and the REST API talk only to :class:`Store`, so a server database can replace SQLite
without touching them. :class:`SqliteStore` keeps everything in one WAL-mode file written with
sqlite-utils; every write method commits before it returns, and :meth:`Store.ingest_batch`
writes a whole batch of opened messages in one transaction. ``messages`` has the primary key
``(sender, seq)``: that key is what makes ingest exactly-once however often a gateway redelivers.

All timestamps are integer milliseconds since the Unix epoch.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import sqlite_utils

from cwsnet import parts
from cwsnet.identity import public_key_from_b64
from cwsnet.topics import check_name

ROLES = ("device", "gateway", "cloud", "app")
TASK_STATES = ("queued", "running", "succeeded", "failed", "expired", "cancelled")
TERMINAL_TASK_STATES = frozenset({"succeeded", "failed", "expired", "cancelled"})

#: Allowed task transitions: new state -> the states it may be entered from. A report that is not
#: allowed (a late ``running`` after ``succeeded``, a second result) leaves the task as it is.
#: the task_result states that move a *direct* task's row (a scheduled task's are the scheduler's:
#: cloud/tasks.py; ``checkpoint`` and ``cancelled`` reports only concern scheduled tasks)
DIRECT_REPORTS = frozenset({"running", "succeeded", "failed", "expired"})
TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    "running": frozenset({"queued"}),
    "succeeded": frozenset({"queued", "running"}),
    "failed": frozenset({"queued", "running"}),
    "expired": frozenset({"queued", "running"}),
    "cancelled": frozenset({"queued"}),
}

Outcome = Literal["stored", "duplicate"]
T = TypeVar("T")


def now_ms() -> int:
    return int(time.time() * 1000)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def to_json(value: Any) -> str | None:
    """Encode a CBOR-decoded value as JSON text (bytes become base64); ``None`` stays NULL."""
    if value is None:
        return None
    return json.dumps(value, default=_json_default, separators=(",", ":"), allow_nan=False)


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    """A registered node (device, gateway, the cloud itself, an app) and its latest known state."""

    id: str
    site: str
    role: str
    public_key: str
    created: int
    online: bool = False
    last_seen: int | None = None
    last_status: dict[str, Any] | None = None
    birth_seq: int | None = None
    will_seq: int | None = None
    status_seq: int | None = None
    agent: dict[str, Any] | None = None
    kv: int = 1
    revoked_at: int | None = None


@dataclass(frozen=True, slots=True)
class NodeKey:
    """What a receiver needs to authenticate a node: its site, role, public key (base64), its key
    version, the rotated-out keys still accepted (``((kv, key, until_ms), ...)``) and revocation."""

    site: str
    role: str
    public_key: str
    kv: int = 1
    previous_keys: tuple[tuple[int, str, int], ...] = ()
    revoked_at: int | None = None


@dataclass(frozen=True, slots=True)
class TelemetryRow:
    sender: str
    seq: int
    idx: int
    stream: str
    ts: int
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    ts: int
    source: str | None
    type: str
    severity: str
    message: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to be recorded (the store assigns its id)."""

    ts: int
    source: str | None
    type: str
    severity: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    target: str
    handler: str
    args: dict[str, Any]
    state: str
    created: int
    updated: int
    result: Any = None
    error: str | None = None
    started: int | None = None
    finished: int | None = None
    deadline: int | None = None
    dispatched: int | None = None
    attempts: int = 0
    #: "direct": sent to ``target`` as asked; "scheduled": placed by the workload scheduler (cloud/tasks.py);
    #: "site": submitted by a device and scheduled by its gateway, mirrored here (read-only for the cloud)
    kind: str = "direct"
    site: str | None = None
    node: str | None = None  # scheduled, site: the executor it runs on (or ran on last)
    placement: str | None = None  # scheduled, site: the explanation of where it runs and why
    #: scheduled: the scheduler's record (cwsnet.scheduler.Task.to_record); site: what the gateway's mirror
    #: said beyond the columns (``gateway``, ``seq`` of the report applied, ``key``, ``priority``, ``data_class``)
    sched: dict[str, Any] | None = None
    idempotency_key: str | None = None
    disagreement: Any = None  # replicas (majority) that returned different results: [[node, result], ...]
    origin: str | None = None  # site: the device that submitted it
    #: a light listing's args/result left out (None here) because their stored JSON is over the limit: their sizes
    omitted: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    total: int


# -- what ingest hands the store ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """Effect of a ``birth``/``status``/``death`` message on the sender's registry row.

    A birth or status applies only if its ``seq`` is newer than the last applied status; a death
    applies if its ``seq`` is the ``will_seq`` announced by the node's latest birth or newer than the
    last applied status (a stale will from an earlier connection is stored but changes nothing).
    """

    kind: Literal["birth", "status", "death"]
    online: bool
    body: dict[str, Any]
    will_seq: int | None = None
    agent: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    ts: int
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TaskReport:
    task_id: str
    state: str
    result: Any = None
    error: str | None = None
    started: int | None = None
    finished: int | None = None
    #: a result sent in parts (protocol §3, "Parts"): its ref, and the message body to keep until they are all here
    ref: Any = None
    body: dict[str, Any] | None = None


def given_up(body: dict[str, Any], sender: str, why: str) -> TaskReport:
    """A final result that waited for its parts in vain (``why``): the task fails, saying so."""
    error = f"its result's parts never all came from {sender} ({why})"
    return TaskReport(task_id=body["task_id"], state="failed", error=error, started=body.get("started"),
                      finished=body.get("finished"),
                      body={k: v for k, v in body.items() if k != "result_ref"} | {"state": "failed", "result": None,
                                                                                   "error": error})


def task_report(body: dict[str, Any]) -> TaskReport:
    """The report of a task_result body ingest checked (a final waiting for its parts, stored as is)."""
    ref = body.get("result_ref")
    return TaskReport(task_id=body["task_id"], state=body["state"], result=body.get("result"), error=body.get("error"),
                      started=body.get("started"), finished=body.get("finished"),
                      ref=None if ref is None else parts.Ref.parse(ref), body=body)


@dataclass(frozen=True, slots=True)
class SiteTaskReport:
    """A gateway's mirror of one of its site tasks (docs/protocol.md §3, "The mirror"), checked by ingest.

    Stored as a tasks row of kind ``site``; a report whose gateway ``seq`` is not newer than the one
    applied to the row changes nothing (reports of an outage may arrive out of order).
    """

    task_id: str
    state: str
    gateway: str
    site: str
    origin: str
    key: str
    handler: str
    priority: int
    data_class: str | None
    node: str | None
    attempts: int
    submitted: int
    finished: int | None
    explain: str
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class IngestItem:
    """One authenticated message and what storing it changes. Effects apply only if it is new."""

    sender: str
    seq: int
    msg_id: str
    kind: str
    topic: str
    ts: int
    received: int
    trace: str | None = None
    kv: int | None = None  # the sender's key version that sealed it (None: its current one, unstated)
    status: StatusUpdate | None = None
    stream: str | None = None
    readings: tuple[Reading, ...] = ()
    event: NewEvent | None = None
    task: TaskReport | None = None
    site_task: SiteTaskReport | None = None  # a gateway's site-task mirror (its task_result with site_task)
    part: Any = None  # (name, cwsnet.parts.Part): one part of a task result too big for one message
    expires: int | None = None  # the clear header's exp (ms), if any: an offload past it is not run


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What :meth:`Store.ingest_batch` did with one item.

    ``outcome`` is ``"stored"`` or ``"duplicate"`` (``(sender, seq)`` was already stored);
    ``node_changed`` says a status effect changed the registry row; ``task_state`` is the task's
    new state when a task report moved it; ``site_task_changed`` says a gateway's mirror report
    created or updated its site task's row.
    """

    outcome: Outcome
    node_changed: bool = False
    task_state: str | None = None
    site_task_changed: bool = False
    #: task_result bodies made whole by this item (a parted result: its final message, with ``result``)
    completed: tuple[dict[str, Any], ...] = ()


# -- the interface ------------------------------------------------------------------------------


class Store(Protocol):
    """Every storage operation the cloud's ingest, API, dispatcher and CLI use."""

    def close(self) -> None: ...

    def ping(self) -> None:
        """Raise if the database cannot answer a trivial query."""
        ...

    # registry
    def upsert_node(self, node_id: str, *, site: str, role: str, public_key: str) -> Node:
        """Register a node or update its site, role and public key (base64 X25519); its state is kept.

        Raises ``TopicError`` (a ``ValueError``) for a bad node or site name, ``ValueError`` for an
        unknown role, ``ConfigError`` for a public key that is not 32 bytes of base64.
        """
        ...

    def delete_node(self, node_id: str) -> bool: ...

    def get_node(self, node_id: str) -> Node | None: ...

    def list_nodes(
        self,
        *,
        role: str | None = None,
        site: str | None = None,
        online: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[Node]: ...

    def count_nodes(self, *, role: str | None = None, online: bool | None = None) -> int: ...

    def node_keys(self) -> dict[str, str]:
        """``{node id: base64 public key}`` for every registered node."""
        ...

    def node_directory(self) -> dict[str, NodeKey]: ...

    def mark_offline(self, *, seen_before: int, roles: Sequence[str] = ("device", "gateway")) -> list[str]:
        """Mark online nodes whose ``last_seen`` is older than ``seen_before`` offline; return their ids."""
        ...

    # ingest
    def ingest_batch(self, items: Sequence[IngestItem]) -> list[IngestOutcome]:
        """Store a batch in one transaction, skipping ``(sender, seq)`` already present; commit."""
        ...

    def telemetry(self, node: str, *, limit: int = 100, stream: str | None = None) -> list[TelemetryRow]: ...

    def message_count(self, sender: str | None = None) -> int: ...

    # events
    def add_event(
        self,
        type: str,
        message: str,
        *,
        source: str | None = None,
        severity: str = "info",
        data: dict[str, Any] | None = None,
        ts: int | None = None,
    ) -> Event: ...

    def add_events(self, events: Sequence[NewEvent]) -> list[Event]: ...

    def list_events(self, *, limit: int = 100, offset: int = 0, since: int | None = None) -> Page[Event]: ...

    def prune_events(self, keep: int) -> int:
        """Delete all but the newest ``keep`` events; return how many were deleted."""
        ...

    def prune_parts(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        """Forget parts of task results that never came whole (cwsnet.parts.MAX_AGE): the tasks whose final
        result waited for them fail (direct ones here); returns ``(sender, failed final body)`` of each."""
        ...

    def telemetry_streams(self) -> list[str]:
        """The distinct telemetry stream names stored."""
        ...

    def prune_telemetry(self, streams: Sequence[str], before: int) -> int:
        """Delete readings of ``streams`` with ``ts`` before ``before`` (ms); return how many."""
        ...

    # tasks
    def create_task(
        self,
        *,
        target: str,
        handler: str,
        args: dict[str, Any],
        deadline: int | None = None,
        task_id: str | None = None,
        now: int | None = None,
        idempotency_key: str | None = None,
    ) -> Task: ...

    def get_task(self, task_id: str) -> Task | None: ...

    def update_task(
        self,
        task_id: str,
        state: str,
        *,
        result: Any = None,
        error: str | None = None,
        started: int | None = None,
        finished: int | None = None,
        target: str | None = None,
        now: int | None = None,
    ) -> tuple[Task | None, bool]:
        """Move a task to ``state`` if :data:`TASK_TRANSITIONS` allows it; return (task, moved)."""
        ...

    def mark_dispatched(self, task_id: str, *, now: int | None = None) -> None: ...

    def list_tasks(
        self, *, limit: int = 100, offset: int = 0, state: str | None = None, target: str | None = None,
        kind: str | None = None, light: int | None = None,
    ) -> Page[Task]:
        """Tasks, newest first. ``light``: args and results whose stored JSON is longer than this many
        bytes are not read (None in the tasks, their sizes in ``omitted``): lists stay cheap."""
        ...

    def queued_tasks_for(self, node: str) -> list[Task]: ...

    def overdue_tasks(self, now: int) -> list[Task]:
        """Queued or running tasks whose deadline has passed, oldest first."""
        ...

    # counters
    def get_counter(self, name: str) -> int | None: ...

    def set_counter(self, name: str, value: int) -> None:
        """Durably store ``value`` (committed before returning)."""
        ...


# -- SQLite ---------------------------------------------------------------------------------------


class SqliteStore(Store):
    """:class:`Store` on one SQLite file (WAL, ``synchronous=FULL``), via sqlite-utils.

    ``synchronous=FULL`` because the cloud acknowledges a message to its gateway as soon as the
    batch commits, and the gateway then deletes its copy: a commit must survive a power cut, not
    only a process crash. Batching (up to a few hundred messages per commit) pays for the fsync.

    Thread-safe: one connection guarded by a lock, so the event loop, ``asyncio.to_thread``
    workers and a TestClient thread may share a store.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL", busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # opened device data, password hashes and token hashes: the owner's only (SQLite gives
            # its -wal and -shm files the database's mode)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            os.chmod(self.path, 0o600)
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=busy_timeout_ms / 1000)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        if str(path) != ":memory:":
            self.db.enable_wal()
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._create_schema()

    # schema ------------------------------------------------------------------------------------

    def _create_schema(self) -> None:
        db = self.db
        with self._lock, db.atomic():
            db["nodes"].create(
                {
                    "id": str,
                    "site": str,
                    "role": str,
                    "public_key": str,
                    "created": int,
                    "online": int,
                    "last_seen": int,
                    "last_status": str,
                    "birth_seq": int,
                    "will_seq": int,
                    "status_seq": int,
                    "agent": str,
                    "kv": int,
                    "previous_keys": str,
                    "revoked_at": int,
                },
                pk="id",
                not_null=["site", "role", "public_key", "created", "online"],
                defaults={"online": 0},
                if_not_exists=True,
            )
            db["nodes"].create_index(["site"], if_not_exists=True)
            db["nodes"].create_index(["role", "online"], if_not_exists=True)
            db["messages"].create(
                {
                    "sender": str,
                    "seq": int,
                    "msg_id": str,
                    "kind": str,
                    "topic": str,
                    "ts": int,
                    "received": int,
                    "trace": str,
                    "kv": int,
                },
                pk=("sender", "seq"),  # the exactly-once key: UNIQUE(sender, seq)
                not_null=["msg_id", "kind", "topic", "ts", "received"],
                if_not_exists=True,
            )
            db["telemetry"].create(
                {"sender": str, "seq": int, "idx": int, "stream": str, "ts": int, "values": str},
                pk=("sender", "seq", "idx"),
                not_null=["stream", "ts", "values"],
                if_not_exists=True,
            )
            db["telemetry"].create_index(["sender", "ts"], if_not_exists=True)
            db["telemetry"].create_index(["stream", "ts"], if_not_exists=True)  # retention (qos policies)
            parts.create(db.conn)  # task results too big for one message, until whole (protocol §3, "Parts")
            db["events"].create(
                {
                    "id": int,
                    "ts": int,
                    "source": str,
                    "type": str,
                    "severity": str,
                    "message": str,
                    "data": str,
                },
                pk="id",
                not_null=["ts", "type", "severity", "message"],
                if_not_exists=True,
            )
            db["events"].create_index(["ts"], if_not_exists=True)
            db["tasks"].create(
                {
                    "id": str,
                    "target": str,
                    "handler": str,
                    "args": str,
                    "state": str,
                    "result": str,
                    "error": str,
                    "created": int,
                    "updated": int,
                    "started": int,
                    "finished": int,
                    "deadline": int,
                    "dispatched": int,
                    "attempts": int,
                },
                pk="id",
                not_null=["target", "handler", "args", "state", "created", "updated", "attempts"],
                defaults={"attempts": 0},
                if_not_exists=True,
            )
            have = set(db["tasks"].columns_dict)
            for col, typ in (("kind", str), ("site", str), ("node", str), ("placement", str), ("sched", str),
                             ("idempotency_key", str), ("disagreement", str), ("origin", str)):
                if col not in have:  # databases made before the workload scheduler (issue 7) or site tasks
                    db["tasks"].add_column(col, typ)
            db.execute("create unique index if not exists idx_tasks_key on tasks (idempotency_key) "
                       "where idempotency_key is not null")
            db.execute("create index if not exists idx_tasks_open_scheduled on tasks (kind, state)")
            db["tasks"].create_index(["target", "state"], if_not_exists=True)
            db["tasks"].create_index(["created"], if_not_exists=True)
            db["counters"].create({"name": str, "value": int}, pk="name", not_null=["value"], if_not_exists=True)
            if "kv" not in db["messages"].columns_dict:  # databases made before key versions (issue 4)
                db["messages"].add_column("kv", int)
            have = set(db["nodes"].columns_dict)
            for col, typ in (("kv", int), ("previous_keys", str), ("revoked_at", int)):
                if col not in have:
                    db["nodes"].add_column(col, typ)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def ping(self) -> None:
        with self._lock:
            self.db.conn.execute("select count(*) from nodes").fetchone()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.db.conn.execute(sql, list(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._lock:
            row = self.db.conn.execute(sql, list(params)).fetchone()
            return None if row is None else row[0]

    # registry ----------------------------------------------------------------------------------

    @staticmethod
    def _node(row: dict[str, Any]) -> Node:
        return Node(
            id=row["id"],
            site=row["site"],
            role=row["role"],
            public_key=row["public_key"],
            created=row["created"],
            online=bool(row["online"]),
            last_seen=row["last_seen"],
            last_status=_from_json(row["last_status"]),
            birth_seq=row["birth_seq"],
            will_seq=row["will_seq"],
            status_seq=row["status_seq"],
            agent=_from_json(row["agent"]),
            kv=row.get("kv") or 1,
            revoked_at=row.get("revoked_at"),
        )

    def upsert_node(self, node_id: str, *, site: str, role: str, public_key: str, kv: int = 1,
                    previous_keys: Sequence[tuple[int, str, int]] = (), revoked_at: int | None = None) -> Node:
        check_name(node_id, "node id")
        check_name(site, "site")
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        public_key_from_b64(public_key, f"node {node_id!r}: public_key")  # ConfigError if not 32 bytes b64
        with self._lock, self.db.atomic():
            self.db.conn.execute(
                "insert into nodes (id, site, role, public_key, created, online, kv, previous_keys, revoked_at) "
                "values (?, ?, ?, ?, ?, 0, ?, ?, ?) "
                "on conflict(id) do update set site = excluded.site, role = excluded.role, "
                "public_key = excluded.public_key, kv = excluded.kv, previous_keys = excluded.previous_keys, "
                "revoked_at = excluded.revoked_at, online = case when excluded.revoked_at is null "
                "then nodes.online else 0 end",
                [node_id, site, role, public_key, now_ms(), kv, to_json([list(p) for p in previous_keys]),
                 revoked_at],
            )
        node = self.get_node(node_id)
        assert node is not None
        return node

    def delete_node(self, node_id: str) -> bool:
        with self._lock, self.db.atomic():
            return self.db.conn.execute("delete from nodes where id = ?", [node_id]).rowcount > 0

    def get_node(self, node_id: str) -> Node | None:
        rows = self._rows("select * from nodes where id = ?", [node_id])
        return self._node(rows[0]) if rows else None

    @staticmethod
    def _node_filter(role: str | None, site: str | None, online: bool | None) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if role is not None:
            clauses.append("role = ?")
            params.append(role)
        if site is not None:
            clauses.append("site = ?")
            params.append(site)
        if online is not None:
            clauses.append("online = ?")
            params.append(1 if online else 0)
        return (" where " + " and ".join(clauses) if clauses else ""), params

    def list_nodes(
        self,
        *,
        role: str | None = None,
        site: str | None = None,
        online: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[Node]:
        where, params = self._node_filter(role, site, online)
        with self._lock:
            total = self._scalar(f"select count(*) from nodes{where}", params)
            rows = self._rows(f"select * from nodes{where} order by id limit ? offset ?", [*params, limit, offset])
        return Page([self._node(r) for r in rows], int(total))

    def count_nodes(self, *, role: str | None = None, online: bool | None = None) -> int:
        where, params = self._node_filter(role, None, online)
        return int(self._scalar(f"select count(*) from nodes{where}", params))

    def node_keys(self) -> dict[str, str]:
        return {r["id"]: r["public_key"] for r in self._rows("select id, public_key from nodes")}

    def node_directory(self) -> dict[str, NodeKey]:
        return {
            r["id"]: NodeKey(r["site"], r["role"], r["public_key"], r["kv"] or 1,
                             tuple(tuple(p) for p in (_from_json(r["previous_keys"]) or [])), r["revoked_at"])
            for r in self._rows("select id, site, role, public_key, kv, previous_keys, revoked_at from nodes")
        }

    def mark_offline(self, *, seen_before: int, roles: Sequence[str] = ("device", "gateway")) -> list[str]:
        marks = ",".join("?" for _ in roles)
        with self._lock, self.db.atomic():
            rows = self.db.conn.execute(
                f"update nodes set online = 0 where online = 1 and role in ({marks}) "
                "and (last_seen is null or last_seen < ?) returning id",
                [*roles, seen_before],
            ).fetchall()
        return sorted(r[0] for r in rows)

    # ingest ------------------------------------------------------------------------------------

    def ingest_batch(self, items: Sequence[IngestItem]) -> list[IngestOutcome]:
        outcomes: list[IngestOutcome] = []
        if not items:
            return outcomes
        with self._lock, self.db.atomic():
            conn = self.db.conn
            telemetry_rows: list[dict[str, Any]] = []
            for item in items:
                cur = conn.execute(
                    "insert or ignore into messages (sender, seq, msg_id, kind, topic, ts, received, trace, kv) "
                    "values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [item.sender, item.seq, item.msg_id, item.kind, item.topic, item.ts, item.received, item.trace,
                     item.kv],
                )
                if cur.rowcount == 0:
                    outcomes.append(IngestOutcome("duplicate"))
                    continue
                conn.execute(
                    "update nodes set last_seen = max(coalesce(last_seen, 0), ?) where id = ?",
                    [item.received, item.sender],
                )
                node_changed = False
                task_state = None
                if item.status is not None:
                    node_changed = self._apply_status(conn, item)
                for idx, reading in enumerate(item.readings):
                    telemetry_rows.append(
                        {
                            "sender": item.sender,
                            "seq": item.seq,
                            "idx": idx,
                            "stream": item.stream or "",
                            "ts": reading.ts,
                            "values": to_json(reading.values),
                        }
                    )
                if item.event is not None:
                    self._insert_events(conn, [item.event])
                site_task_changed = item.site_task is not None and self._apply_site_task(conn, item)
                completed: list[dict[str, Any]] = []
                reports = [item.task] if item.task is not None else []
                if item.part is not None:  # a part of a result: it may complete a final that waits for it
                    name, part = item.part
                    waiting, dropped = parts.add(conn, item.sender, name, part, item.received / 1000)
                    if waiting is not None:
                        reports.append(task_report(waiting))
                    for _, _, body in dropped:  # (told to the scheduler too, through ``completed``)
                        g = given_up(body, item.sender, "over the sender's bound of parts kept")
                        reports.append(g)
                        completed.append(g.body or {})
                for t in reports:
                    if t.ref is not None:
                        whole = self._whole(conn, item, t)
                        if whole is None:
                            continue
                        t = whole
                        completed.append(t.body or {})
                    if t.state in DIRECT_REPORTS:
                        moved = self._transition(conn, t.task_id, t.state, result=t.result, error=t.error,
                                                 started=t.started, finished=t.finished, target=item.sender,
                                                 now=item.received)
                        task_state = t.state if moved else task_state
                outcomes.append(IngestOutcome("stored", node_changed=node_changed, task_state=task_state,
                                              site_task_changed=site_task_changed, completed=tuple(completed)))
            if telemetry_rows:
                self.db["telemetry"].insert_all(telemetry_rows, ignore=True, batch_size=500)
        return outcomes

    @staticmethod
    def _whole(conn: sqlite3.Connection, item: IngestItem, t: TaskReport) -> TaskReport | None:
        """A final result sent in parts, made whole (its body gets ``result``), or None: it waits for the
        rest of its parts. Parts that do not make the value the ref names fail the task, saying so."""
        body = dict(t.body or {})
        body.pop("result_ref", None)
        name = parts.name_of(t.task_id, body.get("attempt"))
        try:
            value = parts.take(conn, item.sender, name, t.ref, f"task {t.task_id}'s result")
        except parts.PartError as exc:  # (its parts are forgotten)
            error = f"its result did not arrive whole from {item.sender}: {exc}"
            body.update(state="failed", result=None, error=error)
            return replace(t, state="failed", result=None, error=error, ref=None, body=body)
        if value is None:
            parts.wait(conn, item.sender, name, t.ref, t.body or {}, item.received / 1000)
            return None
        body["result"] = value
        return replace(t, result=value, ref=None, body=body)

    @staticmethod
    def _apply_site_task(conn: sqlite3.Connection, item: IngestItem) -> bool:
        """Upsert the site task a gateway's mirror report describes; True if the row changed.

        The row is the gateway's: it is written only as kind ``site``, of the report's site, and only
        by a report newer (by that gateway's ``seq``) than the one applied; a row of another kind or
        another site with the same id is never touched. The idempotency key
        ``site:{gateway}:{origin}:{key}`` is kept unless another task already holds it (then None:
        the unique index must never make a gateway's report fail the ingest batch).
        """
        st = item.site_task
        assert st is not None
        key: str | None = f"site:{st.gateway}:{st.origin}:{st.key}"
        holder = conn.execute("select id from tasks where idempotency_key = ?", [key]).fetchone()
        if holder is not None and holder[0] != st.task_id:
            key = None
        sched = {"gateway": st.gateway, "seq": item.seq, "key": st.key, "priority": st.priority,
                 "data_class": st.data_class}
        updated = st.finished if st.finished is not None else item.ts
        cur = conn.execute(
            "insert into tasks (id, target, handler, args, state, result, error, created, updated, started, finished, "
            "deadline, attempts, kind, site, node, placement, sched, idempotency_key, origin) "
            "values (?, '', ?, '{}', ?, ?, ?, ?, ?, null, ?, null, ?, 'site', ?, ?, ?, ?, ?, ?) "
            "on conflict(id) do update set state = excluded.state, result = excluded.result, "
            "error = excluded.error, updated = excluded.updated, finished = excluded.finished, "
            "attempts = excluded.attempts, node = excluded.node, placement = excluded.placement, "
            "sched = excluded.sched, handler = excluded.handler, origin = excluded.origin "
            "where tasks.kind = 'site' and tasks.site = excluded.site "
            # a finished task stays finished (a late report of another gateway of the site cannot reopen it)
            "and (tasks.state not in ('succeeded', 'failed', 'cancelled', 'expired') "
            "or excluded.state in ('succeeded', 'failed', 'cancelled', 'expired')) "
            # another gateway's seq says nothing about this one's order: its report is taken as it comes
            "and (json_extract(tasks.sched, '$.gateway') is not json_extract(excluded.sched, '$.gateway') "
            "or coalesce(json_extract(tasks.sched, '$.seq'), -1) < json_extract(excluded.sched, '$.seq'))",
            [st.task_id, st.handler, st.state, to_json(st.result), st.error, st.submitted, updated, st.finished,
             st.attempts, st.site, st.node, st.explain, to_json(sched), key, st.origin],
        )
        return cur.rowcount > 0

    @staticmethod
    def _apply_status(conn: sqlite3.Connection, item: IngestItem) -> bool:
        st = item.status
        assert st is not None
        body = to_json(st.body)
        agent = to_json(st.agent)
        if st.kind == "death":
            cur = conn.execute(
                "update nodes set online = 0, last_status = ?, status_seq = max(coalesce(status_seq, -1), ?) "
                "where id = ? and (will_seq = ? or status_seq is null or status_seq < ?)",
                [body, item.seq, item.sender, item.seq, item.seq],
            )
        elif st.kind == "birth":
            cur = conn.execute(
                "update nodes set online = ?, last_status = ?, status_seq = ?, birth_seq = ?, "
                "will_seq = ?, agent = coalesce(?, agent) "
                "where id = ? and (status_seq is null or status_seq < ?)",
                [int(st.online), body, item.seq, item.seq, st.will_seq, agent, item.sender, item.seq],
            )
        else:
            cur = conn.execute(
                "update nodes set online = ?, last_status = ?, status_seq = ?, agent = coalesce(?, agent) "
                "where id = ? and (status_seq is null or status_seq < ?)",
                [int(st.online), body, item.seq, agent, item.sender, item.seq],
            )
        return cur.rowcount > 0

    @staticmethod
    def _insert_events(conn: sqlite3.Connection, events: Iterable[NewEvent]) -> list[int]:
        ids = []
        for e in events:
            cur = conn.execute(
                "insert into events (ts, source, type, severity, message, data) values (?, ?, ?, ?, ?, ?)",
                [e.ts, e.source, e.type, e.severity, e.message, to_json(e.data or {})],
            )
            ids.append(int(cur.lastrowid or 0))
        return ids

    def telemetry(self, node: str, *, limit: int = 100, stream: str | None = None) -> list[TelemetryRow]:
        sql = "select * from telemetry where sender = ?"
        params: list[Any] = [node]
        if stream is not None:
            sql += " and stream = ?"
            params.append(stream)
        sql += " order by ts desc, seq desc, idx desc limit ?"
        params.append(limit)
        return [
            TelemetryRow(r["sender"], r["seq"], r["idx"], r["stream"], r["ts"], json.loads(r["values"]))
            for r in self._rows(sql, params)
        ]

    def message_count(self, sender: str | None = None) -> int:
        if sender is None:
            return int(self._scalar("select count(*) from messages"))
        return int(self._scalar("select count(*) from messages where sender = ?", [sender]))

    # events ------------------------------------------------------------------------------------

    @staticmethod
    def _event(row: dict[str, Any]) -> Event:
        return Event(
            id=row["id"],
            ts=row["ts"],
            source=row["source"],
            type=row["type"],
            severity=row["severity"],
            message=row["message"],
            data=_from_json(row["data"]) or {},
        )

    def add_event(
        self,
        type: str,
        message: str,
        *,
        source: str | None = None,
        severity: str = "info",
        data: dict[str, Any] | None = None,
        ts: int | None = None,
    ) -> Event:
        ev = NewEvent(ts if ts is not None else now_ms(), source, type, severity, message, data or {})
        return self.add_events([ev])[0]

    def add_events(self, events: Sequence[NewEvent]) -> list[Event]:
        if not events:
            return []
        with self._lock, self.db.atomic():
            ids = self._insert_events(self.db.conn, events)
        return [
            Event(i, e.ts, e.source, e.type, e.severity, e.message, json.loads(to_json(e.data or {}) or "{}"))
            for i, e in zip(ids, events, strict=True)
        ]

    def list_events(self, *, limit: int = 100, offset: int = 0, since: int | None = None) -> Page[Event]:
        where, params = ("", []) if since is None else (" where ts >= ?", [since])
        with self._lock:
            total = self._scalar(f"select count(*) from events{where}", params)
            rows = self._rows(
                f"select * from events{where} order by ts desc, id desc limit ? offset ?", [*params, limit, offset]
            )
        return Page([self._event(r) for r in rows], int(total))

    def prune_parts(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        with self._lock, self.db.atomic():
            conn = self.db.conn
            failed = []
            for sender, _name, body in parts.prune(conn, now):
                t = given_up(body, sender, f"none for {parts.MAX_AGE / 3600:g} h")
                self._transition(conn, t.task_id, "failed", result=None, error=t.error, started=t.started,
                                 finished=t.finished, target=sender, now=int(now * 1000))
                failed.append((sender, t.body or {}))
            return failed

    def prune_events(self, keep: int) -> int:
        """Delete all but the newest ``keep`` events; return how many were deleted."""
        with self._lock, self.db.atomic():
            return self.db.conn.execute(
                "delete from events where id <= coalesce((select id from events order by id desc "
                "limit 1 offset ?), -1)",
                [keep],
            ).rowcount

    def telemetry_streams(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.conn.execute("select distinct stream from telemetry")]

    def prune_telemetry(self, streams: Sequence[str], before: int) -> int:
        # in transactions of at most 10,000 rows, so a first sweep of a huge stream never holds the
        # store (and ingest) for long
        n = 0
        for stream in streams:
            while True:
                with self._lock, self.db.atomic():
                    k = self.db.conn.execute(
                        "delete from telemetry where rowid in (select rowid from telemetry where stream = ? "
                        "and ts < ? limit 10000)", [stream, before]).rowcount
                n += k
                if k < 10000:
                    break
        return n

    # tasks -------------------------------------------------------------------------------------

    @staticmethod
    def _task(row: dict[str, Any]) -> Task:
        return Task(
            id=row["id"],
            target=row["target"],
            handler=row["handler"],
            args=_from_json(row["args"]) or {},
            state=row["state"],
            created=row["created"],
            updated=row["updated"],
            result=_from_json(row["result"]),
            error=row["error"],
            started=row["started"],
            finished=row["finished"],
            deadline=row["deadline"],
            dispatched=row["dispatched"],
            attempts=row["attempts"] or 0,
            kind=row.get("kind") or "direct",
            site=row.get("site"),
            node=row.get("node"),
            placement=row.get("placement"),
            sched=_from_json(row.get("sched")),
            idempotency_key=row.get("idempotency_key"),
            disagreement=_from_json(row.get("disagreement")),
            origin=row.get("origin"),
        )

    def create_task(
        self,
        *,
        target: str,
        handler: str,
        args: dict[str, Any],
        deadline: int | None = None,
        task_id: str | None = None,
        now: int | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        ts = now if now is not None else now_ms()
        tid = task_id or uuid.uuid4().hex
        with self._lock, self.db.atomic():
            self.db["tasks"].insert(
                {
                    "idempotency_key": idempotency_key,
                    "id": tid,
                    "target": target,
                    "handler": handler,
                    "args": to_json(args),
                    "state": "queued",
                    "created": ts,
                    "updated": ts,
                    "deadline": deadline,
                    "attempts": 0,
                }
            )
        task = self.get_task(tid)
        assert task is not None
        return task

    def get_task(self, task_id: str) -> Task | None:
        rows = self._rows("select * from tasks where id = ?", [task_id])
        return self._task(rows[0]) if rows else None

    def task_by_key(self, key: str) -> Task | None:
        rows = self._rows("select * from tasks where idempotency_key = ?", [key])
        return self._task(rows[0]) if rows else None

    def save_scheduled(self, rows: list[dict[str, Any]], *, now: int | None = None) -> None:
        """Insert or update scheduled tasks, in one transaction. Each row: ``id``, ``handler``, ``args``,
        ``state``, ``site``, ``node``, ``placement``, ``sched`` (the scheduler's record), and optionally
        ``result``, ``error``, ``deadline`` (ms), ``attempts``, ``idempotency_key``, ``disagreement``,
        ``started``, ``finished``, ``created``."""
        ts = now if now is not None else now_ms()
        with self._lock, self.db.atomic():
            for r in rows:
                self.db.conn.execute(
                    "insert into tasks (id, target, handler, args, state, result, error, created, updated, started, "
                    "finished, deadline, attempts, kind, site, node, placement, sched, idempotency_key, disagreement) "
                    "values (?, '', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'scheduled', ?, ?, ?, ?, ?, ?) "
                    # a finished task's row is final: a late write of an older snapshot never reopens it
                    "on conflict(id) do update set state = excluded.state, result = excluded.result, "
                    "error = excluded.error, updated = excluded.updated, "
                    "started = coalesce(tasks.started, excluded.started), finished = excluded.finished, "
                    "attempts = excluded.attempts, node = excluded.node, placement = excluded.placement, "
                    "sched = excluded.sched, disagreement = excluded.disagreement "
                    "where tasks.state not in ('succeeded', 'failed', 'cancelled', 'expired')",
                    [r["id"], r["handler"], to_json(r.get("args") or {}), r["state"], to_json(r.get("result")),
                     r.get("error"), r.get("created", ts), ts, r.get("started"), r.get("finished"),
                     r.get("deadline"), r.get("attempts", 0), r.get("site"), r.get("node"), r.get("placement"),
                     to_json(r["sched"]), r.get("idempotency_key"), to_json(r.get("disagreement"))])

    def fail_scheduled(self, task_id: str, error: str, *, now: int | None = None) -> None:
        """Mark an open scheduled task failed (one that cannot be restored after a restart)."""
        with self._lock, self.db.atomic():
            self.db.conn.execute("update tasks set state = 'failed', error = ?, updated = ?, finished = ? "
                                 "where id = ? and kind = 'scheduled' and state in ('queued', 'assigned', 'running')",
                                 [error, now or now_ms(), now or now_ms(), task_id])

    def open_scheduled(self) -> list[Task]:
        """Scheduled tasks not finished yet (to hand back to the scheduler after a restart), oldest first."""
        rows = self._rows("select * from tasks where kind = 'scheduled' and state in ('queued', 'assigned', "
                          "'running') order by created, id", [])
        return [self._task(r) for r in rows]

    @staticmethod
    def _transition(
        conn: sqlite3.Connection,
        task_id: str,
        state: str,
        *,
        result: Any,
        error: str | None,
        started: int | None,
        finished: int | None,
        target: str | None,
        now: int,
    ) -> bool:
        if state not in TASK_TRANSITIONS:
            raise ValueError(f"task state {state!r} is not one of {tuple(TASK_TRANSITIONS)}")
        sources = sorted(TASK_TRANSITIONS[state])
        marks = ",".join("?" for _ in sources)
        sql = (
            "update tasks set state = ?, result = coalesce(?, result), error = coalesce(?, error), "
            "started = coalesce(?, started), finished = coalesce(?, finished), updated = ? "
            # only direct tasks move this way (scheduled ones are the scheduler's, site ones their gateway's)
            f"where id = ? and state in ({marks}) and coalesce(kind, 'direct') = 'direct'"
        )
        params: list[Any] = [state, to_json(result), error, started, finished, now, task_id, *sources]
        if target is not None:
            sql += " and target = ?"
            params.append(target)
        return conn.execute(sql, params).rowcount > 0

    def update_task(
        self,
        task_id: str,
        state: str,
        *,
        result: Any = None,
        error: str | None = None,
        started: int | None = None,
        finished: int | None = None,
        target: str | None = None,
        now: int | None = None,
    ) -> tuple[Task | None, bool]:
        with self._lock:
            with self.db.atomic():
                moved = self._transition(
                    self.db.conn,
                    task_id,
                    state,
                    result=result,
                    error=error,
                    started=started,
                    finished=finished,
                    target=target,
                    now=now if now is not None else now_ms(),
                )
            return self.get_task(task_id), moved

    def mark_dispatched(self, task_id: str, *, now: int | None = None) -> None:
        with self._lock, self.db.atomic():
            self.db.conn.execute(
                "update tasks set dispatched = ?, attempts = attempts + 1 where id = ?",
                [now if now is not None else now_ms(), task_id],
            )

    def list_tasks(
        self, *, limit: int = 100, offset: int = 0, state: str | None = None, target: str | None = None,
        kind: str | None = None, light: int | None = None,
    ) -> Page[Task]:
        clauses, params = [], []
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if target is not None:
            clauses.append("target = ?")
            params.append(target)
        if kind is not None:  # rows made before the scheduler have no kind: they are direct
            clauses.append("coalesce(kind, 'direct') = ?")
            params.append(kind)
        where = " where " + " and ".join(clauses) if clauses else ""
        with self._lock:
            total = self._scalar(f"select count(*) from tasks{where}", params)
            if light is None:
                rows = self._rows(f"select * from tasks{where} order by created desc, id limit ? offset ?",
                                  [*params, limit, offset])
            else:  # (the big JSON is never read: SQLite measures it)
                rows = self._rows(
                    "select id, target, handler, case when length(args) > ? then null else args end as args, "
                    "length(args) as args_len, state, created, updated, "
                    "case when length(result) > ? then null else result end as result, length(result) as result_len, "
                    "error, started, finished, deadline, dispatched, attempts, kind, site, node, placement, sched, "
                    f"idempotency_key, disagreement, origin from tasks{where} order by created desc, id "
                    "limit ? offset ?", [light, light, *params, limit, offset])
        tasks = [self._task(r) for r in rows]
        if light is not None:
            for i, r in enumerate(rows):
                omitted = {k: r[f"{k}_len"] for k in ("args", "result") if (r[f"{k}_len"] or 0) > light}
                if omitted:
                    tasks[i] = replace(tasks[i], args=None if "args" in omitted else tasks[i].args,  # type: ignore
                                       result=None if "result" in omitted else tasks[i].result, omitted=omitted)
        return Page(tasks, int(total))

    def queued_tasks_for(self, node: str) -> list[Task]:
        rows = self._rows("select * from tasks where target = ? and state = 'queued' order by created, id", [node])
        return [self._task(r) for r in rows]

    #: a running task's result may legitimately arrive a little after its deadline (the device
    #: stops the handler at the deadline, then reports; clocks differ): wait this long first
    RUNNING_GRACE_MS = 30_000

    def overdue_tasks(self, now: int) -> list[Task]:
        rows = self._rows(
            "select * from tasks where coalesce(kind, 'direct') = 'direct' and deadline is not null and "
            "((state = 'queued' and deadline < ?) "
            "or (state = 'running' and deadline < ?)) order by created",
            [now, now - self.RUNNING_GRACE_MS],
        )
        return [self._task(r) for r in rows]

    # counters ----------------------------------------------------------------------------------

    def get_counter(self, name: str) -> int | None:
        value = self._scalar("select value from counters where name = ?", [name])
        return None if value is None else int(value)

    def set_counter(self, name: str, value: int) -> None:
        with self._lock, self.db.atomic():
            self.db["counters"].upsert({"name": name, "value": int(value)}, pk="name")


def import_registry(store: Store, path: str | Path) -> list[Node]:
    """Register every node listed in a registry file (``cwsnet.registry`` format, or a bare array).

    Each entry is upserted with its key versions and revocation, so importing the same file again
    is harmless, a rotation adds the new key (the old one stays accepted until its ``until``) and
    a revocation takes effect. Raises ``ConfigError`` naming the file and the entry at fault.
    """
    from cwsnet.registry import Registry

    return sync_registry(store, Registry.load(path), str(path))


def sync_registry(store: Store, reg: Any, where: str = "registry") -> list[Node]:
    """Upsert every entry of a :class:`cwsnet.registry.Registry` with a public key into ``store``."""
    from cwsnet.errors import ConfigError, CwsError

    nodes = []
    for e in reg.nodes.values():
        if not e.public_key:  # an operator's MQTT-only credential: nothing to seal to or open from
            continue
        try:
            nodes.append(store.upsert_node(
                e.id, site=e.site, role=e.role, public_key=e.public_key, kv=e.kv,
                previous_keys=[(p.kv, p.public_key, p.until) for p in e.previous_keys],
                revoked_at=(e.revoked_at or now_ms()) if not e.active else None,
            ))
        except (CwsError, ValueError) as exc:
            raise ConfigError(f"{where}: node {e.id!r}: {exc}") from None
    return nodes
