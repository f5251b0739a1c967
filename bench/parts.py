"""Parts benchmark: how fast task args and results too big for one message travel (protocol §3, "Parts").

A real home lab (cloud, gateway, one CPython agent, as processes) runs a direct ``echo`` of
``--sizes`` megabytes of args on the device: the args go down in 128 KiB parts (cloud -> gateway's
command store -> device) and the same bytes come back up in parts (device outbox -> gateway's uplink
outbox -> cloud store), so each run moves twice its size. Printed per size: seconds from the API's
POST to the stored result, the goodput (MB moved / s), and the ratio against a baseline measured in
the same run: a plain paho loop publishing the same bytes, in messages of the same 128 KiB, QoS 1,
through Mosquitto from one client to a subscriber (no sealing, no storing, one hop instead of four).

    python bench/parts.py [--sizes 1,4,8] [--json]

(An agent's result in parts may take at most half its outbox, 8 MiB by default: bigger sizes need a
bigger ``outbox.max_bytes`` in the agent's config.)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e import cloud_and_gateway, connect, free_port, start_plain_broker, stop_processes, wait_port  # noqa: E402
from tasks import Api, wait_until  # noqa: E402

from cwsnet.homelab import HomeLab, Topology  # noqa: E402
from cwsnet.parts import PART_BYTES  # noqa: E402

MB = 1_000_000


def echo_seconds(api: Api, device: str, size: int, seed: int) -> float:
    rnd = random.Random(seed)
    args = {"blob": "".join(rnd.choices(string.ascii_letters, k=size))}
    t0 = time.monotonic()
    tid = api.call("POST", "/api/v1/tasks", {"target": device, "handler": "echo", "args": args})["id"]

    def done() -> dict[str, Any] | None:
        t = api.call("GET", f"/api/v1/tasks/{tid}")
        return t if t["state"] in ("succeeded", "failed", "cancelled", "expired") else None

    t = wait_until(f"the {size}-byte echo", done, timeout=120 + size / MB * 10)
    seconds = time.monotonic() - t0
    if t["state"] != "succeeded" or t["result"] != args:
        raise SystemExit(f"{size}-byte echo: {t['state']}: {t['error']}")
    return seconds


def baseline_seconds(total: int, workdir: Path) -> float:
    """Seconds for one paho client to get ``total`` bytes to a subscriber in 128 KiB QoS 1 messages."""
    p, port, log = start_plain_broker("mosquitto", workdir)
    try:
        wait_port(port, p, log)
        n = -(-total // PART_BYTES)
        got = threading.Event()
        count = [0]
        sub = connect(port, "bench-parts-sub")
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()

        def on_message(*_a: Any) -> None:
            count[0] += 1
            if count[0] >= n:
                got.set()

        sub.on_message = on_message
        sub.subscribe("bench/parts", qos=1)
        subscribed.wait(10)
        pub = connect(port, "bench-parts-pub")
        payload = b"x" * PART_BYTES
        t0 = time.monotonic()
        infos = [pub.publish("bench/parts", payload, qos=1) for _ in range(n)]
        for info in infos:
            info.wait_for_publish(120)
        if not got.wait(120):
            raise SystemExit(f"baseline: {count[0]}/{n} messages arrived")
        seconds = time.monotonic() - t0
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
        return seconds
    finally:
        p.terminate()
        p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,8", help="comma-separated sizes of args, in MB (10^6 bytes)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(float(s) * MB) for s in args.sizes.split(",")]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cwsnet-bench-parts-") as tmp:
        lab = HomeLab(Path(tmp) / "lab")
        topo = lab.init(Topology(site="bench", gateway="gw-bench", devices=["d0"],
                                 cloud_mqtt_port=free_port(), gateway_mqtt_port=free_port(), http_port=free_port(),
                                 cloud_mqtts_port=free_port(), gateway_mqtts_port=free_port()))
        api = Api(f"http://127.0.0.1:{topo.http_port}", lab.path("admin.token"))
        agents: list[subprocess.Popen] = []
        with cloud_and_gateway(lab, topo):
            try:
                agents.append(subprocess.Popen(
                    [sys.executable, "-m", "cwsnet", "--log-level", "warning", "agent", "--config",
                     str(lab.config_path("d0"))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True))
                wait_until("the device's capabilities", lambda: "parts" in (
                    api.call("GET", "/api/v1/devices")["items"][0]["status"].get("capabilities") or ()))
                out["small_echo_s"] = round(echo_seconds(api, "d0", 100, seed=0), 3)
                for i, size in enumerate(sizes):
                    seconds = echo_seconds(api, "d0", size, seed=i + 1)
                    mb = size / MB
                    out[f"echo_{mb:g}MB_s"] = round(seconds, 2)
                    out[f"echo_{mb:g}MB_goodput_MBps"] = round(2 * mb / seconds, 2)
            finally:
                stop_processes(agents)
        for size in sizes:
            mb = size / MB
            base = statistics.median(baseline_seconds(2 * size, Path(tmp)) for _ in range(3))  # (noisy: median of 3)
            out[f"baseline_{mb:g}MB_s"] = round(base, 3)
            out[f"echo_{mb:g}MB_ratio_vs_paho_mosquitto"] = round(out[f"echo_{mb:g}MB_s"] / max(base, 1e-3), 1)
    if args.json:
        print(json.dumps(out))
        return
    print("Parts: a direct echo of N MB of args on one CPython agent (args down and the result up, in 128 KiB "
          "parts), against a plain paho QoS 1 loop moving the same bytes through Mosquitto, same run:")
    for k, v in out.items():
        print(f"  {k:40s} {v}")


if __name__ == "__main__":
    main()
