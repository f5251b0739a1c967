"""A small MQTT 3.1.1 client for the firmware, on asyncio streams (in the spirit of mqtt_as).

What CWSNet needs and nothing more: CONNECT with a last will and credentials, QoS 0/1 PUBLISH
both ways, SUBSCRIBE, keepalive PINGREQ, and a connection that is declared dead (``down`` is
set) when the broker has not answered for 1.5 keepalive periods or a write has not drained for
``timeout_ms``, so the agent reconnects. Every step of a connect (TCP, the TLS handshake that
MicroPython runs on the first write, CONNECT/CONNACK) is bounded by ``timeout_ms`` together.

A QoS 1 publish someone awaits is retransmitted with the DUP flag until PUBACKed while the
connection lasts. ``publish(..., wait=False)`` sends at QoS 1 and does not track the PUBACK: the
agent uses it for buffered messages, whose delivery is its custody window's business (the flash
buffer and the gateway's custody acks, docs/protocol.md §5), so no second copy piles up here;
that is also why the session is always clean.

A packet longer than ``max_packet`` (a device's heap is small) is read through in small pieces and
discarded without ending the session; ``on_oversize(topic, size)`` is told.

The network sits behind one function, ``open_stream(host, port, ssl_ctx) -> (reader, writer)``
(asyncio's ``open_connection`` by default), so tests can feed the client any byte stream.

    c = MQTTClient("dev-1", "gw.local", 8883, user="dev-1", password=token, ssl_ctx=ctx,
                   on_message=handler)           # handler(topic: str, payload: bytes, retain: bool)
    await c.connect(will=(topic, payload, retain))
    await c.subscribe("cws/v1/home/dev-1/ack")
    await c.publish(topic, payload, qos=1)      # True once PUBACKed, False if the link died
"""

import asyncio
import struct

from cws.compat import sleep_ms, ticks_diff, ticks_ms, wait_for_ms

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14
MAX_PACKET = 256 * 1024 + 512  # the protocol's largest payload plus topic and header
CONNACK_ERRORS = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
                  4: "bad user name or password", 5: "not authorised"}


