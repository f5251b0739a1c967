"""The policy engine (issue 6, first step): policy files validated with file:line:col errors, the
whole set refused on any error, CEL conditions, access decisions with explanations, and the
shipped default access policy deciding exactly what the brokers enforce today."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cwsnet import registry
from cwsnet.broker import filter_covers, topic_matches
from cwsnet.cli import main
from cwsnet.policy import AccessEngine, PolicyError, Subject, load_policies
from cwsnet.policy.cel import MAX_CHARS, Condition, ConditionError

SHIPPED = Path(__file__).resolve().parents[1] / "policies"


def engine(*folders: Path) -> AccessEngine:
    return AccessEngine(load_policies([SHIPPED, *folders]))


# ---- the shipped default states what the brokers enforce today ---------------------------------

def today(subject: Subject, action: str, topic: str, broker: str) -> bool:
    """What cwsnet.registry's broker ACLs allow (the code the policy must agree with)."""
    s = subject
    if s.role == "device":
        rules = registry.device_rules(s.site, s.id)
    elif s.role == "gateway":
        rules = ({"publish": [f"cws/v1/{s.site}/#"], "subscribe": [f"cws/v1/{s.site}/#"]} if broker == "site"
                 else registry.gateway_uplink_rules(s.site))
    elif s.role == "app":
        rules = {"publish": [], "subscribe": [f"cws/v1/_apps/{s.id}/#"]} if broker == "cloud" else {}
    elif s.role == "cloud":
        rules = {"publish": ["cws/v1/#"], "subscribe": ["cws/v1/#"]} if broker == "cloud" else {}
    else:
        rules = {}
    test = filter_covers if action == "subscribe" else topic_matches
    return any(test(f, topic) for f in rules.get(action, []))


SUBJECTS = [Subject("dev-1", "device", "home"), Subject("gw-home", "gateway", "home"),
            Subject("app-1", "app", "home"), Subject("cloud", "cloud", "home")]
CHANNELS = ["status", "telemetry/env", "event/door", "task/result", "receipt", "ota/get", "task/cmd", "ack",
            "config", "ota/data", "telemetry/env/extra"]
TOPICS = [f"cws/v1/{site}/{node}/{ch}" for site, node, ch in
          itertools.product(["home", "lab"], ["dev-1", "dev-2", "gw-home"], CHANNELS)]
FILTERS = TOPICS + ["#", "cws/v1/#", "cws/v1/home/#", "cws/v1/home/+/ack", "cws/v1/home/dev-1/#",
                    "cws/v1/home/dev-1/telemetry/+", "cws/v1/_apps/app-1/#", "cws/v1/_apps/app-2/#",
                    "cws/v1/_apps/app-1/home/dev-1/status", "$SYS/#"]


@pytest.mark.parametrize("broker", ["site", "cloud"])
@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.role)
def test_the_default_access_policy_decides_what_the_brokers_enforce(subject: Subject, broker: str) -> None:
    e = engine()
    checked = 0
    for action, topics in (("publish", TOPICS), ("subscribe", FILTERS)):
        for topic in topics:
            d = e.decide(subject, action, topic, broker)
            assert d.allowed == today(subject, action, topic, broker), d.explain()
            checked += 1
    assert checked == len(TOPICS) + len(FILTERS)


# ---- errors name file, line, column and field ---------------------------------------------------

BAD = [
    ("kind: access\nname: x\nrules:\n  - name: r\n    actions: [publish]\n    topics: [a]\n    colour: red\n",
     "bad.yaml:7:5: rules.0.colour: unknown key"),
    ("kind: access\nname: x\nrules:\n  - name: r\n    who: {role: robot}\n    actions: [publish]\n    topics: [a]\n",
     "bad.yaml:5:11: rules.0.who.role: Value error, must be one of device, gateway, app, operator, cloud or '*'"),
    ("kind: access\nname: x\nrules:\n  - name: r\n    actions: [publish]\n    topics: ['a/#/b']\n",
     "bad.yaml:6:5: rules.0.topics: Value error, 'a/#/b' is not a valid MQTT topic filter"),
    ("kind: access\nname: x\nrules:\n  - name: r\n    actions: [publish]\n    topics: ['a/{node}']\n",
     "bad.yaml:6:5: rules.0.topics: Value error, 'a/{node}': unknown placeholder {node}"),
    ("kind: access\nname: x\nrules:\n  - name: r\n    actions: [publish]\n    topics: [a]\n    when: 'subject.id =='\n",
     "bad.yaml:7:5: rules.0.when: Value error, not a valid CEL expression"),
    ("kind: access\nname: x\nrules:\n  - name: r\n    actions: [fly]\n    topics: [a]\n",
     "bad.yaml:5:5: rules.0.actions.0: Input should be 'publish', 'subscribe', 'command' or 'read'"),
    ("kind: teleport\nname: x\n", "bad.yaml:1:1: kind: must be one of"),
    ("kind: firewall\nname: x\n", "bad.yaml:1:1: kind: must be one of access, "),
    ("kind: access\nname: Bad Name\nrules: []\n", "bad.yaml:2:1: name: Value error, must be 1-63 characters"),
    ("kind: access\nname: x\nrules:\n  - {name: r, actions: [publish], topics: [a]}\n"
     "  - {name: r, actions: [read], topics: [b]}\n", "bad.yaml:3:1: rules: Value error, two rules are named 'r'"),
    ("kind: access\nname: x\nname: y\n", "bad.yaml:3:1: duplicate key 'name'"),
    ("kind: access\nname: [x\n", "bad.yaml:3:1: not valid YAML"),
    ("kind: access\nname: x\nrules:\n  - name: r\n    topics: [a]\n",
     "bad.yaml:4:5: rules.0.actions: required field is missing"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e.split(": ", 1)[1][:40] for _, e in BAD])
