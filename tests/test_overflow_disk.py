"""Overflow and full disks, with real processes (cloud, gateway, agents) on loopback.

* An agent whose gateway is away overflows its bounded outbox: telemetry goes first, oldest
  first; status and task results are kept; every drop is counted, reported in the agent's status
  (visible in the cloud API) and recorded in its delivery ledger; everything not dropped reaches
  the cloud exactly once when the gateway is back.
* The agent's or the gateway's data dir fills up (a small tmpfs, or a file-size limit where
  mounting is not allowed): the daemon keeps running, says so in its log and its status, holds on
  to what it has not stored, and recovers by itself once space returns, without loss or duplicates.
* The gateway's uplink outbox reaches its bounds while the cloud is away: it refuses new messages
  (back-pressure), the agents keep them, and once the cloud is back everything drains exactly once.

The store-and-forward rules under test are in ``docs/protocol.md`` and ``cwsnet/custody.py``; the
overflow policy in ``edge_agent/outbox.py``. The full-disk tests also pin five bugs this file
found and that are fixed: a status that could not report a full disk while it lasted, custody acks
raising on a full disk, a seq burnt per store retry (then a crash at the next reconnect), a
gateway crash when its seq block ran out on a full disk, and tracebacks for storage errors.

The full disks are tmpfs mounts (the suite runs as root); set ``CWSNET_TEST_FSIZE=1`` to use the
file-size-limit fallback meant for containers that may not mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import ManagedProcess, ProcessSet, free_port, wait_for
from harness.db import query, ro
from harness.deploy import Deployment, get, post, prometheus

pytestmark = pytest.mark.integration

GW = "gw-home"
NO_DROPS = {"telemetry": 0, "status": 0, "event": 0, "result": 0}


# ---- reading the daemons' databases (read-only, while they run) ------------------------------------


_ro, _query = ro, query


def ledger(outbox_db: Path) -> dict[int, tuple[str, str]]:
    """The agent's delivery ledger: seq -> (kind, outcome)."""
    return {seq: (kind, outcome) for seq, kind, outcome in _query(outbox_db, "select seq, kind, outcome from ledger")}


def snapshot(outbox_db: Path) -> tuple[dict[int, int], dict[int, tuple[str, str]], dict[str, int]]:
    """(held, ledger, drops) read in one read transaction: a consistent view of a busy agent."""
    conn = _ro(outbox_db)
    try:
        conn.execute("begin")
        now_held = dict(conn.execute("select seq, priority from outbox").fetchall())
        led = {seq: (kind, outcome) for seq, kind, outcome in conn.execute("select seq, kind, outcome from ledger")}
        drops = NO_DROPS | dict(conn.execute("select class, count from drops").fetchall())
        conn.execute("commit")
        return now_held, led, drops
    finally:
        conn.close()


def held(outbox_db: Path) -> dict[int, int]:
    """What the agent's outbox holds: seq -> priority class."""
    return dict(_query(outbox_db, "select seq, priority from outbox"))


def drops_table(outbox_db: Path) -> dict[str, int]:
    return NO_DROPS | dict(_query(outbox_db, "select class, count from drops"))


def cloud_messages(d: Deployment, sender: str) -> dict[int, str]:
    """Every message the cloud stored from ``sender``: seq -> kind (``(sender, seq)`` is its key)."""
    return dict(_query(d.lab.path("cloud", "cloud.db"), "select seq, kind from messages where sender = ?", (sender,)))


def cloud_readings_per_seq(d: Deployment, sender: str) -> dict[int, int]:
    return dict(_query(d.lab.path("cloud", "cloud.db"),
                       "select seq, count(*) from telemetry where sender = ? group by seq", (sender,)))


def gateway_held(gw_dir: Path) -> dict[tuple[str, int], int]:
    return {(s, q): a for s, q, a in _query(gw_dir / "uplink-outbox.db", "select sender, seq, attempts from outbox")}


def device(d: Deployment, node: str) -> dict[str, Any]:
    return get(f"{d.base}/api/v1/devices/{node}")


def gateway(d: Deployment) -> dict[str, Any]:
    return get(f"{d.base}/api/v1/gateways/{GW}")


def assert_alive(*procs: ManagedProcess) -> None:
    for p in procs:
        assert p.alive, f"{p.name} died (exit code {p.returncode}); log tail:\n{p.log_tail(60)}"


