"""The firmware's own MQTT client (firmware/micropython/lib/cws/mqtt.py) against scripted brokers
on real sockets, on CPython (the same file runs on MicroPython; the end-to-end tests run it there
against amqtt): a silent broker is detected by keepalive, a lost PUBACK is retransmitted with the
DUP flag, a dropped connection wakes every waiter, a refused CONNECT says why, and garbage from the
broker ends the session instead of the program."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

FIRMWARE_LIB = Path(__file__).resolve().parents[1] / "firmware" / "micropython" / "lib"
sys.path.insert(0, str(FIRMWARE_LIB))
from cws import mqtt  # noqa: E402

sys.path.remove(str(FIRMWARE_LIB))


class ScriptedBroker:
    """Accepts one client at a time; ``handler(reader, writer, packets)`` scripts its answers."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.packets: list[tuple[int, int, bytes]] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> ScriptedBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handler(reader, writer, self.packets)
        except (asyncio.IncompleteReadError, ConnectionError, mqtt.MQTTError):
            pass
        finally:
            writer.close()



async def recv(reader: asyncio.StreamReader, packets: list) -> tuple[int, int, bytes]:
    """The next packet from the client, also kept in ``packets``."""
    p = await mqtt.read_packet(reader)
    packets.append(p)
    return p


CONNACK_OK = bytes([0x20, 2, 0, 0])


def client(port: int, **kw) -> mqtt.MQTTClient:
    return mqtt.MQTTClient("dev-1", "127.0.0.1", port, user="dev-1", password="tok", **kw)


def test_a_silent_broker_is_declared_dead_by_keepalive() -> None:
    async def silent(reader, writer, packets):
        await recv(reader, packets)
        writer.write(CONNACK_OK)
        while True:  # reads PINGREQs, never answers
            await recv(reader, packets)

    async def main():
        async with ScriptedBroker(silent) as broker:
            c = client(broker.port, keepalive=1)
            await c.connect()
            await asyncio.wait_for(c.down.wait(), 10)
            assert "no answer from the broker" in c.error
            assert any(kind == mqtt.PINGREQ for kind, _, _ in broker.packets)

    asyncio.run(main())


def test_a_lost_puback_is_retransmitted_with_dup_and_the_publish_completes() -> None:
    async def forgetful(reader, writer, packets):
        await recv(reader, packets)
        writer.write(CONNACK_OK)
        first = True
        while True:
            kind, flags, body = await recv(reader, packets)
            if kind == mqtt.PUBLISH:
                pid = body[2 + struct.unpack("!H", body[:2])[0]:][:2]
                if first:  # swallow the first PUBACK
                    first = False
                    continue
                writer.write(bytes([0x40, 2]) + pid)
            elif kind == mqtt.PINGREQ:
                writer.write(bytes([0xD0, 0]))

    async def main():
        async with ScriptedBroker(forgetful) as broker:
            c = client(broker.port, keepalive=30, retransmit_ms=300)
            await c.connect()
            assert await asyncio.wait_for(c.publish("cws/v1/home/dev-1/telemetry/env", b"payload"), 10)
            pubs = [(flags, body) for kind, flags, body in broker.packets if kind == mqtt.PUBLISH]
            assert len(pubs) == 2 and not pubs[0][0] & 0x08 and pubs[1][0] & 0x08  # the repeat has DUP
            assert pubs[0][1] == pubs[1][1]  # same packet id, topic and payload
            await c.disconnect()
            assert broker.packets[-1][0] in (mqtt.DISCONNECT, mqtt.PUBLISH)

    asyncio.run(main())


def test_a_dropped_connection_wakes_waiters_with_false() -> None:
    async def dropper(reader, writer, packets):
        await recv(reader, packets)
        writer.write(CONNACK_OK)
        await recv(reader, packets)  # the PUBLISH: hang up instead of acking it

    async def main():
        async with ScriptedBroker(dropper) as broker:
            c = client(broker.port)
            await c.connect()
            assert await asyncio.wait_for(c.publish("t/x", b"p"), 10) is False
            assert not c.connected and "closed" in c.error
            with pytest.raises(mqtt.MQTTError):
                await c.publish("t/x", b"p")

    asyncio.run(main())


