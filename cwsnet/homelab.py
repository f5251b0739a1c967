"""The home-lab data dir: identities, broker credentials and ACLs, daemon configs, the topology.

``cwsnet init`` (and ``cwsnet up``, which calls it) creates everything on first run and reuses it
after: keys are never regenerated, so devices keep working across restarts. Layout::

    {data-dir}/homelab.json            topology: site, ports, node names (no secrets)
    {data-dir}/registry.json           public keys of every node (imported by the cloud)
    {data-dir}/keys/{node}.json        provisioning bundles (0600)
    {data-dir}/brokers/*.json          broker users (token hashes) and topic ACLs (0600)
    {data-dir}/config/{node}.yaml      one config per daemon
    {data-dir}/cloud/ gateway/ agents/{node}/   databases
    {data-dir}/run/{name}.pid  logs/{name}.log  endpoints.json
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cwsnet.bundle import Bundle
from cwsnet.errors import ConfigError
from cwsnet.identity import Identity, load_json_file, new_token, write_secret_file
from cwsnet.topics import check_name


@dataclass
class Topology:
    site: str = "home"
    gateway: str = "gw-home"
    devices: list[str] = field(default_factory=lambda: ["dev-1", "dev-2", "dev-3"])
    host: str = "127.0.0.1"
    http_host: str = "127.0.0.1"  # the console/API has no login yet: loopback unless asked
    cloud_mqtt_port: int = 1884
    gateway_mqtt_port: int = 1883
    http_port: int = 8080
    cloud_host: str | None = None  # how other daemons reach the cloud broker (default: local address)
    gateway_host: str | None = None  # how devices reach the site broker (default: local address)
    telemetry_interval: float = 2.0
    status_interval: float = 10.0

    @classmethod
    def load(cls, path: Path) -> Topology:
        d = load_json_file(path, "home-lab topology")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _token_sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _device_rules(site: str, node: str) -> dict[str, list[str]]:
    base = f"cws/v1/{site}/{node}"
    return {"publish": [f"{base}/#"], "subscribe": [f"{base}/task/cmd", f"{base}/ack", f"{base}/config"]}


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
        kept = [self._bundle(n, topo.site, "device", cloud_pk, gw) for n in known if n not in topo.devices]
        registry = [
            {"id": b.identity.node, "site": b.identity.site, "role": b.identity.role,
             "public_key": b.identity.public_b64}
            for b in [gw, *devs, *kept]
        ]
        self.path("registry.json").write_text(json.dumps(registry, indent=2) + "\n")

        # broker users: cloud broker (cloud ingest, the gateway) and site broker (gateway bridge, devices)
        s = topo.site
        cloud_users = {
            "cloud": {"token_sha256": _token_sha(cloud.mqtt_password or ""),
                      "publish": ["cws/v1/#"], "subscribe": ["cws/v1/#"]},
            topo.gateway: {"token_sha256": _token_sha(gw.mqtt_password or ""),
                           "publish": [f"cws/v1/{s}/#"],
                           "subscribe": [f"cws/v1/{s}/+/task/cmd", f"cws/v1/{s}/+/ack", f"cws/v1/{s}/+/config"]},
        }
        site_users: dict[str, Any] = {
            topo.gateway: {"token_sha256": _token_sha(gw.mqtt_password or ""),
                           "publish": [f"cws/v1/{s}/#"], "subscribe": [f"cws/v1/{s}/#"]},
        }
        for b in [*devs, *kept]:
            site_users[b.identity.node] = {"token_sha256": _token_sha(b.mqtt_password or ""),
                                           **_device_rules(s, b.identity.node)}
        # a read-only debugging user on both brokers: sees every (sealed) payload, may publish nothing
        admin = self._admin_credential()
        admin_rules = {"token_sha256": _token_sha(admin["password"]), "publish": [], "subscribe": ["#"],
                       "client_ids": ["*"]}  # any id, so mosquitto_sub's random ids work
        cloud_users[admin["username"]] = admin_rules
        site_users[admin["username"]] = admin_rules
        write_secret_file(self.path("brokers", "cloud-users.json"), {"users": cloud_users, "anonymous": False})
        write_secret_file(self.path("brokers", f"site-{s}-users.json"), {"users": site_users, "anonymous": False})

        self._write_configs(topo)
        self.topology_file.write_text(json.dumps(asdict(topo), indent=2) + "\n")
        return topo

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
                          gw_pk if gateway is not None else b.gateway_public_key)
            if want != b:
                want.save(path)
            return want
        b = Bundle(Identity.generate(node, site, role), cloud_pk, node, new_token(), gw_name, gw_pk)
        b.save(path)
        return b

    def _write_configs(self, t: Topology) -> None:
        def dump(node: str, data: dict[str, Any]) -> None:
            text = ("# generated from homelab.json by `cwsnet init`/`cwsnet up`, and rewritten by each run;\n"
                    "# to customise, copy it elsewhere and run `cwsnet <daemon> --config COPY`.\n"
                    "# Secrets are not here: they live in the 0600 files it points at.\n")
            text += yaml.safe_dump(data, sort_keys=False)
            self.config_path(node).write_text(text)
        dump("cloud", {
            "identity_file": "../keys/cloud.json",
            "registry_file": "../registry.json",
            "database": "../cloud/cloud.db",
            "broker": {"host": t.host, "port": t.cloud_mqtt_port,
                       "credentials_file": "../brokers/cloud-users.json"},
            "client": {"host": "127.0.0.1" if t.host in ("0.0.0.0", "::") else t.host, "port": t.cloud_mqtt_port,
                       "username": "cloud", "password_file": "../keys/cloud.mqtt"},
            "http": {"host": t.http_host, "port": t.http_port},
        })
        cloud_b = Bundle.load(self.bundle_path("cloud"))
        write_secret_file(self.path("keys", "cloud.mqtt"), (cloud_b.mqtt_password or "") + "\n")
        local = "127.0.0.1" if t.host in ("0.0.0.0", "::") else t.host
        dump(t.gateway, {
            "identity_file": f"../keys/{t.gateway}.json",
            "registry_file": "../registry.json",
            "data_dir": "../gateway",
            "status_interval": t.status_interval,
            "broker": {"host": t.host, "port": t.gateway_mqtt_port,
                       "credentials_file": f"../brokers/site-{t.site}-users.json"},
            "site_client": {"host": local, "port": t.gateway_mqtt_port},
            "uplink": {"host": t.cloud_host or local, "port": t.cloud_mqtt_port},
        })
        for d in t.devices:
            dump(d, {
                "identity_file": f"../keys/{d}.json",
                "data_dir": f"../agents/{d}",
                "broker": {"host": t.gateway_host or local, "port": t.gateway_mqtt_port},
                "status_interval": t.status_interval,
                "sensors": [
                    {"type": "system", "stream": "system", "interval": max(t.telemetry_interval, 5.0)},
                    {"type": "simulated", "stream": "env", "interval": t.telemetry_interval,
                     "pattern": "sine", "fields": ["temperature", "humidity"], "period": 120},
                ],
                "batching": {"max_readings": 5, "max_delay": 1.0},
            })

    def endpoints(self, t: Topology) -> dict[str, Any]:
        host = "127.0.0.1" if t.host in ("0.0.0.0", "::") else t.host
        http = "127.0.0.1" if t.http_host in ("0.0.0.0", "::") else t.http_host
        return {
            "console": f"http://{http}:{t.http_port}/",
            "api": f"http://{http}:{t.http_port}/api/v1",
            "brokers": {"cloud": f"{host}:{t.cloud_mqtt_port}", t.gateway: f"{host}:{t.gateway_mqtt_port}"},
            "site": t.site,
            "devices": t.devices,
        }
