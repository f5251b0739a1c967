"""The ESP32 firmware end to end, on real MicroPython (unix port) against a real gateway and cloud.

Only the board's hardware is fake (``network``, ``machine``): the firmware talks MQTT over TLS
through real sockets to the gateway's amqtt broker, seals with its pure-MicroPython crypto, keeps
its buffer in real files, and the cloud stores and opens what it sends.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
from pathlib import Path

import pytest
from harness import ProcessSet, wait_for
from harness.deploy import Deployment, get, post
from harness.firmware import FirmwareBoard

pytestmark = pytest.mark.integration


def board_for(d: Deployment, tmp: Path, node: str = "dev-1", port: int | None = None, **kw) -> FirmwareBoard:
    return FirmwareBoard(tmp / "board", d.bundle(node), host="127.0.0.1", port=port or d.topo.gateway_mqtts_port,
                         ca_pem=d.lab.ca_file.read_bytes(), **kw)


def cloud_rows(d: Deployment, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(d.lab.path("cloud", "cloud.db")) as db:
        return db.execute(sql, args).fetchall()


def buffered(board: FirmwareBoard) -> int:
    """Bytes in the board's flash buffer segments (0: everything was custody-acked)."""
    return sum(p.stat().st_size for p in board.path("cwsnet", "buf").glob("*.seg"))


def run_task(d: Deployment, handler: str, args: dict, node: str = "dev-1", timeout: float = 40) -> dict:
    task = post(f"{d.base}/api/v1/tasks", {"target": node, "handler": handler, "args": args})
    return wait_for(lambda: (t := get(f"{d.base}/api/v1/tasks/{task['id']}"))["state"]
                    in ("succeeded", "failed", "expired") and t, timeout=timeout, message=f"{handler} task")


