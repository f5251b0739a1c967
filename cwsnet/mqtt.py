"""``MqttLink``: the one MQTT client adapter every CWSNet daemon uses.

paho-mqtt 2.x (callback API v2, MQTT 3.1.1) driven by the asyncio event loop
instead of paho's own network thread -- the approach of paho's
``examples/loop_asyncio.py`` and aiomqtt:

* the blocking ``Client.connect()`` (DNS, TCP connect, TLS handshake, CONNECT
  write) runs in a thread executor, bounded by a timeout;
* after that the socket is registered with the loop: ``add_reader`` ->
  ``loop_read()``, ``add_writer`` -> ``loop_write()`` while paho has bytes
  queued (``on_socket_register_write`` / ``on_socket_unregister_write``), and a
  1 s periodic task calls ``loop_misc()`` (keepalive pings, dead-link detection);
* every paho callback therefore runs on the event-loop thread.

Design decisions worth knowing:

* **A fresh paho ``Client`` per connection attempt.**  paho keeps unacknowledged
  outgoing QoS>0 messages inside the ``Client`` and re-sends them (DUP) when the
  same object reconnects.  ``publish()`` instead reports a lost connection to its
  caller (``LinkDown``), who owns the retry (typically an outbox), so re-using the
  object would publish twice behind the caller's back.  A fresh object also
  gives each connection a fresh will (``will_factory``) and a clean packet state.
* **Desired-state subscriptions.**  ``subscribe()`` records the filter; all
  filters are re-made on every CONNACK and their SUBACK awaited before
  ``connected`` is set and ``on_connect`` is awaited.
* **Ordered message handling.**  paho's ``on_message`` only enqueues; one
  consumer task (owned by ``run()``) awaits the handler for one message at a
  time, in arrival order.  With ``manual_ack=True`` the QoS 1 PUBACK is sent only
  by :meth:`MqttLink.ack`; an ack for a message delivered on an earlier
  (now dead) connection is ignored -- the broker will redeliver it.
* **Bounded incoming queue, back-pressure by not reading.**  When the queue
  holds ``max_queue`` messages the socket's reader is removed from the loop, so
  the kernel's receive buffer fills, TCP's window closes and the broker stops
  sending (with QoS 1/2 its in-flight window fills first); nothing is dropped or
  reordered.  Reading resumes when the handler has drained the queue below
  ``max(1, max_queue // 2)``, or at the next 1 s tick if there is any room
  at all -- so a pause lasts at most about one handler call plus a second while
  the handler makes progress, and acknowledgements (PUBACK of our own publishes,
  SUBACK, PINGRESP), which queue up in the TCP stream behind the unread
  messages, keep trickling in.  See :class:`MqttLink` for the exact bound and
  for what keepalive does during a pause.

All public methods must be called from the event-loop thread that runs ``run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "AuthRefused",
    "ConnectRefused",
    "LinkDown",
    "LinkError",
    "Message",
    "MqttLink",
    "PublishTimeout",
    "Will",
]

_log = logging.getLogger("cwsnet.mqtt")

#: a connection that stayed up this long resets the reconnect backoff
_STABLE_AFTER = 5.0
#: cadence of paho's ``loop_misc()`` (keepalive / dead-link detection)
_MISC_INTERVAL = 1.0
#: CONNACK reason codes (MQTT 5 numbering, which paho v2 uses for 3.1.1 too) meaning "credentials"
_AUTH_REFUSED_CODES = {4, 5, 134, 135}
#: recv() flags that look at the next unread byte without consuming it or blocking
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


# ---------------------------------------------------------------------------------------------
# public data types and errors


@dataclass
class Will:
    """Last-will message the broker publishes if the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class Message:
    """An incoming message, as passed to ``on_message`` handlers."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    #: the broker flagged it as a possible redelivery
    dup: bool = False
    #: number of the connection that delivered it (``ack()`` ignores messages from dead connections)
    connection: int = field(default=0, repr=False, compare=False)


class LinkError(Exception):
    """Base class of MqttLink errors; paho error codes are translated into these."""


class LinkDown(LinkError):
    """Not connected, or the connection was lost before the operation completed."""


class PublishTimeout(LinkError, TimeoutError):
    """A QoS>0 publish was not acknowledged within its timeout (connection still up)."""


class ConnectRefused(LinkError):
    """The broker answered CONNECT with a refusal (CONNACK return code != 0)."""

    def __init__(self, message: str, reason: ReasonCode | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class AuthRefused(ConnectRefused):
    """CONNACK refused for bad credentials / not authorised.  ``run()`` raises it (no retry)."""


def _translate(rc: MQTTErrorCode | int, context: str) -> LinkError:
    """Turn a paho ``MQTTErrorCode`` into one of our exceptions."""
    text = paho.error_string(rc)
    if rc in (
        MQTTErrorCode.MQTT_ERR_NO_CONN,
        MQTTErrorCode.MQTT_ERR_CONN_LOST,
        MQTTErrorCode.MQTT_ERR_CONN_REFUSED,
        MQTTErrorCode.MQTT_ERR_KEEPALIVE,
    ):
        return LinkDown(f"{context}: {text}")
    return LinkError(f"{context}: {text} (rc={int(rc)})")


# ---------------------------------------------------------------------------------------------
# per-connection state


class _Attempt:
    """Hand-over between the executor thread running ``connect()`` and the loop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False  # the loop gave up waiting (timeout / cancel)
        self.finished = False  # the thread returned a connected socket to the loop


