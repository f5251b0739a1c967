"""`cwsnet up` as a user runs it: real processes, real amqtt brokers, real SQLite, real sealing.

One home lab is started per module (it takes a few seconds) and the checks run against it in
order; the last ones kill and stop it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import cbor2
import pytest
from harness import ProcessSet, free_port, wait_for
from harness.deploy import authenticate, request

pytestmark = pytest.mark.integration

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def api(base: str, path: str, body: dict | None = None, method: str | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = request(base + path, data, method=method or ("POST" if data else "GET"),
                  headers={"content-type": "application/json"})
    with OPENER.open(req, timeout=5) as r:
        return json.loads(r.read())


def metrics(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with OPENER.open(request(base + "/metrics"), timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


class Lab:
    def __init__(self, tmp: Path, procs: ProcessSet) -> None:
        self.dir = tmp / "lab"
        self.http = free_port()
        self.cloud_port = free_port()
        self.gw_port = free_port()
        self.cloud_tls_port = free_port()
        self.gw_tls_port = free_port()
        self.base = f"http://127.0.0.1:{self.http}"
        authenticate(self.base, self.dir / "admin.token")  # the API needs the admin's token
        self.argv = [sys.executable, "-m", "cwsnet", "up", "--data-dir", str(self.dir), "--devices", "3",
                     "--http-port", str(self.http), "--cloud-port", str(self.cloud_port),
                     "--gateway-port", str(self.gw_port), "--cloud-tls-port", str(self.cloud_tls_port),
                     "--gateway-tls-port", str(self.gw_tls_port), "--telemetry-interval", "0.5"]
        self.procs = procs
        self.proc = procs.start("up", self.argv)

    def admin(self) -> tuple[str, str]:
        cred = json.loads((self.dir / "admin-mqtt.json").read_text())
        return cred["username"], cred["password"]

    def pid(self, name: str) -> int:
        return int((self.dir / "run" / f"{name}.pid").read_text())

    def sub(self, port: int, count: int, topic: str = "cws/v1/#", timeout: int = 20) -> list[tuple[str, bytes]]:
        user, pw = self.admin()
        r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", pw, "-t", topic,
                            "-q", "1", "-F", "%t %x", "-C", str(count), "-W", str(timeout)],
                           capture_output=True, text=True, timeout=timeout + 5)
        out = []
        for line in r.stdout.splitlines():
            t, _, hexpayload = line.partition(" ")
            out.append((t, bytes.fromhex(hexpayload)))
        return out

    def pub(self, port: int, user: str, pw: str, topic: str, payload: bytes) -> None:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-i", f"{user}-tamper", "-u", user,
                        "-P", pw, "-t", topic,
                        "-q", "1", "-s"], input=payload, check=True, timeout=10, capture_output=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("up")
    procs = ProcessSet(tmp / "logs")
    lab = Lab(tmp, procs)
    try:
        lab.proc.wait_log(r"CWSNet is up: console http://127\.0\.0\.1:\d+/", timeout=60)
        yield lab
    except BaseException:
        print(procs.tails(80))
        for f in sorted((lab.dir / "logs").glob("*.log")):
            print(f"----- {f.name} -----\n" + "\n".join(f.read_text().splitlines()[-40:]))
        raise
    finally:
        procs.close()


def test_endpoints_file_and_console(lab: Lab) -> None:
    eps = json.loads((lab.dir / "endpoints.json").read_text())
    assert eps["console"] == f"{lab.base}/"
    # clients use TLS; the plaintext listeners (mosquitto_sub below) are on loopback only
    assert eps["brokers"] == {"cloud": f"127.0.0.1:{lab.cloud_tls_port}", "gw-home": f"127.0.0.1:{lab.gw_tls_port}"}
    assert eps["brokers_plain"] == {"cloud": f"127.0.0.1:{lab.cloud_port}", "gw-home": f"127.0.0.1:{lab.gw_port}"}
    assert eps["ca_file"] == str(lab.dir / "ca" / "ca.crt")
    with OPENER.open(lab.base + "/", timeout=5) as r:
        assert "text/html" in r.headers["content-type"]
    # the API needs a login: `up` says where the admin's token is
    lab.proc.wait_log(r"log in .* with the API token in .*admin\.token", timeout=5)
    lab.proc.wait_log(r"admin-mqtt\.json holds a read-only MQTT debugging credential", timeout=5)
    with pytest.raises(urllib.error.HTTPError) as refused:
        OPENER.open(lab.base + "/api/v1/devices", timeout=5)
    assert refused.value.code == 401
    assert api(lab.base, "/api/v1/auth/me")["username"] == "admin"


def test_every_daemon_connects_over_tls(lab: Lab) -> None:
    import yaml

    for node, section, port in (("cloud", "client", lab.cloud_tls_port), ("gw-home", "uplink", lab.cloud_tls_port),
                                ("gw-home", "site_client", lab.gw_tls_port),
                                *((d, "broker", lab.gw_tls_port) for d in ("dev-1", "dev-2", "dev-3"))):
        ep = yaml.safe_load((lab.dir / "config" / f"{node}.yaml").read_text())[section]
        assert (ep["port"], ep["tls"]["ca_file"]) == (port, "../ca/ca.crt"), (node, section)
    for node in ("cloud", "gw-home", "dev-1"):  # each one logs its connection to a TLS port
        log = lab.dir / "logs" / f"{node}.log"
        wait_for(lambda: re.search(rf"connected to 127\.0\.0\.1:({lab.cloud_tls_port}|{lab.gw_tls_port})\b",
                                   log.read_text()), timeout=30, message=f"{node} connected over TLS")  # noqa: B023


def test_secret_files_are_0600(lab: Lab) -> None:
    for p in [*(lab.dir / "keys").glob("*.json"), *(lab.dir / "brokers").glob("*.json"), lab.dir / "admin-mqtt.json",
              lab.dir / "admin.token",
              lab.dir / "ca" / "ca.key", *(lab.dir / "tls").glob("*.key")]:
        assert p.stat().st_mode & 0o777 == 0o600, p
    for name in ("cloud", "gw-home", "dev-1", "dev-2", "dev-3"):
        assert (lab.dir / "run" / f"{name}.pid").exists()


def test_three_devices_online_with_increasing_seq(lab: Lab) -> None:
    def online() -> list[dict]:
        items = api(lab.base, "/api/v1/devices")["items"]
        return [d for d in items if d["online"]] if len(items) == 3 else []

    devs = wait_for(lambda: len(online()) == 3 and online(), timeout=30, message="3 online devices")
    assert sorted(d["id"] for d in devs) == ["dev-1", "dev-2", "dev-3"]
    assert all(d["status"].get("agent", {}).get("kind") == "cpython" for d in devs)

    def grown() -> list[dict]:
        items = api(lab.base, "/api/v1/devices/dev-1/telemetry?limit=100")["items"]
        return items if len({i["seq"] for i in items}) >= 5 else []

    items = wait_for(grown, timeout=20, message="telemetry accumulating")
    for stream in {i["stream"] for i in items}:  # within a stream, later readings never get lower seqs
        seqs = [i["seq"] for i in sorted((i for i in items if i["stream"] == stream),
                                         key=lambda i: (i["ts"], i["seq"], i["idx"]))]
        assert seqs == sorted(seqs), f"seq increases with time in stream {stream}"
    assert {"env", "system"} >= {i["stream"] for i in items}
    env = [i for i in items if i["stream"] == "env"]
    assert env and set(env[0]["values"]) == {"temperature", "humidity"}
    gws = api(lab.base, "/api/v1/gateways")["items"]
    assert gws[0]["id"] == "gw-home" and gws[0]["online"]


def test_sha256_task_returns_the_digest(lab: Lab) -> None:
    data = os.urandom(1000)
    created = api(lab.base, "/api/v1/tasks", {"target": "dev-2", "handler": "sha256",
                                               "args": {"data": base64.b64encode(data).decode()}})
    task = wait_for(lambda: (t := api(lab.base, f"/api/v1/tasks/{created['id']}"))["state"] == "succeeded" and t,
                    timeout=20, message="task succeeded")
    assert task["result"]["sha256"] == hashlib.sha256(data).hexdigest()
    # issue 8: the task's trace id follows it through every daemon's log: the cloud sent it, the device ran it,
    # the gateway stored its results for the cloud, and the cloud stored them
    logs = lab.dir / "logs"
    sent = wait_for(lambda: re.search(rf"task {created['id']} sent to dev-2 .* trace=(\S+)",
                                      (logs / "cloud.log").read_text()), timeout=10, message="the cloud's log line")
    trace = sent.group(1)
    wait_for(lambda: all(trace in (logs / f"{name}.log").read_text() for name in ("dev-2", "gw-home")) and
             (logs / "cloud.log").read_text().count(trace) >= 2, timeout=20, message=f"trace {trace} in every log")
    assert re.search(rf"running sha256 .*trace={trace}",
                     (logs / "dev-2.log").read_text())
    assert re.search(rf"stored task_result .* from dev-2 trace={trace}", (logs / "gw-home.log").read_text())
    assert re.search(rf"stored cws/v1/home/dev-2/task/result from=dev-2 .*trace={trace}",
                     (logs / "cloud.log").read_text())


def test_brokers_carry_only_sealed_envelopes(lab: Lab) -> None:
    # a sleep task so task commands and results cross both brokers while we listen
    api(lab.base, "/api/v1/tasks", {"target": "dev-3", "handler": "echo", "args": {"secret": "plaintext-marker"}})
    for port in (lab.gw_port, lab.cloud_port):
        msgs = lab.sub(port, count=15, topic="#")
        assert len(msgs) == 15, f"saw only {len(msgs)} messages on port {port}"
        for topic, payload in msgs:
            outer = cbor2.loads(payload)
            assert set(outer) == {"h", "n", "c"}, topic
            for marker in (b"temperature", b"humidity", b"online", b"plaintext-marker", b"cpython", b"readings"):
                assert marker not in payload, (topic, marker)


def _captured(lab: Lab, topic_filter: str) -> tuple[str, bytes]:
    msgs = lab.sub(lab.cloud_port, count=1, topic=topic_filter)
    assert msgs, f"nothing captured on {topic_filter}"
    return msgs[0]


def test_forged_replayed_swapped_and_junk_are_rejected(lab: Lab) -> None:
    gw = json.loads((lab.dir / "keys" / "gw-home.json").read_text())
    user, pw = gw["mqtt_username"], gw["mqtt_password"]  # a compromised gateway may publish to the cloud
    topic, payload = _captured(lab, "cws/v1/home/dev-1/telemetry/#")
    before = metrics(lab.base)

    outer = cbor2.loads(payload)
    c = bytearray(outer["c"])
    c[5] ^= 0x01
    lab.pub(lab.cloud_port, user, pw, topic, cbor2.dumps({"h": outer["h"], "n": outer["n"], "c": bytes(c)}))
    lab.pub(lab.cloud_port, user, pw, topic, payload)  # replay of a stored message
    lab.pub(lab.cloud_port, user, pw, topic.replace("/dev-1/", "/dev-2/"), payload)
    lab.pub(lab.cloud_port, user, pw, topic, b"this is not CBOR \xff\xff")

    def counted() -> dict[str, float]:
        m = metrics(lab.base)
        diff = {r: m[f"cwsnet_cloud_messages_rejected_total{{reason={r}}}"]
                - before[f"cwsnet_cloud_messages_rejected_total{{reason={r}}}"]
                for r in ("forged", "replay", "topic_mismatch", "malformed")}
        return diff if all(v >= 1 for v in diff.values()) else {}

    wait_for(counted, timeout=15, message="all four rejections counted")
    events = api(lab.base, "/api/v1/events?limit=200")["items"]
    reasons = {e["data"].get("reason") for e in events if e["type"] == "message.rejected"}
    assert {"forged", "replay", "topic_mismatch", "malformed"} <= reasons
    assert api(lab.base, "/healthz")["status"] == "ok"


def test_gateway_sigkill_is_restarted_and_devices_reconnect(lab: Lab) -> None:
    old = lab.pid("gw-home")
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (p := lab.pid("gw-home")) != old and p, timeout=20, message="gateway restarted")
    assert new != old
    lab.proc.wait_log(r"restarted gw-home", timeout=5)
    mark = int(time.time() * 1000)

    def fresh() -> bool:
        for d in ("dev-1", "dev-2", "dev-3"):
            items = api(lab.base, f"/api/v1/devices/{d}/telemetry?limit=5")["items"]
            if not items or max(i["ts"] for i in items) <= mark:
                return False
        return True

    wait_for(fresh, timeout=45, message="fresh telemetry from every device after the gateway restart")


def test_revoking_a_device_stops_only_that_device(lab: Lab) -> None:
    r = subprocess.run([sys.executable, "-m", "cwsnet", "device", "revoke", "dev-3", "--data-dir", str(lab.dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lab.proc.wait_log(r"dev-3 exited with code 2 .*not restarted, the rest keeps running", timeout=20)
    mark = int(time.time() * 1000)

    def fresh() -> bool:
        for d in ("dev-1", "dev-2"):
            items = api(lab.base, f"/api/v1/devices/{d}/telemetry?limit=5")["items"]
            if not items or max(i["ts"] for i in items) <= mark:
                return False
        return True

    wait_for(fresh, timeout=30, message="the other devices go on")
    assert lab.proc.alive
    assert not [d for d in api(lab.base, "/api/v1/devices")["items"] if d["id"] == "dev-3" and d["online"]]


def test_sigterm_stops_everything_within_10s(lab: Lab) -> None:
    children = [lab.pid(n) for n in ("cloud", "gw-home", "dev-1", "dev-2", "dev-3")]
    t0 = time.monotonic()
    code = lab.proc.terminate(timeout=12)
    elapsed = time.monotonic() - t0
    assert code == 0 and elapsed < 10, (code, elapsed)
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert not list((lab.dir / "run").glob("*.pid"))
    # devices stopped first and said goodbye through the still-running gateway and cloud
    import sqlite3

    with sqlite3.connect(f"file:{lab.dir / 'cloud' / 'cloud.db'}?mode=ro", uri=True) as db:
        states = dict(db.execute("select id, online from nodes where role = 'device'").fetchall())
    assert states == {"dev-1": 0, "dev-2": 0, "dev-3": 0}, states


def test_second_run_reuses_keys(lab: Lab) -> None:
    if lab.proc.alive:  # when run on its own, stop the module's first run here
        lab.proc.terminate(timeout=12)
    before = {p.name: p.read_text() for p in (lab.dir / "keys").glob("*.json")}
    proc = lab.procs.start("up-again", lab.argv)
    try:
        proc.wait_log(r"CWSNet is up", timeout=60)
        after = {p.name: p.read_text() for p in (lab.dir / "keys").glob("*.json")}
        assert after == before
        revoked = "dev-3" in {d["id"] for d in api(lab.base, "/api/v1/devices")["items"] if d.get("revoked_at")} \
            or "note: dev-3 is revoked" in proc.log_text()
        expect = 2 if revoked else 3  # (when this test runs alone, nothing was revoked)
        wait_for(lambda: len([d for d in api(lab.base, "/api/v1/devices")["items"] if d["online"]]) == expect,
                 timeout=30, message="devices online again with the same keys")
    finally:
        assert proc.terminate(timeout=12) == 0
