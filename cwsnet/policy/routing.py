"""Routing policies: where each stream of telemetry may go, and which data class it belongs to. Sans-I/O.

    kind: routing
    name: health-stays-on-site
    rules:
      - name: health-at-gateway
        match: {streams: ["health", "health.*"], node: "*", site: "*"}
        class: health            # the data class (a label other policies and the API use)
        to: gateway              # gateway: sealed to the site gateway and kept there; cloud (default)
        keep: 7d                 # how long the gateway keeps the raw readings (to: gateway only)
        summary: {every: 1h, stream: health.summary, stats: [count, min, max, mean]}

The first matching rule decides (policies in name order, rules in file order); nothing matching
means ``to: cloud`` with no class. A stream routed ``to: gateway`` is sealed by the device to its
gateway (the gateway tells each device its routes in a sealed ``config`` message, protocol §9),
so only the gateway can open it; the gateway stores the readings, runs its automation over them,
and sends only the summaries up, sealed to the cloud as its own telemetry. A device that seals
such a stream to the cloud anyway (it has not heard its routes yet) has it dropped by the
gateway, which records a ``routing.dropped`` event naming the rule.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cwsnet.policy.loader import PolicySet
from cwsnet.policy.schema import PolicyBase, Strict, _name, duration, register_kind
from cwsnet.topics import route_in_table  # noqa: F401  (re-exported: the device side's half)

STATS = ("count", "min", "max", "mean", "sum", "last")
DEFAULT_KEEP = 7 * 86400.0


class Match(Strict):
    streams: list[str] = Field(["*"], min_length=1, description="patterns over the telemetry stream name: * and ? "
                                                                 "(what the devices' matchers share)")
    node: str = Field("*", description="fnmatch pattern over the sending node's id")
    site: str = Field("*", description="fnmatch pattern over the node's site")

    @field_validator("streams")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:  # the devices match these themselves; the firmware knows * and ? only
            if not p or len(p) > 63 or "[" in p or "]" in p or "/" in p:
                raise ValueError(f"{p!r}: a stream pattern is 1-63 characters, with * and ? as wildcards "
                                 "(no [...] classes, no /)")
        return v


class Summary(Strict):
    every: float = Field(description="window length: readings are summarised per aligned window (e.g. 1h)")
    stream: str = Field(description="the gateway's own telemetry stream the summaries are sent on")
    stats: list[Literal["count", "min", "max", "mean", "sum", "last"]] = Field(
        ["count", "min", "max", "mean"], min_length=1)

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, v: Any) -> float:
        s = duration(v, "every")
        if s < 1:
            raise ValueError("every must be at least 1s")
        return s

    @field_validator("stream")
    @classmethod
    def _stream(cls, v: str) -> str:
        from cwsnet.topics import check_name

        try:
            check_name(v, "stream")
        except Exception as exc:  # noqa: BLE001 - TopicError: say it as a validation error
            raise ValueError(str(exc)) from None
        return v


class RoutingRule(Strict):
    name: str
    match: Match = Field(default_factory=Match)
    data_class: str | None = Field(None, alias="class", description="the data class of the matched streams")
    to: Literal["gateway", "cloud"] = "cloud"
    keep: float | None = Field(None, description="how long the gateway keeps raw readings (to: gateway); "
                                                 "default 7d")
    summary: Summary | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name(v)

    @field_validator("data_class")
    @classmethod
    def _check_class(cls, v: str | None) -> str | None:
        return None if v is None else _name(v)

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, v: Any) -> float | None:
        return None if v is None else duration(v, "keep")

    @model_validator(mode="after")
    def _gateway_only(self) -> RoutingRule:
        if self.to == "cloud" and (self.summary is not None or self.keep is not None):
            raise ValueError("summary and keep apply only to streams kept at the gateway (to: gateway)")
        if self.summary is not None and (self.keep or DEFAULT_KEEP) < self.summary.every:
            raise ValueError("keep must be at least summary.every: readings would expire before their window "
                             "is summarised")
        return self


class RoutingPolicy(PolicyBase):
    kind: Literal["routing"]
    rules: list[RoutingRule] = Field(min_length=1)


register_kind("routing", RoutingPolicy)


@dataclass(frozen=True)
class Route:
    site: str
    node: str
    stream: str
    to: str  # "gateway" or "cloud"
    data_class: str | None = None
    policy: str | None = None
    rule: str | None = None
    source: str | None = None
    pattern: str | None = None  # the stream pattern that matched
    keep: float | None = None
    summary: Summary | None = None
    audit: list[str] = field(default_factory=list)  # what audit-mode rules would have decided

    @property
    def decided_by(self) -> str | None:
        return f"{self.policy}/{self.rule}" if self.rule else None

    def explain(self) -> str:
        where = "KEEP AT GATEWAY" if self.to == "gateway" else "TO CLOUD"
        lines = [f"{where}: telemetry/{self.stream} of {self.node} (site {self.site})"]
        if self.rule is None:
            lines.append("  no enforced routing rule matches: sealed to the cloud (the default)")
        else:
            lines.append(f"  decided by {self.decided_by} ({self.source})")
            lines.append(f"  matched stream pattern {self.pattern!r}" +
                         (f", data class {self.data_class}" if self.data_class else ""))
        if self.to == "gateway":
            lines.append(f"  sealed to the site gateway; raw readings kept there {_human(self.keep or DEFAULT_KEEP)}")
            if self.summary is not None:
                s = self.summary
                lines.append(f"  summaries ({', '.join(s.stats)}) every {_human(s.every)} go up as "
                             f"telemetry/{s.stream}")
            else:
                lines.append("  nothing about it goes up")
        lines += [f"  audit: {a}; not enforced" for a in self.audit]
        return "\n".join(lines)


def _human(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


class RoutingEngine:
    def __init__(self, pset: PolicySet | None) -> None:
        self._rules: list[tuple[str, str, str, RoutingRule]] = []
        for loaded in sorted(pset.of_kind("routing") if pset else [], key=lambda p: p.policy.name):
            p = loaded.policy
            for r in p.rules:
                self._rules.append((p.name, p.mode, loaded.rule_sources.get(r.name, loaded.source), r))
        self._cache: dict[tuple[str, str, str], Route] = {}

    @property
    def empty(self) -> bool:
        return not self._rules

    @staticmethod
    def _stream_match(r: RoutingRule, stream: str) -> str | None:
        return next((p for p in r.match.streams if fnmatch.fnmatchcase(stream, p)), None)

    def route(self, site: str, node: str, stream: str) -> Route:
        key = (site, node, stream)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        audit: list[str] = []
        decided: Route | None = None
        for policy, mode, source, r in self._rules:
            if not (fnmatch.fnmatchcase(node, r.match.node) and fnmatch.fnmatchcase(site, r.match.site)):
                continue
            pattern = self._stream_match(r, stream)
            if pattern is None:
                continue
            if mode == "audit":
                if decided is None:
                    audit.append(f"{policy}/{r.name} would send it to the {r.to}")
                continue
            decided = Route(site, node, stream, r.to, r.data_class, policy, r.name, source, pattern,
                            (r.keep or DEFAULT_KEEP) if r.to == "gateway" else None, r.summary, audit)
            break
        route = decided or Route(site, node, stream, "cloud", audit=audit)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key] = route
        return route

    def device_table(self, site: str, node: str) -> list[list[str]]:
        """What a device needs to route by itself: its enforced rules in order, as [pattern, to]
        pairs (first match wins, nothing matching: cloud). Sent to it in the gateway's ``config``."""
        table: list[list[str]] = []
        for _policy, mode, _source, r in self._rules:
            if mode != "enforce" or not (fnmatch.fnmatchcase(node, r.match.node)
                                         and fnmatch.fnmatchcase(site, r.match.site)):
                continue
            table += [[p, r.to] for p in r.match.streams]
        while table and table[-1][1] == "cloud":  # trailing cloud entries change nothing
            table.pop()
        return table

    def summaries(self) -> list[tuple[str, str, RoutingRule]]:
        """(policy, source, rule) of every enforced gateway rule with a summary."""
        return [(p, s, r) for p, mode, s, r in self._rules if mode == "enforce" and r.summary is not None]

    def keeps(self) -> list[tuple[RoutingRule, float]]:
        return [(r, r.keep or DEFAULT_KEEP) for _p, mode, _s, r in self._rules if mode == "enforce" and r.to == "gateway"]


