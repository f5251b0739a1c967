"""The gateway's policy enforcement: routing, rate limits and site-local automation.

- **Policies** are the shipped defaults plus the gateway's ``policies_dir``, re-read every second
  (an invalid change is refused as a whole and the previous set stays; both are reported to the
  cloud as ``policy.changed`` / ``policy.refused`` events of the gateway).
- **Routing**: each device is told its routes (which streams it seals to the gateway) in a sealed
  ``config`` message when it is first seen and when the routes change. Telemetry sealed to the
  gateway is opened, stored in :class:`~gateway.local.SiteData`, custody-acked and never
  forwarded; the summaries of each window go up as the gateway's own telemetry. A stream kept on
  site but sealed to the cloud (a device that has not heard its routes yet) is dropped here and
  recorded as a ``routing.dropped`` event naming the rule.
- **Rate limits** (``qos`` policies): a device over its limit is refused (``pause``: not
  custody-acked, told ``busy`` for the time to its next token, so it keeps the message) or its
  message is taken and discarded (``drop``); other devices' buckets are untouched.
- **Automation** (``automation`` policies, ``at: gateway``) runs over the readings the site keeps,
  so a site keeps its rules while the cloud is unreachable: alerts and the results of tasks run on
  the gateway go up as the gateway's events through its outbox, delivered when the cloud is back.

Denials and drops become events through :meth:`Gateway.emit_event`, at most one per rule, device
and kind a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwsnet import topics
from cwsnet.errors import EnvelopeError
from cwsnet.mqtt import LinkError, Message
from cwsnet.policy import AccessEngine, PolicySet, Subject
from cwsnet.policy.access import DenyRecorder
from cwsnet.policy.automation import AutomationEngine, Observation
from cwsnet.policy.qos import QosEngine
from cwsnet.policy.routing import DEFAULT_KEEP, RoutingEngine, summarize
from cwsnet.policy.watch import shipped_policies, start_watcher
from edge_agent.handlers import registry as handler_registry

if TYPE_CHECKING:
    from gateway.bridge import Gateway

log = logging.getLogger("cwsnet.gateway.policy")

TASK_TIMEOUT = 60.0  # seconds an automation task may run on the gateway
MAX_TASKS = 16  # automation tasks running on the gateway at once
WINDOWS_PER_ROUND = 50  # summary windows sent per rule each second while catching up
PLAUSIBLE_MS = 86_400_000  # automation looks at readings stamped within a day of the gateway's clock
MAX_READINGS = 1000  # readings kept from one message
IGNORED_PAUSE = 200  # messages refused within one pause: the device ignores it (twice the agent's window)


class SitePolicies:
    def __init__(self, gw: Gateway, folders: list[Path] | None = None) -> None:
        self.gw = gw
        policies_dir = gw.cfg.policies_dir or gw.cfg.data_dir / "policies"
        self.watcher = start_watcher(folders or [shipped_policies(), policies_dir], gw.clock, log)
        self.routes_sent: dict[str, list[list[str]]] = {}
        self._muted: dict[tuple[str, ...], float] = {}
        self._state_dirty = False
        self._handlers = handler_registry(["echo", "sha256", "sleep"])
        self.recorder: DenyRecorder | None = None
        self._pauses: dict[str, tuple[float, set[int]]] = {}  # device -> (start of its pause window, seqs refused)
        self._routes_forced: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # automation tasks running on the gateway
        self._acl_dirty = False
        self._penalties: dict[str, tuple[float, float]] = {}  # device -> (last lock-out, its length)
        self.use(self.watcher.active)
        saved = gw.local.get_mark("automation-state")
        if saved:
            try:
                self.automation.load_state(saved)
            except Exception as exc:  # noqa: BLE001 - a damaged state only costs a possible repeat firing
                log.warning("automation state not restored (%s); rules start idle", exc)

    def use(self, pset: PolicySet | None) -> None:
        self.pset = pset
        # the site broker's ACLs come from the access policies (all of the set, whatever enforce_policies says)
        self.access = AccessEngine(pset) if pset is not None else None
        if self.access is not None:
            if getattr(self, "recorder", None) is None:
                self.recorder = DenyRecorder(self.access)
            else:
                self.recorder.engine = self.access
        if not self.gw.cfg.enforce_policies:  # routes: everything to the cloud; no limits, no automation
            pset = PolicySet()
        self.routing = RoutingEngine(pset)
        self.qos = QosEngine(pset or PolicySet(), previous=getattr(self, "qos", None))  # buckets carry over
        old = getattr(self, "automation", None)
        self.automation = AutomationEngine(pset or PolicySet(), at="gateway")
        if old is not None:
            self.automation.load_state(old.state())
        site_tasks = getattr(self.gw, "site_tasks", None)  # None while the gateway is being built
        if site_tasks is not None:
            site_tasks.use_policies(pset)

    # ---- events -------------------------------------------------------------------------
    def event(self, kind: str, severity: str, message: str, data: dict[str, Any], key: tuple[str, ...] = ()) -> None:
        """Report to the cloud (and the log), at most once a minute per ``(kind, *key)``."""
        now = time.monotonic()
        k = (kind, *key)
        if now - self._muted.get(k, float("-inf")) < 60.0:
            return
        if len(self._muted) > 10_000:
            self._muted.clear()
        self._muted[k] = now
        (log.warning if severity in ("warning", "error", "critical") else log.info)("%s: %s", kind, message)
        self.gw.emit_event(kind, severity, message, data)

    def broker_hook(self) -> Any:
        """The site broker's ``on_decision``: refused access attempts become events naming the rule."""
        if self.recorder is None:
            return None

        def subject(username: str) -> Subject | None:
            e = self.gw.registry.get(username)
            return Subject(e.id, e.role, e.site) if e is not None and e.active else None

        return self.recorder.broker_hook(subject, lambda ev: self.gw.emit_event(
            ev["kind"], ev["severity"], ev["message"], ev.get("data") or {}), broker="site")

    # ---- rate limits ----------------------------------------------------------------------
    def admit(self, header: Any, parts: topics.TopicParts) -> str:
        """"admit", "pause" or "drop" for one device message, before it is stored. Births, statuses and
        deaths always pass: a paused birth would hold back the device's routes and held commands."""
        if parts.channel == "status":
            return "admit"
        channel = "task_result" if parts.channel == "task/result" else parts.channel
        entry = self.gw.registry.get(header.sender)
        v = self.qos.admit(site=parts.site, node=header.sender, role=entry.role if entry else "device",
                           channel=channel, stream=parts.sub, now=time.monotonic())
        if v.action == "admit":
            return "admit"
        self.gw.stats["rate_limited" if v.action == "pause" else "rate_dropped"] += 1
        self.event("qos.limited", "warning",
                   f"{header.sender} over its rate limit on {parts.channel}"
                   + (f"/{parts.sub}" if parts.sub else "") + f": {v.action} (decided by {v.policy}/{v.rule})",
                   {"node": header.sender, "channel": channel, "stream": parts.sub, "action": v.action,
                    "rule": f"{v.policy}/{v.rule}", "source": v.source, "retry_after": v.retry_after},
                   key=(header.sender, str(v.rule)))
        if v.action == "pause":
            self.gw.custody.refused(header.sender, header.seq, busy_for=v.retry_after)
            self._ignoring_pause(header.sender, header.seq, v)
        return v.action

    def _ignoring_pause(self, device: str, seq: int, v: Any) -> None:
        """A device told to pause stops within its send window (the CPython agent's is 100 messages, the
        firmware's 8). One that goes on sending more than ``IGNORED_PAUSE`` messages within one
        pause ignores it: refusing them still costs the site broker and this gateway as much as
        taking them, so it is disconnected and locked out of the site broker for 10 s, doubling for
        each repeat up to 5 minutes (reset after 10 minutes of good behaviour)."""
        now = time.monotonic()
        start, seqs = self._pauses.get(device, (now, set()))
        if now - start > max(v.retry_after, 1.0) + 1.0:  # a new pause window
            start, seqs = now, set()
        seqs.add(seq)  # distinct messages: re-sends and broker redeliveries of one message count once
        self._pauses[device] = (start, seqs)
        count = len(seqs)
        if count <= IGNORED_PAUSE or self.gw.broker is None:
            return
        self._pauses.pop(device, None)
        last, penalty = self._penalties.get(device, (float("-inf"), 5.0))
        penalty = 10.0 if now - last > 600 else min(penalty * 2, 300.0)
        self._penalties[device] = (now, penalty)
        self.gw.stats["rate_lockouts"] += 1
        why = f"ignored the pause of rate limit {v.policy}/{v.rule}"
        self.event("qos.locked_out", "warning", f"{device} {why}: disconnected, locked out of the site broker "
                   f"for {penalty:.0f} s", {"node": device, "rule": f"{v.policy}/{v.rule}", "source": v.source,
                                            "seconds": penalty, "refused_in_pause": count}, key=(device,))
        task = asyncio.get_running_loop().create_task(self.gw.broker.lock_out(device, penalty, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- routing --------------------------------------------------------------------------
    async def telemetry(self, msg: Message, header: Any, parts: topics.TopicParts) -> bool:
        """Handle telemetry the routing policy keeps on site; False: forward it as usual."""
        gw = self.gw
        if header.recipient == gw.node:
            await self._keep(msg, header, parts)
            return True
        if header.recipient != "cloud":
            return False  # for another gateway of the site, or a node that is not ours to judge
        route = self.routing.route(parts.site, header.sender, parts.sub or "")
        if route.to != "gateway":
            return False
        # sealed to the cloud, but the site keeps this stream: never forwarded. Taken (custody-acked)
        # so the device does not send it forever, and the device is told its routes again.
        gw.site_link.ack(msg)
        gw.custody.stored(header.sender, header.seq)
        gw.wake_custody()
        gw.stats["routing_dropped"] += 1
        self.event("routing.dropped", "warning",
                   f"telemetry/{parts.sub} of {header.sender} was sealed to the cloud; dropped at the gateway: "
                   f"{route.decided_by} keeps it on site", {"node": header.sender, "stream": parts.sub,
                                                            "rule": route.decided_by, "source": route.source},
                   key=(header.sender, str(route.decided_by)))
        now = time.monotonic()
        if now - self._routes_forced.get(header.sender, float("-inf")) >= 10.0:  # at most every 10 s
            self._routes_forced[header.sender] = now
            await self.send_routes(header.sender, force=True)
        return True

    async def _keep(self, msg: Message, header: Any, parts: topics.TopicParts) -> None:
        gw = self.gw
        try:
            opened = gw.endpoint.open(msg.payload, msg.topic)
        except EnvelopeError as exc:
            gw.stats["malformed"] += 1
            log.warning("rejected telemetry sealed to the gateway on %s: %s (%s)", msg.topic, exc, exc.reason)
            gw.site_link.ack(msg)
            return
        readings, problems = _readings(opened.body)
        if problems:
            gw.stats["malformed"] += 1
            log.warning("telemetry on %s from %s seq %d: %s; %d good readings kept", msg.topic, header.sender,
                        header.seq, problems, len(readings))
        now_ms = int(gw.clock() * 1000)
        try:
            new = await gw.db_call(gw.local.add_batch, header.sender, header.seq, parts.sub or "", readings, now_ms)
        except sqlite3.Error as exc:  # not custody-acked: the device sends it again
            gw.storage_trouble("keeping site telemetry", exc)
            gw.site_link.ack(msg)
            return
        except Exception:  # noqa: BLE001 - never leave a message un-acked in the broker; the device re-sends
            log.exception("keeping telemetry from %s seq %d failed; not custody-acked", header.sender, header.seq)
            gw.site_link.ack(msg)
            return
        gw.site_link.ack(msg)
        gw.custody.stored(header.sender, header.seq)
        gw.wake_custody()
        gw.stats["kept_on_site"] += 1
        if not new:
            return
        for ts, values in readings:
            if abs(ts - now_ms) > PLAUSIBLE_MS:  # a clock far off would freeze or skip the node's episodes
                continue
            obs = Observation(site=parts.site, node=header.sender, kind="telemetry", stream=parts.sub,
                              values=values, ts=ts)
            for firing in self.automation.observe(obs, now_ms):
                await self._fire(firing)
        self._state_dirty = True

    async def send_routes(self, device: str, force: bool = False) -> None:
        """Tell ``device`` which of its streams it seals to the gateway (if changed, or ``force``)."""
        gw = self.gw
        entry = gw.registry.get(device)
        if entry is None or not entry.active or entry.role != "device":
            return
        table = self.routing.device_table(gw.site, device)
        if not force and self.routes_sent.get(device) == table:
            return
        topic = topics.config(gw.site, device)
        try:
            payload, _h = gw.endpoint.seal(topic, "config", {"route": table}, to=device,
                                           recipient_key=gw.ring.key_for_reply(device, gw.device_kv.get(device)))
            await gw.site_link.publish(topic, payload, qos=1)
        except (LinkError, sqlite3.Error, EnvelopeError, Exception) as exc:  # noqa: BLE001 - retried next time
            log.info("routes for %s not sent (%s); sent again when it is next seen", device, exc)
            return
        self.routes_sent[device] = table

    # ---- automation -----------------------------------------------------------------------
    async def _fire(self, firing: Any) -> None:
        """Carry out a firing. Its alerts and requests are in the outbox before the engine's state
        (which says it fired) is saved: a crash in between repeats the firing, never loses it."""
        gw = self.gw
        gw.stats["automation_fired"] += 1
        if firing.mode == "audit":
            await self._emit("automation.audit", "info", f"{firing.policy}/{firing.rule} would fire for "
                             f"{firing.node} (audit mode: nothing run)", {"rule": f"{firing.policy}/{firing.rule}",
                                                                          "node": firing.node,
                                                                          "values": firing.values})
        else:
            log.warning("automation: %s", firing.explain().replace("\n", "; "))
            for action in firing.actions:
                await self._act(firing, action)
        try:
            await self._save_state()
        except sqlite3.Error as exc:
            gw.storage_trouble("saving the automation state", exc)
            self._state_dirty = True

    async def _emit(self, kind: str, severity: str, message: str, data: dict[str, Any]) -> None:
        try:
            await self.gw.emit_own(topics.event(self.gw.site, self.gw.node, kind), "event",
                                   {"type": kind, "severity": severity, "message": message, "data": data})
            self.gw.stats["events_sent"] += 1
        except Exception as exc:  # noqa: BLE001 - disk full...: logged; the gateway carries on
            log.error("event %s not recorded (%s): %s", kind, exc, message)

    async def _act(self, firing: Any, action: Any) -> None:
        rule = f"{firing.policy}/{firing.rule}"
        base = {"rule": rule, "source": firing.source, "node": firing.node, "since": firing.since_ms,
                "at": firing.at_ms, "values": firing.values}
        kind = getattr(action, "kind", type(action).__name__.lower())
        if kind == "alert":
            await self._emit("alert", action.severity, action.message, base)
        elif kind == "task" and action.on == "gateway":
            if len(self._tasks) >= MAX_TASKS:
                await self._emit("automation.task", "error", f"{rule}: {action.handler} not run on gateway "
                                 f"{self.gw.node}: {MAX_TASKS} automation tasks are running already",
                                 base | {"handler": action.handler, "state": "failed"})
                return
            task = asyncio.get_running_loop().create_task(self._run_task(rule, action, base))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:  # a task elsewhere or a command: only the cloud may command a device; ask it
            await self._emit("automation.request", "info",
                             f"{rule} asks the cloud to {kind} {action.handler} on {action.target}",
                             base | {"action": kind, "handler": action.handler, "args": dict(action.args),
                                     "target": action.target})

    async def _run_task(self, rule: str, action: Any, base: dict[str, Any]) -> None:
        gw = self.gw
        handler = self._handlers.get(action.handler)
        started = int(gw.clock() * 1000)
        if handler is None:
            state, result, error = "failed", None, f"no handler {action.handler!r} on the gateway " \
                                                   f"(it has {', '.join(sorted(self._handlers))})"
        else:
            try:
                result = await asyncio.wait_for(handler(dict(action.args)), TASK_TIMEOUT)
                state, error = "succeeded", None
            except Exception as exc:  # noqa: BLE001 - a failing handler is reported, never fatal
                state, result, error = "failed", None, f"{type(exc).__name__}: {exc}"
        gw.stats["automation_tasks"] += 1
        await self._emit("automation.task", "info" if state == "succeeded" else "error",
                      f"{rule} ran {action.handler} on gateway {gw.node}: {state}" + (f" ({error})" if error else ""),
                      base | {"handler": action.handler, "state": state, "result": result, "error": error,
                              "started": started, "finished": int(gw.clock() * 1000)})

    # ---- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Every second: policy reload, automation timers, due summaries; every minute: expiry. Each
        step fails on its own (logged, retried next round): one cannot stop the others."""
        last_expire = float("-inf")
        while True:
            await asyncio.sleep(1.0)
            now_ms = int(self.gw.clock() * 1000)
            await self._step("reloading the policies", self._reload())
            await self._step("automation timers", self._tick(now_ms))
            await self._step("summaries", self._summaries(now_ms))
            if self._state_dirty:
                await self._step("saving the automation state", self._save_state())
            if time.monotonic() - last_expire >= 60.0:
                last_expire = time.monotonic()
                await self._step("expiring site readings", self._expire(now_ms))

    async def _step(self, what: str, coro: Any) -> None:
        try:
            await coro
        except sqlite3.Error as exc:
            self.gw.storage_trouble(what, exc)
        except Exception:
            log.exception("%s failed; trying again in a second", what)

    async def _tick(self, now_ms: int) -> None:
        for firing in self.automation.tick(now_ms):
            await self._fire(firing)

    async def _save_state(self) -> None:
        await self.gw.db_call(self.gw.local.put_mark, "automation-state", self.automation.state())
        self._state_dirty = False

    async def _reload(self) -> None:
        if self._acl_dirty:  # the site broker's ACLs follow the set; retried each second until written
            await self.gw.policies_changed()
            self._acl_dirty = False
        ch = await asyncio.to_thread(self.watcher.check)
        if ch is None:
            return
        if not ch.accepted:
            self.gw.emit_event("policy.refused", "error", f"gateway {self.gw.node}: policy change refused "
                               f"({len(ch.problems)} problems); the previous set stays active",
                               {"problems": ch.problems[:50], "active": ch.names})
            log.error("policy change refused; still applying %s:\n%s", ", ".join(ch.names), "\n".join(ch.problems))
            return
        self.use(self.watcher.active)
        log.info("policies reloaded: %s", ", ".join(ch.names))
        self.gw.emit_event("policy.changed", "info", f"gateway {self.gw.node}: policy set reloaded: "
                           f"{', '.join(ch.names)}", {"policies": ch.names})
        self._acl_dirty = True
        for device in list(self.gw.devices_online):
            await self.send_routes(device)

    async def _summaries(self, now_ms: int) -> None:
        """Send the summaries of the windows that have closed, by the gateway's arrival time (so late
        readings count in the window they arrived in). At most ``WINDOWS_PER_ROUND`` windows per
        rule a round, so a long catch-up never stalls the automation timers. The mark is written
        after the summary is in the outbox: a crash in between sends that window twice (same
        ``ts``, so a consumer can tell), never zero times."""
        gw = self.gw
        for policy, _source, rule in self.routing.summaries():
            s = rule.summary
            assert s is not None
            every = int(s.every * 1000)
            key = f"summary:{policy}/{rule.name}"
            mark = await gw.db_call(gw.local.get_mark, key)
            due_end = now_ms // every * every
            if mark is None:  # first run of this rule: start with the window now open
                await gw.db_call(gw.local.put_mark, key, due_end)
                continue
            for _ in range(WINDOWS_PER_ROUND):
                if mark + every > due_end:
                    break
                rows = await gw.db_call(gw.local.window, rule.match.streams, mark, mark + every)
                readings = summarize(rows, mark, mark + every, list(s.stats))
                if readings:
                    await gw.emit_own(topics.telemetry(gw.site, gw.node, s.stream), "telemetry",
                                      {"stream": s.stream, "readings": readings})
                    gw.stats["summaries_sent"] += 1
                    mark += every
                else:  # skip the empty windows up to the next reading at once
                    nxt = await gw.db_call(gw.local.first_received, rule.match.streams, mark + every)
                    mark = due_end if nxt is None else max(mark + every, min(due_end, nxt // every * every))
                await gw.db_call(gw.local.put_mark, key, mark)

    async def _expire(self, now_ms: int) -> None:
        """Delete readings past their rule's ``keep``; streams no rule keeps any more (a policy
        changed, or a device sealed one to the gateway on its own) after the default 7 days."""
        gw = self.gw
        for node, stream in await gw.db_call(gw.local.node_streams):
            route = self.routing.route(gw.site, node, stream)
            keep = route.keep if route.to == "gateway" and route.keep else DEFAULT_KEEP
            n = await gw.db_call(gw.local.expire, node, stream, now_ms - int(keep * 1000))
            if n:
                log.info("expired %d site readings of %s/%s (kept %.0f s)", n, node, stream, keep)


def _readings(body: Any) -> tuple[list[tuple[int, dict[str, Any]]], str | None]:
    """The usable readings of a telemetry body, and what was wrong with the rest (None: nothing).

    A reading needs an int ``ts`` (ms, 0 <= ts < 2**63) and a map of ``values``; of those only text
    keys (1-63 characters) with a bool, an int64, a finite float or a text of at most 256
    characters are kept, at most 64 of them. Anything else is dropped and reported, never raised."""
    if not isinstance(body, dict) or not isinstance(body.get("readings"), list):
        return [], "not {stream, readings: [{ts, values}]}"
    out: list[tuple[int, dict[str, Any]]] = []
    bad = 0
    for r in body["readings"][:MAX_READINGS]:
        ts = r.get("ts") if isinstance(r, dict) else None
        vals = r.get("values") if isinstance(r, dict) else None
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**63 or not isinstance(vals, dict):
            bad += 1
            continue
        clean = {k: v for k, v in list(vals.items())[:64] if isinstance(k, str) and 0 < len(k) <= 63 and _plain(v)}
        bad += len(clean) < len(vals)
        out.append((ts, clean))
    bad += max(0, len(body["readings"]) - MAX_READINGS)
    return out, (f"{bad} readings or values dropped (bad ts, values or too many)" if bad else None)


def _plain(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -(2**63) <= v < 2**63
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, str) and len(v) <= 256
