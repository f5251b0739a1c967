"""Node identities and secret files.

An identity is a node id, its site, its role and its X25519 key pair. Secret material lives in
JSON files written atomically with mode 0600; nothing here ever logs a secret.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.public

from cwsnet.errors import ConfigError

ROLES = ("cloud", "gateway", "device", "app", "operator")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except Exception:
        raise ConfigError(f"{what}: not valid base64") from None


def public_key_from_b64(text: str, what: str) -> nacl.public.PublicKey:
    raw = unb64(text, what)
    if len(raw) != 32:
        raise ConfigError(f"{what}: a public key is 32 bytes, got {len(raw)}")
    return nacl.public.PublicKey(raw)


def write_file_atomic(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the new one, never half)
    and durably (fsync), with ``mode`` set before any byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_secret_file(path: Path, data: dict[str, Any] | str) -> None:
    """Write ``data`` (JSON or text) to ``path`` atomically with mode 0600."""
    text = data if isinstance(data, str) else json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_file_atomic(path, text, 0o600)


def file_signature(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """What changes when a file is replaced or rewritten (inode, mtime, size); None if missing.

    Daemons poll it to follow files other processes rewrite atomically (registry, bundle)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def new_token() -> str:
    """A random 256-bit credential (broker password, API token)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Identity:
    node: str
    site: str
    role: str
    secret_key: nacl.public.PrivateKey

    @property
    def public_key(self) -> nacl.public.PublicKey:
        return self.secret_key.public_key

    @property
    def public_b64(self) -> str:
        return b64(bytes(self.public_key))

    @classmethod
    def generate(cls, node: str, site: str, role: str) -> Identity:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        return cls(node, site, role, nacl.public.PrivateKey.generate())

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "site": self.site,
            "role": self.role,
            "secret_key": b64(bytes(self.secret_key)),
            "public_key": self.public_b64,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Identity:
        try:
            raw = unb64(d["secret_key"], f"{where}: secret_key")
            if len(raw) != 32:
                raise ConfigError(f"{where}: secret_key must be 32 bytes, got {len(raw)}")
            return cls(str(d["node"]), str(d["site"]), str(d["role"]), nacl.public.PrivateKey(raw))
        except KeyError as exc:
            raise ConfigError(f"{where}: missing field {exc.args[0]!r}") from None


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file; a ``ConfigError`` names the file (and line and column) at fault."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: {what} is not valid JSON: {exc.msg}") from None


def load_json_file(path: Path, what: str) -> dict[str, Any]:
    data = read_json_file(path, what)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object")
    return data
