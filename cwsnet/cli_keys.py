"""``cwsnet keys``: the cloud's identity keys and the CWSNet certificate authority.

``keys init`` creates what a CWSNet deployment's trust starts from, and keeps it when it exists:
the cloud's identity (``{data-dir}/keys/cloud.json``, 0600) and the CA that issues every TLS
certificate (``{data-dir}/ca/ca.key`` 0600, ``{data-dir}/ca/ca.crt``). ``cwsnet init`` and
``cwsnet up`` run the same code first. ``keys show`` prints fingerprints and expiry dates.
Neither ever prints a secret.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from cwsnet.errors import ConfigError


def _lab(args: argparse.Namespace) -> Any:
    from cwsnet.homelab import HomeLab

    return HomeLab(Path(args.data_dir))


def _days_left(when: dt.datetime) -> str:
    days = (when - dt.datetime.now(dt.UTC)).days
    return f"expired {-days} days ago" if when <= dt.datetime.now(dt.UTC) else f"{days} days left"


def cmd_keys_init(args: argparse.Namespace) -> int:
    from cwsnet.homelab import Topology

    lab = _lab(args)
    site = args.site or (Topology.load(lab.topology_file).site if lab.exists() else "home")
    had_identity = lab.bundle_path("cloud").exists()
    cloud, ca, created = lab.init_keys(site)
    print(f"cloud identity: {lab.bundle_path('cloud')} ({'kept' if had_identity else 'created'}, mode 0600), "
          f"public key {cloud.identity.public_b64}")
    print(f"CWSNet CA: {ca.cert_path} ({'created' if created else 'kept'}), "
          f"valid until {ca.not_after:%Y-%m-%d} ({_days_left(ca.not_after)})")
    print(f"  SHA-256 fingerprint {ca.fingerprint}")
    print(f"  private key {ca.key_path} (mode 0600): keep it on this machine, never give it to a client")
    print(f"Clients verify the brokers and the console against the CA: tls.ca_file: {ca.cert_path}")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from cwsnet import pki

    lab = _lab(args)
    if not lab.ca_file.exists():
        raise ConfigError(f"{lab.ca_file}: no CWSNet CA in {lab.dir}; create it with "
                          f"`cwsnet keys init --data-dir {args.data_dir}`")
    ca_cert = pki.load_certificate(lab.ca_file, "CA certificate")
    ca = pki.CertInfo.of(ca_cert, lab.ca_file)
    cloud = lab.bundle_path("cloud")
    if cloud.exists():
        from cwsnet.bundle import Bundle

        print(f"cloud identity: {cloud}, public key {Bundle.load(cloud).identity.public_b64}")
    print(f"CWSNet CA: {ca.path}")
    print(f"  subject {ca.subject}")
    print(f"  SHA-256 fingerprint {ca.fingerprint}")
    print(f"  valid until {ca.not_after:%Y-%m-%d %H:%M} UTC ({_days_left(ca.not_after)})")
    certs = sorted(lab.path("tls").glob("*.crt")) if lab.path("tls").is_dir() else []
    if not certs:
        print("no TLS certificates issued yet (`cwsnet init` or `cwsnet up` issues them)")
    now = dt.datetime.now(dt.UTC)
    for path in certs:
        cert = pki.load_certificate(path)
        info = pki.CertInfo.of(cert, path)
        if not pki.issued_by(cert, ca_cert):
            state = "NOT issued by this CA: the next `cwsnet init`/`cwsnet up` issues a new one"
        elif info.not_after <= now:
            state = "EXPIRED: the next `cwsnet init`/`cwsnet up` renews it"
        elif info.not_after - now < pki.RENEW_BEFORE:
            state = "renewal due: the next `cwsnet init`/`cwsnet up` renews it"
        else:
            state = "ok"
        print(f"{path}: {state}")
        print(f"  names {', '.join(info.names) or '-'}")
        print(f"  SHA-256 fingerprint {info.fingerprint}")
        print(f"  valid until {info.not_after:%Y-%m-%d %H:%M} UTC ({_days_left(info.not_after)})")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``cwsnet keys init|show`` on the top-level subparsers."""
    sp = sub.add_parser(
        "keys", help="the cloud's keys and the CWSNet certificate authority (TLS)",
        description="The cloud's identity keys and the CWSNet CA, which issues the TLS certificates of every "
                    "MQTT broker and of the console; clients verify servers against the CA certificate.",
    )
    actions = sp.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default="./cwsnet-data", help="the data dir (default: ./cwsnet-data)")

    p = actions.add_parser(
        "init", help="create the cloud's identity and the CWSNet CA (existing ones are kept)",
        description="Create {data-dir}/keys/cloud.json (the cloud's identity, 0600) and the CWSNet CA: "
                    "{data-dir}/ca/ca.key (EC P-256, 0600) and {data-dir}/ca/ca.crt (valid 10 years). Existing "
                    "ones are kept. Prints the CA's SHA-256 fingerprint, never a secret. `cwsnet init` and "
                    "`cwsnet up` do this too.",
    )
    data_dir(p)
    p.add_argument("--site", default=None, help="the cloud identity's site (default: the data dir's, else home)")
    p.set_defaults(func=cmd_keys_init)

    p = actions.add_parser(
        "show", help="print the CA's and every issued certificate's fingerprint and expiry",
        description="Print the CWSNet CA and every TLS certificate in {data-dir}/tls/: names, SHA-256 "
                    "fingerprint, expiry, and whether the next `cwsnet init`/`cwsnet up` will renew it.",
    )
    data_dir(p)
    p.set_defaults(func=cmd_keys_show)
