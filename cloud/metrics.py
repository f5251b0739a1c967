"""The cloud tier's Prometheus metrics, on a dedicated registry (never the process-global one).

A dedicated registry keeps two clouds in one process (tests, ``cwsnet up``) from colliding and
keeps library metrics out of ``/metrics`` unless we put them there.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Content type of the Prometheus text exposition format 0.0.4 that ``generate_latest`` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Every ``reason`` label of rejected messages (docs/protocol.md §2), pre-created so each shows as 0.
REJECT_REASONS = (
    "malformed",
    "version",
    "unknown_sender",
    "forged",
    "topic_mismatch",
    "wrong_recipient",
    "replay",
)
MESSAGE_KINDS = ("birth", "status", "death", "telemetry", "event", "task_result")
TASK_STATES = ("queued", "running", "succeeded", "failed", "expired", "cancelled")


class CloudMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "cwsnet_cloud_messages_received",
            "Authenticated messages received by ingest (including duplicates), by kind",
            ["kind"],
            registry=r,
        )
        self.rejected = Counter(
            "cwsnet_cloud_messages_rejected",
            "Messages rejected by ingest, by reason (docs/protocol.md §2)",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "cwsnet_cloud_messages_duplicate",
            "Messages whose (sender, seq) was already stored: not stored again, still acknowledged",
            registry=r,
        )
        self.readings = Counter(
            "cwsnet_cloud_telemetry_readings", "Telemetry readings stored (one per row)", registry=r
        )
        self.ingest_seconds = Histogram(
            "cwsnet_cloud_ingest_seconds",
            "Time to commit one ingest batch to the store",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.acks_sent = Counter(
            "cwsnet_cloud_acks_sent", "Sealed ack messages published to gateways", registry=r
        )
        self.devices_online = Gauge("cwsnet_cloud_devices_online", "Devices currently shown online", registry=r)
        self.tasks = Counter(
            "cwsnet_cloud_tasks", "Tasks that entered each state (created = queued)", ["state"], registry=r
        )
        self.broker_connected = Gauge(
            "cwsnet_cloud_broker_connected", "1 while ingest is connected to the cloud broker", registry=r
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for kind in MESSAGE_KINDS:
            self.received.labels(kind=kind)
        for state in TASK_STATES:
            self.tasks.labels(state=state)

    def render(self) -> bytes:
        """The registry in the Prometheus text format 0.0.4 (see :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
