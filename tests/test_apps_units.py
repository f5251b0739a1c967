"""App delivery without processes: what ingest passes on, and a fan-out that no body can stop."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_cloud_ingest import World

from cloud.apps import AppFanout
from cloud.store import IngestItem
from cwsnet import topics
from cwsnet.app import AppClient
from cwsnet.bundle import Bundle
from cwsnet.identity import Identity
from cwsnet.registry import Entry, Registry

GRANT = "cws/v1/home/+/telemetry/#"


class Link:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.changed = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.sent.append((topic, payload))
        self.changed.set()

    async def until(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.sent) < n:
                self.changed.clear()
                await self.changed.wait()




def registry(app: Identity, *, plaintext: bool = False) -> Registry:
    return Registry({app.node: Entry(app.node, "home", "app", app.public_b64, subscribe=(GRANT,), plaintext=plaintext)})


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = World(tmp_path)
    yield world
    world.store.close()


def test_ingest_passes_on_only_bodies_that_re_encode_as_they_are(w: World) -> None:
    w.ingest.for_apps = lambda topic: True
    dev = w.nodes["dev-1"]
    topic = topics.telemetry("home", "dev-1", "env")
    good = dev.seal(topic, "telemetry", {"stream": "env", "readings": [{"ts": 1, "values": {"t": 1.5}}]})
    nan_extra = dev.seal(topic, "telemetry", {"stream": "env", "readings": [{"ts": 2, "values": {"t": 2.0}}],
                                              "note": math.nan})
    batch = w.ingest.handle_batch([(topic, good), (topic, nan_extra)])
    assert [r.status for r in batch.results] == ["stored", "stored"]  # the device's readings are kept
    assert [body["readings"][0]["ts"] for _item, body in batch.for_apps] == [1]  # the NaN never reaches an app


def item(seq: int, body: Any = None) -> tuple[IngestItem, Any]:
    topic = topics.telemetry("home", "dev-1", "env")
    it = IngestItem(sender="dev-1", seq=seq, msg_id="00" * 16, kind="telemetry", topic=topic, ts=seq, received=seq)
    return it, body if body is not None else {"stream": "env", "readings": [{"ts": seq, "values": {"t": seq}}]}


def test_a_delivery_that_fails_never_stops_the_fan_out(w: World, tmp_path: Path) -> None:
    app = Identity.generate("dash", "home", "app")
    link = Link()
    fan = AppFanout(w.endpoint, link)
    fan.update(registry(app))
    w.store.upsert_node("dash", site="home", role="app", public_key=app.public_b64)
    w.directory.refresh(force=True)

    async def run() -> None:
        task = asyncio.ensure_future(fan.run())
        fan.offer([item(1), item(2, {"stream": "env", "unencodable": object()}), item(3)])
        await link.until(2)  # the third goes out after the second failed
        assert not task.done(), task
        task.cancel()

    asyncio.run(run())
    assert fan.stats == {"sent": 2, "dropped": 1}
    bundle = Bundle(app, w.cloud.public_key, "dash", "t")
    client = AppClient(bundle)
    opened = [client.open(t, p) for t, p in link.sent]
    assert [m.seq for m in opened if m is not None] == [1, 3]
    assert all(t.startswith("cws/v1/_apps/dash/home/dev-1/telemetry/") for t, _ in link.sent)


def test_a_plaintext_app_gets_json_and_a_revoked_one_nothing(w: World) -> None:
    app = Identity.generate("local", "home", "app")
    link = Link()
    fan = AppFanout(w.endpoint, link)
    fan.update(registry(app, plaintext=True))

    async def run() -> None:
        task = asyncio.ensure_future(fan.run())
        fan.offer([item(1, {"stream": "env", "raw": b"\x00\x01", "readings": []})])
        await link.until(1)
        fan.update(Registry())  # revoked before its next queued message goes out
        fan.offer([item(2)])  # (the app has no grant now: not even queued)
        fan.grants = {"local": (GRANT,)}  # ...and one queued just before a revocation
        fan.offer([item(3)])
        fan.update(Registry())
        fan.offer([item(4)])
        async with asyncio.timeout(10):
            await fan.queue.join()  # type: ignore[union-attr]
        task.cancel()

    asyncio.run(run())
    assert len(link.sent) == 1
    msg = json.loads(link.sent[0][1])
    assert msg["from"] == "dev-1" and msg["body"]["raw"] == "AAE="  # bytes as base64


def test_an_app_key_sends_no_device_data(w: World) -> None:
    from test_cloud_ingest import Node

    app = Identity.generate("dash", "home", "app")
    w.store.upsert_node("dash", site="home", role="app", public_key=app.public_b64)
    w.directory.refresh(force=True)
    topic, payload = Node(app, w.cloud, w.clock).telemetry([{"t": 1}])
    result = w.ingest.handle_batch([(topic, payload)]).results[0]
    assert result.status == "rejected" and result.reason == "topic_mismatch" and "is an app" in (result.detail or "")
    assert w.store.message_count("dash") == 0
