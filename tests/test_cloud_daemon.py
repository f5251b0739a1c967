"""cloud.daemon's pieces without a broker: task dispatch rules, sealed acks, identity checks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cloud.daemon import EXPIRED_ERROR, SEQ_COUNTER, CloudDaemon, TaskDispatcher
from cloud.fanout import Fanout
from cloud.ingest import NodeDirectory
from cloud.metrics import CloudMetrics
from cloud.store import IngestItem, SqliteStore, StatusUpdate
from cwsnet import envelope, topics
from cwsnet.config import CloudConfig, HttpConfig
from cwsnet.endpoint import Endpoint
from cwsnet.errors import ConfigError
from cwsnet.identity import Identity, write_secret_file
from cwsnet.mqtt import LinkDown
from cwsnet.replay import SeqCounter


class FakeLink:
    """Stands in for MqttLink: records publishes, can be down or failing."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes]] = []
        self.fail = False

    async def publish(  # same signature as MqttLink.publish
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10  # noqa: ASYNC109
    ) -> None:
        if self.fail:
            raise LinkDown("test: link down")
        self.published.append((topic, payload))


class Clock:
    def __init__(self) -> None:
        self.t = 1_767_225_600.0

    def __call__(self) -> float:
        return self.t


def birth(store: SqliteStore, node: str, seq: int) -> None:
    store.ingest_batch(
        [
            IngestItem(
                sender=node, seq=seq, msg_id="0" * 32, kind="birth", topic=f"cws/v1/home/{node}/status", ts=1,
                received=int(time.time() * 1000),
                status=StatusUpdate(kind="birth", online=True, body={"state": "online"}, will_seq=seq - 1),
            )
        ]
    )


