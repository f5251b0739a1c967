"""Site tasks end to end (issue 7, protocol §3 "Site tasks"), with real processes: a device submits
work through its local agent (`cwsnet task submit`), its gateway places it by the site's offload
policy, and the cloud records what happened. The gateway's uplink runs through a fault-injecting
proxy: with it cut, work the policy sends to the cloud waits or runs on the device, as each rule's
``if_unreachable`` says, and the explanations the cloud shows afterwards say why.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cbor2
import pytest
from harness import FaultProxy, ProcessSet, wait_for
from harness.deploy import Deployment, get

# (named to sort before default-offload: policies are tried in name order, so its saturated-device rule
# cannot decide first when the machine is loaded and dev-1's CPU is high)
SITE_OFFLOAD = """kind: offload
name: cloud-offload
rules:
  - name: hashes-go-to-the-cloud
    match: {handler: sha256, origin_role: device}
    run_on: [cloud]
    if_unreachable: wait
  - name: echoes-prefer-the-cloud
    match: {handler: echo, origin_role: device}
    run_on: [cloud]
    if_unreachable: local
"""


def submit(d: Deployment, device: str, handler: str, args: dict[str, Any], key: str, wait: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "cwsnet", "task", "submit", "--config", str(d.lab.config_path(device)), handler,
           "--args", json.dumps(args), "--key", key, "--json"] + (["--wait", "--timeout", "60"] if wait else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def site_task(d: Deployment, task_id: str) -> dict[str, Any] | None:
    t = get(f"{d.base}/api/v1/tasks/{task_id}")
    return t if t.get("kind") == "site" and t["state"] in ("succeeded", "failed") else None


def test_site_tasks_go_to_the_cloud_and_wait_or_run_locally_while_the_uplink_is_cut(
    tmp_path: Path, procs: ProcessSet, fault_proxy: Any
) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    (d.lab.path("policies")).mkdir(exist_ok=True)
    d.lab.path("policies", "cloud-offload.yaml").write_text(SITE_OFFLOAD)
    proxy: FaultProxy = fault_proxy(d.topo.cloud_mqtts_port)  # the uplink is TLS: the proxy carries it
    d.edit(d.topo.gateway, {"uplink": {"port": proxy.port, "keepalive": 5}, "retransmit_after": 2.0})
    d.start_cloud()
    gw = d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")
    wait_for(lambda: d.online() == {"dev-1"}, timeout=30, message="dev-1 online")

    # the uplink is up: the policy sends hashes to the cloud, and the device gets the result
    data = base64.b64encode(b"hello site").decode()
    first = submit(d, "dev-1", "sha256", {"data": data}, "hash-1", wait=True)
    assert first["state"] == "succeeded" and first["node"] == "cloud", first
    assert first["result"]["sha256"] == hashlib.sha256(b"hello site").hexdigest()
    shown = wait_for(lambda: site_task(d, first["task_id"]), timeout=20, message="the site task at the cloud")
    assert shown["origin"] == "dev-1" and shown["node"] == "cloud" and shown["site"] == d.topo.site
    assert "cloud-offload/hashes-go-to-the-cloud" in shown["placement"]

    # the uplink is cut: the cloud is unreachable for the gateway's scheduler
    proxy.cut()
    gw.wait_log(r"uplink down: site tasks", timeout=30)
    echo = submit(d, "dev-1", "echo", {"n": 1}, "echo-1", wait=True)  # `local`: runs on the device itself
    assert echo["state"] == "succeeded" and echo["node"] == "dev-1" and echo["result"] == {"n": 1}, echo
    held = submit(d, "dev-1", "sha256", {"data": data}, "hash-2", wait=False)  # `wait`: for the uplink
    gw.wait_log(rf"site task {held['task_id']} \(sha256, key hash-2\) submitted", timeout=20)
    row = submit(d, "dev-1", "sha256", {"data": data}, "hash-2", wait=False)  # the same key: the same task
    assert row["task_id"] == held["task_id"] and row["state"] == "submitted", row

    proxy.restore()
    done = wait_for(lambda: (r := submit(d, "dev-1", "sha256", {"data": data}, "hash-2", wait=False))["state"]
                    != "submitted" and r, timeout=60, message="hash-2 done once the uplink is back")
    assert done["state"] == "succeeded" and done["node"] == "cloud", done

    # what the cloud shows, once the gateway's reports of the outage have come up
    e = wait_for(lambda: site_task(d, echo["task_id"]), timeout=30, message="echo-1 at the cloud")
    assert e["node"] == "dev-1"
    assert "runs on its origin dev-1 (if_unreachable: local)" in e["placement"], e["placement"]
    assert "cloud: lost: unreachable (the gateway's uplink is down)" in e["placement"], e["placement"]
    h = wait_for(lambda: site_task(d, held["task_id"]), timeout=30, message="hash-2 at the cloud")
    assert h["node"] == "cloud"
    assert "waiting: no listed tier can take it now: waits (if_unreachable: wait)" in h["placement"], h["placement"]
    listed = {t["id"] for t in get(f"{d.base}/api/v1/tasks?kind=site")["items"]}
    assert {first["task_id"], echo["task_id"], held["task_id"]} <= listed


def submitter_and_worker(tmp_path: Path, procs: ProcessSet, handler: str) -> tuple[Deployment, Any, Any]:
    """A lab where dev-1 submits site tasks and does not run them, and dev-2 runs ``handler``: (lab, the
    gateway's process, dev-2's process), everything up."""
    d = Deployment(tmp_path, procs, devices=2)
    d.edit("dev-1", {"task_slots": 0})
    d.edit("dev-2", {"handlers": ["echo", handler], "status_interval": 1.0})
    # devices first, then the gateway, whatever dev-1's CPU says (named to sort before default-offload, whose
    # saturated-device rule would send the work to the gateway when the machine running the test is busy)
    d.lab.path("policies").mkdir(exist_ok=True)
    d.lab.path("policies", "any-device-first.yaml").write_text(
        "kind: offload\nname: any-device-first\nrules:\n  - name: devices-then-gateway\n"
        "    match: {origin_role: device}\n    run_on: [device, gateway]\n    if_unreachable: wait\n")
    d.start_cloud()
    gw = d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")
    dev2 = d.start("agent", "dev-2")
    wait_for(lambda: d.online() == {"dev-1", "dev-2"}, timeout=30, message="devices online")
    gw.wait_log(r"uplink connected", timeout=20)
    return d, gw, dev2


def _checkpoint(db: Path, task_id: str) -> dict[str, Any] | None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        row = c.execute("select record from tasks where id = ?", [task_id]).fetchone()
    return None if row is None else cbor2.loads(row[0]).get("checkpoint")


def test_a_site_task_moves_off_a_killed_device_and_resumes_from_its_checkpoint(
    tmp_path: Path, procs: ProcessSet
) -> None:
    d, gw, dev2 = submitter_and_worker(tmp_path, procs, "count")

    sub = submit(d, "dev-1", "count", {"to": 80, "step": 0.1, "every": 10}, "long-1", wait=False)
    tid = sub["task_id"]
    gw.wait_log(rf"{tid}.*dev-2", timeout=30)  # placed on the least loaded device that runs it
    db = d.lab.path("gateway", "site-tasks.db")
    wait_for(lambda: ((_checkpoint(db, tid) or {}).get("n") or 0) >= 20, timeout=30,
             message="a checkpoint of 20 or more from dev-2")
    dev2.kill()  # SIGKILL: its will (death) reaches the gateway, which moves the task at once

    done = wait_for(lambda: (r := submit(d, "dev-1", "count", {"to": 80, "step": 0.1, "every": 10}, "long-1",
                                         wait=False))["state"] != "submitted" and r, timeout=60,
                    message="the task finished elsewhere")
    assert done["state"] == "succeeded" and done["node"] == d.topo.gateway, done
    assert done["result"]["n"] == 80 and done["result"]["resumed_from"] >= 20, done["result"]
    t = wait_for(lambda: site_task(d, tid), timeout=30, message="the moved task at the cloud")
    assert "lease lost on dev-2" in t["placement"] and t["attempts"] == 2, t["placement"]


def withdraw(d: Deployment, device: str, key: str) -> tuple[int, dict[str, Any]]:
    cmd = [sys.executable, "-m", "cwsnet", "task", "withdraw", "--config", str(d.lab.config_path(device)), key,
           "--json", "--wait", "--timeout", "60"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_a_site_task_is_cancelled_by_its_device_or_by_an_operator_through_the_cloud(
    tmp_path: Path, procs: ProcessSet
) -> None:
    d, gw, dev2 = submitter_and_worker(tmp_path, procs, "sleep")

    # the device withdraws what it submitted: the gateway stops it on dev-2
    first = submit(d, "dev-1", "sleep", {"seconds": 120}, "nap-1", wait=False)
    dev2.wait_log(rf"task {first['task_id']}: running sleep", timeout=30)
    code, row = withdraw(d, "dev-1", "nap-1")
    assert code == 0 and row["state"] == "cancelled" and row["error"] == "cancelled by its device dev-1", row
    dev2.wait_log(rf"task {first['task_id']} \(attempt 1\): cancelled by gateway {d.topo.gateway}", timeout=20)
    t = wait_for(lambda: (x := get(f"{d.base}/api/v1/tasks/{first['task_id']}"))["state"] == "cancelled" and x,
                 timeout=30, message="the cloud's row cancelled")
    assert t["kind"] == "site" and "cancelled by its device dev-1" in (t["error"] or "")
    assert withdraw(d, "dev-1", "nap-1") == (0, row)  # again: it has ended, nothing changes

    # an operator cancels one through the cloud's API: sent to the gateway, which owns it
    second = submit(d, "dev-1", "sleep", {"seconds": 120}, "nap-2", wait=False)
    dev2.wait_log(rf"task {second['task_id']}: running sleep", timeout=30)
    wait_for(lambda: get(f"{d.base}/api/v1/tasks/{second['task_id']}").get("state") == "running", timeout=30,
             message="the cloud's row running")
    req = urllib.request.Request(f"{d.base}/api/v1/tasks/{second['task_id']}/cancel", b"{}", method="POST",
                                 headers={"content-type": "application/json",
                                          "authorization": f"Bearer {d.token_file.read_text().strip()}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202 and json.loads(r.read())["state"] == "running"
    done = wait_for(lambda: (x := submit(d, "dev-1", "sleep", {"seconds": 120}, "nap-2", wait=False))["state"]
                    != "submitted" and x, timeout=30, message="the device hears of the cancel")
    assert done["state"] == "cancelled" and "cancelled by an operator (through the cloud)" in done["error"], done
    wait_for(lambda: get(f"{d.base}/api/v1/tasks/{second['task_id']}")["state"] == "cancelled", timeout=30,
             message="the cloud's row cancelled")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 409
