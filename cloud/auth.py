"""Operator accounts, API tokens, login throttling and the audit log of the cloud's REST API.

Everything lives in the cloud's SQLite database (the file :class:`cloud.store.SqliteStore` uses),
in tables of its own (``auth_accounts``, ``auth_tokens``, ``auth_audit``) reached through a
connection of its own: WAL, ``synchronous=FULL``, one ``BEGIN IMMEDIATE`` transaction per change.
The cloud daemon and ``cwsnet operator`` (which works on the database directly, also while the
cloud runs) both use :class:`AuthStore`.

Roles are ordered: ``viewer`` (read everything) < ``operator`` (also create and cancel tasks) <
``admin`` (also manage accounts and tokens, read the audit log).

Secrets:

- Passwords are stored as argon2id hashes (libsodium, via PyNaCl). Hashing and verifying are slow
  on purpose: callers on an event loop run them in a worker thread.
- API tokens are random 256-bit values (:func:`cwsnet.identity.new_token`) stored only as their
  SHA-256 (a fast hash is as strong as a slow one for a random 256-bit secret). Each has a public
  ``id`` (shown in listings and in the audit log, used to revoke it); the token itself is shown
  once, when it is created.
- Nothing here logs a password or a token; the audit log records neither.

All timestamps are integer milliseconds since the Unix epoch.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id

from cloud.store import Page
from cwsnet.db import transaction
from cwsnet.errors import ConfigError, CwsError
from cwsnet.identity import new_token, write_secret_file

log = logging.getLogger("cwsnet.cloud.auth")

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
ROLE_RANK: dict[str, int] = {"viewer": 1, "operator": 2, "admin": 3}
TokenKind = Literal["api", "session"]

USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.@:-]{0,63}$"
PASSWORD_MIN = 8
PASSWORD_MAX = 1024
#: longest bearer token we bother to hash and look up (ours are 43 characters)
TOKEN_MAX = 512
#: how long a console session (``POST /api/v1/auth/login``) lasts
SESSION_TTL = 12 * 3600.0
#: a token's ``last_used`` is written at most this often (seconds): reads must not all write
LAST_USED_EVERY = 60.0
#: audit entries kept (the oldest are pruned beyond this)
AUDIT_KEEP = 200_000
BOOTSTRAP_ACCOUNT = "admin"
BOOTSTRAP_TOKEN = "bootstrap"

#: argon2id cost (libsodium's "interactive" limits: 2 passes over 64 MiB, about 50 ms here)
PWHASH_INTERACTIVE = (argon2id.OPSLIMIT_INTERACTIVE, argon2id.MEMLIMIT_INTERACTIVE)


class AuthError(CwsError, ValueError):
    """A refused account or token operation; the message names the object and what is wrong."""

    status = 422


class NotFound(AuthError):
    status = 404


class Conflict(AuthError):
    status = 409


class Invalid(AuthError):
    status = 422


# -- records ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    role: str
    created: int
    updated: int
    password_changed: int
    tokens: int = 0  # API tokens neither revoked nor expired
    last_used: int | None = None  # most recent use of any of its tokens


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    account: str
    kind: str
    name: str
    created: int
    last_used: int | None
    expires: int | None
    revoked: int | None
    parent: str | None = None  # a session made by logging in with an API token: that token's id

    def active(self, now: int) -> bool:
        return self.revoked is None and (self.expires is None or self.expires > now)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: an account, its role and the token that proved it."""

    username: str
    role: str
    token_id: str
    kind: str
    token_name: str
    expires: int | None

    def has(self, role: str) -> bool:
        return ROLE_RANK.get(self.role, 0) >= ROLE_RANK[role]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts: int
    actor: str
    role: str | None
    token_id: str | None
    method: str
    path: str
    action: str | None
    target: str | None
    status: int
    client: str | None
    detail: str | None


# -- validation --------------------------------------------------------------------------------------


def check_username(name: object) -> str:
    if not isinstance(name, str) or not re.match(USERNAME_PATTERN, name):
        raise Invalid(
            f"username {name!r} is not valid: 1-64 letters, digits, '_', '.', '@' or '-', starting with a "
            "letter or digit"
        )
    return name


def check_role(role: object) -> str:
    if role not in ROLES:
        raise Invalid(f"role {role!r} is not one of {', '.join(ROLES)}")
    return str(role)


def check_password(password: object) -> str:
    if not isinstance(password, str):
        raise Invalid("the password must be text")
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise Invalid(f"the password must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long (got {len(password)})")
    if "\x00" in password:
        raise Invalid("the password must not contain NUL characters")
    return password