def tracebacks(text: str) -> list[str]:
    """Log lines that start a traceback, except amqtt's own report of a PUBACK it waited for in vain
    (the bridge withholds PUBACKs while it cannot store: documented in docs/broker.md)."""
    lines = text.splitlines()
    return [lines[i - 1] if i else line for i, line in enumerate(lines)
            if "Traceback" in line and not (i and "amqtt" in lines[i - 1] and "PUBACK" in lines[i - 1])]


def assert_no_crash(*procs: ManagedProcess) -> None:
    for p in procs:
        found = tracebacks(p.log_text())
        assert not found, f"{p.name} logged a traceback after {found[0]!r}:\n{p.log_tail(80)}"


# ---- configuration -------------------------------------------------------------------------------


def fast_agent(d: Deployment, node: str, *, interval: float = 0.05, status_interval: float = 1.0,
               outbox: dict[str, Any] | None = None, **extra: Any) -> None:
    """One telemetry message per reading every ``interval`` s, quick reconnects and retransmissions."""
    d.edit(node, {
        "sensors": [{"type": "simulated", "stream": "env", "interval": interval, "pattern": "ramp",
                     "fields": ["v"]}],
        "batching": {"max_readings": 1, "max_delay": 0},
        "status_interval": status_interval,
        "reconnect": {"min_delay": 0.1, "max_delay": 1.0},
        "outbox": {"retransmit_after": 1.0, "max_backoff": 2.0, **(outbox or {})},
        **extra,
    })


def fast_gateway(d: Deployment, **extra: Any) -> None:
    d.edit(GW, {"status_interval": 1.0, "retransmit_after": 1.0, "reconnect": {"min_delay": 0.1, "max_delay": 1.0},
                **extra})


# ---- a disk that can be filled and freed ---------------------------------------------------------


#: the errors SQLite reports for a full tmpfs (ENOSPC) and for a file-size limit (EFBIG)
DISK_ERROR = r"(database or disk is full|disk I/O error)"


