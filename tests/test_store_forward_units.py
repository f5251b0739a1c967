"""Units of the store-and-forward work: the agent's delivery ledger, the gateway's command store,
the uplink outbox's byte accounting, the clear `exp` header, receipt topics and gateway keys in
bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cwsnet import envelope, topics
from cwsnet.bundle import Bundle
from cwsnet.endpoint import Endpoint
from cwsnet.errors import ConfigError, MalformedEnvelope
from cwsnet.homelab import HomeLab, Topology
from cwsnet.identity import Identity
from cwsnet.replay import SeqCounter
from edge_agent.outbox import AgentOutbox
from gateway.downlink import DownlinkStore
from gateway.outbox import UplinkOutbox


def test_ledger_records_held_acked_and_dropped_and_survives_reopen(tmp_path: Path) -> None:
    ob = AgentOutbox(tmp_path / "o.db", max_messages=10)
    for seq in range(1, 11):
        ob.add(seq, "t", b"x", False, "telemetry")
    assert ob.remove_many([1, 2, 99]) == [1, 2]  # 99 was never held
    assert ob.add(11, "t", b"x", False, "task_result") and ob.add(12, "t", b"x", False, "event")
    assert ob.add(13, "t", b"x", False, "task_result")  # full: the oldest telemetry (3) goes
    assert ob.take_dropped() == [3] and ob.take_dropped() == []
    ob.close()
    again = AgentOutbox(tmp_path / "o.db", max_messages=10)
    led = {seq: outcome for seq, _kind, outcome in again.ledger()}
    assert led[1] == led[2] == "acked" and led[3] == "dropped"
    assert all(led[s] == "held" for s in range(4, 14))
    assert again.seqs_between(5, 7) == [5, 6, 7]
    assert [h.seq for h in again.get([13, 4, 1])] == [4, 13]


def test_ledger_is_pruned_to_its_bound_but_never_forgets_held_messages(tmp_path: Path) -> None:
    ob = AgentOutbox(tmp_path / "o.db", max_messages=5000, ledger_keep=100)
    for seq in range(1, 2502):
        ob.add(seq, "t", b"x", False, "telemetry")
        if seq > 10:
            ob.remove(seq)
    led = ob.ledger()
    assert {s for s, _k, o in led if o == "held"} == set(range(1, 11))  # never pruned
    assert len(led) < 100 + 10 + 1000  # pruned every 1,000 adds down to ledger_keep


def test_downlink_store_holds_until_receipt_or_expiry(tmp_path: Path) -> None:
    st = DownlinkStore(tmp_path / "d.db")
    assert st.add("dev-1", 5, "cmd/1", b"a", expires=100.0, now=0.0)
    assert not st.add("dev-1", 5, "cmd/1", b"a", expires=100.0, now=1.0)  # a redelivery: held once
    assert st.add("dev-1", 6, "cmd/1", b"b", expires=10.0, now=0.0)
    assert st.add("dev-2", 7, "cmd/2", b"c", expires=100.0, now=0.0)
    assert [c.seq for c in st.for_node("dev-1", now=5.0)] == [5, 6]
    assert [c.seq for c in st.for_node("dev-1", now=20.0)] == [5]  # 6 has expired
    st.delivered([("dev-1", 5)], now=30.0)
    assert [(c.node, c.seq) for c in st.undelivered_since(25.0, now=30.0)] == [("dev-2", 7)]
    assert st.expire(now=50.0) == [("dev-1", 6)]
    assert st.received("dev-1", [(1, 5)]) == 1 and st.received("dev-2", [(8, 9)]) == 0
    st.close()
    again = DownlinkStore(tmp_path / "d.db")
    assert again.depth() == 1 and [c.seq for c in again.for_node("dev-2", now=0.0)] == [7]


def test_uplink_outbox_counts_bytes_through_add_ack_reject_and_reopen(tmp_path: Path) -> None:
    ob = UplinkOutbox(tmp_path / "u.db")
    ob.add_many([("d", 1, "t", b"x" * 10, False), ("d", 2, "t", b"y" * 20, False), ("d", 1, "t", b"x" * 10, False)])
    assert (ob.depth(), ob.size()) == (2, 30)
    assert ob.ack([("d", 1, 1)]) == 1 and ob.size() == 20
    ob.close()
    again = UplinkOutbox(tmp_path / "u.db")
    assert (again.depth(), again.size()) == (1, 20)


def test_exp_header_is_clear_bound_and_checked() -> None:
    a, b = Identity.generate("dev-1", "home", "device"), Identity.generate("cloud", "home", "cloud")
    keys = {"dev-1": a.public_key, "cloud": b.public_key}
    cloud = Endpoint(b, SeqCounter(1, lambda m: None), keys.get)
    dev = Endpoint(a, SeqCounter(1, lambda m: None), keys.get)
    topic = topics.task_cmd("home", "dev-1")
    payload, header = cloud.seal(topic, "task_cmd", {"task_id": "t"}, to="dev-1", expires=1_800_000_000_000)
    assert envelope.peek_header(payload).expires == 1_800_000_000_000  # a gateway reads it without the key
    assert dev.open(payload, topic).header.expires == 1_800_000_000_000
    without, _ = cloud.seal(topic, "task_cmd", {}, to="dev-1")
    assert envelope.peek_header(without).expires is None
    bad = envelope.Header(id=b"\0" * 16, sender="cloud", recipient="dev-1", seq=1, ts=1, kind="task_cmd",
                          expires=2**63)
    with pytest.raises(MalformedEnvelope, match="exp"):
        envelope.peek_header(envelope.seal(topic=topic, header=bad, body={}, sender_key=b.secret_key,
                                           recipient_key=a.public_key))


def test_receipt_topic_is_a_local_channel() -> None:
    t = topics.receipt("home", "dev-1")
    assert t == "cws/v1/home/dev-1/receipt"
    parts = topics.parse(t)
    assert parts.channel == "receipt" and not parts.uplink
    assert topics.site_filter("home", "receipt") == "cws/v1/home/+/receipt"


def test_homelab_bundles_name_the_gateway_and_its_key(tmp_path: Path) -> None:
    lab = HomeLab(tmp_path / "lab")
    lab.init(Topology(devices=["dev-1"]))
    dev, gw = Bundle.load(lab.bundle_path("dev-1")), Bundle.load(lab.bundle_path("gw-home"))
    assert dev.gateway == "gw-home" and dev.gateway_public_key == gw.identity.public_key
    assert set(dev.peer_keys()) == {"cloud", "gw-home"}
    assert gw.gateway is None and set(gw.peer_keys()) == {"cloud"}


def test_bundle_with_half_a_gateway_is_refused(tmp_path: Path) -> None:
    lab = HomeLab(tmp_path / "lab")
    lab.init(Topology(devices=["dev-1"]))
    p = lab.bundle_path("dev-1")
    d = json.loads(p.read_text())
    del d["gateway_public_key"]
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="gateway_public_key"):
        Bundle.load(p)


def test_seq_counter_on_a_full_disk_hands_out_only_values_the_wall_clock_covers() -> None:
    from cwsnet.replay import SeqCounter

    def full(_mark: int) -> None:
        raise OSError("database or disk is full")

    wall = [10_000]
    c = SeqCounter(5_000, full, block=10, wall_ms=lambda: wall[0])
    # each value is more than a second below the wall clock, which a restart starts above
    assert [c.next() for _ in range(3)] == [5_000, 5_001, 5_002]
    stuck = SeqCounter(9_500, full, block=10, wall_ms=lambda: wall[0])
    with pytest.raises(OSError):  # too close to the wall clock: nothing is handed out
        stuck.next()
    assert stuck.peek == 9_500
    with pytest.raises(OSError):  # without a wall clock, a failed reservation always refuses
        SeqCounter(1, full).next()


def test_refused_messages_leave_the_window_and_urgent_ones_pass_a_pause() -> None:
    from cwsnet.custody import SendWindow

    w = SendWindow(window=2, retransmit_after=5.0)
    w.sent([1, 2], 0.0)  # bulk telemetry fills the window
    w.pause(1.0, 3.0)  # the gateway is near its limit ...
    w.refused([1, 2])  # ... and refused both
    assert w.inflight == {} and w.deferred == {1: 4.0, 2: 4.0}
    # during the pause: refused ones wait, new telemetry waits, a status (urgent) goes
    assert w.due([1, 2, 3, 4], 2.0, urgent={4}) == [4]
    assert w.next_wakeup(2.0) == 2.0
    # when the pause ends, the refused ones go first, within the window
    w.sent([4], 2.0)
    assert w.due([1, 2, 3], 4.0) == [1]
    w.acked([4])
    assert w.due([1, 2, 3], 4.0) == [1, 2] and w.deferred == {1: 4.0, 2: 4.0}
    w.sent([1, 2], 4.0)
    assert w.deferred == {}


def test_busy_body_names_the_refused_seqs_and_survives_put_back() -> None:
    from cwsnet.custody import CustodyAcks

    acks = CustodyAcks(busy_for=2.0)
    acks.stored("dev-1", 7)
    for seq in (8, 9, 11):
        acks.refused("dev-1", seq)
    [(device, body)] = acks.drain()
    assert device == "dev-1" and body == {"custody": [[7, 7]], "busy": 2.0, "refused": [[8, 9], [11, 11]]}
    acks.put_back(device, body)
    assert acks.drain() == [("dev-1", body)]
