"""Tests for cwsnet.broker: the amqtt defect fixes, authentication, the topic ACL and hot reload.

The broker runs in-process on its own event loop in a background thread; clients are real
paho-mqtt 2.2 clients.  Tests marked ``# DEFECT`` fail against plain ``amqtt.broker.Broker``:
run ``CWSNET_BROKER_BASE=1 pytest tests/test_broker.py`` to start the same configuration (same
plugin) on the unpatched base class and see which amqtt defects are still there upstream.
Where cheap, the ACL-independent behaviour is also checked against Mosquitto as the control.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session
from paho.mqtt.enums import CallbackAPIVersion

from cwsnet.broker import (
    BrokerSettings,
    Credentials,
    CwsAccessPlugin,
    CwsBroker,
    broker_config,
    filter_covers,
    hash_token,
    is_loopback_host,
    load_credentials,
    parse_credentials,
    topic_matches,
)
from cwsnet.errors import ConfigError

try:  # tests/ is on sys.path under pytest's default (rootdir/prepend) import mode
    from harness.ports import free_port
    from harness.proc import ManagedProcess
    from harness.wait import wait_for
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.harness.ports import free_port
    from tests.harness.proc import ManagedProcess
    from tests.harness.wait import wait_for

USE_BASE = os.environ.get("CWSNET_BROKER_BASE") == "1"
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
REPO = Path(__file__).resolve().parents[1]

TOKENS = {"dev-1": "tok-dev-1-secret", "dev-2": "tok-dev-2-secret", "dev-3": "tok-dev-3-secret",
          "admin": "tok-admin-secret", "probe": "tok-probe-secret", "gw-home": "tok-gw-home-secret"}
DEVICE_RULES = {
    "publish": ["cws/v1/home/{username}/#"],
    "subscribe": ["cws/v1/home/{username}/task/cmd", "cws/v1/home/{username}/ack"],
}
ADMIN_RULES = {"publish": ["#"], "subscribe": ["#"]}
GATEWAY_RULES = {"publish": ["cws/v1/home/+/task/cmd", "cws/v1/home/+/ack"], "subscribe": ["cws/v1/home/#"]}


def user(name: str, rules: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"token_sha256": hashlib.sha256(TOKENS[name].encode()).hexdigest(), **(rules or DEVICE_RULES)}


def write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@pytest.fixture
def creds_file(tmp_path: Path) -> Path:
    path = tmp_path / "credentials.json"
    write_json_atomic(path, {"users": {"dev-1": user("dev-1"), "dev-2": user("dev-2"),
                                       "admin": user("admin", ADMIN_RULES)}, "anonymous": False})
    return path


@pytest.fixture
def site_creds(tmp_path: Path) -> Path:
    """Like the home lab's site broker: the gateway (bridge client id ``gw-home-bridge``), devices
    (client id = username) and the read-only ``admin`` debugging user with ``client_ids: ["*"]``."""
    path = tmp_path / "site.json"
    admin = {**user("admin", {"publish": [], "subscribe": ["#"]}), "client_ids": ["*"]}
    write_json_atomic(path, {"users": {"gw-home": user("gw-home", GATEWAY_RULES), "dev-1": user("dev-1"),
                                       "dev-2": user("dev-2"), "admin": admin}, "anonymous": False})
    return path


# ------------------------------------------------------------------------------------------------
# In-process broker on its own loop thread
# ------------------------------------------------------------------------------------------------


class RunningBroker:
    """A CwsBroker (or, with CWSNET_BROKER_BASE=1, plain amqtt Broker) on a background loop."""

    kind = "cws"
    host = "127.0.0.1"

    def __init__(self, settings: BrokerSettings, extra_plugins: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.port = settings.port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="broker-loop", daemon=True)
        self.thread.start()
        self.broker: Broker = self.call(self._start(extra_plugins or {}))

    async def _start(self, extra_plugins: dict[str, Any]) -> Broker:
        config = broker_config(self.settings)
        config["plugins"].update(extra_plugins)
        if USE_BASE:
            broker: Broker = Broker(config)
        else:
            broker = CwsBroker(config, max_offline_queue=self.settings.max_offline_queue)
        await broker.start()
        return broker

    def call(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the broker's loop thread (safe access to broker state)."""

        async def _call() -> Any:
            return fn()

        return self.call(_call())

    def session_state(self, client_id: str) -> str | None:
        def _get() -> str | None:
            entry = self.broker.sessions.get(client_id)
            return entry[0].transitions.state if entry else None

        return self.run(_get)

    def offline_queued(self, client_id: str) -> int:
        return self.run(lambda: self.broker.sessions[client_id][0].retained_messages.qsize())

    def wait_offline(self, client_id: str) -> None:
        wait_for(lambda: self.session_state(client_id) == "disconnected", 5, message=f"{client_id} offline on broker")

    def plugin(self) -> CwsAccessPlugin:
        return next(p for p in self.broker.plugins_manager.plugins if isinstance(p, CwsAccessPlugin))

    def close(self) -> None:
        try:
            self.call(self.broker.shutdown(), timeout=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class MosquittoBroker:
    """Mosquitto as the control: anonymous, loopback, no persistence file."""

    kind = "mosquitto"
    host = "127.0.0.1"

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.proc = ManagedProcess("mosquitto", [MOSQUITTO, "-c", conf], log_path=tmp_path / "mosquitto.log")
        self.proc.wait_port("127.0.0.1", self.port, timeout=10)

    def wait_offline(self, client_id: str) -> None:
        # Mosquitto handles the subscriber's DISCONNECT before it can CONNACK (and then handle
        # PUBLISHes from) the next connection, so there is nothing to wait for here.
        return None

    def close(self) -> None:
        self.proc.terminate(timeout=5)


@pytest.fixture
def brokers() -> Iterator[Callable[..., RunningBroker]]:
    started: list[RunningBroker] = []

    def start(credentials_file: Path | None = None, extra_plugins: dict[str, Any] | None = None,
              **kwargs: Any) -> RunningBroker:
        settings = BrokerSettings(host=kwargs.pop("host", "127.0.0.1"), port=kwargs.pop("port", None) or free_port(),
                                  credentials_file=credentials_file, **kwargs)
        rb = RunningBroker(settings, extra_plugins)
        started.append(rb)
        return rb

    yield start
    for rb in reversed(started):
        rb.close()


@pytest.fixture(params=["cws", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, pytest.mark.integration])])
def open_broker(request: pytest.FixtureRequest, brokers: Callable[..., RunningBroker],
                tmp_path: Path) -> Iterator[RunningBroker | MosquittoBroker]:
    """An anonymous loopback broker: ours, or Mosquitto as the control."""
    if request.param == "cws":
        yield brokers()
        return
    if MOSQUITTO is None:
        pytest.fail("mosquitto is not installed: `make test` installs it when run as root (the control broker)")
    mb = MosquittoBroker(tmp_path)
    try:
        yield mb
    finally:
        mb.close()


