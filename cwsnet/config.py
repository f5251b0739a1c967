"""Typed, validated configuration for every daemon, loaded from YAML with line numbers.

Errors read ``file:line: field: problem (got X)`` so a user can fix them without a traceback.
Values may reference secrets in other files (``*_file`` fields); secrets are never printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cwsnet.errors import ConfigError
from cwsnet.tls import is_loopback_host
from cwsnet.topics import check_name


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSClient(Model):
    ca_file: Path = Field(description="CA certificate used to verify the broker")
    insecure: bool = Field(False, description="skip hostname verification (testing only)")


class BrokerEndpoint(Model):
    """An MQTT broker this daemon connects to as a client."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password_file: Path | None = Field(None, description="file holding the broker password (mode 0600)")
    tls: TLSClient | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    plaintext: bool = Field(
        False, description="allow plain MQTT (no TLS) to a host that is not loopback: the token and all "
        "traffic cross the network in the clear; only for a trusted network and a broker without TLS",
    )

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{self.password_file}: cannot read broker password: {exc.strerror}") from None


class EmbeddedBroker(Model):
    """The amqtt broker this daemon runs in-process.

    Beyond loopback it speaks only TLS: ``tls_port`` (with ``certfile``/``keyfile``) listens on
    ``host``; the plaintext ``port`` and ``ws_port`` listeners listen on ``plain_host`` (default:
    ``host``), which must be a loopback address.
    """

    host: str = "127.0.0.1"
    port: int | None = Field(
        1883, ge=1, le=65535, description="plaintext MQTT port, loopback only (null: no plaintext listener)"
    )
    plain_host: str | None = Field(
        None, description="address of the plaintext and websocket listeners (default: host); must be loopback"
    )
    tls_port: int | None = Field(None, ge=1, le=65535)
    certfile: Path | None = None
    keyfile: Path | None = None
    ws_port: int | None = Field(None, ge=1, le=65535)
    credentials_file: Path | None = Field(
        None, description="broker users and topic ACLs (JSON); None allows anonymous on loopback only"
    )

    @model_validator(mode="after")
    def _listeners(self) -> EmbeddedBroker:
        if self.tls_port is not None and (self.certfile is None or self.keyfile is None):
            raise ValueError("tls_port needs both certfile and keyfile")
        if self.tls_port is None and (self.certfile is not None or self.keyfile is not None):
            raise ValueError("certfile/keyfile given but no tls_port")
        if self.port is None and self.tls_port is None and self.ws_port is None:
            raise ValueError("no listener: set tls_port (with certfile and keyfile) or port")
        problem = plaintext_bind_problem(self.plain_host or self.host, self.port, self.ws_port,
                                         "plain_host" if self.plain_host else "host")
        if problem:
            raise ValueError(problem)
        return self


def plaintext_bind_problem(bind: str, port: int | None, ws_port: int | None, field: str = "host") -> str | None:
    """Why plaintext (MQTT ``port``, websocket ``ws_port``) listeners may not listen on ``bind``:
    beyond loopback every MQTT client must use TLS. None when they may (or there are none)."""
    if is_loopback_host(bind):
        return None
    names = [n for n, v in (("port", port), ("ws_port", ws_port)) if v is not None]
    if not names:
        return None
    what = " and ".join(names)
    return (f"broker.{names[0]}: a plaintext listener ({what}) may listen only on a loopback address, not "
            f"{field} {bind!r}: serve clients beyond this machine on tls_port (with certfile and keyfile) and set "
            f"plain_host: 127.0.0.1 (or port: null), or set host: 127.0.0.1")


class Reconnect(Model):
    min_delay: float = Field(0.5, gt=0, le=60, description="first reconnect delay, seconds")
    max_delay: float = Field(30.0, gt=0, le=3600, description="longest reconnect delay, seconds")

    @model_validator(mode="after")
    def _ordered(self) -> Reconnect:
        if self.min_delay > self.max_delay:
            raise ValueError(f"min_delay ({self.min_delay}) must not exceed max_delay ({self.max_delay})")
        return self


