"""Access decisions: may this subject publish, subscribe, command or read this topic? Sans-I/O.

Order: a matching ``deny`` rule of an enforced policy wins; else a matching ``allow`` of an
enforced policy; else nothing allows it (deny). A policy in ``audit`` mode is evaluated too and its
verdict is reported (``audit``) but not enforced, so an operator can see what it would do first.
Publishing matches the topic against each rule's filters; subscribing needs the requested filter
to be covered by one (a device may not subscribe to ``#`` because it may read its own topics).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from cwsnet.broker import filter_covers, topic_matches
from cwsnet.policy.cel import Condition
from cwsnet.policy.loader import PolicySet
from cwsnet.policy.schema import AccessRule


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


class AccessEngine:
    def __init__(self, pset: PolicySet) -> None:
        self._rules: list[tuple[str, str, str, AccessRule, Condition | None]] = []
        for loaded in pset.of_kind("access"):
            p = loaded.policy
            for r in p.rules:
                self._rules.append((p.name, p.mode, loaded.rule_sources.get(r.name, loaded.source), r,
                                    Condition(r.when) if r.when else None))

    @staticmethod
    def _fill(flt: str, s: Subject) -> str:
        return flt.replace("{id}", s.id).replace("{site}", s.site)

    @staticmethod
    def _applies(r: AccessRule, s: Subject, action: str, broker: str | None) -> bool:
        w = r.who
        return (action in r.actions and (broker is None or r.broker in ("*", broker))
                and w.role in ("*", s.role) and fnmatch.fnmatchcase(s.id, w.id) and fnmatch.fnmatchcase(s.site, w.site))

    def _matches(self, s: Subject, action: str, topic: str, broker: str | None, notes: list[str]) -> list[Match]:
        out = []
        for policy, mode, source, r, cond in self._rules:
            if not self._applies(r, s, action, broker):
                continue
            for flt in r.topics:
                f = self._fill(flt, s)
                hit = filter_covers(f, topic) if action == "subscribe" else topic_matches(f, topic)
                if not hit:
                    continue
                if cond is not None:
                    ok, err = cond.evaluate({"subject": {"id": s.id, "role": s.role, "site": s.site},
                                             "topic": topic, "action": action})
                    if err is not None:
                        notes.append(f"{policy}/{r.name}: condition failed to evaluate ({err}); not applied")
                    if not ok:
                        break
                out.append(Match(policy, r.name, r.effect, mode, f, source))
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

    def grants(self, subject: Subject, action: str, broker: str | None = None) -> list[str]:
        """The filters the enforced allow rules give ``subject`` for ``action`` (what a broker ACL lists)."""
        out: list[str] = []
        for _policy, mode, _source, r, cond in self._rules:
            if mode != "enforce" or r.effect != "allow" or cond is not None or not self._applies(r, subject, action,
                                                                                                  broker):
                continue
            out += [self._fill(f, subject) for f in r.topics if self._fill(f, subject) not in out]
        return out
