"""``cwsnet flash pi``: install a device's agent on a board.

``flash pi`` puts the CPython agent on a Raspberry Pi (or any Debian-like machine with systemd) over
SSH: it builds a wheel of this cwsnet, renders the device's config for the Pi (the site broker over
TLS, the CWSNet CA, the bundle under ``/etc/cwsnet-agent``, the outbox in ``/var/lib/cwsnet-agent``),
copies them with ``deploy/pi/install.sh`` and ``cwsnet-agent.service`` to a fresh 0700 folder on
the Pi, runs the installer with sudo and removes the folder. ``--dry-run`` prints every file and
command and runs nothing. The bundle's content is never printed. docs/devices.md has the steps.

Each board kind is one sub-action of ``flash`` (:func:`add_parser`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import cwsnet
from cwsnet import pki
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


def _broker(args: argparse.Namespace, lab: HomeLab, topo: Topology, bundle: Bundle) -> tuple[str, int, Path]:
    """The broker the Pi connects to (the site broker, or the cloud broker for a device without a
    gateway): host, TLS port, and the certificate whose names must cover the host."""
    behind_gateway = bundle.gateway is not None
    port = args.broker_port or (topo.gateway_mqtts_port if behind_gateway else topo.cloud_mqtts_port)
    cert = lab.tls_paths(f"site-{topo.site}-broker" if behind_gateway else "cloud-broker")[0]
    what = "site broker" if behind_gateway else "cloud broker"
    host = args.broker_host or (topo.gateway_host if behind_gateway else topo.cloud_host)
    if not host:
        if topo.host in ("0.0.0.0", "::", ""):
            raise ConfigError(f"the {what} listens on every address of this machine: say which name or address the "
                              f"Pi reaches it by with --broker-host (its certificate names "
                              f"{', '.join(n for n in _cert_names(cert) if not is_loopback_host(n)) or '?'})")
        host = topo.host
    if is_loopback_host(host):
        raise ConfigError(f"the {what} is reached at {host}, a loopback address the Pi cannot reach: run "
                          "`cwsnet up --host 0.0.0.0` so boards on the LAN can connect, then pass --broker-host "
                          "with this machine's name or address")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--broker-port: expected a TCP port 1..65535, got {port}")
    names = _cert_names(cert)
    if names and host.strip("[]").lower() not in {n.lower() for n in names}:
        raise ConfigError(f"the {what}'s certificate ({cert}) does not name {host}, so the Pi would refuse it: "
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
    host, port, _cert = _broker(args, lab, topo, bundle)
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
    flash = sub.add_parser("flash", help="install a device's agent on a board: pi (over SSH)",
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
    # (`flash esp32` goes here as another action of fsub)
