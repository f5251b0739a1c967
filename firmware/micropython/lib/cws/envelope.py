"""The CWSNet v1 envelope for MicroPython (docs/protocol.md §2; cwsnet/envelope.py is the reference).

    payload = CBOR {"h": header bytes, "n": nonce(24), "c": secretbox(k, n, CBOR [topic, SHA-256(h), body])}

``k`` is the crypto_box shared key (``cws.nacl.box_beforenm(peer_public, my_secret)``), computed
once per peer and key version: X25519 takes seconds on a device, the seal itself does not.

    payload = seal(topic, {"from": "dev-1", "to": "cloud", "seq": 42, "ts": ms, "kind": "telemetry"},
                   body, shared_key)
    header, body = open_envelope(payload, topic, "dev-1", lambda sender, kv: shared_key)
"""

from hashlib import sha256

from cws import cbor
from cws.nacl import CryptoError, random_nonce, secretbox, secretbox_open

PROTOCOL_VERSION = 1
MAX_PAYLOAD = 256 * 1024
KINDS = ("birth", "status", "death", "telemetry", "event", "task_cmd", "task_result", "ack", "config",
         "task_submit", "task_done")
_REQUIRED = (("v", int), ("id", bytes), ("from", str), ("to", str), ("seq", int), ("ts", int), ("kind", str))
_OPTIONAL = (("tc", str), ("kv", int), ("exp", int))
_ORDER = ("v", "id", "from", "to", "seq", "ts", "kind", "tc", "kv", "exp")
_U63 = 1 << 63


class EnvelopeError(Exception):
    """A refused message; ``reason`` is the protocol's label (malformed, forged, ...)."""

    def __init__(self, reason, message, sender=None, seq=None):
        super().__init__(message)
        self.reason = reason
        self.sender = sender
        self.seq = seq


def _digest(b):
    return sha256(b).digest()


def encode_header(fields):
    """The header bytes, keys in cwsnet's order (v, id, from, to, seq, ts, kind, tc, kv, exp).

    ``fields`` is a dict (or Map) with id, from, to, seq, ts, kind and optionally tc, kv, exp
    (None means absent); v defaults to 1. Unknown keys are refused.
    """
    f = fields.to_dict() if isinstance(fields, cbor.Map) else fields
    for k in f:
        if k not in _ORDER:
            raise ValueError("unknown header field %r" % (k,))
    pairs = [("v", f.get("v", PROTOCOL_VERSION))]
    for k in _ORDER[1:]:
        v = f.get(k)
        if v is None:
            if k in ("tc", "kv", "exp"):
                continue
            raise ValueError("header field %r is missing" % k)
        pairs.append((k, v))
    if f["kind"] not in KINDS:
        raise ValueError("unknown message kind %r" % (f["kind"],))
    if len(f["id"]) != 16:
        raise ValueError("header id must be 16 bytes")
    return cbor.dumps(cbor.Map(pairs))


def seal(topic, header_fields, body, shared_key, nonce=None):
    """Seal ``body`` for ``topic``; return the payload bytes. ``id`` is random if not given."""
    if "id" not in header_fields or header_fields["id"] is None:
        header_fields = dict(header_fields.to_dict() if isinstance(header_fields, cbor.Map) else header_fields)
        header_fields["id"] = random_nonce()[:16]
    h = encode_header(header_fields)
    n = nonce if nonce is not None else random_nonce()
    if len(n) != 24:
        raise ValueError("nonce must be 24 bytes")
    c = secretbox(shared_key, n, cbor.dumps([topic, _digest(h), body]))
    return cbor.dumps(cbor.Map([("h", h), ("n", n), ("c", c)]))


