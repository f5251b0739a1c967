"""Fake ESP32 hardware for firmware tests: the CWS_FAKE_HW JSON and running scripts on it.

The fakes themselves are ``tests/firmware/board/{machine,network,dht}.py`` (their docstrings
list every JSON key). This module is the CPython side:

- ``bme280_registers(cal, adc_t, adc_p, adc_h)`` / ``bme280_device(...)``: a BME280's (or,
  with ``chip_id=0x58``, a BMP280's) 256-byte register file holding a calibration set and one
  raw measurement, as the ``"i2c"`` entry of the JSON wants it;
- ``write_hw(path, hw)``: write the JSON; ``board_env(hw_file, *paths, port=)``: the environment
  (MICROPYPATH or PYTHONPATH with the firmware, the fakes and ``paths``; CWS_FAKE_HW);
  ``board_command(script, port=, heap=)``: the interpreter's command line;
- ``run_board(script, hw, workdir, *paths, port=, max_resets=)``: write the JSON into
  ``workdir``, run the script there and, like a board's bootloader, run it again after each exit
  with status 75 (``machine.reset()``), up to ``max_resets`` times. A missing interpreter fails
  the test with how to install it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mpdata
import pytest
from mprun import HEAP, micropython

BOARD = Path(__file__).resolve().parent / "board"
RESET_EXIT = 75  # machine.reset() exits with this status; the harness restarts the "board"
BME280_CHIP_ID = 0x60
BMP280_CHIP_ID = 0x58


def _le16(v: int) -> bytes:
    return (v & 0xFFFF).to_bytes(2, "little")


def bme280_calibration_bytes(cal: tuple[int, ...]) -> tuple[bytes, bytes]:
    """Registers 0x88..0xA1 (26 bytes) and 0xE1..0xE7 (7) holding ``cal`` = (T1..T3, P1..P9, H1..H6)."""
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6 = cal
    a = b"".join(_le16(v) for v in (t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9)) + bytes([0, h1 & 0xFF])
    b = _le16(h2) + bytes([h3 & 0xFF, (h4 >> 4) & 0xFF, (h4 & 0x0F) | ((h5 & 0x0F) << 4), (h5 >> 4) & 0xFF,
                           h6 & 0xFF])
    return a, b


def bme280_data_bytes(adc_t: int, adc_p: int, adc_h: int | None) -> bytes:
    """Registers 0xF7..0xFE for raw readings (20-bit T and P, 16-bit H)."""
    out = bytes([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4, adc_t >> 12, (adc_t >> 4) & 0xFF,
                 (adc_t & 0x0F) << 4])
    h = 0x8000 if adc_h is None else adc_h
    return out + bytes([h >> 8, h & 0xFF])


def bme280_registers(cal: tuple[int, ...], adc_t: int, adc_p: int, adc_h: int | None = None,
                     chip_id: int = BME280_CHIP_ID) -> bytes:
    regs = bytearray(256)
    a, b = bme280_calibration_bytes(cal)
    regs[0x88:0x88 + 26] = a
    if chip_id == BME280_CHIP_ID:
        regs[0xE1:0xE1 + 7] = b
    regs[0xD0] = chip_id
    regs[0xF7:0xFF] = bme280_data_bytes(adc_t, adc_p, adc_h)
    return bytes(regs)


def bme280_device(cal: tuple[int, ...], adc_t: int, adc_p: int, adc_h: int | None = None,
                  chip_id: int = BME280_CHIP_ID, fail: int = 0) -> dict[str, Any]:
    """One ``"i2c"`` entry of the fake-hardware JSON (key it by the decimal address)."""
    return {"regs": bme280_registers(cal, adc_t, adc_p, adc_h, chip_id).hex(), "fail": fail}


def write_hw(path: Path, hw: dict[str, Any]) -> Path:
    path.write_text(json.dumps(hw))
    return path


def board_env(hw_file: Path | None, *paths: Path, port: str = "unix", firmware_lib: Path | None = None
              ) -> dict[str, str]:
    """The environment to run firmware on the fakes: the firmware's lib, the fakes, ``paths``."""
    lib = [firmware_lib or mpdata.FIRMWARE_LIB, BOARD, *paths]
    env = dict(os.environ)
    env.pop("CWS_FAKE_HW", None)
    if hw_file is not None:
        env["CWS_FAKE_HW"] = str(hw_file)
    if port == "unix":
        env["MICROPYPATH"] = ":".join([*(str(p) for p in lib), ".frozen"])
    elif port == "cpython":
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in lib)
    else:
        raise ValueError(f"the fakes run on the unix port and CPython, not {port!r}")
    return env


def board_command(script: Path | str, port: str = "unix", heap: str = HEAP) -> list[str]:
    if port == "unix":
        return [micropython(), "-X", f"heapsize={heap}", str(script)]
    return [sys.executable, str(script)]


@dataclass
class BoardRun:
    returncode: int
    stdout: str
    stderr: str
    resets: int = 0
    outputs: list[str] = field(default_factory=list)  # stdout of each boot


def run_board(script: Path, hw: dict[str, Any] | None, workdir: Path, *paths: Path, port: str = "unix",
              heap: str = HEAP, timeout: float = 60, max_resets: int = 0, check: bool = True) -> BoardRun:
    """Run ``script`` on the fakes with ``hw`` as CWS_FAKE_HW, cwd ``workdir`` (the board's root).

    Exit status 75 is a board reset: the script runs again (same JSON, same files), at most
    ``max_resets`` times. With ``check``, any other non-zero status fails the test.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    hw_file = write_hw(workdir / "fake-hw.json", hw) if hw is not None else None
    env = board_env(hw_file, *paths, port=port)
    run = BoardRun(0, "", "")
    while True:
        r = subprocess.run(board_command(script, port, heap), env=env, cwd=workdir, capture_output=True, text=True,
                           timeout=timeout)
        run.outputs.append(r.stdout)
        run.stdout += r.stdout
        run.stderr += r.stderr
        run.returncode = r.returncode
        if r.returncode == RESET_EXIT and run.resets < max_resets:
            run.resets += 1
            continue
        break
    if check and run.returncode != 0:
        pytest.fail(f"{port} run of {script.name} failed ({run.returncode}, {run.resets} resets):\n"
                    f"{run.stdout}\n{run.stderr}")
    return run
