"""CWSNet's embedded MQTT broker: amqtt 0.12.1 plus our fixes, authentication and topic ACL.

Public API
----------
``BrokerSettings``            plain dataclass: listeners, credentials file, offline queue bound.
``start_broker(settings, on_decision=None)``  build and start a :class:`CwsBroker`; stop it with
                              ``await broker.shutdown()``; ``on_decision`` hears refusals and audit findings.
``serve(settings)``           run a broker until SIGTERM/SIGINT (``python -m cwsnet.broker --help``).
``CwsBroker``                 ``amqtt.broker.Broker`` subclass fixing amqtt 0.12.1 defects (listed below).
``CwsAccessPlugin``           one amqtt plugin doing authentication, client id binding and the topic
                              ACL, fed from a hot-reloaded JSON credentials file (``load_credentials``
                              parses one).
``topic_matches`` / ``filter_covers`` / ``filters_intersect``  the MQTT wildcard algebra the ACL uses.

A user's ACL (``Rules``): ``publish``/``subscribe`` allow; ``deny_publish``/``deny_subscribe``/``deny_receive``
take away (a deny beats an allow); ``conditional`` rules (CEL over the topic) are checked per topic and
``audit`` rules only reported. ``cwsnet.registry`` writes them from the ``access`` policies.

The amqtt defects, what we do about them and the tests that cover them are listed in
``docs/broker.md``.  Every override in :class:`CwsBroker` is a copy of the amqtt 0.12.1 method
with the changed lines marked ``# CWS:``; re-review them when amqtt is upgraded (a warning is
logged when the installed amqtt is not 0.12.1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

from amqtt.broker import Broker, Server
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError, PluginError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import format_client_message, gen_client_id
from transitions import MachineError

from cwsnet.config import plaintext_bind_problem
from cwsnet.errors import ConfigError
from cwsnet.tls import is_loopback_host

__all__ = [
    "DEFAULT_ANONYMOUS_CLIENT_IDS",
    "DEFAULT_CLIENT_IDS",
    "DEFAULT_MAX_OFFLINE_QUEUE",
    "BrokerSettings",
    "Credentials",
    "CwsAccessPlugin",
    "CwsBroker",
    "DecisionCallback",
    "PolicyRule",
    "Rules",
    "User",
    "broker_config",
    "filter_covers",
    "filters_intersect",
    "hash_token",
    "is_loopback_host",
    "is_valid_filter",
    "load_credentials",
    "main",
    "parse_credentials",
    "serve",
    "start_broker",
    "topic_matches",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_OFFLINE_QUEUE = 10_000
AMQTT_VERSION_REVIEWED = "0.12.1"

#: Name of the listener the current connection arrived on (set per connection task by
#: ``CwsBroker._client_connected``; asyncio tasks copy the context, so plugin calls see it too).
_CURRENT_LISTENER: contextvars.ContextVar[str | None] = contextvars.ContextVar("cws_listener", default=None)

#: ``Session.attributes`` key holding the ``bind`` string of the listener a session connected on.
LISTENER_BIND_ATTR = "cwsnet.listener_bind"
#: ``Session.attributes`` key counting offline-queue messages dropped for that session.
DROPPED_ATTR = "cwsnet.offline_dropped"


# ----------------------------------------------------------------------------------------------
# MQTT wildcard algebra
# ----------------------------------------------------------------------------------------------


def _valid_filter_levels(levels: Sequence[str]) -> bool:
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
        if "\x00" in level:
            return False
    return True


def is_valid_filter(a_filter: str) -> bool:
    """True if ``a_filter`` is a syntactically valid MQTT topic filter."""
    return bool(a_filter) and _valid_filter_levels(a_filter.split("/"))


def _matches_levels(flt: Sequence[str], topic: Sequence[str]) -> bool:
    if topic and topic[0].startswith("$") and flt and flt[0] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    for i, level in enumerate(flt):
        if level == "#":
            return True  # also matches the parent level ("a/#" matches "a")
        if i >= len(topic):
            return False
        if level != "+" and level != topic[i]:
            return False
    return len(flt) == len(topic)


def topic_matches(a_filter: str, topic: str) -> bool:
    """True if the topic name ``topic`` matches the MQTT filter ``a_filter`` (``+``/``#``/``$`` rules)."""
    return _matches_levels(a_filter.split("/"), topic.split("/"))


def _covers_levels(pattern: Sequence[str], flt: Sequence[str]) -> bool:
    if flt and flt[0].startswith("$") and pattern and pattern[0] in ("+", "#"):
        return False  # the pattern can never match a $-topic
    if flt and flt[0] in ("+", "#") and pattern and pattern[0].startswith("$"):
        return False
    for i, p_level in enumerate(pattern):
        if p_level == "#":
            return True  # everything at and below this level (and the parent itself) is allowed
        if i >= len(flt):
            return False  # the filter matches a shorter topic the pattern does not
        f_level = flt[i]
        if f_level == "#":
            return False  # the filter reaches deeper / shallower than this pattern allows
        if p_level == "+":
            continue  # any single level, including a '+' in the filter
        if f_level != p_level:
            return False  # a '+' in the filter against a literal, or two different literals
    return len(pattern) == len(flt)


def filter_covers(pattern: str, a_filter: str) -> bool:
    """True if every topic the filter ``a_filter`` can match is also matched by ``pattern``.

    ``filter_covers("a/+/c", "a/b/c")`` and ``filter_covers("a/#", "a/+/c")`` are true;
    ``filter_covers("a/b/c", "a/+/c")`` and ``filter_covers("a/+", "a/#")`` are false.
    """
    flt = a_filter.split("/")
    if not _valid_filter_levels(flt):
        return False
    return _covers_levels(pattern.split("/"), flt)


def _intersect_levels(a: Sequence[str], b: Sequence[str]) -> bool:
    if a and b and ((a[0].startswith("$") and b[0] in ("+", "#")) or (b[0].startswith("$") and a[0] in ("+", "#"))):
        return False  # a wildcard never reaches a $-topic
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == "#" or y == "#":
            return True  # everything below (and the parent level itself: "a/#" matches "a")
        if x is None or y is None:
            return False
        if x != y and x != "+" and y != "+":
            return False
    return True


def filters_intersect(a: str, b: str) -> bool:
    """True if some topic name matches both MQTT filters ``a`` and ``b``.

    ``filters_intersect("a/+/c", "a/b/#")`` is true; ``filters_intersect("a/b", "a/c/#")`` is false.
    """
    la, lb = a.split("/"), b.split("/")
    return _valid_filter_levels(la) and _valid_filter_levels(lb) and _intersect_levels(la, lb)


def _bind_is_loopback(bind: str | None) -> bool:
    if not bind:
        return False
    try:
        address, _port = Broker._split_bindaddr_port(bind, 1883)
    except ValueError:
        return False
    return is_loopback_host(address)


def _format_bind(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


# ----------------------------------------------------------------------------------------------
# Credentials file
# ----------------------------------------------------------------------------------------------

_USERNAME_PLACEHOLDER = "{username}"
_FORBIDDEN_IN_USERNAME = ("/", "+", "#", "\x00", "{", "}")
#: client id patterns of a user whose entry has no "client_ids"
DEFAULT_CLIENT_IDS = ("{username}", "{username}-*")
#: client id patterns of anonymous clients when "anonymous_rules" has no "client_ids" (any id no
#: user claims: see Credentials.client_id_refusal)
DEFAULT_ANONYMOUS_CLIENT_IDS = ("*",)

#: one compiled client id pattern: (text, is_prefix); "dev-1" -> ("dev-1", False), "dev-1-*" -> ("dev-1-", True)
ClientIdPattern = tuple[str, bool]
#: ``on_decision(username, action, topic, allowed)``: see :attr:`CwsBroker.on_decision`
DecisionCallback = Callable[[str | None, str, str, bool], None]


def _client_id_rank(patterns: Sequence[ClientIdPattern], client_id: str) -> tuple[int, int] | None:
    """How specifically ``patterns`` match ``client_id`` (None: not at all); greater is more specific.

    An exact pattern beats a prefix of the same length; a longer prefix beats a shorter one.
    """
    best: tuple[int, int] | None = None
    for text, is_prefix in patterns:
        if client_id.startswith(text) if is_prefix else client_id == text:
            rank = (len(text), 0 if is_prefix else 1)
            if best is None or rank > best:
                best = rank
    return best


@dataclass(frozen=True, eq=False)
class PolicyRule:
    """A rule the broker checks per topic (a credentials entry's ``conditional`` or ``audit`` item):
    an access policy rule whose condition reads the topic, or a rule of an audit-mode policy."""

    rule: str  # "policy/rule", for logs
    effect: str  # allow | deny
    action: str  # publish | subscribe (subscribe rules also decide what is delivered)
    filters: tuple[tuple[str, ...], ...]
    condition: Any = None  # a cwsnet.policy.cel.Condition over subject, topic and action; None: always
    subject: tuple[tuple[str, str], ...] = ()
    source: str = ""
    _results: dict[str, bool] = field(default_factory=dict, repr=False)

    def matching(self, levels: Sequence[str], covers: bool = False) -> str | None:
        """The filter of this rule that matches the topic (``covers``: that covers the filter) ``levels``."""
        test = _covers_levels if covers else _matches_levels
        for f in self.filters:
            if test(f, levels):
                return "/".join(f)
        return None

    def holds(self, topic: str) -> bool:
        """The condition for ``topic``, cached per topic. An evaluation error fails closed: a deny rule
        applies, an allow rule does not."""
        if self.condition is None:
            return True
        result = self._results.get(topic)
        if result is None:
            result, err = self.condition.evaluate({"subject": dict(self.subject), "topic": topic,
                                                   "action": self.action})
            if err is not None:
                result = self.effect == "deny"
            if len(self._results) > 4096:
                self._results.clear()
            self._results[topic] = result
        return result

    def decides(self, levels: Sequence[str], topic: str, covers: bool = False) -> str | None:
        flt = self.matching(levels, covers)
        return flt if flt is not None and self.holds(topic) else None


@dataclass(frozen=True)
class Rules:
    """Compiled rules of one user: topic filters (split into levels) and client id patterns.

    A deny beats an allow: ``deny_publish`` refuses a PUBLISH its filters match; ``deny_subscribe`` a
    SUBSCRIBE whose filter they cover (one that only overlaps them is accepted, and ``deny_receive``
    keeps the denied topics from being delivered). ``conditional`` rules are checked per topic.
    """

    publish: tuple[tuple[str, ...], ...] = ()
    subscribe: tuple[tuple[str, ...], ...] = ()
    client_ids: tuple[ClientIdPattern, ...] = ()
    #: topics never delivered to the user even where ``subscribe`` matches (e.g. a `#` reader must
    #: not receive what the cloud publishes unsealed for a loopback-only app)
    deny_receive: tuple[tuple[str, ...], ...] = ()
    deny_publish: tuple[tuple[str, ...], ...] = ()
    deny_subscribe: tuple[tuple[str, ...], ...] = ()
    conditional: tuple[PolicyRule, ...] = ()
    #: rules of audit-mode policies: never change a verdict, only reported (CwsAccessPlugin logs them)
    audit: tuple[PolicyRule, ...] = ()

    def may_use_client_id(self, client_id: str) -> bool:
        """True if one of the user's own ``client_ids`` patterns matches (ignores other users' claims)."""
        return _client_id_rank(self.client_ids, client_id) is not None

    def _conditional(self, action: str, effect: str, levels: Sequence[str], topic: str, covers: bool = False) -> bool:
        return any(c.action == action and c.effect == effect and c.decides(levels, topic, covers) is not None
                   for c in self.conditional)

    def may_publish(self, topic: str) -> bool:
        levels = topic.split("/")
        if any(_matches_levels(p, levels) for p in self.deny_publish):
            return False
        if self.conditional and self._conditional("publish", "deny", levels, topic):
            return False
        return any(_matches_levels(p, levels) for p in self.publish) or \
            (bool(self.conditional) and self._conditional("publish", "allow", levels, topic))

    def may_receive(self, topic: str) -> bool:
        levels = topic.split("/")
        if any(_matches_levels(p, levels) for p in self.deny_receive):
            return False
        if self.conditional and self._conditional("subscribe", "deny", levels, topic):
            return False
        return any(_matches_levels(p, levels) for p in self.subscribe) or \
            (bool(self.conditional) and self._conditional("subscribe", "allow", levels, topic))

    def may_subscribe(self, a_filter: str) -> bool:
        levels = a_filter.split("/")
        if not _valid_filter_levels(levels):
            return False
        if any(_covers_levels(p, levels) for p in self.deny_subscribe):
            return False
        if self.conditional and self._conditional("subscribe", "deny", levels, a_filter, covers=True):
            return False
        return any(_covers_levels(p, levels) for p in self.subscribe) or \
            (bool(self.conditional) and self._conditional("subscribe", "allow", levels, a_filter, covers=True))

    def audit_findings(self, action: str, topic: str, allowed: bool) -> list[tuple[PolicyRule, str]]:
        """The audit rules that would decide ``action`` on ``topic`` otherwise than ``allowed``, with the
        filter that matched."""
        levels = topic.split("/")
        out = []
        for a in self.audit:
            if a.action != action or (a.effect == "allow") == allowed:
                continue
            flt = a.decides(levels, topic, covers=action == "subscribe")
            if flt is not None:
                out.append((a, flt))
        return out


@dataclass(frozen=True)
class User:
    token_sha256: bytes
    rules: Rules
    loopback_only: bool = False  # may log in only on a listener bound to loopback


@dataclass(frozen=True)
class Credentials:
    """A parsed credentials file."""

    users: dict[str, User]
    anonymous: bool = False
    anonymous_rules: Rules = Rules(client_ids=(("", True),))
    source: str = "<memory>"
    #: usernames revoked for good (informational: they are not users; named in refusal logs)
    revoked: frozenset[str] = frozenset()
    #: claims index built from ``users``: exact client id -> users; prefix length -> prefix -> users
    _exact_claims: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)
    _prefix_claims: dict[int, dict[str, frozenset[str]]] = field(init=False, repr=False, compare=False)
    _prefix_lengths: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact: dict[str, set[str]] = {}
        prefix: dict[int, dict[str, set[str]]] = {}
        for username, user in self.users.items():
            for text, is_prefix in user.rules.client_ids:
                if is_prefix:
                    prefix.setdefault(len(text), {}).setdefault(text, set()).add(username)
                else:
                    exact.setdefault(text, set()).add(username)
        object.__setattr__(self, "_exact_claims", {k: frozenset(v) for k, v in exact.items()})
        object.__setattr__(self, "_prefix_claims",
                           {n: {k: frozenset(v) for k, v in d.items()} for n, d in prefix.items()})
        object.__setattr__(self, "_prefix_lengths", tuple(sorted(prefix, reverse=True)))

    def claimants(self, client_id: str) -> tuple[tuple[int, int] | None, frozenset[str]]:
        """The most specific users' match on ``client_id``: (rank, users); ``(None, {})`` if no user's
        ``client_ids`` pattern matches it.  Ranks compare like :func:`_client_id_rank`'s."""
        owners = self._exact_claims.get(client_id)
        if owners:
            return (len(client_id), 1), owners
        for length in self._prefix_lengths:  # longest first
            if length <= len(client_id):
                owners = self._prefix_claims[length].get(client_id[:length])
                if owners:
                    return (length, 0), owners
        return None, frozenset()

    def client_id_refusal(self, username: str | None, client_id: str) -> str | None:
        """Why ``username`` (None: anonymous) may not CONNECT with ``client_id``; None if it may.

        A user may use a client id that one of its ``client_ids`` patterns matches, unless another
        user's pattern matches it more specifically (exact beats prefix, a longer prefix beats a
        shorter one; equally specific matches are all allowed): so ``"*"`` or ``"dev-1-*"`` never
        reach the ids of user ``dev-1-kitchen``.  Anonymous clients rank like a user whose patterns
        are ``anonymous_rules.client_ids``, but their patterns never reserve an id against a user.
        """
        rank, claimants = self.claimants(client_id)
        if username is None:
            own = _client_id_rank(self.anonymous_rules.client_ids, client_id)
            if own is None:
                return "client id not allowed for anonymous clients"
        else:
            user = self.users.get(username)
            own = _client_id_rank(user.rules.client_ids, client_id) if user is not None else None
            if own is None:
                return f"client id not allowed for user {username!r}"
        if rank is not None and rank > own:
            return f"client id is reserved for user(s) {', '.join(sorted(claimants))}"
        return None


def _compile_patterns(raw: Any, where: str, username: str | None) -> tuple[tuple[str, ...], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise ConfigError(f"{where}: must be a list of topic patterns (strings)")
    out: list[tuple[str, ...]] = []
    for pattern in raw:
        if _USERNAME_PLACEHOLDER in pattern:
            if username is None:
                raise ConfigError(f"{where}: {pattern!r}: {{username}} cannot be used in anonymous_rules")
            pattern_text = pattern.replace(_USERNAME_PLACEHOLDER, username)
        else:
            pattern_text = pattern
        if "{" in pattern_text or "}" in pattern_text:
            raise ConfigError(f"{where}: {pattern!r}: unknown placeholder (only {{username}} is supported)")
        levels = pattern_text.split("/")
        if not pattern_text or not _valid_filter_levels(levels):
            raise ConfigError(f"{where}: {pattern!r} is not a valid MQTT topic filter")
        out.append(tuple(levels))
    return tuple(out)


def _compile_client_ids(raw: Any, where: str, username: str | None) -> tuple[ClientIdPattern, ...]:
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise ConfigError(f"{where}: must be a list of client id patterns (strings)")
    out: list[ClientIdPattern] = []
    for pattern in raw:
        if not pattern:
            raise ConfigError(f"{where}: empty client id pattern")
        is_prefix = pattern.endswith("*")
        body = pattern[:-1] if is_prefix else pattern
        if "*" in body:
            raise ConfigError(f"{where}: {pattern!r}: '*' is only allowed at the end (a prefix wildcard)")
        # decide exact/prefix before substituting: a '*' in a username is a literal character
        if _USERNAME_PLACEHOLDER in body:
            if username is None:
                raise ConfigError(f"{where}: {pattern!r}: {{username}} cannot be used in anonymous_rules")
            body = body.replace(_USERNAME_PLACEHOLDER, username)
        if "{" in body or "}" in body:
            raise ConfigError(f"{where}: {pattern!r}: unknown placeholder (only {{username}} is supported)")
        if "\x00" in body:
            raise ConfigError(f"{where}: {pattern!r}: NUL is not allowed in a client id")
        out.append((body, is_prefix))
    return tuple(out)


def _compile_rules(raw: Any, where: str, username: str | None) -> Rules:
    default_ids = list(DEFAULT_CLIENT_IDS if username is not None else DEFAULT_ANONYMOUS_CLIENT_IDS)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be an object with 'publish' and 'subscribe' lists")
    subject = _compile_subject(raw.get("subject"), f"{where}.subject")
    return Rules(
        publish=_compile_patterns(raw.get("publish"), f"{where}.publish", username),
        subscribe=_compile_patterns(raw.get("subscribe"), f"{where}.subscribe", username),
        client_ids=_compile_client_ids(raw.get("client_ids", default_ids), f"{where}.client_ids", username),
        deny_receive=_compile_patterns(raw.get("deny_receive"), f"{where}.deny_receive", username),
        deny_publish=_compile_patterns(raw.get("deny_publish"), f"{where}.deny_publish", username),
        deny_subscribe=_compile_patterns(raw.get("deny_subscribe"), f"{where}.deny_subscribe", username),
        conditional=_compile_policy_rules(raw.get("conditional"), f"{where}.conditional", username, subject),
        audit=_compile_policy_rules(raw.get("audit"), f"{where}.audit", username, subject),
    )


def _compile_subject(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ConfigError(f"{where}: must be an object of strings (id, role, site)")
    return tuple(sorted(raw.items()))


#: compiled conditions shared by every user whose rules carry the same text
_CONDITIONS: dict[str, Any] = {}


def _condition(text: str, where: str) -> Any:
    cond = _CONDITIONS.get(text)
    if cond is None:
        from cwsnet.policy.cel import Condition, ConditionError

        try:
            cond = Condition(text)
        except ConditionError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if len(_CONDITIONS) > 1024:
            _CONDITIONS.clear()
        _CONDITIONS[text] = cond
    return cond


def _compile_policy_rules(raw: Any, where: str, username: str | None,
                          subject: tuple[tuple[str, str], ...]) -> tuple[PolicyRule, ...]:
    """``[{"rule": "policy/rule", "effect": "allow"|"deny", "action": "publish"|"subscribe", "filters": [...],
    "when": "CEL"?, "source": "file:line"?}]`` (written by cwsnet.registry from the access policies)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: must be a list of rules")
    out = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{w}: must be an object with rule, effect, action and filters")
        unknown = set(item) - {"rule", "effect", "action", "filters", "when", "source"}
        if unknown:
            raise ConfigError(f"{w}: unknown field(s) {', '.join(sorted(unknown))}")
        rule, effect, action, when = item.get("rule"), item.get("effect"), item.get("action"), item.get("when")
        if not isinstance(rule, str) or not rule:
            raise ConfigError(f"{w}.rule: must be the rule's name")
        if effect not in ("allow", "deny"):
            raise ConfigError(f"{w}.effect: must be allow or deny (got {effect!r})")
        if action not in ("publish", "subscribe"):
            raise ConfigError(f"{w}.action: must be publish or subscribe (got {action!r})")
        if when is not None and not isinstance(when, str):
            raise ConfigError(f"{w}.when: must be a CEL expression (text)")
        filters = _compile_patterns(item.get("filters"), f"{w}.filters", username)
        if not filters:
            raise ConfigError(f"{w}.filters: must list at least one topic filter")
        out.append(PolicyRule(rule, effect, action, filters, _condition(when, f"{w}.when") if when else None,
                              subject, str(item.get("source", ""))))
    return tuple(out)


def parse_credentials(data: Any, source: str = "<memory>") -> Credentials:
    """Validate and compile the JSON document of a credentials file (see ``docs/broker.md``).

    Raises :class:`cwsnet.errors.ConfigError` naming ``source`` and the offending entry.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a JSON object")
    users_raw = data.get("users", {})
    if not isinstance(users_raw, dict):
        raise ConfigError(f"{source}: 'users' must be an object mapping username -> entry")
    anonymous = data.get("anonymous", False)
    if not isinstance(anonymous, bool):
        raise ConfigError(f"{source}: 'anonymous' must be true or false")
    users: dict[str, User] = {}
    for username, entry in users_raw.items():
        where = f"{source}: users.{username}"
        if not username or any(c in username for c in _FORBIDDEN_IN_USERNAME):
            raise ConfigError(f"{where}: username must be non-empty and contain none of / + # {{ }} NUL")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be an object")
        token_hex = entry.get("token_sha256")
        try:
            if not isinstance(token_hex, str) or len(token_hex) != 64:
                raise ValueError
            digest = bytes.fromhex(token_hex)
        except ValueError:
            raise ConfigError(f"{where}.token_sha256: must be 64 hex characters (sha256 of the token)") from None
        loopback_only = entry.get("loopback_only", False)
        if not isinstance(loopback_only, bool):
            raise ConfigError(f"{where}.loopback_only: must be true or false")
        users[username] = User(token_sha256=digest, rules=_compile_rules(entry, where, username),
                               loopback_only=loopback_only)
    anonymous_rules = _compile_rules(data.get("anonymous_rules"), f"{source}: anonymous_rules", None)
    revoked = data.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
        raise ConfigError(f"{source}: 'revoked' must be a list of usernames")
    return Credentials(users=users, anonymous=anonymous, anonymous_rules=anonymous_rules, source=source,
                       revoked=frozenset(revoked) - set(users))


def load_credentials(path: str | os.PathLike[str]) -> Credentials:
    """Read and parse a credentials file; raises :class:`ConfigError` with the file name on any problem."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read credentials file: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    return parse_credentials(data, source=path)


def hash_token(token: str | bytes) -> str:
    """The ``token_sha256`` value for ``token`` (hex sha256 of its UTF-8 bytes)."""
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------------------------
# The plugin
# ----------------------------------------------------------------------------------------------


class CwsAccessPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """Authentication + topic ACL from a hot-reloaded JSON credentials file.

    amqtt's ``PluginManager`` puts a plugin in its auth list if it ``isinstance`` ``BaseAuthPlugin``
    and in its topic list if it ``isinstance`` ``BaseTopicPlugin``; one object can be both, so the
    two checks share one copy of the rules.  The broker accepts a client only if every auth plugin
    that answers says yes, and allows a topic action only if every topic plugin says yes, so do
    not combine this plugin with ``AnonymousAuthPlugin``.

    ``credentials_file=None`` is "open mode": every client is accepted with no ACL, but only on a
    listener bound to loopback (``start_broker`` refuses any other host in that mode).

    Each user may only CONNECT with a client id its ``client_ids`` patterns allow (default
    ``{username}`` and ``{username}-*``) and no other user claims more specifically
    (:meth:`Credentials.client_id_refusal`); the check runs before an existing session with that
    client id is deleted or taken over, so no user can wipe or kick another user's session.

    When the file changes, :class:`CwsBroker` disconnects every client whose user was removed or
    whose token changed (:meth:`CwsBroker.enforce_credentials`, polled every half second), and a
    removed user is refused on its next CONNECT.  Even before that, PUBLISH, SUBSCRIBE and every
    delivery (RECEIVE) are checked against the *current* rules.
    """

    @dataclass
    class Config:
        credentials_file: str | None = None
        """JSON credentials file; None = open mode (loopback only)."""
        reload_interval: float = 1.0
        """Check the file's mtime/size at most this often (seconds), on the next auth/ACL call."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        cfg = self.config
        self._path: str | None = os.fspath(cfg.credentials_file) if cfg.credentials_file else None
        self._interval = float(cfg.reload_interval)
        self._creds: Credentials | None = None
        self._signature: tuple[int, ...] | str | None = None
        self._last_check = time.monotonic()
        self._denials: dict[tuple[str | None, str], tuple[float, int]] = {}
        self._audits: dict[tuple[str | None, str, str], tuple[float, int]] = {}
        self._reported: dict[tuple[str | None, str, str], float] = {}
        #: username -> (monotonic time until which its CONNECTs are refused, why): a device that ignores
        #: its rate limit's pause is locked out for a while (CwsBroker.lock_out)
        self.lockouts: dict[str, tuple[float, str]] = {}
        if self._path is not None:
            self._signature = self._stat_signature()
            # raises ConfigError naming the file: a broker must not start with a broken file
            self._creds = load_credentials(self._path)
            log.info("credentials: %d user(s) loaded from %s", len(self._creds.users), self._path)

    # -- hot reload ------------------------------------------------------------------------------

    def _stat_signature(self) -> tuple[int, ...] | str:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if now - self._last_check < self._interval:
            return
        self._last_check = now
        signature = self._stat_signature()
        if signature == self._signature:
            return
        self._signature = signature
        if isinstance(signature, str):
            log.error("credentials file %s is %s; keeping the previous rules", self._path, signature)
            return
        try:
            creds = load_credentials(self._path)
        except ConfigError as exc:
            # logged once per file version (the signature is remembered)
            log.error("credentials file rejected, keeping the previous rules: %s", exc)
            return
        self._creds = creds
        log.info("credentials: reloaded %s (%d user(s))", self._path, len(creds.users))

    def reload_now(self) -> None:
        """Check the file now, ignoring the once-per-interval throttle (for tools and tests)."""
        self._last_check = float("-inf")
        self._maybe_reload()

    def revocation(self, session: Session) -> str | None:
        """Why a connected ``session`` may no longer hold its connection under the current rules
        (its user was removed, its token changed, its client id is no longer its own), or None."""
        creds = self._creds
        if self._path is None or creds is None:
            return None
        username = session.username
        if username is None:
            return None if creds.anonymous else "anonymous access was disabled"
        user = creds.users.get(username)
        if user is None:
            return f"user {username!r} was removed (revoked)"
        password = session.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        if password is None or not hmac.compare_digest(hashlib.sha256(password).digest(), user.token_sha256):
            return f"the token of user {username!r} was changed"
        return creds.client_id_refusal(username, session.client_id or "")

    # -- helpers ---------------------------------------------------------------------------------

    def _listener_is_loopback(self, session: Session | None) -> bool:
        bind = session.attributes.get(LISTENER_BIND_ATTR) if session is not None else None
        if bind is not None:
            return _bind_is_loopback(bind)
        # Not started by CwsBroker (no listener recorded): require every listener to be loopback.
        broker = getattr(self.context, "_broker_instance", None)
        listeners = getattr(broker, "listeners_config", None)
        if not listeners:
            return False
        bound = [lc.get("bind", None) for lc in listeners.values() if "bind" in lc]
        return bool(bound) and all(_bind_is_loopback(b) for b in bound)

    def _rules_for(self, session: Session | None) -> Rules | None:
        """Current rules of ``session``'s user; None = nothing allowed."""
        creds = self._creds
        if creds is None:
            return None
        username = session.username if session is not None else None
        if username is None:
            return creds.anonymous_rules if creds.anonymous else None
        user = creds.users.get(username)
        return user.rules if user is not None else None

    # -- amqtt plugin API ------------------------------------------------------------------------

    async def authenticate(self, *, session: Session) -> bool | None:
        self._maybe_reload()
        client = f"client {session.client_id!r} from {session.remote_address}"
        if self._path is None:  # open mode
            if self._listener_is_loopback(session):
                return True
            log.warning("auth: refused %s: no credentials file and the listener is not loopback", client)
            return False

        creds = self._creds
        assert creds is not None
        username = session.username
        if username is None:
            if not creds.anonymous:
                log.info("auth: refused %s: anonymous access is disabled", client)
                return False
            if not self._listener_is_loopback(session):
                log.warning("auth: refused anonymous %s: listener is not bound to loopback", client)
                return False
            rules = creds.anonymous_rules
        else:
            user = creds.users.get(username)
            password = session.password
            if isinstance(password, str):
                password = password.encode("utf-8")
            if user is None:
                if username in creds.revoked:
                    log.warning("auth: refused %s: user %r is revoked", client, username)
                else:
                    log.info("auth: refused %s: unknown user %r", client, username)
                return False
            if password is None or not hmac.compare_digest(hashlib.sha256(password).digest(), user.token_sha256):
                log.info("auth: refused %s: bad token for user %r", client, username)
                return False
            locked = self.lockouts.get(username)
            if locked is not None and locked[0] > time.monotonic():
                log.info("auth: refused %s: user %r is locked out for %.0f s more (%s)", client, username,
                         locked[0] - time.monotonic(), locked[1])
                return False
            if user.loopback_only and not self._listener_is_loopback(session):
                log.warning("auth: refused %s: user %r may connect only on a loopback listener", client, username)
                return False
            rules = user.rules

        # Client id binding: CwsBroker calls this before any existing session of that client id is
        # deleted (clean session) or taken over, so a refusal here leaves the owner's session alone.
        refusal = creds.client_id_refusal(username, session.client_id or "")
        if refusal is not None:
            who = f"user {username!r}" if username is not None else "anonymous"
            log.warning("auth: refused %s (%s): %s", client, who, refusal)
            return False

        # amqtt publishes the will without a PUBLISH check: check its topic at CONNECT instead.
        if session.will_flag and session.will_topic is not None and not rules.may_publish(session.will_topic):
            log.info("auth: refused %s: will topic %r is not allowed for publish", client, session.will_topic)
            return False
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        self._maybe_reload()
        if self._path is None:
            return True
        if not topic:
            return False
        rules = self._rules_for(session)
        if rules is None:
            allowed = False
        elif action == Action.PUBLISH:
            allowed = rules.may_publish(topic)
        elif action == Action.SUBSCRIBE:
            allowed = rules.may_subscribe(topic)
        elif action == Action.RECEIVE:
            allowed = rules.may_receive(topic)
        else:
            allowed = False
        if action in (Action.PUBLISH, Action.SUBSCRIBE):
            findings = rules.audit_findings(action.value, topic, allowed) if rules is not None and rules.audit else []
            if findings:
                self._log_audit(session, action, topic, allowed, findings)
            if not allowed:
                self._log_denial(session, action, topic)
            if not allowed or findings:
                self._report(session, action, topic, allowed)
        return allowed

    DENIAL_LOG_INTERVAL = 10.0
    #: an audit finding is logged once per (user, rule's filter, rule) this often (seconds)
    AUDIT_LOG_INTERVAL = 60.0
    #: ``on_decision`` is called once per (user, action, topic) this often (seconds)
    REPORT_INTERVAL = 60.0

    def _log_audit(self, session: Session | None, action: Action, topic: str, allowed: bool,
                   findings: list[tuple[PolicyRule, str]]) -> None:
        """What an audit-mode policy would have decided otherwise, at most once a minute per (user, the rule's
        filter, rule), with the count since."""
        who = session.username if session is not None else None
        now = time.monotonic()
        for rule, flt in findings:
            key = (who, flt, rule.rule)
            last, count = self._audits.get(key, (float("-inf"), 0))
            if now - last < self.AUDIT_LOG_INTERVAL:
                self._audits[key] = (last, count + 1)
                continue
            if len(self._audits) > 10_000:
                self._audits.clear()
            self._audits[key] = (now, 0)
            more = f" ({count} more since the last report)" if count else ""
            log.warning("acl audit: %s %r by user %r was %s; audit rule %s (%s) would %s it (filter %s), not "
                        "enforced%s", action.value, topic[:200], who, "allowed" if allowed else "refused", rule.rule,
                        rule.source or "?", rule.effect, flt, more)

    def _report(self, session: Session | None, action: Action, topic: str, allowed: bool) -> None:
        """Tell the broker's ``on_decision`` callback (the daemons record events from it), at most once per
        (user, action, topic) every ``REPORT_INTERVAL`` seconds: a flood costs a dict lookup each."""
        broker = getattr(self.context, "_broker_instance", None)
        callback = getattr(broker, "on_decision", None)
        if callback is None:
            return
        who = session.username if session is not None else None
        key = (who, action.value, topic)
        now = time.monotonic()
        if now - self._reported.get(key, float("-inf")) < self.REPORT_INTERVAL:
            return
        if len(self._reported) > 10_000:
            self._reported.clear()
        self._reported[key] = now
        try:
            callback(who, action.value, topic, allowed)
        except Exception:  # a reporting problem must never change or break an ACL decision
            log.exception("the broker's on_decision callback failed")

    def _log_denial(self, session: Session | None, action: Action, topic: str) -> None:
        """A refused PUBLISH or SUBSCRIBE, logged at WARNING at most once per user and action every
        ``DENIAL_LOG_INTERVAL`` seconds (with the count since), so a flood cannot fill the disk."""
        who = session.username if session is not None else None
        key = (who, action.value)
        now = time.monotonic()
        last, count = self._denials.get(key, (float("-inf"), 0))
        if now - last < self.DENIAL_LOG_INTERVAL:
            self._denials[key] = (last, count + 1)
            return
        self._denials[key] = (now, 0)
        if len(self._denials) > 10_000:
            self._denials.clear()
        more = f" ({count} more since the last report)" if count else ""
        client = session.client_id if session is not None else None
        log.warning("acl: refused %s %r for user %r (client %r): not in its topic ACL%s", key[1], topic[:200],
                    who, client, more)


# ----------------------------------------------------------------------------------------------
# The broker
# ----------------------------------------------------------------------------------------------


async def _close_quietly(writer: Any) -> None:
    with contextlib.suppress(Exception):
        await writer.close()


class CwsBroker(Broker):
    """``amqtt.broker.Broker`` with the amqtt 0.12.1 defects below fixed.

    1. QoS upgrade: a QoS 0 publish was delivered at the subscription's QoS.  Now delivered at
       min(publish QoS, granted QoS) [MQTT-3.8.4-6]; internal broadcasts keep ``force_qos``.
    2. Retained messages bypassed the RECEIVE ACL, and on every CONNECT a client was sent the
       retained messages matching *every* client's subscriptions.  Now each retained message is
       checked against RECEIVE, and nothing is replayed on CONNECT (MQTT 3.1.1 sends retained
       messages only when a subscription is made; Mosquitto does the same).
    3. A persistent session's offline queue was delivered with RETAIN=1; now RETAIN=0
       [MQTT-3.3.1-9], and each queued message is re-checked against the current RECEIVE ACL.
    4. Offline queues were unbounded: bounded to ``max_offline_queue`` per session, oldest dropped
       (counted in ``offline_messages_dropped`` and ``session.attributes["cwsnet.offline_dropped"]``).
    5. An unauthenticated CONNECT could delete (clean session) or take over (and disconnect) the
       session of any client id, and overwrite its will.  Now CONNECT is authenticated before an
       existing session is touched.
    6. ``_run_broadcast`` iterated the live subscription dict across awaits (ACL plugin calls):
       a SUBSCRIBE to a new filter during a broadcast raised and silently dropped that message.
       Now iterates a snapshot.
    7. IPv6 listener binds (``[::1]:1883``) failed: the brackets were passed to the resolver.
    8. When a listener failed to bind, the listeners bound before it stayed open.
    9. A connection whose first packet was not a CONNECT, or that sent nothing, was never closed.
    10. No time limit on receiving the CONNECT: now ``CONNECT_TIMEOUT`` seconds, then closed.
    11. A QoS 1/2 message the broker had already acknowledged (PUBACK/PUBREC) but not yet routed
        when its publisher disconnected was dropped: the message loop stopped at the disconnect
        and the session's incoming queue was discarded.  Now every acknowledged message is routed,
        in order, before the disconnect (and a will) is handled.
    """

    CONNECT_TIMEOUT = 10.0

    def __init__(
        self,
        config: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
        plugin_namespace: str | None = None,
        *,
        max_offline_queue: int | None = None,
        on_decision: DecisionCallback | None = None,
    ) -> None:
        #: called (on the broker's loop; must not block) for each refused PUBLISH/SUBSCRIBE and each one an
        #: audit-mode rule would decide otherwise, at most once per (user, action, topic) a minute:
        #: ``on_decision(username, action, topic, allowed)``; settable while the broker runs
        self.on_decision = on_decision
        if isinstance(config, dict):
            config = dict(config)
            for key in ("max_offline_queue", "max-offline-queue"):
                if key in config:
                    value = config.pop(key)
                    if max_offline_queue is None:
                        max_offline_queue = value
        if max_offline_queue is None:
            max_offline_queue = DEFAULT_MAX_OFFLINE_QUEUE
        if not isinstance(max_offline_queue, int) or isinstance(max_offline_queue, bool) or max_offline_queue < 1:
            raise ConfigError(f"max_offline_queue must be an integer >= 1 (got {max_offline_queue!r})")
        self.max_offline_queue: int = max_offline_queue
        #: messages dropped from offline queues because a queue was full (all sessions, since start)
        self.offline_messages_dropped: int = 0
        super().__init__(config, loop, plugin_namespace)
        try:
            installed = _dist_version("amqtt")
        except PackageNotFoundError:  # pragma: no cover - vendored amqtt
            installed = "unknown"
        if installed != AMQTT_VERSION_REVIEWED:
            log.warning(
                "CwsBroker overrides were written against amqtt %s but %s is installed; re-review them",
                AMQTT_VERSION_REVIEWED, installed,
            )

    # -- 8. failed start --------------------------------------------------------------------------

    async def start(self) -> None:
        # CWS: wraps amqtt 0.12.1, which leaves the listeners that did bind open (the port stays
        # taken for the life of the process) when a later listener fails to bind.
        try:
            await super().start()
        except BaseException:
            for server in list(self._servers.values()):
                await server.close_instance()
            self._servers.clear()
            raise
        plugin = self.access_plugin()
        if plugin is not None and plugin._path is not None:
            self._credentials_watch = asyncio.ensure_future(self._watch_credentials(plugin))

    async def shutdown(self) -> None:
        watch = getattr(self, "_credentials_watch", None)
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch
        await super().shutdown()

    # -- revocation: connected clients lose their connection when their credential goes -----------

    CREDENTIALS_POLL = 0.5

    def access_plugin(self) -> CwsAccessPlugin | None:
        for plugin in self.plugins_manager.plugins:
            if isinstance(plugin, CwsAccessPlugin):
                return plugin
        return None

    async def _watch_credentials(self, plugin: CwsAccessPlugin) -> None:
        # its own record of the version last enforced: an ACL check may have reloaded the rules
        # (and moved the plugin's signature) without disconnecting anyone
        enforced = plugin._stat_signature()
        while True:
            await asyncio.sleep(self.CREDENTIALS_POLL)
            try:
                current = plugin._stat_signature()
                if current != enforced:
                    enforced = current
                    await self.enforce_credentials()
            except Exception:
                log.exception("checking the credentials file for revocations failed; trying again")

    async def enforce_credentials(self) -> list[str]:
        """Reload the credentials file now and disconnect every client whose credential was revoked
        (user removed, token changed, client id no longer its own); return their client ids.

        Called by the daemons right after they rewrite the file, and by a watcher every
        ``CREDENTIALS_POLL`` seconds, so a revocation takes effect within a second whoever wrote it.
        """
        plugin = self.access_plugin()
        if plugin is None:
            return []
        plugin.reload_now()
        kicked = []
        for client_id, (session, handler) in list(self._sessions.items()):
            if handler is None or not session.transitions.is_connected():
                continue
            why = plugin.revocation(session)
            if why is None:
                continue
            log.warning("auth: disconnecting client %r from %s: %s", client_id, session.remote_address, why)
            try:
                await handler.handle_connection_closed()
                await handler.stop()
            except Exception as exc:  # the connection may be closing already
                log.debug("disconnecting %r: %s", client_id, exc)
            kicked.append(client_id)
        return kicked

    async def lock_out(self, username: str, seconds: float, why: str) -> list[str]:
        """Disconnect every client of ``username`` and refuse its CONNECTs for ``seconds`` (a device
        flooding past its rate limit's pause); return the client ids disconnected."""
        plugin = self.access_plugin()
        if plugin is None:
            return []
        plugin.lockouts[username] = (time.monotonic() + seconds, why)
        if len(plugin.lockouts) > 10_000:  # forget the expired ones
            now = time.monotonic()
            plugin.lockouts = {u: v for u, v in plugin.lockouts.items() if v[0] > now}
        kicked = []
        for client_id, (session, handler) in list(self._sessions.items()):
            if handler is None or session.username != username or not session.transitions.is_connected():
                continue
            log.warning("disconnecting client %r (user %r) for %.0f s: %s", client_id, username, seconds, why)
            try:
                await handler.handle_connection_closed()
                await handler.stop()
            except Exception as exc:  # the connection may be closing already
                log.debug("disconnecting %r: %s", client_id, exc)
            kicked.append(client_id)
        return kicked

    # -- 7. IPv6 binds ---------------------------------------------------------------------------

    @classmethod
    def _split_bindaddr_port(cls, port_str: str, default_port: int) -> tuple[str | None, int]:
        # CWS: amqtt 0.12.1 returns "[::1]" with its brackets, which getaddrinfo rejects.
        address, port = super()._split_bindaddr_port(port_str, default_port)
        if address and address.startswith("[") and address.endswith("]"):
            address = address[1:-1]
        return address, port

    # -- 5. authenticate before touching an existing session ---------------------------------------

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        # CWS: remember which listener this connection came in on (for the early auth below).
        token = _CURRENT_LISTENER.set(listener_name)
        try:
            await super()._client_connected(listener_name, reader, writer)
        finally:
            _CURRENT_LISTENER.reset(token)

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        # CWS: record the listener's bind address so auth plugins can tell loopback listeners.
        if listener is not None:
            session.attributes[LISTENER_BIND_ATTR] = listener.get("bind", None)
        return await super()._authenticate(session, listener)

    async def _initialize_client_session(
        self,
        reader: Any,
        writer: Any,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        # CWS: copy of amqtt 0.12.1 with one block added (marked) -- defect 5: upstream deletes the
        # old session (clean session) or merges the new CONNECT's will/credentials into it *before*
        # authenticating; the later failed authentication then still takes the session over.
        # CWS: defect 9 -- upstream left the socket open when the first packet was not a CONNECT
        # (AMQTTError) or the peer sent nothing (NoDataError): every such connection leaked.
        # Defect 10 -- no time limit on the CONNECT: a peer sending nothing, or half a packet, held
        # its connection open forever. Now it gets CONNECT_TIMEOUT seconds, then is closed.
        who = format_client_message(address=remote_address, port=remote_port)
        try:
            # asyncio.timeout, not wait_for: the CONNECT must be read in this task. Read in another
            # task (wait_for's), amqtt lost the first PUBLISHes of some clients after their PUBACK.
            async with asyncio.timeout(self.CONNECT_TIMEOUT):
                handler, client_session = await BrokerProtocolHandler.init_from_connect(
                    reader, writer, self.plugins_manager)
        except TimeoutError as exc:
            self.logger.warning(f"{who}: no CONNECT within {self.CONNECT_TIMEOUT:g} s; closing the connection")
            await _close_quietly(writer)
            raise AMQTTError("CONNECT timeout") from exc
        except AMQTTError as exc:
            self.logger.warning(f"[MQTT-3.1.0-1] {who}: Can't read first packet as CONNECT: {exc}")
            await _close_quietly(writer)
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            self.logger.warning(f"Invalid connection from {who}: {exc}")
            await _close_quietly(writer)
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            self.logger.warning(f"No data from {who}: {exc}")
            await _close_quietly(writer)
            raise AMQTTError(exc) from exc
        except Exception as exc:  # a decoding error amqtt does not wrap (bad UTF-8, struct errors...)
            self.logger.warning(f"{who}: malformed CONNECT ({type(exc).__name__}: {exc}); closing the connection")
            await _close_quietly(writer)
            raise AMQTTError(exc) from exc

        # CWS: begin -- authenticate the incoming CONNECT before any existing session is touched.
        listener_name = _CURRENT_LISTENER.get()
        if listener_name is not None and listener_name in self.listeners_config:
            if not await self._authenticate(client_session, self.listeners_config[listener_name]):
                connack = ConnackPacket.build(0, NOT_AUTHORIZED)
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
                await connack.to_stream(writer)
                await writer.close()
                msg = f"client {client_session.client_id!r} from {remote_address}:{remote_port} not authorised"
                raise MQTTError(msg)
        # CWS: end

        if client_session.clean_session:
            # Delete existing session and create a new one
            if client_session.client_id is not None and client_session.client_id != "":
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()

            client_session.parent = 0
        # Get session from cache
        elif client_session.client_id in self._sessions:
            self.logger.debug(f"Found old session {self._sessions[client_session.client_id]!r}")

            existing_client_session, _ = self._sessions[client_session.client_id]
            existing_client_session.will_flag = client_session.will_flag
            existing_client_session.will_message = client_session.will_message
            existing_client_session.will_topic = client_session.will_topic
            existing_client_session.will_qos = client_session.will_qos
            existing_client_session.will_retain = client_session.will_retain  # CWS: upstream forgot this one
            existing_client_session.keep_alive = client_session.keep_alive
            existing_client_session.username = client_session.username
            existing_client_session.password = client_session.password
            existing_client_session.remote_address = client_session.remote_address  # CWS: for logs
            existing_client_session.remote_port = client_session.remote_port  # CWS: for logs
            client_session = existing_client_session
            client_session.parent = 1
        else:
            client_session.parent = 0

        timeout_disconnect_delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(timeout_disconnect_delay, int):
            client_session.keep_alive += timeout_disconnect_delay

        self.logger.debug(f"Keep-alive timeout={client_session.keep_alive}")
        return handler, client_session

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        # CWS: copy of amqtt 0.12.1 with the final "publish retained messages to a pre-existing
        # session's subscriptions" loop removed (defect 2): it iterated *all* clients' filters, so
        # every CONNECT received retained messages for other clients' subscriptions, unchecked by
        # the RECEIVE ACL, at QoS 0; and it iterated the live dict across awaits.  MQTT 3.1.1 sends
        # retained messages only when a subscription is made [MQTT-3.3.1-6]; so does Mosquitto.
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])

        if client_session.client_id is None:
            msg = "Client ID was not correctly created/set."
            raise AMQTTError(msg)

        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    self.logger.warning(f"Client {client_session.client_id} is already connected, performing take-over.")
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                self.logger.warning(f"Client {client_session.client_id} is reconnecting too quickly, make it wait")
                await asyncio.sleep(1)

        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)

        await handler.mqtt_connack_authorize(authenticated)

        if not authenticated:
            await writer.close()
            return

        await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED,
                                              client_id=client_session.client_id,
                                              client_session=client_session)

        self.logger.debug(f"{client_session.client_id} Start messages handling")
        await handler.start()

        # publish messages that were retained because the client session was disconnected
        self.logger.debug(f"Retained messages queue size: {client_session.retained_messages.qsize()}")
        await self._publish_session_retained_messages(client_session)

        # CWS: upstream's replay of retained messages for all subscriptions removed (see above).

        await self._client_message_loop(client_session, handler)

    # -- 11. route what was acknowledged before handling the disconnect ---------------------------

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        # CWS: copy of amqtt 0.12.1's loop; changes: a delivered message is handled before a
        # disconnect seen in the same wakeup, and the messages still queued are routed first.
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        connected = True
        while connected:
            try:
                done, _ = await asyncio.wait(
                    [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        break
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if disconnect_waiter in done:
                    await self._route_acknowledged(client_session, handler, wait_deliver)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    connected = False
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
            except asyncio.CancelledError:
                self.logger.debug("Client loop cancelled")
                break
        pending_waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        for waiter in pending_waiters:
            waiter.cancel()
        await asyncio.gather(*pending_waiters, return_exceptions=True)

    async def _route_acknowledged(self, client_session: Session, handler: BrokerProtocolHandler,
                                  wait_deliver: asyncio.Future[Any]) -> None:
        """Route the messages the client published, and we acknowledged, before it went away: the
        one ``wait_deliver`` may already have taken from the queue, then those still queued."""
        wait_deliver.cancel()  # a no-op if it already holds a message
        await asyncio.gather(wait_deliver, return_exceptions=True)
        taken = None if wait_deliver.cancelled() or wait_deliver.exception() else wait_deliver.result()
        queue = client_session.delivered_message_queue
        while taken is not None or not queue.empty():
            item: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            item.set_result(taken if taken is not None else queue.get_nowait())
            taken = None
            if not await self._handle_message_delivery(client_session, handler, item):
                break

    # -- 1. QoS: min(publish QoS, granted QoS) -----------------------------------------------------

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
        *,
        publish_qos: int | None = None,
    ) -> None:
        # CWS: upstream only carries a QoS for forced (internal) broadcasts, so client publishes
        # were delivered at the subscription's QoS.  We carry the publish QoS as "publish_qos".
        # A client-originated broadcast with force_qos is the will message (upstream passes
        # will_qos as force_qos): it is capped like a publish too.  session=None (internal, e.g.
        # BrokerContext.broadcast_message) keeps force_qos semantics.
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            if session is None:
                broadcast["qos"] = force_qos
            else:
                broadcast["publish_qos"] = force_qos
        if publish_qos is not None:
            broadcast["publish_qos"] = publish_qos
        await self._broadcast_queue.put(broadcast)

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        # CWS: copy of amqtt 0.12.1; only change: pass the publish QoS to _broadcast_message.
        self.logger.debug(f"{client_session.client_id} handling message delivery")
        app_message = wait_deliver.result()

        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED,
            client_id=client_session.client_id,
            message=app_message,
        )

        if app_message is None:
            self.logger.debug("app_message was empty!")
            return True
        if not app_message.topic:
            self.logger.warning(
                f"[MQTT-4.7.3-1] - {client_session.client_id} invalid TOPIC sent in PUBLISH message, closing connection",
            )
            return False
        if "#" in app_message.topic or "+" in app_message.topic:
            self.logger.warning(
                f"[MQTT-3.3.2-2] - {client_session.client_id} invalid TOPIC sent in PUBLISH message, closing connection",
            )
            return False
        if app_message.topic.startswith("$"):
            self.logger.warning(
                f"[MQTT-4.7.2-1] - {client_session.client_id} cannot use a topic with a leading $ character."
            )
            return False

        permitted = await self._topic_filtering(client_session, topic=app_message.topic, action=Action.PUBLISH)
        if not permitted:
            self.logger.info(f"{client_session.client_id} not allowed to publish to TOPIC {app_message.topic}.")
        else:
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_BROADCAST,
                client_id=client_session.client_id,
                message=app_message,
            )
            await self._broadcast_message(
                client_session, app_message.topic, app_message.data, publish_qos=app_message.qos  # CWS
            )
            if app_message.publish_packet and app_message.publish_packet.retain_flag:
                await self.retain_message(client_session, app_message.topic, app_message.data, app_message.qos)
        return True

    async def _run_broadcast(self, running_tasks: Any) -> None:
        # CWS: copy of amqtt 0.12.1; changes: (defect 1) delivery QoS = min(publish, granted) unless
        # forced; (defect 6) iterate snapshots of the subscription dict/lists, since the loop awaits.
        broadcast = await self._broadcast_queue.get()

        self.logger.debug(f"Processing broadcast message: {broadcast}")

        for k_filter, subscriptions in list(self._subscriptions.items()):  # CWS: snapshot

            if not self._matches(broadcast["topic"], k_filter):
                continue

            for target_session, sub_qos in list(subscriptions):  # CWS: snapshot
                # CWS: begin
                if "qos" in broadcast:  # forced (internal broadcast)
                    qos = broadcast["qos"]
                elif broadcast.get("publish_qos") is not None:
                    qos = min(broadcast["publish_qos"], sub_qos)
                else:
                    qos = sub_qos
                # CWS: end

                sendable = await self._topic_filtering(target_session, topic=broadcast["topic"], action=Action.RECEIVE)
                if not sendable:
                    self.logger.info(
                        f"{target_session.client_id} not allowed to receive messages from TOPIC {broadcast['topic']}.")
                    continue

                if (target_session.transitions.state != "connected"
                        and not target_session.clean_session
                        and qos in (QOS_1, QOS_2)
                        and not target_session.is_anonymous):
                    self.logger.debug(f"Session {target_session.client_id} is not connected, retaining message.")
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue

                if target_session.transitions.state != "connected":
                    continue

                handler = self._get_handler(target_session)
                if handler:
                    task = asyncio.ensure_future(
                        handler.mqtt_publish(
                            broadcast["topic"],
                            broadcast["data"],
                            qos,
                            retain=False,
                        ),
                    )
                    running_tasks.append(task)

    # -- 4. bounded offline queue --------------------------------------------------------------

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Session) -> None:
        # CWS: wraps amqtt 0.12.1 (whose per-session queue is unbounded): drop the oldest first.
        queue = target_session.retained_messages
        while queue.qsize() >= self.max_offline_queue:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:  # pragma: no cover - cannot happen with qsize() > 0
                break
            self.offline_messages_dropped += 1
            dropped = target_session.attributes.get(DROPPED_ATTR, 0) + 1
            target_session.attributes[DROPPED_ATTR] = dropped
            if dropped == 1 or dropped % 1000 == 0:
                log.warning(
                    "offline queue of client %r is full (%d messages): dropped the oldest (%d dropped so far)",
                    target_session.client_id, self.max_offline_queue, dropped,
                )
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    # -- 3. offline queue delivered with RETAIN=0, re-checked against the ACL -------------------

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # CWS: copy of amqtt 0.12.1; changes: retain=False [MQTT-3.3.1-9] and a RECEIVE check of
        # each queued message against the current rules (they may have changed while offline).
        self.logger.debug(
            f"Publishing {session.retained_messages.qsize()}"
            f" messages retained for session {format_client_message(session=session)}",
        )
        publish_tasks = []
        handler = self._get_handler(session)
        if handler:
            while not session.retained_messages.empty():
                retained = await session.retained_messages.get()
                if not await self._topic_filtering(session, topic=retained.topic, action=Action.RECEIVE):  # CWS
                    self.logger.info(f"{session.client_id} no longer allowed to receive {retained.topic}; dropped")
                    continue
                publish_tasks.append(
                    asyncio.ensure_future(
                        handler.mqtt_publish(retained.topic, retained.data, retained.qos, retain=False),  # CWS
                    ),
                )
        if publish_tasks:
            await asyncio.wait(publish_tasks)

    # -- 2. retained messages on SUBSCRIBE checked against RECEIVE ------------------------------

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        # CWS: copy of amqtt 0.12.1; changes: RECEIVE ACL check per retained message, and iterate
        # a snapshot of the retained dict (the ACL check awaits; a concurrent retain would raise).
        self.logger.debug(
            f"Begin broadcasting messages retained due to subscription on '{subscription[0]}'"
            f" from {format_client_message(session=session)}",
        )
        publish_tasks = []

        topic_filter, qos = subscription
        for topic, retained in list(self._retained_messages.items()):  # CWS: snapshot
            if self._matches(topic, topic_filter):
                if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):  # CWS
                    self.logger.info(f"{session.client_id} not allowed to receive retained message on {topic}")
                    continue
                handler = self._get_handler(session)
                if handler:
                    publish_tasks.append(
                        asyncio.Task(
                            handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True),
                        ),
                    )
        if publish_tasks:
            await asyncio.wait(publish_tasks)
        self.logger.debug(
            f"End broadcasting messages retained due to subscription on '{subscription[0]}'"
            f" from {format_client_message(session=session)}",
        )

    # -- introspection -----------------------------------------------------------------------------

    def offline_queue_size(self, client_id: str) -> int:
        """Messages queued for the (disconnected) session ``client_id``; 0 if unknown."""
        session = self._sessions.get(client_id, (None, None))[0]
        return session.retained_messages.qsize() if session is not None else 0


