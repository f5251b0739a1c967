"""Cloud-side automation (issue 6): `at: cloud` rules fired once per episode into alerts and device tasks,
gateways' automation requests queued once and only for their own site, state across restarts, and the
qos retention sweeper. CloudAutomation and RetentionSweeper run on a real SqliteStore; the daemon's wiring
is driven in process (no broker); one test runs the real processes."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from cloud.automation import CloudAutomation, RetentionSweeper, state_path
from cloud.store import IngestItem, NewEvent, Reading, SqliteStore, StatusUpdate
from cwsnet.policy import PolicySet, load_policies

T0 = 1_767_225_600_000  # ms: 2026-01-01T00:00:00Z
DAY = 86_400_000
KEY = base64.b64encode(bytes(32)).decode()  # a well-formed public key (no message is opened here)

MEM = """\
kind: automation
name: fleet
rules:
  - name: mem-high
    at: cloud
    on: {kind: status}
    when: 'values.mem > 90.0'
    for: 20s
    clear_when: 'values.mem < 80.0'
    then:
      - alert: {severity: critical, message: "{node} at {site}: memory {values.mem}%"}
      - command: {handler: echo, args: {say: "free some memory"}, to: node}
  - name: site-tasks
    at: gateway                      # the gateway's: never run by the cloud
    on: {kind: status}
    when: 'values.mem > 10.0'
    then:
      - alert: {message: "gateway rule"}
