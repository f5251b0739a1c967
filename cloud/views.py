"""The JSON shapes the cloud shows the outside world: REST responses and live-stream changes.

One function per record, used by both the API (whose pydantic models mirror these shapes) and the
change notifications ingest produces, so the console sees the same object from either path.
"""

from __future__ import annotations

import json
from typing import Any

from cloud.store import Event, NewEvent, Node, Task, TelemetryRow

#: args or a result whose JSON is larger than this (bytes) is left out of task lists and live changes
#: (``omitted`` says which, and how big): a task's own view has it (args and results up to 16 MiB travel in parts)
LIST_MAX = 64 * 1024


def node_view(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "site": node.site,
        "role": node.role,
        "online": node.online,
        "last_seen": node.last_seen,
        "created": node.created,
        "status": node.last_status or {},
        "agent": node.agent,
        "key_version": node.kv,
        "revoked_at": node.revoked_at,
    }


def telemetry_view(row: TelemetryRow) -> dict[str, Any]:
    return {"ts": row.ts, "seq": row.seq, "idx": row.idx, "stream": row.stream, "values": row.values}


def event_view(event: Event | NewEvent) -> dict[str, Any]:
    """An event; ``id`` is null for one not recorded by the store (a device's event, announced live)."""
    return {
        "id": event.id if isinstance(event, Event) else None,
        "ts": event.ts,
        "source": event.source,
        "type": event.type,
        "severity": event.severity,
        "message": event.message,
        "data": event.data,
    }


def task_view(task: Task, whole: bool = False) -> dict[str, Any]:
    """A task as the API shows it; ``whole``: with args and result however big (one task's own view),
    else those over :data:`LIST_MAX` are null and named in ``omitted`` (lists, live changes)."""
    view = {
        "id": task.id,
        "target": task.target,
        "origin": task.origin,
        "handler": task.handler,
        "args": task.args,
        "state": task.state,
        "result": task.result,
        "error": task.error,
        "created": task.created,
        "updated": task.updated,
        "started": task.started,
        "finished": task.finished,
        "deadline": task.deadline,
        "dispatched": task.dispatched,
        "attempts": task.attempts,
        "kind": task.kind,
        "site": task.site,
        "node": task.node,
        "placement": task.placement,
        "idempotency_key": task.idempotency_key,
        "disagreement": task.disagreement,
    }
    if task.omitted:  # a light listing left them out (cloud.store list_tasks)
        view["omitted"] = dict(task.omitted)
    elif not whole:
        omitted = {}
        for key in ("args", "result"):
            if view[key] is not None and (size := len(json.dumps(view[key], separators=(",", ":")))) > LIST_MAX:
                view[key], omitted[key] = None, size
        if omitted:
            view["omitted"] = omitted
    return view


def change(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A live-stream change: ``{"type": kind, kind: payload}``, e.g. ``{"type": "device", "device": {...}}``."""
    return {"type": kind, kind: payload}
