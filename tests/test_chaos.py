"""Chaos: one gateway and 20 devices publishing steadily while agents, the gateway and the cloud are
SIGKILLed and restarted at random moments and the device->gateway and gateway->cloud links are cut
and restored through fault proxies. Afterwards every message a device recorded as acknowledged is in
the cloud store exactly once, and every message in each device's delivery ledger is either stored
or a drop the device reported.

Length (a soak test: the default ``make test``, as in CI, runs a bounded version, about 50 s):

* bounded (default): 30 s of chaos (``CWSNET_SOAK_SECONDS=N`` sets it), whose first six actions are
  the six kinds of fault in a random order, so a short run still kills the cloud and the gateway and
  cuts every kind of link; the same audit, to the same standard, as the full run;
* full: ``CWSNET_SOAK=1`` runs the 2-minute chaos (about 2.5 min in all);
* any length: ``--chaos-minutes 10`` (or ``CWSNET_CHAOS_MINUTES``) wins over both.

The schedule is random with a seed printed at the start; ``--chaos-seed N`` (or
``CWSNET_CHAOS_SEED``) replays a run's schedule at the same length (the processes' own timing still
varies). How the site is wired, drained and audited: ``tests/harness/chaos.py``; the timeline of
faults is written to ``chaos-timeline.log`` next to the processes' logs.
"""

from __future__ import annotations

import os
import random
import shlex
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import FaultProxy, ProcessSet
from harness.chaos import ChaosLab, Settings, audit
from harness.deploy import Deployment

from cloud.store import SqliteStore
from edge_agent.outbox import AgentOutbox

DEVICES = 20
BOUNDED_SECONDS = 30.0  # chaos in the bounded (default) run; the full one is --chaos-minutes (default 2)


def soak_requested() -> bool:
    """``CWSNET_SOAK=1``: run the soak tests at full size."""
    return os.environ.get("CWSNET_SOAK", "").strip().lower() not in ("", "0", "false", "no")


def chaos_seconds(config: pytest.Config) -> tuple[float, str]:
    """Seconds of chaos and which knob chose them (see the module docstring)."""
    minutes = float(config.getoption("--chaos-minutes"))
    args = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))]
    if os.environ.get("CWSNET_CHAOS_MINUTES") or any(str(a).startswith("--chaos-minutes") for a in args):
        return minutes * 60, "--chaos-minutes"
    if soak_requested():
        return minutes * 60, "full (CWSNET_SOAK=1)"
    bounded = float(os.environ.get("CWSNET_SOAK_SECONDS") or BOUNDED_SECONDS)
    return bounded, "bounded (CWSNET_SOAK=1 for the full run)"


def test_audit_finds_losses_gaps_duplicates_and_unreported_drops(tmp_path: Path) -> None:
    """The checker itself: a hand-made ledger and cloud store with one fault of each kind."""
    ob = AgentOutbox(tmp_path / "dev-1.db", max_bytes=64 * 1024)
    for seq in (10, 11, 13, 14):
        assert ob.add(seq, "t", b"x", False, "telemetry")
    assert not ob.add(12, "t", b"x" * 70_000, False, "telemetry")  # dropped by the overflow policy
    ob.remove_many([10, 11, 14])  # 13 stays held
    ob.close()
    SqliteStore(tmp_path / "cloud.db").close()
    with sqlite3.connect(tmp_path / "cloud.db") as c:
        for seq, kind in ((9, "birth"), (10, "telemetry"), (14, "telemetry"), (15, "status")):  # 11 is lost
            c.execute("insert into messages (sender, seq, msg_id, kind, topic, ts, received) values "
                      "('dev-1', ?, 'id', ?, 't', 0, 0)", (seq, kind))
        for seq in (10, 14):  # the same reading stored under two seqs
            c.execute("insert into telemetry (sender, seq, idx, stream, ts, \"values\") values "
                      "('dev-1', ?, 0, 'env', 1000, '{\"t\":1}')", (seq,))

    result = audit(["dev-1"], lambda dev: tmp_path / f"{dev}.db", tmp_path / "cloud.db", {"dev-1": 0})
    a = result.devices["dev-1"]
    assert (result.lost, result.duplicated, a.lost, a.gaps, a.held, a.unknown) == (1, 1, [11], [13], 1, [15])
    assert (a.dropped, a.dropped_unstored, a.drops_table, a.reported_drops) == (1, 1, 1, 0)
    problems = "\n".join(result.problems())
    for expected in ("1 readings under another seq", "not in the cloud store: seqs [11]",
                     "neither stored nor dropped: [13]", "still held", "missing from the ledger: [15]",
                     "reported in status 0"):
        assert expected in problems


@pytest.mark.integration
@pytest.mark.chaos
@pytest.mark.soak
def test_chaos_nothing_acknowledged_is_lost_or_duplicated(
    tmp_path: Path, procs: ProcessSet, fault_proxy: Callable[..., FaultProxy],
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str],
) -> None:
    seconds, length = chaos_seconds(request.config)
    seed = request.config.getoption("--chaos-seed")
    if seed is None:
        seed = int(os.environ.get("CWSNET_CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
    t_start = time.monotonic()

    def show(text: str) -> None:  # the figures are wanted in CI logs even when the test passes
        with capsys.disabled():
            print(text, flush=True)

    show(f"\nchaos: seed={seed} seconds={seconds:g} [{length}] devices={DEVICES} "
         f"(replay the schedule with --chaos-seed {seed}); logs in {tmp_path / 'logs'}")
    rng = random.Random(seed)
    d = Deployment(tmp_path, procs, devices=DEVICES)
    lab = ChaosLab(d, fault_proxy, rng, Settings(duration=seconds, cover_every_action=True))
    lab.start()
    lab.run_chaos()
    drain = lab.drain(timeout=150)
    reported = lab.reported_drops()
    lab.stop()

    result = audit(lab.devices, lab.outbox_db, lab.cloud_db, reported)
    runtime = time.monotonic() - t_start
    devs = result.devices.values()
    per_device = {dev: a.stored for dev, a in result.devices.items()}
    stages = {k: round(v, 1) for k, v in drain.items()}
    show(f"chaos summary: seed={seed} runtime={runtime:.0f}s chaos={seconds:.0f}s drain={stages} "
         f"actions={dict(sorted(lab.actions.items()))} unexpected_exits={len(lab.unexpected_exits)}")
    show(f"chaos messages: ledger={sum(a.ledger for a in devs)} acked={sum(a.acked for a in devs)} "
         f"dropped={result.dropped} (never stored: {sum(a.dropped_unstored for a in devs)}) "
         f"stored={sum(per_device.values())} readings={sum(a.readings for a in devs)}; per device {per_device}")
    show(f"lost={result.lost} duplicated={result.duplicated} reported_drops={result.reported_drops}")

    problems = result.problems() + [f"unexpected exit: {e}" for e in lab.unexpected_exits]
    assert result.lost == 0 and result.duplicated == 0 and not problems, "\n".join(
        [f"chaos found problems (seed {seed}):", *problems, "timeline:", *lab.timeline])