"""


class Dispatcher:
    def __init__(self) -> None:
        self.requested: list[str] = []

    def request(self, task_id: str) -> None:
        self.requested.append(task_id)


class World:
    """A cloud store with gateway gw-1 and devices dev-1, dev-2 on site home, gw-2 and dev-9 on site away."""

    def __init__(self, tmp_path: Path, policy: str = MEM) -> None:
        self.tmp = tmp_path
        self.store = SqliteStore(tmp_path / "cloud.db")
        for node, site, role in (("gw-1", "home", "gateway"), ("dev-1", "home", "device"),
                                 ("dev-2", "home", "device"), ("gw-2", "away", "gateway"),
                                 ("dev-9", "away", "device")):
            self.store.upsert_node(node, site=site, role=role, public_key=KEY)
        self.policy_dir = tmp_path / "policies"
        self.policy_dir.mkdir()
        (self.policy_dir / "rules.yaml").write_text(policy)
        self.dispatcher = Dispatcher()
        self.published: list[dict[str, Any]] = []
        self.seq = 100
        self.auto = self.start()

    def start(self) -> CloudAutomation:
        """A CloudAutomation as the daemon makes it (again after a 'restart': same store and state file)."""
        return CloudAutomation(load_policies([self.policy_dir]), self.store, self.dispatcher.request,
                               publish=self.published.append, state_file=state_path(self.store.path),
                               clock=lambda: T0 / 1000)

    def item(self, sender: str, kind: str, topic_tail: str, ts: int, **kw: Any) -> IngestItem:
        self.seq += 1
        site = self.store.get_node(sender).site
        return IngestItem(sender=sender, seq=self.seq, msg_id="0" * 32, kind=kind,
                          topic=f"cws/v1/{site}/{sender}/{topic_tail}", ts=ts, received=ts, **kw)

    def status(self, node: str, t_s: float, **body: Any) -> IngestItem:
        ts = T0 + int(t_s * 1000)
        return self.item(node, "status", "status", ts,
                         status=StatusUpdate(kind="status", online=True, body={"state": "online", **body}))

    def telemetry(self, node: str, stream: str, *readings: tuple[int, dict[str, Any]]) -> IngestItem:
        return self.item(node, "telemetry", f"telemetry/{stream}", readings[0][0], stream=stream,
                         readings=tuple(Reading(ts, v) for ts, v in readings))

    def event(self, node: str, etype: str, data: dict[str, Any], ts: int = T0) -> IngestItem:
        return self.item(node, "event", f"event/{etype}", ts,
                         event=NewEvent(ts, node, etype, "info", f"{etype} from {node}", data))

    def events(self, etype: str) -> list[Any]:
        return sorted((e for e in self.store.list_events(limit=1000).items if e.type == etype), key=lambda e: e.id)

    def tasks(self) -> list[Any]:
        return list(reversed(self.store.list_tasks(limit=1000).items))


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = World(tmp_path)
    yield world
    world.store.close()


def offer(w: World, *items: IngestItem, delay_ms: int = 500) -> list[Any]:
    """Hand over each item as ingest does, ``delay_ms`` after its own time."""
    done = []
    for it in items:
        done += w.auto.offer([(it, None)], it.ts + delay_ms)
    return done


# ---- cloud rules ------------------------------------------------------------------------------------

def test_a_cloud_rule_over_device_status_fires_once_per_episode_with_an_alert_and_a_task(w: World) -> None:
    assert w.auto.engine.rules == ["fleet/mem-high"]  # the gateway's rule is not the cloud's
    assert offer(w, w.status("dev-1", 0, mem=95), w.status("dev-1", 10, mem=96)) == []  # 20 s not yet held
    assert w.auto.tick(T0 + 15_000) == []
    done = w.auto.tick(T0 + 20_500)  # no new status: the tick carries dev-1's clock to 20 s
    assert [d.what for d in done] == ["alert", "queued"]

    (alert,) = w.events("alert")
    assert alert.source == "dev-1" and alert.severity == "critical"
    assert alert.message == "dev-1 at home: memory 96%"
    assert alert.data["rule"] == "fleet/mem-high" and alert.data["source"].endswith("rules.yaml:4")
    assert alert.data["since"] == T0 and alert.data["at"] == T0 + 20_000 and alert.data["values"]["mem"] == 96
    (task,) = w.tasks()
    assert (task.target, task.handler, task.args, task.state) == ("dev-1", "echo", {"say": "free some memory"},
                                                                  "queued")
    assert task.deadline == T0 + 20_500 + 3_600_000  # an automation command expires after an hour
    assert w.dispatcher.requested == [task.id]
    (queued,) = w.events("automation.queued")
    assert queued.data["task_id"] == task.id and queued.data["rule"] == "fleet/mem-high"
    assert {c["type"] for c in w.published} == {"event", "task"}  # the console hears of both at once

    # the episode goes on (still above 90, then hovering between 80 and 90): nothing more
    assert offer(w, w.status("dev-1", 30, mem=97), w.status("dev-1", 40, mem=85), w.status("dev-1", 50, mem=91)) == []
    assert w.auto.tick(T0 + 120_000) == []
    # it ends below 80; the next 20 s above 90 is a new episode: a second alert and task
    offer(w, w.status("dev-1", 60, mem=70), w.status("dev-1", 70, mem=99), w.status("dev-1", 95, mem=99))
    assert len(w.events("alert")) == 2 and len(w.tasks()) == 2
    # another device has its own episodes
    offer(w, w.status("dev-2", 0, mem=99), w.status("dev-2", 30, mem=99))
    assert [e.source for e in w.events("alert")] == ["dev-1", "dev-1", "dev-2"]

    explained = done[1].explain()
    assert explained.startswith("QUEUED: fleet/mem-high queued command echo on dev-1 (task ")
    assert "decided by fleet/mem-high (" in explained and "held from 2026-01-01T00:00:00Z" in explained
    assert "expires 2026-01-01T01:00:20Z" in explained


def test_a_restart_in_the_middle_of_an_episode_does_not_fire_again(w: World) -> None:
    offer(w, w.status("dev-1", 0, mem=95), w.status("dev-1", 25, mem=95))  # fires
    offer(w, w.status("dev-2", 0, mem=95))  # pending, not yet fired
    w.auto.tick(T0 + 5_000)  # the daemon's tick saves the state (at most a second late)
    assert len(w.events("alert")) == 1
    w.auto = w.start()  # the cloud restarts: the state file is read back
    offer(w, w.status("dev-1", 30, mem=97), w.status("dev-1", 60, mem=98))
    w.auto.tick(T0 + 90_000)
    assert [e.source for e in w.events("alert")] == ["dev-1", "dev-2"]  # dev-2's episode went on and fired
    assert len(w.tasks()) == 2

    # a damaged state file costs only a possible repeat: the rules start idle, nothing crashes
    state_path(w.store.path).write_text("{not json")
    w.auto = w.start()
    assert "idle" not in w.auto.explain() and "no observations yet" in w.auto.explain()


def test_telemetry_rules_observe_each_reading_at_its_own_time_and_wants_filters_topics(tmp_path: Path) -> None:
    w = World(tmp_path, """\
