"""Cloud ingest, sans-I/O: payloads in, stored rows, acks and change notifications out.

No sockets and no sleeps: the clock is injected and the daemon (``cloud/daemon.py``) does the
MQTT side. ``Ingest.handle_batch`` opens each message with the cloud's
:class:`~cwsnet.endpoint.Endpoint`, checks the protocol's acceptance rules (``docs/protocol.md``
§2), stores the whole batch in one transaction and says which ``(site, sender, seq)`` may be
acknowledged to the site's gateway. A rejected message is counted, recorded as a coalesced
``message.rejected`` event and dropped; nothing a sender puts on the wire makes it raise.

Ack rule: only messages whose ``(sender, seq)`` is now in the store are acknowledged (stored now,
or stored earlier: a replay). A message rejected before it authenticated carries a ``(from, seq)``
nobody vouches for, so it is never acked as stored; instead, for the reasons in
:data:`NOTICE_REASONS`, the gateway gets a *rejection notice* ``[sender, seq, reason]`` in the ack
body so it stops retransmitting a message the cloud will never accept (``docs/protocol.md`` §3).
``unknown_sender`` gets no notice (the device may be registered later and its data must then get
in on retransmit), nor does ``replay`` (already acked as stored).

Besides the uplink channels, ingest takes a gateway's ``task/offload`` (kind ``task_cmd``: a site task
its scheduler gives the cloud to run, protocol §3): only from a gateway of that site (anything else is
``topic_mismatch``), stored once and acked like any message in the gateway's outbox, with no effect in
the store; the daemon hands the stored body to ``cloud.site_offload``. A gateway's ``task_result`` that
carries ``site_task`` is its *mirror* of a site task: checked field by field and upserted as a tasks row
of kind ``site`` (never a direct task's transition, never the scheduler's).

Body checks bound what reaches the store: every unsigned field (``ts``, ``will_seq``,
``started``, ``finished``) is 0..2^63-1, every other integer in a stored JSON document is a signed
64-bit one, floats are finite, map keys are text and nesting is at most :data:`MAX_DEPTH` deep. A
body that breaks them is stored without effects (its ``seq`` is used up), acked and counted
``malformed``, so no authenticated payload can make a store transaction fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import nacl.public

from cloud.metrics import CloudMetrics
from cloud.store import (
    TERMINAL_TASK_STATES,
    IngestItem,
    NewEvent,
    NodeKey,
    Reading,
    SiteTaskReport,
    StatusUpdate,
    Store,
    TaskReport,
    to_json,
)
from cloud.views import change, event_view, node_view, task_view
from cwsnet import envelope, topics
from cwsnet.endpoint import Endpoint
from cwsnet.envelope import INT_MIN, KINDS, Opened, storable_problem
from cwsnet.errors import (
    EnvelopeError,
    ForgedEnvelope,
    MalformedEnvelope,
    TopicError,
    TopicMismatch,
    UnknownSender,
)
from cwsnet.identity import public_key_from_b64
from cwsnet.parts import Part, PartError, Ref, name_of
from cwsnet.registry import Entry as RegistryEntry
from cwsnet.registry import KeyRing, PastKey

log = logging.getLogger("cwsnet.cloud.ingest")

UPLINK_KINDS = ("birth", "status", "death", "telemetry", "event", "task_result")
#: a gateway's channel to the cloud for site tasks the cloud runs (kind ``task_cmd``, protocol §3, site tasks)
OFFLOAD_KIND = "task_cmd"
SEVERITIES = ("info", "warning", "error", "critical")
REPORTED_TASK_STATES = ("running", "succeeded", "failed", "expired", "checkpoint", "cancelled")
#: the states of a site task in its gateway's mirror reports (protocol §3, "The mirror")
SITE_TASK_STATES = ("queued", "assigned", "running", "succeeded", "failed", "cancelled", "expired")
_SITE_TASK_ID = re.compile(r"^s-[0-9a-f]{24}$")
_SITE_TASK_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
#: rejection reasons the gateway is told about (it then drops the message from its outbox)
#: (not ``unknown_sender``/``unknown_key``: the registry may catch up; not ``retired_key``: a message
#: sealed before a rotation and held past its grace is kept, not destroyed, until an operator decides)
NOTICE_REASONS = frozenset({"forged", "topic_mismatch", "wrong_recipient", "version", "malformed", "revoked"})
UINT_MAX = 2**63 - 1  # unsigned fields: SQLite's INTEGER is a signed 64-bit value


# -- the node directory (peer keys and sites) ----------------------------------------------------


class NodeDirectory:
    """Cache of the registry's nodes (site, role, versioned keys, revocation), refreshed on a miss.

    A miss (an unknown node) refreshes from the store at most once per ``min_refresh`` seconds,
    so a flood of messages from unregistered senders costs one query a second, while a node
    registered by the CLI a moment ago is known within a second. :meth:`public_key` is the key to
    seal *to* a node (its current one; None when revoked); :meth:`lookup` is the versioned key
    lookup that opening uses (``Endpoint(..., versioned_key=directory.lookup)``): it raises
    :class:`~cwsnet.registry.RevokedSender` or a key-version error instead of returning a key.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.monotonic, min_refresh: float = 1.0):
        self._store = store
        self._clock = clock
        self._min_refresh = min_refresh
        self._entries: dict[str, NodeKey] = {}
        self._ring = KeyRing()
        #: import the registry file now if it changed (RegistrySync.catch_up); True if it did
        self.catch_up: Callable[[], bool] = lambda: False
        self._last_refresh: float | None = None
        self._lock = threading.Lock()
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> bool:
        """Reload from the store unless it was reloaded less than ``min_refresh`` ago; True if reloaded."""
        with self._lock:
            now = self._clock()
            if not force and self._last_refresh is not None and now - self._last_refresh < self._min_refresh:
                return False
            self._last_refresh = now
            entries = self._store.node_directory()
            ring: dict[str, RegistryEntry] = {}
            for node, e in entries.items():
                try:
                    public_key_from_b64(e.public_key, f"registry: node {node!r} public_key")
                    ring[node] = RegistryEntry(
                        node, e.site, e.role, e.public_key, kv=e.kv,
                        status="revoked" if e.revoked_at is not None else "active", revoked_at=e.revoked_at,
                        previous_keys=tuple(PastKey(kv, pk, until) for kv, pk, until in e.previous_keys))
                except Exception as exc:  # a corrupt row must not hide every other node
                    log.error("ignoring node %s: %s", node, exc)
            self._entries = entries
            self._ring.update(ring)
            return True

    def get(self, node: str) -> NodeKey | None:
        entry = self._entries.get(node)
        if entry is None and self.refresh():
            entry = self._entries.get(node)
        return entry

    def public_key(self, node: str) -> nacl.public.PublicKey | None:
        if self._ring.entry(node) is None:
            self.refresh()
        return self._ring.current(node)

    def lookup(self, node: str, kv: int | None = None) -> nacl.public.PublicKey | None:
        e = self._ring.entry(node)
        if e is not None and kv is not None and kv > e.kv and self.catch_up():
            self.refresh(force=True)  # a rotation the registry file has and the store had not yet
        elif e is None or (kv is not None and kv > e.kv):
            self.refresh()  # a new node, or a rotation: reread the store (at most once per min_refresh)
        return self._ring.lookup(node, kv)

    def known(self, node: str) -> bool:
        return node in self._entries

    def revoked(self, node: str) -> bool:
        e = self._entries.get(node)
        return e is not None and e.revoked_at is not None

    def gateways(self, site: str) -> list[str]:
        return sorted(n for n, e in self._entries.items()
                      if e.role == "gateway" and e.site == site and e.revoked_at is None)


