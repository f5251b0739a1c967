"""Writes CPython values as MicroPython source (CPython side of the firmware tests and bench).

MicroPython's dicts are unordered and its float parser is not always correctly rounded, so
dicts become ``Map([...])`` (ordered pairs, what cws.cbor encodes in order), floats are
rebuilt from their float64 bytes and text from its UTF-8 bytes: the values the firmware sees
are exactly the ones CPython encoded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_LIB = ROOT / "firmware" / "micropython" / "lib"
VECTORS = sorted((ROOT / "tests" / "vectors").glob("*.json"))
MP_SCRIPTS = Path(__file__).resolve().parent / "mp"  # MicroPython scripts (not ruff-checked)
CHECKS = MP_SCRIPTS / "core_checks.py"
NODE_DIR = Path(__file__).resolve().parent / "node"

PRELUDE = """from binascii import unhexlify as _u
from struct import unpack as _unpack
from cws.cbor import Map


def _f(h):
    return _unpack(">d", _u(h))[0]


def _s(h):
    return str(_u(h), "utf-8")


"""


def py(v: Any) -> str:
    if v is None or v is True or v is False:
        return repr(v)
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        return f'_f("{struct.pack(">d", v).hex()}")'
    if isinstance(v, str):
        return f'_s("{v.encode().hex()}")'
    if isinstance(v, bytes | bytearray):
        return f'_u("{bytes(v).hex()}")'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(py(x) for x in v) + "]"
    if isinstance(v, dict):
        return "Map([" + ", ".join(f"({py(k)}, {py(x)})" for k, x in v.items()) + "])"
    raise TypeError(f"cannot write {type(v).__name__} as MicroPython source")


def module(**names: Any) -> str:
    return PRELUDE + "".join(f"{k} = {py(v)}\n" for k, v in names.items())


def vectors() -> list[dict]:
    out = []
    for p in VECTORS:
        v = json.loads(p.read_text())
        h = v["header"]
        out.append({
            "name": p.stem,
            "topic": v["topic"],
            "sender": v["sender"],
            "recipient": v["recipient"],
            "sender_secret": bytes.fromhex(v["keys"][v["sender"]]["secret"]),
            "sender_public": bytes.fromhex(v["keys"][v["sender"]]["public"]),
            "recipient_secret": bytes.fromhex(v["keys"][v["recipient"]]["secret"]),
            "recipient_public": bytes.fromhex(v["keys"][v["recipient"]]["public"]),
            "header": {"id": bytes.fromhex(h["id"]), "from": v["sender"], "to": v["recipient"],
                       "seq": h["seq"], "ts": h["ts"], "kind": h["kind"], "tc": h.get("trace")},
            "nonce": bytes.fromhex(v["nonce"]),
            "body": v["body"],
            "header_cbor": bytes.fromhex(v["expected"]["header_cbor"]),
            "sealed_plaintext_cbor": bytes.fromhex(v["expected"]["sealed_plaintext_cbor"]),
            "payload": bytes.fromhex(v["expected"]["payload"]),
        })
    return out


def write_vectors(directory: Path) -> Path:
    """Write ``fw_vectors.py`` (VECTORS = [...]) into ``directory``; return the directory."""
    (directory / "fw_vectors.py").write_text(module(VECTORS=vectors()))
    return directory
