"""Chaos for a whole site: real cloud, gateway and agents, SIGKILLs and cut links, then an audit.

:class:`ChaosLab` rewires a :class:`~harness.deploy.Deployment` so that every device reaches the
site broker through its own :class:`~harness.faultproxy.FaultProxy` and the gateway reaches the
cloud broker through another, then runs a seeded random schedule of faults:

* SIGKILL an agent, the gateway or the cloud, and start it again after a random downtime;
* cut one device's link, every device's link, or the gateway's uplink, and restore it later.

After the chaos it heals everything and drains (see :meth:`ChaosLab.drain`), and :func:`audit`
compares, from stored data only, what each device's **delivery ledger** (``ledger`` table of its
``outbox.db``) says with the cloud store (``messages`` and ``telemetry`` of ``cloud.db``):

* ``lost``: ledger rows ``acked`` whose ``(sender, seq)`` is not in the cloud store;
* ``duplicated``: ``(sender, seq)`` stored more than once (the primary key forbids it: checked
  anyway) plus telemetry readings stored twice under different seqs (same node, stream, ``ts``
  and values);
* gaps: every ledger seq must be in the cloud store or ``dropped`` by the overflow policy (and
  the device's dropped count must equal what it reported in its status); none may be ``held``.

Births and deaths are not in the ledger (they are sent outside the outbox: the birth on connect,
the death as MQTT will or goodbye), and they use up seqs, so the ledger's seqs are not contiguous
integers; what must be contiguous is the ledger itself: every message it recorded is accounted
for.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .db import query, ro
from .deploy import Deployment
from .faultproxy import FaultProxy
from .proc import ManagedProcess
from .wait import wait_for

#: kinds the agent sends through its outbox (so they are in its ledger); births and deaths are not
LEDGER_KINDS = ("telemetry", "status", "event", "task_result")


@dataclass
class Settings:
    """Knobs of the lab; the defaults keep 20 agents, a gateway and the cloud within 2 cores."""

    duration: float = 120.0  # seconds of chaos
    pause: tuple[float, float] = (0.5, 3.0)  # between two chaos actions
    downtime: tuple[float, float] = (0.0, 3.0)  # a killed process stays down this long
    cut_for: tuple[float, float] = (1.0, 8.0)  # a cut link stays cut this long
    telemetry_interval: tuple[float, float] = (0.2, 0.5)  # per device, drawn at random
    max_readings: int = 3
    status_interval: float = 5.0
    small_outbox_every: int = 5  # every 5th device has the smallest outbox allowed: it will drop
    small_outbox: int = 10
    weights: dict[str, int] = field(default_factory=lambda: {
        "kill_agent": 4, "kill_gateway": 1, "kill_cloud": 1,
        "cut_device": 2, "cut_devices": 1, "cut_uplink": 2,
    })
    # the first actions are every kind of fault (weight > 0) once, in a seeded random order, so that
    # a short run still SIGKILLs the cloud and the gateway and cuts the uplink; then the weights apply
    cover_every_action: bool = False


class ChaosLab:
    """A site under chaos. ``log`` receives every line the lab reports (actions with timestamps)."""

    def __init__(self, d: Deployment, proxy: Callable[..., FaultProxy], rng: random.Random,
                 settings: Settings | None = None, log: Callable[[str], None] = print) -> None:
        self.d = d
        self.rng = rng
        self.s = settings or Settings()
        self._log = log
        self.t0 = time.monotonic()
        self.devices: list[str] = list(d.topo.devices)
        # the daemons' links are TLS (verified against the lab's CA): the proxies carry it unchanged
        self.uplink = proxy(d.topo.cloud_mqtts_port)
        self.links = {dev: proxy(d.topo.gateway_mqtts_port) for dev in self.devices}
        self.procs: dict[str, ManagedProcess] = {}
        self.kind = {"cloud": "cloud", d.topo.gateway: "gateway", **{dev: "agent" for dev in self.devices}}
        # pending restarts and restores: (due monotonic time, what, callable)
        self._pending: list[tuple[float, str, Callable[[], None]]] = []
        self._down: set[str] = set()  # killed on purpose, restart pending
        self._cut: set[str] = set()  # proxies cut, restore pending ("uplink" or a device)
        self.actions: Counter[str] = Counter()
        # kinds of fault not done yet, done first when settings.cover_every_action
        self._uncovered = {n for n, w in self.s.weights.items() if w > 0 and self.s.cover_every_action}
        self.unexpected_exits: list[str] = []
        self.timeline: list[str] = []
        self.timeline_file = d.procs.log_dir / "chaos-timeline.log"  # next to the processes' logs
        self._configure()

    # ---- set-up ---------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.2f}s {time.strftime('%H:%M:%S')}] {text}"
        self.timeline.append(line)
        with open(self.timeline_file, "a") as f:
            f.write(line + "\n")
        self._log(line)

    def _configure(self) -> None:
        d, s = self.d, self.s
        fast = {"min_delay": 0.2, "max_delay": 2.0}
        d.edit("cloud", {"reconnect": fast})
        d.edit(d.topo.gateway, {"uplink": {"port": self.uplink.port}, "reconnect": fast,
                                "retransmit_after": 2.0, "status_interval": s.status_interval})
        for i, dev in enumerate(self.devices, start=1):
            interval = round(self.rng.uniform(*s.telemetry_interval), 3)
            outbox: dict[str, Any] = {"retransmit_after": 2.0, "max_backoff": 8.0}
            if s.small_outbox_every and i % s.small_outbox_every == 0:
                outbox["max_messages"] = s.small_outbox
            d.edit(dev, {
                "broker": {"port": self.links[dev].port},
                "status_interval": s.status_interval,
                "sensors": [
                    {"type": "system", "stream": "system", "interval": 5.0},
                    {"type": "simulated", "stream": "env", "interval": interval, "pattern": "sine",
                     "fields": ["temperature", "humidity"], "period": 60},
                ],
                "batching": {"max_readings": s.max_readings, "max_delay": 1.0},
                "outbox": outbox,
                "reconnect": fast,
            })

    def start(self) -> None:
        """Start the cloud, the gateway and every agent, and wait until every device is online."""
        self.procs["cloud"] = self.d.start_cloud()
        gw = self.d.topo.gateway
        self.procs[gw] = self.d.start("gateway", gw)
        self.procs[gw].wait_port("127.0.0.1", self.d.topo.gateway_mqtt_port, timeout=30)
        for dev in self.devices:
            self.procs[dev] = self.d.start("agent", dev)
        want = set(self.devices)
        wait_for(lambda: want <= self.d.online(), timeout=90, interval=0.5, message="every device online")
        self.say(f"all {len(self.devices)} devices online")

    # ---- paths ----------------------------------------------------------------------------------
    def outbox_db(self, dev: str) -> Path:
        return self.d.lab.path("agents", dev, "outbox.db")

    @property
    def cloud_db(self) -> Path:
        return self.d.lab.path("cloud", "cloud.db")

    @property
    def gateway_db(self) -> Path:
        return self.d.lab.path("gateway", "uplink-outbox.db")

    # ---- chaos ----------------------------------------------------------------------------------
    def _schedule(self, after: float, what: str, fn: Callable[[], None]) -> None:
        self._pending.append((time.monotonic() + after, what, fn))

    def _run_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        due = sorted((p for p in self._pending if everything or p[0] <= now), key=lambda p: p[0])
        self._pending = [p for p in self._pending if p not in due]
        for _t, _what, fn in due:
            fn()

    def _kill(self, name: str) -> None:
        p = self.procs[name]
        p.kill(signal.SIGKILL)
        self._down.add(name)
        downtime = self.rng.uniform(*self.s.downtime)
        self.say(f"SIGKILL {name} (pid {p.pid}); restart in {downtime:.1f}s")

        def restart() -> None:
            self._down.discard(name)
            p.start()
            self.say(f"restarted {name} (pid {p.pid})")

        self._schedule(downtime, f"restart {name}", restart)

    def _cut_link(self, key: str) -> None:
        proxy = self.uplink if key == "uplink" else self.links[key]
        proxy.cut()
        self._cut.add(key)
        length = self.rng.uniform(*self.s.cut_for)
        self.say(f"cut {'gateway->cloud' if key == 'uplink' else key + '->gateway'} link for {length:.1f}s")

        def restore() -> None:
            self._cut.discard(key)
            proxy.restore()
            self.say(f"restored {'gateway->cloud' if key == 'uplink' else key + '->gateway'} link")

        self._schedule(length, f"restore {key}", restore)

    def _check_alive(self) -> None:
        """A process that died without being killed is a finding: record it and start it again."""
        for name, p in self.procs.items():
            if name not in self._down and not p.alive:
                text = f"{name} exited by itself with code {p.returncode}; log tail:\n{p.log_tail(15)}"
                self.unexpected_exits.append(text)
                self.say(f"UNEXPECTED: {text}")
                p.start()
                self.say(f"restarted {name} (pid {p.pid}) after its unexpected exit")

    def _act(self) -> None:
        up_agents = [dev for dev in self.devices if dev not in self._down]
        uncut = [dev for dev in self.devices if dev not in self._cut]
        gw = self.d.topo.gateway
        possible = {
            "kill_agent": bool(up_agents),
            "kill_gateway": gw not in self._down,
            "kill_cloud": "cloud" not in self._down,
            "cut_device": bool(uncut),
            "cut_devices": bool(uncut),
            "cut_uplink": "uplink" not in self._cut,
        }
        names = [n for n, w in self.s.weights.items() if w > 0 and possible[n]]
        if not names:
            return
        first = sorted(self._uncovered.intersection(names))
        if first:
            action = self.rng.choice(first)
            self._uncovered.discard(action)
        else:
            action = self.rng.choices(names, weights=[self.s.weights[n] for n in names])[0]
        self.actions[action] += 1
        if action == "kill_agent":
            self._kill(self.rng.choice(up_agents))
        elif action == "kill_gateway":
            self._kill(gw)
        elif action == "kill_cloud":
            self._kill("cloud")
        elif action == "cut_device":
            self._cut_link(self.rng.choice(uncut))
        elif action == "cut_devices":
            for dev in uncut:
                self._cut_link(dev)
        else:
            self._cut_link("uplink")

    def run_chaos(self) -> None:
        """Random faults for ``settings.duration`` seconds, then heal everything."""
        self.say(f"chaos for {self.s.duration:.0f}s")
        end = time.monotonic() + self.s.duration
        next_action = time.monotonic() + self.rng.uniform(*self.s.pause)
        while time.monotonic() < end:
            self._run_due()
            self._check_alive()
            if time.monotonic() >= next_action:
                self._act()
                next_action = time.monotonic() + self.rng.uniform(*self.s.pause)
            # the chaos schedule's own clock (the workload), not a synchronisation
            time.sleep(max(0.0, min(0.05, next_action - time.monotonic())))
        self.heal()

    def heal(self) -> None:
        """Restore every link and restart every killed process now."""
        self._run_due(everything=True)
        for proxy in (self.uplink, *self.links.values()):
            proxy.restore()
        self._check_alive()
        self.say("healed: every link restored, every process running; actions: "
                 + ", ".join(f"{k}={v}" for k, v in sorted(self.actions.items())))
        self.procs["cloud"].wait_http(f"{self.d.base}/healthz", timeout=30, status=200)

    # ---- draining ---------------------------------------------------------------------------------
    def held_at_or_below(self, marks: dict[str, int]) -> dict[str, int]:
        """Devices still holding (unacknowledged) a message with seq <= their mark: how many."""
        out = {}
        for dev, mark in marks.items():
            n = query(self.outbox_db(dev), "select count(*) from ledger where outcome = 'held' and seq <= ?",
                      (mark,))[0][0]
            if n:
                out[dev] = n
        return out

    def gateway_held(self, received_before: float | None = None) -> int:
        if received_before is None:
            return query(self.gateway_db, "select count(*) from outbox")[0][0]
        return query(self.gateway_db, "select count(*) from outbox where received <= ?", (received_before,))[0][0]

    def agents_held(self) -> dict[str, int]:
        out = {}
        for dev in self.devices:
            n = query(self.outbox_db(dev), "select count(*) from outbox")[0][0]
            if n:
                out[dev] = n
        return out

    def outstanding(self) -> dict[str, int]:
        """Messages held anywhere (per agent, and "gateway"); empty once everything reached the cloud."""
        out = self.agents_held()
        if n := self.gateway_held():
            out["gateway"] = n
        return out

    def reported_drops(self) -> dict[str, int | None]:
        """Per device, the total of ``dropped`` in the last status the cloud applied (None if none)."""
        rows = dict(query(self.cloud_db, "select id, last_status from nodes where role = 'device'"))
        out: dict[str, int | None] = {}
        for dev in self.devices:
            st = json.loads(rows[dev]) if rows.get(dev) else {}
            dropped = st.get("dropped")
            out[dev] = sum(dropped.values()) if isinstance(dropped, dict) else None
        return out

    def device_drops(self, dev: str) -> int:
        return query(self.outbox_db(dev), "select coalesce(sum(count), 0) from drops")[0][0]

    def drain(self, timeout: float) -> dict[str, float]:
        """Let everything held reach the cloud; returns how long each stage took.

        1. In place (the running processes, chaos over): every message each agent held at the end
           of the chaos is settled (acked or dropped), then everything the gateway held then has
           reached the cloud. This catches a sender that stops retrying.
        2. Quiescence: each agent is stopped (SIGTERM) and started again with no sensors and no
           periodic status, so it produces nothing new but its birth and sends what it holds; then
           every agent outbox and the gateway's outbox must become empty.
        3. Each device's birth (which carries its ``dropped`` totals) is applied at the cloud, so
           the reported drops are final.
        """
        times: dict[str, float] = {}
        t = time.monotonic()
        marks = {dev: query(self.outbox_db(dev), "select coalesce(max(seq), -1) from ledger")[0][0]
                 for dev in self.devices}
        healed_at = time.time()
        wait_until_none(lambda: self.held_at_or_below(marks), timeout,
                        "agents to settle what they held at the end of the chaos")
        times["agents_settled"] = time.monotonic() - t
        self.say(f"agents settled what they held at the end of the chaos in {times['agents_settled']:.1f}s")
        wait_until_none(lambda: self.gateway_held(healed_at), timeout,
                        "the gateway to deliver what it held at the end of the chaos")
        times["gateway_delivered"] = time.monotonic() - t
        self.say(f"gateway delivered what it held at the end of the chaos after {times['gateway_delivered']:.1f}s")

        t = time.monotonic()
        for dev in self.devices:
            self.procs[dev].terminate(timeout=15)
            self.d.edit(dev, {"sensors": [], "status_interval": 86400})
            self.procs[dev].start()
        self.say("agents restarted without sensors or periodic status (drain mode)")
        wait_until_none(self.outstanding, timeout, "every agent outbox and the gateway outbox to be empty")
        times["quiescent"] = time.monotonic() - t
        self.say(f"quiescent after {times['quiescent']:.1f}s: every outbox is empty")

        def unreported() -> dict[str, tuple[int | None, int]]:
            reported = self.reported_drops()
            return {dev: (reported[dev], n) for dev in self.devices if reported[dev] != (n := self.device_drops(dev))}

        wait_until_none(unreported, 60, "each device's reported dropped totals (cloud) to match its drops table")
        self._check_alive()
        return times

    def stop(self) -> None:
        """Stop agents, then gateway, then cloud (SIGTERM), so the databases are closed cleanly."""
        for dev in self.devices:
            self.procs[dev].terminate(timeout=15)
        self.procs[self.d.topo.gateway].terminate(timeout=15)
        self.procs["cloud"].terminate(timeout=15)


# ---- the audit -----------------------------------------------------------------------------------
@dataclass
class DeviceAudit:
    device: str
    ledger: int = 0  # rows in the delivery ledger
    acked: int = 0
    dropped: int = 0
    held: int = 0
    stored: int = 0  # messages of the device in the cloud store (every kind)
    readings: int = 0
    lost: list[int] = field(default_factory=list)  # acked, not stored
    gaps: list[int] = field(default_factory=list)  # neither stored nor dropped (held ones included)
    dropped_unstored: int = 0  # dropped and never reached the cloud
    unknown: list[int] = field(default_factory=list)  # stored with a ledger kind, but not in the ledger
    kind_mismatch: list[int] = field(default_factory=list)
    drops_table: int = 0
    reported_drops: int | None = None


@dataclass
class Audit:
    devices: dict[str, DeviceAudit]
    duplicate_keys: int  # (sender, seq) stored more than once
    duplicate_readings: int  # extra copies of a reading stored under another seq

    @property
    def lost(self) -> int:
        return sum(len(a.lost) for a in self.devices.values())

    @property
    def duplicated(self) -> int:
        return self.duplicate_keys + self.duplicate_readings

    @property
    def reported_drops(self) -> int:
        return sum(a.reported_drops or 0 for a in self.devices.values())

    @property
    def dropped(self) -> int:
        return sum(a.dropped for a in self.devices.values())

    def problems(self) -> list[str]:
        out = []
        if self.duplicate_keys or self.duplicate_readings:
            out.append(f"duplicates: {self.duplicate_keys} (sender, seq) keys, "
                       f"{self.duplicate_readings} readings under another seq")
        for dev, a in self.devices.items():
            if a.lost:
                out.append(f"{dev}: {len(a.lost)} acked message(s) not in the cloud store: seqs {a.lost[:10]}")
            if a.gaps:
                out.append(f"{dev}: {len(a.gaps)} ledger seq(s) neither stored nor dropped: {a.gaps[:10]}")
            if a.held:
                out.append(f"{dev}: {a.held} message(s) still held after the drain")
            if a.unknown:
                out.append(f"{dev}: {len(a.unknown)} stored message(s) missing from the ledger: {a.unknown[:10]}")
            if a.kind_mismatch:
                out.append(f"{dev}: kind differs between ledger and store for seqs {a.kind_mismatch[:10]}")
            if not (a.dropped == a.drops_table == a.reported_drops):
                out.append(f"{dev}: dropped rows in the ledger {a.dropped}, drops table {a.drops_table}, "
                           f"reported in status {a.reported_drops}")
        return out


def audit(devices: list[str], outbox_db: Callable[[str], Path], cloud_db: Path,
          reported: dict[str, int | None]) -> Audit:
    """Compare every device's ledger with the cloud store (see the module docstring)."""
    out: dict[str, DeviceAudit] = {}
    cloud = ro(cloud_db)
    try:
        duplicate_keys = cloud.execute(
            "select coalesce(sum(n - 1), 0) from (select count(*) as n from messages group by sender, seq "
            "having n > 1)").fetchone()[0]
        duplicate_readings = cloud.execute(
            "select coalesce(sum(n - 1), 0) from (select count(*) as n from telemetry "
            "group by sender, stream, ts, \"values\" having n > 1)").fetchone()[0]
        for dev in devices:
            a = DeviceAudit(dev, reported_drops=reported.get(dev))
            stored = dict(cloud.execute("select seq, kind from messages where sender = ?", (dev,)).fetchall())
            a.stored = len(stored)
            a.readings = cloud.execute("select count(*) from telemetry where sender = ?", (dev,)).fetchone()[0]
            conn = ro(outbox_db(dev))
            try:
                ledger = conn.execute("select seq, kind, outcome from ledger order by seq").fetchall()
                a.drops_table = conn.execute("select coalesce(sum(count), 0) from drops").fetchone()[0]
            finally:
                conn.close()
            a.ledger = len(ledger)
            in_ledger = set()
            for seq, kind, outcome in ledger:
                in_ledger.add(seq)
                a.acked += outcome == "acked"
                a.dropped += outcome == "dropped"
                a.held += outcome == "held"
                if seq in stored:
                    if stored[seq] != kind:
                        a.kind_mismatch.append(seq)
                    continue
                if outcome == "acked":
                    a.lost.append(seq)
                elif outcome == "dropped":
                    a.dropped_unstored += 1
                else:
                    a.gaps.append(seq)
            first = ledger[0][0] if ledger else None
            a.unknown = sorted(seq for seq, kind in stored.items()
                               if kind in LEDGER_KINDS and seq not in in_ledger and first is not None and seq >= first)
            out[dev] = a
    finally:
        cloud.close()
    return Audit(out, duplicate_keys, duplicate_readings)


def wait_until_none(remaining: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``remaining()`` (what is still outstanding) until it is empty/zero; on timeout, say what was left."""
    last: list[Any] = [None]

    def done() -> bool:
        last[0] = remaining()
        return not last[0]

    try:
        wait_for(done, timeout=timeout, interval=0.5, message=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still outstanding: {last[0]!r}") from None
