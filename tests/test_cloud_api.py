"""cloud.api in-process through ``httpx.ASGITransport`` (no sockets); cloud.fanout in memory.

(``starlette.testclient`` with httpx is deprecated in this Starlette, so a small synchronous
wrapper around an ``httpx.AsyncClient`` on a private event loop stands in for it.)
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import nacl.pwhash.argon2id as argon2id
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from cloud.api import CloudState, create_app
from cloud.auth import AuthStore
from cloud.fanout import Fanout
from cloud.metrics import REJECT_REASONS, CloudMetrics
from cloud.store import IngestItem, Reading, SqliteStore, StatusUpdate

KEY = "A" * 43 + "="
#: argon2id at its minimum cost: the tests hash many passwords (the cloud uses the interactive cost)
FAST_PWHASH = (argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN)


class SyncClient:
    """``TestClient``-like: ``client.get(...)`` runs an ``httpx.AsyncClient`` request to completion."""

    def __init__(self, app: FastAPI, headers: dict[str, str] | None = None, address: str = "127.0.0.1") -> None:
        self._loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(address, 40000))
        self._client = httpx.AsyncClient(transport=transport, base_url="http://cloud.test", headers=headers)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self._loop.run_until_complete(self._client.request(method, url, **kw))

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def delete(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", url, **kw)

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


class FakeDispatcher:
    def __init__(self) -> None:
        self.requested: list[str] = []

    def request(self, task_id: str) -> None:
        self.requested.append(task_id)


class Env:
    """The app on a real SQLite store; ``client`` is authenticated as an admin (``token``)."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(tmp_path / "cloud.db")
        self.auth = AuthStore(tmp_path / "cloud.db", pwhash=FAST_PWHASH)
        self.auth.create_account("root", "admin")
        _, self.token = self.auth.create_token("root", "tests")
        self.dispatcher = FakeDispatcher()
        self.broker_up = True
        self.state = CloudState(
            store=self.store,
            metrics=CloudMetrics(),
            fanout=Fanout(),
            dispatcher=self.dispatcher,
            broker_connected=lambda: self.broker_up,
            clock=lambda: 1_767_225_600.0,
            auth=self.auth,
        )
        self.app = create_app(self.state)
        self.client = SyncClient(self.app, headers={"Authorization": f"Bearer {self.token}"})
        for i in range(5):
            self.store.upsert_node(f"dev-{i}", site="home" if i < 3 else "lab", role="device", public_key=KEY)
        self.store.upsert_node("gw-1", site="home", role="gateway", public_key=KEY)
        self.store.ingest_batch(
            [
                IngestItem(
                    sender="dev-0", seq=2, msg_id="0" * 32, kind="birth", topic="cws/v1/home/dev-0/status",
                    ts=1, received=1_767_225_600_000,
                    status=StatusUpdate(
                        kind="birth", online=True, body={"state": "online", "uptime": 12.5, "cpu": 4.0, "will_seq": 1},
                        will_seq=1, agent={"version": "0.1.0", "platform": "linux", "kind": "cpython"},
                    ),
                ),
                *(
                    IngestItem(
                        sender="dev-0", seq=10 + k, msg_id=f"{k:032x}", kind="telemetry",
                        topic=f"cws/v1/home/dev-0/telemetry/{stream}", ts=1, received=1, stream=stream,
                        readings=(Reading(ts=1000 + k, values={"v": k}),),
                    )
                    for k, stream in enumerate(["env", "env", "power", "env"])
                ),
            ]
        )

    def close(self) -> None:
        self.client.close()
        self.auth.close()
        self.store.close()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    yield e
    e.close()


def assert_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


def test_healthz(env: Env) -> None:
    assert env.client.get("/healthz").json() == {"status": "ok", "broker": "up", "db": "ok"}
    env.broker_up = False
    assert env.client.get("/healthz").json()["broker"] == "down"
    env.store.close()
    r = env.client.get("/healthz")
    assert r.status_code == 503 and r.json()["db"] == "error"


