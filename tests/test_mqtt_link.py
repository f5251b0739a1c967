"""MqttLink against a real mosquitto (subprocess on a free loopback port), with faults from FaultProxy."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from harness import (
    FaultProxy,
    MosquittoBroker,
    await_for,
    free_port,
    make_password_file,
    run_async,
)

from cwsnet.mqtt import AuthRefused, LinkDown, Message, MqttLink, Will

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"
_ids = itertools.count(1)


class Collector:
    """An ``on_message`` handler that records what it gets."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    async def wait(self, topic: str, count: int = 1, timeout: float = 10.0) -> list[Message]:  # noqa: ASYNC109
        return await await_for(
            lambda: len(self.on(topic)) >= count and self.on(topic),
            timeout=timeout,
            message=f"{count} message(s) on {topic!r} (got topics {[m.topic for m in self.messages]})",
        )


def make_link(port: int, **kwargs: Any) -> MqttLink:
    """A link with test-friendly defaults (fast backoff, short timeouts)."""
    n = next(_ids)
    defaults: dict[str, Any] = {
        "client_id": f"test-{n}",
        "host": "127.0.0.1",
        "port": port,
        "keepalive": 5,
        "backoff_min": 0.05,
        "backoff_max": 0.3,
        "connect_timeout": 3.0,
        "name": f"link{n}",
    }
    defaults.update(kwargs)
    return MqttLink(**defaults)


