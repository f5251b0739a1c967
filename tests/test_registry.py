"""The registry (cwsnet.registry) and the `cwsnet device` commands: key versions, rotation grace,
revocation, broker users derived from it, concurrent edits, and the CLI's errors and secrecy."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cwsnet import envelope, registry
from cwsnet.broker import parse_credentials
from cwsnet.bundle import Bundle
from cwsnet.endpoint import Endpoint
from cwsnet.errors import ConfigError, ForgedEnvelope
from cwsnet.homelab import HomeLab, Topology
from cwsnet.identity import Identity
from cwsnet.registry import Entry, KeyRing, Registry, RetiredKey, RevokedSender, UnknownKeyVersion
from cwsnet.replay import SeqCounter

CLOUD = Identity.generate("cloud", "home", "cloud")
DEV = Identity.generate("dev-1", "home", "device")
TOPIC = "cws/v1/home/dev-1/telemetry/env"
T0 = 1_800_000_000_000


def entry(node: str = "dev-1", key: Identity = DEV, **kw) -> Entry:
    return Entry(node, kw.pop("site", "home"), kw.pop("role", "device"), key.public_b64, created=T0,
                 mqtt_token_sha256=hashlib.sha256(node.encode()).hexdigest(), **kw)


def sealed(ident: Identity, kv: int | None, seq: int = 1) -> bytes:
    ep = Endpoint(ident, SeqCounter(seq, lambda _m: None), {"cloud": CLOUD.public_key}.get, key_version=kv)
    return ep.seal(TOPIC, "telemetry", {"r": [1]}, to="cloud")[0]


def open_with(ring: KeyRing, payload: bytes) -> envelope.Opened:
    ep = Endpoint(CLOUD, SeqCounter(1, lambda _m: None), ring.current, versioned_key=ring.lookup)
    return ep.open(payload, TOPIC)


# -- key versions -------------------------------------------------------------------------------


def test_a_rotated_key_opens_what_it_sealed_until_its_grace_ends_then_is_refused() -> None:
    now = [T0]
    reg = Registry({"dev-1": entry()})
    old_msg = sealed(DEV, 1)
    new = Identity.generate("dev-1", "home", "device")
    reg.rotate("dev-1", new.public_b64, grace=60, now=T0)
    e = reg.get("dev-1")
    assert e is not None and e.kv == 2 and [p.kv for p in e.previous_keys] == [1]
    ring = KeyRing(reg.nodes, clock=lambda: now[0])

    assert open_with(ring, old_msg).body == {"r": [1]}  # in flight before the rotation: still opens
    assert open_with(ring, sealed(new, 2)).header.key_version == 2
    assert open_with(ring, sealed(new, None)).header.sender == "dev-1"  # no kv: the current key
    with pytest.raises(ForgedEnvelope):  # the old key cannot pass itself off as the new version
        open_with(ring, sealed(DEV, 2))
    now[0] = T0 + 60_001
    with pytest.raises(RetiredKey, match="rotated out") as exc:
        open_with(ring, old_msg)
    assert exc.value.reason == "retired_key" and exc.value.sender == "dev-1"


def test_a_newer_key_version_than_the_registry_knows_is_not_refused_for_good() -> None:
    ring = KeyRing({"dev-1": entry()})
    with pytest.raises(UnknownKeyVersion) as exc:
        open_with(ring, sealed(DEV, 5))
    assert exc.value.reason == "unknown_key"  # not a notice reason: the gateway keeps and resends it


def test_a_revoked_node_is_refused_whatever_key_it_uses() -> None:
    reg = Registry({"dev-1": entry()})
    reg.rotate("dev-1", Identity.generate("dev-1", "home", "device").public_b64, now=T0)
    reg.revoke("dev-1", now=T0 + 1)
    e = reg.get("dev-1")
    assert e is not None and not e.active and e.previous_keys == () and e.keys(T0) == {}
    ring = KeyRing(reg.nodes)
    assert ring.current("dev-1") is None  # nothing is sealed to it any more
    for kv in (None, 1, 2):
        with pytest.raises(RevokedSender, match="revoked") as exc:
            open_with(ring, sealed(DEV, kv))
        assert exc.value.reason == "revoked"
    with pytest.raises(ConfigError, match="revoked identity cannot be rotated"):
        reg.rotate("dev-1", DEV.public_b64)


def test_an_endpoint_that_rotated_still_opens_messages_sealed_to_its_old_key() -> None:
    dev = Endpoint(DEV, SeqCounter(1, lambda _m: None), {"cloud": CLOUD.public_key}.get, key_version=1)
    cloud = Endpoint(CLOUD, SeqCounter(1, lambda _m: None), {"dev-1": DEV.public_key}.get)
    to_old = cloud.seal("cws/v1/home/dev-1/ack", "ack", {"acks": []}, to="dev-1")[0]
    dev.rekey(Identity("dev-1", "home", "device", Identity.generate("x", "home", "device").secret_key), 2)
    assert dev.open(to_old, "cws/v1/home/dev-1/ack").header.sender == "cloud"
    assert envelope.peek_header(dev.seal(TOPIC, "telemetry", {}, to="cloud")[0]).key_version == 2


# -- the file --------------------------------------------------------------------------------------


def test_round_trip_and_format_1(tmp_path: Path) -> None:
    reg = Registry({"dev-1": entry(gateway="gw-home"), "ops": Entry("ops", "home", "operator", "",
                                                                    subscribe=("cws/v1/#",))})
    path = tmp_path / "registry.json"
    reg.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Registry.load(path)
    assert again.nodes == reg.nodes and again.rev == 1 and again.managed
    path.write_text(json.dumps([{"id": "dev-1", "site": "home", "role": "device", "public_key": DEV.public_b64}]))
    legacy = Registry.load(path)
    assert not legacy.managed and legacy.get("dev-1").kv == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(("change", "message"), [
    ({"role": "king"}, r"entry 0: role 'king' is not one of"),
    ({"kv": 0}, r"entry 0 \(dev-1\): kv must be an integer >= 1"),
    ({"status": "paused"}, r"status must be one of active, revoked"),
    ({"public_key": "AAAA"}, r"public_key: a public key is 32 bytes"),
    ({"mqtt_token_sha256": "xyz"}, r"mqtt_token_sha256 must be 64 lower-case hex digits"),
    ({"previous_keys": [{"kv": 1}]}, r"previous_keys\[0\]: must be"),
    ({"colour": "red"}, r"unknown field\(s\) colour"),
    ({"id": "a/b"}, r"node id 'a/b' is not a valid name"),
])
def test_a_bad_entry_is_named_with_the_file_and_the_field(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"format": 2, "rev": 1, "nodes": [entry().to_dict() | change]}))
    with pytest.raises(ConfigError, match=message) as exc:
        Registry.load(path)
    assert str(path) in str(exc.value)


def test_concurrent_edits_are_serialised_and_none_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    Registry().save(path)

    def add(i: int) -> None:
        ident = Identity.generate(f"d{i}", "home", "device")
        with registry.editing(path) as reg:
            reg.add(Entry(f"d{i}", "home", "device", ident.public_b64))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reg = Registry.load(path)
    assert sorted(reg.nodes) == sorted(f"d{i}" for i in range(20)) and reg.rev == 21


# -- broker users ------------------------------------------------------------------------------------


def test_broker_users_give_each_identity_least_privilege() -> None:
    gw = Identity.generate("gw-home", "home", "gateway")
    reg = Registry({
        "cloud": entry("cloud", CLOUD, role="cloud"),
        "gw-home": entry("gw-home", gw, role="gateway"),
        "gw-far": entry("gw-far", gw, role="gateway", site="far"),
        "dev-1": entry(gateway="gw-home"),
        "dev-2": entry("dev-2", gateway="gw-home", status="revoked"),
        "solo": entry("solo", site="far"),
        "app-1": entry("app-1", role="app", subscribe=("cws/v1/home/+/telemetry/#",)),
        "admin": Entry("admin", "home", "operator", "", mqtt_token_sha256="0" * 64, subscribe=("#",)),
    })
    site = parse_credentials(registry.site_broker_users(reg, "home"))
    assert sorted(site.users) == ["admin", "dev-1", "gw-home"]  # no revoked device, no other site's nodes
    dev = site.users["dev-1"].rules
    assert dev.may_publish("cws/v1/home/dev-1/telemetry/env") and not dev.may_publish("cws/v1/home/dev-3/status")
    assert dev.may_subscribe("cws/v1/home/dev-1/task/cmd") and not dev.may_subscribe("cws/v1/home/+/task/cmd")
    assert not dev.may_subscribe("#")
    admin = site.users["admin"].rules
    assert admin.may_subscribe("#") and not admin.may_publish("cws/v1/home/dev-1/status")

    cloud = parse_credentials(registry.cloud_broker_users(reg))
    assert sorted(cloud.users) == ["admin", "app-1", "cloud", "gw-far", "gw-home", "solo"]
    gw_rules = cloud.users["gw-home"].rules
    assert gw_rules.may_publish("cws/v1/home/dev-1/status") and not gw_rules.may_publish("cws/v1/far/x/status")
    assert not gw_rules.may_subscribe("cws/v1/far/+/task/cmd")
    app = cloud.users["app-1"].rules
    assert app.may_subscribe("cws/v1/_apps/app-1/#") and not app.may_subscribe("cws/v1/#")
    assert not app.may_subscribe("cws/v1/home/+/telemetry/#")  # the data itself only re-sealed to it
    assert not app.may_subscribe("cws/v1/_apps/app-2/#") and not app.may_publish("cws/v1/_apps/app-1/x")


# -- the CLI -----------------------------------------------------------------------------------------


def cwsnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cwsnet", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> HomeLab:
    lab = HomeLab(tmp_path_factory.mktemp("devlab") / "lab")
    lab.init(Topology(devices=["dev-1"]))
    return lab


def test_device_add_writes_a_0600_bundle_and_registers_it_behind_the_gateway(lab: HomeLab) -> None:
    r = cwsnet("device", "add", "kitchen", "--site", "home", "--data-dir", str(lab.dir))
    assert r.returncode == 0, r.stderr
    path = lab.bundle_path("kitchen")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    b = Bundle.load_node(path)
    assert b.gateway == "gw-home" and b.kv == 1 and b.mqtt_password
    assert b.mqtt_password not in r.stdout + r.stderr
    assert json.loads(path.read_text())["secret_key"] not in r.stdout + r.stderr
    e = Registry.load(lab.path("registry.json")).get("kitchen")
    assert e is not None and e.public_key == b.identity.public_b64 and e.gateway == "gw-home"
    assert e.mqtt_token_sha256 == hashlib.sha256(b.mqtt_password.encode()).hexdigest()

    listed = json.loads(cwsnet("device", "list", "--json", "--data-dir", str(lab.dir)).stdout)
    assert {d["id"] for d in listed} == {"dev-1", "kitchen"} and all("mqtt_token_sha256" not in d for d in listed)


def test_device_rotate_rewrites_the_bundle_with_the_next_key_version(lab: HomeLab) -> None:
    before = Bundle.load_node(lab.bundle_path("dev-1"))
    r = cwsnet("device", "rotate", "dev-1", "--grace", "120", "--data-dir", str(lab.dir))
    assert r.returncode == 0, r.stderr
    after = Bundle.load_node(lab.bundle_path("dev-1"))
    assert after.kv == 2 and after.identity.public_b64 != before.identity.public_b64
    assert after.mqtt_password == before.mqtt_password  # the token only changes with --mqtt-token
    e = Registry.load(lab.path("registry.json")).get("dev-1")
    assert e is not None and e.kv == 2 and e.public_key == after.identity.public_b64
    assert [(p.kv, p.public_key) for p in e.previous_keys] == [(1, before.identity.public_b64)]
    show = cwsnet("device", "show", "dev-1", "--data-dir", str(lab.dir)).stdout
    assert "key version 2" in show and "previous key version 1" in show

    r = cwsnet("device", "rotate", "dev-1", "--mqtt-token", "--data-dir", str(lab.dir))
    assert r.returncode == 0 and Bundle.load_node(lab.bundle_path("dev-1")).mqtt_password != before.mqtt_password


def test_device_revoke_is_final_and_init_does_not_undo_it(lab: HomeLab) -> None:
    assert cwsnet("device", "add", "shed", "--site", "home", "--data-dir", str(lab.dir)).returncode == 0
    r = cwsnet("device", "revoke", "shed", "--data-dir", str(lab.dir))
    assert r.returncode == 0 and "revoked" in r.stdout
    lab.init(Topology.load(lab.topology_file))  # `cwsnet up` runs init again
    assert not Registry.load(lab.path("registry.json")).get("shed").active  # type: ignore[union-attr]
    users = json.loads(lab.path("brokers", "site-home-users.json").read_text())["users"]
    assert "shed" not in users and "kitchen" in users
    assert lab.revoked() == {"shed"}
    assert "already revoked" in cwsnet("device", "revoke", "shed", "--data-dir", str(lab.dir)).stdout


@pytest.mark.parametrize(("args", "message"), [
    (["add", "bad/name", "--site", "home"], "device name 'bad/name' is not a valid name"),
    (["add", "cloud", "--site", "home"], "device name 'cloud' is reserved"),
    (["add", "dev-1", "--site", "home"], "already exists"),
    (["show", "nobody"], "no node named 'nobody' in the registry"),
    (["rotate", "gw-home"], "'gw-home' is a gateway, not a device"),
    (["rotate", "dev-1", "--grace", "-1"], "--grace must be between 0"),
    (["revoke", "cloud"], "the cloud's own identity cannot be revoked"),
])
def test_device_commands_refuse_bad_input_with_exit_2(lab: HomeLab, args: list[str], message: str) -> None:
    r = cwsnet("device", *args, "--data-dir", str(lab.dir))
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr


def test_device_commands_need_a_registry(tmp_path: Path) -> None:
    r = cwsnet("device", "list", "--data-dir", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no registry here" in r.stderr


def test_revs_order_versions_of_one_registry_only(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    Registry({"dev-1": entry()}).save(path)
    first = Registry.load(path)
    with registry.editing(path) as reg:
        reg.revoke("dev-1")
    second = Registry.load(path)
    assert second.instance == first.instance and second.rev == first.rev + 1
    assert second.newer_than(first) and not first.newer_than(second)
    Registry({"dev-1": entry()}).save(tmp_path / "again.json")  # a re-created registry, rev 1 again
    recreated = Registry.load(tmp_path / "again.json")
    assert recreated.rev < second.rev and recreated.newer_than(second)


def test_a_rotation_interrupted_before_its_rename_is_completed_by_the_next(lab: HomeLab) -> None:
    assert cwsnet("device", "add", "porch", "--site", "home", "--data-dir", str(lab.dir)).returncode == 0
    bundle = lab.bundle_path("porch")
    before = bundle.read_text()
    assert cwsnet("device", "rotate", "porch", "--data-dir", str(lab.dir)).returncode == 0
    rotated = bundle.read_text()
    # as if it had stopped after writing the registry: the new bundle still under .new
    bundle.with_name("porch.json.new").write_text(rotated)
    bundle.write_text(before)
    r = cwsnet("device", "rotate", "porch", "--data-dir", str(lab.dir))
    assert r.returncode == 0 and "completed the interrupted rotation" in r.stdout
    assert bundle.read_text() == rotated and not bundle.with_name("porch.json.new").exists()
