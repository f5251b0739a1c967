"""The node registry: who exists, their public keys (with versions), their status and grants.

One JSON file (``{data-dir}/registry.json``) is the source of truth on the cloud's host; the
``cwsnet device`` commands edit it under a lock, the cloud imports every change within a second
and pushes each site's part to that site's gateway (sealed, as the cloud). Every broker's users
and topic ACLs are *derived* from it and the ``access`` policies (:func:`cloud_broker_users`,
:func:`site_broker_users`), so revoking a node is one edit that every tier enforces. Nothing
secret is stored here: public keys and SHA-256 hashes of random 256-bit MQTT tokens only.

File format (``docs/security.md`` documents it)::

    {"format": 2, "rev": 7, "instance": "<random hex>", "nodes": [
      {"id": "dev-1", "site": "home", "role": "device", "public_key": "<b64>", "kv": 2,
       "status": "active" | "revoked", "created": <ms>, "revoked_at": <ms>?,
       "previous_keys": [{"kv": 1, "public_key": "<b64>", "until": <ms>}],
       "mqtt_token_sha256": "<hex>"?, "gateway": "gw-home"?, "subscribe": ["..."]?}]}

A bare JSON array of ``{id, site, role, public_key}`` (format 1) is still read.

Key versions: a node seals with key ``kv`` and says so in the clear header (``kv``). After
``cwsnet device rotate`` the old key stays in ``previous_keys`` until ``until``, so messages it
sealed before the rotation (in its outbox, in a gateway's outbox, in flight) still open; after
that, and at once for a revoked node, nothing sealed with it is accepted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nacl.public

from cwsnet.errors import ConfigError, EnvelopeError
from cwsnet.identity import ROLES, public_key_from_b64, read_json_file, write_secret_file
from cwsnet.topics import check_name

if TYPE_CHECKING:
    from cwsnet.policy.access import AccessEngine

log = logging.getLogger(__name__)

FORMAT = 2
STATUSES = ("active", "revoked")
#: how long a rotated-out key still opens messages it sealed before the rotation (default)
DEFAULT_GRACE = 24 * 3600.0


class RevokedSender(EnvelopeError):
    """The sender's identity was revoked: nothing it sends is accepted."""

    reason = "revoked"


class UnknownKeyVersion(EnvelopeError):
    """The sender sealed with a key version newer than the registry knows: a rotation this receiver
    has not heard of yet. Like an unknown sender, the message is not refused for good (no notice):
    it is retried, and opens once the registry catches up."""

    reason = "unknown_key"


class RetiredKey(EnvelopeError):
    """The sender sealed with a rotated-out key whose grace period has ended (or was never ours)."""

    reason = "retired_key"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class PastKey:
    kv: int
    public_key: str
    until: int  # ms since the epoch: accepted for opening until then

    def to_dict(self) -> dict[str, Any]:
        return {"kv": self.kv, "public_key": self.public_key, "until": self.until}