kind: automation
name: cold
rules:
  - name: freezer-warm
    at: cloud
    on: {kind: telemetry, stream: "freezer*", site: home}
    when: 'values.temp_c > -10.0'
    for: 2s
    then:
      - alert: {message: "{node}/{stream} at {values.temp_c} C"}
""")
    try:
        assert w.auto.wants("cws/v1/home/dev-1/telemetry/freezer.a")
        assert not w.auto.wants("cws/v1/home/dev-1/telemetry/env")  # another stream
        assert not w.auto.wants("cws/v1/away/dev-9/telemetry/freezer.a")  # another site
        assert not w.auto.wants("cws/v1/home/dev-1/status")  # no status rule
        assert w.auto.wants("cws/v1/away/gw-2/event/automation.request")  # gateways' requests, any site
        assert not w.auto.wants("not/a/topic")

        # one batch of buffered readings: three seconds warm, observed reading by reading
        batch = w.telemetry("dev-1", "freezer.a", (T0, {"temp_c": -20.0}), (T0 + 1000, {"temp_c": -5}),
                            (T0 + 2000, {"temp_c": -4.5}), (T0 + 3000, {"temp_c": -4}))
        (done,) = w.auto.offer([(batch, None)], T0 + 600_000)  # arrived ten minutes late
        assert done.what == "alert" and done.message == "dev-1/freezer.a at -4 C"
        assert done.firing is not None and (done.firing.since_ms, done.firing.at_ms) == (T0 + 1000, T0 + 3000)
    finally:
        w.store.close()


def test_what_a_cloud_rule_cannot_do_is_an_automation_failed_event_naming_the_rule(tmp_path: Path) -> None:
    w = World(tmp_path, """\
kind: automation
name: odd
rules:
  - name: restart-it
    at: cloud
    on: {kind: event, type: "door.*"}
    when: 'values.forced == true && values.severity == "info"'
    then:
      - task: {handler: echo, on: node}
      - task: {handler: report, on: cloud}
      - task: {handler: echo, on: gateway}
      - command: {handler: echo, to: no-such-node}
