"""Automation policies: ``when <condition> [for <duration>] then <actions>`` over telemetry, status and
events, fired once per episode. Sans-I/O: the daemons feed observations and a clock, and run what fires.

    kind: automation
    name: greenhouse
    rules:
      - name: too-hot
        at: gateway                              # gateway (default) or cloud: the tier that runs the rule
        on: {kind: telemetry, stream: env}       # kind telemetry|status|event; stream / type, node, site: fnmatch
        when: 'values.temp_c > 30.0'             # CEL over node, site, kind, stream, values, ts
        for: 30s                                 # it must hold this long (optional)
        clear_when: 'values.temp_c < 28.0'       # hysteresis: the episode ends only when this holds (optional)
        cooldown: 10m                            # no new firing for this node before this long (optional)
        then:
          - alert: {severity: warning, message: "{node} is at {values.temp_c} C"}
          - task: {handler: sha256, args: {data: x}, on: gateway}
          - command: {handler: echo, args: {}, to: node}

Per rule and per subject (site, node) the engine keeps a small state machine: ``idle`` -> ``when``
true -> ``pending`` -> held for ``for`` (and out of any cooldown) -> fires once -> ``firing`` until
``clear_when`` holds (or ``when`` is false when there is no ``clear_when``) -> ``idle``. A false
``when`` while pending resets to idle. A missing value (or any evaluation error) changes nothing.
Episodes run on the observations' own timestamps; :meth:`AutomationEngine.tick` carries each subject's
clock forward from its newest observation by the time elapsed since (sample and hold), so a device
that stops reporting still fires its ``for`` rules, and a device whose clock is off does not fire
early. The state is bounded (``max_subjects`` per rule, least recently seen evicted) and can be saved
and restored (:meth:`~AutomationEngine.state`, :meth:`~AutomationEngine.load_state`).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import re
import string
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cwsnet.policy.cel import Condition
from cwsnet.policy.loader import PolicySet
from cwsnet.policy.schema import PolicyBase, Strict, _name, condition, duration, register_kind

#: what a condition can read
VARIABLES = ("node", "site", "kind", "stream", "values", "ts")
#: the placeholders an alert message may use (plus ``{values.<name>}``)
PLACEHOLDERS = ("node", "site", "rule", "policy", "stream")
MAX_ACTIONS = 8
MAX_SUBJECTS = 10_000
MAX_MESSAGE = 500
MAX_ARGS_BYTES = 4096
_HANDLER = re.compile(r"^[a-z0-9_.-]{1,63}$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MACROS = ("all", "exists", "exists_one", "map", "filter")
_TYPE_NAMES = ("int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type", "dyn")
_FORMATTER = string.Formatter()
_WRAPPERS = ("expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary",
             "member", "primary")


# ---- the schema -----------------------------------------------------------------------------------

def _yaml_on(data: Any) -> Any:
    """YAML 1.1 reads an unquoted ``on:`` key as the boolean true: take it back as ``on``."""
    if isinstance(data, dict) and True in data:
        if "on" in data:
            raise ValueError("'on' is given twice")
        data = {("on" if k is True else k): v for k, v in data.items()}
    return data


def _condition(v: str | None) -> str | None:
    if v is None:
        return None
    condition(v)
    unknown = sorted(_analyse(v)[0] - set(VARIABLES))
    if unknown:
        raise ValueError(f"unknown name {unknown[0]!r}: a condition can read {', '.join(VARIABLES)}")
    return v


def _template(v: str) -> str:
    if len(v) > MAX_MESSAGE:
        raise ValueError(f"message is {len(v)} characters; at most {MAX_MESSAGE}")
    try:
        parts = list(_FORMATTER.parse(v))
    except ValueError as exc:
        raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
    allowed = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS) + ", {values.<name>}"
    for _lit, fname, spec, conv in parts:
        if fname is None:
            continue
        if conv is not None or (spec and "{" in spec):
            raise ValueError(f"{{{fname}}}: conversions and nested fields are not supported")
        if fname not in PLACEHOLDERS and not (fname.startswith("values.") and len(fname) > 7):
            raise ValueError(f"unknown placeholder {{{fname}}} (use {allowed})")
    return v


def _duration(v: Any, what: str) -> float | None:
    if v is None:
        return None
    try:
        return duration(v, what)
    except ValueError as exc:  # the loader adds "(got ...)" itself
        raise ValueError(str(exc).rsplit(" (got ", 1)[0]) from None


def _handler(v: str) -> str:
    if not _HANDLER.match(v):
        raise ValueError("a handler name is 1-63 characters from a-z 0-9 _ . -")
    return v


def _args(v: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(json.dumps(v, allow_nan=False))
    except (TypeError, ValueError):
        raise ValueError("args must be plain data (text, numbers, booleans, lists, mappings)") from None
    if size > MAX_ARGS_BYTES:
        raise ValueError(f"args are {size} bytes as JSON; at most {MAX_ARGS_BYTES}")
    return v


def _node_target(v: str, keywords: tuple[str, ...]) -> str:
    if v not in keywords and not _NODE.match(v):
        raise ValueError(f"must be {', '.join(keywords)} or a node id (1-63 of A-Z a-z 0-9 _ . -)")
    return v


class On(Strict):
    kind: Literal["telemetry", "status", "event"]
    stream: str | None = Field(None, description="telemetry only: fnmatch pattern over the stream name")
    type: str | None = Field(None, description="event only: fnmatch pattern over the event type")
    node: str = Field("*", description="fnmatch pattern over the node id")
    site: str = Field("*", description="fnmatch pattern over the site")

    @model_validator(mode="after")
    def _fits_kind(self) -> On:
        if self.stream is not None and self.kind != "telemetry":
            raise ValueError(f"stream applies to telemetry only (kind is {self.kind}; events match by type)")
        if self.type is not None and self.kind != "event":
            raise ValueError(f"type applies to events only (kind is {self.kind})")
        return self

    @property
    def pattern(self) -> str:
        return (self.stream if self.kind == "telemetry" else self.type) or "*"


class AlertSpec(Strict):
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str = Field(min_length=1, description="a template: {node} {site} {rule} {policy} {stream} "
                                                   "{values.<name>}")

    @field_validator("message")
    @classmethod
    def _message(cls, v: str) -> str:
        return _template(v)


class _HandlerSpec(Strict):
    """A handler name and its args: what a task and a command have in common."""

    handler: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("handler")
    @classmethod
    def _h(cls, v: str) -> str:
        return _handler(v)

    @field_validator("args")
    @classmethod
    def _a(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _args(v)


class TaskSpec(_HandlerSpec):
    on: str = Field("gateway", description="gateway, cloud, node (the node that triggered) or a node id")

    @model_validator(mode="before")
    @classmethod
    def _on_key(cls, data: Any) -> Any:
        return _yaml_on(data)

    @field_validator("on")
    @classmethod
    def _on(cls, v: str) -> str:
        return _node_target(v, ("gateway", "cloud", "node"))


class CommandSpec(_HandlerSpec):
    to: str = Field("node", description="node (the node that triggered) or a node id")

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        return _node_target(v, ("node",))


class ActionSpec(Strict):
    alert: AlertSpec | None = None
    task: TaskSpec | None = None
    command: CommandSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ActionSpec:
        given = [k for k in ("alert", "task", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise ValueError(f"an action is exactly one of alert, task or command (got {got})")
        return self


class AutomationRule(Strict):
    name: str
    at: Literal["gateway", "cloud"] = Field("gateway", description="the tier that runs the rule")
    on: On
    when: str = Field(description="CEL over node, site, kind, stream, values, ts")
    for_: float | None = Field(None, alias="for", description="seconds the condition must hold first")
    clear_when: str | None = Field(None, description="CEL: the episode ends only when this holds")
    cooldown: float | None = Field(None, description="seconds after a firing before the node can fire again")
    then: list[ActionSpec] = Field(min_length=1, max_length=MAX_ACTIONS)

    @model_validator(mode="before")
    @classmethod
    def _on_key(cls, data: Any) -> Any:
        return _yaml_on(data)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name(v)

    @field_validator("when", "clear_when")
    @classmethod
    def _cel(cls, v: str | None) -> str | None:
        return _condition(v)

    @field_validator("for_", mode="before")
    @classmethod
    def _for(cls, v: Any) -> float | None:
        return _duration(v, "for")

    @field_validator("cooldown", mode="before")
    @classmethod
    def _cooldown(cls, v: Any) -> float | None:
        return _duration(v, "cooldown")


class AutomationPolicy(PolicyBase):
    kind: Literal["automation"]
    rules: list[AutomationRule] = Field(min_length=1)


register_kind("automation", AutomationPolicy)


def _analyse(text: str) -> tuple[frozenset[str], frozenset[str], bool]:
    """(free names, ``values.<name>`` read, whether it uses ``has()``) of a CEL expression."""
    from lark import Token, Tree

    ast = Condition._env.compile(text)
    idents: set[str] = set()
    bound: set[str] = set()
    reads: set[str] = set()
    uses_has = False

    def ident_of(t: Any) -> str | None:
        while isinstance(t, Tree) and t.data in _WRAPPERS and len(t.children) == 1:
            t = t.children[0]
        if isinstance(t, Tree) and t.data == "ident" and t.children and isinstance(t.children[0], Token):
            return str(t.children[0].value)
        return None

    for t in ast.iter_subtrees():
        if t.data == "ident" and t.children and isinstance(t.children[0], Token):
            idents.add(str(t.children[0].value))
        elif t.data == "ident_arg" and t.children and str(t.children[0]) == "has":
            uses_has = True
        elif t.data == "member_dot_arg" and len(t.children) == 3 and str(t.children[1]) in _MACROS:
            args = t.children[2].children if isinstance(t.children[2], Tree) else []
            if args and (name := ident_of(args[0])) is not None:
                bound.add(name)
        elif t.data == "member_dot" and len(t.children) == 2 and ident_of(t.children[0]) == "values":
            reads.add(str(t.children[1]))
        elif t.data == "member_index" and len(t.children) == 2 and ident_of(t.children[0]) == "values":
            lit = [x for x in t.children[1].iter_subtrees() if x.data == "literal"]
            if len(lit) == 1 and (s := str(lit[0].children[0])).startswith(('"', "'")) and len(s) >= 2:
                reads.add(s[1:-1])
    return frozenset(idents - bound - set(_TYPE_NAMES)), frozenset(reads), uses_has


# ---- what fires -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    """One reading of a telemetry batch, one status body, or one event body. ``stream``: the telemetry
    stream, the event's type, None for a status. ``ts``: milliseconds since the epoch (the reading's own)."""

    site: str
    node: str
    kind: str
    stream: str | None
    values: dict[str, Any]
    ts: int


@dataclass(frozen=True)
class Alert:
    severity: str
    message: str  # rendered
    kind: str = field(default="alert", init=False)

    def describe(self) -> str:
        return f"alert {self.severity} {self.message!r}"


@dataclass(frozen=True)
class RunTask:
    handler: str
    args: dict[str, Any]
    on: str  # as written: gateway, cloud, node or a node id
    target: str  # resolved: gateway, cloud or the node id
    kind: str = field(default="task", init=False)

    def describe(self) -> str:
        return f"task {self.handler} on {self.target}"


@dataclass(frozen=True)
class SendCommand:
    handler: str
    args: dict[str, Any]
    to: str  # as written: node or a node id
    target: str  # resolved: the node id
    kind: str = field(default="command", init=False)

    def describe(self) -> str:
        return f"command {self.handler} to {self.target}"


Action = Alert | RunTask | SendCommand


def _iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    frac = f".{ms % 1000:03d}" if ms % 1000 else ""
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def _span(ms: int) -> str:
    s = ms / 1000
    if s < 120:
        return f"{s:g} s"
    if s < 3600:
        return f"{int(s // 60)} min" + (f" {s % 60:g} s" if s % 60 else "")
    return f"{int(s // 3600)} h" + (f" {int(s % 3600 // 60)} min" if s % 3600 >= 60 else "")


@dataclass(frozen=True)
class Firing:
    policy: str
    rule: str
    source: str  # file:line of the rule
    mode: str  # enforce, or audit: report it, do not run the actions
    site: str
    node: str
    at_ms: int  # when it fired (the subject's clock: an observation's ts, or carried forward by tick)
    since_ms: int  # when the condition became true (the episode's start)
    actions: list[Action]
    values: dict[str, Any]  # the values of the last observation that met the condition
    when: str = ""
    for_ms: int = 0
    stream: str | None = None  # the telemetry stream or event type of the observation
    kind: str = "telemetry"  # what was observed: telemetry, status or event
    notes: list[str] = field(default_factory=list)

    def explain(self) -> str:
        verdict = "FIRE" if self.mode == "enforce" else "WOULD FIRE"
        lines = [f"{verdict}: {self.policy}/{self.rule} for {self.node} (site {self.site})",
                 f"  decided by {self.policy}/{self.rule} ({self.source})"]
        if self.for_ms:
            lines.append(f"  when {self.when} held from {_iso(self.since_ms)} to {_iso(self.at_ms)} "
                         f"({_span(self.at_ms - self.since_ms)}; for {_span(self.for_ms)})")
        else:
            lines.append(f"  when {self.when} became true at {_iso(self.since_ms)}")
        shown = ", ".join(f"{k}={v!r}" for k, v in list(self.values.items())[:8])
        what = {"telemetry": f"telemetry/{self.stream}", "event": f"event {self.stream}"}.get(self.kind, self.kind)
        lines.append(f"  values: {shown} ({what})")
        lines.append("  then: " + ", ".join(a.describe() for a in self.actions))
        if self.mode == "audit":
            lines.append(f"  audit: policy {self.policy} is in audit mode; reported, the actions are not run")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- the engine -----------------------------------------------------------------------------------

IDLE, PENDING, FIRING = "idle", "pending", "firing"


@dataclass
class _Sub:
    phase: str = IDLE
    since: int | None = None  # ts the condition became true (pending or firing)
    last_ts: int = -(2**62)  # the newest observation's ts
    seen: int = 0  # now_ms when it arrived: tick carries the subject's clock forward from here
    fired: int | None = None  # ts of the last firing (for the cooldown)
    values: dict[str, Any] = field(default_factory=dict)  # of the last observation that met `when`
    stream: str | None = None
    note: str | None = None  # the last evaluation problem

    def clock(self, now_ms: int) -> int:
        return self.last_ts + max(0, now_ms - self.seen)


@dataclass
class _Rule:
    policy: str
    mode: str
    source: str
    spec: AutomationRule
    when: Condition
    clear: Condition | None
    when_needs: frozenset[str]  # values `when` reads (checked before evaluating, unless it uses has())
    clear_needs: frozenset[str]
    for_ms: int
    cooldown_ms: int
    subjects: OrderedDict[tuple[str, str], _Sub] = field(default_factory=OrderedDict)
    pending: dict[tuple[str, str], None] = field(default_factory=dict)  # an ordered set

    @property
    def key(self) -> str:
        return f"{self.policy}/{self.spec.name}"

    def matches(self, o: Observation) -> bool:
        on = self.spec.on
        return (o.kind == on.kind and fnmatch.fnmatchcase(o.node, on.node) and fnmatch.fnmatchcase(o.site, on.site)
                and (on.kind == "status" or fnmatch.fnmatchcase(o.stream or "", on.pattern)))


def _needs(text: str | None) -> frozenset[str]:
    """The values a condition cannot do without (none when it tests for them itself with has())."""
    if text is None:
        return frozenset()
    _free, reads, uses_has = _analyse(text)
    return frozenset() if uses_has else reads


def _ms(seconds: float | None) -> int:
    return int(round((seconds or 0) * 1000))


def _cel_values(v: Any) -> Any:
    """Numbers as doubles, as in CEL's JSON mapping: ``values.t > 30`` and ``> 30.0`` both work whether the
    device sent 31 or 31.0."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return float(v)
    if isinstance(v, dict):
        return {k: _cel_values(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_cel_values(x) for x in v]
    return v


def _plain(v: Any) -> Any:
    """``v`` as JSON-compatible data (the saved state and the firing's values)."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


class AutomationEngine:
    """The automation rules of one tier (``at``: "gateway" or "cloud") over a policy set.

    ``observe`` each observation as it arrives (``now_ms``: the receiving clock), call ``tick`` about
    once a second; run (or, for ``mode == "audit"``, only report) each returned :class:`Firing`.
    ``evaluations`` counts CEL evaluations, ``stale`` the observations ignored as older than one
    already seen, ``evicted`` the subjects dropped to stay within ``max_subjects`` per rule.
    """

    def __init__(self, pset: PolicySet, at: str, *, max_subjects: int = MAX_SUBJECTS) -> None:
        if at not in ("gateway", "cloud"):
            raise ValueError(f"at must be 'gateway' or 'cloud' (got {at!r})")
        self.at = at
        self.max_subjects = max_subjects
        self.digest = pset.digest
        self.evaluations = 0
        self.stale = 0
        self.evicted = 0
        self._rules: list[_Rule] = []
        for loaded in sorted(pset.of_kind("automation"), key=lambda p: p.policy.name):
            p = loaded.policy
            for r in p.rules:
                if r.at != at:
                    continue
                self._rules.append(_Rule(p.name, p.mode, loaded.rule_sources.get(r.name, loaded.source), r,
                                         Condition(r.when), Condition(r.clear_when) if r.clear_when else None,
                                         _needs(r.when), _needs(r.clear_when), _ms(r.for_), _ms(r.cooldown)))

    @property
    def rules(self) -> list[str]:
        """``policy/rule`` of every rule this engine runs."""
        return [r.key for r in self._rules]

    # -- observations -------------------------------------------------------------------------------

    def observe(self, obs: Observation, now_ms: int) -> list[Firing]:
        """The firings this observation causes (``now_ms``: when it arrived, on the daemon's clock)."""
        if not isinstance(obs.values, dict):
            obs = Observation(obs.site, obs.node, obs.kind, obs.stream, {}, obs.ts)
        out = []
        for r in self._rules:
            if r.matches(obs):
                f = self._step(r, obs, now_ms)
                if f is not None:
                    out.append(f)
        return out

    def tick(self, now_ms: int) -> list[Firing]:
        """Fire the pending rules whose ``for`` (or cooldown) has run out since their last observation."""
        out = []
        for r in self._rules:
            for key in list(r.pending):
                st = r.subjects[key]
                f = self._due(r, key, st, st.clock(now_ms))
                if f is not None:
                    out.append(f)
        return out

    def _subject(self, r: _Rule, key: tuple[str, str]) -> _Sub:
        st = r.subjects.get(key)
        if st is None:
            st = r.subjects[key] = _Sub()
            while len(r.subjects) > self.max_subjects:
                old, _ = r.subjects.popitem(last=False)
                r.pending.pop(old, None)
                self.evicted += 1
        else:
            r.subjects.move_to_end(key)
        return st

    def _eval(self, r: _Rule, which: str, obs: Observation, st: _Sub) -> bool | None:
        """True/False, or None (no information: a value is missing or the condition failed)."""
        cond, needs = (r.when, r.when_needs) if which == "when" else (r.clear, r.clear_needs)
        assert cond is not None
        missing = sorted(n for n in needs if n not in obs.values)
        if missing:
            st.note = f"{which}: no value {', '.join(missing)} in the observation at {_iso(obs.ts)}; state unchanged"
            return None
        self.evaluations += 1
        ok, err = cond.evaluate({"node": obs.node, "site": obs.site, "kind": obs.kind, "stream": obs.stream,
                                 "values": _cel_values(obs.values), "ts": obs.ts})
        if err is not None:
            st.note = f"{which}: failed to evaluate at {_iso(obs.ts)} ({err}); state unchanged"
            return None
        st.note = None
        return ok

    def _step(self, r: _Rule, obs: Observation, now_ms: int) -> Firing | None:
        key = (obs.site, obs.node)
        st = self._subject(r, key)
        if obs.ts < st.last_ts:
            self.stale += 1
            return None
        st.last_ts, st.seen = obs.ts, now_ms
        if st.phase == FIRING:
            if r.clear is not None:
                ended = self._eval(r, "clear_when", obs, st)
            else:
                held = self._eval(r, "when", obs, st)
                ended = None if held is None else not held
            if ended:
                st.phase, st.since, st.values, st.stream = IDLE, None, {}, None
            return None
        held = self._eval(r, "when", obs, st)
        if held:
            if st.phase == IDLE:
                st.phase, st.since = PENDING, obs.ts
                r.pending[key] = None
            st.values, st.stream = dict(obs.values), obs.stream
        elif held is False and st.phase == PENDING:
            st.phase, st.since, st.values, st.stream = IDLE, None, {}, None
            r.pending.pop(key, None)
        if st.phase == PENDING:
            return self._due(r, key, st, obs.ts)
        return None

    def _due(self, r: _Rule, key: tuple[str, str], st: _Sub, now: int) -> Firing | None:
        assert st.since is not None
        if now - st.since < r.for_ms:
            return None
        free_at = st.fired + r.cooldown_ms if st.fired is not None and r.cooldown_ms else None
        if free_at is not None and now < free_at:
            return None
        notes = []
        if free_at is not None and free_at > st.since + r.for_ms:
            notes.append(f"held back by the cooldown ({_span(r.cooldown_ms)}) of the firing at {_iso(st.fired)}")
        st.phase, st.fired = FIRING, now
        r.pending.pop(key, None)
        return self._firing(r, key, st, now, notes)

    def _firing(self, r: _Rule, key: tuple[str, str], st: _Sub, now: int, notes: list[str]) -> Firing:
        site, node = key
        ctx = {"node": node, "site": site, "rule": r.spec.name, "policy": r.policy, "stream": st.stream or ""}
        actions: list[Action] = []
        for a in r.spec.then:
            if a.alert is not None:
                actions.append(Alert(a.alert.severity, render(a.alert.message, ctx, st.values)))
            elif a.task is not None:
                t = a.task
                actions.append(RunTask(t.handler, copy.deepcopy(t.args), t.on, node if t.on == "node" else t.on))
            elif a.command is not None:
                c = a.command
                actions.append(SendCommand(c.handler, copy.deepcopy(c.args), c.to, node if c.to == "node" else c.to))
        assert st.since is not None
        return Firing(r.policy, r.spec.name, r.source, r.mode, site, node, now, st.since, actions,
                      _plain(st.values), r.spec.when, r.for_ms, st.stream, r.spec.on.kind, notes)

    # -- persistence ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The rules' states as JSON-compatible data (save it; :meth:`load_state` after a restart): the subjects
        pending, firing or cooling down; idle ones are left out (all they had was the out-of-order guard)."""
        rules: dict[str, list[dict[str, Any]]] = {}
        for r in self._rules:
            entries = []
            for (site, node), st in r.subjects.items():
                if st.phase == IDLE and (st.fired is None or st.last_ts >= st.fired + r.cooldown_ms):
                    continue  # nothing to remember: no episode, no cooldown running
                e: dict[str, Any] = {"site": site, "node": node, "phase": st.phase, "last_ts": st.last_ts,
                                     "seen": st.seen}
                if st.since is not None:
                    e["since"] = st.since
                if st.fired is not None:
                    e["fired"] = st.fired
                if st.phase == PENDING:
                    e["values"] = _plain(st.values)
                    e["stream"] = st.stream
                entries.append(e)
            if entries:
                rules[r.key] = entries
        return {"version": 1, "rules": rules}

    def load_state(self, d: dict[str, Any]) -> None:
        """Restore :meth:`state` (of this engine or an earlier one over an older policy set: rules are matched
        by ``policy/rule``; states of rules no longer here are dropped). ValueError if ``d`` is damaged,
        and then nothing is changed."""
        if not isinstance(d, dict) or d.get("version") != 1 or not isinstance(d.get("rules"), dict):
            raise ValueError("not an automation state (version 1)")
        restored: dict[str, OrderedDict[tuple[str, str], _Sub]] = {}
        for r in self._rules:
            entries = d["rules"].get(r.key) or []
            if not isinstance(entries, list):
                raise ValueError(f"{r.key}: a list of subjects expected")
            subs: OrderedDict[tuple[str, str], _Sub] = OrderedDict()
            for e in entries[-self.max_subjects:]:
                try:
                    phase = e["phase"]
                    if phase not in (IDLE, PENDING, FIRING):
                        raise ValueError(f"phase {phase!r}")
                    st = _Sub(phase=phase, since=_opt_int(e.get("since")), last_ts=int(e["last_ts"]),
                              seen=int(e["seen"]), fired=_opt_int(e.get("fired")), values=dict(e.get("values") or {}),
                              stream=e.get("stream"))
                    if phase != IDLE and st.since is None:
                        raise ValueError("since missing")
                    subs[(str(e["site"]), str(e["node"]))] = st
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{r.key}: a damaged subject entry ({exc})") from None
            restored[r.key] = subs
        for r in self._rules:
            r.subjects = restored[r.key]
            r.pending = {k: None for k, st in r.subjects.items() if st.phase == PENDING}

    # -- explain ----------------------------------------------------------------------------------------

    def explain(self, rule: str | None = None, *, now_ms: int | None = None, limit: int = 50) -> str:
        """The state of each rule (``rule``: "policy/rule" or a rule name; None: all) and subject: idle, pending
        since, firing since, cooling down until, and the last evaluation problem. ``now_ms``: carry the
        subjects' clocks forward (as tick does) to tell whether a cooldown is still running."""
        rules = [r for r in self._rules if rule is None or rule in (r.key, r.spec.name)]
        if rule is not None and not rules:
            return f"no automation rule {rule!r} runs at the {self.at}"
        n = len(self._rules)
        lines = [f"automation at the {self.at}: {n} rule{'s' if n != 1 else ''}, {self.evaluations} evaluations"
                 + (f", {self.stale} stale observations ignored" if self.stale else "")
                 + (f", {self.evicted} subjects evicted" if self.evicted else "")]
        for r in rules:
            s = r.spec
            head = f"{r.key} ({r.source}){' [audit]' if r.mode == 'audit' else ''}: when {s.when}"
            head += f" for {_span(r.for_ms)}" if r.for_ms else ""
            head += f", clear when {s.clear_when}" if s.clear_when else ""
            head += f", cooldown {_span(r.cooldown_ms)}" if r.cooldown_ms else ""
            lines.append(head)
            if not r.subjects:
                lines.append("  no observations yet")
            shown = 0
            for (site, node), st in reversed(r.subjects.items()):  # most recently seen first
                if shown >= limit:
                    lines.append(f"  ... and {len(r.subjects) - shown} more")
                    break
                shown += 1
                lines.append(f"  {node} (site {site}): " + self._describe(r, st, now_ms))
        return "\n".join(lines)

    @staticmethod
    def _describe(r: _Rule, st: _Sub, now_ms: int | None) -> str:
        clock = st.clock(now_ms) if now_ms is not None else st.last_ts
        if st.phase == PENDING:
            assert st.since is not None
            text = f"pending since {_iso(st.since)}"
            due = st.since + r.for_ms
            free = st.fired + r.cooldown_ms if st.fired is not None and r.cooldown_ms else None
            if free is not None and free > due:
                text += f", held back by the cooldown until {_iso(free)}"
            elif r.for_ms:
                text += f", fires at {_iso(due)} if it holds"
        elif st.phase == FIRING:
            assert st.since is not None
            text = f"firing since {_iso(st.fired or st.since)} (true since {_iso(st.since)})"
        else:
            text = "idle"
        if st.fired is not None and r.cooldown_ms and st.phase != PENDING and clock < st.fired + r.cooldown_ms:
            text += f", cooling down until {_iso(st.fired + r.cooldown_ms)}"
        text += f"; last observation {_iso(st.last_ts)}"
        if st.note:
            text += f"; note: {st.note}"
        return text


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def render(template: str, ctx: dict[str, str], values: dict[str, Any]) -> str:
    """An alert message: ``{node}``... from ``ctx``, ``{values.x}`` from ``values`` (``?`` when missing);
    a format spec (``{values.t:.1f}``) applies when it fits the value."""
    out = []
    for lit, fname, spec, _conv in _FORMATTER.parse(template):
        out.append(lit)
        if fname is None:
            continue
        if fname.startswith("values."):
            name = fname[7:]
            v = values.get(name, "?")
        else:
            v = ctx.get(fname, "?")
        try:
            out.append(format(v, spec or ""))
        except (TypeError, ValueError):
            out.append(str(v))
    return "".join(out)[:1000]
