"""The cloud's REST API and web console: ``create_app(state) -> FastAPI``.

Every route and every response field carries a description, so ``/openapi.json`` documents the
API completely. Every error, including validation errors and unknown routes, has one shape::

    {"error": {"code": "not_found" | "invalid_request" | ..., "message": "...", "details": [...]}}

Routes that touch the store are plain ``def`` functions: FastAPI runs them in its thread pool,
so a slow commit never stalls the event loop that also carries MQTT.

Every ``/api/v1`` route but ``POST /api/v1/auth/login``, and ``/metrics``, needs a token of an
operator account (:mod:`cloud.auth`): ``Authorization: Bearer TOKEN``, or the console's session
cookie. Each route names the least role it needs (``x-required-role`` in the OpenAPI document);
:class:`_Guard`, an ASGI middleware, checks it before anything else runs (so an anonymous client
learns nothing from a route, not even whether its body is valid) and writes the audit log entry of
every mutating call, allowed or refused, before the response leaves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import cbor2
from fastapi import FastAPI, Query, Request, Response, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import APIKeyCookie, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import cookie_parser
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.auth import (
    PASSWORD_MAX,
    PASSWORD_MIN,
    SESSION_TTL,
    TOKEN_MAX,
    TOKEN_NAME_PATTERN,
    USERNAME_PATTERN,
    Account,
    AuditEntry,
    AuthError,
    AuthStore,
    LoginThrottle,
    Principal,
    Token,
)
from cloud.fanout import Fanout
from cloud.ingest import BodyError, check_storable
from cloud.metrics import CONTENT_TYPE, CloudMetrics
from cloud.store import NewEvent, Node, Store, Task
from cloud.views import LIST_MAX, change, event_view, node_view, task_view, telemetry_view
from cwsnet import parts
from cwsnet.envelope import MAX_CHECKPOINT, MAX_PAYLOAD
from cwsnet.policy.access import AccessEngine, Decision, DenyRecorder, Subject, shipped_access_engine
from cwsnet.policy.watch import PolicyWatcher

log = logging.getLogger("cwsnet.cloud.api")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
STATIC_DIR = Path(__file__).parent / "static"
API_VERSION = "1"
#: room the header, the sealed part's topic and hash, the nonce and the box tag take in a task command
ENVELOPE_HEADROOM = 1024
#: largest CBOR-encoded task_cmd body that travels as one message; a bigger one's args go in parts
#: (cwsnet.parts, protocol §3), to a node that takes them
MAX_TASK_BODY = parts.INLINE_MAX

#: the console's session cookie (HttpOnly, SameSite=Strict), set by POST /api/v1/auth/login
COOKIE_NAME = "cws_session"
#: a request authenticated by the cookie that changes something must carry this header with the
#: value "1": a cross-site form cannot set a header, so it cannot act with an operator's cookie
CONSOLE_HEADER = "X-CWS-Console"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: argon2id verifications at once (each takes 64 MiB and a core for about 50 ms)
LOGIN_CONCURRENCY = 2


class TaskSubmitter(Protocol):
    """What the API needs from the daemon's task dispatcher (thread-safe, never blocks)."""

    def request(self, task_id: str) -> None: ...


@dataclass
class CloudState:
    """Everything the API serves from, built by the daemon (or a test)."""

    store: Store
    metrics: CloudMetrics = field(default_factory=CloudMetrics)
    fanout: Fanout = field(default_factory=Fanout)
    dispatcher: TaskSubmitter | None = None
    #: the workload scheduler (cloud/tasks.py TaskService): scheduled tasks and executors
    tasks: Any = None
    #: set by create_app: ``submit_task(TaskRequest, request | None, where) -> (id, duplicate)``
    submit_task: Any = None
    #: the schedules (cloud/schedules.py ScheduleService)
    schedules: Any = None
    broker_connected: Callable[[], bool] = lambda: False
    clock: Callable[[], float] = time.time
    heartbeat: float = 15.0
    #: accounts, tokens and the audit log (required: the API has no open mode)
    auth: AuthStore = field(kw_only=True)
    throttle: LoginThrottle = field(default_factory=LoginThrottle, kw_only=True)
    session_ttl: float = field(default=SESSION_TTL, kw_only=True)
    #: the active policy set and the last refused change (docs/policies.md)
    policies: PolicyWatcher | None = field(default=None, kw_only=True)


# -- errors -----------------------------------------------------------------------------------------

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.details = details
        self.headers = headers


def _error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _www_authenticate(error: str | None = None) -> dict[str, str]:
    value = 'Bearer realm="cwsnet"' + (f', error="{error}"' if error else "")
    return {"WWW-Authenticate": value}


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    said, details = [], []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        msg = msg[:1].lower() + msg[1:]
        said.append(f"{loc}: {msg}" if loc else msg)
        details.append({"loc": list(err.get("loc", ())), "msg": msg, "type": err.get("type")})
    return "; ".join(said) or "invalid request", jsonable_encoder(details)


# -- models ------------------------------------------------------------------------------------------


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyCheckRequest(ApiModel):
    files: dict[str, str] = Field(
        description="policy files to check, name -> YAML text (e.g. {\"site.yaml\": \"kind: access ...\"}); they "
                    "are checked together with the shipped defaults, as they would be loaded", max_length=64)


class ErrorBody(ApiModel):
    code: str = Field(description="stable machine-readable error code, e.g. not_found, invalid_request")
    message: str = Field(description="human-readable explanation naming the field or object at fault")
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems (validation errors)")


class ErrorResponse(ApiModel):
    error: ErrorBody = Field(description="what went wrong")


class Health(ApiModel):
    status: Literal["ok", "error"] = Field(description="ok when the daemon can serve requests")
    broker: Literal["up", "down"] = Field(description="whether ingest is connected to the cloud MQTT broker")
    db: Literal["ok", "error"] = Field(description="whether the database answers")


class NodeOut(ApiModel):
    id: str = Field(description="node id, unique across the installation")
    site: str = Field(description="site the node belongs to")
    role: str = Field(description="device or gateway")
    online: bool = Field(description="true after a birth/status, false after its death message or a timeout")
    last_seen: int | None = Field(description="ms since the epoch when the cloud last stored a message from it")
    created: int = Field(description="ms since the epoch when the node was registered")
    status: dict[str, Any] = Field(
        description="body of its latest status message (state, uptime, cpu, mem, load, disk, temp, outbox, link, ...)"
    )
    agent: dict[str, Any] | None = Field(description="agent version, platform and kind from its latest birth/status")
    key_version: int = Field(description="version of its current key pair (bumped by `cwsnet device rotate`)")
    revoked_at: int | None = Field(
        description="ms since the epoch when it was revoked (`cwsnet device revoke`): its messages are refused; "
        "null while it is active"
    )


class NodePage(ApiModel):
    items: list[NodeOut] = Field(description="the nodes on this page, ordered by id")
    total: int = Field(description="number of nodes matching the filters")
    limit: int = Field(description="page size used")
    offset: int = Field(description="offset used")


class TelemetryItem(ApiModel):
    ts: int = Field(description="reading time, ms since the epoch (device clock)")
    seq: int = Field(description="seq of the message that carried the reading")
    idx: int = Field(description="index of the reading within its message")
    stream: str = Field(description="telemetry stream name")
    values: dict[str, Any] = Field(description="the reading: name -> number, text or bool")


class TelemetryPage(ApiModel):
    items: list[TelemetryItem] = Field(description="readings, newest first")


class EventOut(ApiModel):
    id: int = Field(description="event id, increasing")
    ts: int = Field(description="ms since the epoch")
    source: str | None = Field(description="node the event is about or came from; null for the cloud itself")
    type: str = Field(description="event type, e.g. message.rejected, node.online, node.offline, or a device's own")
    severity: str = Field(description="info, warning, error or critical")
    message: str = Field(description="human-readable text")
    data: dict[str, Any] = Field(description="structured details")


class EventPage(ApiModel):
    items: list[EventOut] = Field(description="events, newest first")
    total: int = Field(description="number of events matching the filters")
    limit: int = Field(description="page size used")
    offset: int = Field(description="offset used")


class TaskRequirements(ApiModel):
    capabilities: list[str] = Field(default_factory=list, max_length=32,
                                    description="capabilities an executor must advertise (its status `capabilities`)")
    mem_free: int | None = Field(None, ge=0, description="bytes of free memory an executor must report, at least")
    cpu: float | None = Field(None, ge=0, le=1, description="an executor's CPU load (0..1) must be at most this")


class TaskRequest(ApiModel):
    target: str | None = Field(
        None, pattern=NAME_PATTERN,
        description="run it on exactly this registered device (a *direct* task, sent as is and never moved); "
                    "leave it out to let the scheduler place it (a *scheduled* task: see the other fields)")
    handler: str = Field(pattern=NAME_PATTERN, description="task handler name, e.g. echo, sha256, sleep, count")
    args: dict[str, Any] = Field(default_factory=dict, description="arguments passed to the handler")
    timeout: float | None = Field(
        None, gt=0, le=30 * 86400, description="seconds from now after which the task expires if not run"
    )
    # scheduled tasks only
    site: str | None = Field(None, pattern=NAME_PATTERN, description="scheduled: the site whose executors "
                             "(devices, gateway) may run it, besides the cloud's workers; none: the cloud's only")
    origin: str | None = Field(None, pattern=NAME_PATTERN, description="scheduled: the node the work is for "
                               "(offload rules match on it, e.g. a device's own data); default: none (an app)")
    data_class: str | None = Field(None, pattern=NAME_PATTERN, description="scheduled: the data's class for the "
                                   "offload policy (a `keep_on_site` class never runs in the cloud)")
    priority: int = Field(5, ge=0, le=9, description="scheduled: 9 runs first, 0 last")
    replicas: int = Field(1, ge=1, le=32, description="scheduled: run on this many distinct executors")
    mode: Literal["first", "majority"] = Field(
        "first", description="scheduled, replicas > 1: `first` result wins (the others are cancelled), or a "
                             "`majority` must agree (a disagreement is flagged on the task and as an event)")
    max_attempts: int = Field(3, ge=1, le=20, description="scheduled: attempts per replica (a failure or a lost "
                              "lease uses one) before it fails for good")
    requirements: TaskRequirements = Field(default_factory=TaskRequirements,
                                           description="scheduled: what an executor must offer")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200, description="submitting the same key again (direct or scheduled) "
        "returns the existing task instead of making a second one")


