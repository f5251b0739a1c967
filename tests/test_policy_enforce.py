"""Access policies enforced (issue 6): the brokers' ACLs are generated from the ``access`` policies,
audit-mode policies are reported and not enforced, refusals become rate-limited events naming the
rule, a changed policy set applies to connected clients without reconnecting, and the REST API
checks an operator's reads and commands against the same policies."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nacl.pwhash.argon2id as argon2id
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.api import CloudState, create_app
from cloud.auth import AuthStore
from cloud.fanout import Fanout
from cloud.registry_sync import RegistrySync
from cloud.store import SqliteStore
from cwsnet import registry
from cwsnet.broker import BrokerSettings, filters_intersect, parse_credentials, start_broker
from cwsnet.identity import write_secret_file
from cwsnet.policy import AccessEngine, PolicyError, Subject, load_policies
from cwsnet.policy.access import DenyRecorder
from cwsnet.policy.watch import PolicyWatcher
from cwsnet.registry import Entry, Registry

try:
    from harness.ports import free_port
    from harness.wait import wait_for
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.harness.ports import free_port
    from tests.harness.wait import wait_for

SHIPPED = Path(__file__).resolve().parents[1] / "policies"
KEY = "A" * 43 + "="

QUARANTINE = """\
kind: access
name: quarantine
rules:
  - name: no-events-from-dev-9
    effect: deny
    who: {role: device, id: dev-9}
    actions: [publish]
    topics: ["cws/v1/{site}/{id}/event/+"]
"""
ADMIN_BLIND = """\
kind: access
name: privacy
rules:
  - name: admin-not-sensor-1
    effect: deny
    who: {role: operator, id: admin}
    actions: [subscribe]
    topics: ["cws/v1/home/sensor-1/#"]
"""
TRIAL = """\
kind: access
name: trial-lockdown
mode: audit
rules:
  - name: sensors-only-telemetry
    effect: deny
    who: {role: device, id: "sensor-*"}
    actions: [publish]
    topics: ["cws/v1/{site}/{id}/status"]
"""
LAB_READERS = """\
kind: access
name: lab-readers
rules:
  - name: lab-apps-no-status
    effect: deny
    who: {role: app}
    broker: cloud
    actions: [subscribe]
    topics: ["cws/v1/_apps/{id}/#"]
    when: 'subject.site == "lab" && topic.endsWith("/status")'
