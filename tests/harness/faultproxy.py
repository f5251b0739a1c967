"""A TCP proxy that injects network faults, for tests.

``FaultProxy`` listens on ``127.0.0.1:listen_port`` and forwards every connection
to ``target_host:target_port``.  It runs an asyncio event loop in its own thread,
so synchronous tests can drive it; every control method (``cut()``,
``blackhole()`` ...) is synchronous and has taken effect when it returns.  It can
also be used as ``async with FaultProxy(...)`` / ``with FaultProxy(...)``.

Faults:

* ``cut()`` -- abort every live connection (both ways, RST) and accept-then-abort
  new ones until ``restore()``.
* ``blackhole()`` -- keep connections open but silently drop every byte in both
  directions (a half-dead link: TCP is up, nothing gets through).  New
  connections are accepted and blackholed too.  ``restore()`` ends it; bytes
  dropped meanwhile are gone.
* ``set_latency(s)`` -- each chunk is delivered ``s`` seconds after it was read,
  per direction, order preserved (latency is pipelined, not a throughput cap).
* ``set_bandwidth(bytes_per_sec | None)`` -- cap each direction (shared by all
  connections of this proxy) to about that rate.  Buffering is bounded, so a
  fast sender sees TCP back-pressure as on a real slow link.

``restore()`` clears ``cut``/``blackhole``; ``reset()`` clears every fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .ports import free_port

__all__ = ["FaultProxy"]

log = logging.getLogger("tests.faultproxy")

T = TypeVar("T")

_READ_SIZE = 16 * 1024
_QUEUE_CHUNKS = 64  # at most ~1 MiB buffered per direction per connection


class _Pacer:
    """Shared per-direction transmission clock for the bandwidth cap."""

    def __init__(self) -> None:
        self.next_free = 0.0

    def reset(self) -> None:
        self.next_free = 0.0

    async def pace(self, nbytes: int, rate: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self.next_free)
        self.next_free = start + nbytes / rate
        delay = self.next_free - now
        if delay > 0:
            await asyncio.sleep(delay)


class _Link:
    """One proxied connection (client side + upstream side)."""

    def __init__(self, client_writer: asyncio.StreamWriter, task: asyncio.Task[Any]) -> None:
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.task = task

    def abort(self) -> None:
        for w in (self.client_writer, self.upstream_writer):
            if w is not None:
                w.transport.abort()


class FaultProxy:
    """Fault-injecting TCP proxy running in a background thread with its own event loop."""

    def __init__(
        self,
        listen_port: int | None = None,
        target_host: str = "127.0.0.1",
        target_port: int = 0,
        *,
        listen_host: str = "127.0.0.1",
        connect_timeout: float = 5.0,
    ) -> None:
        if not target_port:
            raise ValueError("target_port is required")
        self.listen_host = listen_host
        self.listen_port = listen_port or free_port(listen_host)
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        # fault state (written from the test thread, read by the proxy loop; plain attributes are fine)
        self._cut = False
        self._blackhole = False
        self._latency = 0.0
        self._bandwidth: float | None = None
        self._pacers = {"up": _Pacer(), "down": _Pacer()}
        # counters
        self.bytes_up = 0  # client -> target, delivered
        self.bytes_down = 0  # target -> client, delivered
        self.bytes_dropped = 0
        self.accepted = 0
        self.refused = 0
        self.upstream_failures = 0
        # machinery
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- properties --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.listen_port

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.listen_port)

    @property
    def connections(self) -> int:
        """Number of live proxied connections."""
        return len(self._links)

    @property
    def latency(self) -> float:
        return self._latency

    @property
    def bandwidth(self) -> float | None:
        return self._bandwidth

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def is_blackholed(self) -> bool:
        return self._blackhole

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> FaultProxy:
        """Start the proxy thread and wait until it is listening."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(
            target=self._thread_main, name=f"faultproxy-{self.listen_port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AssertionError(f"fault proxy on port {self.listen_port} did not start within {timeout}s")
        if self._startup_error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self._startup_error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and the listener, stop the thread (idempotent)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(f"fault proxy thread on port {self.listen_port} did not stop within {timeout}s")
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FaultProxy:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- faults (synchronous, effective on return) --------------------------------------------

    def cut(self) -> None:
        """Abort every live connection both ways; accept-and-abort new ones until :meth:`restore`."""
        self._cut = True
        self._call(self._abort_all)

    def restore(self) -> None:
        """End ``cut`` and ``blackhole`` (latency and bandwidth settings stay)."""
        self._cut = False
        self._blackhole = False

    def reset(self) -> None:
        """Clear every fault: cut, blackhole, latency, bandwidth."""
        self.restore()
        self.set_latency(0.0)
        self.set_bandwidth(None)

    def blackhole(self) -> None:
        """Keep connections up but silently drop all bytes both ways (a half-dead link)."""
        self._blackhole = True

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` per direction (order preserved)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(seconds)

    def set_bandwidth(self, bytes_per_sec: float | None) -> None:
        """Cap each direction to ``bytes_per_sec`` (``None`` = unlimited)."""
        if bytes_per_sec is not None and bytes_per_sec <= 0:
            raise ValueError("bandwidth must be > 0 or None")
        self._bandwidth = None if bytes_per_sec is None else float(bytes_per_sec)
        for pacer in self._pacers.values():
            pacer.reset()

    def stats(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "accepted": self.accepted,
            "refused": self.refused,
            "upstream_failures": self.upstream_failures,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_dropped": self.bytes_dropped,
        }

    # -- internals ---------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 5.0) -> T:
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("FaultProxy is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy control methods must not be called from the proxy thread")
        return asyncio.run_coroutine_threadsafe(fn(), loop).result(timeout)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - surfaced by start()
            if not self._ready.is_set():
                self._startup_error = exc
            else:
                log.exception("fault proxy loop crashed")
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(
            self._handle, self.listen_host, self.listen_port, reuse_address=True
        )
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            await self._abort_all()
            await server.wait_closed()

    async def _abort_all(self) -> None:
        links = list(self._links)
        for link in links:
            link.abort()
            link.task.cancel()
        if links:
            await asyncio.wait([link.task for link in links], timeout=5.0)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            await self._proxy_connection(client_reader, client_writer)
        except asyncio.CancelledError:
            # cancelled by cut()/stop(): the connection is already aborted.  End quietly --
            # asyncio's start_server wrapper would report a cancelled handler task as an error.
            return

    async def _proxy_connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        if self._cut:
            self.refused += 1
            client_writer.transport.abort()
            return
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        link = _Link(client_writer, task)
        self._links.add(link)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                self.upstream_failures += 1
                log.debug("upstream %s:%s unreachable: %s", self.target_host, self.target_port, exc)
                return
            link.upstream_writer = up_writer
            if self._cut:  # cut while we were connecting
                return
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pipe(client_reader, up_writer, "up"))
                    tg.create_task(self._pipe(up_reader, client_writer, "down"))
            except* (OSError, EOFError):
                pass
        finally:
            link.abort()
            self._links.discard(link)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pump_in(reader, queue))
            tg.create_task(self._pump_out(writer, queue, direction))

    async def _pump_in(self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                await queue.put(None)
                return
            if self._blackhole:
                self.bytes_dropped += len(data)
                continue
            await queue.put((loop.time() + self._latency, data))

    async def _pump_out(
        self, writer: asyncio.StreamWriter, queue: asyncio.Queue[tuple[float, bytes] | None], direction: str
    ) -> None:
        loop = asyncio.get_running_loop()
        pacer = self._pacers[direction]
        while True:
            item = await queue.get()
            if item is None:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            due, data = item
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            view = memoryview(data)
            while view:
                if self._blackhole:
                    self.bytes_dropped += len(view)
                    break
                rate = self._bandwidth
                if rate is None:
                    piece, view = view, view[len(view):]
                else:
                    step = max(1, int(rate / 20))  # ~50 ms of traffic per write
                    piece, view = view[:step], view[step:]
                    await pacer.pace(len(piece), rate)
                writer.write(piece)
                await writer.drain()
                if direction == "up":
                    self.bytes_up += len(piece)
                else:
                    self.bytes_down += len(piece)
