"""Offload policies: where a task may and should run (device, gateway or cloud). Sans-I/O.

    kind: offload
    name: default-offload
    keep_on_site: [health]        # data classes that never leave the site, whatever rule decides
    rules:
      - name: saturated-device-offloads
        match: {origin_role: device}          # handler, data_class, origin_node, site (fnmatch), origin_role,
                                              # min_input / max_input (sizes: 64KB, 1MB, or bytes)
        when: '"cpu" in origin && origin.cpu > 0.85'    # CEL over the task and the origin's measurements
        run_on: [gateway, cloud]              # tiers in order of preference; tiers not listed are never used
        require: '!("queue" in node) || node.queue < 20'  # CEL filter over each candidate (node, link)
        if_unreachable: local                 # wait (default) | local | fail
      - name: default
        run_on: [device, gateway, cloud]

Which rule decides: the first enforced rule that matches, policies in name order and rules in file
order, except that catch-all rules (no ``match`` keys and no ``when``) are tried only after every
other rule, so a site's specific rules are not shadowed by a default's catch-all.

Within a rule, the tiers of ``run_on`` are tried in order. A candidate node of a tier qualifies
when it is of the task's site (devices and gateways only; the cloud is site-independent), its
tier is not the cloud for a task whose data class must stay on site (``keep_on_site`` of any
enforced offload policy), it is online, it has the task's handler (when its handlers are known)
and the rule's ``require`` holds for it. The first tier with a qualifying candidate takes the
task: the origin itself when it qualifies, else the least loaded (shortest queue, then lowest CPU;
unknown values count as more loaded than any known one), ties broken by node id. No tier able to
take it: ``if_unreachable`` says what happens: ``wait`` (stay queued and ask again later),
``local`` (run on the origin if it is online and has the handler, else wait) or ``fail``. Nothing
matching at all: the task runs on its origin (what CWSNet did before offload), or waits.

A policy in ``audit`` mode is evaluated too (its first matching rule) and what it would do is
reported in the explanation, never applied. A ``when`` that fails to evaluate (a measurement the
node does not report, a type error) makes the rule not match; a ``require`` that fails to evaluate
excludes that candidate; both are reported as notes.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from cwsnet.policy.cel import Condition
from cwsnet.policy.loader import PolicySet
from cwsnet.policy.schema import PolicyBase, Strict, _name, condition, register_kind, role_pattern

TIERS = ("device", "gateway", "cloud")
#: the largest size a ``min_input``/``max_input`` may name (1 TiB)
MAX_SIZE = 1 << 40
#: at most this many candidate lines per tier in an explanation
MAX_LINES = 8

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?$", re.I)
_UNIT = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size(v: object, field: str = "size") -> int:
    """Bytes from ``64KB``, ``1.5 MB``, ``512B``, ``2GiB`` or a plain number of bytes. KB, MB and GB are
    binary (1 KB = 1024 bytes), the way a device's memory is counted."""
    if isinstance(v, bool):
        raise ValueError(f"{field} must be a size like 64KB, 1MB or a number of bytes")
    if isinstance(v, int):
        n = v
    elif isinstance(v, float) and v.is_integer():
        n = int(v)
    elif isinstance(v, str) and (m := _SIZE.match(v.strip())):
        n = int(float(m.group(1)) * _UNIT[(m.group(2) or "")[:1].lower()])
    else:
        raise ValueError(f"{field} must be a size like 64KB, 1MB or a number of bytes")
    if not 0 <= n <= MAX_SIZE:
        raise ValueError(f"{field} must be between 0 bytes and 1 TB")
    return n


def human_size(n: int) -> str:
    """``81920`` -> ``80 KB`` (binary units, one decimal at most)."""
    for unit, k in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= k:
            return f"{round(n / k, 1):g} {unit}"
    return f"{n} B"


# ---- the schema -------------------------------------------------------------------------------


