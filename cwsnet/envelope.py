"""The CWSNet v1 envelope: CBOR framing and NaCl ``Box`` sealing. Sans-I/O: no sockets, no clock.

Wire form (``docs/protocol.md`` is normative)::

    payload = CBOR map {"h": bstr header, "n": bstr(24) nonce, "c": bstr box ciphertext}
    header  = CBOR map {"v": 1, "id": bstr(16), "from": tstr, "to": tstr, "seq": uint,
                        "ts": uint ms, "kind": tstr, ? "tc": tstr traceparent, ? "kv": uint}
    sealed  = crypto_box(CBOR [topic, SHA-256(header bytes), body], n, sender_sk, receiver_pk)

The header travels in clear so gateways can route, count and acknowledge by ``from``/``seq``
without being able to read bodies; the sealed part binds it (by hash, over the exact bytes) and
the topic, so a changed header, a swapped topic or a re-addressed message fails to open.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import nacl.exceptions
import nacl.public

from cwsnet.errors import (
    EnvelopeError,
    ForgedEnvelope,
    MalformedEnvelope,
    NotForMe,
    TopicMismatch,
    UnknownSender,
    UnsupportedVersion,
)

PROTOCOL_VERSION = 1
NONCE_SIZE = nacl.public.Box.NONCE_SIZE  # 24
MAX_PAYLOAD = 256 * 1024  # bytes; larger payloads are refused as malformed
#: the largest CBOR body that still fits one envelope with room for the header, topic hash and box
MAX_BODY = MAX_PAYLOAD - 4096
#: the largest checkpoint a task may save (a re-assigned task's command carries it with the args)
MAX_CHECKPOINT = 64 * 1024


INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32  # nesting of maps and arrays in a stored body


def storable_problem(value: Any, what: str) -> str | None:
    """Why ``value`` cannot be stored as JSON as is by the cloud (None: it can).

    Allowed: maps with text keys, arrays, text, byte strings (stored as base64), bool, null,
    signed 64-bit integers and finite floats, nested at most :data:`MAX_DEPTH` deep. Anything else
    (NaN, Infinity, a bignum, a CBOR tag, a map with non-text keys) would make the store fail or
    silently change the value.
    """
    stack: list[tuple[Any, str, int]] = [(value, what, 0)]
    while stack:
        v, where, depth = stack.pop()
        if v is None or isinstance(v, bool | str | bytes | bytearray):
            continue
        if isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                return f"{where}: integer out of the signed 64-bit range"
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                return f"{where}: {v!r} is not a finite number"
            continue
        if depth >= MAX_DEPTH:
            return f"{what} is nested more than {MAX_DEPTH} levels deep"
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    return f"{where}: map key {type(k).__name__} is not text"
                stack.append((item, f"{where}.{k[:40]}", depth + 1))
        elif isinstance(v, list | tuple):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(v))
        else:
            return f"{where}: a {type(v).__name__} value cannot be stored"
    return None


def body_problem(value: Any, what: str = "the body", limit: int = MAX_BODY) -> str | None:
    """Why ``value`` cannot travel as one message body that the cloud can store (None: it can): the
    rules of :func:`storable_problem`, CBOR can encode it, and it is at most ``limit`` bytes."""
    why = storable_problem(value, what)
    if why is not None:
        return why
    try:
        size = len(cbor2.dumps(value))
    except Exception as exc:  # noqa: BLE001 - any refusal of the encoder
        return f"{what} cannot be encoded ({type(exc).__name__}: {exc})"
    if size > limit:
        return f"{what} is {size} bytes; at most {limit} fit"
    return None

#: Message kinds and the channel they travel on.
KINDS = {
    "birth": "status",
    "status": "status",
    "death": "status",
    "telemetry": "telemetry",
    "event": "event",
    "task_cmd": "task/cmd",
    "task_result": "task/result",
    "ack": "ack",
    "config": "config",
    "task_submit": "task/submit",  # site tasks (§3): device -> its gateway
    "task_done": "task/cmd",  # site tasks: gateway -> device, the outcome of what it submitted
}

_REQUIRED = {"v": int, "id": bytes, "from": str, "to": str, "seq": int, "ts": int, "kind": str}
_OPTIONAL = {"tc": str, "kv": int, "exp": int}


@dataclass(frozen=True, slots=True)
class Header:
    """The clear, bound part of an envelope."""

    id: bytes
    sender: str
    recipient: str
    seq: int
    ts: int
    kind: str
    trace: str | None = None
    key_version: int | None = None
    version: int = PROTOCOL_VERSION
    expires: int | None = None  # ms since the epoch; a holder (gateway) may discard the message after it

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "v": self.version,
            "id": self.id,
            "from": self.sender,
            "to": self.recipient,
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
        }
        if self.trace is not None:
            m["tc"] = self.trace
        if self.key_version is not None:
            m["kv"] = self.key_version
        if self.expires is not None:
            m["exp"] = self.expires
        return m

    @property
    def msg_id(self) -> str:
        return self.id.hex()


@dataclass(frozen=True, slots=True)
class Opened:
    """A message that authenticated: its header, the topic it was sealed for, and its body."""

    header: Header
    topic: str
    body: Any
    size: int = field(default=0)


def encode_header(header: Header) -> bytes:
    return cbor2.dumps(header.to_map())


def peek_header(payload: bytes) -> Header:
    """Decode the clear header without opening the box (what a gateway may know)."""
    header, _h, _n, _c = _split(payload)
    return header


def _split(payload: bytes) -> tuple[Header, bytes, bytes, bytes]:
    if not isinstance(payload, bytes | bytearray) or not payload:
        raise MalformedEnvelope("payload is empty or not bytes")
    if len(payload) > MAX_PAYLOAD:
        raise MalformedEnvelope(f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD}")
    try:
        outer = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types; all mean "not CBOR"
        raise MalformedEnvelope(f"payload is not CBOR: {exc}") from None
    if not isinstance(outer, dict) or set(outer) != {"h", "n", "c"}:
        raise MalformedEnvelope("payload is not an envelope map with exactly the keys h, n, c")
    h, n, c = outer["h"], outer["n"], outer["c"]
    if not isinstance(h, bytes) or not isinstance(n, bytes) or not isinstance(c, bytes):
        raise MalformedEnvelope("envelope fields h, n and c must be byte strings")
    if len(n) != NONCE_SIZE:
        raise MalformedEnvelope(f"nonce is {len(n)} bytes, expected {NONCE_SIZE}")
    try:
        hm = cbor2.loads(h)
    except Exception as exc:
        raise MalformedEnvelope(f"header is not CBOR: {exc}") from None
    if not isinstance(hm, dict):
        raise MalformedEnvelope("header is not a map")
    sender = hm.get("from") if isinstance(hm.get("from"), str) else None
    seq = hm.get("seq") if isinstance(hm.get("seq"), int) else None
    if hm.get("v") != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {hm.get('v')!r}; this node speaks {PROTOCOL_VERSION}", sender=sender, seq=seq
        )
    for key, typ in _REQUIRED.items():
        if key not in hm:
            raise MalformedEnvelope(f"header field {key!r} is missing", sender=sender, seq=seq)
        if not isinstance(hm[key], typ) or isinstance(hm[key], bool):
            raise MalformedEnvelope(
                f"header field {key!r} must be {typ.__name__}, got {type(hm[key]).__name__}",
                sender=sender,
                seq=seq,
            )
    for key, typ in _OPTIONAL.items():
        if key in hm and (not isinstance(hm[key], typ) or isinstance(hm[key], bool)):
            raise MalformedEnvelope(f"header field {key!r} must be {typ.__name__}", sender=sender, seq=seq)
    if len(hm["id"]) != 16:
        raise MalformedEnvelope("header field 'id' must be 16 bytes", sender=sender, seq=seq)
    if not (0 <= hm["seq"] < 2**63 and 0 <= hm["ts"] < 2**63 and 0 <= hm.get("exp", 0) < 2**63):
        raise MalformedEnvelope("header fields 'seq', 'ts' and 'exp' must be non-negative 63-bit", sender=sender,
                                seq=seq)
    if hm["kind"] not in KINDS:
        raise MalformedEnvelope(f"unknown message kind {hm['kind']!r}", sender=sender, seq=seq)
    header = Header(
        id=hm["id"],
        sender=hm["from"],
        recipient=hm["to"],
        seq=hm["seq"],
        ts=hm["ts"],
        kind=hm["kind"],
        trace=hm.get("tc"),
        key_version=hm.get("kv"),
        expires=hm.get("exp"),
    )
    return header, h, n, c


def seal(
    *,
    topic: str,
    header: Header,
    body: Any,
    sender_key: nacl.public.PrivateKey,
    recipient_key: nacl.public.PublicKey,
    nonce: bytes | None = None,
    box: nacl.public.Box | None = None,
) -> bytes:
    """Seal ``body`` from ``header.sender`` to ``header.recipient`` for ``topic``; return the payload.

    ``box`` may be a cached ``Box(sender_key, recipient_key)`` (it saves the X25519 per message).
    """
    if header.kind not in KINDS:
        raise ValueError(f"unknown message kind {header.kind!r}")
    h = encode_header(header)
    inner = cbor2.dumps([topic, hashlib.sha256(h).digest(), body])
    n = nonce if nonce is not None else os.urandom(NONCE_SIZE)
    ct = (box or nacl.public.Box(sender_key, recipient_key)).encrypt(inner, n).ciphertext
    return cbor2.dumps({"h": h, "n": n, "c": ct})


def open_envelope(
    payload: bytes,
    *,
    topic: str,
    me: str,
    my_key: nacl.public.PrivateKey,
    sender_key: Callable[[str], nacl.public.PublicKey | None],
    box_for: Callable[[nacl.public.PublicKey], nacl.public.Box] | None = None,
    versioned_key: Callable[[str, int | None], nacl.public.PublicKey | None] | None = None,
) -> Opened:
    """Authenticate and open ``payload`` received on ``topic``.

    ``sender_key(node_id)`` returns the sender's public key or None if unknown. A receiver that
    knows key versions passes ``versioned_key(node_id, kv)`` instead (``kv`` is the header's, None
    when absent); it may raise an :class:`~cwsnet.errors.EnvelopeError` (revoked, retired key).
    Raises a subclass of :class:`~cwsnet.errors.EnvelopeError`. Replay is the caller's to check.
    """
    header, h, n, c = _split(payload)
    kw = {"sender": header.sender, "seq": header.seq}
    if header.recipient != me:
        raise NotForMe(f"envelope is addressed to {header.recipient!r}, not {me!r}", **kw)
    if versioned_key is not None:
        try:
            pk = versioned_key(header.sender, header.key_version)
        except EnvelopeError as exc:
            exc.sender, exc.seq = header.sender, header.seq
            raise
    else:
        pk = sender_key(header.sender)
    if pk is None:
        raise UnknownSender(f"sender {header.sender!r} is not registered", **kw)
    try:
        box = box_for(pk) if box_for is not None else nacl.public.Box(my_key, pk)
        inner_raw = box.decrypt(c, n)
    except nacl.exceptions.CryptoError:
        raise ForgedEnvelope(
            f"box from {header.sender!r} seq {header.seq} did not authenticate", **kw
        ) from None
    try:
        inner = cbor2.loads(inner_raw)
    except Exception:
        raise MalformedEnvelope("sealed part is not CBOR", **kw) from None
    if not isinstance(inner, list) or len(inner) != 3 or not isinstance(inner[0], str):
        raise MalformedEnvelope("sealed part is not [topic, header hash, body]", **kw)
    sealed_topic, digest, body = inner
    if digest != hashlib.sha256(h).digest():
        raise ForgedEnvelope("header does not match the one that was sealed", **kw)
    if sealed_topic != topic:
        raise TopicMismatch(f"sealed for topic {sealed_topic!r}, received on {topic!r}", **kw)
    return Opened(header=header, topic=topic, body=body, size=len(payload))


def new_message_id() -> bytes:
    return os.urandom(16)
