"""Access decisions: may this subject publish, subscribe, command or read this topic? Sans-I/O.

Order: a matching ``deny`` rule of an enforced policy wins; else a matching ``allow`` of an
enforced policy; else nothing allows it (deny). A policy in ``audit`` mode is evaluated too and its
verdict is reported (``audit``) but not enforced, so an operator can see what it would do first.
Publishing matches the topic against each rule's filters; subscribing needs the requested filter
to be covered by one (a device may not subscribe to ``#`` because it may read its own topics).
Reading or commanding a filter (a REST read of a node's ``telemetry/+``) needs an allow that covers
it, and is denied by any deny rule whose filter overlaps it.

The same rules feed the brokers: :meth:`AccessEngine.broker_acl` turns them into one broker user's
ACL (:mod:`cwsnet.registry` writes it into the credentials file :mod:`cwsnet.broker` enforces), and
:class:`DenyRecorder` turns refusals into rate-limited ``access.denied`` events naming the rule.
"""

from __future__ import annotations

import fnmatch
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cwsnet.broker import filter_covers, filters_intersect, topic_matches
from cwsnet.policy.cel import Condition
from cwsnet.policy.loader import PolicySet, load_policies
from cwsnet.policy.schema import AccessRule

#: the actions a broker enforces (``command`` and ``read`` are the cloud's REST API's)
BROKER_ACTIONS = ("publish", "subscribe")


@dataclass(frozen=True)
class Subject:
    id: str
    role: str
    site: str


@dataclass(frozen=True)
class Match:
    policy: str
    rule: str
    effect: str
    mode: str
    filter: str  # the rule's filter with the subject's {id}/{site} filled in
    source: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    subject: Subject
    action: str
    topic: str
    decided_by: Match | None
    audit: list[Match] = field(default_factory=list)  # what audit-mode policies would have decided
    notes: list[str] = field(default_factory=list)  # conditions that failed to evaluate, and why

    @property
    def rule(self) -> str | None:
        return f"{self.decided_by.policy}/{self.decided_by.rule}" if self.decided_by else None

    def explain(self) -> str:
        s = self.subject
        verdict = "ALLOW" if self.allowed else "DENY"
        lines = [f"{verdict}: {s.role} {s.id} (site {s.site}) {self.action} {self.topic}"]
        m = self.decided_by
        if m is None:
            lines.append("  no enforced rule matches: denied by default")
        else:
            lines.append(f"  decided by {m.policy}/{m.rule} ({m.effect}, {m.source})")
            lines.append(f"  matched filter {m.filter}")
        for a in self.audit:
            lines.append(f"  audit: {a.policy}/{a.rule} would {a.effect} (filter {a.filter}); not enforced")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _free_variables(text: str) -> frozenset[str]:
    """The top-level names a CEL expression reads (``subject``, ``topic``, ``action``...)."""
    from lark import Token, Tree

    ast = Condition._env.compile(text)
    return frozenset(t.children[0].value for t in ast.iter_subtrees()
                     if isinstance(t, Tree) and t.data == "ident" and t.children
                     and isinstance(t.children[0], Token))


@dataclass(frozen=True)
class _Rule:
    policy: str
    mode: str
    source: str
    rule: AccessRule
    cond: Condition | None
    #: the condition reads ``topic``: it cannot be decided per subject, only per topic
    per_topic: bool

    @property
    def name(self) -> str:
        return f"{self.policy}/{self.rule.name}"


@dataclass(frozen=True)
class BrokerAcl:
    """One broker user's ACL from the policies (what :func:`cwsnet.registry.cloud_broker_users` writes).

    ``publish``/``subscribe``: the filters enforced allow rules grant; ``deny_publish``/
    ``deny_subscribe``: the filters enforced deny rules take away (a deny beats an allow; a
    subscription that only overlaps a denied filter is accepted, and the denied topics are not
    delivered: ``deny_receive``). ``conditional``: enforced rules whose ``when`` reads ``topic``,
    which the broker evaluates per topic. ``audit``: rules of audit-mode policies, which the broker
    only reports. ``notes``: conditions that failed to evaluate (the rule was left out).
    """

    subject: Subject
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    deny_publish: list[str] = field(default_factory=list)
    deny_subscribe: list[str] = field(default_factory=list)
    conditional: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        """The ACL part of a user's entry in a :mod:`cwsnet.broker` credentials file (empty lists beyond
        ``publish`` and ``subscribe`` left out, so the default policy gives exactly the historic ACL)."""
        doc: dict[str, Any] = {"publish": list(self.publish), "subscribe": list(self.subscribe)}
        if self.deny_publish:
            doc["deny_publish"] = list(self.deny_publish)
        if self.deny_subscribe:
            doc["deny_subscribe"] = list(self.deny_subscribe)
            doc["deny_receive"] = list(self.deny_subscribe)
        if self.conditional:
            doc["conditional"] = [dict(c) for c in self.conditional]
        if self.audit:
            doc["audit"] = [dict(a) for a in self.audit]
        if any("when" in c for c in [*self.conditional, *self.audit]):
            s = self.subject
            doc["subject"] = {"id": s.id, "role": s.role, "site": s.site}
        return doc


