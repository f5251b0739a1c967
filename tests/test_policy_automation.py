"""Automation policies (issue 6): `when <condition> [for <duration>] then <actions>`, fired exactly once per
episode (hysteresis, cooldown), per node, on the observations' own clocks, with state that survives a restart,
and files refused with file:line:col: field messages. The engine is sans-I/O: no sleeps here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cwsnet.policy import PolicyError, load_policies
from cwsnet.policy.automation import (
    Alert,
    AutomationEngine,
    Firing,
    Observation,
    RunTask,
    SendCommand,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000  # ms: 2023-11-14T22:13:20Z

GREENHOUSE = """\
kind: automation
name: greenhouse
rules:
  - name: too-hot
    on: {kind: telemetry, stream: env}
    when: 'values.temp_c > 30.0'
    for: 30s
    clear_when: 'values.temp_c < 28.0'
    then:
      - alert: {severity: warning, message: "{node} is at {values.temp_c} C"}
      - task: {handler: sha256, args: {data: "x"}, on: gateway}
"""


def engine(tmp_path: Path, text: str = GREENHOUSE, at: str = "gateway", **kw) -> AutomationEngine:
    (tmp_path / "auto.yaml").write_text(text)
    return AutomationEngine(load_policies([tmp_path]), at, **kw)


def reading(t_s: float, temp: float | None, node: str = "dev-1", site: str = "home", stream: str = "env",
            **values) -> Observation:
    if temp is not None:
        values["temp_c"] = temp
    return Observation(site, node, "telemetry", stream, values, T0 + int(t_s * 1000))


def feed(e: AutomationEngine, *observations: Observation, delay_ms: int = 0) -> list[Firing]:
    """Observe each as it arrives ``delay_ms`` after its own timestamp."""
    out = []
    for o in observations:
        out += e.observe(o, o.ts + delay_ms)
    return out


# ---- once per episode ----------------------------------------------------------------------------

def noisy_series(rng: random.Random) -> list[tuple[int, float]]:
    """Two hours of a reading every 5 s: three hot spells, each 2 min clearly hot then 8 min hovering around
    30 (28.5-31.5, so it keeps crossing 30 but never drops below 28), with cool noise between."""
    out = []
    for i in range(0, 7200, 5):
        phase = i % 2400
        if i < 7200 and 600 <= phase < 720:
            v = 32 + rng.uniform(-0.5, 0.5)
        elif 720 <= phase < 1200:
            v = 30 + rng.uniform(-1.5, 1.5)
        else:
            v = 25 + rng.uniform(-1.5, 1.5)
        out.append((i, round(v, 2)))
    return out


def test_a_rule_fires_exactly_once_per_episode_over_a_noisy_series_thanks_to_hysteresis(tmp_path: Path) -> None:
    text = GREENHOUSE + """\
  - name: no-for
    on: {kind: telemetry, stream: env}
    when: 'values.temp_c > 30.0'
    clear_when: 'values.temp_c < 28.0'
    then:
      - alert: {message: "{node} hot"}
  - name: no-hysteresis
    on: {kind: telemetry, stream: env}
    when: 'values.temp_c > 30.0'
    then:
      - alert: {message: "{node} hot"}
