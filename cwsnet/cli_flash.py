"""``cwsnet flash pi|esp32`` (install a device's agent on a board) and ``cwsnet firmware build|release``.

``flash pi`` puts the CPython agent on a Raspberry Pi (or any Debian-like machine with systemd) over
SSH: it builds a wheel of this cwsnet, renders the device's config for the Pi (the site broker over
TLS, the CWSNet CA, the bundle under ``/etc/cwsnet-agent``, the outbox in ``/var/lib/cwsnet-agent``),
copies them with ``deploy/pi/install.sh`` and ``cwsnet-agent.service`` to a fresh 0700 folder on
the Pi, runs the installer with sudo and removes the folder. ``--dry-run`` prints every file and
command and runs nothing. The bundle's content is never printed. docs/devices.md has the steps.

``flash esp32`` puts the MicroPython firmware on an ESP32 over USB serial: optionally MicroPython
itself first (``esptool``: ``--erase --firmware FILE.bin``), then the ``.mpy`` build of
``firmware/micropython`` (cwsnet.firmware), its ``main.py`` loader, ``cwsnet/config.json`` (WiFi, the
site broker over TLS, sensors), the device's bundle and the CWSNet CA (``mpremote``, one connection).
The bundle and the WiFi password only ever sit in a fresh 0700 folder, in 0600 files removed
afterwards, and are never printed. ``firmware build`` compiles the firmware; ``firmware release``
builds it into the gateway's OTA folder and prints the task that rolls it out.

Each board kind is one sub-action of ``flash`` (:func:`add_parser`); ``firmware`` is
:func:`add_firmware_parser`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import cwsnet
from cwsnet import firmware, pki
from cwsnet import registry as reg_mod
from cwsnet.bundle import Bundle
from cwsnet.errors import ConfigError, CwsError
from cwsnet.homelab import HomeLab, Topology
from cwsnet.tls import is_loopback_host
from cwsnet.topics import check_name

#: where install.sh puts things on the Pi (the unit's ConfigurationDirectory= and StateDirectory=)
PI_CONF_DIR = "/etc/cwsnet-agent"
PI_STATE_DIR = "/var/lib/cwsnet-agent"
PI_VENV = "/opt/cwsnet/venv"
PI_UNIT = "/etc/systemd/system/cwsnet-agent.service"
#: what the wheel is built from (a copy of them, so the checkout gets no build/ folder)
SOURCE_ITEMS = ("pyproject.toml", "README.md", "cwsnet", "edge_agent", "gateway", "cloud")


@dataclass(frozen=True)
class Upload:
    """One file copied to the Pi: its name in the staging folder, mode, origin and destination."""

    name: str
    mode: int
    origin: str
    dest: str


def _checkout() -> Path:
    """The cwsnet source tree this command runs from (it holds deploy/pi and builds the wheel)."""
    root = Path(cwsnet.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "deploy" / "pi" / "install.sh").is_file():
        raise ConfigError(f"{root} is not a CWSNet checkout (no pyproject.toml and deploy/pi/install.sh): run "
                          "`cwsnet flash pi` from the source tree (`pip install -e .`)")
    return root


def _lab(args: argparse.Namespace) -> tuple[HomeLab, Topology]:
    lab = HomeLab(Path(args.data_dir))
    if not lab.exists():
        raise ConfigError(f"{lab.topology_file}: no home lab here; run `cwsnet init --data-dir {args.data_dir}` "
                          "(or `cwsnet up`) first, or pass the right --data-dir")
    return lab, Topology.load(lab.topology_file)


def _device(lab: HomeLab, name: str) -> tuple[Bundle, Path]:
    """The device's registry entry must be an active device; its bundle must be there and match."""
    try:
        check_name(name, "--device")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    entry = reg_mod.Registry.load(lab.path("registry.json")).get(name)
    if entry is None:
        raise ConfigError(f"--device {name}: unknown device (not in {lab.path('registry.json')}); add it with "
                          f"`cwsnet device add {name} --site SITE`")
    if entry.role != "device":
        raise ConfigError(f"--device {name}: is a {entry.role}, not a device")
    if not entry.active:
        raise ConfigError(f"--device {name}: is revoked; add a new device instead (`cwsnet device add`)")
    path = lab.bundle_path(name)
    if not path.is_file():
        raise ConfigError(f"--device {name}: its provisioning bundle {path} is missing (`cwsnet device add` "
                          "writes it; a device added with --out has it where --out said)")
    bundle = Bundle.load_node(path)
    if bundle.identity.public_b64 != entry.public_key:
        raise ConfigError(f"{path}: this bundle's key is not the one the registry holds for {name} (an "
                          f"interrupted `cwsnet device rotate {name}`? run it again to complete it)")
    return bundle, path


