"""docker-compose.yml and the Dockerfile can't be run here (no Docker engine), so check them
against the CLI: every service's command parses, ports match the flags, volumes are shared."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

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
    topo = lab.init(Topology(site=init.site, gateway=f"gw-{init.site}",
                             devices=[f"dev-{i}" for i in range(1, init.devices + 1)], host=init.host,
                             cloud_mqtt_port=init.cloud_port, gateway_mqtt_port=init.gateway_port,
                             http_port=init.http_port, cloud_host=init.cloud_host, gateway_host=init.gateway_host,
                             http_host=init.http_host))
    for name, svc in services.items():
        if name == "init":
            continue
        cmd = svc["command"]
        cfg = cmd[cmd.index("--config") + 1]
        assert cfg.startswith("/data/config/")
        assert (tmp_path / cfg.removeprefix("/data/")).exists(), f"{name}: {cfg} is not created by init"
        assert svc.get("volumes", []) or "volumes" in compose()["x-cwsnet"]
    published = {p.split(":")[-1] for s in services.values() for p in s.get("ports", [])}
    assert {str(init.http_port), str(init.cloud_port), str(init.gateway_port)} <= published
    # containers reach each other by service name
    gw_cfg = yaml.safe_load(lab.config_path(topo.gateway).read_text())
    assert gw_cfg["uplink"]["host"] == "cloud"
    dev_cfg = yaml.safe_load(lab.config_path("dev-1").read_text())
    assert dev_cfg["broker"]["host"] == "gateway"
    assert init.host == "0.0.0.0" and init.http_host == "0.0.0.0"
    assert "127.0.0.1:8080:8080" in services["cloud"]["ports"], "unauthenticated console only on host loopback"


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