class SmallDisk:
    """A directory on its own small tmpfs (we run as root), filled up with a filler file on demand.

    Where mounting is not allowed (EPERM in an unprivileged container; or CWSNET_TEST_FSIZE=1 to
    try it), a file-size limit on the daemon stands in for the full disk: ``RLIMIT_FSIZE`` makes
    every write past the limit fail with EFBIG (CPython ignores SIGXFSZ), and raising the limit
    again on the running process "returns the space". The limit covers every file the process
    writes, so such a daemon logs through a pipe (``| cat``) rather than straight into its log
    file. Start the daemon that uses the directory with :meth:`start`."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self.filler = path / "filler.bin"
        self.mounted = False
        if os.environ.get("CWSNET_TEST_FSIZE") != "1":
            res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                                 capture_output=True, text=True, timeout=10)
            self.mounted = res.returncode == 0
        self.daemon: ManagedProcess | None = None

    @property
    def how(self) -> str:
        return "tmpfs" if self.mounted else "RLIMIT_FSIZE"

    def start(self, d: Deployment, kind: str, node: str) -> ManagedProcess:
        """Start the daemon whose data dir this is."""
        if self.mounted:
            self.daemon = d.start(kind, node)
        else:
            cmd = f"exec {sys.executable} -m cwsnet {kind} --config {d.lab.config_path(node)} 2>&1 | cat"
            self.daemon = d.procs.start(node, ["sh", "-c", cmd])
        return self.daemon

    def _python(self) -> psutil.Process:
        assert self.daemon is not None, "start the daemon with SmallDisk.start"
        sh = psutil.Process(self.daemon.pid)
        return wait_for(lambda: next((c for c in sh.children(recursive=True) if "cwsnet" in " ".join(c.cmdline())),
                                     None), timeout=10, message="the daemon's python process")

    def fill(self) -> int:
        """Take every free byte; returns how many bytes the filler took."""
        if not self.mounted:
            self._python().rlimit(psutil.RLIMIT_FSIZE, (1, psutil.RLIM_INFINITY))  # every write past byte 1 fails
            return 0
        written = 0
        chunk = b"\0" * (1 << 20)
        with open(self.filler, "ab", buffering=0) as f:
            while len(chunk) >= 512:
                try:
                    written += f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk = chunk[: len(chunk) // 2]
        st = os.statvfs(self.path)
        assert st.f_bavail * st.f_frsize < 64 * 1024, "the tmpfs is not full"
        return written

    def free(self) -> None:
        if not self.mounted:
            if self.daemon is not None and self.daemon.alive:
                with contextlib.suppress(psutil.NoSuchProcess, AssertionError):
                    self._python().rlimit(psutil.RLIMIT_FSIZE, (psutil.RLIM_INFINITY, psutil.RLIM_INFINITY))
            return
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=10)
            self.mounted = False


@pytest.fixture
def small_disk(tmp_path: Path, procs: ProcessSet) -> Iterator[Callable[[str, str], SmallDisk]]:
    """``small_disk(name, size)`` -> a :class:`SmallDisk` under ``tmp_path``; the daemons are stopped
    before it is unmounted (this fixture closes ``procs`` itself, then unmounts)."""
    disks: list[SmallDisk] = []

    def make(name: str, size: str = "8m") -> SmallDisk:
        disk = SmallDisk(tmp_path / name, size)
        disks.append(disk)
        return disk

    try:
        yield make
    finally:
        try:
            procs.close()
        finally:
            for disk in reversed(disks):
                disk.free()
                disk.unmount()


# ---- 1. overflow ---------------------------------------------------------------------------------


def test_agent_overflow_drops_telemetry_oldest_first_reports_it_and_delivers_the_rest_once(
    tmp_path: Path, procs: ProcessSet
) -> None:
    t0 = time.monotonic()
    d = Deployment(tmp_path, procs, devices=1)
    fast_agent(d, "dev-1", interval=0.02, status_interval=2.0, outbox={"max_messages": 20})
    fast_gateway(d)
    outbox_db = d.lab.path("agents", "dev-1", "outbox.db")
    d.start_cloud()
    gw = d.start("gateway", GW)
    agent = d.start("agent", "dev-1")
    wait_for(lambda: device(d, "dev-1")["online"], timeout=30, message="dev-1 online")

    # a task that finishes while the gateway is away: its result must survive the overflow
    task = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "sleep", "args": {"seconds": 2}})
    wait_for(lambda: get(f"{d.base}/api/v1/tasks/{task['id']}")["state"] == "running", timeout=20,
             message="sleep task running")
    assert gw.terminate(timeout=10) == 0
    # what already reached the gateway or the cloud (an agent may still drop a copy of it later:
    # its custody ack can have been lost with the gateway)
    in_custody = {q for s, q in gateway_held(d.lab.path("gateway")) if s == "dev-1"} | set(cloud_messages(d, "dev-1"))

    def overflowed() -> dict[int, tuple[str, str]] | None:
        led = ledger(outbox_db)
        results = [k for k, o in led.values() if k == "task_result" and o == "held"]
        dropped = sum(1 for k, o in led.values() if k == "telemetry" and o == "dropped")
        return led if results and dropped >= 50 else None

    wait_for(overflowed, timeout=20, interval=0.2, message="a held task result and >= 50 telemetry drops")
    assert_alive(agent)
    now_held, led, drops = snapshot(outbox_db)  # the readings go on: one consistent view

    # the bound holds; higher classes are kept, and only telemetry was dropped
    assert len(now_held) <= 20
    assert {led[s][0] for s, p in now_held.items() if p == 3} == {"task_result"}
    assert not [s for s, (k, o) in led.items() if o == "dropped" and k != "telemetry"]
    assert drops["status"] == drops["event"] == drops["result"] == 0
    # oldest first: the telemetry still held is newer than every telemetry message dropped
    tel_dropped = sorted(s for s, (k, o) in led.items() if k == "telemetry" and o == "dropped")
    tel_held = sorted(s for s, p in now_held.items() if p == 0)
    assert not tel_held or tel_dropped[-1] < tel_held[0], (tel_dropped[-5:], tel_held)
    # counted: the durable drop counters match the ledger (which keeps every outcome here)
    assert drops["telemetry"] == len(tel_dropped)

    # the gateway returns: what was held is delivered, the drops are reported
    gw.start()
    done = wait_for(lambda: (t := get(f"{d.base}/api/v1/tasks/{task['id']}"))["state"] == "succeeded" and t,
                    timeout=30, message="the task result held through the overflow reached the cloud")
    assert done["result"] == {"slept": 2}
    st = wait_for(lambda: (s := device(d, "dev-1")["status"]).get("dropped", {}).get("telemetry", 0)
                  >= len(tel_dropped) and s, timeout=20, message="drops reported in dev-1's status in the API")
    assert st["dropped"]["status"] == st["dropped"]["result"] == st["dropped"]["event"] == 0
    # drops stop once the outbox drains, and the status catches up with the durable counter
    wait_for(lambda: device(d, "dev-1")["status"]["dropped"] == drops_table(outbox_db), timeout=20,
             message="the reported drops equal the agent's durable drop counters")

    # everything not dropped reaches the cloud exactly once; what was dropped never does (unless
    # it had already reached the gateway before it went away). The readings go on meanwhile, so
    # look at every message up to a cutoff, once each has its final outcome.
    cutoff = max(ledger(outbox_db))
    final = wait_for(lambda: (f := {s: ko for s, ko in ledger(outbox_db).items() if s <= cutoff})
                     and all(o != "held" for _k, o in f.values()) and f,
                     timeout=30, interval=0.2, message="every message up to the cutoff acked or dropped")
    assert all(final[s][1] != "dropped" for s in led if led[s][1] != "dropped" and led[s][0] != "telemetry"), \
        "a status or task result was dropped"
    acked = {s for s, (_k, o) in final.items() if o == "acked"}
    dropped = {s for s, (_k, o) in final.items() if o == "dropped"}
    stored = {s: k for s, k in cloud_messages(d, "dev-1").items() if s <= cutoff and k not in ("birth", "death")}
    assert {s: stored.get(s) for s in acked} == {s: final[s][0] for s in acked}, "an acked message is not in the cloud"
    # A message can reach the cloud and still be "dropped" in the ledger: it was sent, and the
    # overflow pushed it out before its custody ack came back (or the gateway went away first).
    # Nothing the agent never sent can be in the cloud, and nothing outside the ledger.
    delivered_anyway = set(stored) - acked
    assert delivered_anyway <= dropped, "the cloud holds a message the agent's ledger does not account for"
    per_seq = cloud_readings_per_seq(d, "dev-1")
    assert set(per_seq.values()) == {1}, "a telemetry message stored twice"
    _h, led_end, drops_end = snapshot(outbox_db)
    assert drops_end == NO_DROPS | {"telemetry": sum(1 for k, o in led_end.values() if o == "dropped")}
    assert_alive(agent, gw)
    print(f"overflow: {len(dropped)} dropped ({len(delivered_anyway)} of them delivered anyway, "
          f"{len(delivered_anyway & in_custody)} in custody when the gateway went away), {len(acked)} acked; "
          f"{time.monotonic() - t0:.1f} s")


# ---- 2. the agent's disk fills up ----------------------------------------------------------------


def _agent_on_a_small_disk(tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
                           ) -> tuple[Deployment, SmallDisk, ManagedProcess, ManagedProcess]:
    """Cloud, gateway and dev-1 (data dir on a small disk) running, dev-1's messages flowing."""
    disk = small_disk("agent-disk", "32m")
    d = Deployment(tmp_path, procs, devices=1)
    fast_agent(d, "dev-1", interval=0.05, status_interval=1.0, data_dir=str(disk.path))
    fast_gateway(d)
    d.start_cloud()
    gw = d.start("gateway", GW)
    agent = disk.start(d, "agent", "dev-1")
    wait_for(lambda: device(d, "dev-1")["online"], timeout=30, message="dev-1 online")
    wait_for(lambda: sum(1 for _k, o in ledger(disk.path / "outbox.db").values() if o == "acked") >= 20,
             timeout=20, message="dev-1's messages flowing")
    wait_for(lambda: device(d, "dev-1")["status"].get("storage") == "ok", timeout=10, message="storage ok")
    return d, disk, agent, gw