""")
    try:
        done = offer(w, w.event("gw-1", "door.back", {"forced": True}))
        assert [d.what for d in done] == ["failed"] * 4
        reasons = [e.data["reason"] for e in w.events("automation.failed")]
        assert reasons == ["target 'gw-1' is a gateway, not a device: only devices run tasks",
                           "the cloud cannot run tasks itself yet (no cloud executor; issue 7)",
                           "a cloud rule cannot run a task on a gateway: write the rule with at: gateway",
                           "target 'no-such-node' is not a registered device"]
        ev = w.events("automation.failed")[0]
        assert ev.source == "gw-1" and ev.severity == "error" and ev.data["rule"] == "odd/restart-it"
        assert ev.message.startswith("odd/restart-it: cannot task echo on gw-1: ")
        assert w.tasks() == [] and w.dispatcher.requested == []
        assert "not done: target 'gw-1' is a gateway" in done[0].explain()
    finally:
        w.store.close()


def test_an_audit_mode_policy_reports_its_firings_and_runs_nothing(tmp_path: Path) -> None:
    w = World(tmp_path, MEM.replace("name: fleet\n", "name: fleet\nmode: audit\n"))
    try:
        offer(w, w.status("dev-1", 0, mem=95), w.status("dev-1", 30, mem=95))
        (ev,) = w.events("automation.audit")
        assert ev.message == "fleet/mem-high would fire for dev-1 (audit mode: nothing run)"
        assert ev.data["actions"] == ["alert critical 'dev-1 at home: memory 95%'", "command echo to dev-1"]
        assert w.events("alert") == [] and w.tasks() == [] and w.dispatcher.requested == []
    finally:
        w.store.close()


def test_a_policy_reload_keeps_the_episodes_of_the_rules_that_stay(w: World) -> None:
    offer(w, w.status("dev-1", 0, mem=95), w.status("dev-1", 25, mem=95))  # fired
    w.auto.use(load_policies([w.policy_dir]))
    offer(w, w.status("dev-1", 30, mem=99), w.status("dev-1", 60, mem=99))
    assert len(w.events("alert")) == 1
    w.auto.use(PolicySet())  # every cloud rule removed: nothing observed any more
    assert not w.auto.wants("cws/v1/home/dev-1/status")
    assert offer(w, w.status("dev-1", 70, mem=70), w.status("dev-1", 80, mem=99), w.status("dev-1", 110, mem=99)) == []


# ---- gateways' requests -------------------------------------------------------------------------------

def request(w: World, gateway: str = "gw-1", **over: Any) -> IngestItem:
    data = {"rule": "greenhouse/too-hot", "source": "policies/g.yaml:9", "node": "dev-1", "since": T0, "at": T0,
            "values": {"temp_c": 31}, "action": "command", "handler": "echo", "args": {"say": "fan on"},
            "target": "dev-1"} | over
    return w.event(gateway, "automation.request", data)


def test_a_gateway_request_for_a_device_of_its_site_queues_exactly_one_task(w: World) -> None:
    req = request(w)
    (done,) = w.auto.offer([(req, None)], T0)
    assert done.what == "queued" and done.request == ("gw-1", req.seq)
    assert w.auto.offer([(req, None)], T0 + 1) == []  # offered again: nothing more
    w.auto = w.start()  # even after a restart (the task id comes from the gateway's (sender, seq))
    assert w.auto.offer([(req, None)], T0 + 2) == []
    (task,) = w.tasks()
    assert (task.target, task.handler, task.args) == ("dev-1", "echo", {"say": "fan on"})
    assert w.dispatcher.requested == [task.id]
    (ev,) = w.events("automation.queued")
    assert ev.source == "gw-1" and ev.data["rule"] == "greenhouse/too-hot" and ev.data["seq"] == req.seq
    assert "decided by greenhouse/too-hot at gateway gw-1 (its automation.request, seq" in done.explain()

    # a later request of the same gateway is a new task
    w.auto.offer([(request(w, args={"say": "fan off"}), None)], T0 + 3)
    assert [t.args["say"] for t in w.tasks()] == ["fan on", "fan off"]


def test_a_gateway_request_beyond_its_site_or_its_rights_is_refused_with_an_event(w: World) -> None:
    refused = [
        request(w, target="dev-9"),  # a device of site away
        request(w, target="gw-1"),  # not a device
        request(w, target="cloud", action="task"),  # no cloud executor yet
        request(w, "dev-1"),  # a device pretending to be a gateway
        request(w, action="reboot"),
        request(w, handler="Rm -rf"),
    ]
    for item in refused:
        w.auto.offer([(item, None)], T0)
    w.auto.offer([(refused[0], None)], T0)  # the same request twice: one event
    assert w.tasks() == [] and w.dispatcher.requested == []
    failed = w.events("automation.failed")
    assert [e.data["reason"] for e in failed] == [
        "target 'dev-9' is a device of site 'away', not of the gateway's site 'home': a gateway may only ask "
        "for its own site's devices",
        "target 'gw-1' is a gateway, not a device: only devices run tasks",
        "the cloud cannot run tasks itself yet (no cloud executor; issue 7)",
        "dev-1 is a device: only an active gateway may ask the cloud to act",
        "action must be task or command (got 'reboot')",
        "handler must be 1-63 characters from a-z 0-9 _ . -",
    ]
    assert all(e.data["rule"] == "greenhouse/too-hot" for e in failed)
    assert failed[0].source == "gw-1" and failed[0].message.startswith(
        "greenhouse/too-hot: cannot command echo on dev-9: target 'dev-9' is a device of site 'away'")
    # a revoked device is no target either
    w.store.upsert_node("dev-2", site="home", role="device", public_key=KEY, revoked_at=T0)
    w.auto.offer([(request(w, target="dev-2"), None)], T0)
    assert w.events("automation.failed")[-1].data["reason"] == "target 'dev-2' is revoked"


# ---- retention ----------------------------------------------------------------------------------------

RETENTION = """\
kind: qos
name: a-retention
rules:
  - name: keep-raw-important
    retention: 30d
    match: {channels: [telemetry], streams: [raw.important]}
  - name: raw-briefly
    retention: 1d
    match: {channels: [telemetry], streams: ["raw.*"]}
  - name: env-a-week
    retention: 7d
    match: {channels: [telemetry], streams: [env]}
