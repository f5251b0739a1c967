"""QoS policies: rate limits per device and channel, priorities, retention. Sans-I/O.

    kind: qos
    name: default-qos
    rules:
      - name: device-rate
        limit: {rate: 100/s, burst: 500, over: pause}     # token bucket per (rule, device)
        match: {role: device, channels: [status, telemetry, event, task_result]}
      - name: results-first
        priority: 8                                       # 0 (lowest) .. 9 (highest); unmatched: 5
        match: {channels: [task_result, event]}
      - name: keep-telemetry-90d
        retention: 90d                                    # the cloud deletes older readings
        match: {channels: [telemetry], streams: ["*"]}

Each rule has exactly one purpose (``limit``, ``priority`` or ``retention``). For each purpose the
first matching rule of an enforced policy decides, policies in name order and rules in file order;
each ``audit`` policy's first matching rule is evaluated too and reported, never applied.

:class:`QosEngine` is what the enforcers call: the gateway's bridge asks :meth:`QosEngine.admit`
for every device message before storing it (``pause``: not custody-acked, the device is told to
wait ``retry_after`` seconds and keeps the message; ``drop``: taken and discarded, counted), the
outboxes and the uplink order by :meth:`QosEngine.priority`, and the cloud's sweeper deletes what
is older than :meth:`QosEngine.retention`. Rate limits are token buckets per (rule, site, node),
so a device that floods only empties its own bucket; the caller passes ``now`` (monotonic seconds).
"""

from __future__ import annotations

import fnmatch
import heapq
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, StrictInt, field_validator, model_validator

from cwsnet.policy.cel import Condition
from cwsnet.policy.loader import PolicySet
from cwsnet.policy.schema import (
    PolicyBase,
    Strict,
    _name,
    condition,
    duration,
    register_kind,
    role_pattern,
)

#: the channels a qos rule can match (``task_result`` is the ``task/result`` topic)
CHANNELS = ("status", "telemetry", "event", "task_result")
#: the priority of a message no enforced priority rule matches
DEFAULT_PRIORITY = 5
#: a paused device is told to wait at least this long (seconds), so it does not hammer the gateway
MIN_RETRY = 1.0
#: at most this many token buckets are kept; above it, idle full buckets are forgotten (losslessly),
#: then the oldest, down to 90 %
MAX_BUCKETS = 100_000
#: at most this many (site, node, role, channel, stream) match results are cached
MAX_CACHE = 100_000
MAX_RATE = 1_000_000.0  # messages per second

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
_EPS = 1e-9


def parse_rate(v: object) -> float:
    """Messages per second from ``50/s``, ``600/m`` or ``1000/h``."""
    m = _RATE.match(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError("rate must be a number of messages per second, minute or hour, like 50/s, 600/m or 1000/h")
    per_second = float(m.group(1)) / _PER[m.group(2)]
    if not 0 < per_second <= MAX_RATE:
        raise ValueError(f"rate must be more than 0 and at most {MAX_RATE:.0f}/s")
    return per_second


# ---- the schema ------------------------------------------------------------------------------------


class QosMatch(Strict):
    role: str = Field("*", description="device, gateway, app, operator, cloud, or * for any")
    node: str = Field("*", description="fnmatch pattern over the sending node's id")
    site: str = Field("*", description="fnmatch pattern over the node's site")
    channels: list[Literal["status", "telemetry", "event", "task_result"]] = Field(
        list(CHANNELS), min_length=1, description="status, telemetry, event, task_result; default: all")
    streams: list[str] = Field(["*"], min_length=1, description="fnmatch patterns over the telemetry stream or the "
                                                               "event type; * also matches a message without one")
    when: str | None = Field(None, description="a CEL condition over subject (id, role, site), channel and stream")

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        return role_pattern(v)

    @field_validator("when")
    @classmethod
    def _when(cls, v: str | None) -> str | None:
        return condition(v)


class Limit(Strict):
    rate: str = Field(description="messages per second, minute or hour: 50/s, 600/m, 1000/h")
    burst: StrictInt | None = Field(None, ge=1, le=10_000_000, description="the bucket's size: messages a device "
                                                                         "may send at once; default max(1, rate/s)")
    over: Literal["pause", "drop"] = Field("pause", description="pause: refused, the device keeps the message and "
                                                                 "waits; drop: taken and discarded, counted")

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> str:
        parse_rate(v)
        return v.strip()

    @property
    def per_second(self) -> float:
        return parse_rate(self.rate)

    @property
    def size(self) -> int:
        """The bucket's size (``burst``, or the rate per second rounded down, at least 1)."""
        return self.burst if self.burst is not None else max(1, int(self.per_second))


class QosRule(Strict):
    name: str
    match: QosMatch = Field(default_factory=QosMatch)
    limit: Limit | None = None
    priority: StrictInt | None = Field(None, ge=0, le=9, description="0 (lowest) .. 9 (highest); unmatched: 5")
    retention: float | None = Field(None, description="the cloud deletes stored data older than this (>= 1m)")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name(v)

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, v: Any) -> float | None:
        if v is None:
            return None
        s = duration(v, "retention")
        if s < 60:
            raise ValueError("retention must be at least 1m")
        return s

    @model_validator(mode="after")
    def _one_purpose(self) -> QosRule:
        if sum(x is not None for x in (self.limit, self.priority, self.retention)) != 1:
            raise ValueError("exactly one of limit, priority, retention")
        return self

    @property
    def purpose(self) -> str:
        return "limit" if self.limit is not None else "priority" if self.priority is not None else "retention"


