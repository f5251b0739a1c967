"""Secrets never appear in logs: a whole home lab run at debug level (`cwsnet up`), with traffic, a
task, a killed and restarted gateway and a clean stop, then every log line is scanned for every
secret the lab holds (secret keys, broker passwords and tokens), in every encoding we use."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import urllib.error
from pathlib import Path

import pytest
from harness import ProcessSet, free_port, wait_for
from harness.deploy import authenticate, get, post

pytestmark = pytest.mark.integration
OPERATOR_PASSWORD = "olga's long console password"


def secrets_of(data_dir: Path) -> dict[str, str]:
    """Every secret in the lab's data dir, by where it comes from."""
    found: dict[str, str] = {}
    for bundle in sorted((data_dir / "keys").glob("*.json")):
        d = json.loads(bundle.read_text())
        found[f"{bundle.name}: secret_key"] = d["secret_key"]
        if d.get("mqtt_password"):
            found[f"{bundle.name}: mqtt_password"] = d["mqtt_password"]
    for token_file in (data_dir / "keys").glob("*.mqtt"):
        found[token_file.name] = token_file.read_text().strip()
    found["admin-mqtt.json: password"] = json.loads((data_dir / "admin-mqtt.json").read_text())["password"]
    found["admin.token"] = (data_dir / "admin.token").read_text().strip()  # the REST API's first admin token
    # TLS private keys: the CWSNet CA's and each listener's (the EC scalar, and the whole PEM body)
    from cryptography.hazmat.primitives import serialization

    for pem in [data_dir / "ca" / "ca.key", *sorted((data_dir / "tls").glob("*.key"))]:
        key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
        found[f"{pem.parent.name}/{pem.name}: private key"] = base64.b64encode(scalar).decode()
        found[f"{pem.parent.name}/{pem.name}: PEM"] = "".join(pem.read_text().splitlines()[1:-1])
    return found


def forms(secret: str) -> set[str]:
    """The secret as written, and its raw bytes in the other encodings a log line could carry."""
    out = {secret}
    try:
        raw = base64.b64decode(secret, validate=True)
    except ValueError:
        return out
    out |= {raw.hex(), base64.urlsafe_b64encode(raw).decode().rstrip("="), repr(raw)[2:-1][:40]}
    return {f for f in out if len(f) >= 16}


def test_no_secret_in_any_log_of_a_full_run(tmp_path: Path, procs: ProcessSet) -> None:
    data = tmp_path / "lab"
    http = free_port()
    base = f"http://127.0.0.1:{http}"
    up = procs.start("up", [sys.executable, "-m", "cwsnet", "--log-level", "debug", "up", "--data-dir", str(data),
                            "--devices", "2", "--http-port", str(http), "--cloud-port", str(free_port()),
                            "--gateway-port", str(free_port()), "--cloud-tls-port", str(free_port()),
                            "--gateway-tls-port", str(free_port()), "--telemetry-interval", "0.5"])
    up.wait_log(r"CWSNet is up: console", timeout=60)
    authenticate(base, data / "admin.token")
    # REST API logins: a session from the admin token, an account with a password, a failed attempt
    sessions = [post(f"{base}/api/v1/auth/login", {"token": (data / "admin.token").read_text().strip()})["token"]]
    post(f"{base}/api/v1/accounts", {"username": "olga", "role": "viewer", "password": OPERATOR_PASSWORD})
    sessions.append(post(f"{base}/api/v1/auth/login", {"username": "olga", "password": OPERATOR_PASSWORD})["token"])
    made = post(f"{base}/api/v1/tokens", {"account": "olga", "name": "scanner"})["token"]
    with pytest.raises(urllib.error.HTTPError):
        post(f"{base}/api/v1/auth/login", {"username": "olga", "password": OPERATOR_PASSWORD[::-1]})
    wait_for(lambda: {d["id"] for d in get(f"{base}/api/v1/devices")["items"] if d["online"]} == {"dev-1", "dev-2"},
             timeout=30, message="both devices online")
    task = post(f"{base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"x": 1}})
    wait_for(lambda: get(f"{base}/api/v1/tasks/{task['id']}")["state"] == "succeeded", timeout=30,
             message="the echo task")
    # a crash and a restart: reconnects, resends and custody acks go through the logs too
    gw_pid = int((data / "run" / "gw-home.pid").read_text())
    os.kill(gw_pid, signal.SIGKILL)
    wait_for(lambda: (data / "run" / "gw-home.pid").exists()
             and int((data / "run" / "gw-home.pid").read_text()) != gw_pid, timeout=30,
             message="the supervisor restarted the gateway")
    gw_log = data / "logs" / "gw-home.log"
    wait_for(lambda: gw_log.read_text(errors="replace").count("uplink connected") >= 2, timeout=30,
             message="the restarted gateway connected to the cloud")
    wait_for(lambda: get(f"{base}/api/v1/gateways/gw-home")["online"], timeout=30, message="the gateway back online")
    assert up.terminate(timeout=20) == 0

    logs = {p: p.read_text(errors="replace") for p in [*sorted((data / "logs").glob("*.log")), up.log_path]}
    text = "\n".join(logs.values())
    assert "DEBUG" in text and "birth sent" in text  # a real, verbose run was scanned
    assert len(text.splitlines()) > 200
    print(f"scanned {len(text.splitlines())} log lines in {len(logs)} files")
    secrets = secrets_of(data)
    secrets |= {"operator password": OPERATOR_PASSWORD, "wrong password": OPERATOR_PASSWORD[::-1],
                "API token": made, **{f"session {i}": t for i, t in enumerate(sessions)}}
    assert len(secrets) >= 2 * 5  # 4 bundles (cloud, gateway, 2 devices) with key and password, and more
    def leaks(logs: dict[Path, str]) -> list[tuple[str, str]]:
        return [(where, path.name) for where, secret in secrets.items() for f in forms(secret)
                for path, content in logs.items() if f in content]

    assert leaks(logs) == [], f"secrets found in logs: {leaks(logs)}"
    # the scan finds a secret in any of its forms (so the empty result above means something)
    key = secrets["dev-1.json: secret_key"]
    for planted in (key, base64.b64decode(key).hex(), base64.urlsafe_b64encode(base64.b64decode(key)).decode()):
        assert set(leaks({up.log_path: f"oops {planted} oops"})) == {("dev-1.json: secret_key", up.log_path.name)}