@pytest.mark.parametrize(("code", "words"), [(4, "bad user name or password"), (5, "not authorised")])
def test_a_refused_connect_says_why(code: int, words: str) -> None:
    async def refuse(reader, writer, packets):
        await recv(reader, packets)
        writer.write(bytes([0x20, 2, 0, code]))
        await writer.drain()

    async def main():
        async with ScriptedBroker(refuse) as broker:
            c = client(broker.port)
            with pytest.raises(mqtt.MQTTError) as e:
                await c.connect()
            assert words in str(e.value) and e.value.code == code and not c.connected

    asyncio.run(main())


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff\xff", bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]), bytes([0x50, 0])])
def test_garbage_from_the_broker_ends_the_session_not_the_program(garbage: bytes) -> None:
    async def rogue(reader, writer, packets):
        await recv(reader, packets)
        writer.write(CONNACK_OK + garbage)
        await writer.drain()
        await reader.read(100)

    async def main():
        async with ScriptedBroker(rogue) as broker:
            c = client(broker.port)
            await c.connect()
            await asyncio.wait_for(c.down.wait(), 10)
            assert c.error

    asyncio.run(main())


def test_connect_packet_carries_credentials_and_a_retained_qos1_will() -> None:
    pkt = mqtt.connect_packet("dev-1", "dev-1", "tok", 30, ("cws/v1/home/dev-1/status", b"\x00dead", True))
    assert pkt[0] == 0x10
    body = pkt[2:]
    assert body[:6] == b"\x00\x04MQTT" and body[6] == 4
    assert body[7] == 0x02 | 0x04 | 0x08 | 0x20 | 0x80 | 0x40  # clean, will, will QoS 1, retain, user, password
    assert struct.unpack("!H", body[8:10])[0] == 30
    assert b"\x00\x05dev-1" in body and b"\x00\x05\x00dead" in body and body.endswith(b"\x00\x03tok")


# ---- the same client under MicroPython (unix port): what CPython's asyncio cannot show -----------

def _serve(sock: socket.socket, script) -> None:
    def run() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=script, args=(conn,), daemon=True).start()
    threading.Thread(target=run, daemon=True).start()


def _silent(conn: socket.socket) -> None:
    conn.recv(65536)  # the TLS ClientHello; never answered
    conn.settimeout(30)
    try:
        conn.recv(1)
    except OSError:
        pass
    conn.close()


def _oversize(conn: socket.socket) -> None:
    conn.recv(65536)  # CONNECT
    conn.sendall(CONNACK_OK)
    big = b"\x00\x01t" + b"\x00\x07" + b"x" * 20000  # QoS 1, topic "t", pid 7, 20,000 bytes
    small = b"\x00\x01s" + b"hello"
    conn.sendall(bytes([0x32]) + _varint(len(big)) + big + bytes([0x30]) + _varint(len(small)) + small)
    conn.settimeout(10)
    data = b""
    try:
        while b"\x40\x02\x00\x07" not in data:  # the PUBACK for the big one
            chunk = conn.recv(1024)
            if not chunk:
                break
            data += chunk
        conn.recv(1024)
    except OSError:
        pass
    conn.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def test_under_micropython_a_silent_tls_peer_is_bounded_and_an_oversized_message_is_skipped() -> None:
    servers = []
    for script in (_silent, _oversize):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        _serve(s, script)
        servers.append(s)
    try:
        env = dict(os.environ, MICROPYPATH=f"{FIRMWARE_LIB}:.frozen")
        r = subprocess.run([str(Path(sys.executable).parent / "micropython"), "-X", "heapsize=256k",
                            str(Path(__file__).parent / "firmware" / "mp" / "mqtt_checks.py"),
                            *(str(s.getsockname()[1]) for s in servers)],
                           env=env, capture_output=True, text=True, timeout=60)
    finally:
        for s in servers:
            s.close()
    out = r.stdout
    assert r.returncode == 0 and out.strip().endswith("END"), out + r.stderr
    assert "silent_tls bounded no CONNACK" in out, out
    assert "oversize [('t', 20005)] [('s', 5)] connected" in out, out
