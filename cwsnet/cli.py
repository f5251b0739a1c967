"""The ``cwsnet`` command line: a thin layer over the library. Errors are one line, no traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import cwsnet
from cwsnet.errors import ConfigError, CwsError

log = logging.getLogger("cwsnet")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _ProbeNoise(logging.Filter):
    """amqtt logs an ERROR for every TCP connection that closes before CONNECT: exactly what a
    health check (docker-compose, `cwsnet up`'s readiness probe) does. Those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "amqtt.broker" and "No data to decode" in record.getMessage():
            return False
        return True


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProbeNoise())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("amqtt", "transitions", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_daemon(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``main(stop)`` until it returns; SIGTERM/SIGINT set ``stop``, a second one cancels."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()
        hits = 0

        def on_signal() -> None:
            nonlocal hits
            hits += 1
            if hits == 1:
                log.info("stopping (signal received)")
                stop.set()
            elif task is not None:
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await main(stop)

    try:
        asyncio.run(runner())
    except asyncio.CancelledError:
        return 1
    return 0


# ---- daemons --------------------------------------------------------------------------------
def cmd_agent(args: argparse.Namespace) -> int:
    from cwsnet.config import AgentConfig, load_config

    cfg = load_config(args.config, AgentConfig)
    from edge_agent.agent import Agent

    async def main(stop: asyncio.Event) -> None:
        await Agent(cfg).run(stop)

    return run_daemon(main)


def cmd_gateway(args: argparse.Namespace) -> int:
    from cwsnet.config import GatewayConfig, load_config

    cfg = load_config(args.config, GatewayConfig)
    from gateway.bridge import Gateway

    async def main(stop: asyncio.Event) -> None:
        await Gateway(cfg).run(stop)

    return run_daemon(main)


def cmd_cloud(args: argparse.Namespace) -> int:
    from cwsnet.config import CloudConfig, load_config

    cfg = load_config(args.config, CloudConfig)
    from cloud.daemon import run_cloud

    async def main(stop: asyncio.Event) -> None:
        task = asyncio.create_task(run_cloud(cfg))
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()
                return
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        finally:
            stopper.cancel()

    return run_daemon(main)


# ---- home lab -------------------------------------------------------------------------------
def _topology(args: argparse.Namespace):  # noqa: ANN202
    from cwsnet.homelab import Topology

    n = args.devices
    if n < 0 or n > 1000:
        raise ConfigError(f"--devices: expected 0..1000, got {n}")
    ports = {"--http-port": args.http_port, "--cloud-port": args.cloud_port, "--gateway-port": args.gateway_port,
             "--cloud-tls-port": args.cloud_tls_port, "--gateway-tls-port": args.gateway_tls_port}
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise ConfigError(f"{flag}: expected a TCP port 1..65535, got {port}")
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"{', '.join(ports)} must differ from each other, got {sorted(ports.values())}")
    if args.telemetry_interval <= 0:
        raise ConfigError(f"--telemetry-interval: expected seconds > 0, got {args.telemetry_interval}")
    from cwsnet.topics import check_name

    try:
        check_name(args.site, "--site")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Topology(
        site=args.site,
        gateway=f"gw-{args.site}",
        devices=[f"dev-{i}" for i in range(1, n + 1)],
        host=args.host,
        http_host=args.http_host,
        cloud_mqtt_port=args.cloud_port,
        gateway_mqtt_port=args.gateway_port,
        http_port=args.http_port,
        telemetry_interval=args.telemetry_interval,
        cloud_host=args.cloud_host,
        gateway_host=args.gateway_host,
        cloud_mqtts_port=args.cloud_tls_port,
        gateway_mqtts_port=args.gateway_tls_port,
        https=args.https,
        tls_names=list(args.tls_name or []),
    )


def cmd_init(args: argparse.Namespace) -> int:
    from cwsnet.homelab import HomeLab

    lab = HomeLab(Path(args.data_dir))
    topo = lab.init(_topology(args))
    print(f"home lab ready in {lab.dir}: site {topo.site}, gateway {topo.gateway}, devices {', '.join(topo.devices)}")
    print(f"  TLS certificates are issued by the CWSNet CA: clients trust {lab.ca_file}")
    return 0


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_ok(url: str, ssl_context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1, context=ssl_context) as r:  # noqa: S310 - loopback URL we built
            return r.status == 200
    except Exception:
        return False


def cmd_up(args: argparse.Namespace) -> int:
    from cwsnet.homelab import HomeLab
    from cwsnet.supervisor import Child, Supervisor, daemon_argv

    lab = HomeLab(Path(args.data_dir))
    topo = lab.init(_topology(args))
    revoked = lab.revoked()
    for d in sorted(revoked & set(topo.devices)):
        print(f"note: {d} is revoked (`cwsnet device revoke`): not started", flush=True)
    eps = lab.endpoints(topo)
    local = "127.0.0.1" if topo.host in ("0.0.0.0", "::") else topo.host
    http_local = "127.0.0.1" if topo.http_host in ("0.0.0.0", "::") else topo.http_host
    scheme = "https" if topo.console_tls else "http"
    http_url = f"{scheme}://[{http_local}]:{topo.http_port}" if ":" in http_local else f"{scheme}://{http_local}:{topo.http_port}"
    # the console's certificate is issued from the CWSNet CA; the probe verifies it like a browser would
    http_ctx = ssl.create_default_context(cafile=str(lab.ca_file)) if topo.console_tls else None
    extra = ["--log-level", args.log_level, "--log-format", args.log_format]

    def child(name: str, kind: str, ready: Callable[[], bool] | None, tier: int) -> Child:
        return Child(name, daemon_argv(kind, lab.config_path(name), extra), lab.path("logs", f"{name}.log"),
                     lab.path("run", f"{name}.pid"), ready, tier, essential=kind != "agent")

    children = [
        child("cloud", "cloud", lambda: _http_ok(f"{http_url}/healthz", http_ctx), 0),
        child(topo.gateway, "gateway", lambda: _port_open(local, topo.gateway_mqtts_port), 1),
    ] + [child(d, "agent", None, 2) for d in topo.devices if d not in revoked]

    sup = Supervisor(children)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, sup.stop)

    def announce() -> None:
        (lab.path("endpoints.json")).write_text(json.dumps(eps, indent=2) + "\n")
        print(f"CWSNet is up: console {eps['console']}", flush=True)
        print(f"  MQTT over TLS: cloud broker {eps['brokers']['cloud']}, site broker {eps['brokers'][topo.gateway]} "
              f"(plaintext on loopback only: {eps['brokers_plain']['cloud']}, "
              f"{eps['brokers_plain'][topo.gateway]})", flush=True)
        print(f"  TLS certificates are issued by the CWSNet CA: clients trust {eps['ca_file']}", flush=True)
        token_file = lab.path("admin.token")
        if token_file.exists():
            print(f"  log in (console or 'Authorization: Bearer TOKEN') with the API token in {token_file}", flush=True)
        else:
            print("  log in with an operator account (see `cwsnet operator --help`)", flush=True)
        print(f"  {lab.path('admin-mqtt.json')} holds a read-only MQTT debugging credential", flush=True)
        print(f"  data dir {lab.dir} (logs in {lab.path('logs')}); Ctrl-C stops everything", flush=True)

    started = time.monotonic()
    code = sup.run(on_ready=announce)
    log.info("up ran for %.0f s", time.monotonic() - started)
    return code


