"""Live-change fan-out for the ``/api/v1/stream`` Server-Sent Events endpoint.

Ingest publishes each change once; every subscriber (an open console tab) has its own bounded
queue. Publishing never blocks and never waits for a subscriber: when a subscriber's queue is
full its *oldest* item is dropped, and the next item it reads is a ``{"type": "resync"}`` marker
telling it to reload from the REST API. A slow browser therefore costs itself data, never ingest.

``publish`` may be called from any thread; each subscriber is woken on its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any

log = logging.getLogger("cwsnet.cloud.fanout")


class Subscription:
    def __init__(self, hub: Fanout, maxsize: int) -> None:
        self._hub = hub
        self._items: deque[dict[str, Any]] = deque(maxlen=maxsize)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self.dropped = 0
        self._unreported = 0
        self.closed = False

    def _put(self, item: dict[str, Any]) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
                self._unreported += 1
            self._items.append(item)
        self._notify()

    def _notify(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def _pop(self) -> dict[str, Any] | None:
        with self._lock:
            if self._unreported:
                n, self._unreported = self._unreported, 0
                return {"type": "resync", "dropped": n}
            return self._items.popleft() if self._items else None

    async def get(self, wait: float | None = None) -> dict[str, Any] | None:
        """The next change; ``None`` after ``wait`` s without one or once the subscription is closed."""
        while True:
            item = self._pop()
            if item is not None:
                return item
            if self.closed:
                return None
            self._wake.clear()
            if self._pop_ready():
                continue
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                return None

    def _pop_ready(self) -> bool:
        with self._lock:
            return bool(self._items) or bool(self._unreported)

    def close(self) -> None:
        self.closed = True
        self._hub._discard(self)
        self._notify()


class Fanout:
    def __init__(self, maxsize: int = 512) -> None:
        self.maxsize = maxsize
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self.closed = False

    def subscribe(self) -> Subscription:
        """A new subscription on the running event loop (call from a coroutine)."""
        sub = Subscription(self, self.maxsize)
        with self._lock:
            if self.closed:
                sub.closed = True
            else:
                self._subs.add(sub)
        return sub

    def publish(self, item: dict[str, Any]) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                sub._put(item)
            except RuntimeError:  # its loop is gone
                sub.close()

    def publish_many(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            self.publish(item)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def close(self) -> None:
        """End every subscription (the streams finish) and refuse new ones: used at shutdown."""
        with self._lock:
            self.closed = True
            subs = list(self._subs)
        for sub in subs:
            sub.close()

    def _discard(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)