class QosPolicy(PolicyBase):
    kind: Literal["qos"]
    rules: list[QosRule] = Field(min_length=1)


register_kind("qos", QosPolicy)


# ---- verdicts --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditNote:
    """What an audit-mode policy's rule would have decided (reported, never applied)."""

    policy: str
    rule: str
    source: str
    action: str  # "admit", "pause", "drop"; "priority"; "retention"
    detail: str

    def __str__(self) -> str:
        return f"{self.policy}/{self.rule} would {self.detail}"


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    action: str  # "admit" | "pause" | "drop" (priority and retention verdicts: "admit")
    policy: str | None = None
    rule: str | None = None
    source: str | None = None  # file:line of the deciding rule
    retry_after: float = 0.0  # pause: seconds the device waits before sending again
    priority: int | None = None
    keep_s: float | None = None  # retention: seconds to keep; None: kept until deleted
    audit: list[AuditNote] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    purpose: str = "limit"  # "limit", "priority", "retention"
    subject: str = ""  # "device dev-7 (site home) telemetry/env"
    detail: str = ""  # what the deciding rule found ("over 50/s (burst 100): ...")

    @property
    def decided_by(self) -> str | None:
        return f"{self.policy}/{self.rule}" if self.rule else None

    def explain(self) -> str:
        if self.purpose == "priority":
            head = f"PRIORITY {self.priority}"
        elif self.purpose == "retention":
            head = "KEEP FOREVER" if self.keep_s is None else f"KEEP {human(self.keep_s)}"
        else:
            head = self.action.upper()
        lines = [f"{head}: {self.subject}"]
        if self.rule is None:
            lines.append({"limit": "  no enforced limit rule matches: admitted without a limit",
                          "priority": f"  no enforced priority rule matches: the default priority {DEFAULT_PRIORITY}",
                          "retention": "  no enforced retention rule matches: kept until deleted by hand"}
                         [self.purpose])
        else:
            lines.append(f"  decided by {self.decided_by} ({self.source})")
            if self.detail:
                lines.append(f"  {self.detail}")
            if self.action == "pause":
                lines.append(f"  the device keeps the message and waits {self.retry_after:.1f} s")
            elif self.action == "drop":
                lines.append("  the message is taken and discarded (counted as dropped)")
        lines += [f"  audit: {a}; not enforced" for a in self.audit]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def human(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


def _subject(site: str | None, node: str | None, role: str | None, channel: str, stream: str | None) -> str:
    what = f"{channel}/{stream}" if stream else channel
    if node is None:
        return what if site is None else f"{what} (site {site})"
    return f"{role or 'node'} {node} (site {site or '?'}) {what}"


# ---- the engine ------------------------------------------------------------------------------------


def _matcher(patterns: list[str]) -> Callable[[str], Any]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


@dataclass(eq=False)
class _Rule:
    index: int
    policy: str
    mode: str
    source: str
    rule: QosRule
    cond: Condition | None
    node: Callable[[str], Any] | None  # None: "*"
    site: Callable[[str], Any] | None
    streams: Callable[[str], Any] | None  # None: ["*"] (matches a message without a stream too)
    channels: frozenset[str]
    rate: float = 0.0
    size: int = 0
    text: str = ""  # "50/s (burst 100)"

    @property
    def name(self) -> str:
        return f"{self.policy}/{self.rule.name}"


@dataclass(frozen=True, slots=True)
class RetentionRule:
    """One enforced retention rule, in the order they apply (the first matching one decides)."""

    policy: str
    rule: str
    source: str
    match: QosMatch
    keep_s: float


@dataclass(slots=True)
class _Plan:
    """What applies to one (site, node, role, channel, stream), worked out once."""

    limit: _Rule | None
    audit: tuple[_Rule, ...]
    notes: list[str]
    admit: Verdict  # the verdict of an admitted message (shared: nothing in it changes per message)
    subject: str


class QosEngine:
    """Rate limits, priorities and retention from the ``qos`` policies of a set.

    ``previous``: the engine this one replaces (a policy reload); the buckets and counts of the
    limit rules that are unchanged (same policy, rule name, rate and burst) carry over, so a reload
    does not hand every device a fresh burst.
    """

    def __init__(self, pset: PolicySet, *, previous: QosEngine | None = None, max_buckets: int = MAX_BUCKETS) -> None:
        self.digest = pset.digest
        self.max_buckets = max_buckets
        self._rules: list[_Rule] = []
        for loaded in sorted(pset.of_kind("qos"), key=lambda lp: lp.policy.name):
            p = loaded.policy
            for r in p.rules:
                m = r.match
                x = _Rule(len(self._rules), p.name, p.mode, loaded.rule_sources.get(r.name, loaded.source), r,
                          Condition(m.when) if m.when else None,
                          None if m.node == "*" else _matcher([m.node]),
                          None if m.site == "*" else _matcher([m.site]),
                          None if "*" in m.streams else _matcher(m.streams), frozenset(m.channels))
                if r.limit is not None:
                    x.rate, x.size = r.limit.per_second, r.limit.size
                    x.text = f"{r.limit.rate} (burst {x.size})"
                self._rules.append(x)
        self._limits = [x for x in self._rules if x.rule.limit is not None]
        self._plans: dict[tuple[str, str, str, str, str | None], _Plan] = {}
        self._other: dict[tuple[Any, ...], Verdict] = {}
        #: (rule index, site, node) -> [tokens, last refill time]
        self._buckets: dict[tuple[int, str, str], list[float]] = {}
        #: rule index -> [admitted, refused (paused), dropped]
        self._counts: dict[int, list[int]] = {x.index: [0, 0, 0] for x in self._limits}
        if previous is not None:
            self._adopt(previous)

    # ---- matching ----------------------------------------------------------------------------

    @staticmethod
    def _key(x: _Rule) -> tuple[str, str, str, float, int]:
        return (x.policy, x.rule.name, x.mode, x.rate, x.size)

    def _adopt(self, old: QosEngine) -> None:
        mine = {self._key(x): x.index for x in self._limits}
        moved = {x.index: mine[self._key(x)] for x in old._limits if self._key(x) in mine}
        for (i, site, node), bucket in old._buckets.items():
            if i in moved:
                self._buckets[(moved[i], site, node)] = list(bucket)
        for i, j in moved.items():
            self._counts[j] = list(old._counts[i])

    def _applies(self, x: _Rule, site: str | None, node: str | None, role: str | None, channel: str,
                 stream: str | None, notes: list[str]) -> bool:
        """Whether rule ``x`` matches; a ``None`` site, node or role is unknown (the rule must say ``*``)."""
        m = x.rule.match
        if channel not in x.channels:
            return False
        if x.streams is not None and (stream is None or not x.streams(stream)):
            return False
        if m.role != "*" and m.role != role:
            return False
        if x.node is not None and (node is None or not x.node(node)):
            return False
        if x.site is not None and (site is None or not x.site(site)):
            return False
        if x.cond is not None:
            ok, err = x.cond.evaluate({"subject": {"id": node or "", "role": role or "", "site": site or ""},
                                       "channel": channel, "stream": stream or ""})
            if err is not None:
                notes.append(f"{x.name}: condition failed to evaluate ({err}); not applied")
            return ok
        return True

    def _first(self, purpose: str, site: str | None, node: str | None, role: str | None, channel: str,
               stream: str | None, notes: list[str]) -> tuple[_Rule | None, list[_Rule]]:
        """The deciding enforced rule for ``purpose``, and each audit policy's first matching rule."""
        decided: _Rule | None = None
        audit: list[_Rule] = []
        audited: set[str] = set()
        for x in self._rules:
            if x.rule.purpose != purpose or (x.mode == "enforce" and decided is not None) or x.policy in audited:
                continue
            if not self._applies(x, site, node, role, channel, stream, notes):
                continue
            if x.mode == "enforce":
                decided = x
            else:
                audit.append(x)
                audited.add(x.policy)
        return decided, audit

    def _plan(self, key: tuple[str, str, str, str, str | None]) -> _Plan:
        site, node, role, channel, stream = key
        notes: list[str] = []
        limit, audit = self._first("limit", site, node, role, channel, stream, notes)
        subject = _subject(site, node, role, channel, stream)
        if limit is None:
            admit = Verdict(True, "admit", notes=notes, subject=subject)
        else:
            admit = Verdict(True, "admit", limit.policy, limit.rule.name, limit.source, notes=notes,
                            subject=subject, detail=f"within {limit.text}")
        plan = _Plan(limit, tuple(audit), notes, admit, subject)
        if len(self._plans) >= MAX_CACHE:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    # ---- rate limits -------------------------------------------------------------------------

    def _take(self, x: _Rule, site: str, node: str, now: float, n: int) -> float:
        """Take ``n`` tokens from (x, site, node)'s bucket: 0.0 if taken, else seconds until they are there.

        A bucket starts full. ``n`` larger than the bucket is taken from a full bucket, which goes
        into debt, so the rate holds on average."""
        key = (x.index, site, node)
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_buckets:
                self._evict(now)
            b = self._buckets[key] = [float(x.size), now]
        elif now > b[1]:
            b[0] = min(float(x.size), b[0] + (now - b[1]) * x.rate)
            b[1] = now
        need = min(n, x.size)
        if b[0] + _EPS >= need:
            b[0] -= n
            return 0.0
        return (need - b[0]) / x.rate

    def _evict(self, now: float) -> None:
        """Forget the buckets that have refilled (a new bucket starts full: nothing changes); if that is
        not enough, the fullest ones too, down to 90 % of the bound (a flooding device's bucket is
        nearly empty: it is the last to go)."""
        by_index = {x.index: x for x in self._limits}
        fill = {k: min(1.0, (tokens + max(0.0, now - last) * by_index[k[0]].rate) / by_index[k[0]].size)
                for k, (tokens, last) in self._buckets.items()}
        for k, f in fill.items():
            if f >= 1.0 - _EPS:
                del self._buckets[k]
        excess = len(self._buckets) - int(self.max_buckets * 0.9)
        if excess > 0:
            for k in heapq.nlargest(excess, self._buckets, key=fill.__getitem__):
                del self._buckets[k]

    def admit(self, *, site: str, node: str, role: str, channel: str, stream: str | None, now: float,
              n: int = 1) -> Verdict:
        """May ``node`` hand over ``n`` more messages on ``channel`` (``stream``: the telemetry stream or
        event type) at ``now`` (monotonic seconds)? ``admit``, or over the limit: ``pause`` (refuse, the
        device retries after ``retry_after`` s) or ``drop`` (take and discard)."""
        key = (site, node, role, channel, stream)
        plan = self._plans.get(key) or self._plan(key)
        x = plan.limit
        audit: list[AuditNote] = []
        for a in plan.audit:
            wait = self._take(a, site, node, now, n)
            c = self._counts[a.index]
            if wait == 0.0:
                c[0] += n
                audit.append(AuditNote(a.policy, a.rule.name, a.source, "admit", f"admit (within {a.text})"))
            else:
                over = a.rule.limit.over  # type: ignore[union-attr]
                c[1 if over == "pause" else 2] += n
                audit.append(AuditNote(a.policy, a.rule.name, a.source, over,
                                       f"{over} (over {a.text}, next token in {wait:.2f} s)"))
        if x is None:
            return plan.admit if not audit else _with_audit(plan.admit, audit)
        wait = self._take(x, site, node, now, n)
        counts = self._counts[x.index]
        if wait == 0.0:
            counts[0] += n
            return plan.admit if not audit else _with_audit(plan.admit, audit)
        over = x.rule.limit.over  # type: ignore[union-attr]
        detail = f"over {x.text}: bucket empty, next token in {wait:.2f} s"
        if over == "drop":
            counts[2] += n
            return Verdict(False, "drop", x.policy, x.rule.name, x.source, audit=audit, notes=plan.notes,
                           subject=plan.subject, detail=detail)
        counts[1] += n
        retry = max(MIN_RETRY, math.ceil(wait * 10 - _EPS) / 10)
        return Verdict(False, "pause", x.policy, x.rule.name, x.source, retry, audit=audit, notes=plan.notes,
                       subject=plan.subject, detail=detail)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per limit rule (``policy/rule``): its mode and how many messages it admitted, refused
        (paused) and dropped; an audit rule's counts are what it would have done."""
        return {x.name: {"mode": x.mode, "admitted": c[0], "refused": c[1], "dropped": c[2]}
                for x in self._limits for c in (self._counts[x.index],)}

    @property
    def buckets(self) -> int:
        """How many token buckets are held now."""
        return len(self._buckets)

    @property
    def limited(self) -> bool:
        """Whether any limit rule exists (if not, :meth:`admit` always admits)."""
        return bool(self._limits)

    # ---- priority and retention ----------------------------------------------------------------

    def priority(self, *, site: str, node: str, role: str, channel: str, stream: str | None) -> Verdict:
        """The priority of a message: 0 (lowest) .. 9 (highest); unmatched: :data:`DEFAULT_PRIORITY`."""
        key = ("priority", site, node, role, channel, stream)
        v = self._other.get(key)
        if v is None:
            notes: list[str] = []
            x, audit = self._first("priority", site, node, role, channel, stream, notes)
            v = Verdict(True, "admit", *(_who(x)), priority=x.rule.priority if x else DEFAULT_PRIORITY,
                        audit=[AuditNote(a.policy, a.rule.name, a.source, "priority",
                                         f"give priority {a.rule.priority}") for a in audit],
                        notes=notes, purpose="priority", subject=_subject(site, node, role, channel, stream))
            self._remember(key, v)
        return v

    def retention(self, *, channel: str, stream: str | None, site: str | None = None, node: str | None = None,
                  role: str | None = None) -> Verdict:
        """How long the cloud keeps stored ``channel``/``stream`` data: ``keep_s`` seconds, or None
        (until deleted by hand). ``site``, ``node`` and ``role`` are optional: when one is not given,
        only rules whose pattern for it is ``*`` can match."""
        key = ("retention", site, node, role, channel, stream)
        v = self._other.get(key)
        if v is None:
            notes: list[str] = []
            x, audit = self._first("retention", site, node, role, channel, stream, notes)
            v = Verdict(True, "admit", *(_who(x)), keep_s=x.rule.retention if x else None,
                        audit=[AuditNote(a.policy, a.rule.name, a.source, "retention",
                                         f"keep it {human(a.rule.retention or 0)}") for a in audit],
                        notes=notes, purpose="retention", subject=_subject(site, node, role, channel, stream))
            self._remember(key, v)
        return v

    def retention_rules(self) -> list[RetentionRule]:
        """The enforced retention rules in the order they apply: for a stored item the first whose
        match covers it decides (a sweeper that deletes rule by rule must skip what an earlier rule
        matched; simplest is :meth:`retention` per distinct channel and stream in the store)."""
        return [RetentionRule(x.policy, x.rule.name, x.source, x.rule.match, x.rule.retention)
                for x in self._rules if x.mode == "enforce" and x.rule.retention is not None]

    def _remember(self, key: tuple[Any, ...], v: Verdict) -> None:
        if len(self._other) >= MAX_CACHE:
            self._other.clear()
        self._other[key] = v


def _who(x: _Rule | None) -> tuple[str | None, str | None, str | None]:
    return (x.policy, x.rule.name, x.source) if x is not None else (None, None, None)


def _with_audit(v: Verdict, audit: list[AuditNote]) -> Verdict:
    return Verdict(v.allowed, v.action, v.policy, v.rule, v.source, v.retry_after, v.priority, v.keep_s, audit,
                   v.notes, v.purpose, v.subject, v.detail)


# ---- measuring ---------------------------------------------------------------------------------------


def bench_admit(n: int = 200_000, devices: int = 100, pset: PolicySet | None = None) -> float:
    """Decisions per second of :meth:`QosEngine.admit`: 1,000 telemetry messages a second (simulated
    time), half from one flooding device (paused past its limit), the rest spread over ``devices - 1``
    others; the shipped policies unless ``pset`` is given."""
    import time

    if pset is None:
        from cwsnet.policy.loader import load_policies
        from cwsnet.policy.watch import shipped_policies

        pset = load_policies([shipped_policies()])
    engine = QosEngine(pset)
    nodes = [f"dev-{i}" for i in range(devices)]
    streams = ["env", "power", "health"]
    others = max(1, devices - 1)
    start = time.perf_counter()
    for i in range(n):  # 1,000 messages/s in all: half from dev-0, the rest spread over the others
        node = nodes[0] if i % 2 == 0 else nodes[1 + (i // 2) % others]
        engine.admit(site="home", node=node, role="device", channel="telemetry", stream=streams[i % 3],
                     now=i * 0.001)
    elapsed = time.perf_counter() - start
    return n / elapsed if elapsed > 0 else float("inf")
