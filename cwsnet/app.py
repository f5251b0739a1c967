"""Read device data as an app: ``cwsnet.app.AppClient``.

An app is an identity in the registry (``cwsnet app add NAME --grant FILTER``) with a
provisioning bundle like a device's. The cloud re-seals every message on the topics it was
granted to the app, on ``cws/v1/_apps/{app}/{site}/{node}/{channel}...`` (``docs/protocol.md`` §7);
the cloud broker lets the app read that one prefix and nothing else. This client logs in with the
bundle, subscribes, opens each message (it must come from the cloud, sealed to this app, for the
topic it arrived on, and not be a replay) and hands you the device's reading::

    import asyncio
    from cwsnet.app import AppClient

    async def main():
        async with AppClient("dashboard.json", host="127.0.0.1", port=8884, ca_file="ca.crt") as app:
            async for m in app.messages():
                print(m.node, m.channel, m.body)

    asyncio.run(main())

A message that does not open is logged (with the reason) and skipped; it never ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cwsnet import topics
from cwsnet.bundle import Bundle
from cwsnet.config import BrokerEndpoint, Reconnect, TLSClient
from cwsnet.endpoint import Endpoint
from cwsnet.errors import CwsError
from cwsnet.links import link_for
from cwsnet.mqtt import Message
from cwsnet.replay import ReplayWindow, SeqCounter

log = logging.getLogger("cwsnet.app")


@dataclass(frozen=True, slots=True)
class AppMessage:
    """One device message, opened: where it came from and its body."""

    site: str
    node: str
    channel: str  # "status", "telemetry", "event", "task/result"
    sub: str | None  # the stream of a telemetry message, the type of an event
    kind: str  # birth, status, death, telemetry, event, task_result
    seq: int  # the device's seq (unique per device)
    ts: int  # the device's clock, ms since the epoch
    body: Any
    topic: str  # the source topic, cws/v1/{site}/{node}/...


class AppClient:
    def __init__(self, bundle: Bundle | str | Path, *, host: str = "127.0.0.1", port: int = 1884,
                 ca_file: str | Path | None = None, client_id: str | None = None, queue_size: int = 10_000) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load_node(Path(bundle))
        ident = self.bundle.identity
        if ident.role != "app":
            raise CwsError(f"the bundle is for a {ident.role} ({ident.node}), not an app")
        self.app = ident.node
        # apps never seal: the counter is only there because an Endpoint has one
        self.endpoint = Endpoint(ident, SeqCounter(0, lambda _m: None), self.bundle.peer_keys().get,
                                 key_version=self.bundle.kv)
        self.window = ReplayWindow.from_state(None)
        self._queue: asyncio.Queue[AppMessage] = asyncio.Queue(maxsize=queue_size)
        ep = BrokerEndpoint(host=host, port=port, tls=TLSClient(ca_file=Path(ca_file)) if ca_file else None)
        self.link = link_for(ep, self.bundle, Reconnect(), client_id=client_id or ident.node, section="app",
                             name=f"app:{ident.node}", on_message=self._on_message, clean_session=False)
        self.link.subscribe(topics.app_filter(self.app), qos=1)
        self._task: asyncio.Task[None] | None = None
        self._surfaced = False
        self.rejected = 0

    async def __aenter__(self) -> AppClient:
        self._task = asyncio.get_running_loop().create_task(self.link.run(), name=f"app-{self.app}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:
                if not self._surfaced:  # the link's error, not seen through messages(): raise it here
                    raise

    async def wait_connected(self) -> None:
        """Wait until the client is connected and subscribed (wrap in ``asyncio.timeout``)."""
        await self.link.connected.wait()

    def open(self, topic: str, payload: bytes) -> AppMessage | None:
        """Open one message received on ``topic``; None (logged, counted) if it must be refused."""
        opened = self.endpoint.open_or_log(payload, topic, log, "app message")
        if opened is None:
            self.rejected += 1
            return None
        h, body = opened.header, opened.body
        try:
            app, _parts = topics.parse_app_topic(topic)
            if app != self.app or h.sender != "cloud":
                raise CwsError(f"{h.kind} on {topic} from {h.sender}: not the cloud, or not for this app")
            if self.window.check(h.seq) != "new":
                raise CwsError(f"replayed message seq {h.seq} from the cloud")
            if not isinstance(body, dict):
                raise CwsError("the body is not a map")
            source = topics.parse(str(body.get("topic")))
            if topics.app_topic(self.app, source_topic := str(body.get("topic"))) != topic:
                raise CwsError(f"the source topic {source_topic!r} does not match {topic!r}")
            msg = AppMessage(source.site, source.node, source.channel, source.sub, str(body.get("kind")),
                             int(body.get("seq", 0)), int(body.get("ts", 0)), body.get("body"), source_topic)
        except (CwsError, ValueError, TypeError) as exc:
            log.warning("refused app message on %s: %s", topic, exc)
            self.rejected += 1
            return None
        self.window.accept(h.seq)
        return msg

    async def _on_message(self, msg: Message) -> None:
        opened = self.open(msg.topic, msg.payload)
        if opened is not None:
            await self._queue.put(opened)

    async def messages(self) -> AsyncIterator[AppMessage]:
        """The opened messages, as they arrive, until the client is closed. Raises the link's error
        (e.g. :class:`~cwsnet.mqtt.AuthRefused` for a revoked app) if it stops."""
        while True:
            if self._queue.empty() and self._task is not None:
                getter = asyncio.ensure_future(self._queue.get())
                await asyncio.wait([getter, self._task], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    self._surfaced = True
                    self._task.result()  # raises what ended the link
                    return
                yield getter.result()
            else:
                yield await self._queue.get()
