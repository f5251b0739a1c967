"""The hostile-input suite: a running site (cloud, gateway, two devices) is attacked from the
network and by a provisioned but malicious device. Every attempt is refused with its reason in a
log or the cloud's events, nothing of it is stored, and no daemon stops or stops serving others.

- an unknown client, a wrong token, anonymous access, a revoked device
- a device publishing on another device's topic; a `#` subscriber without a grant
- a tampered envelope, a replay, a plaintext (unsealed) message, an oversized payload
- malformed MQTT packets and random bytes on both brokers' ports
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from harness import ProcessSet, wait_for
from harness.db import query
from harness.deploy import Deployment
from paho.mqtt.enums import CallbackAPIVersion

from cwsnet import topics
from cwsnet.bundle import Bundle
from cwsnet.endpoint import Endpoint
from cwsnet.replay import SeqCounter

pytestmark = pytest.mark.integration


@dataclass
class Site:
    d: Deployment
    procs: ProcessSet
    mallory: Bundle  # a provisioned device that misbehaves
    ep: Endpoint

    def db(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return query(self.d.lab.path("cloud", "cloud.db"), sql, params)

    def stored(self, sender: str) -> int:
        return self.db("select count(*) from messages where sender = ?", (sender,))[0][0]

    def rejections(self, reason: str) -> list[dict[str, Any]]:
        return [json.loads(x) for (x,) in self.db(
            "select data from events where type = 'message.rejected' and json_extract(data, '$.reason') = ?",
            (reason,))]

    def log(self, name: str) -> str:
        return self.procs[name].log_text()

    def healthy(self) -> None:
        """Every daemon runs, and dev-1's data still reaches the cloud."""
        for p in self.procs:
            assert p.alive, f"{p.name} died: {p.log_tail()}"
        n = self.stored("dev-1")
        wait_for(lambda: self.stored("dev-1") > n, timeout=20, message="dev-1's data still flows")


