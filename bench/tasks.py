"""Task benchmark: throughput and submit-to-result latency of no-op tasks on each tier.

A real home lab (cloud, gateway, ``--devices`` CPython agents as processes) runs ``--tasks`` ``echo``
tasks per run, submitted through the REST API as fast as one client can:

- ``direct``: the baseline, tasks sent to a named device (``target``), no scheduler involved;
- ``device`` / ``gateway`` / ``cloud``: scheduled tasks (no target) that an offload policy sends to
  that tier (by data class), so each run measures one kind of executor;
- ``site``: *site tasks* a device submits through its local agent (its ``submissions.db``, as
  ``cwsnet task submit`` does) to its gateway, which schedules them by the shipped policy (on the
  device itself while it has a free slot, else the least loaded device, the gateway, the cloud) and
  sends the outcome back. Latency is from the submission row to its outcome, on the device's clock.

Latency is from the API's ``created`` to the stored result (``updated``), both on the cloud's clock.
Printed: tasks/s, p50/p99 latency per run, and each scheduled run's ratios against ``direct``.

    python bench/tasks.py [--tasks 200] [--devices 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import cloud_and_gateway, free_port, pct, stop_processes  # noqa: E402

from cwsnet.homelab import HomeLab, Topology  # noqa: E402

POLICY = """kind: offload
name: a-bench-tiers
rules:
  - name: to-device
    match: {data_class: bench-device}
    run_on: [device]
    if_unreachable: wait
  - name: to-gateway
    match: {data_class: bench-gateway}
    run_on: [gateway]
    if_unreachable: wait
  - name: to-cloud
    match: {data_class: bench-cloud}
    run_on: [cloud]
    if_unreachable: wait