---
kind: qos
name: b-audit
mode: audit
rules:
  - name: env-an-hour
    retention: 1h
    match: {channels: [telemetry], streams: [env]}
"""


def _readings(store: SqliteStore, streams: list[str], ages_days: list[float], now: int) -> None:
    items, seq = [], 0
    for stream in streams:
        for age in ages_days:
            seq += 1
            ts = now - int(age * DAY)
            items.append(IngestItem(sender="dev-1", seq=seq, msg_id="0" * 32, kind="telemetry",
                                    topic=f"cws/v1/home/dev-1/telemetry/{stream}", ts=ts, received=ts,
                                    stream=stream, readings=(Reading(ts, {"v": age}),)))
    store.ingest_batch(items)


def _ages(store: SqliteStore, stream: str, now: int) -> list[float]:
    return sorted(round((now - r.ts) / DAY, 2) for r in store.telemetry("dev-1", stream=stream, limit=1000))


def test_retention_deletes_only_what_the_first_matching_rule_of_each_stream_says(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "qos.yaml").write_text(RETENTION)
    store = SqliteStore(tmp_path / "cloud.db")
    now = T0 + 100 * DAY
    try:
        _readings(store, ["env", "raw.x", "raw.important", "other"], [40, 10, 3, 0.5], now)
        published: list[dict[str, Any]] = []
        sweeper = RetentionSweeper(load_policies([tmp_path / "p"]), store, publish=published.append)
        report = sweeper.sweep(now)
        assert _ages(store, "env", now) == [0.5, 3]  # 7 days
        assert _ages(store, "raw.x", now) == [0.5]  # 1 day
        assert _ages(store, "raw.important", now) == [0.5, 3, 10]  # its own rule comes first: 30 days
        assert _ages(store, "other", now) == [0.5, 3, 10, 40]  # no rule: kept
        assert report.deleted == 2 + 3 + 1
        (ev,) = [e for e in store.list_events().items if e.type == "retention.pruned"]
        assert ev.data["deleted"] == {"env": 2, "raw.important": 1, "raw.x": 3}
        assert ev.data["rules"]["raw.x"] == "a-retention/raw-briefly" and ev.source == "cloud"
        assert published and published[-1]["type"] == "event"
        text = report.explain()
        assert "telemetry/env: keep 7d, decided by a-retention/env-a-week (" in text
        assert "note: audit: b-audit/env-an-hour would keep it 1h; not enforced" in text  # reported, not applied
        assert "telemetry/other: kept until deleted by hand: no enforced retention rule matches" in text

        again = sweeper.sweep(now + 1000)  # nothing more to delete: no second event
        assert again.deleted == 0
        assert len([e for e in store.list_events().items if e.type == "retention.pruned"]) == 1
    finally:
        store.close()


def test_a_node_limited_retention_rule_is_never_cut_short_by_the_stream_sweep(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "qos.yaml").write_text("""\
kind: qos
name: a-retention
rules:
  - name: lab-keeps-longer
    retention: 30d
    match: {channels: [telemetry], streams: [env], node: "lab-*"}
  - name: env-a-week
    retention: 7d
    match: {channels: [telemetry], streams: [env]}
  - name: only-devices-raw
    retention: 1d
    match: {channels: [telemetry], streams: [raw], role: device}
