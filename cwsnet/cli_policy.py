"""``cwsnet policy check|explain``: validate a policy set, and say which rule decides what.

The set is the defaults shipped in this checkout's ``policies/`` plus ``{data-dir}/policies/``
(docs/policies.md). ``check`` exits 0 with a summary, or 2 with every problem as
``file:line:col: field: message``. ``explain`` prints the decision, the rule that made it, the
filter it matched and what any audit-mode policy would have done.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cwsnet import registry as reg_mod
from cwsnet import topics
from cwsnet.errors import ConfigError, CwsError
from cwsnet.policy import AccessEngine, Subject, load_policies
from cwsnet.policy.offload import NodeMetrics, OffloadEngine, TaskInfo, metrics_from_status
from cwsnet.policy.qos import QosEngine
from cwsnet.policy.routing import RoutingEngine
from cwsnet.policy.schema import ACTIONS
from cwsnet.policy.watch import shipped_policies


def policy_folders(args: argparse.Namespace) -> list[Path]:
    if getattr(args, "paths", None):
        missing = [p for p in args.paths if not Path(p).exists()]
        if missing:
            raise ConfigError(f"{missing[0]}: no such policy file or folder")
        return [Path(p) for p in args.paths]
    return [shipped_policies(), Path(args.data_dir) / "policies"]


def cmd_check(args: argparse.Namespace) -> int:
    pset = load_policies(policy_folders(args))
    for loaded in pset.policies:
        p = loaded.policy
        print(f"{p.kind:<8} {p.name:<32} {p.mode:<8} {len(p.rules):>3} rules  {loaded.source}")
    print(f"ok: {len(pset.policies)} policies from {len(pset.files)} files")
    return 0


def _subject(args: argparse.Namespace) -> Subject:
    node = args.device or args.node or args.app
    path = Path(args.data_dir) / "registry.json"
    if not path.exists():
        if args.role and args.site:
            return Subject(node, args.role, args.site)
        raise ConfigError(f"{path}: no registry to look {node!r} up in; pass --data-dir, or --role and --site")
    reg = reg_mod.Registry.load(path)
    e = reg.get(node)
    if e is None:
        raise ConfigError(f"{node!r} is not in the registry {path}")
    return Subject(e.id, e.role, e.site)


def cmd_explain(args: argparse.Namespace) -> int:
    pset = load_policies(policy_folders(args))
    if args.task or args.handler:
        return _explain_task(args, pset)
    if not args.topic:
        raise ConfigError("policy explain: --topic is required (or --task ID, or --handler for a placement)")
    subject = _subject(args)
    d = AccessEngine(pset).decide(subject, args.action, args.topic, args.broker)
    print(d.explain())
    if args.action == "publish":
        for extra in _data_decisions(pset, subject, args.topic):
            print()
            print(extra)
    return 0 if d.allowed else 3


def _data_decisions(pset: Any, subject: Subject, topic: str) -> list[str]:
    """For a node's own uplink topic: where its data goes (routing) and its rate limit and priority (qos)."""
    try:
        parts = topics.parse(topic)
    except CwsError:
        return []
    if not parts.uplink or parts.node != subject.id:
        return []
    out = []
    if parts.channel == "telemetry" and parts.sub:
        out.append(RoutingEngine(pset).route(parts.site, parts.node, parts.sub).explain())
    qos = QosEngine(pset)
    channel = "task_result" if parts.channel == "task/result" else parts.channel
    who = {"site": parts.site, "node": parts.node, "role": subject.role, "channel": channel, "stream": parts.sub}
    out.append(qos.admit(**who, now=0.0).explain())
    out.append(qos.priority(**who).explain())
    if channel == "telemetry":
        out.append(qos.retention(channel=channel, stream=parts.sub, site=parts.site, node=parts.node,
                                 role=subject.role).explain())
    return out


