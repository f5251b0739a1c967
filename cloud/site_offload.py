"""Site tasks gateways offload to the cloud: run them on the cloud's workers, answer each gateway in order.

A gateway schedules the tasks its devices submit (docs/protocol.md §3, "Site tasks"); the cloud is one of
its executors. The gateway sends a ``task_cmd`` on its ``cws/v1/{site}/{gateway}/task/offload`` through
its uplink outbox; ingest checks it like every uplink message (the sender must be a gateway of that site),
stores it once by ``(from, seq)`` and acks it end to end. The daemon then hands the stored body to
:meth:`SiteOffloads.offer`, which:

- runs it in its own :class:`cwsnet.executor.LocalWorkers` pool (``cloud_workers`` slots, the cloud's
  handler registry, node ``cloud``), each ``(task_id, attempt)`` at most once (a repeat is ignored, a
  higher attempt runs again and supersedes an older one still running);
- stops it on a ``cancel: true`` command (of that attempt, or any when the attempt is absent);
- drops, unrun and unanswered, an offload whose clear header ``exp`` has passed: the gateway has taken
  the task back by then (its lease), so running it would only waste a worker;
- answers ``failed`` without running when it cannot run it (``cloud_workers: 0``, no text ``handler``
  or map ``args``), as a gateway's pool does.

Every report of the pool (``running``, ``checkpoint``, the final one, each with its ``attempt``) is sealed
from the cloud to the gateway as a ``task_result`` on the gateway's ``task/cmd`` (QoS 1, not retained).
Reports to one gateway go out in the order they were made, one at a time, so a ``running`` never
overtakes its checkpoint or its final result. A publish that fails (the cloud's broker link is down)
keeps the report at the head of its gateway's queue and retries when the link is back; at most
:data:`MAX_PENDING` reports wait per gateway (the oldest is dropped with a warning: the gateway's lease
covers a lost report by moving the task).

Nothing here is durable: an offload acked and not yet run when the cloud stops is the gateway's to move
(its lease runs out, as for any executor that went silent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from cwsnet import topics
from cwsnet.errors import CwsError
from cwsnet.executor import LocalWorkers
from cwsnet.mqtt import LinkError

log = logging.getLogger("cwsnet.cloud.site_offload")

#: reports waiting to be sent to one gateway (link down); beyond it the oldest is dropped
MAX_PENDING = 1000
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "expired"})
#: pause before retrying a publish that failed while the link still looked up (doubles, up to the max)
RETRY_PAUSE = 0.2
RETRY_PAUSE_MAX = 5.0


class SiteOffloads:
    """See the module's docstring. ``offer`` and the pool's reports run on the daemon's event loop;
    :meth:`run` (in the daemon's task group) sends the replies and stops the pool when it ends."""

    def __init__(self, endpoint: Any, link: Any, *, handlers: dict[str, Any], slots: int, node: str = "cloud",
                 clock: Callable[[], float] = time.time, metrics: Any = None, max_pending: int = MAX_PENDING,
                 publish_timeout: float = 10.0) -> None:
        self.endpoint, self.link, self.node, self.clock = endpoint, link, node, clock
        self.slots, self.metrics, self.max_pending = slots, metrics, max_pending
        self.publish_timeout = publish_timeout
        self.workers = LocalWorkers(handlers, slots, self._report, node=node, clock=clock)
        #: (task_id, attempt) running or waiting for a slot here -> (site, gateway) its reports go to
        self._owner: dict[tuple[str, int | None], tuple[str, str]] = {}
        self._pending: dict[str, deque[tuple[str, dict[str, Any]]]] = {}  # gateway -> (site, report), in order
        self._wake: dict[str, asyncio.Event] = {}
        self._senders: set[str] = set()
        self._tg: asyncio.TaskGroup | None = None

    @staticmethod
    def wants(topic: str) -> bool:
        """For ingest: keep the stored body of a message on ``topic`` (a gateway's offload) for :meth:`offer`."""
        return topic.endswith("/" + topics.OFFLOAD_CHANNEL)

    # ---- what ingest stored (event loop) ----

    def offer(self, gateway: str, site: str, body: dict[str, Any], expires_ms: int | None = None) -> bool:
        """A gateway's stored offload (ingest checked ``task_id``, ``attempt``, ``cancel``, ``deadline`` and
        ``checkpoint``). True if a run started (or a cancel stopped one)."""
        # runs are kept per gateway (``gw-home/s-...``): one gateway can never cancel, supersede or block
        # another's run of a task id, whatever ids it sends
        tid = f"{gateway}/{body['task_id']}"
        attempt = body.get("attempt")
        if body.get("cancel") is True:  # a cancel never starts anything, stale or not
            stopped = self.workers.cancel(tid, attempt)
            log.info("site task %s (attempt %s) of %s: cancel %s", tid, attempt, gateway,
                     "stops it" if stopped else "for a run not held here (a late command of it will not run)")
            return stopped
        now_ms = int(self.clock() * 1000)
        if expires_ms is not None and expires_ms < now_ms:
            log.info("site task %s (attempt %s) from %s not run: its offload expired %.1f s ago (the gateway has "
                     "taken it back by now)", tid, attempt, gateway, (now_ms - expires_ms) / 1000)
            self._count("stale")
            return False
        handler, args = body.get("handler"), body.get("args", {})
        why = None
        if self.slots <= 0:
            why = f"the cloud runs no offloaded tasks ({self.node}: cloud_workers: 0)"
        elif not isinstance(handler, str) or not isinstance(args, dict):
            why = f"an offloaded task needs a text 'handler' and a map 'args' (got {type(handler).__name__} and " \
                  f"{type(args).__name__})"
        if why is not None:
            if (tid, attempt) in self._owner:
                return False  # a repeat of one that runs: ignored like any repeat
            log.warning("site task %s (attempt %s) from %s refused: %s", tid, attempt, gateway, why)
            self._count("refused")
            self._queue(gateway, site, {"task_id": body["task_id"], "attempt": attempt, "state": "failed",
                                        "result": None,
                                        "error": why, "started": None, "finished": now_ms})
            return False
        checkpoint = body.get("checkpoint") if isinstance(body.get("checkpoint"), dict) else None
        deadline = body.get("deadline")
        held = (tid, attempt) in self._owner
        self._owner[(tid, attempt)] = (site, gateway)
        if not self.workers.start(tid, handler, args, attempt=attempt, checkpoint=checkpoint,
                                  deadline_ms=deadline if isinstance(deadline, int) else None):
            if not held:  # a repeat of a run that ended (or a cancelled attempt): nothing will report
                self._owner.pop((tid, attempt), None)
            return False
        log.info("site task %s (attempt %s) from %s: running %s on the cloud's workers", tid, attempt, gateway, handler)
        self._count("started")
        return True

    def _report(self, body: dict[str, Any]) -> None:
        """A step of an offloaded run (from the pool): queued for its gateway, in order."""
        key = (body.get("task_id"), body.get("attempt"))
        body = body | {"task_id": str(body.get("task_id")).split("/", 1)[-1]}  # the gateway's own task id
        state = body.get("state")
        owner = self._owner.pop(key, None) if state in FINAL_STATES else self._owner.get(key)
        if owner is None:
            log.warning("report %s of site task %s (attempt %s) has no gateway to go to; dropped", state, *key)
            return
        if state in FINAL_STATES:
            self._count(str(state))
        self._queue(owner[1], owner[0], body)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.site_offloads.labels(outcome=outcome).inc()

    def _queue(self, gateway: str, site: str, body: dict[str, Any]) -> None:
        q = self._pending.setdefault(gateway, deque())
        if len(q) >= self.max_pending:
            _, old = q.popleft()
            log.warning("%d replies to %s wait unsent; dropped the oldest (%s of site task %s, attempt %s): the "
                        "gateway's lease moves the task", len(q) + 1, gateway, old.get("state"), old.get("task_id"),
                        old.get("attempt"))
            if self.metrics is not None:
                self.metrics.site_offload_replies_dropped.inc()
        q.append((site, body))
        self._wake.setdefault(gateway, asyncio.Event()).set()
        self._start_sender(gateway)

    # ---- sending, in order, per gateway ----

    def _start_sender(self, gateway: str) -> None:
        if self._tg is None or gateway in self._senders:
            return  # not running yet: run() starts the senders of what was queued before
        self._senders.add(gateway)
        self._tg.create_task(self._sender(gateway), name=f"site-offload-replies-{gateway}")

    async def _sender(self, gateway: str) -> None:
        """Send ``gateway``'s replies one at a time, oldest first; a failed one is retried before the next."""
        q = self._pending[gateway]
        wake = self._wake[gateway]
        pause = RETRY_PAUSE
        while True:
            if not q:
                wake.clear()
                await wake.wait()
                continue
            if not self.link.connected.is_set():
                await self.link.connected.wait()
            head = q[0]
            site, body = head
            topic = topics.task_cmd(site, gateway)
            try:
                # sealed at each try: a fresh seq, so a reply held through an outage is never below the
                # gateway's replay window when it finally goes
                payload, header = self.endpoint.seal(topic, "task_result", body, to=gateway)
            except CwsError as exc:  # no usable key for the gateway (revoked, removed): retrying cannot help
                log.error("reply %s of site task %s to %s not sent: %s", body.get("state"), body.get("task_id"),
                          gateway, exc)
                if q and q[0] is head:
                    q.popleft()
                continue
            try:
                await self.link.publish(topic, payload, qos=1, timeout=self.publish_timeout)
            except (LinkError, TimeoutError) as exc:
                log.warning("reply %s of site task %s to %s not sent (%s); retrying in order", body.get("state"),
                            body.get("task_id"), gateway, exc)
                if self.link.connected.is_set():
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, RETRY_PAUSE_MAX)
                continue
            except Exception:
                log.exception("reply %s of site task %s to %s failed; retrying", body.get("state"),
                              body.get("task_id"), gateway)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE_MAX)
                continue
            pause = RETRY_PAUSE
            if q and q[0] is head:  # (the head may have been dropped for room while it was being sent)
                q.popleft()
            log.debug("reply %s of site task %s (attempt %s) sent to %s seq=%d", body.get("state"),
                      body.get("task_id"), body.get("attempt"), gateway, header.seq)

    def pending(self, gateway: str) -> int:
        """Replies waiting to be sent to ``gateway``."""
        return len(self._pending.get(gateway, ()))

    async def run(self) -> None:
        """Send the replies until cancelled; then stop every run (their ``cancelled`` reports are not sent:
        the gateway's lease moves those tasks)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for gateway in list(self._pending):
                    self._start_sender(gateway)
                await asyncio.Event().wait()
        finally:
            self._tg = None
            self._senders.clear()
            self.workers.cancel_all()
