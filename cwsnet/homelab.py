"""The home-lab data dir: identities, broker credentials and ACLs, daemon configs, the topology.

``cwsnet init`` (and ``cwsnet up``, which calls it) creates everything on first run and reuses it
after: keys are never regenerated, so devices keep working across restarts. Layout::

    {data-dir}/homelab.json            topology: site, ports, node names (no secrets)
    {data-dir}/registry.json           every identity: public keys and versions, status, token hashes,
                                       grants (cwsnet.registry; edited by `cwsnet device|app`)
    {data-dir}/keys/{node}.json        provisioning bundles (0600)
    {data-dir}/brokers/*.json          broker users (token hashes) and topic ACLs, derived from the
                                       registry (0600; kept current by the cloud and the gateway)
    {data-dir}/admin.token             the admin's API token, written by the cloud's first start (0600)
    {data-dir}/admin-mqtt.json         a read-only MQTT debugging credential for every broker (0600)
    {data-dir}/ca/ca.crt, ca.key       the CWSNet CA that issues every TLS certificate (key 0600)
    {data-dir}/tls/*.crt, *.key        TLS certificates of the brokers and the console (keys 0600)
    {data-dir}/config/{node}.yaml      one config per daemon
    {data-dir}/cloud/ gateway/ agents/{node}/   databases
    {data-dir}/run/{name}.pid  logs/{name}.log  endpoints.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cwsnet import pki
from cwsnet import registry as registry_mod
from cwsnet.bundle import Bundle
from cwsnet.errors import ConfigError
from cwsnet.identity import Identity, load_json_file, new_token, write_secret_file
from cwsnet.tls import is_loopback_host
from cwsnet.topics import check_name

log = logging.getLogger("cwsnet.homelab")


@dataclass
class Topology:
    site: str = "home"
    gateway: str = "gw-home"
    devices: list[str] = field(default_factory=lambda: ["dev-1", "dev-2", "dev-3"])
    host: str = "127.0.0.1"
    http_host: str = "127.0.0.1"  # beyond loopback the console is served over HTTPS only
    cloud_mqtt_port: int = 1884
    gateway_mqtt_port: int = 1883
    http_port: int = 8080
    cloud_host: str | None = None  # how other daemons reach the cloud broker (default: local address)
    gateway_host: str | None = None  # how devices reach the site broker (default: local address)
    telemetry_interval: float = 2.0
    status_interval: float = 10.0
    # every daemon and board connects over TLS (certificates from the CWSNet CA); cloud_mqtt_port and
    # gateway_mqtt_port are plaintext listeners on loopback only, for local debugging tools
    cloud_mqtts_port: int = 8884
    gateway_mqtts_port: int = 8883
    https: bool = False  # the console over HTTPS even on loopback (always when http_host is not loopback)
    tls_names: list[str] = field(default_factory=list)  # more host names/addresses the certificates cover

    @property
    def console_tls(self) -> bool:
        return self.https or not is_loopback_host(self.http_host)

    @property
    def plain_host(self) -> str:
        """Where the plaintext listeners bind: ``host`` if it is loopback, else 127.0.0.1."""
        return self.host if is_loopback_host(self.host) else "127.0.0.1"

    @classmethod
    def load(cls, path: Path) -> Topology:
        d = load_json_file(path, "home-lab topology")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _token_sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class HomeLab:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir.resolve()

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    @property
    def topology_file(self) -> Path:
        return self.path("homelab.json")

    def bundle_path(self, node: str) -> Path:
        return self.path("keys", f"{node}.json")

    def config_path(self, node: str) -> Path:
        return self.path("config", f"{node}.yaml")

    def exists(self) -> bool:
        return self.topology_file.exists()

    def init(self, topo: Topology) -> Topology:
        """Create (or complete) the data dir; existing keys and tokens are kept."""
        for name in [topo.site, topo.gateway, *topo.devices]:
            check_name(name, "node or site")
        for d in topo.devices:
            # device names are MQTT users and client ids: they must not collide with the others
            if d in ("cloud", "admin", topo.gateway) or d.startswith(f"{topo.gateway}-") or d == "cloud-ingest":
                raise ConfigError(f"device name {d!r} is reserved (cloud, admin, the gateway and its "
                                  f"{topo.gateway}-* client ids)")
        if len(set(topo.devices)) != len(topo.devices):
            raise ConfigError("device names must be unique")
        if self.exists():
            old = Topology.load(self.topology_file)
            if (old.site, old.gateway) != (topo.site, topo.gateway):
                raise ConfigError(
                    f"{self.topology_file}: this data dir holds site {old.site!r} (gateway {old.gateway!r}); "
                    f"it cannot become site {topo.site!r}: use another --data-dir"
                )
            # keys of devices no longer asked for are kept (and stay registered), just not run
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # databases hold opened (decrypted) data
        for sub in ("keys", "brokers", "config", "cloud", "gateway", "agents", "run", "logs"):
            self.path(sub).mkdir(exist_ok=True)
        self.path("keys").chmod(0o700)
        self.path("brokers").chmod(0o700)

        cloud = self._bundle("cloud", topo.site, "cloud", None)
        cloud_pk = cloud.identity.public_key
        gw = self._bundle(topo.gateway, topo.site, "gateway", cloud_pk)
        devs = [self._bundle(d, topo.site, "device", cloud_pk, gw) for d in topo.devices]

        # devices provisioned by an earlier run but not asked for now: kept, registered, allowed to
        # connect (a flashed board, a hand-run agent); `up` just does not run them
        known = sorted(p.stem for p in self.path("keys").glob("*.json") if p.stem not in ("cloud", topo.gateway))
        # (apps and devices `cwsnet device add --no-gateway` made are in the registry already: untouched)
        kept = [self._bundle(n, topo.site, "device", cloud_pk, gw) for n in known
                if n not in topo.devices and self._behind_gateway(n, topo.gateway)]
        admin = self._admin_credential()
        with registry_mod.editing(self.path("registry.json"), create=True) as reg:
            for b, gw_name in [(cloud, None), (gw, None), *((d, topo.gateway) for d in [*devs, *kept])]:
                self._register(reg, b, gw_name)
            if reg.get(admin["username"]) is None:
                # the read-only debugging user on every broker: sees every (sealed) payload, publishes nothing
                reg.add(registry_mod.Entry(admin["username"], topo.site, "operator", "", created=registry_mod.now_ms(),
                                           mqtt_token_sha256=_token_sha(admin["password"]), subscribe=("#",)))
        # broker users are derived from the registry, their topic ACLs from the access policies (shipped
        # and the lab's own); the cloud and the gateway keep them current while they run (a `cwsnet
        # device` change or a policy edit reaches both within a second)
        access = self.access_engine()
        write_secret_file(self.path("brokers", "cloud-users.json"), registry_mod.cloud_broker_users(reg, access))
        write_secret_file(self.path("brokers", f"site-{topo.site}-users.json"),
                          registry_mod.site_broker_users(reg, topo.site, access))

        self.ensure_tls(topo)
        self._write_configs(topo)
        self.topology_file.write_text(json.dumps(asdict(topo), indent=2) + "\n")
        return topo

    def access_engine(self) -> Any:
        """The access policies of this lab: the shipped defaults plus ``{data-dir}/policies``. Invalid site
        files are reported (logged, with every problem) and the defaults alone apply, as in the cloud."""
        from cwsnet.policy import AccessEngine, PolicyError, load_policies
        from cwsnet.policy.watch import shipped_policies

        try:
            return AccessEngine(load_policies([shipped_policies(), self.path("policies")]))
        except PolicyError as exc:
            log.error("the lab's policies are refused, the shipped defaults apply:\n%s", "\n".join(exc.problems))
            return AccessEngine(load_policies([shipped_policies()]))

    def revoked(self) -> set[str]:
        """Nodes the registry marks revoked (``up`` does not run them)."""
        path = self.path("registry.json")
        if not path.exists():
            return set()
        return {n for n, e in registry_mod.Registry.load(path).nodes.items() if not e.active}

    def _behind_gateway(self, node: str, gateway: str) -> bool:
        """A device bundle of this lab whose registry entry (if any) puts it behind ``gateway``."""
        try:
            b = Bundle.load(self.bundle_path(node))
        except ConfigError:
            return False
        if b.identity.role != "device":
            return False
        path = self.path("registry.json")
        e = registry_mod.Registry.load(path).get(node) if path.exists() else None
        return e is None or e.gateway == gateway

    @staticmethod
    def _register(reg: registry_mod.Registry, b: Bundle, gateway: str | None) -> None:
        """Add a node's bundle to the registry, or bring its MQTT token hash and gateway up to date.

        An existing entry keeps its key versions and status: `init` never un-revokes a node or
        undoes a rotation.
        """
        ident = b.identity
        token = _token_sha(b.mqtt_password) if b.mqtt_password else None
        e = reg.get(ident.node)
        if e is None:
            reg.add(registry_mod.Entry(ident.node, ident.site, ident.role, ident.public_b64, kv=b.kv,
                                       created=registry_mod.now_ms(), mqtt_token_sha256=token, gateway=gateway))
        elif e.active and e.public_key == ident.public_b64 and (e.mqtt_token_sha256, e.gateway) != (token, gateway):
            reg.put(dataclasses.replace(e, mqtt_token_sha256=token, gateway=gateway))

    def _admin_credential(self) -> dict[str, Any]:
        path = self.path("admin-mqtt.json")
        if path.exists():
            return load_json_file(path, "admin MQTT credential")
        cred = {"username": "admin", "password": new_token(),
                "note": "read-only MQTT user on every broker of this home lab (may subscribe to #), for debugging"}
        write_secret_file(path, cred)
        return cred

    def _bundle(self, node: str, site: str, role: str, cloud_pk: Any, gateway: Bundle | None = None) -> Bundle:
        """Load or create a node's bundle, bringing the cloud's and its gateway's keys up to date."""
        gw_name = gateway.identity.node if gateway is not None else None
        gw_pk = gateway.identity.public_key if gateway is not None else None
        path = self.bundle_path(node)
        if path.exists():
            b = Bundle.load(path)
            if b.identity.site != site or b.identity.role != role:
                raise ConfigError(f"{path}: existing identity is {b.identity.role} of site {b.identity.site}, "
                                  f"not {role} of {site}; remove it or choose another name")
            want = Bundle(b.identity, cloud_pk if cloud_pk is not None else b.cloud_public_key, b.mqtt_username,
                          b.mqtt_password, gw_name if gateway is not None else b.gateway,
                          gw_pk if gateway is not None else b.gateway_public_key, b.kv)
            if want != b:
                want.save(path)
            return want
        b = Bundle(Identity.generate(node, site, role), cloud_pk, node, new_token(), gw_name, gw_pk)
        b.save(path)
        return b

    def _dump(self, node: str, data: dict[str, Any]) -> None:
        text = ("# generated from homelab.json by `cwsnet init`/`cwsnet up`/`cwsnet device add`, and rewritten by\n"
                "# each run; to customise, copy it elsewhere and run `cwsnet <daemon> --config COPY`.\n"
                "# Secrets are not here: they live in the 0600 files it points at.\n")
        text += yaml.safe_dump(data, sort_keys=False)
        self.config_path(node).write_text(text)

    def device_config(self, t: Topology, node: str, *, gateway: bool = True) -> dict[str, Any]:
        """An agent's config: its bundle, the site broker (or, for a device without a gateway, the
        cloud broker) over TLS, a system and a simulated sensor."""
        local = "127.0.0.1" if t.host in ("0.0.0.0", "::") else t.host
        broker = ({"host": t.gateway_host or local, "port": t.gateway_mqtts_port} if gateway
                  else {"host": t.cloud_host or local, "port": t.cloud_mqtts_port})
        return {
            "identity_file": f"../keys/{node}.json",
            "data_dir": f"../agents/{node}",
            "broker": {**broker, "tls": {"ca_file": "../ca/ca.crt"}},
            "status_interval": t.status_interval,
            "sensors": [
                {"type": "system", "stream": "system", "interval": max(t.telemetry_interval, 5.0)},
                {"type": "simulated", "stream": "env", "interval": t.telemetry_interval,
                 "pattern": "sine", "fields": ["temperature", "humidity"], "period": 120},
            ],
            "batching": {"max_readings": 5, "max_delay": 1.0},
        }

    def write_device_config(self, node: str, *, gateway: bool = True) -> Path:
        """Write ``config/{node}.yaml`` for a device `cwsnet device add` made; return its path."""
        self._dump(node, self.device_config(Topology.load(self.topology_file), node, gateway=gateway))
        return self.config_path(node)

    def _write_configs(self, t: Topology) -> None:
        dump = self._dump
        dump("cloud", {
            "identity_file": "../keys/cloud.json",
            "registry_file": "../registry.json",
            "database": "../cloud/cloud.db",
            "policies_dir": "../policies",
            "admin_token_file": "../admin.token",
            "broker": {"host": t.host, **self._listeners(t, t.cloud_mqtt_port, t.cloud_mqtts_port, "cloud-broker"),
                       "credentials_file": "../brokers/cloud-users.json"},
            "client": {"host": "127.0.0.1" if t.host in ("0.0.0.0", "::") else t.host, "port": t.cloud_mqtts_port,
                       "username": "cloud", "password_file": "../keys/cloud.mqtt", "tls": {"ca_file": "../ca/ca.crt"}},
            "http": {"host": t.http_host, "port": t.http_port,
                     **({"tls": {"certfile": "../tls/console.crt", "keyfile": "../tls/console.key"}}
                        if t.console_tls else {})},
        })
        cloud_b = Bundle.load(self.bundle_path("cloud"))
        write_secret_file(self.path("keys", "cloud.mqtt"), (cloud_b.mqtt_password or "") + "\n")
        local = "127.0.0.1" if t.host in ("0.0.0.0", "::") else t.host
        dump(t.gateway, {
            "identity_file": f"../keys/{t.gateway}.json",
            "registry_file": "../registry.json",
            "data_dir": "../gateway",
            "policies_dir": "../policies",
            "status_interval": t.status_interval,
            "broker": {"host": t.host,
                       **self._listeners(t, t.gateway_mqtt_port, t.gateway_mqtts_port, f"site-{t.site}-broker"),
                       "credentials_file": f"../brokers/site-{t.site}-users.json"},
            "site_client": {"host": local, "port": t.gateway_mqtts_port, "tls": {"ca_file": "../ca/ca.crt"}},
            "uplink": {"host": t.cloud_host or local, "port": t.cloud_mqtts_port, "tls": {"ca_file": "../ca/ca.crt"}},
        })
        for d in t.devices:
            dump(d, self.device_config(t, d))

    def endpoints(self, t: Topology) -> dict[str, Any]:
        host = "127.0.0.1" if t.host in ("0.0.0.0", "::") else t.host
        http = "127.0.0.1" if t.http_host in ("0.0.0.0", "::") else t.http_host
        scheme = "https" if t.console_tls else "http"
        return {
            "console": f"{scheme}://{http}:{t.http_port}/",
            "api": f"{scheme}://{http}:{t.http_port}/api/v1",
            # MQTT over TLS: verify the brokers with ca_file
            "brokers": {"cloud": f"{host}:{t.cloud_mqtts_port}", t.gateway: f"{host}:{t.gateway_mqtts_port}"},
            # plaintext, loopback only: for local debugging tools (mosquitto_sub with admin-mqtt.json)
            "brokers_plain": {"cloud": f"{t.plain_host}:{t.cloud_mqtt_port}",
                              t.gateway: f"{t.plain_host}:{t.gateway_mqtt_port}"},
            "ca_file": str(self.ca_file),
            "site": t.site,
            "devices": t.devices,
        }

    # ---- TLS: the CWSNet CA and the certificates it issues (cwsnet/pki.py) -----------------------
    @property
    def ca_file(self) -> Path:
        return self.path("ca", pki.CA_CERT)

    def tls_paths(self, name: str) -> tuple[Path, Path]:
        """Certificate and key of one TLS listener (``cloud-broker``, ``site-{site}-broker``, ``console``)."""
        return self.path("tls", f"{name}.crt"), self.path("tls", f"{name}.key")

    def init_keys(self, site: str) -> tuple[Bundle, pki.CA, bool]:
        """The cloud's identity (``keys/cloud.json``) and the CWSNet CA (``ca/``), each created when
        missing and kept otherwise: ``cwsnet keys init``, and the first step of every ``init``/``up``.
        Returns ``(cloud bundle, ca, ca_created)``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.path("keys").mkdir(mode=0o700, exist_ok=True)
        self.path("keys").chmod(0o700)
        cloud = self._bundle("cloud", site, "cloud", None)
        ca, created = pki.ensure_ca(self.path("ca"))
        return cloud, ca, created

    def ensure_tls(self, t: Topology) -> dict[str, pki.IssuedCert]:
        """Make sure each TLS listener of the lab has a certificate from the CWSNet CA covering every
        name its clients use; certificates are renewed 30 days before they expire (see pki)."""
        _cloud, ca, _created = self.init_keys(t.site)
        self.path("tls").mkdir(mode=0o700, exist_ok=True)
        self.path("tls").chmod(0o700)

        def names(bind: str, *extra: str | None) -> list[str]:
            wildcard = bind in ("0.0.0.0", "::", "")
            # listening on every address: boards on the LAN use this machine's name or an address
            return [*pki.LOCAL_NAMES, *([] if wildcard else [bind]), *(e for e in extra if e), *t.tls_names,
                    *(pki.machine_names() if wildcard else [])]

        wanted = {
            "cloud-broker": names(t.host, t.cloud_host),
            f"site-{t.site}-broker": names(t.host, t.gateway_host),
        }
        if t.console_tls:
            wanted["console"] = names(t.http_host)
        return {name: pki.ensure_server_cert(ca, *self.tls_paths(name), hosts) for name, hosts in wanted.items()}

    @staticmethod
    def _listeners(t: Topology, plain_port: int, tls_port: int, cert: str) -> dict[str, Any]:
        """An embedded broker's listeners: TLS on ``host``, plaintext on loopback only."""
        out: dict[str, Any] = {"port": plain_port}
        if t.plain_host != t.host:
            out["plain_host"] = t.plain_host
        return {**out, "tls_port": tls_port, "certfile": f"../tls/{cert}.crt", "keyfile": f"../tls/{cert}.key"}
