"""``cwsnet task run|list|show|cancel`` and ``cwsnet node list|drain|undrain``: work over the REST API.

(``cwsnet task submit`` is the exception: run on a device, it submits a *site task* through the
device's own agent to its gateway, by a row in the agent's ``submissions.db``; no API, no token.)

Unlike ``cwsnet operator`` these talk to a running cloud's REST API (``/api/v1/tasks``,
``/api/v1/nodes``) with an API token, so they work from any machine that reaches it. Where:
``--url``, else ``$CWSNET_URL``, else the port in the home lab's cloud config
(``{data-dir}/config/cloud.yaml``), else http://127.0.0.1:8080. The token: ``--token-file``, else
``$CWSNET_TOKEN``, else the file named by ``$CWSNET_TOKEN_FILE``, else ``{data-dir}/admin.token``.
There is no ``--token`` flag on purpose: a command line is visible to every user (``ps``) and kept
in shell history. The token is never printed or logged.

Exit codes: 0 done; 1 the API could not be reached or answered an error, or a task did not
succeed (or ``--wait`` ran out); 2 bad flags or values, no usable token, or the API refused the
token (401) or its role (403): fixing the command or the credentials is needed, retrying cannot help.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cwsnet.errors import ConfigError, CwsError

DEFAULT_URL = "http://127.0.0.1:8080"
TASK_STATES = ("queued", "assigned", "running", "succeeded", "failed", "expired", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "expired", "cancelled"})
POLL = 0.2  # seconds between polls of --wait
REQUEST_TIMEOUT = 10.0

EXIT_CODES = (
    "Exit codes: 0 done; 1 the API could not be reached or answered an error (404, 409, 422, 5xx: its "
    "message is shown), a task did not succeed, or --wait ran out; 2 bad flags or values, no usable token, or "
    "the API refused the token (401) or its role (403). "
    "The API is --url, else $CWSNET_URL, else the home lab's (the port in {data-dir}/config/cloud.yaml), "
    "else http://127.0.0.1:8080. The token is read from --token-file, else $CWSNET_TOKEN, else the file "
    "$CWSNET_TOKEN_FILE, else {data-dir}/admin.token; there is no --token flag on purpose: a command line is "
    "visible to other users (ps) and kept in shell history."
)


# -- the REST client -------------------------------------------------------------------------------------------


class Api:
    """A tiny JSON client of the cloud's REST API. Errors become one-line CwsError/ConfigError."""

    def __init__(self, url: str, token: str, token_source: str, ca_file: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.token_source = token_source
        parts = urllib.parse.urlsplit(self.url)
        handlers: list[Any] = []
        if parts.scheme == "https":
            try:
                ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{ca_file}: cannot load the CA certificate: {exc}") from None
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        from cwsnet.tls import is_loopback_host

        if is_loopback_host(parts.hostname):
            handlers.append(urllib.request.ProxyHandler({}))  # never send a loopback request to a proxy
        self._opener = urllib.request.build_opener(*handlers)

    def call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if method == "GET" else json.dumps(body if body is not None else {}).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        req.add_unredirected_header("Authorization", f"Bearer {self._token}")  # never to a redirect's host
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=REQUEST_TIMEOUT) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            raise self._refusal(method, path, exc) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = getattr(reason, "strerror", None) or str(reason)
            hint = ""
            if isinstance(reason, ssl.SSLError):
                hint = " (pass --ca-file with the CA that issued its certificate, e.g. {data-dir}/ca/ca.crt)"
            elif isinstance(reason, OSError):
                hint = " (is the cloud running? `cwsnet up`; or pass --url / set CWSNET_URL)"
            raise CwsError(f"cannot reach the CWSNet API at {self.url}: {text}{hint}") from None
        except TimeoutError:
            raise CwsError(f"cannot reach the CWSNet API at {self.url}: no answer within {REQUEST_TIMEOUT:g} s") \
                from None
        except (OSError, ValueError, http.client.HTTPException) as exc:  # a reset connection, a bad answer
            raise CwsError(f"cannot reach the CWSNet API at {self.url}: {exc}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise CwsError(f"{method} {url}: the answer is not JSON (is {self.url} a CWSNet cloud?)") from None

    def _refusal(self, method: str, path: str, exc: urllib.error.HTTPError) -> CwsError:
        try:
            raw = exc.read()
        except OSError:
            raw = b""
        code, message = None, None
        try:
            err = json.loads(raw).get("error")
            if isinstance(err, dict):
                code, message = err.get("code"), err.get("message")
        except (ValueError, AttributeError):
            pass
        if message is None:  # not the CWSNet API's error shape: a proxy, another server
            text = raw.decode("utf-8", "replace").strip().splitlines()
            message = (text[0][:200] if text else exc.reason) or "no message"
        if exc.code == 401:
            return ConfigError(f"the API refused the token from {self.token_source} (401): {message}")
        if exc.code == 403:
            return ConfigError(f"the API refused {method} {path} for the token from {self.token_source} (403): "
                               f"{message}")
        return CwsError(f"{method} {path}: {exc.code} {code or 'error'}: {message}")


def _cloud_url(data_dir: Path) -> tuple[str | None, Path | None]:
    """The home lab's API URL from its cloud config, and its CA file; (None, None) without a lab."""
    config = data_dir / "config" / "cloud.yaml"
    if not config.exists():
        return None, None
    import yaml

    try:
        cfg = yaml.safe_load(config.read_text()) or {}
        http = cfg.get("http") or {}
        port = int(http.get("port", 8080))
        host = str(http.get("host") or "127.0.0.1")
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{config}: cannot read the cloud's http address from it: {exc} (pass --url)") from None
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    scheme = "https" if http.get("tls") else "http"
    ca = data_dir / "ca" / "ca.crt"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}", ca if ca.exists() else None