class _Connection:
    """One paho ``Client`` and one TCP connection (never reused)."""

    def __init__(self, number: int, client: paho.Client, loop: asyncio.AbstractEventLoop) -> None:
        self.number = number
        self.client = client
        self.fd: int | None = None  # registered with the loop while not None
        self.sock: Any = None
        self.attached = False
        self.connack_ok = False  # CONNACK accepted (subscribe() may send directly from now on)
        self.up = False  # CONNACK ok and subscriptions made
        self.up_since = 0.0
        self.finalized = False
        self.connack: asyncio.Future[tuple[ReasonCode, bool] | None] = loop.create_future()
        self.closed = asyncio.Event()
        self.close_reason = ""  # our own / paho error-code explanation
        self.paho_reason = ""  # reason code paho passed to on_disconnect
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.subacks: dict[int, tuple[list[tuple[str, int]], asyncio.Future[list[ReasonCode]] | None]] = {}
        self.paused = False  # reader removed from the loop because the incoming queue is full
        self.pauses = 0  # how often reading was paused on this connection


# ---------------------------------------------------------------------------------------------


class MqttLink:
    """A self-healing MQTT 3.1.1 connection driven by asyncio.

    Typical use::

        link = MqttLink(client_id="gw-1", host="127.0.0.1", port=1883, on_message=handle)
        link.subscribe("site/+/up/#")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run())          # reconnects by itself until cancelled
            await link.connected.wait()
            await link.publish("site/gw-1/status", b"online", retain=True)
            ...
            await link.disconnect()             # clean DISCONNECT; run() returns

    Extra keyword arguments beyond the core API: ``clean_session`` (default True; use
    False with ``manual_ack`` so unacknowledged messages survive a reconnect),
    ``connect_timeout`` (bound for each connect phase: TCP+TLS, CONNACK, SUBACK; default
    10 s), ``max_inflight`` (paho's limit of unacknowledged outgoing QoS>0 messages) and
    ``max_queue`` (incoming messages buffered for the handler; default 1000).

    **Incoming queue bound.**  Reading stops when the queue reaches ``max_queue``, but
    one paho ``loop_read()`` call reads up to ``max(1, P)`` packets, where ``P`` is the
    number of unfinished QoS>0 messages paho holds when the call starts: our own QoS 1/2
    publishes not yet acknowledged (every :meth:`publish` still awaiting its PUBACK or
    PUBCOMP, including those paho holds back beyond ``max_inflight``) plus incoming QoS 2
    messages between PUBREC and PUBREL.  Each packet delivers at most one message and a
    call only starts while the queue holds fewer than ``max_queue``, so the queue never
    holds more than ``max_queue - 1 + max(1, P)`` messages: exactly ``max_queue`` on a
    link that is not publishing QoS>0 and receives QoS 0/1 (``stats["queue_high_water"]``
    records the largest size seen, ``stats["read_pauses"]`` how often reading stopped).
    While the queue holds ``max(1, max_queue // 2)`` or more messages a lost connection is not
    re-established (``connected`` stays clear, :meth:`publish` raises ``LinkDown``); the
    messages already queued are still all delivered.

    **During a pause** nothing is read, so replies wait in the TCP stream behind the
    unread messages: a :meth:`publish` may run into its ``timeout`` (``PublishTimeout``;
    the message may still have reached the broker -- retry as for any timeout), and a
    handler that awaits :meth:`publish` on its own link while the queue is full usually
    does (its PUBACK is behind messages that cannot be read before the handler returns;
    publish from another task instead).  The SUBACK wait while connecting is extended for
    as long as reading is paused.

    **Keepalive during a pause.**  The 1 s tick still calls paho's ``loop_misc()``, which
    sends PINGREQs as usual, so the broker sees a live client.  paho also drops the
    connection when no PINGRESP was read within one keepalive period of a PINGREQ; but a
    PINGRESP may be waiting behind messages we deliberately leave unread.  So while bytes
    from the broker are waiting unread in the socket (peeked, not consumed), an outstanding
    ping is forgotten before ``loop_misc()`` and paho pings again one keepalive period
    later.  A long pause -- a handler stuck on one message for minutes, or a QoS 0 backlog
    whose PINGRESP sits behind thousands of unread messages -- therefore does not make paho
    drop a healthy connection.  A broker that stops answering with nothing left unread is
    still detected within about one keepalive period; one that closed the connection,
    within about two (our next PINGREQ draws a reset).  A half-open connection with unread
    data is detected when reading resumes, or when the kernel gives up retransmitting our
    PINGREQs.  (This resets paho 2.2's private ``_ping_t``; paho-mqtt is pinned.)

    Known limits: with ``manual_ack`` a message whose handler raised stays unacknowledged
    and occupies one of the broker's in-flight slots until the next reconnect redelivers
    it.  The queue bound counts messages, not bytes.
    """

    def __init__(
        self,
        *,
        client_id: str,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = 30,
        will_factory: Callable[[], Will | None] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
        on_message: Callable[[Message], Awaitable[None]] | None = None,
        manual_ack: bool = False,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        name: str = "mqtt",
        clean_session: bool = True,
        connect_timeout: float = 10.0,
        max_inflight: int = 20,
        max_queue: int = 1000,
    ) -> None:
        if not client_id:
            raise ValueError("client_id is required")
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise ValueError("max_queue must be an integer >= 1")
        if backoff_min <= 0 or backoff_max < backoff_min:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        if keepalive < 0:
            raise ValueError("keepalive must be >= 0")
        self.client_id = client_id
        self.host = host
        self.port = port
        self.name = name
        self._username = username
        self._password = password
        self._tls = tls
        self._keepalive = keepalive
        self._will_factory = will_factory
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_message = on_message
        self._manual_ack = manual_ack
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._clean_session = clean_session
        self._connect_timeout = connect_timeout
        self._max_inflight = max_inflight
        self._max_queue = max_queue
        #: reading resumes (and reconnecting is allowed) when the queue holds fewer than this
        self._resume_below = max(1, max_queue // 2)
        self._log = logging.getLogger(f"cwsnet.mqtt.{name}")

        #: set while connected (CONNACK ok and subscriptions re-made)
        self.connected = asyncio.Event()
        #: counters: connects, disconnects, published, received, last_error, connect_failures,
        #: handler_errors; read_pauses (reading stopped because the queue was full) and
        #: queue_high_water (largest incoming queue size seen)
        self.stats: dict[str, Any] = {
            "connects": 0,
            "disconnects": 0,
            "published": 0,
            "received": 0,
            "last_error": None,
            "connect_failures": 0,
            "handler_errors": 0,
            "read_pauses": 0,
            "queue_high_water": 0,
        }
        self._subs: dict[str, int] = {}
        self._conn: _Connection | None = None
        self._conn_counter = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Message] | None = None
        self._room: asyncio.Event | None = None  # set while the queue holds fewer than _resume_below
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self._running = False

    # -- small helpers -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_connected(self) -> bool:
        """True while a connection is up and usable (``connected`` can lag by one loop step)."""
        conn = self._conn
        return conn is not None and conn.up and self._usable(conn)

    @staticmethod
    def _usable(conn: _Connection | None) -> bool:
        return conn is not None and not conn.finalized and conn.fd is not None and not conn.closed.is_set()

    @staticmethod
    def _reason(conn: _Connection) -> str:
        return conn.close_reason or conn.paho_reason or "closed"

    def _set_error(self, text: str) -> None:
        self.stats["last_error"] = text

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter: uniform(0, min(max, min * 2**attempt))."""
        cap = min(self._backoff_max, self._backoff_min * (2 ** min(attempt, 30)))
        return random.uniform(0.0, cap)

    # -- public API ----------------------------------------------------------------------------

    def set_credentials(self, username: str | None, password: str | None) -> None:
        """Log in with these from the next connection on (a rotated token); the current one stays."""
        self._username, self._password = username, password

    @property
    def password(self) -> str | None:
        """The password the next connection logs in with."""
        return self._password

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Add ``topic_filter`` to the desired subscriptions (re-made on every CONNACK).

        If currently connected the SUBSCRIBE is also sent right away; a refusal is logged.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid qos {qos}")
        if not topic_filter:
            raise ValueError("empty topic filter")
        self._subs[topic_filter] = qos
        conn = self._conn
        if conn is not None and conn.connack_ok and self._usable(conn):
            rc, mid = conn.client.subscribe(topic_filter, qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                conn.subacks[mid] = ([(topic_filter, qos)], None)
            else:
                self._log.warning("subscribe %r on %s failed now (%s); will retry on reconnect",
                                  topic_filter, self.endpoint, paho.error_string(rc))

    def unsubscribe(self, topic_filter: str) -> None:
        """Remove ``topic_filter`` from the desired subscriptions (and UNSUBSCRIBE if connected)."""
        self._subs.pop(topic_filter, None)
        conn = self._conn
        if conn is not None and conn.connack_ok and self._usable(conn):
            conn.client.unsubscribe(topic_filter)

    @property
    def subscriptions(self) -> dict[str, int]:
        """The desired subscriptions (filter -> qos)."""
        return dict(self._subs)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 10.0,  # noqa: ASYNC109 - per-publish PUBACK deadline is part of the API
    ) -> None:
        """Publish one message.

        QoS 0 returns once queued on the socket.  QoS 1/2 return when the broker
        acknowledged (PUBACK / PUBCOMP).  Raises :class:`LinkDown` if not connected or if the
        connection is lost before the acknowledgement (the message may or may not have
        reached the broker: at-least-once callers retry), :class:`PublishTimeout` if the
        acknowledgement does not arrive within ``timeout`` s.  Nothing is re-sent by the
        link itself after a reconnect.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"invalid qos {qos}")
        conn = self._conn
        if conn is None or not conn.up or not self._usable(conn):
            raise LinkDown(f"{self.name}: not connected to {self.endpoint}")
        info = conn.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise _translate(info.rc, f"publish to {topic!r}")
        if qos == 0:
            self.stats["published"] += 1
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        conn.pending[info.mid] = fut
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is not None:
                raise fut.exception() from None  # type: ignore[misc]
            raise PublishTimeout(
                f"{self.name}: no acknowledgement from {self.endpoint} for {topic!r} (mid {info.mid}) "
                f"within {timeout}s"
            ) from None
        finally:
            conn.pending.pop(info.mid, None)
        self.stats["published"] += 1

    def ack(self, msg: Message) -> None:
        """Acknowledge ``msg`` (only with ``manual_ack=True``; a no-op otherwise and for QoS 0).

        Sends the PUBACK (QoS 1) / PUBCOMP (QoS 2) for it.  If the connection that delivered
        it is gone, nothing is sent: the broker redelivers it on a persistent session.
        """
        if not self._manual_ack or msg.qos == 0:
            return
        conn = self._conn
        if conn is None or conn.number != msg.connection or not self._usable(conn):
            self._log.debug("ack for mid %d from connection %d ignored: that connection is gone",
                            msg.mid, msg.connection)
            return
        rc = conn.client.ack(msg.mid, msg.qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._log.debug("ack for mid %d failed: %s", msg.mid, paho.error_string(rc))

    async def disconnect(self, *, send_will: bool = False, grace: float = 5.0) -> None:
        """Stop the link: close the connection and make ``run()`` return instead of reconnecting.

        ``send_will=False`` sends a clean DISCONNECT (the broker discards the will);
        ``send_will=True`` drops the TCP connection without one, so the broker publishes
        the will (simulates a crash).
        """
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()
        conn = self._conn
        if conn is None or conn.finalized:
            return
        if send_will or not conn.up:
            self._force_close(conn, "disconnect(send_will=True)" if send_will else "disconnect() while connecting")
        else:
            await self._graceful_close(conn, grace)

    async def run(self) -> None:
        """The connection loop; runs until cancelled (or :meth:`disconnect`).

        Connects, re-subscribes, serves; on loss backs off (exponential, full jitter) and
        reconnects.  On cancellation it sends a clean DISCONNECT (so no will) and re-raises
        ``CancelledError``.  Raises :class:`AuthRefused` if the broker rejects the credentials.
        """
        if self._running:
            raise RuntimeError(f"{self.name}: run() is already running")
        self._running = True
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self._stop_event = asyncio.Event()
        fatal: LinkError | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                consumer = tg.create_task(self._consume(), name=f"{self.name}-messages")
                misc = tg.create_task(self._misc_loop(), name=f"{self.name}-loop-misc")
                try:
                    await self._connection_loop()
                except LinkError as exc:
                    fatal = exc
                finally:
                    consumer.cancel()
                    misc.cancel()
        finally:
            self._running = False
            self.connected.clear()
            self._conn = None
        if fatal is not None:
            raise fatal

    # -- connection loop -----------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        assert self._loop is not None and self._stop_event is not None
        attempt = 0
        while not self._stopping:
            if not await self._wait_for_room():
                break
            conn = self._new_connection()
            self._conn = conn
            failure: str | None = None
            try:
                self._log.info("connecting to %s as %r (attempt %d)", self.endpoint, self.client_id, attempt + 1)
                await self._establish(conn)
                conn.up = True
                conn.up_since = self._loop.time()
                self.stats["connects"] += 1
                self.connected.set()
                self._log.info("connected to %s as %r (connection #%d)", self.endpoint, self.client_id, conn.number)
                await self._call_user(self._on_connect, "on_connect")
                await conn.closed.wait()
                if not self._stopping:
                    failure = f"connection lost: {self._reason(conn)}"
                    self._log.warning("connection to %s lost: %s", self.endpoint, self._reason(conn))
            except asyncio.CancelledError:
                await self._graceful_close(conn, 2.0)
                await self._finalize(conn)
                raise
            except AuthRefused as exc:
                self.stats["connect_failures"] += 1
                self._set_error(str(exc))
                self._log.error("%s", exc)
                self._force_close(conn, "auth refused")
                await self._finalize(conn)
                raise
            except (LinkError, OSError, TimeoutError, ssl.SSLError) as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if not conn.up:
                    self.stats["connect_failures"] += 1
                    if not self._stopping:
                        self._log.warning("connect to %s failed: %s", self.endpoint, failure)
                else:
                    self._log.warning("connection to %s failed: %s", self.endpoint, failure)
            except Exception as exc:  # noqa: BLE001 - unexpected: log loudly, keep the link alive
                failure = f"{type(exc).__name__}: {exc}"
                if not conn.up:
                    self.stats["connect_failures"] += 1
                self._log.exception("unexpected error on link to %s", self.endpoint)
            self._force_close(conn, failure or "closing")
            was_stable = conn.up and self._loop.time() - conn.up_since >= min(_STABLE_AFTER, self._backoff_max)
            await self._finalize(conn)
            if failure is not None:
                self._set_error(failure)
            if self._stopping:
                break
            attempt = 0 if was_stable else attempt + 1
            delay = self._backoff(attempt - 1 if attempt else 0)
            self._log.info("reconnecting to %s in %.2fs", self.endpoint, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_event.wait()
        self._log.info("link to %s stopped", self.endpoint)

    async def _wait_for_room(self) -> bool:
        """Before connecting: wait while the incoming queue is too full to read; False if stopping.

        A new connection must read its CONNACK (and SUBACK), after which a persistent session's
        backlog may arrive at once; connecting while the handler is far behind would only
        overfill the queue or stall in the handshake.
        """
        assert self._room is not None and self._stop_event is not None and self._queue is not None
        if self._room.is_set():
            return not self._stopping
        self._log.warning("incoming queue holds %d messages (max_queue %d): not connecting to %s until "
                          "the handler has taken it below %d", self._queue.qsize(), self._max_queue,
                          self.endpoint, self._resume_below)
        room = asyncio.ensure_future(self._room.wait())
        stop = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({room, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()
            stop.cancel()
        return not self._stopping

    def _new_connection(self) -> _Connection:
        """Build a fresh paho client (no I/O) with credentials, TLS and a fresh will."""
        assert self._loop is not None
        self._conn_counter += 1
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=self._clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.connect_timeout = self._connect_timeout
        client.max_inflight_messages_set(self._max_inflight)
        client.manual_ack_set(self._manual_ack)
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        if self._will_factory is not None:
            try:
                will = self._will_factory()
            except Exception as exc:  # noqa: BLE001 - e.g. the disk is full: connect without a will
                self._log.warning("connecting without a last will: building it failed (%s: %s)",
                                  type(exc).__name__, exc)
                will = None
            if will is not None:
                client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if self._log.isEnabledFor(logging.DEBUG):
            client.on_log = lambda _c, _u, _level, buf: self._log.debug("paho: %s", buf)
        return _Connection(self._conn_counter, client, self._loop)

    async def _establish(self, conn: _Connection) -> None:
        """TCP/TLS connect in a thread, attach to the loop, await CONNACK, re-subscribe."""
        assert self._loop is not None
        loop = self._loop
        client = conn.client
        attempt = _Attempt()

        def blocking_connect() -> MQTTErrorCode:
            rc = client.connect(self.host, self.port, keepalive=self._keepalive)
            with attempt.lock:
                if attempt.abandoned:
                    _discard_unattached(client)
                else:
                    attempt.finished = True
            return rc

        try:
            async with asyncio.timeout(self._connect_timeout + 1.0):
                rc = await loop.run_in_executor(None, blocking_connect)
        except BaseException:
            with attempt.lock:
                attempt.abandoned = True
                finished = attempt.finished
            if finished:  # the thread connected just as we gave up
                _discard_unattached(client)
            raise
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
            _discard_unattached(client)
            raise _translate(rc, f"connect to {self.endpoint}")
        self._attach(conn)

        # CONNACK
        try:
            async with asyncio.timeout(self._connect_timeout):
                result = await conn.connack
        except TimeoutError:
            raise LinkDown(f"no CONNACK from {self.endpoint} within {self._connect_timeout}s") from None
        if result is None:
            raise LinkDown(f"connection to {self.endpoint} closed before CONNACK ({self._reason(conn)})")
        reason, session_present = result
        if reason.is_failure:
            conn.close_reason = f"CONNACK refused: {reason}"
            who = f"user {self._username!r}" if self._username is not None else "anonymous client"
            if reason.value in _AUTH_REFUSED_CODES:
                raise AuthRefused(f"{self.endpoint} refused {who} ({self.client_id!r}): {reason}", reason)
            raise ConnectRefused(f"{self.endpoint} refused connection for {self.client_id!r}: {reason}", reason)
        self._log.debug("CONNACK from %s (session present: %s)", self.endpoint, session_present)
        conn.connack_ok = True  # from here on subscribe() sends directly; snapshot the rest now

        # subscriptions
        if self._subs:
            topics = list(self._subs.items())
            rc, mid = client.subscribe(topics)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise _translate(rc, f"subscribe on {self.endpoint}")
            fut: asyncio.Future[list[ReasonCode]] = loop.create_future()
            conn.subacks[mid] = (topics, fut)
            try:
                codes = await self._await_reply(conn, fut, "SUBACK")
            finally:
                conn.subacks.pop(mid, None)
            self._log_suback(topics, codes)

    async def _await_reply(self, conn: _Connection, fut: asyncio.Future[Any], what: str) -> Any:
        """Await a broker reply with ``connect_timeout``, restarting the clock while reading is paused:
        the reply may be waiting in the TCP stream behind messages we chose not to read yet."""
        while True:
            pauses = conn.pauses
            try:
                async with asyncio.timeout(self._connect_timeout):
                    return await asyncio.shield(fut)
            except TimeoutError:
                if conn.paused or conn.pauses != pauses:
                    self._log.info("still waiting for %s from %s: reading is paused (incoming queue full)",
                                   what, self.endpoint)
                    continue
                raise LinkDown(f"no {what} from {self.endpoint} within {self._connect_timeout}s") from None

    def _attach(self, conn: _Connection) -> None:
        """Register the connected socket and paho callbacks with the event loop."""
        assert self._loop is not None
        loop = self._loop
        client = conn.client
        sock = client.socket()
        assert sock is not None
        conn.sock = sock
        conn.fd = sock.fileno()

        def on_socket_close(_c: paho.Client, _u: Any, _s: Any) -> None:
            self._unregister(conn)  # before paho closes the fd
            self._mark_closed(conn, "")

        def on_register_write(_c: paho.Client, _u: Any, _s: Any) -> None:
            if conn.fd is not None and not conn.finalized:
                loop.add_writer(conn.fd, self._on_writable, conn)

        def on_unregister_write(_c: paho.Client, _u: Any, _s: Any) -> None:
            if conn.fd is not None:
                loop.remove_writer(conn.fd)

        def on_connect(_c: paho.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
            if not conn.connack.done():
                conn.connack.set_result((reason, bool(getattr(flags, "session_present", False))))

        def on_disconnect(_c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
            conn.paho_reason = str(reason)
            self._mark_closed(conn, "")

        def on_message(_c: paho.Client, _u: Any, m: paho.MQTTMessage) -> None:
            self._enqueue(conn, m)

        def on_publish(_c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
            fut = conn.pending.get(mid)
            if fut is None or fut.done():
                return
            if reason.is_failure:
                fut.set_exception(LinkError(f"broker rejected publish (mid {mid}): {reason}"))
            else:
                fut.set_result(None)

        def on_subscribe(_c: paho.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
            entry = conn.subacks.get(mid)
            if entry is None:
                return
            topics, fut = entry
            if fut is None:
                conn.subacks.pop(mid, None)
                self._log_suback(topics, codes)
            elif not fut.done():
                fut.set_result(codes)

        client.on_socket_close = on_socket_close
        client.on_socket_register_write = on_register_write
        client.on_socket_unregister_write = on_unregister_write
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.on_publish = on_publish
        client.on_subscribe = on_subscribe
        loop.add_reader(conn.fd, self._on_readable, conn)
        if client.want_write():  # CONNECT could not be written in one go
            loop.add_writer(conn.fd, self._on_writable, conn)
        conn.attached = True

    def _log_suback(self, topics: list[tuple[str, int]], codes: list[ReasonCode]) -> None:
        for (topic, qos), code in zip(topics, codes, strict=False):
            if code.is_failure:
                self._log.warning("broker %s refused subscription %r (qos %d): %s", self.endpoint, topic, qos, code)
            else:
                self._log.debug("subscribed %r (granted qos %s)", topic, code.value)

    # -- loop callbacks ------------------------------------------------------------------------

    def _on_readable(self, conn: _Connection) -> None:
        if conn.paused:  # a call scheduled by _resume_reading, overtaken by a new pause
            return
        client = conn.client
        try:
            rc = client.loop_read()
            # TLS: decrypted bytes may sit in the SSL object where the selector cannot see them
            # (_resume_reading picks them up again if a pause interrupts this loop)
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and conn.fd is not None and not conn.paused:
                sock = client.socket()
                if sock is None or not hasattr(sock, "pending") or not sock.pending():
                    break
                rc = client.loop_read()
        except Exception as exc:  # noqa: BLE001 - a broken socket must not kill the loop
            self._force_close(conn, f"read failed: {type(exc).__name__}: {exc}")
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not conn.close_reason:
            conn.close_reason = paho.error_string(rc)
        if client.socket() is None:
            self._mark_closed(conn, "")

    def _on_writable(self, conn: _Connection) -> None:
        client = conn.client
        try:
            rc = client.loop_write()
        except Exception as exc:  # noqa: BLE001
            self._force_close(conn, f"write failed: {type(exc).__name__}: {exc}")
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not conn.close_reason:
            conn.close_reason = paho.error_string(rc)
        if conn.fd is not None and not client.want_write() and self._loop is not None:
            self._loop.remove_writer(conn.fd)

    def _enqueue(self, conn: _Connection, m: paho.MQTTMessage) -> None:
        try:
            topic = m.topic
        except UnicodeDecodeError:
            self._log.warning("dropping message with non-UTF-8 topic %r", bytes(m._topic))
            if self._manual_ack and m.qos > 0:
                conn.client.ack(m.mid, m.qos)
            return
        self.stats["received"] += 1
        msg = Message(
            topic=topic,
            payload=bytes(m.payload),
            qos=m.qos,
            retain=bool(m.retain),
            mid=m.mid,
            dup=bool(m.dup),
            connection=conn.number,
        )
        assert self._queue is not None and self._room is not None
        self._queue.put_nowait(msg)
        size = self._queue.qsize()
        if size > self.stats["queue_high_water"]:
            self.stats["queue_high_water"] = size
        if size >= self._resume_below:
            self._room.clear()
        if size >= self._max_queue:
            self._pause_reading(conn)

    # -- back-pressure -------------------------------------------------------------------------

    def _pause_reading(self, conn: _Connection) -> None:
        """Stop reading the socket (the queue is full): TCP flow control then holds the broker back."""
        if conn.paused or conn.fd is None or conn.finalized or self._loop is None:
            return
        self._loop.remove_reader(conn.fd)
        conn.paused = True
        conn.pauses += 1
        self.stats["read_pauses"] += 1
        if conn.pauses == 1 or conn.pauses % 100 == 0:
            self._log.info("incoming queue full (%d messages): reading from %s paused (%d time(s) on this "
                           "connection); the handler is slower than the broker", self._max_queue, self.endpoint,
                           conn.pauses)

    def _resume_reading(self, conn: _Connection) -> None:
        if not conn.paused:
            return
        conn.paused = False
        if conn.fd is None or conn.finalized or self._loop is None:
            return
        self._loop.add_reader(conn.fd, self._on_readable, conn)
        # decrypted TLS bytes left in the SSL object by an interrupted read are invisible to the selector
        pending = getattr(conn.sock, "pending", None)
        if pending is not None:
            with contextlib.suppress(Exception):
                if pending() > 0:
                    self._loop.call_soon(self._on_readable, conn)

    def _after_dequeue(self) -> None:
        """The handler took a message: resume reading (and reconnecting) once below the low mark."""
        assert self._queue is not None and self._room is not None
        if self._queue.qsize() < self._resume_below:
            self._room.set()
            conn = self._conn
            if conn is not None and conn.paused:
                self._resume_reading(conn)

    @staticmethod
    def _unread_bytes(conn: _Connection) -> bool:
        """True if the broker sent bytes we have not read yet (peeked, never consumed; EOF is False)."""
        sock = conn.sock
        if sock is None or conn.fd is None:
            return False
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes already in the SSL object
        if pending is not None:
            with contextlib.suppress(Exception):
                if pending() > 0:
                    return True
        try:
            # the plain socket's recv() on the raw fd, also for an SSLSocket (whose own recv()
            # refuses flags): peeking at encrypted bytes leaves the TLS state untouched
            return bool(socket.socket.recv(sock, 1, _PEEK_FLAGS))
        except (OSError, TypeError, ValueError):  # nothing there yet (EAGAIN), or a broken socket
            return False

    def _keepalive_relief(self, conn: _Connection) -> None:
        """Before ``loop_misc()``: forget an outstanding PINGREQ while unread bytes are waiting.

        paho drops the connection when no PINGRESP was read within one keepalive period of its
        PINGREQ.  A PINGRESP queued behind messages we deliberately leave unread (back-pressure)
        is not a dead link: bytes waiting in the socket prove the broker is talking to us.  paho
        then pings again one keepalive period after the last one, so the broker still sees us
        alive, and if the broker stops answering with nothing left unread, paho's own deadline
        applies again.
        """
        client = conn.client
        ping_sent = getattr(client, "_ping_t", 0)  # paho 2.2 internal: when the unanswered PINGREQ went out
        if isinstance(ping_sent, (int, float)) and ping_sent > 0 and self._unread_bytes(conn):
            client._ping_t = 0

    async def _consume(self) -> None:
        """Feed queued messages to the handler, one at a time, in order."""
        assert self._queue is not None
        queue = self._queue
        while True:
            msg = await queue.get()
            self._after_dequeue()
            if self._on_message is None:
                self.ack(msg)
                continue
            try:
                await self._on_message(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats["handler_errors"] += 1
                self._log.exception(
                    "on_message handler failed for topic %r (%d bytes)%s",
                    msg.topic, len(msg.payload),
                    "; not acknowledged, the broker will redeliver it" if self._manual_ack and msg.qos else "",
                )

    async def _misc_loop(self) -> None:
        """Every second: paho's ``loop_misc()`` (keepalive pings, dead-link detection) and a resume
        of paused reading if the queue has room."""
        while True:
            await asyncio.sleep(_MISC_INTERVAL)
            conn = self._conn
            if conn is None or not conn.attached or conn.finalized or conn.fd is None:
                continue
            try:
                self._keepalive_relief(conn)
                rc = conn.client.loop_misc()
            except Exception as exc:  # noqa: BLE001
                self._force_close(conn, f"loop_misc failed: {type(exc).__name__}: {exc}")
                continue
            if rc == MQTTErrorCode.MQTT_ERR_CONN_LOST and not conn.close_reason:
                conn.close_reason = "keepalive timeout (no PINGRESP)"
            if conn.client.socket() is None:
                self._mark_closed(conn, "keepalive timeout")
                continue
            # paused but the handler made room since: read again now rather than only at the low
            # mark, so replies queued behind the unread messages keep coming in
            assert self._queue is not None
            if conn.paused and self._queue.qsize() < self._max_queue:
                self._resume_reading(conn)

    # -- closing -------------------------------------------------------------------------------

    def _unregister(self, conn: _Connection) -> None:
        fd, conn.fd = conn.fd, None
        if fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)

    def _mark_closed(self, conn: _Connection, reason: str) -> None:
        if reason and not conn.close_reason:
            conn.close_reason = reason
        if not conn.connack.done():
            conn.connack.set_result(None)
        for _topics, fut in list(conn.subacks.values()):
            if fut is not None and not fut.done():
                fut.set_exception(LinkDown(f"connection to {self.endpoint} closed before SUBACK"))
                fut.exception()  # mark retrieved (the awaiting side may be gone)
        for fut in list(conn.pending.values()):
            if not fut.done():
                fut.set_exception(LinkDown(f"connection to {self.endpoint} lost before acknowledgement"))
                fut.exception()
        conn.closed.set()

    def _force_close(self, conn: _Connection, reason: str) -> None:
        """Drop the TCP connection without DISCONNECT (the broker publishes the will)."""
        self._unregister(conn)
        sock = conn.sock if conn.sock is not None else conn.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._mark_closed(conn, reason)

    async def _graceful_close(self, conn: _Connection, grace: float) -> None:
        """Send DISCONNECT (no will), wait briefly for paho to close the socket, then force it."""
        client = conn.client
        if conn.attached and conn.fd is not None and not conn.finalized:
            if not conn.close_reason:
                conn.close_reason = "disconnected by us"
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_write()  # usually writes DISCONNECT and closes the socket right here
            if conn.fd is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await conn.closed.wait()
        self._force_close(conn, "disconnected by us")

    async def _finalize(self, conn: _Connection) -> None:
        """Once per connection: detach from paho, clear ``connected``, tell the application."""
        if conn.finalized:
            return
        conn.finalized = True
        self._mark_closed(conn, "")
        client = conn.client
        for attr in ("on_socket_close", "on_socket_register_write", "on_socket_unregister_write",
                     "on_connect", "on_disconnect", "on_message", "on_publish", "on_subscribe", "on_log"):
            setattr(client, attr, None)
        if self._conn is conn:
            self._conn = None
        if conn.up:
            self.connected.clear()
            self.stats["disconnects"] += 1
            await self._call_user(self._on_disconnect, "on_disconnect")

    async def _call_user(self, cb: Callable[[], Awaitable[None]] | None, what: str) -> None:
        if cb is None:
            return
        try:
            await cb()
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("%s handler failed", what)


def _discard_unattached(client: paho.Client) -> None:
    """Close a connection the loop never took over, saying DISCONNECT so no will is published.

    No socket callbacks are set yet, so paho writes the DISCONNECT synchronously.
    """
    sock = client.socket()
    if sock is None:
        return
    with contextlib.suppress(Exception):
        client.disconnect()
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
