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


def write_secret_file(path: Path, data: dict[str, Any] | str) -> None:
    """Write ``data`` (JSON or text) to ``path`` atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: {what} is not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object")
    return data


def read_registry_file(path: str | Path) -> list[dict[str, str]]:
    """Read a registry file (as written by ``cwsnet init``): a JSON array of ``{"id", "site",
    "role", "public_key"}`` objects. Raises ``ConfigError`` naming the file and the entry at fault."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: registry file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the registry file: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}:{exc.lineno}:{exc.colno}: registry is not valid JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise ConfigError(f"{p}: the registry must be a JSON array of nodes")
    for i, entry in enumerate(data):
        where = f"{p}: entry {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be an object with id, site, role and public_key")
        missing = [k for k in ("id", "site", "role", "public_key") if not isinstance(entry.get(k), str)]
        if missing:
            raise ConfigError(f"{where}: missing or non-text field(s) {', '.join(missing)}")
    return data