AGENT_STORE_FAILED = r"cannot write to {dir}: " + DISK_ERROR


def test_agent_full_disk_keeps_running_holds_readings_and_recovers(
    tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
) -> None:
    t0 = time.monotonic()
    d, disk, agent, gw = _agent_on_a_small_disk(tmp_path, procs, small_disk)
    outbox_db = disk.path / "outbox.db"

    uptime_before = device(d, "dev-1")["status"]["uptime"]
    disk.fill()
    full_since = int(time.time() * 1000)
    # the log names the data dir and the error
    agent.wait_log(AGENT_STORE_FAILED.format(dir=re.escape(str(disk.path))), timeout=20)
    acked_before = {s for s, (_k, o) in ledger(outbox_db).items() if o == "acked"}
    # it keeps running (and reading its sensors: the readings wait in memory) for a while
    wait_for(lambda: time.time() * 1000 - full_since > 4000 and agent.alive, timeout=10,
             message="dev-1 running 4 s on a full disk")
    assert_alive(agent, gw)

    freed_at = int(time.time() * 1000)
    disk.free()
    agent.wait_log(r"the outbox can be written again \(.*\); storing resumed", timeout=15)
    # a status sent after the space returned (uptime past the outage) says ok again
    wait_for(lambda: (s := device(d, "dev-1")["status"])["uptime"] > uptime_before + (freed_at - full_since) / 1000
             and s["storage"] == "ok", timeout=15, message="dev-1's status says storage ok again")
    mark = int(time.time() * 1000)
    wait_for(lambda: max(r["ts"] for r in get(f"{d.base}/api/v1/devices/dev-1/telemetry?limit=5")["items"]) > mark,
             timeout=15, message="new telemetry from dev-1 after the space returned")
    # the readings taken while the disk was full were kept in memory and delivered afterwards
    during = _query(d.lab.path("cloud", "cloud.db"), "select count(*) from telemetry where sender = 'dev-1' "
                    "and ts between ? and ?", (full_since + 1000, freed_at - 500))[0][0]
    expected = (freed_at - 500 - full_since - 1000) / 50
    assert during >= 0.5 * expected, f"only {during} readings of the ~{expected:.0f} taken while the disk was full"
    stored = cloud_messages(d, "dev-1")
    assert acked_before <= set(stored), "a message acknowledged before the disk filled is missing in the cloud"
    assert set(cloud_readings_per_seq(d, "dev-1").values()) == {1}
    assert device(d, "dev-1")["status"]["dropped"] == NO_DROPS
    assert_alive(agent, gw)
    assert agent.returncode is None and not tracebacks(gw.log_text())
    print(f"agent full disk ({disk.how}): {during} readings held in memory; {time.monotonic() - t0:.1f} s")