"""
    e = engine(tmp_path, text)
    series = noisy_series(random.Random(6))
    fired: dict[str, list[Firing]] = {}
    for t, v in series:
        for f in feed(e, reading(t, v), delay_ms=200):
            fired.setdefault(f.rule, []).append(f)
        e.tick(T0 + t * 1000 + 2500)  # the daemon's 1 s timer, roughly: nothing due between readings
    hot_starts = [600, 3000, 5400]
    # the acceptance case: above 30 for 30 s -> an alert and a task on the gateway, once per episode
    assert [(f.since_ms - T0) // 1000 for f in fired["too-hot"]] == hot_starts
    assert [(f.at_ms - T0) // 1000 for f in fired["too-hot"]] == [s + 30 for s in hot_starts]
    f = fired["too-hot"][0]
    assert [a.kind for a in f.actions] == ["alert", "task"]
    assert isinstance(f.actions[1], RunTask) and f.actions[1].target == "gateway" and f.actions[1].args == {"data": "x"}
    assert f.actions[0].message == f"dev-1 is at {f.values['temp_c']} C"
    assert [(f.since_ms - T0) // 1000 for f in fired["no-for"]] == hot_starts
    assert len(fired["no-hysteresis"]) > 10  # what clear_when prevents: a re-fire at every crossing of 30


def test_for_needs_the_condition_to_hold_without_a_dip(tmp_path: Path) -> None:
    e = engine(tmp_path)
    assert feed(e, reading(0, 31), reading(10, 31), reading(20, 29.5), reading(25, 31), reading(40, 31)) == []
    assert "pending since 2023-11-14T22:13:45Z" in e.explain()  # the dip at 20 s restarted the clock at 25 s
    [f] = feed(e, reading(55, 31.5))
    assert (f.since_ms, f.at_ms) == (T0 + 25_000, T0 + 55_000)
    assert "held from 2023-11-14T22:13:45Z to 2023-11-14T22:14:15Z (30 s; for 30 s)" in f.explain()


def test_tick_fires_a_for_rule_when_no_new_reading_comes(tmp_path: Path) -> None:
    e = engine(tmp_path)
    assert feed(e, reading(0, 31)) == []
    assert e.tick(T0 + 29_999) == []
    [f] = e.tick(T0 + 30_000)
    assert f.at_ms == T0 + 30_000 and f.since_ms == T0
    assert e.tick(T0 + 60_000) == [] and e.tick(T0 + 600_000) == []  # once per episode


def test_tick_counts_on_the_devices_clock_so_a_clock_behind_does_not_fire_early(tmp_path: Path) -> None:
    e = engine(tmp_path)
    late = reading(0, 31)  # the device's clock is 10 min behind the gateway's
    assert e.observe(late, late.ts + 600_000) == []
    assert e.tick(late.ts + 601_000) == []  # only 1 s after the reading arrived
    [f] = e.tick(late.ts + 630_000)
    assert f.at_ms == late.ts + 30_000  # on the device's clock, like the readings


# ---- cooldown, nodes, audit ----------------------------------------------------------------------

COOLDOWN = """\
kind: automation
name: door
rules:
  - name: open-too-often
    on: {kind: telemetry, stream: env}
    when: 'values.temp_c > 30.0'
    cooldown: 10m
    then:
      - alert: {severity: info, message: "{node}: {values.temp_c}"}
