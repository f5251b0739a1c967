"""Provisioning bundles: everything one node needs to join, in one 0600 JSON file.

``{"node", "site", "role", "secret_key", "public_key", "cloud_public_key", "mqtt_username",
"mqtt_password", "kv", "gateway"?, "gateway_public_key"?}`` — the CPython agent, the gateway and the
firmware all load this format. A device behind a gateway names it and its public key: the gateway
seals custody acks to the device, and the device seals command receipts to the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nacl.public

from cwsnet.identity import Identity, load_json_file, public_key_from_b64, write_secret_file


@dataclass(frozen=True)
class Bundle:
    identity: Identity
    cloud_public_key: nacl.public.PublicKey | None
    mqtt_username: str
    mqtt_password: str | None
    gateway: str | None = None
    gateway_public_key: nacl.public.PublicKey | None = None
    kv: int = 1  # version of this node's key pair: bumped by `cwsnet device rotate`, sent in each header

    @classmethod
    def load(cls, path: Path) -> Bundle:
        d = load_json_file(path, "provisioning bundle")
        ident = Identity.from_dict(d, str(path))
        cpk = d.get("cloud_public_key")
        gw, gpk = d.get("gateway"), d.get("gateway_public_key")
        if (gw is None) != (gpk is None) or (gw is not None and not isinstance(gw, str)):
            from cwsnet.errors import ConfigError

            raise ConfigError(f"{path}: 'gateway' and 'gateway_public_key' go together (a node name and its key)")
        kv = d.get("kv", 1)
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1:
            from cwsnet.errors import ConfigError

            raise ConfigError(f"{path}: kv (key version) must be an integer >= 1 (got {kv!r})")
        return cls(
            kv=kv,
            identity=ident,
            cloud_public_key=public_key_from_b64(cpk, f"{path}: cloud_public_key") if cpk else None,
            mqtt_username=str(d.get("mqtt_username") or ident.node),
            mqtt_password=d.get("mqtt_password"),
            gateway=gw,
            gateway_public_key=public_key_from_b64(gpk, f"{path}: gateway_public_key") if gpk else None,
        )

    @classmethod
    def load_node(cls, path: Path) -> Bundle:
        """A device's or gateway's bundle: it must name the cloud's public key to seal to."""
        bundle = cls.load(path)
        if bundle.cloud_public_key is None:
            from cwsnet.errors import ConfigError

            raise ConfigError(f"{path}: cloud_public_key is missing from the bundle")
        return bundle

    def peer_keys(self) -> dict[str, nacl.public.PublicKey]:
        """The peers this node seals to and opens from: the cloud, and its gateway if it has one."""
        keys = {"cloud": self.cloud_public_key} if self.cloud_public_key is not None else {}
        if self.gateway is not None and self.gateway_public_key is not None:
            keys[self.gateway] = self.gateway_public_key
        return keys

    def save(self, path: Path) -> None:
        from cwsnet.identity import b64

        d = self.identity.to_dict()
        if self.cloud_public_key is not None:
            d["cloud_public_key"] = b64(bytes(self.cloud_public_key))
        if self.gateway is not None and self.gateway_public_key is not None:
            d["gateway"] = self.gateway
            d["gateway_public_key"] = b64(bytes(self.gateway_public_key))
        d["mqtt_username"] = self.mqtt_username
        d["kv"] = self.kv
        if self.mqtt_password is not None:
            d["mqtt_password"] = self.mqtt_password
        write_secret_file(path, d)
