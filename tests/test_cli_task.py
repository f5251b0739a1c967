"""`cwsnet task run|list|show|cancel` and `cwsnet node list|drain|undrain` (issue 7), run as processes
against one real cloud (module-scoped); tasks without a target run on the cloud's own workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.deploy import Deployment, get, post
from harness.proc import ProcessSet
from harness.wait import wait_for

pytestmark = pytest.mark.integration

ENV = {k: v for k, v in os.environ.items()
       if k not in ("CWSNET_URL", "CWSNET_TOKEN", "CWSNET_TOKEN_FILE", "CWSNET_CA_FILE")}


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("cli-task")
    procs = ProcessSet(tmp / "logs")
    failed = request.session.testsfailed
    try:
        dep = Deployment(tmp, procs, devices=1)
        dep.start_cloud()
        yield dep
    finally:
        if request.session.testsfailed > failed and len(procs):
            print(procs.tails(60))
        procs.close()


def cli(d: Deployment | None, *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    conn = ["--url", d.base, "--token-file", str(d.token_file)] if d is not None else []
    return subprocess.run([sys.executable, "-m", "cwsnet", *argv, *conn], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd, timeout=timeout)


def ok(d: Deployment, *argv: str) -> str:
    r = cli(d, *argv)
    assert r.returncode == 0, (argv, r.stdout, r.stderr)
    return r.stdout


def task(d: Deployment, tid: str) -> dict[str, Any]:
    return get(f"{d.base}/api/v1/tasks/{tid}")


def error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one error line on stderr (argparse prints its usage first)."""
    lines = r.stderr.strip().splitlines()
    assert lines and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


