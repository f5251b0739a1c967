"""The cloud's workload service: the sans-I/O :class:`cwsnet.scheduler.Scheduler` wired to the store,
the cloud broker and the cloud's own worker pool (issue 7).

- **Executors** are learnt from what ingest stores: a node's ``birth``/``status`` (its ``slots``,
  ``capabilities``, ``handlers``, load, and the ``tasks`` it holds: a heartbeat) makes it an
  executor; its ``death`` (the broker publishes its will when the connection drops, so a SIGKILLed
  agent is known at once) takes its tasks back. A node silent past the lease loses them too. The
  cloud itself is an executor of tier ``cloud`` with ``cloud_workers`` slots running the built-in
  handlers in-process.
- **Assignments** go out as sealed ``task_cmd`` messages with ``attempt``, ``lease`` and the last
  ``checkpoint`` (protocol §3); a cancel is a ``task_cmd`` with ``cancel: true``. Results come back as
  ``task_result`` with the ``attempt`` echoed: only the lease holder's count (exactly once per task).
- **Persistence**: every task the scheduler touched is written to the ``tasks`` table (its scheduler
  record, where it runs and why) *before* its commands go out, and a submission is stored before the
  API answers. After a restart the open tasks are restored: queued ones queue again, held ones stay
  with their executor if it reports within the lease, else they move.

Everything runs on the daemon's event loop; the API's threads use the ``*_threadsafe`` methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from cloud.store import NewEvent, Store
from cloud.views import change, event_view, task_view
from cwsnet import parts, topics
from cwsnet.errors import CwsError
from cwsnet.executor import LocalWorkers
from cwsnet.mqtt import LinkError
from cwsnet.policy.offload import OffloadEngine
from cwsnet.scheduler import (
    Assign,
    Cancel,
    Cmd,
    Completed,
    Drained,
    ExecutorLost,
    ExecutorStatus,
    Ignored,
    Requeued,
    Requirements,
    Scheduler,
    Submitted,
    Task,
    executor_status,
)

log = logging.getLogger("cwsnet.cloud.tasks")

#: how long an API call waits for the event loop to take a submission / answer a question
API_WAIT = 10.0


def cloud_handlers(names: list[str] | None) -> dict[str, Any]:
    """The cloud's handler registry (config ``handlers``; None: the built-ins and installed plugins, not
    ``shell``). One registry serves the cloud's scheduled workers and the site tasks gateways offload to it
    (cloud/site_offload.py), so both run exactly the same handlers. ``ConfigError`` for an unknown name."""
    from edge_agent.handlers import defaults, registry

    return registry(names) if names is not None else defaults()


class TaskService:
    """See the module's docstring."""

    def __init__(self, store: Store, endpoint: Any, link: Any, *, node: str, policies: Any = None,
                 lease: float = 5.0, workers: int = 2, handlers: dict[str, Any] | None = None,
                 fanout: Any = None, metrics: Any = None, clock: Callable[[], float] = time.time,
                 publish_timeout: float = 10.0) -> None:
        self.store, self.endpoint, self.link = store, endpoint, link
        self.node, self.clock, self.fanout, self.metrics = node, clock, fanout, metrics
        self.lease, self.workers, self.publish_timeout = lease, workers, publish_timeout
        self.handlers = handlers if handlers is not None else cloud_handlers(None)
        self.sched = Scheduler(OffloadEngine(policies), lease=lease)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._touched: dict[str, None] = {}
        self._out: list[Cmd] = []
        # the cloud's own workers: their reports go straight to the scheduler
        # (the pool checks results and checkpoints like ingest does: one the store cannot keep fails the task)
        self.local = LocalWorkers(self.handlers, workers, lambda body: self._result(self.node, body, self.clock()),
                                  node=node, clock=clock, in_process=True)
        self._sending: dict[str, asyncio.Task[Any]] = {}  # node -> its last command's send (kept in order)
        self._ready = asyncio.Event()
        self._carrying = asyncio.Lock()
        self._early: list[tuple[str, str, str, str, Any]] = []  # what ingest stored before the restore ended
        self._deaf_since: float | None = None  # the cloud's broker link is down: nobody can be heard

    # ---- policies ----

    def use_policies(self, pset: Any) -> None:
        self.sched.set_offload(OffloadEngine(pset))
        self._wake.set()

    # ---- what ingest stored (event loop) ----

    @staticmethod
    def wants(topic: str) -> bool:
        """The topics whose stored messages the service takes (:meth:`observe`)."""
        return topic.endswith(("/status", "/task/result"))

    def observe(self, sender: str, role: str, site: str, kind: str, body: Any) -> None:
        """A newly stored message: statuses make executors (and heartbeats), deaths take their work
        back, task results move scheduled tasks."""
        if not isinstance(body, dict) or sender == self.node:  # (the cloud's own workers report directly)
            return
        if kind == "task_result" and "site_task" in body:  # a gateway's site task: its scheduler's, never ours
            return
        if not self._ready.is_set():  # the open tasks are being restored: their results must find them
            self._early.append((sender, role, site, kind, body))
            return
        now = self.clock()
        if kind in ("birth", "status"):
            try:
                st = executor_status(sender, role, site, body)
            except ValueError as exc:
                log.warning("status of %s: not usable for scheduling: %s", sender, exc)
                return
            if st is not None:
                self._apply(self.sched.executor_seen(st, now))
        elif kind == "death":
            if sender in self.sched.executors:
                self._apply(self.sched.executor_gone(sender, now, "gone: its connection dropped (death message)"))
        elif kind == "task_result":
            self._result(sender, body, now)

    def renew(self, sender: str, task_id: Any, attempt: Any) -> None:
        """A part of ``task_id``'s result from ``sender`` was stored: it is still delivering it, so its lease
        holds (a big result on a slow link takes longer than a lease to arrive)."""
        if self._ready.is_set() and isinstance(task_id, str) and (attempt is None or isinstance(attempt, int)):
            self._apply(self.sched.renew(task_id, sender, self.clock(), attempt))

    def _result(self, sender: str, body: dict[str, Any], now: float) -> None:
        # a direct task's (ingest stored it) or one unknown here: no command
        self._apply(self.sched.report(sender, body, now), body.get("task_id") if isinstance(body, dict) else None)

    # ---- commands ----

    def _apply(self, cmds: list[Cmd], task_id: str | None = None) -> None:
        """Queue the scheduler's commands; the loop persists the tasks they touch (and ``task_id``, changed
        without a command: started, checkpointed), then carries them out."""
        if task_id is not None and self.sched.get(task_id) is not None:
            self._touched[task_id] = None
            self._wake.set()
        if not cmds:
            return
        for c in cmds:
            tid = getattr(c, "task_id", None)
            if tid is not None:
                self._touched[tid] = None
            elif isinstance(c, ExecutorLost):
                self._touched.update(dict.fromkeys(c.task_ids))
        self._out.extend(cmds)
        self._wake.set()

    def _row(self, t: Task) -> dict[str, Any]:
        node = ((t.holders() or [None])[0] or next((c.node for c in t.copies if c.node), None)
                or next((a.placement.node for a in reversed(t.assignments) if a.placement.node), None))
        started = next((when for when, event, _ in t.history if event == "started"), None)
        return {"id": t.id, "handler": t.handler, "args": t.args, "state": t.state, "site": t.site, "node": node,
                "placement": self.sched.explain(t.id), "sched": t.to_record(), "result": t.result, "error": t.error,
                "deadline": None if t.deadline is None else int(t.deadline * 1000), "attempts": t.attempts,
                "idempotency_key": t.idempotency_key,
                "disagreement": [list(d) for d in t.disagreement] if t.disagreement else None,
                "created": int((t.submitted_at or self.clock()) * 1000),
                "started": None if started is None else int(started * 1000),
                "finished": None if t.finished_at is None else int(t.finished_at * 1000)}

    async def _carry_out(self) -> None:
        """Persist the touched tasks, then carry out the commands, in order. One at a time (the loop and
        the API's calls share it); if the store fails, the commands wait for the next try: nothing is
        sent that is not stored, and nothing is dropped."""
        async with self._carrying:
            await self._carry_out_locked()

    async def _carry_out_locked(self) -> None:
        cmds, self._out = self._out, []
        touched, self._touched = list(self._touched), {}
        rows = [self._row(t) for tid in touched if (t := self.sched.get(tid)) is not None]
        if rows:
            try:
                await asyncio.to_thread(self.store.save_scheduled, rows, now=int(self.clock() * 1000))
            except BaseException:
                self._out[:0] = cmds  # back in front, in order, for the next try
                self._touched = dict.fromkeys(touched) | self._touched
                raise
            if self.fanout is not None:
                for tid in touched:
                    stored = await asyncio.to_thread(self.store.get_task, tid)
                    if stored is not None:
                        self.fanout.publish(change("task", task_view(stored)))
        events: list[NewEvent] = []
        now_ms = int(self.clock() * 1000)
        for c in cmds:
            if isinstance(c, Assign):
                if c.node == self.node:
                    self.local.start(c.task_id, c.handler, c.args, attempt=c.attempt, checkpoint=c.checkpoint,
                                     deadline_ms=None if c.deadline is None else int(c.deadline * 1000))
                else:
                    self._send(c.node, {"task_id": c.task_id, "handler": c.handler, "args": c.args,
                                        "deadline": None if c.deadline is None else int(c.deadline * 1000),
                                        "attempt": c.attempt, "lease": self.lease, "checkpoint": c.checkpoint,
                                        "parts": True},  # its result may come in parts (protocol §3)
                               # a command that cannot reach its executor within two leases is stale: the
                               # copy has been re-queued by then, so a gateway holding it drops it then
                               min(c.deadline or float("inf"), self.clock() + 2 * self.lease))
                log.info("%s", c.describe())
            elif isinstance(c, Cancel):
                if c.node == self.node:
                    self.local.cancel(c.task_id, c.attempt)
                elif c.node:
                    self._send(c.node, {"task_id": c.task_id, "cancel": True, "attempt": c.attempt},
                               self.clock() + 2 * self.lease)
                log.info("%s", c.describe())
            elif isinstance(c, Completed):
                if self.metrics is not None:
                    self.metrics.tasks.labels(state=c.state).inc()
                    t = self.sched.get(c.task_id)
                    if t is not None and t.submitted_at is not None:
                        self.metrics.task_seconds.labels(kind="scheduled", state=c.state).observe(
                            max(0.0, (t.finished_at or self.clock()) - t.submitted_at))
                log.info("%s", c.describe())
                if c.disagreement:
                    said = "; ".join(f"{n} said {r!r}"[:200] for n, r in c.disagreement)
                    events.append(NewEvent(now_ms, self.node, "task.disagreement", "warning",
                                           f"task {c.task_id}: replicas returned different results ({said})",
                                           {"task_id": c.task_id, "results": [[n, r] for n, r in c.disagreement]}))
                self.sched.forget(c.task_id)
            elif isinstance(c, ExecutorLost):
                log.warning("%s", c.describe())
                if c.task_ids:
                    events.append(NewEvent(now_ms, c.node, "task.executor_lost", "warning",
                                           f"{c.node} lost its lease ({c.reason}); {len(c.task_ids)} task(s) move",
                                           {"node": c.node, "reason": c.reason, "tasks": list(c.task_ids)}))
            elif isinstance(c, Drained):
                log.info("%s", c.describe())
                events.append(NewEvent(now_ms, c.node, "node.drained", "info", f"{c.node} is drained: it holds no "
                                       "task and gets none", {"node": c.node}))
            elif isinstance(c, Requeued | Ignored):
                log.info("%s", c.describe())
            elif isinstance(c, Submitted):
                pass
        if events:
            try:
                stored = await asyncio.to_thread(self.store.add_events, events)
            except Exception:
                log.exception("recording %d task events failed", len(events))
            else:
                if self.fanout is not None:
                    for e in stored:
                        self.fanout.publish(change("event", event_view(e)))

    def _send(self, node: str, body: dict[str, Any], expires: float | None) -> None:
        """Seal and publish a task command; ``expires`` (s) goes in the clear header: a gateway holding
        the command for an offline device drops it then."""
        async def go() -> None:
            try:
                entry = await asyncio.to_thread(self.store.get_node, node)
                if entry is None:
                    log.warning("task command for %s not sent: not a registered node", node)
                    return
                topic = topics.task_cmd(entry.site, node)
                msgs = parts.command_messages(body)  # args too big for one message go first, in parts
                exp = None if expires is None else expires + (len(msgs) - 1) * parts.SECONDS_PER_PART
                for msg in msgs:
                    payload, _ = self.endpoint.seal(topic, "task_cmd", msg, to=node,
                                                    expires=None if exp is None else int(exp * 1000))
                    await self.link.publish(topic, payload, qos=1, timeout=self.publish_timeout)
            except (LinkError, CwsError, TimeoutError, parts.PartError) as exc:
                # the lease covers it: an assignment that never arrives is re-queued when it expires
                log.warning("task command %s for %s not sent: %s", body.get("task_id"), node, exc)

        prev = self._sending.get(node)

        async def in_order() -> None:
            if prev is not None and not prev.done():
                await asyncio.wait([prev])  # a node gets its commands in the order they were decided
            await go()

        t = asyncio.get_running_loop().create_task(in_order())
        self._sending[node] = t
        t.add_done_callback(lambda done: self._sending.pop(node, None) if self._sending.get(node) is done else None)

    # ---- the cloud's own workers ----

    def _cloud_status(self) -> ExecutorStatus:
        # it lists what it runs: a copy restored as held by the cloud (the previous process) is not run by
        # this one, so it is lost after the lease and moves, like any executor's unreported task
        # its args never travel: it takes any size ("parts", protocol §3)
        return ExecutorStatus(self.node, "cloud", "", capacity=self.workers, handlers=frozenset(self.handlers),
                              capabilities=frozenset({parts.CAPABILITY}),
                              queue=len(self.local.running()), running=tuple(self.local.running()))

    # ---- the loop ----

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        restored = await asyncio.to_thread(self.store.open_scheduled)
        now = self.clock()
        for t in restored:
            if t.sched is None:
                continue
            try:
                self.sched.restore(t.sched, now)
                self._touched[t.id] = None
            except (ValueError, TypeError, KeyError) as exc:
                log.error("task %s cannot be restored (%s); marked failed", t.id, exc)
                await asyncio.to_thread(self.store.fail_scheduled, t.id, f"cannot be restored after a restart: {exc}")
        if restored:
            log.info("restored %d open scheduled task(s)", len(restored))
        self._ready.set()
        try:
            early, self._early = self._early, []
            for item in early:
                self.observe(*item)
            while True:
                now = self.clock()
                self._apply(self.sched.executor_seen(self._cloud_status(), now))
                deaf = not self.link.connected.is_set()
                if deaf and self._deaf_since is None:
                    # the cloud cannot hear anyone (nor send): silence is not the executors' fault, so no
                    # lease expires (and nothing is assigned) until the link is back; then each executor
                    # gets a full lease to report again
                    self._deaf_since = now
                    log.warning("cloud broker link down: task leases are paused until it is back")
                elif not deaf and self._deaf_since is not None:
                    log.info("cloud broker link back after %.1f s: every executor gets a full lease to report",
                             now - self._deaf_since)
                    self._deaf_since = None
                    self._apply(self.sched.pardon(now))
                if not deaf:
                    self._apply(self.sched.tick(now))
                if self._out or self._touched:
                    try:
                        await self._carry_out()
                    except Exception:
                        log.exception("carrying out the scheduler's commands failed; retrying")
                        await asyncio.sleep(0.5)
                        continue
                wait = self.sched.next_wakeup(self.clock()) if not deaf else None
                wait = min(wait if wait is not None else 1.0, self.lease / 3)  # the cloud heartbeats itself too
                self._wake.clear()
                if not self._out and not self._touched:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(wait, 0.01)):
                            await self._wake.wait()
        finally:
            self.local.cancel_all()

    async def ready(self) -> None:
        """Until the service runs (its open tasks restored) and takes submissions."""
        await self._ready.wait()

    # ---- the API's entry points (any thread) ----

    def _call(self, fn: Callable[[], Any]) -> Any:
        loop = self._loop
        if loop is None:
            raise CwsError("the task service is not running yet")

        async def wrapped() -> Any:
            await self._ready.wait()
            out = fn()
            if self._out or self._touched:
                await self._carry_out()  # persisted before the caller hears back
            return out

        return asyncio.run_coroutine_threadsafe(wrapped(), loop).result(API_WAIT)

    def submit_threadsafe(self, spec: dict[str, Any]) -> tuple[str, bool]:
        """Submit a task (``spec``: handler, args, site, origin, origin_role, priority, replicas, mode,
        requirements, max_attempts, timeout s, idempotency_key, data_class, input_bytes). Returns (task
        id, duplicate). ``ValueError`` for a bad spec."""
        key = spec.get("idempotency_key")
        if key is not None:
            known = self.store.task_by_key(key)
            if known is not None:
                return known.id, True
        req = spec.get("requirements") or {}
        timeout = spec.get("timeout")

        def go() -> tuple[str, bool]:
            now = self.clock()
            why = self._handler_problem(spec["handler"], spec.get("site") or "")
            if why is not None:
                raise ValueError(why)
            task = Task(
                id=uuid.uuid4().hex, handler=spec["handler"], args=dict(spec.get("args") or {}),
                requirements=Requirements(frozenset(req.get("capabilities") or ()), req.get("mem_free"),
                                          req.get("cpu")),
                data_class=spec.get("data_class"), input_bytes=int(spec.get("input_bytes") or 0),
                origin=spec.get("origin") or "", site=spec.get("site") or "",
                origin_role=spec.get("origin_role") or "app",
                deadline=None if timeout is None else now + float(timeout),
                priority=int(spec.get("priority", 5)), max_attempts=int(spec.get("max_attempts", 3)),
                backoff=float(spec.get("backoff", 1.0)), replicas=int(spec.get("replicas", 1)),
                mode=spec.get("mode", "first"), idempotency_key=key,
            )
            cmds = self.sched.submit(task, now)
            self._apply(cmds)
            sub = next(c for c in cmds if isinstance(c, Submitted))
            return sub.task_id, sub.duplicate

        return self._call(go)

    def _handler_problem(self, handler: str, site: str = "") -> str | None:
        """Why no executor that may run a task of ``site`` will take ``handler`` (None: one of the site's or
        the cloud's executors offers it, or one does not say what it offers)."""
        if handler == "ota":  # it replaces one named device's firmware: never placed by the scheduler
            return "handler: ota updates one device's firmware: submit it as a direct task (with target)"
        executors = [ex for ex in self.sched.executors.values() if ex.tier == "cloud" or (site and ex.site == site)]
        offered = set().union(*(ex.handlers or () for ex in executors))
        if handler in offered or any(ex.handlers is None for ex in executors):
            return None
        return f"handler: no executor offers {handler!r} (offered: {', '.join(sorted(offered)) or 'none'})"

    def handler_problem_threadsafe(self, handler: str, site: str = "") -> str | None:
        return self._call(lambda: self._handler_problem(handler, site))

    def cancel_threadsafe(self, task_id: str, reason: str = "cancelled by an operator") -> bool:
        def go() -> bool:
            t = self.sched.get(task_id)
            if t is None or t.terminal:
                return False
            self._apply(self.sched.cancel(task_id, self.clock(), reason))
            return True

        return self._call(go)

    def cancel_site_threadsafe(self, gateway: str, task_id: str) -> None:
        """Ask ``gateway`` to cancel its site task ``task_id`` (protocol §3): a ``task_cmd`` with ``cancel``
        and ``site_task`` on the gateway's own topic. The cloud's row changes when the gateway reports it."""
        self._call(lambda: self._send(gateway, {"task_id": task_id, "cancel": True, "site_task": True},
                                      self.clock() + 60.0))

    def drain_threadsafe(self, node: str, drain: bool = True) -> dict[str, Any]:
        """Drain (or undrain) an executor. ``KeyError`` if it is not a known executor."""
        def go() -> dict[str, Any]:
            now = self.clock()
            self._apply(self.sched.drain(node, now) if drain else self.sched.undrain(node, now))
            return self._executor_view(self.sched.executors[node], now)

        return self._call(go)

    def explain_threadsafe(self, task_id: str) -> str | None:
        def go() -> str | None:
            return self.sched.explain(task_id) if self.sched.get(task_id) is not None else None

        return self._call(go)

    def executors_threadsafe(self) -> list[dict[str, Any]]:
        def go() -> list[dict[str, Any]]:
            now = self.clock()
            return [self._executor_view(ex, now) for ex in sorted(self.sched.executors.values(),
                                                                  key=lambda e: (e.tier, e.node))]

        return self._call(go)

    @staticmethod
    def _executor_view(ex: Any, now: float) -> dict[str, Any]:
        m = ex.measured
        return {"node": ex.node, "tier": ex.tier, "site": ex.site or None, "live": ex.live, "draining": ex.draining,
                "slots": ex.capacity, "running": sorted(ex.running), "capabilities": sorted(ex.capabilities),
                "handlers": None if ex.handlers is None else sorted(ex.handlers),
                "cpu": m.cpu, "last_seen_s": round(max(0.0, now - ex.last_seen), 3)}
