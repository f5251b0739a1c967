"""cloud.ingest, in memory: no broker, no sockets; the clock is a variable."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
import pytest

from cloud.ingest import AckCoalescer, Ingest, NodeDirectory, RejectionLog, payload_digest
from cloud.metrics import REJECT_REASONS, CloudMetrics
from cloud.store import SqliteStore
from cwsnet import topics
from cwsnet.endpoint import Endpoint
from cwsnet.identity import Identity
from cwsnet.replay import SeqCounter


class Clock:
    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Node:
    """A device (or gateway) that seals messages to the cloud, as an agent would."""

    def __init__(self, ident: Identity, cloud: Identity, clock: Clock) -> None:
        self.ident = ident
        self.ep = Endpoint(ident, SeqCounter(1, lambda m: None), lambda n: cloud.public_key if n == "cloud" else None, clock)

    def seal(self, topic: str, kind: str, body: Any, *, seq: int | None = None, to: str = "cloud") -> bytes:
        payload, _h = self.ep.seal(topic, kind, body, to=to, seq=seq, trace="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        return payload

    def telemetry(self, values: list[dict[str, Any]], stream: str = "env", **kw: Any) -> tuple[str, bytes]:
        topic = topics.telemetry(self.ident.site, self.ident.node, stream)
        readings = [{"ts": 1_767_225_600_000 + i, "values": v} for i, v in enumerate(values)]
        return topic, self.seal(topic, "telemetry", {"stream": stream, "readings": readings}, **kw)

    def status(self, kind: str, *, seq: int | None = None, will_seq: int | None = None) -> tuple[str, bytes]:
        body: dict[str, Any] = {"state": "offline" if kind == "death" else "online", "uptime": 1.0, "cpu": 3.5}
        if will_seq is not None:
            body["will_seq"] = will_seq
            body["agent"] = {"version": "0.1.0", "platform": "linux", "kind": "cpython"}
        topic = topics.status(self.ident.site, self.ident.node)
        return topic, self.seal(topic, kind, body, seq=seq)


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.mono = Clock(1000.0)
        self.cloud = Identity.generate("cloud", "cloud", "cloud")
        self.store = SqliteStore(tmp_path / "cloud.db")
        self.nodes: dict[str, Node] = {}
        for node, site, role in (("dev-1", "home", "device"), ("dev-2", "home", "device"), ("gw-1", "home", "gateway")):
            ident = Identity.generate(node, site, role)
            self.store.upsert_node(node, site=site, role=role, public_key=ident.public_b64)
            self.nodes[node] = Node(ident, self.cloud, self.clock)
        self.directory = NodeDirectory(self.store, clock=self.mono)
        self.endpoint = Endpoint(self.cloud, SeqCounter(0, lambda m: None), self.directory.public_key, self.clock)
        self.metrics = CloudMetrics()
        self.ingest = Ingest(
            self.endpoint, self.store, self.metrics, directory=self.directory, clock=self.clock, offline_after=60
        )

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def rejected(self, reason: str) -> float:
        return self.metric("cwsnet_cloud_messages_rejected_total", reason=reason)

    def rejection_events(self) -> list[Any]:
        return [e for e in self.store.list_events(limit=1000).items if e.type == "message.rejected"]


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = World(tmp_path)
    yield world
    world.store.close()


def test_valid_telemetry_batch_stored_and_acked(w: World) -> None:
    dev = w.nodes["dev-1"]
    msgs = [dev.telemetry([{"t": 20.5 + i, "unit": "C"}, {"t": 21.0, "ok": True}]) for i in range(3)]
    batch = w.ingest.handle_batch(msgs)
    assert [r.status for r in batch.results] == ["stored"] * 3
    seqs = [r.seq for r in batch.results]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert batch.acks == [("home", "dev-1", s) for s in seqs]
    assert all(r.trace and r.trace.startswith("00-") for r in batch.results)
    rows = w.store.telemetry("dev-1", limit=100)
    assert len(rows) == 6 and rows[0].seq == seqs[-1]
    assert w.metric("cwsnet_cloud_telemetry_readings_total") == 6
    assert w.metric("cwsnet_cloud_messages_received_total", kind="telemetry") == 3
    assert w.metric("cwsnet_cloud_ingest_seconds_count") == 1
    assert [c["type"] for c in batch.changes] == ["telemetry"] * 3
    assert batch.changes[0]["telemetry"]["items"][0]["values"] == {"t": 20.5, "unit": "C"}
    node = w.store.get_node("dev-1")
    assert node is not None and node.last_seen == int(w.clock.t * 1000)


def test_flipped_byte_is_forged(w: World) -> None:
    topic, payload = w.nodes["dev-1"].telemetry([{"t": 1}])
    bad = bytearray(payload)
    bad[-1] ^= 0x01  # last byte of the ciphertext
    r = w.ingest.handle(topic, bytes(bad))
    assert r.status == "rejected" and r.reason == "forged" and not r.ack
    assert w.store.message_count() == 0
    assert w.rejected("forged") == 1
    (ev,) = w.rejection_events()
    assert ev.source == "dev-1" and topic in ev.message and "forged" in ev.message
    assert ev.data["reason"] == "forged" and ev.data["count"] == 1


def test_replay_not_stored_twice_but_acked(w: World) -> None:
    topic, payload = w.nodes["dev-1"].telemetry([{"t": 1}, {"t": 2}])
    first = w.ingest.handle(topic, payload)
    assert first.status == "stored"
    batch = w.ingest.handle_batch([(topic, payload), (topic, payload)])
    assert [r.status for r in batch.results] == ["duplicate", "duplicate"]
    assert all(r.reason == "replay" and r.ack for r in batch.results)
    assert batch.acks == [("home", "dev-1", first.seq)] * 2
    assert len(w.store.telemetry("dev-1")) == 2 and w.store.message_count() == 1
    assert w.rejected("replay") == 2
    assert w.metric("cwsnet_cloud_messages_duplicate_total") == 2
    # coalesced: two replays within 10 s make one event
    assert [e.data["reason"] for e in w.rejection_events()] == ["replay"]


def test_republished_on_another_devices_topic(w: World) -> None:
    topic, payload = w.nodes["dev-1"].telemetry([{"t": 1}])
    other = topics.telemetry("home", "dev-2", "env")
    r = w.ingest.handle(other, payload)
    assert r.status == "rejected" and r.reason == "topic_mismatch" and not r.ack
    assert w.store.message_count() == 0 and w.rejected("topic_mismatch") == 1
    # the genuine one still goes through afterwards
    assert w.ingest.handle(topic, payload).status == "stored"


def test_rule7_sender_and_site_checked(w: World) -> None:
    dev1 = w.nodes["dev-1"]
    # sealed by dev-1 for dev-2's topic: the box opens, but the topic names another node
    t2 = topics.telemetry("home", "dev-2", "env")
    r = w.ingest.handle(t2, dev1.seal(t2, "telemetry", {"stream": "env", "readings": []}))
    assert r.reason == "topic_mismatch" and "not the sender" in (r.detail or "")
    # sealed for the right node on a site it is not registered in
    t3 = topics.telemetry("lab", "dev-1", "env")
    r = w.ingest.handle(t3, dev1.seal(t3, "telemetry", {"stream": "env", "readings": []}))
    assert r.reason == "topic_mismatch" and "registered site" in (r.detail or "")
    # a telemetry kind on the status channel
    ts = topics.status("home", "dev-1")
    r = w.ingest.handle(ts, dev1.seal(ts, "telemetry", {"stream": "env", "readings": []}))
    assert r.reason == "topic_mismatch"
    # a downlink topic
    tc = topics.task_cmd("home", "dev-1")
    r = w.ingest.handle(tc, dev1.seal(tc, "task_cmd", {}))
    assert r.reason == "topic_mismatch"
    assert w.rejected("topic_mismatch") == 4 and w.store.message_count() == 0


def test_non_cbor_is_malformed(w: World) -> None:
    for payload in (b"\xff\xfe not cbor", b"", b"{\"json\": true}", cbor2.dumps([1, 2, 3])):
        r = w.ingest.handle("cws/v1/home/dev-1/telemetry/env", payload)
        assert r.status == "rejected" and r.reason == "malformed", payload
    assert w.rejected("malformed") == 4
    (ev,) = w.rejection_events()  # coalesced: one (unknown source, malformed) window
    assert ev.source is None and ev.data["count"] == 1


def test_unknown_sender(w: World) -> None:
    stranger = Node(Identity.generate("dev-x", "home", "device"), w.cloud, w.clock)
    topic, payload = stranger.telemetry([{"t": 1}])
    r = w.ingest.handle(topic, payload)
    assert r.reason == "unknown_sender" and r.sender == "dev-x" and not r.ack
    assert w.rejected("unknown_sender") == 1
    (ev,) = w.rejection_events()
    assert ev.source is None  # not a registered node: never used as an event source
    # registered a moment later (the CLI writes the store): known after the directory's 1 s refresh limit
    w.store.upsert_node("dev-x", site="home", role="device", public_key=stranger.ident.public_b64)
    assert w.ingest.handle(topic, payload).reason == "unknown_sender"
    w.mono.t += 1.5
    assert w.ingest.handle(topic, payload).status == "stored"


def test_wrong_recipient_and_version(w: World) -> None:
    dev = w.nodes["dev-1"]
    topic = topics.telemetry("home", "dev-1", "env")
    payload, _ = dev.ep.seal(topic, "telemetry", {"stream": "env", "readings": []}, to="cloud")
    outer = cbor2.loads(payload)
    header = cbor2.loads(outer["h"])
    header["to"] = "gw-1"
    r = w.ingest.handle(topic, cbor2.dumps({**outer, "h": cbor2.dumps(header)}))
    assert r.reason == "wrong_recipient"
    header["to"], header["v"] = "cloud", 2
    r = w.ingest.handle(topic, cbor2.dumps({**outer, "h": cbor2.dumps(header)}))
    assert r.reason == "version"
    header["v"] = 1
    header["seq"] += 1  # a changed header no longer matches the sealed hash
    r = w.ingest.handle(topic, cbor2.dumps({**outer, "h": cbor2.dumps(header)}))
    assert r.reason == "forged"


def test_death_with_announced_will_seq_after_later_seqs(w: World) -> None:
    dev = w.nodes["dev-1"]
    will_seq = dev.ep.seq.next()  # reserved before connecting
    death = dev.status("death", seq=will_seq)
    birth = dev.status("birth", will_seq=will_seq)
    batch = w.ingest.handle_batch([birth, dev.telemetry([{"t": 1}]), dev.status("status")])
    assert [r.status for r in batch.results] == ["stored"] * 3
    assert batch.births == ["dev-1"]
    node = w.store.get_node("dev-1")
    assert node is not None and node.online and node.will_seq == will_seq
    assert node.agent == {"version": "0.1.0", "platform": "linux", "kind": "cpython"}
    assert w.metric("cwsnet_cloud_devices_online") == 1
    r = w.ingest.handle(*death)
    assert r.status == "stored" and r.ack and r.seq == will_seq
    node = w.store.get_node("dev-1")
    assert node is not None and not node.online
    assert w.metric("cwsnet_cloud_devices_online") == 0
    # once
    assert w.ingest.handle(*death).status == "duplicate"
    types = [e.type for e in w.store.list_events(limit=100).items]
    assert "node.online" in types and "node.offline" in types


def test_event_and_task_result(w: World) -> None:
    dev, dev2 = w.nodes["dev-1"], w.nodes["dev-2"]
    et = topics.event("home", "dev-1", "door")
    r = w.ingest.handle(et, dev.seal(et, "event", {"type": "door", "severity": "warning", "message": "open", "data": {"raw": b"\x01"}}))
    assert r.status == "stored"
    ev = next(e for e in w.store.list_events().items if e.type == "door")
    b = w.ingest.handle_batch([(et, dev.seal(et, "event", {"type": "door", "message": "shut"}))])
    (announced,) = [c["event"] for c in b.changes if c["type"] == "event"]
    assert announced == {"id": None, "ts": 1_767_225_600_000, "source": "dev-1", "type": "door",
                         "severity": "info", "message": "shut", "data": {}}
    assert ev.source == "dev-1" and ev.severity == "warning" and ev.data == {"raw": "AQ=="}

    task = w.store.create_task(target="dev-1", handler="echo", args={"x": 1})
    rt = topics.task_result("home", "dev-1")

    def report(node: Node, state: str, **extra: Any) -> Any:
        topic = topics.task_result(node.ident.site, node.ident.node)
        return w.ingest.handle_batch([(topic, node.seal(topic, "task_result", {"task_id": task.id, "state": state, **extra}))])

    b = report(dev, "running", started=5)
    assert [c["task"]["state"] for c in b.changes if c["type"] == "task"] == ["running"]
    report(dev2, "succeeded", result={"forged": True})  # not its task: ignored
    assert w.store.get_task(task.id).state == "running"  # type: ignore[union-attr]
    report(dev, "succeeded", result={"x": 1}, finished=9)
    report(dev, "running")  # late: ignored
    t = w.store.get_task(task.id)
    assert t is not None and t.state == "succeeded" and t.result == {"x": 1} and t.started == 5 and t.finished == 9
    assert w.metric("cwsnet_cloud_tasks_total", state="succeeded") == 1
    assert w.metric("cwsnet_cloud_task_seconds_count", kind="direct", state="succeeded") == 1
    assert rt  # topic helper used above


def test_malformed_body_is_stored_acked_and_counted(w: World) -> None:
    dev = w.nodes["dev-1"]
    topic = topics.telemetry("home", "dev-1", "env")
    bodies = [
        {"stream": "env", "readings": "lots"},
        {"stream": "other", "readings": []},
        {"stream": "env", "readings": [{"ts": 1, "values": {"x": float("nan")}}]},
        {"stream": "env", "readings": [{"ts": -1, "values": {}}]},
        ["not", "a", "map"],
    ]
    batch = w.ingest.handle_batch([(topic, dev.seal(topic, "telemetry", b)) for b in bodies])
    assert [r.reason for r in batch.results] == ["malformed"] * 5
    assert all(r.ack for r in batch.results), "authenticated: the seq is used up, the gateway may free it"
    assert len(batch.acks) == 5 and w.store.message_count() == 5 and w.store.telemetry("dev-1") == []
    assert w.rejected("malformed") == 5


def test_no_input_raises_and_everything_is_counted(w: World) -> None:
    rng = random.Random(7)
    dev = w.nodes["dev-1"]
    good_topic, good = dev.telemetry([{"t": 1}])
    inputs: list[tuple[str, Any]] = [
        ("cws/v1/home/dev-1/telemetry/env", os.urandom(rng.randint(0, 300))) for _ in range(200)
    ]
    for _ in range(200):  # mutate genuine messages at random positions
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        inputs.append((good_topic, bytes(b)))
    inputs += [
        ("not/a/cws/topic", good),
        ("cws/v1/home/dev-1/telemetry/env/extra", good),
        (good_topic, "text, not bytes"),
        (good_topic, b"\x00" * 300_000),
        (good_topic, cbor2.dumps({"h": b"x", "n": b"y", "c": b"z"})),
        (good_topic, cbor2.dumps({"h": cbor2.dumps({"v": 1}), "n": b"\x00" * 24, "c": b""})),
    ]
    batch = w.ingest.handle_batch(inputs)
    assert len(batch.results) == len(inputs)
    rejected = sum(1 for r in batch.results if r.status == "rejected")
    total = sum(w.rejected(reason) for reason in REJECT_REASONS)
    assert rejected == total - w.rejected("replay")
    assert all(r.reason in REJECT_REASONS for r in batch.results if r.status == "rejected")
    assert len(w.rejection_events()) <= 2 * len(REJECT_REASONS)  # coalesced per (source, reason)


def test_rejection_events_coalesced_then_flushed(w: World) -> None:
    topic, payload = w.nodes["dev-1"].telemetry([{"t": 1}])
    bad = payload[:-1] + bytes([payload[-1] ^ 1])
    for _ in range(50):
        w.ingest.handle(topic, bad)
    assert w.rejected("forged") == 50
    assert [e.data["count"] for e in w.rejection_events()] == [1]
    w.clock.t += 11
    w.ingest.sweep()
    counts = sorted(e.data["count"] for e in w.rejection_events())
    assert counts == [1, 49]
    assert "49 times" in w.rejection_events()[0].message


def test_sweep_marks_silent_nodes_offline(w: World) -> None:
    dev = w.nodes["dev-1"]
    will = dev.ep.seq.next()
    w.ingest.handle(*dev.status("birth", will_seq=will))
    w.clock.t += 30
    assert w.ingest.sweep() == []
    w.clock.t += 31
    changes = w.ingest.sweep()
    assert {c["type"] for c in changes} == {"device", "event"}
    assert next(c for c in changes if c["type"] == "device")["device"]["online"] is False
    assert w.metric("cwsnet_cloud_devices_online") == 0


def test_key_rotation_refreshes_directory(w: World) -> None:
    new = Identity.generate("dev-1", "home", "device")
    w.store.upsert_node("dev-1", site="home", role="device", public_key=new.public_b64)
    rotated = Node(new, w.cloud, w.clock)
    topic, payload = rotated.telemetry([{"t": 1}])
    w.mono.t += 2  # past the refresh limit: a forged result triggers one reload and a retry
    assert w.ingest.handle(topic, payload).status == "stored"


POISON_BODIES: list[tuple[str, Any]] = [
    # every one of these used to make store.ingest_batch raise, rolling back the whole batch
    ("telemetry", {"stream": "env", "readings": [{"ts": 2**63, "values": {"t": 1}}]}),
    ("telemetry", {"stream": "env", "readings": [{"ts": 1, "values": {"t": 2**64}}]}),
    ("telemetry", {"stream": "env", "readings": [{"ts": 1, "values": {"t": float("inf")}}]}),
    ("birth", {"state": "online", "will_seq": 2**63}),
    ("status", {"state": "online", "cpu": float("nan")}),
    ("status", {"state": "online", "load": [0.1, float("-inf"), 0.3]}),
    ("status", {"state": "online", "outbox": 10**5000}),  # a bignum JSON cannot even print
    ("status", {"state": "online", "agent": {"version": "1", "extra": {1: "int key"}}}),
    ("status", {"state": "online", "deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
    ("event", {"type": "door", "message": "m", "data": {"v": float("nan")}}),
    ("event", {"type": "door", "message": "m", "data": {"v": [2**63 + 5]}}),
    ("task_result", {"task_id": "t1", "state": "running", "started": 2**63}),
    ("task_result", {"task_id": "t1", "state": "succeeded", "finished": 2**70}),
    ("task_result", {"task_id": "t1", "state": "succeeded", "result": {"x": float("nan")}}),
    ("task_result", {"task_id": "t1", "state": "failed", "result": {"x": [-(2**63) - 1]}}),
]


def _topic_for(kind: str, node: Node) -> str:
    site, name = node.ident.site, node.ident.node
    if kind == "telemetry":
        return topics.telemetry(site, name, "env")
    if kind == "event":
        return topics.event(site, name, "door")
    if kind == "task_result":
        return topics.task_result(site, name)
    return topics.status(site, name)


@pytest.mark.parametrize("kind,body", POISON_BODIES, ids=[f"{k}-{i}" for i, (k, _b) in enumerate(POISON_BODIES)])
def test_poison_body_is_stored_without_effects_acked_and_counted(w: World, kind: str, body: Any) -> None:
    dev = w.nodes["dev-1"]
    w.store.create_task(target="dev-1", handler="echo", args={}, task_id="t1")
    good = dev.telemetry([{"t": 1.5}])
    topic = _topic_for(kind, dev)
    batch = w.ingest.handle_batch([good, (topic, dev.seal(topic, kind, body)), dev.telemetry([{"t": 2.5}])])
    assert [r.status for r in batch.results] == ["stored", "rejected", "stored"]
    bad = batch.results[1]
    assert bad.reason == "malformed" and bad.ack and bad.detail
    assert len(batch.acks) == 3 and batch.rejections == []  # authenticated: acked as stored, no notice
    assert w.store.message_count() == 3 and len(w.store.telemetry("dev-1")) == 2
    assert w.rejected("malformed") == 1
    node, task = w.store.get_node("dev-1"), w.store.get_task("t1")
    assert node is not None and not node.online and node.last_status is None  # no effects
    assert task is not None and task.state == "queued"
    assert not [e for e in w.store.list_events().items if e.type == "door"]


def test_storable_values_still_accepted(w: World) -> None:
    dev = w.nodes["dev-1"]
    body = {"state": "online", "cpu": 1.5, "n": -(2**63), "m": 2**63 - 1, "raw": b"\x00", "t": None,
            "agent": {"version": "1", "platform": "x", "kind": "cpython"}, "list": [[1, {"a": True}]]}
    topic = topics.status("home", "dev-1")
    assert w.ingest.handle(topic, dev.seal(topic, "status", body)).status == "stored"
    node = w.store.get_node("dev-1")
    assert node is not None and node.online and node.last_status is not None and node.last_status["m"] == 2**63 - 1


def _tampered(payload: bytes, **header: Any) -> bytes:
    outer = cbor2.loads(payload)
    h = cbor2.loads(outer["h"])
    h.update(header)
    return cbor2.dumps({**outer, "h": cbor2.dumps(h)})


def test_rejection_notices_for_unauthenticated_rejections(w: World) -> None:
    dev = w.nodes["dev-1"]
    topic, payload = dev.telemetry([{"t": 1}])
    seq = cbor2.loads(cbor2.loads(payload)["h"])["seq"]
    flipped = payload[:-1] + bytes([payload[-1] ^ 1])
    stranger = Node(Identity.generate("dev-x", "lab", "device"), w.cloud, w.clock)
    s_topic, s_payload = stranger.telemetry([{"t": 1}])
    inputs = [
        (topic, flipped),  # forged
        (topics.telemetry("home", "dev-2", "env"), payload),  # topic_mismatch
        (topic, _tampered(payload, to="gw-1")),  # wrong_recipient
        (topic, _tampered(payload, v=2)),  # version
        (topic, _tampered(payload, id=b"short")),  # malformed, but the header names (from, seq)
        (topic, b"\xff not cbor"),  # malformed with no header: nobody to tell
        (topic, _tampered(payload, seq=2**64)),  # malformed, seq out of range: no notice
        (topic, _tampered(payload, v=2, **{"from": "bad/name"})),  # a sender that is no node name: no notice
        ("not/a/cws/topic", flipped),  # no site to tell
        (s_topic, s_payload),  # unknown_sender: no notice (it may be registered later)
        (topic, payload),  # stored
        (topic, payload),  # replay: acked as stored, no notice
    ]
    batch = w.ingest.handle_batch(inputs)
    reasons = [r.reason for r in batch.results]
    assert reasons == [
        "forged", "topic_mismatch", "wrong_recipient", "version", "malformed", "malformed", "malformed",
        "version", "forged", "unknown_sender", None, "replay",
    ]
    assert [r[:4] for r in batch.rejections] == [
        ("home", "dev-1", seq, "forged"),
        ("home", "dev-1", seq, "topic_mismatch"),
        ("home", "dev-1", seq, "wrong_recipient"),
        ("home", "dev-1", seq, "version"),
        ("home", "dev-1", seq, "malformed"),
    ]
    # each notice names the exact refused payload, so a gateway never deletes a genuine twin
    assert all(len(r[4]) == 16 for r in batch.rejections) and len({r[4] for r in batch.rejections}) == 5
    assert batch.acks == [("home", "dev-1", seq)] * 2


def test_header_seq_bignum_is_not_recorded(w: World) -> None:
    topic, payload = w.nodes["dev-1"].telemetry([{"t": 1}])
    good = w.nodes["dev-1"].telemetry([{"t": 2}])
    batch = w.ingest.handle_batch([(topic, _tampered(payload, seq=10**5000)), good])
    assert [r.reason for r in batch.results] == ["malformed", None]
    (ev,) = w.rejection_events()
    assert ev.source == "dev-1" and "seq" not in ev.data and batch.rejections == []


def test_ack_coalescer_ranges() -> None:
    c = AckCoalescer(max_ranges=3)
    assert not c
    for s in (3, 1, 2, 5, 7, 8, 2):
        c.add("home", "dev-1", s)
    c.add("home", "dev-2", 10)
    c.add("lab", "dev-9", 4)
    assert c
    out = c.drain()
    assert out == {
        "home": [{"acks": [["dev-1", 1, 3], ["dev-1", 5, 5], ["dev-1", 7, 8]]}, {"acks": [["dev-2", 10, 10]]}],
        "lab": [{"acks": [["dev-9", 4, 4]]}],
    }
    assert not c and c.drain() == {}
    c.add_ranges("home", {"acks": [["dev-1", 4, 6]]})
    c.add("home", "dev-1", 7)
    assert c.drain() == {"home": [{"acks": [["dev-1", 4, 7]]}]}


def test_ack_coalescer_notice_carries_the_payload_digest() -> None:
    c = AckCoalescer()
    d = payload_digest(b"payload")
    assert len(d) == 16 and c.reject("home", "dev-1", 3, "forged", d)
    body = c.drain()["home"][0]
    assert body["rejected"] == [["dev-1", 3, "forged", d]]
    c.add_ranges("home", body)  # put back whole, digest included
    assert c.drain()["home"][0]["rejected"] == [["dev-1", 3, "forged", d]]


def test_ack_coalescer_rejection_notices() -> None:
    c = AckCoalescer(max_ranges=3, max_rejections=4)
    c.reject("lab", "dev-9", 7, "forged")
    assert c  # notices alone are worth a flush
    assert c.drain() == {"lab": [{"acks": [], "rejected": [["dev-9", 7, "forged"]]}]}
    for s in (1, 2, 4, 6):
        c.add("home", "dev-1", s)
    for seq, reason in ((9, "forged"), (3, "version"), (9, "forged"), (5, "topic_mismatch")):
        assert c.reject("home", "dev-1", seq, reason)
    assert c.reject("home", "dev-2", 1, "malformed")
    assert not c.reject("home", "dev-2", 2, "malformed")  # bounded per site; dropped
    assert c.reject("home", "dev-2", 1, "malformed")  # already pending: fine
    out = c.drain()
    # at most max_ranges entries per body, ranges first, then the notices
    assert out == {
        "home": [
            {"acks": [["dev-1", 1, 2], ["dev-1", 4, 4], ["dev-1", 6, 6]]},
            {"acks": [],
             "rejected": [["dev-1", 3, "version"], ["dev-1", 5, "topic_mismatch"], ["dev-1", 9, "forged"]]},
            {"acks": [], "rejected": [["dev-2", 1, "malformed"]]},
        ]
    }
    assert not c
    # an unsent body goes back whole
    c.add_ranges("home", out["home"][1])
    c.add("home", "dev-1", 10)
    assert c.drain() == {
        "home": [{"acks": [["dev-1", 10, 10]], "rejected": [["dev-1", 3, "version"], ["dev-1", 5, "topic_mismatch"]]},
                 {"acks": [], "rejected": [["dev-1", 9, "forged"]]}]
    }


def test_rejection_log_bounded_by_key() -> None:
    log = RejectionLog(interval=10)
    assert log.record(0, source=None, reason="forged", topic="t", detail="d") is not None
    for i in range(1000):
        assert log.record(1 + i / 1000, source=None, reason="forged", topic=f"t{i}", detail="d") is None
    assert len(log._windows) == 1
    (summary,) = log.flush(20)
    assert summary.data["count"] == 1000 and summary.data["topic"] == "t999"
    assert log.flush(40) == [] and log._windows == {}


def test_bookkeeping_failure_after_commit_keeps_the_batch_outcome(w: World, monkeypatch) -> None:  # noqa: ANN001
    def broken(events):  # noqa: ANN001, ANN202
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(w.store, "add_events", broken)
    batch = w.ingest.handle_batch([w.nodes["dev-1"].status("birth", will_seq=1)])
    assert [r.status for r in batch.results] == ["stored"]
    assert batch.births == ["dev-1"] and len(batch.acks) == 1  # not lost: a retry would see a duplicate
    node = w.store.get_node("dev-1")
    assert node is not None and node.online


# ---- results in parts (protocol §3, "Parts") ---------------------------------------------------------


def _parted(w: World, result: dict[str, Any]) -> tuple[Any, list[tuple[str, bytes]], tuple[str, bytes]]:
    """A direct task for dev-1 and dev-1's sealed messages: its result's parts, then the final result."""
    from cwsnet import parts

    task = w.store.create_task(target="dev-1", handler="echo", args={})
    dev, topic = w.nodes["dev-1"], topics.task_result("home", "dev-1")
    ref, ps = parts.split(result)
    msgs = [(topic, dev.seal(topic, "task_result", {"task_id": task.id, "part": p.body()})) for p in ps]
    final = (topic, dev.seal(topic, "task_result", {"task_id": task.id, "state": "succeeded", "result": None,
                                                     "result_ref": ref.body(), "finished": 9}))
    return task, msgs, final


def test_a_result_in_parts_is_stored_whole_when_its_final_comes_after_them(w: World) -> None:
    result = {"image": random.Random(3).randbytes(700_000), "n": 1}
    task, ps, final = _parted(w, result)
    b = w.ingest.handle_batch(ps)
    assert [r.status for r in b.results] == ["stored"] * 6 and not b.for_apps  # parts alone: nothing to take yet
    assert w.store.get_task(task.id).state == "queued"  # type: ignore[union-attr]
    b = w.ingest.handle_batch([final])
    t = w.store.get_task(task.id)
    assert t is not None and t.state == "succeeded" and t.finished == 9
    assert t.result == {"image": __import__("base64").b64encode(result["image"]).decode(), "n": 1}
    assert [c["task"]["state"] for c in b.changes if c["type"] == "task"] == ["succeeded"]
    # the task service gets the final's body whole (a scheduled task's result goes to its scheduler so)
    (item, body), = b.for_apps
    assert body["result"] == result and "result_ref" not in body
    assert w.store.db.conn.execute("select count(*) from parts").fetchone()[0] == 0  # forgotten once used


def test_a_final_that_overtakes_its_parts_waits_for_them_even_across_a_restart(w: World, tmp_path: Path) -> None:
    result = {"log": "x" * 400_000}
    task, ps, final = _parted(w, result)
    assert len(ps) == 4
    b = w.ingest.handle_batch([ps[0], final, *ps[2:]])
    assert [r.status for r in b.results] == ["stored"] * 4 and b.acks  # acked: kept until whole
    assert w.store.get_task(task.id).state == "queued"  # type: ignore[union-attr]
    w.store.close()
    w.store = SqliteStore(tmp_path / "cloud.db")
    w.ingest = Ingest(w.endpoint, w.store, w.metrics, directory=NodeDirectory(w.store, clock=w.mono), clock=w.clock,
                      offline_after=60)
    b = w.ingest.handle_batch([ps[1]])  # the last part completes the waiting final
    t = w.store.get_task(task.id)
    assert t is not None and t.state == "succeeded" and t.result == result
    (item, body), = b.for_apps
    assert item.kind == "task_result" and body["state"] == "succeeded" and body["result"] == result
    assert w.ingest.handle_batch([ps[1]]).results[0].status == "duplicate"  # a repeat changes nothing


def test_parts_that_do_not_make_the_result_fail_the_task_saying_so(w: World) -> None:
    from cwsnet import parts

    task, ps, final = _parted(w, {"log": "y" * 300_000})
    dev, topic = w.nodes["dev-1"], topics.task_result("home", "dev-1")
    wrong = parts.split({"log": "z" * 300_000})[1][0]  # a part of another blob, under this one's name
    forged = parts.Part(parts.split({"log": "y" * 300_000})[0].sha256, 0, 3, wrong.data)
    w.ingest.handle_batch([(topic, dev.seal(topic, "task_result", {"task_id": task.id, "part": forged.body()})),
                           ps[1], ps[2]])
    w.ingest.handle_batch([final])
    t = w.store.get_task(task.id)
    assert t is not None and t.state == "failed" and "did not arrive whole from dev-1" in (t.error or "")
    assert "SHA-256" in (t.error or "")


def test_another_nodes_parts_never_complete_a_result(w: World) -> None:
    task, ps, final = _parted(w, {"log": "q" * 300_000})
    dev2, topic2 = w.nodes["dev-2"], topics.task_result("home", "dev-2")
    from cwsnet import parts

    for p in parts.split({"log": "q" * 300_000})[1]:  # dev-2 sends the very same parts
        w.ingest.handle_batch([(topic2, dev2.seal(topic2, "task_result", {"task_id": task.id, "part": p.body()}))])
    w.ingest.handle_batch([final])
    assert w.store.get_task(task.id).state == "queued"  # type: ignore[union-attr]
    w.ingest.handle_batch(ps)
    assert w.store.get_task(task.id).state == "succeeded"  # type: ignore[union-attr]


@pytest.mark.parametrize(("body", "why"), [
    ({"task_id": "t", "part": {"blob": "a" * 64, "i": 3, "n": 2, "data": b"x"}}, "part.i must be 0..n-1"),
    ({"task_id": "t", "state": "failed", "result_ref": {"sha256": "a" * 64, "size": 10, "parts": 1}},
     "result_ref' goes only with state succeeded"),
    ({"task_id": "t", "state": "succeeded", "result_ref": {"sha256": "a" * 64, "size": 10, "parts": 2}},
     "result_ref.parts must be"),
])
def test_a_bad_part_or_ref_is_stored_without_effect_and_counted_malformed(w: World, body: dict, why: str) -> None:
    topic = topics.task_result("home", "dev-1")
    r = w.ingest.handle(topic, w.nodes["dev-1"].seal(topic, "task_result", body))
    assert r.status == "rejected" and r.reason == "malformed" and why in (r.detail or "")


def test_two_tasks_with_the_same_big_result_interleaved_both_succeed(w: World) -> None:
    """A gateway's pool finishing two tasks with equal results at once interleaves their parts."""
    from cwsnet import parts

    result = {"log": "same" * 100_000}
    dev, topic = w.nodes["dev-1"], topics.task_result("home", "dev-1")
    ref, ps = parts.split(result)
    tasks = [w.store.create_task(target="dev-1", handler="echo", args={}) for _ in range(2)]
    msgs = []
    for p in ps:
        msgs += [(topic, dev.seal(topic, "task_result", {"task_id": t.id, "part": p.body()})) for t in tasks]
    msgs += [(topic, dev.seal(topic, "task_result", {"task_id": t.id, "state": "succeeded", "result": None,
                                                      "result_ref": ref.body()})) for t in tasks]
    w.ingest.handle_batch(msgs)
    assert [w.store.get_task(t.id).result for t in tasks] == [result, result]  # type: ignore[union-attr]


def test_a_result_whose_parts_never_all_come_fails_its_task_after_a_day(w: World) -> None:
    task, ps, final = _parted(w, {"log": "z" * 300_000})
    w.ingest.handle_batch([ps[0], final])  # the rest never comes
    assert w.store.get_task(task.id).state == "queued"  # type: ignore[union-attr]
    assert w.store.prune_parts(w.clock() + 3600) == []  # an hour: it still waits
    (sender, body), = w.store.prune_parts(w.clock() + 25 * 3600)
    t = w.store.get_task(task.id)
    assert t is not None and t.state == "failed" and "never all came from dev-1" in (t.error or "")
    assert sender == "dev-1" and body["state"] == "failed" and body["task_id"] == task.id
