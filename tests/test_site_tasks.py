"""Site tasks at the gateway without processes: what a device's submission must look like (each
refusal names its field), stable task ids, and the store that keeps tasks across a restart without
reopening a finished one."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest

from cwsnet.scheduler import Task
from gateway.site_tasks import SiteTaskStore, SubmitError, parse_submission, task_id_for


def test_a_submission_becomes_a_task_of_its_device_with_a_stable_id() -> None:
    key, task, load = parse_submission({"key": "job-1", "handler": "sha256", "args": {"data": "aGk="},
                                        "priority": 7, "max_attempts": 2, "deadline": 1_900_000_000_000,
                                        "data_class": "camera", "requirements": {"capabilities": ["gpu"]},
                                        "load": {"cpu": 0.9}}, "dev-1", "home")
    assert key == "job-1" and load == {"cpu": 0.9}
    assert task.id == task_id_for("dev-1", "job-1") == task_id_for("dev-1", "job-1")
    assert task.id != task_id_for("dev-2", "job-1") and task.id.startswith("s-") and len(task.id) == 26
    assert (task.origin, task.site, task.origin_role, task.priority, task.max_attempts) == \
        ("dev-1", "home", "device", 7, 2)
    assert task.deadline == 1_900_000_000 and task.data_class == "camera"
    assert task.requirements.capabilities == frozenset({"gpu"})
    assert task.input_bytes == len(cbor2.dumps({"data": "aGk="}))
    assert task.idempotency_key == "dev-1/job-1"


@pytest.mark.parametrize(("body", "field"), [
    ({"handler": "echo"}, "key must be"),
    ({"key": "a b", "handler": "echo"}, "key must be"),
    ({"key": "k" * 129, "handler": "echo"}, "key must be"),
    ({"key": "k"}, "handler must be"),
    ({"key": "k", "handler": "echo", "args": [1]}, "args must be a map"),
    ({"key": "k", "handler": "echo", "priority": 10}, "priority must be"),
    ({"key": "k", "handler": "echo", "priority": True}, "priority must be"),
    ({"key": "k", "handler": "echo", "max_attempts": 0}, "max_attempts must be"),
    ({"key": "k", "handler": "echo", "deadline": -1}, "deadline must be"),
    ({"key": "k", "handler": "echo", "data_class": ""}, "data_class must be"),
    ({"key": "k", "handler": "echo", "requirements": {"capabilities": "gpu"}}, "requirements.capabilities"),
    ({"key": "k", "handler": "echo", "requirements": {"cpu": 2}}, "requirements.cpu must be between 0 and 1"),
    ({"key": "k", "handler": "echo", "load": 3}, "load must be"),
    ({"key": "k", "handler": "echo", "args": {"data": "x" * 200_000}}, "args are"),
    # what the cloud could not store if the task were offloaded there (review 11)
    ({"key": "k", "handler": "echo", "args": {"x": float("nan")}}, "args.x: nan is not a finite number"),
    ({"key": "k", "handler": "echo", "args": {"n": 2**64}}, "args.n: integer out of the signed 64-bit range"),
    ({"key": "k", "handler": "echo", "args": {1: "int key"}}, "args"),
    ("not a map", "must be a map"),
])
def test_a_bad_submission_is_refused_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(SubmitError, match=field.replace("(", r"\(")):
        parse_submission(body, "dev-1", "home")


def test_the_store_restores_open_tasks_and_never_reopens_a_finished_one(tmp_path: Path) -> None:
    store = SiteTaskStore(tmp_path / "site-tasks.db")
    _, t, _ = parse_submission({"key": "a", "handler": "echo"}, "dev-1", "home")
    _, u, _ = parse_submission({"key": "b", "handler": "echo"}, "dev-1", "home")
    store.save([(t.id, "dev-1", "a", "queued", cbor2.dumps(t.to_record())),
                (u.id, "dev-1", "b", "queued", cbor2.dumps(u.to_record()))], 1.0)
    done = t.to_record() | {"state": "succeeded"}
    store.save([(t.id, "dev-1", "a", "succeeded", cbor2.dumps(done))], 2.0)
    store.save([(t.id, "dev-1", "a", "running", cbor2.dumps(t.to_record()))], 3.0)  # a late record: ignored
    store.close()
    store = SiteTaskStore(tmp_path / "site-tasks.db")  # a restart
    assert store.get(t.id)["state"] == "succeeded"
    assert [Task.from_record(r).id for r in store.open_records()] == [u.id]
    assert store.sweep(2.5) == 1 and store.get(t.id) is None and store.get(u.id) is not None


def test_a_bignum_measurement_is_no_measurement_not_a_crash() -> None:
    from cwsnet.scheduler import executor_status

    st = executor_status("dev-1", "device", "home", {"slots": 2, "cpu": 2**1100, "battery": 2**1100})
    assert st is not None and st.cpu is None and st.battery is None and st.capacity == 2


def test_a_repeated_outcome_never_overwrites_the_first(tmp_path: Path) -> None:
    from edge_agent.submissions import Submissions

    subs = Submissions(tmp_path / "submissions.db")
    subs.add_new("dev-1", "job-1", "echo", {"x": 1})
    assert subs.done("job-1", "succeeded", {"x": 1}, None, "dev-2").state == "succeeded"
    assert subs.done("job-1", "failed", None, "submission refused", None) is None  # a late refusal, a repeat
    row = subs.get("job-1")
    assert (row.state, row.result, row.node) == ("succeeded", {"x": 1}, "dev-2")