class MQTTError(OSError):
    """The broker refused or broke the session (``code`` is the CONNACK code when there is one)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


def _str(s):
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


def _packet(first, body):
    n = len(body)
    head = bytearray([first])
    while True:
        byte = n & 0x7F
        n >>= 7
        head.append(byte | 0x80 if n else byte)
        if not n:
            break
    return bytes(head) + body


def connect_packet(client_id, user=None, password=None, keepalive=60, will=None):
    """The CONNECT bytes (clean session; ``will`` is ``(topic, payload, retain)`` sent at QoS 1)."""
    flags = 0x02
    payload = _str(client_id)
    if will is not None:
        topic, msg, retain = will
        flags |= 0x04 | 0x08 | (0x20 if retain else 0)
        payload += _str(topic) + _str(msg)
    if user is not None:
        flags |= 0x80
        payload += _str(user)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    return _packet(CONNECT << 4, _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


def publish_packet(topic, payload, qos=0, retain=False, pid=0, dup=False):
    first = (PUBLISH << 4) | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return _packet(first, body)


def subscribe_packet(pid, topic, qos=1):
    return _packet((SUBSCRIBE << 4) | 0x02, struct.pack("!H", pid) + _str(topic) + bytes([qos]))


async def _read(reader, n):
    try:
        data = await reader.readexactly(n)
    except EOFError:  # MicroPython's readexactly at end of stream
        data = b""
    if len(data) != n:
        raise MQTTError("the broker closed the connection")
    return data


async def read_packet(reader, limit=MAX_PACKET):
    """One packet from ``reader``: ``(type, flags, body)``; raises OSError on EOF or garbage.

    A packet longer than ``limit`` is not read: ``body`` is then its length (an int).
    """
    first = await _read(reader, 1)
    n, shift = 0, 0
    while True:
        b = (await _read(reader, 1))[0]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift > 21:
            raise MQTTError("malformed remaining length")
    if n > MAX_PACKET:  # beyond anything the protocol allows: not a broker we can talk to
        raise MQTTError("packet of %d bytes is over the protocol's limit" % n)
    if n > limit:
        return first[0] >> 4, first[0] & 0x0F, n  # the caller reads it through (skip) or fails
    body = await _read(reader, n) if n else b""
    return first[0] >> 4, first[0] & 0x0F, body


async def skip(reader, n):
    """Read and drop ``n`` bytes in small pieces (never ``n`` bytes of heap at once)."""
    while n:
        k = min(n, 512)
        await _read(reader, k)
        n -= k


async def _open(host, port, ssl_ctx):
    if ssl_ctx is None:
        return await asyncio.open_connection(host, port)
    return await asyncio.open_connection(host, port, ssl=ssl_ctx, server_hostname=host)


class MQTTClient:
    def __init__(self, client_id, host, port, user=None, password=None, keepalive=30, ssl_ctx=None,
                 on_message=None, open_stream=None, retransmit_ms=5000, timeout_ms=10000, max_packet=MAX_PACKET,
                 on_oversize=None):
        self.client_id = client_id
        self.host, self.port = host, port
        self.user, self.password = user, password
        self.keepalive = keepalive
        self.ssl_ctx = ssl_ctx
        self.on_message = on_message
        self._open = open_stream or _open
        self.retransmit_ms = retransmit_ms
        self.timeout_ms = timeout_ms
        self.max_packet = max_packet
        self.on_oversize = on_oversize
        self._reader = self._writer = None
        self._pid = 0
        self._pending = {}  # pid -> [packet, sent_ticks, Event] for QoS 1 publishes and subscribes
        self._tasks = []
        self._last_rx = 0
        self._wlock = asyncio.Lock()
        self.down = asyncio.Event()
        self.down.set()
        self.error = None
        self.sent = self.received = 0  # packet counters, reported in status

    @property
    def connected(self):
        return not self.down.is_set()

    def _next_pid(self):
        self._pid = self._pid % 65535 + 1
        while self._pid in self._pending:
            self._pid = self._pid % 65535 + 1
        return self._pid

    async def _send(self, data):
        w = self._writer
        if w is None:
            raise MQTTError("not connected")
        async with self._wlock:
            w.write(data)
            try:
                await wait_for_ms(w.drain(), self.timeout_ms)
            except asyncio.TimeoutError:
                raise MQTTError("a write did not drain in %d s: the link is dead" % (self.timeout_ms // 1000)) from None
        self.sent += 1

    async def connect(self, will=None):
        """Open the connection and complete CONNECT/CONNACK; raises OSError/MQTTError on failure."""
        await self.close()
        self.error = None
        try:
            await wait_for_ms(self._handshake(will), self.timeout_ms)
        except asyncio.TimeoutError:
            await self.close()
            raise MQTTError("no CONNACK from %s:%d within %d s" % (self.host, self.port, self.timeout_ms // 1000)) \
                from None
        except BaseException:
            await self.close()
            raise
        self._last_rx = ticks_ms()
        self.down = asyncio.Event()
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._keepalive_loop())]

    async def _handshake(self, will):
        reader, writer = await self._open(self.host, self.port, self.ssl_ctx)
        self._reader, self._writer = reader, writer
        await self._send(connect_packet(self.client_id, self.user, self.password, self.keepalive, will))
        kind, _flags, body = await read_packet(reader, 4)
        if kind != CONNACK or isinstance(body, int) or len(body) != 2:
            raise MQTTError("expected CONNACK, got packet type %d" % kind)
        if body[1]:
            raise MQTTError("broker refused the connection: %s" % CONNACK_ERRORS.get(body[1], body[1]), body[1])

    async def close(self, reason=None):
        """Drop the connection (no DISCONNECT: the broker publishes the will)."""
        if reason is not None and self.error is None:
            self.error = reason
        self.down.set()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self._tasks = []
        w, self._writer, self._reader = self._writer, None, None
        for entry in self._pending.values():
            entry[2].set()  # waiters wake up and see the connection is gone
        self._pending = {}
        if w is not None:
            try:
                w.close()
                await w.wait_closed()
            except Exception:  # noqa: BLE001 - the socket is gone either way
                pass

    async def disconnect(self):
        """A clean goodbye: DISCONNECT (the broker discards the will), then close."""
        if self._writer is not None:
            try:
                await self._send(_packet(DISCONNECT << 4, b""))
            except OSError:
                pass
        await self.close("disconnected")

    async def publish(self, topic, payload, qos=1, retain=False, wait=True):
        """Publish; at QoS 1 wait for the PUBACK (retransmitting with DUP) unless ``wait`` is False.

        Returns True when PUBACKed (or sent at QoS 0), False when the connection died first.
        """
        if not qos:
            await self._send(publish_packet(topic, payload, 0, retain))
            return True
        pid = self._next_pid()
        pkt = publish_packet(topic, payload, 1, retain, pid)
        if not wait:  # the PUBACK is not tracked: the caller retransmits at its own level
            await self._send(pkt)
            return True
        ev = asyncio.Event()
        entry = [pkt, ticks_ms(), ev, None]
        self._pending[pid] = entry
        await self._send(pkt)
        await ev.wait()
        return entry[3] is not None

    async def subscribe(self, topic, qos=1):
        """Subscribe and wait for the SUBACK; raises MQTTError if the broker refuses the filter."""
        pid = self._next_pid()
        ev = asyncio.Event()
        pkt = subscribe_packet(pid, topic, qos)
        entry = [pkt, ticks_ms(), ev, None]
        self._pending[pid] = entry
        await self._send(pkt)
        await ev.wait()
        if entry[3] is None:
            raise MQTTError("connection lost while subscribing to %s" % topic)
        if entry[3] == 0x80:
            raise MQTTError("broker refused the subscription to %s" % topic)

    @property
    def inflight(self):
        return len(self._pending)

    async def _read_loop(self):
        try:
            while True:
                kind, flags, body = await read_packet(self._reader, self.max_packet)
                self._last_rx = ticks_ms()
                self.received += 1
                if isinstance(body, int):
                    await self._oversize(kind, flags, body)
                elif kind == PUBLISH:
                    await self._on_publish(flags, body)
                elif kind == PUBACK or kind == SUBACK:
                    pid = struct.unpack("!H", body[:2])[0]
                    entry = self._pending.pop(pid, None)
                    if entry is not None:
                        entry[3] = (body[2] if len(body) > 2 else 0x80) if kind == SUBACK else 0
                        entry[2].set()
                elif kind == PINGRESP:
                    pass
                else:
                    raise MQTTError("unexpected packet type %d from the broker" % kind)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure ends this connection, the agent reconnects
            await self.close("read: %r" % (e,))

    async def _oversize(self, kind, flags, n):
        """A packet too big for this device: read its topic, drop the rest, PUBACK it, say so."""
        if kind != PUBLISH:
            raise MQTTError("packet type %d of %d bytes from the broker" % (kind, n))
        size = n
        tlen = struct.unpack("!H", await _read(self._reader, 2))[0]
        topic = str(await _read(self._reader, tlen), "utf-8")
        n -= 2 + tlen
        qos = (flags >> 1) & 3
        if qos:
            pid = struct.unpack("!H", await _read(self._reader, 2))[0]
            n -= 2
        await skip(self._reader, n)
        print("mqtt: dropped a %d-byte message on %s: over this device's limit of %d" % (size, topic, self.max_packet))
        if self.on_oversize is not None:
            self.on_oversize(topic, size)
        if qos == 1:
            await self._send(_packet(PUBACK << 4, struct.pack("!H", pid)))

    async def _on_publish(self, flags, body):
        qos = (flags >> 1) & 3
        n = struct.unpack("!H", body[:2])[0]
        topic = str(body[2:2 + n], "utf-8")
        pos = 2 + n
        if qos:
            pid = struct.unpack("!H", body[pos:pos + 2])[0]
            pos += 2
        payload = body[pos:]
        if self.on_message is not None:
            try:
                r = self.on_message(topic, payload, bool(flags & 1))
                if r is not None and hasattr(r, "send"):
                    await r
            except Exception as e:  # noqa: BLE001 - a bad message never kills the link
                print("mqtt: handler failed on", topic, repr(e))
        if qos == 1:
            await self._send(_packet(PUBACK << 4, struct.pack("!H", pid)))

    async def _keepalive_loop(self):
        ping = _packet(PINGREQ << 4, b"")
        period = max(1000, self.keepalive * 1000 // 2)
        try:
            while True:
                await sleep_ms(min(period, self.retransmit_ms) // 2)
                now = ticks_ms()
                if ticks_diff(now, self._last_rx) > self.keepalive * 1500:
                    await self.close("no answer from the broker for %d s" % (self.keepalive * 3 // 2))
                    return
                if ticks_diff(now, self._last_rx) > period and not self._wlock.locked():
                    await self._send(ping)  # (a write in progress is bounded by timeout_ms itself)
                for pid in list(self._pending):
                    entry = self._pending.get(pid)
                    if entry is not None and ticks_diff(now, entry[1]) > self.retransmit_ms:
                        pkt = entry[0]
                        if pkt[0] >> 4 == PUBLISH:
                            pkt = bytes([pkt[0] | 0x08]) + pkt[1:]
                        entry[1] = now
                        await self._send(pkt)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            await self.close("keepalive: %r" % (e,))