"""


def test_cooldown_holds_a_new_episode_back_and_fires_it_when_it_ends_if_still_true(tmp_path: Path) -> None:
    e = engine(tmp_path, COOLDOWN)
    [first] = feed(e, reading(0, 31))
    assert feed(e, reading(60, 25)) == []  # the episode ends
    assert feed(e, reading(120, 32), reading(300, 33)) == []  # a new one, inside the cooldown
    assert "held back by the cooldown until 2023-11-14T22:23:20Z" in e.explain("open-too-often")
    assert e.tick(T0 + 599_000) == []
    [second] = e.tick(T0 + 600_000)
    assert (second.since_ms, second.at_ms) == (T0 + 120_000, T0 + 600_000)
    assert second.values == {"temp_c": 33} and second.actions[0].message == "dev-1: 33"
    assert "held back by the cooldown (10 min) of the firing at 2023-11-14T22:13:20Z" in second.explain()
    # an episode that ends inside the cooldown never fires
    assert feed(e, reading(700, 25), reading(710, 31), reading(800, 25)) == []
    assert e.tick(T0 + 1_300_000) == []
    assert first.at_ms == T0


def test_each_node_has_its_own_episode_and_the_match_narrows_nodes_and_sites(tmp_path: Path) -> None:
    e = engine(tmp_path, GREENHOUSE.replace("stream: env}", "stream: env, node: 'dev-*', site: home}"))
    fired = feed(e, reading(0, 31, "dev-1"), reading(0, 31, "dev-2"), reading(15, 31, "dev-1"),
                 reading(15, 29, "dev-2"),  # dev-2 dips; dev-1 does not care
                 reading(30, 31, "dev-1"), reading(30, 31, "dev-2"), reading(45, 31, "dev-2"),
                 reading(60, 31, "dev-2"), reading(60, 31, "dev-1"),
                 reading(0, 40, "pump-1"), reading(40, 40, "pump-1"), reading(0, 40, "dev-3", site="lab"),
                 reading(40, 40, "dev-3", site="lab"), reading(40, 40, "dev-4", stream="power"))
    assert [(f.node, (f.at_ms - T0) // 1000) for f in fired] == [("dev-1", 30), ("dev-2", 60)]


def test_an_audit_policy_reports_its_firings_once_per_episode_without_enforcing(tmp_path: Path) -> None:
    e = engine(tmp_path, GREENHOUSE.replace("name: greenhouse", "name: greenhouse\nmode: audit"))
    fired = feed(e, *(reading(t, 31) for t in range(0, 300, 10)))
    [f] = fired
    assert f.mode == "audit"
    text = f.explain()
    assert text.startswith("WOULD FIRE: greenhouse/too-hot for dev-1 (site home)")
    assert "audit: policy greenhouse is in audit mode; reported, the actions are not run" in text
    assert "[audit]" in e.explain()


def test_the_explanation_names_the_rule_its_source_line_and_what_held(tmp_path: Path) -> None:
    e = engine(tmp_path)
    [f] = feed(e, reading(0, 31), reading(30, 31.5))
    assert f.explain().splitlines() == [
        "FIRE: greenhouse/too-hot for dev-1 (site home)",
        f"  decided by greenhouse/too-hot ({tmp_path}/auto.yaml:4)",
        "  when values.temp_c > 30.0 held from 2023-11-14T22:13:20Z to 2023-11-14T22:13:50Z (30 s; for 30 s)",
        "  values: temp_c=31.5 (telemetry/env)",
        "  then: alert warning 'dev-1 is at 31.5 C', task sha256 on gateway",
    ]
    state = e.explain(now_ms=T0 + 31_000)
    assert f"greenhouse/too-hot ({tmp_path}/auto.yaml:4): when values.temp_c > 30.0 for 30 s, clear when " \
           "values.temp_c < 28.0" in state
    assert "dev-1 (site home): firing since 2023-11-14T22:13:50Z (true since 2023-11-14T22:13:20Z)" in state
    assert e.explain("nope") == "no automation rule 'nope' runs at the gateway"


# ---- what the conditions see -----------------------------------------------------------------------

def test_a_missing_value_neither_starts_nor_ends_an_episode(tmp_path: Path) -> None:
    e = engine(tmp_path, GREENHOUSE.replace("stream: env}", "stream: '*'}"))
    assert feed(e, reading(0, 31), reading(10, None, stream="power", watts=5)) == []
    assert "no value temp_c in the observation at 2023-11-14T22:13:30Z; state unchanged" in e.explain()
    [f] = feed(e, reading(30, 31))  # pending survived the reading without temp_c
    assert f.since_ms == T0
    assert feed(e, reading(40, None, stream="power", watts=5), reading(50, 31)) == []  # nor does it end it
    assert feed(e, reading(60, 27), reading(70, 31), reading(100, 31))[0].since_ms == T0 + 70_000
    evaluations = e.evaluations
    feed(e, reading(110, None, stream="power", watts=5))
    assert e.evaluations == evaluations  # a missing value is not even evaluated


def test_numbers_compare_whether_a_device_sends_integers_or_decimals(tmp_path: Path) -> None:
    e = engine(tmp_path, COOLDOWN.replace("values.temp_c > 30.0", "values.temp_c > 30 && values.count == 3.0"))
    assert feed(e, reading(0, 31, count=3))[0].values == {"temp_c": 31, "count": 3}
    e = engine(tmp_path, COOLDOWN)
    assert len(feed(e, reading(0, 31))) == 1  # an integer reading against a 30.0 threshold


def test_status_and_event_rules_match_their_own_observations(tmp_path: Path) -> None:
    text = """\
