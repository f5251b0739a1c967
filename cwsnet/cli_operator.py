"""``cwsnet operator add|list|role|passwd|remove|token|tokens|revoke-token``: REST API accounts.

The commands work on the cloud's database directly (``{data-dir}/cloud/cloud.db`` of a home lab,
or the ``database`` of a cloud config given with ``--config``), also while the cloud runs: a new
role, a revoked token or a removed account applies to the API's next request. Each change is
recorded in the audit log (actor ``cli:{user}``, method ``CLI``). A new API token is printed once
and never stored (only its SHA-256 is); passwords are read from stdin or a terminal prompt, never
from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cwsnet.errors import ConfigError

ROLES = ("viewer", "operator", "admin")


def _database(args: argparse.Namespace) -> Path:
    if args.cloud_config is not None:
        from cwsnet.config import CloudConfig, load_config

        return load_config(args.cloud_config, CloudConfig).database
    data_dir = Path(args.data_dir)
    if not (data_dir / "homelab.json").exists() and not (data_dir / "cloud" / "cloud.db").exists():
        raise ConfigError(f"{data_dir}: no home lab here; run `cwsnet init --data-dir {data_dir}` (or `cwsnet up`) "
                          "first, pass the right --data-dir, or --config CLOUD_YAML")
    return data_dir / "cloud" / "cloud.db"


def _open(args: argparse.Namespace) -> Any:
    from cloud.auth import AuthStore

    path = _database(args)
    try:
        return AuthStore(path)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot open the cloud database: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open the cloud database: {exc.strerror or exc}") from None


def _run(args: argparse.Namespace, action: Callable[[Any], int]) -> int:
    from cloud.auth import AuthError

    auth = _open(args)
    try:
        return action(auth)
    except AuthError as exc:
        raise ConfigError(str(exc)) from None
    except sqlite3.Error as exc:
        raise ConfigError(f"{auth.path}: {exc}") from None
    finally:
        auth.close()


def _audit(auth: Any, command: str, target: str, detail: str | None = None) -> None:
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid
        user = str(os.getuid())
    auth.record(actor=f"cli:{user}", method="CLI", path=f"cwsnet operator {command}", action=command,
                target=target, status=200, detail=detail)


def _read_password(args: argparse.Namespace, name: str) -> str:
    from cloud.auth import PASSWORD_MIN

    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass(f"new password for {name} (at least {PASSWORD_MIN} characters): ")
        if getpass.getpass("again: ") != first:
            raise ConfigError("the two passwords differ; nothing changed")
        return first
    if not args.password_stdin:
        raise ConfigError("no terminal to ask for the password: pass --password-stdin and write it to stdin")
    line = sys.stdin.readline() if sys.stdin is not None else ""
    password = line.rstrip("\r\n")
    if not password:
        raise ConfigError("--password-stdin: no password on stdin (one line expected)")
    return password


def _ttl(args: argparse.Namespace) -> float | None:
    days = args.expires_days
    if days is None:
        return None
    if not 0 < days <= 36500:
        raise ConfigError(f"--expires-days: expected days > 0 and at most 36500, got {days:g}")
    return days * 86400


def _when(ms: int | None) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def _print_token(token: Any, secret: str) -> None:
    until = f"expires {_when(token.expires)}" if token.expires is not None else "never expires"
    print(f"API token {token.name!r} (id {token.id}) for {token.account}, {until}; shown only now, keep it secret:")
    print(secret)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"--role: expected one of {', '.join(ROLES)}, got {role!r}")
    return role


# -- commands -----------------------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    from cloud.auth import check_username

    role = _check_role(args.role)
    try:
        check_username(args.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.password_stdin and (args.token_name is not None or args.expires_days is not None):
        raise ConfigError("--token-name and --expires-days go with a token: leave out --password-stdin, or make "
                          "a token later with `cwsnet operator token NAME`")
    password = _read_password(args, args.name) if args.password_stdin else None
    ttl = _ttl(args)

    def add(auth: Any) -> int:
        account = auth.create_account(args.name, role, password)
        _audit(auth, "add", account.username, f"role {role}")
        print(f"account {account.username} created (role {role})")
        if password is None:
            token, secret = auth.create_token(account.username, args.token_name or "cli", ttl=ttl)
            _audit(auth, "token", token.id, f"for {account.username}")
            _print_token(token, secret)
        else:
            print("  it logs in with its password (the console, or POST /api/v1/auth/login)")
        return 0

    return _run(args, add)


def cmd_list(args: argparse.Namespace) -> int:
    def show(auth: Any) -> int:
        accounts = auth.list_accounts(limit=100_000).items
        if args.json:
            print(json.dumps([{"username": a.username, "role": a.role, "created": a.created, "updated": a.updated,
                               "password_changed": a.password_changed, "tokens": a.tokens,
                               "last_used": a.last_used} for a in accounts], indent=2))
            return 0
        if not accounts:
            print("no accounts (the cloud makes 'admin' at its first start when admin_token_file is set)")
            return 0
        print(f"{'NAME':<24} {'ROLE':<9} {'TOKENS':>6}  {'LAST USED':<16}  CREATED")
        for a in accounts:
            print(f"{a.username:<24} {a.role:<9} {a.tokens:>6}  {_when(a.last_used):<16}  {_when(a.created)}")
        return 0

    return _run(args, show)


def cmd_role(args: argparse.Namespace) -> int:
    role = _check_role(args.role)

    def change(auth: Any) -> int:
        account = auth.set_role(args.name, role)
        _audit(auth, "role", account.username, f"role {role}")
        print(f"account {account.username} now has role {role}")
        return 0

    return _run(args, change)


def cmd_passwd(args: argparse.Namespace) -> int:
    def change(auth: Any) -> int:
        if auth.get_account(args.name) is None:
            raise ConfigError(f"account {args.name!r} does not exist")
        account = auth.set_password(args.name, _read_password(args, args.name))
        _audit(auth, "passwd", account.username)
        print(f"password of {account.username} set; its console sessions have ended (API tokens stay valid)")
        return 0

    return _run(args, change)


def cmd_remove(args: argparse.Namespace) -> int:
    def remove(auth: Any) -> int:
        name = auth.delete_account(args.name)
        _audit(auth, "remove", name)
        print(f"account {name} removed, with its tokens")
        return 0

    return _run(args, remove)


def cmd_token(args: argparse.Namespace) -> int:
    ttl = _ttl(args)

    def make(auth: Any) -> int:
        token, secret = auth.create_token(args.account, args.token_name, ttl=ttl)
        _audit(auth, "token", token.id, f"for {token.account}")
        _print_token(token, secret)
        return 0

    return _run(args, make)


def cmd_tokens(args: argparse.Namespace) -> int:
    def show(auth: Any) -> int:
        if args.account is not None and auth.get_account(args.account) is None:
            raise ConfigError(f"account {args.account!r} does not exist")
        now = auth.now_ms()
        tokens = auth.list_tokens(account=args.account, kind=None if args.sessions else "api",
                                  active_only=not args.all, limit=100_000).items
        if args.json:
            print(json.dumps([{"id": t.id, "account": t.account, "kind": t.kind, "name": t.name,
                               "created": t.created, "last_used": t.last_used, "expires": t.expires,
                               "revoked": t.revoked, "active": t.active(now)} for t in tokens], indent=2))
            return 0
        if not tokens:
            print("no tokens" + ("" if args.all else " in use (--all shows revoked and expired ones)"))
            return 0
        print(f"{'ID':<16}  {'ACCOUNT':<16} {'NAME':<20} {'KIND':<7} {'LAST USED':<16}  {'EXPIRES':<16}  STATE")
        for t in tokens:
            state = "active" if t.active(now) else "revoked" if t.revoked is not None else "expired"
            print(f"{t.id:<16}  {t.account:<16} {t.name:<20} {t.kind:<7} {_when(t.last_used):<16}  "
                  f"{_when(t.expires):<16}  {state}")
        return 0

    return _run(args, show)


def cmd_revoke_token(args: argparse.Namespace) -> int:
    def revoke(auth: Any) -> int:
        token, moved = auth.revoke_token(args.id)
        if moved:
            _audit(auth, "revoke-token", token.id, f"of {token.account}")
            print(f"token {token.id} ({token.name!r} of {token.account}) revoked")
        else:
            print(f"token {token.id} ({token.name!r} of {token.account}) was already revoked")
        return 0

    return _run(args, revoke)


# -- parser -------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    op = sub.add_parser(
        "operator", help="REST API and console accounts: add, list, role, passwd, remove, token, tokens, revoke-token",
        description="Manage the accounts and API tokens of the cloud's REST API and console, in the cloud's "
                    "database (also while the cloud runs). Roles: viewer (read everything), operator (also run "
                    "and cancel tasks), admin (also manage accounts and tokens, read the audit log).")
    osub = op.add_subparsers(dest="operator_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        where = sp.add_mutually_exclusive_group()
        where.add_argument("--data-dir", default="./cwsnet-data",
                           help="the home lab's data dir; its database is {data-dir}/cloud/cloud.db "
                                "(default: ./cwsnet-data)")
        where.add_argument("--config", dest="cloud_config", metavar="CLOUD_YAML", default=None,
                           help="a cloud config file: use its database instead")

    def password_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin (without it, a terminal prompts "
                             "for it)")

    def token_flags(sp: argparse.ArgumentParser, default_name: str | None) -> None:
        sp.add_argument("--name", dest="token_name", default=default_name, metavar="N",
                        help="the token's name, e.g. prometheus or ci (default: cli)")
        sp.add_argument("--expires-days", type=float, default=None, metavar="D",
                        help="the token expires after D days (default: never)")

    sp = osub.add_parser("add", help="create an account; prints an API token for it, once",
                         description="Create an account with a role. Prints a new API token for it, once (the "
                                     "cloud keeps only its SHA-256); with --password-stdin it gets the password "
                                     "read from stdin instead, and no token.")
    sp.add_argument("name", help="account name (1-64 of A-Z a-z 0-9 _ . @ -)")
    sp.add_argument("--role", required=True, help="viewer, operator or admin")
    password_flag(sp)
    token_flags(sp, None)
    common(sp)
    sp.set_defaults(func=cmd_add)

    sp = osub.add_parser("list", help="list accounts with their role and token use")
    sp.add_argument("--json", action="store_true", help="JSON output (no secrets)")
    common(sp)
    sp.set_defaults(func=cmd_list)

    sp = osub.add_parser("role", help="change an account's role (the last admin stays an admin)")
    sp.add_argument("name", help="account name")
    sp.add_argument("role", help="viewer, operator or admin")
    common(sp)
    sp.set_defaults(func=cmd_role)

    sp = osub.add_parser("passwd", help="set an account's password (its console sessions end)",
                         description="Set an account's password, read from stdin (--password-stdin) or a "
                                     "terminal prompt. Its console sessions end; its API tokens stay valid.")
    sp.add_argument("name", help="account name")
    password_flag(sp)
    common(sp)
    sp.set_defaults(func=cmd_passwd)

    sp = osub.add_parser("remove", help="delete an account and its tokens (not the last admin)")
    sp.add_argument("name", help="account name")
    common(sp)
    sp.set_defaults(func=cmd_remove)

    sp = osub.add_parser("token", help="make a new API token for an account; prints it once",
                         description="Make a new API token for an account and print it once; use it as "
                                     "'Authorization: Bearer TOKEN', or paste it into the console's login.")
    sp.add_argument("account", metavar="NAME", help="account name")
    token_flags(sp, "cli")
    common(sp)
    sp.set_defaults(func=cmd_token)

    sp = osub.add_parser("tokens", help="list API tokens (ids, names, last use; never the tokens)")
    sp.add_argument("account", metavar="NAME", nargs="?", default=None, help="only this account's tokens")
    sp.add_argument("--all", action="store_true", help="also revoked and expired tokens")
    sp.add_argument("--sessions", action="store_true", help="also console login sessions")
    sp.add_argument("--json", action="store_true", help="JSON output (no secrets)")
    common(sp)
    sp.set_defaults(func=cmd_tokens)

    sp = osub.add_parser("revoke-token", help="revoke a token by its id (see `cwsnet operator tokens`)")
    sp.add_argument("id", help="the token's id")
    common(sp)
    sp.set_defaults(func=cmd_revoke_token)
