"""Scheduled tasks end to end (issue 7): real cloud, gateway and agents as processes.

Placement by the offload policy, leases, migration on SIGKILL, checkpoint resume, replicas,
drains, and persistence across a cloud restart, checked through the REST API and the stored data.
"""

from __future__ import annotations

import json
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from harness.deploy import Deployment, get, post
from harness.proc import ProcessSet
from harness.wait import wait_for

pytestmark = pytest.mark.integration


def task(d: Deployment, tid: str) -> dict[str, Any]:
    return get(f"{d.base}/api/v1/tasks/{tid}")


def done(d: Deployment, tid: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (t := task(d, tid))["state"] in ("succeeded", "failed", "cancelled", "expired") and t,
                    timeout=timeout, message=f"task {tid} finished")


def test_a_task_without_a_target_runs_on_the_cloud_workers_and_survives_a_cloud_restart(
        tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    cloud = d.start_cloud()
    r = post(f"{d.base}/api/v1/tasks", {"handler": "echo", "args": {"x": 1}, "idempotency_key": "k-1"})
    t = done(d, r["id"])
    assert t["state"] == "succeeded" and t["result"] == {"x": 1}
    assert t["kind"] == "scheduled" and t["node"] == "cloud"
    assert "RUN ON cloud cloud" in t["placement"] and "history:" in t["placement"]
    again = post(f"{d.base}/api/v1/tasks", {"handler": "echo", "args": {"x": 1}, "idempotency_key": "k-1"})
    assert again == {"id": r["id"], "state": "queued", "duplicate": True}
    with pytest.raises(urllib.error.HTTPError) as refused:  # the key of another task
        post(f"{d.base}/api/v1/tasks", {"handler": "echo", "args": {"x": 2}, "idempotency_key": "k-1"})
    assert refused.value.code == 409
    # a long one is running when the cloud is SIGKILLed: after the restart it is restored (its holder, the
    # old cloud process, never reports again: it is lost after the lease and runs again)
    long = post(f"{d.base}/api/v1/tasks", {"handler": "sleep", "args": {"seconds": 30}, "max_attempts": 2})
    wait_for(lambda: task(d, long["id"])["state"] == "running", timeout=20, message="sleep running")
    cloud.kill()
    cloud = d.start_cloud()
    t = wait_for(lambda: (x := task(d, long["id"]))["attempts"] >= 2 and x, timeout=30, message="re-run")
    assert "restored" in t["placement"] and "lease lost" in t["placement"]
    assert post(f"{d.base}/api/v1/tasks", {"handler": "echo", "args": {"x": 1}, "idempotency_key": "k-1"})["duplicate"]
    r = post(f"{d.base}/api/v1/tasks/{long['id']}/cancel", {})
    assert r["state"] == "cancelled"
    nodes = get(f"{d.base}/api/v1/nodes")
    assert [n["node"] for n in nodes if n["tier"] == "cloud"] == ["cloud"]
    assert json.dumps(nodes)  # serialisable


def test_a_task_on_the_gateway_moves_to_the_cloud_when_the_gateway_is_killed(
        tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    gw = d.start("gateway", d.topo.gateway)
    wait_for(lambda: any(n["node"] == d.topo.gateway and n["live"] for n in get(f"{d.base}/api/v1/nodes")),
             timeout=30, message="the gateway is an executor")
    gw_node = next(n for n in get(f"{d.base}/api/v1/nodes") if n["node"] == d.topo.gateway)
    assert gw_node["tier"] == "gateway" and gw_node["slots"] == 2
    quick = post(f"{d.base}/api/v1/tasks", {"handler": "echo", "args": {"y": 2}, "site": d.topo.site})
    t = done(d, quick["id"])
    assert t["state"] == "succeeded" and t["node"] == d.topo.gateway and t["result"] == {"y": 2}
    slow = post(f"{d.base}/api/v1/tasks", {"handler": "sleep", "args": {"seconds": 60}, "site": d.topo.site})
    wait_for(lambda: (x := task(d, slow["id"]))["state"] == "running" and x["node"] == d.topo.gateway,
             timeout=20, message="sleep running on the gateway")
    killed = time.monotonic()
    gw.kill()
    t = wait_for(lambda: (x := task(d, slow["id"]))["node"] == "cloud" and x["state"] == "running" and x,
                 timeout=20, message="the task moved to the cloud")
    print(f"gateway SIGKILLed -> its task running on the cloud: {time.monotonic() - killed:.2f} s (lease 5 s)")
    assert "lease lost on gw-home" in t["placement"] and "death message" in t["placement"]
    events = get(f"{d.base}/api/v1/events?type=task.executor_lost")["items"]
    assert any(slow["id"] in e["data"]["tasks"] for e in events)


def test_a_schedule_runs_once_per_interval_across_a_cloud_kill_with_one_coalesced_catch_up(
        tmp_path: Path, procs: ProcessSet) -> None:
    from harness.deploy import OPENER, request

    d = Deployment(tmp_path, procs, devices=1)
    cloud = d.start_cloud()

    def put(body: dict[str, Any]) -> dict[str, Any]:
        req = request(f"{d.base}/api/v1/schedules/tick", json.dumps(body).encode(),
                      {"content-type": "application/json"}, method="PUT")
        try:
            with OPENER.open(req, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"PUT {body}: {exc.code} {exc.read().decode()}") from None

    def tick_tasks() -> list[dict[str, Any]]:
        return [t for t in get(f"{d.base}/api/v1/tasks?limit=1000")["items"]
                if (t["idempotency_key"] or "").startswith("schedule:tick:")]

    def runs() -> list[int]:
        keys = [t["idempotency_key"] for t in tick_tasks()]
        assert len(keys) == len(set(keys)), f"a run was submitted twice: {sorted(keys)}"
        return sorted(int(k.rsplit(":", 1)[1]) for k in keys)

    view = put({"task": {"handler": "echo", "args": {"tick": True}}, "every": 2, "misfire_grace": 30})
    assert view["next_run"] is not None and view["every"] == 2
    wait_for(lambda: len(runs()) >= 2, timeout=20, message="two runs")
    cloud.kill()
    down = time.time()
    time.sleep(5)  # the cloud stays down across two fire times (the outage under test, not a synchronisation)
    cloud = d.start_cloud()
    up = time.time()
    wait_for(lambda: len([r for r in runs() if r / 1000 > up]) >= 2, timeout=20, message="runs after the restart")
    fired = runs()
    assert all((b - a) % 2000 == 0 and b > a for a, b in zip(fired, fired[1:], strict=False)), fired
    # the runs the cloud missed while down are coalesced into one run at its restart (no storm): the fire
    # times have exactly one gap, across the outage; the one run submitted late (if the restart did not
    # land on a fire time) is that catch-up run
    skipped = [(a, b) for a, b in zip(fired, fired[1:], strict=False) if b - a > 2000]
    assert len(skipped) == 1 and skipped[0][0] / 1000 <= down <= skipped[0][1] / 1000 + 2, (skipped, down, fired)
    late = [t["idempotency_key"] for t in tick_tasks()
            if t["created"] - int(t["idempotency_key"].rsplit(":", 1)[1]) > 1000]
    assert len(late) <= 1 and all(int(k.rsplit(":", 1)[1]) == skipped[0][1] for k in late), (late, skipped)
    assert up - down < 30  # within misfire_grace: the catch-up happens
    put({"task": {"handler": "echo", "args": {"tick": True}}, "every": 2, "enabled": False})  # paused: no more
    states = wait_for(lambda: (x := {t["state"] for t in get(f"{d.base}/api/v1/tasks?limit=1000")["items"]
                                     if (t["idempotency_key"] or "").startswith("schedule:tick:")}) == {"succeeded"}
                      and x, timeout=10, message="every run succeeded")
    assert states == {"succeeded"}
    # the schedule counts a run just after submitting its task (a fast run can succeed before it is counted)
    sched = wait_for(lambda: (v := get(f"{d.base}/api/v1/schedules/tick"))["runs"] == len(runs()) and v,
                     timeout=10, message="every run counted")
    assert sched["last_error"] is None and sched["missed"] == 0
    assert sched["next_run"] is None and sched["enabled"] is False


def test_a_checkpointed_task_migrates_from_a_killed_agent_and_resumes_from_its_checkpoint(
        tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=2)
    d.edit("cloud", {"cloud_workers": 0})  # devices and the gateway only
    d.edit(d.topo.gateway, {"task_slots": 0})
    for dev in d.topo.devices:
        d.edit(dev, {"handlers": ["echo", "count"]})
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    agents = {dev: d.start("agent", dev) for dev in d.topo.devices}
    wait_for(lambda: {n["node"] for n in get(f"{d.base}/api/v1/nodes") if n["live"] and n["slots"] > 0}
             >= set(d.topo.devices), timeout=40, message="both agents are executors")
    r = post(f"{d.base}/api/v1/tasks", {"handler": "count", "site": d.topo.site,
                                        "args": {"to": 60, "step": 0.1, "every": 10}})
    t = wait_for(lambda: (x := task(d, r["id"]))["node"] in d.topo.devices and "checkpoint: from" in x["placement"]
                 and x, timeout=30, message="a checkpoint saved")
    first = t["node"]
    agents[first].kill()
    t = done(d, r["id"], timeout=60)
    other = next(dev for dev in d.topo.devices if dev != first)
    assert t["state"] == "succeeded" and t["node"] == other, t
    assert t["result"]["n"] == 60 and t["result"]["resumed_from"] >= 10, t["result"]  # not from zero
    assert f"lease lost on {first}" in t["placement"] and "resuming from its checkpoint" in t["placement"]


def test_majority_replicas_flag_the_executor_that_returns_a_wrong_result(
        tmp_path: Path, procs: ProcessSet, monkeypatch: pytest.MonkeyPatch) -> None:
    # a handler plugin every agent has; one agent has a buggy build of it
    good, bad = tmp_path / "good", tmp_path / "bad"
    # (the buggy one answers at once, the good ones after a moment: a result arriving after the majority
    # agreed is not compared, so the wrong one must come first for this test to see it flagged)
    for root, body in ((good, "await asyncio.sleep(1.0)\n    return {'sum': sum(args['xs'])}"),
                       (bad, "return {'sum': sum(args['xs']) + 1}")):
        (root / "sumfx-1.0.dist-info").mkdir(parents=True)
        (root / "sumfx.py").write_text(f"import asyncio\n\n\nasync def total(args):\n    {body}\n")
        (root / "sumfx-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: sumfx\nVersion: 1.0\n")
        (root / "sumfx-1.0.dist-info" / "entry_points.txt").write_text("[cwsnet.handlers]\ntotal = sumfx:total\n")
    d = Deployment(tmp_path, procs, devices=3)
    d.edit("cloud", {"cloud_workers": 0})
    d.edit(d.topo.gateway, {"task_slots": 0})
    for dev in d.topo.devices:
        d.edit(dev, {"handlers": ["echo", "total"]})
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    for dev in d.topo.devices:
        monkeypatch.setenv("PYTHONPATH", str(bad if dev == d.topo.devices[0] else good))
        d.start("agent", dev)
    wait_for(lambda: {n["node"] for n in get(f"{d.base}/api/v1/nodes") if n["live"] and n["slots"] > 0}
             >= set(d.topo.devices), timeout=40, message="three agents are executors")
    r = post(f"{d.base}/api/v1/tasks", {"handler": "total", "site": d.topo.site, "args": {"xs": [1, 2, 3]},
                                        "replicas": 3, "mode": "majority"})
    t = done(d, r["id"])
    assert t["state"] == "succeeded" and t["result"] == {"sum": 6}
    wrong = d.topo.devices[0]
    assert [wrong, {"sum": 7}] in t["disagreement"], t["disagreement"]
    assert "DISAGREEMENT" in t["placement"] and f"{wrong} said" in t["placement"]
    events = get(f"{d.base}/api/v1/events?type=task.disagreement")["items"]
    assert any(e["data"]["task_id"] == r["id"] for e in events)
    # "first": the first result wins and the other copies are cancelled
    r = post(f"{d.base}/api/v1/tasks", {"handler": "echo", "site": d.topo.site, "args": {"a": 1},
                                        "replicas": 2, "mode": "first"})
    t = done(d, r["id"])
    assert t["state"] == "succeeded" and t["result"] == {"a": 1} and "first result wins" in t["placement"]


def test_a_saturated_device_offloads_its_task_to_the_gateway_and_the_explanation_says_why(
        tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=2)
    for dev in d.topo.devices:
        d.edit(dev, {"handlers": ["echo", "sha256", "burn"], "status_interval": 1.0})
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    for dev in d.topo.devices:
        d.start("agent", dev)
    wait_for(lambda: {n["node"] for n in get(f"{d.base}/api/v1/nodes") if n["live"] and n["slots"] > 0}
             >= {*d.topo.devices, d.topo.gateway}, timeout=40, message="executors live")
    # real CPU load: both devices burn a core each (this machine has two) as direct tasks
    burns = [post(f"{d.base}/api/v1/tasks", {"target": dev, "handler": "burn", "args": {"seconds": 40}})["id"]
             for dev in d.topo.devices]
    origin = d.topo.devices[0]
    wait_for(lambda: next(n["cpu"] for n in get(f"{d.base}/api/v1/nodes") if n["node"] == origin) > 0.85,
             timeout=30, message=f"{origin} saturated")
    data = "aGVsbG8gd29ybGQ="
    r = post(f"{d.base}/api/v1/tasks", {"handler": "sha256", "site": d.topo.site, "origin": origin,
                                        "args": {"data": data}})
    t = done(d, r["id"])
    assert t["state"] == "succeeded" and t["node"] == d.topo.gateway, t["placement"]
    assert t["result"]["bytes"] == 11
    assert "saturated-device-offloads" in t["placement"] and "origin.cpu" in t["placement"]
    print(t["placement"])
    assert len(burns) == 2  # (they end with the agents at teardown)
