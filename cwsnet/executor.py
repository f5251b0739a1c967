"""Running scheduled tasks in-process: the worker pool of the cloud (tier ``cloud``) and of a gateway.

:class:`LocalWorkers` runs task handlers (``edge_agent.handlers``: ``async def h(args)`` or
``async def h(args, ctx)`` for checkpoints) as asyncio tasks and reports each step as the body of a
``task_result`` (protocol §3): ``running``, ``checkpoint``, then ``succeeded`` / ``failed`` (with the
error and the traceback) or ``expired``, every one with the ``attempt`` it runs under. What is done
with a report is the caller's: the cloud hands it to its scheduler, a gateway seals it into its
uplink outbox. A cancel stops the handler and reports ``cancelled``.

Each ``(task_id, attempt)`` runs at most once here; a later attempt of the same task may run again
(the task came back after a migration).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cwsnet import parts
from cwsnet.envelope import MAX_CHECKPOINT, body_problem
from edge_agent.handlers import TaskContext, TaskFailed, takes_context

log = logging.getLogger("cwsnet.executor")

Report = Callable[[dict[str, Any]], Awaitable[None] | None]
#: at most this many (task, attempt) pairs are remembered as run (the oldest are forgotten first)
SEEN_MAX = 10_000


@dataclass
class _Run:
    attempt: int | None
    task: asyncio.Task[None]


class LocalWorkers:
    """See the module's docstring. ``slots``: handlers running at once (more wait for a slot)."""

    def __init__(self, handlers: dict[str, Any], slots: int, report: Report, *, node: str = "",
                 clock: Callable[[], float] = time.time, max_seconds: float = 3600.0,
                 in_process: bool = False) -> None:
        self.handlers, self.slots, self.node, self.clock = handlers, slots, node, clock
        self.max_seconds = max_seconds
        # the cloud's pool: its reports never travel, so a result up to parts.MAX_PARTED goes as it is
        self.in_process = in_process
        self._report_fn = report
        self._runs: dict[str, _Run] = {}
        self._seen: dict[tuple[str, int | None], None] = {}
        self._sem = asyncio.Semaphore(max(slots, 1))

    def running(self) -> list[str]:
        """The tasks held here (running or waiting for a slot)."""
        return list(self._runs)

    async def _report(self, body: dict[str, Any]) -> None:
        try:
            out = self._report_fn(body)
            if inspect.isawaitable(out):
                await out
        except Exception:  # the lease covers a lost report: the task moves or is re-sent
            log.exception("reporting %s of task %s failed", body.get("state"), body.get("task_id"))

    def start(self, task_id: str, handler: str, args: dict[str, Any], *, attempt: int | None = None,
              checkpoint: dict[str, Any] | None = None, deadline_ms: int | None = None,
              parts_ok: bool = False) -> bool:
        """Run it (False: this attempt already ran or runs here). ``parts_ok``: its assigner takes a
        result too big for one message in parts (protocol §3, "Parts")."""
        key = (task_id, attempt)
        if key in self._seen:
            log.info("task %s attempt %s already run here; ignoring the repeat", task_id, attempt)
            return False
        self._seen[key] = None
        while len(self._seen) > SEEN_MAX:
            del self._seen[next(iter(self._seen))]
        old = self._runs.pop(task_id, None)
        if old is not None:  # an older attempt of it: superseded
            old.task.cancel()
        run = asyncio.get_running_loop().create_task(
            self._run(task_id, handler, args, attempt, checkpoint, deadline_ms, parts_ok), name=f"task-{task_id}")
        self._runs[task_id] = _Run(attempt, run)
        return True

    def cancel(self, task_id: str, attempt: int | None = None) -> bool:
        """Stop the run of ``task_id`` (of that ``attempt``, if given). A cancel that overtook its
        attempt's start is remembered: that attempt will not run here."""
        run = self._runs.get(task_id)
        if attempt is not None and (task_id, attempt) not in self._seen and (run is None or run.attempt != attempt):
            self._seen[(task_id, attempt)] = None
        if run is None or (attempt is not None and run.attempt != attempt):
            return False
        run.task.cancel()
        return True

    def cancel_all(self) -> None:
        for run in list(self._runs.values()):
            run.task.cancel()

    async def _save(self, task_id: str, attempt: int | None, data: dict[str, Any]) -> None:
        why = body_problem(data, "the checkpoint", MAX_CHECKPOINT)
        if why is not None:
            raise TaskFailed(why)
        await self._report({"task_id": task_id, "state": "checkpoint", "attempt": attempt, "checkpoint": data})

    def _result_body(self, result: Any, parts_ok: bool) -> tuple[dict[str, Any], list[parts.Part]]:
        """The final body of a result, and the parts to send before it (a result too big for one message)."""
        result = result if isinstance(result, dict) else {"value": result}
        try:
            if self.in_process:
                why = body_problem(result, "the handler's result", parts.MAX_PARTED)
                if why is not None:
                    raise parts.PartError(why)
                ref, ps = None, []
            else:
                ref, ps = parts.plan(result, "the handler's result", allowed=parts_ok)
        except parts.PartError as exc:
            return {"state": "failed", "error": str(exc)}, []
        if ref is None:
            return {"state": "succeeded", "result": result}, []
        return {"state": "succeeded", "result": None, "result_ref": ref.body()}, ps

    async def _run(self, task_id: str, name: str, args: dict[str, Any], attempt: int | None,
                   checkpoint: dict[str, Any] | None, deadline_ms: int | None, parts_ok: bool = False) -> None:
        base = {"task_id": task_id, "attempt": attempt, "result": None, "error": None}
        started = None
        try:
            fn = self.handlers.get(name)
            if fn is None:
                await self._report(base | {"state": "failed", "error": f"no handler {name!r} on {self.node}; "
                                                                        f"has {sorted(self.handlers)}"})
                return
            async with self._sem:
                timeout = self.max_seconds
                if deadline_ms is not None:
                    timeout = min(timeout, deadline_ms / 1000 - self.clock())
                    if timeout <= 0:
                        await self._report(base | {"state": "expired", "error": "deadline passed before it started"})
                        return
                started = int(self.clock() * 1000)
                await self._report(base | {"state": "running", "started": started})
                try:
                    ctx = TaskContext(task_id, attempt, checkpoint, functools.partial(self._save, task_id, attempt))
                    call = fn(args, ctx) if takes_context(fn) else fn(args)
                    result = await asyncio.wait_for(call, timeout)
                except asyncio.CancelledError:
                    raise
                except TimeoutError:
                    body = {"state": "failed", "error": f"handler timed out after {timeout:.0f} s"}
                except Exception as exc:  # noqa: BLE001 - a handler's failure is its task's, never the pool's
                    if type(exc).__name__ == "TaskFailed":  # the handler's own clear message (bad args...)
                        body = {"state": "failed", "error": str(exc)}
                    else:  # a bug: the operator gets the traceback
                        tb = "".join(traceback.format_exception(exc, limit=-8))
                        body = {"state": "failed", "error": f"{type(exc).__name__}: {exc}\n{tb}".rstrip()}
                else:
                    body, result_parts = self._result_body(result, parts_ok)
                    for part in result_parts:  # before the final result, in order
                        await self._report({"task_id": task_id, "attempt": attempt, "part": part.body()})
                await self._report(base | body | {"started": started, "finished": int(self.clock() * 1000)})
        except asyncio.CancelledError:
            await asyncio.shield(self._report(base | {"state": "cancelled", "started": started,
                                                      "finished": int(self.clock() * 1000)}))
        finally:
            cur = self._runs.get(task_id)
            if cur is not None and cur.attempt == attempt:
                del self._runs[task_id]
