"""Task args and results larger than one message, end to end (issue 7, protocol §3 "Parts").

Real cloud, gateway and agent processes: big args go down in parts through the gateway's command
store, big results come up in parts through the gateway's uplink outbox, and a result whose parts
are in custody at the gateway survives the gateway's SIGKILL while its uplink is cut.
"""

from __future__ import annotations

import hashlib
import random
import string
import time
from pathlib import Path
from typing import Any

import pytest
from harness import FaultProxy, ProcessSet, wait_for
from harness.db import query
from harness.deploy import Deployment, get, post

pytestmark = pytest.mark.integration

# a camera-like handler plugin: a deterministic blob of args["bytes"] bytes, after args["wait"] seconds
PHOTO = '''import asyncio, hashlib


async def photo(args):
    await asyncio.sleep(args.get("wait", 0))
    seed = hashlib.sha256(str(args["seed"]).encode()).digest()
    data = (seed * (args["bytes"] // 32 + 1))[:args["bytes"]]
    return {"jpeg": data, "sha256": hashlib.sha256(data).hexdigest()}
'''


def photo_bytes(seed: int, n: int) -> bytes:
    s = hashlib.sha256(str(seed).encode()).digest()
    return (s * (n // 32 + 1))[:n]


def plugin(root: Path) -> Path:
    (root / "camfx-1.0.dist-info").mkdir(parents=True)
    (root / "camfx.py").write_text(PHOTO)
    (root / "camfx-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: camfx\nVersion: 1.0\n")
    (root / "camfx-1.0.dist-info" / "entry_points.txt").write_text("[cwsnet.handlers]\nphoto = camfx:photo\n")
    return root


def task(d: Deployment, tid: str) -> dict[str, Any]:
    return get(f"{d.base}/api/v1/tasks/{tid}")


def finished(d: Deployment, tid: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (t := task(d, tid))["state"] in ("succeeded", "failed", "cancelled", "expired") and t,
                    timeout=timeout, message=f"task {tid} finished")


def text(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    return "".join(rnd.choices(string.ascii_letters + string.digits, k=n))


def test_big_args_and_results_travel_in_parts_and_survive_a_gateway_killed_with_them_in_custody(
        tmp_path: Path, procs: ProcessSet, fault_proxy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    proxy: FaultProxy = fault_proxy(d.topo.cloud_mqtts_port)  # the gateway's uplink (TLS) runs through it
    d.edit(d.topo.gateway, {"uplink": {"port": proxy.port, "keepalive": 5}, "retransmit_after": 2.0,
                            "task_slots": 0})
    d.edit("cloud", {"cloud_workers": 0})
    d.edit("dev-1", {"handlers": ["echo", "photo"], "status_interval": 1.0})
    monkeypatch.setenv("PYTHONPATH", str(plugin(tmp_path / "plugin")))
    d.start_cloud()
    gw = d.start("gateway", d.topo.gateway)
    agent = d.start("agent", "dev-1")
    wait_for(lambda: d.online() == {"dev-1"}, timeout=30, message="dev-1 online")
    dev = next(n for n in get(f"{d.base}/api/v1/devices")["items"] if n["id"] == "dev-1")
    assert "parts" in dev["status"]["capabilities"], dev["status"]

    # 1. a direct task with 1.5 MB of args: down in 12 parts, its echo back up in 12 parts
    small_t0 = time.monotonic()
    small = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"note": "x"}})
    assert finished(d, small["id"])["state"] == "succeeded"
    small_s = time.monotonic() - small_t0
    args = {"note": text(1_500_000, seed=1), "n": 7}
    big_t0 = time.monotonic()
    big = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": args})
    t = finished(d, big["id"])
    big_s = time.monotonic() - big_t0
    assert t["state"] == "succeeded", t
    assert t["result"] == args  # every byte, in order
    agent.wait_log(rf"task {big['id']}: succeeded", timeout=5)
    print(f"\n1.5 MB echo (12 parts down, 12 up): {big_s:.2f} s; a small echo: {small_s:.2f} s "
          f"(ratio {big_s / small_s:.1f})")

    # 2. a 3 MB result whose parts are in the gateway's custody when its uplink is cut and it is SIGKILLed
    photo = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "photo",
                                            "args": {"seed": 42, "bytes": 3_000_000, "wait": 2}})
    wait_for(lambda: task(d, photo["id"])["state"] == "running", timeout=30, message="photo running")
    proxy.cut()
    # all 23 parts and the final result are committed in the gateway's uplink outbox (so custody-acked to dev-1)
    outbox = d.lab.path("gateway", "uplink-outbox.db")
    wait_for(lambda: query(outbox, "select count(*) from outbox where sender = 'dev-1' and topic like '%/task/result'"
                           )[0][0] >= 24, timeout=60, message="the photo's parts in the gateway's custody")
    gw.kill()
    assert task(d, photo["id"])["state"] == "running"  # the cloud has not heard of the result yet
    d.start("gateway", d.topo.gateway)
    proxy.restore()
    t = finished(d, photo["id"], timeout=90)
    assert t["state"] == "succeeded", t
    data = photo_bytes(42, 3_000_000)
    assert t["result"]["sha256"] == hashlib.sha256(data).hexdigest()
    import base64

    assert base64.b64decode(t["result"]["jpeg"]) == data  # (the API shows bytes as base64)

    # 3. a scheduled task with big args goes only to an executor that takes parts, and says so
    sched_args = {"blob": text(700_000, seed=2)}
    r = post(f"{d.base}/api/v1/tasks", {"handler": "echo", "site": d.topo.site, "args": sched_args})
    t = finished(d, r["id"])
    assert t["state"] == "succeeded" and t["node"] == "dev-1" and t["result"] == sched_args, t
    assert "needs capability parts" in t["placement"], t["placement"]