def test_devices_list_filters_and_paging(env: Env) -> None:
    r = env.client.get("/api/v1/devices")
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == 5 and body["limit"] == 100 and body["offset"] == 0
    assert [d["id"] for d in body["items"]] == [f"dev-{i}" for i in range(5)]
    d0 = body["items"][0]
    assert d0["online"] is True and d0["site"] == "home" and d0["status"]["uptime"] == 12.5
    assert d0["agent"]["kind"] == "cpython" and d0["last_seen"] == 1_767_225_600_000
    assert body["items"][1]["status"] == {} and body["items"][1]["online"] is False
    page = env.client.get("/api/v1/devices", params={"limit": 2, "offset": 2}).json()
    assert [d["id"] for d in page["items"]] == ["dev-2", "dev-3"] and page["total"] == 5
    assert env.client.get("/api/v1/devices", params={"site": "lab"}).json()["total"] == 2
    assert [d["id"] for d in env.client.get("/api/v1/devices", params={"online": "true"}).json()["items"]] == ["dev-0"]
    err = assert_error(env.client.get("/api/v1/devices", params={"limit": 0}), 422, "invalid_request")
    assert err["message"].startswith("query.limit:")


def test_device_detail_and_404(env: Env) -> None:
    assert env.client.get("/api/v1/devices/dev-3").json()["site"] == "lab"
    err = assert_error(env.client.get("/api/v1/devices/nope"), 404, "not_found")
    assert "nope" in err["message"]
    assert_error(env.client.get("/api/v1/devices/gw-1"), 404, "not_found")  # a gateway is not a device
    assert_error(env.client.get("/api/v1/no/such/route"), 404, "not_found")
    assert_error(env.client.delete("/api/v1/devices"), 405, "method_not_allowed")


def test_gateways(env: Env) -> None:
    body = env.client.get("/api/v1/gateways").json()
    assert body["total"] == 1 and body["items"][0]["id"] == "gw-1" and body["items"][0]["role"] == "gateway"
    assert env.client.get("/api/v1/gateways/gw-1").status_code == 200


def test_telemetry(env: Env) -> None:
    items = env.client.get("/api/v1/devices/dev-0/telemetry").json()["items"]
    assert [i["seq"] for i in items] == [13, 12, 11, 10]
    assert set(items[0]) == {"ts", "seq", "idx", "stream", "values"} and items[0]["values"] == {"v": 3}
    assert len(env.client.get("/api/v1/devices/dev-0/telemetry", params={"limit": 2}).json()["items"]) == 2
    power = env.client.get("/api/v1/devices/dev-0/telemetry", params={"stream": "power"}).json()["items"]
    assert [i["stream"] for i in power] == ["power"]
    assert env.client.get("/api/v1/devices/dev-1/telemetry").json() == {"items": []}
    assert_error(env.client.get("/api/v1/devices/nope/telemetry"), 404, "not_found")