class TaskCreated(ApiModel):
    id: str = Field(description="the task's id (the existing one's when the idempotency key was seen before)")
    state: Literal["queued"] = Field(
        description="queued: a direct task is sent at once when the device's gateway can hold it, else when the "
                    "device is online; a scheduled one when the scheduler places it (for a duplicate, read the "
                    "existing task's state with GET /api/v1/tasks/{id})"
    )
    duplicate: bool = Field(False, description="true: the idempotency key was seen before; nothing new was made")


class TaskOut(ApiModel):
    id: str = Field(description="task id (a site task's: `s-` and 24 hex digits, made from its origin and key)")
    target: str = Field(description="direct: the device it was sent to; scheduled, site: '' (see `node`)")
    handler: str = Field(description="handler name")
    args: dict[str, Any] = Field(description="handler arguments (site: {}, the gateway keeps them)")
    state: str = Field(description="queued, assigned (scheduled, site: sent to its executor), running, succeeded, "
                                   "failed, expired or cancelled")
    result: Any = Field(description="handler result (map) once succeeded, else null")
    error: str | None = Field(description="why it failed or expired, else null")
    created: int = Field(description="ms since the epoch")
    updated: int = Field(description="ms since the epoch of the last state change")
    started: int | None = Field(None, description="when the node started it (node clock), ms")
    finished: int | None = Field(None, description="when the node finished it (node clock), ms")
    deadline: int | None = Field(None, description="ms since the epoch after which it expires; null for none")
    dispatched: int | None = Field(None, description="when the command was last published to the node, ms")
    attempts: int = Field(0, description="direct: how many times the command was published; scheduled, site: how "
                                         "many assignments were made (over all replicas)")
    kind: Literal["direct", "scheduled", "site"] = Field(
        "direct", description="`direct` (sent to `target` as asked), `scheduled` (placed, leased and moved by the "
        "cloud's scheduler) or `site` (submitted by a device and scheduled by its gateway, which reports it "
        "here: read-only for the cloud, docs/tasks.md)")
    site: str | None = Field(None, description="scheduled: the site whose executors may run it; site: the site of "
                                               "the gateway that owns it")
    node: str | None = Field(None, description="scheduled, site: the executor it runs on now, or ran on last")
    placement: str | None = Field(None, description="scheduled: where it ran and why: each placement decision "
                                  "(offload policy rule, candidates, what was held back) and the task's history; "
                                  "site: the same explanation, as the gateway's scheduler reported it")
    origin: str | None = Field(None, description="site: the device that submitted it")
    idempotency_key: str | None = Field(None, description="the submitter's idempotency key (site: "
                                                          "`site:{gateway}:{origin}:{key}`)")
    disagreement: list[Any] | None = Field(None, description="scheduled, replicas: [[node, result], ...] when the "
                                           "replicas' results differ")
    omitted: dict[str, int] | None = Field(None, description="in lists and live changes: `args` or `result` "
                                           "left out (null) because its JSON is over 64 KiB, with its size in "
                                           "bytes; `GET /api/v1/tasks/{id}` shows it whole")


class ExecutorOut(ApiModel):
    node: str = Field(description="node id (the cloud's own workers are the cloud's node)")
    tier: Literal["device", "gateway", "cloud"] = Field(description="where it sits")
    site: str | None = Field(description="its site; null for the cloud")
    live: bool = Field(description="false once it lost its lease (silent past it, or its connection dropped)")
    draining: bool = Field(description="true: it gets no new work (`cwsnet node drain`)")
    slots: int = Field(description="tasks it runs at once (from its status)")
    running: list[str] = Field(description="ids of the scheduled tasks it holds a lease on")
    capabilities: list[str] = Field(description="what it advertises")
    handlers: list[str] | None = Field(description="handlers it runs; null: not reported")
    cpu: float | None = Field(description="its CPU load, 0..1, from its last status")
    last_seen_s: float = Field(description="seconds since the scheduler last heard from it")


class ScheduleIn(ApiModel):
    task: TaskRequest = Field(description="the task submitted at each run (as `POST /api/v1/tasks`)")
    cron: str | None = Field(None, description="a 5-field crontab line: minute hour day month day-of-week")
    every: float | str | None = Field(None, description="an interval: seconds (>= 1), or a duration like 30s, 5m")
    timezone: str = Field("UTC", description="the IANA time zone the cron line is read in")
    enabled: bool = Field(True, description="false: made paused")
    misfire_grace: int = Field(60, ge=1, le=86400, description="seconds a run may be late (the cloud was down) "
                                                               "and still happen once; later runs are skipped")
    description: str = Field("", max_length=500, description="what the schedule is for, for operators")


