"""Store-and-forward with real processes: custody acks while the cloud is away, commands held by
the gateway for an offline device (delivered when it returns, even with the cloud down), and an
expired command that is never run, with the reason in the API."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from harness import ProcessSet, wait_for
from harness.db import query
from harness.deploy import Deployment, get, post, text

pytestmark = pytest.mark.integration


rows = query


def ledger(d: Deployment, node: str) -> dict[str, int]:
    return dict(rows(d.lab.path("agents", node, "outbox.db"), "select outcome, count(*) from ledger group by 1"))


def gateway_outbox(d: Deployment) -> int:
    return rows(d.lab.path("gateway", "uplink-outbox.db"), "select count(*) from outbox")[0][0]


def held_commands(d: Deployment) -> list[tuple]:
    return rows(d.lab.path("gateway", "downlink.db"), "select node, seq from held")


def test_custody_acks_free_the_agent_while_the_cloud_is_down(tmp_path: Path, procs: ProcessSet) -> None:
    """The gateway takes responsibility: the agent's outbox empties (ledger rows become `acked`)
    although the cloud is not running, and every acked message reaches the cloud once it starts."""
    d = Deployment(tmp_path, procs, devices=2)
    d.start("gateway", d.topo.gateway)
    for dev in d.topo.devices:
        d.start("agent", dev)
    wait_for(lambda: all(ledger(d, dev).get("acked", 0) >= 5 for dev in d.topo.devices), timeout=30,
             message="custody acks from the gateway with the cloud down")
    assert gateway_outbox(d) >= 10  # held for the cloud, not delivered anywhere yet
    for dev in d.topo.devices:  # the agents hold (almost) nothing: the gateway has custody
        assert ledger(d, dev).get("held", 0) <= 12, ledger(d, dev)

    d.start_cloud()
    wait_for(lambda: gateway_outbox(d) == 0, timeout=60, message="gateway outbox drained to the cloud")
    # the figures devices and the gateway report are Prometheus metrics at the cloud
    metrics = wait_for(lambda: (m := text(f"{d.base}/metrics"))
                       and 'cwsnet_node_outbox_dropped_total{class="telemetry",node="dev-1"} 0.0' in m and m,
                       timeout=30, message="device drop counters in /metrics")
    assert 'cwsnet_node_outbox_fill{node="gw-home"}' in metrics
    for dev in d.topo.devices:
        procs[dev].terminate()
    # every message the device saw acknowledged is in the cloud, exactly once
    for dev in d.topo.devices:
        acked = {s for (s,) in rows(d.lab.path("agents", dev, "outbox.db"),
                                    "select seq from ledger where outcome = 'acked'")}
        wait_for(lambda dev=dev, acked=acked: acked <= {s for (s,) in rows(
            d.lab.path("cloud", "cloud.db"), "select seq from messages where sender = ?", (dev,))},
            timeout=30, message=f"{dev}'s acked messages at the cloud")
        dupes = rows(d.lab.path("cloud", "cloud.db"),
                     "select seq, count(*) from messages where sender = ? group by seq having count(*) > 1", (dev,))
        assert dupes == []


def test_command_held_by_the_gateway_runs_when_the_device_returns_with_the_cloud_down(
        tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    cloud = d.start_cloud()
    d.start("gateway", d.topo.gateway)
    agent = d.start("agent", "dev-1")
    wait_for(lambda: d.online() == {"dev-1"}, timeout=30, message="dev-1 online")
    assert agent.terminate(timeout=10) == 0
    wait_for(lambda: d.online() == set(), timeout=15, message="dev-1 offline")

    task = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"n": 42}})
    wait_for(lambda: len(held_commands(d)) == 1, timeout=15, message="the gateway holds the command")
    cloud.kill(signal.SIGKILL)  # the cloud is gone; the device comes back: the gateway delivers
    agent.restart()
    wait_for(lambda: held_commands(d) == [], timeout=30, message="the device's receipt frees the held command")
    wait_for(lambda: rows(d.lab.path("agents", "dev-1", "agent.db"),
                          "select done from seen_tasks where task_id = ?", (task["id"],)) == [(1,)],
             timeout=30, message="the task ran and its result is in the gateway's custody")

    cloud.restart()
    cloud.wait_http(f"{d.base}/healthz", timeout=30, status=200)
    done = wait_for(lambda: (t := get(f"{d.base}/api/v1/tasks/{task['id']}"))["state"] == "succeeded" and t,
                    timeout=30, message="the result reaches the cloud")
    assert done["result"] == {"n": 42}


def test_expired_command_is_not_run_and_the_api_says_why(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    agent = d.start("agent", "dev-1")
    wait_for(lambda: d.online() == {"dev-1"}, timeout=30, message="dev-1 online")
    assert agent.terminate(timeout=10) == 0
    wait_for(lambda: d.online() == set(), timeout=15, message="dev-1 offline")

    task = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {}, "timeout": 2})
    wait_for(lambda: len(held_commands(d)) == 1, timeout=15, message="the gateway holds the command")
    expired = wait_for(lambda: (t := get(f"{d.base}/api/v1/tasks/{task['id']}"))["state"] == "expired" and t,
                       timeout=30, message="the task expires at the cloud")
    assert "deadline passed" in expired["error"]
    # the gateway drops it at its expiry (the clear header's exp), so the device never sees it
    wait_for(lambda: held_commands(d) == [], timeout=30, message="the gateway drops the expired command")
    agent.restart()
    wait_for(lambda: d.online() == {"dev-1"}, timeout=30, message="dev-1 back")
    assert rows(d.lab.path("agents", "dev-1", "agent.db"), "select task_id from seen_tasks") == []
    wait_for(lambda: "expired before dev-1 came back" in procs[d.topo.gateway].log_text(), timeout=5,
             message="the gateway logs why it dropped the command")
    after = get(f"{d.base}/api/v1/tasks/{task['id']}")
    assert after["state"] == "expired" and after["error"] == expired["error"]