def check_token_name(name: object) -> str:
    if not isinstance(name, str) or not re.match(TOKEN_NAME_PATTERN, name):
        raise Invalid(
            f"token name {name!r} is not valid: 1-64 letters, digits, spaces or '_.@:-', starting with a "
            "letter or digit"
        )
    return name


def token_hash(token: str) -> str:
    """The SHA-256 (hex) under which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _clip(text: str | None, limit: int) -> str | None:
    return None if text is None else text[:limit]


# -- the store ----------------------------------------------------------------------------------------


class AuthStore:
    """Accounts, tokens and the audit log in the cloud database. Thread-safe (one connection, a lock).

    ``pwhash`` is the argon2id ``(opslimit, memlimit)`` for new password hashes (verification uses
    whatever limits a stored hash names). ``clock`` gives seconds since the epoch.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        pwhash: tuple[int, int] = PWHASH_INTERACTIVE,
        busy_timeout_ms: int = 10_000,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.pwhash = pwhash
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=busy_timeout_ms / 1000
        )
        try:
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._create_schema()
        except BaseException:
            self._conn.close()
            raise
        self._touched: dict[str, float] = {}
        self._dummy_hash: bytes | None = None
        self._audit_writes = 0

    def _create_schema(self) -> None:
        with self._tx() as c:
            c.execute(
                """CREATE TABLE IF NOT EXISTS auth_accounts (
                    username TEXT PRIMARY KEY COLLATE NOCASE,
                    role TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
                    password_hash TEXT NOT NULL,
                    created INTEGER NOT NULL,
                    updated INTEGER NOT NULL,
                    password_changed INTEGER NOT NULL)"""
            )
            c.execute(
                """CREATE TABLE IF NOT EXISTS auth_tokens (
                    id TEXT PRIMARY KEY,
                    hash TEXT NOT NULL UNIQUE,
                    account TEXT NOT NULL COLLATE NOCASE,
                    kind TEXT NOT NULL CHECK (kind IN ('api', 'session')),
                    name TEXT NOT NULL,
                    created INTEGER NOT NULL,
                    last_used INTEGER,
                    expires INTEGER,
                    revoked INTEGER,
                    parent TEXT)"""
            )
            c.execute("CREATE INDEX IF NOT EXISTS auth_tokens_account ON auth_tokens (account, kind)")
            c.execute(
                """CREATE TABLE IF NOT EXISTS auth_audit (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    ts INTEGER NOT NULL,
                    actor TEXT NOT NULL,
                    role TEXT,
                    token_id TEXT,
                    method TEXT NOT NULL,
                    path TEXT NOT NULL,
                    action TEXT,
                    target TEXT,
                    status INTEGER NOT NULL,
                    client TEXT,
                    detail TEXT)"""
            )
            c.execute("CREATE INDEX IF NOT EXISTS auth_audit_ts ON auth_audit (ts)")
            c.execute("CREATE INDEX IF NOT EXISTS auth_audit_actor ON auth_audit (actor, id)")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn):
            yield self._conn

    def _rows(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._conn.execute(sql, params)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()

    def now_ms(self) -> int:
        """This store's clock, in ms since the epoch (what ``expires`` and ``last_used`` compare with)."""
        return int(self.clock() * 1000)

    _now = now_ms

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # passwords --------------------------------------------------------------------------------------

    def hash_password(self, password: str) -> str:
        """argon2id hash (slow: run it off the event loop)."""
        ops, mem = self.pwhash
        return argon2id.str(password.encode("utf-8"), opslimit=ops, memlimit=mem).decode("ascii")

    def verify_password(self, username: str, password: str) -> Account | None:
        """The account if ``password`` is its password, else None (slow: run it off the event loop).

        An unknown username costs as much as a known one (a dummy hash is verified), so the time a
        login takes does not tell whether an account exists.
        """
        account = self.get_account(username) if isinstance(username, str) else None
        stored = None
        if account is not None:
            rows = self._rows("SELECT password_hash FROM auth_accounts WHERE username = ?", (account.username,))
            stored = rows[0]["password_hash"].encode("ascii") if rows else None
        if stored is None:
            if self._dummy_hash is None:
                self._dummy_hash = self.hash_password(new_token()).encode("ascii")
            stored = self._dummy_hash
        try:
            ok = argon2id.verify(stored, password.encode("utf-8", "surrogatepass"))
        except (nacl.exceptions.InvalidkeyError, nacl.exceptions.RuntimeError, ValueError, TypeError):
            ok = False
        return account if ok and account is not None else None

    # accounts ---------------------------------------------------------------------------------------

    _ACCOUNT_SQL = """
        SELECT a.username, a.role, a.created, a.updated, a.password_changed,
               (SELECT count(*) FROM auth_tokens t WHERE t.account = a.username AND t.kind = 'api'
                  AND t.revoked IS NULL AND (t.expires IS NULL OR t.expires > :now)) AS tokens,
               (SELECT max(t.last_used) FROM auth_tokens t WHERE t.account = a.username) AS last_used
        FROM auth_accounts a"""

    @staticmethod
    def _account(row: sqlite3.Row) -> Account:
        return Account(
            username=row["username"], role=row["role"], created=row["created"], updated=row["updated"],
            password_changed=row["password_changed"], tokens=row["tokens"], last_used=row["last_used"],
        )

    def count_accounts(self, role: str | None = None) -> int:
        if role is None:
            return self._rows("SELECT count(*) AS n FROM auth_accounts")[0]["n"]
        return self._rows("SELECT count(*) AS n FROM auth_accounts WHERE role = ?", (role,))[0]["n"]

    def get_account(self, username: str) -> Account | None:
        rows = self._rows(self._ACCOUNT_SQL + " WHERE a.username = :name", {"now": self._now(), "name": username})
        return self._account(rows[0]) if rows else None

    def list_accounts(self, *, limit: int = 100, offset: int = 0) -> Page[Account]:
        rows = self._rows(
            self._ACCOUNT_SQL + " ORDER BY a.username LIMIT :limit OFFSET :offset",
            {"now": self._now(), "limit": limit, "offset": offset},
        )
        return Page([self._account(r) for r in rows], self.count_accounts())

    def create_account(self, username: str, role: str, password: str | None = None) -> Account:
        """Create an account. Without ``password`` it gets a random one nobody knows (it logs in
        with API tokens until someone sets a password). Raises :class:`Conflict` if it exists."""
        check_username(username)
        check_role(role)
        if password is not None:
            check_password(password)
        if self.get_account(username) is not None:  # before the slow hash; checked again below
            raise Conflict(f"account {username!r} already exists")
        hashed = self.hash_password(password if password is not None else new_token())
        now = self._now()
        with self._tx() as c:
            if c.execute("SELECT 1 FROM auth_accounts WHERE username = ?", (username,)).fetchone():
                raise Conflict(f"account {username!r} already exists")
            c.execute(
                "INSERT INTO auth_accounts (username, role, password_hash, created, updated, password_changed) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (username, role, hashed, now, now, now),
            )
        account = self.get_account(username)
        assert account is not None
        return account

    def _existing(self, c: sqlite3.Connection, username: str) -> tuple[str, str]:
        row = c.execute("SELECT username, role FROM auth_accounts WHERE username = ?", (username,)).fetchone()
        if row is None:
            raise NotFound(f"account {username!r} does not exist")
        return row[0], row[1]

    @staticmethod
    def _keep_an_admin(c: sqlite3.Connection, username: str, what: str) -> None:
        admins = c.execute("SELECT count(*) FROM auth_accounts WHERE role = 'admin'").fetchone()[0]
        if admins <= 1:
            raise Conflict(f"cannot {what} {username!r}: it is the last admin account (make another admin first)")

    def set_role(self, username: str, role: str) -> Account:
        check_role(role)
        with self._tx() as c:
            name, old = self._existing(c, username)
            if old == "admin" and role != "admin":
                self._keep_an_admin(c, name, "demote")
            c.execute("UPDATE auth_accounts SET role = ?, updated = ? WHERE username = ?", (role, self._now(), name))
        account = self.get_account(name)
        assert account is not None
        return account

    def set_password(self, username: str, password: str) -> Account:
        """Set a new password and end the account's console sessions (its API tokens stay valid)."""
        check_password(password)
        if self.get_account(username) is None:
            raise NotFound(f"account {username!r} does not exist")
        hashed = self.hash_password(password)
        now = self._now()
        with self._tx() as c:
            name, _ = self._existing(c, username)
            c.execute(
                "UPDATE auth_accounts SET password_hash = ?, updated = ?, password_changed = ? WHERE username = ?",
                (hashed, now, now, name),
            )
            c.execute(
                "UPDATE auth_tokens SET revoked = ? WHERE account = ? AND kind = 'session' AND revoked IS NULL",
                (now, name),
            )
        account = self.get_account(name)
        assert account is not None
        return account

    def delete_account(self, username: str) -> str:
        """Delete an account and all its tokens; returns its name. The last admin cannot go."""
        with self._tx() as c:
            name, role = self._existing(c, username)
            if role == "admin":
                self._keep_an_admin(c, name, "remove")
            c.execute("DELETE FROM auth_tokens WHERE account = ?", (name,))
            c.execute("DELETE FROM auth_accounts WHERE username = ?", (name,))
        return name

    # tokens ------------------------------------------------------------------------------------------

    @staticmethod
    def _token(row: sqlite3.Row) -> Token:
        return Token(
            id=row["id"], account=row["account"], kind=row["kind"], name=row["name"], created=row["created"],
            last_used=row["last_used"], expires=row["expires"], revoked=row["revoked"], parent=row["parent"],
        )

    def create_token(
        self,
        account: str,
        name: str,
        *,
        kind: TokenKind = "api",
        ttl: float | None = None,
        parent: str | None = None,
    ) -> tuple[Token, str]:
        """A new token for ``account``: its record and the token itself (shown once, never stored).

        ``ttl`` seconds until it expires (None: never). ``parent``: a session made from an API token
        ends when that token is revoked or expires.
        """
        check_token_name(name)
        if kind not in ("api", "session"):
            raise Invalid(f"token kind {kind!r} is not api or session")
        if ttl is not None and not (0 < ttl <= 100 * 365 * 86400):
            raise Invalid(f"a token's lifetime must be more than 0 and at most 100 years (got {ttl} s)")
        secret = new_token()
        token_id = secrets.token_hex(8)
        now = self._now()
        expires = None if ttl is None else now + int(ttl * 1000)
        with self._tx() as c:
            owner, _ = self._existing(c, account)
            if kind == "session":  # sessions that ended a day ago are of no further interest
                c.execute(
                    "DELETE FROM auth_tokens WHERE kind = 'session' AND coalesce(revoked, expires) < ?",
                    (now - 86_400_000,),
                )
            c.execute(
                "INSERT INTO auth_tokens (id, hash, account, kind, name, created, expires, parent) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (token_id, token_hash(secret), owner, kind, name, now, expires, parent),
            )
        token = self.get_token(token_id)
        assert token is not None
        return token, secret

    def get_token(self, token_id: str) -> Token | None:
        rows = self._rows("SELECT * FROM auth_tokens WHERE id = ?", (token_id,))
        return self._token(rows[0]) if rows else None

    def list_tokens(
        self,
        *,
        account: str | None = None,
        kind: str | None = "api",
        active_only: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[Token]:
        where, params = [], []
        if account is not None:
            where.append("account = ?")
            params.append(account)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if active_only:
            where.append("revoked IS NULL AND (expires IS NULL OR expires > ?)")
            params.append(self._now())
        sql_where = (" WHERE " + " AND ".join(where)) if where else ""
        total = self._rows(f"SELECT count(*) AS n FROM auth_tokens{sql_where}", tuple(params))[0]["n"]
        rows = self._rows(
            f"SELECT * FROM auth_tokens{sql_where} ORDER BY created DESC, id LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return Page([self._token(r) for r in rows], total)

    def revoke_token(self, token_id: str) -> tuple[Token, bool]:
        """Revoke a token (and so the console sessions made from it). Returns it and whether it was
        active until now. Raises :class:`NotFound` for an unknown id."""
        now = self._now()
        with self._tx() as c:
            row = c.execute("SELECT revoked FROM auth_tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"token {token_id!r} does not exist")
            moved = row[0] is None
            if moved:
                c.execute("UPDATE auth_tokens SET revoked = ? WHERE id = ?", (now, token_id))
        token = self.get_token(token_id)
        assert token is not None
        return token, moved

    _PRINCIPAL_SQL = """
        SELECT t.id, t.kind, t.name, t.expires, t.revoked, t.parent, a.username, a.role,
               p.id AS p_id, p.revoked AS p_revoked, p.expires AS p_expires
        FROM auth_tokens t
        JOIN auth_accounts a ON a.username = t.account
        LEFT JOIN auth_tokens p ON p.id = t.parent"""

    def _principal(self, row: sqlite3.Row, now: int) -> Principal | None:
        if row["revoked"] is not None or (row["expires"] is not None and row["expires"] <= now):
            return None
        expires = row["expires"]
        if row["parent"] is not None:
            if row["p_id"] is None or row["p_revoked"] is not None or (row["p_expires"] is not None and row["p_expires"] <= now):
                return None
            if row["p_expires"] is not None:
                expires = row["p_expires"] if expires is None else min(expires, row["p_expires"])
        return Principal(
            username=row["username"], role=row["role"], token_id=row["id"], kind=row["kind"],
            token_name=row["name"], expires=expires,
        )

    def authenticate(self, token: str | None) -> Principal | None:
        """Who ``token`` belongs to, if it is a live token of an existing account; else None.

        Records the token's ``last_used`` (at most once a minute per token).
        """
        if not token or len(token) > TOKEN_MAX:
            return None
        now = self._now()
        rows = self._rows(self._PRINCIPAL_SQL + " WHERE t.hash = ?", (token_hash(token),))
        principal = self._principal(rows[0], now) if rows else None
        if principal is not None:
            self._touch(principal.token_id, now)
        return principal

    def token_active(self, token_id: str) -> bool:
        """Whether the token (and its account, and the API token a session came from) still stands."""
        rows = self._rows(self._PRINCIPAL_SQL + " WHERE t.id = ?", (token_id,))
        return bool(rows) and self._principal(rows[0], self._now()) is not None

    def _touch(self, token_id: str, now: int) -> None:
        mono = time.monotonic()
        last = self._touched.get(token_id)
        if last is not None and mono - last < LAST_USED_EVERY:
            return
        self._touched[token_id] = mono
        if len(self._touched) > 10_000:
            self._touched.clear()
        try:
            with self._tx() as c:
                c.execute("UPDATE auth_tokens SET last_used = ? WHERE id = ?", (now, token_id))
        except sqlite3.Error as exc:  # bookkeeping only: never refuse a request for it
            log.warning("recording the use of token %s failed: %s", token_id, exc)

    # audit -------------------------------------------------------------------------------------------

    def record(
        self,
        *,
        actor: str,
        method: str,
        path: str,
        status: int,
        role: str | None = None,
        token_id: str | None = None,
        action: str | None = None,
        target: str | None = None,
        client: str | None = None,
        detail: str | None = None,
        ts: int | None = None,
    ) -> None:
        """Append one audit entry (committed when this returns). Callers pass no secrets."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO auth_audit (ts, actor, role, token_id, method, path, action, target, status, client, "
                "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self._now() if ts is None else ts, _clip(actor, 64), role, token_id, _clip(method, 16),
                    _clip(path, 512), _clip(action, 64), _clip(target, 128), int(status), _clip(client, 64),
                    _clip(detail, 200),
                ),
            )
        self._audit_writes += 1
        if self._audit_writes % 1000 == 0:
            self.prune_audit(AUDIT_KEEP)

    def list_audit(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        actor: str | None = None,
        since: int | None = None,
        status_min: int | None = None,
    ) -> Page[AuditEntry]:
        where, params = [], []
        if actor is not None:
            where.append("actor = ?")
            params.append(actor)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if status_min is not None:
            where.append("status >= ?")
            params.append(status_min)
        sql_where = (" WHERE " + " AND ".join(where)) if where else ""
        total = self._rows(f"SELECT count(*) AS n FROM auth_audit{sql_where}", tuple(params))[0]["n"]
        rows = self._rows(
            f"SELECT * FROM auth_audit{sql_where} ORDER BY id DESC LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        return Page([AuditEntry(**dict(r)) for r in rows], total)

    def prune_audit(self, keep: int) -> int:
        with self._tx() as c:
            cur = c.execute(
                "DELETE FROM auth_audit WHERE id <= (SELECT id FROM auth_audit ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep,),
            )
            return cur.rowcount

    # first start -------------------------------------------------------------------------------------

    def bootstrap(self, token_file: Path | None) -> bool:
        """On a database without accounts, create ``admin`` (role admin, a random password nobody
        knows) and its API token ``bootstrap``, written to ``token_file`` (mode 0600, one line).

        Does nothing when any account exists (the file is kept as it is). Without ``token_file``
        nothing is created: an operator makes the first account with ``cwsnet operator add``.
        Returns True if it created the account.
        """
        if self.count_accounts() > 0:
            return False
        if token_file is None:
            log.warning(
                "no operator accounts yet and no admin_token_file configured: the REST API refuses every "
                "request until one is made with `cwsnet operator add NAME --role admin --config CLOUD_YAML`"
            )
            return False
        hashed = self.hash_password(new_token())  # a password nobody knows: the admin uses the token
        secret = new_token()
        token_id = secrets.token_hex(8)
        now = self._now()
        with self._tx() as c:
            if c.execute("SELECT count(*) FROM auth_accounts").fetchone()[0] > 0:
                return False  # another process got there first
            c.execute(
                "INSERT INTO auth_accounts (username, role, password_hash, created, updated, password_changed) "
                "VALUES (?, 'admin', ?, ?, ?, ?)",
                (BOOTSTRAP_ACCOUNT, hashed, now, now, now),
            )
            c.execute(
                "INSERT INTO auth_tokens (id, hash, account, kind, name, created) VALUES (?, ?, ?, 'api', ?, ?)",
                (token_id, token_hash(secret), BOOTSTRAP_ACCOUNT, BOOTSTRAP_TOKEN, now),
            )
            # written before the commit: if it cannot be written, nothing is created and the next start retries
            try:
                write_secret_file(token_file, secret + "\n")
            except OSError as exc:
                raise ConfigError(
                    f"admin_token_file: cannot write the first admin's API token to {token_file}: "
                    f"{exc.strerror or exc}"
                ) from None
        log.info(
            "created operator account %r (role admin) and its API token %r (id %s), written to %s (mode 0600)",
            BOOTSTRAP_ACCOUNT, BOOTSTRAP_TOKEN, token_id, token_file,
        )
        return True


# -- login throttling ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """Failed logins per (username, client address) and per address, with exponential lockouts.

    The first ``free`` failures of a key cost nothing (typos happen); each further one locks the
    key for ``base_delay * 2**(n - free)`` seconds, at most ``max_delay``. An address gets
    ``per_address`` failures across all usernames before its own lockout starts. A successful login
    clears its (username, address) key; a key forgets its failures ``forget_after`` seconds after
    the last one. In memory: a restart of the cloud forgets (the argon2id cost still bounds the rate).
    """

    def __init__(
        self,
        *,
        free: int = 5,
        per_address: int = 20,
        base_delay: float = 30.0,
        max_delay: float = 900.0,
        forget_after: float = 3600.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.per_address = per_address
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _user_key(username: str, address: str) -> tuple[str, str]:
        return (username.casefold(), address)

    @staticmethod
    def _addr_key(address: str) -> tuple[str, str]:
        return ("\x00any", address)

    def _delay(self, failures: int, free: int) -> float:
        if failures < free:
            return 0.0
        return min(self.base_delay * 2 ** min(failures - free, 32), self.max_delay)

    def _wait(self, key: tuple[str, str], free: int, now: float) -> float:
        entry = self._keys.get(key)
        if entry is None:
            return 0.0
        if now - entry.last > self.forget_after:
            del self._keys[key]
            return 0.0
        return max(0.0, entry.last + self._delay(entry.count, free) - now)

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until this username may try again from this address (0: now)."""
        now = self.clock()
        with self._lock:
            return max(
                self._wait(self._user_key(username, address), self.free, now),
                self._wait(self._addr_key(address), self.per_address, now),
            )

    def begin(self, username: str, address: str) -> float:
        """Start a login attempt: the seconds to wait if this username or address is locked out (the
        attempt must be refused), else 0, and the attempt is counted as a failure at once, so many
        concurrent attempts cannot all get past the check before any of them has failed;
        :meth:`succeeded` takes it back."""
        now = self.clock()
        with self._lock:
            wait = max(self._wait(self._user_key(username, address), self.free, now),
                       self._wait(self._addr_key(address), self.per_address, now))
            if wait > 0:
                return wait
            self._count(username, address, now)
            return 0.0

    def failed(self, username: str, address: str) -> None:
        with self._lock:
            self._count(username, address, self.clock())

    def _count(self, username: str, address: str, now: float) -> None:
        """Count one failure (the caller holds the lock)."""
        for key in (self._user_key(username, address), self._addr_key(address)):
            entry = self._keys.get(key)
            if entry is None or now - entry.last > self.forget_after:
                entry = _Failures(0, now)
            entry.count += 1
            entry.last = now
            self._keys[key] = entry
            self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def succeeded(self, username: str, address: str) -> None:
        """A login that worked: forget the username's failures here, and take back the failure
        :meth:`begin` counted for the address."""
        with self._lock:
            self._keys.pop(self._user_key(username, address), None)
            entry = self._keys.get(self._addr_key(address))
            if entry is not None and entry.count > 0:
                entry.count -= 1