# -- rejection events, coalesced -----------------------------------------------------------------


@dataclass
class _Window:
    last_emit: float
    suppressed: int = 0
    topic: str = ""
    detail: str = ""


class RejectionLog:
    """Turns rejections into ``message.rejected`` events, at most one per (source, reason) per interval.

    The first rejection of a (source, reason) is recorded at once; further ones within
    ``interval`` seconds are only counted, and the count goes out with the next event for that key
    (or from :meth:`flush` once the interval has passed). ``source`` is the sender only if it is a
    registered node, so a flood of invented sender names shares one key and one event a window.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._windows: dict[tuple[str | None, str], _Window] = {}

    def record(
        self, now: float, *, source: str | None, reason: str, topic: str, detail: str, seq: int | None = None
    ) -> NewEvent | None:
        key = (source, reason)
        w = self._windows.get(key)
        if w is not None and now - w.last_emit < self.interval:
            w.suppressed += 1
            w.topic, w.detail = topic, detail
            return None
        count = 1 + (w.suppressed if w is not None else 0)
        self._windows[key] = _Window(last_emit=now)
        return self._event(now, source, reason, topic, detail, count, seq)

    def flush(self, now: float) -> list[NewEvent]:
        out = []
        for key, w in list(self._windows.items()):
            if now - w.last_emit < self.interval:
                continue
            if w.suppressed:
                out.append(self._event(now, key[0], key[1], w.topic, w.detail, w.suppressed, None))
                self._windows[key] = _Window(last_emit=now)
            else:
                del self._windows[key]
        return out

    @staticmethod
    def _event(
        now: float, source: str | None, reason: str, topic: str, detail: str, count: int, seq: int | None
    ) -> NewEvent:
        times = f" ({count} times)" if count > 1 else ""
        topic, detail = topic[:200], detail[:300]  # both may carry attacker-chosen text: bounded
        data: dict[str, Any] = {"reason": reason, "topic": topic, "detail": detail, "count": count}
        if seq is not None:
            data["seq"] = seq
        return NewEvent(
            ts=int(now * 1000),
            source=source,
            type="message.rejected",
            severity="info" if reason == "replay" else "warning",
            message=f"rejected message on {topic}: {reason}{times}: {detail}",
            data=data,
        )


# -- acks ------------------------------------------------------------------------------------------


def payload_digest(payload: bytes) -> bytes:
    """The first 16 bytes of SHA-256(payload): names one exact payload in a rejection notice."""
    raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode("utf-8", "replace")
    return hashlib.sha256(raw).digest()[:16]


class AckCoalescer:
    """Collects acks and rejection notices per site and renders ack bodies (``docs/protocol.md`` §3)::

        {"acks": [[sender, first_seq, last_seq], ...], "rejected": [[sender, seq, reason, digest], ...]}

    Consecutive sequence numbers of a sender collapse into one range. ``"acks"`` is always
    present (``[]`` when a body carries only notices); ``"rejected"`` only when it is not empty. A
    body holds at most ``max_ranges`` entries, ranges and notices together (more go into further
    bodies). At most ``max_rejections`` notices wait per site; further ones are dropped (the
    gateway retransmits those messages, and the next rejection brings the notice again).
    """

    def __init__(self, max_ranges: int = 1000, max_rejections: int = 100_000) -> None:
        self.max_ranges = max_ranges
        self.max_rejections = max_rejections
        self._pending: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        self._rejected: dict[str, dict[tuple[str, int], tuple[str, bytes | None]]] = defaultdict(dict)

    def add(self, site: str, sender: str, seq: int) -> None:
        self._pending[site][sender].add(seq)

    def reject(self, site: str, sender: str, seq: int, reason: str, digest: bytes | None = None) -> bool:
        """Queue a rejection notice for ``(sender, seq)``; False if the site's notices are full.

        ``digest`` (:func:`payload_digest` of the refused payload) lets the gateway delete only the
        very message that was refused, never a genuine one that happens to share ``(sender, seq)``.
        """
        pending = self._rejected[site]
        if (sender, seq) not in pending and len(pending) >= self.max_rejections:
            return False
        pending[(sender, seq)] = (reason, digest)
        return True

    def add_ranges(self, site: str, body: dict[str, Any]) -> None:
        """Put the contents of an unsent body back (e.g. the publish failed)."""
        for sender, first, last in body.get("acks", []):
            self._pending[site][sender].update(range(first, last + 1))
        for sender, seq, reason, *digest in body.get("rejected", []):
            self._rejected[site].setdefault((sender, seq), (reason, digest[0] if digest else None))

    def __bool__(self) -> bool:
        return any(self._pending.values()) or any(self._rejected.values())

    @staticmethod
    def ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for s in sorted(set(seqs)):
            if out and s == out[-1][1] + 1:
                out[-1] = (out[-1][0], s)
            else:
                out.append((s, s))
        return out

    def drain(self) -> dict[str, list[dict[str, Any]]]:
        """Take everything pending: ``{site: [ack body, ...]}``."""
        pending, self._pending = self._pending, defaultdict(lambda: defaultdict(set))
        rejected, self._rejected = self._rejected, defaultdict(dict)
        bodies: dict[str, list[dict[str, Any]]] = {}
        for site in sorted(set(pending) | set(rejected)):
            senders = pending.get(site, {})
            acks: list[list[Any]] = [
                [sender, first, last] for sender in sorted(senders) for first, last in self.ranges(senders[sender])
            ]
            notices: list[list[Any]] = [
                [sender, seq, reason, *([digest] if digest is not None else [])]
                for (sender, seq), (reason, digest) in sorted(rejected.get(site, {}).items())
            ]
            out: list[dict[str, Any]] = []
            while acks or notices:
                body: dict[str, Any] = {"acks": acks[: self.max_ranges]}
                acks = acks[self.max_ranges :]
                room = self.max_ranges - len(body["acks"])
                if notices and room > 0:
                    body["rejected"], notices = notices[:room], notices[room:]
                out.append(body)
            if out:
                bodies[site] = out
        return bodies


# -- ingest ----------------------------------------------------------------------------------------


class BodyError(Exception):
    """An authenticated message whose body does not follow docs/protocol.md §3."""


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What happened to one message. ``ack`` says ``(site, sender, seq)`` may be acknowledged."""

    status: Literal["stored", "duplicate", "rejected"]
    topic: str
    reason: str | None = None
    detail: str | None = None
    sender: str | None = None
    seq: int | None = None
    kind: str | None = None
    site: str | None = None
    trace: str | None = None
    ack: bool = False