def test_agent_full_disk_memory_bound_drops_the_oldest_telemetry_and_counts_it(
    tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
) -> None:
    """While the disk is full the agent keeps at most UNSTORED_MAX (1,000) messages in memory; past
    that the lowest class goes first, oldest first, and the drops are counted in its status."""
    t0 = time.monotonic()
    disk = small_disk("agent-disk", "32m")
    d = Deployment(tmp_path, procs, devices=1)
    fast_agent(d, "dev-1", status_interval=1.0, data_dir=str(disk.path))
    d.edit("dev-1", {"sensors": [{"type": "simulated", "stream": s, "interval": 0.005, "pattern": "ramp",
                                  "fields": ["v"]} for s in ("a", "b")]})  # up to 400 readings/s
    fast_gateway(d)
    d.start_cloud()
    d.start("gateway", GW)
    agent = disk.start(d, "agent", "dev-1")
    wait_for(lambda: device(d, "dev-1")["online"], timeout=30, message="dev-1 online")
    wait_for(lambda: len(get(f"{d.base}/api/v1/devices/dev-1/telemetry?limit=200")["items"]) >= 200, timeout=20,
             message="dev-1's readings flowing")
    disk.fill()
    agent.wait_log(AGENT_STORE_FAILED.format(dir=re.escape(str(disk.path))), timeout=20)
    full_since = int(time.time() * 1000)
    # long enough to take well over 1,000 readings even on a slow machine
    wait_for(lambda: time.time() * 1000 - full_since > 8000 and agent.alive, timeout=15,
             message="dev-1 running 8 s on a full disk")
    freed_at = int(time.time() * 1000)
    disk.free()
    agent.wait_log(r"the outbox can be written again", timeout=15)
    st = wait_for(lambda: (s := device(d, "dev-1")["status"])["dropped"]["telemetry"] > 0 and s["storage"] == "ok"
                  and s, timeout=20, message="the in-memory drops reported in dev-1's status")
    assert st["dropped"]["status"] == st["dropped"]["result"] == st["dropped"]["event"] == 0, st["dropped"]
    # the drops are telemetry taken first: per stream, the readings that reached the cloud have one
    # gap (the oldest readings of the full period), then run without a hole until the disk was freed
    wait_for(lambda: max(r["ts"] for r in get(f"{d.base}/api/v1/devices/dev-1/telemetry?limit=5")["items"])
             > freed_at + 1000, timeout=15, message="readings after the space returned")
    kept = 0
    for stream in ("a", "b"):
        ts = [r[0] for r in _query(d.lab.path("cloud", "cloud.db"), "select ts from telemetry where sender = "
                                   "'dev-1' and stream = ? and ts between ? and ? order by ts",
                                   (stream, full_since - 2000, freed_at + 1000))]
        gaps = [(b - a, a, b) for a, b in zip(ts, ts[1:], strict=False) if b - a > 500]
        assert len(gaps) == 1, f"stream {stream}: expected one gap (the dropped oldest readings), got {gaps}"
        assert full_since - 1000 < gaps[0][1] and gaps[0][2] < freed_at, gaps
        kept += sum(1 for t in ts if gaps[0][2] <= t <= freed_at)
    assert 500 < kept <= 1000, f"{kept} readings of the full period kept (at most 1,000 in memory)"
    assert set(cloud_readings_per_seq(d, "dev-1").values()) == {1}
    assert_alive(agent)
    print(f"memory bound: {st['dropped']['telemetry']} dropped, {kept} kept; {time.monotonic() - t0:.1f} s")