kind: automation
name: site
rules:
  - name: battery-low
    on: {kind: status}
    when: 'values.battery < 10 && kind == "status" && stream == null'
    then:
      - command: {handler: echo, args: {say: charge}, to: node}
  - name: door-forced
    on: {kind: event, type: "door.*"}
    when: 'values.forced == true && stream == "door.open"'
    then:
      - alert: {severity: critical, message: "{stream} on {node} at {site}"}
      - task: {handler: sha256, on: node}
"""
    e = engine(tmp_path, text)
    status = Observation("home", "dev-1", "status", None, {"battery": 5}, T0)
    [f] = e.observe(status, T0)
    assert f.actions == [SendCommand("echo", {"say": "charge"}, "node", "dev-1")]
    assert e.observe(Observation("home", "dev-2", "telemetry", "status", {"battery": 5}, T0), T0) == []
    door = Observation("home", "dev-7", "event", "door.open", {"forced": True}, T0)
    [f] = e.observe(door, T0)
    assert f.actions == [Alert("critical", "door.open on dev-7 at home"), RunTask("sha256", {}, "node", "dev-7")]
    assert e.observe(Observation("home", "dev-8", "event", "window.open", {"forced": True}, T0), T0) == []


def test_an_older_reading_than_one_already_seen_is_ignored(tmp_path: Path) -> None:
    e = engine(tmp_path)
    assert feed(e, reading(0, 31), reading(20, 31), reading(10, 25)) == []  # late and out of order: no reset
    assert e.stale == 1
    assert len(feed(e, reading(30, 31))) == 1


def test_templates_render_names_values_and_formats(tmp_path: Path) -> None:
    ctx = {"node": "dev-1", "site": "home", "rule": "too-hot", "policy": "greenhouse", "stream": "env"}
    got = render("{policy}/{rule}: {node}@{site} {stream} {values.temp_c:.1f} C {{ok}} {values.rh} {values.s:.1f}",
                 ctx, {"temp_c": 31.25, "s": "x"})
    assert got == "greenhouse/too-hot: dev-1@home env 31.2 C {ok} ? x"
    e = engine(tmp_path, GREENHOUSE.replace("{node} is at {values.temp_c} C", "{site}/{node}: {values.temp_c:.0f}"))
    [f] = feed(e, reading(0, 31.6), reading(30, 31.6))
    assert f.actions[0] == Alert("warning", "home/dev-1: 32")


# ---- the file format ------------------------------------------------------------------------------

HEAD = "kind: automation\nname: x\nrules:\n  - name: r\n    on: {kind: telemetry, stream: env}\n"
OK_THEN = "    then:\n      - alert: {message: hi}\n"
BAD = [
    (HEAD + "    when: 'values.t > 1.0'\n", "bad.yaml:4:5: rules.0.then: required field is missing"),
    (HEAD + "    when: 'values.t > 1.0'\n    then: []\n",
     "bad.yaml:7:5: rules.0.then: List should have at least 1 item"),
    (HEAD + "    when: 'values.t > 1.0'\n    then:\n" + "      - alert: {message: hi}\n" * 9,
     "bad.yaml:7:5: rules.0.then: List should have at most 8 items"),
    (HEAD + "    when: 'values.t > 1.0'\n    then:\n      - alert: {message: hi}\n      - alert: {message: hi}\n"
     "        task: {handler: echo}\n",
     "bad.yaml:9:9: rules.0.then.1: an action is exactly one of alert, task or command (got alert and task)"),
    (HEAD + "    when: 'values.t > 1.0'\n    then:\n      - {}\n",
     "bad.yaml:7:5: rules.0.then.0: an action is exactly one of alert, task or command (got none)"),
    (HEAD + "    when: 'values.t >'\n" + OK_THEN, "bad.yaml:6:5: rules.0.when: Value error, not a valid CEL expression"),
    (HEAD + "    when: 'true'\n    clear_when: 'values.t <<< 2'\n" + OK_THEN,
     "bad.yaml:7:5: rules.0.clear_when: Value error, not a valid CEL expression"),
    (HEAD + "    when: 'value.t > 1.0'\n" + OK_THEN,
     "bad.yaml:6:5: rules.0.when: Value error, unknown name 'value': a condition can read node, site, kind, stream, "
     "values, ts"),
    (HEAD + "    when: 'true'\n    then:\n      - alert: {severity: info, message: '{device} is hot'}\n",
     "bad.yaml:8:33: rules.0.then.0.alert.message: Value error, unknown placeholder {device} (use {node}, {site}"),
    (HEAD + "    when: 'true'\n    then:\n      - alert: {message: 'a } b'}\n",
     "bad.yaml:8:17: rules.0.then.0.alert.message: Value error, Single '}' encountered in format string"),
    (HEAD + "    when: 'true'\n    for: soon\n" + OK_THEN,
     "bad.yaml:7:5: rules.0.for: Value error, for must be a duration like 30s, 5m, 1h or 7d (got 'soon')"),
    (HEAD + "    when: 'true'\n    cooldown: -5\n" + OK_THEN,
     "bad.yaml:7:5: rules.0.cooldown: Value error, cooldown must be between 0 and 10 years (got -5)"),
    (HEAD + "    when: 'true'\n    then:\n      - task: {handler: 'Run Me'}\n",
     "bad.yaml:8:16: rules.0.then.0.task.handler: Value error, a handler name is 1-63 characters"),
    (HEAD + "    when: 'true'\n    then:\n      - command: {handler: echo, args: [1, 2]}\n",
     "bad.yaml:8:34: rules.0.then.0.command.args: Input should be a valid dictionary"),
    (HEAD + "    when: 'true'\n    then:\n      - task: {handler: echo, on: 'a/b'}\n",
     "bad.yaml:8:9: rules.0.then.0.task.on: Value error, must be gateway, cloud, node or a node id"),
    (HEAD + "    when: 'true'\n    then:\n      - command: {handler: echo, to: dev-2, colour: red}\n",
     "bad.yaml:8:45: rules.0.then.0.command.colour: unknown key"),
    (HEAD + "    at: edge\n    when: 'true'\n" + OK_THEN, "bad.yaml:6:5: rules.0.at: Input should be 'gateway' or 'cloud'"),
    ("kind: automation\nname: x\nrules:\n  - name: r\n    on: {kind: status, stream: env}\n    when: 'true'\n" + OK_THEN,
     "bad.yaml:4:5: rules.0.on: stream applies to telemetry only"),
    ("kind: automation\nname: x\nrules:\n  - name: r\n    when: 'true'\n" + OK_THEN,
     "bad.yaml:4:5: rules.0.on: required field is missing"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e.split(": ", 1)[1][:48] for _, e in BAD])
def test_an_invalid_automation_policy_is_refused_with_file_line_col_and_field(tmp_path: Path, text: str,
                                                                             expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_policies([tmp_path])
    assert any(p.replace(str(tmp_path) + "/", "").startswith(expected) for p in exc.value.problems), \
        exc.value.problems


@pytest.mark.parametrize("when", ['values.exists(k, k.startsWith("temp"))', "[1, 2].all(x, x > 0) && ts > 0",
                                  "type(values.t) == double", 'size(values) > 0 && node != site && kind == "event"',
                                  'has(values.t) && values["t"] > 1.0 && stream == null'])
def test_conditions_may_use_macros_types_and_every_variable(tmp_path: Path, when: str) -> None:
    head = HEAD.replace("telemetry, stream: env", "event")
    (tmp_path / "ok.yaml").write_text(head + f"    when: >-\n      {when}\n" + OK_THEN)
    assert AutomationEngine(load_policies([tmp_path]), "gateway").rules == ["x/r"]


def test_on_may_be_written_quoted_or_not(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GREENHOUSE.replace("    on:", '    "on":').replace("name: greenhouse", "name: q"))
    (tmp_path / "b.yaml").write_text(GREENHOUSE)  # YAML 1.1 reads a bare `on:` key as true
    e = AutomationEngine(load_policies([tmp_path]), "gateway")
    assert e.rules == ["greenhouse/too-hot", "q/too-hot"]
    assert len(feed(e, reading(0, 31), reading(30, 31))) == 2


def test_each_tier_runs_only_its_own_rules(tmp_path: Path) -> None:
    text = GREENHOUSE + """\
  - name: fleet-report
    at: cloud
    on: {kind: telemetry}
    when: 'values.temp_c > 30.0'
    then:
      - task: {handler: echo, on: cloud}
