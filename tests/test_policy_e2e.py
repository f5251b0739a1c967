"""Policies enforced end to end, with real processes: routing, rate limits and site automation."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import yaml
from harness import ProcessSet, wait_for
from harness.db import query
from harness.deploy import Deployment, get, post
from harness.sniffer import Sniffer
from paho.mqtt.enums import CallbackAPIVersion

from cwsnet import topics
from cwsnet.bundle import Bundle
from cwsnet.endpoint import Endpoint
from cwsnet.replay import SeqCounter

HEALTH_SENSOR = {"type": "simulated", "stream": "health", "interval": 0.1, "fields": ["hr"], "pattern": "random",
                 "offset": 70, "amplitude": 20, "seed": 7}

ROUTING = """kind: routing
name: default-routing          # replaces the shipped one: summaries every 2 s instead of hourly
rules:
  - name: health-stays-on-site
    match: {streams: [health, "health.*"]}
    class: health
    to: gateway
    summary: {every: 2s, stream: health.summary, stats: [count, min, max, mean]}
"""


def lab_policy(d: Deployment, name: str, text: str) -> Path:
    folder = d.lab.path("policies")
    folder.mkdir(exist_ok=True)
    p = folder / name
    p.write_text(text)
    return p


def test_health_readings_stay_at_the_gateway_and_only_summaries_reach_the_cloud(tmp_path: Path,
                                                                                 procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=2)
    lab_policy(d, "routing.yaml", ROUTING)
    d.edit("dev-1", {"sensors": [*_sensors(d, "dev-1"), HEALTH_SENSOR]})
    d.start_cloud()
    admin = json.loads(d.lab.path("admin-mqtt.json").read_text())
    cloud_side = Sniffer(d.topo.cloud_mqtt_port, admin["username"], admin["password"], "admin-observer")
    assert cloud_side.subscribe("cws/v1/#") == 1
    d.start("gateway", d.topo.gateway)
    for dev in d.topo.devices:
        d.start("agent", dev)

    gw, cloud_db, site_db = d.topo.gateway, d.lab.path("cloud", "cloud.db"), d.lab.path("gateway", "site-data.db")

    def summaries() -> list[dict]:
        rows = query(cloud_db, "select \"values\" from telemetry where sender = ? and stream = 'health.summary'", (gw,))
        return [json.loads(r[0]) for r in rows]

    wait_for(lambda: len(summaries()) >= 3, timeout=40, message="three health summaries at the cloud")
    d.check_flow()  # env telemetry and tasks flow as before

    # the summaries are of the readings the gateway kept: counts match window by window (windows go by
    # when the gateway received them)
    kept = query(site_db, "select received from readings where node = 'dev-1' and stream = 'health'")
    assert len(kept) >= 20
    for s in summaries():
        assert s["node"] == "dev-1" and s["stream"] == "health" and s["window_s"] == 2
        assert 40 <= s["hr.min"] <= s["hr.mean"] <= s["hr.max"] <= 100
    by_window = {}
    for (ts,) in kept:
        by_window[ts // 2000 * 2000 + 2000] = by_window.get(ts // 2000 * 2000 + 2000, 0) + 1
    rows = query(cloud_db, "select ts, \"values\" from telemetry where sender = ? and stream = 'health.summary'", (gw,))
    for ts, values in rows:
        assert json.loads(values)["count"] == by_window[ts], f"window ending {ts}"

    # nothing of the raw stream ever reached the cloud: not its broker, not its store
    with cloud_side.lock:
        seen = [t for t, _ in cloud_side.messages]
    assert not [t for t in seen if t.endswith("/telemetry/health")], "raw health readings on the cloud broker"
    assert f"cws/v1/home/{gw}/telemetry/health.summary" in seen
    assert any(t == "cws/v1/home/dev-1/telemetry/env" for t in seen)
    assert query(cloud_db, "select count(*) from telemetry where stream = 'health'") == [(0,)]
    # the device sealed them to the gateway: it was told its routes
    routes = query(d.lab.path("agents", "dev-1", "agent.db"), "select value from kv where key = 'routes'")
    assert routes and json.loads(routes[0][0])["table"] == [["health", "gateway"], ["health.*", "gateway"]]
    cloud_side.close()


def _sensors(d: Deployment, node: str) -> list[dict]:
    return yaml.safe_load(d.lab.config_path(node).read_text())["sensors"]


LIMITS = """kind: qos
name: a-site-limits             # sorts before default-qos: its rules are matched first
rules:
  - name: dev-3-telemetry
    match: {node: dev-3, channels: [telemetry]}
    limit: {rate: 5/s, burst: 5, over: pause}
