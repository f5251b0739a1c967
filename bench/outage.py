"""Outage benchmark: the cloud is down while a backlog builds up at the gateway, then it returns.

1. Provision a home lab (cloud, gateway, N devices) and start the gateway only: its uplink to the
   cloud broker is down.
2. N simulated devices (one paho client each, with the device's own credentials, in parallel
   threads) publish M sealed telemetry messages in total, QoS 1, to the gateway's site broker.
   Accumulation ends when the gateway's durable outbox holds all M.
3. Start the cloud. Replay is timed from cloud-ready (``/healthz`` 200 with its ingest link up)
   until the cloud store holds all M; the gateway's outbox must then drain to empty.
4. In the same run, on the same disk: insert the same M payloads into a fresh WAL SQLite table
   (``synchronous=FULL``) 500 rows per transaction, as the gateway's group commit does. That
   raw batched insert rate is the ceiling the replay rate is compared with.
5. Check that every message is stored at the cloud exactly once (same message id), and that the
   cloud stored each device's messages in increasing ``seq`` order (``messages`` rowid order).

    python bench/outage.py [--devices 20] [--messages 100000] [--max-ahead 0] [--keep] [--json]

Exits non-zero if any check fails. ``tests/test_outage.py`` runs the same scenario through
:func:`run_outage`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cwsnet import topics  # noqa: E402
from cwsnet.bundle import Bundle  # noqa: E402
from cwsnet.endpoint import Endpoint  # noqa: E402
from cwsnet.homelab import HomeLab, Topology  # noqa: E402
from cwsnet.replay import SeqCounter  # noqa: E402

STREAM = "outage"
RAW_BATCH = 500  # rows per transaction in the raw insert baseline (the gateway commits up to 500)
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never via env proxies


class OutageError(AssertionError):
    """A stage did not finish in time, or a daemon died (an AssertionError, so pytest shows it plainly)."""


class Handle(Protocol):
    """What :func:`run_outage` needs of a started process (``tests/harness``'s ManagedProcess fits)."""

    name: str

    @property
    def alive(self) -> bool: ...

    def log_tail(self, lines: int = 40) -> str: ...


StartFn = Callable[[str, list[str]], Handle]


# -- processes (the bench's own; the test passes the harness's ProcessSet.start instead) ----------


class Proc:
    """A daemon in its own process group, output in a log file; terminate() = SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)  # pgid == pid: start_new_session
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(10)
        self._signal(signal.SIGKILL)  # stragglers in the group


class ProcSet:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.log_dir)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Meter:
    """CPU seconds (user + system) and peak RSS of the daemons, sampled in a background thread."""

    def __init__(self) -> None:
        self.procs: dict[str, psutil.Process] = {}
        self.peak_rss: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="outage-meter", daemon=True)
        self._thread.start()

    def watch(self, name: str, handle: Handle) -> None:
        pid = getattr(handle, "pid", None)
        if pid is not None:
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.Error:
                pass

    def cpu(self) -> dict[str, float]:
        out = {"bench": time.process_time()}  # this process: the simulated devices' publishers
        for name, p in list(self.procs.items()):
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for name, p in list(self.procs.items()):
                try:
                    self.peak_rss[name] = max(self.peak_rss.get(name, 0), p.memory_info().rss)
                except psutil.Error:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 1) for k in after if k in before}


def wait_until(pred: Callable[[], Any], timeout: float, what: str, watch: tuple[Handle, ...] = (),
               interval: float = 0.1) -> Any:
    """Poll ``pred`` until truthy (returned) or ``timeout``; fail at once if a watched process died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - "not yet"; reported on timeout
            last = f"{type(exc).__name__}: {exc}"
        for h in watch:
            if not h.alive:
                raise OutageError(f"{h.name} died while waiting for {what}; log tail:\n{h.log_tail()}")
        if time.monotonic() >= deadline:
            raise OutageError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def wait_count(stats: Callable[[], tuple], target: int, timeout: float, stall: float, what: str,
               watch: tuple[Handle, ...] = (), interval: float = 0.2) -> tuple:
    """Poll ``stats()`` (a tuple whose first item is a count) until the count reaches ``target``;
    returns that tuple. Fails if the count has not grown for ``stall`` seconds (a stuck pipeline is
    reported at once, a slow one is left to finish) or after ``timeout`` seconds in all."""
    start = time.monotonic()
    best, best_at = -1, start
    while True:
        now = time.monotonic()
        try:
            last = stats()
        except sqlite3.Error as exc:  # busy or not created yet: "not yet"
            last = (best, f"{type(exc).__name__}: {exc}")
        if last[0] >= target:
            return last
        if last[0] > best:
            best, best_at = last[0], now
        for h in watch:
            if not h.alive:
                raise OutageError(f"{h.name} died while waiting for {what} (at {best} of {target}); "
                                  f"log tail:\n{h.log_tail()}")
        if now - best_at >= stall:
            raise OutageError(f"{what}: stuck at {best} of {target} for {stall:.0f} s")
        if now - start >= timeout:
            raise OutageError(f"{what}: only {best} of {target} after {timeout:.0f} s")
        time.sleep(interval)


def daemon_argv(lab: HomeLab, kind: str, node: str) -> list[str]:
    return [sys.executable, "-m", "cwsnet", "--log-level", "warning", kind, "--config", str(lab.config_path(node))]


# -- the lab and the load -----------------------------------------------------------------------


def provision(workdir: Path, devices: int) -> tuple[HomeLab, Topology]:
    """A home lab with ``devices`` devices; the gateway retries the cloud at most every second, so
    replay starts within a second of the cloud's return (the default backoff caps at 30 s)."""
    lab = HomeLab(workdir / "lab")
    topo = lab.init(Topology(site="out", gateway="gw-out", devices=[f"d{i:02d}" for i in range(devices)],
                             cloud_mqtt_port=free_port(), gateway_mqtt_port=free_port(), http_port=free_port(),
                             cloud_mqtts_port=free_port(), gateway_mqtts_port=free_port()))
    path = lab.config_path(topo.gateway)
    cfg = yaml.safe_load(path.read_text())
    cfg["reconnect"] = {"min_delay": 0.2, "max_delay": 1.0}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return lab, topo


@dataclass
class DeviceLoad:
    node: str
    bundle: Bundle
    topic: str
    payloads: list[bytes] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


def seal_load(lab: HomeLab, topo: Topology, messages: int) -> list[DeviceLoad]:
    """Split ``messages`` over the devices and seal each one as one-reading telemetry to the cloud."""
    n = len(topo.devices)
    loads = []
    for i, node in enumerate(topo.devices):
        b = Bundle.load(lab.bundle_path(node))
        ep = Endpoint(b.identity, SeqCounter(1, lambda mark: None), {"cloud": b.cloud_public_key}.get)
        d = DeviceLoad(node, b, topics.telemetry(topo.site, node, STREAM))
        for k in range(messages // n + (1 if i < messages % n else 0)):
            body = {"stream": STREAM, "readings": [{"ts": int(time.time() * 1000), "values": {"v": k}}]}
            payload, header = ep.seal(d.topic, "telemetry", body, to="cloud")
            d.payloads.append(payload)
            d.seqs.append(header.seq)
            d.ids.append(header.msg_id)
        loads.append(d)
    return loads


def connect(port: int, bundle: Bundle, timeout: float = 10.0) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=bundle.identity.node)
    c.username_pw_set(bundle.mqtt_username, bundle.mqtt_password)
    c.max_inflight_messages_set(50)
    c.max_queued_messages_set(0)  # unbounded: publish() queues behind the in-flight window
    connected = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p: connected.set() if not rc.is_failure else None
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not connected.wait(timeout):
        c.loop_stop()
        raise OutageError(f"{bundle.identity.node} could not connect to the site broker on port {port}")
    return c


def publish(clients: list[tuple[paho.Client, DeviceLoad]], skip_first: set[str], timeout: float,
            held: Callable[[], int] | None = None, max_ahead: int = 0, chunk: int = 50,
            watch: tuple[Handle, ...] = ()) -> float:
    """Every device publishes its payloads QoS 1 in seq order from its own thread; returns when all
    are PUBACKed by the site broker (seconds taken). ``skip_first``: devices whose first message is
    already at the gateway (the readiness probe). Fails at once if a ``watch``ed process dies.

    With ``held`` (messages stored at the gateway) and ``max_ahead``, the devices together keep at
    most about ``max_ahead`` messages published but not yet stored (flow control, as agents waiting
    for custody acks would); otherwise they publish as fast as the site broker PUBACKs."""
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    lock = threading.Lock()
    state = {"published": sum(1 for _c, d in clients if d.node in skip_first), "held": 0}
    done = threading.Event()

    def poll_held() -> None:
        assert held is not None
        while not done.wait(0.05):
            try:
                state["held"] = held()
            except Exception:  # noqa: BLE001 - the next poll tries again
                pass

    def gone() -> str | None:
        if time.monotonic() > deadline:
            return f"not done after {timeout:.0f} s"
        dead = [h.name for h in watch if not h.alive]
        return f"{', '.join(dead)} died" if dead else None

    def run(client: paho.Client, d: DeviceLoad) -> None:
        try:
            payloads = d.payloads[1:] if d.node in skip_first else d.payloads
            infos = []
            for k in range(0, len(payloads), chunk):
                while held is not None and state["published"] - state["held"] > max_ahead:
                    if why := gone():
                        errors.append(f"{d.node}: {why}")
                        return
                    time.sleep(0.01)  # flow control: wait for the gateway to catch up
                infos += [client.publish(d.topic, p, qos=1) for p in payloads[k:k + chunk]]
                with lock:
                    state["published"] += len(payloads[k:k + chunk])
            for info in infos:
                while not info.is_published():
                    if why := gone():
                        errors.append(f"{d.node}: not all PUBACKed: {why}")
                        return
                    info.wait_for_publish(0.5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{d.node}: {type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    poller = threading.Thread(target=poll_held, name="pub-held", daemon=True) if held is not None else None
    if poller is not None:
        poller.start()
    threads = [threading.Thread(target=run, args=c, name=f"pub-{c[1].node}") for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    if errors:
        raise OutageError("publishing failed: " + "; ".join(errors[:5]))
    return time.monotonic() - t0


# -- reading the databases (read-only) ----------------------------------------------------------


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def outbox_path(lab: HomeLab) -> Path:
    return lab.path("gateway", "uplink-outbox.db")


def cloud_db(lab: HomeLab) -> Path:
    return lab.path("cloud", "cloud.db")


def outbox_stats(lab: HomeLab) -> tuple[int, float | None]:
    """(messages held by the gateway, wall-clock time of the latest commit into the outbox)."""
    if not outbox_path(lab).exists():
        return 0, None
    with _ro(outbox_path(lab)) as db:
        count, last = db.execute("select count(*), max(received) from outbox").fetchone()
    return count, last


def cloud_stats(lab: HomeLab) -> tuple[int, float | None, float | None]:
    """(telemetry messages stored at the cloud, first and last store time in wall-clock seconds)."""
    if not cloud_db(lab).exists():
        return 0, None, None
    with _ro(cloud_db(lab)) as db:
        count, first, last = db.execute(
            "select count(*), min(received), max(received) from messages where kind = 'telemetry'").fetchone()
    return count, first and first / 1000, last and last / 1000


def cloud_ready(http_port: int) -> bool:
    """The cloud answers /healthz with its database and its ingest link to the broker up."""
    with OPENER.open(f"http://127.0.0.1:{http_port}/healthz", timeout=2) as r:
        return r.status == 200 and json.loads(r.read()).get("broker") == "up"


def verify(lab: HomeLab, loads: list[DeviceLoad]) -> dict[str, Any]:
    """Compare what the cloud stored with what the devices published.

    Per device, the seqs in the order the cloud stored them (``messages`` rowid) must be exactly
    the published seqs, in increasing order: nothing missing, nothing extra, nothing twice, no
    reordering; each with the message id it was sealed with; one telemetry row each."""
    with _ro(cloud_db(lab)) as db:
        rows = db.execute("select sender, seq, msg_id from messages where kind = 'telemetry' order by rowid").fetchall()
        readings = db.execute("select count(*) from telemetry where stream = ?", [STREAM]).fetchone()[0]
    stored: dict[str, list[tuple[int, str]]] = {}
    for sender, seq, msg_id in rows:
        stored.setdefault(sender, []).append((seq, msg_id))
    expected_total = sum(len(d.seqs) for d in loads)
    report: dict[str, Any] = {
        "expected": expected_total, "stored": len(rows), "readings": readings,
        "missing": 0, "extra": 0, "duplicates": 0, "id_mismatches": 0, "out_of_order": {},
    }
    for d in loads:
        got = stored.pop(d.node, [])
        seqs = [s for s, _ in got]
        want = dict(zip(d.seqs, d.ids, strict=True))
        report["missing"] += len(set(want) - set(seqs))
        report["extra"] += len(set(seqs) - set(want))
        report["duplicates"] += len(seqs) - len(set(seqs))
        report["id_mismatches"] += sum(1 for s, i in got if s in want and want[s] != i)
        inversions = [k for k in range(1, len(seqs)) if seqs[k] <= seqs[k - 1]]
        if inversions:
            k = inversions[0]
            report["out_of_order"][d.node] = {"count": len(inversions), "first_at": k,
                                              "around": seqs[max(0, k - 3):k + 3]}
    report["extra"] += sum(len(v) for v in stored.values())  # telemetry from senders we did not run
    return report


def failures(report: dict[str, Any], outbox_left: int) -> list[str]:
    out = []
    if report["stored"] != report["expected"]:
        out.append(f"cloud stored {report['stored']} of {report['expected']} messages")
    if report["readings"] != report["expected"]:
        out.append(f"cloud stored {report['readings']} readings for {report['expected']} one-reading messages")
    for key in ("missing", "extra", "duplicates", "id_mismatches"):
        if report[key]:
            out.append(f"{key}: {report[key]}")
    for node, info in report["out_of_order"].items():
        out.append(f"{node}: {info['count']} seq inversions in cloud store order, first at #{info['first_at']} "
                   f"(around {info['around']})")
    if outbox_left:
        out.append(f"gateway outbox still holds {outbox_left} messages")
    return out


def raw_insert_rate(path: Path, loads: list[DeviceLoad], batch: int = RAW_BATCH) -> float:
    """Insert the same payloads into a fresh WAL table (synchronous=FULL, unique (sender, seq),
    like the gateway outbox), ``batch`` rows per transaction; returns rows per second."""
    rows = [(d.node, seq, d.topic, p) for d in loads for seq, p in zip(d.seqs, d.payloads, strict=True)]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("pragma journal_mode=wal")
        db.execute("pragma synchronous=full")
        db.execute("create table outbox (id integer primary key, sender text not null, seq integer not null, "
                   "topic text not null, payload blob not null, received real)")
        db.execute("create unique index outbox_sender_seq on outbox(sender, seq)")
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            now = time.time()
            db.execute("begin immediate")
            db.executemany("insert into outbox (sender, seq, topic, payload, received) values (?, ?, ?, ?, ?)",
                           [(*r, now) for r in rows[i:i + batch]])
            db.execute("commit")
        elapsed = time.perf_counter() - t0
    finally:
        db.close()
    return len(rows) / elapsed


# -- the scenario ---------------------------------------------------------------------------------


def run_outage(workdir: Path, start: StartFn, devices: int = 20, messages: int = 100_000,
               stage_timeout: float = 600.0, stall: float = 60.0, log: Callable[[str], None] = lambda s: None,
               max_ahead: int = 0) -> dict[str, Any]:
    """Run the whole scenario; returns the figures, ``report`` (from :func:`verify`) and
    ``failures`` (empty when every check passed). Raises :class:`OutageError` if a stage takes
    longer than ``stage_timeout`` or makes no progress for ``stall`` seconds, or a daemon dies.
    ``max_ahead``: see :func:`publish` (0: devices publish as fast as the site broker takes it)."""
    lab, topo = provision(workdir, devices)
    t = time.perf_counter()
    loads = seal_load(lab, topo, messages)
    seal_s = time.perf_counter() - t
    payload_bytes = len(loads[0].payloads[0])
    log(f"sealed {messages} messages for {devices} devices in {seal_s:.1f} s ({payload_bytes} bytes each)")

    gw = start(topo.gateway, daemon_argv(lab, "gateway", topo.gateway))
    meter = Meter()
    meter.watch("gateway", gw)
    clients: list[tuple[paho.Client, DeviceLoad]] = []
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", topo.gateway_mqtt_port), 0.5).close() or True,
                   30, "the site broker to accept connections", (gw,))
        clients = [(connect(topo.gateway_mqtt_port, d.bundle), d) for d in loads]
        # Readiness probe: the bridge must be subscribed before the load starts, or the site broker
        # would drop messages nobody subscribes to yet. Re-publish the first message until the outbox
        # holds it (the outbox is unique on (sender, seq), so repeats are no harm).
        probe_client, probe = clients[0]

        def probe_stored() -> bool:
            probe_client.publish(probe.topic, probe.payloads[0], qos=1)
            return outbox_stats(lab)[0] >= 1

        wait_until(probe_stored, 30, "the gateway's bridge to store a first message", (gw,), interval=0.3)

        # -- accumulate while the cloud is down
        cpu0 = meter.cpu()
        t_pub = time.time()
        publish_s = publish(clients, {probe.node}, stage_timeout, watch=(gw,),
                            held=(lambda: outbox_stats(lab)[0]) if max_ahead else None, max_ahead=max_ahead)
        # the site broker PUBACKs a device on receipt, before the bridge has stored the message:
        # what is not yet in the outbox now lives only in the gateway process's memory
        held_at_puback = outbox_stats(lab)[0]
        log(f"all {messages} PUBACKed by the site broker in {publish_s:.1f} s; the outbox holds {held_at_puback}")
        held = wait_count(lambda: outbox_stats(lab), messages, stage_timeout, stall,
                          f"the gateway outbox to hold {messages} messages", (gw,))
        accumulate_s = held[1] - t_pub
        cpu_accumulate = cpu_delta(cpu0, meter.cpu())
        log(f"outbox holds {held[0]} after {accumulate_s:.1f} s ({messages / accumulate_s:,.0f} msgs/s)")
        for c, _ in clients:
            c.disconnect()
            c.loop_stop()
        clients = []

        # -- the cloud returns
        t_launch = time.time()
        cloud = start("cloud", daemon_argv(lab, "cloud", "cloud"))
        meter.watch("cloud", cloud)
        wait_until(lambda: cloud_ready(topo.http_port), 60, "the cloud to be ready (/healthz, broker up)",
                   (cloud, gw), interval=0.05)
        t_ready = time.time()
        cpu1 = meter.cpu()
        log(f"cloud ready {t_ready - t_launch:.1f} s after launch; replaying")
        done = wait_count(lambda: cloud_stats(lab), messages, stage_timeout, stall,
                          f"the cloud to store {messages} messages", (cloud, gw))
        _count, first_stored, last_stored = done
        cpu_replay = cpu_delta(cpu1, meter.cpu())
        replay_s = last_stored - t_ready
        log(f"cloud stored {done[0]} after {replay_s:.1f} s ({messages / replay_s:,.0f} msgs/s)")
        wait_until(lambda: outbox_stats(lab)[0] == 0, 60, "the gateway outbox to drain (cloud acks)",
                   (cloud, gw), interval=0.1)
        t_empty = time.time()
        outbox_left = outbox_stats(lab)[0]
        report = verify(lab, loads)
    finally:
        meter.stop()
        for c, _ in clients:
            c.disconnect()
            c.loop_stop()

    raw = raw_insert_rate(workdir / "raw-insert.db", loads)
    log(f"raw batched insert: {raw:,.0f} rows/s")
    replay_rate = messages / replay_s
    return {
        "devices": devices,
        "messages": messages,
        "payload_bytes": payload_bytes,
        "seal_s": round(seal_s, 2),
        "publish_s": round(publish_s, 2),
        "accumulate_s": round(accumulate_s, 2),
        "accumulate_msgs_per_s": round(messages / accumulate_s, 1),
        "outbox_at_last_puback": held_at_puback,
        "cpu_s_accumulate": cpu_accumulate,
        "cloud_start_s": round(t_ready - t_launch, 2),
        "first_stored_after_ready_s": round(first_stored - t_ready, 2),
        "replay_s": round(replay_s, 2),
        "replay_msgs_per_s": round(replay_rate, 1),
        "drain_msgs_per_s": round(messages / max(last_stored - first_stored, 1e-3), 1),
        "cpu_s_replay": cpu_replay,
        "outbox_empty_after_ready_s": round(t_empty - t_ready, 2),
        "raw_insert_rows_per_s": round(raw, 1),
        "raw_batch": RAW_BATCH,
        "ratio_replay_vs_raw_insert": round(replay_rate / raw, 4),
        "outbox_left": outbox_left,
        "peak_rss_mib": {k: round(v / 2**20) for k, v in meter.peak_rss.items()},
        "report": report,
        "failures": failures(report, outbox_left),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--messages", type=int, default=100_000, help="messages in total, over all devices")
    ap.add_argument("--keep", action="store_true", help="keep the data dir (printed) instead of deleting it")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline of each stage, seconds")
    ap.add_argument("--max-ahead", type=int, default=0,
                    help="devices keep at most this many messages published but not yet in the gateway's "
                         "outbox (default 0: no flow control, publish as fast as the site broker PUBACKs)")
    args = ap.parse_args()
    if args.devices < 1 or args.messages < args.devices:
        ap.error("need --devices >= 1 and --messages >= --devices")
    # SIGTERM to the bench ends it like Ctrl-C: the finally below stops the daemons
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="cwsnet-outage-"))
    procs = ProcSet(work / "logs")
    say = (lambda s: print(s, file=sys.stderr)) if args.json else print
    try:
        out = run_outage(work, procs.start, args.devices, args.messages, args.timeout, log=say,
                         max_ahead=args.max_ahead)
    except OutageError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.close()
        if args.keep:
            print(f"data dir kept: {work}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"\nOutage: {args.devices} devices, {args.messages} messages held at the gateway, then replayed:")
        for k, v in out.items():
            if k not in ("report", "failures"):
                print(f"  {k:30s} {v}")
        print(f"  {'checks':30s} {'ok' if not out['failures'] else 'FAILED'}")
        for f in out["failures"]:
            print(f"    - {f}")
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