class SensorConfig(Model):
    type: Literal["system", "simulated"]
    stream: str = Field(description="stream name: the last topic level of telemetry/{stream}")
    interval: float = Field(5.0, gt=0, le=86400, description="seconds between readings")
    pattern: Literal["sine", "ramp", "square", "random", "constant"] = Field(
        "sine", description="sine, ramp, square (offset+amplitude for the first half of each period, then "
                            "offset-amplitude), random (a walk), constant (offset)")
    fields: list[str] = Field(default_factory=lambda: ["value"])
    amplitude: float = 10.0
    offset: float = 20.0
    period: float = Field(60.0, gt=0)
    seed: int | None = None

    @field_validator("stream")
    @classmethod
    def _stream_name(cls, v: str) -> str:
        return check_name(v, "stream")


class Batching(Model):
    max_readings: int = Field(10, ge=1, le=1000, description="readings per sealed telemetry message")
    max_delay: float = Field(1.0, ge=0, le=3600, description="seconds a reading may wait for its batch")


class OutboxConfig(Model):
    max_messages: int = Field(10_000, ge=10, le=10_000_000, description="messages held while unacknowledged, at most")
    max_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, le=2**40, description="bytes held, at most")
    window: int = Field(100, ge=1, le=10_000, description="messages sent and not yet custody-acked, at most")
    retransmit_after: float = Field(
        5.0, gt=0, le=3600, description="seconds before an unacked message is sent again (doubling per attempt)"
    )
    max_backoff: float = Field(60.0, gt=0, le=86400, description="longest wait between two sends of one message")
    ledger_keep: int = Field(
        100_000, ge=0, le=100_000_000,
        description="delivery ledger: the outcome (acked, dropped) of this many recent messages is kept",
    )


class GatewayStore(Model):
    max_messages: int = Field(
        1_000_000, ge=100, le=1_000_000_000, description="device messages held for the cloud, at most"
    )
    max_bytes: int = Field(1024**3, ge=1024 * 1024, le=2**44, description="bytes held for the cloud, at most")
    high_water: float = Field(
        0.9, gt=0, le=1,
        description="fill level above which new telemetry is refused (devices keep it and are told to pause)",
    )
    busy_pause: float = Field(5.0, gt=0, le=3600, description="seconds a refused device waits before sending new data")


class Downlink(Model):
    max_age: float = Field(
        7 * 86400.0, gt=0, le=365 * 86400,
        description="seconds a command for an offline device is held when it carries no expiry of its own",
    )
    redeliver_after: float = Field(
        30.0, gt=0, le=86400, description="seconds before a held command without a receipt is delivered again"
    )


class AgentConfig(Model):
    identity_file: Path = Field(description="provisioning bundle: node, site, keys (mode 0600)")
    broker: BrokerEndpoint = Field(default_factory=BrokerEndpoint)
    data_dir: Path = Path("./agent-data")
    status_interval: float = Field(10.0, gt=0, le=86400)
    sensors: list[SensorConfig] = Field(
        default_factory=lambda: [SensorConfig(type="system", stream="system", interval=10.0)]
    )
    batching: Batching = Field(default_factory=Batching)
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig, description="the durable outbox: bounds and (see docs) overflow policy"
    )
    reconnect: Reconnect = Field(default_factory=Reconnect)
    handlers: list[str] = Field(
        default_factory=lambda: ["echo", "sha256", "sleep"], description="task handlers this agent runs"
    )
    max_task_seconds: float = Field(300.0, gt=0)
    task_slots: int = Field(4, ge=0, le=256, description="tasks this agent runs at once; 0: it takes no scheduled "
                                                          "work (direct tasks still run)")
    capabilities: list[str] = Field(default_factory=list, description="what this node offers scheduled tasks "
                                    "(e.g. gpu, camera): a task's requirements.capabilities must all be here")


