"""A simulated ESP32 for the end-to-end tests: the real firmware on MicroPython's unix port.

``FirmwareBoard`` lays out a board's filesystem in a folder exactly as ``cwsnet flash esp32``
does on a real board (``main.py``, ``lib/cws/*.mpy`` from ``cwsnet firmware build``,
``cwsnet/config.json``, ``cwsnet/bundle.json``, ``cwsnet/ca.pem``) and runs ``main.py`` there
with a heap of an ESP32's order (224 KB on this 64-bit port, whose objects are twice as big:
about the 110 KB an ESP32-WROOM without PSRAM gives MicroPython). Only the hardware is fake: ``network`` and
``machine`` come from ``tests/firmware/board`` (WiFi always joins, ``machine.reset()`` exits
with status 75). A shell loop restarts the interpreter after such a reset, the way a board
reboots; SIGKILL of the process group is a power cut (the flash, i.e. the folder, keeps what
was written).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .proc import ManagedProcess, ProcessSet

ROOT = Path(__file__).resolve().parents[2]
FAKES = ROOT / "tests" / "firmware" / "board"
MICROPYTHON = Path(sys.executable).parent / "micropython"
RESET_STATUS = 75
FIRMWARE_VERSION = "0.1.0"  # what the boards start with (the OTA test updates from it)

#: rerun main.py after a board reset (exit 75), as the ESP32's ROM bootloader would
_LOOP = 'while :; do "$0" -X heapsize="$1" main.py; rc=$?; [ "$rc" -eq 75 ] || exit "$rc"; echo "=== board reset"; done'


def build_firmware(out: Path, version: str = FIRMWARE_VERSION) -> Path:
    """``cwsnet firmware build`` of this checkout's firmware; returns the build's folder."""
    from cwsnet import firmware

    return firmware.build(out, version=version).dir


class FirmwareBoard:
    def __init__(self, root: Path, bundle: dict[str, Any], *, host: str, port: int, ca_pem: bytes | None,
                 sensors: list[dict[str, Any]] | None = None, settings: dict[str, Any] | None = None,
                 hardware: dict[str, Any] | None = None, heap: str = "224k") -> None:
        self.root = root
        self.node = bundle["node"]
        self.heap = heap
        root.mkdir(parents=True, exist_ok=True)
        self.install(build_firmware(root.parent / f"{self.node}-build"))
        cfg: dict[str, Any] = {
            "wifi": {"ssid": "lab", "password": "lab-password"},
            "broker": {"host": host, "port": port, "tls": ca_pem is not None, "keepalive": 10},
            "status_interval": 2,
            "sensors": sensors if sensors is not None else [
                {"type": "simulated", "stream": "env", "interval": 0.2, "fields": ["temperature", "humidity"]}],
            "batch": {"max_readings": 5, "max_delay": 1},
            "buffer": {"segment_bytes": 4096, "max_segments": 32, "retransmit_after": 2},
            "log_stores": True,  # "stored KIND seq N" once a message is on flash: what the tests audit
        }
        cfg.update(settings or {})
        (root / "cwsnet").mkdir(exist_ok=True)
        (root / "cwsnet" / "config.json").write_text(json.dumps(cfg))
        (root / "cwsnet" / "bundle.json").write_text(json.dumps(bundle))
        if ca_pem is not None:
            (root / "cwsnet" / "ca.pem").write_bytes(ca_pem)
        self.hardware_file = root.parent / f"{self.node}-hw.json"
        self.hardware_file.write_text(json.dumps(hardware or {"wifi": {"ssid": "lab", "password": "lab-password"}}))
        self.proc: ManagedProcess | None = None

    def install(self, build: Path) -> None:
        """Copy a firmware build (main.py and lib/cws) onto the board, as `cwsnet flash esp32` does."""
        shutil.copy(build / "main.py", self.root / "main.py")
        lib = self.root / "lib" / "cws"
        if lib.exists():
            shutil.rmtree(lib)
        shutil.copytree(build / "lib" / "cws", lib)

    def start(self, procs: ProcessSet) -> ManagedProcess:
        env = {"MICROPYPATH": f"lib:{FAKES}:.frozen", "CWS_FAKE_HW": str(self.hardware_file)}
        self.proc = procs.start(f"fw-{self.node}", ["sh", "-c", _LOOP, str(MICROPYTHON), self.heap], env=env,
                                cwd=self.root)
        return self.proc

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def stored(self, kind: str = "telemetry") -> list[int]:
        """Seqs of the messages of ``kind`` the board put on flash, across every boot so far."""
        if self.proc is None:
            return []
        mark = f" stored {kind} seq "
        return [int(line.rsplit(" ", 1)[1]) for line in self.proc.log_path.read_text().splitlines()
                if mark in line]

    def resets(self) -> int:
        return self.proc.log_text().splitlines().count("=== board reset") if self.proc else 0
