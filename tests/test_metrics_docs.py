"""Every metric docs/operations.md documents exists, with its documented type, on a real cloud and gateway,
and both /metrics pages parse as Prometheus text (issue 8: "/metrics on cloud and gateway parses as valid
Prometheus text, and every metric in docs/operations.md exists")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import ProcessSet, free_port, wait_for
from harness.deploy import OPENER, Deployment, get, post, prometheus, request
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def documented() -> dict[str, str]:
    """``{metric name: type}`` from the Metrics table of docs/operations.md."""
    text = DOC.read_text()
    section = text[text.index("## Metrics"):]
    rows = re.findall(r"^\| `(cwsnet_[a-z0-9_]+)` \| (counter|gauge|histogram|summary) \|", section, re.M)
    assert len(rows) >= 20, "the metrics table of docs/operations.md was not found"
    return dict(rows)


def families(url: str) -> dict[str, str]:
    """``{name: type}`` of a /metrics page, parsed by prometheus_client's own parser (it raises on bad text);
    a counter is listed under its name with ``_total``, as documented."""
    with OPENER.open(request(url), timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name + ("_total" if fam.type == "counter" else "")] = fam.type
    return out


def test_every_documented_metric_exists_with_its_type_and_the_pages_parse(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    mport = free_port()
    d.edit(d.topo.gateway, {"metrics_port": mport})
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")
    wait_for(lambda: d.online() == {"dev-1"}, timeout=30, message="dev-1 online")
    # a direct task on dev-1 and a scheduled one on the cloud's workers: both finish, so both are timed
    direct = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"a": 1}})["id"]
    scheduled = post(f"{d.base}/api/v1/tasks", {"handler": "echo", "args": {"b": 2}})["id"]
    for tid in (direct, scheduled):
        wait_for(lambda tid=tid: get(f"{d.base}/api/v1/tasks/{tid}")["state"] == "succeeded", timeout=30,
                 message=f"task {tid}")
    counts = wait_for(lambda: (c := {k: v for k, v in prometheus(f"{d.base}/metrics").items()
                                     if k.startswith("cwsnet_cloud_task_seconds_count")}) and len(c) >= 2 and c,
                      timeout=10, message="both timings")  # (the scheduler counts just after storing the state)
    assert counts.get('cwsnet_cloud_task_seconds_count{kind="direct",state="succeeded"}') == 1, counts
    assert counts.get('cwsnet_cloud_task_seconds_count{kind="scheduled",state="succeeded"}') == 1, counts
    cloud = families(f"{d.base}/metrics")
    gateway = wait_for(lambda: families(f"http://127.0.0.1:{mport}/metrics"), timeout=20, message="gateway metrics")
    missing, wrong = [], []
    for name, kind in documented().items():
        page = gateway if name.startswith("cwsnet_gateway_") else cloud
        where = "gateway" if page is gateway else "cloud"
        if name not in page:
            missing.append(f"{name} ({where})")
        elif page[name] != kind:
            wrong.append(f"{name} ({where}): documented {kind}, served {page[name]}")
    assert not missing, f"documented in docs/operations.md but not served: {missing}"
    assert not wrong, f"types differ from docs/operations.md: {wrong}"