def cmd_version(args: argparse.Namespace) -> int:
    print(f"cwsnet {cwsnet.__version__} (wire protocol v1)")
    return 0


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cwsnet",
        description="CWSNet: sealed device data over MQTT, through site gateways, to a cloud tier.",
        epilog="Quick start: `cwsnet up` runs a cloud, a gateway and 3 simulated devices on this machine.",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: info)")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="log line format (default: text)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def lab_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", default="./cwsnet-data",
                        help="keys, databases, configs and logs (default: ./cwsnet-data); reused by later runs")
        sp.add_argument("--devices", type=int, default=3, help="number of simulated CPython agents (default: 3)")
        sp.add_argument("--site", default="home", help="site name (default: home)")
        sp.add_argument("--host", default="127.0.0.1",
                        help="address the MQTT brokers' TLS listeners listen on (default: 127.0.0.1; 0.0.0.0 to "
                             "let boards on your LAN connect: every client must log in and trust the CWSNet CA)")
        sp.add_argument("--http-host", default="127.0.0.1",
                        help="address the console and REST API listen on (default: 127.0.0.1; beyond loopback "
                             "they are served over HTTPS only; every request needs an operator login or API "
                             "token, see `cwsnet operator`)")
        sp.add_argument("--http-port", type=int, default=8080, help="console and REST API port (default: 8080)")
        sp.add_argument("--https", action="store_true",
                        help="serve the console over HTTPS even on loopback (it always is when --http-host is "
                             "not a loopback address), with a certificate from the CWSNet CA")
        sp.add_argument("--cloud-tls-port", type=int, default=8884,
                        help="cloud MQTT broker's TLS port, on --host: the gateway and the cloud connect here "
                             "(default: 8884)")
        sp.add_argument("--gateway-tls-port", type=int, default=8883,
                        help="site MQTT broker's TLS port, on --host: devices and the gateway connect here "
                             "(default: 8883)")
        sp.add_argument("--cloud-port", type=int, default=1884,
                        help="cloud MQTT broker's plaintext port, on loopback only, for local debugging tools "
                             "(default: 1884)")
        sp.add_argument("--gateway-port", type=int, default=1883,
                        help="site MQTT broker's plaintext port, on loopback only, for local debugging tools "
                             "(default: 1883)")
        sp.add_argument("--tls-name", action="append", metavar="NAME",
                        help="another host name or address clients use to reach this machine; the broker and "
                             "console certificates cover it (repeatable)")
        sp.add_argument("--cloud-host", default=None,
                        help="host name the gateway uses to reach the cloud broker (default: the local address; "
                             "'cloud' in docker-compose); the cloud broker's certificate covers it")
        sp.add_argument("--gateway-host", default=None,
                        help="host name devices use to reach the site broker (default: the local address; "
                             "'gateway' in docker-compose); the site broker's certificate covers it")
        sp.add_argument("--telemetry-interval", type=float, default=2.0,
                        help="seconds between simulated sensor readings (default: 2)")

    sp = sub.add_parser("up", help="run the whole home lab: cloud, one gateway, N simulated devices, console",
                        description="Start the cloud, a gateway and --devices simulated agents as supervised "
                                    "processes on this machine. First run creates keys, the CWSNet CA, TLS "
                                    "certificates and configs in --data-dir; later runs reuse them (renewing a "
                                    "certificate 30 days before it expires). Every MQTT client connects over TLS. "
                                    "Writes {data-dir}/endpoints.json. Ctrl-C stops all.")
    lab_args(sp)
    sp.set_defaults(func=cmd_up)

    sp = sub.add_parser("init", help="create the home-lab data dir (keys, broker users, configs) without starting",
                        description="Create or complete --data-dir: identities (0600), the CWSNet CA and the TLS "
                                    "certificates it issues (renewed 30 days before they expire), broker users and "
                                    "ACLs, one config per daemon. Existing keys and the CA are kept.")
    lab_args(sp)
    sp.set_defaults(func=cmd_init)

    for name, fn, what in (
        ("cloud", cmd_cloud, "the cloud tier: broker, ingest, registry, REST API and console"),
        ("gateway", cmd_gateway, "a site gateway: site broker and the bridge to the cloud"),
        ("agent", cmd_agent, "a CPython edge agent"),
    ):
        sp = sub.add_parser(name, help=f"run {what}", description=f"Run {what} from a YAML config file "
                            "(see docs/operations.md for every key). Stops cleanly on SIGTERM.")
        sp.add_argument("--config", required=True, help="YAML config file")
        sp.set_defaults(func=fn)

    from cwsnet import cli_device

    cli_device.add_parser(sub)
    from cwsnet import cli_flash

    cli_flash.add_parser(sub)
    cli_flash.add_firmware_parser(sub)

    from cwsnet.cli_keys import add_parser as add_keys_parser

    add_keys_parser(sub)

    from cwsnet.cli_operator import add_parser as add_operator_parser

    add_operator_parser(sub)

    from cwsnet.cli_policy import add_parser as add_policy_parser

    add_policy_parser(sub)
    from cwsnet.cli_task import add_parser as add_task_parser
    add_task_parser(sub)

    sp = sub.add_parser("version", help="print the version and wire protocol")
    sp.set_defaults(func=cmd_version)
    return p


#: Exit codes. 2 = bad configuration or refused credentials: restarting cannot help, so the
#: ``cwsnet up`` supervisor does not restart a daemon that exits with it.
EXIT_CONFIG = 2


def _known_error(exc: BaseException) -> BaseException | None:
    """The first CWSNet or link error inside ``exc`` (a daemon's TaskGroup wraps them in groups)."""
    from cwsnet.mqtt import LinkError

    if isinstance(exc, CwsError | LinkError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _known_error(inner)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    from cwsnet.mqtt import AuthRefused

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    where = f"{args.config}: " if getattr(args, "config", None) else ""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        err = _known_error(exc)
        if err is None:
            raise
        if isinstance(err, ConfigError):
            text = str(err) if not where or str(err).startswith(str(args.config)) else where + str(err)
            print(f"cwsnet: error: {text}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(err, AuthRefused):
            print(f"cwsnet: error: {where}the broker refused our credentials: {err}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"cwsnet: error: {where}{err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
