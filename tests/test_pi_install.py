"""The Raspberry Pi install path: the systemd unit (systemd-analyze verify), sd_notify from a real
agent (READY, STATUS, WATCHDOG pings, STOPPING), deploy/pi/install.sh into a scratch root
(files, modes, an idempotent upgrade that keeps the outbox) and `cwsnet flash pi` (the plan, the
files it copies, its errors)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from harness import ProcessSet, await_for, wait_for
from harness.deploy import Deployment

from cwsnet import cli_flash, sdnotify
from cwsnet.config import AgentConfig
from edge_agent.agent import Agent

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "pi"
UNIT = DEPLOY / "cwsnet-agent.service"
INSTALL = DEPLOY / "install.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def cwsnet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cwsnet", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# ---- the unit ------------------------------------------------------------------------------------
def rendered_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a cwsnet that exists here (verify checks the binary)."""
    exe = Path(sys.executable).parent / "cwsnet"
    assert exe.exists(), f"{exe}: the venv's cwsnet script (pip install -e .)"
    text = UNIT.read_text().replace("/opt/cwsnet/venv/bin/cwsnet", str(exe))
    assert str(exe) in text
    out = tmp_path / "cwsnet-agent.service"
    out.write_text(text)
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE, "systemd-analyze not found: install Debian's systemd package (make system-deps)"
    unit = rendered_unit(tmp_path)
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # the sandboxing is real: systemd's own exposure score is "OK" (the scale goes 0 .. 10)
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for cwsnet-agent\.service: ([0-9.]+) (\w+)", r.stdout)
    assert score and float(score.group(1)) <= 2.0 and score.group(2) == "OK", r.stdout[-2000:]


def test_unit_settings() -> None:
    s = unit_settings(UNIT.read_text())
    expect = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "User": "cwsnet", "Group": "cwsnet",
        "StateDirectory": "cwsnet-agent", "ConfigurationDirectory": "cwsnet-agent", "Restart": "on-failure",
        "RestartPreventExitStatus": "2", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
        "ExecStart": "/opt/cwsnet/venv/bin/cwsnet agent --config /etc/cwsnet-agent/agent.yaml",
    }
    for key, value in expect.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert "DynamicUser" not in s and "ReadWritePaths" not in s  # StateDirectory= is the only writable place
    assert int(s["RestartSec"][0]) > 0
    # the rendered agent config writes where the unit lets it, and reads the bundle from its config dir
    assert cli_flash.PI_STATE_DIR == "/var/lib/cwsnet-agent" and cli_flash.PI_CONF_DIR == "/etc/cwsnet-agent"


# ---- sd_notify -------------------------------------------------------------------------------------
class NotifySocket:
    """The systemd end: an AF_UNIX datagram socket bound at a path or an abstract name."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.env = address
        self.got: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[dict[str, str]]:
        new = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return new
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.got.append((time.monotonic(), fields))
            new.append(fields)

    def messages(self, key: str) -> list[dict[str, str]]:
        self.drain()
        return [f for _, f in self.got if key in f]

    def close(self) -> None:
        self.sock.close()


def test_notifier_protocol_on_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    server = NotifySocket(path)
    try:
        n = sdnotify.Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
        assert n.enabled and n.watchdog == 15.0
        assert n.ready("starting\nsecond line")
        assert n.status("connected")
        assert not n.status("connected")  # unchanged: not sent again
        assert n.ping()
        assert n.stopping() and not n.stopping()  # once
        got = [f for f in (server.drain())]
        assert got == [{"READY": "1", "STATUS": "starting second line"}, {"STATUS": "connected"},
                       {"WATCHDOG": "1"}, {"STOPPING": "1", "STATUS": "stopping"}]
        server.close()
        os.unlink(path)  # systemd went away: nothing raises, the agent goes on
        assert n.ping() is False and n.status("still here") is False
        n.close()
    finally:
        server.close()


def test_notifier_abstract_socket_and_no_socket() -> None:
    name = f"@cwsnet-test-{uuid.uuid4().hex}"
    server = NotifySocket(name)
    try:
        n = sdnotify.Notifier({"NOTIFY_SOCKET": name})
        assert n.enabled and n.watchdog is None
        assert n.ready("up")
        assert server.drain() == [{"READY": "1", "STATUS": "up"}]
        n.close()
    finally:
        server.close()
    off = sdnotify.Notifier({})
    assert not off.enabled and off.ready("x") is False and off.ping() is False and off.stopping() is False
    assert sdnotify.Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled is False


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5),  # for this process (pid 4242 below)
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),  # for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str], interval: float | None) -> None:
    assert sdnotify.watchdog_interval(env, pid=4242) == interval


def test_a_wedged_event_loop_stops_the_watchdog_pings(tmp_path: Path) -> None:
    """The ping comes from a task on the agent's event loop: while the loop is blocked, none is sent,
    so systemd's WatchdogSec= catches a hung agent."""
    path = str(tmp_path / "notify")
    server = NotifySocket(path)
    every = 0.05
    fake = SimpleNamespace(systemd=sdnotify.Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(int(every * 2e6))}),
                           systemd_status=lambda: "fine")

    async def scenario() -> None:
        loop_task = asyncio.create_task(Agent._systemd_loop(fake))  # type: ignore[arg-type]
        await await_for(lambda: len(server.messages("WATCHDOG")) >= 3, timeout=20, interval=every / 2,
                        message="3 pings")
        server.drain()
        threading.Event().wait(every * 6)  # the event loop is wedged for six ping periods
        assert server.drain() == []  # nothing could be sent meanwhile
        pings = len(server.messages("WATCHDOG"))
        # and it resumes once the loop runs again
        await await_for(lambda: len(server.messages("WATCHDOG")) >= pings + 2, timeout=20, interval=every / 2,
                        message="pings after the wedge")
        loop_task.cancel()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
        assert server.messages("STATUS")[0]["STATUS"] == "fine"
    finally:
        server.close()