def _token(args: argparse.Namespace) -> tuple[str, str]:
    """The API token and where it came from (for messages; never the token itself)."""
    if args.token_file is None and os.environ.get("CWSNET_TOKEN"):
        token = os.environ["CWSNET_TOKEN"].strip()
        _check_token(token, "$CWSNET_TOKEN", "the environment")
        return token, "$CWSNET_TOKEN"
    if args.token_file is not None:
        path, how = Path(args.token_file), "--token-file"
    elif os.environ.get("CWSNET_TOKEN_FILE"):
        path, how = Path(os.environ["CWSNET_TOKEN_FILE"]), "$CWSNET_TOKEN_FILE"
    else:
        path, how = Path(args.data_dir) / "admin.token", "the home lab's token"
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such token file ({how}); the cloud writes admin.token at its first start, "
                          "`cwsnet operator token NAME` makes another: pass --token-file, --data-dir, or set "
                          "CWSNET_TOKEN_FILE") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the token file ({how}): {getattr(exc, 'strerror', None) or exc}") \
            from None
    _check_token(token, str(path), how)
    return token, str(path)


def _check_token(token: str, where: str, how: str) -> None:
    if not token or len(token.split()) != 1 or not token.isascii() or not token.isprintable():
        raise ConfigError(f"{where}: expected one API token ({how}), found "
                          f"{'nothing' if not token else 'something else'}")


def _api(args: argparse.Namespace) -> Api:
    lab_url, lab_ca = _cloud_url(Path(args.data_dir))
    url = args.url or os.environ.get("CWSNET_URL") or lab_url or DEFAULT_URL
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url: expected http://HOST:PORT or https://HOST:PORT, got {url!r}")
    ca = Path(args.ca_file) if args.ca_file else Path(os.environ["CWSNET_CA_FILE"]) \
        if os.environ.get("CWSNET_CA_FILE") else lab_ca
    if ca is not None and not ca.exists():
        raise ConfigError(f"{ca}: no such CA certificate file (--ca-file)")
    token, source = _token(args)
    return Api(url, token, source, ca)


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


# -- formatting ------------------------------------------------------------------------------------------------


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"  # unreachable


def _age(ms: int | None) -> str:
    return "-" if ms is None else _ago(time.time() - ms / 1000)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f" ({_age(ms)} ago)"


def _deadline(ms: int) -> str:
    left = ms / 1000 - time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
    return f"{stamp} (in {_ago(left)})" if left > 0 else f"{stamp} ({_ago(-left)} ago)"


def _where(t: dict[str, Any]) -> str:
    return (t.get("node") or "-") if t.get("kind") in ("scheduled", "site") else (t.get("target") or "-")


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


# -- argument types (argparse reports them as `argument --x: ...`, exit 2) --------------------------------------


def _no_token(_text: str) -> str:
    raise argparse.ArgumentTypeError("a token is never taken on the command line (every user sees it in ps, and "
                                     "shell history keeps it): use --token-file FILE or $CWSNET_TOKEN")


def _int_in(lo: int, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {lo}..{hi}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer {lo}..{hi}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number), got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text}")
    return value


def _wait_seconds(text: str) -> float:
    try:
        return _seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (write --wait after the positional arguments, or --wait=SECONDS)") \
            from None


def _key_value(text: str) -> tuple[str, Any]:
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # not JSON: the text as is
    if isinstance(value, float) and not math.isfinite(value):
        value = raw  # NaN / Infinity are not JSON the API stores: keep the text
    return key, value


# -- task ------------------------------------------------------------------------------------------------------


def _task_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.args_json is not None or args.args_file is not None:
        if args.args_json is not None:
            where, text = "--args-json", args.args_json
        else:
            where = f"--args-file {args.args_file}"
            try:
                text = sys.stdin.read() if args.args_file == "-" else Path(args.args_file).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{args.args_file}: cannot read the task's args: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: expected a JSON object ({{\"key\": value, ...}}), got "
                              f"{type(loaded).__name__}")
        out.update(loaded)
    seen: set[str] = set()
    for key, value in args.arg or []:
        if key in seen:
            raise ConfigError(f"--arg {key}=...: {key!r} is given twice")
        seen.add(key)
        out[key] = value  # --arg overrides the same key of --args-json / --args-file
    return out


