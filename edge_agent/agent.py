"""The CPython edge agent: birth/status/death, batched sealed telemetry, sealed task commands.

One asyncio TaskGroup per agent: the MQTT link, one loop per sensor, the batch flusher, the status
loop and the running tasks. Cancelling :meth:`Agent.run` (the CLI does it on SIGTERM) stops them
all, publishes nothing more and disconnects cleanly.

As an executor of the cloud's scheduler (docs/protocol.md §3, task_cmd), the agent runs each
``(task_id, attempt)`` at most once, lists the leased tasks it holds in its statuses (sent every
third of the shortest lease while it holds one: the heartbeat that keeps them here), passes a
:class:`~edge_agent.handlers.TaskContext` to handlers that take one (resume from a checkpoint, save
checkpoints), and stops a task on a cancel command.

Behind a gateway it also takes part in *site tasks* (docs/protocol.md §3, "Site tasks"): it submits
work to its gateway (:meth:`Agent.submit_task`, or a ``new`` row that ``cwsnet task submit`` puts in
``submissions.db``), records the gateway's ``task_done`` outcome, offers itself to the gateway's
scheduler (its status, sealed to the gateway on ``task/status``) and runs the tasks the gateway
assigns exactly as the cloud's, sealing each task's results to the node that assigned it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import sqlite3
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

import cwsnet
from cwsnet import custody, parts, sdnotify, topics
from cwsnet.aio import wait_event
from cwsnet.bundle import Bundle
from cwsnet.config import AgentConfig
from cwsnet.endpoint import Endpoint
from cwsnet.envelope import MAX_CHECKPOINT, body_problem
from cwsnet.errors import ConfigError, CwsError
from cwsnet.identity import file_signature
from cwsnet.links import link_for
from cwsnet.mqtt import AuthRefused, LinkDown, LinkError, Message, Will
from cwsnet.nodestate import NodeState
from edge_agent.handlers import TaskContext, TaskFailed, registry, takes_context
from edge_agent.outbox import CLASS_NAMES, PRIORITY, AgentOutbox
from edge_agent.sensors import Sensor, build_sensor, system_snapshot
from edge_agent.submissions import FINAL as SUBMISSION_FINAL
from edge_agent.submissions import Submission, Submissions, new_key

log = logging.getLogger("cwsnet.agent")

#: messages kept in memory while the outbox cannot be written (disk full, I/O error)
UNSTORED_MAX = 1000
ROUTES_WAIT = 30.0  # seconds a first-boot device behind a gateway waits for its routes before its telemetry
#: seconds between checks of the provisioning bundle for a rotated key
BUNDLE_POLL = 1.0
#: seconds between two re-sends of a site task submission the gateway took but has not answered
RESUBMIT_EVERY = 300.0
#: seconds after a token rotation during which a refused login tries the other token
TOKEN_SETTLE = 60.0
#: seconds between two systemd STATUS= updates when systemd asks for no watchdog
SYSTEMD_STATUS_EVERY = 5.0
#: seconds between checks of submissions.db for submissions another process (`cwsnet task submit`) added
SUBMISSION_POLL = 1.0
#: a command waiting for its args' parts is listed as held (its lease holds) while a part came this recently
PARTS_STALL = 30.0
#: seconds between two upkeeps of the parts store (whole ones taken, day-old ones given up on)
PARTS_UPKEEP_EVERY = 3600.0

#: called with (key, row) when the gateway reports how a site task this agent submitted ended
TaskDoneCallback = Callable[[str, Submission], None]


@dataclass(eq=False)
class _Held:
    """A task accepted here and not finished: from its command until its final result is handed to
    the outbox (a cancel can stop it until then)."""

    task_id: str
    attempt: int | None  # the lease number of a scheduled task (None: a command without one)
    lease: float | None  # seconds; while held, a status goes at least every third of it
    trace: str | None
    body: dict[str, Any] = field(repr=False)
    run: asyncio.Task[None] | None = None
    entered: bool = False  # its run began (a task cancelled before that never runs its code)
    started: int | None = None  # ms, once it got a slot
    stop_reason: str | None = None  # set when a cancel (or a newer attempt) stops it
    assigner: str = "cloud"  # who sent its task_cmd: its results are sealed to it (the cloud or our gateway)

    @property
    def scheduled(self) -> bool:
        """Placed by the scheduler (a lease or an attempt): listed in heartbeats."""
        return self.attempt is not None or self.lease is not None


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _encodable(value: Any) -> str | None:
    """Why ``value`` cannot go in a message body (None: it can): not CBOR, or too big for one message."""
    return body_problem(value, "it")


@dataclass(slots=True)
class _Unstored:
    """A message not yet sealed and stored (the outbox could not be written): kept in memory."""

    topic: str
    kind: str
    body: Any
    retain: bool
    trace: str | None
    delivered: asyncio.Future[bool]
    sealed: tuple[bytes, int] | None = None  # (payload, seq) once sealed: a retry reuses the seq
    to: str | None = None  # the recipient, when the caller knows it (else :meth:`Agent._recipient` decides)


class Agent:
    def __init__(self, cfg: AgentConfig, *, clock: Any = time.time, on_task_done: TaskDoneCallback | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        #: called with (key, row) when the gateway reports how a site task this agent submitted ended
        self.on_task_done = on_task_done
        bundle = Bundle.load_node(cfg.identity_file)
        self.bundle = bundle
        self.node = bundle.identity.node
        self.site = bundle.identity.site
        self.state = NodeState(cfg.data_dir / "agent.db")
        self.parts = parts.PartStore(cfg.data_dir / "parts.db")  # large task args, until whole (§3, "Parts")
        self.gateway = bundle.gateway  # custody acks come from it; command receipts go to it
        self.endpoint = Endpoint(bundle.identity, self.state.seq_counter(), self._peer_key, clock,
                                 key_version=bundle.kv)
        self._bundle_sig = file_signature(cfg.identity_file)
        self._previous_token: str | None = None  # the MQTT token before the last rotation
        self._token_rotated_at = float("-inf")
        self.cloud_window = self.state.replay_window("cloud")
        # commands (site tasks, their outcomes) from our gateway: a window over the gateway's seq, like the cloud's
        self.gateway_window = self.state.replay_window(self.gateway) if self.gateway is not None else None
        # site tasks this device submitted (shared with `cwsnet task submit` in other processes)
        self.submissions = Submissions.in_dir(cfg.data_dir)
        self._handed: set[str] = set()  # submission keys handed to the outbox in this run
        self._submissions_retry = False  # a storage error left a `new` submission behind: look again
        self.handlers = registry(cfg.handlers)
        self._with_ctx = {name for name, fn in self.handlers.items() if takes_context(fn)}  # (args, ctx) handlers
        self.sensors: list[Sensor] = [build_sensor(s) for s in cfg.sensors]
        self.started = clock()
        # every outgoing message is stored here before it is sent, and kept until acknowledged
        self.outbox = AgentOutbox(cfg.data_dir / "outbox.db", max_messages=cfg.outbox.max_messages,
                                  max_bytes=cfg.outbox.max_bytes, ledger_keep=cfg.outbox.ledger_keep)
        # which held messages to (re)send: at most `window` awaiting a custody ack (docs/protocol.md §5)
        self.window = custody.SendWindow(window=cfg.outbox.window, retransmit_after=cfg.outbox.retransmit_after,
                                         max_backoff=cfg.outbox.max_backoff)
        # seq -> resolves True once acknowledged, False if the overflow policy dropped it
        self._delivered: dict[int, asyncio.Future[bool]] = {}
        # messages waiting for the outbox to be writable again (disk full), oldest first
        self._unstored: deque[_Unstored] = deque()
        self._unstored_drops: dict[str, int] = {}
        self.storage_error: str | None = None
        self.batches: dict[str, list[dict[str, Any]]] = {}
        self.batch_started: dict[str, float] = {}
        self.will_seq: int | None = None
        self.running_tasks = 0
        self._wake_flush = asyncio.Event()
        self._draining = asyncio.Lock()
        # config fields of the scheduler work (cwsnet.config.AgentConfig), read so older configs still load
        self.slots: int = getattr(cfg, "task_slots", 4)
        # "parts": it takes task args too big for one message, in parts (protocol §3, built in)
        self.capabilities: list[str] = list(dict.fromkeys([*getattr(cfg, "capabilities", []), parts.CAPABILITY]))
        self._task_slots = asyncio.Semaphore(max(self.slots, 1))  # 0 slots: direct tasks still run, one at a time
        self._tg: asyncio.TaskGroup | None = None
        self._task_runs: set[asyncio.Task[None]] = set()
        self._held: dict[str, _Held] = {}  # task_id -> its run here, until its final result is handed over
        self._parts_lost: set[tuple[str, int | None]] = set()  # results a part of which the outbox dropped
        self._wake_status = asyncio.Event()  # the status period may have shrunk (a leased task arrived)
        self.systemd = sdnotify.Notifier()  # a no-op unless run by systemd (Type=notify)
        self.link = link_for(
            cfg.broker, bundle, cfg.reconnect, client_id=self.node, section="broker", name=f"agent:{self.node}",
            will_factory=self._make_will, on_connect=self._on_connect, on_message=self._on_message,
        )
        self.link.subscribe(topics.task_cmd(self.site, self.node), qos=1)
        self.link.subscribe(topics.ack(self.site, self.node), qos=1)
        self.link.subscribe(topics.config(self.site, self.node), qos=1)
        # which telemetry streams are sealed to the gateway (kept on site), as the gateway last said
        saved = self.state.get("routes")
        self.routes: list[list[str]] = (saved or {}).get("table", [])
        self._routes_seq: int = (saved or {}).get("seq", 0)
        # Until a device behind a gateway has heard its routes once, telemetry waits unsealed (in
        # memory, at most ROUTES_WAIT s): sealed to the cloud, a stream its site keeps would be dropped
        # by the gateway. After that the stored table is used from the start.
        self._routes_known = saved is not None or self.gateway is None
        self._routes_deadline = time.monotonic() + ROUTES_WAIT

    # ---- keys -------------------------------------------------------------------------------
    def _peer_key(self, node: str) -> Any:
        return self.bundle.peer_keys().get(node)

    async def _bundle_watch(self) -> None:
        """Follow the provisioning bundle: `cwsnet device rotate` writes a new key pair (and maybe
        token) into it. New messages are sealed with the new key from then on; what the outbox holds
        keeps the old key's seal, which the cloud accepts for the rotation's grace period."""
        while True:
            await asyncio.sleep(BUNDLE_POLL)
            self._check_bundle()

    def _check_bundle(self) -> bool:
        """Reload the bundle if its file changed; True if it was reloaded."""
        sig = file_signature(self.cfg.identity_file)
        if sig == self._bundle_sig:
            return False
        self._bundle_sig = sig
        try:
            self.reload_bundle(Bundle.load_node(self.cfg.identity_file))
        except ConfigError as exc:  # half-copied or broken: keep the keys in use
            log.error("provisioning bundle not reloaded, keeping key version %d: %s", self.bundle.kv, exc)
            return False
        return True

    async def _run_link(self) -> None:
        """The MQTT link. Right after a token rotation the two brokers' views differ for a moment (the
        site broker learns the new token from the cloud's push): a refusal within TOKEN_SETTLE seconds
        of a rotation is not fatal, the agent logs in with the other token (new, then old) until one
        is accepted. Any other refusal ends the agent (exit code 2: its credentials are wrong)."""
        while True:
            try:
                await self.link.run()
                return
            except AuthRefused:
                reloaded = self._check_bundle()  # (a new token is then the one the link uses)
                settling = time.monotonic() - self._token_rotated_at < TOKEN_SETTLE
                if not settling or self._previous_token is None:
                    raise
                if reloaded:
                    log.warning("the broker refused the old MQTT token; logging in with the rotated one")
                else:
                    new = self.link.password == self.bundle.mqtt_password
                    log.warning("the broker refused the %s MQTT token right after a rotation; trying the %s one",
                                "new" if new else "old", "old" if new else "new")
                    self.link.set_credentials(self.bundle.mqtt_username,
                                              self._previous_token if new else self.bundle.mqtt_password)
                await asyncio.sleep(1.0)

    def reload_bundle(self, new: Bundle) -> None:
        old = self.bundle
        if (new.identity.node, new.identity.site) != (old.identity.node, old.identity.site):
            log.error("provisioning bundle %s now names %s of site %s; this agent is %s of %s: not reloaded "
                      "(restart the agent to change identity)", self.cfg.identity_file, new.identity.node,
                      new.identity.site, self.node, self.site)
            return
        self.bundle = new
        self.endpoint.rekey(new.identity, new.kv)
        if new.mqtt_password != old.mqtt_password:
            self._previous_token, self._token_rotated_at = old.mqtt_password, time.monotonic()
            self.link.set_credentials(new.mqtt_username, new.mqtt_password)
        if new.identity.public_b64 != old.identity.public_b64:
            log.info("key rotated: sealing with key version %d from now on", new.kv)

    # ---- status -------------------------------------------------------------------------
    def status_body(self, state: str = "online") -> dict[str, Any]:
        snap = system_snapshot(str(self.cfg.data_dir))
        return {
            "state": state,
            "uptime": round(self.clock() - self.started, 1),
            **snap,
            "outbox": self.outbox.depth(),
            "outbox_bytes": self.outbox.size(),
            "dropped": self._drops(),
            "unacked": len(self.window.inflight),
            "storage": "ok" if self.storage_error is None else f"error: {self.storage_error}",
            "link": "up" if self.link.connected.is_set() else "down",
            "tasks_running": self.running_tasks,
            "agent": {"version": cwsnet.__version__, "platform": platform.platform(), "kind": "cpython"},
            "handlers": sorted(self.handlers),
            # as an executor of scheduled tasks: what it holds (the heartbeat), its slots, what it offers,
            # and how often it reports while it holds nothing
            "tasks": self.held_tasks(),
            "slots": self.slots,
            "capabilities": self.capabilities,
            "interval": self.cfg.status_interval,
        }

    def held_tasks(self) -> list[str]:
        """The scheduled (leased) tasks accepted here and not finished, in the order they came, and those
        whose command waits for its args' parts while they still come (protocol §3, "Parts")."""
        held = [h.task_id for h in self._held.values() if h.scheduled]
        try:
            waiting = {n.rsplit("/", 1)[0] for sender in {"cloud", self.gateway} if sender
                       for n in self.parts.waiting_names(sender, self.clock() - PARTS_STALL)
                       if not n.startswith("done/")}  # (a site task's outcome coming in parts: not a task held)
        except sqlite3.Error:
            waiting = set()
        return held + sorted(waiting - set(held))

    def status_every(self) -> float:
        """Seconds between statuses: a third of the shortest lease held (the heartbeat), at most
        ``status_interval``. While the link is down no heartbeat can arrive in time: the normal pace."""
        every = self.cfg.status_interval
        leases = [h.lease for h in self._held.values() if h.lease is not None]
        if leases and self.link.connected.is_set():
            every = min(every, min(leases) / 3)
        return every

    def _drops(self) -> dict[str, int]:
        out = self.outbox.drops()
        for name, n in self._unstored_drops.items():
            out[name] = out.get(name, 0) + n
        return out

    def _make_will(self) -> Will:
        topic = topics.status(self.site, self.node)
        body = {"state": "offline", "uptime": round(self.clock() - self.started, 1), "reason": "connection lost"}
        payload, header = self.endpoint.seal(topic, "death", body, to="cloud")
        self.will_seq = header.seq
        return Will(topic=topic, payload=payload, qos=1, retain=True)

    async def _report_interrupted(self) -> None:
        """Tasks this node accepted and never finished (it was killed or lost power meanwhile) are
        reported failed once delivered (with the attempt they ran under), so they never look `running`
        for ever; that attempt is not run again (the scheduler may send a newer one)."""
        for run in self.state.unfinished_runs():
            task_id, attempt = run.task_id, run.attempt
            if run.assigner not in ("cloud", self.gateway):  # the bundle names another gateway now
                log.warning("task %s was interrupted by a restart; gateway %s gave it, which is not this agent's "
                            "gateway any more: not reported", task_id, run.assigner)
                with contextlib.suppress(sqlite3.Error):  # else it is skipped again at the next start
                    self.state.finish_attempt(task_id, attempt)
                continue
            log.warning("task %s was interrupted by a restart; reporting it failed to %s%s", task_id, run.assigner,
                        "" if attempt is None else f" (attempt {attempt})")
            delivered = self._task_result(task_id, attempt, "failed", run.trace, to=run.assigner,
                                          error="interrupted: the agent restarted while running it")
            await self._finish_when_delivered(task_id, attempt, delivered)

    async def _on_connect(self) -> None:
        topic = topics.status(self.site, self.node)
        self._wake_status.set()  # heartbeats (if a leased task is held) go at their pace again
        body = self.status_body() | {"will_seq": self.will_seq}
        try:
            payload, _ = self.endpoint.seal(topic, "birth", body, to="cloud")
        except sqlite3.Error as exc:  # no seq can be reserved: statuses still go out directly
            self._storage_failed(exc)
            self.window.reconnected()
            self._wake_flush.set()
            return
        log.info("connected to %s:%s; birth sent", self.cfg.broker.host, self.cfg.broker.port)
        self.systemd.status(self.systemd_status())
        self.window.reconnected()  # whatever the old connection carried may be lost: send it again
        try:
            await self.link.publish(topic, payload, qos=1, retain=True)
        except LinkError:
            return
        self._publish_task_status(body)
        self._wake_flush.set()

    def _publish_task_status(self, body: dict[str, Any]) -> None:
        """The executor status for the gateway's scheduler (protocol §3, site tasks): the same body as
        the status just sent, sealed to the gateway on ``task/status``, straight on the link (not
        retained, not stored: a lost one is replaced by the next). Only from an executor behind a
        gateway, and only while connected (a stored one would renew no lease in time)."""
        if self.gateway is None or self.slots <= 0 or self._tg is None or not self.link.connected.is_set():
            return
        topic = topics.task_status(self.site, self.node)
        try:
            payload, _ = self.endpoint.seal(topic, "status", body, to=self.gateway)
        except sqlite3.Error as exc:  # no seq can be reserved: the next status tries again
            self._storage_failed(exc)
            return

        async def publish() -> None:
            try:
                await self.link.publish(topic, payload, qos=1, retain=False)
            except LinkError as exc:
                log.info("executor status for gateway %s not sent (%s); the next status replaces it", self.gateway,
                         exc)

        self._tg.create_task(publish())

    # ---- sending ------------------------------------------------------------------------
    async def send(self, topic: str, kind: str, body: Any, *, retain: bool = False,
                   trace: str | None = None) -> asyncio.Future[bool]:
        """Seal, store durably, then publish; the future says if it got through (True once custody-
        or end-to-end-acked, False if the overflow policy dropped it). Held while the link is down."""
        delivered = self.hand_over(topic, kind, body, retain=retain, trace=trace)
        await self._drain()
        return delivered

    def hand_over(self, topic: str, kind: str, body: Any, *, retain: bool = False,
                  trace: str | None = None, to: str | None = None) -> asyncio.Future[bool]:
        """Seal and store (or keep in memory while the disk refuses) without waiting for the network:
        the flusher sends it. The future is :meth:`send`'s. ``to``: the recipient, when the caller
        knows it (a task's results go to whoever assigned the task); else :meth:`_recipient` decides."""
        delivered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if len(self._unstored) >= UNSTORED_MAX:  # the disk has been full for a while: lowest class goes first
            victim = min(self._unstored, key=lambda u: PRIORITY.get(u.kind, 0))
            self._unstored.remove(victim)
            name = CLASS_NAMES[PRIORITY.get(victim.kind, 0)]
            self._unstored_drops[name] = self._unstored_drops.get(name, 0) + 1
            if sum(self._unstored_drops.values()) % 100 == 1:
                log.warning("disk still refusing writes: %s dropped from memory (%s so far)", victim.kind,
                            self._unstored_drops)
            victim.delivered.set_result(False)
        self._unstored.append(_Unstored(topic, kind, body, retain, trace, delivered, to=to))
        self._store_unstored()
        return delivered

    def _store_unstored(self) -> None:
        """Seal and store waiting messages in order; stop (and report) at the first storage error."""
        while self._unstored:
            u = self._unstored[0]
            if u.kind == "telemetry" and u.sealed is None and not self._routes_known:
                if time.monotonic() < self._routes_deadline:
                    return  # stored (sealed) once the gateway's routes are here, in order
                log.warning("no routes from gateway %s in %.0f s: telemetry goes to the cloud until they come",
                            self.gateway, ROUTES_WAIT)
                self._routes_known = True
            try:
                if u.sealed is None:  # sealing may reserve a seq block, which writes to the disk too
                    to = u.to or self._recipient(u.kind, u.topic)
                    payload, header = self.endpoint.seal(u.topic, u.kind, u.body, to=to, trace=u.trace)
                    u.sealed = (payload, header.seq)
                payload, seq = u.sealed
                added = self.outbox.add(seq, u.topic, payload, u.retain, u.kind)
            except sqlite3.Error as exc:  # disk full, I/O error: keep it in memory and retry
                self._storage_failed(exc)
                return
            except (CwsError, ValueError) as exc:  # it can never be sealed (no key for its recipient): do not
                self._unstored.popleft()           # let it stop the agent or hold back what follows
                log.error("%s on %s cannot be sealed (%s); dropped", u.kind, u.topic, exc)
                u.delivered.set_result(False)
                continue
            self._unstored.popleft()
            if added:
                self._delivered[seq] = u.delivered
            else:
                log.warning("outbox full: %s seq %d dropped by the overflow policy", u.kind, seq)
                u.delivered.set_result(False)
        if self.storage_error is not None:
            log.warning("the outbox can be written again (%s was the error); storing resumed", self.storage_error)
            self.storage_error = None

    def _storage_failed(self, exc: sqlite3.Error) -> None:
        if self.storage_error is None:
            log.error("cannot write to %s: %s; up to %d new messages are kept in memory until it can be written",
                      self.cfg.data_dir, exc, UNSTORED_MAX)
        self.storage_error = str(exc)

    async def _drain(self) -> None:
        """Send what the window allows, oldest first; one drainer at a time, so nothing is sent
        twice at once. Messages leave the outbox only on a custody or end-to-end ack (``_acked``)."""
        if self._draining.locked():
            return  # the running drainer will pick up what was just added
        async with self._draining:
            self._settle_dropped()
            while self.link.connected.is_set():
                now = time.monotonic()
                if now < self.window.paused_until or self.window.deferred:
                    # back-pressure: classes above bulk telemetry may still go, and refused
                    # messages must not hide them, so look further
                    entries = self.outbox.oldest_entries(len(self.window.inflight) + len(self.window.deferred)
                                                         + self.window.window)
                    held = [s for s, _p in entries]
                    urgent = {s for s, p in entries if p > 0}
                else:
                    held = self.outbox.oldest_seqs(len(self.window.inflight) + self.window.window)
                    urgent = set()
                due = self.window.due(held, now, urgent)
                if not due:
                    break
                msgs = self.outbox.get(due)
                # pipelined: paho writes them in call order, then the PUBACKs are awaited together
                results = await asyncio.gather(
                    *(self.link.publish(m.topic, m.payload, qos=1, retain=m.retain) for m in msgs),
                    return_exceptions=True,
                )
                # anything but "the link is down" counts as sent: the retransmission timer applies
                self.window.sent([m.seq for m, r in zip(msgs, results, strict=True) if not isinstance(r, LinkDown)],
                                 time.monotonic())
                if any(isinstance(r, LinkDown) for r in results):
                    return

    def _settle_dropped(self) -> None:
        """Resolve the futures of messages the overflow policy pushed out, and free their window slots."""
        dropped = self.outbox.take_dropped()
        self.window.acked(dropped)
        for seq in dropped:
            delivered = self._delivered.pop(seq, None)
            if delivered is not None and not delivered.done():
                delivered.set_result(False)

    def _acked(self, sender: str, body: Any) -> None:
        """A custody ack (from our gateway) or an end-to-end ack (from the cloud): forget what it covers."""
        rs, pause = custody.acked_seqs(body, self.node)
        seqs = [s for first, last in rs for s in self.outbox.seqs_between(first, last)]
        self.window.acked(seqs)
        try:
            removed = self.outbox.remove_many(seqs) if seqs else []
        except sqlite3.Error as exc:  # they stay held; the next ack of them (after a resend) removes them
            self._storage_failed(exc)
            removed = []
        for seq in removed:
            delivered = self._delivered.pop(seq, None)
            if delivered is not None and not delivered.done():
                delivered.set_result(True)
        if pause is not None:
            now = time.monotonic()
            if now >= self.window.paused_until:  # once per pause, not per ack
                log.info("%s is near its storage limit: no new telemetry for %.1f s (%d held here)", sender,
                         pause, self.outbox.depth())
            self.window.pause(now, pause)
            refused = custody.parse_ranges(body.get("refused") if isinstance(body, dict) else None)
            self.window.refused(s for first, last in refused for s in self.outbox.seqs_between(first, last))
        self._wake_flush.set()

    async def _sensor_loop(self, sensor: Sensor) -> None:
        while True:
            now = self.clock()
            try:
                values = sensor.read(now)
            except Exception:
                log.exception("sensor %s failed to read; will retry", sensor.stream)
            else:
                batch = self.batches.setdefault(sensor.stream, [])
                if not batch:
                    self.batch_started[sensor.stream] = now
                batch.append({"ts": int(now * 1000), "values": values})
                if len(batch) >= self.cfg.batching.max_readings or self.cfg.batching.max_delay == 0:
                    await self._flush(sensor.stream)
                else:
                    self._wake_flush.set()
            await asyncio.sleep(sensor.interval)

    async def _flush(self, stream: str) -> None:
        readings = self.batches.pop(stream, [])
        self.batch_started.pop(stream, None)
        if readings:
            body = {"stream": stream, "readings": readings}
            await self.send(topics.telemetry(self.site, self.node, stream), "telemetry", body)

    async def _flusher(self) -> None:
        """Flush batches older than ``max_delay``; drain held messages after a reconnect, an ack or
        when a retransmission is due; retry storing what the disk refused."""
        while True:
            delay = self.cfg.batching.max_delay
            waits = [self.window.next_wakeup(time.monotonic())]
            if self.batch_started:
                oldest = min(self.batch_started.values())
                waits.append(max(0.0, oldest + delay - self.clock()))
            if self._unstored:
                waits.append(1.0)
            timeout = min((w for w in waits if w is not None), default=None)
            if timeout is not None:
                timeout = max(timeout, 0.01)  # never spin
            await wait_event(self._wake_flush, timeout)
            self._wake_flush.clear()
            now = self.clock()
            for stream, started in list(self.batch_started.items()):
                if now - started >= delay:
                    await self._flush(stream)
            self._store_unstored()
            await self._drain()

    async def _status_loop(self) -> None:
        """A status every :meth:`status_every` seconds: ``status_interval``, or a third of the shortest
        lease while a leased task is held. A leased task arriving wakes the loop, so the next status
        (listing it) goes within a third of its lease."""
        topic = topics.status(self.site, self.node)
        last = time.monotonic()
        while True:
            due = last + self.status_every()
            await wait_event(self._wake_status, max(0.0, due - time.monotonic()))
            self._wake_status.clear()
            if time.monotonic() < last + self.status_every() - 0.001:
                continue  # woken early (a lease arrived) or a moment early: wait for the new due time
            last = time.monotonic()
            body = self.status_body()
            self._publish_task_status(body)  # the gateway's scheduler hears the same, at the same pace
            if self.storage_error is None:
                await self.send(topic, "status", body, retain=True)
                continue
            # the outbox cannot be written: say so directly (not stored, like a birth), so the
            # operator sees the storage error while it lasts rather than after it
            try:
                payload, _ = self.endpoint.seal(topic, "status", body, to="cloud")
                await self.link.publish(topic, payload, qos=1, retain=True)
            except (LinkError, sqlite3.Error) as exc:
                log.info("status not sent: %s", exc)

    # ---- tasks --------------------------------------------------------------------------
    async def _on_message(self, msg: Message) -> None:
        opened = self.endpoint.open_or_log(msg.payload, msg.topic, log)
        if opened is None:
            return
        if opened.header.kind == "ack":
            # idempotent (it can only forget what is already committed upstream), so no replay check
            if opened.header.sender in ("cloud", self.gateway):
                self._acked(opened.header.sender, opened.body)
            return
        if opened.header.kind == "config" and opened.header.sender == self.gateway and self.gateway is not None:
            self._routes_from_gateway(opened.header.seq, opened.body)
            return
        kind, sender, seq = opened.header.kind, opened.header.sender, opened.header.seq
        if sender == "cloud":
            window = self.cloud_window
        elif sender == self.gateway and self.gateway_window is not None and kind in ("task_cmd", "task_done"):
            window = self.gateway_window  # site tasks (protocol §3): the gateway assigns work and reports outcomes
        else:
            log.warning("rejected %s on %s: only the cloud sends commands", kind, msg.topic)
            return
        verdict = window.check(seq)
        if verdict == "too_old" and kind == "task_done" and sender != "cloud":
            # an outcome held for us longer than the window reaches back (the device was away while the gateway
            # sent 1,024 newer messages): taking it is idempotent (an outcome never overwrites the first), so it
            # is applied rather than lost (review 8); the window is not moved for it
            try:
                self._task_done(opened.body)
            except sqlite3.Error as exc:  # no receipt: the gateway delivers it again
                self._storage_failed(exc)
                return
            self._receipt(seq, sender)
            return
        if verdict == "too_old" and kind == "task_cmd" and isinstance(opened.body, dict) and "part" in opened.body:
            # a part held for us longer than the window reaches back (a big command to a device that was away):
            # keeping a part is idempotent, so it is kept rather than lost; the window is not moved for it
            try:
                self._take_command(opened.body, opened.header.trace, msg.topic, sender)
            except sqlite3.Error as exc:  # no receipt: the gateway delivers it again
                self._storage_failed(exc)
                return
            self._receipt(seq, sender)
            return
        if verdict != "new":
            log.warning("rejected %s seq %d from %s: %s", kind, seq, sender, verdict)
            self._receipt(seq, sender)  # a copy the gateway held for us: it may forget it
            return
        if kind == "task_done" and sender != "cloud":
            try:
                self._task_done(opened.body)  # idempotent: recorded before the seq is taken as seen
                window.accept(seq)
                self.state.save_replay_window(sender, window)
            except sqlite3.Error as exc:  # no receipt: the gateway delivers it again
                self._storage_failed(exc)
                log.warning("task_done seq %d from %s not recorded: %s", seq, sender, exc)
                return
            self._receipt(seq, sender)
            return
        window.accept(seq)
        try:
            self.state.save_replay_window(sender, window)
            if kind == "task_cmd":
                self._take_task(opened, msg.topic, sender)
        except sqlite3.Error as exc:  # cannot record it (a task must be recorded before it runs): no receipt,
            self._storage_failed(exc)  # so the gateway delivers it again, and the cloud re-sends it at a birth
            log.warning("%s seq %d from %s not taken: %s", kind, seq, sender, exc)
            return
        self._receipt(seq, sender)

    def _routes_from_gateway(self, seq: int, body: Any) -> None:
        """The gateway's routes (protocol §9): [[stream pattern, "gateway" | "cloud"], ...], first match
        wins. Only a newer one (by the gateway's seq) is taken, so a replayed old one changes nothing."""
        table = body.get("route") if isinstance(body, dict) else None
        if not (isinstance(table, list) and all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                                                 and r[1] in ("gateway", "cloud") for r in table)):
            log.warning("config from gateway %s without a valid route table; ignored", self.gateway)
            return
        if seq <= self._routes_seq:
            return
        try:
            self.state.put("routes", {"seq": seq, "table": table})
        except sqlite3.Error as exc:  # used in memory; the gateway sends it again at our next birth
            self._storage_failed(exc)
        if table != self.routes:
            log.info("routes from gateway %s: %s", self.gateway,
                     ", ".join(f"{p} -> {to}" for p, to in table) or "everything to the cloud")
        self.routes, self._routes_seq = table, seq
        if not self._routes_known:
            self._routes_known = True
            self._store_unstored()  # what waited for them
            self._wake_flush.set()

    def _recipient(self, kind: str, topic: str) -> str:
        """``cloud``, or our gateway for a site task submission and for telemetry of a stream the site
        keeps (routing policy). (A task's results name their recipient when handed over: the node that
        assigned the task.)"""
        if kind == "task_submit" and self.gateway is not None:
            return self.gateway
        if kind != "telemetry" or self.gateway is None or not self.routes:
            return "cloud"
        stream = topic.rsplit("/", 1)[-1]
        return self.gateway if topics.route_in_table(self.routes, stream) == "gateway" else "cloud"

    def _take_task(self, opened: Any, topic: str, assigner: str = "cloud") -> None:
        """A task command (protocol §3) from ``assigner`` (the cloud, or our gateway for a site task):
        run it once per task id, or once per ``(task_id, attempt)`` for a scheduled one; a ``cancel``
        stops what runs here and never starts anything. Every result of the task is sealed to
        ``assigner``."""
        self._take_command(opened.body if isinstance(opened.body, dict) else {}, opened.header.trace, topic,
                           assigner)

    def _take_command(self, body: dict[str, Any], trace: str | None, topic: str, assigner: str) -> None:
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            log.warning("task command without task_id on %s; ignored", topic)
            return
        attempt = body.get("attempt")
        if attempt is not None and not _uint(attempt):
            log.warning("task %s: command with attempt %r (not an unsigned integer); ignored", task_id, attempt)
            return
        if body.get("cancel") is True:
            self._cancel_task(task_id, attempt, assigner)
            return
        seen = self.state.task_record(task_id)
        if seen is not None and (attempt is None or (seen.attempt or 0) >= attempt):
            if "part" in body:  # a part of a command already taken (a repeat of a re-sent one): nothing to keep
                return
            if attempt is None:
                log.info("task %s already run here; ignoring the repeat", task_id)
            else:
                log.info("task %s attempt %d: attempt %s already taken here; ignoring the repeat", task_id,
                         attempt, seen.attempt)
            return
        if "part" in body or "args_ref" in body:  # args too big for one message (protocol §3, "Parts")
            body = self._args_from_parts(body, task_id, attempt, trace, topic, assigner)
            if not body:
                return
        lease = body.get("lease")
        if lease is not None and (isinstance(lease, bool) or not isinstance(lease, int | float) or not lease > 0
                                  or lease == float("inf")):
            log.warning("task %s: lease %r is not a positive number of seconds; taken as none", task_id, lease)
            lease = None
        # recorded before it runs (at most once), with who gave it: a restart's report goes there too
        self.state.mark_task(task_id, trace=trace, attempt=attempt, assigner=assigner)
        held = _Held(task_id, attempt, None if lease is None else float(lease), trace, body, assigner=assigner)
        old = self._held.get(task_id)
        if old is not None:  # an older attempt still runs here: the scheduler moved on from it
            self._stop(old, f"superseded by attempt {attempt}")
        self._held[task_id] = held
        assert self._tg is not None
        run = self._tg.create_task(self._run_task(held))
        held.run = run
        self._task_runs.add(run)
        run.add_done_callback(self._task_runs.discard)
        if held.lease is not None:
            self._wake_status.set()  # the next status (a heartbeat listing it) within a third of its lease

    def _args_from_parts(self, body: dict[str, Any], task_id: str, attempt: int | None, trace: str | None,
                         topic: str, assigner: str) -> dict[str, Any]:
        """A part of a task's args is kept (and the command it completes is taken now); a command whose
        ``args_ref`` parts are all here comes back with its ``args`` (its parts forgotten); one still missing
        parts waits for them (empty map: nothing to take now). Storage errors propagate: no receipt."""
        now = self.clock()
        name = parts.name_of(task_id, attempt)
        if "part" in body:
            try:
                part = parts.Part.parse(body["part"], f"task {task_id} part")
            except parts.PartError as exc:
                log.warning("%s from %s on %s; ignored", exc, assigner, topic)
                return {}
            waiting, dropped = self.parts.add(assigner, name, part, now)
            self._given_up(assigner, dropped, "over the bound of parts kept for it")
            if waiting is not None:
                self._take_command(waiting["body"], waiting.get("trace"), topic, assigner)
            return {}
        try:
            ref = parts.Ref.parse(body["args_ref"], f"task {task_id} args_ref")
            args = self.parts.take(assigner, name, ref, f"task {task_id}'s args")
        except parts.PartError as exc:
            log.warning("%s", exc)
            self._fail_untaken(task_id, attempt, trace, assigner, f"its args did not arrive whole: {exc}")
            return {}
        if args is None:
            log.info("task %s (attempt %s): waiting for the rest of its %d args parts", task_id, attempt, ref.parts)
            self.parts.wait(assigner, name, ref, {"body": body, "trace": trace}, now)
            self._wake_status.set()  # listed as held while its parts come, so its lease holds
            return {}
        return {k: v for k, v in body.items() if k != "args_ref"} | {"args": args}

    def _fail_untaken(self, task_id: str, attempt: int | None, trace: str | None, assigner: str, error: str) -> None:
        """Report a task that cannot be taken ``failed`` to its assigner, once (recorded as taken)."""
        seen = self.state.task_record(task_id)
        if seen is not None and (attempt is None or (seen.attempt or 0) >= attempt):
            return
        self.state.mark_task(task_id, trace=trace, attempt=attempt, assigner=assigner)
        self._task_result(task_id, attempt, "failed", trace, to=assigner, error=error)

    def _given_up(self, assigner: str, dropped: list[tuple[str, str, dict[str, Any]]], why: str) -> None:
        """Commands that waited in vain for their args' parts (pruned after a day, or pushed out by newer
        parts): their tasks are reported failed, so their assigner knows rather than waits."""
        for sender, _name, waiting in dropped:
            body = waiting.get("body") or {}
            task_id, attempt = body.get("task_id"), body.get("attempt")
            if isinstance(task_id, str) and (attempt is None or _uint(attempt)):
                log.warning("task %s (attempt %s): its args' parts never all came (%s)", task_id, attempt, why)
                self._fail_untaken(task_id, attempt, waiting.get("trace"), sender if sender else assigner,
                                   f"its args' parts never all came from {sender} ({why})")

    def _parts_upkeep(self) -> None:
        """At start and hourly: take the commands whose parts all came before a crash, and give up on those
        that waited a day."""
        now = self.clock()
        for sender, _name, waiting in self.parts.ready():
            if "done" in waiting:  # a site task's outcome
                self._task_done(waiting["done"])
            else:
                self._take_command(waiting["body"], waiting.get("trace"), "(parts kept across a restart)", sender)
        for sender, name, waiting in self.parts.prune(now):
            self._given_up(sender, [(sender, name, waiting)], f"none for {parts.MAX_AGE / 3600:g} h")

    def _cancel_task(self, task_id: str, attempt: int | None, assigner: str = "cloud") -> None:
        """Stop ``task_id`` (only that ``attempt``, if given) if it is held here and ``assigner`` gave
        it: it reports ``cancelled``. Anything else is ignored, but a cancelled attempt not seen yet is
        remembered, so its command, arriving late, does not run it."""
        held = self._held.get(task_id)
        if held is not None and held.assigner != assigner:
            log.warning("cancel of task %s from %s, which %s assigned; ignored", task_id, assigner, held.assigner)
            return
        if held is not None and (attempt is None or attempt == held.attempt):
            reason = "cancelled by the cloud" if assigner == "cloud" else f"cancelled by gateway {assigner}"
            log.info("task %s (attempt %s): %s", task_id, held.attempt, reason)
            self._stop(held, reason)
            return
        if attempt is not None and self.state.refuse_attempt(task_id, attempt):
            log.info("task %s attempt %d cancelled before it came here: it will not run", task_id, attempt)
        else:
            log.info("cancel of task %s (attempt %s), which is not running here; ignored", task_id, attempt)

    def _stop(self, held: _Held, reason: str) -> None:
        if held.stop_reason is None:
            held.stop_reason = reason
            if held.entered and held.run is not None:  # else its run reports it cancelled as it begins
                held.run.cancel()

    def _receipt(self, seq: int, of: str = "cloud") -> None:
        """Tell our gateway that a command (``seq`` of sender ``of``: the cloud's, or the gateway's
        own for a site task's command or outcome) arrived, so it stops holding it for us. Fire and
        forget: if the receipt is lost the gateway delivers again and we refuse the repeat."""
        if self.gateway is None or self._tg is None:
            return
        topic = topics.receipt(self.site, self.node)
        body: dict[str, Any] = {"received": [[seq, seq]]}
        if of != "cloud":
            body["of"] = of  # absent: the cloud's seqs (the receipt of before site tasks)
        try:
            payload, _ = self.endpoint.seal(topic, "ack", body, to=self.gateway)
        except sqlite3.Error as exc:  # the gateway delivers the command again; we refuse the repeat then
            self._storage_failed(exc)
            return

        async def publish() -> None:
            try:
                await self.link.publish(topic, payload, qos=1)
            except LinkError as exc:
                log.info("receipt for %s seq %d not sent (%s); the gateway will deliver again", of, seq, exc)

        self._tg.create_task(publish())

    def _task_result(self, task_id: str, attempt: int | None, state: str, trace: str | None, *, to: str = "cloud",
                     **fields: Any) -> asyncio.Future[bool]:
        """Hand a task_result, sealed to ``to`` (the node that assigned the task), to the outbox (the
        flusher sends it); the future says if it got through."""
        body = {"task_id": task_id, "state": state, "result": None, "error": None} | fields
        if attempt is not None:
            body["attempt"] = attempt
        delivered = self.hand_over(topics.task_result(self.site, self.node), "task_result", body, trace=trace, to=to)
        self._wake_flush.set()
        return delivered

    def _task_part(self, held: _Held, part: parts.Part) -> None:
        """One part of a result too big for one message (protocol §3, "Parts"): a task_result with
        ``part`` and no state, sealed to the assigner like the rest of the task's results."""
        body: dict[str, Any] = {"task_id": held.task_id, "part": part.body()}
        if held.attempt is not None:
            body["attempt"] = held.attempt
        delivered = self.hand_over(topics.task_result(self.site, self.node), "task_result", body, trace=held.trace,
                                   to=held.assigner)
        delivered.add_done_callback(lambda fut: self._part_dropped(held, fut))

    def _part_dropped(self, held: _Held, delivered: asyncio.Future[bool]) -> None:
        """The outbox dropped a part of a result (it was full) before the gateway took it: the result can
        never be made whole, so the task is reported failed (once), rather than left waiting for it."""
        if delivered.cancelled() or delivered.result() or (held.task_id, held.attempt) in self._parts_lost:
            return
        self._parts_lost.add((held.task_id, held.attempt))
        log.warning("task %s (attempt %s): a part of its result was dropped by the outbox; reported failed",
                    held.task_id, held.attempt)
        self._task_result(held.task_id, held.attempt, "failed", held.trace, to=held.assigner,
                          error="its result's parts were dropped by the agent's outbox before the gateway took "
                                "them (the outbox was full)")

    def _final(self, held: _Held, state: str, **fields: Any) -> asyncio.Future[bool]:
        """The task's last result. It leaves the held tasks in the same step as it enters the outbox
        (nothing runs in between), so a status sealed after it no longer lists it."""
        if self._held.get(held.task_id) is held:
            del self._held[held.task_id]
        return self._task_result(held.task_id, held.attempt, state, held.trace, to=held.assigner, **fields)

    async def _checkpoint(self, held: _Held, data: dict[str, Any]) -> None:
        """A handler's ``ctx.save``: a ``checkpoint`` result, handed to the outbox (never waits for
        the network)."""
        why = body_problem(data, "it", MAX_CHECKPOINT)
        if why is not None:
            raise TaskFailed(f"checkpoint cannot be sent ({why})")
        self._task_result(held.task_id, held.attempt, "checkpoint", held.trace, to=held.assigner, checkpoint=data)

    async def _run_task(self, held: _Held) -> None:
        held.entered = True
        if held.stop_reason is not None:  # stopped before its run began
            log.info("task %s (attempt %s): %s", held.task_id, held.attempt, held.stop_reason)
            delivered = self._final(held, "cancelled", error=held.stop_reason, started=None,
                                    finished=int(self.clock() * 1000))
            await self._finish_when_delivered(held.task_id, held.attempt, delivered)
            return
        try:
            delivered = await self._execute_task(held)
        except asyncio.CancelledError:
            if held.stop_reason is None:
                raise  # the agent is stopping: its next start reports the task interrupted
            current = asyncio.current_task()
            pending = current.uncancel() if current is not None else 0
            log.info("task %s (attempt %s): %s", held.task_id, held.attempt, held.stop_reason)
            delivered = self._final(held, "cancelled", error=held.stop_reason, started=held.started,
                                    finished=int(self.clock() * 1000))
            if pending:  # the agent is stopping as well: the result is in the outbox, go
                raise
        await self._finish_when_delivered(held.task_id, held.attempt, delivered)

    async def _finish_when_delivered(self, task_id: str, attempt: int | None, delivered: asyncio.Future[bool]) -> None:
        """Mark the task finished only once its final result reached the broker: if the agent dies
        first (cancelled, killed), the next start reports the task interrupted instead."""
        if await delivered:
            try:
                self.state.finish_attempt(task_id, attempt)
            except sqlite3.Error as exc:  # the next start reports it interrupted (the cloud ignores the extra)
                self._storage_failed(exc)

    async def _execute_task(self, held: _Held) -> asyncio.Future[bool]:
        task_id, body = held.task_id, held.body
        handler_name = body.get("handler")
        args = body.get("args") or {}
        deadline = body.get("deadline")
        checkpoint = body.get("checkpoint")
        if isinstance(deadline, int) and deadline < self.clock() * 1000:
            return self._final(held, "expired", error="deadline passed before the task started")
        handler = self.handlers.get(handler_name) if isinstance(handler_name, str) else None
        if handler is None:
            return self._final(held, "failed",
                               error=f"no handler {handler_name!r} on {self.node}; has {sorted(self.handlers)}")
        if not isinstance(args, dict):
            return self._final(held, "failed", error="args must be a map")
        if checkpoint is not None and not isinstance(checkpoint, dict):
            return self._final(held, "failed", error="checkpoint must be a map or null")
        if held.attempt is not None and self.slots <= 0:
            return self._final(held, "failed", error=f"agent {self.node} runs no scheduled tasks (task_slots: 0)")
        async with self._task_slots:
            started = held.started = int(self.clock() * 1000)
            self.running_tasks += 1
            self._task_result(task_id, held.attempt, "running", held.trace, to=held.assigner, started=started)
            log.info("task %s: running %s (attempt %s) trace=%s", task_id, handler_name, held.attempt, held.trace)
            try:
                timeout = self.cfg.max_task_seconds
                if isinstance(deadline, int):
                    timeout = min(timeout, max(0.0, deadline / 1000 - self.clock()))
                if handler_name in self._with_ctx:
                    async def save(data: dict[str, Any]) -> None:
                        await self._checkpoint(held, data)

                    call = handler(args, TaskContext(task_id, held.attempt, checkpoint, save))
                else:
                    call = handler(args)
                result = await asyncio.wait_for(call, timeout)
                try:  # a result too big for one message goes in parts if the assigner takes them (§3)
                    ref, result_parts = parts.plan(result, "the handler's result", allowed=body.get("parts") is True) \
                        if isinstance(result, dict) else (None, [])
                except parts.PartError as exc:
                    raise TaskFailed(f"the handler's result cannot be sent ({exc})") from None
                room = self.cfg.outbox.max_bytes // 2  # its parts must not push everything else out of the outbox
                if ref is not None and ref.size > room:
                    raise TaskFailed(f"the handler's result cannot be sent (it is {ref.size} bytes; this agent's "
                                     f"outbox takes results of at most {room}: half its outbox.max_bytes)")
                why = None if ref is not None else _encodable(result)
                if why is not None:
                    raise TaskFailed(f"the handler's result cannot be sent ({why})")
            except TaskFailed as exc:
                state, fields = "failed", {"error": str(exc)}
            except TimeoutError:
                state, fields = "failed", {"error": "handler timed out"}
            except Exception as exc:
                log.exception("task %s: handler %s raised", task_id, handler_name)
                tb = "".join(traceback.format_exception(exc, limit=-8))  # a bug: the operator gets the traceback
                state, fields = "failed", {"error": f"{type(exc).__name__}: {exc}\n{tb}".rstrip()}
            else:
                state, fields = "succeeded", {"result": result}
                if ref is not None:
                    for part in result_parts:  # handed over before the final result, in order
                        self._task_part(held, part)
                    fields = {"result": None, "result_ref": ref.body()}
            finally:
                self.running_tasks -= 1
            log.info("task %s: %s", task_id, state)
            return self._final(held, state, started=started, finished=int(self.clock() * 1000), **fields)

    # ---- site tasks this device submits (protocol §3, "Site tasks") -------------------------------
    def submit_task(self, handler: str, args: dict[str, Any] | None = None, *, key: str | None = None,
                    priority: int = 5, max_attempts: int = 3, deadline: int | None = None,
                    data_class: str | None = None, requirements: dict[str, Any] | None = None) -> str:
        """Ask this device's gateway to run ``handler(args)`` somewhere on the site (or in the cloud, as
        the site's offload policies say); returns the submission's key (default: a fresh uuid4 hex).

        The submission is recorded in ``submissions.db`` and handed to the outbox sealed to the
        gateway, so one made while the gateway is away goes when it is back. The outcome comes as
        the gateway's ``task_done``: it is stored in the row (:attr:`submissions`), logged, and passed
        to :attr:`on_task_done`. The same key again with the same work changes nothing; with other
        work it is a ValueError. Bad values are ValueErrors naming the field; an agent whose bundle
        names no gateway cannot submit (ConfigError). Call it from the agent's event loop (a handler,
        a sensor, ``on_task_done``); called before the agent runs, the submission goes once it does.
        """
        if self.gateway is None:
            raise ConfigError(f"{self.cfg.identity_file}: agent {self.node} has no gateway (its bundle names none): "
                              "site tasks are submitted to a gateway; submit work through the cloud's API instead "
                              "(`cwsnet task run`)")
        key = new_key() if key is None else key
        sub, added = self.submissions.add_new(self.node, key, handler, args, priority=priority,
                                              max_attempts=max_attempts, deadline=deadline, data_class=data_class,
                                              requirements=requirements)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not running yet: the submission loop sends it once the agent runs
            return key
        if sub.state == "new" and sub.key not in self._handed:
            self._send_submission(sub)
        elif not added:
            log.info("site task %s (%s) was already submitted (%s); nothing new sent", key, sub.task_id, sub.state)
        return key

    def cancel_task(self, key: str) -> None:
        """Cancel the site task this device submitted as ``key``: the gateway stops it wherever it runs and
        its outcome comes back ``cancelled`` (one that finished first keeps its outcome). ValueError for a
        key never submitted here."""
        self.submissions.request_cancel(key)
        self._submissions_retry = True  # (our own commit does not change PRAGMA data_version)

    def _send_cancel(self, sub: Submission) -> None:
        """Tell the gateway the device cancels ``sub`` (a ``task_submit`` with ``cancel``); one never sent
        is simply cancelled here."""
        if sub.state == "new" and sub.key not in self._handed:
            row = self.submissions.done(sub.key, "cancelled", error="cancelled before it was sent to the gateway")
            log.info("site task %s cancelled before it was sent", sub.key)
            if row is not None:
                self._notify_done(row)
            # told to the gateway all the same: a copy of it may be in the outbox (a row left `new` by a storage
            # error after it was handed over); the gateway then refuses it as cancelled
        if self.gateway is None:
            return
        self.hand_over(topics.task_submit(self.site, self.node), "task_submit", sub.cancel_body())
        self._wake_flush.set()
        log.info("site task %s (%s): cancel sent to gateway %s", sub.key, sub.task_id, self.gateway)
        self.submissions.mark_cancel_sent(sub.key)

    def _load(self) -> dict[str, Any]:
        """What the submitter's load is now (the policy's ``origin.*``): CPU 0..1, tasks held, free memory."""
        cpu = psutil.cpu_percent(interval=None)
        return {"cpu": round(min(max(cpu / 100.0, 0.0), 1.0), 3), "queue": len(self._held),
                "mem_free": int(psutil.virtual_memory().available)}

    def _send_submission(self, sub: Submission) -> None:
        """Hand a ``new`` submission to the outbox, sealed to the gateway (retransmitted until its
        custody ack), and mark it ``submitted``."""
        if self.gateway is None:
            row = self.submissions.done(sub.key, "failed", error=f"agent {self.node} has no gateway (its bundle "
                                        "names none): site tasks are submitted to a gateway")
            log.warning("site task %s (%s) failed: agent %s has no gateway", sub.key, sub.task_id, self.node)
            if row is not None:
                self._notify_done(row)
            return
        body = sub.body() | {"load": self._load()}
        delivered = self.hand_over(topics.task_submit(self.site, self.node), "task_submit", body)
        self._handed.add(sub.key)
        delivered.add_done_callback(lambda fut, key=sub.key: self._submission_delivered(key, fut))
        self._wake_flush.set()
        log.info("site task %s (%s): %s submitted to gateway %s", sub.key, sub.task_id, sub.handler, self.gateway)
        try:
            self.submissions.mark_sent(sub.key)
        except sqlite3.Error as exc:  # it is in the outbox all the same; the row says `new` until a restart re-sends it
            self._storage_failed(exc)

    def _submission_delivered(self, key: str, delivered: asyncio.Future[bool]) -> None:
        """The agent dropped a submission before the gateway took custody (outbox full, or it cannot be
        sealed): say so in its row rather than leave it ``submitted`` for ever."""
        if delivered.cancelled():
            return
        if delivered.result():  # the gateway has it: from now on only a resubmission (below) sends it again
            self._handed.discard(key)
            return
        error = ("dropped by the agent before the gateway took it (its outbox was full, or it could not be sealed: see "
                 "the agent's log); submit again")
        log.warning("site task %s: %s", key, error)
        try:
            row = self.submissions.done(key, "failed", error=error)
        except sqlite3.Error as exc:
            self._storage_failed(exc)
            return
        if row is not None:
            self._notify_done(row)

    async def _submission_loop(self) -> None:
        """Send the submissions another process (``cwsnet task submit``) recorded as ``new``, within
        about a second. ``PRAGMA data_version`` tells cheaply whether another process wrote."""
        asked = upkeep = time.monotonic()
        while True:
            if time.monotonic() - upkeep >= PARTS_UPKEEP_EVERY:
                upkeep = time.monotonic()
                try:
                    self._parts_upkeep()
                except sqlite3.Error as exc:
                    self._storage_failed(exc)
            try:
                if self.submissions.changed() or self._submissions_retry:
                    self._submissions_retry = False
                    for sub in self.submissions.take_cancels():  # first: a cancelled new one is never sent
                        self._send_cancel(sub)
                    for sub in self.submissions.take_new():
                        if sub.key not in self._handed:
                            self._send_submission(sub)
                if time.monotonic() - asked >= RESUBMIT_EVERY and self.link.connected.is_set():
                    # the gateway took these long ago and has not answered: ask again (same key, same task).
                    # It answers a finished one with its outcome again, so an outcome it could not hold for
                    # us (a crash between storing and telling, an expired hold) is never lost for good.
                    asked = time.monotonic()
                    cutoff = int(time.time() * 1000) - int(RESUBMIT_EVERY * 1000)
                    for sub in self.submissions.list("submitted"):
                        if sub.key not in self._handed and sub.submitted_ms < cutoff:
                            if sub.cancel == "sent":  # cancelled: ask for the cancel (answered with the outcome)
                                self.hand_over(topics.task_submit(self.site, self.node), "task_submit",
                                               sub.cancel_body())
                            else:
                                self._send_submission(sub)
            except sqlite3.Error as exc:  # busy for longer than busy_timeout, disk trouble: look again
                self._submissions_retry = True
                log.warning("cannot read or update %s: %s; trying again", self.submissions.path, exc)
            except Exception:  # a row another program wrote by hand that cannot be read: never stop the agent
                log.exception("submissions in %s cannot be sent; trying again when it changes", self.submissions.path)
            await asyncio.sleep(SUBMISSION_POLL)

    def _task_done(self, body: Any) -> None:
        """The gateway's ``task_done``: how a site task this device submitted ended. Stored in its row
        (only for a key of ours), logged, passed to :attr:`on_task_done`."""
        if isinstance(body, dict) and ("part" in body or body.get("result_ref") is not None):
            body = self._done_from_parts(body)
            if body is None:
                return
        key = body.get("key") if isinstance(body, dict) else None
        state = body.get("state") if isinstance(body, dict) else None
        if not isinstance(key, str) or state not in SUBMISSION_FINAL:
            log.warning("task_done from gateway %s without a text key and a final state (got key %r, state %r); "
                        "ignored", self.gateway, key, state)
            return
        error, node = body.get("error"), body.get("node")
        row = self.submissions.done(key, state, body.get("result"), None if error is None else str(error),
                                    node if isinstance(node, str) else None)
        if row is None:
            if self.submissions.get(key) is not None:  # its outcome is known: a repeat (e.g. of a re-sent submission)
                log.info("task_done from gateway %s for key %r again; its outcome is already recorded", self.gateway, key)
            else:
                log.warning("task_done from gateway %s for key %r, which this agent did not submit; ignored",
                            self.gateway, key)
            return
        log.info("site task %s (%s, %s): %s%s%s", key, row.task_id, row.handler, state,
                 f" on {row.node}" if row.node else "", f": {row.error}" if row.error else "")
        self._notify_done(row)

    def _done_from_parts(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """An outcome whose result came in parts (protocol §3, "Parts"): None for a part (kept) or while the
        outcome waits for the rest; the outcome made whole once its parts are all here."""
        assert self.gateway is not None
        name, now = f"done/{body.get('key')}", self.clock()
        try:
            if "part" in body:
                waiting, _ = self.parts.add(self.gateway, name, parts.Part.parse(body["part"], "task_done part"), now)
                return None if waiting is None else self._done_from_parts(waiting["done"])
            ref = parts.Ref.parse(body["result_ref"], "task_done result_ref")
            value = self.parts.take(self.gateway, name, ref, f"site task {body.get('key')}'s result")
        except parts.PartError as exc:
            log.warning("%s", exc)
            if "part" in body:
                return None
            return body | {"state": "failed", "result": None, "error": f"its result did not arrive whole: {exc}"}
        if value is None:  # (a day without its parts: forgotten, and the submission is asked again)
            self.parts.wait(self.gateway, name, ref, {"done": body}, now)
            return None
        return {k: v for k, v in body.items() if k != "result_ref"} | {"result": value}

    def _notify_done(self, row: Submission) -> None:
        if self.on_task_done is None:
            return
        try:
            self.on_task_done(row.key, row)
        except Exception:  # the program's callback must not stop the agent
            log.exception("on_task_done callback failed for site task %s", row.key)

    # ---- systemd (Type=notify, WatchdogSec=) ------------------------------------------------
    def systemd_status(self) -> str:
        """One line for ``systemctl status``: the link and what the outbox holds."""
        where = f"{self.cfg.broker.host}:{self.cfg.broker.port}"
        text = (f"{'connected to' if self.link.connected.is_set() else 'connecting to'} {where}, "
                f"{self.outbox.depth()} messages held")
        if self.storage_error is not None:
            text += f"; cannot write the outbox: {self.storage_error}"
        return text

    async def _systemd_loop(self) -> None:
        """``WATCHDOG=1`` every half ``WATCHDOG_USEC``, from a task of the agent's TaskGroup: a wedged
        event loop stops pinging and systemd restarts the agent. Refreshes ``STATUS=`` as it goes."""
        every = self.systemd.watchdog or SYSTEMD_STATUS_EVERY
        while True:
            if self.systemd.watchdog:
                self.systemd.ping()
            self.systemd.status(self.systemd_status())
            await asyncio.sleep(every)

    # ---- lifecycle ----------------------------------------------------------------------
    async def _goodbye(self) -> None:
        """A clean stop sends no MQTT will, so say offline ourselves (bounded: 2 s)."""
        topic = topics.status(self.site, self.node)
        body = {"state": "offline", "uptime": round(self.clock() - self.started, 1), "reason": "shutdown"}
        try:
            payload, _ = self.endpoint.seal(topic, "death", body, to="cloud")
            await asyncio.wait_for(self.link.publish(topic, payload, qos=1, retain=True), 2.0)
        except (LinkError, TimeoutError):
            log.info("could not announce shutdown (link down)")
        except sqlite3.Error as exc:
            log.info("could not announce shutdown (%s)", exc)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (then say goodbye and return) or until cancelled."""
        log.info("agent %s (site %s) starting; broker %s:%s", self.node, self.site, self.cfg.broker.host,
                 self.cfg.broker.port)
        stop = stop or asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tasks = [tg.create_task(self._run_link()), tg.create_task(self._flusher()),
                         tg.create_task(self._status_loop()), tg.create_task(self._bundle_watch())]
                tasks += [tg.create_task(self._sensor_loop(s)) for s in self.sensors]
                tasks.append(tg.create_task(self._report_interrupted()))
                try:  # parts kept across a restart: taken if whole, given up on after a day
                    self._parts_upkeep()
                except sqlite3.Error as exc:
                    self._storage_failed(exc)
                tasks.append(tg.create_task(self._submission_loop()))
                if self.systemd.enabled:
                    tasks.append(tg.create_task(self._systemd_loop()))
                    self.systemd.ready(self.systemd_status())
                await stop.wait()
                self.systemd.stopping()
                await self._goodbye()
                for t in [*tasks, *self._task_runs]:
                    t.cancel()
        finally:
            self.systemd.stopping()
            self.systemd.close()
            self.outbox.close()
            self.submissions.close()
            self.parts.close()
            self.state.close()
            log.info("agent %s stopped", self.node)