def cli(d: Deployment, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "cwsnet", *args, "--data-dir", str(d.lab.dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("hostile")
    procs = ProcessSet(tmp / "logs")
    try:
        d = Deployment(tmp, procs, devices=1)
        cli(d, "device", "add", "mallory", "--site", "home")
        cli(d, "device", "add", "gone", "--site", "home")
        cli(d, "device", "revoke", "gone")
        d.start_cloud()
        d.start("gateway", d.topo.gateway)
        d.start("agent", "dev-1")
        mallory = Bundle.load_node(d.lab.bundle_path("mallory"))
        ep = Endpoint(mallory.identity, SeqCounter(int(time.time() * 1000), lambda _m: None),
                      mallory.peer_keys().get, key_version=mallory.kv)
        s = Site(d, procs, mallory, ep)
        wait_for(lambda: s.stored("dev-1") > 0, timeout=30, message="dev-1's first message at the cloud")
        yield s
    finally:
        procs.close()


class Client:
    """A paho client that records CONNACK, SUBACKs and the connection's end."""

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             reconnect_on_failure=False)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.connack: Any = None
        self.subacks: dict[int, list[int]] = {}
        self.got: list[bytes] = []
        self.done = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda _c, _u, mid, codes, _p: self.subacks.__setitem__(mid, [x.value for x in codes])
        self.c.on_message = lambda _c, _u, m: self.got.append(m.payload)
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        assert self.done.wait(10), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connack = rc
        self.done.set()

    @property
    def accepted(self) -> bool:
        return not self.connack.is_failure

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def subscribe(self, flt: str) -> int:
        _rc, mid = self.c.subscribe(flt, qos=1)
        return wait_for(lambda: self.subacks.get(mid), timeout=10, message=f"SUBACK for {flt}")[0]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def mallory(s: Site) -> Client:
    c = Client(s.d.topo.gateway_mqtt_port, "mallory", s.mallory.mqtt_password, f"mallory-{time.monotonic_ns()}")
    assert c.accepted
    return c


def telemetry(s: Site, node: str = "mallory", stream: str = "env", value: float = 1.0) -> tuple[str, bytes, int]:
    topic = topics.telemetry("home", node, stream)
    payload, header = s.ep.seal(topics.telemetry("home", "mallory", stream), "telemetry",
                                {"stream": stream, "readings": [{"ts": 1, "values": {"x": value}}]}, to="cloud")
    return topic, payload, header.seq


# -- who may connect ---------------------------------------------------------------------------


@pytest.mark.parametrize(("username", "password", "reason"), [
    ("stranger", "a-guess", "unknown user 'stranger'"),
    ("dev-1", "not-its-token", "bad token for user 'dev-1'"),
    (None, None, "anonymous access is disabled"),
    ("gone", None, "user 'gone' is revoked"),
])
def test_clients_without_a_valid_credential_are_refused(site: Site, username: str | None, password: str | None,
                                                        reason: str) -> None:
    if username == "gone":
        password = Bundle.load_node(site.d.lab.bundle_path("gone")).mqtt_password
    for port, daemon in ((site.d.topo.gateway_mqtt_port, site.d.topo.gateway), (site.d.topo.cloud_mqtt_port, "cloud")):
        c = Client(port, username, password, f"{username or 'anon'}-x{time.monotonic_ns()}")
        assert not c.accepted and c.connack == "Not authorized", c.connack  # CONNACK 5
        c.close()
        if daemon == site.d.topo.gateway:
            site.procs[daemon].wait_log(f"auth: refused .*{reason}", timeout=5)
    assert site.stored("stranger") == 0 and site.stored("gone") == 0
    site.healthy()


# -- what a provisioned device may do ------------------------------------------------------------


def test_a_device_cannot_publish_on_another_devices_topic(site: Site) -> None:
    c = mallory(site)
    before = site.stored("dev-1")
    topic, payload, seq = telemetry(site, node="dev-1")  # sealed by mallory, put on dev-1's topic
    c.publish(topic, payload)
    forged_header = cbor2.loads(payload)
    c.publish(topics.status("home", "dev-1"), cbor2.dumps(forged_header))
    site.procs[site.d.topo.gateway].wait_log("acl: refused publish 'cws/v1/home/dev-1/.*' for user 'mallory'",
                                             timeout=5)
    site.healthy()
    assert site.db("select count(*) from messages where sender in ('dev-1', 'mallory') and seq = ?", (seq,)) == [(0,)]
    assert site.stored("dev-1") >= before
    c.close()


def test_a_subscriber_to_everything_without_a_grant_is_refused(site: Site) -> None:
    c = mallory(site)
    assert c.subscribe("#") == 0x80
    assert c.subscribe("cws/v1/home/+/telemetry/#") == 0x80
    assert c.subscribe("cws/v1/home/dev-1/task/cmd") == 0x80
    assert c.subscribe("cws/v1/home/mallory/task/cmd") == 1  # its own commands: granted
    site.procs[site.d.topo.gateway].wait_log("acl: refused subscribe '#' for user 'mallory'", timeout=5)
    assert c.got == []
    c.close()


def test_a_tampered_envelope_is_refused_as_forged(site: Site) -> None:
    c = mallory(site)
    topic, payload, seq = telemetry(site)
    outer = cbor2.loads(payload)
    ct = bytearray(outer["c"])
    ct[-1] ^= 0x01
    c.publish(topic, cbor2.dumps({**outer, "c": bytes(ct)}))
    wait_for(lambda: [r for r in site.rejections("forged") if r.get("seq") == seq], timeout=15,
             message="the cloud's message.rejected event (forged)")
    assert site.db("select count(*) from messages where sender = 'mallory' and seq = ?", (seq,)) == [(0,)]
    c.close()
    site.healthy()


def test_a_replay_is_stored_once(site: Site) -> None:
    c = mallory(site)
    topic, payload, seq = telemetry(site, value=7.0)
    c.publish(topic, payload)
    wait_for(lambda: site.db("select count(*) from messages where sender = 'mallory' and seq = ?", (seq,)) == [(1,)],
             timeout=15, message="the original is stored")
    wait_for(lambda: query(site.d.lab.path("gateway", "uplink-outbox.db"),
                           "select count(*) from outbox where sender = 'mallory' and seq = ?", (seq,)) == [(0,)],
             timeout=15, message="the gateway freed it on the cloud's ack")
    # replayed later, by someone who captured it, on a fresh connection
    c.close()
    c = mallory(site)
    c.publish(topic, payload)
    stamp = wait_for(lambda: [r for r in site.rejections("replay") if r.get("seq") == seq], timeout=15,
                     message="the replay recorded as such")
    assert stamp
    assert site.db("select count(*) from telemetry where sender = 'mallory' and seq = ?", (seq,)) == [(1,)]
    c.close()


def test_a_plaintext_message_is_never_forwarded(site: Site) -> None:
    c = mallory(site)
    before = site.stored("mallory")
    c.publish(topics.telemetry("home", "mallory", "env"), json.dumps({"temperature": 21.5}).encode())
    site.procs[site.d.topo.gateway].wait_log("dropped message on cws/v1/home/mallory/telemetry/env .*not CBOR",
                                             timeout=10)
    site.healthy()
    assert site.stored("mallory") == before
    c.close()


def test_an_oversized_payload_is_refused(site: Site) -> None:
    c = mallory(site)
    before = site.stored("mallory")
    c.publish(topics.telemetry("home", "mallory", "env"), os.urandom(1024 * 1024))
    site.procs[site.d.topo.gateway].wait_log("1048576 bytes; the limit is 262144", timeout=10)
    site.healthy()
    assert site.stored("mallory") == before
    c.close()


# -- the brokers' ports ---------------------------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


GARBAGE = {
    "random bytes": os.urandom(4096),
    "HTTP request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "PUBLISH before CONNECT": b"\x30" + _remaining_length(12) + _mqtt_string(b"a/b") + b"hello!!",
    "CONNECT with a wrong protocol name": b"\x10" + _remaining_length(14) + _mqtt_string(b"MQTX") + b"\x04\x02\x00\x3c"
                                          + _mqtt_string(b"ab"),
    "CONNECT claiming 200 MB": b"\x10\xff\xff\xff\x7f" + b"\x00" * 64,
    "truncated CONNECT": b"\x10" + _remaining_length(40) + _mqtt_string(b"MQTT") + b"\x04",
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_malformed_packets_and_random_bytes_on_the_broker_ports(site: Site, name: str) -> None:
    for port in (site.d.topo.gateway_mqtt_port, site.d.topo.cloud_mqtt_port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(GARBAGE[name])
                sock.shutdown(socket.SHUT_WR)  # a truncated packet then ends: the broker must not wait forever
                data = sock.recv(65536)
                while data:
                    assert not data.startswith(b"\x20\x02\x00\x00"), "the broker accepted garbage as a CONNECT"
                    data = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed on us: refused
    # the brokers still serve: a good client connects, and dev-1's data flows
    c = mallory(site)
    c.close()
    site.healthy()