@dataclass
class BatchResult:
    results: list[IngestResult]
    acks: list[tuple[str, str, int]] = field(default_factory=list)  # (topic site, sender, seq)
    changes: list[dict[str, Any]] = field(default_factory=list)  # live-stream notifications
    births: list[str] = field(default_factory=list)  # nodes whose birth was applied: dispatch their tasks
    #: (topic site, sender, seq, reason) of messages the site's gateway should stop retransmitting
    rejections: list[tuple[str, str, int, str, bytes]] = field(default_factory=list)
    #: newly stored messages and their opened bodies, for the apps granted their topics
    for_apps: list[tuple[IngestItem, Any]] = field(default_factory=list)
    #: (sender, task id, attempt) of each stored part of a task result: the sender is still delivering it
    progress: list[tuple[str, Any, Any]] = field(default_factory=list)

    def extend(self, other: BatchResult) -> None:
        """Append ``other`` (the result of a later part of the same batch)."""
        self.results.extend(other.results)
        self.for_apps.extend(other.for_apps)
        self.progress.extend(other.progress)
        self.acks.extend(other.acks)
        self.changes.extend(other.changes)
        self.births.extend(other.births)
        self.rejections.extend(other.rejections)


@dataclass
class _Prepared:
    index: int
    item: IngestItem
    site: str
    invalid: str | None  # body problem: stored (the seq is used) but without effects, reason malformed
    body: Any = None  # the opened body, kept only when an app is granted the topic


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return INT_MIN <= v <= UINT_MAX
    return isinstance(v, float) and math.isfinite(v)


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= UINT_MAX


def check_storable(value: Any, what: str) -> None:
    """Raise :class:`BodyError` unless ``value`` can be stored as JSON (``cloud.store.to_json``) as is
    (:func:`cwsnet.envelope.storable_problem`: the rules the executors check before they send)."""
    why = storable_problem(value, what)
    if why is not None:
        raise BodyError(why)


