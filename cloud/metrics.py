"""The cloud tier's Prometheus metrics, on a dedicated registry (never the process-global one).

A dedicated registry keeps two clouds in one process (tests, ``cwsnet up``) from colliding and
keeps library metrics out of ``/metrics`` unless we put them there.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cloud.store import TASK_STATES

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
MESSAGE_KINDS = ("birth", "status", "death", "telemetry", "event", "task_result", "task_cmd")  # task_cmd: offloads


class CloudMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "cwsnet_cloud_messages_received",
            "Messages that authenticated and passed the topic checks (docs/protocol.md §2 rules 1-7), by "
            "header kind, counted once their batch committed: newly stored ones, duplicates (also counted "
            "as rejected reason=replay) and stored ones whose body was malformed (also counted as "
            "rejected reason=malformed)",
            ["kind"],
            registry=r,
        )
        self.rejected = Counter(
            "cwsnet_cloud_messages_rejected",
            "Messages rejected by ingest, by reason (docs/protocol.md §2). malformed includes "
            "authenticated messages stored without effects because of a bad body, and messages the "
            "store could not take; replay counts duplicates (stored earlier, acked again)",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "cwsnet_cloud_messages_duplicate",
            "Authenticated messages whose (sender, seq) was already stored: not stored again, acknowledged "
            "again (equal to rejected reason=replay)",
            registry=r,
        )
        self.readings = Counter(
            "cwsnet_cloud_telemetry_readings",
            "Telemetry readings newly stored (one per row; duplicates and malformed messages add none)",
            registry=r,
        )
        self.ingest_seconds = Histogram(
            "cwsnet_cloud_ingest_seconds",
            "Time to write and commit one ingest batch (or part of one) to the store; opening and "
            "checking the messages is not included",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.acks_sent = Counter(
            "cwsnet_cloud_acks_sent",
            "Sealed ack messages (each one ack body to one gateway) the cloud broker acknowledged",
            registry=r,
        )
        self.devices_online = Gauge(
            "cwsnet_cloud_devices_online",
            "Registered nodes of role device currently shown online (gateways not included)",
            registry=r,
        )
        self.tasks = Counter(
            "cwsnet_cloud_tasks",
            "Task state transitions, by the state entered: queued when created through the API; running, "
            "succeeded, failed, expired as reported by devices; expired also when the cloud sees a "
            "deadline pass; cancelled by the operator",
            ["state"],
            registry=r,
        )
        self.task_seconds = Histogram(
            "cwsnet_cloud_task_seconds",
            "Time from a task's creation to its final state (succeeded, failed, cancelled, expired), by kind "
            "(direct: sent to a named device; scheduled: placed by the scheduler) and final state",
            ["kind", "state"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0),
            registry=r,
        )
        self.site_offloads = Counter(
            "cwsnet_cloud_site_offloads",
            "Site tasks gateways offloaded to the cloud's workers (protocol §3, site tasks), by outcome: started "
            "(taken to run), then succeeded, failed, cancelled or expired as each run ends; refused (answered "
            "failed without running: cloud_workers 0, no handler or args); stale (its exp had passed: not run, "
            "not answered)",
            ["outcome"],
            registry=r,
        )
        self.site_offload_replies_dropped = Counter(
            "cwsnet_cloud_site_offload_replies_dropped",
            "Reports on offloaded site tasks dropped unsent because a gateway's queue of unsent replies was "
            "full (the link stayed down); the gateway's lease moves such a task",
            registry=r,
        )
        self.broker_connected = Gauge(
            "cwsnet_cloud_broker_connected", "1 while ingest is connected to the cloud broker", registry=r
        )
        self.tls_cert_expiry = Gauge(
            "cwsnet_tls_cert_expiry_timestamp_seconds",
            "Unix time at which the TLS certificate a listener of this cloud loaded expires (listener: mqtt "
            "for the embedded broker's TLS port, http for the HTTPS console); `cwsnet up` renews one 30 days "
            "before, and the daemon loads the new one when it restarts",
            ["listener"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for kind in MESSAGE_KINDS:
            self.received.labels(kind=kind)
        for state in TASK_STATES:
            self.tasks.labels(state=state)
        for outcome in ("started", "succeeded", "failed", "cancelled", "expired", "refused", "stale"):
            self.site_offloads.labels(outcome=outcome)

    def render(self) -> bytes:
        """The registry in the Prometheus text format 0.0.4 (see :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class NodeStatusCollector:
    """Store-and-forward figures each node reported in its latest status, read at scrape time:
    what its outbox holds and what its overflow policy dropped, per priority class (devices), and
    how full a gateway's uplink outbox is and how many commands it holds."""

    def __init__(self, list_nodes: Any) -> None:
        self._list_nodes = list_nodes

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        held = GaugeMetricFamily("cwsnet_node_outbox_messages",
                                 "Messages a node holds unacknowledged (its latest status)", labels=["node"])
        dropped = CounterMetricFamily("cwsnet_node_outbox_dropped",
                                      "Messages a device's overflow policy dropped, by priority class, as "
                                      "reported in its latest status", labels=["node", "class"])
        fill = GaugeMetricFamily("cwsnet_node_outbox_fill",
                                 "Fraction of a gateway's uplink outbox limit in use (latest status)", labels=["node"])
        commands = GaugeMetricFamily("cwsnet_node_commands_held",
                                     "Commands a gateway holds for offline devices (latest status)", labels=["node"])
        for node in self._list_nodes():
            st = node.last_status or {}
            if isinstance(st.get("outbox"), int):
                held.add_metric([node.id], st["outbox"])
            for cls, n in (st.get("dropped") or {}).items() if isinstance(st.get("dropped"), dict) else ():
                if isinstance(n, int):
                    dropped.add_metric([node.id, str(cls)], n)
            if isinstance(st.get("outbox_fill"), int | float):
                fill.add_metric([node.id], st["outbox_fill"])
            if isinstance(st.get("commands_held"), int):
                commands.add_metric([node.id], st["commands_held"])
        yield from (held, dropped, fill, commands)
