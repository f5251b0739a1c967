"""The cloud's side of site tasks (docs/protocol.md §3, "Site tasks"): offloads a gateway gives the cloud to
run, the replies sealed back to it in order, and the gateway's mirror of its site tasks as `site` rows.

One real cloud process (module-scoped) from a `cwsnet init` home lab; the test plays gateway gw-home on the
cloud broker with the gateway's real bundle (keys and MQTT credential): it seals offloads and mirror reports
to the cloud and opens the cloud's sealed replies and acks. The reply queue's behaviour while the link is
down is checked on :class:`cloud.site_offload.SiteOffloads` itself, with real sealing and a fake link.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from harness.deploy import Deployment, get, post
from harness.proc import ProcessSet
from harness.wait import await_for, run_async, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from cloud.metrics import CloudMetrics
from cloud.site_offload import SiteOffloads
from cloud.tasks import cloud_handlers
from cwsnet import envelope, topics
from cwsnet.bundle import Bundle
from cwsnet.endpoint import Endpoint
from cwsnet.identity import Identity
from cwsnet.mqtt import LinkDown
from cwsnet.replay import SeqCounter

pytestmark = pytest.mark.integration

GW = "gw-home"
SITE = "home"
#: where each sender of the test starts its seqs: far above the lab's real nodes, a million apart
_SEQS = itertools.count(int(time.time() * 1000) * 1000, 1_000_000)
_IDS = itertools.count(1)  # unique task keys in the module


def site_task_id(origin: str, key: str) -> str:
    return "s-" + hashlib.sha256(f"{origin}/{key}".encode()).hexdigest()[:24]


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("site-offload")
    procs = ProcessSet(tmp / "logs")
    failed = request.session.testsfailed
    try:
        dep = Deployment(tmp, procs, devices=1)
        dep.start_cloud()  # no gateway process: the test is gw-home on the cloud broker
        yield dep
    finally:
        if request.session.testsfailed > failed and len(procs):
            print(procs.tails(60))
        procs.close()


class Gateway:
    """gw-home as the cloud sees it: its bundle's keys and credential, on the cloud broker."""

    _n = itertools.count()

    def __init__(self, d: Deployment, node: str = GW) -> None:
        self.bundle = Bundle.load_node(d.lab.bundle_path(GW))
        self.sealer = Bundle.load_node(d.lab.bundle_path(node))  # whose keys seal what it sends (a test may lie)
        assert self.bundle.cloud_public_key is not None
        self.cloud_pk = self.bundle.cloud_public_key
        self.ep = Endpoint(self.sealer.identity, SeqCounter(next(_SEQS), lambda _m: None),
                           lambda _n: self.cloud_pk)
        self.lock = threading.Lock()
        self.replies: list[tuple[str, envelope.Header, Any]] = []  # (topic, header, body) opened, arrival order
        self.acks: list[Any] = []
        self.others: list[str] = []  # commands on other nodes' task/cmd (never opened: not ours)
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{self.bundle.mqtt_username}-t{next(self._n)}",
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(self.bundle.mqtt_username, self.bundle.mqtt_password or "")
        self.c.on_connect = lambda c, *_a: c.subscribe([(f"cws/v1/{SITE}/+/task/cmd", 1),
                                                        (topics.ack(SITE, GW), 1)])
        self.c.on_subscribe = lambda *_a: self.subscribed.set()
        self.c.on_message = self._got
        self.c.connect("127.0.0.1", d.topo.cloud_mqtt_port)
        self.c.loop_start()
        assert self.subscribed.wait(10), "subscribed on the cloud broker"

    def _got(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic != topics.task_cmd(SITE, GW) and m.topic != topics.ack(SITE, GW):
            with self.lock:
                self.others.append(m.topic)
            return
        opened = envelope.open_envelope(m.payload, topic=m.topic, me=GW, my_key=self.bundle.identity.secret_key,
                                        sender_key=lambda n: self.cloud_pk if n == "cloud" else None)
        with self.lock:
            if opened.header.kind == "ack":
                self.acks.append(opened.body)
            else:
                self.replies.append((m.topic, opened.header, opened.body))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    # sending ------------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def seal(self, topic: str, kind: str, body: dict[str, Any], *, seq: int | None = None,
             expires: int | None = None) -> tuple[bytes, int]:
        payload, header = self.ep.seal(topic, kind, body, to="cloud", seq=seq, expires=expires)
        return payload, header.seq

    def offload(self, body: dict[str, Any], *, expires: int | None = None) -> int:
        """Seal ``body`` as a task_cmd on gw-home's task/offload (exp: 10 s from now unless given); its seq."""
        topic = topics.task_offload(SITE, GW)
        exp = expires if expires is not None else int(time.time() * 1000) + 10_000
        payload, seq = self.seal(topic, "task_cmd", body, expires=exp)
        self.publish(topic, payload)
        return seq

    def mirror(self, body: dict[str, Any], *, seq: int | None = None) -> int:
        topic = topics.task_result(SITE, GW)
        payload, seq = self.seal(topic, "task_result", body, seq=seq)
        self.publish(topic, payload)
        return seq

    # what came back ------------------------------------------------------------------------------------------

    def bodies(self, task_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [b for _t, _h, b in self.replies if isinstance(b, dict) and b.get("task_id") == task_id]

    def states(self, task_id: str, attempt: Any = "any") -> list[str]:
        return [b["state"] for b in self.bodies(task_id) if attempt == "any" or b.get("attempt") == attempt]

    def final(self, task_id: str, attempt: int | None, timeout: float = 15) -> dict[str, Any]:
        return wait_for(lambda: next((b for b in self.bodies(task_id) if b.get("attempt") == attempt
                                      and b["state"] in ("succeeded", "failed", "cancelled", "expired")), None),
                        timeout=timeout, message=f"the final reply for {task_id} attempt {attempt}")

    def acked(self, sender: str, seq: int) -> bool:
        with self.lock:
            return any(s == sender and first <= seq <= last for body in self.acks for s, first, last in body["acks"])

    def notice(self, sender: str, seq: int) -> list[Any] | None:
        with self.lock:
            return next((r for body in self.acks for r in body.get("rejected", []) if r[:2] == [sender, seq]), None)


@pytest.fixture
def gw(d: Deployment) -> Iterator[Gateway]:
    g = Gateway(d)
    try:
        yield g
    finally:
        g.close()


def marker(gw: Gateway) -> None:
    """An echo offloaded after everything sent before it: once its reply is back, every reply the cloud
    would have made to what was sent earlier is back too (one ordered queue per gateway)."""
    tid = f"marker-{next(_IDS)}"
    gw.offload({"task_id": tid, "handler": "echo", "args": {}, "attempt": 1, "deadline": None, "lease": 5.0,
                "checkpoint": None})
    assert gw.final(tid, 1)["state"] == "succeeded"


def metric(d: Deployment, name: str) -> float:
    from harness.deploy import prometheus

    return prometheus(f"{d.base}/metrics").get(name, 0.0)


# -- offloads ---------------------------------------------------------------------------------------------------


def test_an_offload_runs_on_the_cloud_and_its_replies_come_back_sealed_and_in_order(d: Deployment,
                                                                                    gw: Gateway) -> None:
    tid = site_task_id("dev-1", "count-1")
    started = metric(d, 'cwsnet_cloud_site_offloads_total{outcome="started"}')
    seq = gw.offload({"task_id": tid, "handler": "count", "args": {"to": 30, "step": 0.01, "every": 10},
                      "deadline": None, "attempt": 3, "lease": 5.0, "checkpoint": {"n": 0}})
    done = gw.final(tid, 3)
    assert done["state"] == "succeeded" and done["result"] == {"n": 30, "resumed_from": 0}
    assert gw.states(tid) == ["running", "checkpoint", "checkpoint", "succeeded"]
    assert [b["checkpoint"] for b in gw.bodies(tid) if b["state"] == "checkpoint"] == [{"n": 10}, {"n": 20}]
    assert all(b["attempt"] == 3 for b in gw.bodies(tid))
    with gw.lock:
        mine = [(t, h) for t, h, b in gw.replies if b.get("task_id") == tid]
    # sealed by the cloud to the gateway, on its task/cmd, in the order made
    assert {t for t, _ in mine} == {topics.task_cmd(SITE, GW)}
    assert all(h.sender == "cloud" and h.recipient == GW and h.kind == "task_result" for _, h in mine)
    assert [h.seq for _, h in mine] == sorted(h.seq for _, h in mine)
    # the offload itself was stored and acked end to end, like every message in the gateway's outbox
    wait_for(lambda: gw.acked(GW, seq), timeout=10, message="the e2e ack of the offload")
    # a checkpoint from the gateway's scheduler is where a moved task resumes
    tid2 = site_task_id("dev-1", "count-2")
    gw.offload({"task_id": tid2, "handler": "count", "args": {"to": 12, "step": 0.0, "every": 5},
                "attempt": 1, "checkpoint": {"n": 10}})
    assert gw.final(tid2, 1)["result"] == {"n": 12, "resumed_from": 10}
    assert metric(d, 'cwsnet_cloud_site_offloads_total{outcome="started"}') >= started + 2


def test_each_attempt_runs_once_and_a_higher_attempt_runs_again(d: Deployment, gw: Gateway) -> None:
    tid = site_task_id("dev-1", "echo-once")
    cmd = {"task_id": tid, "handler": "echo", "args": {"v": 1}, "attempt": 1, "deadline": None, "lease": 5.0,
           "checkpoint": None}
    topic = topics.task_offload(SITE, GW)
    payload, seq = gw.seal(topic, "task_cmd", cmd, expires=int(time.time() * 1000) + 10_000)
    gw.publish(topic, payload)
    assert gw.final(tid, 1)["result"] == {"v": 1}
    gw.publish(topic, payload)  # the outbox re-sends it (its ack was lost): stored once, acked again, not run
    gw.offload(cmd)  # the gateway's scheduler sends the same attempt again under a new seq: a repeat
    gw.offload(cmd | {"attempt": 2, "args": {"v": 2}})  # the task came back to the cloud: runs again
    assert gw.final(tid, 2)["result"] == {"v": 2}
    assert gw.states(tid, 1) == ["running", "succeeded"]
    assert gw.states(tid, 2) == ["running", "succeeded"]
    wait_for(lambda: gw.acked(GW, seq), timeout=10, message="the re-sent offload acked")


def test_a_cancel_stops_a_sleep_and_a_late_or_stale_offload_does_not_run(d: Deployment, gw: Gateway) -> None:
    tid = site_task_id("dev-1", "sleepy")
    gw.offload({"task_id": tid, "handler": "sleep", "args": {"seconds": 60}, "attempt": 1, "lease": 5.0})
    wait_for(lambda: "running" in gw.states(tid, 1), timeout=10, message="the sleep running")
    gw.offload({"task_id": site_task_id("dev-1", "never-offloaded"), "cancel": True})  # not held: no reply
    gw.offload({"task_id": tid, "cancel": True, "attempt": 1})
    stopped = gw.final(tid, 1)
    assert stopped["state"] == "cancelled" and stopped["started"] is not None
    gw.offload({"task_id": tid, "handler": "sleep", "args": {"seconds": 60}, "attempt": 1})  # late: a repeat
    stale = site_task_id("dev-1", "stale")  # its exp passed on the way (an outage): the gateway moved it
    stale_seq = gw.offload({"task_id": stale, "handler": "echo", "args": {}, "attempt": 1},
                           expires=int(time.time() * 1000) - 1000)
    no_handler = site_task_id("dev-1", "no-handler")
    gw.offload({"task_id": no_handler, "args": {}, "attempt": 1})
    marker(gw)
    assert gw.states(tid) == ["running", "cancelled"]
    assert gw.bodies(site_task_id("dev-1", "never-offloaded")) == [] and gw.bodies(stale) == []
    refused = gw.final(no_handler, 1)
    assert refused["state"] == "failed" and "needs a text 'handler'" in refused["error"]
    wait_for(lambda: gw.acked(GW, stale_seq), timeout=10, message="the stale offload acked (stored, not run)")
    assert metric(d, 'cwsnet_cloud_site_offloads_total{outcome="stale"}') >= 1


def test_an_offload_sealed_by_a_device_is_rejected_and_never_run(d: Deployment, gw: Gateway) -> None:
    dev = Gateway(d, node="dev-1")  # dev-1's keys; published with the gateway's credential (the broker lets a
    try:                            # gateway publish its whole site: only the cloud's checks stand in the way)
        tid = site_task_id("dev-1", "sneaky")
        cmd = {"task_id": tid, "handler": "echo", "args": {"x": 1}, "attempt": 1}
        own_topic = topics.task_offload(SITE, "dev-1")
        payload, seq = dev.seal(own_topic, "task_cmd", cmd)
        dev.publish(own_topic, payload)
        gw_topic = topics.task_offload(SITE, GW)  # on the gateway's channel: the sender is not the topic's node
        payload2, seq2 = dev.seal(gw_topic, "task_cmd", cmd)
        dev.publish(gw_topic, payload2)
        wait_for(lambda: gw.notice("dev-1", seq) and gw.notice("dev-1", seq2), timeout=10,
                 message="rejection notices for both to the site's gateway")
        assert gw.notice("dev-1", seq)[2] == "topic_mismatch"  # type: ignore[index]
        assert gw.notice("dev-1", seq2)[2] == "topic_mismatch"  # type: ignore[index]
        assert not gw.acked("dev-1", seq) and not gw.acked("dev-1", seq2)
        marker(gw)
        assert gw.bodies(tid) == []  # never run: no reply on the gateway's task/cmd ...
        assert topics.task_cmd(SITE, "dev-1") not in gw.others  # ... nor on the device's
        events = get(f"{d.base}/api/v1/events?type=message.rejected&limit=200")["items"]
        assert any(e["source"] == "dev-1" and e["data"]["reason"] == "topic_mismatch"
                   and "only a gateway" in e["data"]["detail"] for e in events)
    finally:
        dev.close()


# -- the mirror ---------------------------------------------------------------------------------------------------


def mirror_body(tid: str, key: str, state: str, *, node: str | None, explain: str, attempts: int = 0,
                result: Any = None, finished: int | None = None) -> dict[str, Any]:
    return {"task_id": tid, "state": state, "result": result, "error": None,
            "site_task": {"origin": "dev-1", "key": key, "handler": "sha256", "priority": 5, "data_class": None,
                          "node": node, "attempts": attempts, "submitted": 1_767_225_600_000, "finished": finished,
                          "explain": explain}}


def test_the_gateways_mirror_is_a_site_task_the_api_and_cli_show_but_cannot_cancel(d: Deployment,
                                                                                    gw: Gateway) -> None:
    key = f"photo-{next(_IDS)}"
    tid = site_task_id("dev-1", key)
    gw.mirror(mirror_body(tid, key, "queued", node=None, explain="queued: waiting for an executor"))
    t = wait_for(lambda: get(f"{d.base}/api/v1/tasks/{tid}"), timeout=10, message="the site task stored")
    assert (t["kind"], t["state"], t["site"], t["origin"], t["node"], t["target"]) == \
        ("site", "queued", SITE, "dev-1", None, "")
    assert t["placement"] == "queued: waiting for an executor" and t["created"] == 1_767_225_600_000
    assert t["idempotency_key"] == f"site:{GW}:dev-1:{key}"
    first = gw.ep.seq.peek  # a seq below the next report's, for a report that arrives late
    gw.ep.seq.next()
    explain = "RUN ON cloud cloud (rule big-input-offloads)\nhistory:\n  assigned to cloud (attempt 1)"
    gw.mirror(mirror_body(tid, key, "running", node="cloud", explain=explain, attempts=1))
    wait_for(lambda: get(f"{d.base}/api/v1/tasks/{tid}")["state"] == "running", timeout=10, message="running")
    # a report older (by the gateway's seq) than the one applied changes nothing, though stored and acked
    late = gw.mirror(mirror_body(tid, key, "queued", node=None, explain="stale"), seq=first)
    wait_for(lambda: gw.acked(GW, late), timeout=10, message="the late report acked")
    t = get(f"{d.base}/api/v1/tasks/{tid}")
    assert (t["state"], t["node"], t["placement"], t["attempts"]) == ("running", "cloud", explain, 1)
    gw.mirror(mirror_body(tid, key, "succeeded", node="cloud", explain=explain + "\n  succeeded on cloud",
                          attempts=1, result={"sha256": "ab" * 32, "bytes": 3}, finished=1_767_225_601_000))
    t = wait_for(lambda: (x := get(f"{d.base}/api/v1/tasks/{tid}"))["state"] == "succeeded" and x, timeout=10,
                 message="succeeded")
    assert t["result"] == {"sha256": "ab" * 32, "bytes": 3} and t["finished"] == 1_767_225_601_000
    assert [x["id"] for x in get(f"{d.base}/api/v1/tasks?kind=site&limit=500")["items"]].count(tid) == 1
    assert tid in [x["id"] for x in get(f"{d.base}/api/v1/tasks?limit=500")["items"]]
    assert tid not in [x["id"] for x in get(f"{d.base}/api/v1/tasks?kind=scheduled&limit=500")["items"]]
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(f"{d.base}/api/v1/tasks/{tid}/cancel", {})
    assert refused.value.code == 409
    assert f"site task {tid} is succeeded; it cannot be cancelled" in json.loads(refused.value.read())["error"]["message"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CWSNET_")}
    shown = subprocess.run([sys.executable, "-m", "cwsnet", "task", "show", tid, "--url", d.base, "--token-file",
                            str(d.token_file)], capture_output=True, text=True, env=env, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert f"task {tid} (site)" in shown.stdout and "origin     dev-1" in shown.stdout
    assert "node       cloud" in shown.stdout and "placement:\nRUN ON cloud cloud" in shown.stdout


def test_a_bad_mirror_is_acked_but_changes_nothing(d: Deployment, gw: Gateway) -> None:
    key = f"bad-{next(_IDS)}"
    tid = site_task_id("dev-1", key)
    malformed = metric(d, 'cwsnet_cloud_messages_rejected_total{reason="malformed"}')
    wrong_id = mirror_body(site_task_id("dev-2", key), key, "queued", node=None, explain="x")  # not dev-1's id
    bad_state = mirror_body(tid, key, "pondering", node=None, explain="x")
    bad_priority = mirror_body(tid, key, "queued", node=None, explain="x")
    bad_priority["site_task"]["priority"] = 11
    # a report about a node that is not a device of the gateway's own site (here: the gateway itself)
    foreign = mirror_body(site_task_id(GW, key), key, "queued", node=None, explain="x")
    foreign["site_task"]["origin"] = GW
    seqs = [gw.mirror(b) for b in (wrong_id, bad_state, bad_priority, foreign)]
    wait_for(lambda: all(gw.acked(GW, s) for s in seqs), timeout=10, message="the bad reports acked")
    for t in (tid, site_task_id("dev-2", key), site_task_id(GW, key)):
        with pytest.raises(urllib.error.HTTPError) as missing:
            get(f"{d.base}/api/v1/tasks/{t}")
        assert missing.value.code == 404
    assert metric(d, 'cwsnet_cloud_messages_rejected_total{reason="malformed"}') >= malformed + 4


# -- the reply queue, without a broker ----------------------------------------------------------------------------


class FlakyLink:
    """MqttLink's surface SiteOffloads uses: ``connected`` and ``publish``, which fails while down."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      timeout: float = 10) -> None:  # noqa: ASYNC109 - MqttLink's signature
        if not self.connected.is_set():
            raise LinkDown("test: link down")
        assert qos == 1 and not retain
        self.published.append((topic, payload))

    def down(self) -> None:
        self.connected.clear()


def test_replies_wait_for_the_link_in_order_and_a_full_queue_drops_the_oldest() -> None:
    cloud = Identity.generate("cloud", "cloud", "cloud")
    gwid = Identity.generate(GW, SITE, "gateway")
    ep = Endpoint(cloud, SeqCounter(1, lambda _m: None), lambda n: gwid.public_key if n == GW else None)
    link = FlakyLink()
    metrics = CloudMetrics()
    offloads = SiteOffloads(ep, link, handlers=cloud_handlers(None), slots=2, metrics=metrics, max_pending=5)

    def opened() -> list[dict[str, Any]]:
        out = []
        for topic, payload in link.published:
            o = envelope.open_envelope(payload, topic=topic, me=GW, my_key=gwid.secret_key,
                                       sender_key=lambda _n: cloud.public_key)
            assert topic == topics.task_cmd(SITE, GW) and o.header.kind == "task_result"
            out.append(o.body)
        return out

    async def main() -> None:
        runner = asyncio.create_task(offloads.run())
        try:
            link.down()
            # link down: the replies of two counts wait, in the order made
            offloads.offer(GW, SITE, {"task_id": "t-1", "handler": "count", "args": {"to": 4, "step": 0, "every": 2},
                                      "attempt": 1})
            await await_for(lambda: offloads.pending(GW) == 3, timeout=10, message="running, checkpoint, final")
            assert link.published == []
            link.connected.set()
            await await_for(lambda: offloads.pending(GW) == 0, timeout=10, message="sent once the link is back")
            assert [(b["task_id"], b["state"]) for b in opened()] == [("t-1", "running"), ("t-1", "checkpoint"),
                                                                      ("t-1", "succeeded")]
            # a long outage: at most max_pending wait; the oldest go first, each counted
            link.published.clear()
            link.down()
            for n in range(4):
                offloads.offer(GW, SITE, {"task_id": f"e-{n}", "handler": "echo", "args": {"n": n}, "attempt": 1})
            await await_for(lambda: metrics.site_offloads.labels(outcome="succeeded")._value.get() == 5,
                            timeout=10, message="the echoes ran")
            assert offloads.pending(GW) == 5
            assert metrics.site_offload_replies_dropped._value.get() == 3
            link.connected.set()
            await await_for(lambda: offloads.pending(GW) == 0, timeout=10, message="the kept ones sent")
            got = [(b["task_id"], b["state"]) for b in opened()]
            assert len(got) == 5 and {s for _t, s in got} <= {"running", "succeeded"}
            for n in range(4):  # what is left of each task's replies is in the order made
                states = [s for t, s in got if t == f"e-{n}"]
                assert states in ([], ["succeeded"], ["running", "succeeded"]), (n, got)
            # cloud_workers 0: answered failed, not run
            none = SiteOffloads(ep, link, handlers=cloud_handlers(None), slots=0)
            none.offer(GW, SITE, {"task_id": "z", "handler": "echo", "args": {}, "attempt": 4})
            assert none.pending(GW) == 1 and none.workers.running() == []
        finally:
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner

    run_async(main(), timeout=30)
