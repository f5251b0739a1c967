"""Policy benchmark: decisions per second of each policy engine, and the end-to-end throughput with
the shipped policies enforced at the gateway versus not (measured in the same run).

Decisions: the engines as the daemons call them, with the shipped policies (plus, for automation
and offload, the example rules below), on a mix of subjects and topics.

- access: ``AccessEngine.decide`` (what ``cwsnet policy explain`` and the REST API evaluate; the
  brokers use the ACLs generated from it);
- routing: ``RoutingEngine.route`` per telemetry message at the gateway (cached per node and stream);
- qos: ``QosEngine.admit`` per message at the gateway (token buckets, one device flooding);
- automation: ``AutomationEngine.observe`` per reading kept at the gateway (a CEL condition);
- offload: ``OffloadEngine.place`` per task, over 3 devices, a gateway and the cloud.

End to end: the same run as ``bench/e2e.py`` (N devices publish sealed telemetry batches QoS 1 to
the gateway, which stores, forwards and gets them acked by the cloud), once with the gateway's
``enforce_policies: false`` and once with the shipped policies enforced, alternating, best of
``--rounds`` each. The ratio on/off is the cost of rate limiting and routing every message.

    python bench/policy.py [--devices 10] [--messages 300] [--batch 10] [--decisions 100000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import run_cwsnet  # noqa: E402

from cwsnet.policy import AccessEngine, Subject, load_policies  # noqa: E402
from cwsnet.policy.automation import AutomationEngine, Observation  # noqa: E402
from cwsnet.policy.offload import NodeMetrics, OffloadEngine, TaskInfo  # noqa: E402
from cwsnet.policy.qos import bench_admit  # noqa: E402
from cwsnet.policy.routing import RoutingEngine  # noqa: E402
from cwsnet.policy.watch import shipped_policies  # noqa: E402

AUTOMATION = """kind: automation
name: bench-automation
rules:
  - name: too-hot
    on: {kind: telemetry, stream: env}
    when: 'values.temp_c > 30.0'
    for: 30s
    clear_when: 'values.temp_c < 28.0'
    then:
      - alert: {severity: warning, message: "{node} is hot"}
"""


def rate(n: int, fn: Callable[[int], object]) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def decisions(n: int, work: Path) -> dict[str, float]:
    folder = work / "policies"
    folder.mkdir(exist_ok=True)
    (folder / "automation.yaml").write_text(AUTOMATION)
    pset = load_policies([shipped_policies(), folder])
    access = AccessEngine(pset)
    subjects = [Subject(f"dev-{i}", "device", "home") for i in range(100)]
    access_topics = ["cws/v1/home/{id}/telemetry/env", "cws/v1/home/{id}/status", "cws/v1/home/{id}/task/cmd",
                     "cws/v1/home/other/telemetry/env"]

    def one_access(i: int) -> None:
        s = subjects[i % 100]
        access.decide(s, "publish", access_topics[i % 4].format(id=s.id), "site")

    routing = RoutingEngine(pset)
    streams = ["env", "health", "system", "health.spo2"]
    auto = AutomationEngine(pset, at="gateway")

    def one_reading(i: int) -> None:
        obs = Observation(site="home", node=f"dev-{i % 100}", kind="telemetry", stream="env",
                          values={"temp_c": 25.0 + (i % 10)}, ts=1_000_000 + i)
        auto.observe(obs, 1_000_000 + i)

    offload = OffloadEngine(pset)
    nodes = [NodeMetrics(node=f"dev-{i}", tier="device", site="home", online=True, cpu=0.3 * i, mem_free=4_000_000,
                         battery=None, queue=i, latency_ms=5.0, bandwidth_kbps=1000.0) for i in range(3)]
    nodes += [NodeMetrics(node="gw-1", tier="gateway", site="home", online=True, cpu=0.2, mem_free=500_000_000,
                          battery=None, queue=1, latency_ms=1.0, bandwidth_kbps=100_000.0),
              NodeMetrics(node="cloud", tier="cloud", site="*", online=True, cpu=0.1, mem_free=8_000_000_000,
                          battery=None, queue=0, latency_ms=40.0, bandwidth_kbps=10_000.0)]

    def one_task(i: int) -> None:
        offload.place(TaskInfo(id=f"t{i}", handler="sha256", input_bytes=(i % 8) * 20_000, data_class=None,
                               site="home", origin=f"dev-{i % 3}", origin_role="device"), nodes)

    return {
        "access_decisions_per_s": rate(n, one_access),
        "routing_decisions_per_s": rate(n, lambda i: routing.route("home", f"dev-{i % 100}", streams[i % 4])),
        "qos_decisions_per_s": bench_admit(n),
        "automation_observations_per_s": rate(n // 4, one_reading),
        "offload_placements_per_s": rate(n // 10, one_task),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--messages", type=int, default=300, help="sealed messages per device in each end-to-end run")
    ap.add_argument("--batch", type=int, default=10, help="readings per sealed message")
    ap.add_argument("--rounds", type=int, default=2, help="end-to-end runs with policies on, and as many off")
    ap.add_argument("--decisions", type=int, default=100_000, help="decisions per engine")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cwsnet-bench-policy-") as tmp:
        work = Path(tmp)
        out: dict[str, float | int | None] = {k: round(v) for k, v in decisions(args.decisions, work).items()}
        on: list[float] = []
        off: list[float] = []
        for r in range(args.rounds):
            for enforce, into in ((False, off), (True, on)):
                res = run_cwsnet(args.devices, args.messages, args.batch, work, name=f"lab-{enforce}-{r}",
                                 gateway={"enforce_policies": enforce})
                into.append(res["messages"] / res["seconds"])
    best_on, best_off = max(on), max(off)
    out |= {
        "devices": args.devices,
        "e2e_messages_per_s_policies_on": round(best_on, 1),
        "e2e_messages_per_s_policies_off": round(best_off, 1),
        "ratio_on_vs_off": round(best_on / best_off, 3),
        # how many decisions of each engine one forwarded message could afford at the measured rate
        "qos_decisions_per_forwarded_message": round(out["qos_decisions_per_s"] / best_on),
        "routing_decisions_per_forwarded_message": round(out["routing_decisions_per_s"] / best_on),
    }
    if args.json:
        print(json.dumps(out))
        return
    print("Policy engines (shipped policies) and end to end with them on vs off, same run:")
    for k, v in out.items():
        print(f"  {k:42s} {v}")


if __name__ == "__main__":
    main()