class GatewayConfig(Model):
    identity_file: Path
    broker: EmbeddedBroker | None = Field(
        default_factory=EmbeddedBroker,
        description="the embedded amqtt site broker; null when the site uses an existing broker (e.g. Mosquitto)",
    )
    site_client: BrokerEndpoint = Field(
        default_factory=BrokerEndpoint, description="how the gateway's bridge connects to the site broker"
    )
    uplink: BrokerEndpoint = Field(description="the cloud broker")
    registry_file: Path | None = Field(
        None, description="JSON list of nodes (id, site, role, public_key): the devices the gateway custody-acks"
    )
    data_dir: Path = Path("./gateway-data")
    ota_dir: Path | None = Field(
        None, description="firmware releases served to the site's devices over the air, one folder per version "
                          "(`cwsnet firmware release` writes them); default: {data_dir}/ota")
    policies_dir: Path | None = Field(
        None, description="the site's own policy files, applied over the shipped defaults and re-read every "
                          "second (docs/policies.md); default: {data_dir}/policies")
    enforce_policies: bool = Field(
        True, description="apply routing, rate-limit and automation policies at this gateway; false forwards "
                          "everything as is (for measuring their cost; broker ACLs apply either way)")
    store: GatewayStore = Field(default_factory=GatewayStore, description="bounds of the uplink outbox")
    downlink: Downlink = Field(default_factory=Downlink, description="commands held for offline devices")
    status_interval: float = Field(10.0, gt=0, le=86400)
    retransmit_after: float = Field(5.0, gt=0, le=3600, description="seconds before an unacked uplink message is sent again")
    max_inflight: int = Field(
        1000, ge=1, le=100000, description="uplink messages sent to the cloud and not yet acked, at most"
    )
    max_backoff: float = Field(
        300.0, gt=0, le=86400, description="longest wait between two sends of one unacked uplink message"
    )
    metrics_port: int | None = Field(None, ge=1, le=65535)
    task_slots: int = Field(2, ge=0, le=256, description="scheduled tasks the gateway's worker pool runs at once; "
                                                          "0: it runs none")
    handlers: list[str] | None = Field(None, description="task handlers the gateway's worker pool runs; default: "
                                       "the built-ins and installed plugins (`shell` only when listed)")
    capabilities: list[str] = Field(default_factory=list, description="what the gateway offers scheduled tasks")
    task_lease: float = Field(5.0, gt=0.5, le=3600, description="seconds a site task's executor may stay silent "
                              "before the gateway's scheduler moves the task (site tasks: docs/tasks.md)")
    reconnect: Reconnect = Field(default_factory=Reconnect)


class HttpTLS(Model):
    certfile: Path = Field(description="server certificate (PEM), e.g. issued by `cwsnet init` from the CWSNet CA")
    keyfile: Path = Field(description="its private key (PEM, mode 0600)")