def test_agent_full_disk_is_reported_in_the_cloud_api_while_it_lasts(
    tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
) -> None:
    d, disk, agent, _gw = _agent_on_a_small_disk(tmp_path, procs, small_disk)
    disk.fill()
    agent.wait_log(AGENT_STORE_FAILED.format(dir=re.escape(str(disk.path))), timeout=20)
    st = wait_for(lambda: (s := device(d, "dev-1")["status"]) and str(s.get("storage")).startswith("error:") and s,
                  timeout=8, message="dev-1's status in the API says its storage fails (status every 1 s)")
    assert re.search(DISK_ERROR, st["storage"]), st["storage"]


def test_agent_full_disk_custody_acks_are_handled_without_tracebacks(
    tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
) -> None:
    _d, disk, agent, gw = _agent_on_a_small_disk(tmp_path, procs, small_disk)
    gw.terminate()  # dev-1 stores what it reads (while there is room) and cannot send it
    wait_for(lambda: len(held(disk.path / "outbox.db")) >= 10, timeout=15, message="dev-1 holding messages")
    disk.fill()
    agent.wait_log(AGENT_STORE_FAILED.format(dir=re.escape(str(disk.path))), timeout=20)
    births = agent.log_text().count("birth sent")
    gw.start()  # dev-1 sends what it holds: the gateway's custody acks arrive while the disk is full
    wait_for(lambda: agent.log_text().count("birth sent") > births, timeout=20, message="dev-1 reconnected")
    deadline = time.monotonic() + 5
    wait_for(lambda: time.monotonic() > deadline or "on_message handler failed" in agent.log_text(), timeout=10)
    assert_alive(agent)
    assert "on_message handler failed" not in agent.log_text(), agent.log_tail(30)


def test_agent_full_disk_survives_reconnects(
    tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
) -> None:
    disk = small_disk("agent-disk", "32m")
    d = Deployment(tmp_path, procs, devices=1)
    fast_agent(d, "dev-1", interval=0.005, status_interval=1.0, data_dir=str(disk.path))  # 200 readings/s
    fast_gateway(d)
    d.start_cloud()
    gw = d.start("gateway", GW)
    agent = disk.start(d, "agent", "dev-1")
    wait_for(lambda: device(d, "dev-1")["online"], timeout=30, message="dev-1 online")
    disk.fill()
    agent.wait_log(AGENT_STORE_FAILED.format(dir=re.escape(str(disk.path))), timeout=20)
    # the site broker restarts a few times (a gateway upgrade, a power blip): dev-1 reconnects each time
    deadline = time.monotonic() + 40  # a seq block lasts ~5-10 s here; the margin is for slow machines
    births = agent.log_text().count("birth sent")
    while time.monotonic() < deadline and agent.alive:
        gw.terminate()
        gw.start()
        births = wait_for(lambda b=births: (n := agent.log_text().count("birth sent")) > b and n or not agent.alive,
                          timeout=15, message="dev-1 reconnected (or died)")
    assert_alive(agent)