"""


def engine(tmp_path: Path, **files: str) -> AccessEngine:
    folder = tmp_path / "site-policies"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    return AccessEngine(load_policies([SHIPPED, folder]))


def token_sha(name: str) -> str:
    return hashlib.sha256(f"tok-{name}".encode()).hexdigest()


def lab_registry() -> Registry:
    def e(node: str, role: str = "device", site: str = "home", **kw: Any) -> Entry:
        return Entry(node, site, role, "" if role == "operator" else KEY, mqtt_token_sha256=token_sha(node), **kw)

    return Registry({
        "cloud": e("cloud", "cloud"), "gw-home": e("gw-home", "gateway"), "gw-lab": e("gw-lab", "gateway", "lab"),
        "dev-9": e("dev-9", gateway="gw-home"), "sensor-1": e("sensor-1", gateway="gw-home"),
        "solo": e("solo", site="lab"), "gone": e("gone", status="revoked"),
        "app-1": e("app-1", "app", subscribe=("cws/v1/home/#",)), "app-9": e("app-9", "app", "lab"),
        "local": e("local", "app", plaintext=True),
        "admin": e("admin", "operator", subscribe=("#",)), "ops": e("ops", "operator", subscribe=("cws/v1/home/#",)),
    })


# ---- the generated ACLs ----------------------------------------------------------------------------

def legacy_cloud(reg: Registry) -> dict[str, Any]:
    """The ACLs the brokers enforced before they came from the policies (the hard-coded derivation)."""
    users: dict[str, Any] = {}
    unsealed = [f"cws/v1/_apps/{e.id}/#" for e in reg.active(role="app") if e.plaintext]
    for e in reg.active():
        tok = {"token_sha256": e.mqtt_token_sha256}
        if e.role == "cloud":
            users[e.id] = {**tok, "publish": ["cws/v1/#"], "subscribe": ["cws/v1/#"]}
        elif e.role == "gateway":
            users[e.id] = {**tok, **registry.gateway_uplink_rules(e.site)}
        elif e.role == "device" and e.gateway is None:
            users[e.id] = {**tok, **registry.device_rules(e.site, e.id)}
        elif e.role == "app":
            users[e.id] = {**tok, "publish": [], "subscribe": [f"cws/v1/_apps/{e.id}/#"],
                           **({"loopback_only": True} if e.plaintext else {})}
        elif e.role == "operator":
            users[e.id] = {**tok, "publish": [], "subscribe": list(e.subscribe) or ["#"], "client_ids": ["*"],
                           "deny_receive": unsealed}
    return users


def legacy_site(reg: Registry, site: str) -> dict[str, Any]:
    users: dict[str, Any] = {}
    for e in reg.active():
        tok = {"token_sha256": e.mqtt_token_sha256}
        if e.role == "gateway" and e.site == site:
            users[e.id] = {**tok, "publish": [f"cws/v1/{site}/#"], "subscribe": [f"cws/v1/{site}/#"]}
        elif e.role == "device" and e.site == site:
            users[e.id] = {**tok, **registry.device_rules(site, e.id)}
        elif e.role == "operator":
            users[e.id] = {**tok, "publish": [], "subscribe": list(e.subscribe) or ["#"], "client_ids": ["*"]}
    return users


def test_the_default_policies_generate_exactly_the_historic_broker_acls() -> None:
    reg = lab_registry()
    cloud = registry.cloud_broker_users(reg)
    assert cloud == {"users": legacy_cloud(reg), "anonymous": False, "revoked": ["gone"]}
    assert registry.site_broker_users(reg, "home") == {"users": legacy_site(reg, "home"), "anonymous": False,
                                                       "revoked": ["gone"]}
    assert registry.site_broker_users(reg, "lab")["users"] == legacy_site(reg, "lab")


def test_a_site_deny_becomes_a_broker_deny_and_wins_over_the_allow(tmp_path: Path) -> None:
    e = engine(tmp_path, quarantine=QUARANTINE, privacy=ADMIN_BLIND)
    doc = registry.site_broker_users(lab_registry(), "home", e)
    assert doc["users"]["dev-9"]["deny_publish"] == ["cws/v1/home/dev-9/event/+"]
    assert "deny_publish" not in doc["users"]["sensor-1"]
    users = parse_credentials(doc).users
    dev9 = users["dev-9"].rules
    assert not dev9.may_publish("cws/v1/home/dev-9/event/door") and dev9.may_publish("cws/v1/home/dev-9/telemetry/env")
    admin = users["admin"].rules
    # a subscription that overlaps the denied filter is accepted; the denied topics are not delivered
    assert admin.may_subscribe("#") and not admin.may_subscribe("cws/v1/home/sensor-1/status")
    assert not admin.may_receive("cws/v1/home/sensor-1/status") and admin.may_receive("cws/v1/home/dev-9/status")
    # what the broker enforces is what `explain` says
    d = e.decide(Subject("dev-9", "device", "home"), "publish", "cws/v1/home/dev-9/event/door", "site")
    assert not d.allowed and d.rule == "quarantine/no-events-from-dev-9"


def test_a_condition_on_the_topic_is_evaluated_by_the_broker_per_topic(tmp_path: Path) -> None:
    e = engine(tmp_path, lab=LAB_READERS)
    users = parse_credentials(registry.cloud_broker_users(lab_registry(), e)).users
    lab_app, home_app = users["app-9"].rules, users["app-1"].rules
    assert lab_app.may_subscribe("cws/v1/_apps/app-9/#")
    assert not lab_app.may_subscribe("cws/v1/_apps/app-9/lab/dev-1/status")
    assert not lab_app.may_receive("cws/v1/_apps/app-9/lab/dev-1/status")
    assert lab_app.may_receive("cws/v1/_apps/app-9/lab/dev-1/telemetry/env")
    assert home_app.may_receive("cws/v1/_apps/app-1/home/dev-1/status")
    for topic in ("cws/v1/_apps/app-9/lab/dev-1/status", "cws/v1/_apps/app-9/lab/dev-1/telemetry/env"):
        assert lab_app.may_receive(topic) == e.decide(Subject("app-9", "app", "lab"), "subscribe", topic).allowed


def test_a_condition_over_the_subject_only_is_decided_when_the_acl_is_written(tmp_path: Path) -> None:
    policy = QUARANTINE.replace("who: {role: device, id: dev-9}", "who: {role: device}") + \
        "    when: 'subject.id.startsWith(\"dev-\")'\n"
    doc = registry.site_broker_users(lab_registry(), "home", engine(tmp_path, q=policy))["users"]
    assert doc["dev-9"]["deny_publish"] == ["cws/v1/home/dev-9/event/+"] and "conditional" not in doc["dev-9"]
    assert "deny_publish" not in doc["sensor-1"] and "conditional" not in doc["sensor-1"]


def test_an_audit_policy_never_changes_the_acl(tmp_path: Path) -> None:
    reg = lab_registry()
    plain = registry.site_broker_users(reg, "home", engine(tmp_path))
    audited = registry.site_broker_users(reg, "home", engine(tmp_path, trial=TRIAL))
    sensor = audited["users"].pop("sensor-1")
    assert sensor.pop("audit") == [{"rule": "trial-lockdown/sensors-only-telemetry", "effect": "deny",
                                    "action": "publish", "filters": ["cws/v1/home/sensor-1/status"],
                                    "source": sensor_source(tmp_path)}]
    assert sensor == plain["users"].pop("sensor-1") and audited == plain
    rules = parse_credentials({"users": {"sensor-1": {**sensor, "audit": [{
        "rule": "trial-lockdown/sensors-only-telemetry", "effect": "deny", "action": "publish",
        "filters": ["cws/v1/home/sensor-1/status"]}]}}}).users["sensor-1"].rules
    assert rules.may_publish("cws/v1/home/sensor-1/status")  # reported, not enforced
    (found, flt), = rules.audit_findings("publish", "cws/v1/home/sensor-1/status", True)
    assert found.rule == "trial-lockdown/sensors-only-telemetry" and flt == "cws/v1/home/sensor-1/status"


def sensor_source(tmp_path: Path) -> str:
    return f"{tmp_path / 'site-policies' / 'trial.yaml'}:5"


def test_rest_reads_of_a_filter_are_denied_by_any_overlapping_deny(tmp_path: Path) -> None:
    e = engine(tmp_path, q="kind: access\nname: q\nrules:\n  - {name: r, effect: deny, who: {role: operator}, "
                           "actions: [read], topics: ['cws/v1/lab/+/telemetry/secret']}\n")
    alice = Subject("alice", "operator", "*")
    assert not e.decide(alice, "read", "cws/v1/lab/dev-1/telemetry/+").allowed
    assert e.decide(alice, "read", "cws/v1/lab/dev-1/telemetry/env").allowed
    assert e.decide(alice, "read", "cws/v1/home/dev-1/telemetry/+").allowed
    assert filters_intersect("a/+/c", "a/b/#") and not filters_intersect("a/b", "a/c/#")
    assert filters_intersect("a/#", "a") and not filters_intersect("#", "$SYS/x")


def test_a_broker_rule_that_names_an_unknown_subject_field_fails_closed_not_open(tmp_path: Path) -> None:
    bad = LAB_READERS.replace("subject.site", "subject.colour")
    users = parse_credentials(registry.cloud_broker_users(lab_registry(), engine(tmp_path, lab=bad))).users
    # the deny's condition cannot be evaluated: the deny applies (fails closed), as `explain` says
    assert not users["app-9"].rules.may_receive("cws/v1/_apps/app-9/lab/dev-1/status")
    d = engine(tmp_path, lab=bad).decide(Subject("app-9", "app", "lab"), "subscribe",
                                         "cws/v1/_apps/app-9/lab/dev-1/status", "cloud")
    assert not d.allowed and any("fails closed" in n for n in d.notes), d.explain()
    with pytest.raises(PolicyError):
        engine(tmp_path, lab=LAB_READERS.replace("when: '", "when: '(("))


# ---- deny events ---------------------------------------------------------------------------------

def test_the_deny_recorder_names_the_rule_and_reports_once_a_minute(tmp_path: Path) -> None:
    rec = DenyRecorder(engine(tmp_path, quarantine=QUARANTINE, trial=TRIAL), budget=1000)
    dev9, sensor = Subject("dev-9", "device", "home"), Subject("sensor-1", "device", "home")
    ev = rec.record(dev9, "publish", "cws/v1/home/dev-9/event/door", 100.0, broker="site")
    assert ev["kind"] == "access.denied" and ev["severity"] == "warning" and ev["source"] == "dev-9"
    assert ev["message"] == ("device dev-9 may not publish cws/v1/home/dev-9/event/door: "
                             "denied by quarantine/no-events-from-dev-9")
    assert ev["data"]["rule"] == "quarantine/no-events-from-dev-9" and ev["data"]["source"].endswith("quarantine.yaml:4")
    for i in range(50):  # a flood: nothing more within the minute, for the same rule
        assert rec.record(dev9, "publish", f"cws/v1/home/dev-9/event/e{i}", 101.0 + i) is None
    other = rec.record(dev9, "publish", "cws/v1/home/dev-1/status", 101.0)  # another rule (none): reported
    assert other["message"].endswith(": no rule allows it") and other["data"]["rule"] is None
    assert rec.record(dev9, "publish", "cws/v1/home/dev-9/telemetry/env", 102.0) is None  # allowed
    again = rec.record(dev9, "publish", "cws/v1/home/dev-9/event/door", 160.5)
    assert again is not None and again["data"]["suppressed"] == 50
    audit = rec.record(sensor, "publish", "cws/v1/home/sensor-1/status", 100.0)
    assert audit["kind"] == "access.audit" and "trial-lockdown/sensors-only-telemetry" in audit["message"]


def test_a_flood_of_distinct_topics_costs_at_most_the_budget() -> None:
    calls = []

    class Counting(AccessEngine):
        def decide(self, *a: Any, **kw: Any) -> Any:
            calls.append(a)
            return super().decide(*a, **kw)

    rec = DenyRecorder(Counting(load_policies([SHIPPED])), budget=5)
    dev = Subject("dev-1", "device", "home")
    events = [rec.record(dev, "publish", f"x/{i}", 10.0 + i * 0.01) for i in range(1000)]
    assert len(calls) == 5 and rec.dropped == 995 and sum(e is not None for e in events) == 1
    later = rec.record(dev, "publish", "x/new", 75.0)  # a new minute: evaluated and reported again
    assert len(calls) == 6 and later is not None and later["data"]["suppressed"] == 4


# ---- real brokers ----------------------------------------------------------------------------------

class Broker:
    """A CwsBroker on its own event loop thread, with the site broker's credentials of lab_registry()."""

    def __init__(self, creds: Path, on_decision: Callable[..., None] | None = None) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = BrokerSettings(host="127.0.0.1", port=self.port, credentials_file=creds)
        self.broker = self.call(start_broker(settings, on_decision=on_decision))

    def call(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.broker.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class Client:
    def __init__(self, port: int, name: str) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        self.c.username_pw_set(name, f"tok-{name}")
        self.messages: list[tuple[str, bytes]] = []
        self.connects = 0
        self.disconnected = threading.Event()
        self.subacks: dict[int, list[int]] = {}
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.c.on_connect = lambda *_a: setattr(self, "connects", self.connects + 1)
        self.c.on_disconnect = lambda *_a: self.disconnected.set()
        self.c.on_subscribe = lambda _c, _u, mid, codes, _p: self.subacks.__setitem__(mid, [c.value for c in codes])
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        wait_for(lambda: self.connects == 1, 5, message=f"{name} connected")

    def subscribe(self, flt: str) -> list[int]:
        _rc, mid = self.c.subscribe(flt, qos=1)
        return wait_for(lambda: self.subacks.get(mid), 5, message="SUBACK")

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def payloads(self) -> list[bytes]:
        return [p for _t, p in self.messages]

    def wait_payload(self, payload: bytes) -> list[bytes]:
        wait_for(lambda: payload in self.payloads(), 5, message=f"{payload!r} delivered")
        return self.payloads()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def running() -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(kind: type, *args: Any, **kw: Any) -> Any:
        made.append(kind(*args, **kw))
        return made[-1]

    yield make
    for x in reversed(made):
        x.close()


def site_creds(tmp_path: Path, access: AccessEngine) -> Path:
    path = tmp_path / "site-users.json"
    write_secret_file(path, registry.site_broker_users(lab_registry(), "home", access))
    return path


def test_the_broker_drops_what_a_site_policy_denies_and_records_the_rule(tmp_path: Path, running: Any) -> None:
    access = engine(tmp_path, quarantine=QUARANTINE)
    events: list[dict[str, Any]] = []
    recorder = DenyRecorder(access)
    hook = recorder.broker_hook(lambda u: (e := lab_registry().get(u)) and Subject(e.id, e.role, e.site),
                                events.append, broker="site")
    rb = running(Broker, site_creds(tmp_path, access), hook)
    admin = running(Client, rb.port, "admin")
    assert admin.subscribe("#") == [1]
    dev9 = running(Client, rb.port, "dev-9")
    for i in range(3):
        dev9.publish("cws/v1/home/dev-9/event/door", b"denied %d" % i)
    dev9.publish("cws/v1/home/dev-9/telemetry/env", b"telemetry")
    dev9.publish("cws/v1/home/dev-9/status", b"sentinel")
    assert admin.wait_payload(b"sentinel") == [b"telemetry", b"sentinel"]
    assert dev9.connects == 1 and not dev9.disconnected.is_set()  # dropped, not disconnected
    assert [(e["kind"], e["data"]["rule"]) for e in events] == [("access.denied", "quarantine/no-events-from-dev-9")]


def test_a_new_policy_applies_to_connected_clients_without_reconnecting(tmp_path: Path, running: Any) -> None:
    reg = lab_registry()  # on the cloud broker: dev-9 and sensor-1 without a gateway
    reg.nodes.update({n: dataclasses.replace(reg.nodes[n], gateway=None) for n in ("dev-9", "sensor-1")})
    creds = tmp_path / "cloud-users.json"
    write_secret_file(creds, registry.cloud_broker_users(reg))
    rb = running(Broker, creds)
    sync = RegistrySync(tmp_path / "registry.json", None, refresh=lambda: None, endpoint=None,  # type: ignore[arg-type]
                        link=None, fanout=Fanout(), users_file=creds, broker=lambda: rb.broker)
    sync.registry = reg
    admin, ops = running(Client, rb.port, "admin"), running(Client, rb.port, "ops")
    assert admin.subscribe("#") == [1] and ops.subscribe("cws/v1/home/#") == [1]
    dev9, sensor = running(Client, rb.port, "dev-9"), running(Client, rb.port, "sensor-1")
    dev9.publish("cws/v1/home/dev-9/event/door", b"before")
    sensor.publish("cws/v1/home/sensor-1/status", b"sensor before")
    admin.wait_payload(b"before") and admin.wait_payload(b"sensor before")

    assert rb.call(sync.set_access(engine(tmp_path, quarantine=QUARANTINE, privacy=ADMIN_BLIND)))
    assert not rb.call(sync.set_access(sync.access))  # the same policies: nothing to do
    dev9.publish("cws/v1/home/dev-9/event/door", b"after")  # the next publish is checked against the new ACL
    sensor.publish("cws/v1/home/sensor-1/status", b"sensor after")  # the subscription stays; this is not delivered
    dev9.publish("cws/v1/home/dev-9/status", b"sentinel")
    ops.wait_payload(b"sensor after") and ops.wait_payload(b"sentinel")  # delivered to the others: broadcast done
    assert admin.wait_payload(b"sentinel") == [b"before", b"sensor before", b"sentinel"]
    assert b"after" not in ops.payloads()
    assert [c.connects for c in (admin, ops, dev9, sensor)] == [1, 1, 1, 1]
    assert not any(c.disconnected.is_set() for c in (admin, ops, dev9, sensor))


def test_an_audit_policy_changes_nothing_but_logs_the_rule_once(tmp_path: Path, running: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cwsnet.broker")
    seen: list[tuple[Any, ...]] = []
    rb = running(Broker, site_creds(tmp_path, engine(tmp_path, trial=TRIAL)), lambda *a: seen.append(a))
    admin = running(Client, rb.port, "admin")
    assert admin.subscribe("#") == [1]
    sensor = running(Client, rb.port, "sensor-1")
    for i in range(5):
        sensor.publish("cws/v1/home/sensor-1/status", b"status %d" % i)
    assert admin.wait_payload(b"status 4") == [b"status %d" % i for i in range(5)]  # nothing refused
    audits = [r.getMessage() for r in caplog.records if "acl audit" in r.getMessage()]
    assert len(audits) == 1 and "trial-lockdown/sensors-only-telemetry" in audits[0] and "allowed" in audits[0]
    assert seen == [("sensor-1", "publish", "cws/v1/home/sensor-1/status", True)]


# ---- the REST API ----------------------------------------------------------------------------------

class Api:
    def __init__(self, tmp_path: Path, site_policy: str) -> None:
        self.store = SqliteStore(tmp_path / "cloud.db")
        self.auth = AuthStore(tmp_path / "cloud.db", pwhash=(argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN))
        self.auth.create_account("alice", "operator")
        _, token = self.auth.create_token("alice", "tests")
        self.folder = tmp_path / "policies"
        self.folder.mkdir()
        (self.folder / "site.yaml").write_text(site_policy)
        self.policies = PolicyWatcher([SHIPPED, self.folder])
        self.policies.check()
        self.state = CloudState(store=self.store, fanout=Fanout(), clock=lambda: 1_767_225_600.0, auth=self.auth,
                                policies=self.policies)
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(self.state)),
                                        base_url="http://cloud.test", headers={"Authorization": f"Bearer {token}"})
        self.store.upsert_node("dev-h", site="home", role="device", public_key=KEY)
        self.store.upsert_node("dev-l", site="lab", role="device", public_key=KEY)

    def call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, url, **kw))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()
        self.auth.close()
        self.store.close()