"""


def test_a_rate_limit_caps_a_flooding_device_and_the_others_lose_nothing(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=3)
    lab_policy(d, "limits.yaml", LIMITS)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    for dev in ("dev-1", "dev-2"):
        d.start("agent", dev)
    wait_for(lambda: {"dev-1", "dev-2"} <= d.online(), timeout=30, message="dev-1 and dev-2 online")

    # dev-3 misbehaves: sealed telemetry as fast as it can publish, ignoring every custody ack and pause
    b = Bundle.load(d.lab.bundle_path("dev-3"))
    ep = Endpoint(b.identity, SeqCounter(int(time.time() * 1000), lambda m: None), {"cloud": b.cloud_public_key}.get)
    topic = topics.telemetry("home", "dev-3", "flood")
    flood = [ep.seal(topic, "telemetry", {"stream": "flood", "readings": [{"ts": int(time.time() * 1000),
                                                                           "values": {"i": i}}]}, to="cloud")[0]
             for i in range(600)]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-3", protocol=mqtt.MQTTv311)
    c.username_pw_set(b.mqtt_username, b.mqtt_password)
    c.connect("127.0.0.1", d.topo.gateway_mqtt_port)
    c.loop_start()
    t0 = time.monotonic()
    for p in flood:
        c.publish(topic, p, qos=1)

    cloud_db, gw = d.lab.path("cloud", "cloud.db"), d.topo.gateway
    events = wait_for(lambda: [e for e in get(f"{d.base}/api/v1/events?limit=200")["items"]
                               if e["type"] == "qos.limited"] or None, timeout=30, message="a qos.limited event")
    assert events[0]["data"]["rule"] == "a-site-limits/dev-3-telemetry" and events[0]["data"]["node"] == "dev-3"
    assert events[0]["source"] == gw
    # it went on sending through its pause: disconnected and locked out of the site broker for a while
    locked = wait_for(lambda: [e for e in get(f"{d.base}/api/v1/events?limit=200")["items"]
                               if e["type"] == "qos.locked_out"] or None, timeout=30, message="dev-3 locked out")
    assert locked[0]["data"]["node"] == "dev-3" and locked[0]["data"]["rule"] == "a-site-limits/dev-3-telemetry"
    c.loop_stop()
    again = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-3", protocol=mqtt.MQTTv311)
    again.username_pw_set(b.mqtt_username, b.mqtt_password)
    connacks: list = []
    again.on_connect = lambda _c, _u, _f, rc, _p: connacks.append(rc)
    again.connect("127.0.0.1", d.topo.gateway_mqtt_port)
    again.loop_start()
    wait_for(lambda: connacks, timeout=10, message="a CONNACK for dev-3")
    again.disconnect()
    again.loop_stop()
    assert connacks[0].is_failure, connacks  # its correct token is refused while it is locked out
    # refused, not stored: counted in the gateway's status (the site broker may shed part of such a
    # flood before the bridge sees it; that is never acked to anyone either)
    wait_for(lambda: (get(f"{d.base}/api/v1/gateways/{gw}").get("status") or {}).get("stats", {})
             .get("rate_limited", 0) >= 100, timeout=30, message="refusals in the gateway status")
    outbox_db = d.lab.path("gateway", "uplink-outbox.db")
    wait_for(lambda: query(outbox_db, "select count(*) from outbox where sender = 'dev-3'")[0][0] == 0, timeout=30,
             message="what the gateway took from dev-3 forwarded and acked")
    stored = query(cloud_db, "select count(*) from telemetry where sender = 'dev-3'")[0][0]
    # at most the burst plus the rate since the flood began (the bucket cannot have given more)
    cap = 5 + 5 * (time.monotonic() - t0)
    assert 5 <= stored <= cap < 600, (stored, cap)

    # the well-behaved devices lost nothing: everything they sent is at the cloud, their outboxes drain
    for dev in ("dev-1", "dev-2"):
        agent_db = d.lab.path("agents", dev, "outbox.db")
        wait_for(lambda db=agent_db: query(db, "select count(*) from outbox")[0][0] <= 2, timeout=30,
                 message=f"{dev}'s outbox drained")
    task = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"x": 1}})
    wait_for(lambda: get(f"{d.base}/api/v1/tasks/{task['id']}")["state"] == "succeeded", timeout=20,
             message="a task on dev-1")


GREENHOUSE_SENSOR = {"type": "simulated", "stream": "greenhouse", "interval": 0.5, "fields": ["temp_c"],
                     "pattern": "square", "offset": 27, "amplitude": 6, "period": 80}  # 33 C for 40 s, then 21 C
GREENHOUSE = """kind: routing
name: greenhouse-routing
rules:
  - name: greenhouse-on-site
    match: {streams: [greenhouse]}
    to: gateway
    summary: {every: 10s, stream: greenhouse.summary}