# ---- 3. the gateway's disk fills up --------------------------------------------------------------


def test_gateway_full_disk_is_reported_agents_hold_their_data_and_it_recovers(
    tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
) -> None:
    t0 = time.monotonic()
    disk = small_disk("gateway-disk", "32m")
    d = Deployment(tmp_path, procs, devices=2)
    for node in ("dev-1", "dev-2"):
        fast_agent(d, node, interval=0.05, status_interval=1.0)
    fast_gateway(d, data_dir=str(disk.path))
    dbs = {n: d.lab.path("agents", n, "outbox.db") for n in ("dev-1", "dev-2")}
    d.start_cloud()
    gw = disk.start(d, "gateway", GW)
    agents = [d.start("agent", n) for n in dbs]
    wait_for(lambda: d.online() == set(dbs), timeout=30, message="both devices online")
    wait_for(lambda: gateway(d)["status"].get("storage") == "ok", timeout=15, message="gateway status")

    disk.fill()
    gw.wait_log(r"storing \d+ messages in the outbox failed \(" + DISK_ERROR + r"\)", timeout=20)
    st = wait_for(lambda: (s := gateway(d)["status"]) and str(s.get("storage", "")).startswith("error:") and s,
                  timeout=15, message="the gateway's status in the API says its storage fails")
    assert re.search(DISK_ERROR, st["storage"]), st["storage"]
    assert st["stats"]["store_errors"] >= 1
    # no custody acks meanwhile: the agents keep their data
    for n, db in dbs.items():
        wait_for(lambda db=db: len(held(db)) >= 30, timeout=15, message=f"{n} holds its messages")
    snapshot = {n: {s for s, (_k, o) in ledger(db).items() if o != "dropped"} for n, db in dbs.items()}
    assert_alive(gw, *agents)

    disk.free()
    gw.wait_log(r"the uplink outbox can be written again", timeout=20)
    wait_for(lambda: gateway(d)["status"].get("storage") == "ok", timeout=15,
             message="the gateway's status says storage ok again")
    for n, db in dbs.items():
        wait_for(lambda n=n: snapshot[n] <= set(cloud_messages(d, n)), timeout=30, interval=0.2,
                 message=f"everything {n} held reached the cloud")
        wait_for(lambda db=db: len(held(db)) < 30, timeout=20, message=f"{n}'s outbox drained")
        assert set(cloud_readings_per_seq(d, n).values()) == {1}
        assert drops_table(db) == NO_DROPS
    assert_alive(gw, *agents)
    assert_no_crash(gw, *agents)
    print(f"gateway full disk ({disk.how}): {time.monotonic() - t0:.1f} s")


def _gateway_on_a_small_disk(tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk],
                             **gateway_cfg: Any) -> tuple[Deployment, SmallDisk, ManagedProcess]:
    disk = small_disk("gateway-disk", "32m")
    d = Deployment(tmp_path, procs, devices=1)
    fast_agent(d, "dev-1", interval=0.1, status_interval=1.0)
    fast_gateway(d, data_dir=str(disk.path), **gateway_cfg)
    d.start_cloud()
    gw = disk.start(d, "gateway", GW)
    d.start("agent", "dev-1")
    wait_for(lambda: d.online() == {"dev-1"}, timeout=30, message="dev-1 online")
    return d, disk, gw


def test_gateway_full_disk_storage_errors_are_reported_without_tracebacks(
    tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
) -> None:
    _d, disk, gw = _gateway_on_a_small_disk(tmp_path, procs, small_disk)
    disk.fill()
    gw.wait_log(r"storing \d+ messages in the outbox failed", timeout=20)
    # cloud acks (for the gateway's own status, once a second) and pump rounds go on for a few seconds
    deadline = time.monotonic() + 5
    wait_for(lambda: time.monotonic() > deadline or bool(tracebacks(gw.log_text())), timeout=10)
    assert_alive(gw)
    assert not tracebacks(gw.log_text()), gw.log_tail(40)


