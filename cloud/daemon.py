"""The cloud daemon: broker, ingest, acks, tasks, sweeper and HTTP in one ``asyncio.TaskGroup``.

``run_cloud(cfg)`` runs until cancelled and then shuts down within a few seconds: the ingest
link says DISCONNECT, the live streams end, uvicorn stops, the embedded broker shuts down and the
store closes. Signal handling is the caller's (the CLI cancels the task on SIGTERM).

Data path::

    cloud broker --QoS1, manual ack--> MqttLink --> bounded queue --> batch (<= 200)
        --> Ingest.handle_batch in a worker thread (one SQLite transaction, committed)
        --> MQTT PUBACK for each message --> AckCoalescer --> every ack_interval a sealed
            {"acks": [[sender, first, last], ...], "rejected": [[sender, seq, reason], ...]}
            to each gateway of the site on cws/v1/{site}/{gw}/ack

A gateway's offloads (``task/offload``, site tasks it gives the cloud to run) take the same path; once
stored they are handed to ``cloud.site_offload.SiteOffloads``, whose replies go to the gateway's
``task/cmd``.

MQTT acks go out only after the commit, and the end-to-end acks to gateways only after that: a
crash at any point loses nothing, it only causes redelivery, which ingest absorbs exactly once.

No single message can stop ingest: a batch the store refuses is retried in halves down to single
messages, and one that still fails for a reason that is not transient is given up on (counted
``malformed``, acknowledged, and the gateway told). Transient store errors (``sqlite3``'s disk
full, database locked) are retried with backoff and nothing is acknowledged meanwhile. Every helper
loop logs an unexpected error and carries on after a short pause; only cancellation ends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import cbor2
import uvicorn
from amqtt.errors import AMQTTError, BrokerError
from pydantic import ValidationError

from cloud.api import ApiError, CloudState, TaskRequest, create_app
from cloud.apps import AppFanout
from cloud.auth import AuthStore
from cloud.automation import CloudAutomation, RetentionSweeper, state_path
from cloud.fanout import Fanout
from cloud.ingest import AckCoalescer, BatchResult, Ingest, NodeDirectory
from cloud.metrics import CloudMetrics, NodeStatusCollector
from cloud.registry_sync import RegistrySync
from cloud.schedules import ScheduleService
from cloud.site_offload import SiteOffloads
from cloud.store import NewEvent, SqliteStore, Store, Task
from cloud.tasks import TaskService, cloud_handlers
from cloud.views import change, event_view, task_view
from cwsnet import parts, topics
from cwsnet.broker import BrokerSettings, start_broker
from cwsnet.bundle import Bundle
from cwsnet.config import CloudConfig
from cwsnet.endpoint import Endpoint
from cwsnet.errors import ConfigError, CwsError
from cwsnet.identity import Identity, load_json_file
from cwsnet.links import link_for
from cwsnet.mqtt import LinkError, Message, MqttLink
from cwsnet.policy import AccessEngine, Subject
from cwsnet.policy.access import DenyRecorder
from cwsnet.policy.watch import PolicyWatcher, shipped_policies, start_watcher
from cwsnet.replay import SeqCounter

log = logging.getLogger("cwsnet.cloud")

CLIENT_ID = "cloud-ingest"
SEQ_COUNTER = "cloud.seq_mark"
#: uplink subscriptions of the ingest link (QoS 1), and gateways' offloads of site tasks (protocol §3)
SUBSCRIPTIONS = tuple(topics.all_sites_filter(ch) for ch in ("status", "telemetry", "event", "task/result",
                                                              topics.OFFLOAD_CHANNEL))
BATCH_MAX = 200
QUEUE_MAX = 2000
EXPIRED_ERROR = "deadline passed before the device could run it"
EXPIRED_RUNNING_ERROR = "deadline passed while running (the device did not report a result)"
EVENTS_KEPT = 100_000
AUTOMATION_TICK = 1.0  # seconds between automation ticks (rules whose `for` or cooldown ran out)
RETENTION_FIRST = 10.0  # seconds after start of the first retention sweep
RETENTION_EVERY = 600.0  # seconds between retention sweeps


def load_cloud_identity(cfg: CloudConfig) -> Identity:
    ident = Identity.from_dict(load_json_file(cfg.identity_file, "cloud identity"), str(cfg.identity_file))
    if ident.role != "cloud" or ident.node != "cloud":
        raise ConfigError(
            f"{cfg.identity_file}: the cloud identity must have node 'cloud' and role 'cloud' "
            f"(got node {ident.node!r}, role {ident.role!r})"
        )
    return ident


def is_transient(exc: BaseException) -> bool:
    """True for a store error that says nothing about the message (retry it), False for one that may.

    Transient: ``sqlite3.OperationalError`` (disk full, database locked, I/O error), a plain
    ``sqlite3.DatabaseError`` (a damaged file: the operator must act; dropping data would not help),
    a closed database, ``MemoryError``. Anything else (``ValueError``, ``OverflowError``,
    ``TypeError``, an integrity or binding error) may be caused by one message's content.
    """
    if isinstance(exc, sqlite3.OperationalError | MemoryError) or type(exc) is sqlite3.DatabaseError:
        return True
    return isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc)


async def forever(
    what: str, step: Callable[[], Awaitable[None]], *, pause: float = 0.5, max_pause: float = 10.0
) -> None:
    """Run ``step`` again and again; log an unexpected error with context and go on after a pause.

    The pause doubles with each failure in a row (up to ``max_pause``) and resets after a success.
    Cancellation propagates.
    """
    failures = 0
    while True:
        try:
            await step()
        except Exception:
            failures += 1
            delay = min(pause * 2 ** (failures - 1), max_pause)
            log.exception("%s failed (%d in a row); carrying on in %.1f s", what, failures, delay)
            await asyncio.sleep(delay)
        else:
            failures = 0


def new_traceparent() -> str:
    """A fresh W3C ``traceparent`` (version 00, sampled)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


