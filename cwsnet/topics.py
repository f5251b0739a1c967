"""The CWSNet v1 topic namespace: ``cws/v1/{site}/{node}/{channel}[/{sub}]``.

Pure functions, no I/O. ``docs/protocol.md`` is the normative description.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from cwsnet.errors import TopicError

PREFIX = "cws"
VERSION = "v1"

#: Channels a node publishes (uplink) and the ones addressed to a node (downlink).
UPLINK_CHANNELS = ("status", "telemetry", "event", "task/result")
DOWNLINK_CHANNELS = ("task/cmd", "ack", "config")
#: Published by a device for its gateway only (never forwarded): receipts for held commands, site
#: tasks it submits and its executor status for the gateway's scheduler (protocol §3, site tasks).
LOCAL_CHANNELS = ("receipt", "task/submit", "task/status")
#: Published by a gateway for the cloud: site tasks its scheduler gives the cloud to run (§3).
OFFLOAD_CHANNEL = "task/offload"
#: Firmware updates between a gateway and its devices (never forwarded, not sealed: §8).
OTA_CHANNELS = ("ota/get", "ota/data")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_name(value: str, what: str) -> str:
    """Validate a site, node or stream name: 1-63 chars of ``[A-Za-z0-9_.-]``, starting alphanumeric.

    MQTT wildcards, ``/`` and ``$`` can never appear in a name, so a name can always be put in a
    topic level without escaping.
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise TopicError(
            f"{what} {value!r} is not a valid name: use 1-63 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return value


def base(site: str, node: str) -> str:
    return f"{PREFIX}/{VERSION}/{check_name(site, 'site')}/{check_name(node, 'node')}"


def status(site: str, node: str) -> str:
    return f"{base(site, node)}/status"


def telemetry(site: str, node: str, stream: str) -> str:
    return f"{base(site, node)}/telemetry/{check_name(stream, 'stream')}"


def event(site: str, node: str, event_type: str) -> str:
    return f"{base(site, node)}/event/{check_name(event_type, 'event type')}"


def task_cmd(site: str, node: str) -> str:
    return f"{base(site, node)}/task/cmd"


def task_result(site: str, node: str) -> str:
    return f"{base(site, node)}/task/result"


def task_submit(site: str, node: str) -> str:
    return f"{base(site, node)}/task/submit"


def task_status(site: str, node: str) -> str:
    return f"{base(site, node)}/task/status"


def task_offload(site: str, node: str) -> str:
    return f"{base(site, node)}/task/offload"


def ack(site: str, node: str) -> str:
    return f"{base(site, node)}/ack"


def config(site: str, node: str) -> str:
    return f"{base(site, node)}/config"


def receipt(site: str, node: str) -> str:
    return f"{base(site, node)}/receipt"


def ota_get(site: str, node: str) -> str:
    return f"{base(site, node)}/ota/get"


def ota_data(site: str, node: str) -> str:
    return f"{base(site, node)}/ota/data"


#: app topics: ``cws/v1/_apps/{app}/{site}/{node}/{channel}...`` (``_`` cannot start a site name)
APPS = "_apps"


def app_topic(app: str, source_topic: str) -> str:
    """Where the cloud re-publishes ``source_topic``'s messages for ``app``, sealed to it."""
    head = f"{PREFIX}/{VERSION}/"
    if not source_topic.startswith(head):
        raise TopicError(f"topic {source_topic!r} is not under {head}")
    return f"{head}{APPS}/{check_name(app, 'app')}/{source_topic[len(head):]}"


def app_filter(app: str) -> str:
    """The one filter an app may subscribe to on the cloud broker."""
    return f"{PREFIX}/{VERSION}/{APPS}/{check_name(app, 'app')}/#"


def parse_app_topic(topic: str) -> tuple[str, TopicParts]:
    """Split an app topic into the app and the parts of the source topic."""
    levels = topic.split("/")
    if len(levels) < 4 or levels[:3] != [PREFIX, VERSION, APPS]:
        raise TopicError(f"topic {topic!r} is not an app topic ({PREFIX}/{VERSION}/{APPS}/{{app}}/...)")
    return check_name(levels[3], "app"), parse("/".join([PREFIX, VERSION, *levels[4:]]))


def site_filter(site: str, channel: str) -> str:
    """Subscription filter for one channel of every node of a site, e.g. ``cws/v1/home/+/telemetry/#``."""
    suffix = "/#" if channel in ("telemetry", "event") else ""
    return f"{PREFIX}/{VERSION}/{check_name(site, 'site')}/+/{channel}{suffix}"


def all_sites_filter(channel: str) -> str:
    suffix = "/#" if channel in ("telemetry", "event") else ""
    return f"{PREFIX}/{VERSION}/+/+/{channel}{suffix}"


@dataclass(frozen=True, slots=True)
class TopicParts:
    site: str
    node: str
    channel: str  # "status", "telemetry", "event", "task/cmd", "task/result", "ack", "config", "receipt", "ota/get", ...
    sub: str | None  # stream for telemetry, event type for events

    @property
    def uplink(self) -> bool:
        return self.channel in UPLINK_CHANNELS


def parse(topic: str) -> TopicParts:
    """Split a CWSNet topic; raise :class:`TopicError` naming the problem if it is not one."""
    levels = topic.split("/")
    if len(levels) < 5 or levels[0] != PREFIX:
        raise TopicError(f"topic {topic!r} is not under {PREFIX}/{VERSION}/{{site}}/{{node}}/...")
    if levels[1] != VERSION:
        raise TopicError(f"topic {topic!r} has protocol version {levels[1]!r}; this node speaks {VERSION}")
    site = check_name(levels[2], "site")
    node = check_name(levels[3], "node")
    rest = levels[4:]
    if rest == ["status"]:
        return TopicParts(site, node, "status", None)
    if len(rest) == 2 and rest[0] in ("telemetry", "event"):
        return TopicParts(site, node, rest[0], check_name(rest[1], rest[0] + " name"))
    if rest in (["task", "cmd"], ["task", "result"], ["task", "submit"], ["task", "status"], ["task", "offload"],
                ["ota", "get"], ["ota", "data"]):
        return TopicParts(site, node, "/".join(rest), None)
    if rest in (["ack"], ["config"], ["receipt"]):
        return TopicParts(site, node, rest[0], None)
    raise TopicError(f"topic {topic!r} has unknown channel {'/'.join(rest)!r}")


def route_in_table(table: list[list[str]], stream: str) -> str:
    """Where a device seals telemetry of ``stream``: ``gateway`` or ``cloud``, by the route table its
    gateway sent (``[[stream pattern, "gateway" | "cloud"], ...]``, first match wins, protocol §9)."""
    for pattern, to in table:
        if fnmatch.fnmatchcase(stream, pattern):
            return to
    return "cloud"
