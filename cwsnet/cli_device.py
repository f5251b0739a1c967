"""``cwsnet device add|list|show|rotate|revoke``: device identities in the registry.

Each command edits ``{data-dir}/registry.json`` under a lock (``cwsnet.registry.editing``); a
running cloud picks the change up within a second, rewrites its broker's users and pushes the
site's part to the gateway, which does the same for the site broker. Provisioning bundles (the
device's secret key and MQTT token) are written with mode 0600 and never printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cwsnet import registry as reg_mod
from cwsnet.bundle import Bundle
from cwsnet.errors import ConfigError
from cwsnet.homelab import HomeLab, Topology
from cwsnet.identity import Identity, new_token, public_key_from_b64
from cwsnet.topics import check_name

RESERVED = ("cloud", "admin", "cloud-ingest")


def _name(value: str, what: str) -> str:
    try:
        return check_name(value, what)
    except ValueError as exc:  # a bad argument: exit 2 like every other input error
        raise ConfigError(str(exc)) from None


def _registry_path(args: argparse.Namespace) -> Path:
    path = Path(args.data_dir) / "registry.json"
    if not path.exists():
        raise ConfigError(f"{path}: no registry here; run `cwsnet init --data-dir {args.data_dir}` (or `cwsnet up`) "
                          "first, or pass the right --data-dir")
    return path


def _cloud_key(data_dir: Path) -> Any:
    path = data_dir / "keys" / "cloud.json"
    return Bundle.load(path).identity.public_key


def fingerprint(public_key_b64: str) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its SHA-256."""
    raw = public_key_from_b64(public_key_b64, "public key")
    return hashlib.sha256(bytes(raw)).hexdigest()[:16]


def _bundle_path(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) if getattr(args, "out", None) else Path(args.data_dir) / "keys" / f"{name}.json"


def cmd_add(args: argparse.Namespace) -> int:
    name, site = _name(args.name, "device name"), _name(args.site, "site")
    if name in RESERVED or name.startswith("cloud-"):
        raise ConfigError(f"device name {name!r} is reserved")
    data_dir = Path(args.data_dir)
    out = _bundle_path(args, name)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another name or --out, or `cwsnet device rotate {name}`")
    cloud_pk = _cloud_key(data_dir)
    ident = Identity.generate(name, site, "device")
    token = new_token()
    with reg_mod.editing(_registry_path(args)) as reg:
        gateways = [] if args.no_gateway else reg.active(site=site, role="gateway")
        if len(gateways) > 1:
            raise ConfigError(f"site {site!r} has {len(gateways)} gateways ({', '.join(g.id for g in gateways)}); "
                              "this command supports one gateway per site")
        if any(name == g.id or name.startswith(f"{g.id}-") for g in gateways):
            raise ConfigError(f"device name {name!r} collides with the client ids of gateway {gateways[0].id!r}")
        gw = gateways[0] if gateways else None
        reg.add(reg_mod.Entry(name, site, "device", ident.public_b64, created=reg_mod.now_ms(),
                              mqtt_token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                              gateway=gw.id if gw else None))
    gw_pk = public_key_from_b64(gw.public_key, f"registry: {gw.id}") if gw else None
    Bundle(ident, cloud_pk, name, token, gw.id if gw else None, gw_pk).save(out)
    print(f"device {name} added to site {site} (key {fingerprint(ident.public_b64)}, version 1)")
    print(f"  provisioning bundle: {out} (mode 0600: copy it to the device, keep it secret)")
    lab = HomeLab(data_dir)
    if lab.exists() and not args.out and Topology.load(lab.topology_file).site == site:
        config = lab.write_device_config(name, gateway=gw is not None)
        print(f"  run it here with: cwsnet agent --config {config}")
    print(f"  it connects to {'gateway ' + gw.id + ' (the site broker)' if gw else 'the cloud broker (no gateway)'}; "
          "running brokers accept it within a second")
    return 0


