"""Schedules (cloud/schedules.py): cron and interval task submissions on a persistent APScheduler job store.

Real APScheduler, real SQLite files in tmp_path, a fake ``submit`` that dedupes by idempotency key like the
task service does. Waits are deadline-bounded polls (``wait_for``); nothing asserts on elapsed time.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from harness.wait import wait_for

from cloud.schedules import ScheduleService, ScheduleSpec, _Scheduler, idempotency_key

HOUR = 3600


class FakeTasks:
    """``submit(task, key) -> task id``, deduping by key like TaskService.submit_threadsafe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[dict[str, Any], str]] = []  # every call, duplicates included
        self.by_key: dict[str, str] = {}
        self.fail_next = 0

    def __call__(self, task: dict[str, Any], key: str) -> str:
        with self.lock:
            self.calls.append((task, key))
            if self.fail_next:
                self.fail_next -= 1
                raise RuntimeError("task service unavailable")
            return self.by_key.setdefault(key, f"task-{len(self.by_key)}")

    def keys(self, schedule_id: str) -> list[str]:
        with self.lock:
            return [k for _, k in self.calls if k.startswith(f"schedule:{schedule_id}:")]

    def fire_times(self, schedule_id: str) -> list[int]:
        return [int(k.rsplit(":", 1)[1]) for k in self.keys(schedule_id)]


@pytest.fixture
def tasks() -> FakeTasks:
    return FakeTasks()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cloud" / "schedules.db"


@pytest.fixture
def services(db: Path, tasks: FakeTasks) -> Iterator[list[ScheduleService]]:
    """``new()`` appended here; all shut down at teardown."""
    made: list[ScheduleService] = []
    yield made
    for s in made:
        s.shutdown()


def start(services: list[ScheduleService], db: Path, tasks: FakeTasks) -> ScheduleService:
    svc = ScheduleService(db, tasks)
    svc.start()
    services.append(svc)
    return svc


def spec(id: str = "tick", **kw: Any) -> dict[str, Any]:
    return {"id": id, "task": {"handler": "demo.tick", "args": {"n": 1}}, **kw}


