"""Task inputs and results larger than one message travel in parts (docs/protocol.md §3, "Parts").

A value (a task's ``args`` or a handler's ``result``, a CBOR map) whose message would not fit in one
envelope is CBOR-encoded once and cut into :data:`PART_BYTES` slices. Each slice travels as its own
message of the task's kind (a ``task_cmd`` or ``task_result`` with a ``part`` map and no state); the
message that carries the task itself follows, with a ``ref`` in place of the value::

    part:  {"blob": sha256 hex of the encoded value, "i": 0..n-1, "n": n, "data": bytes}
    ref:   {"sha256": the same hex, "size": encoded bytes, "parts": n}

Every part is an ordinary sealed message, so it is stored, acknowledged and re-sent like any other
(§5): nothing here retransmits. The receiver keeps the parts (SQLite) per sender and blob; when the
message with the ref arrives and every part is there, it joins them, checks the size and the SHA-256,
decodes the map and goes on as if the value had come inline. A message whose parts are not all there
yet *waits* (it is stored with its parts) and is taken when its last part arrives: parts and the
message may arrive in any order (a retransmitted part can overtake nothing, but can be overtaken).

Blobs are content-addressed per sender: two tasks with the same large args share the parts. Parts
that never complete are forgotten after :data:`MAX_AGE`, and a sender's incomplete parts are bounded
(:data:`SENDER_MAX_BYTES`, its oldest blob goes first), so a peer cannot fill the receiver's disk.

The functions take a ``sqlite3.Connection`` and never commit: the cloud calls them inside its ingest
transaction. :class:`PartStore` is the small wrapper agents and gateways use (one commit per call).
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from cwsnet.envelope import MAX_BODY, storable_problem

log = logging.getLogger("cwsnet.parts")

#: bytes of encoded value per part (a part's message is about this plus 200 bytes, well under MAX_PAYLOAD)
PART_BYTES = 128 * 1024
#: the largest encoded value that travels in parts (16 MiB: 128 parts)
MAX_PARTED = 16 * 1024 * 1024
MAX_PARTS = -(-MAX_PARTED // PART_BYTES)
#: a value whose message body would be larger than this travels in parts (room for the other fields)
INLINE_MAX = MAX_BODY - 8 * 1024
#: incomplete parts are forgotten after this many seconds
MAX_AGE = 24 * 3600.0
#: a sender's incomplete parts take at most this many bytes at a receiver (its oldest blob goes first)
SENDER_MAX_BYTES = 4 * MAX_PARTED
#: the capability every node that takes parted inputs lists in its status (protocol §3)
CAPABILITY = "parts"
#: a held command in parts may take this long per part to reach its node (a slow link: 128 KiB/s)
SECONDS_PER_PART = 1.0

_HEX64 = re.compile(r"[0-9a-f]{64}")


class PartError(ValueError):
    """A part, a ref or a joined value that breaks the rules; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Ref:
    sha256: str
    size: int
    parts: int

    def body(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "parts": self.parts}

    @classmethod
    def parse(cls, v: Any, what: str = "ref") -> Ref:
        if not isinstance(v, dict):
            raise PartError(f"{what} must be a map {{sha256, size, parts}}")
        sha, size, n = v.get("sha256"), v.get("size"), v.get("parts")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise PartError(f"{what}.sha256 must be 64 lowercase hex digits")
        if not _uint(size) or not 0 < size <= MAX_PARTED:
            raise PartError(f"{what}.size must be 1..{MAX_PARTED} bytes")
        if not _uint(n) or n != -(-size // PART_BYTES):
            raise PartError(f"{what}.parts must be size / {PART_BYTES} rounded up ({-(-size // PART_BYTES)})"
                            if _uint(size) else f"{what}.parts must be an unsigned integer")
        return cls(sha, size, n)


@dataclass(frozen=True, slots=True)
class Part:
    blob: str
    i: int
    n: int
    data: bytes

    def body(self) -> dict[str, Any]:
        return {"blob": self.blob, "i": self.i, "n": self.n, "data": self.data}

    @classmethod
    def parse(cls, v: Any, what: str = "part") -> Part:
        if not isinstance(v, dict):
            raise PartError(f"{what} must be a map {{blob, i, n, data}}")
        blob, i, n, data = v.get("blob"), v.get("i"), v.get("n"), v.get("data")
        if not isinstance(blob, str) or not _HEX64.fullmatch(blob):
            raise PartError(f"{what}.blob must be 64 lowercase hex digits")
        if not _uint(n) or not 1 <= n <= MAX_PARTS:
            raise PartError(f"{what}.n must be 1..{MAX_PARTS}")
        if not _uint(i) or i >= n:
            raise PartError(f"{what}.i must be 0..n-1 ({n - 1})")
        if not isinstance(data, bytes) or not data or len(data) > PART_BYTES:
            raise PartError(f"{what}.data must be 1..{PART_BYTES} bytes")
        return cls(blob, i, n, data)


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def encoded_size(value: Any) -> int:
    return len(cbor2.dumps(value))


def split(value: dict[str, Any], what: str = "the value") -> tuple[Ref, list[Part]]:
    """Encode ``value`` and cut it into parts; :class:`PartError` if it is not storable or too big."""
    why = storable_problem(value, what)
    if why is not None:
        raise PartError(why)
    data = cbor2.dumps(value)
    if len(data) > MAX_PARTED:
        raise PartError(f"{what} is {len(data)} bytes; at most {MAX_PARTED} travel in parts")
    sha = hashlib.sha256(data).hexdigest()
    n = -(-len(data) // PART_BYTES)
    return Ref(sha, len(data), n), [Part(sha, i, n, data[i * PART_BYTES:(i + 1) * PART_BYTES]) for i in range(n)]


def join(ref: Ref, datas: Iterable[bytes], what: str = "the value") -> dict[str, Any]:
    """The value ``ref`` names, from its parts' data in order; :class:`PartError` if they do not make it."""
    data = b"".join(datas)
    if len(data) != ref.size:
        raise PartError(f"{what}: its parts make {len(data)} bytes, the ref says {ref.size}")
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise PartError(f"{what}: its parts do not match the ref's SHA-256")
    try:
        value = cbor2.loads(data)
    except Exception as exc:  # noqa: BLE001 - any refusal of the decoder
        raise PartError(f"{what}: its parts are not CBOR ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise PartError(f"{what} must be a map, its parts make a {type(value).__name__}")
    why = storable_problem(value, what)
    if why is not None:
        raise PartError(why)
    return value


# ---- the receiver's store (no commits: the caller's transaction) -------------------------------

SCHEMA = """
create table if not exists parts (sender text not null, name text not null, blob text not null, i integer not null,
    n integer not null, data blob not null, at real not null, primary key (sender, name, blob, i));
create index if not exists parts_at on parts (at);
create table if not exists parts_waiting (sender text not null, name text not null, blob text not null,
    message blob not null, at real not null, primary key (sender, name, blob));
"""


def name_of(task_id: Any, attempt: Any) -> str:
    """What a message's parts are kept under, with the sender: its task and attempt (``t1/2``, ``t1/None``).
    Parts are never shared between messages, so one message taking its value never takes another's."""
    return f"{task_id}/{attempt}"


def create(conn: sqlite3.Connection) -> None:
    for statement in filter(str.strip, SCHEMA.split(";")):  # (executescript would commit the caller's transaction)
        conn.execute(statement)


Dropped = list[tuple[str, str, dict[str, Any]]]  # (sender, name, message) of waiting messages given up on


def add(conn: sqlite3.Connection, sender: str, name: str, part: Part, now: float
        ) -> tuple[dict[str, Any] | None, Dropped]:
    """Keep ``part`` (a repeat only refreshes its time). Returns the message waiting for it if this was its
    last missing part (it stays waiting until :func:`take`), and the waiting messages of ``sender`` given up
    on to keep it under :data:`SENDER_MAX_BYTES` (the caller fails their tasks)."""
    conn.execute("insert into parts (sender, name, blob, i, n, data, at) values (?, ?, ?, ?, ?, ?, ?) "
                 "on conflict (sender, name, blob, i) do update set at = excluded.at",
                 [sender, name, part.blob, part.i, part.n, part.data, now])
    dropped = _bound(conn, sender, (name, part.blob))
    (have,) = conn.execute("select count(*) from parts where sender = ? and name = ? and blob = ? and n = ?",
                           [sender, name, part.blob, part.n]).fetchone()
    if have < part.n:
        return None, dropped
    row = conn.execute("select message from parts_waiting where sender = ? and name = ? and blob = ?",
                       [sender, name, part.blob]).fetchone()
    return (None if row is None else cbor2.loads(row[0])), dropped


def take(conn: sqlite3.Connection, sender: str, name: str, ref: Ref, what: str = "the value") -> dict[str, Any] | None:
    """The value, joined from the parts ``sender`` sent under ``name``, or None while some are missing. Taking
    it forgets the parts and the message waiting for them, in the caller's transaction. :class:`PartError`
    (the parts and the waiting message are forgotten too) if they do not make the value the ref names."""
    rows = conn.execute("select i, data from parts where sender = ? and name = ? and blob = ? and n = ? order by i",
                        [sender, name, ref.sha256, ref.parts]).fetchall()
    if len(rows) < ref.parts:
        return None
    forget(conn, sender, name)
    return join(ref, (d for _, d in rows), what)


def forget(conn: sqlite3.Connection, sender: str, name: str) -> None:
    conn.execute("delete from parts where sender = ? and name = ?", [sender, name])
    conn.execute("delete from parts_waiting where sender = ? and name = ?", [sender, name])


def wait(conn: sqlite3.Connection, sender: str, name: str, ref: Ref, message: dict[str, Any], now: float) -> None:
    """Keep ``message`` until ``ref``'s parts are all here (taken by the :func:`add` of its last part)."""
    conn.execute("insert or replace into parts_waiting (sender, name, blob, message, at) values (?, ?, ?, ?, ?)",
                 [sender, name, ref.sha256, cbor2.dumps(message), now])


def ready(conn: sqlite3.Connection) -> list[tuple[str, str, dict[str, Any]]]:
    """Waiting messages whose parts are all here (a crash came between the last part and taking it)."""
    rows = conn.execute(
        "select w.sender, w.name, w.message from parts_waiting w where (select count(*) from parts p where "
        "p.sender = w.sender and p.name = w.name and p.blob = w.blob) = (select max(n) from parts p where "
        "p.sender = w.sender and p.name = w.name and p.blob = w.blob)").fetchall()
    return [(sender, name, cbor2.loads(msg)) for sender, name, msg in rows]


def waiting_names(conn: sqlite3.Connection, sender: str, since: float) -> list[str]:
    """Names of ``sender``'s messages waiting for parts, one of which arrived since ``since``."""
    rows = conn.execute("select distinct w.name from parts_waiting w join parts p on p.sender = w.sender and "
                        "p.name = w.name and p.blob = w.blob where w.sender = ? and (p.at >= ? or w.at >= ?)",
                        [sender, since, since]).fetchall()
    return [r[0] for r in rows]


def prune(conn: sqlite3.Connection, now: float, max_age: float = MAX_AGE) -> Dropped:
    """Forget parts older than ``max_age`` and the messages waiting for them (returned: the caller fails
    their tasks), and waiting messages that old whose parts never started."""
    cut = now - max_age
    stale = conn.execute("select distinct sender, name from parts where at < ? union select sender, name from "
                         "parts_waiting where at < ? and not exists (select 1 from parts p where p.sender = "
                         "parts_waiting.sender and p.name = parts_waiting.name and p.at >= ?)",
                         [cut, cut, cut]).fetchall()
    dropped: Dropped = []
    for sender, name in stale:
        for (msg,) in conn.execute("select message from parts_waiting where sender = ? and name = ?",
                                   [sender, name]).fetchall():
            dropped.append((sender, name, cbor2.loads(msg)))
        forget(conn, sender, name)
    return dropped


def _bound(conn: sqlite3.Connection, sender: str, keep: tuple[str, str]) -> Dropped:
    """At most SENDER_MAX_BYTES of ``sender``'s parts and waiting messages: its least recently fed other
    names go first (their waiting messages are returned)."""
    (total,) = conn.execute(
        "select coalesce((select sum(length(data)) from parts where sender = ?), 0) + "
        "coalesce((select sum(length(message)) from parts_waiting where sender = ?), 0)", [sender, sender]).fetchone()
    dropped: Dropped = []
    while total > SENDER_MAX_BYTES:
        row = conn.execute(
            "select name, sum(length(data)), max(at) from parts where sender = ? and not (name = ? and blob = ?) "
            "group by name order by max(at) limit 1", [sender, *keep]).fetchone()
        if row is None:
            row = conn.execute("select name, 0, at from parts_waiting where sender = ? and name != ? order by at "
                               "limit 1", [sender, keep[0]]).fetchone()
            if row is None:
                return dropped
        name = row[0]
        log.warning("parts of %s: over %d bytes kept; forgetting those of %s (the least recently fed)", sender,
                    SENDER_MAX_BYTES, name)
        for (msg,) in conn.execute("select message from parts_waiting where sender = ? and name = ?",
                                   [sender, name]).fetchall():
            dropped.append((sender, name, cbor2.loads(msg)))
            total -= len(msg)
        total -= row[1] or 0
        forget(conn, sender, name)
    return dropped


class PartStore:
    """:func:`add`/:func:`take`/:func:`wait`... over a SQLite file of their own, one commit each (agents
    and gateways; thread-safe)."""

    def __init__(self, path: Path | str, *, max_age: float = MAX_AGE) -> None:
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute("pragma journal_mode=wal")
        self.conn.execute("pragma synchronous=full")
        self.max_age = max_age
        self._lock = threading.Lock()
        with self._lock:
            self.conn.execute("begin immediate")
            try:
                old = {r[1] for r in self.conn.execute("pragma table_info(parts)")}
                if old and "name" not in old:  # the first development layout: nothing of it is worth keeping
                    self.conn.execute("drop table parts")
                    self.conn.execute("drop table if exists parts_waiting")
                create(self.conn)
            except BaseException:
                self.conn.execute("rollback")
                raise
            self.conn.execute("commit")

    def _tx(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            self.conn.execute("begin immediate")
            try:
                out = fn(self.conn, *args)
            except BaseException:
                self.conn.execute("rollback")
                raise
            self.conn.execute("commit")
            return out

    def add(self, sender: str, name: str, part: Part, now: float) -> tuple[dict[str, Any] | None, Dropped]:
        return self._tx(add, sender, name, part, now)

    def take(self, sender: str, name: str, ref: Ref, what: str = "the value") -> dict[str, Any] | None:
        def go(conn: sqlite3.Connection) -> tuple[dict[str, Any] | None, PartError | None]:
            try:
                return take(conn, sender, name, ref, what), None
            except PartError as exc:  # the parts are forgotten (committed), then it is raised
                return None, exc

        value, error = self._tx(go)
        if error is not None:
            raise error
        return value

    def wait(self, sender: str, name: str, ref: Ref, message: dict[str, Any], now: float) -> None:
        self._tx(wait, sender, name, ref, message, now)

    def ready(self) -> list[tuple[str, str, dict[str, Any]]]:
        return self._tx(ready)

    def waiting_names(self, sender: str, since: float) -> list[str]:
        return self._tx(waiting_names, sender, since)

    def prune(self, now: float) -> Dropped:
        return self._tx(prune, now, self.max_age)

    def close(self) -> None:
        self.conn.close()


def plan(value: dict[str, Any], what: str, *, allowed: bool) -> tuple[Ref | None, list[Part]]:
    """How ``value`` travels: ``(None, [])`` inline (it fits one message), else ``(ref, parts)`` if the
    receiver takes parts (``allowed``). :class:`PartError` says why it cannot travel at all."""
    why = storable_problem(value, what)
    if why is not None:
        raise PartError(why)
    try:
        size = encoded_size(value)
    except Exception as exc:  # noqa: BLE001 - any refusal of the encoder
        raise PartError(f"{what} cannot be encoded ({type(exc).__name__}: {exc})") from None
    if size <= INLINE_MAX or (not allowed and size <= MAX_BODY - 1024):  # (room for the body's other fields)
        return None, []
    if not allowed:
        raise PartError(f"{what} is {size} bytes; at most {MAX_BODY - 1024} fit in one message, and its receiver "
                        "takes no parts")
    return split(value, what)


def command_messages(cmd: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``task_cmd`` bodies that carry ``cmd``: itself if it fits one message (:data:`INLINE_MAX`
    encoded); else a part message per part of its ``args``, then ``cmd`` with ``args_ref`` in place of
    ``args``, in that order. :class:`PartError` if its args cannot travel at all."""
    args = cmd.get("args")
    if not isinstance(args, dict) or encoded_size(cmd) <= INLINE_MAX:
        return [cmd]
    ref, ps = split(args, f"task {cmd.get('task_id')}'s args")
    head = {k: cmd[k] for k in ("task_id", "attempt") if cmd.get(k) is not None}
    return [head | {"part": p.body()} for p in ps] + \
        [{k: v for k, v in cmd.items() if k != "args"} | {"args": None, "args_ref": ref.body()}]