NO_LAB = """\
kind: access
name: lab-hands-off
rules:
  - name: alice-not-in-the-lab
    effect: deny
    who: {role: operator, id: alice}
    actions: [command]
    topics: ["cws/v1/lab/+/task/cmd"]
"""


def test_an_operator_denied_commands_on_one_site_gets_403_naming_the_rule(tmp_path: Path, running: Any) -> None:
    api = running(Api, tmp_path, NO_LAB)
    r = api.call("POST", "/api/v1/tasks", json={"target": "dev-l", "handler": "echo"})
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "forbidden" and err["message"].endswith(
        "may not command cws/v1/lab/dev-l/task/cmd: denied by lab-hands-off/alice-not-in-the-lab")
    assert err["details"][0]["rule"] == "lab-hands-off/alice-not-in-the-lab"
    assert api.call("POST", "/api/v1/tasks", json={"target": "dev-h", "handler": "echo"}).status_code == 201
    assert api.call("GET", "/api/v1/devices/dev-l").status_code == 200  # reading is still allowed
    assert api.store.list_tasks(limit=10).total == 1  # the refused task was never queued
    api.call("POST", "/api/v1/tasks", json={"target": "dev-l", "handler": "echo"})  # again: no second event
    events = [e for e in api.store.list_events(limit=50).items if e.type == "access.denied"]
    assert len(events) == 1 and events[0].source == "dev-l"
    assert events[0].data["rule"] == "lab-hands-off/alice-not-in-the-lab"
    # a changed policy set applies to the next request (the engine follows the watcher's digest)
    (api.folder / "site.yaml").write_text(NO_LAB.replace("lab/+", "elsewhere/+"))
    assert api.policies.check().accepted
    assert api.call("POST", "/api/v1/tasks", json={"target": "dev-l", "handler": "echo"}).status_code == 201


def test_reads_of_a_node_are_checked_too(tmp_path: Path, running: Any) -> None:
    api = running(Api, tmp_path, NO_LAB.replace("[command]", "[read]").replace("task/cmd", "#"))
    r = api.call("GET", "/api/v1/devices/dev-l/telemetry")
    assert r.status_code == 403 and "denied by lab-hands-off/alice-not-in-the-lab" in r.json()["error"]["message"]
    assert api.call("GET", "/api/v1/devices/dev-l").status_code == 403
    assert api.call("GET", "/api/v1/devices/dev-h/telemetry").status_code == 200