class ScheduleOut(ApiModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(description="the schedule's name")
    task: dict[str, Any] = Field(description="the task it submits")
    cron: str | None = Field(None, description="its cron line")
    every: float | None = Field(None, description="its interval in seconds")
    enabled: bool = Field(description="false while paused")
    next_run: int | None = Field(None, description="ms since the epoch; null while paused")
    last_run: int | None = Field(None, description="the scheduled time (ms) of the last run submitted")
    last_task: str | None = Field(None, description="the task id of the last run")
    runs: int = Field(0, description="runs submitted")
    missed: int = Field(0, description="runs skipped (later than misfire_grace, or the previous still submitting)")
    last_error: str | None = Field(None, description="why the last submission failed; null once one succeeds")


class TaskPage(ApiModel):
    items: list[TaskOut] = Field(description="tasks, newest first")
    total: int = Field(description="number of tasks matching the filters")
    limit: int = Field(description="page size used")
    offset: int = Field(description="offset used")


RoleName = Literal["viewer", "operator", "admin"]


class LoginRequest(ApiModel):
    username: str | None = Field(None, max_length=64, description="account name (together with password)")
    password: str | None = Field(
        None, max_length=PASSWORD_MAX, description="the account's password (together with username); never logged"
    )
    token: str | None = Field(
        None, max_length=TOKEN_MAX, description="an API token, instead of username and password: the console "
        "then gets a session of the token's account (ending when the token is revoked or expires)"
    )

    @model_validator(mode="after")
    def _one_way(self) -> LoginRequest:
        if self.token is not None:
            if self.username is not None or self.password is not None:
                raise ValueError("send either username and password, or token, not both")
        elif self.username is None or self.password is None:
            raise ValueError("send username and password, or token")
        return self


class SessionOut(ApiModel):
    token: str = Field(
        description="the session token: `Authorization: Bearer TOKEN` (the console uses the cookie set with it "
        "instead); shown only in this answer"
    )
    token_id: str = Field(description="the session's public id, as the audit log and GET /api/v1/tokens show it")
    expires: int = Field(description="ms since the epoch when the session ends")
    username: str = Field(description="the account logged in")
    role: RoleName = Field(description="the account's role: viewer, operator or admin")


class MeOut(ApiModel):
    username: str = Field(description="the account the request's token belongs to")
    role: RoleName = Field(description="its role: viewer (read), operator (also tasks), admin (also accounts, "
                           "tokens, audit log)")
    token_id: str = Field(description="public id of the token used")
    token_name: str = Field(description="name of the token used")
    kind: Literal["api", "session"] = Field(description="api: an API token; session: a login session")
    expires: int | None = Field(description="ms since the epoch when the token ends; null for never")


class AccountOut(ApiModel):
    username: str = Field(description="account name (unique, case-insensitive)")
    role: RoleName = Field(description="viewer, operator or admin")
    created: int = Field(description="ms since the epoch")
    updated: int = Field(description="ms since the epoch of the last role or password change")
    password_changed: int = Field(description="ms since the epoch when its password was last set")
    tokens: int = Field(description="its API tokens neither revoked nor expired")
    last_used: int | None = Field(description="ms since the epoch of the latest use of any of its tokens")


class AccountPage(ApiModel):
    items: list[AccountOut] = Field(description="accounts, ordered by name")
    total: int = Field(description="number of accounts")
    limit: int = Field(description="page size used")
    offset: int = Field(description="offset used")


class AccountCreate(ApiModel):
    username: str = Field(
        pattern=USERNAME_PATTERN, description="1-64 letters, digits, '_', '.', '@' or '-', starting with a letter "
        "or digit"
    )
    role: RoleName = Field(description="viewer, operator or admin")
    password: str | None = Field(
        None, min_length=PASSWORD_MIN, max_length=PASSWORD_MAX,
        description=f"its password ({PASSWORD_MIN}-{PASSWORD_MAX} characters); omit it for an account that logs "
        "in with API tokens only (it gets a random password nobody knows)",
    )


class AccountUpdate(ApiModel):
    role: RoleName | None = Field(None, description="the new role (the last admin cannot be demoted)")
    password: str | None = Field(
        None, min_length=PASSWORD_MIN, max_length=PASSWORD_MAX,
        description="a new password; the account's console sessions end, its API tokens stay valid",
    )

    @model_validator(mode="after")
    def _something(self) -> AccountUpdate:
        if self.role is None and self.password is None:
            raise ValueError("send role, password or both")
        return self


class TokenCreate(ApiModel):
    account: str = Field(pattern=USERNAME_PATTERN, description="the account the token acts as")
    name: str = Field(
        pattern=TOKEN_NAME_PATTERN, description="what the token is for, e.g. prometheus or ci (1-64 characters)"
    )
    expires_days: float | None = Field(
        None, gt=0, le=36500, description="days until it expires; omit for a token that never expires"
    )


class TokenOut(ApiModel):
    id: str = Field(description="the token's public id (revoke it with DELETE /api/v1/tokens/{id})")
    account: str = Field(description="the account it acts as")
    kind: Literal["api", "session"] = Field(description="api: an API token; session: a login session")
    name: str = Field(description="its name")
    created: int = Field(description="ms since the epoch")
    last_used: int | None = Field(description="ms since the epoch of its latest use (updated at most once a minute)")
    expires: int | None = Field(description="ms since the epoch when it expires; null for never")
    revoked: int | None = Field(description="ms since the epoch when it was revoked; null if it was not")
    active: bool = Field(description="neither revoked nor expired")


class TokenCreated(TokenOut):
    token: str = Field(description="the token itself: `Authorization: Bearer TOKEN`. Shown only in this answer; "
                       "the cloud keeps only its SHA-256")


class TokenPage(ApiModel):
    items: list[TokenOut] = Field(description="tokens, newest first")
    total: int = Field(description="number of tokens matching the filters")
    limit: int = Field(description="page size used")
    offset: int = Field(description="offset used")


class AuditOut(ApiModel):
    id: int = Field(description="entry id, increasing")
    ts: int = Field(description="ms since the epoch")
    actor: str = Field(description="the account that made the call, or anonymous")
    role: str | None = Field(description="the actor's role at the time; null for anonymous")
    token_id: str | None = Field(description="public id of the token used (never the token)")
    method: str = Field(description="HTTP method")
    path: str = Field(description="request path (without the query string)")
    action: str | None = Field(description="the API operation, e.g. create_task, login; null for no route")
    target: str | None = Field(description="the object acted on: task id, account name, token id")
    status: int = Field(description="HTTP status of the answer (401, 403 and 429 for refused calls)")
    client: str | None = Field(description="the client's IP address")
    detail: str | None = Field(description="why a call was refused, when the status does not say it all")


class AuditPage(ApiModel):
    items: list[AuditOut] = Field(description="audit entries, newest first")
    total: int = Field(description="number of entries matching the filters")
    limit: int = Field(description="page size used")
    offset: int = Field(description="offset used")


def account_view(a: Account) -> dict[str, Any]:
    return {"username": a.username, "role": a.role, "created": a.created, "updated": a.updated,
            "password_changed": a.password_changed, "tokens": a.tokens, "last_used": a.last_used}


def token_view(t: Token, now_ms: int) -> dict[str, Any]:
    return {"id": t.id, "account": t.account, "kind": t.kind, "name": t.name, "created": t.created,
            "last_used": t.last_used, "expires": t.expires, "revoked": t.revoked, "active": t.active(now_ms)}


def audit_view(e: AuditEntry) -> dict[str, Any]:
    return {"id": e.id, "ts": e.ts, "actor": e.actor, "role": e.role, "token_id": e.token_id, "method": e.method,
            "path": e.path, "action": e.action, "target": e.target, "status": e.status, "client": e.client,
            "detail": e.detail}


_ERRORS = {
    422: {"model": ErrorResponse, "description": "invalid request: a parameter or body field is wrong"},
}
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such object"}, **_ERRORS}
_AUTH_ERRORS = {
    401: {"model": ErrorResponse, "description": "no token, or an invalid, expired or revoked one "
          "(`WWW-Authenticate: Bearer`)"},
    403: {"model": ErrorResponse, "description": "the token's account lacks the role this route needs (the "
          "message names it), an access policy denies it this node (the message and `details[0].rule` name the "
          "rule), or a cookie-authenticated change lacks the `X-CWS-Console: 1` header"},
}


# -- access policies over the API ---------------------------------------------------------------------


class AccessCheck:
    """The ``access`` policies on top of the roles (docs/policies.md): an account's read of a node's data
    is action ``read``, a task sent to or cancelled on a device is ``command``, decided for the subject
    ``Subject(account, "operator", "*")`` on the node's topics. The engine follows ``state.policies``
    (rebuilt when the active set's digest changes; the shipped defaults when there is none). Denials,
    and allowed calls an audit-mode rule would deny, become events (at most one per account, action
    and rule a minute)."""

    def __init__(self, state: CloudState) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._digest: str | None = None
        self._engine: AccessEngine | None = None
        self.recorder = DenyRecorder(shipped_access_engine())

    def engine(self) -> AccessEngine:
        watcher = self.state.policies
        pset = watcher.active if watcher is not None else None
        if pset is None:
            return shipped_access_engine()
        with self._lock:
            if self._engine is None or pset.digest != self._digest:
                self._engine, self._digest = AccessEngine(pset), pset.digest
            return self._engine

    def decide(self, account: str, action: str, topic: str, node: str | None) -> Decision:
        engine = self.engine()
        d = engine.decide(Subject(account, "operator", "*"), action, topic)
        if d.allowed and not d.audit:
            return d
        with self._lock:
            self.recorder.engine = engine
            event = self.recorder.observe(d, self.state.clock())
        if event is not None:
            try:
                stored = self.state.store.add_events([NewEvent(int(self.state.clock() * 1000), node, event["kind"],
                                                               event["severity"], event["message"], event["data"])])
                self.state.fanout.publish_many([change("event", event_view(e)) for e in stored])
            except Exception:  # the refusal stands even when it cannot be recorded
                log.exception("recording the access event %r failed", event["message"])
        return d


def _one_level(text: str | None) -> str:
    """``text`` as one topic level, or ``+`` (any) when it cannot be one."""
    return text if text and not any(c in text for c in "/+#\x00") else "+"


# -- authentication and audit ---------------------------------------------------------------------------


class _Guard:
    """ASGI middleware: authenticates and authorizes every request before routing, audits changes.

    The role a route needs is its ``x-required-role`` (OpenAPI extra); a path under ``/api/`` that
    matches no route, and ``/metrics``, need ``viewer``; everything else (``/``, ``/healthz``,
    ``/openapi.json``, the login route) is open. A request authenticated by the session cookie that
    changes something must carry ``X-CWS-Console: 1`` (CSRF defence). Every POST, PUT, PATCH and
    DELETE, allowed or refused, gets an audit entry, committed before its answer is sent.
    Handlers add to the entry through ``request.state``: ``audit_target``, ``audit_detail``, and
    ``audit_actor``/``audit_role`` (the login route, whose caller has no token yet).
    """

    def __init__(self, app: ASGIApp, *, cloud: CloudState, routes: Callable[[], list[Any]]) -> None:
        self.app = app
        self.cloud = cloud
        self.routes = routes

    def _route(self, scope: Scope) -> tuple[str | None, str | None, dict[str, Any]]:
        """(role needed, operation name, path parameters) of the route ``scope`` goes to."""
        for route in self.routes():
            match, child = route.matches(scope)
            if match == Match.FULL:
                if isinstance(route, APIRoute):
                    role = (route.openapi_extra or {}).get("x-required-role")
                    return role, route.name, dict(child.get("path_params", {}))
                return None, None, {}
        path = scope["path"]
        if path.startswith("/api/") or path == "/metrics":
            return "viewer", None, {}
        return None, None, {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        role, action, params = self._route(scope)
        state = scope.setdefault("state", {})
        audited = method in MUTATING
        answered: dict[str, int] = {}

        async def send_audited(message: Message) -> None:
            if message["type"] == "http.response.start" and "status" not in answered:
                answered["status"] = message["status"]
                if audited:
                    await self._audit(scope, state, message["status"], action, params)
            await send(message)

        try:
            if role is not None:
                refusal = await self._check(scope, state, role)
                if refusal is not None:
                    await refusal(scope, receive, send_audited)
                    return
            await self.app(scope, receive, send_audited)
        except Exception:
            if audited and "status" not in answered:
                await self._audit(scope, state, 500, action, params)
            raise

    async def _check(self, scope: Scope, state: dict[str, Any], role: str) -> JSONResponse | None:
        headers = Headers(scope=scope)
        header = headers.get("authorization")
        via = "bearer"
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return _error_response(
                    401, "unauthorized", "the Authorization header must be 'Bearer TOKEN'",
                    headers=_www_authenticate("invalid_request"),
                )
        else:
            via = "cookie"
            token = cookie_parser(headers.get("cookie", "")).get(COOKIE_NAME, "")
            if not token:
                state["audit_detail"] = "no token"
                return _error_response(
                    401, "unauthorized",
                    "this needs an API token: send 'Authorization: Bearer TOKEN' (an admin makes tokens with "
                    "`cwsnet operator token` or POST /api/v1/tokens), or log in with POST /api/v1/auth/login",
                    headers=_www_authenticate(),
                )
        principal = await run_in_threadpool(self.cloud.auth.authenticate, token)
        if principal is None:
            state["audit_detail"] = "invalid, expired or revoked token"
            return _error_response(
                401, "unauthorized", "the token is invalid, expired or revoked; log in again or ask an admin for a "
                "new one", headers=_www_authenticate("invalid_token"),
            )
        state["principal"] = principal
        if via == "cookie" and scope["method"] in MUTATING and headers.get(CONSOLE_HEADER) != "1":
            state["audit_detail"] = "cookie without the console header"
            return _error_response(
                403, "forbidden", f"a change made with the console's session cookie must carry the header "
                f"{CONSOLE_HEADER}: 1 (cross-site request defence); API clients send 'Authorization: Bearer TOKEN'",
            )
        if not principal.has(role):
            state["audit_detail"] = f"needs role {role}"
            return _error_response(
                403, "forbidden", f"this needs role {role} or higher; account {principal.username!r} has role "
                f"{principal.role}",
            )
        return None

    async def _audit(
        self, scope: Scope, state: dict[str, Any], status: int, action: str | None, params: dict[str, Any]
    ) -> None:
        principal: Principal | None = state.get("principal")
        target = state.get("audit_target")
        if target is None and params:
            target = str(next(iter(params.values())))
        client = scope.get("client")
        try:
            await run_in_threadpool(
                self.cloud.auth.record,
                actor=principal.username if principal else state.get("audit_actor") or "anonymous",
                role=principal.role if principal else state.get("audit_role"),
                token_id=principal.token_id if principal else state.get("audit_token_id"),
                method=scope["method"],
                path=scope["path"],
                action=action,
                target=target,
                status=status,
                client=client[0] if client else None,
                detail=state.get("audit_detail"),
            )
        except Exception:
            log.exception("writing the audit entry of %s %s (status %d) failed", scope["method"], scope["path"], status)


# -- the app ------------------------------------------------------------------------------------------


def create_app(state: CloudState) -> FastAPI:
    app = FastAPI(
        title="CWSNet cloud",
        version=API_VERSION,
        description=(
            "REST API of the CWSNet cloud tier: the device registry and its latest status, "
            "telemetry, events and tasks, plus a live change stream (Server-Sent Events), operator "
            "accounts, API tokens and the audit log. "
            "Every error is `{\"error\": {\"code\", \"message\", \"details\"}}`.\n\n"
            "**Authentication.** Every `/api/v1` route but `POST /api/v1/auth/login`, and `/metrics`, needs "
            "`Authorization: Bearer TOKEN` with an API token (made by an admin: `cwsnet operator token`, "
            "`POST /api/v1/tokens`) or a session token from `POST /api/v1/auth/login`. The login also sets "
            f"the HttpOnly cookie `{COOKIE_NAME}` the console uses; a change authenticated by that cookie "
            f"must carry the header `{CONSOLE_HEADER}: 1`. No or a bad token: 401; a role too low: 403 "
            "naming the role needed (each route's `x-required-role`). Roles: `viewer` reads everything, "
            "`operator` also creates and cancels tasks, `admin` also manages accounts and tokens and reads "
            "the audit log, where every change (allowed or refused) and every failed login is recorded. "
            "On top of the roles, the `access` policies decide per node: reading a node's record, telemetry "
            "or tasks is action `read` on its topics, creating or cancelling a task is `command` on "
            "`cws/v1/{site}/{node}/task/cmd`; a denial is a 403 naming the rule. "
            "`/healthz` and the console page `/` are open."
        ),
    )
    app.state.cloud = state
    store = state.store
    access = app.state.access = AccessCheck(state)
    auth = state.auth
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    login_slots = asyncio.Semaphore(LOGIN_CONCURRENCY)
    bearer = HTTPBearer(
        auto_error=False,
        scheme_name="bearerToken",
        description="An API token or a login session token: `Authorization: Bearer TOKEN`.",
    )
    session_cookie = APIKeyCookie(
        name=COOKIE_NAME,
        auto_error=False,
        scheme_name="consoleSession",
        description=f"The console's session cookie (HttpOnly, SameSite=Strict), set by POST /api/v1/auth/login. "
        f"Requests that change something must also carry `{CONSOLE_HEADER}: 1`.",
    )

    def needs(role: str, responses: dict[int | str, Any] | None = None) -> dict[str, Any]:
        """Route arguments for a route that needs ``role``: what _Guard enforces, and its OpenAPI."""
        return {
            "dependencies": [Security(bearer), Security(session_cookie)],
            "openapi_extra": {"x-required-role": role},
            "responses": {**(responses or {}), **_AUTH_ERRORS},
        }

    def principal_of(request: Request) -> Principal:
        principal = getattr(request.state, "principal", None)
        if principal is None:  # _Guard lets no request through to a guarded route without one
            raise ApiError(401, "not authenticated", headers=_www_authenticate())
        return principal

    def authorize(request: Request, action: str, topic: str, node: str | None) -> None:
        """403 naming the rule unless the access policies let the caller ``action`` ``topic``."""
        principal = principal_of(request)
        d = access.decide(principal.username, action, topic, node)
        if d.allowed:
            return
        why = f"denied by {d.rule}" if d.rule else "no access rule allows it"
        message = f"account {principal.username!r} may not {action} {topic}: {why}"
        request.state.audit_detail = message
        raise ApiError(403, message, details=[{"rule": d.rule, "source": d.decided_by.source if d.decided_by else None,
                                               "explain": d.explain()}])

    def node_topic(node: Node | None, node_id: str, channel: str) -> str:
        site = _one_level(node.site) if node is not None else "+"
        return f"cws/v1/{site}/{_one_level(node_id)}/{channel}"

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(AuthError)
    async def _auth_error(_request: Request, exc: AuthError) -> JSONResponse:
        return _error_response(exc.status, _CODES.get(exc.status, "error"), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = _describe_validation(list(exc.errors()))
        return _error_response(422, "invalid_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, "error")
        return _error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc, exc_info=exc)
        return _error_response(500, "internal", "internal error; see the cloud's log")

    # -- health and metrics -------------------------------------------------------------------

    @app.get(
        "/healthz",
        response_model=Health,
        summary="Health check",
        description="Liveness and readiness: `200` with db ok; `503` when the database does not answer.",
        responses={503: {"model": Health, "description": "the database does not answer"}},
        tags=["operations"],
    )
    def healthz() -> Any:
        broker = "up" if state.broker_connected() else "down"
        try:
            store.ping()
        except Exception as exc:
            log.error("health: database check failed: %s", exc)
            return JSONResponse({"status": "error", "broker": broker, "db": "error"}, status_code=503)
        return {"status": "ok", "broker": broker, "db": "ok"}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        description=(
            "The cloud's metrics in the Prometheus text exposition format 0.0.4. Needs a token (Prometheus: "
            "`authorization: {type: Bearer, credentials_file: ...}` with a viewer's API token)."
        ),
        response_class=Response,
        **needs("viewer", {200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}}),
        tags=["operations"],
    )
    def metrics() -> Response:
        return Response(content=state.metrics.render(), media_type=CONTENT_TYPE)

    # -- registry ------------------------------------------------------------------------------

    def _page(role: str, limit: int, offset: int, site: str | None, online: bool | None) -> dict[str, Any]:
        page = store.list_nodes(role=role, site=site, online=online, limit=limit, offset=offset)
        return {"items": [node_view(n) for n in page.items], "total": page.total, "limit": limit, "offset": offset}

    def _one(role: str, node_id: str, request: Request, channel: str = "status") -> dict[str, Any]:
        node = store.get_node(node_id)
        if node is None or node.role != role:
            raise ApiError(404, f"{role} {node_id!r} is not registered")
        authorize(request, "read", node_topic(node, node_id, channel), node_id)
        return node_view(node)

    limit_q = Query(100, ge=1, le=1000, description="page size (1-1000)")
    offset_q = Query(0, ge=0, description="number of items to skip")
    site_q = Query(None, description="only nodes of this site")
    online_q = Query(None, description="only nodes that are (true) or are not (false) online")

    @app.get(
        "/api/v1/devices",
        response_model=NodePage,
        summary="List devices",
        description="Registered devices with their latest status, ordered by id, paged.",
        **needs("viewer", _ERRORS),
        tags=["registry"],
    )
    def list_devices(
        limit: int = limit_q, offset: int = offset_q, site: str | None = site_q, online: bool | None = online_q
    ) -> Any:
        return _page("device", limit, offset, site, online)

    @app.get(
        "/api/v1/devices/{device_id}",
        response_model=NodeOut,
        summary="Show a device",
        description="One device with its latest status; 404 if no device has this id.",
        **needs("viewer", _NOT_FOUND),
        tags=["registry"],
    )
    def get_device(device_id: str, request: Request) -> Any:
        return _one("device", device_id, request)

    @app.get(
        "/api/v1/devices/{device_id}/telemetry",
        response_model=TelemetryPage,
        summary="Device telemetry",
        description="The device's latest telemetry readings, newest first, optionally of one stream.",
        **needs("viewer", _NOT_FOUND),
        tags=["telemetry"],
    )
    def device_telemetry(
        device_id: str,
        limit: int = Query(100, ge=1, le=10000, description="number of readings (1-10000)"),
        stream: str | None = Query(None, description="only readings of this stream"),
        *,
        request: Request,
    ) -> Any:
        _one("device", device_id, request, f"telemetry/{_one_level(stream)}")
        return {"items": [telemetry_view(r) for r in store.telemetry(device_id, limit=limit, stream=stream)]}

    @app.get(
        "/api/v1/gateways",
        response_model=NodePage,
        summary="List gateways",
        description="Registered site gateways with their latest status (devices, queue, uplink), paged.",
        **needs("viewer", _ERRORS),
        tags=["registry"],
    )
    def list_gateways(
        limit: int = limit_q, offset: int = offset_q, site: str | None = site_q, online: bool | None = online_q
    ) -> Any:
        return _page("gateway", limit, offset, site, online)

    @app.get(
        "/api/v1/gateways/{gateway_id}",
        response_model=NodeOut,
        summary="Show a gateway",
        description="One gateway with its latest status; 404 if no gateway has this id.",
        **needs("viewer", _NOT_FOUND),
        tags=["registry"],
    )
    def get_gateway(gateway_id: str, request: Request) -> Any:
        return _one("gateway", gateway_id, request)

    # -- events ------------------------------------------------------------------------------------

    @app.get(
        "/api/v1/events",
        response_model=EventPage,
        summary="List events",
        description="Events (node online/offline, rejected messages, device events), newest first, paged.",
        **needs("viewer", _ERRORS),
        tags=["events"],
    )
    def list_events(
        limit: int = limit_q,
        offset: int = offset_q,
        since: int | None = Query(None, ge=0, description="only events at or after this time (ms since the epoch)"),
    ) -> Any:
        page = store.list_events(limit=limit, offset=offset, since=since)
        return {"items": [event_view(e) for e in page.items], "total": page.total, "limit": limit, "offset": offset}

    # -- tasks ---------------------------------------------------------------------------------------

    @app.post(
        "/api/v1/tasks",
        status_code=201,
        response_model=TaskCreated,
        summary="Run a task (on a device, or where the scheduler places it)",
        description=(
            "**Scheduled** (no `target`): the scheduler places the task on a device or gateway of `site` or on "
            "the cloud's workers, as the offload policy says, leases it, moves it when its executor dies and "
            "explains every decision in the task's `placement` (docs/tasks.md). Args too big for one message "
            "(with room for a checkpoint) go in parts, so the task gets the requirement `capabilities: [parts]`. "
            "422 if no executor of the site or the cloud offers the handler (or, for such args, takes parts), "
            "404 if the site has no node, 503 if the scheduler is not running. "
            "**Direct** (with `target`): queue a task for that device. The cloud seals a task command to the device and publishes it "
            "on `cws/v1/{site}/{target}/task/cmd`. A device behind a gateway may be offline: its gateway "
            "holds the command durably and delivers it when the device connects, even if the cloud is "
            "unreachable by then. A device without a gateway gets it when it next connects (its birth); "
            "until then the task stays queued here. With `timeout`, a task not finished by then expires "
            "(`state: expired` with the reason in `error`; a held command is dropped at that moment and never "
            "runs; a task still running has its late result ignored). 404 if the target is not "
            "registered, 422 if it is not a device, 413 if the args are over 16 MiB encoded, if the command would "
            f"not fit in one message ({MAX_TASK_BODY} bytes of CBOR-encoded task command) and the device does not "
            "take args in parts (its status lists no `parts` capability: the CPython agent takes them, the ESP32 "
            "firmware does not), or over the device's own limit (the `max_payload` "
            "its agent announces: the ESP32 firmware takes 8 KB by default). Bigger args travel in parts, and "
            "so does a result too big for one message (protocol §3, \"Parts\"). Either kind: an `idempotency_key` "
            "seen before answers 200 with the existing task's id and `duplicate: true` (409 if that task had "
            "another handler or other args); keys starting with `schedule:` are the schedules' own (422)."
        ),
        **needs("operator", {
            409: {"model": ErrorResponse, "description": "the idempotency key was used for a different task"},
            413: {"model": ErrorResponse, "description": "the args are over 16 MiB encoded, or too large for one "
                                                         "message for a device that takes no parts (or over its "
                                                         "max_payload)"},
            503: {"model": ErrorResponse, "description": "scheduled: the scheduler is not running"},
            **_NOT_FOUND,
        }),
        tags=["tasks"],
    )
    def create_task(req: TaskRequest, request: Request, response: Response) -> Any:
        for own, whose in (("schedule:", "the schedules'"), ("site:", "the site tasks'")):
            if (req.idempotency_key or "").startswith(own):
                raise ApiError(422, f"body.idempotency_key: keys starting with {own!r} are {whose} own",
                               code="invalid_request")
        task_id, duplicate = submit_task(req, request)
        if duplicate:
            known = store.get_task(task_id)
            if known is not None and (known.handler != req.handler or known.args != req.args):
                raise ApiError(409, f"body.idempotency_key: {req.idempotency_key!r} was used for task {task_id} "
                                    f"({known.handler} with other args); use a new key for a different task")
        request.state.audit_target = task_id
        response.headers["Location"] = f"/api/v1/tasks/{task_id}"
        if duplicate:
            response.status_code = 200
        return {"id": task_id, "state": "queued", "duplicate": duplicate}

    def _args_ok(req: TaskRequest, where: str) -> None:
        try:
            check_storable(req.args, f"{where}.args")
        except BodyError as exc:
            raise ApiError(
                422, f"{exc} (args must be JSON without NaN or Infinity, integers 64-bit)", code="invalid_request"
            ) from None

    def _parted_ok(req: TaskRequest, where: str, size: int, takes: bool, target: str) -> None:
        """413 unless ``req.args``, too big for one message, can go in parts (protocol §3, "Parts")."""
        args_size = len(cbor2.dumps(req.args))
        if args_size > parts.MAX_PARTED:
            raise ApiError(413, f"{where}.args: {args_size} bytes encoded; task args take at most "
                                f"{parts.MAX_PARTED} (in parts of {parts.PART_BYTES})")
        if not takes:
            raise ApiError(413, f"{where}.args: the task command would be {size} bytes; at most {MAX_TASK_BODY} "
                                f"fit in one message (envelope limit {MAX_PAYLOAD} bytes), and {target} does not "
                                f"take args in parts (its status lists no {parts.CAPABILITY!r} capability)")

    def submit_task(req: TaskRequest, request: Request | None, where: str = "body") -> tuple[str, bool]:
        """Queue a task (direct with a target, else scheduled): (id, duplicate). ``request``: the API call
        to authorize (None: a schedule's run, authorized when the schedule was made)."""
        if req.target is None:
            return submit_scheduled(req, request, where)
        node = store.get_node(req.target)
        if node is None:
            raise ApiError(404, f"target {req.target!r} is not a registered device")
        if node.role != "device":
            raise ApiError(
                422,
                f"target {req.target!r} is a {node.role}, not a device: only devices run tasks",
                code="invalid_request",
            )
        if request is not None:
            authorize(request, "command", node_topic(node, req.target, "task/cmd"), req.target)
        if req.idempotency_key is not None and (known := store.task_by_key(req.idempotency_key)) is not None:
            return known.id, True
        _args_ok(req, where)
        deadline = None if req.timeout is None else int((state.clock() + req.timeout) * 1000)
        task_id = uuid.uuid4().hex
        # the body exactly as TaskDispatcher.dispatch seals it
        cmd = {"task_id": task_id, "handler": req.handler, "args": req.args, "deadline": deadline, "parts": True}
        size = len(cbor2.dumps(cmd))
        if size > MAX_TASK_BODY:  # args that do not fit one message go in parts, to a device that takes them
            takes = parts.CAPABILITY in ((node.last_status or {}).get("capabilities") or ())
            _parted_ok(req, where, size, takes, f"device {req.target!r}")
            size = parts.PART_BYTES  # (each message of it is at most about a part)
        # a small device (the ESP32 firmware) announces the largest message it can take in its birth
        limit = (node.agent or {}).get("max_payload")
        if isinstance(limit, int) and not isinstance(limit, bool) and size + ENVELOPE_HEADROOM > limit:
            raise ApiError(
                413,
                f"{where}.args: the task command would be about {size + ENVELOPE_HEADROOM} bytes sealed; device "
                f"{req.target!r} takes messages of at most {limit} bytes (its agent's max_payload)",
            )
        try:
            task = store.create_task(target=req.target, handler=req.handler, args=req.args, deadline=deadline,
                                     task_id=task_id, now=int(state.clock() * 1000),
                                     idempotency_key=req.idempotency_key)
        except sqlite3.IntegrityError:  # the same key, submitted at the same moment by another caller
            known = store.task_by_key(req.idempotency_key or "")
            if known is None:
                raise
            return known.id, True
        state.metrics.tasks.labels(state="queued").inc()
        state.fanout.publish(change("task", task_view(task)))
        if state.dispatcher is not None:
            state.dispatcher.request(task.id)
        log.info("task %s queued: %s on %s", task.id, task.handler, task.target)
        return task.id, False

    def submit_scheduled(req: TaskRequest, request: Request | None, where: str) -> tuple[str, bool]:
        svc = state.tasks
        if svc is None:
            raise ApiError(503, "the task scheduler is not running", code="unavailable")
        if req.site is not None and not store.list_nodes(site=req.site, limit=1).items:
            raise ApiError(404, f"site {req.site!r} has no registered node")
        if request is not None:
            authorize(request, "command", f"cws/v1/{_one_level(req.site or 'cloud')}/_scheduler/task/cmd", None)
        _args_ok(req, where)
        cmd = {"task_id": "0" * 32, "handler": req.handler, "args": req.args, "deadline": 2**62, "attempt": 1,
               "lease": 5.0, "checkpoint": None, "parts": True}
        size = len(cbor2.dumps(cmd))
        # a re-assignment carries the task's last checkpoint too: room is kept for the largest one; args
        # bigger than that go in parts, so only an executor that takes parts is offered the task
        requirements = req.requirements.model_dump()
        if size + MAX_CHECKPOINT > MAX_TASK_BODY:
            _parted_ok(req, where, size, True, "")
            requirements["capabilities"] = sorted({*(requirements.get("capabilities") or ()), parts.CAPABILITY})
            site = req.site or ""
            if not any(parts.CAPABILITY in ex["capabilities"] for ex in svc.executors_threadsafe()
                       if ex["tier"] == "cloud" or (ex["site"] or "") == site):
                raise ApiError(422, f"{where}.args: {size} bytes must go in parts, and no executor of "
                                    f"{'site ' + repr(site) if site else 'the cloud'} takes args in parts (none lists "
                                    f"the {parts.CAPABILITY!r} capability: the ESP32 firmware does not, the CPython "
                                    "agent, the gateway and the cloud's workers do)", code="invalid_request")
        spec = {"handler": req.handler, "args": req.args, "site": req.site or "", "origin": req.origin or "",
                "origin_role": "app" if req.origin is None else (getattr(store.get_node(req.origin), "role", None)
                                                                 or "app"),
                "data_class": req.data_class, "input_bytes": size, "priority": req.priority,
                "replicas": req.replicas, "mode": req.mode, "max_attempts": req.max_attempts,
                "requirements": requirements, "idempotency_key": req.idempotency_key,
                "timeout": req.timeout}
        try:
            task_id, duplicate = svc.submit_threadsafe(spec)
        except ValueError as exc:
            raise ApiError(422, f"{where}: {exc}", code="invalid_request") from None
        log.info("scheduled task %s %s: %s (site %s)", task_id, "already known" if duplicate else "queued",
                 req.handler, req.site or "-")
        return task_id, duplicate

    state.submit_task = submit_task

    def _task_out(task: Task, whole: bool = True) -> dict[str, Any]:
        """``task_view`` and the origin of a site task (the device that submitted it)."""
        return {"origin": task.origin, **task_view(task, whole)}

    @app.get(
        "/api/v1/tasks",
        response_model=TaskPage,
        summary="List tasks",
        description="Tasks, newest first, optionally filtered by state, target or kind (`direct`, `scheduled`, "
                    "`site`: the tasks devices submitted to their gateways, as the gateways report them), paged.",
        **needs("viewer", _ERRORS),
        tags=["tasks"],
    )
    def list_tasks(
        limit: int = limit_q,
        offset: int = offset_q,
        state_: str | None = Query(None, alias="state", description="only tasks in this state"),
        target: str | None = Query(None, description="only tasks for this node"),
        kind: Literal["direct", "scheduled", "site"] | None = Query(None, description="only tasks of this kind"),
    ) -> Any:
        page = store.list_tasks(limit=limit, offset=offset, state=state_, target=target, kind=kind, light=LIST_MAX)
        return {"items": [_task_out(t, whole=False) for t in page.items], "total": page.total, "limit": limit,
                "offset": offset}

    @app.get(
        "/api/v1/tasks/{task_id}",
        response_model=TaskOut,
        summary="Show a task",
        description="A task's state, result and error, and for a scheduled or site task where it runs and why "
                    "(`placement`; a site task's is its gateway's explanation); 404 if unknown.",
        **needs("viewer", _NOT_FOUND),
        tags=["tasks"],
    )
    def get_task(task_id: str, request: Request) -> Any:
        task = store.get_task(task_id)
        if task is None:
            raise ApiError(404, f"task {task_id!r} does not exist")
        if task.kind == "scheduled":
            authorize(request, "read", f"cws/v1/{_one_level(task.site or 'cloud')}/_scheduler/task/result", None)
        elif task.kind == "site":  # the submitting device's task: read like that device's results
            origin = task.origin or "+"
            authorize(request, "read", f"cws/v1/{_one_level(task.site)}/{_one_level(origin)}/task/result",
                      task.origin)
        else:
            authorize(request, "read", node_topic(store.get_node(task.target), task.target, "task/result"),
                      task.target)
        return _task_out(task)

    @app.post(
        "/api/v1/tasks/{task_id}/cancel",
        response_model=TaskOut,
        summary="Cancel a task",
        description=(
            "A direct task: cancel it while it is still queued (409 if it already runs or finished; a command "
            "already published to the device cannot be recalled: its result, if any, is then ignored). A "
            "scheduled task: cancel it until it finishes; its executors are told to stop (409 once finished). "
            "A site task: its gateway owns it, so the cancel is sent to that gateway and the answer is 202 with "
            "the task as the cloud knows it now; it shows `cancelled` once the gateway reports it (409 once "
            "finished). A gateway whose uplink is down when the cancel is sent does not get it: cancel again."
        ),
        **needs("operator", {202: {"model": TaskOut, "description": "a site task: the cancel was sent to its "
                                                                   "gateway"},
                             409: {"model": ErrorResponse, "description": "the task is no longer queued (direct), "
                                                                          "or finished"},
                             **_NOT_FOUND}),
        tags=["tasks"],
    )
    def cancel_task(task_id: str, request: Request) -> Any:
        existing = store.get_task(task_id)
        if existing is not None and existing.kind == "site":
            gateway = (existing.sched or {}).get("gateway")
            origin = existing.origin or "+"
            authorize(request, "command", f"cws/v1/{_one_level(existing.site)}/{_one_level(origin)}/task/cmd",
                      existing.origin)
            if existing.state in ("succeeded", "failed", "cancelled", "expired"):
                raise ApiError(409, f"site task {task_id} is {existing.state}; it cannot be cancelled any more")
            if state.tasks is None or not isinstance(gateway, str):
                raise ApiError(503, f"site task {task_id}: its gateway is not known or the task service is not "
                                    "running", code="unavailable")
            state.tasks.cancel_site_threadsafe(gateway, task_id)
            log.info("cancel of site task %s sent to its gateway %s", task_id, gateway)
            return JSONResponse(status_code=202, content=jsonable_encoder(_task_out(existing)))
        if existing is not None and existing.kind == "scheduled":
            authorize(request, "command", f"cws/v1/{_one_level(existing.site or 'cloud')}/_scheduler/task/cmd", None)
            if state.tasks is None or not state.tasks.cancel_threadsafe(task_id):
                raise ApiError(409, f"task {task_id!r} is {existing.state}; it cannot be cancelled any more")
            task = store.get_task(task_id)
            assert task is not None
            return _task_out(task)
        if existing is not None:
            authorize(request, "command", node_topic(store.get_node(existing.target), existing.target, "task/cmd"),
                      existing.target)
        task, moved = store.update_task(
            task_id, "cancelled", error="cancelled by the operator", now=int(state.clock() * 1000)
        )
        if task is None:
            raise ApiError(404, f"task {task_id!r} does not exist")
        if not moved:
            raise ApiError(409, f"task {task_id!r} is {task.state}; only a queued task can be cancelled")
        state.metrics.tasks.labels(state="cancelled").inc()
        state.fanout.publish(change("task", task_view(task)))
        return _task_out(task)

    # -- live stream ------------------------------------------------------------------------------------


    # -- schedules ---------------------------------------------------------------------------------

    def _schedules() -> Any:
        if state.schedules is None:
            raise ApiError(503, "schedules are not running", code="unavailable")
        return state.schedules

    def _authorize_task(req: TaskRequest, request: Request) -> None:
        if req.target is None:
            authorize(request, "command", f"cws/v1/{_one_level(req.site or 'cloud')}/_scheduler/task/cmd", None)
        else:
            authorize(request, "command", node_topic(store.get_node(req.target), req.target, "task/cmd"), req.target)

    def _schedule_out(view: Any) -> dict[str, Any]:
        return view.as_dict()

    def _authorize_existing(schedule_id: str, request: Request) -> Any:
        """404 unless the schedule exists; 403 unless the caller may submit the task it submits now."""
        view = _schedules().get(schedule_id)
        if view is None:
            raise ApiError(404, f"schedule {schedule_id!r} does not exist")
        try:
            _authorize_task(TaskRequest.model_validate(view.spec.task), request)
        except ValueError:  # a spec stored before a validation rule changed: only an admin touches it
            if principal_of(request).role != "admin":
                raise ApiError(403, f"schedule {schedule_id!r} has a task this API no longer takes; "
                                    "only an admin may change it") from None
        return view

    @app.get(
        "/api/v1/schedules",
        response_model=list[ScheduleOut],
        summary="List schedules",
        description="Every schedule, with its next and last run, run count, misses and last error.",
        **needs("viewer", _ERRORS),
        tags=["schedules"],
    )
    def list_schedules() -> Any:
        return [_schedule_out(v) for v in _schedules().list()]

    @app.get(
        "/api/v1/schedules/{schedule_id}",
        response_model=ScheduleOut,
        summary="Show a schedule",
        description="One schedule; 404 if unknown.",
        **needs("viewer", _NOT_FOUND),
        tags=["schedules"],
    )
    def get_schedule(schedule_id: str) -> Any:
        view = _schedules().get(schedule_id)
        if view is None:
            raise ApiError(404, f"schedule {schedule_id!r} does not exist")
        return _schedule_out(view)

    @app.put(
        "/api/v1/schedules/{schedule_id}",
        response_model=ScheduleOut,
        summary="Create or replace a schedule",
        description=(
            "Submit `task` (the body of `POST /api/v1/tasks`) on a `cron` line (5 fields, in `timezone`) or "
            "`every` N seconds (or `30s`, `5m`, `1h`). Each run is submitted with the idempotency key "
            "`schedule:{id}:{scheduled time in ms}`, so a run is never submitted twice, also across a cloud "
            "restart. Misfire policy: runs missed while the cloud was down are coalesced into one, made on "
            "restart only if the latest missed time is within `misfire_grace` seconds (default 60), else "
            "skipped (counted in `missed`); never more than one run of a schedule at a time. Replacing a "
            "schedule re-times it from now and keeps its history."),
        **needs("operator", _ERRORS),
        tags=["schedules"],
    )
    def put_schedule(schedule_id: str, body: ScheduleIn, request: Request) -> Any:
        req = body.task
        if _schedules().get(schedule_id) is not None:  # replacing: the caller must own what it replaces
            _authorize_existing(schedule_id, request)
        _authorize_task(req, request)
        if (req.idempotency_key or "").startswith("schedule:"):
            raise ApiError(422, "body.task.idempotency_key: each run gets its own key (schedule:ID:TIME); "
                                "leave it out", code="invalid_request")
        _args_ok(req, "body.task")
        if req.target is None and state.tasks is not None:  # a handler nobody runs would fail at every run
            why = state.tasks.handler_problem_threadsafe(req.handler, req.site or "")
            if why is not None:
                raise ApiError(422, f"body.task.{why}", code="invalid_request")
        spec = body.model_dump(exclude_none=True) | {"id": schedule_id,
                                                   "task": req.model_dump(exclude_none=True)}
        try:
            view = _schedules().put(spec)
        except ValueError as exc:
            raise ApiError(422, f"body: {exc}", code="invalid_request") from None
        request.state.audit_target = schedule_id
        return _schedule_out(view)

    @app.delete(
        "/api/v1/schedules/{schedule_id}",
        status_code=204,
        summary="Delete a schedule",
        description="It fires no more (tasks it already submitted are left alone). 404 if unknown.",
        **needs("operator", _NOT_FOUND),
        tags=["schedules"],
    )
    def delete_schedule(schedule_id: str, request: Request) -> Response:
        _authorize_existing(schedule_id, request)
        if not _schedules().delete(schedule_id):
            raise ApiError(404, f"schedule {schedule_id!r} does not exist")
        request.state.audit_target = schedule_id
        return Response(status_code=204)

    @app.post(
        "/api/v1/schedules/{schedule_id}/{action}",
        response_model=ScheduleOut,
        summary="Pause or resume a schedule",
        description="`pause`: it fires no more until resumed; `resume`: it fires again from its next scheduled "
                    "time (no catch-up run for what it missed while paused). 404 if unknown.",
        **needs("operator", _NOT_FOUND),
        tags=["schedules"],
    )
    def pause_schedule(schedule_id: str, action: Literal["pause", "resume"], request: Request) -> Any:
        _authorize_existing(schedule_id, request)
        svc = _schedules()
        view = svc.pause(schedule_id) if action == "pause" else svc.resume(schedule_id)
        if view is None:
            raise ApiError(404, f"schedule {schedule_id!r} does not exist")
        request.state.audit_target = schedule_id
        return _schedule_out(view)

    # -- executors (scheduled work) ---------------------------------------------------------------

    @app.get(
        "/api/v1/nodes",
        response_model=list[ExecutorOut],
        summary="List executors",
        description=("The nodes the scheduler places work on (agents with task slots, gateways, the cloud's "
                     "workers): live or lost, draining, slots, the tasks each holds, load."),
        **needs("viewer", _ERRORS),
        tags=["nodes"],
    )
    def list_executors(request: Request) -> Any:
        if state.tasks is None:
            raise ApiError(503, "the task scheduler is not running", code="unavailable")
        return state.tasks.executors_threadsafe()

    def _drain(node_id: str, request: Request, drain: bool) -> Any:
        if state.tasks is None:
            raise ApiError(503, "the task scheduler is not running", code="unavailable")
        node = store.get_node(node_id)
        authorize(request, "command", node_topic(node, node_id, "task/cmd"), node_id)
        try:
            return state.tasks.drain_threadsafe(node_id, drain)
        except KeyError:
            raise ApiError(404, f"{node_id!r} is not an executor the scheduler knows (it has not reported task "
                                "slots in a status)") from None

    @app.post(
        "/api/v1/nodes/{node_id}/drain",
        response_model=ExecutorOut,
        summary="Drain an executor",
        description=("Give the node no new work and take back what it was given but has not started (re-queued "
                     "elsewhere, no attempt used); what it runs finishes. A `node.drained` event says when it "
                     "holds nothing. 404 if the scheduler does not know the node as an executor."),
        **needs("operator", _NOT_FOUND),
        tags=["nodes"],
    )
    def drain_node(node_id: str, request: Request) -> Any:
        return _drain(node_id, request, True)

    @app.post(
        "/api/v1/nodes/{node_id}/undrain",
        response_model=ExecutorOut,
        summary="Undrain an executor",
        description="The node takes new work again. 404 if the scheduler does not know it as an executor.",
        **needs("operator", _NOT_FOUND),
        tags=["nodes"],
    )
    def undrain_node(node_id: str, request: Request) -> Any:
        return _drain(node_id, request, False)

    @app.get(
        "/api/v1/stream",
        summary="Live changes (Server-Sent Events)",
        description=(
            "A `text/event-stream` of JSON changes as ingest stores them: "
            '`{"type": "device", "device": {...}}`, `{"type": "telemetry", "telemetry": {...}}`, '
            '`{"type": "task", "task": {...}}`, `{"type": "event", "event": {...}}`. '
            'A slow client loses its oldest changes and then gets `{"type": "resync"}`: reload from the REST API. '
            "The stream ends within a heartbeat (15 s) of its token being revoked or expiring."
        ),
        response_class=StreamingResponse,
        **needs("viewer", {200: {"content": {"text/event-stream": {}}, "description": "the event stream"}}),
        tags=["events"],
    )
    async def stream(request: Request) -> StreamingResponse:
        principal = principal_of(request)
        sub = state.fanout.subscribe()
        loop = asyncio.get_running_loop()

        async def events() -> Any:
            checked = loop.time()
            try:
                yield "retry: 3000\n: connected\n\n"
                while not sub.closed:
                    item = await sub.get(wait=state.heartbeat)
                    if loop.time() - checked >= state.heartbeat:  # a revoked or expired token ends the stream
                        checked = loop.time()
                        if not await run_in_threadpool(auth.token_active, principal.token_id):
                            break
                    if item is None:
                        if sub.closed or await request.is_disconnected():
                            break
                        yield ": ping\n\n"
                        continue
                    yield f"data: {json.dumps(item, separators=(',', ':'))}\n\n"
            finally:
                sub.close()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- sessions -------------------------------------------------------------------------------------

    @app.post(
        "/api/v1/auth/login",
        response_model=SessionOut,
        summary="Log in",
        description=(
            "Start a session with `username` and `password`, or with an API `token` (the console's "
            f"\"paste a token\"). Answers the session token (it expires after {SESSION_TTL / 3600:g} h, or "
            "when the API token it came from ends) and sets it as the HttpOnly, SameSite=Strict cookie "
            f"`{COOKIE_NAME}`, which the console (and its EventSource) uses. 401 for a wrong username, "
            "password or token (recorded in the audit log). After 5 failures for one username from one "
            "address, and 20 from one address, each further failure locks that out for 30 s, doubling up "
            "to 15 min: 429 with `Retry-After` meanwhile, whatever the password. Needs no token."
        ),
        responses={
            401: {"model": ErrorResponse, "description": "wrong username, password or token"},
            429: {"model": ErrorResponse, "description": "too many failed logins: wait `Retry-After` seconds"},
            **_ERRORS,
        },
        tags=["auth"],
    )
    async def login(req: LoginRequest, request: Request, response: Response) -> Any:
        client = request.client.host if request.client else "unknown"
        key = req.username if req.token is None else "\x00token"
        assert key is not None
        wait = state.throttle.begin(key, client)  # counts this attempt as failed until it succeeds
        if wait > 0:
            request.state.audit_detail = "locked out after repeated failures"
            raise ApiError(
                429, f"too many failed logins for this account from {client}; try again in {math.ceil(wait)} s",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        known: Account | None = None
        async with login_slots:
            if req.token is not None:
                by_token = await run_in_threadpool(auth.authenticate, req.token)
                username = None if by_token is None else by_token.username
                parent = None if by_token is None else by_token.token_id
            else:
                assert req.username is not None and req.password is not None
                known, account = await run_in_threadpool(
                    lambda: (auth.get_account(req.username), auth.verify_password(req.username, req.password))
                )
                username = None if account is None else account.username
                parent = None
                if known is not None:
                    request.state.audit_target = known.username
        if username is None:  # (already counted as failed by throttle.begin)
            if req.token is not None:
                request.state.audit_detail = "invalid, expired or revoked token"
            else:
                request.state.audit_detail = "wrong password" if known is not None else "unknown username"
                if known is not None:
                    log.warning("failed login for account %r from %s", known.username, client)
            raise ApiError(
                401,
                "wrong username or password" if req.token is None else "the token is invalid, expired or revoked",
                headers=_www_authenticate(),
            )
        state.throttle.succeeded(key, client)
        session, secret = await run_in_threadpool(
            lambda: auth.create_token(username, "console session", kind="session", ttl=state.session_ttl,
                                      parent=parent)
        )
        account_now = await run_in_threadpool(auth.get_account, username)
        assert account_now is not None and session.expires is not None
        request.state.audit_actor = account_now.username
        request.state.audit_role = account_now.role
        request.state.audit_token_id = session.id
        request.state.audit_target = account_now.username
        log.info("%s logged in from %s (session %s)", account_now.username, client, session.id)
        max_age = max(1, (session.expires - auth.now_ms()) // 1000)
        response.set_cookie(
            COOKIE_NAME, secret, max_age=max_age, path="/", httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )
        response.headers["Cache-Control"] = "no-store"
        return {"token": secret, "token_id": session.id, "expires": session.expires,
                "username": account_now.username, "role": account_now.role}

    @app.post(
        "/api/v1/auth/logout",
        status_code=204,
        response_class=Response,
        summary="Log out",
        description=(
            "End the session the request comes with (a session token or the console's cookie) and clear the "
            "cookie. With an API token this only clears the cookie: revoke API tokens with "
            "DELETE /api/v1/tokens/{id}."
        ),
        **needs("viewer"),
        tags=["auth"],
    )
    def logout(request: Request) -> Response:
        principal = principal_of(request)
        if principal.kind == "session":
            auth.revoke_token(principal.token_id)
            request.state.audit_target = principal.token_id
        answer = Response(status_code=204)
        answer.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict",
                             secure=request.url.scheme == "https")
        return answer

    @app.get(
        "/api/v1/auth/me",
        response_model=MeOut,
        summary="Who am I",
        description="The account and token the request is authenticated with.",
        **needs("viewer"),
        tags=["auth"],
    )
    def me(request: Request) -> Any:
        p = principal_of(request)
        return {"username": p.username, "role": p.role, "token_id": p.token_id, "token_name": p.token_name,
                "kind": p.kind, "expires": p.expires}

    # -- accounts ---------------------------------------------------------------------------------------

    _CONFLICT = {409: {"model": ErrorResponse, "description": "the name is taken, or the last admin would go"}}

    @app.get(
        "/api/v1/accounts",
        response_model=AccountPage,
        summary="List accounts",
        description="Operator accounts with their role and token use, ordered by name, paged.",
        **needs("admin", _ERRORS),
        tags=["accounts"],
    )
    def list_accounts(limit: int = limit_q, offset: int = offset_q) -> Any:
        page = auth.list_accounts(limit=limit, offset=offset)
        return {"items": [account_view(a) for a in page.items], "total": page.total, "limit": limit,
                "offset": offset}

    @app.post(
        "/api/v1/accounts",
        status_code=201,
        response_model=AccountOut,
        summary="Create an account",
        description=(
            "Create an operator account with a role and, optionally, a password (without one, it gets a "
            "random password nobody knows and logs in with API tokens: POST /api/v1/tokens). "
            "409 if the name is taken (names are case-insensitive)."
        ),
        **needs("admin", {**_CONFLICT, **_ERRORS}),
        tags=["accounts"],
    )
    def create_account(req: AccountCreate, request: Request, response: Response) -> Any:
        request.state.audit_target = req.username
        account = auth.create_account(req.username, req.role, req.password)
        response.headers["Location"] = f"/api/v1/accounts/{account.username}"
        log.info("account %r (role %s) created by %s", account.username, account.role,
                 principal_of(request).username)
        return account_view(account)

    @app.get(
        "/api/v1/accounts/{username}",
        response_model=AccountOut,
        summary="Show an account",
        description="One account; 404 if there is none of that name.",
        **needs("admin", _NOT_FOUND),
        tags=["accounts"],
    )
    def get_account(username: str) -> Any:
        account = auth.get_account(username)
        if account is None:
            raise ApiError(404, f"account {username!r} does not exist")
        return account_view(account)

    @app.patch(
        "/api/v1/accounts/{username}",
        response_model=AccountOut,
        summary="Change an account's role or password",
        description=(
            "Set a new role, a new password, or both. A new role applies to the account's next request; "
            "a new password ends its console sessions (its API tokens stay valid). 409 when it would leave "
            "no admin."
        ),
        **needs("admin", {**_CONFLICT, **_NOT_FOUND}),
        tags=["accounts"],
    )
    def update_account(username: str, req: AccountUpdate, request: Request) -> Any:
        if auth.get_account(username) is None:
            raise ApiError(404, f"account {username!r} does not exist")
        account = None
        if req.role is not None:
            account = auth.set_role(username, req.role)
        if req.password is not None:
            account = auth.set_password(username, req.password)
        assert account is not None
        changed = " and ".join(w for w, v in (("role", req.role), ("password", req.password)) if v is not None)
        request.state.audit_detail = f"changed {changed}"
        log.info("account %r: %s changed by %s", account.username, changed, principal_of(request).username)
        return account_view(account)

    @app.delete(
        "/api/v1/accounts/{username}",
        status_code=204,
        response_class=Response,
        summary="Delete an account",
        description="Delete an account and all its tokens and sessions. 409 for the last admin.",
        **needs("admin", {**_CONFLICT, **_NOT_FOUND}),
        tags=["accounts"],
    )
    def delete_account(username: str, request: Request) -> Response:
        name = auth.delete_account(username)
        log.info("account %r deleted by %s", name, principal_of(request).username)
        return Response(status_code=204)

    # -- tokens -----------------------------------------------------------------------------------------

    @app.get(
        "/api/v1/tokens",
        response_model=TokenPage,
        summary="List tokens",
        description="API tokens (or login sessions), newest first, never the tokens themselves.",
        **needs("admin", _ERRORS),
        tags=["tokens"],
    )
    def list_tokens(
        limit: int = limit_q,
        offset: int = offset_q,
        account: str | None = Query(None, description="only tokens of this account"),
        kind: Literal["api", "session", "all"] = Query("api", description="api tokens, login sessions, or all"),
        active: bool = Query(False, description="only tokens neither revoked nor expired"),
    ) -> Any:
        page = auth.list_tokens(account=account, kind=None if kind == "all" else kind, active_only=active,
                                limit=limit, offset=offset)
        now = auth.now_ms()
        return {"items": [token_view(t, now) for t in page.items], "total": page.total, "limit": limit,
                "offset": offset}

    @app.post(
        "/api/v1/tokens",
        status_code=201,
        response_model=TokenCreated,
        summary="Create an API token",
        description=(
            "A new API token for an account, optionally expiring after `expires_days`. The answer holds the "
            "token itself, once: the cloud keeps only its SHA-256. 404 if the account does not exist."
        ),
        **needs("admin", _NOT_FOUND),
        tags=["tokens"],
    )
    def create_token(req: TokenCreate, request: Request, response: Response) -> Any:
        ttl = None if req.expires_days is None else req.expires_days * 86400
        token, secret = auth.create_token(req.account, req.name, ttl=ttl)
        request.state.audit_target = token.id
        response.headers["Location"] = f"/api/v1/tokens/{token.id}"
        response.headers["Cache-Control"] = "no-store"
        log.info("API token %s (%r) for %r created by %s", token.id, token.name, token.account,
                 principal_of(request).username)
        return {**token_view(token, auth.now_ms()), "token": secret}

    @app.delete(
        "/api/v1/tokens/{token_id}",
        status_code=204,
        response_class=Response,
        summary="Revoke a token",
        description=(
            "Revoke an API token or a login session by its id: requests with it get 401 from now on, "
            "and so do the sessions logged in with it. Revoking a revoked token changes nothing."
        ),
        **needs("admin", _NOT_FOUND),
        tags=["tokens"],
    )
    def revoke_token(token_id: str, request: Request) -> Response:
        token, moved = auth.revoke_token(token_id)
        if moved:
            log.info("token %s (%r of %r) revoked by %s", token.id, token.name, token.account,
                     principal_of(request).username)
        return Response(status_code=204)

    # -- policies ---------------------------------------------------------------------------------------

    @app.get(
        "/api/v1/policies",
        summary="The active policy set",
        description=(
            "The policies being applied (docs/policies.md): each with its kind, name, mode (enforce or audit), "
            "source file and rules, the set's digest and when it was loaded; and `refused`: the problems of "
            "the last change to the policy files that was refused (`file:line:col: field: message`), while the "
            "previous set stays active. Policy files are reloaded within a second of a change."
        ),
        **needs("viewer", _ERRORS),
        tags=["policies"],
    )
    def list_policies() -> Any:
        w = state.policies
        if w is None or w.active is None:
            return {"digest": None, "loaded_at": None, "policies": [], "refused": w.refused if w else None}
        return {
            "digest": w.active.digest,
            "loaded_at": int(w.loaded_at * 1000) if w.loaded_at else None,
            "policies": [{"kind": lp.policy.kind, "name": lp.policy.name, "mode": lp.policy.mode,
                          "description": lp.policy.description, "source": lp.source,
                          "rules": [r.model_dump(exclude_none=True) for r in lp.policy.rules]}
                         for lp in w.active.policies],
            "refused": w.refused,
        }

    @app.post(
        "/api/v1/policies/check",
        summary="Check policy files before installing them",
        description=(
            "Validate policy files sent in the body together with the shipped defaults, exactly as the "
            "cloud would load them, without installing anything. 200 with `ok` and, if not ok, every problem "
            "as `file:line:col: field: message` (file names as sent)."
        ),
        **needs("operator", _ERRORS),
        tags=["policies"],
    )
    def check_policies(req: PolicyCheckRequest) -> Any:
        import tempfile

        from cwsnet.cli_policy import shipped_policies
        from cwsnet.policy import PolicyError, load_policies

        with tempfile.TemporaryDirectory(prefix="cwsnet-policy-check-") as tmp:
            folder = Path(tmp)
            for name, text in req.files.items():
                if not name or "/" in name or name.startswith(".") or not name.endswith((".yaml", ".yml")):
                    raise ApiError(422, f"body.files: {name!r} must be a plain file name ending in .yaml",
                                   code="invalid_request")
                (folder / name).write_text(text)
            try:
                pset = load_policies([shipped_policies(), folder])
            except PolicyError as exc:
                return {"ok": False, "problems": [p.replace(str(folder) + "/", "") for p in exc.problems],
                        "policies": []}
        return {"ok": True, "problems": [], "policies": [lp.policy.name for lp in pset.policies]}

    # -- audit ------------------------------------------------------------------------------------------

    @app.get(
        "/api/v1/audit",
        response_model=AuditPage,
        summary="Audit log",
        description=(
            "Every call that changes something (POST, PUT, PATCH, DELETE), allowed or refused, and every "
            "login attempt: who (account or anonymous, role, token id), what (method, path, operation, "
            "target), the answer's status and the client's address. Newest first, paged. Never holds a "
            "password or a token."
        ),
        **needs("admin", _ERRORS),
        tags=["audit"],
    )
    def list_audit(
        limit: int = limit_q,
        offset: int = offset_q,
        actor: str | None = Query(None, description="only entries of this actor (an account name or anonymous)"),
        since: int | None = Query(None, ge=0, description="only entries at or after this time (ms since the epoch)"),
        refused: bool = Query(False, description="only refused or failed calls (status 400 and above)"),
    ) -> Any:
        page = auth.list_audit(limit=limit, offset=offset, actor=actor, since=since,
                               status_min=400 if refused else None)
        return {"items": [audit_view(e) for e in page.items], "total": page.total, "limit": limit,
                "offset": offset}

    # -- console ----------------------------------------------------------------------------------------

    @app.get(
        "/",
        response_class=HTMLResponse,
        summary="Web console",
        description=(
            "The operator console: one self-contained HTML page (no external resources). Served without "
            "a token: it asks for a username and password (or an API token) and then uses the API."
        ),
        tags=["console"],
    )
    async def console() -> HTMLResponse:
        return HTMLResponse(index_html)

    for route in app.routes:
        role = (route.openapi_extra or {}).get("x-required-role") if isinstance(route, APIRoute) else None
        if role is not None and route.description:
            route.description += f" Needs role `{role}` or higher."
    app.add_middleware(_Guard, cloud=state, routes=lambda: app.router.routes)
    return app
