"""Property-based fuzzing (hypothesis): the envelope decoder and the REST bodies.

Whatever bytes arrive, the decoder answers with a header or an ``EnvelopeError`` naming the
reason, never another exception; a sealed message with any byte changed never opens as something
else. Whatever JSON (or non-JSON) a client posts, the API answers 2xx or a 4xx JSON error, never
a 500, and nothing is stored from a refused body.
"""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_cloud_api import Env

from cwsnet import envelope, topics
from cwsnet.endpoint import Endpoint
from cwsnet.errors import EnvelopeError
from cwsnet.identity import Identity
from cwsnet.replay import SeqCounter

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

DEV = Identity.generate("dev-1", "home", "device")
CLOUD = Identity.generate("cloud", "home", "cloud")
KEYS = {"dev-1": DEV.public_key, "cloud": CLOUD.public_key}
TOPIC = topics.telemetry("home", "dev-1", "env")

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
header_like = st.dictionaries(
    st.sampled_from(["v", "id", "from", "to", "seq", "ts", "kind", "tc", "kv", "exp", "zz"]), cbor_values, max_size=9
)


def open_as_cloud(payload: bytes, topic: str = TOPIC) -> envelope.Opened:
    return envelope.open_envelope(payload, topic=topic, me="cloud", my_key=CLOUD.secret_key, sender_key=KEYS.get)


def check_decoder(payload: bytes) -> None:
    try:
        header = envelope.peek_header(payload)
    except EnvelopeError as exc:
        assert exc.reason and str(exc)
        return
    assert isinstance(header.sender, str) and 0 <= header.seq < 2**63
    with pytest.raises(EnvelopeError):  # junk never opens: nobody sealed it
        open_as_cloud(payload)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_are_refused_with_a_reason(payload: bytes) -> None:
    check_decoder(payload)


@FUZZ
@given(header_like, st.binary(max_size=30), st.binary(max_size=80), st.booleans())
def test_envelope_shaped_junk_is_refused_with_a_reason(h: dict, n: bytes, c: bytes, raw_header: bool) -> None:
    h_bytes = cbor2.dumps(h) if not raw_header else cbor2.dumps(h)[:5]
    check_decoder(cbor2.dumps({"h": h_bytes, "n": n, "c": c}))


@FUZZ
@given(st.data())
def test_a_sealed_message_with_any_byte_changed_never_opens_as_another(data: st.DataObject) -> None:
    dev = Endpoint(DEV, SeqCounter(7, lambda _m: None), KEYS.get)
    body = {"stream": "env", "readings": [{"ts": 1, "values": {"t": 21.5}}]}
    payload, header = dev.seal(TOPIC, "telemetry", body, to="cloud")
    i = data.draw(st.integers(0, len(payload) - 1), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    changed = payload[:i] + bytes([payload[i] ^ flip]) + payload[i + 1:]
    try:
        opened = open_as_cloud(changed)
    except EnvelopeError as exc:
        assert exc.reason in {"malformed", "version", "wrong_recipient", "unknown_sender", "forged",
                              "topic_mismatch"}, exc.reason
    else:  # a change CBOR does not see (e.g. a length encoding) may open, but only as the same message
        assert opened.body == body and opened.header == header


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=15,
)
task_like = st.fixed_dictionaries(
    {}, optional={"target": json_values | st.sampled_from(["dev-1", "gw-1", "nope", "dev-1/x"]),
                  "handler": json_values | st.sampled_from(["echo", "sleep", "bad name"]),
                  "args": json_values, "timeout": json_values | st.floats(-1, 1e9), "extra": json_values},
)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    """The in-process API of ``test_cloud_api`` (a real SQLite store, no sockets)."""
    e = Env(tmp_path)
    yield e
    e.close()


@FUZZ
@given(body=st.one_of(task_like, json_values))
def test_any_task_body_gets_a_created_task_or_a_json_4xx(env: Env, body: object) -> None:
    before = env.store.list_tasks(limit=1000).total
    resp = env.client.post("/api/v1/tasks", json=body)
    # (503: a scheduled task, no target, and this API runs without the scheduler)
    assert resp.status_code in (201, 404, 413, 422, 503), (resp.status_code, resp.text)
    answer = resp.json()
    after = env.store.list_tasks(limit=1000).total
    if resp.status_code == 201:
        assert answer["state"] == "queued" and after == before + 1
    else:
        assert isinstance(answer, dict) and answer, resp.text
        assert after == before  # a refused body stores nothing


