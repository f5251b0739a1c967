"""FaultProxy does what it says, proven against a plain TCP echo server."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from harness import FaultProxy, ProcessSet, run_async, wait_for


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)
        except OSError:
            return


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(echo_port: int, fault_proxy: Callable[..., FaultProxy]) -> FaultProxy:
    return fault_proxy(echo_port)


def _connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _is_closed(sock: socket.socket, timeout: float = 2.0) -> bool:
    """True if the peer closed/reset the connection (EOF or error), False if it is still open."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return _recv_exactly(sock, len(payload))


def test_plain_forwarding_and_counters(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _echo(sock, b"hello") == b"hello"
        wait_for(lambda: proxy.connections == 1, message="one live connection")
        assert proxy.bytes_up == 5
        wait_for(lambda: proxy.bytes_down == 5, message="5 bytes down")
    wait_for(lambda: proxy.connections == 0, message="connection gone after client close")
    assert proxy.accepted == 1


def test_latency_is_applied_per_direction_in_order(proxy: FaultProxy) -> None:
    latency = 0.15
    with _connect(proxy) as sock:
        assert _echo(sock, b"warm") == b"warm"
        proxy.set_latency(latency)
        start = time.monotonic()
        assert _echo(sock, b"x") == b"x"
        rtt = time.monotonic() - start
        assert rtt >= 2 * latency - 0.005, f"round trip {rtt:.3f}s < 2 x {latency}s"
        assert rtt < 2 * latency + 1.0

        # many small writes keep their order
        parts = [f"<{i:04d}>".encode() for i in range(200)]
        for part in parts:
            sock.sendall(part)
        expected = b"".join(parts)
        assert _recv_exactly(sock, len(expected)) == expected

        proxy.set_latency(0)
        start = time.monotonic()
        assert _echo(sock, b"y") == b"y"
        assert time.monotonic() - start < latency


def test_bandwidth_cap(proxy: FaultProxy) -> None:
    rate = 200_000  # bytes/s each way
    size = 200_000
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    with _connect(proxy, timeout=10) as sock:
        proxy.set_bandwidth(rate)
        start = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = _recv_exactly(sock, size)
        elapsed = time.monotonic() - start
        sender.join(5)
    assert got == payload
    expected = size / rate  # both directions are pipelined, so about one transfer time
    assert elapsed >= 0.8 * expected, f"{size} B at {rate} B/s took only {elapsed:.2f}s"
    assert elapsed <= 3 * expected + 0.5, f"{size} B at {rate} B/s took {elapsed:.2f}s"

    proxy.set_bandwidth(None)
    with _connect(proxy, timeout=10) as sock:
        start = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        assert _recv_exactly(sock, size) == payload
        sender.join(5)
        assert time.monotonic() - start < expected / 2


def test_cut_closes_and_refuses_until_restored(proxy: FaultProxy) -> None:
    a = _connect(proxy)
    b = _connect(proxy)
    try:
        assert _echo(a, b"a") == b"a"
        assert _echo(b, b"b") == b"b"
        wait_for(lambda: proxy.connections == 2, message="two live connections")

        proxy.cut()
        assert proxy.connections == 0
        assert _is_closed(a), "live connection a survived cut()"
        assert _is_closed(b), "live connection b survived cut()"

        # new connections are closed straight away while cut
        with _connect(proxy) as c:
            assert _is_closed(c), "new connection during cut was kept open"
        assert proxy.refused >= 1

        proxy.restore()
        with _connect(proxy) as d:
            assert _echo(d, b"back") == b"back"
    finally:
        a.close()
        b.close()


def test_blackhole_keeps_connection_but_drops_bytes(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _echo(sock, b"ok") == b"ok"
        proxy.blackhole()
        sock.sendall(b"into the void")
        assert not _is_closed(sock, timeout=0.5), "blackholed connection was closed or answered"
        assert proxy.connections == 1
        wait_for(lambda: proxy.bytes_dropped >= len(b"into the void"), message="bytes counted as dropped")

        proxy.restore()
        sock.settimeout(5)
        assert _echo(sock, b"again") == b"again"


def test_usable_as_async_context_manager(echo_port: int) -> None:
    async def body() -> None:
        async with FaultProxy(None, "127.0.0.1", echo_port) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            proxy.set_latency(0.05)
            loop = asyncio.get_running_loop()
            start = loop.time()
            writer.write(b"ping")
            await writer.drain()
            assert await reader.readexactly(4) == b"ping"
            assert loop.time() - start >= 0.1 - 0.005
            await asyncio.to_thread(proxy.cut)
            try:
                assert await reader.read(10) == b""  # FIN ...
            except ConnectionResetError:  # ... or RST, both mean "closed"
                pass
            writer.close()
        assert proxy.connections == 0

    run_async(body(), timeout=20)


def test_upstream_down_closes_client(fault_proxy: Callable[..., FaultProxy]) -> None:
    from harness import free_port

    proxy = fault_proxy(free_port())  # nothing listens there
    with _connect(proxy) as sock:
        assert _is_closed(sock)
    wait_for(lambda: proxy.upstream_failures == 1, message="upstream failure counted")


# -- the rest of the harness, briefly -------------------------------------------------------------


def test_wait_for_reports_message_and_last_value() -> None:
    values = iter(range(1000))
    with pytest.raises(AssertionError, match=r"waiting for the counter to go negative \(last value: 0\)"):
        wait_for(lambda: max(0, -next(values)), timeout=0.2, message="the counter to go negative")

    def boom() -> bool:
        raise OSError("still down")

    with pytest.raises(AssertionError, match="last exception: OSError: still down"):
        wait_for(boom, timeout=0.2, message="boom")
    assert wait_for(lambda: "truthy", timeout=1) == "truthy"


def test_managed_process_fails_fast_and_cleans_up(procs: ProcessSet) -> None:
    import signal
    import sys

    from harness import ProcessDied, free_port

    dying = procs.start("dying", [sys.executable, "-c", "print('about to fail', flush=True); raise SystemExit(3)"])
    start = time.monotonic()
    with pytest.raises(ProcessDied, match=r"(?s)exited with code 3.*about to fail"):
        dying.wait_port("127.0.0.1", free_port(), timeout=30)
    assert time.monotonic() - start < 10, "did not fail fast on a dead process"

    # ignores SIGTERM and has a child: terminate() escalates to SIGKILL for the whole group
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    stubborn = procs.start("stubborn", [sys.executable, "-c", code])
    child_pid = int(stubborn.wait_log(r"child (\d+)").group(1))
    rc = stubborn.terminate(timeout=0.5)
    assert rc == -signal.SIGKILL
    assert not stubborn.alive

    def child_gone() -> bool:
        try:
            with open(f"/proc/{child_pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] == "Z"  # zombie until init reaps it
        except FileNotFoundError:
            return True

    wait_for(child_gone, timeout=5, message="grandchild killed with the group")


def test_free_port_never_repeats() -> None:
    from harness import free_port

    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