---
kind: automation
name: greenhouse
rules:
  - name: too-hot
    at: gateway
    on: {kind: telemetry, stream: greenhouse}
    when: 'values.temp_c > 30.0'
    for: 30s
    clear_when: 'values.temp_c < 28.0'
    cooldown: 1m
    then:
      - alert: {severity: warning, message: "{node} is at {values.temp_c} C"}
      - task: {handler: sha256, args: {data: "b3BlbiB0aGUgdmVudHM="}, on: gateway}
"""


def test_a_site_automation_rule_fires_once_per_episode_while_the_cloud_is_down(tmp_path: Path,
                                                                              procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    lab_policy(d, "greenhouse.yaml", GREENHOUSE)
    d.edit("dev-1", {"sensors": [*_sensors(d, "dev-1"), GREENHOUSE_SENSOR]})
    cloud = d.start_cloud()
    d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")
    gw = d.topo.gateway
    site_db, outbox_db = d.lab.path("gateway", "site-data.db"), d.lab.path("gateway", "uplink-outbox.db")
    wait_for(lambda: site_db.exists() and query(site_db, "select count(*) from readings where stream = 'greenhouse'")
             [0][0] > 0, timeout=30, message="greenhouse readings kept at the gateway")
    cloud.kill()  # the cloud is unreachable for the whole episode

    def held(event_type: str) -> list[dict]:
        rows = query(outbox_db, "select payload from outbox where topic = ?", (f"cws/v1/home/{gw}/event/{event_type}",))
        return [cbor2.loads(r[0]) for r in rows]

    wait_for(lambda: len(held("alert")) == 1 and len(held("automation.task")) == 1, timeout=60,
             message="the rule fired: an alert and the task's result held in the gateway's outbox")
    # the episode ends when the temperature drops (hysteresis: below 28 C); it never fired again
    wait_for(lambda: _coolest(site_db) < 28, timeout=40, message="the temperature back below 28 C")
    assert len(held("alert")) == 1 and len(held("automation.task")) == 1

    cloud.restart()
    events = wait_for(lambda: (es := [e for e in get(f"{d.base}/api/v1/events?limit=200")["items"]
                                      if e["source"] == gw and e["type"] in ("alert", "automation.task")])
                      and len(es) >= 2 and es, timeout=40, message="the gateway's alert and task result at the cloud")
    alert = [e for e in events if e["type"] == "alert"]
    task = [e for e in events if e["type"] == "automation.task"]
    assert len(alert) == 1 and len(task) == 1
    assert alert[0]["message"] == "dev-1 is at 33.0 C" and alert[0]["severity"] == "warning"
    assert alert[0]["data"]["rule"] == "greenhouse/too-hot" and alert[0]["data"]["node"] == "dev-1"
    assert task[0]["data"]["state"] == "succeeded" and task[0]["data"]["handler"] == "sha256"
    assert task[0]["data"]["result"]["sha256"] == hashlib.sha256(b"open the vents").hexdigest()
    # it waited out the whole 30 s: from the first hot reading to the firing
    assert alert[0]["data"]["at"] - alert[0]["data"]["since"] >= 30_000


def _coolest(site_db: Path) -> float:
    rows = query(site_db, "select vals from readings where stream = 'greenhouse' order by ts desc limit 3")
    return min((cbor2.loads(r[0])["temp_c"] for r in rows), default=99.0)
