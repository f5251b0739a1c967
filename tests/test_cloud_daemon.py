"""cloud.daemon's pieces without a broker: task dispatch rules, sealed acks, identity checks."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from cloud.daemon import EXPIRED_ERROR, SEQ_COUNTER, CloudDaemon, TaskDispatcher, forever, is_transient
from cloud.fanout import Fanout
from cloud.ingest import NodeDirectory, payload_digest
from cloud.metrics import CloudMetrics
from cloud.store import IngestItem, SqliteStore, StatusUpdate
from cwsnet import envelope, topics
from cwsnet.config import CloudConfig, HttpConfig
from cwsnet.endpoint import Endpoint
from cwsnet.errors import ConfigError
from cwsnet.identity import Identity, write_secret_file
from cwsnet.mqtt import LinkDown, Message
from cwsnet.replay import SeqCounter


class FakeLink:
    """Stands in for MqttLink: records publishes, can be down or failing."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes]] = []
        self.acked: list[Message] = []
        self.fail = False

    def ack(self, msg: Message) -> None:
        self.acked.append(msg)

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
            assert opened.body == {"task_id": task.id, "handler": "echo", "args": {"x": 1}, "deadline": None, "parts": True}
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
            assert d.store.get_counter(SEQ_COUNTER) >= d.seq.peek  # the cloud's seq reservation is persisted
            assert d.store.get_node("cloud").role == "cloud"  # type: ignore[union-attr]
        finally:
            d.close()

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


def test_running_task_expires_at_its_deadline(tmp_path: Path) -> None:
    cloud = Identity.generate("cloud", "cloud", "cloud")
    dev = Identity.generate("dev-1", "home", "device")
    store = SqliteStore(tmp_path / "c.db")
    store.upsert_node("dev-1", site="home", role="device", public_key=dev.public_b64)
    clock = Clock()
    endpoint = Endpoint(cloud, SeqCounter(0, lambda m: None), NodeDirectory(store).public_key, clock)
    metrics, fanout = CloudMetrics(), Fanout()
    dispatcher = TaskDispatcher(store, endpoint, FakeLink(), metrics, fanout, clock=clock)  # type: ignore[arg-type]
    now = int(clock() * 1000)
    running = store.create_task(target="dev-1", handler="sleep", args={}, deadline=now + 1000, now=now)
    store.update_task(running.id, "running", started=now, target="dev-1", now=now)
    queued = store.create_task(target="dev-1", handler="echo", args={}, deadline=now + 1000, now=now)
    done = store.create_task(target="dev-1", handler="echo", args={}, deadline=now + 1000, now=now)
    store.update_task(done.id, "succeeded", result={}, now=now)
    assert dispatcher.expire_overdue() == []  # not yet
    clock.t += 2
    expired = {t.id: t for t in dispatcher.expire_overdue()}
    assert set(expired) == {queued.id}  # a running task gets a grace period for a late result
    clock.t += SqliteStore.RUNNING_GRACE_MS / 1000
    expired |= {t.id: t for t in dispatcher.expire_overdue()}
    assert set(expired) == {running.id, queued.id}
    assert expired[running.id].error == "deadline passed while running (the device did not report a result)"
    assert expired[queued.id].error == EXPIRED_ERROR
    assert store.get_task(done.id).state == "succeeded"  # type: ignore[union-attr]
    # the device's late result no longer changes it
    assert store.update_task(running.id, "succeeded", result={"late": True}, target="dev-1")[1] is False
    assert metrics.registry.get_sample_value("cwsnet_cloud_tasks_total", {"state": "expired"}) == 2
    store.close()


def test_cloud_seq_never_below_the_wall_clock(tmp_path: Path) -> None:
    cfg = cloud_config(tmp_path, Identity.generate("cloud", "cloud", "cloud"))
    clock = Clock()
    now_ms = int(clock() * 1000)
    d = CloudDaemon(cfg, clock=clock)
    try:
        assert d.seq.next() == now_ms  # a fresh database starts at the clock, not at 0
        assert d.store.get_counter(SEQ_COUNTER) == now_ms + 1000
    finally:
        d.close()
    clock.t -= 3600  # clock set back: the persisted mark wins
    d = CloudDaemon(cfg, clock=clock)
    try:
        assert d.seq.next() == now_ms + 1000
    finally:
        d.close()
    for suffix in ("", "-wal", "-shm"):  # cloud.db lost and recreated: the clock keeps seqs fresh
        Path(f"{cfg.database}{suffix}").unlink(missing_ok=True)
    clock.t += 3600 + 5
    d = CloudDaemon(cfg, clock=clock)
    try:
        assert d.seq.next() == now_ms + 5000 > now_ms + 1000
    finally:
        d.close()


