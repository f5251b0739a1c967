"""Schedules: cron and interval task submissions that survive cloud restarts (issue 7).

A schedule is a task spec plus a trigger (a 5-field ``cron`` line or ``every`` N seconds). Each time it
fires, the service calls ``submit(task_spec, idempotency_key)`` with the key
``schedule:<id>:<scheduled fire time, ms since the epoch>``.

Persistence: APScheduler 3.11's ``SQLAlchemyJobStore`` on a SQLite file of its own keeps each schedule's
trigger, its spec (as the job's kwargs, so trigger and spec change in one write) and its next run time.
The table ``schedule_runs`` in the same file keeps what happened (last fire time submitted, task id, run
count, last error, misses), so it survives restarts too.

No double runs: the key is the *scheduled* fire time, not the wall clock, so a fire time that runs twice
(the cloud crashed after ``submit`` but before APScheduler stored the job's next run time) submits the same
key twice and the task service dedupes it. A fire time already recorded in ``schedule_runs`` is not
submitted again at all.

Misfire policy (no missed-run storms): while the cloud is down, the runs it missed are coalesced. On
restart a schedule runs once if its latest missed fire time is within ``misfire_grace`` seconds (default
60); otherwise the missed runs are skipped (counted in ``missed``) and the next run is at the next
scheduled time. A run that is still submitting when the next fire time comes makes that fire time skipped
too: never more than one run per schedule at a time. A paused schedule that is resumed starts at its next
scheduled time after the resume, never with a catch-up run. Shutting down never consumes a run that is
due at that moment (``_Scheduler``): it stays due in the store and follows the policy above on restart.

Threads: APScheduler's ``BackgroundScheduler`` runs in its own thread, and ``submit`` is called from a
worker thread of the service's own pool, never from the event loop. That is why this is not an
``AsyncIOScheduler``: ``TaskService.submit_threadsafe`` blocks until the loop has persisted the task, which
must not happen on the loop's own thread; a background scheduler also keeps firing while the loop is busy,
and needs no loop at all in tests. Call ``start()`` / ``shutdown()`` off the loop (``asyncio.to_thread``):
``shutdown()`` waits for a run that is blocked in ``submit`` on the loop.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.base import run_job
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cwsnet.policy.schema import duration

__all__ = ["ScheduleSpec", "ScheduleService", "ScheduleView", "idempotency_key", "run_schedule"]

log = logging.getLogger("cwsnet.cloud.schedules")

Submit = Callable[[dict[str, Any], str], str]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CRON_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
_JOB_FUNC = "cloud.schedules:run_schedule"  # by text: APScheduler pickles the job with this reference


def _ms(t: datetime | None) -> int | None:
    """Milliseconds since the epoch, exact (integer arithmetic: fire times 1 s apart are 1000 ms apart)."""
    return None if t is None else (t - _EPOCH) // timedelta(milliseconds=1)


def idempotency_key(schedule_id: str, fire_ms: int) -> str:
    """The key a schedule's run is submitted with: one per schedule and scheduled fire time."""
    return f"schedule:{schedule_id}:{fire_ms}"


def _seconds(v: object, field: str) -> float:
    """``cwsnet.policy.schema.duration``, its message without the field name (the error path names it)."""
    try:
        return duration(v, field)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix(f"{field} ")) from None


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"unknown time zone {name!r} (use an IANA name like UTC or Europe/Berlin)") from None


