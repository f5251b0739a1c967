# The firmware protocol core's checks, run unchanged on MicroPython's unix port, its 32-bit
# WebAssembly port and CPython. Needs on the path: firmware/micropython/lib (the cws package)
# and the data modules tests/test_firmware_core.py writes (fw_vectors, fw_cbor).
# Any failure raises (the unix port and the Node driver exit non-zero); success prints "OK ...".
import sys

from cws import cbor, envelope, nacl
from cws.cbor import Map
from cws.envelope import EnvelopeError


def plain(v):
    if isinstance(v, Map):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def refused(fn, reason=None):
    try:
        fn()
    except EnvelopeError as e:
        check(reason is None or e.reason == reason, "refused as %s, expected %s" % (e.reason, reason))
        return e.reason
    raise AssertionError("accepted, expected a refusal (%s)" % reason)


def run_vectors():
    import fw_vectors

    n = 0
    flips = 0
    for v in fw_vectors.VECTORS:
        name = v["name"]
        check(nacl.public_key(v["sender_secret"]) == v["sender_public"], name + ": sender public key")
        check(nacl.public_key(v["recipient_secret"]) == v["recipient_public"], name + ": recipient public key")
        k = nacl.box_beforenm(v["recipient_public"], v["sender_secret"])
        check(k == nacl.box_beforenm(v["sender_public"], v["recipient_secret"]), name + ": shared keys differ")
        h = envelope.encode_header(v["header"])
        check(h == v["header_cbor"], name + ": header bytes differ")
        inner = cbor.dumps([v["topic"], envelope._digest(h), v["body"]])
        check(inner == v["sealed_plaintext_cbor"], name + ": sealed plaintext differs")
        payload = envelope.seal(v["topic"], v["header"], v["body"], k, nonce=v["nonce"])
        check(payload == v["payload"], name + ": payload is not byte-identical to the vector")
        me, other = v["recipient"], v["sender"]

        def key_for(sender, kv, k=k, other=other):
            return k if sender == other and kv is None else None

        hm, body = envelope.open(v["payload"], v["topic"], me, key_for)
        check(hm["from"] == other and hm["seq"] == v["header"]["seq"], name + ": opened header")
        check(body == plain(v["body"]), name + ": opened body differs")
        check(cbor.loads(inner)[2] == plain(v["body"]), name + ": decoded body differs")
        refused(lambda: envelope.open(v["payload"], v["topic"] + "x", me, key_for), "topic_mismatch")
        refused(lambda: envelope.open(v["payload"], v["topic"], me + "x", key_for), "wrong_recipient")
        refused(lambda: envelope.open(v["payload"], v["topic"], me, lambda s, kv: None), "unknown_sender")
        refused(lambda: envelope.open(v["payload"], v["topic"], me, lambda s, kv: bytes(32)), "forged")
        p = v["payload"]
        for i in range(len(p)):
            bad = bytearray(p)
            bad[i] ^= 0x01 if i % 2 else 0x80
            refused(lambda: envelope.open(bytes(bad), v["topic"], me, key_for))
            flips += 1
        n += 1
    return n, flips


def run_cbor():
    try:
        import fw_cbor
    except ImportError:
        return 0, 0
    for value, expected in fw_cbor.ENCODE:
        got = cbor.dumps(value)
        check(got == expected, "cbor.dumps %r gave %s, cbor2 %s" % (value, got, expected))
        back = cbor.loads(expected)
        pv = plain(value)
        check(back == pv or (back != back and pv != pv), "cbor.loads %s gave %r" % (expected, back))
    for data, value in fw_cbor.DECODE:
        got = cbor.loads(data)
        check(got == plain(value), "cbor.loads %s gave %r, expected %r" % (data, got, value))
    for data in fw_cbor.MALFORMED:
        try:
            cbor.loads(data)
        except cbor.CBORError:
            continue
        raise AssertionError("malformed CBOR %s was accepted" % data)
    return len(fw_cbor.ENCODE) + len(fw_cbor.DECODE), len(fw_cbor.MALFORMED)


nv, nf = run_vectors()
ne, nm = run_cbor()
print("OK %s vectors=%d flips_refused=%d cbor_cases=%d malformed_refused=%d"
      % (sys.implementation.name, nv, nf, ne, nm))