def test_firmware_sends_sealed_telemetry_the_cloud_opens_and_runs_tasks(tmp_path: Path, procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    board = board_for(d, tmp_path)
    board.start(procs)
    wait_for(lambda: d.online() == {"dev-1"}, timeout=60, message="the firmware's birth at the cloud")
    dev = get(f"{d.base}/api/v1/devices/dev-1")
    status = dev["status"] if "status" in dev else dev
    text = str(status)
    assert "micropython" in text and "heap_free" in text and "reset_cause" in text and "rssi" in text, text
    readings = wait_for(lambda: (r := get(f"{d.base}/api/v1/devices/dev-1/telemetry?limit=50")["items"])
                        and len(r) >= 10 and r, timeout=30, message="telemetry from the firmware")
    assert {"temperature", "humidity"} <= set(readings[0]["values"])
    # the cloud opened sealed envelopes: each stored message is from dev-1 with its clear seq
    kinds = dict(cloud_rows(d, "select kind, count(*) from messages where sender = 'dev-1' group by 1"))
    assert kinds.get("telemetry", 0) >= 2 and kinds.get("birth", 0) >= 1, kinds

    done = run_task(d, "echo", {"x": 1, "s": "héllo"})
    assert done["state"] == "succeeded" and done["result"] == {"x": 1, "s": "héllo"}, done
    done = run_task(d, "sha256", {"data": "aGVsbG8="})
    assert done["result"] == {"sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
                              "bytes": 5}, done
    done = run_task(d, "nope", {})
    assert done["state"] == "failed" and "unknown handler" in done["error"] and "echo" in done["error"], done
    wait_for(lambda: buffered(board) == 0, timeout=30, message="the board's buffer emptied by custody acks")
    assert board.resets() == 0


def test_cut_link_buffers_to_flash_and_everything_arrives_once(tmp_path: Path, procs: ProcessSet,
                                                               fault_proxy) -> None:
    """The WiFi/broker link drops for a while and the board loses power during the outage: every
    reading taken while powered reaches the cloud exactly once after the link returns."""
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    proxy = fault_proxy(d.topo.gateway_mqtts_port)
    board = board_for(d, tmp_path, port=proxy.port)
    fw = board.start(procs)
    wait_for(lambda: d.online() == {"dev-1"}, timeout=60, message="the firmware online")

    def telemetry_seqs() -> list[int]:
        return [s for (s,) in cloud_rows(d, "select seq from messages where sender = 'dev-1' and kind = 'telemetry'")]

    wait_for(lambda: len(telemetry_seqs()) >= 2, timeout=30, message="telemetry before the cut")
    proxy.cut()
    wait_for(lambda: buffered(board) > 2000, timeout=60, message="readings buffered on flash during the outage")
    cut_seqs = set(board.stored())
    fw.kill(signal.SIGKILL)  # power cut while offline: the buffer is on flash
    fw.start()
    wait_for(lambda: buffered(board) > 4000, timeout=60, message="more readings buffered after the power cut")
    assert not set(telemetry_seqs()) & (set(board.stored()) - cut_seqs)  # nothing new got through the cut link
    proxy.restore()
    wait_for(lambda: buffered(board) == 0, timeout=90, message="the buffer drained after the link returned")
    assert_all_stored_once(d, board)


def assert_all_stored_once(d: Deployment, board: FirmwareBoard) -> None:
    """Every telemetry message the board put on flash (its log says so once put() returned) is
    at the cloud exactly once, and no reading is stored twice under another seq."""
    stored = board.stored()
    assert len(stored) == len(set(stored)) and len(stored) >= 5, stored  # seqs never reused, across boots
    at_cloud = [s for (s,) in cloud_rows(d, "select seq from messages where sender = 'dev-1' and kind = 'telemetry'")]
    assert len(at_cloud) == len(set(at_cloud))
    missing = set(stored) - set(at_cloud)
    assert not missing, f"{len(missing)} telemetry messages the board buffered never reached the cloud"
    ts = [t for (t,) in cloud_rows(d, "select ts from telemetry where sender = 'dev-1'")]
    assert len(ts) == len(set(ts)), "a reading was stored twice"


def test_wifi_that_joins_late_and_drops_later_loses_nothing(tmp_path: Path, procs: ProcessSet) -> None:
    """The access point refuses the first two joins, then vanishes for a while: the firmware keeps
    retrying, the broker publishes its death, and every reading taken meanwhile arrives after."""
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    down = tmp_path / "ap-down"
    board = board_for(d, tmp_path, hardware={"wifi": {"ssid": "lab", "password": "lab-password", "fail_connects": 2},
                                             "wifi_down_file": str(down)})
    fw = board.start(procs)
    wait_for(lambda: d.online() == {"dev-1"}, timeout=60, message="online after two failed joins")
    assert "(attempt 3)" in fw.log_text() and "could not join 'lab'" in fw.log_text()
    wait_for(lambda: len(cloud_rows(d, "select 1 from telemetry where sender = 'dev-1'")) >= 5, timeout=30,
             message="telemetry before the WiFi drops")
    down.touch()
    wait_for(lambda: d.online() == set(), timeout=30, message="the broker's will marks the firmware offline")
    wait_for(lambda: buffered(board) > 1500, timeout=60, message="readings buffered while WiFi is down")
    down.unlink()
    wait_for(lambda: d.online() == {"dev-1"}, timeout=90, message="back online after WiFi returns")
    wait_for(lambda: buffered(board) == 0, timeout=60, message="the buffer drained")
    assert_all_stored_once(d, board)
    assert board.resets() == 0


def test_a_task_cut_short_by_a_power_loss_is_reported_interrupted_not_rerun(tmp_path: Path,
                                                                             procs: ProcessSet) -> None:
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    board = board_for(d, tmp_path)
    fw = board.start(procs)
    wait_for(lambda: d.online() == {"dev-1"}, timeout=60, message="the firmware online")
    task = post(f"{d.base}/api/v1/tasks", {"target": "dev-1", "handler": "sleep", "args": {"seconds": 600}})
    wait_for(lambda: get(f"{d.base}/api/v1/tasks/{task['id']}")["state"] == "running", timeout=30,
             message="the sleep task running on the board")
    fw.kill(signal.SIGKILL)
    fw.start()
    t = wait_for(lambda: (t := get(f"{d.base}/api/v1/tasks/{task['id']}"))["state"] == "failed" and t, timeout=60,
                 message="the interrupted task reported failed")
    assert t["error"].startswith("interrupted"), t
    done = run_task(d, "echo", {"after": "restart"})  # the board still runs tasks
    assert done["result"] == {"after": "restart"}
    assert get(f"{d.base}/api/v1/tasks/{task['id']}")["state"] == "failed"  # never run a second time


def test_ota_update_is_committed_and_a_bad_one_rolls_back(tmp_path: Path, procs: ProcessSet) -> None:
    """A release built by `cwsnet firmware build` reaches the board through its gateway, is swapped
    in and committed once healthy; a later release that never reports healthy is rolled back, and
    a command whose manifest hash does not match changes nothing."""
    from cwsnet import firmware

    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    board = board_for(d, tmp_path, settings={"ota": {"health_timeout": 10}})
    board.start(procs)
    wait_for(lambda: d.online() == {"dev-1"}, timeout=60, message="the firmware online")
    ota_dir = d.lab.path("gateway", "ota")

    good = firmware.build(ota_dir, version="2.0.0")
    done = run_task(d, "ota", {"version": "2.0.0", "manifest_sha256": "0" * 64})
    assert done["state"] == "failed" and "does not match" in done["error"], done
    assert board.resets() == 0

    done = run_task(d, "ota", {"version": "2.0.0", "manifest_sha256": good.manifest_sha256}, timeout=120)
    assert done["state"] == "succeeded" and done["result"] == {"version": "2.0.0", "previous": "0.1.0"}, done
    assert board.resets() == 1
    assert sorted(p.name for p in board.path("lib", "cws").iterdir()) == sorted(
        Path(f.path).name for f in good.lib_files)  # the .mpy build replaced the sources
    wait_for(lambda: get(f"{d.base}/api/v1/devices/dev-1")["status"]["firmware"]["version"] == "2.0.0",
             timeout=30, message="the new version in the device's status")
    assert not board.path("cwsnet", "ota", "prev").exists() and not board.path("cwsnet", "ota", "state.json").exists()

    # 3.0.0 connects but seals nothing the gateway takes: never healthy, so it must not stay
    src = tmp_path / "bad-src"
    shutil.copytree(firmware.source_root(), src)
    agent_py = src / "lib" / "cws" / "agent.py"
    text = agent_py.read_text()
    assert 'header = {"from": self.s.node, "to": to,' in text
    agent_py.write_text(text.replace('header = {"from": self.s.node, "to": to,', 'header = {"from": "nobody", "to": to,'))
    bad = firmware.build(ota_dir, root=src, version="3.0.0")
    done = run_task(d, "ota", {"version": "3.0.0", "manifest_sha256": bad.manifest_sha256}, timeout=120)
    assert done["state"] == "failed" and "rolled back to 2.0.0" in done["error"], done
    assert board.resets() == 4  # into 3.0.0, its health timeout on trial boots 1 and 2, then 2.0.0 again
    wait_for(lambda: get(f"{d.base}/api/v1/devices/dev-1")["status"]["firmware"]["version"] == "2.0.0",
             timeout=30, message="2.0.0 running again")
    # 3.0.0's messages (sealed under a wrong name) are never acked; they must not block 2.0.0's
    n = len(cloud_rows(d, "select 1 from messages where sender = 'dev-1' and kind = 'telemetry'"))
    wait_for(lambda: len(cloud_rows(d, "select 1 from messages where sender = 'dev-1' and kind = 'telemetry'"))
             > n + 3, timeout=60, message="telemetry flowing again after the rollback")


def test_the_firmware_seals_a_stream_its_site_keeps_to_its_gateway(tmp_path: Path, procs: ProcessSet) -> None:
    """Routing (protocol §9): the gateway sends the board its routes; `health` is then sealed to the
    gateway, kept there and never forwarded, while `env` still goes to the cloud."""
    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    board = board_for(d, tmp_path, sensors=[
        {"type": "simulated", "stream": "env", "interval": 0.3, "fields": ["temperature"]},
        {"type": "simulated", "stream": "health", "interval": 0.2, "fields": ["hr"], "offset": 70}])
    board.start(procs)
    site_db = d.lab.path("gateway", "site-data.db")

    def kept() -> int:
        with sqlite3.connect(site_db) as db:
            return db.execute("select count(*) from readings where node = 'dev-1' and stream = 'health'").fetchone()[0]

    wait_for(lambda: site_db.exists() and kept() >= 10, timeout=60, message="health readings kept at the gateway")
    assert (board.path("cwsnet", "state", "routes")).exists()  # the routes it was sent, on its flash
    wait_for(lambda: cloud_rows(d, "select count(*) from telemetry where sender = 'dev-1' and stream = 'env'")[0][0]
             >= 5, timeout=30, message="env telemetry at the cloud")
    # what it sealed to the cloud before it heard its routes was dropped at the gateway, never forwarded
    assert cloud_rows(d, "select count(*) from telemetry where stream = 'health'") == [(0,)]
    wait_for(lambda: buffered(board) == 0, timeout=30, message="everything custody-acked")


def test_the_firmware_is_an_executor_of_scheduled_tasks_with_heartbeats_and_cancels(
        tmp_path: Path, procs: ProcessSet) -> None:
    """The ESP32 firmware offers one slot to the scheduler: it runs a scheduled task once per attempt, echoes
    the attempt, keeps the lease with heartbeats every third of it (its idle status pace is 30 s here), and
    stops a task the operator cancels."""
    import time

    d = Deployment(tmp_path, procs, devices=1)
    d.edit("cloud", {"cloud_workers": 0})
    d.edit(d.topo.gateway, {"task_slots": 0})  # the firmware is the site's only executor
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    board = board_for(d, tmp_path, settings={"status_interval": 30})
    board.start(procs)
    node = wait_for(lambda: next((n for n in get(f"{d.base}/api/v1/nodes") if n["node"] == "dev-1" and n["live"]),
                                 None), timeout=60, message="the firmware as an executor")
    assert node["slots"] == 1 and node["tier"] == "device" and "echo" in node["handlers"], node

    def scheduled(handler: str, args: dict) -> str:
        return post(f"{d.base}/api/v1/tasks", {"handler": handler, "args": args, "site": d.topo.site})["id"]

    def task(tid: str) -> dict:
        return get(f"{d.base}/api/v1/tasks/{tid}")

    tid = scheduled("echo", {"n": 1})
    t = wait_for(lambda: (x := task(tid))["state"] == "succeeded" and x, timeout=40, message="the echo")
    assert t["node"] == "dev-1" and t["result"] == {"n": 1} and t["attempts"] == 1, t
    # a long one: its lease (5 s) holds through heartbeats, though the board's idle status pace is 30 s
    tid = scheduled("sleep", {"seconds": 120})
    wait_for(lambda: task(tid)["state"] == "running", timeout=40, message="sleep running on the firmware")
    time.sleep(12)  # more than two leases: the span under test, not a synchronisation
    t = task(tid)
    assert t["state"] == "running" and t["node"] == "dev-1" and t["attempts"] == 1, t["placement"]
    assert tid in next(n for n in get(f"{d.base}/api/v1/nodes") if n["node"] == "dev-1")["running"]
    # cancelled: the firmware stops it, reports it (running + succeeded of the echo, running + cancelled of the
    # sleep: four results), and its next heartbeat lists nothing
    assert post(f"{d.base}/api/v1/tasks/{tid}/cancel", {})["state"] == "cancelled"
    wait_for(lambda: cloud_rows(d, "select count(*) from messages where sender = 'dev-1' and kind = 'task_result'"
                                )[0][0] == 4, timeout=30, message="the firmware's cancelled report")
    wait_for(lambda: not next(n for n in get(f"{d.base}/api/v1/nodes") if n["node"] == "dev-1")["running"],
             timeout=30, message="the firmware holds nothing")
    assert board.resets() == 0