def _cron_trigger(expr: str, tz: str = "UTC") -> CronTrigger:
    """A cron trigger from a 5-field crontab line; the error names the crontab field that is wrong."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"must have 5 fields (minute hour day month day-of-week), got {len(fields)}")
    try:
        return CronTrigger.from_crontab(expr, timezone=_zone(tz))
    except ValueError as exc:
        for name, value in zip(_CRON_FIELDS, fields, strict=True):
            try:
                CronTrigger(**{name: value}, timezone="UTC")
            except ValueError as field_exc:
                raise ValueError(f"{name.replace('_', '-')} field {value!r}: {field_exc}") from None
        raise ValueError(str(exc)) from None


class ScheduleSpec(BaseModel):
    """What to submit, and when. Exactly one of ``cron`` and ``every``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(description="1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit")
    task: dict[str, Any] = Field(description="the task submitted at each run: handler, args, and optionally "
                                 "target, priority, replicas, mode, requirements, timeout, max_attempts")
    cron: str | None = Field(None, description="a 5-field crontab line: minute hour day month day-of-week")
    every: float | None = Field(None, description="an interval in seconds (>= 1), or a duration like 30s, 5m, 1h")
    timezone: str = Field("UTC", description="the IANA time zone the cron line is read in")
    enabled: bool = True
    misfire_grace: int = Field(60, description="seconds a run may be late and still happen (1..86400)")
    description: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("must be 1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: dict[str, Any]) -> dict[str, Any]:
        handler = v.get("handler")
        if not isinstance(handler, str) or not handler.strip():
            raise ValueError("handler must be a non-empty string")
        args = v.get("args", {})
        if not isinstance(args, dict):
            raise ValueError("args must be a mapping")
        return {**v, "args": args}

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            trigger = _cron_trigger(v)
            if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
                raise ValueError(f"{v!r} never fires")
        return v

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, v: object) -> object:
        if v is None:
            return None
        seconds = _seconds(v, "every")
        if seconds < 1:
            raise ValueError("must be at least 1 second")
        return seconds

    @field_validator("misfire_grace", mode="before")
    @classmethod
    def _grace(cls, v: object) -> int:
        seconds = _seconds(v, "misfire_grace")
        if not 1 <= seconds <= 86400:
            raise ValueError("must be between 1 second and 1 day (86400)")
        if seconds != int(seconds):
            raise ValueError("must be a whole number of seconds")
        return int(seconds)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        _zone(v)
        return v

    @model_validator(mode="after")
    def _one_trigger(self) -> ScheduleSpec:
        if (self.cron is None) == (self.every is None):
            raise ValueError("cron, every: give exactly one of cron or every"
                             + (" (got both)" if self.cron is not None else ""))
        return self

    @classmethod
    def parse(cls, data: ScheduleSpec | dict[str, Any]) -> ScheduleSpec:
        """Validate ``data``; ``ValueError`` with ``field: message`` for each problem, ``; ``-separated."""
        if isinstance(data, ScheduleSpec):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"a schedule must be a mapping, not {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(_errors(exc)) from None

    def trigger(self) -> BaseTrigger:
        if self.cron is not None:
            return _cron_trigger(self.cron, self.timezone)
        assert self.every is not None
        return IntervalTrigger(seconds=self.every, timezone=_zone(self.timezone))


def _errors(exc: ValidationError) -> str:
    out = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        out.append(msg if not loc else f"{loc}: {msg}")
    return "; ".join(out)


@dataclass(frozen=True)
class ScheduleView:
    """A schedule and what it did. Times are ms since the epoch."""

    spec: ScheduleSpec
    next_run: int | None  # None while paused
    last_run: int | None  # the scheduled fire time of the last run submitted
    last_task: str | None  # the task id ``submit`` returned for it
    runs: int  # runs submitted
    last_error: str | None  # why the last submission failed; None once one succeeds again
    missed: int  # runs skipped: later than misfire_grace, or the previous run was still submitting
    last_missed: int | None  # the scheduled fire time of the last skipped run
    last_attempt: int | None  # wall time (the service's clock) of the last call to submit

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.spec.model_dump(mode="json"), "next_run": self.next_run, "last_run": self.last_run,
            "last_task": self.last_task, "runs": self.runs, "last_error": self.last_error,
            "missed": self.missed, "last_missed": self.last_missed, "last_attempt": self.last_attempt,
        }


def run_schedule(schedule_id: str, spec: dict[str, Any] | None = None, *,
                 service: ScheduleService | None = None, fire_time: datetime | None = None) -> str | None:
    """The job function every schedule's job refers to (by text, so the pickled job outlives the process).

    ``service`` and ``fire_time`` are bound per run by the service's executor (``_FireTimeExecutor``):
    after a restart the new process's service binds itself, so nothing global is needed."""
    if service is None or fire_time is None:
        raise RuntimeError(f"schedule {schedule_id!r} must run in a ScheduleService's scheduler")
    return service._fire(schedule_id, spec or {}, fire_time)


class _Run:
    """One run of a job with its scheduled fire time bound, shaped like the ``Job`` that
    ``apscheduler.executors.base.run_job`` expects (id, func, args, kwargs, misfire_grace_time)."""

    def __init__(self, job: Job, fire_time: datetime, service: ScheduleService) -> None:
        self.id = job.id
        self.misfire_grace_time = job.misfire_grace_time
        self.func = functools.partial(job.func, service=service, fire_time=fire_time)
        self.args = tuple(job.args)
        self.kwargs = copy.deepcopy(dict(job.kwargs))
        self.fire_time = fire_time

    def __str__(self) -> str:
        return f"schedule {self.id} (scheduled at {self.fire_time.isoformat()})"


