"""Rate-limit benchmark: does a qos limit cap a flooding device without slowing the others?

Two well-behaved devices send sealed one-reading telemetry at a steady rate (``--rate`` each, for
``--seconds``) to a real gateway and cloud; their latency (seal -> committed at the cloud) and
delivered rate are measured in three runs of the same run:

- ``quiet``: nobody else on the site (the baseline);
- ``flood, no limit``: a third device publishes sealed telemetry as fast as it can, ignoring
  custody acks and pauses; the gateway enforces no policies (``enforce_policies: false``);
- ``flood, limited``: the same flood, with a site qos policy limiting that device to 5/s.

Printed: each run's p50/p99 latency and delivered rate of the good devices, the flooder's stored
messages, and the ratios against the quiet baseline.

    python bench/ratelimit.py [--rate 20] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import yaml  # noqa: E402
from e2e import cloud_and_gateway, connect, free_port, pct  # noqa: E402

from cwsnet import topics  # noqa: E402
from cwsnet.bundle import Bundle  # noqa: E402
from cwsnet.endpoint import Endpoint  # noqa: E402
from cwsnet.homelab import HomeLab, Topology  # noqa: E402
from cwsnet.replay import SeqCounter  # noqa: E402

LIMIT = """kind: qos
name: a-bench-limit
rules:
  - name: flooder
    match: {node: flood, channels: [telemetry]}
    limit: {rate: 5/s, burst: 5, over: pause}
"""


def _sealer(lab: HomeLab, node: str) -> tuple[Bundle, Endpoint]:
    b = Bundle.load(lab.bundle_path(node))
    return b, Endpoint(b.identity, SeqCounter(int(time.time() * 1000), lambda m: None),
                       {"cloud": b.cloud_public_key}.get)


def run(work: Path, name: str, rate: float, seconds: float, flood: bool, limited: bool) -> dict[str, float]:
    lab = HomeLab(work / name)
    topo = lab.init(Topology(site="rl", gateway="gw-rl", devices=["good-1", "good-2", "flood"],
                             cloud_mqtt_port=free_port(), gateway_mqtt_port=free_port(), http_port=free_port(),
                             cloud_mqtts_port=free_port(), gateway_mqtts_port=free_port()))
    gw_cfg = lab.config_path(topo.gateway)
    cfg = yaml.safe_load(gw_cfg.read_text())
    if limited:
        (lab.path("policies")).mkdir(exist_ok=True)
        lab.path("policies", "limit.yaml").write_text(LIMIT)
    else:
        cfg["enforce_policies"] = False
    gw_cfg.write_text(yaml.safe_dump(cfg))
    stop = threading.Event()
    flooded = [0]
    with cloud_and_gateway(lab, topo):
        def good(node: str) -> None:
            b, ep = _sealer(lab, node)
            c = connect(topo.gateway_mqtt_port, node, b.mqtt_username, b.mqtt_password)
            topic = topics.telemetry(topo.site, node, "good")
            t0 = time.monotonic()
            sent = []
            for i in range(int(rate * seconds)):
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))  # a steady sender's pace
                payload, _ = ep.seal(topic, "telemetry", {"stream": "good", "readings": [
                    {"ts": int(time.time() * 1000), "values": {"i": i}}]}, to="cloud")
                sent.append(c.publish(topic, payload, qos=1))
            for info in sent:  # disconnecting with PUBACKs outstanding would drop the last ones
                info.wait_for_publish(30)
            c.disconnect()
            c.loop_stop()

        def flooder() -> None:
            b, ep = _sealer(lab, "flood")
            c = connect(topo.gateway_mqtt_port, "flood", b.mqtt_username, b.mqtt_password)
            topic = topics.telemetry(topo.site, "flood", "junk")
            body = {"stream": "junk", "readings": [{"ts": int(time.time() * 1000), "values": {"x": 1}}]}
            while not stop.is_set():
                payload, _ = ep.seal(topic, "telemetry", body, to="cloud")
                c.publish(topic, payload, qos=1).wait_for_publish(10)
                flooded[0] += 1
            c.disconnect()
            c.loop_stop()

        threads = [threading.Thread(target=good, args=(n,)) for n in ("good-1", "good-2")]
        fl = threading.Thread(target=flooder) if flood else None
        if fl:
            fl.start()
            time.sleep(1.0)  # the flood is under way before the good devices start
        start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        if fl:
            fl.join()
        expected = 2 * int(rate * seconds)
        db_path = lab.path("cloud", "cloud.db")
        deadline = time.monotonic() + 120
        rows: list = []
        while time.monotonic() < deadline:
            with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
                rows = db.execute("select received - ts, received from messages where kind = 'telemetry' "
                                  "and sender like 'good-%'").fetchall()
            if len(rows) >= expected:
                break
            time.sleep(0.2)
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            flood_stored = db.execute("select count(*) from messages where sender = 'flood'").fetchone()[0]
    if len(rows) < expected:
        raise SystemExit(f"{name}: the good devices delivered only {len(rows)}/{expected}")
    lat = [r[0] for r in rows]
    last = max(r[1] for r in rows) / 1000
    return {"p50_ms": statistics.median(lat), "p99_ms": pct(lat, 99), "good_per_s": expected / (last - start),
            "flood_sent": flooded[0], "flood_stored": flood_stored}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=20.0, help="messages/s of each well-behaved device")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cwsnet-bench-rl-") as tmp:
        work = Path(tmp)
        quiet = run(work, "quiet", args.rate, args.seconds, flood=False, limited=False)
        open_flood = run(work, "flood-open", args.rate, args.seconds, flood=True, limited=False)
        limited = run(work, "flood-limited", args.rate, args.seconds, flood=True, limited=True)
    out: dict[str, float] = {}
    for name, r in (("quiet", quiet), ("flood_no_limit", open_flood), ("flood_limited", limited)):
        for k, v in r.items():
            out[f"{name}_{k}"] = round(v, 2)
    out["p50_ratio_limited_vs_quiet"] = round(limited["p50_ms"] / max(quiet["p50_ms"], 0.1), 2)
    out["p50_ratio_no_limit_vs_quiet"] = round(open_flood["p50_ms"] / max(quiet["p50_ms"], 0.1), 2)
    out["p99_ratio_limited_vs_quiet"] = round(limited["p99_ms"] / max(quiet["p99_ms"], 0.1), 2)
    out["p99_ratio_no_limit_vs_quiet"] = round(open_flood["p99_ms"] / max(quiet["p99_ms"], 0.1), 2)
    if args.json:
        print(json.dumps(out))
        return
    print("Rate limit: two steady devices, with a flooding third, same run:")
    for k, v in out.items():
        print(f"  {k:36s} {v}")


if __name__ == "__main__":
    main()
