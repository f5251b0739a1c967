"""cwsnet.executor.LocalWorkers: the cloud's and gateways' in-process worker pool."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cwsnet.executor import LocalWorkers
from edge_agent.handlers import BUILTIN, TaskFailed


async def _boom(args: dict[str, Any]) -> dict[str, Any]:
    raise ZeroDivisionError("x")


async def _refuse(args: dict[str, Any]) -> dict[str, Any]:
    raise TaskFailed("no, thanks")


async def _huge(args: dict[str, Any]) -> dict[str, Any]:
    return {"blob": b"x" * 300_000}


def run_pool(script: Any, slots: int = 2) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = []

    async def main() -> None:
        pool = LocalWorkers(dict(BUILTIN) | {"boom": _boom, "refuse": _refuse, "huge": _huge}, slots, reports.append, node="n1")
        await script(pool, reports)

    asyncio.run(main())
    return reports


async def until(cond: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def states(reports: list[dict[str, Any]], tid: str) -> list[tuple[str, Any]]:
    return [(r["state"], r["attempt"]) for r in reports if r["task_id"] == tid]


def test_each_attempt_runs_once_and_a_checkpointed_count_resumes() -> None:
    async def script(pool: LocalWorkers, reports: list[dict[str, Any]]) -> None:
        assert pool.start("t1", "count", {"to": 25, "step": 0, "every": 10}, attempt=2, checkpoint={"n": 5})
        assert not pool.start("t1", "count", {"to": 25, "step": 0}, attempt=2)  # the same attempt again
        await until(lambda: any(r["state"] == "succeeded" for r in reports))
        assert not pool.start("t1", "count", {"to": 25}, attempt=2)  # also after it ended
        assert pool.running() == []

    reports = run_pool(script)
    assert states(reports, "t1") == [("running", 2), ("checkpoint", 2), ("checkpoint", 2), ("succeeded", 2)]
    assert [r["checkpoint"] for r in reports if r["state"] == "checkpoint"] == [{"n": 10}, {"n": 20}]
    assert reports[-1]["result"] == {"n": 25, "resumed_from": 5}


def test_cancel_a_newer_attempt_failures_deadlines_and_unknown_handlers() -> None:
    async def script(pool: LocalWorkers, reports: list[dict[str, Any]]) -> None:
        pool.start("s", "sleep", {"seconds": 30}, attempt=1)
        await until(lambda: states(reports, "s") == [("running", 1)])
        assert not pool.cancel("s", attempt=7)  # not the attempt it runs
        pool.start("s", "sleep", {"seconds": 30}, attempt=3)  # a newer attempt supersedes the old run
        await until(lambda: ("running", 3) in states(reports, "s"))
        assert pool.cancel("s", attempt=3)
        await until(lambda: ("cancelled", 3) in states(reports, "s"))
        assert not pool.cancel("early", attempt=4)  # a cancel that overtook its start...
        assert not pool.start("early", "echo", {}, attempt=4)  # ...means that attempt never runs here
        pool.start("b", "boom", {}, attempt=1)
        pool.start("r", "refuse", {}, attempt=1)
        pool.start("late", "echo", {}, attempt=1, deadline_ms=int(time.time() * 1000) - 1)
        pool.start("x", "nope", {}, attempt=1)
        pool.start("h", "huge", {}, attempt=1)
        await until(lambda: all(any(r["task_id"] == t and r["state"] in ("failed", "expired") for r in reports)
                                for t in ("b", "r", "late", "x", "h")))

    reports = run_pool(script)
    got = states(reports, "s")  # (the superseded run's "cancelled" may come after the new run's "running")
    assert [x for x in got if x[1] == 1] == [("running", 1), ("cancelled", 1)]
    assert [x for x in got if x[1] == 3] == [("running", 3), ("cancelled", 3)]
    final = {r["task_id"]: r for r in reports if r["state"] in ("failed", "expired")}
    assert final["b"]["error"].startswith("ZeroDivisionError: x\nTraceback")  # a bug: the traceback
    assert final["r"]["error"] == "no, thanks"  # the handler's own message, as is
    assert final["late"]["state"] == "expired"
    assert final["x"]["error"].startswith("no handler 'nope' on n1")
    assert final["h"]["error"].startswith("the handler's result is 300") and "fit in one message" in final["h"]["error"]
