"""The sans-I/O protocol core: envelope rejections, topics, replay window, seq counter."""

from __future__ import annotations

import random

import cbor2
import nacl.bindings
import nacl.public
import pytest

from cwsnet import envelope, topics
from cwsnet.endpoint import Endpoint
from cwsnet.errors import (
    EnvelopeError,
    ForgedEnvelope,
    MalformedEnvelope,
    NotForMe,
    TopicError,
    TopicMismatch,
    UnknownSender,
    UnsupportedVersion,
)
from cwsnet.identity import Identity
from cwsnet.replay import ReplayWindow, SeqCounter

CLOUD = Identity.generate("cloud", "home", "cloud")
DEV = Identity.generate("dev-1", "home", "device")
DEV2 = Identity.generate("dev-2", "home", "device")
KEYS = {"cloud": CLOUD.public_key, "dev-1": DEV.public_key, "dev-2": DEV2.public_key}
TOPIC = topics.telemetry("home", "dev-1", "env")
BODY = {"stream": "env", "readings": [{"ts": 1, "values": {"t": 20.5}}]}


def endpoint(ident: Identity, start: int = 0) -> Endpoint:
    return Endpoint(ident, SeqCounter(start, lambda m: None), KEYS.get, clock=lambda: 1000.0)


def sealed(**kw) -> bytes:
    payload, _ = endpoint(DEV).seal(kw.get("topic", TOPIC), kw.get("kind", "telemetry"), BODY, to="cloud")
    return payload


def open_(payload: bytes, topic: str = TOPIC, me: Identity = CLOUD):
    return endpoint(me).open(payload, topic)


def test_roundtrip_carries_header_and_body() -> None:
    opened = open_(sealed())
    assert opened.body == BODY
    assert opened.header.sender == "dev-1" and opened.header.kind == "telemetry" and opened.header.ts == 1_000_000


def test_every_single_flipped_byte_is_rejected() -> None:
    payload = sealed()
    for i in range(len(payload)):
        bad = bytearray(payload)
        bad[i] ^= 0x01
        with pytest.raises(EnvelopeError):
            open_(bytes(bad))


def test_flipped_ciphertext_byte_is_forged() -> None:
    outer = cbor2.loads(sealed())
    c = bytearray(outer["c"])
    c[-1] ^= 0x80
    with pytest.raises(ForgedEnvelope):
        open_(cbor2.dumps({"h": outer["h"], "n": outer["n"], "c": bytes(c)}))


def test_changed_header_is_forged_even_if_well_formed() -> None:
    outer = cbor2.loads(sealed())
    h = cbor2.loads(outer["h"])
    h["seq"] += 1
    with pytest.raises(ForgedEnvelope):
        open_(cbor2.dumps({"h": cbor2.dumps(h), "n": outer["n"], "c": outer["c"]}))


def test_republished_on_another_topic_is_topic_mismatch() -> None:
    with pytest.raises(TopicMismatch):
        open_(sealed(), topic=topics.telemetry("home", "dev-2", "env"))


def test_not_cbor_is_malformed() -> None:
    for junk in (b"", b"\xff\xff", b"hello world", cbor2.dumps([1, 2]), cbor2.dumps({"h": 1, "n": 2, "c": 3})):
        with pytest.raises(MalformedEnvelope):
            open_(junk)


def test_wrong_version_unknown_sender_wrong_recipient() -> None:
    outer = cbor2.loads(sealed())
    h = cbor2.loads(outer["h"])
    with pytest.raises(UnsupportedVersion):
        open_(cbor2.dumps({**outer, "h": cbor2.dumps({**h, "v": 2})}))
    with pytest.raises(UnknownSender):
        open_(cbor2.dumps({**outer, "h": cbor2.dumps({**h, "from": "stranger"})}))
    with pytest.raises(NotForMe):
        open_(sealed(), me=DEV2)


def test_sealed_by_another_device_claiming_to_be_dev1_is_forged() -> None:
    header = endpoint(DEV2).header("telemetry", "cloud")
    forged_header = envelope.Header(header.id, "dev-1", "cloud", header.seq, header.ts, "telemetry")
    payload = envelope.seal(topic=TOPIC, header=forged_header, body=BODY, sender_key=DEV2.secret_key,
                            recipient_key=CLOUD.public_key)
    with pytest.raises(ForgedEnvelope):
        open_(payload)


def test_missing_and_mistyped_header_fields() -> None:
    outer = cbor2.loads(sealed())
    h = cbor2.loads(outer["h"])
    for key in ("id", "from", "to", "seq", "ts", "kind"):
        bad = {k: v for k, v in h.items() if k != key}
        with pytest.raises(MalformedEnvelope, match=key):
            open_(cbor2.dumps({**outer, "h": cbor2.dumps(bad)}))
    for key, value in (("seq", "1"), ("seq", -1), ("seq", True), ("kind", "nope"), ("id", b"short")):
        with pytest.raises(MalformedEnvelope):
            open_(cbor2.dumps({**outer, "h": cbor2.dumps({**h, key: value})}))