class HttpConfig(Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    tls: HttpTLS | None = Field(None, description="serve HTTPS; required when host is not a loopback address")

    @model_validator(mode="after")
    def _tls_beyond_loopback(self) -> HttpConfig:
        if self.tls is None and not is_loopback_host(self.host):
            raise ValueError(
                f"http.host {self.host!r} is not a loopback address: the console and REST API listen beyond "
                "this machine only over HTTPS (set http.tls.certfile and http.tls.keyfile, or http.host: 127.0.0.1)"
            )
        return self


class CloudConfig(Model):
    identity_file: Path
    broker: EmbeddedBroker | None = Field(
        default_factory=EmbeddedBroker,
        description="the embedded amqtt cloud broker; null when using an existing broker (e.g. Mosquitto)",
    )
    client: BrokerEndpoint = Field(
        default_factory=BrokerEndpoint, description="how the cloud's ingest connects to the cloud broker"
    )
    http: HttpConfig = Field(default_factory=HttpConfig)
    database: Path = Path("./cloud-data/cloud.db")
    policies_dir: Path | None = Field(
        None, description="the site's own policy files (docs/policies.md), applied with the shipped defaults "
                          "and reloaded within a second of a change; None: the shipped defaults only")
    registry_file: Path | None = Field(
        None, description="JSON list of nodes (id, site, role, public_key) imported into the registry at start"
    )
    offline_after: float = Field(
        60.0, gt=0, description="seconds without any message after which a device is shown offline"
    )
    ack_interval: float = Field(0.2, gt=0, le=60, description="seconds between cumulative acks to a gateway")
    task_lease: float = Field(
        5.0, ge=1, le=3600, description="seconds an executor holding a scheduled task may stay silent before the "
        "task is taken back and re-queued elsewhere (executors heartbeat every third of it)")
    cloud_workers: int = Field(
        2, ge=0, le=256, description="scheduled tasks the cloud runs at once on its own workers (tier cloud); 0: none")
    handlers: list[str] | None = Field(None, description="task handlers the cloud's workers run; default: the "
                                       "built-ins and installed plugins (`shell` only when listed)")
    reconnect: Reconnect = Field(default_factory=Reconnect)
    admin_token_file: Path | None = Field(
        None,
        description="on a start with no operator account yet, the cloud creates the account 'admin' (role admin) "
        "and writes its API token 'bootstrap' here (mode 0600, one line); later starts leave it alone. None: "
        "no account is made (create one with `cwsnet operator add`)",
    )


M = TypeVar("M", bound=BaseModel)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line/column of every mapping key and value."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    lines: dict[Any, tuple[int, int]] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise ConfigError(
                f"{loader.name}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}: "
                f"duplicate key {key!r}"
            )
        result[key] = loader.construct_object(value_node, deep=True)
        lines[key] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
    loader.positions[id(result)] = lines  # type: ignore[attr-defined]
    return _PosDict(result, lines)


class _PosDict(dict[Any, Any]):
    def __init__(self, data: dict[Any, Any], lines: dict[Any, tuple[int, int]]) -> None:
        super().__init__(data)
        self.lines = lines


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _position(data: Any, loc: tuple[Any, ...]) -> tuple[int, int] | None:
    """Line and column of the field at ``loc``: the deepest key found; inside a list, an element
    mapping's first key (so a field missing from it points at that element)."""
    pos = None
    cur = data
    for part in loc:
        if isinstance(cur, _PosDict) and part in cur.lines:
            pos = cur.lines[part]
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
            if isinstance(cur, _PosDict) and cur.lines:
                pos = min(cur.lines.values())
        else:
            break
    return pos


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    got = err.get("input")
    if err["type"] == "value_error" and isinstance(got, dict):  # a check across a section's fields
        return f"{loc}: {msg.removeprefix('Value error, ')}"
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return f"{loc}: {msg} (got {shown})"


def load_config(path: str | os.PathLike[str], model: type[M]) -> M:
    """Load and validate a YAML config file; relative paths inside resolve against its folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    loader = _LineLoader(text)
    loader.name = str(p)
    loader.positions = {}  # type: ignore[attr-defined]
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}:1: the config must be a mapping of keys to values")
    try:
        cfg = model.model_validate(data, context={"base": p.parent})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            pos = _position(data, tuple(err["loc"]))
            where = f"{p}:{pos[0]}" if pos else f"{p}"
            problems.append(f"{where}: {_describe(err)}")
        raise ConfigError("\n".join(dict.fromkeys(problems))) from None
    return _resolve_paths(cfg, p.parent)


def _resolve_paths(cfg: M, base: Path) -> M:
    updates: dict[str, Any] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = (base / value).resolve()
        elif isinstance(value, BaseModel):
            updates[name] = _resolve_paths(value, base)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            updates[name] = [_resolve_paths(v, base) for v in value]
    return cfg.model_copy(update=updates) if updates else cfg


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
