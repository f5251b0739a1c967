"""The CWSNet certificate authority and the TLS server certificates it issues.

``cwsnet keys init`` (and ``cwsnet init``/``cwsnet up``, which call the same code) creates one CA
per data dir; every MQTT TLS listener and the HTTPS console get a certificate issued from it, and
every client verifies the server against it (``tls.ca_file``). Layout::

    {data-dir}/ca/ca.key     the CA's private key (EC P-256, PEM, mode 0600): never leaves this machine
    {data-dir}/ca/ca.crt     the CA certificate (PEM, 0644): what clients trust
    {data-dir}/tls/NAME.crt  a server certificate issued from the CA (0644) and its key NAME.key (0600)

Everything is idempotent: an existing CA is always kept (clients trust it); a server certificate
is issued again when it is missing, unreadable, does not match its key, was issued by another CA,
lacks a host name it must cover, or expires within :data:`RENEW_BEFORE`, so a fleet that runs
``cwsnet up`` now and then never meets an expired certificate. Secrets are never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cwsnet.errors import ConfigError
from cwsnet.identity import write_file_atomic, write_secret_file

log = logging.getLogger("cwsnet.pki")

CA_DAYS = 3650
"""Lifetime of a new CA (about 10 years)."""
CERT_DAYS = 365
"""Lifetime of a server certificate (capped at the CA's own expiry)."""
RENEW_BEFORE = dt.timedelta(days=30)
"""A server certificate expiring within this is issued again by the next ``ensure_server_cert``."""
CA_WARN_BEFORE = dt.timedelta(days=180)
"""An existing CA expiring within this is reported (it cannot be renewed silently: clients trust it)."""
CLOCK_SKEW = dt.timedelta(minutes=5)
"""New certificates are valid from this long ago, so a client whose clock lags a little accepts them."""

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
"""Names every home-lab server certificate covers: its own daemons connect over loopback."""

CA_CERT = "ca.crt"
CA_KEY = "ca.key"

_DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)*\.?$")


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