""")
    store = SqliteStore(tmp_path / "cloud.db")
    now = T0 + 100 * DAY
    try:
        _readings(store, ["env", "raw"], [40, 10, 3], now)
        report = RetentionSweeper(load_policies([tmp_path / "p"]), store).sweep(now)
        assert _ages(store, "env", now) == [3, 10]  # the longest of the rules that may apply: 30 days
        assert _ages(store, "raw", now) == [3, 10, 40]  # a rule for some nodes only and none for the rest
        text = report.explain()
        assert "a-retention/lab-keeps-longer" in text and "kept 30d instead of 7d" in text
        assert "nothing of it is deleted" in text
    finally:
        store.close()


# ---- the daemon's wiring (in process, no broker) --------------------------------------------------------

def test_the_cloud_daemon_runs_cloud_rules_and_gateway_requests_over_what_it_ingests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloud.daemon
    from cloud.daemon import CloudDaemon
    from cwsnet import topics
    from cwsnet.config import CloudConfig, HttpConfig
    from cwsnet.endpoint import Endpoint
    from cwsnet.identity import Identity, write_secret_file
    from cwsnet.mqtt import Message
    from cwsnet.replay import SeqCounter

    cloud_id = Identity.generate("cloud", "cloud", "cloud")
    dev = Identity.generate("dev-1", "home", "device")
    gw = Identity.generate("gw-1", "home", "gateway")
    write_secret_file(tmp_path / "cloud.json", cloud_id.to_dict())
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "fleet.yaml").write_text(MEM.replace("for: 20s", "for: 1s"))
    cfg = CloudConfig(identity_file=tmp_path / "cloud.json", broker=None, http=HttpConfig(port=1),
                      database=tmp_path / "cloud.db", policies_dir=tmp_path / "policies")
    store = SqliteStore(cfg.database)
    store.upsert_node("dev-1", site="home", role="device", public_key=dev.public_b64)
    store.upsert_node("gw-1", site="home", role="gateway", public_key=gw.public_b64)
    store.close()
    d = CloudDaemon(cfg)
    monkeypatch.setattr(cloud.daemon, "AUTOMATION_TICK", 0.05)

    class Link:
        connected = asyncio.Event()

        def ack(self, msg: Message) -> None:
            pass

    d.link = Link()  # type: ignore[assignment]
    to_apps: list[Any] = []
    d.apps.offer = to_apps.extend  # type: ignore[method-assign]
    now = int(time.time() * 1000)

    def sealed(ident: Identity, topic: str, kind: str, body: dict, seq: int) -> Message:
        ep = Endpoint(ident, SeqCounter(seq, lambda m: None), lambda n: cloud_id.public_key)
        return Message(topic=topic, payload=ep.seal(topic, kind, body, to="cloud")[0], qos=1, retain=False, mid=seq)

    msgs = [sealed(dev, topics.status("home", "dev-1"), "status", {"state": "online", "mem": 97.5}, 10),
            sealed(dev, topics.status("home", "dev-1"), "status", {"state": "online", "mem": 98.0}, 11),
            sealed(gw, topics.event("home", "gw-1", "automation.request"), "event",
                   {"type": "automation.request", "message": "asks", "data": {
                       "rule": "site/r", "node": "dev-1", "action": "command", "handler": "sha256",
                       "args": {"data": "eA=="}, "target": "dev-1"}}, 20)]

    async def main() -> None:
        consumer = asyncio.create_task(d.consume())
        ticks = asyncio.create_task(d.automation_ticks())
        try:
            for m in msgs:
                d.queue.put_nowait(m)
            deadline = time.monotonic() + 4
            while len(d.store.list_tasks().items) < 2 or not d.store.list_events().items:
                assert time.monotonic() < deadline, "no alert and tasks from the cloud's automation"
                await asyncio.sleep(0.02)
        finally:
            for t in (consumer, ticks):
                t.cancel()
            await asyncio.gather(consumer, ticks, return_exceptions=True)

    try:
        asyncio.run(main())
        tasks = sorted(d.store.list_tasks().items, key=lambda t: t.handler)
        assert [(t.target, t.handler) for t in tasks] == [("dev-1", "echo"), ("dev-1", "sha256")]
        alerts = [e for e in d.store.list_events().items if e.type == "alert"]
        assert len(alerts) == 1 and alerts[0].source == "dev-1" and alerts[0].data["rule"] == "fleet/mem-high"
        assert alerts[0].ts >= now
        assert to_apps == []  # no app is granted these topics: nothing was handed to the apps
        saved = json.loads(state_path(cfg.database).read_text())  # saved at once: a restart does not fire again
        assert saved["rules"]["fleet/mem-high"][0]["phase"] == "firing"
        asyncio.run(d._use_policies(PolicySet()))  # the cloud rules removed by a policy change
        assert d.automation.engine.rules == [] and not d.automation.wants(topics.status("home", "dev-1"))
    finally:
        d.close()


# ---- end to end, real processes -------------------------------------------------------------------------

E2E = """kind: routing
name: greenhouse-routing
rules:
  - name: greenhouse-on-site
    match: {streams: [greenhouse]}
    to: gateway