class OffloadMatch(Strict):
    handler: str = Field("*", description="fnmatch pattern over the task's handler name")
    data_class: str = Field("*", description="fnmatch pattern over the task's data class ('' when it has none)")
    origin_role: str = Field("*", description="the origin's role: device, gateway, app, operator, cloud or *")
    origin_node: str = Field("*", description="fnmatch pattern over the origin's node id")
    site: str = Field("*", description="fnmatch pattern over the task's site")
    min_input: int | None = Field(None, description="the task's input is at least this big (64KB, 1MB, bytes)")
    max_input: int | None = Field(None, description="the task's input is at most this big")

    @field_validator("origin_role")
    @classmethod
    def _role(cls, v: str) -> str:
        return role_pattern(v)

    @field_validator("min_input", "max_input", mode="before")
    @classmethod
    def _size(cls, v: Any, info: ValidationInfo) -> int | None:
        return None if v is None else size(v, info.field_name or "size")

    @model_validator(mode="after")
    def _order(self) -> OffloadMatch:
        if self.min_input is not None and self.max_input is not None and self.min_input > self.max_input:
            raise ValueError(f"min_input ({human_size(self.min_input)}) is larger than max_input "
                             f"({human_size(self.max_input)})")
        return self

    def keys(self) -> list[str]:
        """The match keys that narrow the rule (the ones not left at 'any')."""
        return [k for k in ("handler", "data_class", "origin_role", "origin_node", "site")
                if getattr(self, k) != "*"] + [k for k in ("min_input", "max_input") if getattr(self, k) is not None]


class OffloadRule(Strict):
    name: str
    match: OffloadMatch = Field(default_factory=OffloadMatch)
    when: str | None = Field(None, description="CEL over the task (task.*, handler, input_bytes, data_class, "
                                               "site) and the origin's measurements (origin.*)")
    run_on: list[Literal["device", "gateway", "cloud"]] = Field(min_length=1, description="tiers in order of "
                                                                "preference; tiers not listed are never used")
    require: str | None = Field(None, description="CEL filter over each candidate: node.* and link.*, plus "
                                                  "everything `when` sees")
    if_unreachable: Literal["wait", "local", "fail"] = "wait"

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name(v)

    @field_validator("when", "require")
    @classmethod
    def _cel(cls, v: str | None) -> str | None:
        return condition(v)

    @field_validator("run_on")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = next((t for i, t in enumerate(v) if t in v[:i]), None)
        if dup is not None:
            raise ValueError(f"{dup} is listed twice")
        return v

    @property
    def catch_all(self) -> bool:
        return not self.match.keys() and self.when is None


class OffloadPolicy(PolicyBase):
    kind: Literal["offload"]
    keep_on_site: list[str] = Field(default_factory=list, description="data classes (fnmatch) never placed "
                                                                      "in the cloud, whatever rule decides")
    rules: list[OffloadRule] = Field(default_factory=list, validate_default=True)

    @field_validator("keep_on_site")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.strip():
                raise ValueError("a data class pattern may not be empty")
        return v

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: list[OffloadRule], info: ValidationInfo) -> list[OffloadRule]:
        if not v and not info.data.get("keep_on_site"):
            raise ValueError("an offload policy needs at least one rule (or keep_on_site)")
        return v  # (unique names: PolicyBase)


register_kind("offload", OffloadPolicy)


