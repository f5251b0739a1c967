"""The CPython agent's side of site tasks (docs/protocol.md §3, "Site tasks"): it submits work to its
gateway, records the gateway's outcome, offers itself to the gateway's scheduler and runs the tasks
the gateway gives it, sealing their results to the gateway.

A real :class:`edge_agent.agent.Agent` (real sealing, real SQLite state, outbox and submissions.db)
runs in the test's event loop with its MQTT link replaced by :class:`FakeLink`, which records every
publish and acknowledges outbox messages as their recipient would (the cloud end to end, the gateway
with a custody ack). A real gateway endpoint and a real cloud endpoint seal what they send the agent
and open what the agent sent them: a message sealed to the wrong node does not open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.wait import await_for, run_async

from cwsnet import envelope, topics
from cwsnet.bundle import Bundle
from cwsnet.cli import main as cli_main
from cwsnet.config import AgentConfig, load_config
from cwsnet.endpoint import Endpoint
from cwsnet.errors import ConfigError, NotForMe
from cwsnet.identity import Identity
from cwsnet.mqtt import Message
from cwsnet.nodestate import NodeState, UnfinishedRun
from cwsnet.replay import SeqCounter
from edge_agent.agent import Agent
from edge_agent.submissions import Submissions, task_id_for, validate

SITE, NODE, GW = "home", "dev-1", "gw-1"
FINAL = ("succeeded", "failed", "cancelled", "expired")


@dataclass
class Sent:
    topic: str
    kind: str
    to: str
    seq: int
    body: Any
    retain: bool


class FakeLink:
    """Stands in for the agent's MqttLink: up at once, records what is published, and acknowledges
    each message as its recipient would: the cloud end to end, the gateway with a custody ack (unless
    ``custody`` is False: the gateway is away)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.connected = asyncio.Event()
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.password: str | None = None
        self.custody = True

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
        self.published.append((topic, payload, qos, retain))
        header = envelope.peek_header(payload)
        loop = asyncio.get_running_loop()
        if header.recipient == "cloud":
            loop.call_soon(self.agent._acked, "cloud", {"acks": [[NODE, header.seq, header.seq]]})
        elif self.custody:
            loop.call_soon(self.agent._acked, GW, {"custody": [[header.seq, header.seq]]})


class Site:
    """The gateway's and the cloud's ends: seal to the agent, open what the agent sent."""

    def __init__(self, tmp: Path) -> None:
        self.cloud = Identity.generate("cloud", "cloud", "cloud")
        self.gw = Identity.generate(GW, SITE, "gateway")
        self.device = Identity.generate(NODE, SITE, "device")
        self.bundle_path = tmp / "dev-1.json"
        Bundle(self.device, self.cloud.public_key, NODE, None, GW, self.gw.public_key).save(self.bundle_path)
        keys = {NODE: self.device.public_key}.get
        self.cloud_ep = Endpoint(self.cloud, SeqCounter(1, lambda _m: None), keys)
        self.gw_ep = Endpoint(self.gw, SeqCounter(1000, lambda _m: None), keys)

    def seal(self, sender: str, kind: str, body: Any) -> bytes:
        ep = self.gw_ep if sender == GW else self.cloud_ep
        payload, _ = ep.seal(topics.task_cmd(SITE, NODE), kind, body, to=NODE)
        return payload

    async def deliver(self, agent: Agent, payload: bytes) -> None:
        await agent._on_message(Message(topics.task_cmd(SITE, NODE), payload, 1, False, 0))

    async def send(self, agent: Agent, sender: str, kind: str, body: Any) -> bytes:
        payload = self.seal(sender, kind, body)
        await self.deliver(agent, payload)
        return payload

    def sent(self, link: FakeLink, *, copies: bool = False) -> list[Sent]:
        """What the agent published, opened by its recipient (once each unless ``copies``), in seq order."""
        out: list[Sent] = []
        seen: set[tuple[str, int]] = set()
        for topic, payload, _qos, retain in link.published:
            header = envelope.peek_header(payload)
            ep = self.gw_ep if header.recipient == GW else self.cloud_ep
            opened = ep.open(payload, topic)
            if not copies and (header.recipient, header.seq) in seen:
                continue
            seen.add((header.recipient, header.seq))
            out.append(Sent(topic, header.kind, header.recipient, header.seq, opened.body, retain))
        return sorted(out, key=lambda s: s.seq) if not copies else out

    def results(self, link: FakeLink, task_id: str) -> list[Sent]:
        return [s for s in self.sent(link) if s.kind == "task_result" and s.body["task_id"] == task_id]

    def final(self, link: FakeLink, task_id: str) -> Sent | None:
        done = [s for s in self.results(link, task_id) if s.body["state"] in FINAL]
        return done[-1] if done else None

    def submits(self, link: FakeLink, key: str | None = None, *, copies: bool = False) -> list[Sent]:
        return [s for s in self.sent(link, copies=copies)
                if s.kind == "task_submit" and key in (None, s.body["key"])]

    def receipts(self, link: FakeLink) -> list[Any]:
        return [s.body for s in self.sent(link) if s.topic == topics.receipt(SITE, NODE)]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def config(site: Site, tmp: Path, **over: Any) -> AgentConfig:
    fields: dict[str, Any] = {"identity_file": site.bundle_path, "data_dir": tmp / "agent", "sensors": [],
                              "status_interval": 3600.0, "handlers": ["echo", "sleep", "count"]}
    return AgentConfig(**(fields | over))


