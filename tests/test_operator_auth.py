"""Operator accounts, roles, API tokens, login sessions and the audit log of the cloud's REST API.

In process: the real FastAPI app on a real SQLite database (``test_cloud_api.Env``), through
``httpx.ASGITransport``; the first-start bootstrap through the real ``CloudDaemon``; and the
``cwsnet operator`` command line as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_cloud_api import FAST_PWHASH, Env, SyncClient, assert_error

from cloud.api import CloudState, create_app
from cloud.auth import AuthStore, LoginThrottle
from cloud.fanout import Fanout
from cloud.metrics import CloudMetrics
from cloud.store import SqliteStore
from cwsnet.config import CloudConfig, HttpConfig, load_config
from cwsnet.identity import Identity, write_secret_file

PASSWORD = "correct horse battery"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    e.clock = Clock(1_767_225_600.0)
    e.auth.clock = e.clock
    e.throttle_clock = Clock(1000.0)
    e.state.throttle = LoginThrottle(clock=e.throttle_clock)
    e.clients = []
    yield e
    for c in e.clients:
        c.close()
    e.close()


def client(env: Any, token: str | None = None, address: str = "127.0.0.1", **headers: str) -> SyncClient:
    """Another client of the same app: anonymous, or with a bearer token, from ``address``."""
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    c = SyncClient(env.app, headers=headers, address=address)
    env.clients.append(c)
    return c


def make_account(env: Any, name: str, role: str, password: str | None = None) -> str:
    """Create an account and an API token for it through the admin API; returns the token."""
    body: dict[str, Any] = {"username": name, "role": role}
    if password is not None:
        body["password"] = password
    r = env.client.post("/api/v1/accounts", json=body)
    assert r.status_code == 201, r.text
    r = env.client.post("/api/v1/tokens", json={"account": name, "name": f"{name}-token"})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def audit(env: Any, **params: Any) -> list[dict[str, Any]]:
    r = env.client.get("/api/v1/audit", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    return r.json()["items"]


# -- 401 / 403 ----------------------------------------------------------------------------------------


def test_rest_without_a_valid_token_is_401_and_open_routes_stay_open(env: Any) -> None:
    anon = client(env)
    for method, url in (("GET", "/api/v1/devices"), ("GET", "/api/v1/tasks/x"), ("GET", "/metrics"),
                        ("GET", "/api/v1/stream"), ("GET", "/api/v1/no/such/route"), ("GET", "/api/v1/audit"),
                        ("POST", "/api/v1/tasks"), ("DELETE", "/api/v1/accounts/root")):
        r = anon.request(method, url)
        err = assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer"), url
        assert "Authorization: Bearer TOKEN" in err["message"]
    # an anonymous client learns nothing from a route: not even whether its body would be valid
    r = anon.post("/api/v1/tasks", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 401, "unauthorized")
    for bad in ("Bearer nope", "Bearer " + "x" * 43, "Basic cm9vdDpwdw==", "Bearer", "bearer  "):
        r = anon.get("/api/v1/devices", headers={"Authorization": bad})
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert 'error="invalid_token"' in anon.get("/api/v1/devices", headers={"Authorization": "Bearer nope"}).headers[
        "www-authenticate"]
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/").status_code == 200 and "login-form" in anon.get("/").text
    assert anon.get("/openapi.json").status_code == 200
    assert env.store.list_tasks().total == 0
    # the same requests with the admin's token
    assert env.client.get("/api/v1/devices").status_code == 200
    assert env.client.get("/metrics").status_code == 200


def test_roles_viewer_operator_admin_and_the_audit_log(env: Any) -> None:
    viewer = client(env, make_account(env, "vera", "viewer"), address="10.0.0.7")
    operator = client(env, make_account(env, "otto", "operator"), address="10.0.0.8")
    task = {"target": "dev-1", "handler": "echo", "args": {"x": 1}}

    # a viewer reads everything, changes nothing
    assert viewer.get("/api/v1/devices").json()["total"] == 5
    assert viewer.get("/metrics").status_code == 200
    err = assert_error(viewer.post("/api/v1/tasks", json=task), 403, "forbidden")
    assert "operator" in err["message"] and "vera" in err["message"] and "viewer" in err["message"]
    assert env.store.list_tasks().total == 0 and env.dispatcher.requested == []

    # an operator runs and cancels tasks, but manages no accounts
    r = operator.post("/api/v1/tasks", json=task)
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]
    assert operator.post(f"/api/v1/tasks/{task_id}/cancel").json()["state"] == "cancelled"
    for method, url, body in (("GET", "/api/v1/accounts", None), ("GET", "/api/v1/audit", None),
                              ("POST", "/api/v1/tokens", {"account": "otto", "name": "more"}),
                              ("PATCH", "/api/v1/accounts/otto", {"role": "admin"})):
        err = assert_error(operator.request(method, url, json=body), 403, "forbidden")
        assert "needs role admin" in err["message"], err
    assert env.client.get("/api/v1/accounts/otto").json()["role"] == "operator"

    # the audit log: who did what, refused attempts included
    entries = audit(env)
    by = [(e["actor"], e["role"], e["method"], e["path"], e["status"], e["target"]) for e in entries]
    assert ("vera", "viewer", "POST", "/api/v1/tasks", 403, None) in by
    assert ("otto", "operator", "POST", "/api/v1/tasks", 201, task_id) in by
    assert ("otto", "operator", "POST", f"/api/v1/tasks/{task_id}/cancel", 200, task_id) in by
    assert ("otto", "operator", "PATCH", "/api/v1/accounts/otto", 403, "otto") in by
    assert ("root", "admin", "POST", "/api/v1/accounts", 201, "vera") in by
    refused = next(e for e in entries if e["actor"] == "vera")
    assert refused["client"] == "10.0.0.7" and refused["action"] == "create_task" and refused["token_id"]
    assert refused["detail"] == "needs role operator"
    # reads are not audited; anonymous changes are
    assert not [e for e in entries if e["method"] == "GET"]
    client(env, address="192.0.2.1").post("/api/v1/tasks", json=task)
    anon = audit(env, actor="anonymous")
    assert anon[0]["status"] == 401 and anon[0]["client"] == "192.0.2.1" and anon[0]["role"] is None
    # paged, newest first, filterable
    page = env.client.get("/api/v1/audit", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == len(entries) + 1 and len(page["items"]) == 2
    assert page["items"][0]["id"] > page["items"][1]["id"]
    assert {e["status"] for e in audit(env, refused=True)} <= {401, 403}


def test_expired_and_revoked_tokens_are_401(env: Any) -> None:
    env.client.post("/api/v1/accounts", json={"username": "carl", "role": "operator"})
    r = env.client.post("/api/v1/tokens", json={"account": "carl", "name": "ci", "expires_days": 1})
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    made = r.json()
    assert made["expires"] == int(env.clock.t * 1000) + 86_400_000 and made["active"] is True
    short = client(env, made["token"])
    assert short.get("/api/v1/auth/me").json() == {
        "username": "carl", "role": "operator", "token_id": made["id"], "token_name": "ci", "kind": "api",
        "expires": made["expires"]}
    env.clock.t += 86_400 + 1
    r = short.get("/api/v1/devices")
    assert_error(r, 401, "unauthorized")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]

    long = make_account(env, "dora", "viewer")
    dora = client(env, long)
    assert dora.get("/api/v1/devices").status_code == 200
    listed = {t["name"]: t for t in env.client.get("/api/v1/tokens", params={"kind": "all"}).json()["items"]}
    assert listed["dora-token"]["last_used"] == int(env.clock.t * 1000) and listed["ci"]["active"] is False
    assert "token" not in listed["dora-token"]  # a listing never shows a token
    assert env.client.delete(f"/api/v1/tokens/{listed['dora-token']['id']}").status_code == 204
    assert_error(dora.get("/api/v1/devices"), 401, "unauthorized")
    assert env.client.delete(f"/api/v1/tokens/{listed['dora-token']['id']}").status_code == 204  # idempotent
    assert_error(env.client.delete("/api/v1/tokens/nope"), 404, "not_found")
    revoked = env.client.get("/api/v1/tokens", params={"account": "dora"}).json()["items"][0]
    assert revoked["revoked"] is not None and revoked["active"] is False
    assert env.client.get("/api/v1/tokens", params={"account": "dora", "active": True}).json()["total"] == 0


# -- login, sessions, cookie ------------------------------------------------------------------------------


def test_login_session_cookie_csrf_and_logout(env: Any) -> None:
    env.client.post("/api/v1/accounts", json={"username": "olga", "role": "operator", "password": PASSWORD})
    browser = client(env, address="10.1.1.1")  # no token: what the console has
    r = browser.post("/api/v1/auth/login", json={"username": "olga", "password": PASSWORD})
    assert r.status_code == 200, r.text
    session = r.json()
    assert session["username"] == "olga" and session["role"] == "operator"
    assert session["expires"] == int(env.clock.t * 1000) + 12 * 3600 * 1000
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"cws_session={session['token']};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here: the cookie is Secure behind https

    # the cookie authenticates reads (the console's EventSource cannot send headers) ...
    me = browser.get("/api/v1/auth/me").json()
    assert me["username"] == "olga" and me["kind"] == "session" and me["token_id"] == session["token_id"]
    # ... and changes only with the console header, which a cross-site form cannot send
    task = {"target": "dev-1", "handler": "echo"}
    err = assert_error(browser.post("/api/v1/tasks", json=task), 403, "forbidden")
    assert "X-CWS-Console: 1" in err["message"]
    assert browser.post("/api/v1/tasks", json=task, headers={"X-CWS-Console": "1"}).status_code == 201
    # the session token works as a bearer token too
    assert client(env, session["token"]).get("/api/v1/devices").status_code == 200

    r = browser.post("/api/v1/auth/logout", headers={"X-CWS-Console": "1"})
    assert r.status_code == 204 and 'cws_session=""' in r.headers["set-cookie"]
    assert_error(client(env, session["token"]).get("/api/v1/devices"), 401, "unauthorized")
    assert_error(browser.get("/api/v1/auth/me"), 401, "unauthorized")

    # a session ends after 12 h
    r = client(env).post("/api/v1/auth/login", json={"username": "olga", "password": PASSWORD})
    later = client(env, r.json()["token"])
    assert later.get("/api/v1/devices").status_code == 200
    env.clock.t += 12 * 3600 + 1
    assert_error(later.get("/api/v1/devices"), 401, "unauthorized")

    entries = audit(env)
    logins = [e for e in entries if e["path"] == "/api/v1/auth/login"]
    assert len(logins) == 2 and all(e["actor"] == "olga" and e["status"] == 200 and e["target"] == "olga"
                                    for e in logins)
    assert [e["target"] for e in entries if e["path"] == "/api/v1/auth/logout"] == [session["token_id"]]
    csrf = next(e for e in entries if e["status"] == 403)
    assert csrf["actor"] == "olga" and csrf["detail"] == "cookie without the console header"


def test_wrong_password_is_401_recorded_and_never_stored(env: Any) -> None:
    env.client.post("/api/v1/accounts", json={"username": "olga", "role": "viewer", "password": PASSWORD})
    anon = client(env, address="203.0.113.9")
    r = anon.post("/api/v1/auth/login", json={"username": "olga", "password": "not the password"})
    assert_error(r, 401, "unauthorized")
    assert "set-cookie" not in r.headers
    r = anon.post("/api/v1/auth/login", json={"username": "nobody", "password": "hunter2hunter2"})
    assert_error(r, 401, "unauthorized")
    assert r.json()["error"]["message"] == "wrong username or password"  # the same as for a known account
    r = anon.post("/api/v1/auth/login", json={"token": "made-up-token"})
    assert_error(r, 401, "unauthorized")

    failed = audit(env, actor="anonymous")
    assert [(e["status"], e["target"], e["detail"], e["client"]) for e in failed] == [
        (401, None, "invalid, expired or revoked token", "203.0.113.9"),
        (401, None, "unknown username", "203.0.113.9"),
        (401, "olga", "wrong password", "203.0.113.9"),
    ]
    # no password or token anywhere in the audit log
    dump = json.dumps(audit(env))
    for secret in (PASSWORD, "not the password", "hunter2hunter2", "made-up-token", env.token, "nobody"):
        assert secret not in dump, secret


def test_failed_logins_are_rate_limited_per_username_and_address(env: Any) -> None:
    env.client.post("/api/v1/accounts", json={"username": "olga", "role": "viewer", "password": PASSWORD})
    attacker = client(env, address="198.51.100.1")
    right = {"username": "olga", "password": PASSWORD}
    for i in range(5):
        r = attacker.post("/api/v1/auth/login", json={"username": "olga", "password": f"guess-{i}-guess"})
        assert_error(r, 401, "unauthorized")
    # locked out now: even the right password is refused, without being checked
    r = attacker.post("/api/v1/auth/login", json=right)
    err = assert_error(r, 429, "too_many_requests")
    assert int(r.headers["retry-after"]) == 30 and "try again in 30 s" in err["message"]
    # the account's owner, from another address, is not locked out
    assert client(env, address="10.9.9.9").post("/api/v1/auth/login", json=right).status_code == 200
    # the lockout ends; the next failure locks for twice as long
    env.throttle_clock.t += 31
    assert_error(attacker.post("/api/v1/auth/login", json={"username": "olga", "password": "guess-5-guess"}),
                 401, "unauthorized")
    assert attacker.post("/api/v1/auth/login", json=right).headers["retry-after"] == "60"
    env.throttle_clock.t += 61
    assert attacker.post("/api/v1/auth/login", json=right).status_code == 200  # a success clears the count
    assert_error(attacker.post("/api/v1/auth/login", json={"username": "olga", "password": "typo-typo"}),
                 401, "unauthorized")
    locked = [e for e in audit(env) if e["status"] == 429]
    assert len(locked) == 2 and all(e["client"] == "198.51.100.1" and e["actor"] == "anonymous" for e in locked)
    assert locked[0]["detail"] == "locked out after repeated failures"

    # one address trying many usernames is throttled too
    sprayer = client(env, address="198.51.100.2")
    for i in range(20):
        sprayer.post("/api/v1/auth/login", json={"username": f"user{i}", "password": "Winter2026!"})
    assert_error(sprayer.post("/api/v1/auth/login", json=right), 429, "too_many_requests")


def test_concurrent_login_attempts_cannot_outrun_the_throttle() -> None:
    """200 attempts in flight at once from one address: each is counted when it starts, so only the
    free ones get their password checked; a success takes its own count back."""
    t = LoginThrottle(clock=lambda: 1000.0)
    started = [t.begin("olga", "198.51.100.1") for _ in range(200)]
    assert started[:5] == [0.0] * 5 and all(w > 0 for w in started[5:])
    t2 = LoginThrottle(clock=lambda: 1000.0)
    for _ in range(30):  # a user logging in successfully, again and again, never locks herself out
        assert t2.begin("olga", "10.0.0.1") == 0.0
        t2.succeeded("olga", "10.0.0.1")


def test_password_check_runs_off_the_event_loop(env: Any) -> None:
    env.client.post("/api/v1/accounts", json={"username": "olga", "role": "viewer", "password": PASSWORD})
    threads = []
    verify = env.auth.verify_password

    def spy(username: str, password: str) -> Any:
        threads.append(threading.current_thread())
        return verify(username, password)

    env.auth.verify_password = spy
    assert client(env).post("/api/v1/auth/login", json={"username": "olga", "password": PASSWORD}).status_code == 200
    # SyncClient runs the event loop in this (the main) thread
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_login_with_an_api_token_gives_a_session_that_ends_with_it(env: Any) -> None:
    token = make_account(env, "tess", "viewer")
    browser = client(env)
    r = browser.post("/api/v1/auth/login", json={"token": token})
    assert r.status_code == 200 and r.json()["username"] == "tess" and "cws_session=" in r.headers["set-cookie"]
    assert browser.get("/api/v1/auth/me").json()["kind"] == "session"
    assert_error(browser.post("/api/v1/auth/login", json={"token": token, "username": "tess"}), 422,
                 "invalid_request")
    api_id = env.client.get("/api/v1/tokens", params={"account": "tess"}).json()["items"][0]["id"]
    env.client.delete(f"/api/v1/tokens/{api_id}")
    assert_error(browser.get("/api/v1/auth/me"), 401, "unauthorized")


# -- accounts ---------------------------------------------------------------------------------------------


def test_account_management(env: Any) -> None:
    token = make_account(env, "paul", "viewer", password=PASSWORD)
    assert_error(env.client.post("/api/v1/accounts", json={"username": "PAUL", "role": "viewer"}), 409, "conflict")
    err = assert_error(env.client.post("/api/v1/accounts", json={"username": "a b", "role": "viewer"}), 422,
                       "invalid_request")
    assert err["message"].startswith("body.username")
    assert_error(env.client.post("/api/v1/accounts", json={"username": "x", "role": "root"}), 422, "invalid_request")
    err = assert_error(env.client.post("/api/v1/accounts", json={"username": "x", "role": "viewer",
                                                                 "password": "short"}), 422, "invalid_request")
    assert "body.password" in err["message"]
    assert_error(env.client.get("/api/v1/accounts/nope"), 404, "not_found")
    assert_error(env.client.request("PATCH", "/api/v1/accounts/paul", json={}), 422, "invalid_request")

    listing = env.client.get("/api/v1/accounts").json()
    assert [a["username"] for a in listing["items"]] == ["paul", "root"] and listing["total"] == 2
    assert listing["items"][0]["tokens"] == 1

    # a new role applies at once
    paul = client(env, token)
    assert paul.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo"}).status_code == 403
    r = env.client.request("PATCH", "/api/v1/accounts/paul", json={"role": "operator"})
    assert r.status_code == 200 and r.json()["role"] == "operator"
    assert paul.post("/api/v1/tasks", json={"target": "dev-1", "handler": "echo"}).status_code == 201

    # a new password ends the console sessions, not the API tokens
    session = client(env).post("/api/v1/auth/login", json={"username": "paul", "password": PASSWORD}).json()
    env.client.request("PATCH", "/api/v1/accounts/paul", json={"password": "a brand new secret"})
    assert_error(client(env, session["token"]).get("/api/v1/devices"), 401, "unauthorized")
    assert paul.get("/api/v1/devices").status_code == 200
    assert client(env).post("/api/v1/auth/login", json={"username": "paul", "password": PASSWORD}).status_code == 401
    assert client(env).post("/api/v1/auth/login",
                            json={"username": "paul", "password": "a brand new secret"}).status_code == 200

    # there is always an admin
    err = assert_error(env.client.request("PATCH", "/api/v1/accounts/root", json={"role": "viewer"}), 409, "conflict")
    assert "last admin" in err["message"]
    assert_error(env.client.delete("/api/v1/accounts/root"), 409, "conflict")
    # deleting an account ends its tokens
    assert env.client.delete("/api/v1/accounts/paul").status_code == 204
    assert_error(paul.get("/api/v1/devices"), 401, "unauthorized")
    assert_error(env.client.delete("/api/v1/accounts/paul"), 404, "not_found")
    assert_error(env.client.post("/api/v1/tokens", json={"account": "paul", "name": "x"}), 404, "not_found")
    changes = [(e["method"], e["target"], e["status"], e["detail"]) for e in audit(env) if e["actor"] == "root"]
    assert ("PATCH", "paul", 200, "changed role") in changes and ("PATCH", "paul", 200, "changed password") in changes
    assert ("DELETE", "paul", 204, None) in changes and ("DELETE", "root", 409, None) in changes


def test_openapi_documents_the_bearer_scheme_and_roles(env: Any) -> None:
    spec = client(env).get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerToken"]["type"] == "http" and schemes["bearerToken"]["scheme"] == "bearer"
    assert schemes["consoleSession"] == {"type": "apiKey", "in": "cookie", "name": "cws_session",
                                         "description": schemes["consoleSession"]["description"]}
    paths = spec["paths"]
    create = paths["/api/v1/tasks"]["post"]
    assert {"bearerToken": []} in create["security"] and create["x-required-role"] == "operator"
    assert "401" in create["responses"] and "403" in create["responses"]
    assert "Needs role `operator`" in create["description"]
    assert paths["/api/v1/audit"]["get"]["x-required-role"] == "admin"
    assert paths["/metrics"]["get"]["x-required-role"] == "viewer"
    for open_route in (paths["/healthz"]["get"], paths["/api/v1/auth/login"]["post"], paths["/"]["get"]):
        assert "security" not in open_route and "x-required-role" not in open_route
    for path in ("/api/v1/accounts", "/api/v1/accounts/{username}", "/api/v1/tokens", "/api/v1/tokens/{token_id}",
                 "/api/v1/auth/logout", "/api/v1/auth/me"):
        for op in paths[path].values():
            assert op["security"] and op["x-required-role"], path


# -- first start --------------------------------------------------------------------------------------------


def test_bootstrap_writes_a_0600_admin_token_once(tmp_path: Path) -> None:
    db = tmp_path / "cloud.db"
    token_file = tmp_path / "lab" / "admin.token"
    auth = AuthStore(db, pwhash=FAST_PWHASH)
    try:
        assert auth.bootstrap(None) is False and auth.count_accounts() == 0  # nowhere to write: nothing made
        assert auth.bootstrap(token_file) is True
        assert token_file.stat().st_mode & 0o777 == 0o600
        text = token_file.read_text()
        assert text.endswith("\n") and text.count("\n") == 1
        who = auth.authenticate(text.strip())
        assert who is not None and (who.username, who.role, who.token_name) == ("admin", "admin", "bootstrap")
        assert auth.verify_password("admin", "") is None  # nobody knows its password
        assert auth.bootstrap(token_file) is False
        assert token_file.read_text() == text
        token_file.unlink()
        assert auth.bootstrap(token_file) is False and not token_file.exists()
        assert [a.username for a in auth.list_accounts().items] == ["admin"]
    finally:
        auth.close()


def test_the_cloud_daemon_bootstraps_at_its_first_start_only(tmp_path: Path, caplog: Any) -> None:
    from cloud.daemon import CloudDaemon

    write_secret_file(tmp_path / "cloud.json", Identity.generate("cloud", "cloud", "cloud").to_dict())
    token_file = tmp_path / "admin.token"
    cfg = CloudConfig(identity_file=tmp_path / "cloud.json", broker=None, http=HttpConfig(port=1),
                      database=tmp_path / "cloud.db", admin_token_file=token_file)

    def start() -> None:
        async def main() -> None:
            d = CloudDaemon(cfg)
            d.store.close()
            d.auth.close()

        asyncio.run(main())

    with caplog.at_level(logging.DEBUG):
        start()
    token = token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert str(token_file) in caplog.text and token not in caplog.text
    start()
    assert token_file.read_text().strip() == token
    # the token works against the API on that database
    store, auth = SqliteStore(cfg.database), AuthStore(cfg.database, pwhash=FAST_PWHASH)
    try:
        app = create_app(CloudState(store=store, metrics=CloudMetrics(), fanout=Fanout(), auth=auth))
        c = SyncClient(app, headers={"Authorization": f"Bearer {token}"})
        assert c.get("/api/v1/auth/me").json()["role"] == "admin"
        c.close()
    finally:
        auth.close()
        store.close()
    # the config key, relative to the config file
    (tmp_path / "cloud.yaml").write_text("identity_file: cloud.json\nadmin_token_file: ../x/admin.token\n")
    assert load_config(tmp_path / "cloud.yaml", CloudConfig).admin_token_file == (tmp_path.parent / "x" /
                                                                                    "admin.token").resolve()


# -- cwsnet operator ------------------------------------------------------------------------------------------


def cwsnet(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cwsnet", *args], capture_output=True, text=True, input=stdin,
                          timeout=60)


def test_operator_cli_round_trip(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    assert cwsnet("init", "--data-dir", str(lab), "--devices", "1").returncode == 0
    d = ["--data-dir", str(lab)]

    r = cwsnet("operator", "add", "alice", "--role", "operator", *d)
    assert r.returncode == 0, r.stderr
    assert "account alice created (role operator)" in r.stdout and "shown only now" in r.stdout
    token = r.stdout.strip().splitlines()[-1]
    r = cwsnet("operator", "add", "bob", "--role", "admin", "--password-stdin", *d, stdin=PASSWORD + "\n")
    assert r.returncode == 0 and PASSWORD not in r.stdout + r.stderr, r.stderr
    listing = cwsnet("operator", "list", *d).stdout
    assert "alice" in listing and "operator" in listing and "bob" in listing
    assert json.loads(cwsnet("operator", "list", "--json", *d).stdout)[0]["username"] == "alice"

    db = lab / "cloud" / "cloud.db"
    store, auth = SqliteStore(db), AuthStore(db, pwhash=FAST_PWHASH)
    api = SyncClient(create_app(CloudState(store=store, auth=auth)))
    try:
        def me(tok: str) -> httpx.Response:
            return api.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {tok}"})

        assert me(token).json()["username"] == "alice"
        login = api.post("/api/v1/auth/login", json={"username": "bob", "password": PASSWORD})
        assert login.status_code == 200 and login.json()["role"] == "admin"

        assert cwsnet("operator", "passwd", "alice", "--password-stdin", *d, stdin="alice's new password\n"
                      ).returncode == 0
        assert api.post("/api/v1/auth/login", json={"username": "alice", "password": "alice's new password"}
                        ).status_code == 200
        r = cwsnet("operator", "token", "alice", "--name", "ci", "--expires-days", "7", *d)
        assert r.returncode == 0 and "'ci'" in r.stdout, r.stderr
        ci = r.stdout.strip().splitlines()[-1]
        assert me(ci).json()["token_name"] == "ci"
        tokens = json.loads(cwsnet("operator", "tokens", "alice", "--json", *d).stdout)
        ci_id = next(t["id"] for t in tokens if t["name"] == "ci")
        assert ci not in cwsnet("operator", "tokens", *d).stdout
        r = cwsnet("operator", "revoke-token", ci_id, *d)
        assert r.returncode == 0 and "revoked" in r.stdout
        assert me(ci).status_code == 401 and me(token).status_code == 200
        assert cwsnet("operator", "role", "alice", "viewer", *d).returncode == 0
        assert me(token).json()["role"] == "viewer"
        assert cwsnet("operator", "remove", "alice", *d).returncode == 0
        assert me(token).status_code == 401

        # the CLI's changes are in the audit log, without secrets
        entries = auth.list_audit(limit=100).items
        assert {e.action for e in entries if e.method == "CLI"} >= {"add", "passwd", "token", "revoke-token", "role",
                                                                    "remove"}
        dump = repr(entries)
        assert token not in dump and ci not in dump and PASSWORD not in dump
    finally:
        api.close()
        auth.close()
        store.close()

    # the same database through --config
    cfg = lab / "config" / "cloud.yaml"
    assert "bob" in cwsnet("operator", "list", "--config", str(cfg)).stdout

    for args, stdin, message in (
        (["add", "carol", "--role", "superuser"], None, "--role: expected one of viewer, operator, admin"),
        (["add", "bad name!", "--role", "viewer"], None, "username 'bad name!' is not valid"),
        (["add", "bob", "--role", "viewer"], None, "account 'bob' already exists"),
        (["remove", "nobody"], None, "account 'nobody' does not exist"),
        (["remove", "bob"], None, "last admin"),
        (["role", "bob", "viewer"], None, "last admin"),
        (["passwd", "bob", "--password-stdin"], "short\n", "8 to 1024 characters"),
        (["passwd", "bob", "--password-stdin"], "", "no password on stdin"),
        (["passwd", "bob"], "", "pass --password-stdin"),
        (["token", "bob", "--expires-days", "0"], None, "--expires-days: expected days > 0"),
        (["token", "bob", "--name", "no/slash"], None, "token name 'no/slash' is not valid"),
        (["revoke-token", "nope"], None, "token 'nope' does not exist"),
    ):
        r = cwsnet("operator", *args, *d, stdin=stdin)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = cwsnet("operator", "list", "--data-dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no home lab here" in r.stderr
    r = cwsnet("operator", "list", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