def _notice_target(topic: str, sender: Any, seq: Any) -> str | None:
    """The site whose gateway gets a rejection notice for ``(sender, seq)``, or None if none can."""
    if not isinstance(sender, str) or not _uint(seq):
        return None
    try:
        topics.check_name(sender, "sender")
        return topics.parse(topic).site
    except TopicError:
        return None


def _is_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


class Ingest:
    """Sans-I/O cloud ingest. Thread-safe (one batch at a time)."""

    def __init__(
        self,
        endpoint: Endpoint,
        store: Store,
        metrics: CloudMetrics,
        *,
        directory: NodeDirectory | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        offline_after: float = 60.0,
        reject_event_interval: float = 10.0,
        for_apps: Callable[[str], bool] | None = None,
    ) -> None:
        #: ``for_apps(topic)``: True if an app is granted the topic (its stored messages are passed on)
        self.for_apps = for_apps
        self.endpoint = endpoint
        self.store = store
        self.metrics = metrics
        self.directory = directory if directory is not None else NodeDirectory(store)
        self.clock = clock
        self.timer = timer
        self.offline_after = offline_after
        self.rejections = RejectionLog(reject_event_interval)
        self._lock = threading.Lock()

    # public ------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> IngestResult:
        """Handle one message (a batch of one)."""
        return self.handle_batch([(topic, payload)]).results[0]

    def handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> BatchResult:
        """Open, check and store ``messages`` in one transaction; return results, acks and changes.

        Raises only if the store itself fails (then nothing was stored and nothing may be acked).
        """
        with self._lock:
            return self._handle_batch(messages)

    def sweep(self, now: float | None = None) -> list[dict[str, Any]]:
        """Mark nodes offline that sent nothing for ``offline_after`` s; flush rejection counts.

        Returns live-stream changes.
        """
        with self._lock:
            now = self.clock() if now is None else now
            cutoff = int((now - self.offline_after) * 1000)
            gone = self.store.mark_offline(seen_before=cutoff)
            events = [
                NewEvent(
                    ts=int(now * 1000),
                    source=node,
                    type="node.offline",
                    severity="warning",
                    message=f"{node} sent nothing for {self.offline_after:g} s; shown offline",
                    data={"reason": "timeout"},
                )
                for node in gone
            ]
            events.extend(self.rejections.flush(now))
            changes = [change("event", event_view(e)) for e in self.store.add_events(events)]
            for node_id in gone:
                node = self.store.get_node(node_id)
                if node is not None:
                    changes.append(change("device", node_view(node)))
            if gone:
                self._update_online_gauge()
            return changes

    def reject_unstorable(self, topic: str, payload: bytes, error: BaseException) -> BatchResult:
        """Give up on one message whose batch of one failed in the store for a non-transient reason.

        Counted and recorded as ``malformed`` (like a bad body), so the caller can acknowledge it
        and move on: one message the store cannot take must not stop ingest for the fleet. If its
        clear header names a ``(from, seq)`` the site's gateway gets a rejection notice for it.
        """
        with self._lock:
            now = self.clock()
            sender: str | None = None
            seq: int | None = None
            try:
                header = envelope.peek_header(payload)
                sender, seq = header.sender, header.seq
            except Exception:  # noqa: BLE001 - the header is only used to describe the message
                pass
            detail = f"the store cannot take it: {type(error).__name__}: {error}"[:300]
            self.metrics.rejected.labels(reason="malformed").inc()
            log.error("gave up on %s from=%.80s seq=%s: %s", topic[:200], sender, seq, detail)
            result = IngestResult("rejected", topic, reason="malformed", detail=detail, sender=sender, seq=seq)
            batch = BatchResult(results=[result])
            site = _notice_target(topic, sender, seq)
            if site is not None:
                assert sender is not None and seq is not None
                batch.rejections.append((site, sender, seq, "malformed", payload_digest(payload)))
            source = sender if sender is not None and self.directory.known(sender) else None
            ev = self.rejections.record(now, source=source, reason="malformed", topic=topic, detail=detail, seq=seq)
            if ev is not None:
                try:
                    batch.changes.extend(change("event", event_view(e)) for e in self.store.add_events([ev]))
                except Exception:
                    log.exception("recording the rejection of %s failed", topic[:200])
            return batch

    def update_gauges(self) -> None:
        self._update_online_gauge()

    # internals ---------------------------------------------------------------------------------

    def _update_online_gauge(self) -> None:
        self.metrics.devices_online.set(self.store.count_nodes(role="device", online=True))

    def _handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> BatchResult:
        now = self.clock()
        received = int(now * 1000)
        results: list[IngestResult | None] = [None] * len(messages)
        prepared: list[_Prepared] = []
        events: list[NewEvent] = []

        rejected: list[IngestResult] = []  # counted and recorded only once the batch has committed

        digests: dict[int, bytes] = {}

        def reject(i: int, topic: str, exc: EnvelopeError | None, reason: str, detail: str) -> None:
            sender = exc.sender if exc is not None else None
            seq = exc.seq if exc is not None and _uint(exc.seq) else None  # a bignum must not reach the store
            r = IngestResult("rejected", topic, reason=reason, detail=detail, sender=sender, seq=seq)
            results[i] = r
            rejected.append(r)
            digests[id(r)] = payload_digest(messages[i][1])

        for i, (topic, payload) in enumerate(messages):
            try:
                prepared.append(self._prepare(i, topic, payload, received))
            except EnvelopeError as exc:
                reject(i, topic, exc, exc.reason, str(exc))
            except Exception as exc:  # a bug must not stop ingest; the message is dropped and recorded
                log.exception("unexpected error ingesting a message on %s", topic)
                reject(i, topic, None, "malformed", f"internal error: {type(exc).__name__}")

        t0 = self.timer()
        outcomes = self.store.ingest_batch([p.item for p in prepared])  # raises: nothing happened
        self.metrics.ingest_seconds.observe(self.timer() - t0)

        for r in rejected:
            assert r.reason is not None
            self.metrics.rejected.labels(reason=r.reason).inc()
            source = r.sender if r.sender is not None and self.directory.known(r.sender) else None
            ev = self.rejections.record(
                now, source=source, reason=r.reason, topic=r.topic, detail=r.detail or "", seq=r.seq
            )
            # logged like the events: once per (source, reason) window at INFO, the rest at DEBUG
            log.log(
                logging.INFO if ev is not None else logging.DEBUG,
                "rejected %s from=%.80s seq=%s reason=%s: %.300s",
                r.topic[:200], r.sender, r.seq, r.reason, r.detail,
            )
            if ev is not None:
                events.append(ev)

        batch = BatchResult(results=[])
        for r in rejected:
            if r.reason in NOTICE_REASONS:
                site = _notice_target(r.topic, r.sender, r.seq)
                if site is not None:
                    assert r.sender is not None and r.seq is not None
                    batch.rejections.append((site, r.sender, r.seq, r.reason, digests[id(r)]))
        changed_nodes: list[str] = []
        changed_tasks: list[str] = []
        for p, out in zip(prepared, outcomes, strict=True):
            item = p.item
            self.metrics.received.labels(kind=item.kind).inc()
            batch.acks.append((p.site, item.sender, item.seq))
            base = {
                "topic": item.topic,
                "sender": item.sender,
                "seq": item.seq,
                "kind": item.kind,
                "site": p.site,
                "trace": item.trace,
                "ack": True,
            }
            trace = f" trace={item.trace}" if item.trace else ""
            if out.outcome == "duplicate":
                self.metrics.duplicates.inc()
                self.metrics.rejected.labels(reason="replay").inc()
                detail = f"({item.sender}, {item.seq}) is already stored"
                ev = self.rejections.record(
                    now, source=item.sender, reason="replay", topic=item.topic, detail=detail, seq=item.seq
                )
                if ev is not None:
                    events.append(ev)
                log.debug("duplicate %s from=%s seq=%d%s", item.topic, item.sender, item.seq, trace)
                results[p.index] = IngestResult("duplicate", reason="replay", detail=detail, **base)
                continue
            if p.invalid is not None:
                self.metrics.rejected.labels(reason="malformed").inc()
                ev = self.rejections.record(
                    now, source=item.sender, reason="malformed", topic=item.topic, detail=p.invalid, seq=item.seq
                )
                if ev is not None:
                    events.append(ev)
                log.info("malformed body %s from=%s seq=%d%s: %s", item.topic, item.sender, item.seq, trace, p.invalid)
                results[p.index] = IngestResult("rejected", reason="malformed", detail=p.invalid, **base)
                continue
            # traced messages (task commands and results) are logged at INFO so one id follows them
            log.log(logging.INFO if item.trace else logging.DEBUG, "stored %s from=%s seq=%d kind=%s%s",
                    item.topic, item.sender, item.seq, item.kind, trace)
            results[p.index] = IngestResult("stored", **base)
            if item.part is not None or (item.task is not None and item.task.ref is not None):
                # a parted result goes on only once whole (the final's body, with its result); each part
                # renews the sender's lease on a scheduled task while the rest of it comes
                batch.for_apps.extend((item, body) for body in out.completed)
                changed_tasks.extend(body["task_id"] for body in out.completed)
                if item.part is not None and p.body is not None:
                    batch.progress.append((item.sender, p.body.get("task_id"), p.body.get("attempt")))
            elif p.body is not None:
                batch.for_apps.append((item, p.body))
            if item.readings:
                self.metrics.readings.inc(len(item.readings))
                batch.changes.append(
                    change(
                        "telemetry",
                        {
                            "node": item.sender,
                            "stream": item.stream,
                            "seq": item.seq,
                            "items": [
                                {"ts": r.ts, "seq": item.seq, "idx": i, "stream": item.stream, "values": r.values}
                                for i, r in enumerate(item.readings)
                            ],
                        },
                    )
                )
            if item.event is not None:
                batch.changes.append(change("event", event_view(item.event)))
            if out.node_changed:
                changed_nodes.append(item.sender)
                st = item.status
                if st is not None and st.kind == "birth":
                    batch.births.append(item.sender)
                    agent = st.agent or {}
                    events.append(
                        NewEvent(
                            ts=received,
                            source=item.sender,
                            type="node.online",
                            severity="info",
                            message=f"{item.sender} connected"
                            + (f" ({agent.get('kind')} agent {agent.get('version')})" if agent else ""),
                            data={"seq": item.seq, "will_seq": st.will_seq},
                        )
                    )
                elif st is not None and st.kind == "death":
                    events.append(
                        NewEvent(
                            ts=received,
                            source=item.sender,
                            type="node.offline",
                            severity="warning",
                            message=f"{item.sender} disconnected",
                            data={"reason": "death", "seq": item.seq},
                        )
                    )
            if out.site_task_changed and item.site_task is not None:  # a gateway's mirror (never scheduled here)
                changed_tasks.append(item.site_task.task_id)
            elif item.site_task is not None:
                log.debug("site task report %s -> %s from %s seq %d changes nothing (an older report than the one "
                          "applied, or the id is another site's or kind's)", item.site_task.task_id,
                          item.site_task.state, item.sender, item.seq)
            if out.task_state is not None:  # (a part can complete a final that waited for it)
                self.metrics.tasks.labels(state=out.task_state).inc()
                if item.task is not None:
                    changed_tasks.append(item.task.task_id)
            elif item.task is not None:  # a scheduled task's report is the scheduler's (cloud/tasks.py)
                log.debug(
                    "task report %s -> %s from %s not a direct task's move (scheduled, unknown, other target or "
                    "not allowed now)",
                    item.task.task_id,
                    item.task.state,
                    item.sender,
                )

        # The batch is committed: what follows is bookkeeping (events, live changes, gauges). If it
        # fails, the batch's outcome must still be returned, or a retry would see only duplicates
        # and lose the births, acks and task dispatches that belong to it.
        try:
            for ev in self.store.add_events(events):
                batch.changes.append(change("event", event_view(ev)))
            for node_id in dict.fromkeys(changed_nodes):
                node = self.store.get_node(node_id)
                if node is not None:
                    batch.changes.append(change("device", node_view(node)))
            for task_id in dict.fromkeys(changed_tasks):
                task = self.store.get_task(task_id)
                if task is not None:
                    batch.changes.append(change("task", task_view(task)))
                    if task.kind == "direct" and task.state in TERMINAL_TASK_STATES:  # (its device's final report)
                        self.metrics.task_seconds.labels(kind="direct", state=task.state).observe(
                            max(0, task.updated - task.created) / 1000)
            if changed_nodes:
                self._update_online_gauge()
        except Exception:
            log.exception("batch of %d messages stored, but recording its %d events / live changes failed",
                          len(messages), len(events))
        batch.results = [r for r in results if r is not None]
        return batch

    def _open(self, topic: str, payload: bytes) -> Opened:
        try:
            return self.endpoint.open(payload, topic)
        except ForgedEnvelope as exc:
            # The sender's key may have been rotated since the cache was filled: reload and retry once.
            if exc.sender is not None and self.directory.refresh():
                return self.endpoint.open(payload, topic)
            raise

    def _prepare(self, index: int, topic: str, payload: bytes, received: int) -> _Prepared:
        if not isinstance(payload, bytes | bytearray):
            raise MalformedEnvelope("payload is not bytes")
        opened = self._open(topic, bytes(payload))
        h = opened.header
        kw = {"sender": h.sender, "seq": h.seq}
        # rule 7: uplink topic names the sender, on the sender's registered site, on the kind's channel
        try:
            parts = topics.parse(topic)
        except TopicError as exc:
            raise TopicMismatch(str(exc), **kw) from None
        offload = parts.channel == topics.OFFLOAD_CHANNEL
        if not parts.uplink and not offload:
            raise TopicMismatch(f"{topic!r} is not an uplink topic", **kw)
        if parts.node != h.sender:
            raise TopicMismatch(f"topic node {parts.node!r} is not the sender {h.sender!r}", **kw)
        entry = self.directory.get(h.sender)
        if entry is None:  # it opened, so it was registered a moment ago; removed since
            raise UnknownSender(f"sender {h.sender!r} is not registered", **kw)
        if entry.role not in ("device", "gateway"):  # an app's or the cloud's key sends no device data
            raise TopicMismatch(f"{h.sender!r} is a{'n' * (entry.role == 'app')} {entry.role}: it sends no "
                                f"{h.kind} messages", **kw)
        if parts.site != entry.site:
            raise TopicMismatch(
                f"topic site {parts.site!r} is not {h.sender!r}'s registered site {entry.site!r}", **kw
            )
        if offload:
            if h.kind != OFFLOAD_KIND:
                raise TopicMismatch(f"a {h.kind!r} message does not belong on channel {parts.channel!r}", **kw)
            if entry.role != "gateway":  # only a site's gateway schedules site tasks: nothing else offloads
                raise TopicMismatch(f"{h.sender!r} is a {entry.role}: only a gateway of site {entry.site!r} offloads "
                                    "site tasks to the cloud", **kw)
        elif h.kind not in UPLINK_KINDS or KINDS[h.kind] != parts.channel:
            raise TopicMismatch(f"a {h.kind!r} message does not belong on channel {parts.channel!r}", **kw)

        invalid = None
        ts = h.ts
        if not _uint(ts):  # the envelope checks it too; the store must never see it out of range
            invalid, ts = "header field 'ts' must be uint ms below 2^63", received
        item = IngestItem(
            sender=h.sender,
            seq=h.seq,
            msg_id=h.msg_id,
            kind=h.kind,
            topic=topic,
            ts=ts,
            received=received,
            trace=h.trace,
            kv=h.key_version,
            expires=h.expires if _uint(h.expires) else None,
        )
        if invalid is None:
            try:
                item = self._effects(item, parts, opened.body, received, entry)
            except BodyError as exc:
                invalid = str(exc)
        wanted = self.for_apps is not None and invalid is None and self.for_apps(topic)
        if wanted:  # apps get only what can be re-encoded as is (no NaN, tags, odd keys, cycles)
            try:
                check_storable(opened.body, f"{h.kind} body")
            except BodyError as exc:
                log.info("%s seq %d from %s not passed to apps: %s", h.kind, h.seq, h.sender, exc)
                wanted = False
        return _Prepared(index, item, parts.site, invalid, opened.body if wanted else None)

    def _effects(self, item: IngestItem, parts: topics.TopicParts, body: Any, received: int,
                 entry: NodeKey) -> IngestItem:
        if not _is_map(body):
            raise BodyError(f"{item.kind} body must be a map with text keys, got {type(body).__name__}")
        if parts.channel == topics.OFFLOAD_CHANNEL:
            _check_offload(body)
            return item  # no effect in the store: the stored body goes to the site offload runner
        if item.kind == "task_result" and "site_task" in body:
            report = _site_task_report(body, item.sender, entry)
            origin = self.directory.get(report.origin)
            if origin is None or origin.role != "device" or origin.site != entry.site:
                # a gateway reports only its own site's devices' tasks (it could otherwise claim another site's ids)
                raise BodyError(f"site_task origin {report.origin!r} is not a device of site {entry.site!r}")
            return replace(item, site_task=report)
        if item.kind in ("birth", "status", "death"):
            state = body.get("state", "offline" if item.kind == "death" else "online")
            if state not in ("online", "offline"):
                raise BodyError(f"status field 'state' must be 'online' or 'offline', got {state!r}")
            will_seq = body.get("will_seq")
            if will_seq is not None and not _uint(will_seq):
                raise BodyError("status field 'will_seq' must be an unsigned integer below 2^63")
            agent = body.get("agent")
            if agent is not None and not _is_map(agent):
                raise BodyError("status field 'agent' must be a map")
            check_storable(body, "status body")
            online = item.kind != "death" and state == "online"
            update = StatusUpdate(
                kind=item.kind,  # type: ignore[arg-type]
                online=online,
                body=body,
                will_seq=will_seq if item.kind == "birth" else None,
                agent=agent,
            )
            return replace(item, status=update)
        if item.kind == "telemetry":
            stream = body.get("stream")
            if stream != parts.sub:
                raise BodyError(f"telemetry stream {stream!r} is not the topic's stream {parts.sub!r}")
            readings = body.get("readings")
            if not isinstance(readings, list):
                raise BodyError("telemetry field 'readings' must be an array")
            out = []
            for n, r in enumerate(readings):
                if not _is_map(r) or not _uint(r.get("ts")) or not _is_map(r.get("values")):
                    raise BodyError(f"reading {n} must be a map with 'ts' (uint ms below 2^63) and 'values' (map)")
                for name, v in r["values"].items():
                    if not (_is_number(v) or isinstance(v, str)):
                        raise BodyError(
                            f"reading {n} value {name[:40]!r} must be a finite 64-bit number, text or bool, "
                            f"got {type(v).__name__}"
                        )
                out.append(Reading(ts=r["ts"], values=r["values"]))
            return replace(item, stream=stream, readings=tuple(out))
        if item.kind == "event":
            etype, severity, message = body.get("type"), body.get("severity", "info"), body.get("message", "")
            data = body.get("data", {})
            if etype != parts.sub:
                raise BodyError(f"event type {etype!r} is not the topic's event type {parts.sub!r}")
            if severity not in SEVERITIES:
                raise BodyError(f"event severity must be one of {SEVERITIES}, got {severity!r}")
            if not isinstance(message, str):
                raise BodyError("event field 'message' must be text")
            if data is None:
                data = {}
            if not _is_map(data):
                raise BodyError("event field 'data' must be a map")
            check_storable(data, "event data")
            data = json.loads(to_json(data) or "{}")  # bytes become base64: JSON-safe for the API
            ts = item.ts if item.ts > 0 else received
            return replace(
                item,
                event=NewEvent(ts=ts, source=item.sender, type=etype, severity=severity, message=message, data=data),
            )
        if item.kind == "task_result":
            task_id, state = body.get("task_id"), body.get("state")
            if not isinstance(task_id, str) or not task_id:
                raise BodyError("task_result field 'task_id' must be non-empty text")
            if body.get("attempt") is not None and not _uint(body["attempt"]):
                raise BodyError("task_result field 'attempt' must be uint or null")
            if "part" in body:  # one part of a result too big for one message (protocol §3, "Parts")
                try:
                    return replace(item, part=(name_of(task_id, body.get("attempt")),
                                               Part.parse(body["part"], "task_result part")))
                except PartError as exc:
                    raise BodyError(str(exc)) from None
            ref = None
            if body.get("result_ref") is not None:
                if state != "succeeded" or body.get("result") is not None:
                    raise BodyError("task_result field 'result_ref' goes only with state succeeded and no result")
                try:
                    ref = Ref.parse(body["result_ref"], "task_result result_ref")
                except PartError as exc:
                    raise BodyError(str(exc)) from None
            if state not in REPORTED_TASK_STATES:
                raise BodyError(f"task_result state must be one of {REPORTED_TASK_STATES}, got {state!r}")
            error = body.get("error")
            if error is not None and not isinstance(error, str):
                raise BodyError("task_result field 'error' must be text or null")
            for name in ("started", "finished"):
                if body.get(name) is not None and not _uint(body[name]):
                    raise BodyError(f"task_result field {name!r} must be uint ms below 2^63 or null")
            check_storable(body.get("result"), "task_result result")
            if state == "checkpoint" and not isinstance(body.get("checkpoint"), dict):
                raise BodyError("task_result state checkpoint needs a map 'checkpoint'")
            check_storable(body.get("checkpoint"), "task_result checkpoint")
            return replace(
                item,
                task=TaskReport(
                    task_id=task_id,
                    state=state,
                    result=body.get("result"),
                    error=error,
                    started=body.get("started"),
                    finished=body.get("finished"),
                    ref=ref,
                    body=body if ref is not None else None,
                ),
            )
        raise BodyError(f"kind {item.kind!r} is not an uplink kind")  # unreachable: rule 7 checked it