@contextlib.asynccontextmanager
async def running(cfg: AgentConfig, **kw: Any) -> AsyncIterator[tuple[Agent, FakeLink]]:
    agent = Agent(cfg, **kw)
    link = FakeLink(agent)
    agent.link = link  # type: ignore[assignment]
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await await_for(lambda: agent._tg is not None and link.connected.is_set(), message="the agent to start")
    try:
        yield agent, link
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def run(coro: Any) -> Any:
    return run_async(coro, timeout=30)


def done_body(key: str, state: str = "succeeded", **over: Any) -> dict[str, Any]:
    return {"key": key, "task_id": task_id_for(NODE, key), "state": state, "result": None, "error": None,
            "node": GW} | over


# ---- submitting -------------------------------------------------------------------------------


def test_submit_seals_a_task_submit_to_the_gateway_resent_until_custody(site: Site, tmp_path: Path) -> None:
    cfg = config(site, tmp_path, outbox={"retransmit_after": 0.05, "max_backoff": 0.1})

    async def body() -> None:
        async with running(cfg) as (agent, link):
            link.custody = False  # the gateway is away: the submission stays in the outbox and is sent again
            key = agent.submit_task("echo", {"x": 1}, key="job-1", priority=7, max_attempts=2, deadline=2**40,
                                    data_class="health", requirements={"capabilities": ["gpu"]})
            assert key == "job-1"
            copies = await await_for(lambda: len(site.submits(link, copies=True)) >= 3 and site.submits(link, copies=True),
                                     message="the submission re-sent while not custody-acked")
            assert len({c.seq for c in copies}) == 1  # the same message each time
            sub = copies[0]
            assert (sub.topic, sub.to, sub.retain) == (topics.task_submit(SITE, NODE), GW, False)
            load = sub.body.pop("load")
            assert sub.body == {"key": "job-1", "handler": "echo", "args": {"x": 1}, "priority": 7, "max_attempts": 2,
                                "deadline": 2**40, "data_class": "health", "requirements": {"capabilities": ["gpu"]}}
            assert 0 <= load["cpu"] <= 1 and load["queue"] == 0 and load["mem_free"] > 0
            payload = next(p for t, p, _q, _r in link.published if t == sub.topic)
            with pytest.raises(NotForMe):  # sealed to the gateway: the cloud cannot read it
                site.cloud_ep.open(payload, sub.topic)
            row = agent.submissions.get("job-1")
            assert row is not None and row.state == "submitted"
            assert row.task_id == "s-" + hashlib.sha256(b"dev-1/job-1").hexdigest()[:24]
            assert agent.outbox.depth() == 1
            link.custody = True  # the gateway is back: its custody ack frees the outbox
            await await_for(lambda: agent.outbox.depth() == 0, message="the custody ack to free the outbox")
            # the same key with the same work is the same submission: nothing new is sent
            assert agent.submit_task("echo", {"x": 1}, key="job-1", priority=7, max_attempts=2, deadline=2**40,
                                     data_class="health", requirements={"capabilities": ["gpu"]}) == "job-1"
            with pytest.raises(ValueError, match="already submitted"):
                agent.submit_task("echo", {"x": 2}, key="job-1")
            fresh = agent.submit_task("sleep", {"seconds": 1})
            assert len(fresh) == 32 and agent.submissions.get(fresh) is not None
            await await_for(lambda: site.submits(link, fresh), message="the second submission")
            assert [s.body["key"] for s in site.submits(link)] == ["job-1", fresh]

    run(body())