"""
    (tmp_path / "auto.yaml").write_text(text)
    pset = load_policies([tmp_path])
    gw, cloud = AutomationEngine(pset, "gateway"), AutomationEngine(pset, "cloud")
    assert gw.rules == ["greenhouse/too-hot"] and cloud.rules == ["greenhouse/fleet-report"]
    [f] = feed(cloud, reading(0, 31))
    assert f.rule == "fleet-report" and f.actions == [RunTask("echo", {}, "cloud", "cloud")]
    assert feed(gw, reading(0, 31)) == []  # pending for its 30 s, not the cloud's rule
    with pytest.raises(ValueError, match="gateway' or 'cloud"):
        AutomationEngine(pset, "edge")


def test_the_example_policy_loads_and_runs_at_both_tiers() -> None:
    pset = load_policies([ROOT / "policies" / "examples" / "automation-example.yaml"])
    gw, cloud = AutomationEngine(pset, "gateway"), AutomationEngine(pset, "cloud")
    assert gw.rules and cloud.rules
    assert all(r.startswith("greenhouse/") for r in gw.rules + cloud.rules)


# ---- state -----------------------------------------------------------------------------------------

def test_state_survives_a_restart_mid_episode_without_a_second_firing(tmp_path: Path) -> None:
    e = engine(tmp_path)
    [f] = feed(e, reading(0, 31), reading(30, 31))
    saved = json.loads(json.dumps(e.state()))  # what the daemon writes to disk
    again = engine(tmp_path)
    again.load_state(saved)
    assert feed(again, reading(40, 31), reading(80, 31)) == [] and again.tick(T0 + 200_000) == []
    assert feed(again, reading(90, 27), reading(100, 31), reading(130, 31))[0].since_ms == T0 + 100_000
    # pending when saved: the restarted engine fires at the right moment, from the original start
    pending = engine(tmp_path)
    feed(pending, reading(0, 31), reading(20, 31))
    restarted = engine(tmp_path)
    restarted.load_state(json.loads(json.dumps(pending.state())))
    [g] = feed(restarted, reading(30, 31))
    assert (g.since_ms, g.at_ms, g.values) == (f.since_ms, f.at_ms, {"temp_c": 31})


def test_a_cooldown_survives_a_restart_and_idle_nodes_cost_no_state(tmp_path: Path) -> None:
    e = engine(tmp_path, COOLDOWN)
    feed(e, *(reading(0, 20, node=f"dev-{i}") for i in range(100)))
    assert e.state() == {"version": 1, "rules": {}}  # a hundred idle nodes: nothing worth saving
    assert len(feed(e, reading(10, 31), reading(20, 25))) == 1  # dev-1 fired, then the episode ended
    saved = json.loads(json.dumps(e.state()))
    assert [s["node"] for s in saved["rules"]["door/open-too-often"]] == ["dev-1"]
    again = engine(tmp_path, COOLDOWN)
    again.load_state(saved)
    assert feed(again, reading(30, 32)) == []  # still cooling down after the restart
    [f] = again.tick(T0 + 610_000)
    assert f.since_ms == T0 + 30_000


def test_a_damaged_state_is_refused_and_a_removed_rule_is_forgotten(tmp_path: Path) -> None:
    e = engine(tmp_path)
    feed(e, reading(0, 31), reading(30, 31))
    good = e.state()
    for bad in ({}, {"version": 2, "rules": {}}, {"version": 1, "rules": {"greenhouse/too-hot": [{"phase": "x"}]}}):
        with pytest.raises(ValueError):
            e.load_state(bad)
    assert e.state() == good  # nothing changed
    other = engine(tmp_path, GREENHOUSE.replace("too-hot", "too-warm"))
    other.load_state(good)
    assert other.state() == {"version": 1, "rules": {}}


def test_the_state_is_bounded_per_rule_evicting_the_least_recently_seen(tmp_path: Path) -> None:
    e = engine(tmp_path, max_subjects=3)
    for i in range(5):
        feed(e, reading(0, 31, node=f"dev-{i}"))
    feed(e, reading(1, 31, node="dev-2"))  # seen again: most recent
    feed(e, reading(1, 31, node="dev-9"))
    assert e.evicted == 3
    nodes = [s["node"] for s in e.state()["rules"]["greenhouse/too-hot"]]
    assert nodes == ["dev-4", "dev-2", "dev-9"]
    assert sorted(f.node for f in e.tick(T0 + 60_000)) == ["dev-2", "dev-4", "dev-9"]  # the evicted forgotten


# ---- against a reference model -----------------------------------------------------------------------

def reference(events: list[tuple], high: float, low: float | None, for_ms: int, cool_ms: int) -> list[tuple[int, int]]:
    """The semantics written plainly for one subject: (since, at) of each firing."""
    phase, since, fired, last, seen, out = "idle", 0, None, None, 0, []

    def due(now: int) -> None:
        nonlocal phase, fired
        if now - since >= for_ms and (fired is None or not cool_ms or now >= fired + cool_ms):
            phase, fired = "firing", now
            out.append((since, now))

    for ev in events:
        if ev[0] == "tick":
            if phase == "pending":
                due(last + max(0, ev[1] - seen))
            continue
        _, ts, v, now = ev
        if last is not None and ts < last:
            continue
        last, seen = ts, now
        if v is not None and phase == "firing":
            if (v < low) if low is not None else not v > high:
                phase = "idle"
            continue
        if v is not None and v > high and phase == "idle":
            phase, since = "pending", ts
        elif v is not None and not v > high and phase == "pending":
            phase = "idle"
        if phase == "pending":
            due(ts)
    return out


def test_random_series_fire_exactly_when_a_reference_model_does(tmp_path: Path) -> None:
    combos = [(f, c, low) for f in (0, 10_000, 30_000) for c in (0, 60_000) for low in (None, 28.0)]
    rules = ""
    for i, (f, c, low) in enumerate(combos):
        rules += (f"  - name: r{i}\n    on: {{kind: telemetry}}\n    when: 'values.t > 30.0'\n"
                  + (f"    for: {f // 1000}s\n" if f else "") + (f"    cooldown: {c // 1000}s\n" if c else "")
                  + (f"    clear_when: 'values.t < {low}'\n" if low is not None else "")
                  + "    then:\n      - alert: {message: x}\n")
    (tmp_path / "r.yaml").write_text(f"kind: automation\nname: ref\nrules:\n{rules}")
    pset = load_policies([tmp_path])
    rng = random.Random(2024)
    checked = 0
    for _series in range(25):
        skew = rng.choice([0, -600_000, 90_000])
        now, events = T0, []
        for _ in range(80):
            now += rng.randint(1, 12) * 1000
            if rng.random() < 0.25:
                events.append(("tick", now))
                continue
            ts = now + skew - (rng.randint(1, 60) * 1000 if rng.random() < 0.1 else 0)
            v = None if rng.random() < 0.1 else rng.choice([26.0, 27.9, 28.5, 29.9, 30.0, 30.1, 31.0, 33.0])
            events.append(("obs", ts, v, now))
        e = AutomationEngine(pset, "gateway")
        got: dict[str, list[tuple[int, int]]] = {}
        for ev in events:
            if ev[0] == "tick":
                fs = e.tick(ev[1])
            else:
                _, ts, v, rnow = ev
                fs = e.observe(Observation("home", "dev-1", "telemetry", "env", {} if v is None else {"t": v}, ts),
                               rnow)
            for f in fs:
                got.setdefault(f.rule, []).append((f.since_ms, f.at_ms))
        for i, (f, c, low) in enumerate(combos):
            want = reference(events, 30.0, low, f, c)
            assert got.get(f"r{i}", []) == want, (i, f, c, low, events)
            checked += len(want)
    assert checked > 100  # the series do fire, often
