"""Node lifecycle with real processes: birth, death by SIGTERM (goodbye) and by SIGKILL (MQTT will),
a task queued for an offline device delivered on its next birth, and a seq that never repeats."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
from harness import ProcessSet, wait_for
from harness.deploy import Deployment, get, post

pytestmark = pytest.mark.integration


def status(d: Deployment, node: str) -> dict:
    return get(f"{d.base}/api/v1/devices/{node}")


def test_sigterm_and_sigkill_deaths_and_restart(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    agent = d.start("agent", "dev-1")
    wait_for(lambda: status(d, "dev-1")["online"], timeout=30, message="dev-1 online")

    # SIGTERM: the agent says goodbye itself (a clean MQTT disconnect sends no will)
    assert agent.terminate(timeout=10) == 0
    st = wait_for(lambda: (s := status(d, "dev-1")) and not s["online"] and s, timeout=15,
                  message="dev-1 offline after SIGTERM")
    assert st["status"].get("reason") == "shutdown"

    # a task for an offline device waits, and runs when the device is back
    task = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"n": 7}})
    assert get(f"{d.base}/api/v1/tasks/{task['id']}")["state"] == "queued"

    agent.restart()
    wait_for(lambda: status(d, "dev-1")["online"], timeout=30, message="dev-1 online again")
    done = wait_for(lambda: (t := get(f"{d.base}/api/v1/tasks/{task['id']}"))["state"] == "succeeded" and t,
                    timeout=20, message="queued task ran after the birth")
    assert done["result"] == {"n": 7}

    # SIGKILL: no goodbye, the broker publishes the sealed will
    agent.kill(signal.SIGKILL)
    st = wait_for(lambda: (s := status(d, "dev-1")) and not s["online"] and s, timeout=15,
                  message="dev-1 offline through its will")
    assert st["status"].get("reason") == "connection lost"

    # the restarted agent never reuses a seq (its counter is durable across SIGKILL)
    agent.restart()
    wait_for(lambda: status(d, "dev-1")["online"], timeout=30, message="dev-1 online after SIGKILL")
    with sqlite3.connect(f"file:{d.lab.path('cloud', 'cloud.db')}?mode=ro", uri=True) as c:
        rows = c.execute("select seq, count(*) from messages where sender='dev-1' group by seq having count(*) > 1"
                         ).fetchall()
        births = c.execute("select seq from messages where sender='dev-1' and kind='birth' order by seq").fetchall()
    assert rows == [] and len(births) == 3 and births == sorted(births)
    events = [e["type"] for e in get(f"{d.base}/api/v1/events?limit=100")["items"] if e["source"] == "dev-1"]
    assert events.count("node.online") == 3 and events.count("node.offline") == 2


def test_task_interrupted_by_a_crash_is_reported_failed_not_rerun(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    agent = d.start("agent", "dev-1")
    wait_for(lambda: status(d, "dev-1")["online"], timeout=30, message="dev-1 online")
    task = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "sleep", "args": {"seconds": 60}})
    wait_for(lambda: get(f"{d.base}/api/v1/tasks/{task['id']}")["state"] == "running", timeout=20,
             message="sleep task running")
    agent.kill(signal.SIGKILL)  # the power goes out mid-task
    agent.restart()
    done = wait_for(lambda: (t := get(f"{d.base}/api/v1/tasks/{task['id']}"))["state"] == "failed" and t,
                    timeout=30, message="the interrupted task reported failed after the restart")
    assert "interrupted" in done["error"]
    agent.wait_log(r"task \S+ was interrupted by a restart", timeout=5)
    assert "running sleep" not in agent.log_text(since_start=True)  # reported, not run again



def _held(d: Deployment, node: str) -> set[int]:
    with sqlite3.connect(f"file:{d.lab.path('agents', node, 'outbox.db')}?mode=ro", uri=True, timeout=5) as c:
        return {r[0] for r in c.execute("select seq from outbox")}


def test_device_reboot_while_offline_loses_nothing_it_stored(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    gw = d.start("gateway", d.topo.gateway)
    agent = d.start("agent", "dev-1")
    wait_for(lambda: status(d, "dev-1")["online"], timeout=30, message="dev-1 online")
    gw.terminate(timeout=10)  # the site goes dark: the agent keeps reading and storing
    wait_for(lambda: len(_held(d, "dev-1")) >= 5, timeout=30, message="readings held in the agent's outbox")
    agent.kill(signal.SIGKILL)  # power cut while offline
    stored_before_reboot = _held(d, "dev-1")
    agent.restart()
    wait_for(lambda: len(_held(d, "dev-1")) >= len(stored_before_reboot) + 3, timeout=30,
             message="more readings held after the reboot")
    gw.restart()
    db = d.lab.path("cloud", "cloud.db")

    def delivered() -> bool:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            seqs = {r[0] for r in c.execute("select seq from messages where sender = 'dev-1'")}
        return stored_before_reboot <= seqs

    wait_for(delivered, timeout=45, message="everything stored before the reboot reached the cloud")
    wait_for(lambda: not _held(d, "dev-1") or len(_held(d, "dev-1")) < 3, timeout=30,
             message="the agent's outbox drained")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        dupes = c.execute("select count(*) from (select seq from messages where sender='dev-1' "
                          "group by seq having count(*) > 1)").fetchone()[0]
    assert dupes == 0
    assert status(d, "dev-1")["status"]["dropped"] == {"telemetry": 0, "status": 0, "event": 0, "result": 0}