@pytest.mark.parametrize(("kw", "match"), [
    ({"key": "has space"}, "key"),
    ({"key": "x" * 129}, "key"),
    ({"key": ""}, "key"),
    ({"handler": ""}, "handler"),
    ({"handler": 5}, "handler"),
    ({"args": [1]}, "args must be a map"),
    ({"args": {"blob": b"x" * 70_000}}, "at most"),
    ({"args": {"f": float("nan")}}, "finite"),
    ({"args": {"o": object()}}, "cannot be stored"),
    ({"priority": 10}, "priority must be 0..9"),
    ({"priority": True}, "priority"),
    ({"max_attempts": 0}, "max_attempts must be 1..10"),
    ({"max_attempts": 11}, "max_attempts"),
    ({"deadline": -1}, "deadline"),
    ({"data_class": ""}, "data_class"),
    ({"requirements": ["gpu"]}, "requirements must be a map"),
    ({"requirements": {"capabilities": "gpu"}}, "capabilities"),
    ({"requirements": {"cpu": 2}}, "cpu"),
    ({"requirements": {"mem_free": -5}}, "mem_free"),
])
def test_bad_submissions_are_value_errors_naming_the_field(kw: dict[str, Any], match: str) -> None:
    given = {"key": "k", "handler": "echo"} | kw
    key, handler = given.pop("key"), given.pop("handler")
    with pytest.raises(ValueError, match=match):
        validate(key, handler, **given)


def test_an_agent_without_a_gateway_cannot_submit(site: Site, tmp_path: Path) -> None:
    lone = tmp_path / "lone.json"
    Bundle(site.device, site.cloud.public_key, NODE, None).save(lone)
    agent = Agent(config(site, tmp_path, identity_file=lone))
    try:
        with pytest.raises(ConfigError, match="no gateway"):
            agent.submit_task("echo", {})
    finally:
        agent.submissions.close()
        agent.outbox.close()
        agent.state.close()


def test_a_row_another_process_adds_is_picked_up_and_sent(site: Site, tmp_path: Path) -> None:
    cfg = config(site, tmp_path)

    async def body() -> None:
        other = Submissions(cfg.data_dir / "submissions.db")  # as `cwsnet task submit` would, from its process
        try:
            other.add_new(NODE, "early", "echo", {"before": "start"})  # the agent was not running yet
            async with running(cfg) as (agent, link):
                await await_for(lambda: site.submits(link, "early"), message="the row added before the start")
                other.add_new(NODE, "cli-1", "echo", {"a": 1}, priority=2)
                sent = await await_for(lambda: site.submits(link, "cli-1"), message="the row added meanwhile")
                assert sent[0].to == GW and sent[0].body["args"] == {"a": 1} and sent[0].body["priority"] == 2
                await await_for(lambda: other.get("cli-1").state == "submitted",  # type: ignore[union-attr]
                                message="the row marked submitted")
                # its outcome lands in the row the other process reads
                await site.send(agent, GW, "task_done", done_body("cli-1", result={"a": 1}))
                row = other.get("cli-1")
                assert row is not None and (row.state, row.result, row.node) == ("succeeded", {"a": 1}, GW)
                assert len(site.submits(link, "early")) == 1  # each sent once
        finally:
            other.close()

    run(body())