"""
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TERMINAL = ("succeeded", "failed", "cancelled", "expired")


class Api:
    def __init__(self, base: str, token_file: Path) -> None:
        self.base, self.token_file = base, token_file

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data, method=method,
                                     headers={"content-type": "application/json",
                                              "authorization": f"Bearer {self.token_file.read_text().strip()}"})
        with OPENER.open(req, timeout=30) as r:
            return json.loads(r.read())


def wait_until(what: str, fn: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = fn()
        except (urllib.error.URLError, OSError, ValueError):
            v = None
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def run_tier(api: Api, name: str, n: int, body: dict[str, Any]) -> dict[str, float]:
    t0 = time.monotonic()
    ids = [api.call("POST", "/api/v1/tasks", body | {"args": {"i": i}})["id"] for i in range(n)]
    submit_s = time.monotonic() - t0
    want = set(ids)

    def finished() -> list[dict[str, Any]] | None:
        got, offset = [], 0
        while True:  # newest first; read until every one of ours is seen
            page = api.call("GET", f"/api/v1/tasks?limit=500&offset={offset}")
            got += [t for t in page["items"] if t["id"] in want]
            offset += 500
            if offset >= page["total"] or len(got) >= n:
                break
        return got if len(got) == n and all(t["state"] in TERMINAL for t in got) else None

    tasks = wait_until(f"{name}: {n} tasks finished", finished, timeout=60 + n * 0.5)
    bad = [t for t in tasks if t["state"] != "succeeded"]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} task(s) did not succeed, e.g. {bad[0]['state']}: {bad[0]['error']}")
    lat = [t["updated"] - t["created"] for t in tasks]
    span = (max(t["updated"] for t in tasks) - min(t["created"] for t in tasks)) / 1000
    nodes = sorted({t.get("node") or t["target"] for t in tasks})
    return {"tasks_per_s": n / max(span, 1e-3), "p50_ms": statistics.median(lat), "p99_ms": pct(lat, 99),
            "executors": len(nodes), "submitted_per_s": n / max(submit_s, 1e-3)}


def run_site(lab: HomeLab, device: str, n: int) -> dict[str, float]:
    from cwsnet.cli_task import _agent_submissions

    _cfg, bundle, subs = _agent_submissions(str(lab.config_path(device)))
    t0 = time.monotonic()
    keys = [subs.add_new(bundle.identity.node, f"bench-{i}", "echo", {"i": i})[0].key for i in range(n)]
    submit_s = time.monotonic() - t0

    def finished() -> list[Any] | None:
        rows = [subs.get(k) for k in keys]
        return rows if all(r is not None and r.state in TERMINAL for r in rows) else None

    rows = wait_until(f"site: {n} site tasks finished", finished, timeout=60 + n * 0.5)
    bad = [r for r in rows if r.state != "succeeded"]
    if bad:
        raise SystemExit(f"site: {len(bad)} site task(s) did not succeed, e.g. {bad[0].state}: {bad[0].error}")
    lat = [r.done_ms - r.submitted_ms for r in rows]
    span = (max(r.done_ms for r in rows) - min(r.submitted_ms for r in rows)) / 1000
    return {"tasks_per_s": n / max(span, 1e-3), "p50_ms": statistics.median(lat), "p99_ms": pct(lat, 99),
            "executors": len({r.node for r in rows}), "submitted_per_s": n / max(submit_s, 1e-3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=200, help="tasks per run")
    ap.add_argument("--devices", type=int, default=2, help="CPython agents (device executors)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cwsnet-bench-tasks-") as tmp:
        lab = HomeLab(Path(tmp) / "lab")
        topo = lab.init(Topology(site="bench", gateway="gw-bench", devices=[f"d{i}" for i in range(args.devices)],
                                 cloud_mqtt_port=free_port(), gateway_mqtt_port=free_port(), http_port=free_port(),
                                 cloud_mqtts_port=free_port(), gateway_mqtts_port=free_port()))
        lab.path("policies").mkdir(exist_ok=True)
        lab.path("policies", "bench-tiers.yaml").write_text(POLICY)
        api = Api(f"http://127.0.0.1:{topo.http_port}", lab.path("admin.token"))
        agents: list[subprocess.Popen] = []
        with cloud_and_gateway(lab, topo):
            try:
                for d in topo.devices:
                    agents.append(subprocess.Popen(
                        [sys.executable, "-m", "cwsnet", "--log-level", "warning", "agent", "--config",
                         str(lab.config_path(d))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True))
                wait_until("every device online", lambda: all(
                    x["online"] for x in api.call("GET", "/api/v1/devices")["items"]))
                wait_until("the executors", lambda: {x["node"] for x in api.call("GET", "/api/v1/nodes")
                                                     if x["live"] and x["slots"] > 0}
                           >= {*topo.devices, topo.gateway, "cloud"})
                out: dict[str, Any] = {}
                runs = {"direct": {"handler": "echo", "target": topo.devices[0]}}
                for tier in ("device", "gateway", "cloud"):
                    runs[tier] = {"handler": "echo", "site": topo.site, "data_class": f"bench-{tier}"}
                for name, body in runs.items():
                    r = run_tier(api, name, args.tasks, body)
                    for k, v in r.items():
                        out[f"{name}_{k}"] = round(v, 2)
                for k, v in run_site(lab, topo.devices[0], args.tasks).items():
                    out[f"site_{k}"] = round(v, 2)
                for tier in ("device", "gateway", "cloud", "site"):
                    out[f"{tier}_p50_ratio_vs_direct"] = round(out[f"{tier}_p50_ms"] / max(out["direct_p50_ms"], 0.1), 2)
                    out[f"{tier}_rate_ratio_vs_direct"] = round(
                        out[f"{tier}_tasks_per_s"] / max(out["direct_tasks_per_s"], 0.01), 2)
            finally:
                stop_processes(agents)
    if args.json:
        print(json.dumps(out))
        return
    print(f"Tasks: {args.tasks} no-op (echo) tasks per run, {args.devices} device agents, same run:")
    for k, v in out.items():
        print(f"  {k:36s} {v}")


if __name__ == "__main__":
    main()
