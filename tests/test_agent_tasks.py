"""The CPython agent as an executor of the cloud's scheduler (issue 7): attempts, leases and
heartbeats, checkpoints, cancels, and what a restart reports.

A real :class:`edge_agent.agent.Agent` (real sealing, real SQLite state and outbox) runs in the
test's event loop with its MQTT link replaced by :class:`FakeLink`, which records every payload the
agent publishes and acknowledges it end to end as the cloud would. Commands are sealed by a real
cloud endpoint and handed to the agent as the link would; what the agent sent is opened with the
cloud's key and read in ``seq`` order, the order it was sealed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from harness.wait import await_for, run_async

from cwsnet import envelope, topics
from cwsnet.bundle import Bundle
from cwsnet.config import AgentConfig
from cwsnet.endpoint import Endpoint
from cwsnet.identity import Identity
from cwsnet.mqtt import Message
from cwsnet.nodestate import NodeState, SeenTask
from cwsnet.replay import SeqCounter
from edge_agent import handlers
from edge_agent.agent import Agent

SITE, NODE = "home", "dev-1"
FINAL = ("succeeded", "failed", "cancelled", "expired")


class FakeLink:
    """Stands in for the agent's MqttLink: up at once, records what is published, and acks each
    outbox message end to end right after it is published (the cloud's ``{"acks": ...}``)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.connected = asyncio.Event()
        self.published: list[tuple[str, bytes]] = []
        self.password: str | None = None

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass

    def set_credentials(self, username: str | None, password: str | None) -> None:
        self.password = password

    async def run(self) -> None:
        self.connected.set()
        await self.agent._on_connect()
        await asyncio.Event().wait()

    async def publish(  # same signature as MqttLink.publish
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10  # noqa: ASYNC109
    ) -> None:
        self.published.append((topic, payload))
        seq = envelope.peek_header(payload).seq
        asyncio.get_running_loop().call_soon(self.agent._acked, "cloud", {"acks": [[NODE, seq, seq]]})


class Cloud:
    """The cloud's end: seals commands to the agent, opens what the agent sent."""

    def __init__(self, tmp: Path) -> None:
        self.identity = Identity.generate("cloud", "cloud", "cloud")
        self.device = Identity.generate(NODE, SITE, "device")
        self.bundle_path = tmp / "dev-1.json"
        Bundle(self.device, self.identity.public_key, NODE, None).save(self.bundle_path)
        self.endpoint = Endpoint(self.identity, SeqCounter(1, lambda _m: None), {NODE: self.device.public_key}.get)

    async def command(self, agent: Agent, body: dict[str, Any]) -> None:
        topic = topics.task_cmd(SITE, NODE)
        payload, _ = self.endpoint.seal(topic, "task_cmd", body, to=NODE)
        await agent._on_message(Message(topic, payload, 1, False, 0))

    def sent(self, link: FakeLink) -> list[tuple[int, str, Any]]:
        """(seq, kind, body) of every message the agent published, once each, in seq order."""
        out: dict[int, tuple[int, str, Any]] = {}
        for topic, payload in link.published:
            opened = self.endpoint.open(payload, topic)
            out[opened.header.seq] = (opened.header.seq, opened.header.kind, opened.body)
        return [out[s] for s in sorted(out)]

    def results(self, link: FakeLink, task_id: str | None = None) -> list[dict[str, Any]]:
        return [b for _s, k, b in self.sent(link) if k == "task_result" and task_id in (None, b["task_id"])]

    def states(self, link: FakeLink, task_id: str) -> list[tuple[int | None, str]]:
        """(attempt, state) of each result of ``task_id``, in the order sent (a part of a result: "part")."""
        return [(b.get("attempt"), b.get("state", "part")) for b in self.results(link, task_id)]

    def final(self, link: FakeLink, task_id: str, attempt: int | None = None) -> dict[str, Any] | None:
        done = [b for b in self.results(link, task_id) if b.get("state") in FINAL and b.get("attempt") == attempt]
        return done[-1] if done else None

    def statuses(self, link: FakeLink) -> list[tuple[int, dict[str, Any]]]:
        return [(s, b) for s, k, b in self.sent(link) if k == "status"]


@pytest.fixture
def cloud(tmp_path: Path) -> Cloud:
    return Cloud(tmp_path)


def config(cloud: Cloud, tmp: Path, **over: Any) -> AgentConfig:
    fields: dict[str, Any] = {"identity_file": cloud.bundle_path, "data_dir": tmp / "agent", "sensors": [],
                              "status_interval": 3600.0, "handlers": ["echo", "sleep", "count", "burn"]}
    return AgentConfig(**(fields | over))


@contextlib.asynccontextmanager
async def running(cfg: AgentConfig, link_type: type[FakeLink] | None = None) -> AsyncIterator[tuple[Agent, FakeLink]]:
    agent = Agent(cfg)
    link = (link_type or FakeLink)(agent)
    agent.link = link  # type: ignore[assignment]
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await await_for(lambda: agent._tg is not None and link.connected.is_set(), message="the agent to start")
    try:
        yield agent, link
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def final_of(cloud: Cloud, link: FakeLink, task_id: str, attempt: int | None = None) -> dict[str, Any]:
    return await await_for(lambda: cloud.final(link, task_id, attempt),
                           message=f"the final result of {task_id} attempt {attempt}")


async def running_of(cloud: Cloud, link: FakeLink, task_id: str, attempt: int | None = None) -> None:
    await await_for(lambda: (attempt, "running") in cloud.states(link, task_id),
                    message=f"{task_id} attempt {attempt} to run")


def run(coro: Any) -> Any:
    return run_async(coro, timeout=30)


# ---- attempts ---------------------------------------------------------------------------------


def test_each_attempt_runs_at_most_once_and_a_higher_one_runs_again(cloud: Cloud, tmp_path: Path) -> None:
    cfg = config(cloud, tmp_path)

    async def body() -> None:
        async with running(cfg) as (agent, link):
            cmd = {"task_id": "t1", "handler": "echo", "lease": 30.0}
            await cloud.command(agent, cmd | {"attempt": 1, "args": {"i": 1}})
            assert (await final_of(cloud, link, "t1", 1))["result"] == {"i": 1}
            await cloud.command(agent, cmd | {"attempt": 1, "args": {"i": "again"}})  # a repeat: ignored
            assert "t1" not in agent.held_tasks()
            await cloud.command(agent, cmd | {"attempt": 2, "args": {"i": 2}})  # came back after a migration
            assert (await final_of(cloud, link, "t1", 2))["result"] == {"i": 2}
            await cloud.command(agent, cmd | {"attempt": 1, "args": {"i": "late"}})  # older than what ran
            for _ in range(2):  # legacy: no attempt, the task id once
                await cloud.command(agent, {"task_id": "L", "handler": "echo", "args": {"legacy": True}})
            await cloud.command(agent, {"task_id": "end", "handler": "echo", "args": {}})
            await final_of(cloud, link, "end")
            assert cloud.states(link, "t1") == [(1, "running"), (1, "succeeded"), (2, "running"), (2, "succeeded")]
            legacy = cloud.results(link, "L")
            assert [r["state"] for r in legacy] == ["running", "succeeded"]
            assert all("attempt" not in r for r in legacy)  # nothing to echo
            await await_for(lambda: agent.state.task_record("t1") == SeenTask(2, True), message="t1 finished")
        # the attempts taken are durable: a restarted agent still refuses the repeats
        async with running(cfg) as (agent, link):
            await cloud.command(agent, cmd | {"attempt": 2, "args": {"i": "repeat"}})
            await cloud.command(agent, {"task_id": "L", "handler": "echo", "args": {}})
            await cloud.command(agent, cmd | {"attempt": 3, "args": {"i": 3}})
            assert (await final_of(cloud, link, "t1", 3))["result"] == {"i": 3}
            assert [a for a, st in cloud.states(link, "t1") if st == "running"] == [3]
            assert cloud.results(link, "L") == []

    run(body())


def test_a_newer_attempt_supersedes_the_one_still_running_here(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(cloud, tmp_path)) as (agent, link):
            await cloud.command(agent, {"task_id": "x", "handler": "sleep", "args": {"seconds": 30}, "attempt": 1,
                                        "lease": 30})
            await running_of(cloud, link, "x", 1)
            await cloud.command(agent, {"task_id": "x", "handler": "echo", "args": {"v": 2}, "attempt": 2,
                                        "lease": 30})
            old, new = await final_of(cloud, link, "x", 1), await final_of(cloud, link, "x", 2)
            assert (old["state"], old["error"]) == ("cancelled", "superseded by attempt 2")
            assert (new["state"], new["result"]) == ("succeeded", {"v": 2})
            await await_for(lambda: agent.state.task_record("x") == SeenTask(2, True), message="x finished")
            assert agent.held_tasks() == [] and agent.running_tasks == 0

    run(body())


def test_a_malformed_attempt_is_ignored(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(cloud, tmp_path)) as (agent, link):
            for bad in ("1", -1, True, 1.5):
                await cloud.command(agent, {"task_id": "m", "handler": "echo", "args": {}, "attempt": bad})
            await cloud.command(agent, {"task_id": "end", "handler": "echo", "args": {}})
            await final_of(cloud, link, "end")
            assert cloud.results(link, "m") == [] and agent.state.task_record("m") is None

    run(body())


# ---- cancel -----------------------------------------------------------------------------------


def test_cancel_stops_a_running_task_only_for_its_attempt(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(cloud, tmp_path)) as (agent, link):
            cmd = {"task_id": "s", "handler": "sleep", "args": {"seconds": 30}, "attempt": 1, "lease": 30}
            await cloud.command(agent, cmd)
            await running_of(cloud, link, "s", 1)
            await cloud.command(agent, {"task_id": "s", "cancel": True, "attempt": 2})  # not the attempt held
            assert agent.held_tasks() == ["s"] and agent.running_tasks == 1
            await cloud.command(agent, {"task_id": "s", "cancel": True, "attempt": 1})
            done = await final_of(cloud, link, "s", 1)
            assert done["state"] == "cancelled" and done["error"] == "cancelled by the cloud"
            assert isinstance(done["started"], int) and isinstance(done["finished"], int)
            assert cloud.states(link, "s") == [(1, "running"), (1, "cancelled")]
            assert agent.held_tasks() == [] and agent.running_tasks == 0
            await await_for(lambda: agent.state.task_record("s") == SeenTask(1, True), message="s finished")
            await cloud.command(agent, cmd)  # the cancelled attempt is not run again
            await cloud.command(agent, {"task_id": "s", "cancel": True})  # nothing held any more: ignored
            await cloud.command(agent, {"task_id": "end", "handler": "echo", "args": {}})
            await final_of(cloud, link, "end")
            assert cloud.states(link, "s") == [(1, "running"), (1, "cancelled")]

    run(body())


def test_cancel_of_a_task_waiting_for_a_slot(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(cloud, tmp_path, task_slots=1)) as (agent, link):
            await cloud.command(agent, {"task_id": "busy", "handler": "sleep", "args": {"seconds": 30},
                                        "attempt": 1, "lease": 30})
            await running_of(cloud, link, "busy", 1)
            await cloud.command(agent, {"task_id": "queued", "handler": "echo", "args": {}, "attempt": 1,
                                        "lease": 30})
            assert agent.held_tasks() == ["busy", "queued"]  # accepted, waiting for the one slot
            await await_for(lambda: agent._held["queued"].entered, message="queued to wait for the slot")
            await cloud.command(agent, {"task_id": "queued", "cancel": True})  # any attempt
            # cancelled in the same step as its command arrived (its run has not begun)
            await cloud.command(agent, {"task_id": "fresh", "handler": "echo", "args": {}, "attempt": 1, "lease": 9})
            await cloud.command(agent, {"task_id": "fresh", "cancel": True, "attempt": 1})
            for tid in ("queued", "fresh"):
                done = await final_of(cloud, link, tid, 1)
                assert (done["state"], done["started"]) == ("cancelled", None)
                assert cloud.states(link, tid) == [(1, "cancelled")]  # it never ran
            await cloud.command(agent, {"task_id": "busy", "cancel": True, "attempt": 1})
            assert (await final_of(cloud, link, "busy", 1))["state"] == "cancelled"

    run(body())


def test_cancel_of_an_unknown_task_is_ignored_and_never_starts_it(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(cloud, tmp_path)) as (agent, link):
            await cloud.command(agent, {"task_id": "ghost", "cancel": True, "attempt": 3, "handler": "echo",
                                        "args": {}, "lease": 30})
            await cloud.command(agent, {"task_id": "ghost2", "cancel": True, "handler": "echo", "args": {}})
            assert agent.held_tasks() == [] and agent.running_tasks == 0
            # the cancelled attempt's command arriving late does not run it; a later attempt does
            await cloud.command(agent, {"task_id": "ghost", "handler": "echo", "args": {"a": 3}, "attempt": 3})
            await cloud.command(agent, {"task_id": "ghost", "handler": "echo", "args": {"a": 4}, "attempt": 4})
            await cloud.command(agent, {"task_id": "ghost2", "handler": "echo", "args": {}})
            assert (await final_of(cloud, link, "ghost", 4))["result"] == {"a": 4}
            await final_of(cloud, link, "ghost2")
            assert cloud.states(link, "ghost") == [(4, "running"), (4, "succeeded")]
            assert not [r for r in cloud.results(link) if r["state"] == "cancelled"]

    run(body())


# ---- heartbeats -------------------------------------------------------------------------------


def test_heartbeat_statuses_list_held_tasks_every_third_of_the_lease(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        # status_interval is an hour: every status in this test is a heartbeat of the leased task
        async with running(config(cloud, tmp_path)) as (agent, link):
            birth = [b for _s, k, b in cloud.sent(link) if k == "birth"]
            assert birth and birth[0]["tasks"] == []
            assert cloud.statuses(link) == []
            await cloud.command(agent, {"task_id": "h", "handler": "sleep", "args": {"seconds": 30}, "attempt": 1,
                                        "lease": 0.3})
            assert agent.status_every() == pytest.approx(0.1)
            await await_for(lambda: len(cloud.statuses(link)) >= 5, message="5 heartbeats")
            await cloud.command(agent, {"task_id": "h", "cancel": True})
            await final_of(cloud, link, "h", 1)
            await cloud.command(agent, {"task_id": "end", "handler": "echo", "args": {}})  # no lease: no heartbeat
            await final_of(cloud, link, "end")
            assert agent.status_every() == 3600.0
            cut = next(s for s, k, b in cloud.sent(link) if k == "task_result" and b["state"] == "cancelled")
            before = [b["tasks"] for s, b in cloud.statuses(link) if s < cut]
            after = [b["tasks"] for s, b in cloud.statuses(link) if s > cut]
            assert len(before) >= 5 and all(t == ["h"] for t in before)
            assert after == []  # back to the hourly pace: no status once nothing is held

    run(body())


def test_a_leased_task_makes_the_next_status_prompt_and_lists_only_leased_tasks(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(cloud, tmp_path)) as (agent, link):
            await cloud.command(agent, {"task_id": "plain", "handler": "sleep", "args": {"seconds": 30}})
            await running_of(cloud, link, "plain")
            assert agent.held_tasks() == [] and agent.status_every() == 3600.0  # not scheduled: no heartbeat
            await cloud.command(agent, {"task_id": "a", "handler": "sleep", "args": {"seconds": 30}, "attempt": 1,
                                        "lease": 6.0})
            await cloud.command(agent, {"task_id": "b", "handler": "sleep", "args": {"seconds": 30}, "attempt": 1,
                                        "lease": 1.5})
            assert agent.status_every() == pytest.approx(0.5)  # the shortest lease counts
            # the next status comes within a third of the lease, not after the hour of status_interval
            await await_for(lambda: [b for _s, b in cloud.statuses(link) if b["tasks"] == ["a", "b"]],
                            message="a heartbeat listing both")
            await cloud.command(agent, {"task_id": "b", "cancel": True})
            await final_of(cloud, link, "b", 1)
            assert agent.held_tasks() == ["a"] and agent.status_every() == pytest.approx(2.0)

    run(body())


def test_status_carries_slots_capabilities_and_tasks(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        cfg = config(cloud, tmp_path, task_slots=2, capabilities=["gpu", "camera"], status_interval=30.0)
        async with running(cfg) as (agent, link):
            birth = next(b for _s, k, b in cloud.sent(link) if k == "birth")
            # "parts" is built in: it takes args too big for one message
            assert (birth["slots"], birth["capabilities"], birth["tasks"]) == (2, ["gpu", "camera", "parts"], [])
            assert birth["interval"] == 30.0 and {"count", "burn"} <= set(birth["handlers"])
            await cloud.command(agent, {"task_id": "t", "handler": "sleep", "args": {"seconds": 30}, "attempt": 7,
                                        "lease": 1.5})
            status = await await_for(lambda: cloud.statuses(link), message="a heartbeat")
            assert status[0][1]["tasks"] == ["t"] and status[0][1]["slots"] == 2

    run(body())


def test_no_slots_refuses_scheduled_tasks_but_runs_direct_ones(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(cloud, tmp_path, task_slots=0)) as (agent, link):
            await cloud.command(agent, {"task_id": "sched", "handler": "echo", "args": {}, "attempt": 1, "lease": 9})
            await cloud.command(agent, {"task_id": "direct", "handler": "echo", "args": {"ok": 1}})
            refused = await final_of(cloud, link, "sched", 1)
            assert refused["state"] == "failed" and "task_slots: 0" in refused["error"]
            assert (await final_of(cloud, link, "direct"))["result"] == {"ok": 1}
            assert next(b for _s, k, b in cloud.sent(link) if k == "birth")["slots"] == 0

    run(body())


# ---- checkpoints and handlers -----------------------------------------------------------------


def test_count_saves_checkpoints_and_resumes_from_one(cloud: Cloud, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(cloud, tmp_path)) as (agent, link):
            args = {"to": 25, "step": 0, "every": 10}
            await cloud.command(agent, {"task_id": "c", "handler": "count", "args": args, "attempt": 1, "lease": 30})
            assert (await final_of(cloud, link, "c", 1))["result"] == {"n": 25, "resumed_from": 0}
            # the task moved here after another executor checkpointed it at 17
            await cloud.command(agent, {"task_id": "c", "handler": "count", "args": args, "attempt": 2, "lease": 30,
                                        "checkpoint": {"n": 17}})
            assert (await final_of(cloud, link, "c", 2))["result"] == {"n": 25, "resumed_from": 17}
            steps = [(r["attempt"], r["state"], (r.get("checkpoint") or {}).get("n")) for r in cloud.results(link, "c")]
            assert steps == [(1, "running", None), (1, "checkpoint", 10), (1, "checkpoint", 20), (1, "succeeded", None),
                             (2, "running", None), (2, "checkpoint", 20), (2, "succeeded", None)]

    run(body())


def test_a_two_argument_handler_gets_the_context(cloud: Cloud, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async def probe(args: dict[str, Any], ctx: handlers.TaskContext) -> dict[str, Any]:
        await ctx.save({"half": True})
        return {"task_id": ctx.task_id, "attempt": ctx.attempt, "checkpoint": ctx.checkpoint,
                "kind": type(ctx).__name__}

    async def bad_save(args: dict[str, Any], ctx: handlers.TaskContext) -> dict[str, Any]:
        await ctx.save(["not", "a", "map"])  # type: ignore[arg-type]
        return {}

    async def unsendable(args: dict[str, Any]) -> dict[str, Any]:
        return {"x": object()}

    for name, fn in (("probe", probe), ("bad_save", bad_save), ("unsendable", unsendable)):
        monkeypatch.setitem(handlers.BUILTIN, name, fn)

    async def body() -> None:
        cfg = config(cloud, tmp_path, handlers=["echo", "probe", "bad_save", "unsendable"])
        async with running(cfg) as (agent, link):
            await cloud.command(agent, {"task_id": "p", "handler": "probe", "args": {}, "attempt": 4, "lease": 30,
                                        "checkpoint": {"n": 1}})
            await cloud.command(agent, {"task_id": "q", "handler": "probe", "args": {}})
            await cloud.command(agent, {"task_id": "r", "handler": "bad_save", "args": {}, "attempt": 1})
            await cloud.command(agent, {"task_id": "u", "handler": "unsendable", "args": {}, "attempt": 1})
            p = await final_of(cloud, link, "p", 4)
            assert p["result"] == {"task_id": "p", "attempt": 4, "checkpoint": {"n": 1}, "kind": "TaskContext"}
            assert [r["checkpoint"] for r in cloud.results(link, "p") if r["state"] == "checkpoint"] == [{"half": True}]
            assert (await final_of(cloud, link, "q"))["result"]["attempt"] is None
            r = await final_of(cloud, link, "r", 1)
            assert r["state"] == "failed" and "checkpoint must be a map" in r["error"]
            u = await final_of(cloud, link, "u", 1)
            assert u["state"] == "failed" and "cannot be sent" in u["error"]
            await cloud.command(agent, {"task_id": "after", "handler": "echo", "args": {"still": "fine"}})
            assert (await final_of(cloud, link, "after"))["result"] == {"still": "fine"}

    run(body())


# ---- restarts ---------------------------------------------------------------------------------


def test_an_interrupted_attempt_is_reported_failed_with_its_attempt_after_a_restart(cloud: Cloud,
                                                                                    tmp_path: Path) -> None:
    cfg = config(cloud, tmp_path)
    leased = {"task_id": "r", "handler": "sleep", "args": {"seconds": 30}, "attempt": 2, "lease": 30}

    async def body() -> None:
        async with running(cfg) as (agent, link):
            await cloud.command(agent, leased)
            await cloud.command(agent, {"task_id": "old", "handler": "sleep", "args": {"seconds": 30}})
            await running_of(cloud, link, "r", 2)
            await running_of(cloud, link, "old")
        # stopped while both ran: the next start reports them, and does not run them again
        async with running(cfg) as (agent, link):
            r, old = await final_of(cloud, link, "r", 2), await final_of(cloud, link, "old")
            assert r["state"] == old["state"] == "failed"
            assert r["error"].startswith("interrupted") and old["error"].startswith("interrupted")
            assert "attempt" not in old
            await await_for(lambda: agent.state.unfinished_attempts() == [], message="the reports delivered")
            await cloud.command(agent, leased)  # the cloud re-sending the same attempt: not run
            await cloud.command(agent, leased | {"attempt": 3, "handler": "echo", "args": {"again": True}})
            assert (await final_of(cloud, link, "r", 3))["result"] == {"again": True}
            assert cloud.states(link, "r") == [(2, "failed"), (3, "running"), (3, "succeeded")]

    run(body())


# ---- units: handlers and node state -----------------------------------------------------------


def test_count_and_burn_handlers_directly() -> None:
    saved: list[dict[str, Any]] = []

    async def saver(data: dict[str, Any]) -> None:
        saved.append(data)

    async def body() -> None:
        ctx = handlers.TaskContext("t", 1, {"n": 4}, saver)
        assert await handlers.count({"to": 9, "step": 0, "every": 3}, ctx) == {"n": 9, "resumed_from": 4}
        assert saved == [{"n": 6}] and ctx.saved == 1
        done = handlers.TaskContext("t", 1, {"n": 50})
        assert await handlers.count({"to": 9, "step": 0}, done) == {"n": 9, "resumed_from": 9}
        for bad in ({}, {"to": 0}, {"to": 2_000_000}, {"to": True}, {"to": 5, "step": 61}, {"to": 5, "every": 0}):
            with pytest.raises(handlers.TaskFailed, match="count"):
                await handlers.count(bad, handlers.TaskContext("t"))
        with pytest.raises(handlers.TaskFailed, match="checkpoint's n"):
            await handlers.count({"to": 5}, handlers.TaskContext("t", 1, {"n": "x"}))
        assert await handlers.burn({"seconds": 0.02}) == {"burned": 0.02}
        for bad in ({}, {"seconds": 61}, {"seconds": "1"}, {"seconds": False}):
            with pytest.raises(handlers.TaskFailed, match="burn needs"):
                await handlers.burn(bad)
        # a cancelled burn stops its thread rather than burning on
        burning = asyncio.create_task(handlers.burn({"seconds": 60}))
        await asyncio.sleep(0)
        burning.cancel()
        with pytest.raises(asyncio.CancelledError):
            await burning

    run(body())
    assert handlers.takes_context(handlers.count) and not handlers.takes_context(handlers.echo)


def test_node_state_attempts(tmp_path: Path) -> None:
    st = NodeState(tmp_path / "s.db")
    st.mark_task("a", attempt=1, trace="tc")
    assert st.task_record("a") == SeenTask(1, False) and st.task_seen("a")
    st.mark_task("a", attempt=1)
    st.finish_attempt("a", 0)  # another attempt's finish changes nothing
    assert st.unfinished_attempts() == [("a", "tc", 1)] and st.unfinished_tasks() == [("a", "tc")]
    st.mark_task("a", attempt=3)  # came back: unfinished again, under attempt 3
    st.finish_attempt("a", 1)  # the old run ending does not finish the new one
    assert st.task_record("a") == SeenTask(3, False)
    st.finish_attempt("a", 3)
    assert st.task_record("a") == SeenTask(3, True) and st.unfinished_attempts() == []
    assert not st.refuse_attempt("a", 2)  # older than what ran
    assert st.refuse_attempt("a", 5) and st.task_record("a") == SeenTask(5, True)
    st.mark_task("b", attempt=1)
    assert not st.refuse_attempt("b", 2)  # runs here: never overwritten
    st.mark_task("legacy")
    st.finish_task("legacy")
    assert st.task_record("legacy") == SeenTask(None, True) and st.task_record("nope") is None
    st.close()
    # a state file from before attempts gains the column and keeps its rows
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as db:
        db.execute("create table seen_tasks (task_id text primary key, ts float, done integer, trace text)")
        db.execute("insert into seen_tasks values ('x', 1.0, 0, null)")
    db.close()
    again = NodeState(old)
    assert again.unfinished_attempts() == [("x", None, None)]
    again.mark_task("x", attempt=1)
    assert again.task_record("x") == SeenTask(1, False)
    again.close()


# ---- parts: args and results too big for one message (protocol §3) ---------------------------------


def test_args_and_a_result_too_big_for_one_message_travel_in_parts(cloud: Cloud, tmp_path: Path) -> None:
    import random

    from cwsnet import parts

    cfg = config(cloud, tmp_path)
    args = {"blob": random.Random(5).randbytes(600_000)}
    cmd = {"task_id": "big", "handler": "echo", "args": args, "attempt": 1, "lease": 30.0, "parts": True}
    msgs = parts.command_messages(cmd)
    assert len(msgs) == 6 and msgs[-1]["args"] is None

    async def body() -> None:
        async with running(cfg) as (agent, link):
            await cloud.command(agent, msgs[0])
            await cloud.command(agent, msgs[-1])  # it overtook most of its parts: it waits for them, durably
            # not run yet, but listed as held while its parts come, so the scheduler's lease holds
            assert agent.held_tasks() == ["big"] and cloud.results(link, "big") == []
        async with running(cfg) as (agent, link):  # a restart between the parts
            for m in msgs[1:-1]:
                await cloud.command(agent, m)
            final = await final_of(cloud, link, "big", 1)
            assert final["result"] is None and final["state"] == "succeeded"
            ref = parts.Ref.parse(final["result_ref"])
            sent = cloud.results(link, "big")
            assert [b.get("state", "part") for b in sent] == ["running"] + ["part"] * 5 + ["succeeded"]
            assert parts.join(ref, [b["part"]["data"] for b in sent if "part" in b]) == args  # in order, before it
            # an assigner that did not say it takes parts gets a failure that says why
            plain = parts.command_messages({k: v for k, v in cmd.items() if k != "parts"} | {"task_id": "np"})
            for m in plain:
                await cloud.command(agent, m)
            failed = await final_of(cloud, link, "np", 1)
            assert failed["state"] == "failed" and "takes no parts" in failed["error"], failed
            # parts that do not make the args fail the task, saying so
            bad = parts.command_messages(cmd | {"task_id": "bad"})
            bad[1] = bad[1] | {"part": bad[1]["part"] | {"data": b"x" * len(bad[1]["part"]["data"])}}
            for m in bad:
                await cloud.command(agent, m)
            failed = await final_of(cloud, link, "bad", 1)
            assert failed["state"] == "failed" and "did not arrive whole" in failed["error"], failed
            assert agent.parts.conn.execute("select count(*) from parts").fetchone()[0] == 0

    run(body())


def test_a_result_whose_part_the_full_outbox_dropped_is_reported_failed(cloud: Cloud, tmp_path: Path) -> None:
    """The outbox's overflow policy drops the oldest results first: a parted result that lost a part can
    never be made whole, so the agent reports its task failed instead of leaving the cloud waiting."""
    import random

    from cwsnet import parts

    class NoAcks(FakeLink):  # the cloud never acks: everything stays in the outbox
        async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                          timeout: float = 10) -> None:  # noqa: ASYNC109
            self.published.append((topic, payload))

    cfg = config(cloud, tmp_path, outbox={"max_messages": 10_000, "max_bytes": 1_000_000})

    async def body() -> None:
        async with running(cfg, NoAcks) as (agent, link):
            for i in range(3):  # three results of 390 KB: each within half the outbox, together over it
                cmd = {"task_id": f"r{i}", "handler": "echo", "args": {"b": random.Random(i).randbytes(390_000)},
                       "parts": True}
                for m in parts.command_messages(cmd):
                    await cloud.command(agent, m)
                await await_for(lambda i=i: cloud.final(link, f"r{i}"), message=f"r{i}'s final")
            failed = await await_for(lambda: [b for b in cloud.results(link, "r0") if b.get("state") == "failed"],
                                     message="r0 reported failed")
            assert "dropped by the agent's outbox" in failed[0]["error"], failed
            assert not [b for b in cloud.results(link, "r2") if b.get("state") == "failed"]

    run(body())