class AccessEngine:
    def __init__(self, pset: PolicySet) -> None:
        self.digest = pset.digest
        self._rules: list[_Rule] = []
        for loaded in pset.of_kind("access"):
            p = loaded.policy
            for r in p.rules:
                cond = Condition(r.when) if r.when else None
                per_topic = cond is not None and "topic" in _free_variables(r.when)
                self._rules.append(_Rule(p.name, p.mode, loaded.rule_sources.get(r.name, loaded.source), r, cond,
                                         per_topic))

    @staticmethod
    def _fill(flt: str, s: Subject) -> str:
        return flt.replace("{id}", s.id).replace("{site}", s.site)

    @staticmethod
    def _applies(r: AccessRule, s: Subject, action: str, broker: str | None) -> bool:
        w = r.who
        return (action in r.actions and (broker is None or r.broker in ("*", broker))
                and w.role in ("*", s.role) and fnmatch.fnmatchcase(s.id, w.id) and fnmatch.fnmatchcase(s.site, w.site))

    @staticmethod
    def _hit(flt: str, effect: str, action: str, topic: str) -> bool:
        if action == "subscribe":
            return filter_covers(flt, topic)
        if "+" in topic or "#" in topic:  # reading or commanding a filter: all of it allowed, any of it denied
            return filters_intersect(flt, topic) if effect == "deny" else filter_covers(flt, topic)
        return topic_matches(flt, topic)

    def _matches(self, s: Subject, action: str, topic: str, broker: str | None, notes: list[str]) -> list[Match]:
        out = []
        for x in self._rules:
            r = x.rule
            if not self._applies(r, s, action, broker):
                continue
            for flt in r.topics:
                f = self._fill(flt, s)
                if not self._hit(f, r.effect, action, topic):
                    continue
                if x.cond is not None:
                    ok, err = x.cond.evaluate({"subject": {"id": s.id, "role": s.role, "site": s.site},
                                               "topic": topic, "action": action})
                    if err is not None:  # fail closed: a deny applies, an allow does not
                        ok = r.effect == "deny"
                        notes.append(f"{x.name}: condition failed to evaluate ({err}); "
                                     + ("applied (a deny fails closed)" if ok else "not applied"))
                    if not ok:
                        break
                out.append(Match(x.policy, r.name, r.effect, x.mode, f, x.source))
                break
        return out

    def decide(self, subject: Subject, action: str, topic: str, broker: str | None = None) -> Decision:
        """``broker``: "site" or "cloud" to use only that broker's rules; None: any."""
        notes: list[str] = []
        matches = self._matches(subject, action, topic, broker, notes)
        enforced = [m for m in matches if m.mode == "enforce"]
        audit = [m for m in matches if m.mode == "audit"]
        deny = next((m for m in enforced if m.effect == "deny"), None)
        allow = next((m for m in enforced if m.effect == "allow"), None)
        decided = deny or allow
        return Decision(deny is None and allow is not None, subject, action, topic, decided, audit, notes)

    # -- static ACLs -------------------------------------------------------------------------------

    def _per_subject(self, x: _Rule, s: Subject, action: str, notes: list[str]) -> bool | None:
        """Whether rule ``x`` applies to ``s`` whatever the topic: True/False, or None when its condition
        reads the topic (then only a per-topic check can tell)."""
        if x.cond is None:
            return True
        if x.per_topic:
            return None
        ok, err = x.cond.evaluate({"subject": {"id": s.id, "role": s.role, "site": s.site}, "action": action})
        if err is not None:  # fail closed: a deny applies, an allow does not
            ok = x.rule.effect == "deny"
            notes.append(f"{x.name}: condition failed to evaluate ({err}); "
                         + ("applied (a deny fails closed)" if ok else "not applied"))
        return ok

    def grants(self, subject: Subject, action: str, broker: str | None = None) -> list[str]:
        """The filters the enforced allow rules give ``subject`` for ``action`` (what a broker ACL lists).
        A rule whose condition reads only ``subject``/``action`` counts when it holds; one that reads
        ``topic`` is left out (see :meth:`broker_acl`)."""
        return self._filters(subject, action, broker, "allow", [])

    def _filters(self, s: Subject, action: str, broker: str | None, effect: str, notes: list[str]) -> list[str]:
        out: list[str] = []
        for x in self._rules:
            if x.mode != "enforce" or x.rule.effect != effect or not self._applies(x.rule, s, action, broker):
                continue
            if self._per_subject(x, s, action, notes):
                out += [f for f in (self._fill(t, s) for t in x.rule.topics) if f not in out]
        return out

    def broker_acl(self, subject: Subject, broker: str) -> BrokerAcl:
        """Everything ``broker`` ("site" or "cloud") must enforce for ``subject``'s user."""
        notes: list[str] = []
        acl = BrokerAcl(subject, notes=notes)
        for action in BROKER_ACTIONS:
            getattr(acl, action).extend(self._filters(subject, action, broker, "allow", notes))
            getattr(acl, f"deny_{action}").extend(self._filters(subject, action, broker, "deny", notes))
            for x in self._rules:
                if not self._applies(x.rule, subject, action, broker):
                    continue
                applies = self._per_subject(x, subject, action, notes)
                if x.mode == "enforce" and applies is not None:
                    continue  # static: in the lists above
                if applies is False:
                    continue
                entry: dict[str, Any] = {"rule": x.name, "effect": x.rule.effect, "action": action,
                                         "filters": [self._fill(t, subject) for t in x.rule.topics],
                                         "source": x.source}
                if applies is None:
                    entry["when"] = x.rule.when
                (acl.audit if x.mode == "audit" else acl.conditional).append(entry)
        notes[:] = list(dict.fromkeys(notes))
        return acl