def test_run_wait_prints_the_result_and_typed_args(d: Deployment) -> None:
    r = cli(d, "task", "run", "echo", "--arg", "x=1", "--arg", "name=kitchen", "--arg", 'tags=["a", 2]',
            "--arg", "on=true", "--arg", "text=1 2", "--wait", "20")
    assert r.returncode == 0, r.stderr
    first, *_, result = r.stdout.strip().splitlines()
    tid = first.split()[1]
    assert first == f"task {tid} queued"
    assert f"task {tid} succeeded on cloud" in r.stdout
    want = {"x": 1, "name": "kitchen", "tags": ["a", 2], "on": True, "text": "1 2"}
    assert result.startswith("result: ") and json.loads(result.removeprefix("result: ")) == want
    assert task(d, tid)["args"] == want
    # --args-json, overridden key by key by --arg; --json --wait prints the finished task
    r = cli(d, "task", "run", "echo", "--args-json", '{"a": 1, "b": 2}', "--arg", "b=3", "--wait", "20", "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    assert t["state"] == "succeeded" and t["result"] == {"a": 1, "b": 3} and t["kind"] == "scheduled"


def test_run_wait_exits_1_with_the_error_when_the_task_does_not_succeed(d: Deployment) -> None:
    r = cli(d, "task", "run", "sleep", "--arg", "seconds=soon", "--max-attempts", "1", "--wait", "20")
    assert r.returncode == 1, (r.stdout, r.stderr)
    tid = r.stdout.split()[1]
    assert any(line.startswith(f"task {tid} failed") for line in r.stdout.splitlines()), r.stdout
    assert 'error: failed on cloud: sleep needs args {"seconds"' in r.stdout  # a TaskFailed: no traceback
    # no executor offers this handler: refused at once, naming what is offered
    r = cli(d, "task", "run", "no-such-handler", "--timeout", "1", "--wait", "20")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no executor offers 'no-such-handler'" in r.stderr and "echo" in r.stderr
    # a task that times out while queued: expired (the cloud is drained, so nothing takes it)
    ok(d, "node", "drain", "cloud")
    try:
        r = cli(d, "task", "run", "echo", "--timeout", "1", "--wait", "20")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "expired" in r.stdout and "error: deadline" in r.stdout and "while queued" in r.stdout
    finally:
        ok(d, "node", "undrain", "cloud")
    # --wait SECONDS runs out first: the task goes on, exit 1
    r = cli(d, "task", "run", "sleep", "--arg", "seconds=30", "--wait", "0.5")
    assert r.returncode == 1
    tid = r.stdout.split()[1]
    assert f"task {tid} is still" in r.stdout and "after 0.5 s" in r.stdout
    ok(d, "task", "cancel", tid)


def test_an_idempotency_key_submits_once(d: Deployment) -> None:
    first = ok(d, "task", "run", "echo", "--arg", "n=1", "--idempotency-key", "cli-key-1")
    tid = first.split()[1]
    assert first.strip() == f"task {tid} queued (scheduled)"
    again = ok(d, "task", "run", "echo", "--arg", "n=1", "--idempotency-key", "cli-key-1")
    assert again.split()[1] == tid and "already submitted" in again
    assert json.loads(ok(d, "task", "run", "echo", "--arg", "n=1", "--idempotency-key", "cli-key-1", "--json")) == {
        "id": tid, "state": "queued", "duplicate": True}
    # the same key for a different task: refused, naming the task the key belongs to
    r = cli(d, "task", "run", "echo", "--arg", "n=2", "--idempotency-key", "cli-key-1")
    assert r.returncode == 1 and f"was used for task {tid}" in r.stderr, r.stderr


def test_list_and_show(d: Deployment) -> None:
    tid = post(f"{d.base}/api/v1/tasks", {"handler": "echo", "args": {"k": "v"}, "priority": 7})["id"]
    wait_for(lambda: task(d, tid)["state"] == "succeeded", timeout=20, message="echo succeeded")
    items = json.loads(ok(d, "task", "list", "--json", "--limit", "5"))
    assert isinstance(items, list) and 1 <= len(items) <= 5
    assert items[0]["id"] == tid and {"id", "kind", "state", "handler", "node", "attempts", "created",
                                      "placement"} <= set(items[0])
    table = ok(d, "task", "list", "--state", "succeeded").splitlines()
    assert table[0].split() == ["ID", "KIND", "STATE", "HANDLER", "NODE", "ATTEMPTS", "AGE"]
    row = next(line for line in table if line.startswith(tid)).split()
    assert row[1:6] == ["scheduled", "succeeded", "echo", "cloud", "1"]
    assert all(line.split()[2] == "succeeded" for line in table[1:] if not line.startswith("("))
    assert ok(d, "task", "list", "--state", "cancelled", "--target", "dev-9").strip() == \
        "no tasks matching the filters"

    shown = json.loads(ok(d, "task", "show", tid, "--json"))
    assert shown == task(d, tid)
    text = ok(d, "task", "show", tid)
    assert text.startswith(f"task {tid} (scheduled)\n")
    assert "  state      succeeded\n" in text and '  result     {"k": "v"}\n' in text
    placement = text.split("placement:\n", 1)[1]
    assert placement.rstrip("\n") == shown["placement"].rstrip("\n")  # as the API explains it
    assert "RUN ON cloud cloud" in placement and "history:" in placement


def test_cancel_a_long_sleep(d: Deployment) -> None:
    tid = json.loads(ok(d, "task", "run", "sleep", "--arg", "seconds=60", "--json"))["id"]
    wait_for(lambda: task(d, tid)["state"] == "running", timeout=20, message="sleep running")
    out = ok(d, "task", "cancel", tid)
    assert out.startswith(f"task {tid} cancelled")
    assert task(d, tid)["state"] == "cancelled"
    wait_for(lambda: not any(tid in n["running"] for n in get(f"{d.base}/api/v1/nodes")), timeout=10,
             message="the cloud's worker let go of the task")
    r = cli(d, "task", "cancel", tid)
    assert r.returncode == 1 and error_line(r).startswith(f"cwsnet: error: POST /api/v1/tasks/{tid}/cancel: 409 ")


def test_node_list_drain_and_undrain(d: Deployment) -> None:
    nodes = json.loads(ok(d, "node", "list", "--json"))
    cloud = next(n for n in nodes if n["node"] == "cloud")
    assert cloud["tier"] == "cloud" and cloud["live"] and not cloud["draining"]
    table = ok(d, "node", "list").splitlines()
    assert table[0].split()[:7] == ["NODE", "TIER", "SITE", "LIVE", "DRAINING", "SLOTS", "RUNNING"]
    assert next(line for line in table if line.startswith("cloud ")).split()[:6] == \
        ["cloud", "cloud", "-", "yes", "no", str(cloud["slots"])]

    busy = json.loads(ok(d, "task", "run", "sleep", "--arg", "seconds=1.5", "--json"))["id"]
    wait_for(lambda: task(d, busy)["state"] == "running", timeout=20, message="sleep running")
    try:
        started = time.monotonic()
        out = ok(d, "node", "drain", "cloud", "--wait", "20")
        # it said what the node still ran, and returned once the sleep was over
        assert f"node cloud is draining: it gets no new work; it runs {busy}" in out
        assert out.strip().endswith("node cloud is drained: it runs nothing")
        assert task(d, busy)["state"] == "succeeded" and time.monotonic() - started < 15
        # a task submitted now waits: the drained cloud is held back
        tid = ok(d, "task", "run", "echo", "--arg", "late=1").split()[1]

        def held_back() -> str | None:
            text = ok(d, "task", "show", tid)
            return text if "cloud: draining" in text else None

        shown = wait_for(held_back, timeout=10, message="the scheduler held the drained cloud back")
        assert "  state      queued\n" in shown
        row = next(line for line in ok(d, "node", "list").splitlines() if line.startswith("cloud "))
        assert row.split()[3:5] == ["yes", "yes"]  # live, draining
    finally:
        out = ok(d, "node", "undrain", "cloud")
    assert out.startswith("node cloud takes new work again")
    done = wait_for(lambda: (t := task(d, tid))["state"] == "succeeded" and t, timeout=20, message="late echo")
    assert done["result"] == {"late": 1} and done["node"] == "cloud"
    r = cli(d, "node", "drain", "no-such-node")
    assert r.returncode == 1 and "404 not_found" in error_line(r) and "no-such-node" in error_line(r)


def test_bad_flags_and_credentials_are_one_clear_line(d: Deployment, tmp_path: Path) -> None:
    usage = [  # argparse: usage, then the error; exit 2
        (["task", "run", "echo", "--priority", "12"], "argument --priority: expected an integer 0..9, got 12"),
        (["task", "run", "echo", "--arg", "seconds"], "argument --arg: expected KEY=VALUE, got 'seconds'"),
        (["task", "run", "--wait", "echo"], "argument --wait: expected seconds (a number), got 'echo'"),
    ]
    for argv, message in usage:
        r = cli(d, *argv)
        assert r.returncode == 2 and message in error_line(r), (argv, r.stderr)
    r = cli(d, "task", "run", "echo", "--target", "dev-1", "--priority", "3")
    assert r.returncode == 2 and error_line(r).startswith("cwsnet: error: --priority: only for a scheduled task")
    r = cli(d, "task", "run", "echo", "--args-json", "[1]")
    assert r.returncode == 2 and "--args-json: expected a JSON object" in error_line(r)

    secret = "not-a-token-0123456789abcdef"
    bad = tmp_path / "bad.token"
    bad.write_text(secret + "\n")
    r = subprocess.run([sys.executable, "-m", "cwsnet", "task", "list", "--url", d.base, "--token-file", str(bad)],
                       capture_output=True, text=True, env=ENV, timeout=30)
    assert r.returncode == 2
    assert error_line(r).startswith(f"cwsnet: error: the API refused the token from {bad} (401)")
    assert secret not in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "cwsnet", "node", "list", "--url", d.base, "--token-file",
                        str(tmp_path / "missing.token")], capture_output=True, text=True, env=ENV, timeout=30)
    assert r.returncode == 2 and error_line(r).startswith(f"cwsnet: error: {tmp_path / 'missing.token'}: no such "
                                                          "token file")
    from harness.ports import free_port

    url = f"http://127.0.0.1:{free_port()}"
    r = subprocess.run([sys.executable, "-m", "cwsnet", "task", "list", "--url", url, "--token-file",
                        str(d.token_file)], capture_output=True, text=True, env=ENV, timeout=30)
    assert r.returncode == 1 and error_line(r).startswith(f"cwsnet: error: cannot reach the CWSNet API at {url}: ")
    r = cli(d, "task", "show", "0" * 32)
    assert r.returncode == 1 and error_line(r) == (f"cwsnet: error: GET /api/v1/tasks/{'0' * 32}: 404 not_found: "
                                                   f"task '{'0' * 32}' does not exist")
    help_text = " ".join(cli(None, "task", "run", "--help").stdout.split())
    assert "No --token flag on purpose: command lines leak into ps" in help_text and "$CWSNET_TOKEN" in help_text
    assert "Exit codes: 0 done; 1 " in help_text
    r = cli(d, "task", "list", "--token", secret)  # a token never goes on a command line
    assert r.returncode == 2 and "argument --token: a token is never taken on the command line" in error_line(r)
    assert secret not in r.stderr


