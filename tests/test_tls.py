"""The CWSNet CA (cwsnet/pki.py), TLS on every MQTT listener and the console, and the rules that
keep plaintext on loopback: issuance, renewal, refusals, real amqtt brokers and real clients,
the HTTPS console, and `cwsnet up` with every link over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from harness import ProcessSet, await_for, free_port, run_async, wait_for

from cwsnet import pki
from cwsnet.broker import BrokerSettings, broker_config, start_broker
from cwsnet.config import (
    AgentConfig,
    BrokerEndpoint,
    CloudConfig,
    EmbeddedBroker,
    GatewayConfig,
    HttpConfig,
    load_config,
)
from cwsnet.errors import ConfigError
from cwsnet.homelab import HomeLab, Topology
from cwsnet.mqtt import Message, MqttLink
from cwsnet.tls import client_context, server_context

REPO = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def sans(cert: x509.Certificate) -> set[str]:
    return {str(g.value) for g in pki.cert_names(cert)}


@pytest.fixture
def ca(tmp_path: Path) -> pki.CA:
    return pki.ensure_ca(tmp_path / "ca")[0]


def issue(ca: pki.CA, d: Path, names: list[str], **kw: Any) -> tuple[Path, Path]:
    cert, key = d / "srv.crt", d / "srv.key"
    pki.issue_server_cert(ca, cert, key, names, **kw)
    return cert, key


# ---- the CA -----------------------------------------------------------------------------------


def test_ca_is_created_once_with_ca_extensions_and_kept(tmp_path: Path) -> None:
    ca, created = pki.ensure_ca(tmp_path / "ca")
    assert created and mode(ca.key_path) == 0o600 and mode(ca.cert_path) == 0o644
    assert mode(tmp_path / "ca") == 0o700
    c = ca.cert
    bc = c.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = c.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey) and c.public_key().curve.name == "secp256r1"
    life = c.not_valid_after_utc - c.not_valid_before_utc
    assert dt.timedelta(days=3640) < life < dt.timedelta(days=3660)
    assert c.issuer == c.subject
    again, created = pki.ensure_ca(tmp_path / "ca")
    assert not created and again.fingerprint == ca.fingerprint
    assert ca.key_path.read_bytes() == again.key_path.read_bytes()
    # the fingerprint is what `openssl x509 -fingerprint -sha256` prints
    assert len(ca.fingerprint.split(":")) == 32


def test_half_a_ca_or_a_mismatched_one_is_an_error_naming_the_file(tmp_path: Path) -> None:
    ca = pki.ensure_ca(tmp_path / "ca")[0]
    key = ca.key_path.read_bytes()
    ca.key_path.unlink()
    with pytest.raises(ConfigError, match=r"ca\.key: missing while .*ca\.crt exists"):
        pki.ensure_ca(tmp_path / "ca")
    other = pki.ensure_ca(tmp_path / "other")[0]
    ca.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(ConfigError, match=r"ca\.key: this private key does not belong to the CA certificate"):
        pki.ensure_ca(tmp_path / "ca")
    ca.key_path.write_bytes(key)
    ca.cert_path.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"ca\.crt: the CA certificate is not a PEM X\.509 certificate"):
        pki.ensure_ca(tmp_path / "ca")
    ca.cert_path.unlink()
    ca.cert_path.mkdir()  # exists, but cannot be read as a file
    with pytest.raises(ConfigError, match=r"ca\.crt: cannot read the CA certificate"):
        pki.ensure_ca(tmp_path / "ca")


def test_an_expired_ca_is_refused_with_the_way_out(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "ca", now=NOW - 3651 * DAY)
    with pytest.raises(ConfigError, match=r"ca\.crt: the CWSNet CA expired .*cwsnet keys init"):
        pki.ensure_ca(tmp_path / "ca")


def test_a_key_file_is_never_echoed(tmp_path: Path) -> None:
    ca = pki.ensure_ca(tmp_path / "ca")[0]
    ca.key_path.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXZhbHVl\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as info:
        pki.load_ca(tmp_path / "ca")
    assert "c2VjcmV0LXZhbHVl" not in str(info.value) and "ca.key" in str(info.value)


# ---- server certificates ----------------------------------------------------------------------


def test_server_certificate_fields(ca: pki.CA, tmp_path: Path) -> None:
    got = pki.ensure_server_cert(ca, tmp_path / "s.crt", tmp_path / "s.key",
                                 ["localhost", "127.0.0.1", "::1", "cloud", "0.0.0.0", "Cloud", "[::1]"])
    assert got.action == "issued"
    assert mode(tmp_path / "s.key") == 0o600 and mode(tmp_path / "s.crt") == 0o644
    c = x509.load_pem_x509_certificate((tmp_path / "s.crt").read_bytes())
    assert sans(c) == {"localhost", "127.0.0.1", "::1", "cloud"}  # wildcard binds are not names
    assert pki.issued_by(c, ca.cert)
    assert ExtendedKeyUsageOID.SERVER_AUTH in c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = c.not_valid_after_utc - c.not_valid_before_utc
    assert dt.timedelta(days=364) < life < dt.timedelta(days=366)
    # Python's own TLS stack accepts the pair
    server_context(tmp_path / "s.crt", tmp_path / "s.key", "test")
    again = pki.ensure_server_cert(ca, tmp_path / "s.crt", tmp_path / "s.key", ["cloud", "localhost"])
    assert again.action == "kept" and again.info.fingerprint == got.info.fingerprint


@pytest.mark.parametrize(("spoil", "reason"), [
    ("missing", "no certificate yet"),
    ("missing_key", "key srv.key is missing"),
    ("expired", "expired on"),
    ("near_expiry", "expires on"),
    ("other_ca", "issued by another CA"),
    ("missing_san", "does not cover gateway"),
    ("other_key", "does not match"),
    ("garbage", "not a readable PEM certificate"),
    ("future", "not valid before"),
])
def test_a_certificate_that_will_not_do_is_reissued(ca: pki.CA, tmp_path: Path, spoil: str, reason: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    names = ["localhost", "127.0.0.1", "gateway"]
    cert, key = tmp_path / "srv.crt", tmp_path / "srv.key"
    if spoil == "expired":
        issue(ca, tmp_path, names, now=NOW - 400 * DAY)
    elif spoil == "near_expiry":
        issue(ca, tmp_path, names, now=NOW - 340 * DAY)  # 25 days left
    elif spoil == "other_ca":
        issue(pki.ensure_ca(tmp_path / "other")[0], tmp_path, names)
    elif spoil == "missing_san":
        issue(ca, tmp_path, ["localhost", "127.0.0.1"])
    elif spoil == "future":
        issue(ca, tmp_path, names, now=NOW + 10 * DAY)
    elif spoil != "missing":
        issue(ca, tmp_path, names)
        if spoil == "missing_key":
            key.unlink()
        elif spoil == "other_key":
            key.write_text(pki._pem_key(ec.generate_private_key(ec.SECP256R1())))
        elif spoil == "garbage":
            cert.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    assert reason in (pki.reissue_reason(ca, cert, key, names) or "")
    with caplog.at_level(logging.INFO, logger="cwsnet.pki"):
        got = pki.ensure_server_cert(ca, cert, key, names)
    assert got.action == ("issued" if spoil == "missing" else "renewed") and reason in (got.reason or "")
    if spoil != "missing":
        assert any("renewed" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    assert pki.issued_by(c, ca.cert) and {"gateway", "localhost", "127.0.0.1"} <= sans(c)
    assert c.not_valid_after_utc - NOW > dt.timedelta(days=360)
    assert mode(key) == 0o600 and pki.reissue_reason(ca, cert, key, names) is None


def test_a_certificate_with_31_days_left_is_kept(ca: pki.CA, tmp_path: Path) -> None:
    cert, key = issue(ca, tmp_path, ["localhost"], now=NOW - 334 * DAY)
    before = cert.read_bytes()
    assert pki.ensure_server_cert(ca, cert, key, ["localhost"]).action == "kept"
    assert cert.read_bytes() == before


def test_an_unreadable_certificate_is_an_error_not_overwritten(ca: pki.CA, tmp_path: Path) -> None:
    cert, key = issue(ca, tmp_path, ["localhost"])
    key.unlink()
    key.mkdir()
    with pytest.raises(ConfigError, match=r"srv\.key: cannot read the private key"):
        pki.ensure_server_cert(ca, cert, key, ["localhost"])
    assert key.is_dir()


def test_bad_names_are_refused(ca: pki.CA, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'not a host' is neither an IP address nor a host name"):
        pki.ensure_server_cert(ca, tmp_path / "c.crt", tmp_path / "c.key", ["not a host"])


def test_server_context_names_the_file(ca: pki.CA, tmp_path: Path) -> None:
    cert, key = issue(ca, tmp_path, ["localhost"])
    with pytest.raises(ConfigError, match=r"http\.tls\.certfile: .*nope\.crt not found"):
        server_context(tmp_path / "nope.crt", key, "http.tls")
    other = tmp_path / "o"
    other.mkdir()
    _c2, key2 = issue(ca, other, ["localhost"])
    with pytest.raises(ConfigError, match=r"http\.tls: .*srv\.crt and .*srv\.key are not a usable certificate"):
        server_context(cert, key2, "http.tls")


# ---- plaintext only on loopback ---------------------------------------------------------------


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return path


def test_a_plaintext_listener_beyond_loopback_is_refused(tmp_path: Path, ca: pki.CA) -> None:
    with pytest.raises(ValueError, match=r"broker\.port: a plaintext listener \(port\) may listen only on a "
                                         r"loopback address, not host '0\.0\.0\.0'.*tls_port.*127\.0\.0\.1"):
        EmbeddedBroker(host="0.0.0.0", port=1883)
    with pytest.raises(ValueError, match=r"broker\.ws_port: .*not plain_host '192\.168\.1\.5'"):
        EmbeddedBroker(host="127.0.0.1", port=None, ws_port=8080, plain_host="192.168.1.5")
    with pytest.raises(ValueError, match="tls_port needs both certfile and keyfile"):
        EmbeddedBroker(host="0.0.0.0", port=None, tls_port=8883)
    with pytest.raises(ValueError, match="no listener"):
        EmbeddedBroker(port=None)
    cert, key = issue(ca, tmp_path, ["localhost"])
    ok = EmbeddedBroker(host="0.0.0.0", plain_host="127.0.0.1", tls_port=8883, certfile=cert, keyfile=key,
                        credentials_file=tmp_path / "creds.json")
    assert ok.port == 1883
    # a config file: the error names the file, the line and the fix
    cfg = write(tmp_path / "gw.yaml", {"identity_file": "k.json", "uplink": {"host": "cloud"},
                                       "broker": {"host": "0.0.0.0", "port": 1883}})
    with pytest.raises(ConfigError, match=r"gw\.yaml:\d+: broker: .*broker\.port: a plaintext listener.*tls_port"):
        load_config(cfg, GatewayConfig)
    # the broker itself refuses too (python -m cwsnet.broker, or BrokerSettings built by hand)
    creds = write(tmp_path / "creds.json", {"users": {}, "anonymous": False})
    with pytest.raises(ConfigError, match=r"broker\.port: a plaintext listener"):
        broker_config(BrokerSettings(host="0.0.0.0", port=1883, credentials_file=creds))
    with pytest.raises(ConfigError, match=r"broker\.ws_port: a plaintext listener"):
        broker_config(BrokerSettings(host="0.0.0.0", port=None, ws_port=8080, tls_port=8883, certfile=cert,
                                     keyfile=key, credentials_file=creds))
    listeners = broker_config(BrokerSettings(host="0.0.0.0", plain_host="127.0.0.1", port=1883, tls_port=8883,
                                             certfile=cert, keyfile=key, credentials_file=creds))["listeners"]
    assert listeners["default"]["bind"] == "127.0.0.1:1883" and listeners["tls"]["bind"] == "0.0.0.0:8883"
    tls_only = broker_config(BrokerSettings(host="0.0.0.0", port=None, tls_port=8883, certfile=cert, keyfile=key,
                                            credentials_file=creds))["listeners"]
    assert tls_only["default"]["bind"] is None  # amqtt wants a "default" listener: this one binds nothing


def test_the_broker_cli_refuses_plaintext_beyond_loopback(tmp_path: Path) -> None:
    creds = write(tmp_path / "creds.json", {"users": {}, "anonymous": False})
    out = subprocess.run([sys.executable, "-m", "cwsnet.broker", "--host", "0.0.0.0", "--port", str(free_port()),
                          "--credentials", str(creds)], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2 and "broker.port: a plaintext listener" in out.stderr, out.stderr


def test_a_console_beyond_loopback_without_tls_is_refused(tmp_path: Path, ca: pki.CA) -> None:
    with pytest.raises(ValueError, match=r"http\.host '0\.0\.0\.0' is not a loopback address.*HTTPS"):
        HttpConfig(host="0.0.0.0")
    cert, key = issue(ca, tmp_path, ["localhost"])
    assert HttpConfig(host="0.0.0.0", tls={"certfile": cert, "keyfile": key}).tls is not None
    assert HttpConfig(host="::1").tls is None
    cfg = write(tmp_path / "cloud.yaml", {"identity_file": "k.json", "http": {"host": "192.168.1.5"}})
    with pytest.raises(ConfigError, match=r"cloud\.yaml:\d+: http: .*http\.host '192\.168\.1\.5'.*http\.tls"):
        load_config(cfg, CloudConfig)
    out = subprocess.run([sys.executable, "-m", "cwsnet", "cloud", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2 and "http.host '192.168.1.5'" in out.stderr, out.stderr


# ---- the home lab ------------------------------------------------------------------------------


def test_homelab_issues_certs_for_every_name_its_clients_use(tmp_path: Path) -> None:
    lab = HomeLab(tmp_path / "lab")
    topo = Topology(devices=["dev-1"], host="0.0.0.0", http_host="0.0.0.0", cloud_host="cloud",
                    gateway_host="gateway", tls_names=["lab.example.org", "10.9.8.7"])
    lab.init(topo)
    ca = pki.load_ca(tmp_path / "lab" / "ca")
    fp = ca.fingerprint
    assert mode(ca.key_path) == 0o600
    for name, must in (("cloud-broker", {"cloud"}), ("site-home-broker", {"gateway"}), ("console", set())):
        cert, key = lab.tls_paths(name)
        c = x509.load_pem_x509_certificate(cert.read_bytes())
        assert pki.issued_by(c, ca.cert) and mode(key) == 0o600, name
        assert must | {"localhost", "127.0.0.1", "::1", "lab.example.org", "10.9.8.7"} <= sans(c), name
        assert set(pki.machine_names()) <= sans(c), name  # on every address: the LAN names this machine
    # configs: every client over TLS with the CA; plaintext only on loopback
    gw = load_config(lab.config_path("gw-home"), GatewayConfig)
    cloud = load_config(lab.config_path("cloud"), CloudConfig)
    dev = load_config(lab.config_path("dev-1"), AgentConfig)
    for ep, port in ((gw.uplink, topo.cloud_mqtts_port), (gw.site_client, topo.gateway_mqtts_port),
                     (dev.broker, topo.gateway_mqtts_port), (cloud.client, topo.cloud_mqtts_port)):
        assert ep.port == port and ep.tls is not None and ep.tls.ca_file == ca.cert_path and not ep.tls.insecure
    for b, tls_port in ((gw.broker, topo.gateway_mqtts_port), (cloud.broker, topo.cloud_mqtts_port)):
        assert b is not None and (b.host, b.plain_host, b.tls_port) == ("0.0.0.0", "127.0.0.1", tls_port)
        listeners = broker_config(BrokerSettings.coerce(b))["listeners"]
        assert listeners["default"]["bind"].startswith("127.0.0.1:")
    assert cloud.http.tls is not None and cloud.http.tls.certfile == lab.tls_paths("console")[0]
    eps = lab.endpoints(topo)
    assert eps["console"].startswith("https://") and eps["ca_file"] == str(ca.cert_path)
    assert eps["brokers"]["cloud"] == f"127.0.0.1:{topo.cloud_mqtts_port}"
    assert eps["brokers_plain"]["gw-home"] == f"127.0.0.1:{topo.gateway_mqtt_port}"

    # a second run keeps the CA and the certificates; a new name re-issues only what must cover it
    before = {n: lab.tls_paths(n)[0].read_bytes() for n in ("cloud-broker", "site-home-broker", "console")}
    lab.init(topo)
    assert pki.load_ca(tmp_path / "lab" / "ca").fingerprint == fp
    assert {n: lab.tls_paths(n)[0].read_bytes() for n in before} == before
    lab.init(Topology(devices=["dev-1"], host="0.0.0.0", http_host="0.0.0.0", cloud_host="cloud.lan",
                      gateway_host="gateway", tls_names=["lab.example.org", "10.9.8.7"]))
    assert lab.tls_paths("cloud-broker")[0].read_bytes() != before["cloud-broker"]
    assert lab.tls_paths("site-home-broker")[0].read_bytes() == before["site-home-broker"]
    assert "cloud.lan" in sans(x509.load_pem_x509_certificate(lab.tls_paths("cloud-broker")[0].read_bytes()))


def test_homelab_on_loopback_keeps_the_console_plain_and_binds_plaintext_to_host(tmp_path: Path) -> None:
    lab = HomeLab(tmp_path / "lab")
    topo = lab.init(Topology(devices=["dev-1"], host="127.0.0.2"))
    cloud = load_config(lab.config_path("cloud"), CloudConfig)
    assert cloud.http.tls is None and not lab.tls_paths("console")[0].exists()
    assert cloud.broker is not None and cloud.broker.plain_host is None and cloud.broker.host == "127.0.0.2"
    dev = load_config(lab.config_path("dev-1"), AgentConfig)
    assert dev.broker.host == "127.0.0.2" and dev.broker.port == topo.gateway_mqtts_port
    assert "127.0.0.2" in sans(x509.load_pem_x509_certificate(lab.tls_paths("site-home-broker")[0].read_bytes()))
    assert lab.endpoints(topo)["console"].startswith("http://")


def test_cli_checks_every_port_differs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "cwsnet", "init", "--data-dir", str(tmp_path / "d"),
                        "--cloud-tls-port", "1883"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "--cloud-tls-port" in r.stderr and "must differ" in r.stderr, r.stderr


def test_keys_init_and_show(tmp_path: Path) -> None:
    d = tmp_path / "d"

    def cwsnet(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cwsnet", *argv], capture_output=True, text=True, timeout=60,
                              cwd=REPO)

    r = cwsnet("keys", "show", "--data-dir", str(d))
    assert r.returncode == 2 and "cwsnet keys init" in r.stderr
    first = cwsnet("keys", "init", "--data-dir", str(d))
    assert first.returncode == 0, first.stderr
    ca = pki.load_ca(d / "ca")
    assert ca.fingerprint in first.stdout and str(ca.cert_path) in first.stdout and "(created)" in first.stdout
    assert mode(ca.key_path) == 0o600 and mode(d / "keys" / "cloud.json") == 0o600
    # never a secret: not the CA key, not the cloud's secret key or broker password
    bundle = json.loads((d / "keys" / "cloud.json").read_text())
    key_body = "".join(ca.key_path.read_text().splitlines()[1:-1])
    for secret in [key_body, *(str(v) for k, v in bundle.items() if "secret" in k or "password" in k)]:
        assert secret and secret not in first.stdout + first.stderr
    second = cwsnet("keys", "init", "--data-dir", str(d))
    assert second.returncode == 0 and "(kept)" in second.stdout and ca.fingerprint in second.stdout
    assert json.loads((d / "keys" / "cloud.json").read_text()) == bundle

    # `cwsnet init` uses the same CA and keys, and issues the certificates `keys show` lists
    assert cwsnet("init", "--data-dir", str(d), "--devices", "1").returncode == 0
    assert pki.load_ca(d / "ca").fingerprint == ca.fingerprint
    assert json.loads((d / "keys" / "cloud.json").read_text())["secret_key"] == bundle["secret_key"]
    lab = HomeLab(d)
    cert, key = lab.tls_paths("cloud-broker")
    pki.issue_server_cert(ca, cert, key, ["localhost", "127.0.0.1", "::1"], now=NOW - 350 * DAY)
    shown = cwsnet("keys", "show", "--data-dir", str(d))
    assert shown.returncode == 0, shown.stderr
    assert ca.fingerprint in shown.stdout and "site-home-broker.crt: ok" in shown.stdout
    assert "cloud-broker.crt: renewal due" in shown.stdout
    assert pki.cert_info(cert).fingerprint in shown.stdout
    assert "PRIVATE KEY" not in shown.stdout


def test_cloud_reports_certificate_expiry(tmp_path: Path) -> None:
    from cloud.daemon import CloudDaemon
    from cloud.metrics import CloudMetrics

    lab = HomeLab(tmp_path / "lab")
    lab.init(Topology(devices=[], https=True))
    cfg = load_config(lab.config_path("cloud"), CloudConfig)
    fake = SimpleNamespace(cfg=cfg, metrics=CloudMetrics())
    CloudDaemon._check_tls(fake)  # type: ignore[arg-type]
    text = fake.metrics.render().decode()
    for listener, name in (("mqtt", "cloud-broker"), ("http", "console")):
        want = pki.cert_info(lab.tls_paths(name)[0]).not_after.timestamp()
        line = f'cwsnet_tls_cert_expiry_timestamp_seconds{{listener="{listener}"}} '
        (value,) = [float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)]
        assert value == pytest.approx(want)
    lab.tls_paths("console")[1].write_text("junk\n")
    with pytest.raises(ConfigError, match=r"http\.tls: .*console\.crt and .*console\.key are not a usable"):
        CloudDaemon._check_tls(SimpleNamespace(cfg=load_config(lab.config_path("cloud"), CloudConfig),  # type: ignore[arg-type]
                                               metrics=CloudMetrics()))


# ---- a real amqtt broker with a certificate from the CA, and real clients ----------------------


@contextlib.asynccontextmanager
async def running(link: MqttLink, *, wait_connected: bool = True) -> AsyncIterator[None]:
    task = asyncio.create_task(link.run())
    try:
        if wait_connected:
            await await_for(lambda: link.connected.is_set() or task.done(), timeout=10, message="connected")
            if task.done():
                task.result()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def link(port: int, ca_file: Path, host: str = "127.0.0.1", **kw: Any) -> MqttLink:
    ep = BrokerEndpoint(host=host, port=port, tls={"ca_file": ca_file})
    return MqttLink(client_id=f"tls-{port}-{id(ep)}", host=host, port=port, tls=client_context(ep), keepalive=5,
                    backoff_min=0.05, backoff_max=0.3, connect_timeout=3.0, name="tls-test", **kw)


def test_amqtt_tls_listener_verified_against_the_cwsnet_ca(tmp_path: Path) -> None:
    """The embedded broker serves a CA-issued certificate; a client trusting the CWSNet CA connects
    and exchanges messages over TLS; one trusting another CA, or reaching the broker by a name the
    certificate does not cover, is refused and never connects."""
    ca = pki.ensure_ca(tmp_path / "ca")[0]
    other = pki.ensure_ca(tmp_path / "other-ca")[0]
    cert, key = tmp_path / "b.crt", tmp_path / "b.key"
    pki.ensure_server_cert(ca, cert, key, ["localhost", "127.0.0.1"])
    tls_port = free_port()

    async def body() -> None:
        broker = await start_broker(BrokerSettings(port=None, tls_port=tls_port, certfile=cert, keyfile=key))
        try:
            assert set(broker._servers) == {"tls"}  # no plaintext listener at all (amqtt's default is 0.0.0.0:1883)
            got: list[Message] = []

            async def on_message(m: Message) -> None:
                got.append(m)

            good = link(tls_port, ca.cert_path, on_message=on_message)
            good.subscribe("tls/#", qos=1)
            async with running(good):
                await good.publish("tls/hello", b"over TLS", qos=1)
                await await_for(lambda: [m.payload for m in got] == [b"over TLS"], message="message over TLS")
                assert good.stats["connects"] == 1

            stranger = link(tls_port, other.cert_path)
            async with running(stranger, wait_connected=False):
                await await_for(lambda: stranger.stats["connect_failures"] >= 2, message="TLS refusals")
                assert "CERTIFICATE_VERIFY_FAILED" in str(stranger.stats["last_error"])
                assert stranger.stats["connects"] == 0 and not stranger.connected.is_set()

            # the same broker reached by a name the certificate does not cover: refused too
            pki.issue_server_cert(ca, cert, key, ["localhost"])  # no 127.0.0.1 any more
        finally:
            await broker.shutdown()
        broker = await start_broker(BrokerSettings(port=None, tls_port=tls_port, certfile=cert, keyfile=key))
        try:
            wrong_name = link(tls_port, ca.cert_path)
            async with running(wrong_name, wait_connected=False):
                await await_for(lambda: wrong_name.stats["connect_failures"] >= 1, message="name mismatch")
                assert "CERTIFICATE_VERIFY_FAILED" in str(wrong_name.stats["last_error"])
                assert "mismatch" in str(wrong_name.stats["last_error"])
                assert wrong_name.stats["connects"] == 0
        finally:
            await broker.shutdown()

    run_async(body())


# ---- `cwsnet up`: every link over TLS, the console over HTTPS ----------------------------------


@pytest.mark.integration
def test_up_runs_every_link_over_tls_and_the_console_over_https(tmp_path: Path) -> None:
    data = tmp_path / "lab"
    http, cloud_plain, gw_plain, cloud_tls, gw_tls = (free_port() for _ in range(5))
    procs = ProcessSet(tmp_path / "logs")
    try:
        up = procs.start("up", [sys.executable, "-m", "cwsnet", "up", "--data-dir", str(data), "--devices", "2",
                                "--https", "--http-port", str(http), "--cloud-port", str(cloud_plain),
                                "--gateway-port", str(gw_plain), "--cloud-tls-port", str(cloud_tls),
                                "--gateway-tls-port", str(gw_tls), "--telemetry-interval", "0.5"])
        up.wait_log(rf"CWSNet is up: console https://127\.0\.0\.1:{http}/", timeout=60)
        ca_file = data / "ca" / "ca.crt"
        up.wait_log(rf"clients trust {ca_file}", timeout=5)
        eps = json.loads((data / "endpoints.json").read_text())
        assert eps["brokers"] == {"cloud": f"127.0.0.1:{cloud_tls}", "gw-home": f"127.0.0.1:{gw_tls}"}
        assert eps["ca_file"] == str(ca_file)

        # the console answers over HTTPS with a certificate the CWSNet CA issued, and only to clients trusting it
        r = httpx.get(f"https://127.0.0.1:{http}/healthz", verify=str(ca_file), timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{http}/healthz", verify=str(pki.ensure_ca(tmp_path / "x")[0].cert_path),
                      timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=5)

        # every daemon's client is configured for TLS against the CA
        lab = HomeLab(data)
        for node, key in (("cloud", "client"), ("gw-home", "uplink"), ("gw-home", "site_client"),
                          ("dev-1", "broker"), ("dev-2", "broker")):
            cfg = yaml.safe_load(lab.config_path(node).read_text())
            assert cfg[key]["port"] in (cloud_tls, gw_tls) and cfg[key]["tls"]["ca_file"] == "../ca/ca.crt"

        # the devices' data crossed both TLS links: they show online at the cloud
        db = data / "cloud" / "cloud.db"

        def online() -> set[str]:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
                return {r[0] for r in c.execute("select id from nodes where role = 'device' and online = 1")}

        wait_for(lambda: online() == {"dev-1", "dev-2"}, timeout=45, message="both devices online over TLS")

        def telemetry() -> int:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
                return c.execute("select count(*) from messages where kind = 'telemetry'").fetchone()[0]

        wait_for(lambda: telemetry() >= 2, timeout=30, message="telemetry stored through both TLS links")
        # nothing refused or failed a handshake along the way
        logs = "\n".join(p.read_text() for p in (data / "logs").glob("*.log"))
        assert "CERTIFICATE_VERIFY_FAILED" not in logs and "Traceback" not in logs
        assert up.terminate(timeout=15) == 0
    except BaseException:
        print(procs.tails(60))
        for f in sorted((data / "logs").glob("*.log")):
            print(f"----- {f.name} -----\n" + "\n".join(f.read_text().splitlines()[-30:]))
        raise
    finally:
        procs.close()


def test_a_client_refuses_plain_mqtt_beyond_loopback_unless_told(tmp_path: Path) -> None:
    from cwsnet.bundle import Bundle
    from cwsnet.config import BrokerEndpoint, Reconnect
    from cwsnet.identity import Identity
    from cwsnet.links import link_for

    b = Bundle(Identity.generate("gw", "home", "gateway"), Identity.generate("cloud", "home", "cloud").public_key,
               "gw", "token")
    with pytest.raises(ConfigError, match=r"uplink: 192\.0\.2\.1:1883 is not a loopback address.*uplink\.tls\.ca_file"):
        link_for(BrokerEndpoint(host="192.0.2.1"), b, Reconnect(), client_id="gw", section="uplink", name="t")
    assert link_for(BrokerEndpoint(host="192.0.2.1", plaintext=True), b, Reconnect(), client_id="gw",
                    section="uplink", name="t").port == 1883
    assert link_for(BrokerEndpoint(host="127.0.0.1"), b, Reconnect(), client_id="gw", section="uplink",
                    name="t") is not None
