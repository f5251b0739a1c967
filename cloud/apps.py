"""Device data for apps: each stored message an app is granted is re-sealed to that app.

An app is a registry entry of role ``app`` whose ``subscribe`` list holds the *source* topic
filters it may read (e.g. ``cws/v1/home/+/telemetry/#``). For every newly stored message on a
granted topic the cloud publishes, on the app's own topic
``cws/v1/_apps/{app}/{site}/{node}/{channel}...`` (``topics.app_topic``), an envelope sealed from
``cloud`` to the app::

    {"from": node, "site": site, "seq": device seq, "ts": device ts (ms), "topic": source topic,
     "kind": kind, "body": the device's opened body}

The cloud broker lets an app subscribe to ``cws/v1/_apps/{app}/#`` only, so it can read nothing
else, and what it reads only it can open. An app registered with ``--plaintext-loopback`` (for
local tools that cannot open envelopes) gets the same map as JSON, unsealed (byte strings in
base64), and its broker user may log in only on a loopback listener. Delivery is live (MQTT QoS 1, the broker keeps a
bounded queue for an app that is briefly away); history is in the REST API.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Sequence
from typing import Any

from cloud.store import IngestItem
from cwsnet import topics
from cwsnet.broker import topic_matches
from cwsnet.endpoint import Endpoint
from cwsnet.errors import CwsError
from cwsnet.mqtt import LinkError
from cwsnet.registry import Registry

log = logging.getLogger("cwsnet.cloud.apps")


def _json_bytes(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON")

QUEUE_MAX = 10_000


class AppFanout:
    def __init__(self, endpoint: Endpoint, link: Any) -> None:
        self.endpoint = endpoint
        self.link = link
        self.grants: dict[str, tuple[str, ...]] = {}
        self.plaintext: set[str] = set()  # apps that get JSON, unsealed (their user is loopback-only)
        self.queue: asyncio.Queue[tuple[str, IngestItem, Any]] | None = None
        self.stats = {"sent": 0, "dropped": 0}

    def update(self, reg: Registry) -> None:
        grants = {e.id: e.subscribe for e in reg.active(role="app") if e.subscribe}
        plaintext = {e.id for e in reg.active(role="app") if e.plaintext}
        if grants != self.grants or plaintext != self.plaintext:
            log.info("apps: %s", ", ".join(f"{a} reads {' '.join(g)}{' (plaintext, loopback)' * (a in plaintext)}"
                                           for a, g in sorted(grants.items())) or "none")
        self.grants, self.plaintext = grants, plaintext

    def recipients(self, topic: str) -> list[str]:
        return [app for app, filters in self.grants.items() if any(topic_matches(f, topic) for f in filters)]

    def wants(self, topic: str) -> bool:
        """For :class:`cloud.ingest.Ingest`: keep the body of a message on ``topic``?"""
        return bool(self.grants) and bool(self.recipients(topic))

    def offer(self, items: Sequence[tuple[IngestItem, Any]]) -> None:
        """Queue stored messages for their apps (never blocks ingest; the oldest go when full)."""
        if self.queue is None:
            self.queue = asyncio.Queue(maxsize=QUEUE_MAX)
        for item, body in items:
            for app in self.recipients(item.topic):
                if self.queue.full():
                    self.queue.get_nowait()
                    self.queue.task_done()
                    self.stats["dropped"] += 1
                self.queue.put_nowait((app, item, body))

    async def run(self) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue(maxsize=QUEUE_MAX)
        while True:
            app, item, body = await self.queue.get()
            try:
                if app not in self.grants:  # revoked (or its grants withdrawn) since it was queued
                    self.stats["dropped"] += 1
                    continue
                await self._send(app, item, body)
            except Exception:  # one bad delivery must never stop the others (nor the cloud)
                self.stats["dropped"] += 1
                log.exception("delivering %s seq %d to app %s failed; skipped", item.sender, item.seq, app)
            finally:
                self.queue.task_done()

    async def _send(self, app: str, item: IngestItem, body: Any) -> None:
        topic = topics.app_topic(app, item.topic)
        parts = topics.parse(item.topic)
        msg = {"from": item.sender, "site": parts.site, "seq": item.seq, "ts": item.ts, "topic": item.topic,
               "kind": item.kind, "body": body}
        try:
            if app in self.plaintext:
                payload = json.dumps(msg, default=_json_bytes, allow_nan=False).encode()
            else:
                payload, _h = self.endpoint.seal(topic, item.kind, msg, to=app, trace=item.trace)
            await self.link.publish(topic, payload, qos=1)
        except CwsError as exc:  # no key for the app (revoked a moment ago)
            log.warning("not sent to app %s: %s", app, exc)
            self.stats["dropped"] += 1
        except LinkError as exc:
            self.stats["dropped"] += 1
            log.info("app %s misses %s seq %d: the cloud broker is away (%s)", app, item.sender, item.seq, exc)
        else:
            self.stats["sent"] += 1