def test_url_and_token_default_to_the_home_lab_and_the_environment(d: Deployment, tmp_path: Path) -> None:
    # --data-dir: the port from its config/cloud.yaml, the token from its admin.token
    r = subprocess.run([sys.executable, "-m", "cwsnet", "node", "list", "--data-dir", str(d.lab.dir)],
                       capture_output=True, text=True, env=ENV, timeout=30)
    assert r.returncode == 0 and "\ncloud " in r.stdout, r.stderr
    # ./cwsnet-data is the default data dir, as for `cwsnet up`
    (tmp_path / "cwsnet-data").symlink_to(d.lab.dir)
    r = subprocess.run([sys.executable, "-m", "cwsnet", "task", "list", "--limit", "1"], capture_output=True,
                       text=True, env=ENV, cwd=tmp_path, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("ID "), r.stderr
    # no lab: $CWSNET_URL and $CWSNET_TOKEN
    env = ENV | {"CWSNET_URL": d.base, "CWSNET_TOKEN": d.token_file.read_text().strip()}
    r = subprocess.run([sys.executable, "-m", "cwsnet", "task", "run", "echo", "--arg", "via=env", "--wait", "20",
                        "--data-dir", str(tmp_path / "nothing")], capture_output=True, text=True, env=env,
                       timeout=30)
    assert r.returncode == 0 and 'result: {"via": "env"}' in r.stdout, r.stderr
    env["CWSNET_TOKEN"] = "wrong"
    r = subprocess.run([sys.executable, "-m", "cwsnet", "task", "list", "--data-dir", str(tmp_path / "nothing")],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2 and "the API refused the token from $CWSNET_TOKEN (401)" in error_line(r)