def _broker(lab: HomeLab, topo: Topology, bundle: Bundle, host: str | None, port: int | None, *,
            who: str = "the Pi", flag: str = "--broker-host") -> tuple[str, int, Path]:
    """The broker a board connects to (the site broker, or the cloud broker for a device without a
    gateway): host, TLS port, and the certificate whose names must cover the host. ``host`` and
    ``port`` are what the user asked for (None: the lab's); ``who`` and ``flag`` word the errors."""
    behind_gateway = bundle.gateway is not None
    port = port or (topo.gateway_mqtts_port if behind_gateway else topo.cloud_mqtts_port)
    cert = lab.tls_paths(f"site-{topo.site}-broker" if behind_gateway else "cloud-broker")[0]
    what = "site broker" if behind_gateway else "cloud broker"
    host = host or (topo.gateway_host if behind_gateway else topo.cloud_host)
    if not host:
        if topo.host in ("0.0.0.0", "::", ""):
            raise ConfigError(f"the {what} listens on every address of this machine: say which name or address "
                              f"{who} reaches it by with {flag} (its certificate names "
                              f"{', '.join(n for n in _cert_names(cert) if not is_loopback_host(n)) or '?'})")
        host = topo.host
    if is_loopback_host(host):
        raise ConfigError(f"the {what} is reached at {host}, a loopback address {who} cannot reach: run "
                          f"`cwsnet up --host 0.0.0.0` so boards on the LAN can connect, then pass {flag} "
                          "with this machine's name or address")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag}: expected a TCP port 1..65535, got {port}")
    names = _cert_names(cert)
    if names and host.strip("[]").lower() not in {n.lower() for n in names}:
        raise ConfigError(f"the {what}'s certificate ({cert}) does not name {host}, so {who} would refuse it: "
                          f"run `cwsnet up --tls-name {host} ...` (it renews the certificate) and flash again; "
                          f"it names {', '.join(names)}")
    return host, port, cert


def _cert_names(cert: Path) -> list[str]:
    if not cert.is_file():
        return []
    return [str(g.value) for g in pki.cert_names(pki.load_certificate(cert, "broker certificate"))]


def pi_config(lab: HomeLab, topo: Topology, name: str, bundle: Bundle, host: str, port: int) -> dict[str, Any]:
    """The agent's config on the Pi: absolute paths into the unit's directories, the broker over
    TLS with the CWSNet CA, the ``system`` sensor (the Pi's own CPU, memory, disk, temperature)."""
    cfg = lab.device_config(topo, name, gateway=bundle.gateway is not None)
    cfg["identity_file"] = f"{PI_CONF_DIR}/bundle.json"
    cfg["data_dir"] = PI_STATE_DIR
    cfg["broker"] = {"host": host, "port": port, "tls": {"ca_file": f"{PI_CONF_DIR}/ca.crt"}}
    cfg["sensors"] = [{"type": "system", "stream": "system", "interval": 10.0}]
    return cfg


def _config_text(cfg: dict[str, Any], name: str) -> str:
    return (f"# CWSNet agent {name}: written by `cwsnet flash pi`, replaced by the next one (see docs/devices.md).\n"
            "# Secrets are not here: they are in the 0600 bundle identity_file names.\n"
            + yaml.safe_dump(cfg, sort_keys=False))


def _build_wheel(root: Path, out: Path) -> Path:
    """``pip wheel`` of a copy of the source tree (the checkout gets no build/ folder)."""
    with tempfile.TemporaryDirectory(prefix="cwsnet-src-") as tmp:
        src = Path(tmp) / "cwsnet"
        src.mkdir()
        for item in SOURCE_ITEMS:
            origin = root / item
            if origin.is_dir():
                shutil.copytree(origin, src / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, src / item)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-w", str(out), str(src)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise CwsError(f"building the cwsnet wheel failed (pip exit {done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-1:] or ''}; build one yourself and pass --wheel FILE")
    wheels = sorted(out.glob("cwsnet-*.whl"))
    if len(wheels) != 1:
        raise CwsError(f"building the cwsnet wheel left {len(wheels)} wheels in {out}")
    return wheels[0]


def _show(cmd: list[str]) -> str:
    return shlex.join(cmd)


