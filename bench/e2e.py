"""End-to-end benchmark: N simulated devices -> gateway -> cloud store, against a plain baseline.

CWSNet path: each device seals one reading per message (and, in the batched run, `--batch`
readings per message) and publishes QoS 1 to the gateway's amqtt site broker; the gateway stores
it in its outbox and forwards it to the cloud's amqtt broker; the cloud opens it, stores it
exactly once in SQLite and acks the gateway. Throughput counts readings committed at the cloud;
latency is the cloud's commit time minus the device's seal time.

Baseline, measured in the same run: the same number of readings, as payloads of the same size,
published QoS 1 with paho through Mosquitto to one paho subscriber (no sealing, no storage). The
same plain run through CWSNet's embedded amqtt broker is printed too: the CWSNet path crosses two
such brokers, so it shows how much of the gap is the broker.

    python bench/e2e.py [--devices 10] [--messages 300] [--batch 10]

Prints the figures and ratios; exits non-zero only if a run fails to deliver everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cwsnet import topics  # noqa: E402
from cwsnet.bundle import Bundle  # noqa: E402
from cwsnet.endpoint import Endpoint  # noqa: E402
from cwsnet.homelab import HomeLab, Topology  # noqa: E402
from cwsnet.replay import SeqCounter  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} not open after {timeout} s:\n{log.read_text()[-3000:]}")


def wait_site_ready(lab: HomeLab, gateway: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until the cloud has a status of ``gateway`` saying its bridge is subscribed at the site broker.

    Before that, what a device publishes reaches no subscriber; a real agent would send it again
    (it holds every message until the gateway's custody ack), but the benchmarks' senders do not."""
    db_path = lab.path("cloud", "cloud.db")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{gateway} exited early")
        with contextlib.suppress(sqlite3.Error), sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute("select last_status from nodes where id = ?", (gateway,)).fetchone()
            if row and row[0] and json.loads(row[0]).get("site_link") == "up":
                return
        time.sleep(0.05)
    raise SystemExit(f"{gateway}: its site link was not up after {timeout} s")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def publish_all(clients: list[tuple[paho.Client, list[tuple[str, bytes]]]]) -> float:
    """Each client publishes its messages QoS 1 from its own thread; returns the start time."""
    start = time.time()

    def run(client: paho.Client, msgs: list[tuple[str, bytes]]) -> None:
        infos = [client.publish(t, p, qos=1) for t, p in msgs]
        for info in infos:
            info.wait_for_publish(120)

    threads = [threading.Thread(target=run, args=c) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return start


def connect(port: int, client_id: str, username: str | None = None, password: str | None = None) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_inflight_messages_set(50)
    c.max_queued_messages_set(0)
    if username:
        c.username_pw_set(username, password)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not connected.wait(10):
        raise SystemExit(f"{client_id} could not connect to port {port}")
    return c


@contextlib.contextmanager
def cloud_and_gateway(lab: HomeLab, topo: Topology) -> Iterator[None]:
    """Run the lab's cloud and gateway daemons as processes for the duration of the block."""
    procs: list[subprocess.Popen] = []
    try:
        for name, kind, port in (("cloud", "cloud", topo.cloud_mqtt_port),
                                 (topo.gateway, "gateway", topo.gateway_mqtt_port)):
            log = lab.path("logs", f"{name}.log")
            p = subprocess.Popen([sys.executable, "-m", "cwsnet", "--log-level", "warning", kind, "--config",
                                  str(lab.config_path(name))], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs.append(p)
            wait_port(port, p, log)
        wait_site_ready(lab, topo.gateway, procs[-1])
        yield
    finally:
        stop_processes(procs)


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL those still running after 10 s."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def run_cwsnet(devices: int, messages: int, batch: int, workdir: Path, *, name: str | None = None,
               gateway: dict | None = None) -> dict[str, float]:
    """``gateway``: settings to change in the gateway's config (e.g. ``{"enforce_policies": False}``)."""
    lab = HomeLab(workdir / (name or f"lab-b{batch}"))
    topo = lab.init(Topology(
        site="bench", gateway="gw-bench", devices=[f"b{i}" for i in range(devices)],
        cloud_mqtt_port=free_port(), gateway_mqtt_port=free_port(), http_port=free_port(),
        cloud_mqtts_port=free_port(), gateway_mqtts_port=free_port(),
    ))
    if gateway:
        import yaml

        path = lab.config_path(topo.gateway)
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | gateway))
    with cloud_and_gateway(lab, topo):
        # Devices seal ahead of sending (as a real one seals when it reads), so the throughput run
        # measures the path, not the load generator; sealing cost is timed and reported separately.
        clients = []
        seal_t0 = time.perf_counter()
        total_readings = 0
        for d in topo.devices:
            b = Bundle.load(lab.bundle_path(d))
            ep = Endpoint(b.identity, SeqCounter(0, lambda m: None), {"cloud": b.cloud_public_key}.get)
            topic = topics.telemetry(topo.site, d, "bench")
            msgs = []
            for _ in range(messages):
                now = int(time.time() * 1000)
                body = {"stream": "bench", "readings": [{"ts": now, "values": {"v": i * 1.5}} for i in range(batch)]}
                payload, _ = ep.seal(topic, "telemetry", body, to="cloud")
                msgs.append((topic, payload))
                total_readings += batch
            clients.append((b, msgs))
        seal_s = time.perf_counter() - seal_t0
        payload_size = len(clients[0][1][0][1])
        conns = [(connect(topo.gateway_mqtt_port, f"{b.identity.node}", b.mqtt_username, b.mqtt_password), msgs)
                 for b, msgs in clients]
        # throughput only: latency is measured by run_latency_probe at a modest rate
        start = publish_all(conns)
        db_path = lab.path("cloud", "cloud.db")
        deadline = time.monotonic() + 300
        count = 0
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
                    count = db.execute("select count(*) from telemetry where stream = 'bench'").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= total_readings:
                break
            time.sleep(0.1)
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            rows = db.execute("select received from messages where kind='telemetry'").fetchall()
        end = max(r[0] for r in rows) / 1000 if rows else time.time()
        for c, _ in conns:
            c.disconnect()
            c.loop_stop()
        if count < total_readings:
            raise SystemExit(f"CWSNet delivered only {count}/{total_readings} readings")
        return {"readings": total_readings, "messages": devices * messages, "seconds": end - start,
                "seal_us_per_msg": seal_s / (devices * messages) * 1e6, "payload_bytes": payload_size}


