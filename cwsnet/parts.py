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
create table if not exists parts (sender text not null, blob text not null, i integer not null, n integer not null,
    data blob not null, at real not null, primary key (sender, blob, i));
create index if not exists parts_at on parts (at);
create table if not exists parts_waiting (sender text not null, blob text not null, name text not null,
    message blob not null, at real not null, primary key (sender, blob, name));
"""


def create(conn: sqlite3.Connection) -> None:
    for statement in filter(str.strip, SCHEMA.split(";")):  # (executescript would commit the caller's transaction)
        conn.execute(statement)


def add(conn: sqlite3.Connection, sender: str, part: Part, now: float) -> list[tuple[str, dict[str, Any]]]:
    """Keep ``part``; if it was the last one a waiting message needed, those messages, as ``(name,
    message)`` (no longer waiting: the caller takes each with :func:`take`)."""
    conn.execute("insert or ignore into parts (sender, blob, i, n, data, at) values (?, ?, ?, ?, ?, ?)",
                 [sender, part.blob, part.i, part.n, part.data, now])
    _bound(conn, sender, part.blob)
    (have,) = conn.execute("select count(*) from parts where sender = ? and blob = ? and n = ?",
                           [sender, part.blob, part.n]).fetchone()
    if have < part.n:
        return []
    rows = conn.execute("select name, message from parts_waiting where sender = ? and blob = ?",
                        [sender, part.blob]).fetchall()
    conn.execute("delete from parts_waiting where sender = ? and blob = ?", [sender, part.blob])
    return [(name, cbor2.loads(msg)) for name, msg in rows]


def take(conn: sqlite3.Connection, sender: str, ref: Ref, what: str = "the value") -> dict[str, Any] | None:
    """The value, joined from ``sender``'s parts (then forgotten), or None while some are missing.
    :class:`PartError` (the parts are forgotten too) if they do not make the value the ref names."""
    rows = conn.execute("select i, data from parts where sender = ? and blob = ? and n = ? order by i",
                        [sender, ref.sha256, ref.parts]).fetchall()
    if len(rows) < ref.parts:
        return None
    waiting = conn.execute("select count(*) from parts_waiting where sender = ? and blob = ?",
                           [sender, ref.sha256]).fetchone()[0]
    if not waiting:  # (another message waiting for the same blob keeps the parts)
        conn.execute("delete from parts where sender = ? and blob = ?", [sender, ref.sha256])
    return join(ref, (d for _, d in rows), what)


def wait(conn: sqlite3.Connection, sender: str, ref: Ref, name: str, message: dict[str, Any], now: float) -> None:
    """Keep ``message`` (named ``name``, e.g. the task id and attempt) until ``ref``'s parts are all here."""
    conn.execute("insert or replace into parts_waiting (sender, blob, name, message, at) values (?, ?, ?, ?, ?)",
                 [sender, ref.sha256, name, cbor2.dumps(message), now])


def prune(conn: sqlite3.Connection, now: float, max_age: float = MAX_AGE) -> int:
    """Forget parts and waiting messages older than ``max_age``; how many parts went."""
    n = conn.execute("delete from parts where at < ?", [now - max_age]).rowcount
    conn.execute("delete from parts_waiting where at < ?", [now - max_age])
    return n


def _bound(conn: sqlite3.Connection, sender: str, keep: str) -> None:
    """At most SENDER_MAX_BYTES of ``sender``'s parts: its oldest other blobs go first."""
    (total,) = conn.execute("select coalesce(sum(length(data)), 0) from parts where sender = ?", [sender]).fetchone()
    while total > SENDER_MAX_BYTES:
        row = conn.execute("select blob, sum(length(data)) from parts where sender = ? and blob != ? "
                           "group by blob order by min(at) limit 1", [sender, keep]).fetchone()
        if row is None:
            return
        log.warning("parts of %s: over %d bytes kept; forgetting its oldest incomplete blob %s", sender,
                    SENDER_MAX_BYTES, row[0][:12])
        conn.execute("delete from parts where sender = ? and blob = ?", [sender, row[0]])
        conn.execute("delete from parts_waiting where sender = ? and blob = ?", [sender, row[0]])
        total -= row[1]


class PartStore:
    """:func:`add`/:func:`take`/:func:`wait` over a SQLite file of their own, one commit each (agents
    and gateways; thread-safe)."""

    def __init__(self, path: Path | str, *, max_age: float = MAX_AGE) -> None:
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute("pragma journal_mode=wal")
        self.conn.execute("pragma synchronous=full")
        self.max_age = max_age
        self._lock = threading.Lock()
        create(self.conn)

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

    def add(self, sender: str, part: Part, now: float) -> list[tuple[str, dict[str, Any]]]:
        return self._tx(add, sender, part, now)

    def take(self, sender: str, ref: Ref, what: str = "the value") -> dict[str, Any] | None:
        with self._lock:
            self.conn.execute("begin immediate")
            try:
                value = take(self.conn, sender, ref, what)
            except PartError:
                self.conn.execute("delete from parts where sender = ? and blob = ?", [sender, ref.sha256])
                self.conn.execute("commit")
                raise
            except BaseException:
                self.conn.execute("rollback")
                raise
            self.conn.execute("commit")
            return value

    def wait(self, sender: str, ref: Ref, name: str, message: dict[str, Any], now: float) -> None:
        self._tx(wait, sender, ref, name, message, now)

    def prune(self, now: float) -> int:
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
    if size <= INLINE_MAX:
        return None, []
    if not allowed:
        raise PartError(f"{what} is {size} bytes; at most {INLINE_MAX} fit in one message, and its receiver "
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
