"""Over-the-air updates: the gateway's release server, and the firmware loader's swap and rollback.

The loader (firmware/micropython/main.py) runs on the real MicroPython unix port in a board
folder whose lib/cws holds a stand-in app that prints its version; every intermediate state a
power cut can leave behind is set up on flash and booted.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from gateway.ota import OtaServer

ROOT = Path(__file__).resolve().parents[1]
MICROPYTHON = Path(sys.executable).parent / "micropython"


# ---- the gateway's release server --------------------------------------------------------------

def release(ota_dir: Path, version: str, files: dict[str, bytes]) -> str:
    d = ota_dir / version
    for path, data in files.items():
        (d / path).parent.mkdir(parents=True, exist_ok=True)
        (d / path).write_bytes(data)
    manifest = json.dumps({"format": 1, "version": version, "files": [
        {"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for p, b in sorted(files.items())]})
    (d / "manifest.json").write_text(manifest)
    return hashlib.sha256(manifest.encode()).hexdigest()


def ask(server: OtaServer, **req) -> dict:
    reply, _ = server.answer(cbor2.dumps(req))
    assert reply is not None
    return reply


def test_server_serves_the_manifest_and_its_files_in_bounded_chunks(tmp_path: Path) -> None:
    big = bytes(range(256)) * 40  # 10,240 bytes: three chunks
    release(tmp_path, "1.2.0", {"lib/cws/app.mpy": b"app", "lib/cws/big.mpy": big})
    (tmp_path / "secret.txt").write_text("not for devices")
    s = OtaServer(tmp_path)
    m = ask(s, v="1.2.0", path="manifest.json", off=0, n=4096)
    assert json.loads(m["data"])["version"] == "1.2.0" and m["size"] == len(m["data"])
    got, off = b"", 0
    while off < len(big):
        r = ask(s, v="1.2.0", path="lib/cws/big.mpy", off=off, n=100_000)
        assert len(r["data"]) <= 4096 and r["size"] == len(big) and r["off"] == off
        got += r["data"]
        off += len(r["data"])
    assert got == big


@pytest.mark.parametrize(("req", "error"), [
    ({"v": "9.9", "path": "manifest.json", "off": 0, "n": 10}, "no firmware release"),
    ({"v": "1.2.0", "path": "../secret.txt", "off": 0, "n": 10}, "not in release"),
    ({"v": "1.2.0", "path": "lib/cws/other.mpy", "off": 0, "n": 10}, "not in release"),
    ({"v": "../1.2.0", "path": "manifest.json", "off": 0, "n": 10}, "bad version name"),
    ({"v": "1.2.0", "path": "lib/cws/app.mpy", "off": 99, "n": 10}, "outside"),
    ({"v": "1.2.0", "path": "lib/cws/app.mpy", "off": -1, "n": 10}, "outside"),
])
def test_server_refuses_what_is_not_in_a_release(tmp_path: Path, req: dict, error: str) -> None:
    release(tmp_path, "1.2.0", {"lib/cws/app.mpy": b"app"})
    (tmp_path / "secret.txt").write_text("not for devices")
    r = ask(OtaServer(tmp_path), **req)
    assert error in r["error"] and "data" not in r


@pytest.mark.parametrize("payload", [b"", b"\xff\x00", cbor2.dumps([1, 2]), cbor2.dumps({"v": 1, "path": "x"}),
                                     cbor2.dumps({"v": "1", "path": "x", "off": "0", "n": 1})])
def test_server_ignores_garbage_requests(tmp_path: Path, payload: bytes) -> None:
    reply, problem = OtaServer(tmp_path).answer(payload)
    assert reply is None and problem


# ---- the loader: swap, trial, rollback --------------------------------------------------------

APP = 'VERSION = "{v}"\n\n\ndef main(root=None):\n    print("running", VERSION)\n    return 0\n{extra}\n'


def board(tmp_path: Path, current: str, staged: str | None = None, state: dict | None = None,
          staged_extra: str = "") -> Path:
    root = tmp_path / "board"
    (root / "lib" / "cws").mkdir(parents=True)
    (root / "main.py").write_bytes((ROOT / "firmware" / "micropython" / "main.py").read_bytes())
    (root / "lib" / "cws" / "__init__.py").write_text("")
    (root / "lib" / "cws" / "app.py").write_text(APP.format(v=current, extra=""))
    (root / "cwsnet" / "ota").mkdir(parents=True)
    if staged is not None:
        new = root / "cwsnet" / "ota" / "new"
        new.mkdir()
        (new / "__init__.py").write_text("")
        (new / "app.py").write_text(APP.format(v=staged, extra=staged_extra))
    if state is not None:
        (root / "cwsnet" / "ota" / "state.json").write_text(json.dumps(state))
    return root


FAKES = ROOT / "tests" / "firmware" / "board"  # machine.reset() exits 75, as a board resets


def boot(root: Path, status: int = 0) -> tuple[str, dict | None]:
    r = subprocess.run([str(MICROPYTHON), "main.py"], cwd=root, env={"MICROPYPATH": f"lib:{FAKES}:.frozen"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == status, r.stdout + r.stderr
    st = root / "cwsnet" / "ota" / "state.json"
    return r.stdout, (json.loads(st.read_text()) if st.exists() else None)


def test_staged_firmware_is_swapped_in_and_put_on_trial(tmp_path: Path) -> None:
    root = board(tmp_path, "1", "2", {"phase": "swap", "version": "2", "previous": "1", "task_id": "t1", "boots": 0})
    out, st = boot(root)
    assert "running 2" in out
    assert st["phase"] == "trial" and st["boots"] == 1
    assert (root / "cwsnet" / "ota" / "prev" / "app.py").read_text().startswith('VERSION = "1"')
    assert not (root / "cwsnet" / "ota" / "new").exists()


def test_a_power_cut_between_the_two_renames_is_completed_at_the_next_boot(tmp_path: Path) -> None:
    root = board(tmp_path, "1", "2", {"phase": "swap", "version": "2", "previous": "1", "boots": 0})
    (root / "lib" / "cws").rename(root / "cwsnet" / "ota" / "prev")  # the first rename happened, then power went
    out, st = boot(root)
    assert "running 2" in out and st["phase"] == "trial"
    assert (root / "cwsnet" / "ota" / "prev" / "app.py").exists()


def test_a_power_cut_after_the_swap_before_the_state_write_is_completed(tmp_path: Path) -> None:
    root = board(tmp_path, "1", "2", {"phase": "swap", "version": "2", "previous": "1", "boots": 0})
    (root / "lib" / "cws").rename(root / "cwsnet" / "ota" / "prev")
    (root / "cwsnet" / "ota" / "new").rename(root / "lib" / "cws")  # both renames done, state still "swap"
    out, st = boot(root)
    assert "running 2" in out and st["phase"] == "trial"
    assert (root / "cwsnet" / "ota" / "prev" / "app.py").read_text().startswith('VERSION = "1"')


def test_firmware_that_never_reports_healthy_is_rolled_back_after_two_boots(tmp_path: Path) -> None:
    root = board(tmp_path, "1", "2", {"phase": "swap", "version": "2", "previous": "1", "task_id": "t9", "boots": 0})
    assert "running 2" in boot(root)[0]  # trial boot 1
    assert "running 2" in boot(root)[0]  # trial boot 2 (a power blip is forgiven once)
    out, st = boot(root)
    assert "running 1" in out and "rolling back" in out
    assert st["phase"] == "rolled_back" and st["task_id"] == "t9" and "did not report healthy" in st["reason"]
    assert not (root / "cwsnet" / "ota" / "prev").exists()


def test_firmware_that_cannot_even_import_is_rolled_back_at_once(tmp_path: Path) -> None:
    root = board(tmp_path, "1", "2", {"phase": "swap", "version": "2", "previous": "1", "boots": 0},
                 staged_extra="raise ImportError('broken build')")
    out, st = boot(root, status=75)  # rolled back, then a reset
    assert st["phase"] == "rolled_back" and "failed to start" in st["reason"] and "broken build" in st["reason"]
    out, st = boot(root)
    assert "running 1" in out


@pytest.mark.parametrize(("extra", "why"), [
    ("def main(root=None):\n    raise TypeError('bad state')\n", "stopped: TypeError"),
    ("def main(root=None):\n    print('CONFIG ERROR: x')\n    return 2\n", "exited with status 2"),
])
def test_firmware_on_trial_that_stops_with_an_error_is_rolled_back(tmp_path: Path, extra: str, why: str) -> None:
    """It imports, but its main() fails (or finds its settings unusable): on an ESP32 that would
    leave the REPL with nothing running; the loader puts the previous firmware back and resets."""
    root = board(tmp_path, "1", "2", {"phase": "swap", "version": "2", "previous": "1", "task_id": "t", "boots": 0},
                 staged_extra=extra)
    out, st = boot(root, status=75)
    assert st["phase"] == "rolled_back" and why in st["reason"], st
    out, st = boot(root)
    assert "running 1" in out


def test_outside_a_trial_an_agent_error_resets_and_a_settings_error_waits(tmp_path: Path) -> None:
    root = board(tmp_path, "1")
    app = root / "lib" / "cws" / "app.py"
    app.write_text("def main(root=None):\n    raise OSError(5, 'EIO')\n")
    out, st = boot(root, status=75)
    assert "resetting" in out and st is None
    app.write_text("def main(root=None):\n    return 2\n")
    boot(root, status=2)  # the REPL stays usable to fix the settings


def test_a_committed_or_absent_state_boots_the_current_firmware_untouched(tmp_path: Path) -> None:
    root = board(tmp_path, "1")
    out, st = boot(root)
    assert "running 1" in out and st is None
    root2 = board(tmp_path / "b", "2", state={"phase": "committed", "version": "2", "previous": "1"})
    out, st = boot(root2)
    assert "running 2" in out and st["phase"] == "committed"


def test_a_device_asking_too_fast_is_throttled_per_device(tmp_path: Path) -> None:
    now = [0.0]
    s = OtaServer(tmp_path, clock=lambda: now[0])
    assert all(s.allow("dev-1") for _ in range(40))  # a burst
    assert not s.allow("dev-1")
    assert s.allow("dev-2")  # others are not affected
    now[0] += 0.5
    assert sum(s.allow("dev-1") for _ in range(20)) == 10  # 20 a second after that
