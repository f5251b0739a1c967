"""Site tasks (issue 7; docs/protocol.md §3 "Site tasks"): work a device of the site submits, owned
and scheduled by its gateway, so the site keeps placing, running and moving it while the cloud is
unreachable.

The gateway runs the same sans-I/O :class:`cwsnet.scheduler.Scheduler` as the cloud, over:

- the site's devices that offer themselves (their ``task/status``, sealed to the gateway, with every
  status they send: slots, handlers, load, and the tasks they hold: a heartbeat); a device's
  ``death`` (its will: the broker publishes it when the connection drops) takes its tasks back;
- the gateway's own worker pool (always live);
- the cloud, live while the uplink is connected: its tasks go up as ``task/offload`` through the
  outbox, its reports come back on the gateway's ``task/cmd``. The uplink dropping takes them back,
  and the offload policy's ``if_unreachable`` decides what a task that wants the cloud does then
  (``wait`` for the uplink, run ``local``ly on its origin, or ``fail``).

**Persistence.** Every task is in ``site-tasks.db`` (its scheduler record, CBOR) before the
submission is custody-acked and before any command about it goes out; a restart restores the open
ones. A device's submission is idempotent by its ``key`` (the task id is derived from it). The
outcome goes to the device as a ``task_done`` held in ``site-commands.db`` until the device's receipt
(``"of"``: this gateway), like the cloud's commands (§5.4).

**The mirror.** Each change of a task's state is reported to the cloud as the gateway's own
``task_result`` with a ``site_task`` map (its explanation included), through the uplink outbox, so the
cloud's API shows site tasks, also those of an outage once the uplink is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2

from cwsnet import parts, topics
from cwsnet.db import open_durable, transaction
from cwsnet.envelope import MAX_BODY, storable_problem
from cwsnet.errors import EnvelopeError
from cwsnet.mqtt import LinkError, Message
from cwsnet.policy.offload import OffloadEngine
from cwsnet.scheduler import (
    TERMINAL,
    Assign,
    Cancel,
    Cmd,
    Completed,
    ExecutorLost,
    ExecutorStatus,
    Requirements,
    Scheduler,
    Task,
    executor_status,
)
from gateway.downlink import DownlinkStore

if TYPE_CHECKING:
    from gateway.bridge import Gateway

log = logging.getLogger("cwsnet.gateway.tasks")

KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
#: slots the gateway assumes the cloud offers its site (the cloud queues what exceeds its workers)
CLOUD_SLOTS = 4
#: finished site tasks are kept this long (their key still answers a repeated submission)
KEEP_DONE_S = 7 * 86400.0
#: a device that offers itself but does not say how often it reports: this many seconds
DEVICE_INTERVAL = 10.0


def task_id_for(device: str, key: str) -> str:
    """The id of the site task ``device`` submits under ``key`` (protocol §3): stable, so a repeat
    after the gateway lost its state still names the same task."""
    return "s-" + hashlib.sha256(f"{device}/{key}".encode()).hexdigest()[:24]


class SubmitError(ValueError):
    """A submission that is not well formed (the message names the field)."""


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def parse_submission(body: Any, device: str, site: str) -> tuple[str, Task, dict[str, Any] | None]:
    """``(key, task, load)`` from a ``task_submit`` body; :class:`SubmitError` naming the field."""
    if not isinstance(body, dict):
        raise SubmitError("a task_submit body must be a map")
    key = body.get("key")
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise SubmitError("key must be 1-128 characters from A-Z a-z 0-9 _ . : -")
    handler = body.get("handler")
    if not isinstance(handler, str) or not handler or len(handler) > 63:
        raise SubmitError("handler must be a name of 1-63 characters")
    args = body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise SubmitError("args must be a map")
    why = storable_problem(args, "args")  # else the cloud could not store it if the task is offloaded there
    if why is not None:
        raise SubmitError(f"{why} (args must be what the cloud can store: finite floats, 64-bit integers, text "
                          "keys)")
    priority = body.get("priority", 5)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 9:
        raise SubmitError("priority must be an integer 0..9")
    attempts = body.get("max_attempts", 3)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 10:
        raise SubmitError("max_attempts must be an integer 1..10")
    deadline = body.get("deadline")
    if deadline is not None and not _uint(deadline):
        raise SubmitError("deadline must be ms since the epoch (uint) or null")
    data_class = body.get("data_class")
    if data_class is not None and (not isinstance(data_class, str) or not 0 < len(data_class) <= 63):
        raise SubmitError("data_class must be a name of 1-63 characters or null")
    req = body.get("requirements") or {}
    if not isinstance(req, dict):
        raise SubmitError("requirements must be a map or null")
    caps = req.get("capabilities", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise SubmitError("requirements.capabilities must be a list of names")
    load = body.get("load")
    if load is not None and not isinstance(load, dict):
        raise SubmitError("load must be a map or null")
    try:
        size = len(cbor2.dumps(args))
        requirements = Requirements(frozenset(caps), req.get("mem_free"), req.get("cpu"))
        task = Task(task_id_for(device, key), handler, args, requirements, data_class, size, device, site, "device",
                    None if deadline is None else deadline / 1000, priority, attempts,
                    idempotency_key=f"{device}/{key}")
    except (ValueError, TypeError, cbor2.CBOREncodeError) as exc:
        raise SubmitError(str(exc).removeprefix(f"task {task_id_for(device, key)!r}: ")) from None
    if size > MAX_BODY - 64 * 1024:
        raise SubmitError(f"args are {size} bytes encoded; at most {MAX_BODY - 64 * 1024} (64 KB are kept for "
                          "the checkpoint in each task command)")
    return key, task, load


class SiteTaskStore:
    """``site-tasks.db``: one row per site task (its scheduler record as CBOR). Not thread-safe: the
    gateway calls it from its one database thread."""

    def __init__(self, path: Path) -> None:
        self.db = open_durable(path, any_thread=True)
        if "tasks" not in self.db.table_names():
            self.db["tasks"].create({"id": str, "origin": str, "key": str, "state": str, "record": bytes,
                                     "updated": float}, pk="id", not_null={"origin", "key", "state", "record"})
            self.db["tasks"].create_index(["state"])

    def save(self, rows: list[tuple[str, str, str, str, bytes]], now: float) -> None:
        """Upsert ``(id, origin, key, state, record)`` rows in one transaction; a finished row is never
        reopened (a late record of a restored copy cannot undo an outcome)."""
        with transaction(self.db.conn):
            for tid, origin, key, state, record in rows:
                self.db.conn.execute(
                    "insert into tasks (id, origin, key, state, record, updated) values (?, ?, ?, ?, ?, ?) "
                    "on conflict(id) do update set state = excluded.state, record = excluded.record, "
                    "updated = excluded.updated where tasks.state not in ('succeeded', 'failed', 'cancelled', "
                    "'expired')", [tid, origin, key, state, record, now])

    def get(self, task_id: str) -> dict[str, Any] | None:
        row = self.db.conn.execute("select record from tasks where id = ?", [task_id]).fetchone()
        return None if row is None else cbor2.loads(row[0])

    def open_records(self) -> list[dict[str, Any]]:
        done = tuple(TERMINAL)
        return [cbor2.loads(r[0]) for r in self.db.conn.execute(
            f"select record from tasks where state not in ({','.join('?' * len(done))}) order by rowid", done)]

    def sweep(self, before: float) -> int:
        with transaction(self.db.conn):
            cur = self.db.conn.execute(
                "delete from tasks where updated < ? and state in ('succeeded', 'failed', 'cancelled', 'expired')",
                [before])
        return cur.rowcount

    def close(self) -> None:
        self.db.conn.close()


class SiteTasks:
    """See the module's docstring. Runs on the gateway's event loop (:meth:`run` in its TaskGroup)."""

    def __init__(self, gw: Gateway, lease: float) -> None:
        self.gw, self.lease = gw, lease
        self.store = SiteTaskStore(gw.cfg.data_dir / "site-tasks.db")
        self.commands = DownlinkStore(gw.cfg.data_dir / "site-commands.db")
        self.sched = Scheduler(OffloadEngine(gw.site_policy.pset), lease=lease)
        self._wake = asyncio.Event()
        self._touched: dict[str, None] = {}
        self._out: list[Cmd] = []
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._early_cancels: list[tuple[str, str]] = []  # cancels from the cloud that came during the restore
        self._reported: dict[str, str] = {}  # task id -> the state last mirrored to the cloud
        self._cloud_up = False
        self._early: list[Any] = []  # the cloud's reports that arrived while the tasks were being restored
        self.stats = {"submitted": 0, "refused": 0, "done": 0, "offloaded": 0, "cancelled": 0}

    # ---- policies ----
    def use_policies(self, pset: Any) -> None:
        self.sched.set_offload(OffloadEngine(pset))
        self._wake.set()

    def owns(self, task_id: Any) -> bool:
        return isinstance(task_id, str) and self.sched.get(task_id) is not None

    async def ready(self) -> None:
        """Returns once the open site tasks are restored."""
        await self._ready.wait()

    def cancel(self, task_id: str, reason: str) -> bool:
        """Cancel an open site task (its executors are told to stop, its device gets the outcome
        ``cancelled`` with ``reason``); False if it is not open here. One that comes while the tasks are
        being restored is applied once they are."""
        if not self._ready.is_set():
            self._early_cancels.append((task_id, reason))
            return True
        if self.sched.get(task_id) is None:
            return False
        log.info("site task %s: %s", task_id, reason)
        self._apply(self.sched.cancel(task_id, self.gw.clock(), reason), task_id)
        self.stats["cancelled"] += 1
        return True

    # ---- from the site (called by the bridge for messages sealed to the gateway) ----
    def _open(self, msg: Message, what: str) -> Any:
        try:
            return self.gw.endpoint.open(msg.payload, msg.topic)
        except EnvelopeError as exc:
            self.gw.stats["malformed"] += 1
            log.warning("rejected %s on %s: %s (%s)", what, msg.topic, exc, exc.reason)
            return None

    def _custody(self, header: Any) -> None:
        self.gw.custody.stored(header.sender, header.seq)
        self.gw.wake_custody()

    async def on_submit(self, msg: Message, header: Any) -> None:
        """A device's ``task_submit``: stored (then custody-acked), placed at the next tick."""
        await self._ready.wait()
        opened = self._open(msg, "a task submission")
        if opened is None or opened.header.kind != "task_submit":
            if opened is not None:
                log.warning("rejected %s on %s: expected task_submit", opened.header.kind, msg.topic)
            self.gw.site_link.ack(msg)
            return
        device = header.sender
        body = opened.body if isinstance(opened.body, dict) else {}
        if body.get("cancel") is True and isinstance(body.get("key"), str) and KEY_RE.match(body["key"]):
            try:
                await self._withdraw(device, body["key"])  # the device cancels what it submitted (protocol §3)
            except Exception:  # noqa: BLE001 - not stored: not custody-acked, the device sends it again
                log.exception("the cancel of %s's site task %r was not stored; the device sends it again", device,
                              body["key"])
                self.gw.site_link.ack(msg)
                return
            self.gw.site_link.ack(msg)
            self._custody(header)
            return
        try:
            key, task, load = parse_submission(opened.body, device, self.gw.site)
        except SubmitError as exc:
            self.stats["refused"] += 1
            key = opened.body.get("key") if isinstance(opened.body, dict) else None
            log.warning("task submission from %s (key %r) refused: %s", device, key, exc)
            if isinstance(key, str) and KEY_RE.match(key):
                try:
                    await self._tell(device, {"key": key, "task_id": task_id_for(device, key), "state": "failed",
                                              "result": None, "error": f"submission refused: {exc}", "node": None})
                except (sqlite3.Error, EnvelopeError) as e:  # not custody-acked: it comes again
                    self.gw.storage_trouble("answering a refused submission", e)  # type: ignore[arg-type]
                    self.gw.site_link.ack(msg)
                    return
            self.gw.site_link.ack(msg)
            self._custody(header)
            return
        now = self.gw.clock()
        if load:
            self._origin_load(device, load, now)
        known = self.sched.get(task.id)
        if known is None:
            stored = await self.gw.db_call(self.store.get, task.id)
            if stored is not None and stored.get("state") in TERMINAL:  # done and forgotten: tell it again
                await self._tell_done(Task.from_record(stored))
                self.gw.site_link.ack(msg)
                self._custody(header)
                return
            self._apply(self.sched.submit(task, now), task.id)
            self.stats["submitted"] += 1
            log.info("site task %s (%s, key %s) submitted by %s", task.id, task.handler, key, device)
        try:
            await self._carry_out()
        except Exception:  # noqa: BLE001 - not stored: not custody-acked, the device sends it again
            log.exception("site task %s not stored; the device sends it again", task.id)
            self.gw.site_link.ack(msg)
            return
        self.gw.site_link.ack(msg)
        self._custody(header)

    async def _withdraw(self, device: str, key: str) -> None:
        """The device's cancel of its submission ``key``: an open task is cancelled; a finished one's outcome
        is told again (the device may have missed it); an unknown key is stored as cancelled and answered so
        (the cancel overtook its submission, which is then answered with that outcome and never runs)."""
        task_id = task_id_for(device, key)
        if self.cancel(task_id, f"cancelled by its device {device}"):
            await self._carry_out()  # (if it cannot be stored, no custody ack: the device sends the cancel again)
            return
        stored = await self.gw.db_call(self.store.get, task_id)
        if stored is not None and stored.get("state") in TERMINAL:
            await self._tell_done(Task.from_record(stored))
            return
        log.info("site task %s (key %s of %s): cancelled before it was submitted", task_id, key, device)
        t = Task(task_id, "?", origin=device, site=self.gw.site, origin_role="device",
                 idempotency_key=f"{device}/{key}")
        t.state, t.error = "cancelled", f"cancelled by its device {device} before the gateway had it"
        t.submitted_at = t.finished_at = self.gw.clock()
        await self.gw.db_call(self.store.save, [self._row(t)], self.gw.clock())
        await self._tell_done(t)

    def _origin_load(self, device: str, load: dict[str, Any], now: float) -> None:
        """What the submitter says of its load is what ``origin.*`` reads until its next status."""
        def num(k: str, lo: float, hi: float) -> float | None:
            v = load.get(k)
            if not isinstance(v, int | float) or isinstance(v, bool):
                return None
            try:
                f = float(v)
            except OverflowError:  # a CBOR bignum
                return None
            return max(lo, min(hi, f)) if math.isfinite(f) else None

        cpu, queue, mem = num("cpu", 0, 1), num("queue", 0, 1e6), num("mem_free", 0, 2**62)
        ex = self.sched.executors.get(device)
        if ex is None:
            status = ExecutorStatus(device, "device", self.gw.site, capacity=0, cpu=cpu,
                                    mem_free=None if mem is None else int(mem),
                                    queue=None if queue is None else int(queue), interval=DEVICE_INTERVAL)
        else:
            m = ex.measured
            status = ExecutorStatus(device, ex.tier, ex.site, ex.capacity, ex.capabilities, ex.handlers,
                                    m.cpu if cpu is None else cpu, m.mem_free if mem is None else int(mem),
                                    m.battery, m.queue if queue is None else int(queue), m.latency_ms,
                                    m.bandwidth_kbps, None, ex.interval)
        self._apply(self.sched.executor_seen(status, now))

    async def on_status(self, msg: Message, header: Any) -> None:
        """A device's executor status for this gateway (``task/status``): an executor, and a heartbeat."""
        self.gw.site_link.ack(msg)
        await self._ready.wait()
        opened = self._open(msg, "a site executor status")
        if opened is None or opened.header.kind != "status" or not isinstance(opened.body, dict):
            return
        try:
            status = executor_status(header.sender, "device", self.gw.site, opened.body)
        except (ValueError, TypeError, OverflowError) as exc:
            log.warning("site executor status from %s ignored: %s", header.sender, exc)
            return
        if status is not None:
            self._apply(self.sched.executor_seen(status, self.gw.clock()))

    def on_death(self, device: str) -> None:
        if device in self.sched.executors and self._ready.is_set():
            self._apply(self.sched.executor_gone(device, self.gw.clock(), "gone (its death message: the "
                                                                           "connection dropped or it stopped)"))

    async def on_result(self, msg: Message, header: Any) -> None:
        """A device's ``task_result`` for a site task it was given (sealed to the gateway)."""
        await self._ready.wait()
        opened = self._open(msg, "a site task result")
        if opened is None or opened.header.kind != "task_result":
            self.gw.site_link.ack(msg)
            if opened is not None:  # opened but not a result: never takeable, so the device must not send it for
                self._custody(header)  # ever; one that did not open (a key it has not heard of yet) is retried
            return
        now = self.gw.clock()
        body = opened.body
        try:
            body = await self._whole_result(header.sender, body)
        except sqlite3.Error as exc:  # not custody-acked: the device sends it again
            self.gw.storage_trouble("keeping a site task result's parts", exc)  # type: ignore[arg-type]
            self.gw.site_link.ack(msg)
            return
        if body is not None:
            self._apply(self.sched.report(header.sender, body, now),
                        body.get("task_id") if isinstance(body, dict) else None)
        self._apply(self.sched.heartbeat(header.sender, (), now))
        try:
            await self._carry_out()
        except Exception:  # noqa: BLE001 - not stored: not custody-acked, the device sends it again
            log.exception("result from %s not stored; the device sends it again", header.sender)
            self.gw.site_link.ack(msg)
            return
        self.gw.site_link.ack(msg)
        self._custody(header)

    def on_cloud_result(self, body: Any, seq: int) -> None:
        """The cloud's report on a site task it runs for us (kind ``task_result`` on our ``task/cmd``)."""
        if not self._ready.is_set():  # restoring: applied once the tasks are back (its seq is taken already)
            self._early.append(body)
            return
        self._apply(self.sched.report("cloud", body, self.gw.clock()),
                    body.get("task_id") if isinstance(body, dict) else None)

    async def local_report(self, body: dict[str, Any]) -> None:
        """A step of a site task the gateway's own pool runs."""
        whole = await self._whole_result(self.gw.node, body)
        if whole is not None:
            self._apply(self.sched.report(self.gw.node, whole, self.gw.clock()), body.get("task_id"))

    async def _whole_result(self, sender: str, body: Any) -> Any:
        """A result (protocol §3, "Parts"): as it is; for one in parts, None for a part (kept; it renews the
        sender's lease) or for a final still missing parts (it waits), and the final made whole once they
        are all here (a final that waited comes back with the part that completes it)."""
        if not isinstance(body, dict) or not ("part" in body or body.get("result_ref") is not None):
            return body
        tid, attempt = body.get("task_id"), body.get("attempt")
        name, now = parts.name_of(tid, attempt), self.gw.clock()
        try:
            if "part" in body:
                part = parts.Part.parse(body["part"], f"task {tid} part")
                waiting, dropped = await self.gw.db_call(self.gw.parts.add, sender, name, part, now)
                for _s, _n, given_up in dropped:
                    self.given_up(sender, given_up, "over the sender's bound of parts kept")
                if isinstance(tid, str):
                    self._apply(self.sched.renew(tid, sender, now, attempt if isinstance(attempt, int) else None))
                return None if waiting is None else await self._whole_result(sender, waiting)
            ref = parts.Ref.parse(body["result_ref"], f"task {tid} result_ref")
            value = await self.gw.db_call(self.gw.parts.take, sender, name, ref, f"task {tid}'s result")
        except parts.PartError as exc:
            log.warning("site task %s from %s: %s", tid, sender, exc)
            if "part" in body:
                return None
            return {k: v for k, v in body.items() if k != "result_ref"} | {
                "state": "failed", "result": None, "error": f"its result did not arrive whole from {sender}: {exc}"}
        if value is None:
            await self.gw.db_call(self.gw.parts.wait, sender, name, ref, body, now)
            return None
        return {k: v for k, v in body.items() if k != "result_ref"} | {"result": value}

    async def whole_result_ready(self, sender: str, body: dict[str, Any]) -> None:
        """A result whose parts all came before a restart (found in ``parts.db``): taken now."""
        whole = await self._whole_result(sender, body)
        if whole is not None:
            self._apply(self.sched.report(sender, whole, self.gw.clock()), whole.get("task_id"))

    def given_up(self, sender: str, body: dict[str, Any], why: str) -> None:
        """A final result that waited in vain for its parts: the task's attempt fails, saying so."""
        self._apply(self.sched.report(sender, {k: v for k, v in body.items() if k != "result_ref"} | {
            "state": "failed", "result": None, "error": f"its result's parts never all came from {sender} ({why})"},
            self.gw.clock()), body.get("task_id"))

    async def receipt(self, device: str, ranges: list[tuple[int, int]]) -> int:
        return int(await self.gw.db_call(self.commands.received, device, ranges))

    # ---- carrying out ----
    def _apply(self, cmds: list[Cmd], task_id: Any = None) -> None:
        if isinstance(task_id, str) and self.sched.get(task_id) is not None:
            self._touched[task_id] = None
        for c in cmds:
            tid = getattr(c, "task_id", None)
            if tid is not None:
                self._touched[tid] = None
            elif isinstance(c, ExecutorLost):
                self._touched.update(dict.fromkeys(c.task_ids))
        self._out.extend(cmds)
        if cmds or task_id is not None:
            self._wake.set()

    def _row(self, t: Task) -> tuple[str, str, str, str, bytes]:
        key = (t.idempotency_key or "/").split("/", 1)[1]
        return (t.id, t.origin, key, t.state, cbor2.dumps(t.to_record()))

    async def _carry_out(self) -> None:
        """Store the touched tasks, then carry out the commands in order (nothing goes out that is not
        stored; if storing fails, the commands wait for the next try)."""
        async with self._lock:
            cmds, self._out = self._out, []
            touched, self._touched = list(self._touched), {}
            tasks = [t for tid in touched if (t := self.sched.get(tid)) is not None]
            # the reports say exactly what is stored: taken now, before awaiting (a result may arrive meanwhile)
            reports = [r for t in tasks if (r := self._report_of(t)) is not None]
            if tasks:
                try:
                    await self.gw.db_call(self.store.save, [self._row(t) for t in tasks], self.gw.clock())
                except BaseException:
                    self._out[:0] = cmds
                    self._touched = dict.fromkeys(touched) | self._touched
                    raise
            for body in reports:
                await self._mirror(body)
            for c in cmds:
                try:
                    await self._carry(c)
                except Exception as exc:  # noqa: BLE001 - one command must not cost the rest of the batch
                    log.error("site scheduler: %s not carried out: %s", c, exc)
                    if isinstance(c, Assign):  # cannot be sent to it (revoked, no key...): it cannot run it
                        self._apply(self.sched.executor_gone(c.node, self.gw.clock(),
                                                             f"cannot be sent a task command ({exc})"))

    async def _carry(self, c: Cmd) -> None:
        gw = self.gw
        if isinstance(c, Assign):
            log.info("%s", c.describe())
            body = {"task_id": c.task_id, "handler": c.handler, "args": c.args,
                    "deadline": None if c.deadline is None else int(c.deadline * 1000),
                    "attempt": c.attempt, "lease": self.lease, "checkpoint": c.checkpoint,
                    # its result may come in parts (protocol §3), except from the cloud (offloads answer in one)
                    "parts": c.node != "cloud"}
            await self._command(c.node, body)
        elif isinstance(c, Cancel):
            log.info("%s", c.describe())
            if c.node:
                await self._command(c.node, {"task_id": c.task_id, "cancel": True, "attempt": c.attempt})
        elif isinstance(c, Completed):
            log.info("%s", c.describe())
            task = self.sched.get(c.task_id)
            if task is not None:
                self.stats["done"] += 1
                try:
                    await self._tell_done(task)
                finally:
                    self.sched.forget(c.task_id)
                    self._reported.pop(c.task_id, None)
        elif isinstance(c, ExecutorLost):
            log.warning("%s", c.describe())
            if c.task_ids:
                gw.emit_event("task.executor_lost", "warning",
                              f"{c.node} lost its lease on {len(c.task_ids)} site task(s) ({c.reason}); they move",
                              {"node": c.node, "reason": c.reason, "tasks": list(c.task_ids)[:100]})
        elif hasattr(c, "describe"):
            log.info("%s", c.describe())

    async def _command(self, node: str, body: dict[str, Any]) -> None:
        """A task command (or cancel) to ``node``: the gateway's pool, the cloud, or a device."""
        gw = self.gw
        if node == gw.node:
            gw.task_command(body)
            return
        expires = self.gw.clock() + 2 * self.lease
        if body.get("deadline"):
            expires = min(expires, body["deadline"] / 1000)
        if node == "cloud":
            try:
                await gw.emit_own(topics.task_offload(gw.site, gw.node), "task_cmd", body, expires=expires)
                self.stats["offloaded"] += 0 if body.get("cancel") else 1
            except Exception as exc:  # noqa: BLE001 - disk full...: the lease covers it (the task moves)
                log.error("site task %s not offloaded to the cloud: %s", body.get("task_id"), exc)
            return
        await self._hold(node, "task_cmd", body, expires)

    async def _hold(self, device: str, kind: str, body: dict[str, Any], expires: float) -> None:
        """Seal a command for ``device``, hold it until its receipt (§5.4), deliver it if online."""
        gw = self.gw
        topic = topics.task_cmd(gw.site, device)
        payload, header = gw.endpoint.seal(topic, kind, body, to=device,
                                           recipient_key=gw.ring.key_for_reply(device, gw.device_kv.get(device)),
                                           expires=int(expires * 1000))
        now = gw.clock()
        try:
            await gw.db_call(self.commands.add, device, header.seq, topic, payload, expires, now)
        except sqlite3.Error as exc:  # not held: delivered now if it can be; a lost task_cmd is covered by the lease
            gw.storage_trouble(f"holding a site task command for {device}", exc)
        if device in gw.devices_online:
            await gw.deliver([(device, header.seq, topic, payload)], self.commands)

    async def _tell(self, device: str, body: dict[str, Any]) -> None:
        """The outcome to the device that submitted the task; a result too big for one message goes first,
        in parts (task_done messages with ``part``; protocol §3, "Parts")."""
        expires = self.gw.clock() + self.gw.cfg.downlink.max_age
        result = body.get("result")
        ref, ps = parts.plan(result, "the result", allowed=True) if isinstance(result, dict) else (None, [])
        for p in ps:
            await self._hold(device, "task_done", {"key": body["key"], "task_id": body["task_id"], "part": p.body()},
                             expires)
        await self._hold(device, "task_done", body if ref is None else body | {"result": None,
                                                                              "result_ref": ref.body()}, expires)

    async def _tell_done(self, task: Task) -> None:
        node = next((c.node for c in task.copies if c.state == "succeeded"), None) or \
            next((c.node for c in reversed(task.copies) if c.node), None)
        key = (task.idempotency_key or "/").split("/", 1)[1]
        try:
            await self._tell(task.origin, {"key": key, "task_id": task.id, "state": task.state, "result": task.result,
                                           "error": task.error, "node": node})
        except (sqlite3.Error, EnvelopeError, LinkError) as exc:
            log.error("the outcome of site task %s was not sent to %s: %s", task.id, task.origin, exc)

    def _report_of(self, t: Task) -> dict[str, Any] | None:
        """The mirror report of ``t`` (protocol §3), or None when its state has been reported already."""
        if self._reported.get(t.id) == t.state:
            return None
        node = (t.holders() or [None])[0] or next((c.node for c in reversed(t.copies) if c.node), None)
        key = (t.idempotency_key or "/").split("/", 1)[1]
        result = t.result if t.state == "succeeded" else None
        size = len(cbor2.dumps(result)) if isinstance(result, dict) else 0
        if size > parts.INLINE_MAX - 20_000:  # (room for the explanation): the device has it, the cloud its size
            result = None
        return {"task_id": t.id, "state": t.state, "result": result, "error": t.error,
                **({"result_omitted": size} if result is None and size else {}),
                "site_task": {"origin": t.origin, "key": key, "handler": t.handler, "priority": t.priority,
                              "data_class": t.data_class, "node": node, "attempts": t.attempts,
                              "submitted": int((t.submitted_at or self.gw.clock()) * 1000),
                              "finished": None if t.finished_at is None else int(t.finished_at * 1000),
                              "explain": self.sched.explain(t.id)[:16_000]}}

    async def _mirror(self, body: dict[str, Any]) -> None:
        """Report a task to the cloud (its state changed since the last report)."""
        gw = self.gw
        try:
            await gw.emit_own(topics.task_result(gw.site, gw.node), "task_result", body)
            self._reported[body["task_id"]] = body["state"]
        except Exception as exc:  # noqa: BLE001 - disk full...: the next change reports it
            log.warning("site task %s not mirrored to the cloud (%s)", body["task_id"], exc)

    # ---- executors the gateway knows by itself ----
    def _own_statuses(self, now: float) -> None:
        gw = self.gw
        if gw.cfg.task_slots > 0:
            running = gw.workers.running()
            self._apply(self.sched.executor_seen(ExecutorStatus(
                gw.node, "gateway", gw.site, capacity=gw.cfg.task_slots, capabilities=frozenset(gw.cfg.capabilities),
                handlers=frozenset(gw.workers.handlers), queue=len(running),
                running=tuple(t for t in running if self.owns(t))), now))
        up = gw.uplink.connected.is_set()
        if up:
            self._apply(self.sched.executor_seen(ExecutorStatus("cloud", "cloud", "", capacity=CLOUD_SLOTS), now))
            if not self._cloud_up:
                log.info("uplink up: the cloud takes site tasks again")
        elif self._cloud_up:
            log.warning("uplink down: site tasks the cloud runs move; the offload policy says what waits")
            self._apply(self.sched.executor_gone("cloud", now, "unreachable (the gateway's uplink is down)"))
        self._cloud_up = up

    # ---- the loop ----
    async def run(self) -> None:
        gw = self.gw
        now = gw.clock()
        for rec in await gw.db_call(self.store.open_records):
            try:
                t = self.sched.restore(rec, now)
                self._touched[t.id] = None
            except (ValueError, TypeError, KeyError) as exc:
                log.error("site task %s cannot be restored (%s)", rec.get("spec", {}).get("id"), exc)
        if self._touched:
            log.info("restored %d open site task(s)", len(self._touched))
        self._ready.set()
        early, self._early = self._early, []
        for body in early:
            self.on_cloud_result(body, 0)
        for task_id, reason in self._early_cancels:
            self.cancel(task_id, reason)
        self._early_cancels.clear()
        swept = 0.0
        while True:
            now = gw.clock()
            self._own_statuses(now)
            self._apply(self.sched.tick(now))
            if now - swept > 3600:
                swept = now
                with contextlib.suppress(sqlite3.Error):
                    await gw.db_call(self.store.sweep, now - KEEP_DONE_S)
            if self._out or self._touched:
                try:
                    await self._carry_out()
                except Exception:
                    log.exception("carrying out the site scheduler's commands failed; retrying")
                    await asyncio.sleep(0.5)
                    continue
            wait = self.sched.next_wakeup(gw.clock())
            wait = min(wait if wait is not None else 1.0, 1.0, self.lease / 3)  # the uplink and the pool are polled
            self._wake.clear()
            if not self._out and not self._touched:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.01)):
                        await self._wake.wait()

    def close(self) -> None:
        self.store.close()
        self.commands.close()