def test_oversized_payload_is_malformed() -> None:
    with pytest.raises(MalformedEnvelope, match="limit"):
        open_(b"\x00" * (envelope.MAX_PAYLOAD + 1))


def test_peek_header_reads_clear_header_without_keys() -> None:
    h = envelope.peek_header(sealed())
    assert (h.sender, h.kind, h.recipient) == ("dev-1", "telemetry", "cloud")


# ---- topics -------------------------------------------------------------------------------------
def test_topic_builders_and_parse_roundtrip() -> None:
    for t, channel, sub in (
        (topics.status("home", "dev-1"), "status", None),
        (topics.telemetry("home", "dev-1", "env"), "telemetry", "env"),
        (topics.event("home", "dev-1", "alarm"), "event", "alarm"),
        (topics.task_cmd("home", "dev-1"), "task/cmd", None),
        (topics.task_result("home", "dev-1"), "task/result", None),
        (topics.ack("home", "gw-home"), "ack", None),
    ):
        p = topics.parse(t)
        assert (p.site, p.channel, p.sub) == ("home", channel, sub)


@pytest.mark.parametrize("bad", ["a/+/b", "#", "x/y", "", "-lead", "a" * 64, "$SYS", "sp ace", "é"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.status("home", bad)


@pytest.mark.parametrize("bad", ["cws/v2/home/dev-1/status", "cws/v1/home/dev-1/nope", "other/v1/a/b/status",
                                 "cws/v1/home/dev-1/telemetry", "cws/v1/home/dev+/status"])
def test_parse_refuses_non_cwsnet_topics(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(bad)


def test_site_filters() -> None:
    assert topics.site_filter("home", "telemetry") == "cws/v1/home/+/telemetry/#"
    assert topics.site_filter("home", "task/cmd") == "cws/v1/home/+/task/cmd"


# ---- replay window ---------------------------------------------------------------------------
def test_replay_window_matches_a_reference_model() -> None:
    rng = random.Random(7)
    for _trial in range(50):
        w = ReplayWindow(size=64)
        seen: set[int] = set()
        highest = -1
        for _ in range(400):
            seq = max(0, highest + rng.randint(-80, 5))
            expected = "too_old" if highest - seq >= 64 else ("duplicate" if seq in seen else "new")
            assert w.check(seq) == expected, (seq, highest)
            if expected == "new":
                w.accept(seq)
                seen.add(seq)
                highest = max(highest, seq)
            w = ReplayWindow.from_state(w.to_state())  # persistence round-trips


def test_replay_window_big_jump_resets_bitmap() -> None:
    w = ReplayWindow(size=8)
    w.accept(1)
    w.accept(1000)
    assert w.check(1) == "too_old" and w.check(999) == "new" and w.check(1000) == "duplicate"


def test_seq_counter_never_repeats_across_crash() -> None:
    marks: list[int] = []
    c = SeqCounter(0, marks.append, block=10)
    first = [c.next() for _ in range(25)]
    assert first == list(range(25)) and marks == [10, 20, 30]
    # crash: a new counter starts from the last durable mark
    c2 = SeqCounter(marks[-1], marks.append, block=10)
    assert c2.next() == 30 > max(first)


def test_box_is_libsodium_crypto_box() -> None:
    # PyNaCl Box == libsodium crypto_box_easy; the firmware relies on this identity
    n = bytes(24)
    a = nacl.public.Box(DEV.secret_key, CLOUD.public_key).encrypt(b"x", n).ciphertext
    b = nacl.bindings.crypto_box(b"x", n, bytes(CLOUD.public_key), bytes(DEV.secret_key))
    assert a == b


def test_unknown_header_keys_are_ignored_but_still_bound() -> None:
    import hashlib

    h = endpoint(DEV).header("telemetry", "cloud")
    hb = cbor2.dumps({**h.to_map(), "future": 1})
    inner = cbor2.dumps([TOPIC, hashlib.sha256(hb).digest(), BODY])
    n = bytes(24)
    c = nacl.public.Box(DEV.secret_key, CLOUD.public_key).encrypt(inner, n).ciphertext
    assert open_(cbor2.dumps({"h": hb, "n": n, "c": c})).body == BODY
    tampered = cbor2.dumps({**h.to_map(), "future": 2})  # changing the unknown key breaks the binding
    with pytest.raises(ForgedEnvelope):
        open_(cbor2.dumps({"h": tampered, "n": n, "c": c}))
