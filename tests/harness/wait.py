"""Deadline-bounded polling helpers.

Every wait in the test suite goes through these: poll a predicate until it
returns something truthy or the deadline passes, then fail with an
``AssertionError`` that says what was being waited for and what the predicate
last returned (or raised).  Sleeping *inside* the poll loop is fine; sleeping as
synchronisation is not.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["wait_for", "await_for", "run_async"]

T = TypeVar("T")

_NOTHING = object()


def _describe(last_value: Any, last_exc: BaseException | None) -> str:
    if last_exc is not None:
        return f"last exception: {type(last_exc).__name__}: {last_exc}"
    if last_value is _NOTHING:
        return "predicate never completed"
    return f"last value: {last_value!r}"


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Call ``predicate()`` every ``interval`` s until it returns a truthy value; return that value.

    Exceptions raised by the predicate count as "not yet" (so ``lambda: sock.connect(...)``
    style probes work) and the last one is reported on timeout.  Raises ``AssertionError``
    after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_value: Any = _NOTHING
    last_exc: BaseException | None = None
    while True:
        try:
            last_value = predicate()
            last_exc = None
            if last_value:
                return last_value
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"timed out after {timeout:.1f}s waiting for {message} ({_describe(last_value, last_exc)})"
            ) from last_exc
        time.sleep(min(interval, remaining))


async def await_for(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 - mirrors wait_for(); the deadline is the point
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Async twin of :func:`wait_for`; ``predicate`` may be a plain or an async callable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_value: Any = _NOTHING
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await asyncio.wait_for(value, max(deadline - loop.time(), 0.001))
            last_value = value
            last_exc = None
            if value:
                return value  # type: ignore[return-value]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(
                f"timed out after {timeout:.1f}s waiting for {message} ({_describe(last_value, last_exc)})"
            ) from last_exc
        await asyncio.sleep(min(interval, remaining))


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run ``coro`` in a fresh event loop with an overall deadline (for sync pytest tests)."""

    async def _bounded() -> T:
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await coro
        except TimeoutError:
            if deadline.expired():
                raise AssertionError(f"async test body did not finish within {timeout:.1f}s") from None
            raise

    return asyncio.run(_bounded())