# -- tasks ------------------------------------------------------------------------------------------


def _for_apps(item: Any, body: Any) -> Any:
    """What an app gets of a stored message: a task result made whole from parts (protocol §3) too big
    for one message goes with ``result`` null and its size in ``result_omitted`` (GET the task for it)."""
    if item.kind != "task_result" or not isinstance(body, dict) or body.get("result") is None:
        return body
    size = len(cbor2.dumps(body["result"]))
    return body if size <= parts.INLINE_MAX else body | {"result": None, "result_omitted": size}


class TaskDispatcher:
    """Sends queued tasks to their devices as sealed ``task_cmd`` messages.

    ``request(task_id)`` (thread-safe, never blocks) asks for one task to be sent; ``on_birth(node)``
    for every queued task of a node that just connected (for a gateway: of every device of its
    site); ``on_connect()`` (cloud link back up) for every queued task. A task for a device whose
    site has a gateway is sent at once, online or not: the gateway holds it (durably, until the
    device's receipt or the deadline in the clear header's ``exp``) and delivers it when the device
    connects. A task for a device without a gateway is sent only while the device is online;
    otherwise it stays ``queued`` here until its next birth. Tasks past their deadline, queued or
    running (the device never reported a result), are marked ``expired``. The command is idempotent
    on the device (it runs each task id once), so sending it again on every birth is safe.
    """

    def __init__(
        self,
        store: Store,
        endpoint: Endpoint,
        link: MqttLink,
        metrics: CloudMetrics,
        fanout: Fanout,
        *,
        clock: Callable[[], float] = time.time,
        publish_timeout: float = 10.0,
        expire_every: float = 1.0,
        gateways: Callable[[str], list[str]] = lambda site: [],
    ) -> None:
        self.gateways = gateways
        self.store = store
        self.endpoint = endpoint
        self.link = link
        self.metrics = metrics
        self.fanout = fanout
        self.clock = clock
        self.publish_timeout = publish_timeout
        self.expire_every = expire_every
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[str] | None = None
        self._pending: set[str] = set()
        self._early: list[str] = []

    # thread-safe entry points -------------------------------------------------------------------

    def request(self, task_id: str) -> None:
        loop = self._loop
        if loop is None:
            self._early.append(task_id)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._enqueue(task_id)
        else:
            loop.call_soon_threadsafe(self._enqueue, task_id)

    def on_birth(self, node: str) -> None:
        entry = self.store.get_node(node)
        if entry is not None and entry.role == "gateway":  # back after an outage: it holds for its devices
            for task in self.store.list_tasks(state="queued", kind="direct", limit=100_000, light=0).items:
                target = self.store.get_node(task.target)
                if target is not None and target.site == entry.site:
                    self.request(task.id)
            return
        for task in self.store.queued_tasks_for(node):
            self.request(task.id)

    def on_connect(self) -> None:
        for task in self.store.list_tasks(state="queued", kind="direct", limit=100_000, light=0).items:
            self.request(task.id)

    def _enqueue(self, task_id: str) -> None:
        if self._queue is not None and task_id not in self._pending:
            self._pending.add(task_id)
            self._queue.put_nowait(task_id)

    # the loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        for task_id in self._early:
            self._enqueue(task_id)
        self._early.clear()
        last_expire = 0.0
        while True:
            task_id: str | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.expire_every):
                    task_id = await self._queue.get()
            now = self._loop.time()
            if now - last_expire >= self.expire_every:
                last_expire = now
                try:
                    await asyncio.to_thread(self.expire_overdue)
                except Exception:  # the store failed: try again at the next expiry check
                    log.exception("expiring overdue tasks failed; trying again in %g s", self.expire_every)
            if task_id is not None:
                self._pending.discard(task_id)
                try:
                    await self.dispatch(task_id)
                except (LinkError, CwsError, TimeoutError) as exc:
                    log.warning("task %s stays queued: %s", task_id, exc)
                except Exception:
                    log.exception("task %s: dispatch failed; it stays queued", task_id)

    def expire_overdue(self) -> list[Task]:
        now_ms = int(self.clock() * 1000)
        expired = []
        for task in self.store.overdue_tasks(now_ms):
            error = EXPIRED_RUNNING_ERROR if task.state == "running" else EXPIRED_ERROR
            updated, moved = self.store.update_task(task.id, "expired", error=error, now=now_ms)
            if moved and updated is not None:
                expired.append(updated)
                self.metrics.tasks.labels(state="expired").inc()
                self.fanout.publish(change("task", task_view(updated)))
                log.info("task %s on %s expired: %s", task.id, task.target, error)
        return expired

    def _ready_to_send(self, task_id: str) -> tuple[Task, str] | None:
        task = self.store.get_task(task_id)
        if task is None or task.state != "queued" or task.kind != "direct":  # scheduled, site: not ours to send
            return None
        now_ms = int(self.clock() * 1000)
        if task.deadline is not None and task.deadline < now_ms:
            self.expire_overdue()
            return None
        node = self.store.get_node(task.target)
        if node is None:
            log.warning("task %s: target %s is no longer registered; it stays queued", task.id, task.target)
            return None
        if not node.online and not self.gateways(node.site):
            log.info("task %s: %s is offline; queued until its next birth", task.id, task.target)
            return None
        return task, node.site

    async def dispatch(self, task_id: str) -> bool:
        """Send one task if it is queued and its device online; True if the broker acknowledged it."""
        ready = await asyncio.to_thread(self._ready_to_send, task_id)
        if ready is None:
            return False
        task, site = ready
        if not self.link.connected.is_set():
            log.info("task %s: cloud broker link is down; queued until it is back", task.id)
            return False
        topic = topics.task_cmd(site, task.target)
        # "parts": its result may come in parts; args too big for one message go first, in parts (protocol §3)
        body = {"task_id": task.id, "handler": task.handler, "args": task.args, "deadline": task.deadline,
                "parts": True}
        trace = new_traceparent()
        for msg in parts.command_messages(body):
            # the deadline also goes in the clear header, so a gateway holding the command can expire it
            payload, header = self.endpoint.seal(topic, "task_cmd", msg, to=task.target, trace=trace,
                                                 expires=task.deadline)
            await self.link.publish(topic, payload, qos=1, timeout=self.publish_timeout)
        await asyncio.to_thread(self.store.mark_dispatched, task.id, now=int(self.clock() * 1000))
        log.info("task %s sent to %s (%s) seq=%d trace=%s", task.id, task.target, task.handler, header.seq, trace)
        return True


