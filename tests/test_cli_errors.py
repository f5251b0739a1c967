"""Bad input at the command line and in daemon configs: one clear line, a non-zero exit, no traceback,
and `cwsnet up` refuses to claim it is up when a tier could not start."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import ProcessSet, free_port
from harness.deploy import Deployment


def cwsnet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cwsnet", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("flags", "message"), [
    (["--http-port", "99999"], "--http-port: expected a TCP port 1..65535, got 99999"),
    (["--devices", "-1"], "--devices: expected 0..1000, got -1"),
    (["--site", "a/b"], "--site 'a/b' is not a valid name"),
    (["--http-port", "1884"], "must differ"),
    (["--telemetry-interval", "0"], "--telemetry-interval: expected seconds > 0"),
])
def test_bad_flags(tmp_path: Path, flags: list[str], message: str) -> None:
    r = cwsnet("init", "--data-dir", str(tmp_path / "d"), *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_reusing_a_data_dir_for_another_site_is_refused(tmp_path: Path) -> None:
    assert cwsnet("init", "--data-dir", str(tmp_path / "d"), "--devices", "1").returncode == 0
    r = cwsnet("init", "--data-dir", str(tmp_path / "d"), "--site", "barn")
    assert r.returncode == 2 and "holds site 'home'" in r.stderr and "Traceback" not in r.stderr


def test_rerun_applies_the_device_count_and_keeps_keys(tmp_path: Path) -> None:
    d = tmp_path / "d"
    assert cwsnet("init", "--data-dir", str(d), "--devices", "3").returncode == 0
    key = (d / "keys" / "dev-1.json").read_text()
    r = cwsnet("init", "--data-dir", str(d), "--devices", "1")
    assert r.returncode == 0 and "devices dev-1" in r.stdout and "dev-2" not in r.stdout
    assert (d / "keys" / "dev-1.json").read_text() == key
    assert (d / "keys" / "dev-3.json").exists()  # kept, still registered, just not run
    assert d.stat().st_mode & 0o777 == 0o700


def test_reconnect_delays_out_of_order_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "a.yaml"
    p.write_text("identity_file: x.json\nreconnect:\n  min_delay: 10\n  max_delay: 1\n")
    r = cwsnet("agent", "--config", str(p))
    assert r.returncode == 2 and f"{p}:2: reconnect:" in r.stderr and "must not exceed" in r.stderr, r.stderr


@pytest.mark.integration
def test_agent_config_problems_found_at_start(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    cfg = d.lab.config_path("dev-1")
    data = yaml.safe_load(cfg.read_text())
    data["broker"]["tls"] = {"ca_file": str(tmp_path / "missing-ca.pem")}
    cfg.write_text(yaml.safe_dump(data))
    r = cwsnet("agent", "--config", str(cfg))
    assert r.returncode == 2 and f"{cfg}: broker.tls.ca_file:" in r.stderr and "not found" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.integration
def test_refused_credentials_exit_2_with_one_line(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    gw = d.start("gateway", d.topo.gateway)
    gw.wait_port("127.0.0.1", d.topo.gateway_mqtt_port, timeout=30)
    bundle = d.lab.bundle_path("dev-1")
    import json

    b = json.loads(bundle.read_text())
    b["mqtt_password"] = "wrong"
    bundle.write_text(json.dumps(b))
    r = cwsnet("agent", "--config", str(d.lab.config_path("dev-1")), timeout=60)
    assert r.returncode == 2, r.stderr
    assert "refused our credentials" in r.stderr and "Traceback" not in r.stderr and "wrong" not in r.stderr


@pytest.mark.integration
def test_up_does_not_claim_success_when_the_cloud_cannot_start(tmp_path: Path) -> None:
    http = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", http))
        taken.listen()
        r = cwsnet("up", "--data-dir", str(tmp_path / "d"), "--http-port", str(http), "--cloud-port",
                   str(free_port()), "--gateway-port", str(free_port()), "--cloud-tls-port", str(free_port()),
                   "--gateway-tls-port", str(free_port()), timeout=90)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "CWSNet is up" not in r.stdout
    assert "cloud exited during start-up with code 2" in r.stderr and str(http) in r.stderr
    assert not list((tmp_path / "d" / "run").glob("*.pid"))


@pytest.mark.integration
def test_up_with_brokers_on_another_loopback_address(tmp_path: Path, procs: ProcessSet) -> None:
    """--host moves the brokers only; readiness is probed where each daemon really listens."""
    up = procs.start("up", [sys.executable, "-m", "cwsnet", "up", "--data-dir", str(tmp_path / "d"), "--devices", "1",
                            "--host", "127.0.0.2", "--http-port", str(free_port()), "--cloud-port", str(free_port()),
                            "--gateway-port", str(free_port()), "--cloud-tls-port", str(free_port()),
                            "--gateway-tls-port", str(free_port())])
    up.wait_log(r"CWSNet is up: console http://127\.0\.0\.1:\d+/", timeout=60)
    assert "brokers" in (tmp_path / "d" / "endpoints.json").read_text()
    assert "127.0.0.2" in (tmp_path / "d" / "endpoints.json").read_text()
    assert up.terminate(timeout=12) == 0
