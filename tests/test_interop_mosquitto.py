"""Interoperability with a real third-party broker (Debian's Mosquitto), and link faults.

- the agent with Mosquitto as its site broker (gateway with `broker: null`);
- the bridge with Mosquitto as the cloud broker (cloud with `broker: null`);
- the gateway's uplink cut by a fault proxy: data is held, then delivered in order, exactly once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from harness import FaultProxy, ProcessSet, free_port, make_password_file, wait_for
from harness.deploy import OPENER, Deployment

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

def _passwords(d: Deployment, nodes: list[str]) -> dict[str, str]:
    return {d.bundle(n)["mqtt_username"]: d.bundle(n)["mqtt_password"] for n in nodes}


def _tls_conf(d: Deployment, cert: str) -> str:
    """Mosquitto serving TLS with the certificate the lab's CA issued (the daemons verify it)."""
    crt, key = d.lab.tls_paths(cert)
    return f"cafile {d.lab.ca_file}\ncertfile {crt}\nkeyfile {key}"


def test_agent_with_mosquitto_as_site_broker(tmp_path: Path, procs: ProcessSet, mosquitto_factory: Any) -> None:
    d = Deployment(tmp_path, procs)
    users = _passwords(d, [d.topo.gateway, *d.topo.devices])
    pwfile = make_password_file(tmp_path / "site.passwd", users)
    acl = tmp_path / "site.acl"
    # the same least privilege as the embedded broker's ACLs, in Mosquitto's syntax
    acl.write_text(f"user {d.topo.gateway}\ntopic readwrite cws/v1/home/#\n\n"
                   "pattern write cws/v1/home/%u/#\npattern read cws/v1/home/%u/task/cmd\n"
                   "pattern read cws/v1/home/%u/ack\npattern read cws/v1/home/%u/config\n")
    site = mosquitto_factory(port=d.topo.gateway_mqtts_port, allow_anonymous=False, password_file=pwfile,
                             extra_conf=f"acl_file {acl}\n{_tls_conf(d, f'site-{d.topo.site}-broker')}")
    d.edit(d.topo.gateway, {"broker": None})  # the site already has a broker: Mosquitto
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    for dev in d.topo.devices:
        d.start("agent", dev)
    d.check_flow()
    assert "dev-1" in site.proc.log_text() and "New client connected" in site.proc.log_text()


def test_bridge_with_mosquitto_as_cloud_broker(tmp_path: Path, procs: ProcessSet, mosquitto_factory: Any) -> None:
    d = Deployment(tmp_path, procs)
    users = _passwords(d, ["cloud", d.topo.gateway])
    pwfile = make_password_file(tmp_path / "cloud.passwd", users)
    cloud_broker = mosquitto_factory(port=d.topo.cloud_mqtts_port, allow_anonymous=False, password_file=pwfile,
                                     extra_conf=_tls_conf(d, "cloud-broker"))
    d.edit("cloud", {"broker": None})
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    for dev in d.topo.devices:
        d.start("agent", dev)
    d.check_flow()
    log = cloud_broker.proc.log_text()
    assert "gw-home" in log and "cloud-ingest" in log


def _seqs(db: Path, sender: str) -> list[int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        return [r[0] for r in c.execute("select seq from messages where sender = ? order by seq", [sender])]


def test_uplink_cut_holds_data_then_delivers_in_order_exactly_once(
    tmp_path: Path, procs: ProcessSet, fault_proxy: Any
) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    proxy: FaultProxy = fault_proxy(d.topo.cloud_mqtts_port)  # the uplink is TLS: the proxy carries it
    metrics_port = free_port()
    d.edit(d.topo.gateway, {"uplink": {"port": proxy.port, "keepalive": 5}, "retransmit_after": 2.0,
                            "metrics_port": metrics_port})
    d.start_cloud()
    # an agent that runs no tasks seals nothing for its gateway alone (no task/status), so every seq it
    # uses from its birth on is a message for the cloud: the check below can demand no gap at all
    d.edit("dev-1", {"task_slots": 0})
    gw = d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")
    db = d.lab.path("cloud", "cloud.db")
    wait_for(lambda: len(_seqs(db, "dev-1")) >= 5, timeout=30, message="first messages stored")

    proxy.cut()
    stored_at_cut = len(_seqs(db, "dev-1"))

    def depth() -> float:
        with OPENER.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("cwsnet_gateway_outbox_depth "):
                    return float(line.split()[1])
        return 0.0

    wait_for(lambda: depth() >= 10, timeout=30, message="gateway outbox holding data during the outage")
    assert len(_seqs(db, "dev-1")) <= stored_at_cut + 2  # nothing crosses a cut link
    proxy.restore()
    wait_for(lambda: depth() == 0, timeout=40, message="outbox drained after the link came back")
    seqs = _seqs(db, "dev-1")
    assert len(seqs) == len(set(seqs)), "no duplicates at the cloud"
    # one agent run: everything from its birth on is contiguous (the seq before it is its will)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        birth = c.execute("select min(seq) from messages where sender='dev-1' and kind='birth'").fetchone()[0]
    after = [s for s in seqs if s >= birth]
    assert after == list(range(birth, after[-1] + 1)), "a gap: something was lost"
    assert "uplink" in gw.log_text()