@dataclass(frozen=True)
class Entry:
    id: str
    site: str
    role: str
    public_key: str
    kv: int = 1
    status: str = "active"
    created: int = 0
    revoked_at: int | None = None
    previous_keys: tuple[PastKey, ...] = ()
    mqtt_token_sha256: str | None = None
    gateway: str | None = None
    subscribe: tuple[str, ...] = ()
    #: an app that gets its data unsealed (JSON), on loopback only (for local tools that cannot open
    #: envelopes); its broker user may log in only on a loopback listener
    plaintext: bool = False

    @property
    def active(self) -> bool:
        return self.status == "active"

    def keys(self, now: int | None = None) -> dict[int, str]:
        """Key versions that open messages now: ``{kv: public key b64}``; empty when revoked."""
        if not self.active:
            return {}
        t = now_ms() if now is None else now
        keys = {p.kv: p.public_key for p in self.previous_keys if p.until > t}
        keys[self.kv] = self.public_key
        return keys

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "site": self.site, "role": self.role, "public_key": self.public_key,
                             "kv": self.kv, "status": self.status, "created": self.created}
        if self.revoked_at is not None:
            d["revoked_at"] = self.revoked_at
        if self.previous_keys:
            d["previous_keys"] = [p.to_dict() for p in self.previous_keys]
        if self.mqtt_token_sha256 is not None:
            d["mqtt_token_sha256"] = self.mqtt_token_sha256
        if self.gateway is not None:
            d["gateway"] = self.gateway
        if self.subscribe:
            d["subscribe"] = list(self.subscribe)
        if self.plaintext:
            d["plaintext"] = True
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Entry:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be an object with id, site, role and public_key")
        missing = [k for k in ("id", "site", "role", "public_key") if not isinstance(d.get(k), str)]
        if missing:
            raise ConfigError(f"{where}: missing or non-text field(s) {', '.join(missing)}")
        unknown = set(d) - {"id", "site", "role", "public_key", "kv", "status", "created", "revoked_at",
                            "previous_keys", "mqtt_token_sha256", "gateway", "subscribe", "plaintext"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            check_name(d["id"], "node id")
            check_name(d["site"], "site")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if d["role"] not in ROLES:
            raise ConfigError(f"{where}: role {d['role']!r} is not one of {', '.join(ROLES)}")
        if d["public_key"] or d["role"] != "operator":  # an operator may hold only an MQTT credential
            public_key_from_b64(d["public_key"], f"{where} ({d['id']}): public_key")

        def integer(key: str, default: int | None, minimum: int = 0) -> int | None:
            v = d.get(key, default)
            if v is None:
                return None
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ConfigError(f"{where} ({d['id']}): {key} must be an integer >= {minimum} (got {v!r})")
            return v

        kv = integer("kv", 1, 1)
        status = d.get("status", "active")
        if status not in STATUSES:
            raise ConfigError(f"{where} ({d['id']}): status must be one of {', '.join(STATUSES)} (got {status!r})")
        prev = []
        raw_prev = d.get("previous_keys", [])
        if not isinstance(raw_prev, list):
            raise ConfigError(f"{where} ({d['id']}): previous_keys must be a list")
        for j, p in enumerate(raw_prev):
            pw = f"{where} ({d['id']}): previous_keys[{j}]"
            if not isinstance(p, dict) or not isinstance(p.get("kv"), int) or not isinstance(p.get("until"), int) \
                    or not isinstance(p.get("public_key"), str):
                raise ConfigError(f"{pw}: must be {{kv: int, public_key: base64, until: ms}}")
            public_key_from_b64(p["public_key"], f"{pw}: public_key")
            prev.append(PastKey(p["kv"], p["public_key"], p["until"]))
        token = d.get("mqtt_token_sha256")
        if token is not None and (not isinstance(token, str) or len(token) != 64
                                  or any(c not in "0123456789abcdef" for c in token)):
            raise ConfigError(f"{where} ({d['id']}): mqtt_token_sha256 must be 64 lower-case hex digits")
        gateway = d.get("gateway")
        if gateway is not None:
            try:
                check_name(gateway, "gateway")
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where} ({d['id']}): {exc}") from None
        sub = d.get("subscribe", [])
        if not isinstance(sub, list) or not all(isinstance(s, str) and s for s in sub):
            raise ConfigError(f"{where} ({d['id']}): subscribe must be a list of topic filters")
        plaintext = d.get("plaintext", False)
        if not isinstance(plaintext, bool) or (plaintext and d["role"] != "app"):
            raise ConfigError(f"{where} ({d['id']}): plaintext must be true or false, and only an app may have it")
        return cls(plaintext=plaintext, id=d["id"], site=d["site"], role=d["role"], public_key=d["public_key"],
                   kv=kv or 1,
                   status=status, created=integer("created", 0) or 0, revoked_at=integer("revoked_at", None),
                   previous_keys=tuple(prev), mqtt_token_sha256=token, gateway=gateway, subscribe=tuple(sub))