# ----------------------------------------------------------------------------------------------
# Settings, start, serve
# ----------------------------------------------------------------------------------------------


@dataclass
class BrokerSettings:
    """Where and how the embedded broker listens (mirrors ``cwsnet.config.EmbeddedBroker``)."""

    host: str = "127.0.0.1"
    port: int | None = 1883
    """Plaintext MQTT port (None: no plaintext listener); it listens on ``plain_host``, loopback only."""
    plain_host: str | None = None
    """Address of the plaintext and websocket listeners (default: ``host``); must be loopback."""
    tls_port: int | None = None
    certfile: str | os.PathLike[str] | None = None
    keyfile: str | os.PathLike[str] | None = None
    cafile: str | os.PathLike[str] | None = None
    ws_port: int | None = None
    credentials_file: str | os.PathLike[str] | None = None
    max_offline_queue: int = DEFAULT_MAX_OFFLINE_QUEUE
    session_expiry_interval: int | None = None
    """Seconds after which a disconnected persistent session is discarded (None = never)."""
    on_decision: DecisionCallback | None = None
    """Called for refused (and audit-flagged) PUBLISH/SUBSCRIBEs: see :attr:`CwsBroker.on_decision`."""

    @classmethod
    def coerce(cls, obj: Any) -> BrokerSettings:
        """Accept a ``BrokerSettings`` or any object with the same attribute names (e.g. EmbeddedBroker)."""
        if isinstance(obj, cls):
            return obj
        kwargs = {name: getattr(obj, name) for name in cls.__dataclass_fields__ if hasattr(obj, name)}
        return cls(**kwargs)


