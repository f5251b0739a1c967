"""run_cloud in-process with its embedded amqtt broker on free loopback ports.

A plain paho client plays a registered device and its gateway: it publishes a sealed birth and a
telemetry batch, and the test checks the HTTP API shows them, the live stream announces them,
a sealed ack for them reaches the gateway's ack topic, and a task posted to the API arrives
sealed on the device's task/cmd topic and its result comes back. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import paho.mqtt.client as paho
from harness import free_port  # tests/harness (on sys.path via conftest): session-unique free ports
from paho.mqtt.enums import CallbackAPIVersion

from cloud.daemon import run_cloud
from cloud.store import SqliteStore
from cwsnet import envelope, topics
from cwsnet.config import BrokerEndpoint, CloudConfig, EmbeddedBroker, HttpConfig
from cwsnet.endpoint import Endpoint
from cwsnet.identity import Identity, write_secret_file
from cwsnet.replay import SeqCounter

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, within: float = 10.0) -> T:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except Exception as exc:  # not ready yet
            last = exc
        if last is not None and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within} s waiting for {what} (last: {last!r})")


class Client:
    """A paho client on its own network thread; received messages land in a queue."""

    def __init__(self, client_id: str, port: int) -> None:
        self.received: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.subacks: dict[int, threading.Event] = {}
        self.suback_codes: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.on_message = lambda _c, _u, m: self.received.put(m)
        self.c.on_subscribe = self._on_subscribe
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _suback_event(self, mid: int) -> threading.Event:
        with self._lock:  # the SUBACK may arrive before subscribe() has returned its mid
            return self.subacks.setdefault(mid, threading.Event())

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        self.suback_codes[mid] = codes  # checked by subscribe(), not here: this runs on paho's thread
        self._suback_event(mid).set()

    def subscribe(self, flt: str, within: float = 5.0) -> None:
        """Subscribe at QoS 1 and return once the broker's SUBACK has arrived."""
        deadline = time.monotonic() + within
        while not self.c.is_connected():
            assert time.monotonic() < deadline, "paho client did not connect"
            time.sleep(0.02)
        rc, mid = self.c.subscribe(flt, qos=1)
        assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe {flt}: {paho.error_string(rc)}"
        assert self._suback_event(mid).wait(max(0.0, deadline - time.monotonic())), f"no SUBACK for {flt}"
        codes = self.suback_codes[mid]
        assert not any(c.is_failure for c in codes), f"subscription to {flt} refused: {codes}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=5)

    async def next(self, within: float = 10.0) -> paho.MQTTMessage:
        return await asyncio.to_thread(self.received.get, timeout=within)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_cloud_end_to_end(tmp_path: Path) -> None:
    cloud = Identity.generate("cloud", "cloud", "cloud")
    dev = Identity.generate("dev-1", "home", "device")
    gw = Identity.generate("gw-1", "home", "gateway")
    write_secret_file(tmp_path / "cloud.json", cloud.to_dict())
    db = tmp_path / "cloud.db"
    with_store = SqliteStore(db)
    for ident in (dev, gw):  # what `cwsnet device add` does
        with_store.upsert_node(ident.node, site=ident.site, role=ident.role, public_key=ident.public_b64)
    with_store.close()

    mqtt_port, http_port = free_port(), free_port()
    cfg = CloudConfig(
        identity_file=tmp_path / "cloud.json",
        broker=EmbeddedBroker(host="127.0.0.1", port=mqtt_port),
        client=BrokerEndpoint(host="127.0.0.1", port=mqtt_port),
        http=HttpConfig(host="127.0.0.1", port=http_port),
        database=db,
        ack_interval=0.05,
        admin_token_file=tmp_path / "admin.token",
    )
    device = Endpoint(dev, SeqCounter(100, lambda m: None), lambda n: cloud.public_key if n == "cloud" else None)

    async def main() -> None:
        ready = asyncio.Event()
        daemon = asyncio.create_task(run_cloud(cfg, ready=ready))
        try:
            await asyncio.wait_for(ready.wait(), 15)
        except TimeoutError:
            daemon.cancel()
            raise
        base = f"http://127.0.0.1:{http_port}"
        gateway = Client("gw-1", mqtt_port)
        agent = Client("dev-1", mqtt_port)
        changes: list[dict[str, Any]] = []
        try:
            admin = {"Authorization": f"Bearer {(tmp_path / 'admin.token').read_text().strip()}"}
            async with httpx.AsyncClient(base_url=base, timeout=5, headers=admin) as http:
                assert (await http.get("/healthz")).json() == {"status": "ok", "broker": "up", "db": "ok"}

                subscribed = asyncio.Event()

                async def read_stream() -> None:
                    async with http.stream("GET", "/api/v1/stream") as resp:
                        assert resp.headers["content-type"].startswith("text/event-stream")
                        async for line in resp.aiter_lines():
                            subscribed.set()  # the first line comes after the subscription exists
                            if line.startswith("data: "):
                                changes.append(json.loads(line[6:]))

                streamer = asyncio.create_task(read_stream())
                await asyncio.wait_for(subscribed.wait(), 5)

                await asyncio.to_thread(gateway.subscribe, topics.ack("home", "gw-1"))  # returns after SUBACK
                await asyncio.to_thread(agent.subscribe, topics.task_cmd("home", "dev-1"))

                will_seq = device.seq.next()
                birth_topic = topics.status("home", "dev-1")
                birth, bh = device.seal(
                    birth_topic, "birth",
                    {"state": "online", "uptime": 3.0, "cpu": 7.5, "outbox": 0, "link": "up", "will_seq": will_seq,
                     "agent": {"version": "0.1.0", "platform": "linux", "kind": "cpython"}, "handlers": ["echo"]},
                    to="cloud",
                )
                tele_topic = topics.telemetry("home", "dev-1", "env")
                readings = [{"ts": 1_767_225_600_000 + i, "values": {"t": 20.0 + i}} for i in range(2)]
                tele, th = device.seal(tele_topic, "telemetry", {"stream": "env", "readings": readings}, to="cloud",
                                       trace="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
                await asyncio.to_thread(agent.publish, birth_topic, birth, True)
                await asyncio.to_thread(agent.publish, tele_topic, tele)

                async def online() -> dict[str, Any] | None:
                    d = (await http.get("/api/v1/devices/dev-1")).json()
                    return d if d["online"] else None

                d = await eventually(online, "dev-1 online in the API")
                assert d["status"]["cpu"] == 7.5 and d["agent"]["kind"] == "cpython"

                async def telemetry() -> list[Any] | None:
                    items = (await http.get("/api/v1/devices/dev-1/telemetry")).json()["items"]
                    return items if len(items) == 2 else None

                items = await eventually(telemetry, "two readings in the API")
                assert {i["seq"] for i in items} == {th.seq} and items[0]["values"] == {"t": 21.0}

                # the sealed ack reaches the gateway and covers both messages
                acked: set[int] = set()
                deadline = time.monotonic() + 10
                while not {bh.seq, th.seq} <= acked:
                    assert time.monotonic() < deadline, f"acks incomplete: {acked}"
                    msg = await gateway.next()
                    opened = envelope.open_envelope(
                        msg.payload, topic=msg.topic, me="gw-1", my_key=gw.secret_key,
                        sender_key=lambda n: cloud.public_key if n == "cloud" else None,
                    )
                    assert opened.header.kind == "ack" and opened.header.sender == "cloud"
                    for sender, first, last in opened.body["acks"]:
                        assert sender == "dev-1"
                        acked.update(range(first, last + 1))

                # a forged message is never acked as stored: the gateway gets a rejection notice instead
                bad, bad_h = device.seal(tele_topic, "telemetry", {"stream": "env", "readings": []}, to="cloud")
                await asyncio.to_thread(agent.publish, tele_topic, bad[:-1] + bytes([bad[-1] ^ 1]))
                notice: list[Any] = []
                while not notice:
                    assert time.monotonic() < deadline + 10, "no rejection notice for the forged message"
                    msg = await gateway.next()
                    opened = envelope.open_envelope(
                        msg.payload, topic=msg.topic, me="gw-1", my_key=gw.secret_key,
                        sender_key=lambda n: cloud.public_key if n == "cloud" else None,
                    )
                    assert all(a[0] == "dev-1" and bad_h.seq not in range(a[1], a[2] + 1) for a in opened.body["acks"])
                    notice = opened.body.get("rejected", [])
                forged = bad[:-1] + bytes([bad[-1] ^ 1])
                assert notice == [["dev-1", bad_h.seq, "forged", hashlib.sha256(forged).digest()[:16]]]

                # a task: posted to the API, sealed to the device, result reported back
                r = await http.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo", "args": {"hi": 1}})
                assert r.status_code == 201, r.text
                task_id = r.json()["id"]
                msg = await agent.next()
                cmd = device.open(msg.payload, msg.topic)
                assert cmd.header.kind == "task_cmd" and cmd.header.trace
                assert cmd.body == {"task_id": task_id, "handler": "echo", "args": {"hi": 1}, "deadline": None,
                                    "parts": True}
                res_topic = topics.task_result("home", "dev-1")
                result, _ = device.seal(res_topic, "task_result",
                                        {"task_id": task_id, "state": "succeeded", "result": {"hi": 1}, "error": None,
                                         "started": 1, "finished": 2}, to="cloud")
                await asyncio.to_thread(agent.publish, res_topic, result)

                async def done() -> dict[str, Any] | None:
                    t = (await http.get(f"/api/v1/tasks/{task_id}")).json()
                    return t if t["state"] == "succeeded" else None

                assert (await eventually(done, "task succeeded"))["result"] == {"hi": 1}

                # the live stream saw the device come online and the telemetry
                await eventually(
                    lambda: _async({"device", "telemetry", "task"} <= {c["type"] for c in changes} or None),
                    "device, telemetry and task changes on the live stream",
                )
                metrics = (await http.get("/metrics")).text
                assert "cwsnet_cloud_broker_connected 1.0" in metrics
                assert "cwsnet_cloud_telemetry_readings_total 2.0" in metrics
                streamer.cancel()
        finally:
            gateway.close()
            agent.close()
            t0 = time.monotonic()
            daemon.cancel()
            try:
                await asyncio.wait_for(daemon, 10)
            except asyncio.CancelledError:
                pass
            assert time.monotonic() - t0 < 5, "run_cloud took too long to shut down"

    asyncio.run(main())

    # everything was committed: the store, reopened, has the messages exactly once
    store = SqliteStore(db)
    try:
        assert store.message_count("dev-1") == 3
        assert store.get_counter("cloud.seq_mark") is not None
    finally:
        store.close()


async def _async(value: T) -> T:
    return value