@dataclass
class Registry:
    nodes: dict[str, Entry] = field(default_factory=dict)
    rev: int = 0
    #: True unless read from a bare array (format 1): then brokers' users are not derived from it
    managed: bool = True
    #: random id of this registry, made at its first save: ``rev``s compare only within one instance
    #: (a gateway takes a registry of another instance, e.g. a re-created one, whatever its ``rev``)
    instance: str = ""

    def newer_than(self, other: Registry) -> bool:
        return self.instance != other.instance or self.rev > other.rev

    # -- reading and writing -----------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Any, where: str) -> Registry:
        managed, instance = True, ""
        if isinstance(data, list):  # format 1: a bare array
            raw, rev, managed = data, 0, False
        elif isinstance(data, dict):
            if data.get("format") != FORMAT:
                raise ConfigError(f"{where}: registry format {data.get('format')!r} is not {FORMAT}")
            raw, rev, instance = data.get("nodes"), data.get("rev", 0), data.get("instance", "")
            if not isinstance(instance, str):
                raise ConfigError(f"{where}: 'instance' must be text")
            if not isinstance(raw, list):
                raise ConfigError(f"{where}: 'nodes' must be a JSON array")
            if not isinstance(rev, int) or isinstance(rev, bool) or rev < 0:
                raise ConfigError(f"{where}: 'rev' must be a non-negative integer")
        else:
            raise ConfigError(f"{where}: the registry must be a JSON object {{format, rev, nodes}} or an array")
        reg = cls(rev=rev, managed=managed, instance=instance)
        for i, d in enumerate(raw):
            e = Entry.from_dict(d, f"{where}: entry {i}")
            if e.id in reg.nodes:
                raise ConfigError(f"{where}: entry {i}: node {e.id!r} is listed twice")
            reg.nodes[e.id] = e
        return reg

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "rev": self.rev, "instance": self.instance,
                "nodes": [self.nodes[n].to_dict() for n in sorted(self.nodes)]}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Registry:
        p = Path(path)
        return cls.from_json(read_json_file(p, "registry"), str(p))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a reader never sees half a file); bumps ``rev``."""
        self.rev += 1
        self.instance = self.instance or secrets.token_hex(8)
        write_secret_file(Path(path), self.to_json())

    # -- queries ---------------------------------------------------------------------------

    def get(self, node: str) -> Entry | None:
        return self.nodes.get(node)

    def require(self, node: str) -> Entry:
        e = self.nodes.get(node)
        if e is None:
            raise ConfigError(f"no node named {node!r} in the registry")
        return e

    def active(self, *, site: str | None = None, role: str | None = None) -> list[Entry]:
        return [e for _, e in sorted(self.nodes.items()) if e.active and (site is None or e.site == site)
                and (role is None or e.role == role)]

    def site_view(self, site: str) -> Registry:
        """What a site's gateway needs: its site's nodes and every operator (debugging users)."""
        return Registry({n: e for n, e in self.nodes.items() if e.site == site or e.role == "operator"}, self.rev,
                        self.managed, self.instance)

    # -- changes (the CLI's; each returns the new entry) -------------------------------------

    def add(self, entry: Entry) -> Entry:
        if entry.id in self.nodes:
            old = self.nodes[entry.id]
            raise ConfigError(f"node {entry.id!r} already exists ({old.role} of site {old.site}, {old.status}); "
                              "use `cwsnet device rotate` for new keys")
        self.nodes[entry.id] = entry
        return entry

    def put(self, entry: Entry) -> Entry:
        self.nodes[entry.id] = entry
        return entry

    def rotate(self, node: str, new_public_key: str, *, grace: float = DEFAULT_GRACE, now: int | None = None,
               mqtt_token_sha256: str | None = None) -> Entry:
        e = self.require(node)
        if not e.active:
            raise ConfigError(f"node {node!r} is revoked; a revoked identity cannot be rotated (add a new one)")
        t = now_ms() if now is None else now
        until = t + int(grace * 1000)
        kept = tuple(p for p in e.previous_keys if p.until > t)
        new = replace(e, public_key=new_public_key, kv=e.kv + 1,
                      previous_keys=(*kept, PastKey(e.kv, e.public_key, until)),
                      mqtt_token_sha256=mqtt_token_sha256 or e.mqtt_token_sha256)
        self.nodes[node] = new
        return new

    def revoke(self, node: str, *, now: int | None = None) -> Entry:
        e = self.require(node)
        if not e.active:
            return e
        new = replace(e, status="revoked", revoked_at=now_ms() if now is None else now, previous_keys=())
        self.nodes[node] = new
        return new


@contextlib.contextmanager
def editing(path: str | os.PathLike[str], *, create: bool = False) -> Iterator[Registry]:
    """Load the registry under an exclusive lock, yield it, and save it if it changed.

    Concurrent ``cwsnet device`` commands serialise on ``{path}.lock``; readers (the daemons) never
    block, because the file is replaced atomically.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_name(p.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reg = Registry.load(p) if p.exists() or not create else Registry()
        before = reg.to_json()
        yield reg
        if reg.to_json() != before:
            reg.save(p)


# -- key lookup for receivers ----------------------------------------------------------------


class KeyRing:
    """Versioned public keys of the nodes a receiver accepts, with revocation.

    ``lookup(node, kv)`` is what :func:`cwsnet.envelope.open_envelope` calls (``versioned_key``):
    it returns the key, None for an unknown node, or raises :class:`RevokedSender` /
    :class:`UnknownKeyVersion`. A missing ``kv`` means the node's current key.
    """

    def __init__(self, entries: dict[str, Entry] | None = None, clock: Any = now_ms) -> None:
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._cache: dict[str, nacl.public.PublicKey] = {}
        if entries:
            self.update(entries)

    def update(self, entries: dict[str, Entry]) -> None:
        self._entries = dict(entries)

    def entry(self, node: str) -> Entry | None:
        return self._entries.get(node)

    def _key(self, b64text: str, node: str) -> nacl.public.PublicKey:
        k = self._cache.get(b64text)
        if k is None:
            k = self._cache[b64text] = public_key_from_b64(b64text, f"registry: node {node!r} public_key")
            if len(self._cache) > 65536:
                self._cache.clear()
        return k

    def current(self, node: str) -> nacl.public.PublicKey | None:
        """The key to seal *to* ``node`` (None if unknown or revoked)."""
        e = self._entries.get(node)
        return self._key(e.public_key, node) if e is not None and e.active else None

    def key_for_reply(self, node: str, kv: int | None) -> nacl.public.PublicKey | None:
        """The key to seal a reply to ``node`` when its last message was sealed with version ``kv``:
        that version while it is accepted (the node may not have its new key yet), else the current."""
        try:
            key = self.lookup(node, kv)
        except EnvelopeError:
            return None
        return key

    def lookup(self, node: str, kv: int | None = None) -> nacl.public.PublicKey | None:
        e = self._entries.get(node)
        if e is None or not e.public_key:
            return None
        if not e.active:
            raise RevokedSender(f"node {node!r} was revoked; its messages are refused", sender=node)
        if kv is None or kv == e.kv:
            return self._key(e.public_key, node)
        if kv > e.kv:
            raise UnknownKeyVersion(f"{node!r} sealed with key version {kv}, newer than the registry's {e.kv}",
                                    sender=node)
        for p in e.previous_keys:
            if p.kv == kv and p.until > self._clock():
                return self._key(p.public_key, node)
        raise RetiredKey(f"key version {kv} of {node!r} was rotated out and is no longer accepted "
                         f"(current version {e.kv})", sender=node)


# -- broker users derived from the registry and the access policies ---------------------------------
#
# Who gets a user on which broker is identity and topology (the registry): the cloud broker has the
# cloud, the gateways, the devices without a gateway, the apps and the operators; a site broker its
# gateway(s), its devices and the operators. What each user may publish and subscribe is policy: the
# enforced ``access`` rules (``AccessEngine.broker_acl``), shipped ``policies/access.yaml`` by default.
# A few properties stay identity, not policy: a plaintext app logs in on loopback only, operators use
# any client id and never receive what the cloud publishes unsealed for such an app, and an
# operator's registry ``subscribe`` list narrows what the policies let it read.


def device_rules(site: str, node: str) -> dict[str, list[str]]:
    """What the shipped default policy (``device-uplink``/``device-downlink``) gives a device: it publishes
    only its own uplink channels, receipts, site tasks (submissions and its executor status, for its
    gateway) and firmware requests (never a command or an ack, not even on its own prefix) and reads
    only what is addressed to it."""
    base = f"cws/v1/{site}/{node}"
    return {"publish": [f"{base}/status", f"{base}/telemetry/+", f"{base}/event/+", f"{base}/task/result",
                        f"{base}/receipt", f"{base}/task/submit", f"{base}/task/status", f"{base}/ota/get"],
            "subscribe": [f"{base}/task/cmd", f"{base}/ack", f"{base}/config", f"{base}/ota/data"]}


def gateway_uplink_rules(site: str) -> dict[str, list[str]]:
    """What the shipped default policy gives a gateway on the cloud broker: it bridges its own site only."""
    return {"publish": [f"cws/v1/{site}/#"],
            "subscribe": [f"cws/v1/{site}/+/task/cmd", f"cws/v1/{site}/+/ack", f"cws/v1/{site}/+/config"]}


def _engine(access: AccessEngine | None) -> AccessEngine:
    if access is not None:
        return access
    from cwsnet.policy.access import shipped_access_engine

    return shipped_access_engine()


def _user(e: Entry, access: AccessEngine, broker: str, unsealed: Sequence[str] = ()) -> dict[str, Any] | None:
    if e.mqtt_token_sha256 is None:
        return None
    from cwsnet.policy.access import Subject

    acl = access.broker_acl(Subject(e.id, e.role, e.site), broker)
    if acl.notes:
        log.warning("broker ACL of %s %s (%s broker): %s", e.role, e.id, broker, "; ".join(acl.notes))
    rules = acl.document()
    extra: dict[str, Any] = {}
    if e.role == "operator":
        _reader(e, rules, unsealed)
        extra["client_ids"] = ["*"]
    elif e.role == "app" and e.plaintext:
        extra["loopback_only"] = True
    return {"token_sha256": e.mqtt_token_sha256, **rules, **extra}


def _reader(e: Entry, rules: dict[str, Any], unsealed: Sequence[str]) -> None:
    # operators' MQTT credential: any client id (mosquitto_sub picks random ones), reads what the
    # policies allow narrowed to its registry ``subscribe`` list, and never what the cloud publishes
    # unsealed for a loopback-only app (``unsealed`` prefixes)
    from cwsnet.broker import filter_covers

    if e.subscribe:
        rules["subscribe"] = [f for f in e.subscribe if any(filter_covers(g, f) for g in rules["subscribe"])]
    if unsealed:
        rules["deny_receive"] = [*rules.get("deny_receive", []), *unsealed]


def cloud_broker_users(reg: Registry, access: AccessEngine | None = None) -> dict[str, Any]:
    """The cloud broker's credentials document (``cwsnet.broker`` format) for the active nodes, with the
    ACLs ``access`` gives them (None: the shipped default policies)."""
    engine = _engine(access)
    users: dict[str, Any] = {}
    unsealed = [f"cws/v1/_apps/{e.id}/#" for e in reg.active(role="app") if e.plaintext]
    for e in reg.active():
        if e.role == "device" and e.gateway is not None:
            continue  # behind a gateway: it talks to its site broker only
        u = _user(e, engine, "cloud", unsealed)
        if u is not None:
            users[e.id] = u
    revoked = sorted(e.id for e in reg.nodes.values() if not e.active)
    return {"users": users, "anonymous": False, "revoked": revoked}


def site_broker_users(reg: Registry, site: str, access: AccessEngine | None = None) -> dict[str, Any]:
    """A site broker's credentials document: its gateway(s), its active devices, the operators, with the
    ACLs ``access`` gives them (None: the shipped default policies)."""
    engine = _engine(access)
    users: dict[str, Any] = {}
    for e in reg.active():
        if (e.role in ("gateway", "device") and e.site == site) or e.role == "operator":
            u = _user(e, engine, "site")
            if u is not None:
                users[e.id] = u
    revoked = sorted(e.id for e in reg.nodes.values() if not e.active and e.site == site)
    return {"users": users, "anonymous": False, "revoked": revoked}
