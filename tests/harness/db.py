"""Reading the daemons' SQLite databases from a test, read-only, while they run (WAL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def ro(path: Path, timeout: float = 10.0) -> sqlite3.Connection:
    """A read-only connection to a live SQLite (WAL) database another process is writing."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = ro(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()
