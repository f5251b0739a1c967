"""Outage: the cloud is unreachable while a backlog of messages accumulates at the gateway; after
it returns, every one is delivered exactly once, in per-device order, and the gateway's outbox drains.

Real processes (gateway, then cloud) and 20 simulated devices publishing sealed telemetry QoS 1
in parallel: the scenario of ``bench/outage.py``, whose functions this test runs (figures are
printed; only correctness is asserted).

Size (a soak test: the default ``make test``, as in CI, runs a bounded version):

* bounded (default): 20,000 messages (1,000 per device, 40 of the gateway's 500-row commits), about
  35 s on 2 cores; every check of the full run, on less data;
* full: ``CWSNET_SOAK=1`` replays 100,000 messages (about 2.5 min on 2 cores);
* any size: ``CWSNET_OUTAGE_MESSAGES=N`` wins over both (at least one per device).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from harness import ProcessSet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import outage  # noqa: E402

DEVICES = 20
FULL_MESSAGES = 100_000  # CWSNET_SOAK=1
BOUNDED_MESSAGES = 20_000  # the default


def soak_requested() -> bool:
    """``CWSNET_SOAK=1``: run the soak tests at full size."""
    return os.environ.get("CWSNET_SOAK", "").strip().lower() not in ("", "0", "false", "no")


def backlog_size() -> int:
    """Messages in the backlog (see the module docstring)."""
    if n := os.environ.get("CWSNET_OUTAGE_MESSAGES"):
        return max(int(n), DEVICES)
    return FULL_MESSAGES if soak_requested() else BOUNDED_MESSAGES


@pytest.mark.integration
@pytest.mark.soak  # bounded (20,000 messages) by default; CWSNET_SOAK=1: 100,000
def test_backlog_is_delivered_exactly_once_in_per_device_order(tmp_path: Path, procs: ProcessSet) -> None:
    messages = backlog_size()
    print(f"outage backlog: {messages} messages from {DEVICES} devices"
          f"{'' if messages == FULL_MESSAGES else ' (CWSNET_SOAK=1 for the full 100,000)'}")
    t0 = time.monotonic()
    # A stage (accumulate, replay) fails as soon as it makes no progress for 30 s; a slow but moving
    # one (a busy machine) may use the rest of pytest's 300 s per test.
    out = outage.run_outage(tmp_path, procs.start, devices=DEVICES, messages=messages, stage_timeout=250,
                            stall=30, log=print)
    report = out["report"]

    assert report["expected"] == messages
    assert report["stored"] == messages, out["failures"]
    assert report["readings"] == messages, out["failures"]
    # exactly once: every published (sender, seq) stored with the id it was sealed with, nothing else
    assert (report["missing"], report["extra"], report["duplicates"], report["id_mismatches"]) == (0, 0, 0, 0)
    # per-device order: each device's messages were stored in increasing seq order
    assert report["out_of_order"] == {}
    assert out["outbox_left"] == 0  # every message acked by the cloud and freed at the gateway
    assert out["failures"] == []

    figures = {k: v for k, v in out.items() if k not in ("report", "failures")}
    print(f"outage figures ({time.monotonic() - t0:.0f} s in all): {json.dumps(figures)}")


def test_the_delivery_check_catches_loss_duplicates_reordering_and_substitution(tmp_path: Path) -> None:
    """The checker the outage test relies on is not vacuous (a synthetic cloud store, no processes)."""
    lab = outage.HomeLab(tmp_path)
    db_path = outage.cloud_db(lab)
    db_path.parent.mkdir(parents=True)
    loads = [outage.DeviceLoad(node, None, "t", seqs=[1, 2, 3, 4], ids=[f"{node}-{s}" for s in (1, 2, 3, 4)])  # type: ignore[arg-type]
             for node in ("a", "b", "c")]
    with sqlite3.connect(db_path) as db:
        db.execute("create table messages (sender text, seq integer, msg_id text, kind text, primary key (sender, seq))")
        db.execute("create table telemetry (sender text, seq integer, stream text)")
        rows = [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 3), ("a", 4), ("b", 2), ("b", 4),  # b reordered
                ("c", 1), ("c", 2), ("c", 4), ("x", 9)]  # c lost seq 3; x was never published
        for sender, seq in rows:
            msg_id = "forged" if (sender, seq) == ("a", 4) else f"{sender}-{seq}"
            db.execute("insert into messages values (?, ?, ?, 'telemetry')", [sender, seq, msg_id])
            db.execute("insert into telemetry values (?, ?, ?)", [sender, seq, outage.STREAM])
    report = outage.verify(lab, loads)
    assert (report["expected"], report["stored"], report["missing"], report["extra"]) == (12, 12, 1, 1)
    assert report["id_mismatches"] == 1
    assert list(report["out_of_order"]) == ["b"]
    problems = outage.failures(report, outbox_left=5)
    assert any("b:" in p for p in problems) and any("outbox still holds 5" in p for p in problems)
    assert not any(p.startswith("cloud stored") for p in problems)  # 12 of 12 rows: the count alone misses it