def cmd_app_add(args: argparse.Namespace) -> int:
    from cwsnet.broker import is_valid_filter
    from cwsnet.topics import app_filter

    name, site = _name(args.name, "app name"), _name(args.site, "site")
    if name in RESERVED or name.startswith("cloud-"):
        raise ConfigError(f"app name {name!r} is reserved")
    for g in args.grant:
        if not is_valid_filter(g) or not g.startswith("cws/v1/") or g.startswith("cws/v1/_apps"):
            raise ConfigError(f"--grant {g!r}: give an MQTT topic filter over device topics, e.g. "
                              "'cws/v1/home/+/telemetry/#' (wildcards + and # as whole levels)")
    out = _bundle_path(args, name)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another name or --out")
    ident = Identity.generate(name, site, "app")
    token = new_token()
    with reg_mod.editing(_registry_path(args)) as reg:
        reg.add(reg_mod.Entry(name, site, "app", ident.public_b64, created=reg_mod.now_ms(),
                              mqtt_token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                              subscribe=tuple(dict.fromkeys(args.grant)), plaintext=args.plaintext_loopback))
    Bundle(ident, _cloud_key(Path(args.data_dir)), name, token).save(out)
    print(f"app {name} added (key {fingerprint(ident.public_b64)}), granted: {' '.join(dict.fromkeys(args.grant))}")
    print(f"  provisioning bundle: {out} (mode 0600: keep it secret)")
    if args.plaintext_loopback:
        print(f"  it reads {app_filter(name)} as JSON, unsealed, on the cloud broker's loopback listener only")
    else:
        print(f"  it reads {app_filter(name)} on the cloud broker; open it with cwsnet.app.AppClient "
              "(see examples/app_print_telemetry.py)")
    return 0


def _rows(reg: reg_mod.Registry, site: str | None, role: str | None) -> list[reg_mod.Entry]:
    return [e for _, e in sorted(reg.nodes.items()) if (site is None or e.site == site)
            and (role is None or e.role == role)]


