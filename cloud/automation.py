"""The cloud's automation (``at: cloud`` rules, gateways' requests) and its retention sweeper.

:class:`CloudAutomation` wraps :class:`~cwsnet.policy.automation.AutomationEngine` at the cloud:

- **Observations.** Ingest hands it each newly stored message whose topic it :meth:`~CloudAutomation.wants`
  (a topic some cloud rule could observe, or a gateway's ``event/automation.request``). What a rule
  sees as ``values``:

  - telemetry: one observation per reading, its ``values`` (``ts``: the reading's own time);
  - status (birth, status and death alike): the status body, with ``state`` always present
    (``online`` or ``offline``; a death is ``offline``), ``ts``: the message's time;
  - event: the event's ``data`` map plus ``severity`` and ``message`` (a data key of the same name
    wins), ``stream``: the event type, ``ts``: the event's time.

  Events the cloud records itself (alerts, ``automation.*``, ``retention.pruned``) are never observed,
  so a rule cannot trigger itself.
- **Firings** are carried out at once: ``alert`` -> an ``alert`` event whose source is the node that
  triggered; ``task`` on a node / ``command`` -> a task queued for that device (store + dispatcher) and
  an ``automation.queued`` event naming the rule; anything that cannot be done (a target that is not
  an active device, ``task on: cloud`` -- the cloud has no executor yet, issue 7 -- or ``on: gateway``)
  -> an ``automation.failed`` event naming the rule and the reason. A policy in ``audit`` mode gives one
  ``automation.audit`` event per firing and runs nothing.
- **Gateways' requests.** A gateway runs its site's rules itself and asks the cloud for what only the
  cloud may do, with an ``automation.request`` event ``{rule, node, action, handler, args, target}``.
  The cloud queues the task for ``target`` only if the sender is an active gateway and ``target`` an
  active device of the gateway's own site; otherwise it records ``automation.failed``. Ingest stores
  each ``(sender, seq)`` once and hands only newly stored messages on, so each request is seen once;
  on top of that the task id is derived from ``(gateway, seq)``, so even a request offered twice (or
  after a restart) never queues a second task.
- **State** (episodes, cooldowns) is saved as JSON next to the database (``cloud.automation.json``,
  written atomically): at once when a rule fires (before its actions run) and otherwise at most once a
  :meth:`~CloudAutomation.tick`. A restart in the middle of an episode does not fire again.

:class:`RetentionSweeper` deletes stored telemetry older than the ``qos`` retention of its stream.

Both are plain classes doing blocking store calls: the daemon runs them in worker threads
(``asyncio.to_thread``); a lock serializes the automation's entry points.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from cloud.api import ENVELOPE_HEADROOM, MAX_TASK_BODY
from cloud.ingest import BodyError, check_storable
from cloud.store import Event, IngestItem, NewEvent, Node, Store, Task
from cloud.views import change, event_view, task_view
from cwsnet import topics
from cwsnet.errors import TopicError
from cwsnet.identity import write_file_atomic
from cwsnet.policy.automation import (
    Alert,
    AutomationEngine,
    Firing,
    Observation,
    RunTask,
    SendCommand,
)
from cwsnet.policy.loader import PolicySet
from cwsnet.policy.qos import QosEngine, human

log = logging.getLogger("cwsnet.cloud.automation")

#: the event type of a gateway's request (gateway/site_policy.py)
REQUEST = "automation.request"
#: a task queued by automation expires if the device has not finished it within this many seconds
TASK_TIMEOUT = 3600.0
#: gateway requests remembered in memory (a request offered twice records one failure, not two)
SEEN_MAX = 10_000
_HANDLER = re.compile(r"^[a-z0-9_.-]{1,63}$")
_KIND_CHANNEL = {"telemetry": "telemetry", "status": "status", "event": "event"}


def state_path(database: Path | str) -> Path | None:
    """Where the automation state of the cloud whose database is ``database`` is kept (None: in memory)."""
    if str(database) == ":memory:":
        return None
    p = Path(database)
    return p.with_name(p.stem + ".automation.json")


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _task_id(*parts: Any) -> str:
    """A task id derived from what caused it: the same cause can never queue two tasks."""
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Done:
    """One thing the cloud did for a firing or a gateway's request.

    ``what``: ``alert``, ``queued`` (a task for a device), ``failed`` (could not be done: ``reason``)
    or ``audit`` (a policy in audit mode: reported, nothing run). ``event`` is the event recorded,
    ``task`` the task queued. ``firing`` is set for a cloud rule, ``request`` ((gateway, seq)) for a
    gateway's request."""

    what: str
    rule: str
    source: str
    node: str
    site: str
    message: str
    event: Event | None = None
    task: Task | None = None
    reason: str | None = None
    firing: Firing | None = None
    request: tuple[str, int] | None = None

    def explain(self) -> str:
        head = self.message
        if self.reason and head.endswith(f": {self.reason}"):  # said once, on the "not done" line
            head = head[: -len(self.reason) - 2]
        lines = [f"{self.what.upper()}: {head}"]
        if self.firing is not None:
            lines += self.firing.explain().splitlines()[1:]
        else:
            assert self.request is not None
            gw, seq = self.request
            lines.append(f"  decided by {self.rule} at gateway {gw} (its automation.request, seq {seq})")
            lines.append(f"  for {self.node} (site {self.site})")
        if self.task is not None:
            deadline = f", expires {_iso(self.task.deadline)}" if self.task.deadline is not None else ""
            lines.append(f"  task {self.task.id} queued for {self.task.target}{deadline}")
        if self.reason:
            lines.append(f"  not done: {self.reason}")
        return "\n".join(lines)


