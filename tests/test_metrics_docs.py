"""Every metric docs/operations.md documents exists, with its documented type, on a real cloud and gateway,
and both /metrics pages parse as Prometheus text (issue 8: "/metrics on cloud and gateway parses as valid
Prometheus text, and every metric in docs/operations.md exists")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import ProcessSet, free_port, wait_for
from harness.deploy import OPENER, Deployment, request
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
