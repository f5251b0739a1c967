"""Task handlers: async callables registered by name. ``args`` in, a result map out.

A handler is ``async def h(args) -> dict``, or ``async def h(args, ctx) -> dict`` to get a
:class:`TaskContext` (its task id and attempt, the checkpoint to resume from, and ``await
ctx.save(data)`` to report progress: a task moved to another executor resumes from its last saved
checkpoint). Whether a handler takes ``ctx`` is read once from its signature (:func:`takes_context`).

A handler raises :class:`TaskFailed` (or any exception) to fail the task; the message is sent back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import inspect
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("cwsnet.handlers")

Handler = Callable[..., Awaitable[dict[str, Any]]]
#: what :meth:`TaskContext.save` hands a checkpoint to (the agent: a ``checkpoint`` task_result)
Saver = Callable[[dict[str, Any]], Awaitable[None]]


class TaskFailed(Exception):
    """A handler's clear, user-facing failure (bad arguments, refused work)."""


class TaskContext:
    """What a two-argument handler gets.

    ``task_id``; ``attempt`` (the lease number of this run, None for a command without one);
    ``checkpoint`` (the map to resume from, None to start afresh); ``await save(data)`` reports
    ``data`` as the task's latest checkpoint (a ``task_result`` with state ``checkpoint``). ``save``
    only hands the report over (to the agent's outbox): it never waits for the network.
    """

    __slots__ = ("task_id", "attempt", "checkpoint", "_saver", "saved")

    def __init__(self, task_id: str, attempt: int | None = None, checkpoint: dict[str, Any] | None = None,
                 saver: Saver | None = None) -> None:
        self.task_id, self.attempt, self.checkpoint = task_id, attempt, checkpoint
        self._saver = saver
        self.saved = 0  # checkpoints saved so far in this run

    async def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise TaskFailed(f"a checkpoint must be a map, not {type(data).__name__}")
        if self._saver is not None:
            await self._saver(dict(data))
        self.saved += 1

    def __repr__(self) -> str:
        return f"TaskContext(task_id={self.task_id!r}, attempt={self.attempt!r}, checkpoint={self.checkpoint!r})"


def takes_context(fn: Callable[..., Any]) -> bool:
    """Whether a handler takes a second (context) positional argument."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


async def echo(args: dict[str, Any]) -> dict[str, Any]:
    return dict(args)


async def sha256(args: dict[str, Any]) -> dict[str, Any]:
    data = args.get("data")
    if isinstance(data, bytes):
        raw = data
    elif isinstance(data, str):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise TaskFailed("args.data is not valid base64") from None
    else:
        raise TaskFailed('sha256 needs args {"data": <base64 string>}')
    if len(raw) > 64 * 1024 * 1024:
        raise TaskFailed("args.data is larger than 64 MiB")
    digest = await asyncio.to_thread(lambda: hashlib.sha256(raw).hexdigest()) if len(raw) > 1 << 20 else (
        hashlib.sha256(raw).hexdigest()
    )
    return {"sha256": digest, "bytes": len(raw)}


async def sleep(args: dict[str, Any]) -> dict[str, Any]:
    seconds = args.get("seconds")
    if not _number(seconds) or not 0 <= seconds <= 3600:
        raise TaskFailed('sleep needs args {"seconds": <number between 0 and 3600>}')
    await asyncio.sleep(seconds)
    return {"slept": seconds}


COUNT_MAX = 1_000_000
COUNT_CHECKPOINTS_MAX = 1000


async def count(args: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Count from the checkpoint's ``n`` (else 0) to ``to``, one increment every ``step`` seconds,
    saving ``{"n": n}`` whenever ``n`` is a multiple of ``every`` (before the end). The migration
    tests' workload: a task resumed elsewhere reports ``resumed_from > 0``."""
    to, step, every = args.get("to"), args.get("step", 0.1), args.get("every", 10)
    if not isinstance(to, int) or isinstance(to, bool) or not 1 <= to <= COUNT_MAX:
        raise TaskFailed(f'count needs args {{"to": <integer 1..{COUNT_MAX}>}}')
    if not _number(step) or not 0 <= step <= 60:
        raise TaskFailed("count: args.step must be a number of seconds between 0 and 60")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise TaskFailed("count: args.every must be an integer >= 1")
    if to // every > COUNT_CHECKPOINTS_MAX:  # each checkpoint is a message: a run saves at most this many
        raise TaskFailed(f"count: args.every must be at least {-(-to // COUNT_CHECKPOINTS_MAX)} for to={to} "
                         f"(at most {COUNT_CHECKPOINTS_MAX} checkpoints a run)")
    start = 0
    if ctx.checkpoint is not None:
        n = ctx.checkpoint.get("n", 0)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise TaskFailed(f"count: the checkpoint's n must be an integer >= 0 (got {n!r})")
        start = min(n, to)
    n = start
    while n < to:
        await asyncio.sleep(step)
        n += 1
        if n % every == 0 and n < to:
            await ctx.save({"n": n})
    return {"n": to, "resumed_from": start}


def _burn_cpu(seconds: float, stop: threading.Event) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        for _ in range(10_000):  # a busy loop: real CPU load
            pass