def _check_offload(body: dict[str, Any]) -> None:
    """A gateway's offload (a ``task_cmd`` on its ``task/offload``, protocol §3): the fields the cloud
    needs to take it once per ``(task_id, attempt)``. ``handler`` and ``args`` are checked when it is run
    (a bad one is answered ``failed``, as the gateway's own pool does)."""
    task_id = body.get("task_id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= 200:
        raise BodyError("task_cmd field 'task_id' must be text of 1..200 characters")
    if "cancel" in body and not isinstance(body["cancel"], bool):
        raise BodyError("task_cmd field 'cancel' must be a bool")
    if body.get("attempt") is not None and not _uint(body["attempt"]):
        raise BodyError("task_cmd field 'attempt' must be uint or null")
    if body.get("deadline") is not None and not _uint(body["deadline"]):
        raise BodyError("task_cmd field 'deadline' must be uint ms below 2^63 or null")
    if body.get("checkpoint") is not None and not _is_map(body["checkpoint"]):
        raise BodyError("task_cmd field 'checkpoint' must be a map or null")
    check_storable(body, "task_cmd body")  # what the handler gets must be what a JSON store keeps


def _site_task_report(body: dict[str, Any], gateway: str, entry: NodeKey) -> SiteTaskReport:
    """Check a gateway's mirror of a site task (protocol §3, "The mirror"); :class:`BodyError` names the
    field at fault. The task id must be the one its origin and key make, so a gateway cannot write over
    another site's task (the store also keeps each row to its site)."""
    if entry.role != "gateway":
        raise BodyError(f"task_result field 'site_task': {gateway!r} is a {entry.role}; only a gateway mirrors "
                        "site tasks")
    st = body["site_task"]
    if not _is_map(st):
        raise BodyError("task_result field 'site_task' must be a map")
    task_id, state = body.get("task_id"), body.get("state")
    if not isinstance(task_id, str) or not _SITE_TASK_ID.match(task_id):
        raise BodyError("task_result field 'task_id' of a site task must be 's-' and 24 lowercase hex digits")
    if state not in SITE_TASK_STATES:
        raise BodyError(f"task_result state of a site task must be one of {SITE_TASK_STATES}, got {state!r}")
    result, error = body.get("result"), body.get("error")
    if result is not None and not _is_map(result):
        raise BodyError("task_result field 'result' must be a map or null")
    check_storable(result, "task_result result")
    if error is not None and not isinstance(error, str):
        raise BodyError("task_result field 'error' must be text or null")
    origin, key = st.get("origin"), st.get("key")
    try:
        topics.check_name(origin, "site_task field 'origin'")
    except TopicError as exc:
        raise BodyError(str(exc)) from None
    if not isinstance(key, str) or not _SITE_TASK_KEY.match(key):
        raise BodyError("site_task field 'key' must be 1-128 characters from A-Z a-z 0-9 _ . : -")
    if task_id != "s-" + hashlib.sha256(f"{origin}/{key}".encode()).hexdigest()[:24]:
        raise BodyError(f"task_id {task_id!r} is not the id of {origin!r}'s submission {key!r} "
                        "('s-' + the first 24 hex digits of SHA-256(origin/key))")
    handler, priority, data_class, node = st.get("handler"), st.get("priority"), st.get("data_class"), st.get("node")
    if not isinstance(handler, str) or not 0 < len(handler) <= 200:
        raise BodyError("site_task field 'handler' must be text of 1..200 characters")
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 9:
        raise BodyError("site_task field 'priority' must be an integer 0..9")
    for name, value in (("data_class", data_class), ("node", node)):
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise BodyError(f"site_task field {name!r} must be text (at most 200 characters) or null")
    attempts, submitted, finished = st.get("attempts"), st.get("submitted"), st.get("finished")
    for name, value, nullable in (("attempts", attempts, False), ("submitted", submitted, False),
                                  ("finished", finished, True)):
        if not (_uint(value) or (nullable and value is None)):
            raise BodyError(f"site_task field {name!r} must be uint{' or null' if nullable else ''}")
    explain = st.get("explain")
    if not isinstance(explain, str):
        raise BodyError("site_task field 'explain' must be text")
    return SiteTaskReport(
        task_id=task_id, state=state, gateway=gateway, site=entry.site, origin=origin, key=key, handler=handler,
        priority=priority, data_class=data_class, node=node, attempts=attempts, submitted=submitted,
        finished=finished, explain=explain, result=result, error=error,
    )
