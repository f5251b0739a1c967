"""Bad messages that come in through a gateway, as a buggy or compromised device would send them:
the cloud refuses or neutralises them, the gateway drops them from its outbox (no retransmitting
forever), and everybody else's data keeps flowing."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import cbor2
import pytest
from harness import ProcessSet, free_port, wait_for
from harness.deploy import Deployment, get, prometheus

from cwsnet import topics
from cwsnet.bundle import Bundle
from cwsnet.endpoint import Endpoint
from cwsnet.replay import SeqCounter

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]


def gateway_metrics(port: int) -> dict[str, float]:
    return prometheus(f"http://127.0.0.1:{port}/metrics")


def test_forged_and_poison_messages_through_the_gateway(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=2)
    mport = free_port()
    d.edit(d.topo.gateway, {"metrics_port": mport, "retransmit_after": 1.0})
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-2")  # an innocent bystander
    wait_for(lambda: "dev-2" in d.online(), timeout=30, message="dev-2 online")

    # dev-1 is a buggy/compromised device: it publishes with its own credentials on its own topics
    b = Bundle.load(d.lab.bundle_path("dev-1"))
    ep = Endpoint(b.identity, SeqCounter(int(time.time() * 1000), lambda m: None), {"cloud": b.cloud_public_key}.get)

    def publish(topic: str, payload: bytes) -> None:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(d.topo.gateway_mqtt_port), "-i", "dev-1",
                        "-u", b.mqtt_username, "-P", b.mqtt_password or "", "-t", topic, "-q", "1", "-s"],
                       input=payload, check=True, timeout=10, capture_output=True)

    tel = topics.telemetry("home", "dev-1", "env")
    good, _ = ep.seal(tel, "telemetry", {"stream": "env", "readings": [{"ts": 1, "values": {"t": 0}}]}, to="cloud")
    outer = cbor2.loads(good)
    c = bytearray(outer["c"])
    c[3] ^= 0xFF
    publish(tel, cbor2.dumps({**outer, "c": bytes(c)}))  # forged: fails to authenticate
    status = topics.status("home", "dev-1")
    poison, _ = ep.seal(status, "status", {"state": "online", "cpu": math.nan, "uptime": 2**70}, to="cloud")
    publish(status, poison)  # authentic, but a NaN and a huge integer in the body
    after, _ = ep.seal(tel, "telemetry", {"stream": "env", "readings": [{"ts": 1, "values": {"t": 1}}]}, to="cloud")
    publish(tel, after)  # and a good one after them

    def settled() -> dict[str, float]:
        m = gateway_metrics(mport)
        done = (m.get("cwsnet_gateway_outbox_depth") == 0
                and m.get('cwsnet_gateway_messages_total{outcome="rejected_by_cloud"}', 0) >= 1)
        return m if done else {}

    wait_for(settled, timeout=30, message="gateway outbox empty, the forged message dropped on the cloud's word")
    rows = get(f"{d.base}/api/v1/devices/dev-1/telemetry?limit=10")["items"]
    assert [r["values"] for r in rows] == [{"t": 1}], "the good message got in"
    events = get(f"{d.base}/api/v1/events?limit=200")["items"]
    reasons = {e["data"].get("reason") for e in events if e["type"] == "message.rejected" and e["source"] == "dev-1"}
    assert {"forged", "malformed"} <= reasons, reasons
    # the bystander was never held up
    mark = int(time.time() * 1000)
    wait_for(lambda: max(i["ts"] for i in get(f"{d.base}/api/v1/devices/dev-2/telemetry?limit=5")["items"]) > mark,
             timeout=20, message="dev-2's telemetry still flowing")
    assert json.loads(json.dumps(get(f"{d.base}/healthz")))["status"] == "ok"