# -- the daemon ---------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: shutdown belongs to our task group."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def _listen_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"http.host: cannot resolve {host!r}: {exc.strerror}") from None
    family, type_, proto, _name, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"http: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class CloudDaemon:
    """The cloud's long-running parts, wired together. Use :func:`run_cloud`."""

    def __init__(self, cfg: CloudConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.identity = load_cloud_identity(cfg)
        self.store: SqliteStore = SqliteStore(cfg.database)
        try:
            self.store.upsert_node(
                self.identity.node, site=self.identity.site, role="cloud", public_key=self.identity.public_b64
            )
            self.broker: Any = None
            registry_file = getattr(cfg, "registry_file", None)  # written by `cwsnet init`; optional
            self.registry_sync: RegistrySync | None = None
            # never below the wall clock in ms: a recreated cloud.db must not reuse seqs that gateways
            # and devices have already seen (they would refuse its acks and commands as replays)
            start = max(self.store.get_counter(SEQ_COUNTER) or 0, int(clock() * 1000))
            self.seq = SeqCounter(start, lambda mark: self.store.set_counter(SEQ_COUNTER, mark))
            self.directory = NodeDirectory(self.store)
            self.endpoint = Endpoint(self.identity, self.seq, self.directory.public_key, clock,
                                     key_version=None, versioned_key=self.directory.lookup)
            self.metrics = CloudMetrics()
            self.metrics.registry.register(NodeStatusCollector(
                lambda: [n for role in ("device", "gateway")
                         for n in self.store.list_nodes(role=role, limit=100_000).items]))
            self.fanout = Fanout()
            self.apps = AppFanout(self.endpoint, None)
            self.ingest = Ingest(
                self.endpoint,
                self.store,
                self.metrics,
                directory=self.directory,
                clock=clock,
                offline_after=cfg.offline_after,
                # apps and the cloud's automation rules get the stored messages they want
                # (and the scheduler the statuses and task results: executors, heartbeats, results)
                # (and the site offload runner the offloads gateways send it)
                for_apps=lambda topic: (self.apps.wants(topic) or self.automation.wants(topic)
                                        or TaskService.wants(topic) or SiteOffloads.wants(topic)),
            )
            self.ingest.update_gauges()
            self.coalescer = AckCoalescer()
            self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=QUEUE_MAX)
            self.link = link_for(
                cfg.client, Bundle.load(cfg.identity_file), cfg.reconnect, client_id=CLIENT_ID, section="client",
                name="cloud-ingest", on_connect=self._on_connect, on_disconnect=self._on_disconnect,
                on_message=self._on_message, manual_ack=True, clean_session=False,
            )
            for flt in SUBSCRIPTIONS:
                self.link.subscribe(flt, qos=1)
            self.apps.link = self.link
            self.dispatcher = TaskDispatcher(
                self.store, self.endpoint, self.link, self.metrics, self.fanout, clock=clock,
                gateways=self.directory.gateways,
            )
            watcher = self._policy_watcher(cfg)
            # scheduled work: placed by the offload policies, leased, migrated, replicated (cloud/tasks.py)
            self.tasks = TaskService(self.store, self.endpoint, self.link, node=self.identity.node,
                                     policies=watcher.active, lease=cfg.task_lease, workers=cfg.cloud_workers,
                                     handlers=cloud_handlers(cfg.handlers),
                                     fanout=self.fanout, metrics=self.metrics, clock=clock)
            # site tasks the gateways' schedulers give the cloud (task/offload): run in a pool of their own,
            # with the same handlers, answered to each gateway on its task/cmd (cloud/site_offload.py)
            self.offloads = SiteOffloads(self.endpoint, self.link, handlers=self.tasks.handlers,
                                         slots=cfg.cloud_workers, node=self.identity.node, clock=clock,
                                         metrics=self.metrics)
            self.access = AccessEngine(watcher.active) if watcher.active is not None else None
            # the `at: cloud` automation rules and gateways' automation requests; retention of stored data
            self.automation = CloudAutomation(
                watcher.active, self.store, self.dispatcher.request, publish=self.fanout.publish,
                state_file=state_path(cfg.database), clock=clock,
                on_queued=lambda task: self.metrics.tasks.labels(state="queued").inc(),
            )
            self.retention = RetentionSweeper(watcher.active, self.store, clock=clock, publish=self.fanout.publish)
            # refused or audited access attempts (broker, API) become events naming the rule
            self.access_recorder = DenyRecorder(self.access) if self.access is not None else None
            self._access_events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
            if registry_file is not None:
                self.registry_sync = RegistrySync(
                    registry_file, self.store, refresh=lambda: self.directory.refresh(force=True),
                    endpoint=self.endpoint, link=self.link, fanout=self.fanout,
                    users_file=cfg.broker.credentials_file if cfg.broker is not None else None,
                    broker=lambda: self.broker, on_registry=self.apps.update, access=self.access,
                )
                self.directory.catch_up = self.registry_sync.catch_up
                reg = self.registry_sync.load_initial()
                self.directory.refresh(force=True)
                log.info("registry: %d nodes from %s (rev %d)", len(reg.nodes), registry_file, reg.rev)
            # operator accounts, API tokens and the audit log (cloud/auth.py); the first start makes the admin
            self.auth = AuthStore(cfg.database, clock=clock)
            self.auth.bootstrap(cfg.admin_token_file)
            self.state = CloudState(
                store=self.store,
                metrics=self.metrics,
                fanout=self.fanout,
                dispatcher=self.dispatcher,
                tasks=self.tasks,
                broker_connected=self.link.connected.is_set,
                clock=clock,
                auth=self.auth,
                policies=watcher,
            )
            self.app = create_app(self.state)
            # cron and interval task submissions, kept in their own SQLite file next to the database
            self.schedules = ScheduleService(Path(cfg.database).parent / "schedules.db", self._scheduled_run,
                                             clock=clock)
            self.state.schedules = self.schedules
        except BaseException:
            if hasattr(self, "auth"):
                self.auth.close()
            self.store.close()
            raise

    def _scheduled_run(self, spec: dict[str, Any], key: str) -> str:
        """A schedule fired (on the schedule service's thread): submit its task as the API would, under
        the run's idempotency key (a run submitted twice, across a crash, makes one task)."""
        try:
            req = TaskRequest.model_validate(spec | {"idempotency_key": key})
        except ValidationError as exc:
            raise ValueError(f"task: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
        try:
            task_id, _dup = self.state.submit_task(req, None, "task")
        except ApiError as exc:
            raise ValueError(exc.message) from None
        return task_id

    async def run_schedules(self) -> None:
        """Start firing once the task service can take submissions; stop with the daemon."""
        await self.tasks.ready()
        await asyncio.to_thread(self.schedules.start)
        try:
            await asyncio.Event().wait()
        finally:
            # not waiting: a run blocked on this (stopping) loop would hold the shutdown; a due run is kept
            self.schedules.shutdown(wait=False)

    # link callbacks ----------------------------------------------------------------------------

    async def _on_connect(self) -> None:
        self.metrics.broker_connected.set(1)
        log.info("ingest connected to the cloud broker at %s", self.link.endpoint)
        try:
            await asyncio.to_thread(self.dispatcher.on_connect)
        except Exception:
            log.exception("sending queued tasks after the cloud broker link came up failed; they go at each birth")

    async def _on_disconnect(self) -> None:
        self.metrics.broker_connected.set(0)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            log.info("ingest disconnected from the cloud broker (shutting down)")
        else:
            log.warning("ingest lost the cloud broker at %s", self.link.endpoint)

    async def _on_message(self, msg: Message) -> None:
        # Bounded: when it is full this await holds MqttLink's delivery task, so further messages
        # wait in the link's own (bounded) queue; when that fills, the link stops reading the
        # socket and TCP back-pressure reaches the broker.
        await self.queue.put(msg)

    # services ----------------------------------------------------------------------------------

    async def consume(self) -> None:
        await forever("ingest", self.consume_once)

    async def consume_once(self) -> None:
        """Take up to BATCH_MAX queued messages, store them, acknowledge them, announce the changes."""
        batch = [await self.queue.get()]
        while len(batch) < BATCH_MAX:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        result = await self._store_batch(batch)
        for msg in batch:
            try:
                self.link.ack(msg)
            except Exception:  # the broker redelivers it; ingest absorbs the duplicate
                log.exception("MQTT ack of %s (mid %d) failed", msg.topic[:200], msg.mid)
        for site, sender, seq in result.acks:
            self.coalescer.add(site, sender, seq)
        for site, sender, seq, reason, digest in result.rejections:
            if not self.coalescer.reject(site, sender, seq, reason, digest):
                log.debug("rejection notice for %s seq %d dropped: too many pending for site %s", sender, seq, site)
        if result.for_apps:
            for_apps = [(item, _for_apps(item, body)) for item, body in result.for_apps if self.apps.wants(item.topic)]
            if for_apps:
                self.apps.offer(for_apps)
        for sender, task_id, attempt in result.progress:  # parts of a result: its sender is still delivering it
            try:
                self.tasks.renew(sender, task_id, attempt)
            except Exception:
                log.exception("renewing the lease of %s on task %s failed", sender, task_id)
        try:
            self.fanout.publish_many(result.changes)
        except Exception:
            log.exception("announcing %d changes on the live stream failed", len(result.changes))
        for item, body in result.for_apps:  # statuses, deaths and task results move scheduled work
            if item.kind == "task_cmd" and SiteOffloads.wants(item.topic):  # stored and acked: run it
                try:
                    self.offloads.offer(item.sender, topics.parse(item.topic).site, body, item.expires)
                except Exception:
                    log.exception("the offload of %s seq %d could not be taken", item.sender, item.seq)
                continue
            entry = self.directory.get(item.sender) if item.kind in ("birth", "status", "death", "task_result") else None
            if entry is not None:
                try:
                    self.tasks.observe(item.sender, entry.role, entry.site, item.kind, body)
                except Exception:
                    log.exception("the task service could not take %s from %s", item.kind, item.sender)
        for node in result.births:
            try:
                if self.registry_sync is not None:
                    await self.registry_sync.on_birth(node)  # a returning gateway gets its site's registry
                await asyncio.to_thread(self.dispatcher.on_birth, node)
            except Exception:
                log.exception("sending %s's queued tasks after its birth failed; they wait for its next birth", node)
        # the cloud's automation rules and the gateways' requests, over what was newly stored
        for_rules = [(item, body) for item, body in result.for_apps if self.automation.wants(item.topic)]
        if for_rules:
            try:
                await asyncio.to_thread(self.automation.offer, for_rules, int(self.clock() * 1000))
            except Exception:
                log.exception("automation over %d stored messages failed", len(for_rules))

    async def _store_batch(self, batch: Sequence[Message]) -> BatchResult:
        """Commit a batch; never raises (but for cancellation). See :meth:`_store_items`."""
        return await self._store_items([(m.topic, m.payload) for m in batch])

    async def _store_items(self, items: Sequence[tuple[str, bytes]]) -> BatchResult:
        """Store ``items``, isolating a message the store cannot take, waiting out transient errors.

        A transient store error (:func:`is_transient`) is retried with backoff, the same items, with
        nothing acknowledged meanwhile. Any other error means one message may be at fault: the
        items are stored in halves, recursively; a single message that still fails is given up on
        (:meth:`Ingest.reject_unstorable`), so it is acknowledged and cannot block the queue.
        """
        delay = 0.1
        while True:
            try:
                return await self._ingest_in_thread(items)
            except Exception as exc:
                if is_transient(exc):
                    log.error(
                        "storing %d messages failed (%s: %s); retrying in %.1f s",
                        len(items), type(exc).__name__, exc, delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                if len(items) == 1:
                    log.error("the store refuses a message on %s", items[0][0][:200], exc_info=exc)
                    return await asyncio.to_thread(self.ingest.reject_unstorable, items[0][0], items[0][1], exc)
                log.warning(
                    "storing %d messages failed (%s: %s); storing them in halves to find the culprit",
                    len(items), type(exc).__name__, exc,
                )
                half = len(items) // 2
                result = await self._store_items(items[:half])
                result.extend(await self._store_items(items[half:]))
                return result

    async def _ingest_in_thread(self, items: Sequence[tuple[str, bytes]]) -> BatchResult:
        fut = asyncio.ensure_future(asyncio.to_thread(self.ingest.handle_batch, items))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # let the worker thread finish its transaction before the store is closed
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(fut), 5.0)
            raise

    async def flush_acks(self) -> None:
        await forever("ack flusher", self.flush_once)

    async def flush_once(self) -> None:
        await asyncio.sleep(self.cfg.ack_interval)
        if self.coalescer and self.link.connected.is_set():
            await self.send_acks()

    async def send_acks(self) -> None:
        """Seal and publish every pending ack body to each gateway of its site.

        A body whose publish fails goes back to the coalescer for the next flush; so do all of a
        site's bodies when its gateways cannot be looked up.
        """
        for site, bodies in self.coalescer.drain().items():
            try:
                gateways = self.directory.gateways(site)
                if not gateways:
                    await asyncio.to_thread(self.directory.refresh)
                    gateways = self.directory.gateways(site)
            except Exception:
                log.exception("looking up the gateways of site %s failed; its acks wait for the next flush", site)
                for body in bodies:
                    self.coalescer.add_ranges(site, body)
                continue
            for site_body in bodies:
                # a site without a gateway: its devices talk to this broker directly, and each gets
                # the end-to-end acks of its own messages (docs/protocol.md §5)
                if gateways:
                    addressed = [(gw, site_body) for gw in gateways]
                else:
                    addressed = [(dev, {"acks": [a for a in site_body["acks"] if a[0] == dev]})
                                 for dev in sorted({a[0] for a in site_body["acks"]})]
                for gw, body in addressed:
                    topic = topics.ack(site, gw)
                    try:
                        payload, header = self.endpoint.seal(topic, "ack", body, to=gw)
                    except CwsError as exc:  # no usable key for this gateway: resending cannot help
                        log.error("cannot seal acks for gateway %s (%s); %d ranges not sent to it", gw, exc,
                                  len(body["acks"]))
                        continue
                    try:
                        await self.link.publish(topic, payload, qos=1)
                    except LinkError as exc:
                        log.warning("ack to %s failed (%s); will resend", gw, exc)
                        self.coalescer.add_ranges(site, body)
                        continue
                    except Exception:
                        log.exception("ack to %s failed; will resend", gw)
                        self.coalescer.add_ranges(site, body)
                        continue
                    self.metrics.acks_sent.inc()
                    log.debug(
                        "acked to %s seq=%d: %s rejected=%s", gw, header.seq, body["acks"], body.get("rejected", [])
                    )

    def _policy_watcher(self, cfg: Any) -> PolicyWatcher:
        """The policy set: the shipped defaults plus ``policies_dir``."""
        folders = [shipped_policies()] + ([cfg.policies_dir] if getattr(cfg, "policies_dir", None) else [])
        return start_watcher(folders, self.clock, log)

    async def watch_policies(self) -> None:
        """Reload the policy files within a second of a change; record each change as an event."""
        watcher = self.state.policies
        while watcher is not None:
            await asyncio.sleep(1.0)
            ch = await asyncio.to_thread(watcher.check)
            if ch is None:
                continue
            now = int(self.clock() * 1000)
            if ch.accepted:
                log.info("policies reloaded: %s", ", ".join(ch.names))
                await self._use_policies(watcher.active)
                ev = NewEvent(now, self.identity.node, "policy.changed", "info",
                              f"policy set reloaded: {', '.join(ch.names)}", {"policies": ch.names})
            else:
                log.error("policy change refused; still applying %s:\n%s", ", ".join(ch.names),
                          "\n".join(ch.problems))
                ev = NewEvent(now, self.identity.node, "policy.refused", "error",
                              f"policy change refused ({len(ch.problems)} problems); the previous set "
                              "stays active", {"problems": ch.problems[:50], "active": ch.names})
            for e in await asyncio.to_thread(self.store.add_events, [ev]):
                self.fanout.publish(change("event", event_view(e)))

    async def _use_policies(self, pset: Any) -> None:
        """A new policy set: the broker's ACLs, the access recorder, automation and retention follow it."""
        if pset is None:
            return
        self.access = AccessEngine(pset)
        self.tasks.use_policies(pset)
        if self.access_recorder is not None:
            self.access_recorder.engine = self.access
        else:
            self.access_recorder = DenyRecorder(self.access)
        try:
            await asyncio.to_thread(self.automation.use, pset)  # episodes of the rules kept carry over
            self.retention.use(pset)
        except Exception:
            log.exception("applying the new policies to automation and retention failed")
        if self.registry_sync is not None:
            try:
                await self.registry_sync.set_access(self.access)
            except Exception:
                log.exception("regenerating the cloud broker's ACLs from the new policies failed; the previous "
                              "ones stay in force")

    async def automation_ticks(self) -> None:
        """Once a second: fire the cloud rules whose `for` or cooldown ran out; keep their state saved."""
        while True:
            await asyncio.sleep(AUTOMATION_TICK)
            try:
                await asyncio.to_thread(self.automation.tick, int(self.clock() * 1000))
            except Exception:
                log.exception("automation tick failed; next in %g s", AUTOMATION_TICK)

    async def sweep_retention(self) -> None:
        """Shortly after start, then every 10 minutes: delete telemetry past its qos retention, and parts of
        task results that never came whole (after a day)."""
        await asyncio.sleep(RETENTION_FIRST)
        while True:
            try:
                await asyncio.to_thread(self.retention.sweep, int(self.clock() * 1000))
                # parted results never made whole: their tasks fail (a scheduled one's scheduler hears of it)
                for sender, body in await asyncio.to_thread(self.store.prune_parts, self.clock()):
                    entry = self.directory.get(sender)
                    if entry is not None:
                        self.tasks.observe(sender, entry.role, entry.site, "task_result", body)
            except Exception:
                log.exception("retention sweep failed; next in %g s", RETENTION_EVERY)
            await asyncio.sleep(RETENTION_EVERY)

    def _subject_of(self, username: str) -> Subject | None:
        reg = self.registry_sync.registry if self.registry_sync is not None else None
        e = reg.get(username) if reg is not None else None
        return Subject(e.id, e.role, e.site) if e is not None and e.active else None

    def _access_event(self, ev: dict[str, Any]) -> None:
        """From the broker's loop: never blocks; a full queue drops the event (they are rate-limited)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._access_events.put_nowait(ev)

    async def record_access_events(self) -> None:
        while True:
            evs = [await self._access_events.get()]
            while not self._access_events.empty():
                evs.append(self._access_events.get_nowait())
            now = int(self.clock() * 1000)
            try:
                stored = await asyncio.to_thread(self.store.add_events, [
                    NewEvent(now, ev.get("source"), ev["kind"], ev["severity"], ev["message"], ev.get("data"))
                    for ev in evs])
                self.fanout.publish_many([change("event", event_view(e)) for e in stored])
            except Exception:
                log.exception("recording %d access events failed", len(evs))

    async def sweep(self) -> None:
        interval = min(5.0, self.cfg.offline_after / 4)
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                self.fanout.publish_many(await asyncio.to_thread(self.ingest.sweep))
                if time.monotonic() - last_prune > 600:
                    last_prune = time.monotonic()
                    await asyncio.to_thread(self.store.prune_events, EVENTS_KEPT)
            except Exception:
                log.exception("offline sweep failed")

    def _check_tls(self) -> None:
        """Load every certificate a listener will use, so a bad one stops the cloud at start with
        a message naming the file, and report their expiry in the metrics."""
        from cwsnet.pki import cert_info
        from cwsnet.tls import server_context

        b, tls = self.cfg.broker, self.cfg.http.tls
        for listener, where, cert, key in (
            ("mqtt", "broker", b.certfile if b is not None else None, b.keyfile if b is not None else None),
            ("http", "http.tls", tls.certfile if tls is not None else None, tls.keyfile if tls is not None else None),
        ):
            if cert is None or key is None:
                continue
            server_context(cert, key, where)
            self.metrics.tls_cert_expiry.labels(listener=listener).set(cert_info(cert).not_after.timestamp())

    async def serve_http(self, sock: socket.socket, started: asyncio.Event) -> None:
        tls = self.cfg.http.tls
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=2,
            ssl_certfile=str(tls.certfile) if tls is not None else None,
            ssl_keyfile=str(tls.keyfile) if tls is not None else None,
        )
        server = _Server(config)
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if serving.done():
                    serving.result()
                    raise RuntimeError("the HTTP server stopped while starting")
                await asyncio.sleep(0.02)
            log.info("HTTP API and console on %s://%s:%d", "https" if tls is not None else "http",
                     self.cfg.http.host, sock.getsockname()[1])
            started.set()
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            self.fanout.close()  # end the live streams so uvicorn need not wait for them
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(serving), 5.0)
            if not serving.done():
                serving.cancel()
            raise
        finally:
            sock.close()

    async def announce_ready(self, http_started: asyncio.Event, ready: asyncio.Event | None) -> None:
        await http_started.wait()
        await self.link.connected.wait()
        try:
            await asyncio.to_thread(
                self.store.add_event, "cloud.started", f"cloud ready: API on port {self.cfg.http.port}", source="cloud"
            )
        except Exception:
            log.exception("recording the cloud.started event failed")
        log.info("cloud ready (pid %d)", os.getpid())
        if ready is not None:
            ready.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        broker = None
        sock: socket.socket | None = None
        try:
            self._check_tls()  # fail fast, naming the file, on an unusable certificate or key
            sock = _listen_socket(self.cfg.http.host, self.cfg.http.port)  # fail fast on a taken port
            if self.cfg.broker is not None:
                b = self.cfg.broker
                try:
                    hook = None
                    if self.access_recorder is not None:
                        hook = self.access_recorder.broker_hook(self._subject_of, self._access_event, broker="cloud")
                    broker = self.broker = await start_broker(BrokerSettings.coerce(b), on_decision=hook)
                except (AMQTTError, BrokerError, OSError) as exc:
                    ports = "/".join(str(n) for n in (b.tls_port, b.port, b.ws_port) if n)
                    raise ConfigError(f"broker: cannot start the embedded broker on {b.host} (ports {ports}): {exc}") from None
            http_started = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.link.run(), name="cloud-link")
                tg.create_task(self.consume(), name="cloud-ingest")
                tg.create_task(self.flush_acks(), name="cloud-acks")
                tg.create_task(self.sweep(), name="cloud-sweep")
                tg.create_task(self.dispatcher.run(), name="cloud-tasks")
                tg.create_task(self.tasks.run(), name="cloud-scheduler")
                tg.create_task(self.offloads.run(), name="cloud-site-offloads")
                tg.create_task(self.run_schedules(), name="cloud-schedules")
                tg.create_task(self.apps.run(), name="cloud-apps")
                tg.create_task(self.automation_ticks(), name="cloud-automation")
                tg.create_task(self.sweep_retention(), name="cloud-retention")
                if self.registry_sync is not None:
                    tg.create_task(self.registry_sync.run(), name="cloud-registry")
                tg.create_task(self.watch_policies(), name="cloud-policies")
                tg.create_task(self.record_access_events(), name="cloud-access-events")
                tg.create_task(self.serve_http(sock, http_started), name="cloud-http")
                tg.create_task(self.announce_ready(http_started, ready), name="cloud-ready")
        except ExceptionGroup as eg:
            errors = _leaves(eg)
            for exc in errors[1:]:
                log.error("cloud service failed too: %s: %s", type(exc).__name__, exc)
            raise errors[0] from None
        finally:
            self.fanout.close()
            if sock is not None:
                sock.close()
            if broker is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(broker.shutdown()), 5.0)
            self.close()
            log.info("cloud stopped")

    def close(self) -> None:
        """Close the databases (``run`` does it when it ends; a test that never ran it calls this)."""
        try:
            self.automation.save()  # the episodes as of now (the tick saves them at most a second late)
        except Exception:
            log.exception("saving the automation state at shutdown failed")
        self.store.close()
        self.auth.close()


def _leaves(eg: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in eg.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


async def run_cloud(cfg: CloudConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run the cloud tier until cancelled. ``ready`` is set once HTTP serves and ingest is connected.

    Raises :class:`~cwsnet.errors.ConfigError` for a bad identity, database path or HTTP address,
    :class:`~cwsnet.mqtt.AuthRefused` if the broker refuses the ingest credentials.
    """
    daemon = CloudDaemon(cfg)
    await daemon.run(ready)