def test_a_submission_that_cannot_be_sent_fails_its_row_and_the_agent_goes_on(site: Site, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []

    async def body() -> None:
        async with running(config(site, tmp_path), on_task_done=lambda k, row: seen.append((k, row.state))) \
                as (agent, link):
            monkeypatch.delitem(envelope.KINDS, "task_submit")  # an envelope that cannot seal it
            agent.submit_task("echo", {}, key="doomed")
            row = await await_for(lambda: [r for r in agent.submissions.list("failed") if r.key == "doomed"],
                                  message="the row failed")
            assert "dropped by the agent" in (row[0].error or "")
            assert seen == [("doomed", "failed")] and agent.outbox.depth() == 0
            await site.send(agent, "cloud", "task_cmd", {"task_id": "after", "handler": "echo", "args": {"ok": 1}})
            assert (await await_for(lambda: site.final(link, "after"))).body["result"] == {"ok": 1}

    run(body())


# ---- outcomes ---------------------------------------------------------------------------------


def test_task_done_updates_the_row_calls_back_and_sends_an_of_receipt(site: Site, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    async def body() -> None:
        async with running(config(site, tmp_path), on_task_done=lambda k, row: calls.append((k, row.state))) \
                as (agent, link):
            agent.submit_task("echo", {"v": 1}, key="k1")
            agent.submit_task("echo", {"v": 2}, key="k2")
            # from the cloud, a task_done is no outcome of ours: nothing changes
            await site.send(agent, "cloud", "task_done", done_body("k1", "failed", error="not yours to say"))
            assert agent.submissions.get("k1").state == "submitted"  # type: ignore[union-attr]
            done = await site.send(agent, GW, "task_done", done_body("k1", result={"v": 1}, node="dev-2"))
            row = agent.submissions.get("k1")
            assert row is not None and (row.state, row.result, row.error, row.node) == ("succeeded", {"v": 1}, None,
                                                                                        "dev-2")
            assert isinstance(row.done_ms, int) and calls == [("k1", "succeeded")]
            gw_seq = envelope.peek_header(done).seq
            receipt = await await_for(lambda: [r for r in site.receipts(link) if r.get("of") == GW],
                                      message="a receipt of the gateway's seq")
            assert receipt == [{"received": [[gw_seq, gw_seq]], "of": GW}]
            # the same message again (the gateway held it for us and delivered it again): a receipt, no change
            await site.deliver(agent, done)
            await await_for(lambda: len([r for r in site.receipts(link) if r.get("of") == GW]) == 2,
                            message="a receipt for the repeat")
            assert calls == [("k1", "succeeded")] and agent.submissions.get("k1") == row
            # a key this agent never submitted, and a body without a final state: ignored
            await site.send(agent, GW, "task_done", done_body("not-mine"))
            await site.send(agent, GW, "task_done", {"key": "k2", "state": "running"})
            assert agent.submissions.get("not-mine") is None
            assert agent.submissions.get("k2").state == "submitted"  # type: ignore[union-attr]
            await site.send(agent, GW, "task_done", done_body("k2", "failed", error="no executor offers echo"))
            assert agent.submissions.get("k2").error == "no executor offers echo"  # type: ignore[union-attr]
            assert calls == [("k1", "succeeded"), ("k2", "failed")]
            # the cloud's commands are still receipted without "of"
            cmd = await site.send(agent, "cloud", "task_cmd", {"task_id": "c", "handler": "echo", "args": {}})
            cseq = envelope.peek_header(cmd).seq
            await await_for(lambda: {"received": [[cseq, cseq]]} in site.receipts(link), message="a cloud receipt")
            # an outcome the gateway held longer than the replay window reaches back is still applied (review 8)
            agent.submit_task("echo", {"v": 3}, key="k3")
            late = site.seal(GW, "task_done", done_body("k3", result={"v": 3}))
            old_seq = envelope.peek_header(late).seq
            newer, _ = site.gw_ep.seal(topics.task_cmd(SITE, NODE), "task_done", done_body("not-mine"), to=NODE,
                                       seq=old_seq + 5000)
            await site.deliver(agent, newer)
            await site.deliver(agent, late)
            assert agent.submissions.get("k3").result == {"v": 3}  # type: ignore[union-attr]
            await await_for(lambda: {"received": [[old_seq, old_seq]], "of": GW} in site.receipts(link),
                            message="the late outcome's receipt")
            await site.deliver(agent, late)  # and again: nothing changes
            assert calls[-1] == ("k3", "succeeded") and calls.count(("k3", "succeeded")) == 1

    run(body())


def test_a_failing_callback_does_not_stop_the_agent(site: Site, tmp_path: Path) -> None:
    def boom(key: str, row: Any) -> None:
        raise RuntimeError("the program's bug")

    async def body() -> None:
        async with running(config(site, tmp_path), on_task_done=boom) as (agent, link):
            agent.submit_task("echo", {}, key="k")
            await site.send(agent, GW, "task_done", done_body("k"))
            assert agent.submissions.get("k").state == "succeeded"  # type: ignore[union-attr]
            await site.send(agent, "cloud", "task_cmd", {"task_id": "after", "handler": "echo", "args": {"ok": 1}})
            assert (await await_for(lambda: site.final(link, "after"))).body["result"] == {"ok": 1}

    run(body())


# ---- tasks from the gateway -------------------------------------------------------------------


def test_gateway_tasks_report_to_the_gateway_and_cloud_tasks_to_the_cloud(site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(site, tmp_path)) as (agent, link):
            sid = task_id_for("dev-2", "work")
            await site.send(agent, GW, "task_cmd", {"task_id": sid, "handler": "count", "attempt": 1, "lease": 30,
                                                    "args": {"to": 12, "step": 0, "every": 5}, "checkpoint": None})
            await site.send(agent, "cloud", "task_cmd", {"task_id": "c1", "handler": "echo", "args": {"v": 2},
                                                         "attempt": 1, "lease": 30})
            gw_final = await await_for(lambda: site.final(link, sid), message="the gateway task's result")
            cloud_final = await await_for(lambda: site.final(link, "c1"), message="the cloud task's result")
            assert gw_final.body["result"] == {"n": 12, "resumed_from": 0} and gw_final.body["attempt"] == 1
            assert [(s.body["state"], s.to) for s in site.results(link, sid)] == [
                ("running", GW), ("checkpoint", GW), ("checkpoint", GW), ("succeeded", GW)]
            assert [(s.body["state"], s.to) for s in site.results(link, "c1")] == [("running", "cloud"),
                                                                                    ("succeeded", "cloud")]
            assert cloud_final.body["result"] == {"v": 2}
            # the same attempt from the gateway again: a repeat, not run
            await site.send(agent, GW, "task_cmd", {"task_id": sid, "handler": "count", "attempt": 1, "lease": 30,
                                                    "args": {"to": 3}})
            assert sid not in agent.held_tasks() and len(site.results(link, sid)) == 4

    run(body())


def test_held_gateway_tasks_are_listed_and_only_their_assigner_cancels_them(site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(site, tmp_path)) as (agent, link):
            sleep = {"handler": "sleep", "args": {"seconds": 30}, "attempt": 1, "lease": 30}
            await site.send(agent, GW, "task_cmd", {"task_id": "s-1"} | sleep)
            await site.send(agent, "cloud", "task_cmd", {"task_id": "c-1"} | sleep)
            await await_for(lambda: agent.running_tasks == 2, message="both running")
            assert agent.held_tasks() == ["s-1", "c-1"] and agent.status_body()["tasks"] == ["s-1", "c-1"]
            await site.send(agent, "cloud", "task_cmd", {"task_id": "s-1", "cancel": True})  # not the cloud's task
            await site.send(agent, GW, "task_cmd", {"task_id": "c-1", "cancel": True})  # not the gateway's
            assert agent.held_tasks() == ["s-1", "c-1"]
            await site.send(agent, GW, "task_cmd", {"task_id": "s-1", "cancel": True, "attempt": 1})
            done = await await_for(lambda: site.final(link, "s-1"), message="s-1 cancelled")
            assert (done.to, done.body["state"], done.body["error"]) == (GW, "cancelled", "cancelled by gateway gw-1")
            await site.send(agent, "cloud", "task_cmd", {"task_id": "c-1", "cancel": True})
            done = await await_for(lambda: site.final(link, "c-1"), message="c-1 cancelled")
            assert (done.to, done.body["error"]) == ("cloud", "cancelled by the cloud")

    run(body())


def test_a_restart_reports_an_interrupted_gateway_task_to_the_gateway(site: Site, tmp_path: Path) -> None:
    cfg = config(site, tmp_path)
    sleep = {"handler": "sleep", "args": {"seconds": 30}, "attempt": 2, "lease": 30}

    async def body() -> None:
        async with running(cfg) as (agent, link):
            await site.send(agent, GW, "task_cmd", {"task_id": "s-int"} | sleep)
            await site.send(agent, "cloud", "task_cmd", {"task_id": "c-int"} | sleep)
            await await_for(lambda: agent.running_tasks == 2, message="both running")
        async with running(cfg) as (agent, link):
            s = await await_for(lambda: site.final(link, "s-int"), message="s-int reported")
            c = await await_for(lambda: site.final(link, "c-int"), message="c-int reported")
            assert (s.to, s.body["state"], s.body["attempt"]) == (GW, "failed", 2)
            assert (c.to, c.body["state"], c.body["attempt"]) == ("cloud", "failed", 2)
            assert s.body["error"].startswith("interrupted") and c.body["error"].startswith("interrupted")
            await await_for(lambda: agent.state.unfinished_runs() == [], message="the reports delivered")
            # the gateway's replay window survived the restart: its old command is a repeat
            await site.send(agent, GW, "task_cmd", {"task_id": "s-int"} | sleep)
            assert agent.held_tasks() == []

    run(body())


def test_a_task_cmd_replayed_from_the_gateway_runs_once_and_is_receipted(site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(site, tmp_path)) as (agent, link):
            cmd = await site.send(agent, GW, "task_cmd", {"task_id": "s-r", "handler": "echo", "args": {"n": 1}})
            await await_for(lambda: site.final(link, "s-r"), message="s-r done")
            await site.deliver(agent, cmd)
            seq = envelope.peek_header(cmd).seq
            await await_for(lambda: site.receipts(link).count({"received": [[seq, seq]], "of": GW}) == 2,
                            message="a receipt for the original and the repeat")
            assert [s.body["state"] for s in site.results(link, "s-r")] == ["running", "succeeded"]

    run(body())


# ---- executor status for the gateway ----------------------------------------------------------


def test_each_status_goes_to_the_gateway_on_task_status(site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(site, tmp_path, task_slots=3, capabilities=["camera"])) as (agent, link):
            def task_statuses() -> list[Sent]:
                return [s for s in site.sent(link) if s.topic == topics.task_status(SITE, NODE)]

            first = await await_for(task_statuses, message="the birth's copy for the gateway")
            birth = next(s for s in site.sent(link) if s.kind == "birth")
            assert (first[0].kind, first[0].to, first[0].retain) == ("status", GW, False)
            assert first[0].body == birth.body and birth.to == "cloud"
            assert (first[0].body["slots"], first[0].body["capabilities"]) == (3, ["camera", "parts"])
            # a leased task from the gateway: heartbeats every third of the lease, each one to both
            await site.send(agent, GW, "task_cmd", {"task_id": "s-hb", "handler": "sleep", "args": {"seconds": 30},
                                                    "attempt": 1, "lease": 0.3})
            await await_for(lambda: len([s for s in task_statuses() if s.body["tasks"] == ["s-hb"]]) >= 3,
                            message="heartbeats to the gateway listing the task")
            to_cloud = [s.body for s in site.sent(link) if s.kind == "status" and s.to == "cloud"]
            assert [b["tasks"] for b in to_cloud if b["tasks"]] and all(b["tasks"] == ["s-hb"] for b in to_cloud)
            assert all(envelope.peek_header(p).seq not in {s for s, _k, _o in agent.outbox.ledger()}
                       for t, p, _q, _r in link.published if t == topics.task_status(SITE, NODE))  # never stored

    run(body())


def test_no_task_status_without_slots(site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        async with running(config(site, tmp_path, task_slots=0)) as (agent, link):
            await site.send(agent, "cloud", "task_cmd", {"task_id": "d", "handler": "echo", "args": {}})
            await await_for(lambda: site.final(link, "d"), message="a direct task done")
            assert [s for s in site.sent(link) if s.kind == "birth"]
            assert not [s for s in site.sent(link) if s.topic == topics.task_status(SITE, NODE)]

    run(body())


# ---- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def agent_yaml(site: Site, tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"identity_file": str(site.bundle_path), "data_dir": "agent-data", "sensors": [],
                                    "status_interval": 3600.0, "handlers": ["echo"]}))
    return path