class _FireTimeExecutor(ThreadPoolExecutor):
    """APScheduler's thread pool executor, except the job function is told its scheduled fire time.

    Why here: APScheduler 3.11 never passes the scheduled run time to the job function. The scheduler
    thread computes ``run_times`` from the job's stored ``next_run_time`` and calls
    ``executor.submit_job(job, run_times)``, and only *afterwards* advances ``job.next_run_time`` and
    stores it -- on the same ``Job`` object the worker thread is running, so reading ``job.next_run_time``
    in the job function races with the scheduler. The ``EVENT_JOB_SUBMITTED`` listener does get the run
    times, but it is dispatched after the run may have started (and before APScheduler's misfire check,
    which happens in ``run_job``). ``run_times`` here, in ``_do_submit_job``, is the one reliable source:
    we bind each run time (with ``coalesce`` there is exactly one) and then run APScheduler's own
    ``run_job`` per run, which keeps its misfire check and its executed/error/missed events unchanged."""

    def __init__(self, service: ScheduleService, max_workers: int = 4) -> None:
        super().__init__(max_workers, pool_kwargs={"thread_name_prefix": "cwsnet-schedules"})
        self._service = service

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        runs = [_Run(job, t, self._service) for t in run_times]
        alias, logger_name = job._jobstore_alias, self._logger.name

        def go() -> list[Any]:
            events: list[Any] = []
            for r in runs:
                events.extend(run_job(r, alias, [r.fire_time], logger_name))
            return events

        def done(f: Any) -> None:  # as BasePoolExecutor._do_submit_job
            exc = f.exception()
            if exc:
                self._run_job_error(job.id, exc, getattr(exc, "__traceback__", None))
            else:
                self._run_job_success(job.id, f.result())

        self._pool.submit(go).add_done_callback(done)


class _Scheduler(BackgroundScheduler):
    """``BackgroundScheduler`` that processes due jobs only while running.

    APScheduler 3.11's ``shutdown()`` sets the state to stopped, shuts the executors down and *then* wakes
    the scheduler thread, which runs ``_process_jobs`` once more (it only checks for "paused"): a job due at
    that moment is handed to the dead executor ("cannot schedule new futures after shutdown",
    agronholm/apscheduler#285, #985) and its next run time is advanced and stored anyway -- with a
    persistent store, a run lost across the restart. The check is made under the job store lock, which
    ``shutdown()`` takes before it shuts the executors down, so a pass that started in time completes
    with a live executor and a later one does nothing. The same guard keeps a scheduler started with
    ``paused=True`` from running anything when it is shut down."""

    def _process_jobs(self) -> float | None:
        with self._jobstores_lock:  # an RLock: the base method takes it again
            if self.state != STATE_RUNNING:
                return None
            return super()._process_jobs()


_RUNS_DDL = """CREATE TABLE IF NOT EXISTS schedule_runs (
    id TEXT PRIMARY KEY, last_run INTEGER, last_task TEXT, runs INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, missed INTEGER NOT NULL DEFAULT 0, last_missed INTEGER, last_attempt INTEGER)"""