async def until(cond: Any, what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_task_waits_for_birth_and_expires(tmp_path: Path) -> None:
    cloud = Identity.generate("cloud", "cloud", "cloud")
    dev = Identity.generate("dev-1", "home", "device")
    store = SqliteStore(tmp_path / "c.db")
    store.upsert_node("dev-1", site="home", role="device", public_key=dev.public_b64)
    clock = Clock()
    directory = NodeDirectory(store)
    endpoint = Endpoint(cloud, SeqCounter(0, lambda m: None), directory.public_key, clock)
    link = FakeLink()
    fanout = Fanout()
    metrics = CloudMetrics()
    dispatcher = TaskDispatcher(store, endpoint, link, metrics, fanout, clock=clock, expire_every=0.05)  # type: ignore[arg-type]

    async def main() -> None:
        runner = asyncio.create_task(dispatcher.run())
        try:
            # offline device: the task stays queued, nothing is published
            task = store.create_task(target="dev-1", handler="echo", args={"x": 1}, now=int(clock() * 1000))
            assert await dispatcher.dispatch(task.id) is False
            assert link.published == [] and store.get_task(task.id).state == "queued"  # type: ignore[union-attr]

            # the device's birth sends it, sealed, on its task/cmd topic
            birth(store, "dev-1", 5)
            dispatcher.on_birth("dev-1")
            await until(lambda: link.published, "the task command")
            topic, payload = link.published[0]
            assert topic == topics.task_cmd("home", "dev-1")
            opened = envelope.open_envelope(
                payload, topic=topic, me="dev-1", my_key=dev.secret_key, sender_key=lambda n: cloud.public_key
            )
            assert opened.header.kind == "task_cmd" and opened.header.trace
            assert opened.body == {"task_id": task.id, "handler": "echo", "args": {"x": 1}, "deadline": None}
            t = store.get_task(task.id)
            assert t is not None and t.state == "queued" and t.attempts == 1 and t.dispatched is not None

            # a deadline that passes while the device is offline expires the task
            store.mark_offline(seen_before=int(time.time() * 1000) + 1)
            late = store.create_task(
                target="dev-1", handler="echo", args={}, deadline=int(clock() * 1000) + 1000, now=int(clock() * 1000)
            )
            dispatcher.request(late.id)
            clock.t += 2
            await until(lambda: store.get_task(late.id).state == "expired", "expiry")  # type: ignore[union-attr]
            t = store.get_task(late.id)
            assert t is not None and t.error == EXPIRED_ERROR
            assert metrics.registry.get_sample_value("cwsnet_cloud_tasks_total", {"state": "expired"}) == 1
        finally:
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner

    asyncio.run(main())
    store.close()


def test_failed_publish_keeps_task_queued(tmp_path: Path) -> None:
    cloud = Identity.generate("cloud", "cloud", "cloud")
    dev = Identity.generate("dev-1", "home", "device")
    store = SqliteStore(tmp_path / "c.db")
    store.upsert_node("dev-1", site="home", role="device", public_key=dev.public_b64)
    birth(store, "dev-1", 5)
    directory = NodeDirectory(store)
    endpoint = Endpoint(cloud, SeqCounter(0, lambda m: None), directory.public_key)
    link = FakeLink()
    dispatcher = TaskDispatcher(store, endpoint, link, CloudMetrics(), Fanout())  # type: ignore[arg-type]
    task = store.create_task(target="dev-1", handler="echo", args={})

    async def main() -> None:
        link.fail = True
        with pytest.raises(LinkDown):
            await dispatcher.dispatch(task.id)
        link.fail = False
        link.connected.clear()
        assert await dispatcher.dispatch(task.id) is False
        link.connected.set()
        assert await dispatcher.dispatch(task.id) is True

    asyncio.run(main())
    t = store.get_task(task.id)
    assert t is not None and t.state == "queued" and t.attempts == 1
    store.close()


def cloud_config(tmp_path: Path, ident: Identity) -> CloudConfig:
    write_secret_file(tmp_path / "cloud.json", ident.to_dict())
    return CloudConfig(
        identity_file=tmp_path / "cloud.json", broker=None, http=HttpConfig(port=1), database=tmp_path / "cloud.db"
    )


def test_acks_sealed_to_each_gateway_of_the_site(tmp_path: Path) -> None:
    cloud = Identity.generate("cloud", "cloud", "cloud")
    gws = [Identity.generate(f"gw-{i}", "home", "gateway") for i in (1, 2)]
    cfg = cloud_config(tmp_path, cloud)
    store = SqliteStore(cfg.database)
    for g in gws:
        store.upsert_node(g.node, site=g.site, role="gateway", public_key=g.public_b64)
    store.close()

    async def main() -> None:
        d = CloudDaemon(cfg)
        try:
            link = FakeLink()
            d.link = link  # type: ignore[assignment]
            for seq in (4, 5, 6, 9):
                d.coalescer.add("home", "dev-1", seq)
            d.coalescer.add("lab", "dev-7", 1)  # no gateway on that site: dropped
            await d.send_acks()
            assert sorted(t for t, _ in link.published) == [topics.ack("home", "gw-1"), topics.ack("home", "gw-2")]
            for (topic, payload), g in zip(sorted(link.published), gws, strict=True):
                opened = envelope.open_envelope(
                    payload, topic=topic, me=g.node, my_key=g.secret_key, sender_key=lambda n: cloud.public_key
                )
                assert opened.header.kind == "ack" and opened.body == {"acks": [["dev-1", 4, 6], ["dev-1", 9, 9]]}
            assert d.metrics.registry.get_sample_value("cwsnet_cloud_acks_sent_total") == 2
            # a failed publish puts the acks back for the next flush
            link.published.clear()
            link.fail = True
            d.coalescer.add("home", "dev-1", 10)
            await d.send_acks()
            assert d.coalescer.drain() == {"home": [{"acks": [["dev-1", 10, 10]]}]}
            assert d.store.get_counter(SEQ_COUNTER) == 1000  # the cloud's seq reservation is persisted
            assert d.store.get_node("cloud").role == "cloud"  # type: ignore[union-attr]
        finally:
            d.store.close()

    asyncio.run(main())


def test_cloud_identity_must_be_the_cloud(tmp_path: Path) -> None:
    cfg = cloud_config(tmp_path, Identity.generate("gw-1", "home", "gateway"))
    with pytest.raises(ConfigError, match="node 'cloud' and role 'cloud'"):
        CloudDaemon(cfg)
    missing = cfg.model_copy(update={"identity_file": tmp_path / "nope.json"})
    with pytest.raises(ConfigError, match="not found"):
        CloudDaemon(missing)


def test_taken_http_port_is_a_config_error(tmp_path: Path) -> None:
    import socket

    from cloud.daemon import run_cloud

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = cloud_config(tmp_path, Identity.generate("cloud", "cloud", "cloud"))
        cfg = cfg.model_copy(update={"http": HttpConfig(host="127.0.0.1", port=port)})
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(asyncio.wait_for(run_cloud(cfg), 10))