def peek_header(payload):
    """Decode the clear header (checks 1-2 of protocol §2.Sealing); returns (header dict, h, n, c)."""
    if not isinstance(payload, (bytes, bytearray)) or not payload:
        raise EnvelopeError("malformed", "payload is empty or not bytes")
    if len(payload) > MAX_PAYLOAD:
        raise EnvelopeError("malformed", "payload is %d bytes; the limit is %d" % (len(payload), MAX_PAYLOAD))
    try:
        outer = cbor.loads(payload)
    except cbor.CBORError as e:
        raise EnvelopeError("malformed", "payload is not CBOR: %s" % e) from None
    if not isinstance(outer, dict) or len(outer) != 3 or not all(isinstance(k, str) for k in outer) \
            or "h" not in outer or "n" not in outer or "c" not in outer:
        raise EnvelopeError("malformed", "payload is not an envelope map with exactly the keys h, n, c")
    h, n, c = outer["h"], outer["n"], outer["c"]
    if not isinstance(h, bytes) or not isinstance(n, bytes) or not isinstance(c, bytes):
        raise EnvelopeError("malformed", "envelope fields h, n and c must be byte strings")
    if len(n) != 24:
        raise EnvelopeError("malformed", "nonce is %d bytes, expected 24" % len(n))
    try:
        hm = cbor.loads(h)
    except cbor.CBORError as e:
        raise EnvelopeError("malformed", "header is not CBOR: %s" % e) from None
    if not isinstance(hm, dict) or not all(isinstance(k, str) for k in hm):
        raise EnvelopeError("malformed", "header is not a map with text keys")
    sender = hm.get("from") if isinstance(hm.get("from"), str) else None
    seq = hm.get("seq") if isinstance(hm.get("seq"), int) else None
    if hm.get("v") != PROTOCOL_VERSION or isinstance(hm.get("v"), bool):
        raise EnvelopeError("version", "protocol version %r; this node speaks %d" % (hm.get("v"), PROTOCOL_VERSION),
                            sender, seq)
    for key, typ in _REQUIRED:
        if key not in hm:
            raise EnvelopeError("malformed", "header field %r is missing" % key, sender, seq)
        if not isinstance(hm[key], typ) or isinstance(hm[key], bool):
            raise EnvelopeError("malformed", "header field %r has the wrong type" % key, sender, seq)
    for key, typ in _OPTIONAL:
        if key in hm and (not isinstance(hm[key], typ) or isinstance(hm[key], bool)):
            raise EnvelopeError("malformed", "header field %r has the wrong type" % key, sender, seq)
    if len(hm["id"]) != 16:
        raise EnvelopeError("malformed", "header field 'id' must be 16 bytes", sender, seq)
    if not (0 <= hm["seq"] < _U63 and 0 <= hm["ts"] < _U63 and 0 <= hm.get("exp", 0) < _U63):
        raise EnvelopeError("malformed", "header fields seq, ts and exp must be non-negative 63-bit", sender, seq)
    if "kv" in hm and hm["kv"] < 1:
        raise EnvelopeError("malformed", "header field 'kv' must be >= 1", sender, seq)
    if hm["kind"] not in KINDS:
        raise EnvelopeError("malformed", "unknown message kind %r" % (hm["kind"],), sender, seq)
    return hm, h, n, c


def open_envelope(payload, topic, me, shared_key_for):
    """Authenticate and open ``payload`` received on ``topic``; return (header dict, body).

    ``shared_key_for(sender, kv)`` returns the precomputed crypto_box key for that sender and
    key version (``kv`` is None when the header has none), or None if the sender is unknown; it
    may raise EnvelopeError itself (revoked, retired_key, unknown_key). Raises EnvelopeError
    with the protocol's reason. Replay (``(from, seq)`` seen before) is the caller's to check.
    """
    hm, h, n, c = peek_header(payload)
    sender, seq = hm["from"], hm["seq"]
    if hm["to"] != me:
        raise EnvelopeError("wrong_recipient", "envelope is addressed to %r, not %r" % (hm["to"], me), sender, seq)
    key = shared_key_for(sender, hm.get("kv"))
    if key is None:
        raise EnvelopeError("unknown_sender", "sender %r is not known" % sender, sender, seq)
    try:
        inner_raw = secretbox_open(key, n, c)
    except CryptoError:
        raise EnvelopeError("forged", "box from %r seq %d did not authenticate" % (sender, seq), sender, seq) from None
    try:
        inner = cbor.loads(inner_raw)
    except cbor.CBORError:
        raise EnvelopeError("malformed", "sealed part is not CBOR", sender, seq) from None
    if not isinstance(inner, list) or len(inner) != 3 or not isinstance(inner[0], str):
        raise EnvelopeError("malformed", "sealed part is not [topic, header hash, body]", sender, seq)
    sealed_topic, digest, body = inner
    if digest != _digest(h):
        raise EnvelopeError("forged", "header does not match the one that was sealed", sender, seq)
    if sealed_topic != topic:
        raise EnvelopeError("topic_mismatch", "sealed for topic %r, received on %r" % (sealed_topic, topic),
                            sender, seq)
    return hm, body


open = open_envelope  # noqa: A001 - the firmware's name for it: envelope.open(payload, topic, me, key_for)