SCHEDULED_ONLY = (("site", "--site"), ("origin", "--origin"), ("data_class", "--data-class"),
                  ("priority", "--priority"), ("replicas", "--replicas"), ("mode", "--mode"),
                  ("max_attempts", "--max-attempts"), ("capabilities", "--require-capability"))


def _task_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"handler": args.handler, "args": _task_args(args)}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    if args.idempotency_key is not None:  # direct or scheduled
        body["idempotency_key"] = args.idempotency_key
    if args.target is not None:
        given = [flag for attr, flag in SCHEDULED_ONLY if getattr(args, attr) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for a scheduled task; a task with --target runs on "
                              "exactly that device (leave --target out to let the scheduler place it)")
        body["target"] = args.target
        return body
    for attr, _flag in SCHEDULED_ONLY:
        value = getattr(args, attr)
        if value is None:
            continue
        if attr == "capabilities":
            body["requirements"] = {"capabilities": value}
        else:
            body[attr] = value
    return body


def _wait_task(api: Api, task_id: str, limit: float | None, quiet: bool) -> tuple[dict[str, Any], bool]:
    """Poll the task until it finishes or ``limit`` seconds pass: (the task, finished?)."""
    deadline = None if limit is None else time.monotonic() + limit
    seen = ("queued", "-")  # already said
    while True:
        t = api.call("GET", f"/api/v1/tasks/{_quote(task_id)}")
        if t["state"] in TERMINAL:
            return t, True
        now = (t["state"], _where(t))
        if now != seen and not quiet:
            print(f"  {now[0]}" + (f" on {now[1]}" if now[1] != "-" else ""), flush=True)
        seen = now
        if deadline is not None and time.monotonic() >= deadline:
            return t, False
        time.sleep(POLL if deadline is None else max(0.0, min(POLL, deadline - time.monotonic())))


def _print_outcome(t: dict[str, Any]) -> None:
    took = ""
    if t.get("created") and t.get("updated"):
        ms = max(0, t["updated"] - t["created"])
        took = f" after {ms} ms" if ms < 1000 else f" after {ms / 1000:.1f} s"
    where = _where(t)
    print(f"task {t['id']} {t['state']}" + (f" on {where}" if where != "-" else "") + took)
    if t.get("result") is not None:
        print(f"result: {_compact(t['result'])}")
    if t.get("error"):
        print(f"error: {t['error']}")


def cmd_run(args: argparse.Namespace) -> int:
    body = _task_body(args)
    api = _api(args)
    created = api.call("POST", "/api/v1/tasks", body)
    task_id = created["id"]
    if args.wait is None:
        if args.json:
            _print_json(created)
        elif created.get("duplicate"):
            print(f"task {task_id} already submitted (idempotency key {args.idempotency_key!r}); "
                  "nothing new was made")
        else:
            print(f"task {task_id} queued ({'direct, to ' + args.target if args.target else 'scheduled'})")
        return 0
    if not args.json:
        if created.get("duplicate"):
            print(f"task {task_id} already submitted (idempotency key {args.idempotency_key!r}); waiting for it",
                  flush=True)
        else:
            print(f"task {task_id} queued", flush=True)
    limit = None if args.wait == math.inf else args.wait
    t, finished = _wait_task(api, task_id, limit, args.json)
    if args.json:
        _print_json(t)
    elif finished:
        _print_outcome(t)
    else:
        where = _where(t)
        print(f"task {task_id} is still {t['state']}" + (f" on {where}" if where != "-" else "")
              + f" after {args.wait:g} s; it goes on (`cwsnet task show {task_id}`)")
    return 0 if t["state"] == "succeeded" else 1