def cmd_pi(args: argparse.Namespace) -> int:
    lab, topo = _lab(args)
    bundle, bundle_path = _device(lab, args.device)
    host, port, _cert = _broker(lab, topo, bundle, args.broker_host, args.broker_port)
    if not lab.ca_file.is_file():
        raise ConfigError(f"{lab.ca_file}: the CWSNet CA certificate is missing (`cwsnet keys init` creates it)")
    root = _checkout()
    deploy = root / "deploy" / "pi"
    if args.wheel is not None and not Path(args.wheel).is_file():
        raise ConfigError(f"--wheel {args.wheel}: no such file")
    if not args.host or args.host.startswith("-") or any(c.isspace() for c in args.host):
        raise ConfigError(f"--host: a host name or address to reach the Pi by SSH (got {args.host!r})")
    if args.user is not None and (not args.user or args.user.startswith("-") or "@" in args.user
                                  or any(c.isspace() for c in args.user)):
        raise ConfigError(f"--user: an SSH login name (got {args.user!r})")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: expected a TCP port 1..65535, got {args.port}")
    if not args.dry_run:
        for tool in ("ssh", "scp"):
            if shutil.which(tool) is None:
                raise ConfigError(f"no {tool} binary on PATH: install OpenSSH's client (apt-get install "
                                  "openssh-client), or copy the files yourself (docs/devices.md)")

    target = f"{args.user}@{args.host}" if args.user else args.host
    stage_remote = f"/tmp/cwsnet-flash-{secrets.token_hex(6)}"
    wheel_name = Path(args.wheel).name if args.wheel else f"cwsnet-{cwsnet.__version__}-py3-none-any.whl"
    config = _config_text(pi_config(lab, topo, args.device, bundle, host, port), args.device)
    uploads = [
        Upload(wheel_name, 0o644, f"from {args.wheel}" if args.wheel else f"built from {root}",
               f"pip install into {PI_VENV}"),
        Upload("bundle.json", 0o600, f"from {bundle_path}", f"{PI_CONF_DIR}/bundle.json (0600, owner cwsnet)"),
        Upload("agent.yaml", 0o644, "rendered (shown below)", f"{PI_CONF_DIR}/agent.yaml"),
        Upload("ca.crt", 0o644, f"from {lab.ca_file}", f"{PI_CONF_DIR}/ca.crt"),
        Upload("cwsnet-agent.service", 0o644, f"from {deploy / 'cwsnet-agent.service'}", PI_UNIT),
        Upload("install.sh", 0o755, f"from {deploy / 'install.sh'}", "run with sudo on the Pi"),
    ]
    ssh = ["ssh", "-o", "ConnectTimeout=15", "-p", str(args.port)]
    scp = ["scp", "-o", "ConnectTimeout=15", "-P", str(args.port), "-p"]
    sudo = "" if args.user == "root" else "sudo "
    install = (f"{sudo}sh {stage_remote}/install.sh" + (" --no-start" if args.no_start else "")
               + (f" --pip-args {shlex.quote(args.pip_args)}" if args.pip_args else ""))
    remote_run = f"{install}; rc=$?; rm -rf {stage_remote}; exit $rc"
    tty = ["-t"] if sys.stdin.isatty() else []  # sudo may ask for a password

    with tempfile.TemporaryDirectory(prefix="cwsnet-flash-") as tmp:
        stage = Path(tmp)
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(stage),
                 f"<copy of {', '.join(SOURCE_ITEMS)} from {root}>"]
        commands = [
            ssh + [target, f"mkdir -m 700 {stage_remote}"],
            scp + [str(stage / u.name) for u in uploads] + [f"{target}:{stage_remote}/"],
            ssh + tty + [target, remote_run],
        ]
        print(f"cwsnet flash pi: device {args.device} (site {bundle.identity.site}) -> {target} (SSH port "
              f"{args.port}); it will connect to {host}:{port} over TLS")
        print(f"files (staged in {stage}, copied to {target}:{stage_remote}, removed there after the install):")
        width = max(len(u.name) for u in uploads)
        for u in uploads:
            print(f"  {u.mode:04o} {u.name.ljust(width)}  {u.origin}\n       {' ' * width}  -> {u.dest}")
        print("commands:")
        if args.wheel is None:
            print(f"  {_show(build)}")
        for cmd in commands:
            print(f"  {_show(cmd)}")
        print(f"agent.yaml ({PI_CONF_DIR}/agent.yaml on the Pi):")
        print("".join(f"  | {line}\n" for line in config.splitlines()), end="")
        if args.dry_run:
            print("dry run: nothing was built, copied or run")
            return 0
        sys.stdout.flush()

        if args.wheel is None:
            built = _build_wheel(root, stage)
            if built.name != wheel_name:
                built.rename(stage / wheel_name)
        else:
            shutil.copyfile(args.wheel, stage / wheel_name)
        shutil.copyfile(bundle_path, stage / "bundle.json")
        (stage / "agent.yaml").write_text(config)
        shutil.copyfile(lab.ca_file, stage / "ca.crt")
        shutil.copyfile(deploy / "cwsnet-agent.service", stage / "cwsnet-agent.service")
        shutil.copyfile(deploy / "install.sh", stage / "install.sh")
        for u in uploads:
            os.chmod(stage / u.name, u.mode)
        for cmd in commands:
            print(f"+ {_show(cmd)}", flush=True)
            done = subprocess.run(cmd, check=False)
            if done.returncode != 0:
                raise CwsError(f"`{_show(cmd[:1] + cmd[-2:])}` failed with exit code {done.returncode}"
                               + (f" (the staging folder {stage_remote} may be left on the Pi)"
                                  if cmd is not commands[0] else ""))
    print(f"{args.device} is installed on {args.host}: `ssh {target} systemctl status cwsnet-agent`, "
          f"`ssh {target} journalctl -u cwsnet-agent -f`")
    return 0


def add_parser(sub: Any) -> None:
    flash = sub.add_parser("flash", help="install a device's agent on a board: pi (over SSH), esp32 (over USB)",
                           description="Install a device's agent, provisioning bundle and config on a board. "
                                       "Each board kind is an action; docs/devices.md has the steps.")
    fsub = flash.add_subparsers(dest="flash_command", metavar="BOARD", required=True)

    sp = fsub.add_parser(
        "pi", help="a Raspberry Pi (or any systemd machine) over SSH: venv, agent, bundle, systemd unit",
        description="Build a wheel of cwsnet, render the device's config for the Pi, copy them with the "
                    "bundle, the CWSNet CA, deploy/pi/install.sh and the systemd unit over SSH (scp), and run "
                    "the installer with sudo. Running it again upgrades the agent and keeps its outbox.")
    sp.add_argument("--host", required=True, help="the Pi's host name or address (for SSH)")
    sp.add_argument("--device", required=True, help="the device (from `cwsnet device add NAME --site SITE`)")
    sp.add_argument("--user", help="SSH login on the Pi (default: ssh's default); it must be allowed to sudo")
    sp.add_argument("--port", type=int, default=22, help="SSH port (default: 22)")
    sp.add_argument("--data-dir", default="./cwsnet-data", help="the home lab's data dir (default: ./cwsnet-data)")
    sp.add_argument("--broker-host",
                    help="name or address the Pi reaches the site broker by (default: the lab's --gateway-host "
                         "or --host); the broker's certificate must name it (`cwsnet up --tls-name`)")
    sp.add_argument("--broker-port", type=int, help="the broker's TLS port (default: the lab's, 8883)")
    sp.add_argument("--wheel", help="install this cwsnet wheel instead of building one from the checkout")
    sp.add_argument("--pip-args", help="more pip install options for the Pi, e.g. '--index-url URL'")
    sp.add_argument("--no-start", action="store_true", help="install and enable the service, do not start it")
    sp.add_argument("--dry-run", action="store_true",
                    help="print every file (mode, origin, destination) and command; build, copy and run nothing")
    sp.set_defaults(func=cmd_pi)
    add_esp32_parser(fsub)


