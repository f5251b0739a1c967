"""docker-compose.yml and the Dockerfile can't be run here (no Docker engine), so check them
against the CLI: every service's command parses, ports match the flags, volumes are shared."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml
from cryptography import x509

from cwsnet.cli import build_parser
from cwsnet.homelab import HomeLab, Topology

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_command_parses_with_the_cli() -> None:
    services = compose()["services"]
    assert {"init", "cloud", "gateway", "dev-1", "dev-2", "dev-3"} <= set(services)
    parser = build_parser()
    for name, svc in services.items():
        args = parser.parse_args(svc["command"])
        assert args.func is not None, name


def test_init_flags_match_ports_and_service_configs(tmp_path: Path) -> None:
    services = compose()["services"]
    init = build_parser().parse_args(services["init"]["command"])
    assert init.data_dir == "/data"
    # run the same init into a temp dir: every config a service points at must be created
    lab = HomeLab(tmp_path)
    topo = lab.init(_topology(init))
    for name, svc in services.items():
        if name == "init":
            continue
        cmd = svc["command"]
        cfg = cmd[cmd.index("--config") + 1]
        assert cfg.startswith("/data/config/")
        assert (tmp_path / cfg.removeprefix("/data/")).exists(), f"{name}: {cfg} is not created by init"
        assert svc.get("volumes", []) or "volumes" in compose()["x-cwsnet"]
    published = {p.split(":")[-1] for s in services.values() for p in s.get("ports", [])}
    assert {str(init.http_port), str(init.cloud_tls_port), str(init.gateway_tls_port)} <= published
    # plaintext MQTT listens on each container's loopback only: publishing it would be useless
    assert not {str(init.cloud_port), str(init.gateway_port)} & published
    # containers reach each other by service name
    gw_cfg = yaml.safe_load(lab.config_path(topo.gateway).read_text())
    assert gw_cfg["uplink"]["host"] == "cloud"
    dev_cfg = yaml.safe_load(lab.config_path("dev-1").read_text())
    assert dev_cfg["broker"]["host"] == "gateway"
    assert init.host == "0.0.0.0" and init.http_host == "0.0.0.0"
    assert "127.0.0.1:8080:8080" in services["cloud"]["ports"], "unauthenticated console only on host loopback"


def _topology(init: argparse.Namespace) -> Topology:
    from cwsnet.cli import _topology as topology_from_flags

    return topology_from_flags(init)


def _san(cert: Path) -> tuple[set[str], set[str]]:
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(i) for i in san.get_values_for_type(x509.IPAddress)}


def test_containers_talk_tls_verified_by_service_name(tmp_path: Path) -> None:
    """Every MQTT link between containers is TLS to the broker's TLS port, verified against the
    CWSNet CA in the shared volume, by a host name the broker's certificate names."""
    services = compose()["services"]
    init = build_parser().parse_args(services["init"]["command"])
    lab = HomeLab(tmp_path)
    topo = lab.init(_topology(init))

    def cfg(node: str) -> dict:
        return yaml.safe_load(lab.config_path(node).read_text())

    def in_volume(rel: str, node: str) -> str:  # a config's relative path, as the container sees it
        return "/data/" + str((lab.config_path(node).parent / rel).resolve().relative_to(tmp_path))

    cloud, gw = cfg("cloud"), cfg(topo.gateway)
    links = [("cloud", "client", cloud["client"]), (topo.gateway, "uplink", gw["uplink"]),
             (topo.gateway, "site_client", gw["site_client"])]
    links += [(d, "broker", cfg(d)["broker"]) for d in topo.devices]
    for node, section, ep in links:
        assert "tls" in ep and in_volume(ep["tls"]["ca_file"], node) == "/data/ca/ca.crt", (node, section)
        assert not ep["tls"].get("insecure"), (node, section)
        assert ep["port"] in (init.cloud_tls_port, init.gateway_tls_port), (node, section)
    assert gw["uplink"]["port"] == init.cloud_tls_port and cfg("dev-1")["broker"]["port"] == init.gateway_tls_port

    # the brokers: TLS on every address, plaintext on the container's loopback only
    for node, broker in (("cloud", cloud["broker"]), (topo.gateway, gw["broker"])):
        assert broker["host"] == "0.0.0.0" and broker["plain_host"] == "127.0.0.1", node
        assert broker["tls_port"] in (init.cloud_tls_port, init.gateway_tls_port), node
    # each broker's certificate names the service the other containers use to reach it
    dns, ips = _san(lab.config_path("cloud").parent / cloud["broker"]["certfile"])
    assert {"cloud", "localhost"} <= dns and "127.0.0.1" in ips
    dns, ips = _san(lab.config_path(topo.gateway).parent / gw["broker"]["certfile"])
    assert {"gateway", "localhost"} <= dns and "127.0.0.1" in ips
    # the console listens beyond loopback inside its container: HTTPS only
    assert cloud["http"]["host"] == "0.0.0.0" and "certfile" in cloud["http"]["tls"]
    dns, ips = _san(lab.config_path("cloud").parent / cloud["http"]["tls"]["certfile"])
    assert "localhost" in dns and "127.0.0.1" in ips  # published on the host's 127.0.0.1:8080


def test_healthchecks_verify_tls_with_the_ca() -> None:
    services = compose()["services"]
    cloud = " ".join(services["cloud"]["healthcheck"]["test"])
    assert "https://127.0.0.1:8080/healthz" in cloud and "cafile='/data/ca/ca.crt'" in cloud
    gateway = " ".join(services["gateway"]["healthcheck"]["test"])
    assert "8883" in gateway and "cafile='/data/ca/ca.crt'" in gateway and "wrap_socket" in gateway


def test_healthchecks_and_dependencies() -> None:
    services = compose()["services"]
    assert "healthz" in " ".join(services["cloud"]["healthcheck"]["test"])
    assert services["gateway"]["depends_on"]["cloud"]["condition"] == "service_healthy"
    assert services["cloud"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_volume_is_shared_by_every_service() -> None:
    c = compose()
    assert "cwsnet-data" in c["volumes"]
    assert c["x-cwsnet"]["volumes"] == ["cwsnet-data:/data"]


def test_dockerfile_copies_every_package_and_uses_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for pkg in ("cwsnet", "edge_agent", "gateway", "cloud"):
        assert re.search(rf"^COPY {pkg} ", text, re.M), pkg
    assert 'ENTRYPOINT ["cwsnet"]' in text and "USER cwsnet" in text
    assert re.search(r"^EXPOSE .*\b8883\b.*\b8884\b", text, re.M), "the TLS ports"
