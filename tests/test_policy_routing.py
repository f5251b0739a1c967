"""Routing policies: which streams stay at the gateway, the devices' route tables, the summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwsnet import topics
from cwsnet.policy import PolicyError, load_policies
from cwsnet.policy.routing import RoutingEngine, summarize
from cwsnet.policy.watch import shipped_policies
from gateway.local import SiteData

SITE = """kind: routing
name: site-routing
rules:
  - name: lab-env-local
    match: {streams: [env], site: lab}
    to: gateway
    summary: {every: 5m, stream: env.summary, stats: [mean, last]}
  - name: cam-to-cloud
    match: {streams: ["health.cam"]}
    class: video
    to: cloud
---
kind: routing
name: zz-audit
mode: audit
rules:
  - name: try-keeping-env
    match: {streams: [env]}
    to: gateway
"""


def engine(tmp_path: Path, text: str = SITE) -> RoutingEngine:
    (tmp_path / "site.yaml").write_text(text)
    return RoutingEngine(load_policies([shipped_policies(), tmp_path]))


def test_the_shipped_default_keeps_health_on_site_and_sends_the_rest_up(tmp_path: Path) -> None:
    e = RoutingEngine(load_policies([shipped_policies()]))
    kept = e.route("home", "dev-1", "health")
    assert (kept.to, kept.data_class, kept.decided_by) == ("gateway", "health", "default-routing/health-stays-on-site")
    assert kept.summary is not None and kept.summary.every == 3600 and kept.keep == 30 * 86400
    assert e.route("home", "dev-1", "health.spo2").to == "gateway"
    assert e.route("home", "dev-1", "healthy").to == "cloud"  # a pattern, not a prefix
    up = e.route("home", "dev-1", "env")
    assert up.to == "cloud" and up.rule is None
    assert "no enforced routing rule matches" in up.explain()


def test_first_match_in_policy_name_order_decides_and_audit_is_reported_only(tmp_path: Path) -> None:
    e = engine(tmp_path)
    # default-routing sorts before site-routing: its health.* rule decides health.cam
    cam = e.route("home", "dev-1", "health.cam")
    assert cam.decided_by == "default-routing/health-stays-on-site"
    lab = e.route("lab", "dev-7", "env")
    assert (lab.to, lab.decided_by) == ("gateway", "site-routing/lab-env-local")
    home = e.route("home", "dev-1", "env")
    assert home.to == "cloud" and home.audit == ["zz-audit/try-keeping-env would send it to the gateway"]
    text = lab.explain()
    assert text.startswith("KEEP AT GATEWAY: telemetry/env of dev-7 (site lab)")
    assert "site-routing/lab-env-local" in text and "site.yaml:4" in text
    assert "summaries (mean, last) every 5m go up as telemetry/env.summary" in text


def test_a_device_table_routes_exactly_like_the_engine(tmp_path: Path) -> None:
    e = engine(tmp_path)
    for site, node in (("lab", "dev-7"), ("home", "dev-1")):
        table = e.device_table(site, node)
        for stream in ("env", "health", "health.cam", "health.x", "system", "envx"):
            assert topics.route_in_table(table, stream) == e.route(site, node, stream).to, (site, stream)
    assert e.device_table("home", "dev-1") == [["health", "gateway"], ["health.*", "gateway"]]
    assert topics.route_in_table([], "health") == "cloud"


@pytest.mark.parametrize(("text", "expected"), [
    ("kind: routing\nname: r\nrules:\n  - name: a\n    to: moon\n",
     "site.yaml:5:5: rules.0.to: Input should be 'gateway' or 'cloud'"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    to: gateway\n    keep: forever\n",
     "site.yaml:6:5: rules.0.keep: Value error, keep must be a duration like 30s, 5m, 1h or 7d"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    summary: {every: 1h, stream: s}\n",
     "site.yaml:4:5: rules.0: summary and keep apply only to streams kept at the gateway"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    to: gateway\n    summary: {every: 1h, stream: s, stats: [p99]}\n",
     "site.yaml:6:37: rules.0.summary.stats.0: Input should be"),
    ("kind: routing\nname: r\nrules:\n  - name: a\n    class: Health\n", "site.yaml:5:5: rules.0.class: Value error"),
])
def test_bad_routing_files_name_file_line_col_and_field(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "site.yaml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policies([tmp_path])
    assert any(p.replace(str(tmp_path) + "/", "").startswith(expected) for p in exc.value.problems), \
        exc.value.problems


def test_summaries_per_device_and_stream_over_numeric_values_only() -> None:
    rows = [("dev-1", "health", 1000, {"hr": 60, "ok": True, "note": "x"}),
            ("dev-1", "health", 2000, {"hr": 80.5}),
            ("dev-2", "health", 1500, {"hr": 70}),
            ("dev-1", "health", 5000, {"hr": 99})]  # outside [0, 5000)
    out = summarize(rows, 0, 5000, ["count", "min", "max", "mean", "last"])
    assert out == [
        {"ts": 5000, "values": {"node": "dev-1", "stream": "health", "window_s": 5, "count": 2, "hr.count": 2,
                                "hr.min": 60, "hr.max": 80.5, "hr.mean": 70.25, "hr.last": 80.5}},
        {"ts": 5000, "values": {"node": "dev-2", "stream": "health", "window_s": 5, "count": 1, "hr.count": 1,
                                "hr.min": 70, "hr.max": 70, "hr.mean": 70.0, "hr.last": 70}},
    ]
    assert summarize(rows, 10_000, 20_000, ["mean"]) == []


def test_the_gateway_keeps_site_readings_once_and_expires_them(tmp_path: Path) -> None:
    db = SiteData(tmp_path / "site.db")
    assert db.add_batch("dev-1", 7, "health", [(1000, {"hr": 60}), (2000, {"hr": 61})])
    assert not db.add_batch("dev-1", 7, "health", [(1000, {"hr": 60}), (2000, {"hr": 61})])  # a re-send
    db.add_batch("dev-1", 8, "env", [(1500, {"t": 20})])
    assert [r[2] for r in db.window(["health*"], 0, 10_000)] == [1000, 2000]
    assert db.first_ts(["health"], 1500) == 2000 and db.first_ts(["health"], 2001) is None
    db.put_mark("summary:x", 3600_000)
    db.close()
    db = SiteData(tmp_path / "site.db")  # durable
    assert db.get_mark("summary:x") == 3600_000 and db.count() == 3
    assert db.expire(["health*"], 1500) == 1 and db.count() == 2
