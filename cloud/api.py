"""The cloud's REST API and web console: ``create_app(state) -> FastAPI``.

Every route and every response field carries a description, so ``/openapi.json`` documents the
API completely. Every error, including validation errors and unknown routes, has one shape::

    {"error": {"code": "not_found" | "invalid_request" | ..., "message": "...", "details": [...]}}

Routes that touch the store are plain ``def`` functions: FastAPI runs them in its thread pool,
so a slow commit never stalls the event loop that also carries MQTT.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import cbor2
from fastapi import FastAPI, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud.fanout import Fanout
from cloud.ingest import BodyError, check_storable
from cloud.metrics import CONTENT_TYPE, CloudMetrics
from cloud.store import Store
from cloud.views import change, event_view, node_view, task_view, telemetry_view
from cwsnet.envelope import MAX_PAYLOAD

log = logging.getLogger("cwsnet.cloud.api")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
STATIC_DIR = Path(__file__).parent / "static"
API_VERSION = "1"
#: room the header, the sealed part's topic and hash, the nonce and the box tag take in a task command
ENVELOPE_HEADROOM = 1024
#: largest CBOR-encoded task_cmd body that still fits one envelope (cwsnet.envelope.MAX_PAYLOAD)
MAX_TASK_BODY = MAX_PAYLOAD - ENVELOPE_HEADROOM


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
    broker_connected: Callable[[], bool] = lambda: False
    clock: Callable[[], float] = time.time
    heartbeat: float = 15.0


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
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.details = details


def _error_response(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    parts, details = [], []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        msg = msg[:1].lower() + msg[1:]
        parts.append(f"{loc}: {msg}" if loc else msg)
        details.append({"loc": list(err.get("loc", ())), "msg": msg, "type": err.get("type")})
    return "; ".join(parts) or "invalid request", jsonable_encoder(details)


# -- models ------------------------------------------------------------------------------------------


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class TaskRequest(ApiModel):
    target: str = Field(
        pattern=NAME_PATTERN, description="id of the registered device to run the task (gateways run no tasks)"
    )
    handler: str = Field(pattern=NAME_PATTERN, description="task handler name, e.g. echo, sha256, sleep")
    args: dict[str, Any] = Field(default_factory=dict, description="arguments passed to the handler")
    timeout: float | None = Field(
        None, gt=0, le=30 * 86400, description="seconds from now after which the task expires if not run"
    )


class TaskCreated(ApiModel):
    id: str = Field(description="the new task's id")
    state: Literal["queued"] = Field(
        description="always queued: sent at once when the device's gateway can hold it, else when the device is online"
    )


class TaskOut(ApiModel):
    id: str = Field(description="task id")
    target: str = Field(description="node that runs it")
    handler: str = Field(description="handler name")
    args: dict[str, Any] = Field(description="handler arguments")
    state: str = Field(description="queued, running, succeeded, failed, expired or cancelled")
    result: Any = Field(description="handler result (map) once succeeded, else null")
    error: str | None = Field(description="why it failed or expired, else null")
    created: int = Field(description="ms since the epoch")
    updated: int = Field(description="ms since the epoch of the last state change")
    started: int | None = Field(None, description="when the node started it (node clock), ms")
    finished: int | None = Field(None, description="when the node finished it (node clock), ms")
    deadline: int | None = Field(None, description="ms since the epoch after which it expires; null for none")
    dispatched: int | None = Field(None, description="when the command was last published to the node, ms")
    attempts: int = Field(0, description="how many times the command was published")


class TaskPage(ApiModel):
    items: list[TaskOut] = Field(description="tasks, newest first")
    total: int = Field(description="number of tasks matching the filters")
    limit: int = Field(description="page size used")
    offset: int = Field(description="offset used")


_ERRORS = {
    422: {"model": ErrorResponse, "description": "invalid request: a parameter or body field is wrong"},
}
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such object"}, **_ERRORS}


# -- the app ------------------------------------------------------------------------------------------


def create_app(state: CloudState) -> FastAPI:
    app = FastAPI(
        title="CWSNet cloud",
        version=API_VERSION,
        description=(
            "REST API of the CWSNet cloud tier: the device registry and its latest status, "
            "telemetry, events and tasks, plus a live change stream (Server-Sent Events). "
            "Every error is `{\"error\": {\"code\", \"message\", \"details\"}}`."
        ),
    )
    app.state.cloud = state
    store = state.store
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.details)

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
        description="The cloud's metrics in the Prometheus text exposition format 0.0.4.",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
        tags=["operations"],
    )
    def metrics() -> Response:
        return Response(content=state.metrics.render(), media_type=CONTENT_TYPE)

    # -- registry ------------------------------------------------------------------------------

    def _page(role: str, limit: int, offset: int, site: str | None, online: bool | None) -> dict[str, Any]:
        page = store.list_nodes(role=role, site=site, online=online, limit=limit, offset=offset)
        return {"items": [node_view(n) for n in page.items], "total": page.total, "limit": limit, "offset": offset}

    def _one(role: str, node_id: str) -> dict[str, Any]:
        node = store.get_node(node_id)
        if node is None or node.role != role:
            raise ApiError(404, f"{role} {node_id!r} is not registered")
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
        responses=_ERRORS,
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
        responses=_NOT_FOUND,
        tags=["registry"],
    )
    def get_device(device_id: str) -> Any:
        return _one("device", device_id)

    @app.get(
        "/api/v1/devices/{device_id}/telemetry",
        response_model=TelemetryPage,
        summary="Device telemetry",
        description="The device's latest telemetry readings, newest first, optionally of one stream.",
        responses=_NOT_FOUND,
        tags=["telemetry"],
    )
    def device_telemetry(
        device_id: str,
        limit: int = Query(100, ge=1, le=10000, description="number of readings (1-10000)"),
        stream: str | None = Query(None, description="only readings of this stream"),
    ) -> Any:
        _one("device", device_id)
        return {"items": [telemetry_view(r) for r in store.telemetry(device_id, limit=limit, stream=stream)]}

    @app.get(
        "/api/v1/gateways",
        response_model=NodePage,
        summary="List gateways",
        description="Registered site gateways with their latest status (devices, queue, uplink), paged.",
        responses=_ERRORS,
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
        responses=_NOT_FOUND,
        tags=["registry"],
    )
    def get_gateway(gateway_id: str) -> Any:
        return _one("gateway", gateway_id)

    # -- events ------------------------------------------------------------------------------------

    @app.get(
        "/api/v1/events",
        response_model=EventPage,
        summary="List events",
        description="Events (node online/offline, rejected messages, device events), newest first, paged.",
        responses=_ERRORS,
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
        summary="Run a task on a device",
        description=(
            "Queue a task for a device. The cloud seals a task command to the device and publishes it "
            "on `cws/v1/{site}/{target}/task/cmd`. A device behind a gateway may be offline: its gateway "
            "holds the command durably and delivers it when the device connects, even if the cloud is "
            "unreachable by then. A device without a gateway gets it when it next connects (its birth); "
            "until then the task stays queued here. With `timeout`, a task not finished by then expires "
            "(`state: expired` with the reason in `error`; a held command is dropped at that moment and never "
            "runs; a task still running has its late result ignored). 404 if the target is not "
            "registered, 422 if it is not a device, 413 if the command would not fit in one envelope "
            f"({MAX_TASK_BODY} bytes of CBOR-encoded task command)."
        ),
        responses={
            413: {"model": ErrorResponse, "description": "the args make the task command too large for one message"},
            **_NOT_FOUND,
        },
        tags=["tasks"],
    )
    def create_task(req: TaskRequest, response: Response) -> Any:
        node = store.get_node(req.target)
        if node is None:
            raise ApiError(404, f"target {req.target!r} is not a registered device")
        if node.role != "device":
            raise ApiError(
                422,
                f"target {req.target!r} is a {node.role}, not a device: only devices run tasks",
                code="invalid_request",
            )
        try:
            check_storable(req.args, "body.args")
        except BodyError as exc:
            raise ApiError(
                422, f"{exc} (args must be JSON without NaN or Infinity, integers 64-bit)", code="invalid_request"
            ) from None
        deadline = None if req.timeout is None else int((state.clock() + req.timeout) * 1000)
        task_id = uuid.uuid4().hex
        # the body exactly as TaskDispatcher.dispatch seals it
        cmd = {"task_id": task_id, "handler": req.handler, "args": req.args, "deadline": deadline}
        size = len(cbor2.dumps(cmd))
        if size > MAX_TASK_BODY:
            raise ApiError(
                413,
                f"body.args: the task command would be {size} bytes; at most {MAX_TASK_BODY} fit in one "
                f"message (envelope limit {MAX_PAYLOAD} bytes)",
            )
        task = store.create_task(
            target=req.target,
            handler=req.handler,
            args=req.args,
            deadline=deadline,
            task_id=task_id,
            now=int(state.clock() * 1000),
        )
        state.metrics.tasks.labels(state="queued").inc()
        state.fanout.publish(change("task", task_view(task)))
        if state.dispatcher is not None:
            state.dispatcher.request(task.id)
        response.headers["Location"] = f"/api/v1/tasks/{task.id}"
        log.info("task %s queued: %s on %s", task.id, task.handler, task.target)
        return {"id": task.id, "state": "queued"}

    @app.get(
        "/api/v1/tasks",
        response_model=TaskPage,
        summary="List tasks",
        description="Tasks, newest first, optionally filtered by state or target, paged.",
        responses=_ERRORS,
        tags=["tasks"],
    )
    def list_tasks(
        limit: int = limit_q,
        offset: int = offset_q,
        state_: str | None = Query(None, alias="state", description="only tasks in this state"),
        target: str | None = Query(None, description="only tasks for this node"),
    ) -> Any:
        page = store.list_tasks(limit=limit, offset=offset, state=state_, target=target)
        return {"items": [task_view(t) for t in page.items], "total": page.total, "limit": limit, "offset": offset}

    @app.get(
        "/api/v1/tasks/{task_id}",
        response_model=TaskOut,
        summary="Show a task",
        description="A task's state, result and error; 404 if unknown.",
        responses=_NOT_FOUND,
        tags=["tasks"],
    )
    def get_task(task_id: str) -> Any:
        task = store.get_task(task_id)
        if task is None:
            raise ApiError(404, f"task {task_id!r} does not exist")
        return task_view(task)

    @app.post(
        "/api/v1/tasks/{task_id}/cancel",
        response_model=TaskOut,
        summary="Cancel a queued task",
        description=(
            "Cancel a task that is still queued. 409 if it already runs or finished. A command already "
            "published to the device cannot be recalled: its result, if any, is then ignored."
        ),
        responses={409: {"model": ErrorResponse, "description": "the task is no longer queued"}, **_NOT_FOUND},
        tags=["tasks"],
    )
    def cancel_task(task_id: str) -> Any:
        task, moved = store.update_task(
            task_id, "cancelled", error="cancelled by the operator", now=int(state.clock() * 1000)
        )
        if task is None:
            raise ApiError(404, f"task {task_id!r} does not exist")
        if not moved:
            raise ApiError(409, f"task {task_id!r} is {task.state}; only a queued task can be cancelled")
        state.metrics.tasks.labels(state="cancelled").inc()
        state.fanout.publish(change("task", task_view(task)))
        return task_view(task)

    # -- live stream ------------------------------------------------------------------------------------

    @app.get(
        "/api/v1/stream",
        summary="Live changes (Server-Sent Events)",
        description=(
            "A `text/event-stream` of JSON changes as ingest stores them: "
            '`{"type": "device", "device": {...}}`, `{"type": "telemetry", "telemetry": {...}}`, '
            '`{"type": "task", "task": {...}}`, `{"type": "event", "event": {...}}`. '
            'A slow client loses its oldest changes and then gets `{"type": "resync"}`: reload from the REST API.'
        ),
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "the event stream"}},
        tags=["events"],
    )
    async def stream(request: Request) -> StreamingResponse:
        sub = state.fanout.subscribe()

        async def events() -> Any:
            try:
                yield "retry: 3000\n: connected\n\n"
                while not sub.closed:
                    item = await sub.get(wait=state.heartbeat)
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

    # -- console ----------------------------------------------------------------------------------------

    @app.get(
        "/",
        response_class=HTMLResponse,
        summary="Web console",
        description="The operator console: one self-contained HTML page (no external resources).",
        tags=["console"],
    )
    async def console() -> HTMLResponse:
        return HTMLResponse(index_html)

    return app