@contextlib.asynccontextmanager
async def running(link: MqttLink, *, wait_connected: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``link.run()`` for the duration of the block; cancel it (clean DISCONNECT) afterwards."""
    task = asyncio.create_task(link.run(), name=f"run-{link.name}")
    try:
        if wait_connected:
            await await_for(lambda: link.connected.is_set() or task.done(), timeout=10,
                            message=f"{link.name} connected")
            if task.done():
                task.result()  # surface the error
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def mosquitto_pub(port: int, topic: str, payload: str, qos: int = 1, *extra: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-m", payload, "-q", str(qos), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(10):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, f"mosquitto_pub failed: {out.decode(errors='replace')}"


def broker_log_shows(broker: MosquittoBroker, pattern: str) -> bool:
    return re.search(pattern, broker.proc.log_text()) is not None


# ---------------------------------------------------------------------------------------------


def test_roundtrip_publish_and_receive(mosquitto: MosquittoBroker) -> None:
    async def body() -> None:
        got = Collector()
        connects = 0

        async def on_connect() -> None:
            nonlocal connects
            connects += 1

        link = make_link(mosquitto.port, on_message=got, on_connect=on_connect)
        link.subscribe("rt/#", qos=1)
        async with running(link):
            assert connects == 1  # awaited before/at connected, after re-subscribing
            await link.publish("rt/one", b"\x00\x01binary", qos=1)
            await link.publish("rt/zero", b"q0", qos=0)
            (one,) = await got.wait("rt/one")
            assert (one.payload, one.qos, one.retain) == (b"\x00\x01binary", 1, False)
            (zero,) = await got.wait("rt/zero")
            assert (zero.payload, zero.qos) == (b"q0", 0)

            # interop: a message from mosquitto's own client arrives too
            await mosquitto_pub(mosquitto.port, "rt/ext", "from-cli")
            (ext,) = await got.wait("rt/ext")
            assert ext.payload == b"from-cli"

            # a subscribe() made while connected is sent at once (the broker handles our
            # SUBSCRIBE before our next PUBLISH on the same connection)
            link.subscribe("late/+", qos=0)
            await link.publish("late/x", b"late")
            (late,) = await got.wait("late/x")
            assert late.qos == 0  # granted at the subscription's QoS
        assert link.stats["connects"] == 1
        assert link.stats["published"] == 3
        assert link.stats["received"] >= 4
        assert not link.connected.is_set()

    run_async(body())


def test_handler_errors_do_not_kill_the_loop(mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        seen: list[str] = []

        async def handler(msg: Message) -> None:
            seen.append(msg.topic)
            if msg.topic == "h/bad":
                raise RuntimeError("boom")

        link = make_link(mosquitto.port, on_message=handler)
        link.subscribe("h/#")
        async with running(link):
            await link.publish("h/bad", b"12345")
            await link.publish("h/good", b"ok")
            await await_for(lambda: seen == ["h/bad", "h/good"], message="both handled, in order")
        assert link.stats["handler_errors"] == 1

    with caplog.at_level(logging.ERROR, logger="cwsnet.mqtt"):
        run_async(body())
    assert any("'h/bad' (5 bytes)" in r.getMessage() for r in caplog.records), caplog.text


def test_qos1_publish_returns_only_after_puback(mosquitto: MosquittoBroker, fault_proxy: Callable[..., FaultProxy]) -> None:
    proxy = fault_proxy(mosquitto.port)
    latency = 0.2

    async def body() -> None:
        got = Collector()
        watcher = make_link(mosquitto.port, on_message=got)  # direct, no proxy
        watcher.subscribe("p/#")
        link = make_link(proxy.port)
        async with running(watcher), running(link):
            proxy.set_latency(latency)
            loop = asyncio.get_running_loop()
            start = loop.time()
            await link.publish("p/q1", b"x", qos=1)
            elapsed = loop.time() - start
            # PUBLISH and PUBACK each crossed the slow link
            assert elapsed >= 2 * latency - 0.01, f"QoS1 publish returned after {elapsed:.3f}s"
            # the broker had the message when we returned: it is (or will be) at the watcher
            await got.wait("p/q1")

            start = loop.time()
            await link.publish("p/q0", b"y", qos=0)
            assert loop.time() - start < latency, "QoS0 publish waited for the network"
            await got.wait("p/q0")
            proxy.set_latency(0)

    run_async(body())


def test_publish_raises_linkdown_when_not_connected(mosquitto: MosquittoBroker) -> None:
    async def body() -> None:
        # nothing listens on this port
        link = make_link(free_port())
        async with running(link, wait_connected=False):
            await await_for(lambda: link.stats["connect_failures"] >= 2, message="failed attempts")
            with pytest.raises(LinkDown):
                await link.publish("d/x", b"1")
            assert "ConnectionRefused" in str(link.stats["last_error"])

        # a link that was up, after the broker died
        link = make_link(mosquitto.port)
        async with running(link):
            await link.publish("d/y", b"ok")
            mosquitto.kill()
            await await_for(lambda: not link.connected.is_set(), message="link noticed the dead broker")
            with pytest.raises(LinkDown):
                await link.publish("d/y", b"2")

    run_async(body())


def test_connection_lost_before_puback_raises_linkdown(
    mosquitto: MosquittoBroker, fault_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy(mosquitto.port)

    async def body() -> None:
        link = make_link(proxy.port)
        async with running(link):
            proxy.blackhole()
            publish = asyncio.create_task(link.publish("lost/x", b"never acked", qos=1, timeout=10))
            await await_for(lambda: proxy.bytes_dropped > 0, message="PUBLISH swallowed by the blackhole")
            assert not publish.done()
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.to_thread(proxy.cut)
            with pytest.raises(LinkDown):
                await publish
            assert loop.time() - start < 5, "LinkDown took too long (should not wait for the timeout)"
            proxy.restore()
            await await_for(lambda: link.connected.is_set(), message="reconnected after restore")
            await link.publish("lost/y", b"fine")

    run_async(body())


def test_reconnects_and_resubscribes_after_broker_sigkill(mosquitto: MosquittoBroker) -> None:
    async def body() -> None:
        got = Collector()
        events: list[str] = []

        async def on_connect() -> None:
            events.append("up")

        async def on_disconnect() -> None:
            events.append("down")

        link = make_link(mosquitto.port, on_message=got, on_connect=on_connect, on_disconnect=on_disconnect)
        link.subscribe("k/#")
        async with running(link):
            await mosquitto_pub(mosquitto.port, "k/before", "1")
            await got.wait("k/before")

            mosquitto.kill()  # SIGKILL: no goodbye
            await await_for(lambda: not link.connected.is_set(), message="link noticed the SIGKILL")
            await asyncio.to_thread(mosquitto.restart)  # same port, fresh broker: no sessions at all
            await await_for(lambda: link.connected.is_set(), timeout=10, message="link reconnected by itself")

            # the new broker knows nothing about us: only our own re-subscribe makes this arrive
            await mosquitto_pub(mosquitto.port, "k/after", "2")
            await got.wait("k/after")
            await link.publish("k/self", b"3")
            await got.wait("k/self")
        assert link.stats["connects"] == 2
        assert link.stats["disconnects"] == 2  # the kill, and the clean stop
        assert events == ["up", "down", "up", "down"]

    run_async(body())


def test_will_is_sent_when_link_is_cut_not_on_clean_stop(
    mosquitto: MosquittoBroker, fault_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy(mosquitto.port)

    async def body() -> None:
        got = Collector()
        watcher = make_link(mosquitto.port, on_message=got)
        watcher.subscribe("will/#")
        wills = 0

        def will_factory() -> Will:
            nonlocal wills
            wills += 1
            return Will("will/dev", f"offline-{wills}".encode(), qos=1, retain=False)

        link = make_link(proxy.port, client_id="dev-will", will_factory=will_factory)
        async with running(watcher):
            async with running(link):
                assert wills == 1
                await asyncio.to_thread(proxy.cut)
                (will,) = await got.wait("will/dev")
                assert will.payload == b"offline-1"
                proxy.restore()
                await await_for(lambda: link.connected.is_set() and link.stats["connects"] == 2,
                                message="reconnected through the restored proxy")
                assert wills >= 2  # a fresh will for every connection attempt
            # run() cancelled: clean DISCONNECT, so the broker must drop the will
            await await_for(lambda: broker_log_shows(mosquitto, r"Client dev-will disconnected\."),
                            message="broker processed the clean DISCONNECT")
            await watcher.publish("will/marker", b"m")
            await got.wait("will/marker")
            assert [m.payload for m in got.on("will/dev")] == [b"offline-1"]

            # disconnect(send_will=True) drops the socket instead: will delivered
            link2 = make_link(mosquitto.port, client_id="dev-crash",
                              will_factory=lambda: Will("will/crash", b"gone", retain=False))
            async with running(link2) as task:
                await link2.disconnect(send_will=True)
                async with asyncio.timeout(5):
                    await task  # run() returns by itself after disconnect()
                (crash,) = await got.wait("will/crash")
                assert crash.payload == b"gone"

    run_async(body())


def test_manual_ack_unacked_message_is_redelivered(
    mosquitto: MosquittoBroker, fault_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy(mosquitto.port)

    async def body() -> None:
        deliveries: list[Message] = []
        link: MqttLink

        async def handler(msg: Message) -> None:
            deliveries.append(msg)
            if msg.topic == "ma/job" and len([m for m in deliveries if m.topic == "ma/job"]) == 1:
                return  # first delivery: "crash" before storing -> no ack
            link.ack(msg)

        link = make_link(proxy.port, client_id="ma-client", clean_session=False, manual_ack=True,
                         on_message=handler)
        link.subscribe("ma/#", qos=1)
        async with running(link):
            await mosquitto_pub(mosquitto.port, "ma/job", "payload-1")
            await await_for(lambda: len(deliveries) == 1, message="first delivery")
            assert deliveries[0].dup is False

            # connection 2: mosquitto redelivers the unacknowledged message (DUP) -- we ack it now
            await asyncio.to_thread(proxy.cut)
            proxy.restore()
            await await_for(lambda: len([m for m in deliveries if m.topic == "ma/job"]) == 2,
                            message="redelivery after reconnect")
            redelivered = deliveries[-1]
            assert redelivered.payload == b"payload-1"
            assert redelivered.dup is True
            assert redelivered.connection != deliveries[0].connection

            # connection 3: acked, so not redelivered; a marker proves the queue was flushed
            await await_for(lambda: link.connected.is_set(), message="connected again")
            await asyncio.to_thread(proxy.cut)
            proxy.restore()
            await await_for(lambda: link.connected.is_set() and link.stats["connects"] == 3,
                            message="third connection")
            await mosquitto_pub(mosquitto.port, "ma/marker", "m")
            await await_for(lambda: any(m.topic == "ma/marker" for m in deliveries), message="marker")
            assert len([m for m in deliveries if m.topic == "ma/job"]) == 2

    run_async(body())


def test_blackholed_link_is_detected_by_keepalive(
    mosquitto: MosquittoBroker, fault_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy(mosquitto.port)

    async def body() -> None:
        link = make_link(proxy.port, keepalive=1)
        async with running(link):
            proxy.blackhole()  # TCP stays up, nothing gets through: only PINGREQ timeouts notice
            await await_for(lambda: not link.connected.is_set(), timeout=8,
                            message="keepalive noticed the half-dead link")
            proxy.restore()
            await await_for(lambda: link.connected.is_set(), timeout=8, message="reconnected")
            await link.publish("ka/x", b"alive")

    run_async(body())


def test_auth_refused_on_bad_credentials(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    pwfile = make_password_file(tmp_path / "passwd", {"alice": "s3cret"})
    broker = mosquitto_factory(allow_anonymous=False, password_file=pwfile)

    async def body() -> None:
        bad = make_link(broker.port, username="alice", password="wrong")
        with pytest.raises(AuthRefused) as info:
            async with asyncio.timeout(10):
                await bad.run()
        assert "wrong" not in str(info.value)
        assert bad.stats["connect_failures"] == 1  # no retry loop against a refusal

        anonymous = make_link(broker.port)
        with pytest.raises(AuthRefused):
            async with asyncio.timeout(10):
                await anonymous.run()

        good = make_link(broker.port, username="alice", password="s3cret")
        async with running(good):
            await good.publish("auth/ok", b"1")

    run_async(body())


def _make_tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CWSNet CA and a server certificate for 127.0.0.1 it issued (cwsnet.pki)."""
    from cwsnet import pki

    ca = pki.ensure_ca(d / "ca")[0]
    cert, key = d / "server.crt", d / "server.key"
    pki.issue_server_cert(ca, cert, key, ["127.0.0.1"])
    return ca.cert_path, cert, key


def test_tls_roundtrip_with_large_and_many_messages(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    import ssl

    ca, cert, key = _make_tls_files(tmp_path / "tls")
    broker = mosquitto_factory(extra_conf=f"cafile {ca}\ncertfile {cert}\nkeyfile {key}")
    ctx = ssl.create_default_context(cafile=str(ca))

    async def body() -> None:
        got = Collector()
        link = make_link(broker.port, tls=ctx, on_message=got)
        link.subscribe("tls/#")
        async with running(link):
            big = bytes(range(256)) * 2048  # 512 KiB: many TLS records, partial reads
            await link.publish("tls/big", big)
            (msg,) = await got.wait("tls/big")
            assert msg.payload == big
            # A burst from another client to a receiver with nothing in flight (paho then reads
            # one packet per loop_read()): everything must arrive promptly, not at the next
            # keepalive exchange.  (mosquitto writes one TLS record per packet; brokers that
            # coalesce packets into one record exercise MqttLink's SSL pending() drain.)
            sender = make_link(broker.port, tls=ctx)
            async with running(sender):
                await asyncio.gather(*(sender.publish(f"tls/n/{i}", str(i).encode()) for i in range(200)))
            await await_for(lambda: len([m for m in got.messages if m.topic.startswith("tls/n/")]) == 200,
                            timeout=3, message="all 200 small messages over TLS (before any keepalive ping)")
            assert [m.payload for m in got.messages if m.topic.startswith("tls/n/")] == [
                str(i).encode() for i in range(200)
            ]

        # a client that does not trust the broker's CA never connects (and keeps retrying)
        untrusting = make_link(broker.port, tls=ssl.create_default_context())
        async with running(untrusting, wait_connected=False):
            await await_for(lambda: untrusting.stats["connect_failures"] >= 1, message="TLS failure")
            assert "CERTIFICATE_VERIFY_FAILED" in str(untrusting.stats["last_error"])

    run_async(body())


# ---------------------------------------------------------------------------------------------
# back-pressure: the incoming queue is bounded by not reading the socket


def test_a_broker_certificate_from_another_ca_is_refused(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    """A client configured (``tls.ca_file``) with its own CA never connects to a broker whose
    certificate another CA issued, however valid that certificate is otherwise; with the right CA
    it connects."""
    from cwsnet.config import BrokerEndpoint
    from cwsnet.tls import client_context

    ca, cert, key = _make_tls_files(tmp_path / "site-ca")
    other_ca, _c, _k = _make_tls_files(tmp_path / "other-ca")
    broker = mosquitto_factory(extra_conf=f"cafile {ca}\ncertfile {cert}\nkeyfile {key}")

    def ctx(ca_file: Path) -> Any:
        return client_context(BrokerEndpoint(port=broker.port, tls={"ca_file": ca_file}))

    async def body() -> None:
        stranger = make_link(broker.port, tls=ctx(other_ca))
        async with running(stranger, wait_connected=False):
            await await_for(lambda: stranger.stats["connect_failures"] >= 2, message="TLS refusals")
            assert "CERTIFICATE_VERIFY_FAILED" in str(stranger.stats["last_error"])
            assert not stranger.connected.is_set() and stranger.stats["connects"] == 0
        trusting = make_link(broker.port, tls=ctx(ca))
        async with running(trusting):
            await trusting.publish("tls/ok", b"1")

    run_async(body())


def test_slow_handler_burst_bounded_queue_in_order(mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    # mosquitto keeps everything it cannot send yet (default: 1000 per client, then drops)
    broker = mosquitto_factory(extra_conf="max_queued_messages 0")
    n, max_queue = 1500, 25

    async def body() -> None:
        got: list[bytes] = []

        async def slow(msg: Message) -> None:
            got.append(msg.payload)
            await asyncio.sleep(0.001)

        link = make_link(broker.port, on_message=slow, max_queue=max_queue)
        link.subscribe("bp/#", qos=1)
        sender = make_link(broker.port, max_inflight=200)
        async with running(link), running(sender):
            await asyncio.gather(*(sender.publish("bp/t", str(i).encode(), qos=1) for i in range(n)))
            await await_for(lambda: len(got) == n, timeout=60, message=f"all {n} messages handled")
            assert link.stats["connects"] == 1 and link.stats["disconnects"] == 0
        assert got == [str(i).encode() for i in range(n)]  # nothing dropped, nothing reordered
        assert link.stats["read_pauses"] >= 1, "the burst never filled the queue"
        # the link publishes nothing and receives QoS 1, so one loop_read() delivers at most one
        # message: the bound is exact (see MqttLink's docstring)
        assert link.stats["queue_high_water"] == max_queue

    run_async(body())


def test_long_pause_keeps_a_healthy_connection(mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    # The handler is stuck on its first message for 4 keepalive periods while the queue is full:
    # paho's PINGRESPs sit unread behind the messages, yet the connection must survive.
    broker = mosquitto_factory(extra_conf="max_queued_messages 0")
    keepalive, n = 2, 200

    async def body() -> None:
        got: list[bytes] = []
        release = asyncio.Event()

        async def stuck(msg: Message) -> None:
            got.append(msg.payload)
            await release.wait()

        link = make_link(broker.port, on_message=stuck, max_queue=5, keepalive=keepalive)
        link.subscribe("lp/#", qos=1)
        sender = make_link(broker.port, max_inflight=100)
        async with running(link), running(sender):
            await asyncio.gather(*(sender.publish("lp/t", str(i).encode(), qos=1) for i in range(n)))
            await await_for(lambda: link.stats["read_pauses"] >= 1, message="reading paused")
            await asyncio.sleep(4 * keepalive)
            assert link.connected.is_set() and link.stats["disconnects"] == 0, link.stats["last_error"]
            assert len(got) == 1 and link.stats["queue_high_water"] == 5
            release.set()
            await await_for(lambda: len(got) == n, timeout=30, message=f"all {n} messages after the pause")
            # the broker did not give up on us either (no reconnect happened)
            await link.publish("elsewhere/after", b"x")
            assert link.stats["connects"] == 1 and link.stats["disconnects"] == 0
        assert got == [str(i).encode() for i in range(n)]

    run_async(body())


def test_lost_connection_waits_for_room_before_reconnecting(
    mosquitto: MosquittoBroker, fault_proxy: Callable[..., FaultProxy]
) -> None:
    proxy = fault_proxy(mosquitto.port)

    async def body() -> None:
        got: list[bytes] = []
        release = asyncio.Event()

        async def stuck(msg: Message) -> None:
            got.append(msg.payload)
            await release.wait()

        link = make_link(proxy.port, on_message=stuck, max_queue=4, keepalive=1)
        link.subscribe("rc/#", qos=1)
        sender = make_link(mosquitto.port)
        async with running(link), running(sender):
            await asyncio.gather(*(sender.publish("rc/t", str(i).encode()) for i in range(20)))
            await await_for(lambda: link.stats["read_pauses"] >= 1, message="reading paused")
            await asyncio.to_thread(proxy.cut)
            proxy.restore()
            await await_for(lambda: not link.connected.is_set(), timeout=10, message="loss noticed while paused")
            await asyncio.sleep(1.5)  # many backoff periods (backoff_max is 0.3 s)
            assert link.stats["connects"] == 1, "reconnected while the queue was full"
            release.set()
            await await_for(lambda: link.connected.is_set(), timeout=10, message="reconnected once drained")
            assert link.stats["connects"] == 2
        # the message being handled and the 4 queued ones survived the lost connection, in order
        # (the rest went to the old clean session and left with it)
        assert got == [str(i).encode() for i in range(5)]

    run_async(body())


def test_max_queue_is_validated() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_queue"):
            make_link(1883, max_queue=bad)