def _explain_task(args: argparse.Namespace, pset: Any) -> int:
    """Where a task runs (offload policies): a stored task (--task, from the cloud's database), or a
    what-if (--handler, --device, --input-bytes, --data-class). Candidates are the target device,
    the gateways of its site and the cloud, with their latest reported measurements."""
    import json
    import sqlite3

    db_path = Path(args.database or Path(args.data_dir) / "cloud" / "cloud.db")
    if not db_path.exists():
        raise ConfigError(f"{db_path}: no cloud database to read tasks and nodes from; pass --database")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        if args.task:
            cols = {r[1] for r in db.execute("pragma table_info(tasks)")}
            extra = ", kind, placement" if {"kind", "placement"} <= cols else ", 'direct', null"
            row = db.execute(f"select target, handler, args{extra} from tasks where id = ?", (args.task,)).fetchone()
            if row is None:
                raise ConfigError(f"task {args.task!r} is not in {db_path}")
            if row[3] == "scheduled" and row[4]:  # placed by the scheduler: its stored decisions and history
                print(row[4])
                return 0
            target, handler, task_args = row[0], row[1], row[2] or "{}"
            size = len(task_args.encode())
        else:
            if not args.device:
                raise ConfigError("policy explain --handler: say which device submits it (--device ID)")
            target, handler, size = args.device, args.handler, args.input_bytes
        nodes = {r[0]: r[1:] for r in db.execute("select id, site, role, online, last_status from nodes")}
    finally:
        db.close()
    if target not in nodes:
        raise ConfigError(f"{target!r} is not a node the cloud knows ({db_path})")
    site, role = nodes[target][0], nodes[target][1]

    def metrics(node: str, tier: str) -> NodeMetrics:
        n_site, _role, online, status = nodes[node]
        return metrics_from_status(node, tier, n_site, bool(online), json.loads(status) if status else None)

    candidates = [metrics(target, "device")]
    candidates += [metrics(n, "gateway") for n, v in sorted(nodes.items()) if v[1] == "gateway" and v[0] == site]
    candidates.append(NodeMetrics("cloud", "cloud", "*", True, None, None, None, None, None, None))
    task = TaskInfo(args.task or "what-if", handler, size, args.data_class, site, target, role)
    placement = OffloadEngine(pset).place(task, candidates)
    print(placement.explain())
    return 0 if placement.action == "run" else 3


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("policy", help="check the policy set, and explain which rule decides what",
                        description="Policies are YAML files of declarative rules (docs/policies.md): the "
                                    "defaults in policies/ and a site's own in {data-dir}/policies/.")
    actions = sp.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default="./cwsnet-data",
                       help="the data dir: its policies/ folder and registry.json (default: ./cwsnet-data)")

    p = actions.add_parser("check", help="validate a policy set (exit 2 with file:line:col for each problem)",
                           description="Load and validate every policy; an invalid set is refused as a whole.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="policy files or folders (default: the shipped policies/ and {data-dir}/policies/)")
    common(p)
    p.set_defaults(func=cmd_check)

    p = actions.add_parser("explain", help="which rule lets a node publish or subscribe a topic, or stops it",
                           description="Evaluate one access decision and print the rule that made it, the filter "
                                       "it matched, and what audit-mode policies would do; for a node's own "
                                       "uplink topic, also where its data goes (routing), its rate limit, "
                                       "priority and retention (qos). With --task (or --handler and --device): "
                                       "where the task runs (offload). Exit 0 if allowed / placed, 3 if denied "
                                       "/ waiting / failed.")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--device", help="a device's node id")
    who.add_argument("--app", help="an app's id")
    who.add_argument("--node", help="any node id (gateway, cloud, ...)")
    who.add_argument("--task", help="a task's id: where it runs and why (offload policies, the cloud's database)")
    p.add_argument("--topic", help="the topic (publish) or topic filter (subscribe)")
    p.add_argument("--handler", help="a what-if placement: the handler of a task --device would submit")
    p.add_argument("--input-bytes", type=int, default=0, help="with --handler: the task's input size")
    p.add_argument("--data-class", help="with --handler: the data class of the task's input (e.g. health)")
    p.add_argument("--database", help="the cloud's database for --task (default: {data-dir}/cloud/cloud.db)")
    p.add_argument("--action", default="publish", choices=ACTIONS, help="what the node does (default: publish)")
    p.add_argument("--broker", choices=("site", "cloud"), default=None,
                   help="only that broker's rules (default: any broker)")
    p.add_argument("--role", help="without a registry: the node's role")
    p.add_argument("--site", help="without a registry: the node's site")
    p.add_argument("--policies", dest="paths", nargs="*", metavar="PATH",
                   help="policy files or folders (default: the shipped policies/ and {data-dir}/policies/)")
    common(p)
    p.set_defaults(func=cmd_explain)