def run_latency_probe(devices: int, workdir: Path, count: int = 200) -> list[float]:
    """Latency of single sealed readings sent one at a time at a modest rate (not a backlog)."""
    lab = HomeLab(workdir / "lab-latency")
    topo = lab.init(Topology(site="lat", gateway="gw-lat", devices=["l0"], cloud_mqtt_port=free_port(),
                             gateway_mqtt_port=free_port(), http_port=free_port(), cloud_mqtts_port=free_port(),
                             gateway_mqtts_port=free_port()))
    with cloud_and_gateway(lab, topo):
        b = Bundle.load(lab.bundle_path("l0"))
        ep = Endpoint(b.identity, SeqCounter(0, lambda m: None), {"cloud": b.cloud_public_key}.get)
        c = connect(topo.gateway_mqtt_port, "l0", b.mqtt_username, b.mqtt_password)
        topic = topics.telemetry(topo.site, "l0", "lat")
        for _ in range(count):
            payload, _ = ep.seal(topic, "telemetry", {"stream": "lat", "readings": [
                {"ts": int(time.time() * 1000), "values": {"v": 1}}]}, to="cloud")
            c.publish(topic, payload, qos=1).wait_for_publish(10)
            time.sleep(0.01)
        db_path = lab.path("cloud", "cloud.db")
        deadline = time.monotonic() + 60
        rows: list = []
        while time.monotonic() < deadline:
            with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
                rows = db.execute("select received - ts from messages where kind='telemetry'").fetchall()
            if len(rows) >= count:
                break
            time.sleep(0.1)
        c.disconnect()
        c.loop_stop()
        return [float(r[0]) for r in rows]


def start_plain_broker(kind: str, workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    """Mosquitto (the baseline) or CWSNet's embedded amqtt broker, anonymous on loopback."""
    port = free_port()
    log = workdir / f"{kind}.log"
    if kind == "mosquitto":
        mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 50\n"
                        "max_queued_messages 0\n")
        argv = [mosq, "-c", str(conf)]
    else:
        argv = [sys.executable, "-m", "cwsnet.broker", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"]
    return subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT), port, log


