"""The policy file schema (docs/policies.md). One YAML file may hold several policies (``---``).

    kind: access                     # the only kind implemented so far
    name: default-access             # unique across the whole set
    mode: enforce                    # or audit: decisions are computed and logged, not enforced
    description: text
    rules:
      - name: device-uplink          # unique within the policy; the name every explanation cites
        effect: allow                # or deny (a matching deny beats any allow)
        who: {role: device, id: "*", site: "*"}     # fnmatch patterns over the subject
        actions: [publish]           # publish, subscribe, command, read
        broker: "*"                  # site, cloud or * (both): which broker's ACL the rule feeds
        topics: ["cws/v1/{site}/{id}/status"]      # MQTT filters; {id} and {site} are the subject's
        when: 'subject.id.startsWith("dev-")'       # optional CEL condition over subject and topic
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cwsnet.policy.cel import Condition, ConditionError

ROLES = ("device", "gateway", "app", "operator", "cloud")
ACTIONS = ("publish", "subscribe", "command", "read")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_PLACEHOLDER = re.compile(r"\{([^}]*)\}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def condition(v: str | None) -> str | None:
    """Validate a CEL condition at load time (compiles, within the limits); the error names why."""
    if v is not None:
        try:
            Condition(v)
        except ConditionError as exc:
            raise ValueError(str(exc)) from None
    return v


def role_pattern(v: str) -> str:
    """A role, or ``*`` for any."""
    if v != "*" and v not in ROLES:
        raise ValueError(f"must be one of {', '.join(ROLES)} or '*'")
    return v


def _name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("must be 1-63 characters from a-z 0-9 _ . -, starting with a letter or digit")
    return v


class Who(Strict):
    role: str = Field("*", description="device, gateway, app, operator, cloud, or * for any")
    id: str = Field("*", description="the subject's node id, an fnmatch pattern (e.g. 'sensor-*')")
    site: str = Field("*", description="the subject's site, an fnmatch pattern")

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        return role_pattern(v)


class AccessRule(Strict):
    name: str
    effect: Literal["allow", "deny"] = "allow"
    who: Who = Field(default_factory=Who)
    actions: list[Literal["publish", "subscribe", "command", "read"]] = Field(min_length=1)
    broker: Literal["site", "cloud", "*"] = Field("*", description="the broker the rule is for: a site's, the "
                                                  "cloud's, or both")
    topics: list[str] = Field(min_length=1, description="MQTT topic filters; {id} and {site} are the subject's")
    when: str | None = Field(None, description="a CEL condition over `subject` (id, role, site) and `topic`")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name(v)

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: list[str]) -> list[str]:
        from cwsnet.broker import is_valid_filter

        for t in v:
            for ph in _PLACEHOLDER.findall(t):
                if ph not in ("id", "site"):
                    raise ValueError(f"{t!r}: unknown placeholder {{{ph}}} (use {{id}} or {{site}})")
            if not is_valid_filter(_PLACEHOLDER.sub("x", t)):
                raise ValueError(f"{t!r} is not a valid MQTT topic filter")
        return v

    @field_validator("when")
    @classmethod
    def _when(cls, v: str | None) -> str | None:
        return condition(v)


class PolicyBase(Strict):
    """What every kind shares: ``name``, ``mode``, ``description``, and named ``rules`` (the subclass
    declares ``kind`` and ``rules``; rule names must be unique within the policy)."""

    name: str
    mode: Literal["enforce", "audit"] = "enforce"
    description: str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name(v)

    @field_validator("rules", check_fields=False)
    @classmethod
    def _unique_rules(cls, v: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for r in v:
            if r.name in seen:
                raise ValueError(f"two rules are named {r.name!r}")
            seen.add(r.name)
        return v


class AccessPolicy(PolicyBase):
    kind: Literal["access"]
    rules: list[AccessRule] = Field(min_length=1)


#: every policy kind the loader accepts: ``kind`` -> its model. Each kind's module registers itself
#: with :func:`register_kind`; ``cwsnet.policy.loader`` imports them all.
KINDS: dict[str, type[Strict]] = {"access": AccessPolicy}


def register_kind(kind: str, model: type[Strict]) -> None:
    """Make ``kind: <kind>`` documents load as ``model`` (a Strict model with ``kind``, ``name``, ``mode``)."""
    KINDS[kind] = model


def duration(v: object, field: str = "duration") -> float:
    """Seconds from ``30s``, ``5m``, ``1h``, ``7d``, ``250ms`` or a plain number of seconds."""
    if isinstance(v, bool):
        raise ValueError(f"{field} must be a duration like 30s, 5m, 1h or 7d")
    if isinstance(v, int | float):
        seconds = float(v)
    elif isinstance(v, str) and (m := _DURATION.match(v.strip())):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"{field} must be a duration like 30s, 5m, 1h or 7d")
    if not 0 <= seconds <= 10 * 365 * 86400:
        raise ValueError(f"{field} must be between 0 and 10 years")
    return seconds


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
