"""A captured gateway: an attacker holding the gateway's keys and MQTT credential, reading every
message through its broker and the cloud broker, sees only ciphertext, and nothing it forges is
accepted by the cloud (as a device's data) or by a device (as the cloud's command)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from harness import ProcessSet, wait_for
from harness.db import query
from harness.deploy import Deployment, get, post
from paho.mqtt.enums import CallbackAPIVersion

from cwsnet import envelope, topics
from cwsnet.bundle import Bundle
from cwsnet.endpoint import Endpoint
from cwsnet.errors import EnvelopeError
from cwsnet.replay import SeqCounter

pytestmark = pytest.mark.integration
SECRET_ARG = "attack-at-dawn-" + os.urandom(4).hex()


class Tap:
    """Everything a client holding the gateway's credential (or the debug credential) may read."""

    def __init__(self, port: int, username: str, password: str, client_id: str, flt: str) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.c.username_pw_set(username, password)
        self.lock = threading.Lock()
        self.seen: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.c.on_connect = lambda c, *_a: c.subscribe(flt, qos=1)
        self.c.on_subscribe = lambda *_a: self.subscribed.set()
        self.c.on_message = self._add
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.subscribed.wait(10)

    def _add(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.seen.append((m.topic, m.payload))

    def messages(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.seen)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_captured_gateway_sees_ciphertext_and_cannot_forge(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    agent = d.start("agent", "dev-1")
    wait_for(lambda: "dev-1" in d.online(), timeout=30, message="dev-1 online")

    gw = Bundle.load_node(d.lab.bundle_path(d.topo.gateway))
    # the attacker's taps: the site broker with the gateway's own credential (it reads its whole site)
    # and the cloud broker with the gateway's credential (it reads its site's commands and acks)
    site_tap = Tap(d.topo.gateway_mqtt_port, gw.mqtt_username, gw.mqtt_password or "", f"{gw.mqtt_username}-tap1",
                   "cws/v1/home/#")
    cloud_tap = Tap(d.topo.cloud_mqtt_port, gw.mqtt_username, gw.mqtt_password or "",
                    f"{gw.mqtt_username}-tap2", "cws/v1/home/+/task/cmd")

    task = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"secret": SECRET_ARG}})
    done = wait_for(lambda: (t := get(f"{d.base}/api/v1/tasks/{task['id']}"))["state"] == "succeeded" and t,
                    timeout=30, message="the task ran")
    assert done["result"] == {"secret": SECRET_ARG}
    wait_for(lambda: len([t for t, _ in site_tap.messages() if "/telemetry/" in t]) >= 5, timeout=30,
             message="telemetry through the site broker")

    captured = site_tap.messages() + cloud_tap.messages()
    assert any(t.endswith("/task/cmd") for t, _ in captured) and any(t.endswith("/task/result") for t, _ in captured)
    readings = [v for (v,) in query(d.lab.path("cloud", "cloud.db"),
                                    "select \"values\" from telemetry where sender = 'dev-1' limit 50")]
    gw_ep = Endpoint(gw.identity, SeqCounter(1, lambda _m: None), gw.peer_keys().get)
    for topic, payload in captured:
        # 1. only envelopes, and nothing of the plaintext: not the task's argument, not its result
        assert set(cbor2.loads(payload)) == {"h", "n", "c"}, topic
        assert SECRET_ARG.encode() not in payload
        for encoded in {cbor2.dumps(v) for v in readings[:5]}:
            assert encoded not in payload
        # 2. the gateway's key opens none of the device's or the cloud's messages to each other
        h = envelope.peek_header(payload)
        if h.recipient != gw.identity.node:
            with pytest.raises(EnvelopeError):
                envelope.open_envelope(payload, topic=topic, me=h.recipient, my_key=gw.identity.secret_key,
                                       sender_key=lambda n: gw.cloud_public_key if n == "cloud" else None)

    # 3. forging a device's data on the cloud broker, with everything the gateway holds
    forger = Tap(d.topo.cloud_mqtt_port, gw.mqtt_username, gw.mqtt_password or "", f"{gw.mqtt_username}-forge",
                 "cws/v1/home/gw-home/ack")
    tel = topics.telemetry("home", "dev-1", "env")
    seq = int(time.time() * 1000) + 10**10
    as_dev = envelope.Header(id=envelope.new_message_id(), sender="dev-1", recipient="cloud", seq=seq,
                             ts=int(time.time() * 1000), kind="telemetry")
    body = {"stream": "env", "readings": [{"ts": 1, "values": {"temperature": -99.0}}]}
    forger.publish(tel, envelope.seal(topic=tel, header=as_dev, body=body, sender_key=gw.identity.secret_key,
                                      recipient_key=gw.cloud_public_key))  # claims dev-1, sealed by the gateway
    own = gw_ep.seal(tel, "telemetry", body, to="cloud", seq=seq + 1)[0]
    forger.publish(tel, own)  # honestly the gateway's, on the device's topic
    real_topic, real = next((t, p) for t, p in captured if "/telemetry/" in t)
    outer = cbor2.loads(real)
    hm = cbor2.loads(outer["h"])
    hm["seq"] += 10**9
    forger.publish(real_topic, cbor2.dumps({**outer, "h": cbor2.dumps(hm)}))  # a captured one, seq changed
    other_topic = topics.telemetry("home", "dev-1", "other")
    forger.publish(other_topic, real)  # a captured one, moved to another topic

    def refused() -> set[str]:
        return {r for (r,) in query(d.lab.path("cloud", "cloud.db"),
                                    "select json_extract(data, '$.reason') from events where type = 'message.rejected'")}

    wait_for(lambda: {"forged", "topic_mismatch"} <= refused(), timeout=20, message="the forgeries refused")
    assert query(d.lab.path("cloud", "cloud.db"),
                 "select count(*) from telemetry where \"values\" like '%-99.0%'") == [(0,)]
    assert query(d.lab.path("cloud", "cloud.db"), "select count(*) from messages where seq in (?, ?, ?)",
                 (seq, seq + 1, hm["seq"])) == [(0,)]

    # 4. commanding the device as the cloud: the device refuses what the gateway sealed
    cmd_topic = topics.task_cmd("home", "dev-1")
    as_cloud = envelope.Header(id=envelope.new_message_id(), sender="cloud", recipient="dev-1",
                               seq=int(time.time() * 1000) + 10**10, ts=int(time.time() * 1000), kind="task_cmd")
    dev_pk = Bundle.load_node(d.lab.bundle_path("dev-1")).identity.public_key
    forged_cmd = envelope.seal(topic=cmd_topic, header=as_cloud, sender_key=gw.identity.secret_key,
                               recipient_key=dev_pk,
                               body={"task": "t-forged", "handler": "sha256", "args": {"data": "x"}})
    site_tap.publish(cmd_topic, forged_cmd)
    agent.wait_log(r"rejected .*task/cmd.*\(forged\)", timeout=10)
    assert "t-forged" not in agent.log_text()  # never opened, never run
    for tap in (site_tap, cloud_tap, forger):
        tap.close()