def test_gateway_full_disk_for_a_thousand_seals_does_not_crash(
    tmp_path: Path, procs: ProcessSet, small_disk: Callable[[str, str], SmallDisk]
) -> None:
    # a status every 5 ms: the gateway seals 1,000 messages (one seq block) within about 5 s
    _d, disk, gw = _gateway_on_a_small_disk(tmp_path, procs, small_disk, status_interval=0.005)
    disk.fill()
    gw.wait_log(r"storing \d+ messages in the outbox failed", timeout=20)
    deadline = time.monotonic() + 30  # ~5-10 s here; the margin is for slow machines
    wait_for(lambda: time.monotonic() > deadline or not gw.alive, timeout=40)
    assert_alive(gw)


# ---- 4. back-pressure at the gateway -------------------------------------------------------------


def gateway_metrics(port: int) -> dict[str, float]:
    return prometheus(f"http://127.0.0.1:{port}/metrics")


def test_gateway_backpressure_agents_keep_refused_data_and_everything_drains_once(
    tmp_path: Path, procs: ProcessSet
) -> None:
    t0 = time.monotonic()
    d = Deployment(tmp_path, procs, devices=2)
    nodes = ("dev-1", "dev-2")
    for node in nodes:  # telemetry 20/s and status 10/s each: past high water only the statuses get in
        fast_agent(d, node, interval=0.05, status_interval=0.1)
    mport = free_port()
    # status every 5 s: the birth the gateway sends when the cloud comes back (still full) stays
    # the latest status long enough to be read from the API
    fast_gateway(d, store={"max_messages": 100, "high_water": 0.5, "busy_pause": 1.0}, metrics_port=mport,
                 status_interval=5.0)
    dbs = {n: d.lab.path("agents", n, "outbox.db") for n in nodes}
    gw_dir = d.lab.path("gateway")
    # the cloud is away: the gateway's uplink outbox fills up
    gw = d.start("gateway", GW)
    agents = {n: d.start("agent", n) for n in nodes}

    def gw_rows() -> list[str]:
        return [r[0] for r in _query(gw_dir / "uplink-outbox.db", "select topic from outbox order by id")]

    wait_for(lambda: len(gw_rows()) >= 100, timeout=20, message="the gateway's outbox at its limit")
    gw.wait_log(r"uplink outbox \d+% full .* refusing .*, devices told to pause", timeout=10)
    for n, db in dbs.items():
        wait_for(lambda db=db: len(held(db)) >= 40, timeout=20, message=f"{n} keeps what the gateway refused")
        agents[n].wait_log(r"near its storage limit: no new telemetry", timeout=10)
    # the bounds hold: nothing past the limit, and no telemetry past high water
    rows = gw_rows()
    assert len(rows) == 100, len(rows)
    assert not [t for t in rows[50:] if "/telemetry/" in t], "telemetry admitted above high water"
    m = gateway_metrics(mport)
    assert m["cwsnet_gateway_outbox_fill"] >= 0.99 and m["cwsnet_gateway_outbox_depth"] == 100
    assert m['cwsnet_gateway_messages_total{outcome="refused_full"}'] > 0
    snapshot = {n: {s for s, (_k, o) in ledger(db).items() if o != "dropped"} for n, db in dbs.items()}
    for db in dbs.values():
        assert drops_table(db) == NO_DROPS
        assert sum(1 for _k, o in ledger(db).values() if o == "held") >= 40

    d.start_cloud()
    st = wait_for(lambda: (s := gateway(d)["status"]) and s.get("stats") and s, timeout=20,
                  message="the gateway's status in the API")
    assert st["backpressure"] is True and st["stats"]["refused_full"] > 0, st
    for n in nodes:
        wait_for(lambda n=n: snapshot[n] <= set(cloud_messages(d, n)), timeout=40, interval=0.2,
                 message=f"everything {n} held reached the cloud")
    for n, db in dbs.items():
        wait_for(lambda db=db, n=n: all(ledger(db)[s][1] == "acked" for s in snapshot[n]), timeout=20,
                 message=f"{n}'s messages all acknowledged")
        assert set(cloud_readings_per_seq(d, n).values()) == {1}
        assert drops_table(db) == NO_DROPS
    wait_for(lambda: len(gw_rows()) < 50, timeout=20, message="the gateway's outbox drained")
    wait_for(lambda: not gateway(d)["status"].get("backpressure"), timeout=15, message="back-pressure over")
    assert_alive(gw, *agents.values())
    assert_no_crash(gw, *agents.values())
    print(f"back-pressure: {time.monotonic() - t0:.1f} s")