# ---- cwsnet flash esp32 ---------------------------------------------------------------------------
#: where MicroPython's .bin goes, by chip (micropython.org/download: "esptool.py ... write_flash -z 0x1000")
ESP32_CHIPS = {"esp32": 0x1000, "esp32s2": 0x1000, "esp32s3": 0x0, "esp32c3": 0x0, "esp32c6": 0x0}
#: the board's settings folder (config.json, bundle.json, ca.pem, and the firmware's state, buffer and
#: OTA staging). Not ``cws/``: MicroPython's sys.path puts the board's root before /lib, so a root
#: folder named cws would shadow the lib/cws package (``import cws.app`` fails).
BOARD_DATA = "cwsnet"
#: run on the board (``mpremote run``) before the copy. It makes the folders (``fs mkdir`` fails on
#: an existing one), removes the old firmware's modules (a stale lib/cws/x.py would shadow the new
#: x.mpy: MicroPython imports .py first) and any OTA state (main.py would otherwise swap a staged
#: update in, or roll back, over the flashed firmware). The buffer of unsent data and the state stay.
BOARD_PREPARE = """\
# cwsnet flash esp32: prepare the board's filesystem before the firmware is copied
import os

SEED = 0  # the seq mark for a board without one: the host's clock in ms, plus a day


def exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def rmtree(p):
    if exists(p):
        if os.stat(p)[0] & 0x4000:
            for name in os.listdir(p):
                rmtree(p + "/" + name)
            os.rmdir(p)
        else:
            os.remove(p)


for d in ("lib", "lib/cws", "cwsnet", "cwsnet/state"):
    if not exists(d):
        os.mkdir(d)
for f in os.listdir("lib/cws"):
    if f.endswith(".py") or f.endswith(".mpy"):
        os.remove("lib/cws/" + f)
for p in ("cwsnet/ota/state.json", "cwsnet/ota/new", "cwsnet/ota/prev"):
    rmtree(p)
if SEED and not exists("cwsnet/state/seq"):
    # a wiped board whose clock is not set yet must still never reuse a seq (docs/protocol.md §2)
    import binascii

    t = str(SEED)
    with open("cwsnet/state/seq", "w") as f:
        f.write("%s %d\\n" % (t, binascii.crc32(t.encode())))
print("board ready for the copy")
"""


def board_prepare(now_ms: int) -> str:
    """prepare.py with its seq seed: ``now_ms`` plus a day, so a board whose clock runs a little
    ahead of this host's never hands out a seq it used before its state was wiped."""
    return BOARD_PREPARE.replace("SEED = 0 ", f"SEED = {now_ms + 86_400_000} ", 1)


#: the sensor a board gets without --sensors (like the CPython agent's simulated one)
DEFAULT_SENSORS: list[dict[str, Any]] = [
    {"type": "simulated", "stream": "env", "interval": 10, "fields": ["temperature", "humidity"],
     "pattern": "sine", "offset": 20, "amplitude": 5, "period": 120},
]
ESP32_SETTINGS: dict[str, Any] = {
    "ntp_host": "pool.ntp.org",
    "status_interval": 30,
    "batch": {"max_readings": 10, "max_delay": 60},
    "buffer": {"segment_bytes": 4096, "max_segments": 32},
    "ota": {"health_timeout": 120},
}
PREPARE_FILE = "prepare.py"
SECRET_FILES = (f"{BOARD_DATA}/config.json", f"{BOARD_DATA}/bundle.json")
WIFI_PASSWORD_ENV = "CWSNET_WIFI_PASSWORD"
TOOLS_PIP = "pip install esptool mpremote"
REDACTED = "***"


def find_tool(name: str) -> str | None:
    """An executable of this venv (next to sys.executable: the pinned version), else one on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def _parse_broker(value: str | None) -> tuple[str | None, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``."""
    if value is None:
        return None, None
    v = value.strip()
    port: str | None = None
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"--broker {value}: expected HOST, HOST:PORT or [IPv6]:PORT")
        port = rest[1:] if rest else None
    elif v.count(":") == 1:
        host, port = v.split(":")
    else:
        host = v
    if not host or host.startswith("-") or any(c.isspace() or c in "/@" for c in host):
        raise ConfigError(f"--broker {value}: expected HOST, HOST:PORT or [IPv6]:PORT")
    if port is None:
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--broker {value}: expected a TCP port 1..65535 after the host")
    return host, int(port)


