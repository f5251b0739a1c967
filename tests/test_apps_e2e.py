"""Apps with real processes: the example app prints the telemetry it was granted, opened; the
brokers carry it sealed to that app alone; an app can subscribe to nothing but its own prefix; a
revoked app is disconnected."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest
from harness import ProcessSet, wait_for
from harness.deploy import Deployment
from harness.sniffer import Sniffer

from cwsnet.app import AppClient
from cwsnet.bundle import Bundle
from cwsnet.errors import NotForMe
from cwsnet.mqtt import AuthRefused

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def cwsnet(d: Deployment, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "cwsnet", *args, "--data-dir", str(d.lab.dir)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_an_app_reads_only_what_it_was_granted_sealed_to_it(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=2)
    cwsnet(d, "app", "add", "dash", "--grant", "cws/v1/home/dev-1/telemetry/#")
    cwsnet(d, "app", "add", "other", "--grant", "cws/v1/home/dev-2/#")
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    for dev in d.topo.devices:
        d.start("agent", dev)

    admin = json.loads(d.lab.path("admin-mqtt.json").read_text())
    sniffer = Sniffer(d.topo.cloud_mqtt_port, admin["username"], admin["password"], "admin-sniffer")
    assert sniffer.subscribe("cws/v1/_apps/#") == 1

    out = subprocess.run([sys.executable, str(REPO / "examples" / "app_print_telemetry.py"),
                          str(d.lab.bundle_path("dash")), "--port", str(d.topo.cloud_mqtt_port), "--count", "5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) == 5 and {x["node"] for x in lines} == {"dev-1"}
    assert all(isinstance(x["values"], dict) and x["values"] for x in lines), lines

    # on the broker the app topics carry envelopes only, and another app's key opens none of them
    wait_for(lambda: any("/_apps/dash/" in t for t, _ in sniffer.messages), timeout=10, message="app traffic")
    other = AppClient(d.lab.bundle_path("other"), port=d.topo.cloud_mqtt_port)
    with sniffer.lock:
        captured = [(t, p) for t, p in sniffer.messages if "/_apps/dash/" in t]
    for topic, payload in captured:
        assert set(cbor2.loads(payload)) == {"h", "n", "c"}
        with pytest.raises(NotForMe):
            other.endpoint.open(payload, topic)
    assert all(t.startswith("cws/v1/_apps/dash/home/dev-1/telemetry/") for t, _ in captured)
    assert not [t for t, _ in sniffer.messages if t.startswith("cws/v1/_apps/other/") and "/dev-1/" in t]

    # the cloud broker lets an app read its own prefix only
    dash = Bundle.load_node(d.lab.bundle_path("dash"))
    snoop = Sniffer(d.topo.cloud_mqtt_port, "dash", dash.mqtt_password or "", "dash-snoop")
    assert snoop.subscribe("cws/v1/_apps/other/#") == 0x80
    assert snoop.subscribe("cws/v1/home/dev-1/telemetry/#") == 0x80
    assert snoop.subscribe("#") == 0x80
    assert snoop.subscribe("cws/v1/_apps/dash/#") == 1
    snoop.close()
    sniffer.close()


def test_a_revoked_app_is_disconnected_and_refused(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    cwsnet(d, "app", "add", "dash", "--grant", "cws/v1/home/+/telemetry/#")
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")

    async def run() -> Any:
        async with AppClient(d.lab.bundle_path("dash"), port=d.topo.cloud_mqtt_port) as app:
            stream = app.messages()
            first = await asyncio.wait_for(anext(stream), 30)
            await asyncio.to_thread(cwsnet, d, "app", "revoke", "dash")
            with pytest.raises(AuthRefused):  # disconnected, then refused on reconnect: the stream ends
                async with asyncio.timeout(20):
                    async for _m in stream:
                        pass
            return first

    first = asyncio.run(run())
    assert first.node == "dev-1" and first.channel == "telemetry"
    procs["cloud"].wait_log("disconnecting client 'dash'", timeout=5)


def test_a_plaintext_app_reads_json_on_loopback(tmp_path: Path, procs: ProcessSet) -> None:
    """By explicit choice (`--plaintext-loopback`), a local tool that cannot open envelopes reads
    JSON with any MQTT client; its user may log in on a loopback listener only."""
    d = Deployment(tmp_path, procs, devices=1)
    cwsnet(d, "app", "add", "nodered", "--grant", "cws/v1/home/+/telemetry/#", "--plaintext-loopback")
    d.start_cloud()
    users = json.loads(d.lab.path("brokers", "cloud-users.json").read_text())["users"]
    assert users["nodered"]["loopback_only"] is True
    d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")
    b = Bundle.load_node(d.lab.bundle_path("nodered"))
    tool = Sniffer(d.topo.cloud_mqtt_port, "nodered", b.mqtt_password or "", "nodered")
    assert tool.subscribe("cws/v1/_apps/nodered/#") == 1
    wait_for(lambda: len(tool.messages) >= 3, timeout=30, message="JSON deliveries")
    with tool.lock:
        topic, payload = tool.messages[0]
    msg = json.loads(payload)
    assert topic.startswith("cws/v1/_apps/nodered/home/dev-1/telemetry/")
    assert msg["from"] == "dev-1" and msg["kind"] == "telemetry" and msg["body"]["readings"]
    # the `#` debugging user sees everything else, but not this unsealed data
    admin = json.loads(d.lab.path("admin-mqtt.json").read_text())
    sniffer = Sniffer(d.topo.cloud_mqtt_port, admin["username"], admin["password"], "admin-sniffer")
    assert sniffer.subscribe("#") == 1
    n = len(tool.messages)
    wait_for(lambda: len(tool.messages) >= n + 3 and any("/telemetry/" in t for t, _ in sniffer.messages),
             timeout=30, message="more deliveries to the tool, and telemetry seen by the sniffer")
    assert not [t for t, _ in sniffer.messages if t.startswith("cws/v1/_apps/nodered/")]
    sniffer.close()
    tool.close()
