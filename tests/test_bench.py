"""The benchmark must keep working: a tiny run prints every figure (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]


def test_e2e_benchmark_runs_and_reports_ratios() -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "e2e.py"
    r = subprocess.run([sys.executable, str(bench), "--devices", "2", "--messages", "20", "--batch", "5", "--json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("cwsnet_sealed_readings_per_s", "baseline_mosquitto_qos1_per_s", "ratio_single_vs_baseline",
                "cwsnet_latency_ms_p50", "cwsnet_latency_ms_p99", "baseline_latency_ms_p50"):
        assert out[key] is not None and out[key] > 0, key


def test_policy_benchmark_runs_and_reports_ratios() -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "policy.py"
    r = subprocess.run([sys.executable, str(bench), "--devices", "2", "--messages", "20", "--rounds", "1",
                        "--decisions", "2000", "--json"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("access_decisions_per_s", "routing_decisions_per_s", "qos_decisions_per_s",
                "automation_observations_per_s", "offload_placements_per_s", "ratio_on_vs_off"):
        assert out[key] is not None and out[key] > 0, key


def test_rate_limit_benchmark_runs_and_reports_ratios() -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "ratelimit.py"
    r = subprocess.run([sys.executable, str(bench), "--rate", "5", "--seconds", "2", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["flood_limited_flood_stored"] < out["flood_no_limit_flood_stored"]
    for key in ("quiet_p99_ms", "flood_limited_p99_ms", "p99_ratio_limited_vs_quiet", "quiet_good_per_s"):
        assert out[key] is not None and out[key] > 0, key


def test_task_benchmark_runs_and_reports_every_tier() -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "tasks.py"
    r = subprocess.run([sys.executable, str(bench), "--tasks", "10", "--devices", "2", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for tier in ("direct", "device", "gateway", "cloud", "site"):
        assert out[f"{tier}_tasks_per_s"] > 0 and out[f"{tier}_p99_ms"] >= out[f"{tier}_p50_ms"] >= 0, tier
    assert out["device_executors"] >= 1 and out["gateway_executors"] == 1 and out["cloud_executors"] == 1
    assert out["cloud_rate_ratio_vs_direct"] > 0 and out["site_executors"] >= 1


def test_parts_benchmark_runs_and_reports_the_ratio_against_plain_mqtt() -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "parts.py"
    r = subprocess.run([sys.executable, str(bench), "--sizes", "0.5", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["echo_0.5MB_s"] > 0 and out["baseline_0.5MB_s"] > 0 and out["echo_0.5MB_goodput_MBps"] > 0
    assert out["echo_0.5MB_ratio_vs_paho_mosquitto"] > 0