def broker_config(settings: BrokerSettings) -> dict[str, Any]:
    """The amqtt config dict for ``settings`` (validated; raises :class:`ConfigError`)."""
    settings = BrokerSettings.coerce(settings)
    if settings.credentials_file is None and not is_loopback_host(settings.host):
        raise ConfigError(
            f"broker: refusing to listen on {settings.host!r} without a credentials file: anonymous access "
            "is only allowed on loopback (set credentials_file, or host: 127.0.0.1)"
        )
    for name in ("port", "tls_port", "ws_port"):
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int) or not 0 < value < 65536):
            raise ConfigError(f"broker: {name} must be a TCP port 1-65535 (got {value!r})")
    plain = settings.plain_host or settings.host
    listeners: dict[str, Any] = {}
    if settings.port is not None:
        listeners["default"] = {"type": "tcp", "bind": _format_bind(plain, settings.port)}
    if settings.tls_port is not None:
        if not settings.certfile or not settings.keyfile:
            raise ConfigError("broker: tls_port needs both certfile and keyfile")
        for name in ("certfile", "keyfile", "cafile"):
            value = getattr(settings, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"broker: {name} {os.fspath(value)!r} does not exist")
        tls: dict[str, Any] = {
            "type": "tcp",
            "bind": _format_bind(settings.host, settings.tls_port),
            "ssl": True,
            "certfile": os.fspath(settings.certfile),
            "keyfile": os.fspath(settings.keyfile),
        }
        if settings.cafile is not None:
            tls["cafile"] = os.fspath(settings.cafile)
        listeners["tls"] = tls
    elif settings.certfile or settings.keyfile:
        raise ConfigError("broker: certfile/keyfile given but no tls_port")
    if settings.ws_port is not None:
        listeners["ws"] = {"type": "ws", "bind": _format_bind(plain, settings.ws_port)}
    if not listeners:
        raise ConfigError("broker: no listener: set tls_port (with certfile and keyfile) or port")
    # amqtt needs a "default" listener (the others inherit its unset fields); without a plaintext
    # port it is one that binds nothing (amqtt's own default would bind 0.0.0.0:1883)
    listeners.setdefault("default", {"type": "tcp", "bind": None})

    plugin_cfg: dict[str, Any] = {}
    if settings.credentials_file is not None:
        path = os.fspath(settings.credentials_file)
        load_credentials(path)  # fail here, with the file name, rather than inside amqtt's loader
        plugin_cfg["credentials_file"] = path
    problem = plaintext_bind_problem(plain, settings.port, settings.ws_port,
                                     "plain_host" if settings.plain_host else "host")
    if problem:  # beyond loopback every client must use TLS (checked after the files, which name themselves)
        raise ConfigError(problem)
    return {
        "listeners": listeners,
        "session_expiry_interval": settings.session_expiry_interval,
        # Only our plugin: no $SYS (BrokerSysPlugin), no PacketLoggerPlugin (which would also log
        # CONNECT packets, passwords included, at DEBUG) and no EventLoggerPlugin.
        "plugins": {f"{CwsAccessPlugin.__module__}.{CwsAccessPlugin.__qualname__}": plugin_cfg},
    }


