"""The durable stores' SQLite setup: WAL, ``synchronous=FULL`` and explicit transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils


def open_durable(path: Path, *, any_thread: bool = False) -> sqlite_utils.Database:
    """Open (creating its folder) a database whose every commit is on disk when it returns.

    Autocommit mode (``isolation_level=None``): writes that belong together go in
    :func:`transaction`. ``any_thread`` allows use from a thread other than the creator's (the
    gateway's one database thread); the caller still uses it from one thread at a time.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(sqlite3.connect(path, check_same_thread=not any_thread, isolation_level=None))
    db.enable_wal()
    db.execute("PRAGMA synchronous=FULL")
    return db


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; on an error, roll back (unless SQLite already did, as it
    may on a full disk or an I/O error) and re-raise."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