def _entry_json(e: reg_mod.Entry) -> dict[str, Any]:
    d = e.to_dict()
    d.pop("mqtt_token_sha256", None)
    if e.public_key:
        d["fingerprint"] = fingerprint(e.public_key)
    return d


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def cmd_list(args: argparse.Namespace) -> int:
    reg = reg_mod.Registry.load(_registry_path(args))
    rows = _rows(reg, args.site, None if args.all else getattr(args, "role", "device"))
    if args.json:
        print(json.dumps([_entry_json(e) for e in rows], indent=2))
        return 0
    table = [("ID", "SITE", "ROLE", "STATUS", "KEY", "KV", "GATEWAY", "CREATED")]
    table += [(e.id, e.site, e.role, e.status, fingerprint(e.public_key) if e.public_key else "-", str(e.kv),
               e.gateway or "-", _when(e.created)) for e in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    reg = reg_mod.Registry.load(_registry_path(args))
    e = reg.require(args.name)
    if args.json:
        print(json.dumps(_entry_json(e), indent=2))
        return 0
    print(f"{e.id}: {e.role} of site {e.site}, {e.status}" + (f" since {_when(e.revoked_at)}" if e.revoked_at else ""))
    print(f"  key version {e.kv}, fingerprint {fingerprint(e.public_key) if e.public_key else '-'}")
    for p in e.previous_keys:
        state = "accepted until" if p.until > reg_mod.now_ms() else "retired at"
        print(f"  previous key version {p.kv} ({fingerprint(p.public_key)}): {state} {_when(p.until)}")
    if e.role == "app":
        print(f"  granted: {' '.join(e.subscribe) or '(nothing)'}")
    print(f"  gateway: {e.gateway or '- (talks to the cloud broker)'}; MQTT login: "
          f"{'yes' if e.mqtt_token_sha256 else 'no'}; registered {_when(e.created)}")
    bundle = Path(args.data_dir) / "keys" / f"{e.id}.json"
    if bundle.exists():
        print(f"  provisioning bundle: {bundle}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    """Crash-safe order: the new bundle goes to ``{bundle}.new`` (0600) first, then the registry
    (the cloud knows the new key before the device can use it), then the rename. Interrupted after
    the registry, the next ``rotate`` of the device finds the ``.new`` bundle and completes it."""
    if not 0 <= args.grace <= 365 * 86400:
        raise ConfigError(f"--grace must be between 0 and {365 * 86400} seconds (got {args.grace:g})")
    path = _registry_path(args)
    out = _bundle_path(args, args.name)
    pending = out.with_name(out.name + ".new")
    with reg_mod.editing(path) as reg:
        e = reg.require(args.name)
        if e.role != "device":
            raise ConfigError(f"{args.name!r} is a {e.role}, not a device")
        if pending.exists() and Bundle.load(pending).identity.public_b64 == e.public_key:
            pending.replace(out)  # a rotation interrupted between the registry and the rename
            print(f"device {e.id}: completed the interrupted rotation to key version {e.kv}; run `cwsnet device "
                  "rotate` again for another key")
            return 0
        old = Bundle.load(out) if out.exists() else None
        token = new_token() if args.mqtt_token or old is None or old.mqtt_password is None else old.mqtt_password
        ident = Identity.generate(e.id, e.site, e.role)
        gw = reg.get(e.gateway) if e.gateway else None
        cloud_pk = old.cloud_public_key if old is not None and old.cloud_public_key else \
            _cloud_key(Path(args.data_dir))
        gw_pk = public_key_from_b64(gw.public_key, f"registry: {gw.id}") if gw is not None else None
        Bundle(ident, cloud_pk, e.id, token, gw.id if gw else None, gw_pk, kv=e.kv + 1).save(pending)
        new = reg.rotate(e.id, ident.public_b64, grace=args.grace,
                         mqtt_token_sha256=hashlib.sha256(token.encode()).hexdigest())
    pending.replace(out)
    print(f"device {e.id}: key rotated to version {new.kv} ({fingerprint(new.public_key)})")
    print(f"  provisioning bundle rewritten: {out} (a running CPython agent reloads it within a second; copy it "
          "to a remote device)")
    print(f"  messages sealed with version {new.kv - 1} are accepted for {args.grace:g} s more"
          + ("; the old MQTT token is refused from now on" if args.mqtt_token else ""))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with reg_mod.editing(_registry_path(args)) as reg:
        e = reg.require(args.name)
        if e.role == "cloud":
            raise ConfigError("the cloud's own identity cannot be revoked")
        was_active = e.active
        reg.revoke(e.id)
    if not was_active:
        print(f"{e.id} was already revoked")
        return 0
    print(f"{e.role} {e.id} revoked: running brokers close its connections and refuse it, and the cloud and "
          "gateway refuse its messages, within about a second. This cannot be undone; add a new identity instead.")
    return 0


def add_parser(sub: Any) -> None:
    dev = sub.add_parser("device", help="device identities: add, list, show, rotate, revoke",
                         description="Manage device identities in the registry ({data-dir}/registry.json). "
                                     "Running clouds and gateways apply every change within about a second.")
    dsub = dev.add_subparsers(dest="device_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", default="./cwsnet-data", help="the home lab's data dir (default: ./cwsnet-data)")

    sp = dsub.add_parser("add", help="create a device identity and write its provisioning bundle (0600)",
                         description="Create a device identity (X25519 key pair, MQTT token), register it for "
                                     "SITE behind the site's gateway, and write its provisioning bundle.")
    sp.add_argument("name", help="device name (1-63 of A-Z a-z 0-9 _ . -)")
    sp.add_argument("--site", required=True, help="site the device belongs to")
    sp.add_argument("--out", help="where to write the bundle (default: {data-dir}/keys/NAME.json)")
    sp.add_argument("--no-gateway", action="store_true",
                    help="the device talks to the cloud broker directly, not through the site's gateway")
    common(sp)
    sp.set_defaults(func=cmd_add)

    sp = dsub.add_parser("list", help="list devices (--all: every node)")
    sp.add_argument("--site", help="only this site")
    sp.add_argument("--all", action="store_true", help="every node: cloud, gateways, devices, apps, operators")
    sp.add_argument("--json", action="store_true", help="JSON output (no secrets)")
    common(sp)
    sp.set_defaults(func=cmd_list)

    sp = dsub.add_parser("show", help="one node's keys, versions and status")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true", help="JSON output (no secrets)")
    common(sp)
    sp.set_defaults(func=cmd_show)

    sp = dsub.add_parser("rotate", help="give a device a new key pair (key version + 1); nothing in flight is lost",
                         description="Generate a new key pair for the device, register it as the next key "
                                     "version and rewrite its bundle. Messages it sealed with the old key stay "
                                     "accepted for --grace seconds.")
    sp.add_argument("name")
    sp.add_argument("--grace", type=float, default=reg_mod.DEFAULT_GRACE,
                    help=f"seconds the old key still opens messages sealed before the rotation "
                         f"(default: {reg_mod.DEFAULT_GRACE:g})")
    sp.add_argument("--mqtt-token", action="store_true",
                    help="also issue a new MQTT token (connections using the old one are closed)")
    sp.add_argument("--out", help="where to write the bundle (default: {data-dir}/keys/NAME.json)")
    common(sp)
    sp.set_defaults(func=cmd_rotate)

    sp = dsub.add_parser("revoke", help="revoke a node: brokers disconnect it, the cloud refuses its messages",
                         description="Revoke a node for good: within about a second every running broker "
                                     "disconnects and refuses it and the cloud and gateway refuse its messages.")
    sp.add_argument("name")
    common(sp)
    sp.set_defaults(func=cmd_revoke)

    app = sub.add_parser("app", help="app identities: add (with topic grants), list, show, revoke",
                         description="Apps read device data the cloud re-seals to them on cws/v1/_apps/{app}/... "
                                     "(docs/protocol.md §7). Grants name the device topics an app may read.")
    asub = app.add_subparsers(dest="app_command", metavar="ACTION", required=True)
    sp = asub.add_parser("add", help="create an app identity with topic grants and write its bundle (0600)")
    sp.add_argument("name", help="app name (1-63 of A-Z a-z 0-9 _ . -)")
    sp.add_argument("--grant", action="append", required=True, metavar="FILTER",
                    help="device topics the app may read, e.g. 'cws/v1/home/+/telemetry/#' (repeatable)")
    sp.add_argument("--site", default="home", help="site the app is registered under (default: home)")
    sp.add_argument("--plaintext-loopback", action="store_true",
                    help="deliver its data as JSON, unsealed, for a local tool that cannot open envelopes; the app "
                         "may then connect only on the cloud broker's loopback (plaintext) listener")
    sp.add_argument("--out", help="where to write the bundle (default: {data-dir}/keys/NAME.json)")
    common(sp)
    sp.set_defaults(func=cmd_app_add)
    sp = asub.add_parser("list", help="list apps and their grants")
    sp.add_argument("--json", action="store_true", help="JSON output (no secrets)")
    sp.set_defaults(func=cmd_list, site=None, all=False, role="app")
    common(sp)
    sp = asub.add_parser("show", help="one app's key and grants")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true", help="JSON output (no secrets)")
    common(sp)
    sp.set_defaults(func=cmd_show)
    sp = asub.add_parser("revoke", help="revoke an app: the cloud broker disconnects it, nothing more is sealed to it")
    sp.add_argument("name")
    common(sp)
    sp.set_defaults(func=cmd_revoke)