@pytest.mark.integration
def test_a_real_agent_notifies_systemd(tmp_path: Path, procs: ProcessSet) -> None:
    """READY=1 with a STATUS, STATUS naming the broker once connected, WATCHDOG=1 never faster than
    half of WATCHDOG_USEC, and STOPPING=1 on SIGTERM, which stops it cleanly (exit 0)."""
    d = Deployment(tmp_path, procs, devices=1)
    d.start("gateway", d.topo.gateway)
    server = NotifySocket(f"@cwsnet-test-{uuid.uuid4().hex}")
    usec = 1_000_000  # pings every 0.5 s
    try:
        started = time.monotonic()
        agent = procs.start("dev-1", [sys.executable, "-m", "cwsnet", "agent", "--config",
                                      str(d.lab.config_path("dev-1"))],
                            env={"NOTIFY_SOCKET": server.env, "WATCHDOG_USEC": str(usec), "WATCHDOG_PID": None})
        wait_for(lambda: server.messages("READY"), timeout=30, message="READY=1")
        first = server.got[0][1]
        assert first["READY"] == "1" and "messages held" in first["STATUS"], first
        where = f"connected to 127.0.0.1:{d.topo.gateway_mqtts_port}"
        wait_for(lambda: any(f["STATUS"].startswith(where) for f in server.messages("STATUS")), timeout=30,
                 message=f"STATUS={where}, ...")
        wait_for(lambda: len(server.messages("WATCHDOG")) >= 5, timeout=30, message="5 watchdog pings")
        pings = len(server.messages("WATCHDOG"))
        elapsed = time.monotonic() - started
        # the agent sleeps half of WATCHDOG_USEC between pings, so it cannot have sent more than this
        assert pings <= elapsed / (usec / 2e6) + 1, (pings, elapsed)
        assert agent.alive
        agent.send_signal(signal.SIGTERM)
        wait_for(lambda: server.messages("STOPPING"), timeout=15, message="STOPPING=1")
        wait_for(lambda: not agent.alive, timeout=15, message="the agent to exit")
        assert agent.returncode == 0, agent.log_tail()
    finally:
        server.close()


# ---- install.sh ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real wheel of this checkout, built the way `cwsnet flash pi` builds it."""
    return cli_flash._build_wheel(REPO, tmp_path_factory.mktemp("wheel"))