def test_an_invalid_policy_is_refused_with_file_line_col_and_field(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policies([tmp_path])
    assert any(p.replace(str(tmp_path) + "/", "").startswith(expected) for p in exc.value.problems), \
        exc.value.problems


def test_one_bad_file_refuses_the_whole_set_and_reports_every_problem(tmp_path: Path) -> None:
    (tmp_path / "a-good.yaml").write_text("kind: access\nname: ok\nrules:\n  - {name: r, actions: [read], topics: [a]}\n")
    (tmp_path / "b-bad.yaml").write_text("kind: access\nname: x\nrules:\n  - {name: r, actions: [fly], topics: [a]}\n"
                                         "---\nkind: access\nname: y\nrules:\n  - {name: r, actions: [read], "
                                         "topics: ['#/a']}\n")
    with pytest.raises(PolicyError) as exc:
        load_policies([tmp_path])
    assert len(exc.value.problems) == 2 and all("b-bad.yaml" in p for p in exc.value.problems)
    assert ":4:" in exc.value.problems[0] and ":9:" in exc.value.problems[1]  # the second document's line


# ---- decisions --------------------------------------------------------------------------------

SITE_POLICY = """\
kind: access
name: quarantine
description: a suspicious device may no longer report events
rules:
  - name: no-events-from-dev-9
    effect: deny
    who: {role: device, id: dev-9}
    actions: [publish]
    topics: ["cws/v1/{site}/{id}/event/+"]
---
kind: access
name: trial-lockdown
mode: audit
rules:
  - name: sensors-only-telemetry
    effect: deny
    who: {role: device, id: "sensor-*"}
    actions: [publish]
    topics: ["cws/v1/{site}/{id}/status"]
---
kind: access
name: lab-readers
rules:
  - name: lab-apps-no-status
    effect: deny
    who: {role: app}
    broker: cloud
    actions: [subscribe]
    topics: ["cws/v1/_apps/{id}/#"]
    when: 'subject.site == "lab" && topic.endsWith("/status")'
"""


def site(tmp_path: Path) -> AccessEngine:
    (tmp_path / "site.yaml").write_text(SITE_POLICY)
    return engine(tmp_path)


def test_a_site_deny_beats_the_default_allow_and_says_which_rule(tmp_path: Path) -> None:
    e = site(tmp_path)
    d = e.decide(Subject("dev-9", "device", "home"), "publish", "cws/v1/home/dev-9/event/door")
    assert not d.allowed and d.rule == "quarantine/no-events-from-dev-9"
    assert "site.yaml:5" in d.explain() and "cws/v1/home/dev-9/event/+" in d.explain()
    assert e.decide(Subject("dev-9", "device", "home"), "publish", "cws/v1/home/dev-9/status").allowed
    assert e.decide(Subject("dev-8", "device", "home"), "publish", "cws/v1/home/dev-8/event/door").allowed


def test_an_audit_policy_is_reported_not_enforced(tmp_path: Path) -> None:
    d = site(tmp_path).decide(Subject("sensor-1", "device", "home"), "publish", "cws/v1/home/sensor-1/status")
    assert d.allowed and d.rule == "default-access/device-uplink"
    assert [a.rule for a in d.audit] == ["sensors-only-telemetry"]
    assert "audit: trial-lockdown/sensors-only-telemetry would deny" in d.explain()


def test_a_cel_condition_narrows_a_rule(tmp_path: Path) -> None:
    e = site(tmp_path)
    lab_app, home_app = Subject("app-9", "app", "lab"), Subject("app-8", "app", "home")
    d = e.decide(lab_app, "subscribe", "cws/v1/_apps/app-9/lab/dev-1/status", "cloud")
    assert not d.allowed and d.rule == "lab-readers/lab-apps-no-status"
    d = e.decide(lab_app, "subscribe", "cws/v1/_apps/app-9/lab/dev-1/telemetry/env", "cloud")
    assert d.allowed and d.rule == "default-access/app-reads-its-own-topics"  # the condition is false
    assert e.decide(home_app, "subscribe", "cws/v1/_apps/app-8/home/dev-1/status", "cloud").allowed


def test_conditions_are_safe_and_bounded(tmp_path: Path) -> None:
    c = Condition('subject.role == "device" && topic.startsWith("cws/v1/")')
    assert c.evaluate({"subject": {"role": "device"}, "topic": "cws/v1/x"}) == (True, None)
    ok, err = c.evaluate({"subject": {}, "topic": "cws/v1/x"})  # a missing field: false, with the reason
    assert not ok and err
    with pytest.raises(ConditionError, match="characters"):
        Condition("true && " * (MAX_CHARS // 8 + 1) + "true")
    with pytest.raises(ConditionError, match="not a valid CEL"):
        Condition("subject.id ==")
    marker = tmp_path / "pwned"
    ok, err = Condition(f"__import__('os').system('touch {marker}') == 0").evaluate({})  # CEL, not Python
    assert not ok and err and not marker.exists()


# ---- the CLI -------------------------------------------------------------------------------------

def test_policy_check_and_explain_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    (data / "policies").mkdir(parents=True)
    assert main(["policy", "check", "--data-dir", str(data)]) == 0
    n = len(load_policies([SHIPPED]).files)
    assert f"ok: {n} policies from {n} files" in capsys.readouterr().out
    (data / "policies" / "site.yaml").write_text(SITE_POLICY)
    assert main(["policy", "check", "--data-dir", str(data)]) == 0
    assert f"ok: {n + 3} policies from {n + 1} files" in capsys.readouterr().out
    rc = main(["policy", "explain", "--device", "dev-9", "--role", "device", "--site", "home",
               "--topic", "cws/v1/home/dev-9/event/door", "--data-dir", str(data)])
    out = capsys.readouterr().out
    assert rc == 3 and out.startswith("DENY: device dev-9 (site home) publish cws/v1/home/dev-9/event/door")
    (data / "policies" / "broken.yaml").write_text("kind: access\nname: z\nrules:\n  - {name: r, topics: [a]}\n")
    assert main(["policy", "check", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml:4:6: rules.0.actions: required field is missing" in err


def test_a_changed_set_is_adopted_and_an_invalid_change_keeps_the_previous_one(tmp_path: Path) -> None:
    from cwsnet.policy.watch import PolicyWatcher

    site = tmp_path / "policies"
    site.mkdir()
    w = PolicyWatcher([SHIPPED, site], clock=lambda: 1.0)
    first = w.check()
    shipped = {p.policy.name for p in load_policies([SHIPPED]).policies}
    assert first is not None and first.accepted and set(first.names) == shipped
    assert w.check() is None  # nothing changed
    (site / "site.yaml").write_text(SITE_POLICY)
    ch = w.check()
    assert ch.accepted and set(ch.names) == shipped | {"quarantine", "trial-lockdown", "lab-readers"}
    (site / "site.yaml").write_text(SITE_POLICY.replace("actions: [publish]", "actions: [fly]", 1))
    ch = w.check()
    assert not ch.accepted and "site.yaml:8:" in ch.problems[0] and w.refused == ch.problems
    assert {lp.policy.name for lp in w.active.policies} == shipped | {"quarantine", "trial-lockdown",
                                                                      "lab-readers"}  # still enforced
    (site / "site.yaml").write_text(SITE_POLICY)
    ch = w.check()
    assert w.refused is None and (ch is None or ch.accepted)  # fixed: the same set as before, no error


@pytest.mark.integration
def test_the_cloud_reloads_policies_and_refuses_a_bad_change_keeping_the_last_good_set(tmp_path: Path, procs) -> None:
    from harness import wait_for
    from harness.deploy import Deployment, get

    d = Deployment(tmp_path, procs, devices=1)
    d.start_cloud()
    folder = d.lab.path("policies")
    folder.mkdir(exist_ok=True)
    (folder / "site.yaml").write_text(SITE_POLICY)
    n = len(load_policies([SHIPPED]).policies) + 3
    wait_for(lambda: len(get(f"{d.base}/api/v1/policies")["policies"]) == n, timeout=15,
             message="the site's policies adopted")
    (folder / "site.yaml").write_text(SITE_POLICY.replace("effect: deny", "effect: maybe", 1))
    body = wait_for(lambda: (b := get(f"{d.base}/api/v1/policies"))["refused"] and b, timeout=15,
                    message="the bad change refused")
    assert body["refused"][0].endswith("rules.0.effect: Input should be 'allow' or 'deny' (got 'maybe')")
    assert ":6:" in body["refused"][0]  # file:line:col of the bad field
    assert len(body["policies"]) == len(load_policies([SHIPPED]).policies) + 3  # the last good set is still active
    events = wait_for(lambda: [e for e in get(f"{d.base}/api/v1/events?limit=50")["items"]
                               if e["type"] in ("policy.changed", "policy.refused")] or None, timeout=15,
                      message="policy events")
    assert {e["type"] for e in events} >= {"policy.changed", "policy.refused"}