def summarize(rows: list[tuple[str, str, int, dict[str, Any]]], start_ms: int, end_ms: int,
              stats: list[str]) -> list[dict[str, Any]]:
    """Summary readings of ``rows`` (node, stream, ts, values): the readings the gateway received in
    the window [start_ms, end_ms). One reading per (node, stream) with ``node``, ``stream``,
    ``window_s``, ``count``, ``first_ts`` / ``last_ts`` (the readings' own times) and
    ``<value>.<stat>`` for each numeric value (text, booleans and anything else are not
    summarised). ``ts`` is the window's end."""
    groups: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
    for node, stream, ts, values in rows:
        groups.setdefault((node, stream), []).append((ts, values))
    out = []
    for (node, stream), readings in sorted(groups.items()):
        readings.sort(key=lambda r: r[0])
        values: dict[str, Any] = {"node": node, "stream": stream, "window_s": (end_ms - start_ms) // 1000,
                                  "count": len(readings), "first_ts": readings[0][0], "last_ts": readings[-1][0]}
        numbers: dict[str, list[float]] = {}
        for _ts, vals in readings:
            if not isinstance(vals, dict):
                continue
            for k, v in vals.items():
                if isinstance(k, str) and _number(v):
                    numbers.setdefault(k, []).append(v)
        for k in sorted(numbers):
            xs = numbers[k]
            for s in stats:
                if s == "count":
                    values[f"{k}.count"] = len(xs)
                elif s == "min":
                    values[f"{k}.min"] = min(xs)
                elif s == "max":
                    values[f"{k}.max"] = max(xs)
                elif s == "mean":
                    values[f"{k}.mean"] = round(math.fsum(xs) / len(xs), 6)
                elif s == "sum":
                    values[f"{k}.sum"] = math.fsum(xs)
                elif s == "last":
                    values[f"{k}.last"] = xs[-1]
        out.append({"ts": end_ms, "values": values})
    return out


def _number(v: Any) -> bool:
    """A finite number CBOR and the cloud take as is (int64, or a finite float)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -(2**63) <= v < 2**63
    return isinstance(v, float) and math.isfinite(v)