# ---- files ----------------------------------------------------------------------------------
def write_public_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0644 (certificates: public, but never torn)."""
    write_file_atomic(path, text, 0o644)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def _parse_cert(data: bytes, path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path}: the {what} is not a PEM X.509 certificate") from None


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


def _parse_key(data: bytes, path: Path, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # never echo the content: it is a secret
        raise ConfigError(f"{path}: the {what} is not an unencrypted PEM private key") from None
    if not isinstance(key, PrivateKey):
        raise ConfigError(f"{path}: the {what} is a {type(key).__name__}; use an EC, RSA or Ed25519 key")
    return key


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    """The PEM certificate in ``path`` (:class:`ConfigError` naming the file when it is not one)."""
    return _parse_cert(_read(path, what), path, what)


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def _key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    return _spki(cert.public_key()) == _spki(key.public_key())


def _pem_key(key: PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint as ``AB:CD:...`` (what ``openssl x509 -fingerprint -sha256`` prints)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


# ---- names ----------------------------------------------------------------------------------
def _general_name(name: str) -> x509.GeneralName | None:
    """The SAN entry for a host name or address; None for wildcard binds (0.0.0.0, ::)."""
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        dns = text.lower().rstrip(".")
        if not _DNS_NAME.match(dns):
            raise ConfigError(f"TLS: {name!r} is neither an IP address nor a host name") from None
        return x509.DNSName(dns)
    if ip.is_unspecified:
        return None
    return x509.IPAddress(ip)


def general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """SAN entries for ``names``, deduplicated in order; wildcard bind addresses are skipped."""
    out: list[x509.GeneralName] = []
    for n in names:
        g = _general_name(n)
        if g is not None and g not in out:
            out.append(g)
    return out


def _name_text(g: x509.GeneralName) -> str:
    return str(g.value)


def machine_names() -> list[str]:
    """This machine's host name (and its mDNS ``.local`` form) and interface addresses: what boards
    on the LAN use to reach a broker listening on every address (``--host 0.0.0.0``)."""
    names: list[str] = []
    host = socket.gethostname().strip().lower()
    if host and _DNS_NAME.match(host):
        names.append(host)
        if "." not in host:
            names.append(f"{host}.local")
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family not in (socket.AF_INET, socket.AF_INET6) or "%" in a.address:
                    continue
                try:
                    ip = ipaddress.ip_address(a.address)
                except ValueError:
                    continue
                if not (ip.is_link_local or ip.is_unspecified or ip.is_multicast):
                    names.append(str(ip))
    except Exception as exc:  # a machine without readable interfaces still gets the names above
        log.debug("TLS: cannot list network interfaces: %s", exc)
    return list(dict.fromkeys(names))


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True if ``ca_cert`` signed ``cert`` (issuer name and signature)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def cert_names(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san)


# ---- the CA ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CA:
    """The CWSNet CA: its certificate and private key, and where they are stored."""

    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc


def create_ca(ca_dir: Path, *, common_name: str | None = None, now: dt.datetime | None = None) -> CA:
    """A new self-signed CA (EC P-256, CA:TRUE pathlen 0, keyCertSign/cRLSign, 10 years) in ``ca_dir``."""
    now = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CWSNet"),
        # a random suffix: two labs' CAs never share a subject name (trust stores look CAs up by name)
        x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"CWSNet CA {secrets.token_hex(4)}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_dir.chmod(0o700)
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    write_secret_file(key_path, _pem_key(key))  # the key first: a certificate without its key is useless
    write_public_file(cert_path, _pem_cert(cert))
    log.info("TLS: created the CWSNet CA %s (SHA-256 %s), valid until %s", cert_path, fingerprint(cert),
             cert.not_valid_after_utc.date())
    return CA(cert, key, cert_path, key_path)


def load_ca(ca_dir: Path, *, now: dt.datetime | None = None) -> CA:
    """The CA stored in ``ca_dir``; :class:`ConfigError` naming the file if it is unusable."""
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    cert = _parse_cert(_read(cert_path, "CA certificate"), cert_path, "CA certificate")
    key = _parse_key(_read(key_path, "CA private key"), key_path, "CA private key")
    if not _key_matches(cert, key):
        raise ConfigError(f"{key_path}: this private key does not belong to the CA certificate {cert_path}; "
                          "restore the matching pair")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ConfigError(f"{cert_path}: not a CA certificate (basicConstraints CA:TRUE missing)")
    now = _now(now)
    if cert.not_valid_after_utc <= now:
        raise ConfigError(f"{cert_path}: the CWSNet CA expired on {cert.not_valid_after_utc.date()}; move "
                          f"{ca_dir} away and run `cwsnet keys init` to make a new one (every client must then "
                          "trust the new ca.crt)")
    if cert.not_valid_after_utc - now < CA_WARN_BEFORE:
        log.warning("TLS: the CWSNet CA %s expires on %s: plan to replace it (clients must trust the new one)",
                    cert_path, cert.not_valid_after_utc.date())
    return CA(cert, key, cert_path, key_path)


def ensure_ca(ca_dir: Path, *, now: dt.datetime | None = None) -> tuple[CA, bool]:
    """The CA in ``ca_dir``, created if there is none; an existing one is always kept. Returns
    ``(ca, created)``. Half a CA (a certificate without its key or the reverse) is an error: making
    a new one would silently break every client that trusts the old one."""
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if have_cert and have_key:
        return load_ca(ca_dir, now=now), False
    if have_cert or have_key:
        missing, present = (key_path, cert_path) if have_cert else (cert_path, key_path)
        raise ConfigError(f"{missing}: missing while {present} exists; restore it, or move {ca_dir} away to make "
                          "a new CA (every client must then trust the new ca.crt)")
    return create_ca(ca_dir, now=now), True


# ---- server certificates --------------------------------------------------------------------
@dataclass(frozen=True)
class CertInfo:
    """What ``cwsnet keys show`` and the metrics report about one certificate (no secrets)."""

    path: Path
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    names: tuple[str, ...]
    is_ca: bool

    @classmethod
    def of(cls, cert: x509.Certificate, path: Path) -> CertInfo:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        return cls(path, cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.not_valid_before_utc,
                   cert.not_valid_after_utc, fingerprint(cert), tuple(_name_text(g) for g in cert_names(cert)), is_ca)


def cert_info(path: Path) -> CertInfo:
    return CertInfo.of(load_certificate(path), path)


@dataclass(frozen=True)
class IssuedCert:
    """The outcome of :func:`ensure_server_cert`: ``action`` is ``kept``, ``issued`` or ``renewed``."""

    info: CertInfo
    cert_path: Path
    key_path: Path
    action: str
    reason: str | None = None


def issue_server_cert(ca: CA, cert_path: Path, key_path: Path, names: Iterable[str], *,
                      now: dt.datetime | None = None, days: int = CERT_DAYS) -> x509.Certificate:
    """Issue a server certificate for ``names`` (DNS names and IP addresses, all in the SAN) with a
    new EC P-256 key; write the key (0600) and then the certificate (0644)."""
    now = _now(now)
    sans = general_names(names)
    if not sans:
        raise ConfigError(f"{cert_path}: a server certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP256R1())
    cn = _name_text(sans[0])
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CWSNet"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(ca.key, _hash_for(ca.key))
    )
    write_secret_file(key_path, _pem_key(key))  # the key first: a crash in between leaves a mismatch,
    write_public_file(cert_path, _pem_cert(cert))  # which the next ensure_server_cert repairs
    return cert


def reissue_reason(ca: CA, cert_path: Path, key_path: Path, names: Iterable[str], *,
                   now: dt.datetime | None = None, renew_before: dt.timedelta = RENEW_BEFORE) -> str | None:
    """Why the certificate in ``cert_path`` must be issued again (None: it is fine as it is).

    A file that exists but cannot be read (permissions) raises :class:`ConfigError`: overwriting
    it would hide the problem."""
    if not cert_path.exists():
        return "no certificate yet"
    if not key_path.exists():
        return f"its key {key_path.name} is missing"
    cert_data, key_data = _read(cert_path, "certificate"), _read(key_path, "private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError:
        return "it is not a readable PEM certificate"
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        return f"its key {key_path.name} is not a readable PEM private key"
    if not isinstance(key, PrivateKey) or not _key_matches(cert, key):
        return f"its key {key_path.name} does not match it"
    if not issued_by(cert, ca.cert):
        return f"it was issued by another CA ({cert.issuer.rfc4514_string()})"
    have = set(cert_names(cert))
    missing = [_name_text(g) for g in general_names(names) if g not in have]
    if missing:
        return f"it does not cover {', '.join(missing)}"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        server_auth = ExtendedKeyUsageOID.SERVER_AUTH in eku
    except x509.ExtensionNotFound:
        server_auth = True  # no EKU: any use
    if not server_auth:
        return "it is not a TLS server certificate (no serverAuth)"
    now = _now(now)
    if cert.not_valid_before_utc > now + CLOCK_SKEW:
        return f"it is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (clock change?)"
    if cert.not_valid_after_utc - now < renew_before:
        if cert.not_valid_after_utc <= now:
            return f"it expired on {cert.not_valid_after_utc.date()}"
        return f"it expires on {cert.not_valid_after_utc.date()}"
    return None


def ensure_server_cert(ca: CA, cert_path: Path, key_path: Path, names: Iterable[str], *,
                       now: dt.datetime | None = None, renew_before: dt.timedelta = RENEW_BEFORE) -> IssuedCert:
    """A valid server certificate for ``names`` issued by ``ca`` at ``cert_path``/``key_path``:
    kept when it is fine, otherwise (re-)issued with a new key and the reason logged."""
    names = list(names)
    reason = reissue_reason(ca, cert_path, key_path, names, now=now, renew_before=renew_before)
    if reason is None:
        return IssuedCert(cert_info(cert_path), cert_path, key_path, "kept")
    first = not cert_path.exists()
    cert = issue_server_cert(ca, cert_path, key_path, names, now=now)
    info = CertInfo.of(cert, cert_path)
    if first:
        log.info("TLS: issued %s for %s, valid until %s", cert_path, ", ".join(info.names), info.not_after.date())
    else:
        log.info("TLS: renewed %s because %s; now valid until %s for %s", cert_path, reason,
                 info.not_after.date(), ", ".join(info.names))
    return IssuedCert(info, cert_path, key_path, "issued" if first else "renewed", reason)