async def start_broker(settings: BrokerSettings, *, on_decision: DecisionCallback | None = None) -> CwsBroker:
    """Create and start a :class:`CwsBroker` for ``settings``; stop it with ``await broker.shutdown()``.

    ``on_decision`` (or ``settings.on_decision``): see :attr:`CwsBroker.on_decision`.
    Raises :class:`ConfigError` for bad settings or credentials file, ``amqtt.errors.BrokerError``
    if a listener cannot be bound.
    """
    settings = BrokerSettings.coerce(settings)
    config = broker_config(settings)
    broker = CwsBroker(config, max_offline_queue=settings.max_offline_queue,
                       on_decision=on_decision or settings.on_decision)
    await broker.start()
    log.info(
        "broker listening on %s (%s)",
        ", ".join(f"{name}={lc['bind']}" for name, lc in config["listeners"].items() if lc["bind"]),
        f"credentials {os.fspath(settings.credentials_file)}" if settings.credentials_file else "anonymous, loopback",
    )
    return broker


async def _serve(settings: BrokerSettings) -> None:
    broker = await start_broker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("broker: stopping on signal")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await broker.shutdown()


def serve(settings: BrokerSettings) -> None:
    """Run a broker for ``settings`` until SIGTERM or SIGINT (blocking; owns the event loop)."""
    asyncio.run(_serve(settings))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cwsnet.broker",
        description="Run CWSNet's embedded MQTT broker (amqtt with CWSNet fixes, auth and topic ACL).",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883,
                   help="plaintext MQTT/TCP port, loopback only (default 1883; 0: no plaintext listener)")
    p.add_argument("--plain-host", help="address of the plaintext and websocket listeners (default: --host; "
                                        "must be loopback, e.g. 127.0.0.1 when --host is 0.0.0.0 with --tls-port)")
    p.add_argument("--tls-port", type=int, help="MQTT/TLS port (needs --certfile and --keyfile)")
    p.add_argument("--certfile", help="server certificate (PEM)")
    p.add_argument("--keyfile", help="server private key (PEM)")
    p.add_argument("--cafile", help="CA bundle for optional client certificates")
    p.add_argument("--ws-port", type=int, help="MQTT over WebSocket port")
    p.add_argument("--credentials", metavar="FILE",
                   help="JSON credentials/ACL file; without it only loopback hosts are allowed (anonymous)")
    p.add_argument("--max-offline-queue", type=int, default=DEFAULT_MAX_OFFLINE_QUEUE,
                   help=f"messages kept per offline persistent session (default {DEFAULT_MAX_OFFLINE_QUEUE})")
    p.add_argument("--session-expiry", type=int, help="seconds to keep disconnected persistent sessions")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)  # amqtt's state machines log every step
    settings = BrokerSettings(
        host=args.host,
        port=args.port or None,
        plain_host=args.plain_host,
        tls_port=args.tls_port,
        certfile=args.certfile,
        keyfile=args.keyfile,
        cafile=args.cafile,
        ws_port=args.ws_port,
        credentials_file=args.credentials,
        max_offline_queue=args.max_offline_queue,
        session_expiry_interval=args.session_expiry,
    )
    try:
        serve(settings)
    except ConfigError as exc:
        print(f"cwsnet.broker: {exc}", file=sys.stderr)
        return 2
    except (BrokerError, AMQTTError, PluginError, OSError) as exc:
        print(f"cwsnet.broker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run from the canonical module so the plugin path "cwsnet.broker.CwsAccessPlugin" and this
    # code are one module, not two copies (__main__ and cwsnet.broker).
    from cwsnet import broker as _canonical

    sys.exit(_canonical.main())