def test_task_create_get_list_cancel(env: Env) -> None:
    r = env.client.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo", "args": {"x": 1}, "timeout": 30})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["state"] == "queued" and set(created) == {"id", "state", "duplicate"} and not created["duplicate"]
    assert r.headers["location"] == f"/api/v1/tasks/{created['id']}"
    assert env.dispatcher.requested == [created["id"]]
    task = env.client.get(f"/api/v1/tasks/{created['id']}").json()
    assert {k: task[k] for k in ("id", "target", "handler", "args", "state", "result", "error")} == {
        "id": created["id"], "target": "dev-1", "handler": "echo", "args": {"x": 1}, "state": "queued",
        "result": None, "error": None,
    }
    assert task["deadline"] == 1_767_225_600_000 + 30_000 and task["created"] == task["updated"]
    env.client.post("/api/v1/tasks", json={"target": "dev-2", "handler": "sha256"})
    listing = env.client.get("/api/v1/tasks", params={"limit": 1}).json()
    assert listing["total"] == 2 and len(listing["items"]) == 1
    assert env.client.get("/api/v1/tasks", params={"target": "dev-1"}).json()["total"] == 1
    cancelled = env.client.post(f"/api/v1/tasks/{created['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert_error(env.client.post(f"/api/v1/tasks/{created['id']}/cancel"), 409, "conflict")
    assert_error(env.client.get("/api/v1/tasks/nope"), 404, "not_found")
    queued = env.state.metrics.registry.get_sample_value("cwsnet_cloud_tasks_total", {"state": "queued"})
    assert queued == 2


def test_task_validation_errors(env: Env) -> None:
    err = assert_error(env.client.post("/api/v1/tasks", json={"target": "dev-1"}), 422, "invalid_request")
    assert err["message"] == "body.handler: field required"
    assert err["details"][0]["loc"] == ["body", "handler"]
    # no target: a scheduled task, and this API runs without the scheduler
    assert_error(env.client.post("/api/v1/tasks", json={"handler": "echo"}), 503, "unavailable")
    err = assert_error(
        env.client.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo", "timeout": -1}), 422, "invalid_request"
    )
    assert err["message"].startswith("body.timeout:")
    err = assert_error(
        env.client.post("/api/v1/tasks", json={"target": "dev-1", "handler": "x", "colour": "red"}), 422, "invalid_request"
    )
    assert "body.colour" in err["message"]
    assert_error(env.client.post("/api/v1/tasks", json={"target": "a/b", "handler": "echo"}), 422, "invalid_request")
    assert_error(
        env.client.post("/api/v1/tasks", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )
    err = assert_error(env.client.post("/api/v1/tasks", json={"target": "ghost", "handler": "echo"}), 404, "not_found")
    assert "ghost" in err["message"]
    assert env.dispatcher.requested == []


def test_task_target_must_be_a_device(env: Env) -> None:
    r = env.client.post("/api/v1/tasks", json={"target": "gw-1", "handler": "echo"})
    err = assert_error(r, 422, "invalid_request")
    assert "gw-1" in err["message"] and "gateway" in err["message"] and "not a device" in err["message"]
    assert env.store.list_tasks().total == 0 and env.dispatcher.requested == []


def test_task_too_large_for_one_envelope(env: Env) -> None:
    from cloud.api import MAX_TASK_BODY
    from cwsnet import parts
    from cwsnet.envelope import MAX_PAYLOAD

    assert MAX_TASK_BODY == parts.INLINE_MAX and MAX_PAYLOAD - 16384 < MAX_TASK_BODY < MAX_PAYLOAD
    r = env.client.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo", "args": {"d": "x" * MAX_PAYLOAD}})
    err = assert_error(r, 413, "too_large")  # dev-1 never said it takes args in parts
    assert str(MAX_PAYLOAD) in err["message"] and "args" in err["message"]
    assert "does not take args in parts" in err["message"], err["message"]
    # just under the limit (the measured body includes task id, handler and deadline) is accepted
    fits = {"d": "x" * (MAX_TASK_BODY - 200)}
    r = env.client.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo", "args": fits, "timeout": 5})
    assert r.status_code == 201, r.text[:300]
    assert env.store.list_tasks().total == 1


def test_task_args_the_cloud_could_not_store_back(env: Env) -> None:
    # an echo of these would come back as a malformed result and the task would never finish
    for args in ('{"n": 18446744073709551616}', '{"x": [NaN]}', '{"x": {"y": Infinity}}'):
        body = '{"target": "dev-1", "handler": "echo", "args": ' + args + "}"
        r = env.client.post("/api/v1/tasks", content=body, headers={"content-type": "application/json"})
        err = assert_error(r, 422, "invalid_request")
        assert err["message"].startswith("body.args."), err["message"]
    assert env.store.list_tasks().total == 0


def test_events(env: Env) -> None:
    for i in range(5):
        env.store.add_event("node.online", f"dev-{i} connected", source=f"dev-{i}", ts=1000 + i)
    body = env.client.get("/api/v1/events", params={"limit": 2, "offset": 1}).json()
    assert body["total"] == 5 and [e["message"] for e in body["items"]] == ["dev-3 connected", "dev-2 connected"]
    assert set(body["items"][0]) == {"id", "ts", "source", "type", "severity", "message", "data"}
    assert env.client.get("/api/v1/events", params={"since": 1003}).json()["total"] == 2


def test_metrics_parse(env: Env) -> None:
    env.state.metrics.rejected.labels(reason="forged").inc(3)
    r = env.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in (
        "cwsnet_cloud_messages_received",
        "cwsnet_cloud_messages_rejected",
        "cwsnet_cloud_messages_duplicate",
        "cwsnet_cloud_telemetry_readings",
        "cwsnet_cloud_ingest_seconds",
        "cwsnet_cloud_acks_sent",
        "cwsnet_cloud_devices_online",
        "cwsnet_cloud_tasks",
        "cwsnet_cloud_broker_connected",
    ):
        assert name in families, name
    rejected = {
        s.labels["reason"]: s.value for s in families["cwsnet_cloud_messages_rejected"].samples if s.name.endswith("_total")
    }
    assert set(rejected) == set(REJECT_REASONS)
    assert rejected["forged"] == 3 and rejected["replay"] == 0


def test_openapi_documents_every_route_and_field(env: Env) -> None:
    spec = env.client.get("/openapi.json").json()
    ops = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(ops) >= 13
    for path, method, op in ops:
        assert op.get("description"), f"{method.upper()} {path} has no description"
        for param in op.get("parameters", []):
            assert param.get("description") or param["in"] == "path", f"{method.upper()} {path}: {param['name']}"
    for name, schema in spec["components"]["schemas"].items():
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        for field, prop in schema.get("properties", {}).items():
            assert prop.get("description"), f"schema {name}.{field} has no description"


def test_console_is_self_contained(env: Env) -> None:
    r = env.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<table" in html and "/api/v1/stream" in html and "EventSource" in html
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, re.I), "external resource in console"
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html.lower()


def test_fanout_drops_oldest_for_slow_subscriber() -> None:
    async def main() -> None:
        hub = Fanout(maxsize=3)
        fast, slow = hub.subscribe(), hub.subscribe()
        got = []
        for i in range(5):
            hub.publish({"type": "event", "n": i})
            got.append(await fast.get(wait=1))
        assert [g["n"] for g in got] == [0, 1, 2, 3, 4]
        first = await slow.get(wait=1)
        assert first == {"type": "resync", "dropped": 2}
        assert [(await slow.get(wait=1))["n"] for _ in range(3)] == [2, 3, 4]
        assert await slow.get(wait=0.01) is None
        # publish from another thread wakes the subscriber's loop
        threading.Timer(0.05, hub.publish, args=({"type": "device", "n": 9},)).start()
        assert (await fast.get(wait=2))["n"] == 9
        hub.close()
        assert await fast.get(wait=1) is None and hub.subscribers == 0
        assert hub.subscribe().closed

    asyncio.run(main())


def test_a_task_too_big_for_the_device_is_refused_with_both_sizes(env: Env) -> None:
    """The ESP32 firmware announces the largest message it can take (agent.max_payload in its birth)."""
    env.store.ingest_batch([IngestItem(
        sender="dev-1", seq=3, msg_id="1" * 32, kind="birth", topic="cws/v1/home/dev-1/status", ts=1,
        received=1_767_225_600_000,
        status=StatusUpdate(kind="birth", online=True, body={"state": "online", "will_seq": 2}, will_seq=2,
                            agent={"version": "0.1.0", "platform": "esp32", "kind": "micropython",
                                   "max_payload": 8192}))])
    r = env.client.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo", "args": {"d": "x" * 9000}})
    err = assert_error(r, 413, "too_large")
    assert "8192" in err["message"] and "dev-1" in err["message"]
    r = env.client.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo", "args": {"d": "x" * 5000}})
    assert r.status_code == 201, r.text


def test_policies_are_listed_and_checked(env: Env, tmp_path: Path) -> None:
    from cwsnet.cli_policy import shipped_policies
    from cwsnet.policy.watch import PolicyWatcher

    site = tmp_path / "site-policies"
    site.mkdir()
    env.state.policies = PolicyWatcher([shipped_policies(), site])
    env.state.policies.check()
    r = env.client.get("/api/v1/policies")
    assert r.status_code == 200, r.text
    body = r.json()
    from cwsnet.policy import load_policies

    shipped = [p.policy.name for p in load_policies([shipped_policies()]).policies]
    assert [p["name"] for p in body["policies"]] == shipped and body["refused"] is None
    assert body["policies"][0]["rules"][0]["name"] == "device-uplink"
    good = "kind: access\nname: quarantine\nrules:\n  - {name: r, effect: deny, actions: [publish], topics: ['#']}\n"
    r = env.client.post("/api/v1/policies/check", json={"files": {"site.yaml": good}})
    assert r.json() == {"ok": True, "problems": [], "policies": [*shipped, "quarantine"]}
    bad = "kind: access\nname: q\nrules:\n  - {name: r, actions: [fly], topics: ['#']}\n"
    r = env.client.post("/api/v1/policies/check", json={"files": {"site.yaml": bad}})
    assert r.json()["ok"] is False
    assert r.json()["problems"][0].startswith("site.yaml:4:15: rules.0.actions.0: Input should be")
    assert_error(env.client.post("/api/v1/policies/check", json={"files": {"../x.yaml": good}}), 422,
                 "invalid_request")


def test_a_big_result_is_left_out_of_task_lists_and_shown_whole_by_the_task_itself(env: Env) -> None:
    task = env.store.create_task(target="dev-1", handler="echo", args={"small": 1})
    big = {"blob": "x" * 100_000}
    env.store.update_task(task.id, "succeeded", result=big, now=5)
    (listed,) = env.client.get("/api/v1/tasks").json()["items"]
    assert listed["result"] is None and listed["omitted"] == {"result": 100_011}  # {"blob":"x...x"}
    assert listed["args"] == {"small": 1}
    whole = env.client.get(f"/api/v1/tasks/{task.id}").json()
    assert whole["result"] == big and whole.get("omitted") is None