def test_cli_submit_wait_returns_once_the_outcome_arrives(site: Site, agent_yaml: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(agent_yaml, AgentConfig)

    async def body() -> None:
        async with running(cfg) as (agent, link):
            for key, state, code in (("ok-1", "succeeded", 0), ("bad-1", "failed", 1)):
                argv = ["task", "submit", "--config", str(agent_yaml), "echo", "--args", '{"x": [1, 2]}',
                        "--key", key, "--priority", "8", "--wait", "--timeout", "20"]
                cli = asyncio.ensure_future(asyncio.to_thread(cli_main, argv))
                sub = await await_for(lambda key=key: site.submits(link, key), message=f"the CLI's {key} sent")
                assert sub[0].body["args"] == {"x": [1, 2]} and sub[0].body["priority"] == 8
                assert not cli.done()  # waiting for the outcome
                await site.send(agent, GW, "task_done", done_body(key, state, result={"x": [1, 2]} if code == 0 else None,
                                                                  error=None if code == 0 else "boom"))
                assert await asyncio.wait_for(cli, 15) == code

    run(body())
    out = capsys.readouterr().out
    assert f"site task ok-1 (task id {task_id_for(NODE, 'ok-1')}) submitted" in out
    assert 'site task ok-1 succeeded on gw-1\nresult: {"x": [1, 2]}' in out
    assert "site task bad-1 failed on gw-1" in out and "error: boom" in out


def test_cli_submit_without_wait_json_and_repeat(site: Site, agent_yaml: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["task", "submit", "--config", str(agent_yaml), "echo", "--key", "same", "--json"]
    assert cli_main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["key"], row["state"], row["task_id"], row["args"]) == ("same", "new", task_id_for(NODE, "same"), {})
    assert cli_main(argv[:-1]) == 0
    assert "already submitted (new); nothing new was made" in capsys.readouterr().out
    assert cli_main([*argv[:-1], "--args", '{"other": 1}']) == 2
    assert "already submitted" in capsys.readouterr().err


def test_cli_submit_times_out_when_no_agent_runs(agent_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["task", "submit", "--config", str(agent_yaml), "echo", "--key", "lonely", "--wait",
                     "--timeout", "0.3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "was not picked up within 0.3 s: the agent may not be running" in err
    rows = Submissions(agent_yaml.parent / "agent-data" / "submissions.db")
    try:
        assert rows.get("lonely").state == "new"  # type: ignore[union-attr]  # it goes when the agent runs
    finally:
        rows.close()


def test_cli_submit_errors_are_one_clear_line(site: Site, agent_yaml: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def fails(*argv: str) -> str:
        assert cli_main(["task", "submit", *argv]) == 2
        return capsys.readouterr().err

    base = ["--config", str(agent_yaml), "echo"]
    assert "--args: not valid JSON" in fails(*base, "--args", "{x: 1}")
    assert "--args: expected a JSON object" in fails(*base, "--args", "[1]")
    assert "key 'a b'" in fails(*base, "--key", "a b")
    assert "config file not found" in fails("--config", str(tmp_path / "nope.yaml"), "echo")
    assert "--timeout: only with --wait" in fails(*base, "--timeout", "3")
    with pytest.raises(SystemExit):
        cli_main(["task", "submit", *base, "--priority", "12"])
    assert "expected an integer 0..9" in capsys.readouterr().err
    lone = tmp_path / "lone.json"
    Bundle(site.device, site.cloud.public_key, NODE, None).save(lone)
    lone_yaml = tmp_path / "lone.yaml"
    lone_yaml.write_text(yaml.safe_dump({"identity_file": str(lone), "data_dir": "lone-data"}))
    assert "names no gateway" in fails("--config", str(lone_yaml), "echo")


# ---- units: submissions.db and node state -----------------------------------------------------


def test_submissions_shared_between_two_connections(tmp_path: Path) -> None:
    a, b = Submissions(tmp_path / "s.db"), Submissions(tmp_path / "s.db")
    try:
        assert a.changed() and not a.changed()  # the first look counts as a change
        b.add_new(NODE, "k", "echo", {"v": b"\x00\x01"})
        assert a.changed() and [s.key for s in a.take_new()] == ["k"]
        a.mark_sent("k")
        assert not a.changed()  # its own write
        assert a.take_new() == [] and b.get("k").state == "submitted"  # type: ignore[union-attr]
        assert a.done("unknown", "failed") is None
        with pytest.raises(ValueError, match="final state"):
            a.done("k", "running")
        row = a.done("k", "succeeded", {"blob": b"\xff"}, None, "gw-1")
        assert row is not None and row.final and row.to_json()["result"] == {"blob": "/w=="}
        assert row.to_json()["args"] == {"v": "AAE="} and b.list()[0] == row
        with sqlite3.connect(tmp_path / "s.db") as raw:  # a row written by hand that cannot be decoded
            raw.execute("insert into submissions values ('bad', 't', 'echo', x'ff', '{}', 'new', null, null, null, "
                        "1, null, null)")
        raw.close()
        assert [s.key for s in a.list()] == ["k"] and a.take_new() == []  # skipped, the others still read
    finally:
        a.close()
        b.close()


def test_node_state_remembers_who_assigned_a_task(tmp_path: Path) -> None:
    st = NodeState(tmp_path / "s.db")
    st.mark_task("c", attempt=1)
    st.mark_task("s", attempt=1, assigner=GW, trace="tc")
    st.mark_task("s", attempt=1, assigner="cloud")  # a repeat changes nothing
    assert st.unfinished_runs() == [UnfinishedRun("c", None, 1, "cloud"), UnfinishedRun("s", "tc", 1, GW)]
    assert st.unfinished_attempts() == [("c", None, 1), ("s", "tc", 1)]
    st.close()
    old = tmp_path / "old.db"  # a state file from before site tasks: every task came from the cloud
    with sqlite3.connect(old) as db:
        db.execute("create table seen_tasks (task_id text primary key, ts float, done integer, trace text, "
                   "attempt integer)")
        db.execute("insert into seen_tasks values ('x', 1.0, 0, null, 3)")
    db.close()
    again = NodeState(old)
    assert again.unfinished_runs() == [UnfinishedRun("x", None, 3, "cloud")]
    again.close()


def test_a_cancel_is_recorded_for_the_agent_and_an_older_file_gains_the_column(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "old.db") as raw:  # a submissions.db from before cancels
        raw.execute("create table submissions (key text primary key, task_id text not null, handler text not null, "
                    "args blob not null, options text not null, state text not null, result blob, error text, "
                    "node text, submitted_ms integer not null, done_ms integer)")
    raw.close()
    subs = Submissions(tmp_path / "old.db")
    subs.add_new(NODE, "k1", "echo", {"x": 1})
    subs.add_new(NODE, "k2", "echo", {"x": 2})
    subs.done("k2", "succeeded", {"x": 2})
    assert subs.request_cancel("k1").cancel == "new"
    assert subs.request_cancel("k2").cancel is None  # ended: left as it is
    with pytest.raises(ValueError, match="no site task with key 'nope'"):
        subs.request_cancel("nope")
    assert [r.key for r in subs.take_cancels()] == ["k1"]
    subs.mark_cancel_sent("k1")
    assert subs.take_cancels() == [] and subs.get("k1").cancel == "sent"  # type: ignore[union-attr]
    subs.close()


def test_a_submission_cancelled_before_the_agent_sent_it_never_goes(site: Site, tmp_path: Path) -> None:
    async def body() -> None:
        cfg = config(site, tmp_path)
        subs = Submissions.in_dir(cfg.data_dir)  # as `cwsnet task submit` then `withdraw` would, agent stopped
        subs.add_new(NODE, "early", "echo", {"x": 1})
        subs.request_cancel("early")
        subs.close()
        async with running(cfg) as (agent, link):
            row = await await_for(lambda: (r := agent.submissions.get("early")) is not None and r.final and r,
                                  message="the cancel taken")
            assert row.state == "cancelled" and row.error == "cancelled before it was sent to the gateway"
            agent.submit_task("sleep", {"seconds": 30}, key="late")
            agent.cancel_task("late")
            await await_for(lambda: [s for s in site.sent(link) if s.kind == "task_submit"
                                     and s.body == {"key": "late", "cancel": True}],
                            message="the cancel sent to the gateway")
            sent = [s.body for s in site.sent(link) if s.kind == "task_submit"]
            # the early one never went; its cancel does (a copy could have been in the outbox: the gateway
            # then refuses it as cancelled)
            assert sent[0] == {"key": "early", "cancel": True}, sent
            assert [b["key"] for b in sent[1:]] == ["late", "late"] and sent[2] == {"key": "late", "cancel": True}

    run(body())
