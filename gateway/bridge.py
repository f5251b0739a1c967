"""The site gateway: the site's broker (embedded amqtt or an existing one), and the bridge to the cloud.

Up: the bridge subscribes to its site's uplink topics on the site broker, stores each message in
the durable :class:`UplinkOutbox` (committed before the MQTT PUBACK), then sends the device a
sealed *custody ack* (the device may now forget it); a pump sends the outbox to the cloud broker in
order, re-sending until the cloud's sealed end-to-end ack frees it. Near its storage limit the
gateway refuses new telemetry and tells the device to pause (back-pressure); the device keeps it.
Down: the cloud's commands for the site's devices are held in the durable :class:`DownlinkStore`
and delivered when the device is online, until its sealed receipt or the command's expiry.

The gateway opens nothing but the acks, commands and receipts addressed to itself: device
payloads are sealed for the cloud. It reads the clear header (``from``, ``seq``, ``kind``,
``exp``) to store, dedupe, count and expire them. ``docs/protocol.md`` §5 is the specification.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import platform
import sqlite3
import time
from typing import Any

import nacl.public

import cwsnet
from cwsnet import custody, envelope, parts, topics
from cwsnet.aio import wait_event
from cwsnet.bundle import Bundle
from cwsnet.config import GatewayConfig
from cwsnet.endpoint import Endpoint
from cwsnet.errors import ConfigError, CwsError, EnvelopeError, TopicError
from cwsnet.executor import LocalWorkers
from cwsnet.identity import file_signature, write_secret_file
from cwsnet.links import link_for
from cwsnet.mqtt import LinkDown, LinkError, Message, Will
from cwsnet.nodestate import NodeState
from cwsnet.registry import KeyRing, Registry, site_broker_users
from edge_agent.sensors import system_snapshot
from gateway.downlink import DownlinkStore
from gateway.local import SiteData
from gateway.ota import RATE as ota_rate
from gateway.ota import OtaServer
from gateway.outbox import UplinkOutbox
from gateway.site_policy import SitePolicies
from gateway.site_tasks import SiteTasks

log = logging.getLogger("cwsnet.gateway")


class Gateway:
    def __init__(self, cfg: GatewayConfig, *, clock: Any = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        bundle = Bundle.load_node(cfg.identity_file)
        self.node = bundle.identity.node
        self.site = bundle.identity.site
        self.state = NodeState(cfg.data_dir / "gateway-state.db")
        self.outbox = UplinkOutbox(cfg.data_dir / "uplink-outbox.db")
        self.downlink = DownlinkStore(cfg.data_dir / "downlink.db")
        self.parts = parts.PartStore(cfg.data_dir / "parts.db")  # the cloud's large task args, until whole (§3)
        self.cloud_key = bundle.cloud_public_key
        # the site's registry: device keys (versioned) and revocations, from registry_file and from
        # the cloud's sealed pushes (kept in data_dir, so a restart offline enforces the last one)
        self.registry = Registry(managed=False)
        self.ring = KeyRing()
        self.pushed_registry_file = cfg.data_dir / "site-registry.json"
        self._registry_checked = 0.0
        self._registry_sig: tuple[int, ...] | None = None
        self._no_key_warned: set[str] = set()
        self.device_kv: dict[str, int | None] = {}
        self._duplicates: dict[str, tuple[float, int]] = {}  # key version each device sealed its last message with
        self._load_registries()
        self.endpoint = Endpoint(bundle.identity, self.state.seq_counter(), self._peer_key, clock,
                                 key_version=bundle.kv, versioned_key=self._versioned_key)
        self.cloud_window = self.state.replay_window("cloud")
        self.custody = custody.CustodyAcks(busy_for=cfg.store.busy_pause)
        self._custody_wake = asyncio.Event()
        self.started = clock()
        self.devices_online: set[str] = set()
        self.stats = {"received": 0, "duplicates": 0, "malformed": 0, "forwarded_up": 0, "forwarded_down": 0,
                      "acked": 0, "rejected_by_cloud": 0, "store_errors": 0, "custody_acks": 0,
                      "refused_full": 0, "refused_revoked": 0, "commands_held": 0, "commands_expired": 0, "receipts": 0,
                      "ota_chunks": 0, "ota_refused": 0, "kept_on_site": 0, "routing_dropped": 0,
                      "rate_limited": 0, "rate_dropped": 0, "rate_lockouts": 0, "summaries_sent": 0, "events_sent": 0,
                      "automation_fired": 0, "automation_tasks": 0}
        self.store_error: str | None = None
        self._store_error_logged = float("-inf")
        self._refusals_logged = float("-inf")
        self.broker: Any = None
        self._pump_wake = asyncio.Event()
        # every outbox call runs on this one thread, so SQLite is used from one thread only
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.node}-outbox")
        self._incoming: asyncio.Queue[tuple[Message, Any, bool]] = asyncio.Queue(maxsize=10000)
        self.will_seq: int | None = None
        # the worker pool for scheduled tasks the cloud places on this gateway (tier gateway)
        from edge_agent.handlers import defaults, registry

        handlers = registry(cfg.handlers) if cfg.handlers is not None else defaults()
        self.workers = LocalWorkers(handlers, cfg.task_slots, self._task_report, node=self.node, clock=clock)
        self._lease = 5.0  # the shortest lease of the tasks given to us: heartbeats go every third of it
        self._beat = asyncio.Event()
        self.local = SiteData(cfg.data_dir / "site-data.db")
        self.site_policy = SitePolicies(self)
        # tasks the site's devices submit: scheduled here, so they run while the cloud is away
        self.site_tasks = SiteTasks(self, cfg.task_lease)

        self.site_link = link_for(
            cfg.site_client, bundle, cfg.reconnect, client_id=f"{self.node}-bridge", section="site_client",
            name=f"gateway:{self.node}:site", on_message=self._from_site, manual_ack=True,
            on_connect=self._on_site_connect,
            clean_session=False,  # a message PUBACKed by the site broker but not yet in our outbox is redelivered
        )
        for channel in (*topics.UPLINK_CHANNELS, *topics.LOCAL_CHANNELS):
            self.site_link.subscribe(topics.site_filter(self.site, channel), qos=1)
        self.ota = OtaServer(cfg.ota_dir or cfg.data_dir / "ota")
        self._ota_warned: dict[str, float] = {}
        self.site_link.subscribe(topics.site_filter(self.site, "ota/get"), qos=0)

        self.uplink = link_for(
            cfg.uplink, bundle, cfg.reconnect, client_id=self.node, section="uplink", name=f"gateway:{self.node}:uplink",
            will_factory=self._make_will, on_connect=self._on_uplink_connect, on_message=self._from_cloud,
            max_inflight=100,
            clean_session=False,  # commands published while we were away are kept for us by the cloud broker
        )
        for channel in topics.DOWNLINK_CHANNELS:
            self.uplink.subscribe(topics.site_filter(self.site, channel), qos=1)

    # ---- keys -----------------------------------------------------------------------------
    def _load_registries(self) -> None:
        """At start: the newer of the last registry the cloud pushed and ``registry_file``."""
        candidates = []
        if self.pushed_registry_file.exists():
            try:
                candidates.append(Registry.load(self.pushed_registry_file))
            except ConfigError as exc:  # damaged: registry_file (or the next push) replaces it
                log.error("ignoring the last pushed registry: %s", exc)
        if self.cfg.registry_file is not None:
            try:
                candidates.append(Registry.load(self.cfg.registry_file))
                self._registry_sig = file_signature(self.cfg.registry_file)
            except ConfigError as exc:
                raise ConfigError(f"registry_file: {exc}") from None
        # of one instance the higher rev wins; of two (a re-created cloud), registry_file, the newer
        # provisioning (the cloud's next push settles it either way)
        for reg in candidates:
            self._use_registry(reg, "start")

    def _newer(self, reg: Registry) -> bool:
        return not (reg.managed and self.registry.managed and not reg.newer_than(self.registry))

    def _use_registry(self, reg: Registry, source: str) -> bool:
        """Take ``reg`` (or its part for this site) if it is newer; True if taken."""
        if not self._newer(reg):
            return False
        site = reg.site_view(self.site)
        self.registry = site
        self.ring.update({n: e for n, e in site.nodes.items() if e.role == "device" and e.site == self.site})
        log.info("registry rev %d from %s: %d devices of site %s (%d revoked)", site.rev, source,
                 len(site.active(site=self.site, role="device")), self.site,
                 sum(1 for e in site.nodes.values() if not e.active))
        return True

    async def _apply_registry(self, reg: Registry, source: str) -> None:
        """A newer registry: enforce it on the site broker (users, ACLs, revoked connections).

        Its files are written before it is taken, so a failed write (disk full) leaves the older
        registry in force and the same version is applied again when it comes again (each gateway
        birth, or the next poll of ``registry_file``)."""
        if not self._newer(reg):
            return
        site = reg.site_view(self.site)
        if source == "cloud":
            await self._db_call(write_secret_file, self.pushed_registry_file, site.to_json())
        b = self.cfg.broker
        if b is not None and b.credentials_file is not None and site.managed:
            await self._db_call(write_secret_file, b.credentials_file,
                                site_broker_users(site, self.site, self.site_policy.access))
        self._use_registry(reg, source)
        if b is not None and b.credentials_file is not None and site.managed and self.broker is not None:
            kicked = await self.broker.enforce_credentials()
            if kicked:
                log.info("registry: disconnected %s from the site broker", ", ".join(kicked))

    async def _registry_watch(self) -> None:
        """Follow ``registry_file`` too (a home lab's, edited by `cwsnet device`): the newer rev wins."""
        path = self.cfg.registry_file
        while path is not None:
            await asyncio.sleep(0.5)
            sig = file_signature(path)
            if sig == self._registry_sig:
                continue
            self._registry_sig = sig
            try:
                await self._apply_registry(await self._db_call(Registry.load, path), "registry_file")
            except ConfigError as exc:
                log.warning("registry file not reloaded (%s); keeping rev %d", exc, self.registry.rev)
            except Exception:
                log.exception("applying %s failed; trying again", path)
                self._registry_sig = None
                await asyncio.sleep(2.0)

    def _peer_key(self, node: str) -> nacl.public.PublicKey | None:
        """The key to seal to ``node`` (the cloud, or a device of this site that is not revoked)."""
        if node == "cloud":
            return self.cloud_key
        return self.ring.current(node)

    def _versioned_key(self, node: str, kv: int | None) -> nacl.public.PublicKey | None:
        if node == "cloud":
            return self.cloud_key
        return self.ring.lookup(node, kv)

    # ---- up: site -> outbox -> cloud ------------------------------------------------------
    async def _from_site(self, msg: Message) -> None:
        if msg.topic.endswith("/ota/get"):
            await self._ota_request(msg)
            return
        try:
            parts = topics.parse(msg.topic)
            header = envelope.peek_header(msg.payload)
            if parts.node != header.sender or parts.site != self.site:
                raise TopicError(f"{header.sender!r} may not publish on {msg.topic!r}")
        except (EnvelopeError, TopicError) as exc:
            # Not an envelope this gateway may forward: never stored, never forwarded.
            self.stats["malformed"] += 1
            log.warning("dropped message on %s (%d bytes): %s", msg.topic, len(msg.payload), exc)
            self.site_link.ack(msg)
            return
        if header.key_version is not None:  # the newest key version the device has used: it holds that key
            self.device_kv[header.sender] = max(header.key_version, self.device_kv.get(header.sender) or 0)
        entry = self.registry.get(header.sender)
        if entry is not None and not entry.active:
            # its broker session is closed when the revocation arrives; this covers what was in flight
            self.stats["refused_revoked"] += 1
            log.warning("dropped %s seq %d from %s: the device is revoked", header.kind, header.seq, header.sender)
            self.site_link.ack(msg)
            return
        if parts.channel != "receipt" and self.cfg.enforce_policies:
            verdict = self.site_policy.admit(header, parts)
            if verdict != "admit":  # over its rate limit: refused (it keeps it and waits) or taken and dropped
                self.site_link.ack(msg)
                if verdict == "drop":
                    self.custody.stored(header.sender, header.seq)
                self._custody_wake.set()
                return
        if parts.channel == "telemetry" and await self.site_policy.telemetry(msg, header, parts):
            return
        if parts.channel == "receipt":
            try:
                await self._receipt(msg)
            except sqlite3.Error as exc:  # the command is delivered again and receipted again
                self._storage_trouble("recording a receipt", exc)
            return
        if parts.channel == "task/submit":
            await self.site_tasks.on_submit(msg, header)
            return
        if parts.channel == "task/status":
            await self.site_tasks.on_status(msg, header)
            return
        if parts.channel == "task/result" and header.recipient == self.node:
            await self.site_tasks.on_result(msg, header)
            return
        if header.kind in ("birth", "status"):
            if header.sender not in self.devices_online or header.kind == "birth":
                self.devices_online.add(header.sender)
                asyncio.get_running_loop().create_task(self._deliver_held(header.sender))
                asyncio.get_running_loop().create_task(self.site_policy.send_routes(header.sender,
                                                                                    force=header.kind == "birth"))
        elif header.kind == "death":
            self.devices_online.discard(header.sender)
            self.site_tasks.on_death(header.sender)
        await self._incoming.put((msg, header, parts.channel == "status"))

    async def _ota_request(self, msg: Message) -> None:
        """A device asks for a piece of a firmware release (protocol §8): answer on its ota/data."""
        self.site_link.ack(msg)
        try:
            parts = topics.parse(msg.topic)
        except TopicError:
            return
        entry = self.registry.get(parts.node)
        if parts.site != self.site or entry is None or not entry.active or entry.role != "device":
            log.warning("firmware request on %s ignored: %s is not an active device of site %s", msg.topic,
                        parts.node, self.site)
            return
        if not self.ota.allow(parts.node):
            self.stats["ota_refused"] += 1
            self._ota_warn(parts.node, f"asks for firmware faster than {ota_rate:.0f} requests a second: ignored")
            return
        reply, problem = await asyncio.to_thread(self.ota.reply_bytes, msg.payload)  # not on the outbox's thread
        if problem is not None:
            self._ota_warn(parts.node, problem)
        if reply is not None:
            self.stats["ota_chunks"] += 1
            await self.site_link.publish(topics.ota_data(self.site, parts.node), reply, qos=0)

    def _ota_warn(self, node: str, problem: str) -> None:
        """Log a refused firmware request, at most once a minute per device."""
        now = time.monotonic()
        if now - self._ota_warned.get(node, float("-inf")) >= 60:
            self._ota_warned[node] = now
            log.warning("firmware request from %s: %s (further ones muted for a minute)", node, problem)

    def _fill(self, extra_messages: int = 0, extra_bytes: int = 0) -> float:
        """How full the uplink outbox is: the larger of its count and byte fractions."""
        s = self.cfg.store
        return max((self.outbox.depth() + extra_messages) / s.max_messages,
                   (self.outbox.size() + extra_bytes) / s.max_bytes)

    def _admit(self, batch: list[tuple[Message, Any, bool]]) -> list[tuple[Message, Any, bool]]:
        """Back-pressure: above ``high_water`` new telemetry is refused, at the limit everything.
        A refused message is PUBACKed to the site broker but not custody-acked: its device keeps
        it, is told to pause, and sends it again later."""
        admitted: list[tuple[Message, Any, bool]] = []
        n = size = 0
        for item in batch:
            msg, header, _retain = item
            fill = self._fill(n, size)
            if fill >= 1.0 or (fill >= self.cfg.store.high_water and header.kind == "telemetry"):
                self.stats["refused_full"] += 1
                self.custody.refused(header.sender, header.seq)
                self.site_link.ack(msg)
                continue
            admitted.append(item)
            n += 1
            size += len(msg.payload)
        if len(admitted) < len(batch):
            now = time.monotonic()
            if now - self._refusals_logged >= 10.0:  # one line per 10 s, not one per batch
                self._refusals_logged = now
                log.warning("uplink outbox %.0f%% full (%d messages, %d bytes): refusing %s, devices told to pause "
                            "(%d refused so far)", 100 * self._fill(), self.outbox.depth(), self.outbox.size(),
                            "everything" if self._fill() >= 1.0 else "telemetry", self.stats["refused_full"])
            self._custody_wake.set()
        return admitted

    def _storage_trouble(self, where: str, exc: sqlite3.Error) -> None:
        """A database write failed (disk full, I/O error): report it (status, one log line per 10 s);
        the caller carries on, and what was not written is retried or re-sent by its owner."""
        self.store_error = str(exc)
        self.stats["store_errors"] += 1
        now = time.monotonic()
        if now - self._store_error_logged >= 10.0:
            self._store_error_logged = now
            log.error("storage error in %s (%s) while %s; retrying, nothing acknowledged is lost",
                      self.cfg.data_dir, exc, where)

    async def _db_call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._db, functools.partial(fn, *args))

    async def _committer(self) -> None:
        """Group commit: store everything received so far in one transaction, then PUBACK it all.

        If the store fails (disk full, I/O error) the batch is kept, not acked, and retried with
        backoff; the site broker holds what arrives meanwhile."""
        while True:
            batch = [await self._incoming.get()]
            while len(batch) < 500 and not self._incoming.empty():
                batch.append(self._incoming.get_nowait())
            batch = self._admit(batch)
            if not batch:
                continue
            # each message's priority class from the qos policies (the engine caches per sender and stream)
            qos, rows = self.site_policy.qos, []
            for m, h, retain in batch:
                entry = self.registry.get(h.sender)
                rows.append((h.sender, h.seq, m.topic, m.payload, retain,
                             self.outbox.priority_for(qos, m.topic, role=entry.role if entry else "device")))
            delay = 0.2
            while True:
                try:
                    added = await self._db_call(self.outbox.add_many, rows, self.clock())
                    break
                except Exception as exc:
                    self.stats["store_errors"] += 1
                    self.store_error = str(exc)
                    log.error("storing %d messages in the outbox failed (%s); not acknowledged, retrying in %.1f s",
                              len(rows), exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            if self.store_error is not None:
                log.warning("the uplink outbox can be written again; %d messages stored", len(rows))
                self.store_error = None
            for (msg, header, _r), new in zip(batch, added, strict=True):
                self.site_link.ack(msg)  # only now: the message is committed to the outbox
                self.custody.stored(header.sender, header.seq)  # new or already held: ours now
                self.stats["received"] += 1
                self.stats["duplicates"] += int(not new)
                if not new:
                    self._note_duplicate(header.sender, header.seq)
                if header.trace:
                    log.info("stored %s seq=%d from %s trace=%s", header.kind, header.seq, header.sender,
                             header.trace)
            self._custody_wake.set()
            self._pump_wake.set()

    def _note_duplicate(self, sender: str, seq: int) -> None:
        """A message already held (a device re-sending after a lost custody ack, or a replay): stored
        once. Logged at most once per sender every 10 s."""
        now = time.monotonic()
        last, count = self._duplicates.get(sender, (float("-inf"), 0))
        if now - last < 10.0:
            self._duplicates[sender] = (last, count + 1)
            return
        self._duplicates[sender] = (now, 0)
        more = f" (and {count} more since)" if count else ""
        log.info("duplicate of %s seq %d, already held: stored once%s", sender, seq, more)

    async def _custody_sender(self) -> None:
        """Send each device a sealed custody ack for what was just committed (coalesced ranges).

        QoS 0 and not retried: a lost custody ack only means the device sends those messages
        again, which the outbox dedupes and acks again."""
        while True:
            await self._custody_wake.wait()
            self._custody_wake.clear()
            for device, body in self.custody.drain():
                if device == self.node:
                    continue
                topic = topics.ack(self.site, device)
                try:
                    # sealed to the newest key the device has used: right after a rotation it may not
                    # hold the registry's new one yet (and after a restart, the old one no more)
                    payload, _h = self.endpoint.seal(
                        topic, "ack", body, to=device,
                        recipient_key=self.ring.key_for_reply(device, self.device_kv.get(device)))
                except sqlite3.Error as exc:  # reserving seqs failed: keep the ack for the next round
                    self._storage_trouble("sealing a custody ack", exc)
                    self.custody.put_back(device, body)
                    continue
                except CwsError as exc:
                    if device not in self._no_key_warned:
                        self._no_key_warned.add(device)
                        log.warning("no custody acks for %s (%s): it is not in the registry %s; its messages are "
                                    "still forwarded, and it re-sends them until acked", device, exc,
                                    self.cfg.registry_file)
                    continue
                try:
                    await self.site_link.publish(topic, payload, qos=0)
                    self.stats["custody_acks"] += 1
                except LinkError:
                    pass  # the device re-sends; the outbox dedupes

    async def _pump(self) -> None:
        """Keep the pump going whatever happens to one round (a failed round is logged and retried)."""
        while True:
            try:
                await self._pump_rounds()
            except sqlite3.Error as exc:
                self._storage_trouble("sending the outbox", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("uplink pump failed; restarting it in 1 s")
                await asyncio.sleep(1.0)

    async def _pump_rounds(self) -> None:
        """Send due outbox messages to the cloud in order, with at most ``max_inflight`` unacked."""
        while True:
            await self.uplink.connected.wait()
            self._pump_wake.clear()  # before reading the outbox: a wake during this round is kept
            items = await self._db_call(self.outbox.due, time.monotonic(), self.cfg.retransmit_after,
                                        self.cfg.max_inflight, self.cfg.max_backoff)
            # publish the round pipelined (paho sends in call order), then wait for the PUBACKs
            results = await asyncio.gather(
                *(self.uplink.publish(i.topic, i.payload, qos=1, retain=i.retain) for i in items),
                return_exceptions=True,
            )
            # Anything but "the link is down" counts as sent, so the retransmit backoff applies:
            # a PUBACK timeout (paho still holds the message and will deliver it) or a per-message
            # error must neither be re-sent at once in a loop nor hold up the rest of the round.
            sent = [i.id for i, r in zip(items, results, strict=True) if not isinstance(r, LinkDown)]
            down = sum(isinstance(r, LinkDown) for r in results)
            for i, r in zip(items, results, strict=True):
                if r is not None and not isinstance(r, LinkDown):
                    log.warning("uplink publish of %s seq %d: %s: %s (will retry)", i.sender, i.seq,
                                type(r).__name__, r)
            if down:
                log.info("uplink down; %d messages held in the outbox", self.outbox.depth())
            if sent:
                self.stats["forwarded_up"] += len(sent)
                await self._db_call(self.outbox.mark_sent, sent, time.monotonic())
            if not items or not sent:
                await wait_event(self._pump_wake, min(1.0, self.cfg.retransmit_after))

    # ---- down: cloud -> site --------------------------------------------------------------
    async def _from_cloud(self, msg: Message) -> None:
        try:
            await self._from_cloud_checked(msg)
        except sqlite3.Error as exc:  # an ack is resent by the cloud, a command re-sent at the next birth
            self._storage_trouble(f"handling {msg.topic}", exc)

    async def _from_cloud_checked(self, msg: Message) -> None:
        try:
            parts = topics.parse(msg.topic)
        except TopicError as exc:
            log.warning("ignored cloud message: %s", exc)
            return
        if parts.node == self.node:
            await self._own_message(msg)
            return
        if parts.channel in ("task/cmd", "config"):
            entry = self.registry.get(parts.node)
            if self.registry.managed and (entry is None or entry.gateway != self.node or not entry.active):
                # not a device this gateway serves: holding it would only fill the disk
                log.warning("ignored %s for %s: not an active device behind this gateway", parts.channel, parts.node)
                return
            await self._hold_command(msg, parts.node)
            return
        try:
            await self.site_link.publish(msg.topic, msg.payload, qos=1, retain=False)
            self.stats["forwarded_down"] += 1
        except LinkError:
            log.warning("site broker down: %s for %s not delivered", msg.topic, parts.node)

    async def _hold_command(self, msg: Message, node: str) -> None:
        """Store a command for a device (until its receipt or expiry), then deliver it if it is online."""
        try:
            header = envelope.peek_header(msg.payload)
        except EnvelopeError as exc:
            log.warning("dropped command on %s: %s", msg.topic, exc)
            return
        now = self.clock()
        expires = header.expires / 1000 if header.expires is not None else now + self.cfg.downlink.max_age
        if expires <= now:
            self.stats["commands_expired"] += 1
            log.info("command seq %d for %s arrived expired; not delivered", header.seq, node)
            return
        try:
            new = await self._db_call(self.downlink.add, node, header.seq, msg.topic, msg.payload, expires, now)
        except sqlite3.Error as exc:  # not held: forwarded if the device is online, else the cloud re-sends it
            self._storage_trouble(f"holding a command for {node}", exc)
            new = False
        if new:
            self.stats["commands_held"] += 1
        if node in self.devices_online:
            await self.deliver([(node, header.seq, msg.topic, msg.payload)])
        else:
            log.info("%s is offline: command seq %d held until it connects (expires in %.0f s)", node, header.seq,
                     expires - now)

    async def deliver(self, items: list[tuple[str, int, str, bytes]], store: DownlinkStore | None = None) -> None:
        """Publish held commands to their devices and record the delivery in ``store`` (the cloud's
        commands by default; the site scheduler's have their own)."""
        store = store or self.downlink
        delivered = []
        for node, seq, topic, payload in items:
            try:
                await self.site_link.publish(topic, payload, qos=1, retain=False)
            except LinkError as exc:
                log.info("command seq %d for %s not delivered now (%s); held", seq, node, exc)
                break
            delivered.append((node, seq))
            self.stats["forwarded_down"] += 1
        if delivered:
            try:
                await self._db_call(store.delivered, delivered, self.clock())
            except sqlite3.Error as exc:  # only the redelivery timer is affected
                self._storage_trouble("recording deliveries", exc)

    async def _deliver_held(self, node: str) -> None:
        """A device came online: deliver what is held for it, oldest first (the cloud's, then the site
        scheduler's)."""
        try:
            for store in (self.downlink, self.site_tasks.commands):
                held = await self._db_call(store.for_node, node, self.clock())
                if held:
                    log.info("%s is online: delivering %d held command(s)", node, len(held))
                    await self.deliver([(h.node, h.seq, h.topic, h.payload) for h in held], store)
        except Exception:
            log.exception("delivering held commands to %s failed; retried later", node)

    async def _receipt(self, msg: Message) -> None:
        """A device's sealed receipt: the commands it names arrived, stop holding them."""
        self.site_link.ack(msg)
        opened = self.endpoint.open_or_log(msg.payload, msg.topic, log, "receipt")
        if opened is None:
            return
        if opened.header.kind != "ack" or not isinstance(opened.body, dict):
            log.warning("rejected %s on %s: expected a receipt", opened.header.kind, msg.topic)
            return
        # "of": whose seqs the receipt names: this gateway's own commands (site tasks), else the cloud's
        store = self.site_tasks.commands if opened.body.get("of") == self.node else self.downlink
        n = await self._db_call(store.received, opened.header.sender,
                                custody.parse_ranges(opened.body.get("received")))
        self.stats["receipts"] += n

    async def _downlink_sweeper(self) -> None:
        """Drop expired commands; deliver again those without a receipt (to devices online)."""
        every = min(self.cfg.downlink.redeliver_after, 5.0)
        while True:
            await asyncio.sleep(every)
            try:
                now = self.clock()
                for store in (self.downlink, self.site_tasks.commands):
                    for node, seq in await self._db_call(store.expire, now):
                        self.stats["commands_expired"] += 1
                        log.info("command seq %d for %s expired before %s came back; dropped", seq, node, node)
                    again = await self._db_call(store.undelivered_since, now - self.cfg.downlink.redeliver_after,
                                                now)
                    await self.deliver([(h.node, h.seq, h.topic, h.payload) for h in again
                                        if h.node in self.devices_online], store)
            except sqlite3.Error as exc:
                self._storage_trouble("sweeping held commands", exc)
            except Exception:
                log.exception("downlink sweep failed; trying again in %.0f s", every)

    async def _own_message(self, msg: Message) -> None:
        opened = self.endpoint.open_or_log(msg.payload, msg.topic, log)
        if opened is None:
            return
        if opened.header.sender != "cloud":
            log.warning("rejected %s from %s: only the cloud addresses the gateway", opened.header.kind,
                        opened.header.sender)
            return
        if self.cloud_window.check(opened.header.seq) != "new":
            log.warning("rejected replayed %s seq %d from cloud", opened.header.kind, opened.header.seq)
            return
        self.cloud_window.accept(opened.header.seq)
        try:
            self.state.save_replay_window("cloud", self.cloud_window)
        except sqlite3.Error as exc:  # kept in memory; acks are idempotent, so carry on
            self._storage_trouble("saving the cloud's replay window", exc)
        if opened.header.kind == "config":
            body = opened.body if isinstance(opened.body, dict) else {}
            if "registry" in body:
                try:
                    reg = Registry.from_json(body["registry"], "the registry pushed by the cloud")
                except ConfigError as exc:
                    log.error("rejected the registry pushed by the cloud: %s", exc)
                    return
                foreign = [e.id for e in reg.nodes.values() if e.site != self.site and e.role != "operator"]
                if foreign:
                    log.error("rejected the registry pushed by the cloud: it lists nodes of other sites (%s)",
                              ", ".join(foreign[:5]))
                    return
                try:
                    await self._apply_registry(reg, "cloud")
                except Exception:  # disk full...: the older registry stays; the cloud sees our registry_rev
                    log.exception("the registry rev %d pushed by the cloud could not be applied; the cloud "
                                  "pushes it again", reg.rev)
            return
        if opened.header.kind == "task_cmd":
            for body in await self._whole_commands(opened.body):
                self.task_command(body)
            return
        if opened.header.kind == "task_result":  # the cloud runs a site task of ours (task/offload)
            self.site_tasks.on_cloud_result(opened.body, opened.header.seq)
            return
        if opened.header.kind == "ack":
            body = opened.body if isinstance(opened.body, dict) else {}
            ranges = [
                (a[0], a[1], a[2]) for a in body.get("acks", [])
                if isinstance(a, list) and len(a) == 3 and isinstance(a[0], str)
                and isinstance(a[1], int) and isinstance(a[2], int)
            ]
            rejected = [
                (r[0], r[1], r[3]) for r in body.get("rejected", [])
                if isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) and isinstance(r[1], int)
                and isinstance(r[3], bytes)
            ]
            freed = await self._db_call(self.outbox.ack, ranges)
            self.stats["acked"] += freed
            if rejected:
                dropped = set(await self._db_call(self.outbox.reject, rejected))
                self.stats["rejected_by_cloud"] += len(dropped)
                for notice in body["rejected"][:20]:
                    if (notice[0], notice[1]) in dropped:
                        log.warning("cloud refused %s seq %s (%s); dropped from the outbox", *notice[:3])
                    else:
                        log.warning("cloud refused %s seq %s (%s), but the message held under that seq has "
                                    "other bytes: kept", *notice[:3])
            self._pump_wake.set()  # acks open the window

    # ---- scheduled tasks placed on the gateway ---------------------------------------------
    async def _whole_commands(self, body: Any) -> list[Any]:
        """The cloud's commands ready to take after ``body``: itself; or, for args too big for one message
        (protocol §3, "Parts"), none while parts are missing (the command waits in ``parts.db``), the
        command with its args once they are all here, or the waiting command a last part completes."""
        if not isinstance(body, dict) or not ("part" in body or "args_ref" in body) or body.get("cancel") is True:
            return [body]
        tid, attempt = body.get("task_id"), body.get("attempt")
        name = parts.name_of(tid, attempt)
        try:
            if "part" in body:
                part = parts.Part.parse(body["part"], f"task {tid} part")
                waiting, dropped = await self._db_call(self.parts.add, "cloud", name, part, self.clock())
                self._parts_given_up(dropped, "over the bound of parts kept")
                return [] if waiting is None else await self._whole_commands(waiting)
            ref = parts.Ref.parse(body["args_ref"], f"task {tid} args_ref")
            args = await self._db_call(self.parts.take, "cloud", name, ref, f"task {tid}'s args")
        except parts.PartError as exc:
            log.warning("%s", exc)
            if "args_ref" in body and isinstance(tid, str):
                self._report_soon({"task_id": tid, "attempt": attempt, "state": "failed", "result": None,
                                   "error": f"its args did not arrive whole: {exc}"})
            return []
        except sqlite3.Error as exc:  # the lease covers it: the task is re-sent
            self._storage_trouble("keeping task args parts", exc)
            return []
        if args is None:
            await self._db_call(self.parts.wait, "cloud", name, ref, body, self.clock())
            log.info("task %s: waiting for the rest of its %d args parts", tid, ref.parts)
            return []
        return [{k: v for k, v in body.items() if k != "args_ref"} | {"args": args}]

    def _held_tasks(self) -> list[str]:
        """What the pool runs, and the cloud's tasks whose command waits for its args' parts while they still
        come (listed so their lease holds, protocol §3 "Parts")."""
        held = self.workers.running()
        try:
            waiting = {n.rsplit("/", 1)[0] for n in self.parts.waiting_names("cloud", self.clock() - 30.0)}
        except sqlite3.Error:
            waiting = set()
        return held + sorted(waiting - set(held))

    def _parts_given_up(self, dropped: list[tuple[str, str, dict[str, Any]]], why: str) -> None:
        """The cloud's commands that waited in vain for their args' parts: reported failed to the cloud. (A
        site task's result that did: its attempt fails at the site scheduler.)"""
        for sender, _name, body in dropped:
            if sender != "cloud":
                self.site_tasks.given_up(sender, body, why)
            elif isinstance(body.get("task_id"), str):
                log.warning("task %s: its args' parts never all came (%s)", body["task_id"], why)
                self._report_soon({"task_id": body["task_id"], "attempt": body.get("attempt"), "state": "failed",
                                   "result": None, "error": f"its args' parts never all came from the cloud ({why})"})

    async def _parts_upkeep(self) -> None:
        """At start, then hourly: commands whose parts all came before a restart are taken; those that
        waited a day for them are given up on."""
        await self.site_tasks.ready()
        while True:
            try:
                for sender, _name, body in await self._db_call(self.parts.ready):
                    if sender != "cloud":  # a site task's result (a device's, or our pool's)
                        await self.site_tasks.whole_result_ready(sender, body)
                        continue
                    for whole in await self._whole_commands(body):
                        self.task_command(whole)
                self._parts_given_up(await self._db_call(self.parts.prune, self.clock()),
                                     f"none for {parts.MAX_AGE / 3600:g} h")
            except sqlite3.Error as exc:
                self._storage_trouble("keeping task args parts", exc)
            await asyncio.sleep(3600.0)

    def task_command(self, body: Any) -> None:
        """A task for the gateway's worker pool (or a cancel), from the cloud's scheduler or the site's;
        the cloud's replay window already made sure each of its commands is taken once, and the pool
        runs each (task, attempt) once."""
        if not isinstance(body, dict) or not isinstance(body.get("task_id"), str):
            log.warning("task command from the cloud without a task_id; ignored")
            return
        tid = body["task_id"]
        attempt = body.get("attempt") if isinstance(body.get("attempt"), int) else None
        if body.get("cancel") is True:
            if body.get("site_task") is True:  # an operator cancels a site task of ours through the cloud's API
                if not self.site_tasks.cancel(tid, "cancelled by an operator (through the cloud)"):
                    log.info("cancel of site task %s from the cloud: not open here; ignored", tid)
            elif self.workers.cancel(tid, attempt):
                log.info("task %s cancelled by the cloud", tid)
            return
        if self.cfg.task_slots <= 0:
            log.warning("task %s for the gateway refused: task_slots is 0", tid)
            self._report_soon({"task_id": tid, "attempt": attempt, "state": "failed", "result": None,
                               "error": f"gateway {self.node} runs no tasks (task_slots: 0)"})
            return
        args = body.get("args") if isinstance(body.get("args"), dict) else None
        if args is None or not isinstance(body.get("handler"), str):
            self._report_soon({"task_id": tid, "attempt": attempt, "state": "failed", "result": None,
                               "error": "a task command needs a handler (text) and args (a map)"})
            return
        lease = body.get("lease")
        if isinstance(lease, int | float) and not isinstance(lease, bool) and lease > 0:
            self._lease = min(self._lease, float(lease)) if self.workers.running() else float(lease)
        deadline = body.get("deadline") if isinstance(body.get("deadline"), int) else None
        checkpoint = body.get("checkpoint") if isinstance(body.get("checkpoint"), dict) else None
        idle = not self.workers.running()
        if self.workers.start(tid, body["handler"], args, attempt=attempt, checkpoint=checkpoint,
                              deadline_ms=deadline, parts_ok=body.get("parts") is True):
            log.info("task %s (%s, attempt %s) runs on the gateway", tid, body["handler"], attempt)
            if idle:  # the status loop was on its idle pace: heartbeats (listing it) start now
                self._beat.set()

    async def _task_report(self, body: dict[str, Any]) -> None:
        """A step of a task run here: for a site task, straight to the site scheduler; for the cloud's,
        sealed into the uplink outbox like the site's results."""
        if self.site_tasks.owns(body.get("task_id")):
            await self.site_tasks.local_report(body)
            return
        try:
            await self.emit_own(topics.task_result(self.site, self.node), "task_result", body)
        except Exception as exc:  # noqa: BLE001 - disk full...: the lease covers it (the task moves)
            log.error("task %s: its %s report was not stored (%s)", body.get("task_id"), body.get("state"), exc)

    def _report_soon(self, body: dict[str, Any]) -> None:
        asyncio.get_running_loop().create_task(self._task_report(body))

    # ---- the gateway's own messages (summaries, events) -----------------------------------
    async def emit_own(self, topic: str, kind: str, body: Any, *, expires: float | None = None) -> None:
        """Seal a message of the gateway's own for the cloud and put it in the uplink outbox: it goes
        up (in order within its priority class, re-sent until acked) like its devices' messages, also
        after an outage. ``expires`` (s): the clear header's ``exp`` (the cloud drops it after that)."""
        payload, header = self.endpoint.seal(topic, kind, body, to="cloud",
                                             expires=None if expires is None else int(expires * 1000))
        policies = getattr(self, "site_policy", None)  # None while the gateway is being built
        priority = self.outbox.priority_for(policies.qos if policies else None, topic, role="gateway")
        await self._db_call(self.outbox.add_many, [(self.node, header.seq, topic, payload, False, priority)],
                            self.clock())
        self._pump_wake.set()

    def emit_event(self, event_type: str, severity: str, message: str, data: dict[str, Any]) -> None:
        """Record an event of the gateway's (an alert, a policy decision) for the cloud; never raises."""
        body = {"type": event_type, "severity": severity, "message": message, "data": data}

        async def go() -> None:
            try:
                await self.emit_own(topics.event(self.site, self.node, event_type), "event", body)
                self.stats["events_sent"] += 1
            except Exception as exc:  # noqa: BLE001 - disk full...: the event is lost, the gateway carries on
                log.error("event %s not recorded (%s): %s", event_type, exc, message)

        asyncio.get_running_loop().create_task(go())

    async def db_call(self, fn: Any, *args: Any) -> Any:
        return await self._db_call(fn, *args)

    def storage_trouble(self, where: str, exc: sqlite3.Error) -> None:
        self._storage_trouble(where, exc)

    def wake_custody(self) -> None:
        self._custody_wake.set()

    async def policies_changed(self) -> None:
        """A new policy set: the site broker's users and ACLs follow its access policies."""
        b = self.cfg.broker
        if b is None or b.credentials_file is None or not self.registry.managed:
            return
        await self._db_call(write_secret_file, b.credentials_file,
                            site_broker_users(self.registry, self.site, self.site_policy.access))
        if self.broker is not None:
            kicked = await self.broker.enforce_credentials()
            if kicked:
                log.info("policies: disconnected %s from the site broker", ", ".join(kicked))

    # ---- gateway's own status -------------------------------------------------------------
    def status_body(self, state: str = "online") -> dict[str, Any]:
        return {
            "state": state,
            "uptime": round(self.clock() - self.started, 1),
            **system_snapshot(str(self.cfg.data_dir)),
            "devices": self._device_count(),
            "queue": self.outbox.depth(),
            "outbox": self.outbox.depth(),
            "outbox_bytes": self.outbox.size(),
            "outbox_fill": round(self._fill(), 4),
            "backpressure": self._fill() >= self.cfg.store.high_water,
            "storage": "ok" if self.store_error is None else f"error: {self.store_error}",
            "commands_held": self.downlink.depth(),
            "registry_rev": self.registry.rev,
            "uplink": "up" if self.uplink.connected.is_set() else "down",
            "link": "up" if self.uplink.connected.is_set() else "down",
            "site_link": "up" if self.site_link.connected.is_set() else "down",
            "stats": dict(self.stats),
            "agent": {"version": cwsnet.__version__, "platform": platform.platform(), "kind": "gateway"},
            # an executor for scheduled tasks: its slots and what it holds (a heartbeat), how often it reports
            "handlers": sorted(self.workers.handlers) if self.cfg.task_slots > 0 else [],
            "slots": self.cfg.task_slots,
            "tasks": self._held_tasks(),
            # "parts": it takes task args too big for one message, in parts (protocol §3, built in)
            "capabilities": list(dict.fromkeys([*self.cfg.capabilities, parts.CAPABILITY])),
            "interval": self.cfg.status_interval,
        }

    def _device_count(self) -> int:
        if self.broker is not None:
            try:
                sessions = self.broker.sessions
                return sum(
                    1 for s, _h in sessions.values()
                    if s.transitions.state == "connected" and s.client_id != f"{self.node}-bridge"
                )
            except Exception:
                pass
        return len(self.devices_online)

    def _make_will(self) -> Will:
        topic = topics.status(self.site, self.node)
        payload, header = self.endpoint.seal(topic, "death", {"state": "offline", "reason": "connection lost"},
                                             to="cloud")
        self.will_seq = header.seq
        return Will(topic=topic, payload=payload, qos=1, retain=True)

    async def _publish_status(self, kind: str, extra: dict[str, Any] | None = None) -> None:
        topic = topics.status(self.site, self.node)
        try:
            payload, _ = self.endpoint.seal(topic, kind, self.status_body() | (extra or {}), to="cloud")
            await self.uplink.publish(topic, payload, qos=1, retain=True)
        except LinkError:
            pass
        except sqlite3.Error as exc:
            self._storage_trouble(f"sealing the gateway's {kind}", exc)

    async def _on_uplink_connect(self) -> None:
        try:
            await self._db_call(self.outbox.resend_unacked)  # what the old connection carried may be lost
        except sqlite3.Error as exc:  # the retransmission timers still apply
            self._storage_trouble("marking the outbox for resending", exc)
        log.info("uplink connected to %s:%s; %d messages waiting", self.cfg.uplink.host, self.cfg.uplink.port,
                 self.outbox.depth())
        await self._publish_status("birth", {"will_seq": self.will_seq})
        self._pump_wake.set()

    async def _on_site_connect(self) -> None:
        # subscribed: the cloud learns at once that this site's devices are heard again
        if self.uplink.connected.is_set():
            await self._publish_status("status")

    async def _status_loop(self) -> None:
        """A status every ``status_interval``; while the worker pool holds tasks, every third of their
        lease (the heartbeat that keeps them here), and at once when one arrives or ends."""
        while True:
            every = min(self.cfg.status_interval, self._lease / 3) if self.workers.running() else \
                self.cfg.status_interval
            await wait_event(self._beat, every)
            self._beat.clear()
            await self._publish_status("status")

    # ---- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None, ready: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        if self.cfg.broker is not None:
            from cwsnet.broker import BrokerSettings, start_broker

            b = self.cfg.broker
            if b.credentials_file is not None and self.registry.managed:  # the registry it enforces now
                write_secret_file(b.credentials_file,
                                  site_broker_users(self.registry, self.site, self.site_policy.access))
            try:
                self.broker = await start_broker(BrokerSettings.coerce(b),
                                                 on_decision=self.site_policy.broker_hook())
            except ConfigError:
                raise
            except Exception as exc:  # amqtt's BrokerError / OSError: port taken, bad certificate...
                raise ConfigError(f"broker: cannot start the site broker on {b.host}:{b.port}: {exc}") from None
            log.info("site broker (amqtt) running: %s", ", ".join(
                [f"TLS {b.host}:{b.tls_port}"] * (b.tls_port is not None)
                + [f"plaintext {b.plain_host or b.host}:{b.port}"] * (b.port is not None)))
        metrics_server = None
        if self.cfg.metrics_port:
            metrics_server = self._start_metrics()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.site_link.run()),
                    tg.create_task(self.uplink.run()),
                    tg.create_task(self._pump()),
                    tg.create_task(self._committer()),
                    tg.create_task(self._custody_sender()),
                    tg.create_task(self._downlink_sweeper()),
                    tg.create_task(self._status_loop()),
                    tg.create_task(self._registry_watch()),
                    tg.create_task(self._parts_upkeep()),
                    tg.create_task(self.site_policy.run()),
                    tg.create_task(self.site_tasks.run()),
                ]
                if ready is not None:
                    ready.set()
                await stop.wait()
                await asyncio.wait_for(self._publish_status("death", {"state": "offline", "reason": "shutdown"}),
                                       2.0)
                for t in tasks:
                    t.cancel()
                self.workers.cancel_all()
        finally:
            if self.broker is not None:
                await self.broker.shutdown()
            if metrics_server is not None:
                metrics_server.shutdown()
            self._db.submit(self.outbox.close).result()
            self._db.submit(self.downlink.close).result()
            self._db.submit(self.local.close).result()
            self._db.submit(self.site_tasks.close).result()
            self._db.submit(self.parts.close).result()
            self._db.shutdown()
            self.state.close()
            log.info("gateway %s stopped", self.node)

    def _start_metrics(self) -> Any:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        gw = self

        class Collector:
            def collect(self) -> Any:
                yield GaugeMetricFamily("cwsnet_gateway_outbox_depth", "messages held for the cloud",
                                        value=gw.outbox.depth())
                yield GaugeMetricFamily("cwsnet_gateway_outbox_bytes", "payload bytes held for the cloud",
                                        value=gw.outbox.size())
                yield GaugeMetricFamily("cwsnet_gateway_outbox_fill", "fraction of the outbox limit in use",
                                        value=gw._fill())
                yield GaugeMetricFamily("cwsnet_gateway_commands_held", "commands held for offline devices",
                                        value=gw.downlink.depth())
                yield GaugeMetricFamily("cwsnet_gateway_devices_connected", "devices connected to the site broker",
                                        value=gw._device_count())
                yield GaugeMetricFamily("cwsnet_gateway_uplink_up", "1 if connected to the cloud broker",
                                        value=int(gw.uplink.connected.is_set()))
                c = CounterMetricFamily("cwsnet_gateway_messages_total", "messages by direction and outcome",
                                        labels=["outcome"])
                for k, v in gw.stats.items():
                    c.add_metric([k], v)
                yield c

        registry = CollectorRegistry()
        registry.register(Collector())
        server, _thread = start_http_server(self.cfg.metrics_port, addr="127.0.0.1", registry=registry)
        return server