# ------------------------------------------------------------------------------------------------
# paho client helper
# ------------------------------------------------------------------------------------------------


class Client:
    def __init__(self, broker: Any, client_id: str = "", username: str | None = None,
                 password: str | None = None, *, clean_session: bool = True,
                 will: tuple[str, bytes, int] | None = None, transport: str = "tcp",
                 port: int | None = None, host: str | None = None) -> None:
        self.host = host or broker.host
        self.port = port or broker.port
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                             protocol=mqtt.MQTTv311, transport=transport, reconnect_on_failure=False)
        if transport == "websockets":
            self.c.ws_set_options(path="/")
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            self.c.will_set(will[0], will[1], will[2])
        self.cond = threading.Condition()
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: Any = None
        self.session_present: bool | None = None
        self.subacks: dict[int, list[int]] = {}
        self.disconnected = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self.cond:
            self.connack = reason_code
            self.session_present = bool(flags.session_present)
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        with self.cond:
            self.subacks[mid] = [rc.value for rc in codes]
            self.cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.disconnected.set()

    def connect(self, timeout: float = 5.0) -> bool:
        """CONNECT and wait for the CONNACK; True if accepted (then the network loop runs in a thread)."""
        self.c.connect(self.host, self.port, keepalive=30)
        deadline = time.monotonic() + timeout
        while self.connack is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no CONNACK from {self.host}:{self.port} within {timeout}s")
            self.c.loop(timeout=0.05)
        if self.connack.is_failure:
            self.c.disconnect()
            return False
        self.c.loop_start()
        return True

    def subscribe(self, *subs: tuple[str, int], timeout: float = 5.0) -> list[int]:
        result, mid = self.c.subscribe(list(subs))
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, timeout), "no SUBACK"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                timeout: float = 5.0) -> None:
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)  # PUBACK/PUBCOMP for QoS 1/2; written to the socket for QoS 0

    def wait_messages(self, n: int, timeout: float = 5.0) -> list[mqtt.MQTTMessage]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.messages) >= n, timeout)
            assert ok, f"expected {n} messages, got {[(m.topic, m.payload) for m in self.messages]}"
            return list(self.messages)

    def wait_payload(self, payload: bytes, timeout: float = 5.0) -> list[mqtt.MQTTMessage]:
        """Wait for a message with ``payload``; return every message received so far."""
        with self.cond:
            ok = self.cond.wait_for(lambda: any(m.payload == payload for m in self.messages), timeout)
            assert ok, f"{payload!r} not received; got {[(m.topic, m.payload) for m in self.messages]}"
            return list(self.messages)

    def payloads(self) -> list[bytes]:
        with self.cond:
            return [m.payload for m in self.messages]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        c = Client(*args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            c.close()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


def connected(make: Callable[..., Client], broker: Any, name: str | None = None, **kwargs: Any) -> Client:
    """A connected client; ``name`` logs in as that user with its token."""
    if name is not None:
        kwargs.setdefault("username", name)
        kwargs.setdefault("password", TOKENS[name])
        kwargs.setdefault("client_id", f"{name}-{time.monotonic_ns()}")
    c = make(broker, **kwargs)
    assert c.connect(), f"connect refused: {c.connack}"
    return c


def can_connect(broker: Any, name: str, token: str | None = None) -> bool:
    c = Client(broker, client_id=f"{name}-probe-{time.monotonic_ns()}", username=name,
               password=token if token is not None else TOKENS[name])
    ok = c.connect()
    if ok:
        c.close()
    return ok


# ------------------------------------------------------------------------------------------------
# 1. QoS: delivered at min(publish QoS, granted QoS)                                    # DEFECT
# ------------------------------------------------------------------------------------------------


def test_delivery_qos_is_min_of_publish_and_subscription(open_broker: Any, clients: Callable[..., Client]) -> None:
    sub = connected(clients, open_broker, client_id="qos-sub")
    assert sub.subscribe(("m/0", 0), ("m/1", 1), ("m/2", 2)) == [0, 1, 2]
    pub = connected(clients, open_broker, client_id="qos-pub")
    for granted in (0, 1, 2):
        for pub_qos in (0, 1, 2):
            pub.publish(f"m/{granted}", f"{granted}{pub_qos}", qos=pub_qos)
    got = {m.payload.decode(): m.qos for m in sub.wait_messages(9)}
    assert got == {f"{g}{p}": min(g, p) for g in (0, 1, 2) for p in (0, 1, 2)}


# ------------------------------------------------------------------------------------------------
# 2. Retained messages and the RECEIVE ACL                                               # DEFECT
# ------------------------------------------------------------------------------------------------


class DenySecretReceive(BaseTopicPlugin):
    """Test plugin: SUBSCRIBE anything, but never RECEIVE a topic ending in /secret."""

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        return not (action == Action.RECEIVE and topic is not None and topic.endswith("/secret"))


def test_retained_on_subscribe_is_checked_against_receive_acl(brokers: Callable[..., RunningBroker],
                                                              clients: Callable[..., Client]) -> None:
    plugin_path = f"{DenySecretReceive.__module__}.{DenySecretReceive.__qualname__}"
    rb = brokers(extra_plugins={plugin_path: {}})
    pub = connected(clients, rb, client_id="ret-pub")
    pub.publish("r/secret", b"s", qos=1, retain=True)
    pub.publish("r/public", b"p", qos=1, retain=True)
    sub = connected(clients, rb, client_id="ret-sub")
    assert sub.subscribe(("r/#", 1)) == [1]
    pub.publish("r/live", b"sentinel", qos=1)  # delivered after the retained ones
    got = sub.wait_payload(b"sentinel")
    assert [(m.topic, m.retain) for m in got] == [("r/public", True), ("r/live", False)]


def test_connect_does_not_replay_retained_for_other_clients_subscriptions(
        open_broker: Any, clients: Callable[..., Client]) -> None:
    # amqtt 0.12.1 sends every connecting client the retained messages matching *any* client's
    # subscriptions (here: the watcher's "x/#"), unchecked by the ACL.  Mosquitto sends none.
    watcher = connected(clients, open_broker, client_id="watcher")
    assert watcher.subscribe(("x/#", 1)) == [1]
    pub = connected(clients, open_broker, client_id="x-pub")
    pub.publish("x/secret", b"s", qos=1, retain=True)
    watcher.wait_payload(b"s")
    other = connected(clients, open_broker, client_id="other")
    assert other.subscribe(("y/t", 1)) == [1]
    pub.publish("y/t", b"sentinel", qos=1)
    assert [m.topic for m in other.wait_payload(b"sentinel")] == ["y/t"]


def test_connect_does_not_leak_retained_across_acl(brokers: Callable[..., RunningBroker], creds_file: Path,
                                                   clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file)
    admin = connected(clients, rb, "admin")
    assert admin.subscribe(("cws/#", 1)) == [1]
    admin.publish("cws/v1/home/dev-2/task/cmd", b"dev-2 only", qos=1, retain=True)
    admin.wait_payload(b"dev-2 only")
    dev1 = connected(clients, rb, "dev-1")
    assert dev1.subscribe(("cws/v1/home/dev-1/ack", 1)) == [1]
    admin.publish("cws/v1/home/dev-1/ack", b"sentinel", qos=1)
    assert [m.topic for m in dev1.wait_payload(b"sentinel")] == ["cws/v1/home/dev-1/ack"]


# ------------------------------------------------------------------------------------------------
# 3. Offline queue delivered with RETAIN=0                                                # DEFECT
# ------------------------------------------------------------------------------------------------


def test_offline_queue_is_delivered_without_retain_flag(open_broker: Any, clients: Callable[..., Client]) -> None:
    sub = connected(clients, open_broker, client_id="persist-1", clean_session=False)
    assert sub.subscribe(("o/t", 1)) == [1]
    sub.close()
    assert sub.disconnected.wait(5)
    open_broker.wait_offline("persist-1")
    pub = connected(clients, open_broker, client_id="o-pub")
    for i in range(3):
        pub.publish("o/t", f"m{i}", qos=1)
    if isinstance(open_broker, RunningBroker):
        wait_for(lambda: open_broker.offline_queued("persist-1") == 3, 5, message="3 queued messages")
    again = connected(clients, open_broker, client_id="persist-1", clean_session=False)
    assert again.session_present is True
    got = again.wait_messages(3)
    assert [(m.payload, m.qos, m.retain) for m in got] == [(f"m{i}".encode(), 1, False) for i in range(3)]


def test_unacked_qos1_on_session_resume_mosquitto_redelivers_amqtt_drops(open_broker: Any, clients: Callable[..., Client]) -> None:
    """[MQTT-4.4.0-1]: NOT fixed in CwsBroker (see docs/broker.md); Mosquitto shows the expected behaviour."""
    sub = clients(open_broker, client_id="unacked", clean_session=False)
    sub.c.manual_ack_set(True)  # receive, never PUBACK
    assert sub.connect()
    assert sub.subscribe(("u/t", 1)) == [1]
    pub = connected(clients, open_broker, client_id="u-pub")
    pub.publish("u/t", b"unacked", qos=1)
    sub.wait_payload(b"unacked")
    sub.close()
    assert sub.disconnected.wait(5)
    open_broker.wait_offline("unacked")
    again = clients(open_broker, client_id="unacked", clean_session=False)
    assert again.connect()
    pub.publish("u/t", b"sentinel", qos=1)
    again.wait_payload(b"sentinel")
    redelivered = b"unacked" in again.payloads()
    if open_broker.kind == "cws":
        # The documented amqtt 0.12.1 defect CWSNet does not rely on (its own outboxes retransmit):
        # in-flight QoS 1 messages are dropped when the client disconnects. If this starts failing,
        # amqtt fixed it: update docs/broker.md and this test.
        assert not redelivered, "amqtt now redelivers unacked QoS 1 on resume"
        return
    assert redelivered and again.payloads()[0] == b"unacked"


# ------------------------------------------------------------------------------------------------
# 4. Offline queue bounded                                                                # DEFECT
# ------------------------------------------------------------------------------------------------


def test_offline_queue_is_bounded_dropping_oldest(brokers: Callable[..., RunningBroker],
                                                  clients: Callable[..., Client],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cwsnet.broker")
    rb = brokers(max_offline_queue=5)
    sub = connected(clients, rb, client_id="bounded", clean_session=False)
    assert sub.subscribe(("b/t", 1)) == [1]
    sub.close()
    rb.wait_offline("bounded")
    pub = connected(clients, rb, client_id="b-pub")
    for i in range(12):
        pub.publish("b/t", str(i), qos=1)
    dropped = lambda: rb.run(lambda: getattr(rb.broker, "offline_messages_dropped", 0))  # noqa: E731
    wait_for(lambda: rb.offline_queued("bounded") + dropped() == 12, 5, message="12 messages queued or dropped")
    again = connected(clients, rb, client_id="bounded", clean_session=False)
    again.wait_messages(5)
    pub.publish("b/t", b"sentinel", qos=1)
    assert again.wait_payload(b"sentinel") and again.payloads() == [str(i).encode() for i in range(7, 12)] + [
        b"sentinel"]
    assert dropped() == 7
    warnings = [r for r in caplog.records if "offline queue of client 'bounded' is full" in r.getMessage()]
    assert len(warnings) == 1  # first drop logged; then every 1000th


# ------------------------------------------------------------------------------------------------
# 5. An unauthenticated CONNECT must not touch an existing session                        # DEFECT
# ------------------------------------------------------------------------------------------------


def test_unauthenticated_connect_cannot_take_over_or_wipe_a_session(
        brokers: Callable[..., RunningBroker], creds_file: Path, clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file)
    victim = connected(clients, rb, "dev-1", client_id="dev-1", clean_session=False)
    assert victim.subscribe(("cws/v1/home/dev-1/task/cmd", 1)) == [1]
    watcher = connected(clients, rb, "admin")
    assert watcher.subscribe(("cws/v1/home/dev-2/task/cmd", 1)) == [1]
    admin = connected(clients, rb, "admin")

    # clean-session CONNECT with the victim's client id and a wrong token: upstream deletes the session
    wiper = Client(rb, client_id="dev-1", username="dev-1", password="wrong")
    assert wiper.connect() is False
    # non-clean CONNECT with a will aimed at another device: upstream takes the session over,
    # disconnects the victim, and then publishes the attacker's will as the victim
    hijacker = Client(rb, client_id="dev-1", username="dev-1", password="wrong", clean_session=False,
                      will=("cws/v1/home/dev-2/task/cmd", b"injected", 1))
    assert hijacker.connect() is False

    admin.publish("cws/v1/home/dev-1/task/cmd", b"still-subscribed", qos=1)
    victim.wait_payload(b"still-subscribed")
    assert not victim.disconnected.is_set()
    admin.publish("cws/v1/home/dev-2/task/cmd", b"sentinel", qos=1)
    assert watcher.wait_payload(b"sentinel") and b"injected" not in watcher.payloads()
    assert rb.session_state("dev-1") == "connected"


# ------------------------------------------------------------------------------------------------
# Client ids are bound to users (the code review's "takeover"; needs defect 5's fix as well)
# ------------------------------------------------------------------------------------------------


def test_another_user_cannot_wipe_take_over_or_kick_a_client_id(
        brokers: Callable[..., RunningBroker], site_creds: Path, clients: Callable[..., Client]) -> None:
    # Found in review: device dev-1 connecting with the gateway bridge's client id and
    # clean_session=True deleted the bridge's persistent session and offline queue; with
    # clean_session=False it took the session over and kicked the bridge off, again and again.
    rb = brokers(site_creds)
    bridge = connected(clients, rb, "gw-home", client_id="gw-home-bridge", clean_session=False)
    assert bridge.subscribe(("cws/v1/home/+/status", 1)) == [1]
    bridge.close()
    assert bridge.disconnected.wait(5)
    rb.wait_offline("gw-home-bridge")
    dev1 = connected(clients, rb, "dev-1", client_id="dev-1")
    for i in range(3):
        dev1.publish("cws/v1/home/dev-1/status", f"q{i}", qos=1)
    wait_for(lambda: rb.offline_queued("gw-home-bridge") == 3, 5, message="3 messages queued for the bridge")

    for name, clean in (("dev-1", True), ("dev-1", False), ("admin", True), ("admin", False)):
        thief = clients(rb, client_id="gw-home-bridge", username=name, password=TOKENS[name], clean_session=clean)
        assert thief.connect() is False, f"{name} (clean_session={clean}) got the bridge's client id"
        assert "authori" in str(thief.connack).lower()
    assert rb.session_state("gw-home-bridge") == "disconnected"
    assert rb.offline_queued("gw-home-bridge") == 3  # the victim's session and queue are intact

    again = connected(clients, rb, "gw-home", client_id="gw-home-bridge", clean_session=False)
    assert again.session_present is True
    assert [m.payload for m in again.wait_messages(3)] == [b"q0", b"q1", b"q2"]
    # a connected owner cannot be kicked off either
    thief = clients(rb, client_id="gw-home-bridge", username="dev-2", password=TOKENS["dev-2"], clean_session=False)
    assert thief.connect() is False
    dev1.publish("cws/v1/home/dev-1/status", b"sentinel", qos=1)
    again.wait_payload(b"sentinel")
    assert not again.disconnected.is_set() and rb.session_state("gw-home-bridge") == "connected"


def test_star_client_ids_over_the_wire(brokers: Callable[..., RunningBroker], site_creds: Path,
                                       clients: Callable[..., Client],
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cwsnet.broker")
    rb = brokers(site_creds)
    dev1 = connected(clients, rb, "dev-1", client_id="dev-1")
    # mosquitto_sub's random ids, and an empty id (the broker assigns "amqtt/<random>")
    watcher = connected(clients, rb, "admin", client_id="mosq-h3Xq9ZpL0aBcDe1f")
    assert watcher.subscribe(("#", 0)) == [0]
    connected(clients, rb, "admin", client_id="")
    # ... but never an id another user's pattern names more specifically
    for cid in ("dev-1", "dev-2", "gw-home", "gw-home-bridge"):
        assert clients(rb, client_id=cid, username="admin", password=TOKENS["admin"]).connect() is False, cid
    dev1.publish("cws/v1/home/dev-1/status", b"sentinel", qos=1)
    watcher.wait_payload(b"sentinel")
    assert not dev1.disconnected.is_set()
    assert "client id is reserved for user(s) gw-home" in caplog.text


def _creds(users: dict[str, dict[str, Any]], **top: Any) -> Credentials:
    return parse_credentials({"users": {u: {"token_sha256": "00" * 32, **e} for u, e in users.items()}, **top})


def _allowed(creds: Credentials, username: str | None, client_id: str) -> bool:
    return creds.client_id_refusal(username, client_id) is None


def test_default_client_ids_fit_cwsnet_and_bind_ids_to_users() -> None:
    cloud = _creds({"cloud": {}, "gw-home": {}})
    assert _allowed(cloud, "cloud", "cloud-ingest") and _allowed(cloud, "gw-home", "gw-home")
    assert not _allowed(cloud, "gw-home", "cloud-ingest") and not _allowed(cloud, "cloud", "gw-home")
    site = _creds({"gw-home": {}, "dev-1": {}, "dev-1-kitchen": {}})
    for username, cid in (("gw-home", "gw-home-bridge"), ("gw-home", "gw-home"), ("dev-1", "dev-1"),
                          ("dev-1", "dev-1-probe"), ("dev-1-kitchen", "dev-1-kitchen"),
                          ("dev-1-kitchen", "dev-1-kitchen-2")):
        assert _allowed(site, username, cid), (username, cid)
    for username, cid in (("dev-1", "gw-home-bridge"), ("dev-1", "gw-home"), ("gw-home", "dev-1"),
                          ("dev-1", "dev-10"), ("dev-1", "dev-1x"), ("dev-1", ""), ("dev-1", "DEV-1"),
                          ("nobody", "nobody")):
        assert not _allowed(site, username, cid), (username, cid)
    # "dev-1-*" must not reach user dev-1-kitchen's ids: the more specific pattern owns them
    assert site.client_id_refusal("dev-1", "dev-1-kitchen") == "client id is reserved for user(s) dev-1-kitchen"
    assert not _allowed(site, "dev-1", "dev-1-kitchen-2")


def test_explicit_client_id_patterns() -> None:
    c = _creds({"ops": {"client_ids": ["ops-console", "tool-{username}-*", "x*"]}, "dev-1": {},
                "a*": {}, "locked": {"client_ids": []}})
    for cid in ("ops-console", "tool-ops-1", "tool-ops-", "x", "xyz"):
        assert _allowed(c, "ops", cid), cid
    # an explicit list replaces the default; exact patterns are exact
    for cid in ("ops", "ops-1", "ops-console-2", "tool-ops", "tool-dev-1-1", "dev-1"):
        assert not _allowed(c, "ops", cid), cid
    # '*' in a username is a literal character, not a wildcard
    assert _allowed(c, "a*", "a*") and _allowed(c, "a*", "a*-1") and not _allowed(c, "a*", "ab")
    assert not any(_allowed(c, "locked", cid) for cid in ("locked", "locked-1", ""))


def test_star_client_id_allows_any_id_no_other_user_claims() -> None:
    c = _creds({"admin": {"client_ids": ["*"]}, "gw-home": {}, "dev-1": {}, "root": {"client_ids": ["*"]}})
    for cid in ("mosq-Xb3k9", "admin", "amqtt/abcdefgh12345678", "", "dev-10", "gw-home2"):
        assert _allowed(c, "admin", cid) and _allowed(c, "root", cid), cid  # equally specific: both
    for cid in ("dev-1", "dev-1-x", "gw-home", "gw-home-bridge"):
        assert not _allowed(c, "admin", cid), cid


def test_anonymous_client_ids() -> None:
    users = {"dev-1": {}, "admin": {"client_ids": ["*"]}}
    default = _creds(users, anonymous=True)
    assert _allowed(default, None, "anon-1") and _allowed(default, None, "mosq-1")  # "*" ties with admin's
    assert not _allowed(default, None, "dev-1") and not _allowed(default, None, "dev-1-x")
    narrow = _creds(users, anonymous=True, anonymous_rules={"client_ids": ["anon-*"]})
    assert _allowed(narrow, None, "anon-1") and not _allowed(narrow, None, "mosq-1")
    assert _allowed(narrow, "admin", "anon-1")  # anonymous patterns never reserve ids against users


# ------------------------------------------------------------------------------------------------
# 6. Concurrent SUBSCRIBEs must not lose broadcasts                                       # DEFECT
# ------------------------------------------------------------------------------------------------


def test_concurrent_subscribes_do_not_lose_messages(brokers: Callable[..., RunningBroker],
                                                    clients: Callable[..., Client]) -> None:
    # amqtt 0.12.1 iterates the live subscription dict and awaits the ACL plugin for every
    # matching subscriber; a SUBSCRIBE to a new filter meanwhile makes the iteration raise, and
    # every subscriber on a later filter ("load/t" after "load/#") silently misses the message.
    rb = brokers()
    receivers = [connected(clients, rb, client_id=f"rx-{i}") for i in range(4)]
    for i, r in enumerate(receivers):
        assert r.subscribe(("load/#" if i == 0 else "load/t", 1)) == [1]
    churn = connected(clients, rb, client_id="churn")
    pub = connected(clients, rb, client_id="load-pub")
    n = 300
    stop = threading.Event()

    def subscribe_new_filters() -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            churn.c.subscribe(f"churn/{i}", 0)
            i += 1
            time.sleep(0.0002)

    t = threading.Thread(target=subscribe_new_filters)
    t.start()
    try:
        infos = [pub.c.publish("load/t", str(i), qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        stop.set()
        t.join(10)
    for r in receivers:
        with r.cond:
            r.cond.wait_for(lambda r=r: len(r.messages) >= n, 10)
        assert len(r.payloads()) == n, f"{r.c._client_id!r} got {len(r.payloads())}/{n}"


def _mqtt_packet(first: int, body: bytes) -> bytes:
    out, n = bytearray([first]), len(body)
    while True:  # remaining length, MQTT's variable-length integer
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out) + body


def _mqtt_str(s: str) -> bytes:
    return len(s.encode()).to_bytes(2, "big") + s.encode()


@pytest.mark.parametrize("n", [1, 50])
def test_acknowledged_publishes_are_routed_when_the_publisher_disconnects_at_once(
        open_broker: Any, clients: Callable[..., Client], n: int) -> None:
    # amqtt 0.12.1 PUBACKs a QoS 1 publish when it queues it, and its per-client loop stops at the
    # DISCONNECT: what was still queued is discarded. A sensor that publishes a burst and
    # disconnects (or sleeps) lost the tail of what the broker had acknowledged.  # DEFECT
    sub = connected(clients, open_broker, client_id="burst-sub")
    assert sub.subscribe(("burst/#", 1)) == [1]
    connect = _mqtt_packet(0x10, _mqtt_str("MQTT") + bytes([4, 0x02]) + (30).to_bytes(2, "big")
                           + _mqtt_str("burst-pub"))
    publishes = b"".join(_mqtt_packet(0x32, _mqtt_str(f"burst/{i}") + (i + 1).to_bytes(2, "big") + b"x%d" % i)
                         for i in range(n))
    with socket.create_connection((open_broker.host, open_broker.port), 5) as s:
        s.sendall(connect)
        assert s.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        s.sendall(publishes + b"\xe0\x00")  # every PUBLISH then DISCONNECT, in one write
        acked, buf = set(), b""
        while len(acked) < n:  # the broker acknowledged all of them
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 4:
                assert buf[0] == 0x40, buf[:4]
                acked.add(int.from_bytes(buf[2:4], "big"))
                buf = buf[4:]
    assert acked == set(range(1, n + 1)), f"not acknowledged: {sorted(set(range(1, n + 1)) - acked)}"
    got = sub.wait_messages(n, timeout=10)
    assert sorted(m.topic for m in got) == sorted(f"burst/{i}" for i in range(n))


# ------------------------------------------------------------------------------------------------
# 7. IPv6 loopback listener                                                               # DEFECT
# ------------------------------------------------------------------------------------------------


def _ipv6_loopback_port() -> int | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
            return int(s.getsockname()[1])
    except OSError:
        return None


def test_ipv6_loopback_listener(brokers: Callable[..., RunningBroker], clients: Callable[..., Client]) -> None:
    port = _ipv6_loopback_port()
    if port is None:
        # the one environmental skip: a kernel or container without IPv6 has no ::1 to listen on
        pytest.skip("no IPv6 loopback")
    rb = brokers(host="::1", port=port)
    c = connected(clients, rb, client_id="v6", host="::1")
    assert c.subscribe(("v6/t", 1)) == [1]
    c.publish("v6/t", b"hello", qos=1)
    assert c.wait_payload(b"hello")


# ------------------------------------------------------------------------------------------------
# Authentication
# ------------------------------------------------------------------------------------------------


def test_wrong_token_and_unknown_user_are_refused(brokers: Callable[..., RunningBroker], creds_file: Path) -> None:
    rb = brokers(creds_file)
    assert can_connect(rb, "dev-1")
    assert not can_connect(rb, "dev-1", token="not-the-token")
    assert not can_connect(rb, "dev-1", token="")
    assert not can_connect(rb, "dev-3")  # not in the file
    anon = Client(rb, client_id="anon")
    assert anon.connect() is False
    assert "authori" in str(anon.connack).lower()


def test_anonymous_needs_opt_in_and_gets_anonymous_rules(brokers: Callable[..., RunningBroker], tmp_path: Path,
                                                         clients: Callable[..., Client]) -> None:
    path = tmp_path / "anon.json"
    write_json_atomic(path, {"users": {"admin": user("admin", ADMIN_RULES)}, "anonymous": True,
                             "anonymous_rules": {"publish": ["pub/#"], "subscribe": ["pub/#"]}})
    rb = brokers(path)
    anon = connected(clients, rb, client_id="anon-1")
    assert anon.subscribe(("pub/#", 1), ("#", 1), ("cws/v1/home/dev-1/task/cmd", 1)) == [1, 128, 128]
    anon.publish("pub/x", b"ok", qos=1)
    anon.publish("cws/v1/home/dev-1/task/cmd", b"denied", qos=1)
    anon.publish("pub/y", b"sentinel", qos=1)
    assert anon.wait_payload(b"sentinel") and anon.payloads() == [b"ok", b"sentinel"]


def _plugin(credentials_file: Path | None) -> CwsAccessPlugin:
    cfg = CwsAccessPlugin.Config(credentials_file=str(credentials_file) if credentials_file else None)
    return CwsAccessPlugin(SimpleNamespace(config=cfg, logger=logging.getLogger("test")))


def _session(username: str | None = None, password: str | None = None, bind: str = "127.0.0.1:1883") -> Session:
    s = Session()
    s.client_id, s.username, s.password = "c1", username, password
    s.attributes["cwsnet.listener_bind"] = bind
    return s


def test_anonymous_is_refused_on_non_loopback_listener(tmp_path: Path) -> None:
    path = tmp_path / "anon.json"
    write_json_atomic(path, {"users": {}, "anonymous": True})
    plugin = _plugin(path)
    assert asyncio.run(plugin.authenticate(session=_session(bind="127.0.0.1:1883"))) is True
    assert asyncio.run(plugin.authenticate(session=_session(bind="[::1]:1883"))) is True
    assert asyncio.run(plugin.authenticate(session=_session(bind="0.0.0.0:1883"))) is False
    assert asyncio.run(plugin.authenticate(session=_session(bind="192.0.2.7:1883"))) is False
    assert asyncio.run(plugin.authenticate(session=_session(bind=":1883"))) is False
    open_mode = _plugin(None)
    assert asyncio.run(open_mode.authenticate(session=_session(bind="127.0.0.1:1883"))) is True
    assert asyncio.run(open_mode.authenticate(session=_session(bind="0.0.0.0:1883"))) is False


def test_a_loopback_only_user_is_refused_on_other_listeners(tmp_path: Path) -> None:
    path = tmp_path / "local.json"
    write_json_atomic(path, {"users": {"local": {"token_sha256": hash_token("t"), "subscribe": ["x/#"],
                                                 "loopback_only": True, "client_ids": ["*"]}}})
    plugin = _plugin(path)
    assert asyncio.run(plugin.authenticate(session=_session("local", "t", bind="127.0.0.1:1884"))) is True
    assert asyncio.run(plugin.authenticate(session=_session("local", "t", bind="0.0.0.0:8884"))) is False
    assert asyncio.run(plugin.authenticate(session=_session("local", "t", bind="192.0.2.7:8884"))) is False
    write_json_atomic(path, {"users": {"local": {"token_sha256": hash_token("t"), "loopback_only": "yes"}}})
    with pytest.raises(ConfigError, match=r"users.local.loopback_only: must be true or false"):
        load_credentials(path)


def test_token_is_never_logged(brokers: Callable[..., RunningBroker], creds_file: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rb = brokers(creds_file)
    assert can_connect(rb, "dev-1")
    assert not can_connect(rb, "dev-1", token="wrong-token-value")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "bad token for user 'dev-1'" in text
    assert TOKENS["dev-1"] not in text and "wrong-token-value" not in text


def test_will_topic_outside_acl_is_refused(brokers: Callable[..., RunningBroker], creds_file: Path,
                                           clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file)
    bad = clients(rb, client_id="dev-1-w1", username="dev-1", password=TOKENS["dev-1"],
                  will=("cws/v1/home/dev-2/task/cmd", b"x", 1))
    assert bad.connect() is False
    good = clients(rb, client_id="dev-1-w2", username="dev-1", password=TOKENS["dev-1"],
                   will=("cws/v1/home/dev-1/status", b"offline", 1))
    assert good.connect() is True
    admin = connected(clients, rb, "admin")
    assert admin.subscribe(("cws/v1/home/dev-1/status", 0)) == [0]
    good.c.loop_stop()
    good.c.socket().close()  # abnormal disconnect: the will goes out
    will = admin.wait_messages(1)[0]
    assert (will.payload, will.qos) == (b"offline", 0)  # DEFECT: upstream delivers the will at its QoS 1


# ------------------------------------------------------------------------------------------------
# ACL
# ------------------------------------------------------------------------------------------------


def test_publish_outside_own_prefix_is_dropped_and_connection_survives(
        brokers: Callable[..., RunningBroker], creds_file: Path, clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file)
    admin = connected(clients, rb, "admin")
    assert admin.subscribe(("#", 1)) == [1]
    dev1 = connected(clients, rb, "dev-1")
    dev1.publish("cws/v1/home/dev-2/task/cmd", b"forged", qos=1)  # PUBACKed, not delivered
    dev1.publish("elsewhere", b"forged-0", qos=0)
    dev1.publish("cws/v1/home/dev-1/status", b"sentinel", qos=1)
    got = admin.wait_payload(b"sentinel")
    assert [(m.topic, m.payload) for m in got] == [("cws/v1/home/dev-1/status", b"sentinel")]
    assert dev1.c.is_connected() and not dev1.disconnected.is_set()


def test_device_subscribe_wildcards_refused_with_0x80(brokers: Callable[..., RunningBroker], creds_file: Path,
                                                      clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file)
    dev1 = connected(clients, rb, "dev-1")
    codes = dev1.subscribe(("#", 1), ("cws/v1/home/dev-1/task/cmd", 1), ("cws/v1/home/+/task/cmd", 1),
                           ("cws/v1/home/dev-1/+", 1), ("cws/v1/home/dev-2/ack", 0))
    assert codes == [128, 1, 128, 128, 128]
    admin = connected(clients, rb, "admin")
    admin.publish("cws/v1/home/dev-2/task/cmd", b"not for dev-1", qos=1)
    admin.publish("cws/v1/home/dev-1/task/cmd", b"for dev-1", qos=1)
    assert dev1.wait_payload(b"for dev-1") and dev1.payloads() == [b"for dev-1"]
    assert dev1.c.is_connected()


def test_receive_is_checked_per_delivery_with_current_rules(
        brokers: Callable[..., RunningBroker], creds_file: Path, clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file)
    dev1 = connected(clients, rb, "dev-1")
    assert dev1.subscribe(("cws/v1/home/dev-1/task/cmd", 1), ("cws/v1/home/dev-1/ack", 1)) == [1, 1]
    admin = connected(clients, rb, "admin")
    admin.publish("cws/v1/home/dev-1/task/cmd", b"before", qos=1)
    dev1.wait_payload(b"before")
    # dev-1 loses task/cmd; 'probe' is added so we can see when the reload happened
    write_json_atomic(creds_file, {"users": {
        "dev-1": user("dev-1", {"publish": ["cws/v1/home/{username}/#"], "subscribe": ["cws/v1/home/{username}/ack"]}),
        "admin": user("admin", ADMIN_RULES), "probe": user("probe")}})
    wait_for(lambda: can_connect(rb, "probe"), 3, interval=0.1, message="reload")
    admin.publish("cws/v1/home/dev-1/task/cmd", b"after", qos=1)
    admin.publish("cws/v1/home/dev-1/ack", b"sentinel", qos=1)
    assert dev1.wait_payload(b"sentinel") and dev1.payloads() == [b"before", b"sentinel"]


# ------------------------------------------------------------------------------------------------
# Hot reload
# ------------------------------------------------------------------------------------------------


def test_hot_reload_adds_and_removes_users(brokers: Callable[..., RunningBroker], creds_file: Path,
                                           clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file)
    assert not can_connect(rb, "dev-3")
    admin = connected(clients, rb, "admin")
    assert admin.subscribe(("#", 1)) == [1]
    dev2 = connected(clients, rb, "dev-2")  # connected while dev-2 is removed

    doc = json.loads(creds_file.read_text())
    doc["users"]["dev-3"] = user("dev-3")
    del doc["users"]["dev-2"]
    write_json_atomic(creds_file, doc)
    t0 = time.monotonic()
    wait_for(lambda: can_connect(rb, "dev-3"), 2.0, interval=0.1, message="dev-3 accepted after reload")
    assert time.monotonic() - t0 < 2.0
    assert not can_connect(rb, "dev-2")  # refused on its next connect
    if USE_BASE:  # upstream keeps the connection; the ACL (current rules) stops its publishes
        dev2.publish("cws/v1/home/dev-2/status", b"from removed user", qos=1)
    else:  # CwsBroker disconnects a removed user's connections within a second (revocation)
        assert dev2.disconnected.wait(2.0), "the removed user's connection was not closed"
        assert time.monotonic() - t0 < 2.0
    connected(clients, rb, "dev-3").publish("cws/v1/home/dev-3/status", b"sentinel", qos=1)
    assert admin.wait_payload(b"sentinel") and admin.payloads() == [b"sentinel"]


@pytest.mark.skipif(USE_BASE, reason="CwsBroker's revocation")
def test_a_changed_token_ends_the_connections_that_used_the_old_one(
        brokers: Callable[..., RunningBroker], creds_file: Path, clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file)
    dev1 = connected(clients, rb, "dev-1")
    admin = connected(clients, rb, "admin")
    doc = json.loads(creds_file.read_text())
    doc["users"]["dev-1"]["token_sha256"] = hashlib.sha256(b"a new token").hexdigest()
    write_json_atomic(creds_file, doc)
    rb.run(rb.plugin().reload_now)  # an ACL check reloads the rules before the watcher looks: still kicked
    assert dev1.disconnected.wait(2.0), "a connection made with the old token was kept"
    assert not can_connect(rb, "dev-1") and can_connect(rb, "dev-1", token="a new token")
    assert not admin.disconnected.is_set()  # everyone else keeps their connection


def test_malformed_credentials_file_keeps_previous_rules(brokers: Callable[..., RunningBroker], creds_file: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cwsnet.broker")
    rb = brokers(creds_file)
    creds_file.write_text('{"users": {"dev-1": ')  # truncated JSON, written in place

    def error_logged() -> list[logging.LogRecord]:
        can_connect(rb, "dev-1")  # any auth/ACL call triggers the (throttled) check
        return [r for r in caplog.records if r.levelno == logging.ERROR and str(creds_file) in r.getMessage()]

    errors = wait_for(error_logged, 3, interval=0.1, message="error naming the file")
    assert "keeping the previous rules" in errors[0].getMessage()
    assert can_connect(rb, "dev-1") and can_connect(rb, "admin")
    # the same broken version is reported once, not on every check
    plugin = rb.plugin() if not USE_BASE else None
    if plugin is not None:
        rb.run(plugin.reload_now)
    assert len(error_logged()) == 1
    # a semantically invalid file is rejected the same way
    write_json_atomic(creds_file, {"users": {"dev-1": {"token_sha256": "abc"}}})
    wait_for(lambda: len(error_logged()) == 2, 3, interval=0.1, message="second error")
    assert "token_sha256" in error_logged()[1].getMessage()
    assert can_connect(rb, "dev-1")
    # a good file is picked up again
    write_json_atomic(creds_file, {"users": {"dev-3": user("dev-3")}})
    wait_for(lambda: can_connect(rb, "dev-3"), 3, interval=0.1, message="recovery")
    assert not can_connect(rb, "dev-1")


# ------------------------------------------------------------------------------------------------
# Pure functions, settings, credentials parsing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flt", "topic", "expected"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("#", "a", True), ("+/+", "a/b", True), ("+", "a/b", False),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("$SYS/#", "$SYS/x", True), ("a/+/c", "a//c", True),
])
def test_topic_matches(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected


@pytest.mark.parametrize(("pattern", "flt", "expected"), [
    ("a/b/c", "a/b/c", True), ("a/+/c", "a/b/c", True), ("a/+/c", "a/+/c", True), ("a/b/c", "a/+/c", False),
    ("a/#", "a/+/c", True), ("a/#", "a/#", True), ("a/#", "a", True), ("a/+", "a/#", False),
    ("#", "#", True), ("#", "a/#", True), ("a/b/#", "a/#", False), ("a/b/#", "a", False),
    ("+/b", "+/b", True), ("a/b", "+/b", False), ("#", "$SYS/#", False), ("$SYS/#", "#", False),
    ("cws/v1/home/dev-1/#", "cws/v1/home/dev-1/task/cmd", True), ("a/#", "a/b/#", True),
    ("a/+/#", "a/b", True), ("a/+/#", "a", False), ("a/b", "a/#", False), ("a/#", "a/b#", False),
])
def test_filter_covers(pattern: str, flt: str, expected: bool) -> None:
    assert filter_covers(pattern, flt) is expected


def test_loopback_detection() -> None:
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "192.168.1.2", "", None, "example.org"))


def test_settings_refuse_anonymous_on_public_host_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without a credentials file"):
        broker_config(BrokerSettings(host="0.0.0.0", port=1883))
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match=str(bad)):
        broker_config(BrokerSettings(host="0.0.0.0", port=1883, credentials_file=bad))
    with pytest.raises(ConfigError, match="does-not-exist"):
        broker_config(BrokerSettings(credentials_file=tmp_path / "does-not-exist.json"))
    with pytest.raises(ConfigError, match="tls_port needs"):
        broker_config(BrokerSettings(tls_port=8883))
    cfg = broker_config(BrokerSettings(port=1884, ws_port=8080))
    assert cfg["listeners"]["default"]["bind"] == "127.0.0.1:1884" and cfg["listeners"]["ws"]["type"] == "ws"
    assert list(cfg["plugins"]) == ["cwsnet.broker.CwsAccessPlugin"]  # no $SYS, no packet logger


@pytest.mark.parametrize(("doc", "problem"), [
    ({"users": {"a/b": {"token_sha256": "00" * 32}}}, "username"),
    ({"users": {"x": {"token_sha256": "zz" * 32}}}, "token_sha256"),
    ({"users": {"x": {"token_sha256": "00" * 32, "publish": ["a/#/b"]}}}, "not a valid MQTT topic filter"),
    ({"users": {"x": {"token_sha256": "00" * 32, "publish": "a/#"}}}, "must be a list"),
    ({"users": {"x": {"token_sha256": "00" * 32, "subscribe": ["{user}/#"]}}}, "unknown placeholder"),
    ({"users": {}, "anonymous_rules": {"publish": ["{username}/#"]}}, "anonymous_rules"),
    ({"users": {}, "anonymous": "yes"}, "anonymous"),
    ({"users": {"x": {"token_sha256": "00" * 32, "client_ids": "x-*"}}}, "client_ids: must be a list"),
    ({"users": {"x": {"token_sha256": "00" * 32, "client_ids": ["a*b"]}}}, "only allowed at the end"),
    ({"users": {"x": {"token_sha256": "00" * 32, "client_ids": ["**"]}}}, "only allowed at the end"),
    ({"users": {"x": {"token_sha256": "00" * 32, "client_ids": [""]}}}, "empty client id pattern"),
    ({"users": {"x": {"token_sha256": "00" * 32, "client_ids": ["{user}-*"]}}}, "unknown placeholder"),
    ({"users": {}, "anonymous_rules": {"client_ids": ["{username}"]}}, "anonymous_rules.client_ids"),
    ([], "top level"),
])
def test_credentials_validation(tmp_path: Path, doc: Any, problem: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=problem) as exc:
        load_credentials(path)
    assert str(path) in str(exc.value)


def test_username_placeholder_and_hash_helper(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write_json_atomic(path, {"users": {"dev-9": {"token_sha256": hash_token("t"), **DEVICE_RULES}}})
    rules = load_credentials(path).users["dev-9"].rules
    assert rules.may_publish("cws/v1/home/dev-9/status") and not rules.may_publish("cws/v1/home/dev-1/status")
    assert rules.may_subscribe("cws/v1/home/dev-9/ack") and not rules.may_subscribe("cws/v1/home/+/ack")


# ------------------------------------------------------------------------------------------------
# Listeners and the command line
# ------------------------------------------------------------------------------------------------


def test_websocket_listener(brokers: Callable[..., RunningBroker], creds_file: Path,
                            clients: Callable[..., Client]) -> None:
    rb = brokers(creds_file, ws_port=free_port())
    ws = connected(clients, rb, "dev-1", transport="websockets", port=rb.settings.ws_port)
    assert ws.subscribe(("cws/v1/home/dev-1/ack", 1)) == [1]
    connected(clients, rb, "admin").publish("cws/v1/home/dev-1/ack", b"over-ws", qos=1)
    assert ws.wait_payload(b"over-ws")


def test_tls_listener(brokers: Callable[..., RunningBroker], creds_file: Path, tmp_path: Path,
                      clients: Callable[..., Client]) -> None:
    from cwsnet import pki

    ca = pki.ensure_ca(tmp_path / "ca")[0]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    pki.issue_server_cert(ca, cert, key, ["localhost", "127.0.0.1"])
    rb = brokers(creds_file, tls_port=free_port(), certfile=cert, keyfile=key)
    c = clients(rb, client_id="dev-1-tls", username="dev-1", password=TOKENS["dev-1"], port=rb.settings.tls_port)
    c.c.tls_set(ca_certs=str(ca.cert_path))
    assert c.connect()
    assert c.subscribe(("cws/v1/home/dev-1/ack", 1)) == [1]


def test_failed_start_closes_the_listeners_that_did_bind() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = free_port()

        async def start() -> None:
            with pytest.raises(BrokerError, match="address already in use"):
                settings = BrokerSettings(port=port, ws_port=blocker.getsockname()[1])
                await (Broker if USE_BASE else CwsBroker)(broker_config(settings)).start()  # DEFECT

        asyncio.run(start())
    with socket.socket() as again:  # SO_REUSEADDR never allows a second listener on Linux
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "cwsnet.broker", "--help"], capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert out.returncode == 0 and "--credentials" in out.stdout and "--tls-port" in out.stdout


@pytest.mark.integration
def test_cli_serves_until_sigterm(creds_file: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = ManagedProcess("cws-broker", [sys.executable, "-m", "cwsnet.broker", "--host", "127.0.0.1", "--port",
                                         str(port), "--credentials", creds_file], cwd=REPO,
                          log_path=tmp_path / "broker.log")
    try:
        proc.wait_port("127.0.0.1", port, timeout=15)
        target = SimpleNamespace(host="127.0.0.1", port=port)
        assert can_connect(target, "dev-1") and not can_connect(target, "dev-1", token="nope")
    finally:
        code = proc.terminate(timeout=10)
    assert code == 0, proc.log_tail()
    assert "stopping on signal" in proc.log_text()


def test_cli_refuses_public_host_without_credentials(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cwsnet.broker", "--host", "0.0.0.0", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2 and "without a credentials file" in out.stderr


@pytest.mark.skipif(USE_BASE, reason="CwsBroker's fix (defects 9 and 10)")
def test_a_connection_that_never_completes_its_connect_is_closed(brokers: Callable[..., RunningBroker],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CwsBroker, "CONNECT_TIMEOUT", 0.5)
    rb = brokers()
    silent = socket.create_connection((rb.host, rb.port), timeout=10)
    half = socket.create_connection((rb.host, rb.port), timeout=10)
    half.sendall(b"\x10\x20\x00\x04MQTT")  # a CONNECT announcing 32 bytes, then nothing more
    garbage = socket.create_connection((rb.host, rb.port), timeout=10)
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" * 4)  # not MQTT at all
    for sock in (silent, half, garbage):
        with sock:
            assert sock.recv(100) == b"", "the broker kept a connection that never sent a CONNECT"
    c = Client(rb, client_id="after")  # and it still serves
    assert c.connect()
    c.close()