# ---- what the engine is told ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeMetrics:
    """A candidate node and its live measurements (None: not reported)."""

    node: str
    tier: str  # device | gateway | cloud
    site: str
    online: bool
    cpu: float | None = None  # 0..1, recent average
    mem_free: int | None = None  # bytes
    battery: float | None = None  # 0..1
    queue: int | None = None  # tasks waiting on it
    latency_ms: float | None = None  # round trip to it from where the decision is made
    bandwidth_kbps: float | None = None  # of the link to it
    capabilities: frozenset[str] = frozenset()
    handlers: frozenset[str] | None = None  # None: unknown (any handler is assumed)

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)} (got {self.tier!r})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeMetrics:
        """From a JSON-like mapping (a node's status report); unknown keys are ignored."""
        def num(k: str, kind: type) -> Any:
            v = d.get(k)
            return None if v is None or isinstance(v, bool) or not isinstance(v, int | float) else kind(v)

        hs = d.get("handlers")
        return cls(str(d["node"]), str(d["tier"]), str(d.get("site", "")), bool(d.get("online", False)),
                   num("cpu", float), num("mem_free", int), num("battery", float), num("queue", int),
                   num("latency_ms", float), num("bandwidth_kbps", float),
                   frozenset(map(str, d.get("capabilities") or ())), None if hs is None else frozenset(map(str, hs)))

    def variables(self) -> dict[str, Any]:
        """What a condition sees as ``node``/``origin``: unreported measurements are absent (test them
        with ``"cpu" in node``)."""
        out: dict[str, Any] = {"id": self.node, "tier": self.tier, "site": self.site, "online": self.online,
                               "capabilities": sorted(self.capabilities)}
        for k in ("cpu", "mem_free", "battery", "queue", "latency_ms", "bandwidth_kbps"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.handlers is not None:
            out["handlers"] = sorted(self.handlers)
        return out

    def load(self) -> str:
        q = "unknown" if self.queue is None else str(self.queue)
        c = "unknown" if self.cpu is None else f"{self.cpu:.2f}"
        return f"queue {q}, cpu {c}"


@dataclass(frozen=True)
class TaskInfo:
    id: str
    handler: str
    input_bytes: int
    data_class: str | None
    site: str
    origin: str  # the node that submitted it, or the device it targets
    origin_role: str

    def variables(self) -> dict[str, Any]:
        return {"id": self.id, "handler": self.handler, "input_bytes": self.input_bytes,
                "data_class": self.data_class or "", "site": self.site, "origin": self.origin,
                "origin_role": self.origin_role}

    def describe(self) -> str:
        cls = f", data class {self.data_class}" if self.data_class else ""
        origin = f"{self.origin_role} {self.origin}" if self.origin else f"an {self.origin_role}" \
            if self.origin_role[0] in "aeiou" else f"a {self.origin_role}"
        site = f"site {self.site}" if self.site else "no site: the cloud only"
        return f"task {self.id} {self.handler} ({human_size(self.input_bytes)}{cls}) from {origin} ({site})"


# ---- the decision -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    task: TaskInfo
    action: Literal["run", "wait", "fail"]
    tier: str | None
    node: str | None
    policy: str | None = None
    rule: str | None = None
    source: str | None = None
    preference: tuple[str, ...] = ()  # the deciding rule's run_on
    reasons: list[str] = field(default_factory=list)  # why the rule applies (match keys, when)
    candidates: list[str] = field(default_factory=list)  # what happened to each tier and candidate
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (node, why not)
    outcome: str | None = None  # what if_unreachable did, when no listed tier could take it
    audit: list[str] = field(default_factory=list)  # what audit-mode policies would do
    notes: list[str] = field(default_factory=list)  # conditions that failed to evaluate, and why

    @property
    def decided_by(self) -> str | None:
        return f"{self.policy}/{self.rule}" if self.rule else None

    def explain(self) -> str:
        if self.action == "run":
            head = f"RUN ON {self.tier} {self.node}"
        else:
            head = self.action.upper()
        lines = [f"{head}: {self.task.describe()}"]
        if self.rule is None:
            lines.append("  no enforced offload rule matches: " + (
                "runs on its origin (the default)" if self.action == "run" else
                f"its origin cannot take it ({self.outcome}): waits"))
        else:
            lines.append(f"  decided by {self.decided_by} ({self.source})")
            lines += [f"  {r}" for r in self.reasons]
            lines.append(f"  preference: {', '.join(self.preference)}")
            lines += [f"  {c}" for c in self.candidates]
            if self.outcome:
                lines.append(f"  {self.outcome}")
        lines += [f"  audit: {a}; not enforced" for a in self.audit]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def explain_task(pset: PolicySet | None, task: TaskInfo, candidates: Iterable[NodeMetrics]) -> str:
    """What ``cwsnet policy explain --task ID`` prints: the placement of ``task`` among ``candidates``
    under the offload policies of ``pset``, and why."""
    return OffloadEngine(pset).place(task, candidates).explain()


# ---- the engine -------------------------------------------------------------------------------


def _refs(cond: Condition | None) -> list[str]:
    """The names a condition reads, as ``origin.cpu`` or ``input_bytes``, in order of appearance."""
    if cond is None:
        return []
    from lark import Token, Tree

    def ident(t: Any) -> str | None:
        while isinstance(t, Tree) and t.data in ("member", "primary") and len(t.children) == 1:
            t = t.children[0]
        if isinstance(t, Tree) and t.data == "ident" and t.children and isinstance(t.children[0], Token):
            return str(t.children[0].value)
        return None

    out: list[str] = []
    used: set[int] = set()
    ast = Condition._env.compile(cond.text)
    for t in ast.iter_subtrees_topdown():
        if t.data == "member_dot" and len(t.children) == 2 and isinstance(t.children[1], Token):
            base = ident(t.children[0])
            if base is not None:
                used.update(id(s) for s in t.children[0].iter_subtrees())
                out.append(f"{base}.{t.children[1].value}")
        elif t.data == "ident" and id(t) not in used and t.children and isinstance(t.children[0], Token):
            out.append(str(t.children[0].value))
    return list(dict.fromkeys(out))


def _show(refs: list[str], variables: dict[str, Any]) -> str:
    parts = []
    for ref in refs[:6]:
        head, _, tail = ref.partition(".")
        v: Any = variables.get(head, _MISSING)
        if tail:
            v = v.get(tail, _MISSING) if isinstance(v, dict) else _MISSING
        if v is _MISSING:
            continue
        if isinstance(v, dict):
            continue
        parts.append(f"{ref} = " + (f"{v:g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)))
    return f" ({', '.join(parts)})" if parts else ""


_MISSING = object()
_NO_MEMBER = re.compile(r"no such member in mapping: \\*'([^'\\]+)")
_OVERLOAD = re.compile(r"no such overload: ([^\"\\]+?)(?:\s*<class|\"|$)")


def _short(err: str) -> str:
    """A readable reason from cel-python's nested error text."""
    if m := _NO_MEMBER.search(err):
        return f"{m.group(1)!r} is not known"
    if m := _OVERLOAD.search(err):
        return f"type mismatch: {m.group(1).strip()}"
    return err if len(err) <= 160 else err[:157] + "..."


@dataclass(frozen=True)
class _Rule:
    policy: str
    mode: str
    source: str
    rule: OffloadRule
    when: Condition | None
    require: Condition | None
    when_refs: list[str]
    require_refs: list[str]

    @property
    def name(self) -> str:
        return f"{self.policy}/{self.rule.name}"


@dataclass
class _Choice:
    action: Literal["run", "wait", "fail"]
    tier: str | None = None
    node: str | None = None
    lines: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    outcome: str | None = None


class OffloadEngine:
    """Decides where tasks run from the ``offload`` policies of a set; see the module's docstring."""

    def __init__(self, pset: PolicySet | None) -> None:
        self.digest = pset.digest if pset else ""
        rules: list[_Rule] = []
        self._on_site: list[tuple[str, str, str]] = []  # (policy, mode, data class pattern)
        for loaded in sorted(pset.of_kind("offload") if pset else [], key=lambda p: p.policy.name):
            p = loaded.policy
            self._on_site += [(p.name, p.mode, c) for c in p.keep_on_site]
            for r in p.rules:
                when = Condition(r.when) if r.when else None
                require = Condition(r.require) if r.require else None
                rules.append(_Rule(p.name, p.mode, loaded.rule_sources.get(r.name, loaded.source), r, when,
                                   require, _refs(when), _refs(require)))
        # specific rules first, catch-alls after them (each group in policy-name then file order)
        self._rules = [x for x in rules if not x.rule.catch_all] + [x for x in rules if x.rule.catch_all]

    @property
    def empty(self) -> bool:
        return not self._rules and not self._on_site

    # -- matching --

    @staticmethod
    def _matches(m: OffloadMatch, t: TaskInfo) -> bool:
        return (fnmatch.fnmatchcase(t.handler, m.handler) and fnmatch.fnmatchcase(t.data_class or "", m.data_class)
                and m.origin_role in ("*", t.origin_role) and fnmatch.fnmatchcase(t.origin, m.origin_node)
                and fnmatch.fnmatchcase(t.site, m.site)
                and (m.min_input is None or t.input_bytes >= m.min_input)
                and (m.max_input is None or t.input_bytes <= m.max_input))

    @staticmethod
    def _matched(m: OffloadMatch, t: TaskInfo) -> str:
        if not m.keys():
            return "matches every task"
        shown = {"handler": t.handler, "data_class": t.data_class or "", "origin_role": t.origin_role,
                 "origin_node": t.origin, "site": t.site}
        parts = []
        for k in m.keys():
            if k in ("min_input", "max_input"):
                parts.append(f"{k} {human_size(getattr(m, k))} ({human_size(t.input_bytes)})")
            else:
                pat = getattr(m, k)
                parts.append(f"{k} {pat}" + (f" ({shown[k]})" if shown[k] != pat else ""))
        return "matched " + ", ".join(parts)

    def _applies(self, x: _Rule, t: TaskInfo, variables: dict[str, Any], notes: list[str]) -> bool:
        if not self._matches(x.rule.match, t):
            return False
        if x.when is None:
            return True
        ok, err = x.when.evaluate(variables)
        if err is not None:
            notes.append(f"{x.name}: when failed to evaluate ({_short(err)}); rule not applied")
        return ok

    # -- choosing a node --

    def _why_not(self, x: _Rule, c: NodeMetrics, t: TaskInfo, keep: list[tuple[str, str]],
                 variables: dict[str, Any], notes: list[str]) -> str | None:
        if c.tier != "cloud" and c.site != t.site:
            return f"other site ({c.site})"
        if c.tier == "cloud" and keep:
            policy, pattern = keep[0]
            return f"data class {t.data_class} must stay on site ({policy} keep_on_site {pattern})"
        if not c.online:
            return "offline"
        if c.handlers is not None and t.handler not in c.handlers:
            return f"has no handler {t.handler}"
        if x.require is not None:
            v = {**variables, "node": c.variables(), "link": {k: val for k, val in
                                                               (("latency_ms", c.latency_ms),
                                                                ("bandwidth_kbps", c.bandwidth_kbps))
                                                               if val is not None}}
            ok, err = x.require.evaluate(v)
            if err is not None:
                why = _short(err)
                notes.append(f"{x.name}: require failed to evaluate for {c.node} ({why}); {c.node} excluded")
                return f"require failed to evaluate ({why})"
            if not ok:
                return f"require {x.rule.require} is false{_show(x.require_refs, v)}"
        return None

    @staticmethod
    def _load_key(c: NodeMetrics) -> tuple[Any, ...]:
        return (c.queue is None, c.queue or 0, c.cpu is None, c.cpu or 0.0, c.node)

    def _choose(self, x: _Rule, t: TaskInfo, cands: list[NodeMetrics], origin: NodeMetrics | None,
                keep: list[tuple[str, str]], variables: dict[str, Any], notes: list[str]) -> _Choice:
        ch = _Choice("wait")
        lines = ch.lines
        run_on = x.rule.run_on
        for i, tier in enumerate(run_on):
            in_tier = sorted((c for c in cands if c.tier == tier), key=lambda c: c.node)
            if not in_tier:
                lines.append(f"{tier} tier: no candidate")
                continue
            passing: list[NodeMetrics] = []
            refused: list[tuple[str, str]] = []
            for c in in_tier:
                why = self._why_not(x, c, t, keep, variables, notes)
                if why is None:
                    passing.append(c)
                else:
                    refused.append((c.node, why))
            ch.rejected += refused
            tier_lines: list[str] = []
            if passing:
                best = origin if origin in passing else min(passing, key=self._load_key)
                ch.action, ch.tier, ch.node = "run", tier, best.node
                why = "chosen, its origin" if best is origin else "chosen"
                tier_lines.append(f"{best.node}: {why} ({best.load()})")
                tier_lines += [f"{c.node}: qualifies, more loaded ({c.load()})"
                               for c in sorted(passing, key=self._load_key) if c is not best]
            tier_lines += [f"{n}: {why}" for n, why in refused]
            if len(tier_lines) > MAX_LINES:
                tier_lines = tier_lines[:MAX_LINES - 1] + [f"... and {len(tier_lines) - MAX_LINES + 1} more "
                                                           f"{tier} candidates"]
            lines += tier_lines
            if passing:
                lines += [f"{later} tier: not needed" for later in run_on[i + 1:]]
                break
        others = sorted((c for c in cands if c.tier not in run_on), key=lambda c: (TIERS.index(c.tier), c.node))
        for c in others:
            ch.rejected.append((c.node, f"tier {c.tier} not allowed by the rule"))
        shown = [f"{c.node}: tier {c.tier} not allowed by the rule" for c in others]
        if len(shown) > MAX_LINES:
            shown = shown[:MAX_LINES - 1] + [f"... and {len(shown) - MAX_LINES + 1} more in tiers not allowed"]
        lines += shown
        if ch.action == "run":
            return ch
        how = x.rule.if_unreachable
        if how == "fail":
            ch.action, ch.outcome = "fail", "no listed tier can take it: fails (if_unreachable: fail)"
        elif how == "local":
            why = self._local_refusal(t, origin, keep)
            if why is None:
                assert origin is not None
                ch.action, ch.tier, ch.node = "run", origin.tier, origin.node
                ch.outcome = f"no listed tier can take it: runs on its origin {t.origin} (if_unreachable: local)"
            else:
                ch.outcome = (f"no listed tier can take it and its origin {t.origin} cannot ({why}): waits "
                              "(if_unreachable: local)")
        else:
            ch.outcome = "no listed tier can take it now: waits (if_unreachable: wait)"
        return ch

    @staticmethod
    def _local_refusal(t: TaskInfo, origin: NodeMetrics | None, keep: list[tuple[str, str]]) -> str | None:
        if origin is None:
            return "not among the candidates"
        if not origin.online:
            return "offline"
        if origin.handlers is not None and t.handler not in origin.handlers:
            return f"has no handler {t.handler}"
        if origin.tier == "cloud" and keep:
            return f"data class {t.data_class} must stay on site"
        return None

    # -- the decision --

    def size_classes(self) -> tuple[list[int], bool]:
        """The input sizes at which the rules change their mind (``min_input`` / ``max_input``), so a
        caller may share one decision among tasks that differ only in size within one class;
        ``exact`` is True when a condition reads the task's size or id itself (no sharing then)."""
        cuts: set[int] = set()
        for x in self._rules:
            m = x.rule.match
            if m.min_input is not None:
                cuts.add(m.min_input)  # input >= min
            if m.max_input is not None:
                cuts.add(m.max_input + 1)  # input <= max, i.e. input < max + 1
            for ref in (*x.when_refs, *x.require_refs):
                if ref in ("input_bytes", "id", "task") or ref.startswith("task."):
                    return [], True
        return sorted(cuts), False

    def place(self, task: TaskInfo, candidates: Iterable[NodeMetrics]) -> Placement:
        """Where ``task`` runs now among ``candidates`` (every node that could take it, with its latest
        measurements; the origin among them). ``wait``: ask again when the measurements change."""
        cands: list[NodeMetrics] = []
        seen: set[str] = set()
        for c in candidates:
            if c.node not in seen:
                seen.add(c.node)
                cands.append(c)
        origin = next((c for c in cands if c.node == task.origin), None)
        tv = task.variables()
        variables = {"task": tv, "handler": task.handler, "input_bytes": task.input_bytes,
                     "data_class": tv["data_class"], "site": task.site,
                     "origin": origin.variables() if origin else {}}
        notes: list[str] = []
        dc = task.data_class or ""
        keep = [(p, pat) for p, mode, pat in self._on_site if mode == "enforce" and fnmatch.fnmatchcase(dc, pat)]
        decided = next((x for x in self._rules if x.mode == "enforce" and self._applies(x, task, variables, notes)),
                       None)
        audit = self._audit(task, cands, origin, keep, variables, notes)
        if decided is None:
            why = self._local_refusal(task, origin, keep)
            if why is None:
                assert origin is not None
                return Placement(task, "run", origin.tier, origin.node, audit=audit, notes=notes)
            return Placement(task, "wait", None, None, outcome=why, audit=audit, notes=notes)
        ch = self._choose(decided, task, cands, origin, keep, variables, notes)
        if ch.tier == "cloud":
            for p, mode, pat in self._on_site:
                if mode == "audit" and fnmatch.fnmatchcase(dc, pat):
                    audit.append(f"{p} keep_on_site {pat} would keep data class {task.data_class} out of the cloud")
        reasons = [self._matched(decided.rule.match, task)]
        if decided.when is not None:
            reasons.append(f"when {decided.rule.when}: true{_show(decided.when_refs, variables)}")
        return Placement(task, ch.action, ch.tier, ch.node, decided.policy, decided.rule.name, decided.source,
                         tuple(decided.rule.run_on), reasons, ch.lines, ch.rejected, ch.outcome, audit, notes)

    def _audit(self, task: TaskInfo, cands: list[NodeMetrics], origin: NodeMetrics | None,
               keep: list[tuple[str, str]], variables: dict[str, Any], notes: list[str]) -> list[str]:
        out: list[str] = []
        dc = task.data_class or ""
        done: set[str] = set()
        for x in self._rules:
            if x.mode != "audit" or x.policy in done or not self._applies(x, task, variables, notes):
                continue
            done.add(x.policy)
            own = keep + [(p, pat) for p, _m, pat in self._on_site if p == x.policy and fnmatch.fnmatchcase(dc, pat)]
            ch = self._choose(x, task, cands, origin, own, variables, notes)
            if ch.action == "run":
                out.append(f"{x.name} would run it on {ch.tier} {ch.node}")
            else:
                out.append(f"{x.name} would {ch.action}")
        return out


__all__ = ["NodeMetrics", "OffloadEngine", "OffloadPolicy", "OffloadRule", "Placement", "TaskInfo",
           "explain_task", "human_size", "size"]


def metrics_from_status(node: str, tier: str, site: str, online: bool, status: dict[str, Any] | None) -> NodeMetrics:
    """A node's measurements from its latest status report (docs/protocol.md §3): ``cpu`` there is a
    percentage; ``tasks_running`` (agents) or ``queue`` (gateways) is its queue; ``handlers`` what it runs."""
    s = status or {}

    def num(k: str) -> float | None:
        v = s.get(k)
        return None if v is None or isinstance(v, bool) or not isinstance(v, int | float) else float(v)

    cpu = num("cpu")
    queue = num("tasks_running") if "tasks_running" in s else num("queue")
    handlers = s.get("handlers")
    return NodeMetrics(node, tier, site, online, None if cpu is None else min(max(cpu / 100.0, 0.0), 1.0),
                       None if num("mem_free") is None else int(num("mem_free") or 0), num("battery"),
                       None if queue is None else int(queue), num("latency_ms"), num("bandwidth_kbps"),
                       frozenset(), frozenset(map(str, handlers)) if isinstance(handlers, list) and handlers else None)
