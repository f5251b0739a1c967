"""TLS contexts for MQTT clients, built from config with errors that name the file."""

from __future__ import annotations

import ssl

from cwsnet.config import BrokerEndpoint
from cwsnet.errors import ConfigError


def client_context(ep: BrokerEndpoint, where: str = "broker.tls") -> ssl.SSLContext | None:
    """The SSL context for connecting to ``ep`` (None for plain TCP): verifies the broker's
    certificate against ``tls.ca_file``; ``tls.insecure`` skips only the host name check."""
    if ep.tls is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(ep.tls.ca_file))
    except FileNotFoundError:
        raise ConfigError(f"{where}.ca_file: {ep.tls.ca_file} not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}.ca_file: {ep.tls.ca_file} is not a usable CA certificate: {exc}") from None
    if ep.tls.insecure:
        ctx.check_hostname = False
    return ctx
