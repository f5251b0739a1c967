"""The golden vectors: decoded by hand (plain cbor2 + libsodium, as an app developer would from
docs/protocol.md), and reproduced byte for byte by cwsnet's sealing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cbor2
import nacl.bindings
import nacl.public
import pytest

from cwsnet import envelope
from cwsnet.envelope import Header

VECTORS = sorted((Path(__file__).parent / "vectors").glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_vectors_for_every_direction() -> None:
    kinds = {load(p)["header"]["kind"] for p in VECTORS}
    assert {"telemetry", "birth", "task_cmd"} <= kinds


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_decode_by_hand(path: Path) -> None:
    v = load(path)
    payload = bytes.fromhex(v["expected"]["payload"])
    outer = cbor2.loads(payload)
    assert sorted(outer) == ["c", "h", "n"]
    header = cbor2.loads(outer["h"])
    assert header["v"] == 1 and header["from"] == v["sender"] and header["to"] == v["recipient"]
    assert header["seq"] == v["header"]["seq"] and header["kind"] == v["header"]["kind"]
    assert outer["n"].hex() == v["nonce"]
    # libsodium's crypto_box_open_easy, as any language binding exposes it
    rk = bytes.fromhex(v["keys"][v["recipient"]]["secret"])
    spk = bytes.fromhex(v["keys"][v["sender"]]["public"])
    plain = nacl.bindings.crypto_box_open(outer["c"], outer["n"], spk, rk)
    assert plain.hex() == v["expected"]["sealed_plaintext_cbor"]
    topic, digest, body = cbor2.loads(plain)
    assert topic == v["topic"]
    assert digest == hashlib.sha256(outer["h"]).digest()
    assert body == v["body"]


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_sealing_reproduces_the_vector(path: Path) -> None:
    v = load(path)
    h = v["header"]
    header = Header(id=bytes.fromhex(h["id"]), sender=v["sender"], recipient=v["recipient"], seq=h["seq"],
                    ts=h["ts"], kind=h["kind"], trace=h.get("trace"))
    assert envelope.encode_header(header).hex() == v["expected"]["header_cbor"]
    payload = envelope.seal(
        topic=v["topic"], header=header, body=v["body"],
        sender_key=nacl.public.PrivateKey(bytes.fromhex(v["keys"][v["sender"]]["secret"])),
        recipient_key=nacl.public.PublicKey(bytes.fromhex(v["keys"][v["recipient"]]["public"])),
        nonce=bytes.fromhex(v["nonce"]),
    )
    assert payload.hex() == v["expected"]["payload"]


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_open_envelope_accepts_the_vector(path: Path) -> None:
    v = load(path)
    keys = {n: nacl.public.PublicKey(bytes.fromhex(k["public"])) for n, k in v["keys"].items()}
    opened = envelope.open_envelope(
        bytes.fromhex(v["expected"]["payload"]), topic=v["topic"], me=v["recipient"],
        my_key=nacl.public.PrivateKey(bytes.fromhex(v["keys"][v["recipient"]]["secret"])), sender_key=keys.get,
    )
    assert opened.body == v["body"] and opened.header.seq == v["header"]["seq"]