@contextlib.contextmanager
def job_store(db: Path) -> Iterator[_Scheduler]:
    """The job store of a stopped service, through a scheduler started *paused*: jobs loaded, nothing runs.

    It is the service's own scheduler class: a plain BackgroundScheduler runs due jobs once more when it
    is shut down, even when paused (see cloud.schedules._Scheduler), which would consume the past next
    run time planted here."""
    s = _Scheduler(jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{db}")}, timezone=UTC)
    s.start(paused=True)
    try:
        yield s
    finally:
        s.shutdown(wait=False)


def set_next_run(db: Path, schedule_id: str, when: datetime) -> None:
    """Rewrite a stopped service's stored job as if the cloud had been down since ``when``.

    APScheduler's clock cannot be faked, so the past is put into the job store instead, with the public
    ``modify_job``. The service that starts next on this file sees exactly what it would after an
    outage: a job whose next run time is long gone."""
    with job_store(db) as s:
        s.modify_job(schedule_id, next_run_time=when)


def ms(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def steps(times: list[int]) -> list[int]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


# -- firing ------------------------------------------------------------------------------------------


def test_every_fires_once_per_interval_keyed_by_scheduled_fire_time(services, db, tasks):
    svc = start(services, db, tasks)
    view = svc.put(spec(every=1, task={"handler": "demo.tick", "args": {"n": 1}, "priority": 2, "target": "gw-1"}))
    first = view.next_run
    assert first is not None and view.runs == 0

    wait_for(lambda: len(tasks.keys("tick")) >= 3, message="three runs")
    times = tasks.fire_times("tick")
    assert times[0] == first  # the key is the scheduled time, not when the run happened to start
    assert steps(times) == [1000] * (len(times) - 1)  # distinct, one interval apart
    assert tasks.keys("tick")[0] == idempotency_key("tick", first) == f"schedule:tick:{first}"
    submitted = tasks.calls[0][0]
    assert submitted == {"handler": "demo.tick", "args": {"n": 1}, "priority": 2, "target": "gw-1"}

    view = wait_for(lambda: (v := svc.get("tick")) and v.runs >= 3 and v, message="runs recorded")
    assert view.last_task is not None and view.last_task in tasks.by_key.values()
    assert view.last_error is None and view.missed == 0
    assert view.next_run > view.last_run


def test_restart_keeps_schedule_and_runs_each_fire_time_once(services, db, tasks):
    a = start(services, db, tasks)
    a.put(spec(every="1s"))
    wait_for(lambda: len(tasks.keys("tick")) >= 2, message="runs before the restart")
    a.shutdown()
    before = len(tasks.keys("tick"))

    b = start(services, db, tasks)  # a new service on the same file: what a new cloud process does
    view = b.get("tick")
    assert view is not None and view.spec.every == 1 and view.runs == before  # history survived too
    wait_for(lambda: len(tasks.keys("tick")) >= before + 2, message="runs after the restart")
    b.shutdown()

    keys = tasks.keys("tick")
    assert len(keys) == len(set(keys)), "a fire time was submitted twice"
    times = tasks.fire_times("tick")
    assert steps(times) == [1000] * (len(times) - 1), "a run was missed or doubled across the restart"


def test_cron_schedule_next_run_in_its_timezone(services, db, tasks):
    svc = start(services, db, tasks)
    view = svc.put(spec("report", cron="30 9 * * mon-fri", timezone="Europe/Berlin", description="daily"))
    nxt = datetime.fromtimestamp(view.next_run / 1000, ZoneInfo("Europe/Berlin"))
    assert (nxt.hour, nxt.minute, nxt.second) == (9, 30, 0) and nxt.weekday() < 5
    assert view.next_run > ms(datetime.now(UTC))
    assert svc.get("report").as_dict()["cron"] == "30 9 * * mon-fri"


# -- misfires: the cloud was down ---------------------------------------------------------------------


def test_missed_runs_within_grace_are_coalesced_into_one(services, db, tasks):
    a = start(services, db, tasks)
    a.put(spec(every="1h", misfire_grace=60))
    a.shutdown()
    # down for a little over 3 hours: 4 fire times were missed, the latest 30 s ago (within the grace)
    down_since = datetime.now(UTC) - timedelta(seconds=3 * HOUR + 30)
    set_next_run(db, "tick", down_since)

    b = start(services, db, tasks)
    view = wait_for(lambda: (v := b.get("tick")) and v.runs >= 1 and v, message="the catch-up run")
    b.shutdown()  # waits for runs in progress: a storm would have been submitted by now
    latest_missed = ms(down_since) + 3 * HOUR * 1000
    assert tasks.fire_times("tick") == [latest_missed]  # once, for the latest missed fire time
    assert view.last_run == latest_missed and view.missed == 0
    assert view.next_run == latest_missed + HOUR * 1000  # then on schedule again


def test_missed_runs_beyond_grace_are_skipped(services, db, tasks):
    a = start(services, db, tasks)
    a.put(spec(every="1h", misfire_grace="1m"))
    a.shutdown()
    # down for 2 h 10 min: the latest missed fire time is 10 minutes old, beyond the 1 minute grace
    down_since = datetime.now(UTC) - timedelta(seconds=2 * HOUR + 600)
    set_next_run(db, "tick", down_since)

    b = start(services, db, tasks)
    view = wait_for(lambda: (v := b.get("tick")) and v.missed >= 1 and v, message="the skipped run")
    b.shutdown()
    assert tasks.calls == []
    assert view.missed == 1 and view.runs == 0  # the whole missed series counts as one skipped run
    assert view.last_missed == ms(down_since) + 2 * HOUR * 1000
    assert view.next_run == ms(down_since) + 3 * HOUR * 1000  # the next scheduled time, in the future


def test_a_due_run_survives_shutdown(services, db, tasks):
    a = start(services, db, tasks)
    a.put(spec(every="1h"))
    a.shutdown()
    due = datetime.now(UTC) - timedelta(seconds=5)
    set_next_run(db, "tick", due)  # started and shut down a scheduler with this job due
    with job_store(db) as s:
        assert s.get_job("tick").next_run_time == due  # not consumed by the shutdown
    assert tasks.calls == []


def test_replayed_fire_time_after_a_crash_is_not_run_twice(services, db, tasks):
    a = start(services, db, tasks)
    a.put(spec(every="1h"))
    a.shutdown()
    due = datetime.now(UTC) - timedelta(seconds=5)
    set_next_run(db, "tick", due)
    b = start(services, db, tasks)
    wait_for(lambda: b.get("tick").runs == 1, message="the run")
    b.shutdown()
    assert tasks.keys("tick") == [idempotency_key("tick", ms(due))]

    # crash after the run was recorded but before APScheduler stored the job's next run time: the same
    # fire time comes due again on restart and is recognised as already submitted
    set_next_run(db, "tick", due)
    c = start(services, db, tasks)
    wait_for(lambda: c.get("tick").next_run > ms(due), message="the replayed fire time processed")
    c.shutdown()
    assert len(tasks.calls) == 1

    # crash right after submit, before anything was recorded: the replay submits the same key again and
    # the task service's dedupe returns the task it already has
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schedule_runs SET last_run = NULL")
    conn.close()
    set_next_run(db, "tick", due)
    d = start(services, db, tasks)
    view = wait_for(lambda: (v := d.get("tick")) and v.last_run == ms(due) and v, message="the replay")
    d.shutdown()
    assert [k for _, k in tasks.calls] == [idempotency_key("tick", ms(due))] * 2
    assert len(tasks.by_key) == 1 and view.last_task == "task-0"


# -- failures ------------------------------------------------------------------------------------------


def test_submit_failure_is_recorded_and_the_schedule_keeps_firing(services, db, tasks):
    tasks.fail_next = 1
    svc = start(services, db, tasks)
    svc.put(spec(every=1))
    failed = wait_for(lambda: (v := svc.get("tick")) and v.last_error and v, message="the failure")
    assert "task service unavailable" in failed.last_error and failed.runs == 0

    ok = wait_for(lambda: (v := svc.get("tick")) and v.runs >= 1 and v, message="a later run")
    assert ok.last_error is None  # cleared by the next successful run
    times = tasks.fire_times("tick")
    assert len(times) == len(set(times)), "the failed fire time was retried"
    assert times[1] - times[0] == 1000  # not retried: the next attempt is the next fire time
    assert ok.last_run in times[1:]


# -- the API ---------------------------------------------------------------------------------------------


def test_pause_resume_delete_persist(services, db, tasks):
    svc = start(services, db, tasks)
    svc.put(spec("clock", every=1))
    svc.put(spec("tick", every=1))
    paused = svc.pause("tick")
    assert paused.spec.enabled is False and paused.next_run is None
    wait_for(lambda: len(tasks.keys("clock")) >= 2, message="two runs of the other schedule")
    assert tasks.keys("tick") == []  # a paused schedule has no next run time at all
    svc.shutdown()

    svc = start(services, db, tasks)
    assert svc.get("tick").spec.enabled is False and svc.get("tick").next_run is None  # still paused
    resumed = svc.resume("tick")
    assert resumed.spec.enabled is True and resumed.next_run > ms(datetime.now(UTC) - timedelta(seconds=1))
    wait_for(lambda: tasks.keys("tick"), message="a run after resume")
    assert tasks.fire_times("tick")[0] >= resumed.next_run  # no catch-up for the paused time

    assert svc.delete("tick") is True
    assert svc.delete("tick") is False
    assert svc.get("tick") is None and [v.spec.id for v in svc.list()] == ["clock"]
    assert svc.pause("tick") is None and svc.resume("tick") is None
    svc.shutdown()
    svc = start(services, db, tasks)
    assert [v.spec.id for v in svc.list()] == ["clock"]


def test_put_replaces_without_leaving_the_old_job(services, db, tasks):
    svc = start(services, db, tasks)
    svc.put(spec(every="1h", task={"handler": "old"}))
    view = svc.put(spec(every=1, task={"handler": "new", "args": {"x": 2}}))
    assert view.spec.every == 1 and view.spec.task == {"handler": "new", "args": {"x": 2}}
    assert len(svc.list()) == 1
    wait_for(lambda: tasks.calls, message="a run")
    assert {t["handler"] for t, _ in tasks.calls} == {"new"}


def test_put_disabled_schedule_is_stored_paused(services, db, tasks):
    svc = start(services, db, tasks)
    view = svc.put(spec(every=1, enabled=False))
    assert view.next_run is None and view.spec.enabled is False


def test_not_running_is_an_error(db, tasks):
    svc = ScheduleService(db, tasks)
    with pytest.raises(RuntimeError, match="not running"):
        svc.put(spec(every=1))


BAD = [
    (spec(cron="61 * * * *"), "cron: minute field '61'"),
    (spec(cron="* * * *"), "cron: must have 5 fields"),
    (spec(cron="0 0 * foo *"), "cron: month field 'foo'"),
    (spec(cron="0 0 31 2 *"), "cron: '0 0 31 2 *' never fires"),
    (spec(cron="* * * * *", every=60), "cron, every: give exactly one of cron or every (got both)"),
    (spec(), "cron, every: give exactly one of cron or every"),
    (spec("-tick", every=1), "id: must be 1-64 characters"),
    (spec("a" * 65, every=1), "id: must be 1-64 characters"),
    (spec("tick/1", every=1), "id: must be 1-64 characters"),
    (spec(every=0.5), "every: must be at least 1 second"),
    (spec(every="soon"), "every: must be a duration like 30s"),
    (spec(every=True), "every: must be a duration"),
    (spec(every=60, misfire_grace=0), "misfire_grace: must be between 1 second and 1 day"),
    (spec(every=60, misfire_grace=1.5), "misfire_grace: must be a whole number of seconds"),
    (spec(every=60, timezone="Mars/Olympus"), "timezone: unknown time zone 'Mars/Olympus'"),
    (spec(every=60, enabled="yes"), "enabled: Input should be a valid boolean"),
    (spec(every=60, task={"args": {}}), "task: handler must be a non-empty string"),
    (spec(every=60, task={"handler": "h", "args": [1]}), "task: args must be a mapping"),
    (spec(every=60, when="later"), "when: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("bad", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_schedules_name_the_field(services, db, tasks, bad, message):
    with pytest.raises(ValueError) as err:
        ScheduleSpec.parse(bad)
    assert message in str(err.value)
    svc = start(services, db, tasks)
    with pytest.raises(ValueError, match="^" + message.split(":")[0]):
        svc.put(bad)
    assert svc.list() == []