def _esp32_broker(args: argparse.Namespace, lab: HomeLab, topo: Topology, bundle: Bundle) -> dict[str, Any]:
    host, port = _parse_broker(args.broker)
    if not args.plaintext:
        host, port, _cert = _broker(lab, topo, bundle, host, port, who="the board", flag="--broker")
        return {"host": host.strip("[]"), "port": port, "tls": True, "ca_file": f"{BOARD_DATA}/ca.pem"}
    behind_gateway = bundle.gateway is not None
    host = host or topo.plain_host
    if not is_loopback_host(host):
        raise ConfigError(f"--plaintext: refusing a broker without TLS at {host}: the board's MQTT password would "
                          "cross the network in the clear, and anyone on the way could pose as the broker. Drop "
                          "--plaintext (the board then uses TLS and the CWSNet CA); plaintext is only for a broker "
                          "on loopback, e.g. the firmware under the MicroPython unix port")
    port = port or (topo.gateway_mqtt_port if behind_gateway else topo.cloud_mqtt_port)
    return {"host": host.strip("[]"), "port": port, "tls": False, "plaintext": True}


def _wifi_ssid(args: argparse.Namespace) -> str:
    ssid = args.wifi_ssid if args.wifi_ssid is not None else os.environ.get("CWSNET_WIFI_SSID")
    if not ssid:
        raise ConfigError("--wifi-ssid: say which WiFi network the board joins (or set CWSNET_WIFI_SSID)")
    if len(ssid.encode()) > 32:
        raise ConfigError(f"--wifi-ssid {ssid!r}: a WiFi network name is at most 32 bytes")
    return ssid