def staged(tmp_path: Path, wheel: Path, bundle_text: str = '{"node": "kitchen"}\n') -> Path:
    """What `cwsnet flash pi` copies to the Pi."""
    stage = tmp_path / "stage"
    stage.mkdir(exist_ok=True)
    shutil.copy(wheel, stage / wheel.name)
    shutil.copy(INSTALL, stage / "install.sh")
    shutil.copy(UNIT, stage / "cwsnet-agent.service")
    (stage / "bundle.json").write_text(bundle_text)
    (stage / "bundle.json").chmod(0o600)
    (stage / "agent.yaml").write_text("identity_file: /etc/cwsnet-agent/bundle.json\n")
    (stage / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    return stage


def install(stage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(stage / "install.sh"), "--python", sys.executable,
                           "--pip-args", "--no-deps --no-index", *args],
                          capture_output=True, text=True, timeout=300)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_install_into_a_root_and_upgrade_keeping_the_outbox(tmp_path: Path, wheel: Path) -> None:
    stage = staged(tmp_path, wheel)
    root = tmp_path / "root"
    r = install(stage, "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    conf, state = root / "etc/cwsnet-agent", root / "var/lib/cwsnet-agent"
    assert mode(conf / "bundle.json") == 0o600 and (conf / "bundle.json").read_text() == '{"node": "kitchen"}\n'
    assert mode(conf / "agent.yaml") == 0o644 and mode(conf / "ca.crt") == 0o644 and mode(conf) == 0o755
    assert state.is_dir() and mode(state) == 0o700
    unit = root / "etc/systemd/system/cwsnet-agent.service"
    assert unit.read_text() == UNIT.read_text() and mode(unit) == 0o644
    wants = root / "etc/systemd/system/multi-user.target.wants/cwsnet-agent.service"
    assert wants.is_symlink() and os.readlink(wants).endswith("/etc/systemd/system/cwsnet-agent.service")
    venv = root / "opt/cwsnet/venv"
    assert (venv / "bin/cwsnet").exists()
    assert list((venv / "lib").glob("python3*/site-packages/cwsnet/cli_flash.py"))
    assert not list(root.rglob("*.new")) and not list(root.rglob(".*.rendered"))
    assert "skipped (--root): useradd cwsnet" in r.stdout and "+ systemctl --root=" in r.stdout

    # the agent ran: its outbox holds undelivered data. A second run (a new bundle, say after
    # `cwsnet device rotate`) upgrades in place and never touches the outbox
    (state / "outbox.db").write_bytes(b"held messages")
    (state / "outbox.db").chmod(0o600)
    stage = staged(tmp_path, wheel, bundle_text='{"node": "kitchen", "kv": 2}\n')
    r = install(stage, "--root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "# reusing the venv" in r.stdout and " -m venv " not in r.stdout
    assert (state / "outbox.db").read_bytes() == b"held messages" and mode(state / "outbox.db") == 0o600
    assert (conf / "bundle.json").read_text() == '{"node": "kitchen", "kv": 2}\n' and mode(conf / "bundle.json") == 0o600
    assert "--force-reinstall" in r.stdout  # the same version's rebuilt code replaces the old


def test_install_prefix_renders_the_unit(tmp_path: Path, wheel: Path) -> None:
    stage = staged(tmp_path, wheel)
    root = tmp_path / "root"
    r = install(stage, "--root", str(root), "--prefix", "/srv/cwsnet")
    assert r.returncode == 0, r.stdout + r.stderr
    s = unit_settings((root / "etc/systemd/system/cwsnet-agent.service").read_text())
    assert s["ExecStart"] == ["/srv/cwsnet/venv/bin/cwsnet agent --config /etc/cwsnet-agent/agent.yaml"]
    assert (root / "srv/cwsnet/venv/bin/cwsnet").exists() and not (root / "opt").exists()


def test_install_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path, wheel: Path) -> None:
    stage = staged(tmp_path, wheel)
    root = tmp_path / "root"
    r = install(stage, "--root", str(root), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert not root.exists()
    assert f"+ {sys.executable} -m venv {root}/opt/cwsnet/venv" in r.stdout
    assert f"+ install -m 0600 {stage}/bundle.json {root}/etc/cwsnet-agent/bundle.json.new" in r.stdout
    # for the real system (as root, here only printed): the user, ownership and systemctl steps
    if Path("/etc/cwsnet-agent").exists() or Path("/opt/cwsnet").exists():
        pytest.skip("this machine has a real cwsnet-agent install")
    r = install(stage, "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    if subprocess.run(["getent", "passwd", "cwsnet"], capture_output=True).returncode != 0:
        assert "+ useradd --system --user-group --home-dir /var/lib/cwsnet-agent --no-create-home" in out
    for line in ["+ install -m 0600 -o cwsnet -g cwsnet", "+ install -d -m 0700 -o cwsnet -g cwsnet /var/lib/cwsnet-agent",
                 "+ install -m 0644 " + str(stage / "cwsnet-agent.service") + " /etc/systemd/system/cwsnet-agent.service.new",
                 "+ systemctl daemon-reload", "+ systemctl --quiet enable cwsnet-agent.service",
                 "+ systemctl restart cwsnet-agent.service"]:
        assert line in out, (line, out)
    assert not Path("/etc/cwsnet-agent").exists() and not Path("/opt/cwsnet").exists()


@pytest.mark.parametrize(("change", "args", "message"), [
    ("no-bundle", [], "bundle.json: no such file"),
    ("no-wheel", [], "no cwsnet-*.whl in"),
    ("", ["--frobnicate"], "unknown option --frobnicate"),
    ("", ["--prefix", "opt"], "--prefix must be an absolute path"),
    ("", ["--user", "Bad User"], "--user: a system user name"),
    ("", ["--python", "/nonexistent/python3"], "is not Python 3.11 or later"),
    ("", ["--wheel"], "--wheel needs a value"),
])
def test_install_errors(tmp_path: Path, wheel: Path, change: str, args: list[str], message: str) -> None:
    stage = staged(tmp_path, wheel)
    if change == "no-bundle":
        (stage / "bundle.json").unlink()
    if change == "no-wheel":
        (stage / wheel.name).unlink()
    r = subprocess.run(["sh", str(stage / "install.sh"), "--root", str(tmp_path / "root"), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "root").exists()


def test_install_sh_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    r = subprocess.run([shellcheck, "-s", "sh", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


# ---- cwsnet flash pi --------------------------------------------------------------------------
@pytest.fixture
def lab(tmp_path: Path) -> Path:
    data = tmp_path / "lab"
    r = cwsnet("init", "--data-dir", str(data), "--devices", "0", "--host", "0.0.0.0", "--tls-name", "gw.lan")
    assert r.returncode == 0, r.stderr
    r = cwsnet("device", "add", "kitchen", "--site", "home", "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    return data


def flash(data: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cwsnet("flash", "pi", "--host", "pi.lan", "--user", "pi", "--device", "kitchen", "--data-dir", str(data),
                  *args, env=env)


def plan_config(stdout: str) -> dict:
    return yaml.safe_load("\n".join(line[4:] for line in stdout.splitlines() if line.startswith("  | ")))


def test_flash_pi_dry_run_prints_the_whole_plan(lab: Path) -> None:
    r = flash(lab, "--broker-host", "gw.lan", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    bundle = json.loads((lab / "keys/kitchen.json").read_text())
    for secret in (bundle["secret_key"], bundle["mqtt_password"]):
        assert secret not in out and secret not in r.stderr
    assert "device kitchen (site home) -> pi@pi.lan (SSH port 22); it will connect to gw.lan:8883 over TLS" in out
    files = {
        "cwsnet-0.1.0-py3-none-any.whl": ("0644", f"built from {REPO}", "pip install into /opt/cwsnet/venv"),
        "bundle.json": ("0600", f"from {lab.resolve()}/keys/kitchen.json", "/etc/cwsnet-agent/bundle.json (0600"),
        "agent.yaml": ("0644", "rendered", "/etc/cwsnet-agent/agent.yaml"),
        "ca.crt": ("0644", f"from {lab.resolve()}/ca/ca.crt", "/etc/cwsnet-agent/ca.crt"),
        "cwsnet-agent.service": ("0644", f"from {UNIT}", "/etc/systemd/system/cwsnet-agent.service"),
        "install.sh": ("0755", f"from {INSTALL}", "run with sudo on the Pi"),
    }
    lines = out.splitlines()
    for name, (m, origin, dest) in files.items():
        i = next(i for i, line in enumerate(lines) if re.match(rf"  {m} {re.escape(name)} +{re.escape(origin)}", line))
        assert f"-> {dest}" in lines[i + 1], (name, lines[i + 1])
    stage = re.search(r"copied to pi@pi\.lan:(/tmp/cwsnet-flash-[0-9a-f]{12}),", out).group(1)
    commands = [line[2:] for line in lines[lines.index("commands:") + 1:lines.index(next(
        line for line in lines if line.startswith("agent.yaml (")))]]
    assert len(commands) == 4, commands
    assert " -m pip wheel --no-deps -w " in commands[0]
    assert commands[1] == f"ssh -o ConnectTimeout=15 -p 22 pi@pi.lan 'mkdir -m 700 {stage}'"
    assert commands[2].startswith("scp -o ConnectTimeout=15 -P 22 -p ") and commands[2].endswith(f" pi@pi.lan:{stage}/")
    assert [Path(p).name for p in commands[2].split()[6:-1]] == list(files)
    assert commands[3] == (f"ssh -o ConnectTimeout=15 -p 22 pi@pi.lan 'sudo sh {stage}/install.sh; rc=$?; "
                           f"rm -rf {stage}; exit $rc'")
    cfg = plan_config(out)
    assert cfg["identity_file"] == "/etc/cwsnet-agent/bundle.json" and cfg["data_dir"] == "/var/lib/cwsnet-agent"
    assert cfg["broker"] == {"host": "gw.lan", "port": 8883, "tls": {"ca_file": "/etc/cwsnet-agent/ca.crt"}}
    AgentConfig.model_validate(cfg)  # a valid agent config
    assert out.rstrip().endswith("dry run: nothing was built, copied or run")


def test_flash_pi_copies_and_runs_with_ssh(lab: Path, tmp_path: Path, wheel: Path) -> None:
    """Stub ssh and scp record what they were asked to do; scp copies into a folder standing for
    the Pi: the bundle arrives 0600 and unchanged, install.sh and the unit as in deploy/pi."""
    pi = tmp_path / "pi"
    pi.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ssh.log"
    (bindir / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\n" "ssh $*" >> {log}\n')
    (bindir / "scp").write_text(f'#!/bin/sh\nprintf "%s\\n" "scp $*" >> {log}\n'
                                'for last; do :; done\n'
                                'for f; do [ "$f" = "$last" ] || case $f in /*) cp -p "$f" ' + str(pi) + '/ ;; esac; done\n')
    for f in ("ssh", "scp"):
        (bindir / f).chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    r = flash(lab, "--broker-host", "gw.lan", "--port", "2222", "--wheel", str(wheel), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and calls[0].startswith("ssh -o ConnectTimeout=15 -p 2222 pi@pi.lan mkdir -m 700 ")
    assert calls[1].startswith("scp -o ConnectTimeout=15 -P 2222 -p ")
    assert re.search(r"sudo sh /tmp/cwsnet-flash-\w+/install\.sh; rc=\$\?; rm -rf", calls[2])
    assert mode(pi / "bundle.json") == 0o600
    assert (pi / "bundle.json").read_bytes() == (lab / "keys/kitchen.json").read_bytes()
    assert (pi / "install.sh").read_bytes() == INSTALL.read_bytes() and mode(pi / "install.sh") == 0o755
    assert (pi / "cwsnet-agent.service").read_bytes() == UNIT.read_bytes()
    assert (pi / wheel.name).read_bytes() == wheel.read_bytes()
    assert yaml.safe_load((pi / "agent.yaml").read_text()) == plan_config(r.stdout)
    assert (pi / "ca.crt").read_bytes() == (lab / "ca/ca.crt").read_bytes()


def test_flash_pi_errors(lab: Path, tmp_path: Path) -> None:
    def fails(r: subprocess.CompletedProcess[str], message: str) -> None:
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr

    fails(cwsnet("flash", "pi", "--host", "pi.lan", "--device", "nope", "--data-dir", str(lab), "--dry-run"),
          "--device nope: unknown device")
    fails(flash(tmp_path / "elsewhere", "--dry-run"), "no home lab here")
    fails(flash(lab, "--dry-run"), "listens on every address of this machine: say which name or address")
    fails(flash(lab, "--broker-host", "other.lan", "--dry-run"), "does not name other.lan")
    fails(flash(lab, "--broker-host", "127.0.0.1", "--dry-run"), "a loopback address the Pi cannot reach")
    fails(flash(lab, "--broker-host", "gw.lan", "--wheel", str(tmp_path / "no.whl"), "--dry-run"),
          "--wheel " + str(tmp_path / "no.whl") + ": no such file")
    # no ssh on PATH (checked before anything is built or copied)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    fails(flash(lab, "--broker-host", "gw.lan", env=dict(os.environ, PATH=str(empty))), "no ssh binary on PATH")
    # the bundle went missing
    (lab / "keys/kitchen.json").rename(tmp_path / "kitchen.json")
    fails(flash(lab, "--broker-host", "gw.lan", "--dry-run"), "its provisioning bundle")
    (tmp_path / "kitchen.json").rename(lab / "keys/kitchen.json")
    # a revoked device
    assert cwsnet("device", "revoke", "kitchen", "--data-dir", str(lab)).returncode == 0
    fails(flash(lab, "--broker-host", "gw.lan", "--dry-run"), "--device kitchen: is revoked")


def test_flash_pi_needs_a_lab_reachable_from_the_lan(tmp_path: Path) -> None:
    data = tmp_path / "lab"
    assert cwsnet("init", "--data-dir", str(data), "--devices", "1").returncode == 0
    r = cwsnet("flash", "pi", "--host", "pi.lan", "--device", "dev-1", "--data-dir", str(data), "--dry-run")
    assert r.returncode == 2 and "127.0.0.1, a loopback address the Pi cannot reach" in r.stderr, r.stderr
    assert "cwsnet up --host 0.0.0.0" in r.stderr