---
kind: automation
name: greenhouse
rules:
  - name: too-hot                  # the gateway's rule: it asks the cloud to command the device
    at: gateway
    on: {kind: telemetry, stream: greenhouse}
    when: 'values.temp_c > 30.0'
    clear_when: 'values.temp_c < 28.0'
    cooldown: 10m
    then:
      - command: {handler: echo, args: {say: fan on}, to: node}
  - name: dev-1-online             # the cloud's rule, over the device's status
    at: cloud
    on: {kind: status, node: dev-1}
    when: 'values.state == "online"'
    then:
      - alert: {severity: info, message: "{node} is online"}
      - task: {handler: echo, args: {hello: cloud}, on: node}
"""


@pytest.mark.integration
def test_gateway_requests_and_cloud_rules_run_tasks_on_real_devices(tmp_path: Path, procs: Any) -> None:
    import cbor2
    import yaml
    from harness import wait_for
    from harness.db import query
    from harness.deploy import Deployment, get

    d = Deployment(tmp_path, procs, devices=1)
    folder = d.lab.path("policies")
    folder.mkdir(exist_ok=True)
    (folder / "greenhouse.yaml").write_text(E2E)
    sensors = yaml.safe_load(d.lab.config_path("dev-1").read_text())["sensors"]
    d.edit("dev-1", {"sensors": [*sensors, {"type": "simulated", "stream": "greenhouse", "interval": 0.5,
                                            "fields": ["temp_c"], "pattern": "square", "offset": 27,
                                            "amplitude": 6, "period": 16}]})
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    d.start("agent", "dev-1")

    def tasks(key: str) -> list[dict]:
        return [t for t in get(f"{d.base}/api/v1/tasks?limit=100")["items"] if key in t["args"]]

    done = wait_for(lambda: (ts := tasks("say") + tasks("hello")) and len(ts) == 2
                    and all(t["state"] == "succeeded" for t in ts) and ts, timeout=60,
                    message="the gateway's command and the cloud rule's task succeeded on dev-1")
    assert sorted(t["result"].get("say") or t["result"].get("hello") for t in done) == ["cloud", "fan on"]
    events = get(f"{d.base}/api/v1/events?limit=200")["items"]
    queued = [e for e in events if e["type"] == "automation.queued"]
    assert {e["data"]["rule"] for e in queued} == {"greenhouse/too-hot", "greenhouse/dev-1-online"}
    assert [e["source"] for e in events if e["type"] == "alert" and e["data"].get("rule") == "greenhouse/dev-1-online"] \
        == ["dev-1"]
    assert not [e for e in events if e["type"] == "automation.failed"]

    # another hot spell at the site: the gateway's cooldown holds, the cloud gets no second request
    site_db = d.lab.path("gateway", "site-data.db")
    (say,) = [t for t in done if "say" in t["args"]]

    def second_spell() -> int | None:
        rows = query(site_db, "select ts, vals from readings where stream = 'greenhouse' and ts > ? order by ts",
                     (say["created"],))
        temps = [(ts, cbor2.loads(v)["temp_c"]) for ts, v in rows]
        cooled = next((i for i, (_, t) in enumerate(temps) if t < 28), None)
        return None if cooled is None else next((ts for ts, t in temps[cooled:] if t > 30), None)

    hot_again = wait_for(second_spell, timeout=30, message="a second hot spell at the site")
    wait_for(lambda: max(r["ts"] for r in get(f"{d.base}/api/v1/devices/dev-1/telemetry?limit=5")["items"])
             > hot_again + 2000, timeout=20, message="dev-1's later telemetry at the cloud")
    assert len(tasks("say")) == 1
    assert len([e for e in get(f"{d.base}/api/v1/events?limit=500")["items"]
                if e["type"] == "automation.request"]) == 1
