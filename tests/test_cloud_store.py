"""cloud.store.SqliteStore: exactly-once ingest, status rules, task transitions, paging, counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.store import (
    TASK_TRANSITIONS,
    IngestItem,
    NewEvent,
    Reading,
    SqliteStore,
    StatusUpdate,
    TaskReport,
)
from cwsnet.replay import SeqCounter

KEY = "A" * 43 + "="  # any base64 text; the store does not parse keys


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "cloud.db")
    yield s
    s.close()


def telemetry_item(seq: int, sender: str = "dev-1", n: int = 2, received: int = 1000) -> IngestItem:
    return IngestItem(
        sender=sender,
        seq=seq,
        msg_id=f"{seq:032x}",
        kind="telemetry",
        topic=f"cws/v1/home/{sender}/telemetry/env",
        ts=seq * 10,
        received=received,
        stream="env",
        readings=tuple(Reading(ts=seq * 10 + i, values={"t": 20.0 + i, "ok": True}) for i in range(n)),
    )


def status_item(seq: int, kind: str, *, will_seq: int | None = None, received: int = 1000) -> IngestItem:
    online = kind != "death"
    return IngestItem(
        sender="dev-1",
        seq=seq,
        msg_id=f"{seq:032x}",
        kind=kind,
        topic="cws/v1/home/dev-1/status",
        ts=seq,
        received=received,
        status=StatusUpdate(
            kind=kind,  # type: ignore[arg-type]
            online=online,
            body={"state": "online" if online else "offline", "uptime": float(seq)},
            will_seq=will_seq,
            agent={"version": "0.1", "kind": "cpython"} if kind == "birth" else None,
        ),
    )


def test_wal_mode_and_schema(store: SqliteStore) -> None:
    assert store.db.journal_mode == "wal"
    assert {"nodes", "messages", "telemetry", "events", "tasks", "counters"} <= set(store.db.table_names())
    assert store.db["messages"].pks == ["sender", "seq"]


def test_exactly_once_under_redelivery(store: SqliteStore) -> None:
    store.upsert_node("dev-1", site="home", role="device", public_key=KEY)
    first = store.ingest_batch([telemetry_item(1), telemetry_item(2), telemetry_item(1)])
    assert [o.outcome for o in first] == ["stored", "stored", "duplicate"]
    for _ in range(5):
        again = store.ingest_batch([telemetry_item(2), telemetry_item(1), telemetry_item(3)])
        assert [o.outcome for o in again][:2] == ["duplicate", "duplicate"]
    assert store.message_count("dev-1") == 3
    rows = store.telemetry("dev-1", limit=100)
    assert len(rows) == 6
    assert [(r.seq, r.idx) for r in rows] == [(3, 1), (3, 0), (2, 1), (2, 0), (1, 1), (1, 0)]
    assert rows[0].values == {"t": 21.0, "ok": True}


def test_batch_is_one_transaction(store: SqliteStore) -> None:
    bad = IngestItem(
        sender="dev-1", seq=2, msg_id="2" * 32, kind="telemetry", topic="cws/v1/home/dev-1/telemetry/env",
        ts=1, received=1, stream="env", readings=(Reading(ts=1, values={"x": float("nan")}),),  # JSON refuses NaN
    )
    with pytest.raises(ValueError):
        store.ingest_batch([telemetry_item(1), bad])
    assert store.message_count() == 0, "a failed batch must leave nothing behind"
    assert [o.outcome for o in store.ingest_batch([telemetry_item(1)])] == ["stored"]


def test_telemetry_stream_filter_and_limit(store: SqliteStore) -> None:
    other = IngestItem(
        sender="dev-1", seq=9, msg_id="9" * 32, kind="telemetry", topic="cws/v1/home/dev-1/telemetry/power",
        ts=5, received=1, stream="power", readings=(Reading(ts=999_999, values={"w": 3}),),
    )
    store.ingest_batch([telemetry_item(1), telemetry_item(2), other])
    assert [r.stream for r in store.telemetry("dev-1", limit=1)] == ["power"]
    assert {r.stream for r in store.telemetry("dev-1", stream="env")} == {"env"}
    assert len(store.telemetry("dev-1", stream="env", limit=3)) == 3
    assert store.telemetry("nobody") == []


def test_status_birth_death_and_stale_will(store: SqliteStore) -> None:
    store.upsert_node("dev-1", site="home", role="device", public_key=KEY)
    # connection 1: will reserved at seq 10, birth 11, status 12
    out = store.ingest_batch([status_item(11, "birth", will_seq=10), status_item(12, "status")])
    assert [o.node_changed for o in out] == [True, True]
    node = store.get_node("dev-1")
    assert node is not None and node.online and node.will_seq == 10 and node.birth_seq == 11
    assert node.agent == {"version": "0.1", "kind": "cpython"}
    # an older status arriving late changes nothing
    assert store.ingest_batch([status_item(5, "status")])[0].node_changed is False
    # the death (seq 10 = announced will_seq) is accepted after later seqs and takes the node offline
    out = store.ingest_batch([status_item(10, "death", received=2000)])
    assert out[0].outcome == "stored" and out[0].node_changed
    node = store.get_node("dev-1")
    assert node is not None and not node.online and node.last_seen == 2000
    # accepted once
    assert store.ingest_batch([status_item(10, "death")])[0].outcome == "duplicate"
    # connection 2 (will 20, birth 21); the will of connection 1 re-delivered is stale
    store.ingest_batch([status_item(21, "birth", will_seq=20)])
    store.ingest_batch([status_item(10, "death")])
    node = store.get_node("dev-1")
    assert node is not None and node.online


def test_task_transitions(store: SqliteStore) -> None:
    t = store.create_task(target="dev-1", handler="echo", args={"a": 1}, now=100)
    assert t.state == "queued" and t.created == t.updated == 100 and t.args == {"a": 1}
    task, moved = store.update_task(t.id, "running", started=150, now=150)
    assert moved and task is not None and task.state == "running" and task.started == 150
    task, moved = store.update_task(t.id, "cancelled", now=160)
    assert not moved and task is not None and task.state == "running"
    task, moved = store.update_task(t.id, "succeeded", result={"a": 1}, finished=200, now=200)
    assert moved and task is not None and task.state == "succeeded" and task.result == {"a": 1}
    # a late "running" (or a second result) must not move it back
    for late in ("running", "failed", "expired", "cancelled"):
        task, moved = store.update_task(t.id, late, now=300)
        assert not moved and task is not None and task.state == "succeeded" and task.updated == 200
    assert store.update_task("nope", "running") == (None, False)
    with pytest.raises(ValueError):
        store.update_task(t.id, "queued")


@pytest.mark.parametrize("start", ["queued", "running", "succeeded", "failed", "expired", "cancelled"])
def test_transition_table(store: SqliteStore, start: str) -> None:
    for new, sources in TASK_TRANSITIONS.items():
        t = store.create_task(target="dev-1", handler="echo", args={})
        if start != "queued":
            path = {"running": ["running"], "succeeded": ["succeeded"], "failed": ["failed"],
                    "expired": ["expired"], "cancelled": ["cancelled"]}[start]
            for s in path:
                assert store.update_task(t.id, s)[1]
        _task, moved = store.update_task(t.id, new)
        assert moved == (start in sources), (start, new)


def test_task_report_from_other_node_ignored(store: SqliteStore) -> None:
    t = store.create_task(target="dev-1", handler="echo", args={})
    item = IngestItem(
        sender="dev-2", seq=1, msg_id="0" * 32, kind="task_result", topic="cws/v1/home/dev-2/task/result",
        ts=1, received=1, task=TaskReport(task_id=t.id, state="succeeded", result={"forged": True}),
    )
    out = store.ingest_batch([item])
    assert out[0].outcome == "stored" and out[0].task_state is None
    task = store.get_task(t.id)
    assert task is not None and task.state == "queued" and task.result is None


def test_paging_and_filters(store: SqliteStore) -> None:
    for i in range(25):
        store.upsert_node(f"dev-{i:02d}", site="home" if i % 2 else "lab", role="device", public_key=KEY)
    store.upsert_node("gw-1", site="home", role="gateway", public_key=KEY)
    page = store.list_nodes(role="device", limit=10, offset=20)
    assert page.total == 25 and [n.id for n in page.items] == [f"dev-{i:02d}" for i in range(20, 25)]
    assert store.list_nodes(role="device", site="home").total == 12
    assert store.list_nodes(role="gateway").total == 1
    assert store.list_nodes(role="device", online=True).total == 0
    assert store.count_nodes(role="device", online=False) == 25
    # re-registering keeps the row and updates the key
    store.upsert_node("dev-00", site="lab", role="device", public_key="B" * 43 + "=")
    assert store.node_keys()["dev-00"] == "B" * 43 + "="
    assert store.node_directory()["gw-1"].role == "gateway"
    with pytest.raises(ValueError):
        store.upsert_node("x", site="s", role="toaster", public_key=KEY)

    store.add_events([NewEvent(ts=1000 + i, source="dev-00", type="t", severity="info", message=f"e{i}") for i in range(30)])
    ev = store.list_events(limit=10, offset=5)
    assert ev.total == 30 and [e.message for e in ev.items] == [f"e{i}" for i in range(24, 14, -1)]
    assert store.list_events(since=1025).total == 5
    assert store.prune_events(keep=10) == 20 and store.list_events().total == 10

    for i in range(7):
        store.create_task(target="dev-01", handler="echo", args={"i": i}, now=i)
    tasks = store.list_tasks(limit=3, offset=1)
    assert tasks.total == 7 and [t.args["i"] for t in tasks.items] == [5, 4, 3]
    assert store.list_tasks(state="queued", target="dev-01").total == 7
    assert len(store.queued_tasks_for("dev-01")) == 7


def test_offline_sweep_and_overdue(store: SqliteStore) -> None:
    store.upsert_node("dev-1", site="home", role="device", public_key=KEY)
    store.ingest_batch([status_item(2, "birth", will_seq=1, received=1_000)])
    assert store.mark_offline(seen_before=500) == []
    assert store.mark_offline(seen_before=1_001) == ["dev-1"]
    assert store.mark_offline(seen_before=1_001) == []
    store.create_task(target="dev-1", handler="echo", args={}, deadline=50, now=0)
    store.create_task(target="dev-1", handler="echo", args={}, deadline=None, now=0)
    assert [t.deadline for t in store.overdue_tasks(now=100)] == [50]


def test_counter_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    s = SqliteStore(path)
    counter = SeqCounter(s.get_counter("seq") or 0, lambda m: s.set_counter("seq", m), block=10)
    seen = [counter.next() for _ in range(15)]
    s.close()  # "crash" after 15 values
    s2 = SqliteStore(path)
    counter2 = SeqCounter(s2.get_counter("seq") or 0, lambda m: s2.set_counter("seq", m), block=10)
    assert counter2.next() > max(seen)
    s2.close()


def test_upsert_node_validates(store: SqliteStore) -> None:
    from cwsnet.errors import ConfigError, TopicError

    with pytest.raises(TopicError):
        store.upsert_node("bad/id", site="home", role="device", public_key=KEY)
    with pytest.raises(TopicError):
        store.upsert_node("dev-1", site="+", role="device", public_key=KEY)
    with pytest.raises(ConfigError, match="public_key"):
        store.upsert_node("dev-1", site="home", role="device", public_key="c2hvcnQ=")
    assert store.get_node("dev-1") is None


def test_import_registry(store: SqliteStore, tmp_path: Path) -> None:
    import json

    from cloud.store import import_registry
    from cwsnet.errors import ConfigError

    reg = tmp_path / "registry.json"
    entries = [
        {"id": "gw-home", "site": "home", "role": "gateway", "public_key": KEY},
        {"id": "dev-1", "site": "home", "role": "device", "public_key": KEY},
    ]
    reg.write_text(json.dumps(entries))
    assert [n.id for n in import_registry(store, reg)] == ["gw-home", "dev-1"]
    assert [n.id for n in import_registry(store, reg)] == ["gw-home", "dev-1"]  # idempotent
    assert store.list_nodes().total == 2
    reg.write_text(json.dumps([*entries, {"id": "dev-2", "site": "home", "role": "device"}]))
    with pytest.raises(ConfigError, match=r"entry 2: missing or non-text field\(s\) public_key"):
        import_registry(store, reg)
    reg.write_text(json.dumps([{"id": "dev 3", "site": "home", "role": "device", "public_key": KEY}]))
    with pytest.raises(ConfigError, match=r"entry 0: node id 'dev 3' is not a valid name"):
        import_registry(store, reg)
    reg.write_text("[")
    with pytest.raises(ConfigError, match="registry.json:1:2: registry is not valid JSON"):
        import_registry(store, reg)
    with pytest.raises(ConfigError, match="not found"):
        import_registry(store, tmp_path / "missing.json")