def cmd_list(args: argparse.Namespace) -> int:
    page = _api(args).call("GET", "/api/v1/tasks", query={"state": args.state, "target": args.target,
                                                          "limit": args.limit})
    items = page["items"]
    if args.json:
        _print_json(items)
        return 0
    if not items:
        print("no tasks" + (" matching the filters" if args.state or args.target else ""))
        return 0
    print(f"{'ID':<32}  {'KIND':<9} {'STATE':<9} {'HANDLER':<16} {'NODE':<20} {'ATTEMPTS':>8}  AGE")
    for t in items:
        print(f"{t['id']:<32}  {t.get('kind', 'direct'):<9} {t['state']:<9} {t['handler']:<16} {_where(t):<20} "
              f"{t.get('attempts', 0):>8}  {_age(t.get('created'))}")
    if page.get("total", len(items)) > len(items):
        print(f"({len(items)} of {page['total']} tasks, newest first; --limit shows more)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    t = _api(args).call("GET", f"/api/v1/tasks/{_quote(args.id)}")
    if args.json:
        _print_json(t)
        return 0
    kind = t.get("kind", "direct")
    print(f"task {t['id']} ({kind})")
    rows = [("handler", t["handler"]), ("args", _compact(t.get("args") or {})), ("state", t["state"]),
            ("node" if kind == "scheduled" else "target", _where(t))]
    if kind == "scheduled":
        rows.append(("site", t.get("site") or "- (the cloud's workers only)"))
    elif kind == "site":  # submitted by a device, scheduled by its gateway (it keeps the args)
        rows[1:] = [("state", t["state"]), ("node", t.get("node") or "-"), ("site", t.get("site") or "-"),
                    ("origin", t.get("origin") or "-")]
    rows += [("attempts", str(t.get("attempts", 0))), ("created", _when(t.get("created"))),
             ("updated", _when(t.get("updated")))]
    if t.get("deadline") is not None:
        rows.append(("deadline", _deadline(t["deadline"])))
    if t.get("idempotency_key"):
        rows.append(("idem. key", t["idempotency_key"]))
    if t.get("result") is not None:
        rows.append(("result", _compact(t["result"])))
    if t.get("error"):
        rows.append(("error", t["error"]))
    for name, value in rows:
        print(f"  {name:<10} {value}")
    if t.get("disagreement"):
        print("disagreement (the replicas' results differ):")
        for entry in t["disagreement"]:
            node, result = (entry[0], entry[1]) if isinstance(entry, list) and len(entry) == 2 else ("?", entry)
            print(f"  {node}: {_compact(result)}")
    if t.get("placement"):
        print("placement:")
        print(t["placement"].rstrip("\n"))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    t = _api(args).call("POST", f"/api/v1/tasks/{_quote(args.id)}/cancel")
    if args.json:
        _print_json(t)
    elif t.get("kind") == "site" and t["state"] != "cancelled":
        print(f"site task {t['id']} ({t['state']}): the cancel was sent to the gateway that owns it; it shows "
              f"cancelled once the gateway reports it (`cwsnet task show {t['id']}`)")
    else:
        print(f"task {t['id']} {t['state']}" + (f": {t['error']}" if t.get("error") else ""))
    return 0


# -- node ------------------------------------------------------------------------------------------------------


def _running(ex: dict[str, Any]) -> str:
    run = ex.get("running") or []
    return ", ".join(run) if run else "nothing"


def cmd_node_list(args: argparse.Namespace) -> int:
    nodes = _api(args).call("GET", "/api/v1/nodes")
    if args.json:
        _print_json(nodes)
        return 0
    if not nodes:
        print("no executors (the cloud's workers appear once the scheduler runs; agents and gateways once they "
              "report task slots)")
        return 0
    print(f"{'NODE':<24} {'TIER':<8} {'SITE':<12} {'LIVE':<5} {'DRAINING':<8} {'SLOTS':>5} {'RUNNING':>7} "
          f"{'CPU':>5}  LAST SEEN")
    for n in nodes:
        cpu = "-" if n.get("cpu") is None else f"{n['cpu'] * 100:.0f}%"
        print(f"{n['node']:<24} {n['tier']:<8} {n.get('site') or '-':<12} {'yes' if n['live'] else 'no':<5} "
              f"{'yes' if n['draining'] else 'no':<8} {n['slots']:>5} {len(n.get('running') or []):>7} {cpu:>5}  "
              f"{_ago(n.get('last_seen_s', 0))} ago")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    api = _api(args)
    ex = api.call("POST", f"/api/v1/nodes/{_quote(args.node)}/drain")
    print(f"node {ex['node']} is draining: it gets no new work; it runs {_running(ex)}", flush=True)
    if args.wait is None or not ex.get("running"):
        if args.wait is not None:
            print(f"node {ex['node']} is drained: it runs nothing")
        return 0
    deadline = None if args.wait == math.inf else time.monotonic() + args.wait
    last = ex.get("running")
    while True:
        time.sleep(POLL if deadline is None else max(0.0, min(POLL, deadline - time.monotonic())))
        nodes = api.call("GET", "/api/v1/nodes")
        now = next((n for n in nodes if n["node"] == ex["node"]), None)
        if now is None:
            raise CwsError(f"node {ex['node']} is no longer an executor the scheduler knows (GET /api/v1/nodes)")
        if not now.get("draining"):
            raise CwsError(f"node {ex['node']} is no longer draining (undrained meanwhile?); it runs {_running(now)}")
        if not now.get("running"):
            print(f"node {ex['node']} is drained: it runs nothing")
            return 0
        if now["running"] != last:
            print(f"  still running: {_running(now)}", flush=True)
            last = now["running"]
        if deadline is not None and time.monotonic() >= deadline:
            print(f"node {ex['node']} still runs {_running(now)} after {args.wait:g} s; it stays draining")
            return 1


def cmd_undrain(args: argparse.Namespace) -> int:
    ex = _api(args).call("POST", f"/api/v1/nodes/{_quote(args.node)}/undrain")
    print(f"node {ex['node']} takes new work again ({ex['slots']} slots; it runs {_running(ex)})")
    return 0


# -- task submit: a site task, through this device's agent to its gateway ---------------------------------------

SUBMIT_EPILOG = (
    "Unlike `task run` (which goes through the cloud's REST API), this goes through the CWSNet agent running on "
    "this device: the submission is written to {data_dir}/submissions.db (data_dir from the agent's config), the "
    "agent picks it up within a second and sends it, sealed, to its site gateway, whose scheduler places it (on "
    "this device, another device of the site, the gateway or the cloud: the site's offload policies) and reports "
    "the outcome back to the agent. While the gateway is away the submission waits in the agent's outbox; while "
    "the agent is not running it waits in submissions.db. Run it as the agent's user (it writes the agent's data "
    "dir). Examples: `cwsnet task submit --config agent.yaml echo --args '{\"x\": 1}' --wait`; `cwsnet task "
    "submit --config agent.yaml sha256 --args '{\"data\": \"aGVsbG8=\"}' --key nightly-1 --priority 8`. "
    "Exit codes: 0 submitted (with --wait: it succeeded); 1 with --wait: it failed, was cancelled or expired; "
    "2 bad flags or values, an unreadable agent config or bundle, an agent without a gateway, or --timeout ran out "
    "(the agent may not be running)."
)
#: seconds after which `--wait` says the agent has not picked the submission up yet
SUBMIT_HINT_AFTER = 5.0


def _submit_args(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        loaded = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--args: not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--args: expected a JSON object ({{\"key\": value, ...}}), got {type(loaded).__name__}")
    return loaded


def _agent_submissions(config: str) -> tuple[Any, Any, Any]:
    """(the agent's config, its bundle, its submissions.db) from the agent's config file."""
    import sqlite3

    from cwsnet.bundle import Bundle
    from cwsnet.config import AgentConfig, load_config
    from edge_agent.submissions import Submissions

    cfg = load_config(config, AgentConfig)
    bundle = Bundle.load(cfg.identity_file)
    if bundle.gateway is None:
        raise ConfigError(f"{config}: the agent's bundle {cfg.identity_file} names no gateway: site tasks go through "
                          "a gateway (use `cwsnet task run` to submit through the cloud's API instead)")
    try:
        subs = Submissions.in_dir(cfg.data_dir)
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(f"{cfg.data_dir}: cannot open the agent's submissions.db: {exc} (run this as the agent's "
                          "user)") from None
    return cfg, bundle, subs


def _wait_submission(subs: Any, key: str, config: str, limit: float | None, quiet: bool) -> tuple[Any, bool]:
    """Poll the submission until it has an outcome or ``limit`` seconds pass: (the row, finished?)."""
    started = time.monotonic()
    deadline = None if limit is None else started + limit
    hinted = False
    while True:
        row = subs.get(key)
        if row is None or row.final:
            return row, row is not None
        now = time.monotonic()
        if not hinted and not quiet and row.state == "new" and now - started >= SUBMIT_HINT_AFTER:
            hinted = True
            print(f"  not picked up by the agent yet: is it running (`cwsnet agent --config {config}`)?",
                  file=sys.stderr, flush=True)
        if deadline is not None and now >= deadline:
            return row, False
        time.sleep(POLL if deadline is None else max(0.0, min(POLL, deadline - now)))


def _waited(subs: Any, sub: Any, key: str, args: argparse.Namespace) -> tuple[Any, bool] | None:
    """After recording ``sub``: without --wait, None (printed as JSON if asked); with it, poll the outcome,
    print it, and return the row and whether it ended. Closes ``subs`` either way."""
    try:
        if not args.wait:
            if args.json:
                _print_json(sub.to_json())
            return None
        row, finished = _wait_submission(subs, key, args.agent_config, args.timeout, args.json)
    finally:
        subs.close()
    if row is None:
        raise CwsError(f"{subs.path}: the submission {key!r} disappeared while waiting for it")
    if args.json:
        _print_json(row.to_json())
    elif finished:
        _print_row(key, row)
    return row, finished


def _record(subs: Any, what: str, fn: Any) -> Any:
    """``fn()`` on the agent's submissions.db: its refusal a clear error naming the file (``subs`` closed)."""
    import sqlite3

    try:
        return fn()
    except ValueError as exc:
        subs.close()
        raise ConfigError(str(exc)) from None
    except sqlite3.Error as exc:
        subs.close()
        raise ConfigError(f"{subs.path}: cannot record the {what}: {exc} (run this as the agent's user)") from None


def cmd_submit(args: argparse.Namespace) -> int:
    from edge_agent.submissions import new_key

    if args.timeout is not None and not args.wait:
        raise ConfigError("--timeout: only with --wait (how long to wait for the outcome)")
    task_args = _submit_args(args.submit_args)
    _cfg, bundle, subs = _agent_submissions(args.agent_config)
    key = args.key if args.key is not None else new_key()
    sub, added = _record(subs, "submission", lambda: subs.add_new(
        bundle.identity.node, key, args.handler, task_args, priority=args.priority, max_attempts=args.max_attempts,
        data_class=args.data_class))
    if not args.json:
        if added:
            print(f"site task {key} (task id {sub.task_id}) submitted to the local agent of {bundle.identity.node}, "
                  f"for gateway {bundle.gateway}", flush=True)
        else:
            print(f"site task {key} (task id {sub.task_id}) was already submitted ({sub.state}); nothing new was "
                  "made", flush=True)
    got = _waited(subs, sub, key, args)
    if got is None:
        return 0
    row, finished = got
    if not finished:
        if row.state == "new":
            print(f"cwsnet: site task {key} was not picked up within {args.timeout:g} s: the agent may not be running "
                  f"(`cwsnet agent --config {args.agent_config}`); it stays in {subs.path} and goes when the agent "
                  "runs", file=sys.stderr)
        else:
            print(f"cwsnet: site task {key} is still {row.state} after {args.timeout:g} s, waiting for gateway "
                  f"{bundle.gateway}'s outcome; it goes on (its outcome will be in {subs.path})", file=sys.stderr)
        return 2
    return 0 if row.state == "succeeded" else 1


def _print_row(key: str, row: Any) -> None:
    print(f"site task {key} {row.state}" + (f" on {row.node}" if row.node else ""))
    if row.result is not None:
        print(f"result: {_compact(row.to_json()['result'])}")
    if row.error:
        print(f"error: {row.error}")


def cmd_withdraw(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.wait:
        raise ConfigError("--timeout: only with --wait (how long to wait for the outcome)")
    _cfg, bundle, subs = _agent_submissions(args.agent_config)
    key = args.key
    sub = _record(subs, "cancel", lambda: subs.request_cancel(key))
    if sub.final:
        subs.close()
        if args.json:
            _print_json(sub.to_json())
        else:
            print(f"site task {key} has already ended: nothing to cancel")
            _print_row(key, sub)
        return 0 if sub.state == "cancelled" else 1
    if not args.json:
        print(f"site task {key} (task id {sub.task_id}): cancel handed to the local agent of "
              f"{bundle.identity.node}, for gateway {bundle.gateway}", flush=True)
    got = _waited(subs, sub, key, args)
    if got is None:
        return 0
    row, finished = got
    if not finished:
        print(f"cwsnet: site task {key} is still {row.state} after {args.timeout:g} s; the cancel goes on (the "
              f"outcome will be in {subs.path})", file=sys.stderr)
        return 2
    return 0 if row.state == "cancelled" else 1


# -- parser ----------------------------------------------------------------------------------------------------


def _common(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("connection")
    g.add_argument("--url", default=None,
                   help="the cloud's REST API, e.g. http://127.0.0.1:8080 (default: $CWSNET_URL, else the home "
                        "lab's from {data-dir}/config/cloud.yaml, else http://127.0.0.1:8080)")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the API token (default: $CWSNET_TOKEN, else the file $CWSNET_TOKEN_FILE, "
                        "else {data-dir}/admin.token). No --token flag on purpose: command lines leak into ps "
                        "and shell history; use $CWSNET_TOKEN for a token not in a file")
    g.add_argument("--token", type=_no_token, help=argparse.SUPPRESS)  # refused, and no abbreviation of --token-file
    g.add_argument("--data-dir", default="./cwsnet-data",
                   help="the home lab's data dir, for the defaults above (default: ./cwsnet-data, as `cwsnet up`)")
    g.add_argument("--ca-file", default=None, metavar="FILE",
                   help="for an https URL: the CA certificate to trust (default: $CWSNET_CA_FILE, else the home "
                        "lab's {data-dir}/ca/ca.crt when it exists, else the system's)")


def _json_flag(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--json", action="store_true", help=f"print {what} as JSON, as the API returns it")


def add_parser(sub: Any) -> None:
    tp = sub.add_parser(
        "task", help="run, list, show and cancel tasks through the cloud's REST API",
        description="Submit and follow tasks through a running cloud's REST API. Without --target a task is "
                    "*scheduled*: the scheduler places it (offload policies) on a device, a gateway or the "
                    "cloud's own workers, leases it and moves it when its executor is lost; `task show` says "
                    "where it ran and why. With --target it is a *direct* task for exactly that device. "
                    "`task submit` is the exception: run on a device, it goes through the device's agent to its "
                    "site gateway (a site task), not through the API.",
        epilog=EXIT_CODES)
    tsub = tp.add_subparsers(dest="task_command", metavar="ACTION", required=True)

    sp = tsub.add_parser(
        "run", help="submit a task; with --wait, wait for its result",
        description="Submit a task and print its id. With --wait, poll it (every 0.2 s) until it finishes, then "
                    "print its final state and result or error: exit 0 if it succeeded, 1 if not (failed, "
                    "expired, cancelled, or still going when --wait SECONDS ran out; it then goes on).",
        epilog="Examples: `cwsnet task run echo --arg x=1 --arg name=kitchen --wait 30`; `cwsnet task run "
               "sha256 --args-json '{\"data\": \"abc\"}' --site home --priority 8`; `cwsnet task run sleep "
               "--arg seconds=5 --target dev-1`. " + EXIT_CODES)
    sp.add_argument("handler", metavar="HANDLER", help="the task handler, e.g. echo, sha256, sleep, count")
    a = sp.add_argument_group("the handler's arguments (an object; --arg overrides a key of the others)")
    a.add_argument("--arg", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="one argument; VALUE is parsed as JSON when it is valid JSON (1, true, [1,2], "
                        "\"quoted\"), else taken as a string (repeatable)")
    src = a.add_mutually_exclusive_group()
    src.add_argument("--args-json", metavar="JSON", help="all arguments as a JSON object")
    src.add_argument("--args-file", metavar="FILE", help="all arguments from a JSON file holding an object "
                                                          "(- reads stdin)")
    sp.add_argument("--target", metavar="NODE",
                    help="a direct task: run it on exactly this registered device, never moved (default: "
                         "scheduled, placed by the scheduler); the scheduling flags below do not apply then")
    sp.add_argument("--timeout", type=_seconds, metavar="S",
                    help="the task expires if not finished S seconds from now (default: never)")
    s = sp.add_argument_group("scheduling (tasks without --target)")
    s.add_argument("--site", help="the site whose devices and gateway may run it, besides the cloud's workers "
                                  "(default: the cloud's workers only)")
    s.add_argument("--origin", metavar="NODE", help="the node the work is for; offload rules match on it")
    s.add_argument("--data-class", dest="data_class", metavar="C",
                   help="the class of its data for the offload policy (a keep_on_site class never runs in the "
                        "cloud)")
    s.add_argument("--priority", type=_int_in(0, 9), metavar="0-9", help="9 runs first, 0 last (default: 5)")
    s.add_argument("--replicas", type=_int_in(1, 32), metavar="K",
                   help="run it on K distinct executors (default: 1)")
    s.add_argument("--mode", choices=("first", "majority"),
                   help="with --replicas: the first result wins, or a majority must agree (default: first)")
    s.add_argument("--max-attempts", dest="max_attempts", type=_int_in(1, 20), metavar="N",
                   help="attempts per replica (a failure or a lost lease uses one) (default: 3)")
    s.add_argument("--require-capability", dest="capabilities", action="append", metavar="C",
                   help="only executors advertising this capability (repeatable)")
    s.add_argument("--idempotency-key", dest="idempotency_key", metavar="K",
                   help="submitting the same key again returns the existing task (\"already submitted\") "
                        "instead of making a second one")
    sp.add_argument("--wait", nargs="?", type=_wait_seconds, const=math.inf, default=None, metavar="SECONDS",
                    help="wait for the task to finish, at most SECONDS (default: until it finishes; Ctrl-C stops "
                         "waiting, not the task)")
    _json_flag(sp, "the submission (with --wait: the finished task)")
    _common(sp)
    sp.set_defaults(func=cmd_run)

    sp = tsub.add_parser("list", help="list tasks, newest first", epilog=EXIT_CODES,
                         description="List tasks, newest first: id, kind (direct or scheduled), state, handler, "
                                     "the node it runs on (scheduled) or its target (direct), attempts, age.")
    sp.add_argument("--state", choices=TASK_STATES, help="only tasks in this state")
    sp.add_argument("--target", metavar="NODE", help="only direct tasks for this device")
    sp.add_argument("--limit", type=_int_in(1, 1000), default=50, metavar="N", help="at most N tasks (default: 50)")
    _json_flag(sp, "the tasks")
    _common(sp)
    sp.set_defaults(func=cmd_list)

    sp = tsub.add_parser("show", help="a task's state, result or error, and where it ran and why",
                         description="Show a task: state, result or error, and for a scheduled task its "
                                     "placement: each placement decision (offload rule, candidates, what was held "
                                     "back) and its history; and a disagreement of its replicas, if any.",
                         epilog=EXIT_CODES)
    sp.add_argument("id", metavar="ID", help="the task's id (`cwsnet task list`)")
    _json_flag(sp, "the task")
    _common(sp)
    sp.set_defaults(func=cmd_show)

    sp = tsub.add_parser("cancel", help="cancel a task",
                         description="Cancel a task. A scheduled one until it finishes (its executors are told to "
                                     "stop); a direct one only while still queued; a site task (submitted by a "
                                     "device) until it finishes: the cancel goes to the gateway that owns it, and it "
                                     "shows cancelled once that gateway reports it. Exit 1 with the API's message "
                                     "if it can no longer be cancelled.", epilog=EXIT_CODES)
    sp.add_argument("id", metavar="ID", help="the task's id")
    _json_flag(sp, "the cancelled task")
    _common(sp)
    sp.set_defaults(func=cmd_cancel)

    sp = tsub.add_parser(
        "submit", help="submit a site task through this device's agent to its gateway (not the cloud's API)",
        description="Submit a *site task* from this device: the local CWSNet agent sends it to its site gateway, "
                    "whose scheduler places and runs it and reports the outcome back. Prints the submission's key "
                    "and task id. With --wait, poll the outcome (every 0.2 s) and print its state and result or "
                    "error. No API token is needed: it goes through the agent (its config file), not the cloud's "
                    "REST API.",
        epilog=SUBMIT_EPILOG)
    sp.add_argument("handler", metavar="HANDLER", help="the task handler, e.g. echo, sha256, sleep, count")
    sp.add_argument("--config", dest="agent_config", required=True, metavar="AGENT_YAML",
                    help="the agent's config file (as for `cwsnet agent --config`): its data_dir and bundle")
    sp.add_argument("--args", dest="submit_args", metavar="JSON",
                    help="the handler's arguments as a JSON object (default: {})")
    sp.add_argument("--key", metavar="K",
                    help="this device's name for the submission, 1-128 characters from A-Z a-z 0-9 _ . : - (default: "
                         "a fresh random one); the same key with the same work is the same task, submitted once")
    sp.add_argument("--priority", type=_int_in(0, 9), default=5, metavar="0-9", help="9 runs first, 0 last "
                                                                                      "(default: 5)")
    sp.add_argument("--max-attempts", dest="max_attempts", type=_int_in(1, 10), default=3, metavar="N",
                    help="attempts the gateway gives it (a failure or a lost executor uses one) (default: 3)")
    sp.add_argument("--data-class", dest="data_class", metavar="C",
                    help="the class of its data for the site's offload policy (a keep_on_site class never goes to "
                         "the cloud)")
    sp.add_argument("--wait", action="store_true",
                    help="wait for the outcome: exit 0 if it succeeded, 1 if it failed, was cancelled or expired")
    sp.add_argument("--timeout", type=_seconds, metavar="S",
                    help="with --wait: give up after S seconds, exit 2 (the task goes on) (default: wait until the "
                         "outcome comes)")
    sp.add_argument("--json", action="store_true",
                    help="print the submission (with --wait: with its outcome) as JSON, as submissions.db holds it")
    sp.set_defaults(func=cmd_submit)

    sp = tsub.add_parser(
        "withdraw", help="cancel a site task this device submitted (by its key), through the local agent",
        description="Cancel a *site task* this device submitted with `cwsnet task submit` (by its key): the local "
                    "agent tells its gateway, which stops it wherever it runs (device, gateway or cloud) and "
                    "reports it cancelled. A task that already ended keeps its outcome. No API token is needed (an "
                    "operator cancels any site task with `cwsnet task cancel ID`, through the cloud).",
        epilog="Examples: `cwsnet task withdraw --config agent.yaml nightly-1 --wait --timeout 30`. Exit codes: 0 the cancel "
               "was handed over (with --wait: the task ended cancelled); 1 it ended otherwise (succeeded first...); "
               "2 bad flags, an unknown key, or --wait ran out (the cancel goes on).")
    sp.add_argument("key", metavar="KEY", help="the submission's key (as `cwsnet task submit` printed it)")
    sp.add_argument("--config", dest="agent_config", required=True, metavar="AGENT_YAML",
                    help="the agent's config file (as for `cwsnet agent --config`): its data_dir and bundle")
    sp.add_argument("--wait", action="store_true", help="wait for the outcome: exit 0 if it ended cancelled")
    sp.add_argument("--timeout", type=_seconds, metavar="S",
                    help="with --wait: give up after S seconds, exit 2 (default: wait until the outcome comes)")
    sp.add_argument("--json", action="store_true", help="print the submission (with its outcome) as JSON")
    sp.set_defaults(func=cmd_withdraw)

    np_ = sub.add_parser(
        "node", help="list, drain and undrain the executors that run scheduled tasks",
        description="The executors the scheduler places tasks on: agents with task slots, gateways, and the "
                    "cloud's own workers (node `cloud`), through a running cloud's REST API.",
        epilog=EXIT_CODES)
    nsub = np_.add_subparsers(dest="node_command", metavar="ACTION", required=True)

    sp = nsub.add_parser("list", help="list executors: tier, site, live, draining, slots, load",
                         description="List executors: node, tier, site, live (false once it lost its lease), "
                                     "draining, slots, how many tasks it runs, CPU load, when last heard from.",
                         epilog=EXIT_CODES)
    _json_flag(sp, "the executors (with the ids of the tasks each runs)")
    _common(sp)
    sp.set_defaults(func=cmd_node_list)

    sp = nsub.add_parser("drain", help="give a node no new work (e.g. before maintenance)",
                         description="Drain a node: it gets no new work, and what it was given but has not started "
                                     "is re-queued elsewhere; what it runs finishes. With --wait, wait until it "
                                     "runs nothing (printing what it still runs meanwhile): exit 1 if SECONDS ran "
                                     "out first. `cwsnet node undrain` gives it work again.", epilog=EXIT_CODES)
    sp.add_argument("node", metavar="NODE", help="the executor's node id (`cwsnet node list`)")
    sp.add_argument("--wait", nargs="?", type=_wait_seconds, const=math.inf, default=None, metavar="SECONDS",
                    help="wait until the node runs nothing, at most SECONDS (default: as long as it takes)")
    _common(sp)
    sp.set_defaults(func=cmd_drain)

    sp = nsub.add_parser("undrain", help="let a drained node take new work again", epilog=EXIT_CODES)
    sp.add_argument("node", metavar="NODE", help="the executor's node id")
    _common(sp)
    sp.set_defaults(func=cmd_undrain)