@functools.lru_cache(maxsize=1)
def shipped_access_engine() -> AccessEngine:
    """The engine of the policies shipped with this cwsnet (``policies/``), loaded once."""
    from cwsnet.policy.watch import shipped_policies

    return AccessEngine(load_policies([shipped_policies()]))


# -- denials as events ------------------------------------------------------------------------------


class DenyRecorder:
    """Turns refused access attempts into events naming the rule: at most one per (subject, action,
    rule) every ``interval`` seconds, with the number suppressed since. An attempt that was allowed
    but that an audit-mode rule would deny gives an ``access.audit`` event the same way.

    Sans-I/O: the caller passes ``now`` (seconds, any monotonic clock) and stores the returned event.
    A flood is cheap: at most ``budget`` decisions per (subject, action) per interval are evaluated;
    the rest are counted and dropped.
    """

    def __init__(self, engine: AccessEngine, *, interval: float = 60.0, budget: int = 30,
                 max_keys: int = 10_000) -> None:
        self.engine = engine
        self.interval = interval
        self.budget = budget
        self.max_keys = max_keys
        self._last: dict[tuple[Any, ...], tuple[float, int]] = {}  # (subject, action, kind, rule) -> (when, suppressed)
        self._spent: dict[tuple[Subject, str], tuple[float, int]] = {}  # (subject, action) -> (window start, used)
        self.dropped = 0  # attempts not evaluated because of the budget

    def record(self, subject: Subject, action: str, topic: str, now: float, *,
               broker: str | None = None) -> dict[str, Any] | None:
        """The event for this attempt, or None (allowed, or already reported within ``interval``)."""
        key = (subject, action)
        start, used = self._spent.get(key, (float("-inf"), 0))
        if now - start >= self.interval:
            start, used = now, 0
        if used >= self.budget:
            self.dropped += 1
            return None
        if len(self._spent) > self.max_keys:
            self._spent.clear()
        self._spent[key] = (start, used + 1)
        return self.observe(self.engine.decide(subject, action, topic, broker), now, broker=broker)

    def observe(self, d: Decision, now: float, *, broker: str | None = None) -> dict[str, Any] | None:
        """Like :meth:`record` for a decision already made (the REST API decides first)."""
        s = d.subject
        if not d.allowed:
            kind, severity, rule = "access.denied", "warning", d.rule
            source = d.decided_by.source if d.decided_by else None
            why = f"denied by {rule}" if rule else "no rule allows it"
            message = f"{s.role} {s.id} may not {d.action} {d.topic}: {why}"
        else:
            a = next((m for m in d.audit if m.effect == "deny"), None)
            if a is None:
                return None
            kind, severity, rule, source = "access.audit", "info", f"{a.policy}/{a.rule}", a.source
            message = (f"{s.role} {s.id} may {d.action} {d.topic}, but audit rule {rule} would deny it "
                       "(audit mode: not enforced)")
        key = (s, d.action, kind, rule)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if len(self._last) > self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        data: dict[str, Any] = {"subject": {"id": s.id, "role": s.role, "site": s.site}, "action": d.action,
                                "topic": d.topic, "rule": rule, "source": source, "broker": broker,
                                "suppressed": last[1] if last else 0, "explain": d.explain()}
        return {"kind": kind, "severity": severity, "source": s.id, "message": message, "data": data}

    def broker_hook(self, resolve: Callable[[str], Subject | None], sink: Callable[[dict[str, Any]], None], *,
                    broker: str, clock: Callable[[], float] = time.monotonic) -> Callable[[str | None, str, str, bool],
                                                                                         None]:
        """A :class:`cwsnet.broker.CwsBroker` ``on_decision`` callback: resolves the broker username to a
        subject (None: not ours, ignored), records the attempt and hands each event to ``sink``
        (which must not block: it runs on the broker's event loop)."""

        def on_decision(username: str | None, action: str, topic: str, allowed: bool) -> None:
            subject = resolve(username) if username else None
            if subject is None:
                return
            event = self.record(subject, action, topic, clock(), broker=broker)
            if event is not None:
                sink(event)

        return on_decision