class ScheduleService:
    """Cron and interval schedules on a persistent APScheduler job store (see the module docstring)."""

    def __init__(self, db_path: Path, submit: Submit, *, clock: Callable[[], float] | None = None) -> None:
        """``db_path``: the SQLite file of the job store and ``schedule_runs`` (created if missing).
        ``submit(task_spec, idempotency_key) -> task_id`` is called from the service's worker threads (never
        the event loop; at most one call per schedule at a time, calls for different schedules may run
        concurrently); it must dedupe by key. ``clock`` (time.time) stamps ``last_attempt``."""
        self.db_path = Path(db_path)
        self._submit = submit
        self.clock = clock or time.time
        # serialises start/shutdown/put/delete/pause/resume; always taken *before* APScheduler's own locks,
        # never from inside the scheduler (see _record)
        self._lock = threading.RLock()
        self._scheduler: _Scheduler | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the job store and start firing. Runs missed while the cloud was down follow the misfire
        policy (one coalesced run within ``misfire_grace``, else skipped)."""
        with self._lock:
            if self._scheduler is not None:
                return
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(_RUNS_DDL)
            scheduler = _Scheduler(
                jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{self.db_path}")},
                executors={"default": _FireTimeExecutor(self)},
                job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60},
                timezone=UTC,
            )
            scheduler.add_listener(self._on_skipped, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
            scheduler.start()
            self._scheduler = scheduler
            log.info("schedules started (%s): %d schedule(s)", self.db_path, len(scheduler.get_jobs()))

    def shutdown(self, wait: bool = True) -> None:
        """Stop firing; with ``wait``, until the runs in progress have returned from ``submit``."""
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=wait)

    @property
    def running(self) -> bool:
        return self._scheduler is not None

    # -- the API ----------------------------------------------------------------------------------------

    def put(self, spec: ScheduleSpec | dict[str, Any]) -> ScheduleView:
        """Create or replace a schedule. Replacing re-times it from now (the old job is gone) and keeps its
        run history. ``ValueError`` naming the field for bad input."""
        spec = ScheduleSpec.parse(spec)
        trigger = spec.trigger()
        with self._lock:
            scheduler = self._running()
            if scheduler.get_job(spec.id) is None:  # a new schedule starts with no history (a run that
                with self._db() as db:             # finished after a delete may have left a row)
                    db.execute("DELETE FROM schedule_runs WHERE id = ?", (spec.id,))
            extra: dict[str, Any] = {} if spec.enabled else {"next_run_time": None}  # None = paused
            scheduler.add_job(
                _JOB_FUNC, trigger, args=[spec.id], kwargs={"spec": spec.model_dump(mode="json")},
                id=spec.id, name=spec.id, replace_existing=True, coalesce=True, max_instances=1,
                misfire_grace_time=spec.misfire_grace, **extra,
            )
            log.info("schedule %s put: %s", spec.id, spec.cron or f"every {spec.every:g}s")
            view = self.get(spec.id)
        assert view is not None
        return view

    def delete(self, schedule_id: str) -> bool:
        """Remove a schedule and its run history; False if there was none."""
        with self._lock:
            scheduler = self._running()
            try:
                scheduler.remove_job(schedule_id)
            except JobLookupError:
                return False
            with self._db() as db:
                db.execute("DELETE FROM schedule_runs WHERE id = ?", (schedule_id,))
            log.info("schedule %s deleted", schedule_id)
            return True

    def get(self, schedule_id: str) -> ScheduleView | None:
        job = self._running().get_job(schedule_id)
        return None if job is None else self._view(job)

    def list(self) -> list[ScheduleView]:
        jobs = sorted(self._running().get_jobs(), key=lambda j: j.id)
        return [v for v in (self._view(j) for j in jobs) if v is not None]

    def pause(self, schedule_id: str) -> ScheduleView | None:
        """Stop firing (``enabled: false``); None if there is no such schedule."""
        return self._set_enabled(schedule_id, False)

    def resume(self, schedule_id: str) -> ScheduleView | None:
        """Fire again from the next scheduled time after now (no catch-up run); None if unknown."""
        return self._set_enabled(schedule_id, True)

    # -- internals --------------------------------------------------------------------------------------

    def _running(self) -> _Scheduler:
        scheduler = self._scheduler
        if scheduler is None:
            raise RuntimeError("the schedule service is not running (call start() first)")
        return scheduler

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=10)
        try:
            with db:  # one transaction
                yield db
        finally:
            db.close()

    def _set_enabled(self, schedule_id: str, enabled: bool) -> ScheduleView | None:
        with self._lock:
            scheduler = self._running()
            job = scheduler.get_job(schedule_id)
            if job is None:
                return None
            spec = ScheduleSpec.model_validate(job.kwargs["spec"]).model_copy(update={"enabled": enabled})
            # the next run from now, as APScheduler's resume_job computes it: a resumed schedule never
            # catches up on the fire times it was paused for
            next_run = job.trigger.get_next_fire_time(None, datetime.now(UTC)) if enabled else None
            scheduler.modify_job(schedule_id, kwargs={"spec": spec.model_dump(mode="json")},
                                 next_run_time=next_run)
            log.info("schedule %s %s", schedule_id, "resumed" if enabled else "paused")
            return self.get(schedule_id)

    def _view(self, job: Job) -> ScheduleView | None:
        try:
            spec = ScheduleSpec.model_validate(job.kwargs["spec"])
        except (KeyError, ValidationError) as exc:
            log.warning("schedule %s: stored spec is unreadable (%s); skipped", job.id, exc)
            return None
        with self._db() as db:
            row = db.execute("SELECT last_run, last_task, runs, last_error, missed, last_missed, last_attempt "
                             "FROM schedule_runs WHERE id = ?", (job.id,)).fetchone()
        last_run, last_task, runs, last_error, missed, last_missed, last_attempt = row or (
            None, None, 0, None, 0, None, None)
        return ScheduleView(spec=spec, next_run=_ms(job.next_run_time), last_run=last_run, last_task=last_task,
                            runs=runs, last_error=last_error, missed=missed, last_missed=last_missed,
                            last_attempt=last_attempt)

    def _record(self, schedule_id: str, what: str, sql: str, params: tuple[Any, ...]) -> None:
        """Write to ``schedule_runs``; a failure is logged, never raised into the scheduler.

        No Python lock here, on purpose: this runs in executor threads and in APScheduler's event callbacks,
        which may run in the scheduler thread while it holds its job store lock, and the API methods hold
        ``self._lock`` while they call into the scheduler -- taking ``self._lock`` here would deadlock.
        SQLite serialises the writes; each is a single atomic upsert."""
        try:
            with self._db() as db:
                db.execute(sql, params)
        except sqlite3.Error as exc:
            log.warning("schedule %s: could not record %s: %s", schedule_id, what, exc)

    def _fire(self, schedule_id: str, spec: dict[str, Any], fire_time: datetime) -> str | None:
        """One run (in a worker thread of the executor): submit the task unless this fire time was already
        submitted; record the outcome. Never raises: a failure is recorded and the next fire time tries
        again (no retries in between, so a failing ``submit`` never becomes a storm)."""
        fire_ms = _ms(fire_time)
        assert fire_ms is not None
        try:
            with self._db() as db:
                row = db.execute("SELECT last_run FROM schedule_runs WHERE id = ?", (schedule_id,)).fetchone()
        except sqlite3.Error as exc:  # submit anyway: the idempotency key still prevents a double run
            log.warning("schedule %s: could not read its last run: %s", schedule_id, exc)
            row = None
        if row is not None and row[0] is not None and fire_ms <= row[0]:
            log.info("schedule %s: fire time %d already submitted; not again", schedule_id, fire_ms)
            return None
        key = idempotency_key(schedule_id, fire_ms)
        task = copy.deepcopy(spec.get("task") or {})
        attempt = int(self.clock() * 1000)
        try:
            task_id = str(self._submit(task, key))
        except Exception as exc:  # noqa: BLE001 - recorded and logged; the scheduler must keep going
            error = f"{type(exc).__name__}: {exc}"
            log.warning("schedule %s: submitting the run at %s failed: %s", schedule_id, fire_time.isoformat(),
                        error)
            self._record(schedule_id, "a failed run",
                         "INSERT INTO schedule_runs (id, last_error, last_attempt) VALUES (?, ?, ?) "
                         "ON CONFLICT(id) DO UPDATE SET last_error = excluded.last_error, "
                         "last_attempt = excluded.last_attempt", (schedule_id, error, attempt))
            return None
        self._record(schedule_id, "a run",
                     "INSERT INTO schedule_runs (id, last_run, last_task, runs, last_error, last_attempt) "
                     "VALUES (?, ?, ?, 1, NULL, ?) ON CONFLICT(id) DO UPDATE SET last_run = excluded.last_run, "
                     "last_task = excluded.last_task, runs = runs + 1, last_error = NULL, "
                     "last_attempt = excluded.last_attempt", (schedule_id, fire_ms, task_id, attempt))
        log.info("schedule %s: run at %s submitted as task %s", schedule_id, fire_time.isoformat(), task_id)
        return task_id

    def _on_skipped(self, event: JobEvent) -> None:
        """A run skipped by APScheduler: too late for ``misfire_grace`` (EVENT_JOB_MISSED, one per coalesced
        run) or the previous run still in progress (EVENT_JOB_MAX_INSTANCES)."""
        times = getattr(event, "scheduled_run_times", None) or [getattr(event, "scheduled_run_time", None)]
        fire_ms = _ms(times[-1]) if times[-1] is not None else None
        self._record(event.job_id, "a skipped run",
                     "INSERT INTO schedule_runs (id, missed, last_missed) VALUES (?, 1, ?) "
                     "ON CONFLICT(id) DO UPDATE SET missed = missed + 1, last_missed = excluded.last_missed",
                     (event.job_id, fire_ms))
