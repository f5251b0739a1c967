"""The workload scheduler (issue 7), sans I/O: where tasks run, leases, retries, migration,
replicas and drains, as a pure state machine that returns *commands* for the I/O layer.

    sched = Scheduler(OffloadEngine(load_policies([Path("policies")])), lease=5.0)
    sched.executor_seen(ExecutorStatus("gw-1", "gateway", "home", capacity=4, cpu=0.1), now)
    sched.submit(Task("t-1", "sha256", {"data": "..."}, origin="dev-1", site="home", origin_role="device"), now)
    for cmd in sched.tick(now):          # Assign / Cancel / Requeued / Completed / ExecutorLost / Drained ...
        ...                              # the I/O layer publishes task_cmd, stores results, logs
    sched.started("t-1", "gw-1", now); sched.finished("t-1", "gw-1", True, {"sha256": "..."}, None, now)
    print(sched.explain("t-1"))

Nothing here reads a clock, sleeps, opens a socket or starts a thread: every method takes ``now``
(seconds on a monotonic-like clock) and returns the commands to carry out.

**Lifecycle.** A task is ``queued`` -> ``assigned`` (an :class:`Assign` went out) -> ``running``
(the executor said it started) -> ``succeeded`` | ``failed`` | ``cancelled`` | ``expired``. A task
with ``replicas: k`` has k *copies*, each with its own lease and attempts, on k distinct executors.

**Placement.** Each tick, ready copies (their backoff over) are taken highest priority first (9
before 0), then in submission order, and placed by the offload policy
(:meth:`cwsnet.policy.offload.OffloadEngine.place`) among the executors of the task's site and the
cloud that are live, not draining, have a free slot, meet the task's requirements and hold no other
copy of it. The queue the policy sees for each executor is the number of tasks the scheduler has
given it (or what it reports, if more), so work spreads by load within one tick. An origin held back
(busy, draining) is still shown to the policy, as offline, so that its measurements (``origin.cpu``)
count. ``wait`` leaves the copy queued; ``fail`` fails the task, unless a busy executor could take it
(then it waits for the slot).

**Leases.** Any message from an executor renews its lease. An executor silent for ``lease`` seconds
(at the first tick from then on) is declared lost (:class:`ExecutorLost`) and loses its tasks; so does one the I/O
layer reports gone (``executor_gone``). An executor that lists its tasks in heartbeats also loses a
task it has not listed for ``lease`` seconds (the assignment never reached it). A lost copy uses up
an attempt: it is re-queued after ``backoff * 2**(failures-1)`` seconds (at most ``backoff_cap``),
resuming from its last checkpoint, or fails for good when ``max_attempts`` are used up; a handler's
failure counts the same way. Only the executor holding the current lease (and ``attempt``) may
start, checkpoint or finish a copy: anything from another is ignored and recorded (:class:`Ignored`),
so a task's effect (its :class:`Completed`) happens exactly once.

**Replicas.** ``first``: the first success completes the task and cancels the other copies; it
fails when every copy has failed. ``majority``: results are compared as canonical CBOR; the task
succeeds when a strict majority of the k copies agree (the rest are cancelled), fails as soon as no
majority is possible any more, and ``disagreement`` records who said what whenever results differ.

**Drain.** A draining executor gets nothing new; copies it was given but has not started are taken
back (cancelled there, re-queued without using an attempt); running ones finish. :class:`Drained`
is reported once it holds nothing.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import cbor2

from cwsnet.policy.offload import TIERS, NodeMetrics, OffloadEngine, Placement, TaskInfo
from cwsnet.policy.offload import human_size as _size
from cwsnet.policy.schema import ROLES

STATES = ("queued", "assigned", "running", "succeeded", "failed", "cancelled", "expired")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
MODES = ("first", "majority")
#: a task keeps at most this many history entries (the first, then the latest)
MAX_HISTORY = 200
#: at most this many held-back executors listed in one explanation
MAX_HELD = 8

_HOLDING = ("assigned", "running")


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def canonical(result: Any) -> bytes:
    """The bytes results are compared by (``majority``): canonical CBOR, else sorted JSON."""
    try:
        return cbor2.dumps(result, canonical=True)
    except Exception:  # noqa: BLE001  (a value CBOR cannot encode: compare its JSON)
        return json.dumps(result, sort_keys=True, default=repr).encode()


def _t(when: float) -> str:
    """A time as explanations show it: UTC wall time for a wall clock (the daemons), else ``t=``
    seconds (a test's or a monotonic clock)."""
    if when > 1e9:
        return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    return f"t={when:.3f}"


def _short(v: Any, limit: int = 120) -> str:
    try:
        text = json.dumps(v, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- the task ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirements:
    """What an executor must offer to be offered the task."""

    capabilities: frozenset[str] = frozenset()
    mem_free: int | None = None  # bytes free at least
    cpu: float | None = None  # 0..1, at most

    def __post_init__(self) -> None:
        if isinstance(self.capabilities, str):
            raise ValueError("requirements.capabilities must be a set of names, not one string")
        object.__setattr__(self, "capabilities", frozenset(map(str, self.capabilities)))
        if self.mem_free is not None and (not isinstance(self.mem_free, int) or self.mem_free < 0):
            raise ValueError("requirements.mem_free must be a number of bytes >= 0")
        if self.cpu is not None and (not _num(self.cpu) or not 0 <= self.cpu <= 1):
            raise ValueError("requirements.cpu must be between 0 and 1")

    def refuses(self, ex: Executor) -> str | None:
        """Why ``ex`` does not meet these requirements (None: it does)."""
        missing = self.capabilities - ex.capabilities
        if missing:
            return f"lacks capabilit{'y' if len(missing) == 1 else 'ies'} {', '.join(sorted(missing))}"
        m = ex.measured
        if self.mem_free is not None:
            if m.mem_free is None:
                return f"mem_free not reported (needs {_size(self.mem_free)})"
            if m.mem_free < self.mem_free:
                return f"mem_free {_size(m.mem_free)} < {_size(self.mem_free)} required"
        if self.cpu is not None:
            if m.cpu is None:
                return f"cpu not reported (needs at most {self.cpu:g})"
            if m.cpu > self.cpu:
                return f"cpu {m.cpu:.2f} > {self.cpu:g} allowed"
        return None


@dataclass(eq=False)
class Copy:
    """One of a task's ``replicas`` copies: its lease, attempts, checkpoint and outcome."""

    index: int
    state: str = "queued"  # queued | assigned | running | succeeded | failed | cancelled
    node: str | None = None  # holding its lease (assigned, running), or that gave its result
    attempt: int = 0  # assignments so far: the current lease's number
    failures: int = 0  # attempts used up (lost leases, handler failures)
    not_before: float = 0.0  # backoff: not assigned before
    renewed: float = 0.0  # the holder's last sign that it is on it
    checkpoint: dict[str, Any] | None = None
    result: Any = None
    error: str | None = None
    avoid: str | None = None  # its last attempt was lost or failed there: elsewhere first

    @property
    def holds(self) -> bool:
        return self.state in _HOLDING


@dataclass(frozen=True)
class Decision:
    """One placement decision: the offload policy's :class:`Placement` and what the scheduler held
    back from it (executors it did not offer, and why)."""

    time: float
    placement: Placement
    held: tuple[tuple[str, str], ...] = ()
    copy: int = 0
    attempt: int | None = None  # for an assignment
    note: str | None = None  # the scheduler's own verdict on top of the policy's (waits for a slot)
    shared_from: str | None = None  # made for this task, alike, in the same tick (and reused)

    @property
    def action(self) -> str:
        return "wait" if self.note else self.placement.action

    def explain(self, info: TaskInfo | None = None, indent: str = "") -> str:
        p = self.placement if info is None or info == self.placement.task else dataclasses.replace(
            self.placement, task=info)
        lines = p.explain().split("\n")
        if self.held:
            lines.append("  held back by the scheduler (not offered to the offload policy):")
            shown = sorted(self.held)
            lines += [f"    {n}: {why}" for n, why in shown[:MAX_HELD]]
            if len(shown) > MAX_HELD:
                lines.append(f"    ... and {len(shown) - MAX_HELD} more")
        if self.note:
            lines.append(f"  scheduler: {self.note}")
        if self.shared_from:
            lines.append(f"  (decided for task {self.shared_from}, alike in handler, data class, origin and input "
                         "size class, in the same tick)")
        return "\n".join(indent + x for x in lines)


@dataclass(eq=False)
class Task:
    """A unit of work. The fields up to ``checkpoint`` are the submitter's; the rest is the
    scheduler's (read them, do not set them).

    ``priority``: 0 (lowest) .. 9 (highest). ``max_attempts``: how many attempts each copy may use
    up (a handler failure or a lost lease uses one; a run taken back by a drain does not).
    ``backoff``: seconds before the 2nd attempt, doubling each time, at most ``backoff_cap``.
    ``deadline``: absolute time (the scheduler's clock) after which the task expires."""

    id: str
    handler: str
    args: dict[str, Any] = field(default_factory=dict)
    requirements: Requirements = field(default_factory=Requirements)
    data_class: str | None = None
    input_bytes: int = 0
    origin: str = ""  # the node that submitted it, or the device it targets
    site: str = ""
    origin_role: str = "app"
    deadline: float | None = None
    priority: int = 5
    max_attempts: int = 3
    backoff: float = 1.0
    backoff_cap: float = 60.0
    replicas: int = 1
    mode: Literal["first", "majority"] = "first"
    idempotency_key: str | None = None
    checkpoint: dict[str, Any] | None = None  # the latest checkpoint reported (a restored task: resume from it)
    # ---- the scheduler's ----
    state: str = field(default="queued", init=False)
    attempts: int = field(default=0, init=False)  # assignments so far, over all copies
    result: Any = field(default=None, init=False)
    error: str | None = field(default=None, init=False)
    disagreement: list[tuple[str, Any]] | None = field(default=None, init=False)  # (node, result) when they differ
    history: list[tuple[float, str, str]] = field(default_factory=list, init=False)  # (time, event, detail)
    copies: list[Copy] = field(default_factory=list, init=False)
    decision: Decision | None = field(default=None, init=False)  # the latest placement decision
    assignments: list[Decision] = field(default_factory=list, init=False)
    submitted_at: float | None = field(default=None, init=False)
    finished_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"task {self.id!r}: {name} {what}")

        if not isinstance(self.id, str) or not self.id:
            raise ValueError("a task needs an id (a non-empty string)")
        if not isinstance(self.handler, str) or not self.handler:
            raise bad("handler", "must be a non-empty string")
        if not isinstance(self.args, dict):
            raise bad("args", "must be a mapping")
        if not isinstance(self.requirements, Requirements):
            raise bad("requirements", "must be a Requirements")
        if not isinstance(self.input_bytes, int) or self.input_bytes < 0:
            raise bad("input_bytes", "must be a number of bytes >= 0")
        if self.origin_role not in ROLES:
            raise bad("origin_role", f"must be one of {', '.join(ROLES)}")
        if self.deadline is not None and not _num(self.deadline):
            raise bad("deadline", "must be a time in seconds or None")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or not 0 <= self.priority <= 9:
            raise bad("priority", "must be an integer from 0 (lowest) to 9 (highest)")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise bad("max_attempts", "must be at least 1")
        if not _num(self.backoff) or self.backoff < 0 or not _num(self.backoff_cap) or self.backoff_cap < 0:
            raise bad("backoff", "and backoff_cap must be seconds >= 0")
        if not isinstance(self.replicas, int) or not 1 <= self.replicas <= 32:
            raise bad("replicas", "must be between 1 and 32")
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {', '.join(MODES)}")
        self._info = TaskInfo(self.id, self.handler, self.input_bytes, self.data_class, self.site, self.origin,
                              self.origin_role)
        self._order = 0
        self._lost: dict[str, tuple[float, str]] = {}  # node -> (when, why) it lost this task
        self._wait_sig: tuple[Any, ...] | None = None
        self._dropped = 0

    @property
    def info(self) -> TaskInfo:
        return self._info

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def retry_delay(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` used-up attempts."""
        return float(min(self.backoff_cap, self.backoff * (1 << min(max(failures - 1, 0), 30))))

    @property
    def placement_text(self) -> str:
        """The explanation of the latest placement decision ('' before the first)."""
        return self.decision.explain(self._info) if self.decision else ""

    def holders(self) -> list[str]:
        return [c.node for c in self.copies if c.holds and c.node]

    # the submitter's fields, as stored (JSON-able)
    _SPEC = ("id", "handler", "args", "data_class", "input_bytes", "origin", "site", "origin_role", "deadline",
             "priority", "max_attempts", "backoff", "backoff_cap", "replicas", "mode", "idempotency_key")
    _COPY = ("index", "state", "node", "attempt", "failures", "not_before", "checkpoint", "result", "error", "avoid")

    def to_record(self) -> dict[str, Any]:
        """What a store keeps to :meth:`Scheduler.restore` the task after a restart: the spec, the
        copies (leases, attempts, checkpoints, results) and the history. Decisions are kept as text."""
        req = self.requirements
        return {
            "spec": {k: getattr(self, k) for k in self._SPEC} | {
                "requirements": {"capabilities": sorted(req.capabilities), "mem_free": req.mem_free, "cpu": req.cpu}},
            "state": self.state, "attempts": self.attempts, "checkpoint": self.checkpoint,
            "submitted_at": self.submitted_at, "finished_at": self.finished_at,
            "copies": [{k: getattr(c, k) for k in self._COPY} for c in self.copies],
            "history": [list(h) for h in self.history], "dropped": self._dropped,
            "tiers": {a.placement.node: a.placement.tier for a in self.assignments if a.placement.node},
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Task:
        spec = dict(rec["spec"])
        req = spec.pop("requirements", None) or {}
        task = cls(**spec, requirements=Requirements(frozenset(req.get("capabilities") or ()), req.get("mem_free"),
                                                     req.get("cpu")), checkpoint=rec.get("checkpoint"))
        task.state, task.attempts = rec.get("state", "queued"), int(rec.get("attempts", 0))
        task.submitted_at, task.finished_at = rec.get("submitted_at"), rec.get("finished_at")
        task.copies = [Copy(**{k: c.get(k, getattr(Copy(0), k)) for k in cls._COPY}) for c in rec.get("copies", [])]
        task.history = [tuple(h) for h in rec.get("history", [])]  # type: ignore[misc]
        task._dropped = int(rec.get("dropped", 0))
        return task


# ---- executors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutorStatus:
    """What an executor reports about itself (from its status message)."""

    node: str
    tier: str  # device | gateway | cloud
    site: str = ""
    capacity: int = 1  # task slots
    capabilities: frozenset[str] = frozenset()
    handlers: frozenset[str] | None = None  # None: unknown (any handler assumed)
    cpu: float | None = None  # 0..1
    mem_free: int | None = None
    battery: float | None = None
    queue: int | None = None  # tasks waiting on it (its own count)
    latency_ms: float | None = None
    bandwidth_kbps: float | None = None
    running: tuple[str, ...] | None = None  # the task ids it runs, when the status lists them (a heartbeat)
    interval: float | None = None  # seconds between its statuses while idle (None: it heartbeats within the lease)
    max_payload: int | None = None  # the largest message it takes (the ESP32's 8 KB), when it says

    def __post_init__(self) -> None:
        if self.interval is not None and (not _num(self.interval) or self.interval <= 0):
            raise ValueError(f"executor {self.node}: interval must be a positive number of seconds")
        if self.tier not in TIERS:
            raise ValueError(f"executor {self.node}: tier must be one of {', '.join(TIERS)} (got {self.tier!r})")
        if not isinstance(self.capacity, int) or self.capacity < 0:
            raise ValueError(f"executor {self.node}: capacity must be a number of slots >= 0")
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))
        if self.handlers is not None:
            object.__setattr__(self, "handlers", frozenset(self.handlers))

    @classmethod
    def from_metrics(cls, m: NodeMetrics, capacity: int = 1, running: Iterable[str] | None = None,
                     interval: float | None = None) -> ExecutorStatus:
        return cls(m.node, m.tier, m.site, capacity, m.capabilities, m.handlers, m.cpu, m.mem_free, m.battery,
                   m.queue, m.latency_ms, m.bandwidth_kbps, None if running is None else tuple(running), interval)

    def metrics(self) -> NodeMetrics:
        return NodeMetrics(self.node, self.tier, self.site, True, self.cpu, self.mem_free, self.battery, self.queue,
                           self.latency_ms, self.bandwidth_kbps, self.capabilities, self.handlers)


#: bytes a sealed task command takes besides its args and checkpoint (header, ids, lease, the box)
COMMAND_OVERHEAD = 1024
#: an executor that does not say how often it reports is assumed to every this many seconds
DEFAULT_STATUS_INTERVAL = 10.0


def _opt_num(v: Any) -> float | None:
    if not _num(v):
        return None
    try:
        f = float(v)
    except OverflowError:  # a CBOR bignum: no measurement
        return None
    return f if math.isfinite(f) else None


def executor_status(node: str, role: str, site: str, body: dict[str, Any]) -> ExecutorStatus | None:
    """An executor's status from its ``birth``/``status`` body (protocol §3); None for a node that runs
    no scheduled work (no ``slots``: the firmware, an old agent). ``cpu`` in a status is a percentage."""
    slots = body.get("slots")
    if role not in ("device", "gateway") or not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
        return None
    cpu = _opt_num(body.get("cpu"))
    handlers = body.get("handlers")
    caps = body.get("capabilities")
    tasks = body.get("tasks")
    interval = _opt_num(body.get("interval"))
    mem_free = body.get("mem_free")
    agent = body.get("agent")
    max_payload = agent.get("max_payload") if isinstance(agent, dict) else None
    return ExecutorStatus(
        node, role, site, capacity=min(slots, 1024),
        capabilities=frozenset(c for c in caps if isinstance(c, str)) if isinstance(caps, list) else frozenset(),
        handlers=frozenset(h for h in handlers if isinstance(h, str)) if isinstance(handlers, list) else None,
        cpu=None if cpu is None else max(0.0, min(1.0, cpu / 100.0)),
        mem_free=mem_free if isinstance(mem_free, int) and not isinstance(mem_free, bool) else None,
        battery=_opt_num(body.get("battery")),
        queue=len(tasks) if isinstance(tasks, list) else None,
        running=tuple(t for t in tasks if isinstance(t, str)) if isinstance(tasks, list) else None,
        interval=min(interval, 3600.0) if interval and interval > 0 else DEFAULT_STATUS_INTERVAL,
        max_payload=max_payload if isinstance(max_payload, int) and not isinstance(max_payload, bool) else None,
    )


@dataclass(eq=False)
class Executor:
    """An executor as the scheduler knows it."""

    node: str
    tier: str
    site: str
    capacity: int
    capabilities: frozenset[str]
    handlers: frozenset[str] | None
    measured: NodeMetrics  # its latest reported measurements
    last_seen: float
    running: set[str] = field(default_factory=set)  # ids of the tasks it holds a lease on
    live: bool = True
    draining: bool = False
    reports_tasks: bool = False  # its heartbeats list its tasks: a task it stops listing is lost
    lost_at: float | None = None
    lost_why: str = ""  # why it was lost (silent past its lease, its death message, unreachable)
    drain_reported: bool = False
    interval: float | None = None  # its idle status interval (see ExecutorStatus)
    busy_since: float = 0.0  # when it was last given a task while holding none
    max_payload: int | None = None  # the largest message it takes, when it says (ExecutorStatus)
    _pm: NodeMetrics | None = field(default=None, repr=False)

    def silent_limit(self, lease: float) -> float:
        """Seconds of silence after which it is lost: the lease while it holds tasks (it heartbeats
        then); while idle, 2.5 of its status intervals, if longer."""
        if self.running or self.interval is None:
            return lease
        return max(lease, 2.5 * self.interval)

    def silent_since(self) -> float:
        """An idle executor that reports only every ``interval`` may have been heard of long ago: given
        a task, its lease counts from then."""
        return max(self.last_seen, self.busy_since) if self.running and self.interval is not None else self.last_seen

    @property
    def free(self) -> int:
        return self.capacity - len(self.running)

    def update(self, s: ExecutorStatus) -> None:
        self.tier, self.site, self.capacity, self.interval = s.tier, s.site, s.capacity, s.interval
        self.max_payload = s.max_payload
        self.capabilities, self.handlers, self.measured = s.capabilities, s.handlers, s.metrics()
        self._pm = None

    def metrics(self, online: bool = True) -> NodeMetrics:
        """What the offload policy sees: its measurements, with the queue the scheduler knows of."""
        q = len(self.running) if self.measured.queue is None else max(self.measured.queue, len(self.running))
        pm = self._pm
        if pm is None or pm.queue != q or pm.online != online:
            pm = self._pm = dataclasses.replace(self.measured, queue=q, online=online)
        return pm


# ---- commands for the I/O layer ---------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    """``submit`` took the task (``duplicate``: it was already known by id or idempotency key, and
    ``task_id`` is the existing task's)."""

    task_id: str
    duplicate: bool = False
    key: str | None = None

    def describe(self) -> str:
        return f"{self.task_id}: " + (f"already submitted (key {self.key})" if self.duplicate else "submitted")


@dataclass(frozen=True)
class Assign:
    """Send ``task_cmd`` to ``node``: run copy ``copy`` of the task, lease number ``attempt``,
    resuming from ``checkpoint`` when there is one."""

    task_id: str
    node: str
    attempt: int
    checkpoint: dict[str, Any] | None
    copy: int = 0
    handler: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None
    tier: str = ""
    reason: str = ""  # the deciding policy/rule

    def describe(self) -> str:
        resume = ", from its checkpoint" if self.checkpoint is not None else ""
        return f"{self.task_id}: assign to {self.tier} {self.node} (attempt {self.attempt}{resume}; {self.reason})"


@dataclass(frozen=True)
class Cancel:
    """Tell ``node`` to stop the task (it lost the lease, the task ended, or it is not its):
    ``attempt`` names the run to stop (None: whatever it runs of that task)."""

    task_id: str
    node: str
    reason: str
    attempt: int | None = None

    def describe(self) -> str:
        return f"{self.task_id}: cancel on {self.node} ({self.reason})"


@dataclass(frozen=True)
class Requeued:
    """A copy went back to the queue (lost lease, handler failure, drain); next try not before
    ``not_before``."""

    task_id: str
    reason: str
    node: str | None = None
    not_before: float = 0.0
    copy: int = 0

    def describe(self) -> str:
        return f"{self.task_id}: re-queued ({self.reason})"


@dataclass(frozen=True)
class Completed:
    """The task reached a terminal state: store its result or error (exactly once per task)."""

    task_id: str
    state: str
    result: Any = None
    error: str | None = None
    disagreement: tuple[tuple[str, Any], ...] | None = None

    def describe(self) -> str:
        flag = " (replicas disagreed)" if self.disagreement else ""
        return f"{self.task_id}: {self.state}{flag}" + (f": {self.error}" if self.error else "")


@dataclass(frozen=True)
class Ignored:
    """A message from an executor that had no effect (it does not hold the lease, the task ended)."""

    task_id: str
    node: str
    reason: str

    def describe(self) -> str:
        return f"{self.task_id}: ignored from {self.node} ({self.reason})"


@dataclass(frozen=True)
class ExecutorLost:
    """``node`` lost its lease (silent past it, or gone); ``task_ids`` were taken from it."""

    node: str
    reason: str
    task_ids: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"executor {self.node} lost ({self.reason}); {len(self.task_ids)} task(s) taken from it"


@dataclass(frozen=True)
class Drained:
    """A draining executor holds no task any more."""

    node: str

    def describe(self) -> str:
        return f"executor {self.node} drained"


Cmd = Submitted | Assign | Cancel | Requeued | Completed | Ignored | ExecutorLost | Drained


# ---- the scheduler ----------------------------------------------------------------------------


class Scheduler:
    """See the module's docstring. Every public method takes ``now`` and returns the commands to
    carry out, in order."""

    def __init__(self, offload: OffloadEngine, lease: float = 5.0) -> None:
        if not _num(lease) or lease <= 0:
            raise ValueError("lease must be a positive number of seconds")
        self.offload = offload
        self.lease = float(lease)
        self._sizes, self._exact = offload.size_classes()
        self.tasks: dict[str, Task] = {}
        self.executors: dict[str, Executor] = {}
        self._keys: dict[str, str] = {}  # idempotency key -> task id
        self._queue: dict[tuple[str, int], tuple[Task, Copy]] = {}  # queued copies
        self._deadlines: list[tuple[float, str]] = []
        self._order = 0
        self._out: list[Cmd] = []
        self._dirty = False  # something changed that a tick's assignment has not seen yet

    def set_offload(self, offload: OffloadEngine) -> None:
        """A new offload policy set (a reload): placements from now on follow it."""
        self.offload = offload
        self._sizes, self._exact = offload.size_classes()
        self._dirty = True

    # ---- helpers ----

    def _flush(self) -> list[Cmd]:
        out, self._out = self._out, []
        return out

    def _note(self, task: Task, now: float, event: str, detail: str = "") -> None:
        h = task.history
        h.append((now, event, detail))
        if len(h) > MAX_HISTORY:
            del h[1]  # keep the first entry (submitted) and the latest ones
            task._dropped += 1

    @staticmethod
    def _held(task: Task, node: str) -> Copy | None:
        return next((c for c in task.copies if c.holds and c.node == node), None)

    @staticmethod
    def _refresh(task: Task) -> None:
        if task.terminal:
            return
        states = {c.state for c in task.copies}
        task.state = "running" if "running" in states else "assigned" if "assigned" in states else "queued"

    def _release(self, task: Task, copy: Copy) -> None:
        ex = self.executors.get(copy.node or "")
        if ex is not None:
            ex.running.discard(task.id)
            self._dirty = True
            if ex.draining and not ex.running and not ex.drain_reported:
                ex.drain_reported = True
                self._out.append(Drained(ex.node))

    def _enqueue(self, task: Task, copy: Copy, not_before: float) -> None:
        copy.state, copy.node, copy.not_before = "queued", None, not_before
        self._queue[(task.id, copy.index)] = (task, copy)
        self._dirty = True

    def _where(self, task: Task) -> str:
        if task.terminal:
            return f"the task is {task.state}"
        held = task.holders()
        return f"the task is now on {', '.join(held)}" if held else "the task is queued"

    def _not_holder(self, task: Task, node: str, copy: Copy | None, attempt: int | None) -> str:
        if task.terminal:
            return f"the task already {task.state}" if task.state != "expired" else "the task already expired"
        if copy is not None:  # holds it, but under another attempt
            return f"stale attempt {attempt} (the current lease is attempt {copy.attempt})"
        lost = task._lost.get(node)
        if lost is not None:
            return (f"{node} no longer holds the lease ({lost[1]} at {_t(lost[0])}); {self._where(task)}")
        return f"{node} was never given this task; {self._where(task)}"

    # ---- submission ----

    def submit(self, task: Task, now: float) -> list[Cmd]:
        """Queue ``task``. The same idempotency key (or the same id) again returns the existing task,
        never a second one."""
        key = task.idempotency_key
        existing = self.tasks.get(task.id) or (self.tasks.get(self._keys[key]) if key in self._keys else None)
        if existing is not None:
            how = f"idempotency key {key!r}" if key in self._keys else "the same id"
            self._note(existing, now, "duplicate", f"submitted again ({how}, as {task.id}): the existing task is kept")
            return [Submitted(existing.id, True, key)]
        self.tasks[task.id] = task
        if key is not None:
            self._keys[key] = task.id
        self._order += 1
        task._order = self._order
        task.submitted_at = now
        task.copies = [Copy(i, checkpoint=task.checkpoint) for i in range(task.replicas)]
        detail = f"priority {task.priority}, up to {task.max_attempts} attempt(s)"
        if task.replicas > 1:
            detail += f", {task.replicas} replicas ({task.mode})"
        if task.deadline is not None:
            detail += f", deadline {_t(task.deadline)}"
        if task.checkpoint is not None:
            detail += ", with a checkpoint to resume from"
        self._note(task, now, "submitted", detail)
        self._out.append(Submitted(task.id, False, key))
        for c in task.copies:
            self._enqueue(task, c, now)
        if task.deadline is not None:
            heapq.heappush(self._deadlines, (task.deadline, task.id))
            if task.deadline <= now:
                self._expire(task, now)
        return self._flush()

    def restore(self, rec: dict[str, Any], now: float) -> Task:
        """Take back a task from :meth:`Task.to_record` after a restart. Queued copies queue again
        (their backoff kept: ``now`` and ``not_before`` are on the same wall clock); a copy held by an
        executor stays its own: the executor is expected to report within the lease, like one that was
        just given work, or it is lost and the copy moves. A terminal task is only remembered for its
        idempotency key."""
        task = Task.from_record(rec)
        if task.id in self.tasks:
            raise ValueError(f"task {task.id!r} is already known")
        self.tasks[task.id] = task
        if task.idempotency_key is not None:
            self._keys[task.idempotency_key] = task.id
        self._order += 1
        task._order = self._order
        if task.terminal:
            return task
        tiers = rec.get("tiers") or {}
        for c in task.copies:
            if c.state == "queued":
                self._enqueue(task, c, c.not_before)
            elif c.holds and c.node:
                ex = self.executors.get(c.node)
                if ex is None:
                    tier = tiers.get(c.node) or "device"
                    ex = self.executors[c.node] = Executor(
                        c.node, tier, "" if tier == "cloud" else task.site, 0, frozenset(), None,
                        NodeMetrics(c.node, tier, task.site, True), now)
                ex.running.add(task.id)
                c.renewed = now
        if task.deadline is not None:
            heapq.heappush(self._deadlines, (task.deadline, task.id))
        self._note(task, now, "restored", f"after a restart, {task.state}"
                   + (f" on {', '.join(task.holders())}" if task.holders() else ""))
        self._dirty = True
        return task

    # ---- executors ----

    def executor_seen(self, status: ExecutorStatus, now: float) -> list[Cmd]:
        """An executor's status: it is live (again), with these slots and measurements. A status that
        lists the tasks it runs is also a heartbeat."""
        ex = self.executors.get(status.node)
        if ex is None:
            ex = self.executors[status.node] = Executor(status.node, status.tier, status.site, status.capacity,
                                                        status.capabilities, status.handlers, status.metrics(), now,
                                                        interval=status.interval, max_payload=status.max_payload)
        else:
            ex.update(status)
        self._dirty = True
        self._alive(ex, now)
        if status.running is not None:
            self._heartbeat(ex, status.running, now)
        return self._flush()

    def _alive(self, ex: Executor, now: float) -> None:
        ex.last_seen = max(ex.last_seen, now)
        if not ex.live:
            ex.live, ex.lost_at = True, None
            self._dirty = True

    def heartbeat(self, node: str, task_ids: Iterable[str], now: float) -> list[Cmd]:
        """``node`` is alive and runs ``task_ids``: their leases are renewed; a listed task it does not
        hold is cancelled there; from now on a task it holds but stops listing for ``lease`` is lost."""
        ex = self.executors.get(node)
        if ex is None:
            for tid in dict.fromkeys(task_ids):
                if tid in self.tasks:
                    self._out.append(Cancel(tid, node, "not assigned to you (unknown executor)"))
            return self._flush()
        self._alive(ex, now)
        self._heartbeat(ex, task_ids, now)
        return self._flush()

    def _heartbeat(self, ex: Executor, task_ids: Iterable[str], now: float) -> None:
        ex.reports_tasks = True
        for tid in dict.fromkeys(task_ids):
            task = self.tasks.get(tid)
            copy = self._held(task, ex.node) if task is not None else None
            if copy is not None:
                copy.renewed = max(copy.renewed, now)
            elif task is not None:
                self._out.append(Cancel(tid, ex.node, self._not_holder(task, ex.node, None, None)))

    def pardon(self, now: float) -> list[Cmd]:
        """The I/O layer could hear nobody until ``now`` (its own link was down): every live executor
        and every lease it holds counts from ``now``, as if each had just reported."""
        for ex in self.executors.values():
            if ex.live:
                ex.last_seen = max(ex.last_seen, now)
                ex.busy_since = max(ex.busy_since, now) if ex.running else ex.busy_since
                for tid in ex.running:
                    copy = self._held(self.tasks[tid], ex.node)
                    if copy is not None:
                        copy.renewed = max(copy.renewed, now)
        return self._flush()

    def executor_gone(self, node: str, now: float, reason: str = "gone (disconnected)") -> list[Cmd]:
        """The I/O layer knows ``node`` is gone (death message, closed session): its tasks move now."""
        ex = self.executors.get(node)
        if ex is not None and ex.live:
            self._lose_executor(ex, now, reason)
        return self._flush()

    def _lose_executor(self, ex: Executor, now: float, reason: str) -> None:
        ex.live, ex.lost_at, ex.lost_why = False, now, reason
        tids = tuple(sorted(ex.running))
        self._out.append(ExecutorLost(ex.node, reason, tids))
        for tid in tids:
            task = self.tasks[tid]
            copy = self._held(task, ex.node)
            if copy is not None:
                self._lose_copy(task, copy, now, f"lease lost on {ex.node}: {reason}")

    def _lose_copy(self, task: Task, copy: Copy, now: float, why: str) -> None:
        node = copy.node or ""
        task._lost[node] = (now, why)
        self._release(task, copy)
        self._out.append(Cancel(task.id, node, why, copy.attempt))
        self._failed_attempt(task, copy, now, why, node)

    def _failed_attempt(self, task: Task, copy: Copy, now: float, why: str, node: str) -> None:
        copy.failures += 1
        copy.avoid = node
        used = f"{copy.failures} of {task.max_attempts} attempt(s) used"
        rep = f"replica {copy.index + 1}: " if task.replicas > 1 else ""
        if copy.failures < task.max_attempts:
            delay = task.retry_delay(copy.failures)
            self._enqueue(task, copy, now + delay)
            resume = ", will resume from its checkpoint" if copy.checkpoint is not None else ""
            self._note(task, now, "requeued", f"{rep}{why}; {used}, next try in {delay:g} s{resume}")
            self._out.append(Requeued(task.id, why, node, now + delay, copy.index))
            self._refresh(task)
        else:
            copy.state, copy.node = "failed", None
            copy.error = f"{why}; gave up after {used}"
            self._note(task, now, "gave up", f"{rep}{copy.error}")
            self._resolve(task, now)

    # ---- progress from executors ----

    def started(self, task_id: str, node: str, now: float, attempt: int | None = None) -> list[Cmd]:
        """``node`` started the task (lease ``attempt``, if it says)."""
        task, copy = self._progress(task_id, node, now, attempt, "start")
        if copy is not None and task is not None:
            if copy.state == "assigned":
                copy.state = "running"
                self._note(task, now, "started", f"on {node} (attempt {copy.attempt})")
                self._refresh(task)
        return self._flush()

    def checkpoint(self, task_id: str, node: str, data: dict[str, Any] | None, now: float,
                   attempt: int | None = None) -> list[Cmd]:
        """``node`` saved progress: kept, and a re-queued task resumes from it on its next executor."""
        task, copy = self._progress(task_id, node, now, attempt, "checkpoint")
        if copy is not None and task is not None:
            copy.checkpoint = data
            task.checkpoint = data
            if copy.state == "assigned":
                copy.state = "running"
                self._refresh(task)
            self._note(task, now, "checkpoint", f"from {node} (attempt {copy.attempt}): {_short(data, 80)}")
        return self._flush()

    def _progress(self, task_id: str, node: str, now: float, attempt: int | None,
                  what: str) -> tuple[Task | None, Copy | None]:
        ex = self.executors.get(node)
        if ex is not None:
            self._alive(ex, now)
        task = self.tasks.get(task_id)
        if task is None:
            self._out.append(Ignored(task_id, node, "unknown task"))
            return None, None
        copy = self._held(task, node)
        if copy is not None and not task.terminal and (attempt is None or attempt == copy.attempt):
            copy.renewed = max(copy.renewed, now)
            return task, copy
        why = self._not_holder(task, node, copy, attempt)
        self._note(task, now, "ignored", f"{what} from {node}: {why}")
        self._out.append(Ignored(task_id, node, why))
        if copy is None:  # it works on something that is not its: stop it
            self._out.append(Cancel(task_id, node, why, attempt))
        return task, None

    def renew(self, task_id: str, node: str, now: float, attempt: int | None = None) -> list[Cmd]:
        """``node`` is still delivering the task (a part of its result arrived: protocol §3, "Parts"): if it
        holds it under ``attempt``, its lease is renewed; anything else changes nothing."""
        task = self.tasks.get(task_id)
        copy = self._held(task, node) if task is not None else None
        if task is not None and copy is not None and not task.terminal and attempt in (None, copy.attempt):
            copy.renewed = max(copy.renewed, now)
            ex = self.executors.get(node)
            if ex is not None:
                self._alive(ex, now)
        return self._flush()

    def finished(self, task_id: str, node: str, ok: bool, result: Any, error: str | None, now: float,
                 attempt: int | None = None) -> list[Cmd]:
        """``node`` finished the task: ``ok`` with ``result``, or failed with ``error``. Only the lease
        holder's result counts; anything else is ignored and recorded."""
        ex = self.executors.get(node)
        if ex is not None:
            self._alive(ex, now)
        task = self.tasks.get(task_id)
        if task is None:
            self._out.append(Ignored(task_id, node, "unknown task"))
            return self._flush()
        copy = self._held(task, node)
        if task.terminal or copy is None or (attempt is not None and attempt != copy.attempt):
            why = self._not_holder(task, node, copy, attempt)
            said = f"result {_short(result, 80)}" if ok else f"failure {error!r}"
            self._note(task, now, "ignored", f"{said} from {node}: {why}")
            self._out.append(Ignored(task_id, node, why))
            return self._flush()
        self._release(task, copy)
        rep = f"replica {copy.index + 1} " if task.replicas > 1 else ""
        if ok:
            copy.state, copy.result = "succeeded", result
            self._note(task, now, "result", f"{rep}from {node} (attempt {copy.attempt}): {_short(result, 80)}")
            self._resolve(task, now)
        else:
            why = f"failed on {node}: {error or 'no error given'}"
            copy.error = why
            task._lost[node] = (now, why)
            self._failed_attempt(task, copy, now, why, node)
        return self._flush()

    # ---- outcomes ----

    def report(self, sender: str, body: Any, now: float) -> list[Cmd]:
        """A ``task_result`` body (protocol §3) from ``sender``, as the I/O layer received it: ``running``,
        ``checkpoint`` or a final state, counted only from the lease holder (the ``attempt`` echoed). A
        report for a task this scheduler does not know (a direct task, one already forgotten) is no
        command; ``cancelled`` is what the executor was told to do, so nothing either."""
        if not isinstance(body, dict):
            return []
        tid, state = body.get("task_id"), body.get("state")
        if not isinstance(tid, str) or tid not in self.tasks:
            return []
        attempt = body.get("attempt") if isinstance(body.get("attempt"), int) else None
        if state == "running":
            return self.started(tid, sender, now, attempt)
        if state == "checkpoint":
            data = body.get("checkpoint")
            return self.checkpoint(tid, sender, data if isinstance(data, dict) else None, now, attempt)
        if state == "succeeded":
            return self.finished(tid, sender, True, body.get("result"), None, now, attempt)
        if state in ("failed", "expired"):
            error = body.get("error") if isinstance(body.get("error"), str) else f"{state} (no error given)"
            return self.finished(tid, sender, False, None, error, now, attempt)
        return []

    def _resolve(self, task: Task, now: float) -> None:
        if task.terminal:
            return
        copies = task.copies
        ok = [c for c in copies if c.state == "succeeded"]
        pending = [c for c in copies if c.state in ("queued", *_HOLDING)]
        failed = [c for c in copies if c.state == "failed"]

        def errors() -> str:
            if task.replicas == 1:
                return failed[0].error or "failed"
            return "; ".join(f"replica {c.index + 1}: {c.error}" for c in failed)

        if task.mode == "first" or task.replicas == 1:
            if ok:
                how = f" (replicas: first result wins, from {ok[0].node})" if task.replicas > 1 else ""
                self._finish(task, "succeeded", now, result=ok[0].result, why=f"succeeded on {ok[0].node}{how}")
            elif not pending:
                self._finish(task, "failed", now, error=errors() if task.replicas == 1 else
                             f"every replica failed: {errors()}")
            return
        need = task.replicas // 2 + 1
        groups: dict[bytes, list[Copy]] = {}
        for c in ok:
            groups.setdefault(canonical(c.result), []).append(c)
        if len(groups) > 1:
            task.disagreement = [(c.node or "", c.result) for c in ok]
            said = "; ".join(f"{c.node} said {_short(c.result, 60)}" for c in ok)
            self._note(task, now, "disagreement", f"replicas disagree: {said}")
        best = max(groups.values(), key=len, default=[])
        if len(best) >= need:
            agreed = ", ".join(c.node or "" for c in best)
            dissent = [c for c in ok if c not in best]
            extra = (f"; DISAGREEMENT: {', '.join(f'{c.node} said {_short(c.result, 60)}' for c in dissent)}"
                     if dissent else "")
            self._finish(task, "succeeded", now, result=best[0].result,
                         why=f"majority {len(best)} of {task.replicas} agree ({agreed}){extra}")
        elif len(best) + len(pending) < need:
            said = "; ".join(f"{c.node} said {_short(c.result, 60)}" for c in ok) or "no result"
            fails = f"; {errors()}" if failed else ""
            self._finish(task, "failed", now, error=(f"no majority possible: {need} of {task.replicas} must agree, "
                                                     f"at most {len(best) + len(pending)} can ({said}{fails})"))

    def _finish(self, task: Task, state: str, now: float, result: Any = None, error: str | None = None,
                why: str = "") -> None:
        reason = {"succeeded": "the task succeeded elsewhere", "failed": "the task failed",
                  "cancelled": "the task was cancelled", "expired": "the task's deadline passed"}[state]
        for c in task.copies:
            if c.holds:
                self._out.append(Cancel(task.id, c.node or "", reason, c.attempt))
                self._release(task, c)
                c.state = "cancelled"
            elif c.state == "queued":
                self._queue.pop((task.id, c.index), None)
                c.state = "cancelled"
        task.state, task.result, task.error, task.finished_at = state, result, error, now
        self._note(task, now, state, why or error or "")
        dis = tuple(task.disagreement) if task.disagreement else None
        self._out.append(Completed(task.id, state, result, error, dis))

    def _expire(self, task: Task, now: float) -> None:
        assert task.deadline is not None
        late = now - task.deadline
        self._finish(task, "expired", now, error=(f"deadline {_t(task.deadline)} passed ({late:.3f} s ago) while "
                                                  f"{task.state}, after {task.attempts} attempt(s)"))

    def cancel(self, task_id: str, now: float, reason: str = "cancelled by request") -> list[Cmd]:
        """Cancel a task (its executors are told to stop); a finished or unknown task: nothing."""
        task = self.tasks.get(task_id)
        if task is not None and not task.terminal:
            self._finish(task, "cancelled", now, error=reason)
        return self._flush()

    # ---- drain ----

    def drain(self, node: str, now: float) -> list[Cmd]:
        """Stop giving ``node`` work; take back what it has not started; :class:`Drained` once it holds
        nothing. ``KeyError`` for an unknown executor."""
        ex = self.executors[node]
        if not ex.draining:
            ex.draining, ex.drain_reported = True, False
        for tid in sorted(ex.running):
            task = self.tasks[tid]
            copy = self._held(task, node)
            if copy is not None and copy.state == "assigned":
                why = f"{node} is draining and had not started it"
                self._out.append(Cancel(tid, node, why, copy.attempt))
                task._lost[node] = (now, why)
                self._release(task, copy)
                self._enqueue(task, copy, now)
                self._note(task, now, "requeued", f"{why}: taken back (no attempt used)")
                self._out.append(Requeued(tid, why, node, now, copy.index))
                self._refresh(task)
        if not ex.running and not ex.drain_reported:
            ex.drain_reported = True
            self._out.append(Drained(node))
        return self._flush()

    def undrain(self, node: str, now: float) -> list[Cmd]:
        """``node`` takes work again."""
        ex = self.executors[node]
        ex.draining = ex.drain_reported = False
        self._dirty = True
        return self._flush()

    # ---- the clock ----

    def tick(self, now: float) -> list[Cmd]:
        """Lost leases, deadlines, then assignment of the queued copies that are due."""
        for ex in list(self.executors.values()):
            limit = ex.silent_limit(self.lease)
            if ex.live and now - ex.silent_since() >= limit:
                what = f"lease {self.lease:g} s" if limit == self.lease else f"idle, 2.5 status intervals: {limit:g} s"
                self._lose_executor(ex, now, f"silent for {now - ex.silent_since():.3f} s ({what})")
            elif ex.live and ex.reports_tasks and ex.running:
                for tid in sorted(ex.running):
                    task = self.tasks[tid]
                    copy = self._held(task, ex.node)
                    if copy is not None and now - copy.renewed >= self.lease:
                        self._lose_copy(task, copy, now, f"lease lost on {ex.node}: not reported for "
                                                         f"{now - copy.renewed:.3f} s (lease {self.lease:g} s)")
        while self._deadlines and self._deadlines[0][0] <= now:
            _, tid = heapq.heappop(self._deadlines)
            task = self.tasks.get(tid)
            if task is not None and not task.terminal:
                self._expire(task, now)
        self._assign(now)
        self._dirty = False
        return self._flush()

    def _assign(self, now: float) -> None:
        free = sum(ex.free for ex in self.executors.values() if ex.live and not ex.draining and ex.free > 0)
        if free <= 0 or not self._queue:
            return
        ready = [tc for tc in self._queue.values() if tc[1].not_before <= now]
        ready.sort(key=lambda tc: (-tc[0].priority, tc[0]._order, tc[1].index))
        # A wait decided for a task holds for the tasks alike until an assignment changes the load of
        # their origin (what a rule's ``when`` may read): other assignments only take candidates away.
        given: dict[str, int] = {}  # node -> assignments to it in this tick
        waits: dict[tuple[Any, ...], tuple[int, Decision]] = {}
        offered = list(self.executors.values())
        for task, copy in ready:
            if free <= 0:
                break
            if task.terminal or not copy.state == "queued":
                continue
            exclude = frozenset(c.node for c in task.copies if c is not copy and c.node is not None)
            like = (self._like(task), exclude, copy.avoid)
            hit = waits.get(like)
            if hit is not None and hit[0] == given.get(task.origin, 0):
                d = hit[1]
                if d.copy != copy.index or d.shared_from is None and d.placement.task.id != task.id:
                    d = dataclasses.replace(d, copy=copy.index, shared_from=d.shared_from or d.placement.task.id)
            else:
                d = self._place(task, copy, exclude, offered, now)
                if d.action != "run" and copy.avoid is not None:  # nowhere else: where it was lost will do
                    d = self._place(task, copy, exclude, offered, now, avoid=False)
            if d.action == "run":
                node = d.placement.node or ""
                self._give(task, copy, self.executors[node], d, now)
                given[node] = given.get(node, 0) + 1
                free -= 1
                continue
            if d.action == "fail":
                task.decision = d
                self._finish(task, "failed", now, error=f"placement: {d.placement.outcome or 'no executor may run it'}",
                             why=f"offload policy {d.placement.decided_by}: {d.placement.outcome}")
            else:
                waits[like] = (given.get(task.origin, 0), d)
                task.decision = d
                sig = (d.placement.rule, d.placement.outcome, d.note)
                if sig != task._wait_sig:
                    task._wait_sig = sig
                    why = d.note or d.placement.outcome or "no executor can take it now"
                    by = f" ({d.placement.decided_by})" if d.placement.decided_by else ""
                    self._note(task, now, "waiting", f"{why}{by}")

    def _like(self, task: Task) -> tuple[Any, ...]:
        """What a placement depends on besides the executors: tasks alike get the same decision."""
        t = task.info
        size = t.input_bytes if self._exact else bisect.bisect_right(self._sizes, t.input_bytes)
        return (t.id if self._exact else "", t.handler, size, t.data_class, t.site, t.origin, t.origin_role,
                task.requirements)

    def _place(self, task: Task, copy: Copy, exclude: frozenset[str], executors: list[Executor],
               now: float, avoid: bool = True) -> Decision:
        cands: list[NodeMetrics] = []
        held: list[tuple[str, str]] = []
        busy: list[NodeMetrics] = []
        site, req = task.site, task.requirements
        for ex in executors:
            if ex.tier != "cloud" and ex.site != site:
                continue  # other sites' executors are never offered
            if not ex.live:
                why: str | None = (f"lost: {ex.lost_why}" if ex.lost_why else "lease lost") if ex.lost_at is not None \
                    else "offline"
            elif ex.draining:
                why = "draining"
            elif ex.node in exclude:
                why = "holds or gave another replica of this task (replicas run on distinct executors)"
            elif avoid and ex.node == copy.avoid:
                why = "its last attempt was lost or failed there: another executor first"
            elif ex.free <= 0:
                why = f"busy ({len(ex.running)}/{ex.capacity} slots)"
                if ex.capacity > 0 and req.refuses(ex) is None and self._too_big_for(task, ex) is None:
                    busy.append(ex.metrics())
            else:
                why = req.refuses(ex) or self._too_big_for(task, ex)
            if why is None:
                cands.append(ex.metrics())
                continue
            if ex.node == task.origin:  # its measurements still count (origin.cpu), but it cannot be chosen
                cands.append(ex.metrics(online=False))
                why += "; the task's origin, shown to the policy as offline"
            held.append((ex.node, why))
        p = self.offload.place(task.info, cands)
        note = None
        if p.action == "run" and (p.node is None or p.node not in self.executors or p.node in dict(held)):
            note = f"the policy chose {p.node}, which cannot take it now: waits"
        elif p.action == "fail" and busy:
            q = self.offload.place(task.info, [c for c in cands if c.node not in {b.node for b in busy}] + busy)
            if q.action == "run":
                note = f"waits for a free slot on {q.node} (busy now; the policy would run it there)"
        return Decision(now, p, tuple(held), copy.index, None, note)

    @staticmethod
    def _too_big_for(task: Task, ex: Executor) -> str | None:
        """Why ``ex`` cannot even receive the task's command (a small device's message limit), or None."""
        if ex.max_payload is None:
            return None
        need = task.input_bytes + COMMAND_OVERHEAD + (len(canonical(task.checkpoint)) if task.checkpoint else 0)
        if need <= ex.max_payload:
            return None
        return f"takes messages of at most {ex.max_payload} bytes; this task's command is about {need}"

    def _give(self, task: Task, copy: Copy, ex: Executor, d: Decision, now: float) -> None:
        # attempt numbers are task-wide (1, 2, 3... over all its replicas), so an executor that ran one
        # replica of a task and is later given another tells the two runs apart
        task.attempts += 1
        copy.attempt = task.attempts
        d = dataclasses.replace(d, attempt=copy.attempt)
        self._queue.pop((task.id, copy.index), None)
        copy.state, copy.node, copy.renewed = "assigned", ex.node, now
        if not ex.running:
            ex.busy_since = now
        ex.running.add(task.id)
        task.decision = d
        task.assignments.append(d)
        task._wait_sig = None
        rep = f"replica {copy.index + 1} of {task.replicas}, " if task.replicas > 1 else ""
        resume = ", resuming from its checkpoint" if copy.checkpoint is not None else ""
        self._note(task, now, "assigned", f"to {ex.tier} {ex.node} ({rep}attempt {copy.attempt}{resume}; "
                                          f"{d.placement.decided_by or 'no offload rule: its origin'})")
        self._out.append(Assign(task.id, ex.node, copy.attempt, copy.checkpoint, copy.index, task.handler, task.args,
                                task.deadline, ex.tier, d.placement.decided_by or "origin"))
        self._refresh(task)

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until a tick has something to do (a lease running out, a backoff ending, a deadline,
        queued work and a free slot that no tick has matched yet); None: nothing is pending until
        something arrives. 0: tick now."""
        times: list[float] = []
        for ex in self.executors.values():
            if ex.live:
                times.append(ex.silent_since() + ex.silent_limit(self.lease))
            if ex.live and ex.running:
                if ex.reports_tasks:
                    times += [c.renewed + self.lease for t in ex.running for c in self.tasks[t].copies
                              if c.holds and c.node == ex.node]
        times += [c.not_before for _, c in self._queue.values() if c.not_before > now]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._dirty and any(c.not_before <= now for _, c in self._queue.values()) and any(
                ex.live and not ex.draining and ex.free > 0 for ex in self.executors.values()):
            times.append(now)  # work and a free slot that no tick has matched yet
        return max(0.0, min(times) - now) if times else None

    # ---- reading ----

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    def by_key(self, key: str) -> Task | None:
        tid = self._keys.get(key)
        return self.tasks.get(tid) if tid else None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for t in self.tasks.values():
            out[t.state] += 1
        return out

    def forget(self, task_id: str) -> bool:
        """Drop a finished task (its store keeps it); its idempotency key is forgotten with it."""
        task = self.tasks.get(task_id)
        if task is None or not task.terminal:
            return False
        del self.tasks[task_id]
        if task.idempotency_key is not None and self._keys.get(task.idempotency_key) == task_id:
            del self._keys[task.idempotency_key]
        return True

    def explain(self, task_id: str) -> str:
        """Where the task ran, why (each assignment's offload decision), and its history. ``KeyError``
        for an unknown task."""
        t = self.tasks[task_id]
        lines = [f"{t.state.upper()}: {t.info.describe()}"]
        last = t.assignments[-1] if t.assignments else t.decision
        if last is not None and last.placement.decided_by:
            lines.append(f"  decided by {last.placement.decided_by} ({last.placement.source})")
        elif last is not None:
            lines.append("  no enforced offload rule matches: its origin")
        held = t.holders()
        if held:
            lines.append(f"  now on {', '.join(held)}")
        ran = [c for c in t.copies if c.state == "succeeded"]
        if ran:
            lines.append("  ran on " + ", ".join(f"{c.node} (attempt {c.attempt})" for c in ran))
        extra = []
        if t.replicas > 1:
            extra.append(f"{t.replicas} replicas ({t.mode})")
        if t.deadline is not None:
            extra.append(f"deadline {_t(t.deadline)}")
        req = t.requirements
        needs = [f"capabilit{'y' if len(req.capabilities) == 1 else 'ies'} {', '.join(sorted(req.capabilities))}"
                 ] if req.capabilities else []
        needs += [f"mem_free >= {_size(req.mem_free)}"] if req.mem_free is not None else []
        needs += [f"cpu <= {req.cpu:g}"] if req.cpu is not None else []
        if needs:
            extra.append("needs " + ", ".join(needs))
        lines.append(f"  priority {t.priority}, {t.attempts} attempt(s) made, at most {t.max_attempts} used up "
                     f"per {'replica' if t.replicas > 1 else 'task'}, lease {self.lease:g} s"
                     + (", " + ", ".join(extra) if extra else ""))
        if t.state == "succeeded":
            lines.append(f"  result: {_short(t.result)}")
        if t.error:
            lines.append(f"  error: {t.error}")
        if t.disagreement:
            lines.append("  DISAGREEMENT between replicas: " + "; ".join(f"{n} said {_short(r, 60)}"
                                                                       for n, r in t.disagreement))
        if t.checkpoint is not None:
            lines.append(f"  last checkpoint: {_short(t.checkpoint, 80)}")
        if t.replicas > 1:
            for c in t.copies:
                what = (f"result {_short(c.result, 60)}" if c.state == "succeeded" else c.error or "")
                lines.append(f"  replica {c.index + 1}: {c.state}" + (f" on {c.node}" if c.node else "")
                             + (f", {what}" if what else ""))
        for i, d in enumerate(t.assignments, 1):
            rep = f"replica {d.copy + 1}, " if t.replicas > 1 else ""
            lines.append(f"  assignment {i} at {_t(d.time)} ({rep}attempt {d.attempt}):")
            lines.append(d.explain(t.info, "    "))
        queued = next((c for c in t.copies if c.state == "queued"), None)
        if t.decision is not None and t.decision.action != "run" and queued is not None:
            lines.append(f"  now waiting (decision at {_t(t.decision.time)}):")
            lines.append(t.decision.explain(t.info, "    "))
        elif queued is not None and (t.decision is None or t.decision.action == "run"):
            # no tick has placed this copy since it was queued (no executor had a free slot): what would
            # the policy say now (nothing is changed by asking)
            exclude = frozenset(c.node for c in t.copies if c is not queued and c.node is not None)
            d = self._place(t, queued, exclude, list(self.executors.values()), t.history[-1][0])
            lines.append("  not placed yet (no executor could take it at the last tick: none free, or draining); "
                         "placed now:")
            lines.append(d.explain(t.info, "    "))
        lines.append("  history:")
        if t._dropped:
            lines.append(f"    ({t._dropped} older entries dropped)")
        lines += [f"    {_t(when)} {event}" + (f": {detail}" if detail else "") for when, event, detail in t.history]
        return "\n".join(lines)


__all__ = ["MAX_HISTORY", "MODES", "STATES", "TERMINAL", "Assign", "Cancel", "Cmd", "Completed", "Copy", "Decision",
           "Drained", "Executor", "ExecutorLost", "ExecutorStatus", "Ignored", "Requeued", "Requirements", "Scheduler",
           "Submitted", "Task", "canonical", "executor_status"]