def _seal_telemetry(ep: Endpoint, n: int) -> list[Message]:
    topic = topics.telemetry("home", "dev-1", "env")
    out = []
    for i in range(n):
        payload, _h = ep.seal(topic, "telemetry", {"stream": "env", "readings": [{"ts": 1, "values": {"i": i}}]},
                              to="cloud")
        out.append(Message(topic=topic, payload=payload, qos=1, retain=False, mid=i + 1))
    return out


def _seq(msg: Message) -> int:
    return envelope.peek_header(msg.payload).seq


class _World:
    """A CloudDaemon (no broker) with a fake link, a device dev-1 and a gateway gw-1 on site home."""

    def __init__(self, tmp_path: Path, **cfg: Any) -> None:
        self.cloud = Identity.generate("cloud", "cloud", "cloud")
        self.dev = Identity.generate("dev-1", "home", "device")
        self.gw = Identity.generate("gw-1", "home", "gateway")
        self.cfg = cloud_config(tmp_path, self.cloud).model_copy(update=cfg)
        store = SqliteStore(self.cfg.database)
        store.upsert_node("dev-1", site="home", role="device", public_key=self.dev.public_b64)
        store.upsert_node("dev-2", site="home", role="device", public_key=self.dev.public_b64)
        store.close()
        self.d = CloudDaemon(self.cfg)
        self.link = FakeLink()
        self.d.link = self.link  # type: ignore[assignment]
        self.d.dispatcher.link = self.link  # type: ignore[assignment]
        self.device = Endpoint(self.dev, SeqCounter(100, lambda m: None), lambda n: self.cloud.public_key)

    def add_gateway(self) -> None:
        self.d.store.upsert_node("gw-1", site="home", role="gateway", public_key=self.gw.public_b64)

    def fail_once(self, method: str, exc: Exception) -> list[int]:
        """Make ``store.<method>`` raise ``exc`` on its first call; returns a list counting calls."""
        real = getattr(self.d.store, method)
        calls: list[int] = []

        def wrapper(*args: Any, **kw: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise exc
            return real(*args, **kw)

        setattr(self.d.store, method, wrapper)
        return calls

    def metric(self, name: str, **labels: str) -> float:
        return self.d.metrics.registry.get_sample_value(name, labels) or 0.0


def test_poison_message_is_isolated_given_up_and_acked(tmp_path: Path) -> None:
    w = _World(tmp_path)
    msgs = _seal_telemetry(w.device, 7)
    poison = _seq(msgs[4])
    real = w.d.store.ingest_batch
    attempts: list[int] = []

    def ingest_batch(items: Any) -> Any:  # a store that cannot take one message, whatever ingest checked
        attempts.append(len(items))
        if any(it.seq == poison for it in items):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real(items)

    w.d.store.ingest_batch = ingest_batch  # type: ignore[method-assign]

    async def main() -> None:
        for m in msgs:
            w.d.queue.put_nowait(m)
        consumer = asyncio.create_task(w.d.consume())
        try:
            await until(lambda: len(w.link.acked) == 7, "every message acknowledged")
        finally:
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer

    try:
        asyncio.run(main())
        assert w.link.acked == msgs
        assert attempts[0] == 7 and len(attempts) <= 12  # bisected, not retried forever
        assert w.d.store.message_count("dev-1") == 6
        assert w.metric("cwsnet_cloud_messages_rejected_total", reason="malformed") == 1
        (ev,) = [e for e in w.d.store.list_events().items if e.type == "message.rejected"]
        assert ev.source == "dev-1" and ev.data["seq"] == poison and "OverflowError" in ev.data["detail"]
        seqs = [_seq(m) for m in msgs]
        assert w.d.coalescer.drain() == {
            "home": [{"acks": [["dev-1", seqs[0], seqs[3]], ["dev-1", seqs[5], seqs[6]]],
                      "rejected": [["dev-1", poison, "malformed", payload_digest(msgs[4].payload)]]}]
        }
    finally:
        w.d.close()


def test_transient_store_error_retried_without_acking(tmp_path: Path) -> None:
    w = _World(tmp_path)
    msgs = _seal_telemetry(w.device, 5)
    real = w.d.store.ingest_batch
    attempts: list[int] = []

    def ingest_batch(items: Any) -> Any:
        attempts.append(len(items))
        if len(attempts) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(items)

    w.d.store.ingest_batch = ingest_batch  # type: ignore[method-assign]

    async def main() -> None:
        for m in msgs:
            w.d.queue.put_nowait(m)
        consumer = asyncio.create_task(w.d.consume())
        try:
            await until(lambda: len(attempts) >= 2, "a retry")
            assert w.link.acked == []  # nothing acknowledged while the store fails
            await until(lambda: len(w.link.acked) == 5, "every message acknowledged")
        finally:
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer

    try:
        asyncio.run(main())
        assert attempts == [5, 5, 5]  # the same batch again: not split, nothing given up
        assert w.d.store.message_count("dev-1") == 5
        assert w.metric("cwsnet_cloud_messages_rejected_total", reason="malformed") == 0
    finally:
        w.d.close()


def test_helper_loops_survive_a_failing_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cwsnet.cloud")
    w = _World(tmp_path, offline_after=0.4, ack_interval=0.05)
    d = w.d
    d.dispatcher.expire_every = 0.05
    d.directory._min_refresh = 0  # reload on every miss

    def boom() -> RuntimeError:
        return RuntimeError("test: the store fails once")

    births = w.fail_once("queued_tasks_for", boom())  # the consumer's dispatcher.on_birth
    lookups = w.fail_once("node_directory", boom())  # the ack flusher's directory.refresh
    expiries = w.fail_once("overdue_tasks", boom())  # the dispatcher's expiry check
    sweeps = w.fail_once("mark_offline", boom())  # the offline sweeper
    now = int(time.time() * 1000)
    late = d.store.create_task(target="dev-2", handler="echo", args={}, deadline=now - 1, now=now - 10)

    will = w.device.seq.next()
    topic = topics.status("home", "dev-1")
    payload, bh = w.device.seal(topic, "birth", {"state": "online", "will_seq": will}, to="cloud")
    birth_msg = Message(topic=topic, payload=payload, qos=1, retain=False, mid=1)
    (tele,) = _seal_telemetry(w.device, 1)

    async def main() -> None:
        loops = [
            asyncio.create_task(d.consume()),
            asyncio.create_task(d.flush_acks()),
            asyncio.create_task(d.sweep()),
            asyncio.create_task(d.dispatcher.run()),
        ]
        try:
            d.queue.put_nowait(birth_msg)
            await until(lambda: births, "the birth's task lookup")
            d.queue.put_nowait(tele)  # the consumer carries on
            await until(lambda: len(w.link.acked) == 2, "both messages acknowledged")
            w.add_gateway()  # not in the directory cache: the flusher must reload it (and fails once)
            await until(lambda: w.link.published, "an ack published to gw-1", within=10)
            task, node = d.store.get_task, d.store.get_node
            await until(lambda: task(late.id).state == "expired", "the overdue task expired")  # type: ignore[union-attr]
            await until(lambda: not node("dev-1").online, "dev-1 swept offline")  # type: ignore[union-attr]
            assert not any(t.done() for t in loops), "a helper loop ended"
        finally:
            for t in loops:
                t.cancel()
            for t in loops:
                with pytest.raises(asyncio.CancelledError):
                    await t

    try:
        asyncio.run(main())
        assert births and len(lookups) >= 2 and len(expiries) >= 2 and len(sweeps) >= 2
        acked: set[int] = set()
        for t, p in w.link.published:
            assert t == topics.ack("home", "gw-1")
            opened = envelope.open_envelope(
                p, topic=t, me="gw-1", my_key=w.gw.secret_key, sender_key=lambda n: w.cloud.public_key
            )
            for _sender, first, last in opened.body["acks"]:
                acked.update(range(first, last + 1))
        assert {bh.seq, _seq(tele)} <= acked  # the acks held back while the lookup failed were not lost
        logged = "\n".join(r.getMessage() for r in caplog.records)
        for what in ("queued tasks after its birth failed", "looking up the gateways of site home failed",
                     "expiring overdue tasks failed", "offline sweep failed"):
            assert what in logged, what
    finally:
        d.close()


def test_forever_logs_and_carries_on_but_cancel_ends_it(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(1)
        if len(calls) in (1, 2):
            raise KeyError("test: step fails")
        await asyncio.sleep(0.01)

    async def main() -> None:
        loop = asyncio.create_task(forever("test loop", step, pause=0.01))
        await until(lambda: len(calls) >= 5, "the loop to carry on")
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop

    asyncio.run(main())
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert msgs == [f"test loop failed ({n} in a row); carrying on in 0.0 s" for n in (1, 2)]


def test_transient_store_errors() -> None:
    assert is_transient(sqlite3.OperationalError("database or disk is full"))
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert is_transient(sqlite3.DatabaseError("database disk image is malformed"))
    assert is_transient(sqlite3.ProgrammingError("Cannot operate on a closed database."))
    for exc in (OverflowError("int too large"), ValueError("NaN"), TypeError("x"), sqlite3.IntegrityError("NOT NULL"),
                sqlite3.InterfaceError("Error binding parameter 1")):
        assert not is_transient(exc), exc
