"""Keeps the running cloud in step with the registry file (``cwsnet.registry``).

Every ``POLL`` seconds the file's signature is checked; on a change the cloud

1. imports it into its store (ingest refuses a revoked node and a retired key from that moment),
2. rewrites the cloud broker's users and ACLs from it and the active ``access`` policies, and makes
   the broker apply them at once and disconnect every client whose credential went
   (:meth:`cwsnet.broker.CwsBroker.enforce_credentials`),
3. records what changed as events (``node.added``, ``node.revoked``, ``node.rotated``), and
4. pushes each site's part of the registry to that site's gateways as a sealed ``config``
   message from the cloud; a gateway applies it to its own broker the same way.

A gateway also gets its site's registry on every birth, so one that was offline during a change
catches up when it returns. The registry's ``rev`` orders versions: a gateway ignores an older one.

A new policy set (the cloud's policy watcher) goes to :meth:`RegistrySync.set_access`, which rewrites
the broker's credentials the same way: connected clients keep their connections, and their next
PUBLISH, SUBSCRIBE and every delivery are checked against the new ACL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud.fanout import Fanout
from cloud.store import NewEvent, Store, now_ms, sync_registry
from cloud.views import change, event_view
from cwsnet import topics
from cwsnet.endpoint import Endpoint
from cwsnet.errors import ConfigError, CwsError
from cwsnet.identity import file_signature, write_secret_file
from cwsnet.mqtt import LinkError
from cwsnet.policy.access import AccessEngine
from cwsnet.registry import Registry, cloud_broker_users

log = logging.getLogger("cwsnet.cloud.registry")

POLL = 0.25
RETRY = 10.0  # seconds between attempts to reach a gateway a push missed


def describe_changes(old: Registry | None, new: Registry, now: int) -> list[NewEvent]:
    """Events for the nodes added, revoked and rotated between two registry versions."""
    events = []
    before = old.nodes if old is not None else {}
    for node, e in sorted(new.nodes.items()):
        prev = before.get(node)
        data = {"node": node, "site": e.site, "role": e.role, "kv": e.kv, "rev": new.rev}
        if prev is None:
            if old is not None:
                events.append(NewEvent(now, node, "node.added", "info",
                                       f"{e.role} {node} of site {e.site} added to the registry", data))
        elif prev.active and not e.active:
            events.append(NewEvent(now, node, "node.revoked", "warning",
                                   f"{e.role} {node} revoked: its connections are closed and its messages refused",
                                   data))
        elif e.kv != prev.kv:
            events.append(NewEvent(now, node, "node.rotated", "info",
                                   f"{e.role} {node}: key rotated to version {e.kv}", data))
    return events


class RegistrySync:
    def __init__(
        self,
        path: Path,
        store: Store,
        *,
        refresh: Callable[[], Any],
        endpoint: Endpoint,
        link: Any,
        fanout: Fanout,
        users_file: Path | None = None,
        broker: Callable[[], Any] = lambda: None,
        on_registry: Callable[[Registry], None] = lambda _reg: None,
        access: AccessEngine | None = None,
    ) -> None:
        self.on_registry = on_registry
        #: the access policies the broker's ACLs come from (None: the shipped defaults)
        self.access = access
        self._users_lock = threading.Lock()
        self._written: dict[str, Any] | None = None
        self.path = path
        self.store = store
        self.refresh = refresh
        self.endpoint = endpoint
        self.link = link
        self.fanout = fanout
        self.users_file = users_file
        self.broker = broker
        self.registry: Registry | None = None
        self._signature: tuple[int, ...] | None = None
        self.pushed: dict[str, int] = {}  # gateway -> rev last delivered to its broker
        self._catch_up_lock = threading.Lock()
        self._imported: tuple[int, ...] | None = None  # signature of the file version last imported
        self._caught_up = float("-inf")

    # -- reading ---------------------------------------------------------------------------------

    def load_initial(self) -> Registry:
        """Import the file at start (raises ConfigError naming the file: the cloud must not start on
        a broken registry)."""
        self._signature = self._imported = file_signature(self.path)
        reg = Registry.load(self.path)
        sync_registry(self.store, reg, str(self.path))
        if self.users_file is not None and reg.managed:  # before the broker starts
            self._write_users(reg)
        self.registry = reg
        self.on_registry(reg)
        return reg

    def catch_up(self) -> bool:
        """Import the file into the store now if it changed since the last apply (called from ingest's
        worker thread when a node seals with a key version the store does not know yet: the CLI writes
        the registry before the node's bundle, so the file has it). The event loop's next poll still
        applies the change fully (broker users, events, pushes). At most once per ``POLL``."""
        with self._catch_up_lock:
            now = time.monotonic()
            sig = file_signature(self.path)
            if now - self._caught_up < POLL or sig == self._imported:
                return False
            self._caught_up = now
            try:
                sync_registry(self.store, Registry.load(self.path), str(self.path))
            except ConfigError as exc:
                log.warning("registry not imported early: %s", exc)
                return False
            self._imported = sig
            return True

    def _load_and_import(self) -> tuple[Registry, list[NewEvent]]:
        sig = file_signature(self.path)
        reg = Registry.load(self.path)
        sync_registry(self.store, reg, str(self.path))
        with self._catch_up_lock:
            self._imported = sig
        self.refresh()
        if self.users_file is not None and reg.managed:
            self._write_users(reg)
        # last, so that a failure above (retried) records nothing twice
        events = describe_changes(self.registry, reg, now_ms())
        return reg, self.store.add_events(events) if events else []

    def _write_users(self, reg: Registry, force: bool = True) -> bool:
        """Write the broker's credentials for ``reg`` and the current policies; False if unchanged (and
        not ``force``)."""
        with self._users_lock:  # the registry's thread and set_access: the last writer has the latest policies
            doc = cloud_broker_users(reg, self.access)
            if not force and doc == self._written:
                return False
            assert self.users_file is not None
            write_secret_file(self.users_file, doc)
            self._written = doc
            return True

    async def set_access(self, access: AccessEngine | None) -> bool:
        """Adopt a new access policy set: rewrite the cloud broker's users and ACLs and make the broker
        apply them now (no connection is dropped unless its user is gone; the next PUBLISH, SUBSCRIBE and
        delivery of every client is checked against the new ACL). False when nothing changed (no
        registry, an unmanaged one, or the same ACLs)."""
        self.access = access
        reg = self.registry
        if reg is None or self.users_file is None or not reg.managed:
            return False
        if not await asyncio.to_thread(self._write_users, reg, False):
            return False
        log.info("cloud broker ACLs regenerated from the access policies")
        broker = self.broker()
        if broker is not None:
            kicked = await broker.enforce_credentials()
            if kicked:
                log.info("policies: disconnected %s from the cloud broker", ", ".join(kicked))
        return True

    def _reported(self, gateway: str) -> int | None:
        """The registry rev a gateway says (in its status) it enforces; None if unknown."""
        node = self.store.get_node(gateway)
        rev = (node.last_status or {}).get("registry_rev") if node is not None else None
        return rev if isinstance(rev, int) and not isinstance(rev, bool) else None

    def _lagging(self, gateway: str) -> bool:
        """Not yet sent the current rev, or (status) still enforcing an older one: send it again."""
        reg = self.registry
        if reg is None or not reg.managed:
            return False
        reported = self._reported(gateway)
        return self.pushed.get(gateway, -1) < reg.rev or (reported is not None and reported < reg.rev)

    def _behind(self) -> bool:
        return any(self._lagging(gw) for _s, gw in self._gateways())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        retry_at = loop.time() + RETRY
        apply_at, delay = 0.0, POLL
        while True:
            await asyncio.sleep(POLL)
            sig = file_signature(self.path)
            if sig == self._signature:
                # a gateway a push did not reach (link down at the time) or that could not apply it
                # (its status reports an older registry_rev): send it again now and then
                if loop.time() >= retry_at and self.link.connected.is_set():
                    retry_at = loop.time() + RETRY
                    if await asyncio.to_thread(self._behind):
                        await self.push_all(only_behind=True)
                continue
            if loop.time() < apply_at:
                continue
            try:
                await self.apply()
            except ConfigError as exc:  # a half-edited or broken file: keep enforcing the last good one
                log.error("registry not reloaded, keeping rev %s: %s",
                          self.registry.rev if self.registry else "none", exc)
            except Exception:  # the store or the disk: try this version again, backing off
                log.exception("applying the registry %s failed; trying again in %.1f s", self.path, delay)
                apply_at, delay = loop.time() + delay, min(delay * 2, 10.0)
                continue
            self._signature, delay = sig, POLL

    async def apply(self) -> None:
        reg, events = await asyncio.to_thread(self._load_and_import)
        old_rev = self.registry.rev if self.registry is not None else None
        self.registry = reg
        self.on_registry(reg)
        log.info("registry: rev %s -> %s (%d nodes)", old_rev, reg.rev, len(reg.nodes))
        broker = self.broker()
        if broker is not None and self.users_file is not None and reg.managed:
            kicked = await broker.enforce_credentials()
            if kicked:
                log.info("registry: disconnected %s from the cloud broker", ", ".join(kicked))
        if events:
            self.fanout.publish_many([change("event", event_view(e)) for e in events])
        await self.push_all()

    # -- pushing to gateways ------------------------------------------------------------------

    def _gateways(self) -> list[tuple[str, str]]:
        reg = self.registry
        return [] if reg is None else [(e.site, e.id) for e in reg.active(role="gateway")]

    async def push_all(self, only_behind: bool = False) -> None:
        for site, gw in self._gateways():
            if not only_behind or self._lagging(gw):
                await self.push(site, gw)

    async def on_birth(self, node: str) -> None:
        for site, gw in self._gateways():
            if gw == node:
                await self.push(site, gw)

    async def push(self, site: str, gateway: str) -> bool:
        """Send ``gateway`` its site's registry, sealed as the cloud's; False if it could not go now
        (it goes again on the gateway's next birth or the next change)."""
        reg = self.registry
        if reg is None or not reg.managed:
            return False
        topic = topics.config(site, gateway)
        try:
            payload, _header = self.endpoint.seal(topic, "config", {"registry": reg.site_view(site).to_json()},
                                                  to=gateway)
        except CwsError as exc:
            log.error("cannot seal the registry for gateway %s: %s", gateway, exc)
            return False
        try:
            await self.link.publish(topic, payload, qos=1)
        except LinkError as exc:
            log.info("registry rev %d not pushed to %s now (%s); it goes at its next birth", reg.rev, gateway, exc)
            return False
        self.pushed[gateway] = reg.rev
        log.info("registry rev %d pushed to gateway %s", reg.rev, gateway)
        return True
