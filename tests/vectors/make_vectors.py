"""Writes the golden vectors once. They are checked in; tests never regenerate them.

Run only when the protocol version changes: ``python tests/vectors/make_vectors.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cbor2
import nacl.public

from cwsnet import envelope
from cwsnet.envelope import Header

HERE = Path(__file__).parent


def key(name: str) -> nacl.public.PrivateKey:
    return nacl.public.PrivateKey(hashlib.sha256(f"cwsnet-vector-{name}".encode()).digest())


CASES = [
    {
        "name": "telemetry",
        "description": "dev-1 sends two batched readings of stream env to the cloud",
        "sender": "dev-1", "recipient": "cloud",
        "topic": "cws/v1/home/dev-1/telemetry/env",
        "header": {"seq": 42, "ts": 1767225600000, "kind": "telemetry", "trace": None},
        "body": {"stream": "env", "readings": [
            {"ts": 1767225599000, "values": {"temperature": 21.5, "humidity": 40}},
            {"ts": 1767225600000, "values": {"temperature": 21.25, "humidity": 41}},
        ]},
    },
    {
        "name": "birth",
        "description": "dev-1's birth status, announcing the seq of its last-will death message",
        "sender": "dev-1", "recipient": "cloud",
        "topic": "cws/v1/home/dev-1/status",
        "header": {"seq": 7, "ts": 1767225600000, "kind": "birth", "trace": None},
        "body": {"state": "online", "uptime": 0.5, "outbox": 0, "link": "up", "will_seq": 6},
    },
    {
        "name": "task_cmd",
        "description": "the cloud asks dev-1 to hash 'hello' (base64 aGVsbG8=), with a trace context",
        "sender": "cloud", "recipient": "dev-1",
        "topic": "cws/v1/home/dev-1/task/cmd",
        "header": {"seq": 1000, "ts": 1767225600000, "kind": "task_cmd",
                   "trace": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "body": {"task_id": "t-0001", "handler": "sha256", "args": {"data": "aGVsbG8="}, "deadline": None},
    },
]


def main() -> None:
    for case in CASES:
        sk = key(case["sender"])
        rk = key(case["recipient"])
        h = case["header"]
        header = Header(id=bytes(range(16)), sender=case["sender"], recipient=case["recipient"], seq=h["seq"],
                        ts=h["ts"], kind=h["kind"], trace=h["trace"])
        nonce = bytes(range(24))
        payload = envelope.seal(topic=case["topic"], header=header, body=case["body"], sender_key=sk,
                                recipient_key=rk.public_key, nonce=nonce)
        hb = envelope.encode_header(header)
        out = {
            "description": case["description"],
            "keys": {
                case["sender"]: {"secret": bytes(sk).hex(), "public": bytes(sk.public_key).hex()},
                case["recipient"]: {"secret": bytes(rk).hex(), "public": bytes(rk.public_key).hex()},
            },
            "sender": case["sender"],
            "recipient": case["recipient"],
            "topic": case["topic"],
            "header": {"id": bytes(range(16)).hex(), **{k: v for k, v in h.items() if v is not None}},
            "nonce": nonce.hex(),
            "body": case["body"],
            "expected": {
                "header_cbor": hb.hex(),
                "header_sha256": hashlib.sha256(hb).hexdigest(),
                "sealed_plaintext_cbor": cbor2.dumps([case["topic"], hashlib.sha256(hb).digest(), case["body"]]).hex(),
                "payload": payload.hex(),
            },
        }
        (HERE / f"{case['name']}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
