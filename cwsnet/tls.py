"""TLS contexts for MQTT clients and servers, built from config with errors that name the file.

Clients verify the server's certificate against ``tls.ca_file`` (in the home lab: the CWSNet CA,
``{data-dir}/ca/ca.crt``) and its host name against the certificate's subjectAltNames, so a
broker certificate issued by any other CA is refused (``CERTIFICATE_VERIFY_FAILED``).
This module is imported by ``cwsnet.config``: it must not import it at run time.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from typing import TYPE_CHECKING

from cwsnet.errors import ConfigError

if TYPE_CHECKING:
    from cwsnet.config import BrokerEndpoint

log = logging.getLogger("cwsnet.tls")


def is_loopback_host(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 (with or without brackets) and ``localhost``."""
    if not host:
        return False
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_context(ep: BrokerEndpoint, where: str = "broker.tls") -> ssl.SSLContext | None:
    """The SSL context for connecting to ``ep`` (None for plain TCP): verifies the broker's
    certificate against ``tls.ca_file``; ``tls.insecure`` skips only the host name check."""
    if ep.tls is None:
        if not is_loopback_host(ep.host):
            section = where.removesuffix(".tls")
            if not ep.plaintext:
                raise ConfigError(
                    f"{section}: {ep.host}:{ep.port} is not a loopback address, and clients use TLS beyond "
                    f"loopback: set {section}.tls.ca_file (the CWSNet CA: ca/ca.crt), or {section}.plaintext: true "
                    "to send the token and all traffic in the clear")
            log.warning("%s: connecting to %s:%s without TLS (plaintext: true): the login and all traffic cross "
                        "the network in the clear", section, ep.host, ep.port)
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(ep.tls.ca_file))
    except FileNotFoundError:
        raise ConfigError(f"{where}.ca_file: {ep.tls.ca_file} not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}.ca_file: {ep.tls.ca_file} is not a usable CA certificate: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ep.tls.insecure:
        ctx.check_hostname = False
    return ctx


def server_context(certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str],
                   where: str) -> ssl.SSLContext:
    """A server SSL context for ``certfile``/``keyfile``; :class:`ConfigError` naming the field and
    the file when one is missing, unreadable or they do not match (checked before serving, so a
    daemon stops at start with a clear message instead of failing each handshake)."""
    for name, path in (("certfile", certfile), ("keyfile", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise ConfigError(f"{where}.{name}: {os.fspath(path)} not found") from None
        except OSError as exc:
            raise ConfigError(f"{where}.{name}: cannot read {os.fspath(path)}: {exc.strerror}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(os.fspath(certfile), os.fspath(keyfile))
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}: {os.fspath(certfile)} and {os.fspath(keyfile)} are not a usable "
                          f"certificate and matching private key ({exc.reason or exc})") from None
    return ctx