def _wifi_password(args: argparse.Namespace, ssid: str) -> str | None:
    """From --wifi-password-file (its first line), else $CWSNET_WIFI_PASSWORD, else a prompt on a
    terminal; never a command-line flag (``ps`` would show it). None: unknown, for a dry run."""
    if args.wifi_password_file is not None:
        path = Path(args.wifi_password_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--wifi-password-file {path}: cannot read it ({exc.__class__.__name__})") from None
        password = text.splitlines()[0] if text else ""
        where = f"the first line of {path}"
    elif WIFI_PASSWORD_ENV in os.environ:
        password, where = os.environ[WIFI_PASSWORD_ENV], f"${WIFI_PASSWORD_ENV}"
    elif args.dry_run:
        return None
    elif sys.stdin.isatty():
        password, where = getpass.getpass(f"WiFi password for {ssid} (empty: an open network): "), "the password"
    else:
        raise ConfigError(f"no WiFi password for {ssid}: pass --wifi-password-file FILE (its first line) or set "
                          f"{WIFI_PASSWORD_ENV} (a password is never a command-line flag: `ps` would show it); "
                          "for an open network use an empty file")
    if password and not (8 <= len(password) <= 63 or re.fullmatch(r"[0-9A-Fa-f]{64}", password)):
        raise ConfigError(f"{where}: a WPA2 password is 8 to 63 characters (or 64 hex digits); it has "
                          f"{len(password)}")
    return password


def _sensors(path_arg: str | None) -> list[dict[str, Any]]:
    """The board's sensors from a JSON list, checked shallowly (the firmware checks the rest)."""
    if path_arg is None:
        return json.loads(json.dumps(DEFAULT_SENSORS))
    path = Path(path_arg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--sensors {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of sensors ([{{\"type\": ..., \"stream\": ..., "
                          f"\"interval\": ...}}, ...]), got {type(data).__name__}")
    streams: set[str] = set()
    for i, s in enumerate(data):
        where = f"{path}: sensor {i}"
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: expected an object, got {type(s).__name__}")
        for key in ("type", "stream", "interval"):
            if key not in s:
                raise ConfigError(f"{where}: {key!r} is missing (every sensor has type, stream and interval)")
        if not isinstance(s["type"], str) or not s["type"]:
            raise ConfigError(f"{where}: type: expected a driver name such as simulated, adc, dht22, bme280; "
                              f"got {s['type']!r}")
        try:
            check_name(s["stream"], f"{where}: stream")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if s["stream"] in streams:
            raise ConfigError(f"{where}: stream {s['stream']!r} is used by another sensor too")
        streams.add(s["stream"])
        iv = s["interval"]
        if isinstance(iv, bool) or not isinstance(iv, int | float) or not 0 < iv <= 86400:
            raise ConfigError(f"{where}: interval: expected seconds between readings, 0 < interval <= 86400; "
                              f"got {iv!r}")
    return data


def _hostname(name: str) -> str | None:
    """The board's DHCP host name: the device name with what a host name cannot hold replaced."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", name)[:32].strip("-")
    return host or None


def esp32_config(name: str, ssid: str, password: str, broker: dict[str, Any],
                 sensors: list[dict[str, Any]]) -> dict[str, Any]:
    """``cwsnet/config.json`` on the board (docs/devices.md has every key)."""
    wifi: dict[str, Any] = {"ssid": ssid, "password": password}
    hostname = _hostname(name)
    if hostname:
        wifi["hostname"] = hostname
    return {"wifi": wifi, "broker": broker, "ntp_host": ESP32_SETTINGS["ntp_host"],
            "status_interval": ESP32_SETTINGS["status_interval"], "sensors": sensors,
            "batch": dict(ESP32_SETTINGS["batch"]), "buffer": dict(ESP32_SETTINGS["buffer"]),
            "ota": dict(ESP32_SETTINGS["ota"])}


def config_json(cfg: dict[str, Any]) -> bytes:
    return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()


def redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg))
    out["wifi"]["password"] = REDACTED
    return out


def _firmware_image(path_arg: str, chip: str) -> Path:
    path = Path(path_arg).resolve()
    try:
        head = path.read_bytes()[:1] if path.is_file() else None
    except OSError:
        head = None
    if head is None:
        raise ConfigError(f"--firmware {path_arg}: no such file (download MicroPython's .bin for your board from "
                          f"https://micropython.org/download/?port=esp32, e.g. ESP32_GENERIC)")
    if head != b"\xe9":
        raise ConfigError(f"--firmware {path_arg}: not an ESP32 firmware image (it does not start with the 0xE9 "
                          f"image magic): use the .bin (not .uf2, .elf or .app-bin) for a {chip} from "
                          "https://micropython.org/download/?port=esp32")
    return path


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class BoardFile:
    """One file copied to the board: its path (the same in the staging folder and on the board)."""

    path: str
    size: int
    note: str


def mpremote_command(exe: str, port: str, files: list[BoardFile]) -> list[str]:
    """One mpremote connection, run in the staging folder: prepare the board (BOARD_PREPARE), copy
    every file to the same path on the board (one ``fs cp`` per folder), reset."""
    cmd = [exe, "connect", port, "+", "run", PREPARE_FILE]
    folders: dict[str, list[str]] = {}
    for f in files:
        folders.setdefault(posixpath.dirname(f.path), []).append(f.path)
    for folder, paths in folders.items():
        dest = f":{paths[0]}" if len(paths) == 1 else f":{folder}/"
        cmd += ["+", "fs", "cp", *paths, dest]
    return cmd + ["+", "reset"]


def _step(cmd: list[str], cwd: Path | None) -> str:
    return f"cd {shlex.quote(str(cwd))} && {_show(cmd)}" if cwd is not None else _show(cmd)


def esptool_commands(exe: str, chip: str, port: str, baud: int, image: Path | None, erase: bool) -> list[list[str]]:
    base = [exe, "--chip", chip, "--port", port, "--baud", str(baud)]
    cmds = [base + ["erase-flash"]] if erase else []
    if image is not None:
        cmds.append(base + ["write-flash", "-z", hex(ESP32_CHIPS[chip]), str(image)])
    return cmds


def cmd_esp32(args: argparse.Namespace) -> int:
    lab, topo = _lab(args)
    bundle, bundle_path = _device(lab, args.device)
    if not args.port or args.port.startswith("-") or any(c.isspace() for c in args.port):
        raise ConfigError(f"--port: the board's serial port, e.g. /dev/ttyUSB0 (got {args.port!r})")
    if not 1200 <= args.baud <= 5_000_000:
        raise ConfigError(f"--baud: expected a serial speed such as 115200 or 460800, got {args.baud}")
    if args.erase and args.firmware is None:
        raise ConfigError("--erase wipes the whole flash, MicroPython included: give --firmware FILE.bin with it "
                          "to install MicroPython again")
    image = _firmware_image(args.firmware, args.chip) if args.firmware is not None else None
    broker = _esp32_broker(args, lab, topo, bundle)
    if broker["tls"] and not lab.ca_file.is_file():
        raise ConfigError(f"{lab.ca_file}: the CWSNet CA certificate is missing (`cwsnet keys init` creates it)")
    ssid = _wifi_ssid(args)
    sensors = _sensors(args.sensors)
    root = firmware.check_source(Path(args.source) if args.source else firmware.source_root())
    tools = {"esptool": find_tool("esptool"), "mpremote": find_tool("mpremote")}
    if not args.dry_run:
        for name in ("esptool", "mpremote") if image is not None else ("mpremote",):
            if tools[name] is None:
                raise ConfigError(f"no {name} executable next to {sys.executable} or on PATH: {TOOLS_PIP} "
                                  "(both are cwsnet dependencies)")
    password = _wifi_password(args, ssid)
    cfg = esp32_config(args.device, ssid, password if password is not None else "", broker, sensors)
    esptool = tools["esptool"] or "esptool"
    mpremote = tools["mpremote"] or "mpremote"

    with tempfile.TemporaryDirectory(prefix="cwsnet-esp32-") as tmp:  # mkdtemp: 0700
        stage = Path(tmp)
        build_cmd = ["cwsnet", "firmware", "build", "--source", str(root), "--out", str(stage), "--arch", args.arch]
        print(f"cwsnet flash esp32: device {args.device} (site {bundle.identity.site}) -> {args.chip} on "
              f"{args.port}; it joins WiFi {ssid!r} and connects to {broker['host']}:{broker['port']} "
              + ("over TLS" if broker["tls"] else "WITHOUT TLS (loopback)"))
        print(f"staging folder {stage} (0700, secrets 0600, removed afterwards)")
        print(f"+ 1. {_show(build_cmd)}", flush=True)
        built = firmware.build(stage, root=root, arch=args.arch)
        # the build folder mirrors the board's root: mpremote runs there and copies by relative paths
        board = built.dir
        (board / BOARD_DATA).mkdir(mode=0o700)
        (board / PREPARE_FILE).write_text(board_prepare(int(time.time() * 1000)))
        config_bytes = config_json(cfg)
        files = [BoardFile(f.path, f.size, f"generated: VERSION = {built.version!r}" if f.source == "generated"
                           else "firmware") for f in built.lib_files]
        files.append(BoardFile("main.py", next(f.size for f in built.files if f.path == "main.py"),
                               "the loader, as source"))
        files.append(BoardFile(f"{BOARD_DATA}/config.json", len(config_bytes),
                               "secret: the WiFi password; shown redacted"))
        files.append(BoardFile(f"{BOARD_DATA}/bundle.json", bundle_path.stat().st_size, f"secret: from {bundle_path}"))
        if broker["tls"]:
            files.append(BoardFile(f"{BOARD_DATA}/ca.pem", lab.ca_file.stat().st_size, f"from {lab.ca_file}"))
        steps: list[tuple[list[str], Path | None]] = [
            *((cmd, None) for cmd in esptool_commands(esptool, args.chip, args.port, args.baud, image, args.erase)),
            (mpremote_command(mpremote, args.port, files), board),
        ]
        print(f"firmware {built.version} (mpy-cross -march={built.arch}, {len(built.lib_files)} files in lib/cws, "
              f"manifest sha256 {built.manifest_sha256})")
        print(f"files (staged in {board}, copied to the same path on the board):")
        width = max(len(f.path) for f in files)
        for f in files:
            secret = f.path in SECRET_FILES
            print(f"  {f.size:>7}  {f.path.ljust(width)}  -> :{f.path}{'  (0600)' if secret else ''}  {f.note}")
        print(f"  {sum(f.size for f in files):>7}  total")
        print("steps:")
        print(f"  1. {_show(build_cmd)}  (done)")
        for n, (cmd, cwd) in enumerate(steps, start=2):
            print(f"  {n}. {_step(cmd, cwd)}")
        print(f"{PREPARE_FILE} (run on the board by step {len(steps) + 1} before the copy):")
        prepare = (board / PREPARE_FILE).read_text()
        print("".join(f"  : {line}\n" for line in prepare.splitlines()), end="")
        print(f"{BOARD_DATA}/config.json (the WiFi password shown as ***):")
        print("".join(f"  | {line}\n" for line in json.dumps(redacted(cfg), indent=2).splitlines()), end="")
        if args.dry_run:
            print("dry run: the firmware was built in the staging folder (removed now); nothing was written to "
                  "the board")
            return 0

        _write_secret(board / BOARD_DATA / "config.json", config_bytes)
        _write_secret(board / BOARD_DATA / "bundle.json", bundle_path.read_bytes())
        if broker["tls"]:
            _write_secret(board / BOARD_DATA / "ca.pem", lab.ca_file.read_bytes())
        for f in files:
            if (board / f.path).stat().st_size != f.size:
                raise CwsError(f"{board / f.path}: changed while flashing")
        for n, (cmd, cwd) in enumerate(steps, start=2):
            print(f"+ {n}. {_step(cmd, cwd)}", flush=True)
            done = subprocess.run(cmd, cwd=cwd, check=False)
            if done.returncode != 0:
                tool = Path(cmd[0]).name
                hint = (f"is the board on {args.port} and is it a {args.chip}? If it does not answer, hold BOOT "
                        "while you press EN/RESET, or try a lower --baud" if tool == "esptool" else
                        f"is MicroPython on the board (--erase --firmware FILE.bin installs it) and is {args.port} "
                        "free (no serial monitor or other mpremote open)? Running the same command again is safe")
                raise CwsError(f"step {n} failed: {tool} exited with code {done.returncode}; {hint}")
    repl = _show([mpremote, "connect", args.port, "repl"])
    print(f"{args.device} is flashed with firmware {built.version} and restarting: `{repl}` shows its log (Ctrl-] "
          f"leaves); it shows online in `cwsnet device show {args.device}` and the console once it reaches the broker")
    return 0


def add_esp32_parser(fsub: Any) -> None:
    sp = fsub.add_parser(
        "esp32", help="an ESP32 over USB serial: MicroPython (optional), the firmware, bundle, WiFi and broker",
        description="Build the MicroPython firmware (.mpy), render cwsnet/config.json (WiFi, the site broker over "
                    "TLS with the CWSNet CA, sensors) and copy it with the firmware, its main.py, the device's "
                    "bundle and the CA to the board with mpremote, then reset it. With --erase --firmware FILE "
                    "it first installs MicroPython with esptool. Secrets are staged 0600 in a 0700 folder, "
                    "removed afterwards, and never printed. docs/devices.md has the steps.")
    sp.add_argument("--port", required=True, help="the board's serial port, e.g. /dev/ttyUSB0 or /dev/ttyACM0")
    sp.add_argument("--device", required=True, help="the device (from `cwsnet device add NAME --site SITE`)")
    sp.add_argument("--data-dir", default="./cwsnet-data", help="the home lab's data dir (default: ./cwsnet-data)")
    sp.add_argument("--wifi-ssid", help="the WiFi network the board joins (default: $CWSNET_WIFI_SSID)")
    sp.add_argument("--wifi-password-file", metavar="FILE",
                    help=f"a file whose first line is the WiFi password (else ${WIFI_PASSWORD_ENV}, else a prompt "
                         "on a terminal; an empty line: an open network)")
    sp.add_argument("--broker", metavar="HOST[:PORT]",
                    help="name or address (and TLS port) the board reaches the site broker by (default: the lab's "
                         "--gateway-host or --host, port 8883); the broker's certificate must name it")
    sp.add_argument("--plaintext", action="store_true",
                    help="no TLS: only for a broker on loopback (the firmware under the MicroPython unix port); "
                         "refused for any other host")
    sp.add_argument("--sensors", metavar="FILE.json",
                    help="a JSON list of sensors, each with type, stream and interval (default: one simulated "
                         "sensor, stream env); docs/devices.md lists the drivers")
    sp.add_argument("--erase", action="store_true",
                    help="erase the whole flash first (a blank or foreign board); needs --firmware")
    sp.add_argument("--firmware", metavar="FILE.bin",
                    help="install this MicroPython .bin with esptool first (from micropython.org/download)")
    sp.add_argument("--chip", default="esp32", choices=sorted(ESP32_CHIPS),
                    help="the chip, for esptool and the .bin's flash offset (default: esp32)")
    sp.add_argument("--baud", type=int, default=460800, help="esptool's serial speed (default: 460800)")
    sp.add_argument("--arch", default=firmware.DEFAULT_ARCH, choices=firmware.ARCHES,
                    help=f"mpy-cross architecture (default: {firmware.DEFAULT_ARCH}, the ESP32's)")
    sp.add_argument("--source", metavar="DIR",
                    help="the firmware tree to build (default: firmware/micropython of this checkout)")
    sp.add_argument("--dry-run", action="store_true",
                    help="print every file (size, destination), command and the config (password redacted); "
                         "build the firmware in a temporary folder, touch no board")
    sp.set_defaults(func=cmd_esp32)


# ---- cwsnet firmware build|release ----------------------------------------------------------------
def _print_build(built: firmware.Build) -> None:
    print(f"firmware {built.version}: mpy-cross -march={built.arch} ({built.compiler}) -> {built.dir}")
    width = max(len(f.path) for f in built.files)
    for f in built.files:
        note = ("  (loader: source, not in the manifest)" if f.path == "main.py"
                else "  (generated)" if f.source == "generated" else "")
        print(f"  {f.path.ljust(width)}  {f.size:>7}{note}")
    print(f"  {'total'.ljust(width)}  {built.total:>7} bytes in {len(built.files)} files")
    print(f"manifest {built.manifest_path} sha256 {built.manifest_sha256}")


def cmd_firmware_build(args: argparse.Namespace) -> int:
    built = firmware.build(Path(args.out), root=Path(args.source) if args.source else None,
                           version=args.version, arch=args.arch)
    _print_build(built)
    return 0


def cmd_firmware_release(args: argparse.Namespace) -> int:
    lab, topo = _lab(args)
    ota = lab.path("gateway", "ota")
    built = firmware.build(ota, root=Path(args.source) if args.source else None, version=args.version,
                           arch=args.arch, replace=False)
    _print_build(built)
    body = {"target": "<device>", "handler": "ota",
            "args": {"version": built.version, "manifest_sha256": built.manifest_sha256}}
    api = lab.endpoints(topo)["api"]
    cacert = f"--cacert {shlex.quote(str(lab.ca_file))} " if api.startswith("https:") else ""
    curl = (f"curl -X POST {cacert}-H \"Authorization: Bearer $(cat {shlex.quote(str(lab.path('admin.token')))})\" "
            f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))} {api}/tasks")
    print(f"released: gateway {topo.gateway} serves {built.dir} to its devices (its data_dir's ota/{built.version}/)")
    print("roll it out to a device (it checks the manifest by this hash and each file by the manifest's):")
    print(f"  POST /api/v1/tasks {json.dumps(body)}")
    print(f"  e.g. {curl}")
    return 0


def add_firmware_parser(sub: Any) -> None:
    fw = sub.add_parser("firmware", help="build the ESP32 firmware (.mpy) and release it for OTA updates",
                        description="Compile firmware/micropython for the ESP32 with mpy-cross: lib/cws/*.mpy, a "
                                    "generated lib/cws/version.mpy, main.py (the loader, as source) and "
                                    "manifest.json (the SHA-256 and size of every lib/ file). The build is "
                                    "reproducible. docs/devices.md has the OTA steps.")
    fsub = fw.add_subparsers(dest="firmware_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--version", help="the firmware version, also its folder name (default: cws.__version__ "
                                          "or cwsnet's, + the first 8 hex digits of a SHA-256 over the sources)")
        sp.add_argument("--arch", default=firmware.DEFAULT_ARCH, choices=firmware.ARCHES,
                        help=f"mpy-cross architecture (default: {firmware.DEFAULT_ARCH}, the ESP32's)")
        sp.add_argument("--source", metavar="DIR",
                        help="the firmware tree to build (default: firmware/micropython of this checkout)")

    sp = fsub.add_parser("build", help="compile the firmware into DIR/VERSION/",
                         description="Compile the firmware into DIR/VERSION/ and print its files, sizes and the "
                                     "manifest's SHA-256. An existing DIR/VERSION is replaced.")
    sp.add_argument("--out", default="build/firmware", help="output folder (default: build/firmware)")
    common(sp)
    sp.set_defaults(func=cmd_firmware_build)

    sp = fsub.add_parser("release", help="build into the gateway's OTA folder and print the task that rolls it out",
                         description="Build the firmware into {data-dir}/gateway/ota/VERSION/, which the site "
                                     "gateway serves to its devices, and print the POST /api/v1/tasks call (handler "
                                     "ota) that updates a device. A released version never changes: a different "
                                     "build under an existing version is refused.")
    sp.add_argument("--data-dir", default="./cwsnet-data", help="the home lab's data dir (default: ./cwsnet-data)")
    common(sp)
    sp.set_defaults(func=cmd_firmware_release)
