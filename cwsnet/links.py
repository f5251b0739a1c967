"""Build an :class:`~cwsnet.mqtt.MqttLink` from a config section and a provisioning bundle."""

from __future__ import annotations

from typing import Any

from cwsnet.bundle import Bundle
from cwsnet.config import BrokerEndpoint, Reconnect
from cwsnet.mqtt import MqttLink
from cwsnet.tls import client_context


def link_for(ep: BrokerEndpoint, bundle: Bundle, reconnect: Reconnect, *, client_id: str, section: str,
             name: str, **kwargs: Any) -> MqttLink:
    """A link to the broker ``ep`` (config section ``section``, named in errors), logging in with
    the section's credentials or else the bundle's, reconnecting with ``reconnect``'s backoff."""
    return MqttLink(
        client_id=client_id,
        host=ep.host,
        port=ep.port,
        # the section's login, else the bundle's (only if the bundle has a password: a bundle
        # without one means "connect anonymously", which a loopback-only broker may allow)
        username=ep.username or (bundle.mqtt_username if bundle.mqtt_password else None),
        password=ep.password() or bundle.mqtt_password,
        tls=client_context(ep, f"{section}.tls"),
        keepalive=ep.keepalive,
        backoff_min=reconnect.min_delay,
        backoff_max=reconnect.max_delay,
        name=name,
        **kwargs,
    )