class CloudAutomation:
    """The ``at: cloud`` automation rules of a policy set, and the gateways' requests, carried out.

    ``store``: the cloud's store; ``request``: the dispatcher's thread-safe ``request(task_id)``;
    ``publish``: announces live changes (``Fanout.publish``; thread-safe); ``state_file``: where
    the engine's state is kept across restarts (None: not kept). ``clock``: seconds, for timestamps
    of events and tasks. The entry points block on the store: call them from a worker thread.
    """

    def __init__(
        self,
        pset: PolicySet | None,
        store: Store,
        request: Callable[[str], None],
        *,
        publish: Callable[[dict[str, Any]], None] | None = None,
        state_file: Path | None = None,
        clock: Callable[[], float] = time.time,
        task_timeout: float | None = TASK_TIMEOUT,
        on_queued: Callable[[Task], None] | None = None,
    ) -> None:
        self.store = store
        self.request = request
        self.publish = publish
        self.state_file = state_file
        self.clock = clock
        self.task_timeout = task_timeout
        self.on_queued = on_queued
        self.stats: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._saved: str | None = None
        self._ons: tuple[Any, ...] = ()
        self.engine = AutomationEngine(PolicySet(), "cloud")
        self.use(pset)
        self._restore()

    # ---- policies and state -------------------------------------------------------------------

    def use(self, pset: PolicySet | None) -> None:
        """Run the cloud rules of ``pset`` from now on; the episodes of rules kept carry over."""
        pset = pset if pset is not None else PolicySet()
        engine = AutomationEngine(pset, "cloud")
        ons = tuple(r.on for lp in pset.of_kind("automation") for r in lp.policy.rules if r.at == "cloud")
        with self._lock:
            engine.load_state(self.engine.state())
            engine.evaluations, engine.stale, engine.evicted = (self.engine.evaluations, self.engine.stale,
                                                                self.engine.evicted)
            self.engine, self._ons = engine, ons
        if engine.rules:
            log.info("cloud automation: %s", ", ".join(engine.rules))

    def _restore(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            text = self.state_file.read_text()
            self.engine.load_state(json.loads(text))
            self._saved = text
        except (OSError, ValueError) as exc:  # a damaged state only costs a possible repeat firing
            log.warning("automation state in %s not restored (%s); the rules start idle", self.state_file, exc)

    def save(self) -> bool:
        """Write the engine's state if it changed since last written; True if written."""
        if self.state_file is None:
            return False
        with self._lock:
            text = json.dumps(self.engine.state(), sort_keys=True, separators=(",", ":"))
            if text == self._saved:
                return False
            try:
                write_file_atomic(self.state_file, text, 0o600)
            except OSError as exc:
                log.error("saving the automation state to %s failed (%s); a restart may fire again",
                          self.state_file, exc)
                return False
            self._saved = text
            return True

    def explain(self, rule: str | None = None, *, now_ms: int | None = None) -> str:
        """The state of the cloud rules (see :meth:`AutomationEngine.explain`)."""
        with self._lock:
            return self.engine.explain(rule, now_ms=now_ms)

    # ---- what ingest hands over ---------------------------------------------------------------

    def wants(self, topic: str) -> bool:
        """For ingest: pass on the stored messages of ``topic``? (Cheap: topic patterns only.)"""
        try:
            parts = topics.parse(topic)
        except TopicError:
            return False
        if parts.channel == "event" and parts.sub == REQUEST:
            return True
        for on in self._ons:
            if (_KIND_CHANNEL[on.kind] == parts.channel and fnmatch.fnmatchcase(parts.node, on.node)
                    and fnmatch.fnmatchcase(parts.site, on.site)
                    and (on.kind == "status" or fnmatch.fnmatchcase(parts.sub or "", on.pattern))):
                return True
        return False

    def offer(self, items: Sequence[tuple[IngestItem, Any]], now_ms: int | None = None) -> list[Done]:
        """Observe newly stored messages (``(item, opened body)`` as ingest hands them on, in order) and
        carry out what fires and what gateways ask for. Never raises for one bad item: it is logged."""
        now_ms = int(self.clock() * 1000) if now_ms is None else now_ms
        done: list[Done] = []
        with self._lock:
            for item, _body in items:
                try:
                    site = topics.parse(item.topic).site
                    if item.event is not None and item.event.type == REQUEST:
                        done += self._request(item, site, now_ms)
                    for obs in observations(item, site):
                        for firing in self.engine.observe(obs, now_ms):
                            done += self._fire(firing, now_ms)
                except Exception:  # one message (or a store hiccup) must not stop the others
                    log.exception("automation: %s seq %d from %s not handled", item.topic[:200], item.seq,
                                  item.sender)
        return done

    def tick(self, now_ms: int | None = None) -> list[Done]:
        """Fire the rules whose ``for`` (or cooldown) ran out; save the state if it changed. Call about
        once a second."""
        now_ms = int(self.clock() * 1000) if now_ms is None else now_ms
        done: list[Done] = []
        with self._lock:
            for firing in self.engine.tick(now_ms):
                try:
                    done += self._fire(firing, now_ms)
                except Exception:
                    log.exception("automation: carrying out %s/%s for %s failed", firing.policy, firing.rule,
                                  firing.node)
            self.save()
        return done

    # ---- firings --------------------------------------------------------------------------------

    def _fire(self, f: Firing, now_ms: int) -> list[Done]:
        self.stats["fired"] += 1
        self.save()  # before the actions: a restart now must not fire this episode again
        rule = f"{f.policy}/{f.rule}"
        base = {"rule": rule, "source": f.source, "node": f.node, "site": f.site, "since": f.since_ms,
                "at": f.at_ms, "values": f.values}
        if f.mode == "audit":
            self.stats["audit"] += 1
            msg = f"{rule} would fire for {f.node} (audit mode: nothing run)"
            ev = self._event(now_ms, f.node, "automation.audit", "info", msg,
                             base | {"actions": [a.describe() for a in f.actions]})
            return [Done("audit", rule, f.source, f.node, f.site, msg, ev, firing=f)]
        log.info("automation: %s", f.explain().replace("\n", "; "))
        out: list[Done] = []
        for i, a in enumerate(f.actions):
            if isinstance(a, Alert):
                self.stats["alerts"] += 1
                ev = self._event(now_ms, f.node, "alert", a.severity, a.message, base)
                out.append(Done("alert", rule, f.source, f.node, f.site, a.message, ev, firing=f))
                continue
            assert isinstance(a, RunTask | SendCommand)
            what = f"{a.kind} {a.handler} on {a.target}"
            if isinstance(a, RunTask) and a.target == "cloud":
                reason = "the cloud cannot run tasks itself yet (no cloud executor; issue 7)"
            elif isinstance(a, RunTask) and a.target == "gateway":
                reason = "a cloud rule cannot run a task on a gateway: write the rule with at: gateway"
            else:
                tid = _task_id("firing", rule, f.site, f.node, f.since_ms, f.at_ms, i)
                reason, task = self._queue(tid, a.target, a.handler, a.args, now_ms, site=None)
                if task is not None:
                    msg = f"{rule} queued {what} (task {task.id})"
                    ev = self._event(now_ms, f.node, "automation.queued", "info", msg,
                                     base | {"action": a.kind, "handler": a.handler, "target": a.target,
                                             "task_id": task.id})
                    out.append(Done("queued", rule, f.source, f.node, f.site, msg, ev, task, firing=f))
                    continue
                if reason is None:  # queued before (the same firing carried out twice)
                    continue
            out.append(self._failed(now_ms, rule, f.source, f.node, f.site, f.node, what, reason,
                                    base | {"action": a.kind, "handler": a.handler, "target": a.target},
                                    firing=f))
        return out

    # ---- gateways' requests ---------------------------------------------------------------------

    def _request(self, item: IngestItem, site: str, now_ms: int) -> list[Done]:
        key = (item.sender, item.seq)
        if key in self._seen:
            self.stats["duplicates"] += 1
            return []
        self._seen[key] = None
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        self.stats["requests"] += 1
        assert item.event is not None
        data = item.event.data if isinstance(item.event.data, dict) else {}
        rule = str(data.get("rule") or "?")[:200]
        node = data.get("node") if isinstance(data.get("node"), str) else item.sender
        action, handler, target = data.get("action"), data.get("handler"), data.get("target")
        args = data.get("args", {})
        what = f"{action} {handler} on {target}"
        base = {"rule": rule, "node": node, "gateway": item.sender, "seq": item.seq, "action": action,
                "handler": handler, "target": target}

        def failed(reason: str) -> list[Done]:
            return [self._failed(now_ms, rule, "", node, site, item.sender, what, reason, base,
                                 request=key)]

        gw = self.store.get_node(item.sender)
        if gw is None or gw.role != "gateway" or gw.revoked_at is not None:
            what_it_is = ("not registered" if gw is None else "a revoked gateway" if gw.role == "gateway"
                          else f"a {gw.role}")
            return failed(f"{item.sender} is {what_it_is}: only an active gateway may ask the cloud to act")
        if action not in ("task", "command"):
            return failed(f"action must be task or command (got {str(action)[:40]!r})")
        if not isinstance(handler, str) or not _HANDLER.match(handler):
            return failed("handler must be 1-63 characters from a-z 0-9 _ . -")
        if not isinstance(args, dict):
            return failed("args must be a map")
        if not isinstance(target, str):
            return failed("target must be a node id")
        if target == "cloud":
            return failed("the cloud cannot run tasks itself yet (no cloud executor; issue 7)")
        reason, task = self._queue(_task_id("request", item.sender, item.seq), target, handler, args, now_ms,
                                   site=gw.site)
        if task is None:
            return [] if reason is None else failed(reason)
        msg = f"{rule} (gateway {item.sender}) queued {what} (task {task.id})"
        ev = self._event(now_ms, item.sender, "automation.queued", "info", msg, base | {"task_id": task.id})
        return [Done("queued", rule, "", node, site, msg, ev, task, request=key)]

    # ---- carrying out ---------------------------------------------------------------------------

    def _queue(self, task_id: str, target: str, handler: str, args: dict[str, Any], now_ms: int,
               site: str | None) -> tuple[str | None, Task | None]:
        """Queue a task for device ``target`` (of ``site`` if given): (None, task), (reason, None) if it
        cannot be, or (None, None) if this task id is queued already."""
        try:
            topics.check_name(target, "target")
        except TopicError:
            return f"target {target[:70]!r} is not a node id", None
        node: Node | None = self.store.get_node(target)
        if node is None:
            return f"target {target!r} is not a registered device", None
        if node.role != "device":
            return f"target {target!r} is a {node.role}, not a device: only devices run tasks", None
        if node.revoked_at is not None:
            return f"target {target!r} is revoked", None
        if site is not None and node.site != site:
            return (f"target {target!r} is a device of site {node.site!r}, not of the gateway's site {site!r}: "
                    "a gateway may only ask for its own site's devices"), None
        try:
            check_storable(args, "args")
        except BodyError as exc:
            return str(exc), None
        if self.store.get_task(task_id) is not None:
            self.stats["duplicates"] += 1
            return None, None
        deadline = None if self.task_timeout is None else now_ms + int(self.task_timeout * 1000)
        # the body exactly as the dispatcher seals it; an automation's task travels as one message (no parts)
        size = len(cbor2.dumps({"task_id": task_id, "handler": handler, "args": args, "deadline": deadline,
                                "parts": True}))
        if size > MAX_TASK_BODY:
            return f"the task command would be {size} bytes; at most {MAX_TASK_BODY} fit in one message", None
        limit = (node.agent or {}).get("max_payload")
        if isinstance(limit, int) and not isinstance(limit, bool) and size + ENVELOPE_HEADROOM > limit:
            return (f"the task command would be about {size + ENVELOPE_HEADROOM} bytes sealed; {target!r} takes "
                    f"at most {limit}"), None
        try:
            task = self.store.create_task(target=target, handler=handler, args=args, deadline=deadline,
                                          task_id=task_id, now=now_ms)
        except sqlite3.IntegrityError:  # queued a moment ago
            self.stats["duplicates"] += 1
            return None, None
        self.stats["queued"] += 1
        if self.on_queued is not None:
            self.on_queued(task)
        if self.publish is not None:
            self.publish(change("task", task_view(task)))
        self.request(task.id)
        log.info("automation: task %s queued: %s on %s", task.id, handler, target)
        return None, task

    def _failed(self, now_ms: int, rule: str, source: str, node: str, site: str, event_source: str, what: str,
                reason: str, data: dict[str, Any], *, firing: Firing | None = None,
                request: tuple[str, int] | None = None) -> Done:
        self.stats["failed"] += 1
        msg = f"{rule}: cannot {what}: {reason}"
        log.warning("automation: %s", msg)
        ev = self._event(now_ms, event_source, "automation.failed", "error", msg, data | {"reason": reason})
        return Done("failed", rule, source, node, site, msg, ev, reason=reason, firing=firing, request=request)

    def _event(self, now_ms: int, source: str, type_: str, severity: str, message: str,
               data: dict[str, Any]) -> Event:
        (ev,) = self.store.add_events([NewEvent(now_ms, source, type_, severity, message, data)])
        if self.publish is not None:
            self.publish(change("event", event_view(ev)))
        return ev


def observations(item: IngestItem, site: str) -> list[Observation]:
    """What the rules observe of one stored message (see the module's doc for ``values``)."""
    if item.readings:
        readings = sorted(item.readings, key=lambda r: r.ts)  # stable: a device's order within one ts
        return [Observation(site, item.sender, "telemetry", item.stream, dict(r.values), r.ts) for r in readings]
    if item.status is not None:
        values = dict(item.status.body)
        values["state"] = "online" if item.status.online else "offline"
        return [Observation(site, item.sender, "status", None, values, item.ts)]
    if item.event is not None:
        ev = item.event
        values = {"severity": ev.severity, "message": ev.message}
        if isinstance(ev.data, dict):
            values.update(ev.data)
        return [Observation(site, item.sender, "event", ev.type, values, ev.ts)]
    return []


# ---- retention ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamRetention:
    """What one sweep decided for one telemetry stream."""

    stream: str
    keep_s: float | None  # None: kept until deleted by hand
    decided_by: str | None  # policy/rule
    source: str | None  # file:line of the rule
    before_ms: int | None  # readings older than this were deleted
    deleted: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RetentionReport:
    at_ms: int
    streams: list[StreamRetention]
    event: Event | None = None  # the retention.pruned event (only when something was deleted)

    @property
    def deleted(self) -> int:
        return sum(s.deleted for s in self.streams)

    def explain(self) -> str:
        pruned = [s for s in self.streams if s.deleted]
        n = self.deleted
        lines = [f"RETENTION at {_iso(self.at_ms)}: deleted {n} reading{'s' * (n != 1)} of {len(pruned)} of "
                 f"{len(self.streams)} telemetry streams"]
        for s in self.streams:
            if s.keep_s is None:
                head = f"  telemetry/{s.stream}: kept until deleted by hand"
                head += f" ({s.decided_by} keeps some nodes' readings)" if s.decided_by else \
                    ": no enforced retention rule matches"
            else:
                head = (f"  telemetry/{s.stream}: keep {human(s.keep_s)}, decided by {s.decided_by} ({s.source}); "
                        f"deleted {s.deleted} reading{'s' * (s.deleted != 1)} before {_iso(s.before_ms or 0)}")
            lines.append(head)
            lines += [f"    note: {n}" for n in s.notes]
        return "\n".join(lines)


class RetentionSweeper:
    """Deletes stored telemetry older than its stream's retention (``qos`` policies, first matching rule).

    Per distinct stream in the store it asks :meth:`QosEngine.retention` (channel telemetry, the
    stream; site, node and role unknown). The store prunes by stream, not by node: when an enforced
    retention rule limited to some nodes, sites or roles (or with a ``when``) comes before the rule
    that decides for the stream, the longest of their retentions applies to the whole stream (a
    reading is never deleted earlier than a rule says), and the sweep notes it. Audit-mode rules
    are reported, never applied.
    """

    def __init__(self, pset: PolicySet | None, store: Store, *, clock: Callable[[], float] = time.time,
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.publish = publish
        self.use(pset)

    def use(self, pset: PolicySet | None) -> None:
        self.qos = QosEngine(pset if pset is not None else PolicySet())

    def decide(self, stream: str) -> tuple[float | None, str | None, str | None, list[str]]:
        """(seconds to keep or None, deciding policy/rule, its file:line, notes) for ``stream``."""
        v = self.qos.retention(channel="telemetry", stream=stream)
        notes = [f"audit: {a}; not enforced" for a in v.audit] + list(v.notes)
        keep, by, source = v.keep_s, v.decided_by, v.source
        narrow = []
        for r in self.qos.retention_rules():
            if (r.policy, r.rule) == (v.policy, v.rule):
                break
            m = r.match
            if "telemetry" not in m.channels or not any(fnmatch.fnmatchcase(stream, p) for p in m.streams):
                continue
            if m.node != "*" or m.site != "*" or m.role != "*" or m.when is not None:
                narrow.append(r)
        if narrow and keep is not None:
            longest = max(narrow, key=lambda r: r.keep_s)
            if longest.keep_s > keep:
                notes.append(f"{longest.policy}/{longest.rule} ({longest.source}) keeps some nodes' readings "
                             f"{human(longest.keep_s)}; the cloud prunes whole streams, so all of {stream} is "
                             f"kept {human(longest.keep_s)} instead of {human(keep)}")
                keep, by, source = longest.keep_s, f"{longest.policy}/{longest.rule}", longest.source
        elif narrow:
            notes.append(", ".join(f"{r.policy}/{r.rule}" for r in narrow) + " applies to some nodes only and no "
                         f"rule covers the rest of {stream}: nothing of it is deleted")
            by = f"{narrow[0].policy}/{narrow[0].rule}"
        return keep, by, source, notes

    def sweep(self, now_ms: int | None = None) -> RetentionReport:
        """One pass over every stored telemetry stream; records ``retention.pruned`` if it deleted any."""
        now_ms = int(self.clock() * 1000) if now_ms is None else now_ms
        out = []
        for stream in sorted(self.store.telemetry_streams()):
            keep, by, source, notes = self.decide(stream)
            for n in notes:
                log.info("retention: telemetry/%s: %s", stream, n)
            if keep is None:
                out.append(StreamRetention(stream, None, by, source, None, 0, notes))
                continue
            before = now_ms - int(keep * 1000)
            n = self.store.prune_telemetry([stream], before)
            if n:
                log.info("retention: deleted %d readings of telemetry/%s older than %s (%s)", n, stream,
                         human(keep), by)
            out.append(StreamRetention(stream, keep, by, source, before, n, notes))
        event = None
        pruned = [s for s in out if s.deleted]
        if pruned:
            total = sum(s.deleted for s in pruned)
            msg = (f"retention: deleted {total} telemetry readings ("
                   + ", ".join(f"{s.stream}: {s.deleted}" for s in pruned) + ")")
            (event,) = self.store.add_events([NewEvent(now_ms, "cloud", "retention.pruned", "info", msg, {
                "deleted": {s.stream: s.deleted for s in pruned},
                "rules": {s.stream: s.decided_by for s in pruned},
                "keep_s": {s.stream: s.keep_s for s in pruned},
                "before": {s.stream: s.before_ms for s in pruned}})])
            if self.publish is not None:
                self.publish(change("event", event_view(event)))
            log.info("%s", msg)
        return RetentionReport(now_ms, out, event)