async def burn(args: dict[str, Any]) -> dict[str, Any]:
    """Keep one CPU busy for ``seconds`` (in a worker thread, so the event loop keeps going): the
    offload tests' simulated CPU load. Cancelling the task stops the burning."""
    seconds = args.get("seconds")
    if not _number(seconds) or not 0 <= seconds <= 60:
        raise TaskFailed('burn needs args {"seconds": <number between 0 and 60>}')
    stop = threading.Event()
    try:
        await asyncio.to_thread(_burn_cpu, float(seconds), stop)
    finally:
        stop.set()  # cancelled: the thread stops at its next check
    return {"burned": seconds}


SHELL_OUTPUT_MAX = 64 * 1024


async def shell(args: dict[str, Any]) -> dict[str, Any]:
    """Run a program: args ``{"argv": [program, arg, ...], "timeout": seconds (default 60, at most
    3600), "cwd": directory}``. No shell is involved (no expansion, no pipes); stdout and stderr are
    kept up to 64 KB each. Never in a default handler list: a node runs it only when its own config
    lists ``shell`` in ``handlers``, so the owner of each machine decides (docs/tasks.md)."""
    argv, timeout, cwd = args.get("argv"), args.get("timeout", 60), args.get("cwd")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise TaskFailed('shell needs args {"argv": [<program>, <arg>, ...]} (strings; no shell is used)')
    if not _number(timeout) or not 0 < timeout <= 3600:
        raise TaskFailed("shell: args.timeout must be seconds between 0 and 3600")
    if cwd is not None and not isinstance(cwd, str):
        raise TaskFailed("shell: args.cwd must be a directory path")
    # a minimal environment: the daemon's own (its config paths, anything secret in it) is not passed on
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}
    try:
        proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    start_new_session=True)
    except OSError as exc:
        raise TaskFailed(f"shell: cannot run {argv[0]!r}: {exc.strerror or exc}") from None

    async def capped(stream: asyncio.StreamReader) -> tuple[bytes, bool]:
        """Keep the first SHELL_OUTPUT_MAX bytes; read (and drop) the rest, so the program never blocks
        on a full pipe and its output never fills the memory."""
        kept, more = bytearray(), False
        while chunk := await stream.read(65536):
            room = SHELL_OUTPUT_MAX - len(kept)
            kept += chunk[:room]
            more = more or len(chunk) > room
        return bytes(kept), more

    async def run() -> tuple[tuple[bytes, bool], tuple[bytes, bool]]:
        assert proc.stdout is not None and proc.stderr is not None
        got = await asyncio.gather(capped(proc.stdout), capped(proc.stderr))
        await proc.wait()
        return got[0], got[1]

    try:
        (out, out_more), (err, err_more) = await asyncio.wait_for(run(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise TaskFailed(f"shell: {argv[0]!r} still running after {timeout:g} s: killed") from None
    return {"exit": proc.returncode, "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
            "truncated": out_more or err_more}


BUILTIN: dict[str, Handler] = {"echo": echo, "sha256": sha256, "sleep": sleep, "count": count, "burn": burn}
#: built in, but run only where a node's config lists it (never by default)
OPT_IN: dict[str, Handler] = {"shell": shell}
#: the entry-point group plugins register handlers in (``name = "package.module:function"``)
ENTRY_POINT_GROUP = "cwsnet.handlers"


def plugins() -> dict[str, Handler]:
    """Handlers installed by packages under the ``cwsnet.handlers`` entry-point group. A plugin that
    fails to load is logged (naming its distribution) and left out; it never stops the node."""
    from importlib.metadata import entry_points

    found: dict[str, Handler] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", "?")
        if ep.name in BUILTIN or ep.name in OPT_IN:
            log.warning("handler plugin %s (%s) ignored: a built-in handler has that name", ep.name, dist)
            continue
        try:
            fn = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is the plugin's problem
            log.error("handler plugin %s = %s (%s) cannot be loaded: %s: %s", ep.name, ep.value, dist,
                      type(exc).__name__, exc)
            continue
        if not inspect.iscoroutinefunction(fn):
            log.error("handler plugin %s = %s (%s) is not an async function; ignored", ep.name, ep.value, dist)
            continue
        found[ep.name] = fn
    return found


def available() -> dict[str, Handler]:
    """Every handler this installation has: built-ins, the opt-in ``shell``, and plugins."""
    return {**BUILTIN, **OPT_IN, **plugins()}


def defaults() -> dict[str, Handler]:
    """What a gateway or the cloud runs when not told otherwise: built-ins and plugins, not ``shell``."""
    return {**BUILTIN, **plugins()}


def registry(names: list[str]) -> dict[str, Handler]:
    """The handlers a node's config names (built-in, ``shell``, or from plugins)."""
    known = available() if any(n not in BUILTIN for n in names) else BUILTIN
    unknown = [n for n in names if n not in known]
    if unknown:
        from cwsnet.errors import ConfigError

        raise ConfigError(f"handlers: unknown handler(s) {unknown}; known: {sorted(known)} (plugins register in the "
                          f"{ENTRY_POINT_GROUP!r} entry-point group)")
    return {n: known[n] for n in names}