def run_baseline(devices: int, messages: int, payload_bytes: int, workdir: Path, latency_count: int = 200,
                 broker: str = "mosquitto") -> dict[str, float]:
    p, port, log = start_plain_broker(broker, workdir)
    try:
        wait_port(port, p, log)
        total = devices * messages
        received: list[float] = []
        lat: list[float] = []
        done = threading.Event()
        sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-sub")
        ready = threading.Event()
        sub.on_connect = lambda c, *a: c.subscribe("bench/#", qos=1)
        sub.on_subscribe = lambda *a: ready.set()

        def on_message(_c, _u, m):  # noqa: ANN001
            now = time.time()
            received.append(now)
            sent = float(m.payload[:20].decode())
            lat.append((now - sent) * 1000)
            if len(received) >= total + latency_count:
                done.set()

        sub.on_message = on_message
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        ready.wait(10)

        def payload() -> bytes:
            stamp = f"{time.time():<20.6f}".encode()
            return stamp + b"x" * max(0, payload_bytes - len(stamp))

        # latency probe first, at the same modest rate as the CWSNet probe
        probe = connect(port, "bench-probe")
        for _ in range(latency_count):
            probe.publish("bench/lat", payload(), qos=1).wait_for_publish(10)
            time.sleep(0.01)
        probe_lat = list(lat)
        probe.disconnect()
        probe.loop_stop()
        received.clear()
        conns = [(connect(port, f"bench-{i}"), [(f"bench/{i}", payload()) for _ in range(messages)])
                 for i in range(devices)]
        start = publish_all(conns)
        done_by = time.monotonic() + 120
        while len(received) < total and time.monotonic() < done_by:
            time.sleep(0.02)
        end = max(received) if received else time.time()
        for c, _ in conns:
            c.disconnect()
            c.loop_stop()
        sub.disconnect()
        sub.loop_stop()
        if len(received) < total:
            raise SystemExit(f"baseline delivered only {len(received)}/{total}")
        return {"readings": total, "seconds": end - start, "latency": probe_lat}
    finally:
        p.terminate()
        p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--messages", type=int, default=300, help="messages per device")
    ap.add_argument("--batch", type=int, default=10, help="readings per sealed message in the batched run")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cwsnet-bench-") as tmp:
        work = Path(tmp)
        single = run_cwsnet(args.devices, args.messages, 1, work)
        batched = run_cwsnet(args.devices, max(1, args.messages // args.batch), args.batch, work)
        lat = run_latency_probe(1, work)
        base = run_baseline(args.devices, args.messages, int(single["payload_bytes"]), work)
        amqtt = run_baseline(args.devices, args.messages, int(single["payload_bytes"]), work, broker="amqtt")
    c_rate = single["readings"] / single["seconds"]
    b_rate = batched["readings"] / batched["seconds"]
    m_rate = base["readings"] / base["seconds"]
    out = {
        "devices": args.devices,
        "cwsnet_sealed_readings_per_s": round(c_rate, 1),
        "cwsnet_batched_readings_per_s": round(b_rate, 1),
        "batch": args.batch,
        "baseline_mosquitto_qos1_per_s": round(m_rate, 1),
        "plain_amqtt_qos1_per_s": round(amqtt["readings"] / amqtt["seconds"], 1),
        "ratio_amqtt_vs_baseline": round(amqtt["readings"] / amqtt["seconds"] / m_rate, 3),
        "ratio_single_vs_baseline": round(c_rate / m_rate, 3),
        "ratio_batched_vs_baseline": round(b_rate / m_rate, 3),
        "cwsnet_latency_ms_p50": round(statistics.median(lat), 2) if lat else None,
        "cwsnet_latency_ms_p99": round(pct(lat, 99), 2) if lat else None,
        "baseline_latency_ms_p50": round(statistics.median(base["latency"]), 3),
        "baseline_latency_ms_p99": round(pct(base["latency"], 99), 3),
        "seal_us_per_message": round(single["seal_us_per_msg"], 1),
        "payload_bytes_single_reading": int(single["payload_bytes"]),
    }
    if out["cwsnet_latency_ms_p50"] is not None:
        out["latency_p50_ratio"] = round(out["cwsnet_latency_ms_p50"] / max(out["baseline_latency_ms_p50"], 1e-3), 1)
    if args.json:
        print(json.dumps(out))
        return
    print(f"CWSNet end to end ({args.devices} devices -> gateway -> cloud store), same run baseline Mosquitto:")
    for k, v in out.items():
        print(f"  {k:36s} {v}")


if __name__ == "__main__":
    main()