def test_the_gateway_takes_big_args_and_returns_a_big_result_and_a_device_that_takes_no_parts_is_refused(
        tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.edit("cloud", {"cloud_workers": 0})
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    wait_for(lambda: any(n["node"] == d.topo.gateway and n["live"] for n in get(f"{d.base}/api/v1/nodes")),
             timeout=30, message="the gateway is an executor")
    # the only executor is the gateway's pool: 700 KB of args down in parts, the echo up in parts
    args = {"blob": text(700_000, seed=3)}
    r = post(f"{d.base}/api/v1/tasks", {"handler": "echo", "site": d.topo.site, "args": args})
    t = finished(d, r["id"])
    assert t["state"] == "succeeded" and t["node"] == d.topo.gateway and t["result"] == args, t
    assert "needs capability parts" in t["placement"], t["placement"]

    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:  # dev-1 never reported a status: no "parts" capability
        post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"b": "x" * 400_000}})
    assert refused.value.code == 413
    said = refused.value.read().decode()
    assert "does not take args in parts" in said and "dev-1" in said, said
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(f"{d.base}/api/v1/tasks", {"handler": "echo", "args": {"b": "x" * 17_000_000}})
    assert refused.value.code == 413 and "at most 16777216" in refused.value.read().decode()


def test_a_site_tasks_big_result_comes_back_to_the_device_that_submitted_it(
        tmp_path: Path, procs: ProcessSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """dev-1 submits a site task; dev-2 runs it and returns 1 MB: up to the gateway in parts, back down to
    dev-1 in parts (held by the gateway like any outcome); the cloud's mirror shows it succeeded."""
    import base64
    import json
    import subprocess
    import sys

    d = Deployment(tmp_path, procs, devices=2)
    d.edit("dev-1", {"task_slots": 0})
    d.edit("dev-2", {"handlers": ["echo", "photo"], "status_interval": 1.0})
    d.lab.path("policies").mkdir(exist_ok=True)
    d.lab.path("policies", "any-device-first.yaml").write_text(  # (sorts before default-offload: see site e2e)
        "kind: offload\nname: any-device-first\nrules:\n  - name: devices-then-gateway\n"
        "    match: {origin_role: device}\n    run_on: [device, gateway]\n    if_unreachable: wait\n")
    monkeypatch.setenv("PYTHONPATH", str(plugin(tmp_path / "plugin")))
    d.start_cloud()
    gw = d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")
    d.start("agent", "dev-2")
    wait_for(lambda: d.online() == {"dev-1", "dev-2"}, timeout=30, message="devices online")
    gw.wait_log(r"uplink connected", timeout=20)
    out = subprocess.run([sys.executable, "-m", "cwsnet", "task", "submit", "--config", str(d.lab.config_path("dev-1")),
                          "photo", "--args", json.dumps({"seed": 7, "bytes": 1_000_000}), "--key", "snap-1", "--json",
                          "--wait", "--timeout", "60"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["state"] == "succeeded" and row["node"] == "dev-2", row
    data = photo_bytes(7, 1_000_000)
    assert base64.b64decode(row["result"]["jpeg"]) == data
    assert row["result"]["sha256"] == hashlib.sha256(data).hexdigest()
    t = wait_for(lambda: (x := task(d, row["task_id"]))["state"] == "succeeded" and x, timeout=30,
                 message="the cloud's mirror")
    assert t["kind"] == "site" and t["result"] is None  # the device has it; the mirror says only that it succeeded
