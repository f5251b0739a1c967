"""`cwsnet policy explain` beyond access: routing, qos and task placement (offload)."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import pytest

from cloud.store import SqliteStore
from cwsnet.cli import main


def test_explaining_a_telemetry_topic_shows_routing_rate_limit_priority_and_retention(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["policy", "explain", "--device", "dev-1", "--role", "device", "--site", "home",
               "--topic", "cws/v1/home/dev-1/telemetry/health", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    blocks = out.split("\n\n")
    assert blocks[0].startswith("ALLOW: device dev-1 (site home) publish cws/v1/home/dev-1/telemetry/health")
    assert blocks[1].startswith("KEEP AT GATEWAY: telemetry/health of dev-1 (site home)")
    assert "default-routing/health-stays-on-site" in blocks[1]
    assert blocks[2].startswith("ADMIT: device dev-1") and "default-qos/" in blocks[2]
    assert blocks[3].startswith("PRIORITY 3: device dev-1")
    assert blocks[4].startswith("KEEP 90d: device dev-1")


def cloud_db(tmp_path: Path, device_cpu: float, gateway_online: bool) -> Path:
    path = tmp_path / "cloud" / "cloud.db"
    store = SqliteStore(path)
    for node, role in (("dev-1", "device"), ("gw-1", "gateway")):
        store.upsert_node(node, site="home", role=role, public_key=base64.b64encode(bytes(32)).decode())
    store.create_task(target="dev-1", handler="sha256", args={"data": "aGVsbG8="}, task_id="t-1")
    store.close()
    with sqlite3.connect(path) as db:  # what the devices' last statuses said
        db.execute("update nodes set online = 1, last_status = ? where id = 'dev-1'",
                   (json.dumps({"cpu": device_cpu, "tasks_running": 0, "handlers": ["echo", "sha256"]}),))
        db.execute("update nodes set online = ?, last_status = ? where id = 'gw-1'",
                   (int(gateway_online), json.dumps({"cpu": 5.0, "queue": 0})))
    return path


def test_a_task_placement_is_explained_from_the_cloud_database(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cloud_db(tmp_path, device_cpu=95.0, gateway_online=True)
    rc = main(["policy", "explain", "--task", "t-1", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("RUN ON gateway gw-1: task t-1 sha256"), out
    assert "default-offload/saturated-device-offloads" in out and "origin.cpu" in out
    # what if the device were idle: it runs the small task itself
    cloud_db(tmp_path / "idle", device_cpu=10.0, gateway_online=True)
    rc = main(["policy", "explain", "--handler", "sha256", "--device", "dev-1", "--input-bytes", "100",
               "--data-dir", str(tmp_path / "idle")])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("RUN ON device dev-1: task what-if sha256"), out
    # health data never goes to the cloud: with the gateway offline, a big health task waits
    cloud_db(tmp_path / "down", device_cpu=95.0, gateway_online=False)
    rc = main(["policy", "explain", "--handler", "sha256", "--device", "dev-1", "--input-bytes", "200000",
               "--data-class", "health", "--data-dir", str(tmp_path / "down")])
    out = capsys.readouterr().out
    assert rc == 3 and out.startswith("WAIT"), out


def test_explain_needs_a_topic_or_a_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "explain", "--device", "dev-1", "--data-dir", str(tmp_path)]) == 2
    assert "--topic is required" in capsys.readouterr().err
    assert main(["policy", "explain", "--task", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "no cloud database" in capsys.readouterr().err