@FUZZ
@given(raw=st.binary(max_size=200), ctype=st.sampled_from(["application/json", "text/plain", "application/cbor"]))
def test_non_json_bodies_are_refused_cleanly(env: Env, raw: bytes, ctype: str) -> None:
    for url in ("/api/v1/tasks", "/api/v1/tasks/no-such-task/cancel"):
        resp = env.client.post(url, content=raw, headers={"content-type": ctype})
        assert 200 <= resp.status_code < 500, (url, resp.status_code, resp.text)
        assert resp.status_code == 201 or resp.json(), resp.text


# -- the operator API: login, accounts, tokens -------------------------------------------------------

names = st.sampled_from(["root", "ROOT", "alice", "fuzzee", "nobody", "", "a b", "x" * 70, "dev-1"])
roles = st.sampled_from(["viewer", "operator", "admin", "root", ""])
passwords = st.text(max_size=40) | st.sampled_from(["correct horse battery", "short", "\x00" * 9, "p" * 1025])
login_like = st.fixed_dictionaries(
    {}, optional={"username": json_values | names, "password": json_values | passwords,
                  "token": json_values | st.text(max_size=80) | st.sampled_from(["x" * 600]), "extra": json_values},
)
account_like = st.fixed_dictionaries(
    {}, optional={"username": json_values | names, "role": json_values | roles, "password": json_values | passwords,
                  "extra": json_values},
)
account_update_like = st.fixed_dictionaries(
    {}, optional={"role": json_values | roles, "password": json_values | passwords, "extra": json_values},
)
token_like = st.fixed_dictionaries(
    {}, optional={"account": json_values | names, "name": json_values | st.sampled_from(["ci", "bad/name", "", " x"]),
                  "expires_days": json_values | st.floats(-1, 1e6), "extra": json_values},
)
good_names = st.sampled_from(["root", "alice", "fuzzee", "nobody"]) | st.from_regex(r"[a-z][a-z0-9.@_-]{0,10}", fullmatch=True)
good_passwords = st.sampled_from(["correct horse battery"]) | st.text(min_size=8, max_size=30)
good_roles = st.sampled_from(["viewer", "operator", "admin"])
#: "METHOD url" -> body strategy, for every operator route that takes a body: plausible bodies
#: (mostly accepted, or refused for what they mean: a wrong password, a taken name) and junk
OPERATOR_BODIES = {
    "POST /api/v1/auth/login": st.fixed_dictionaries({"username": good_names, "password": good_passwords})
    | st.fixed_dictionaries({"token": st.text(max_size=60)}) | login_like,
    "POST /api/v1/accounts": st.fixed_dictionaries(
        {"username": good_names, "role": good_roles}, optional={"password": good_passwords}) | account_like,
    "PATCH /api/v1/accounts/fuzzee": st.fixed_dictionaries(
        {}, optional={"role": good_roles, "password": good_passwords}) | account_update_like,
    "POST /api/v1/tokens": st.fixed_dictionaries(
        {"account": good_names, "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 _.@:-]{0,20}", fullmatch=True)},
        optional={"expires_days": st.floats(0, 40000) | st.integers(-5, 40000)}) | token_like,
}


def answered_cleanly(resp: object) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text)  # type: ignore[attr-defined]
    if resp.status_code != 204:  # type: ignore[attr-defined]
        assert isinstance(resp.json(), dict) and resp.json(), resp.text  # type: ignore[attr-defined]
    if resp.status_code >= 400:  # type: ignore[attr-defined]
        assert set(resp.json()) == {"error"}, resp.text  # type: ignore[attr-defined]


@pytest.fixture
def op_env(env: Env) -> Env:
    """``env`` with an operator account ``fuzzee`` (with a password) for the PATCH route to change."""
    env.auth.create_account("fuzzee", "operator", "correct horse battery")
    return env


@FUZZ
@given(route=st.sampled_from(sorted(OPERATOR_BODIES)), data=st.data())
def test_any_operator_body_gets_a_2xx_or_a_json_4xx(op_env: Env, route: str, data: st.DataObject) -> None:
    method, url = route.split()
    body = data.draw(OPERATOR_BODIES[route] | json_values, label="body")
    resp = op_env.client.request(method, url, json=body)
    event(f"{route} -> {resp.status_code}")
    answered_cleanly(resp)
    assert op_env.auth.count_accounts(role="admin") >= 1  # nothing ever leaves the API without an admin


@FUZZ
@given(raw=st.binary(max_size=200), ctype=st.sampled_from(["application/json", "text/plain", "application/cbor"]),
       route=st.sampled_from(sorted(OPERATOR_BODIES)))
def test_non_json_operator_bodies_are_refused_cleanly(op_env: Env, raw: bytes, ctype: str, route: str) -> None:
    method, url = route.split()
    resp = op_env.client.request(method, url, content=raw, headers={"content-type": ctype})
    answered_cleanly(resp)
    assert resp.status_code in (400, 401, 422, 429), resp.text  # no bytes make a valid body
