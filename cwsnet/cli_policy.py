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
    return out


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
                                       "telemetry, also where it goes (routing). Exit 0 if allowed, 3 if denied.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", help="a device's node id")
    who.add_argument("--app", help="an app's id")
    who.add_argument("--node", help="any node id (gateway, cloud, ...)")
    p.add_argument("--topic", required=True, help="the topic (publish) or topic filter (subscribe)")
    p.add_argument("--action", default="publish", choices=ACTIONS, help="what the node does (default: publish)")
    p.add_argument("--broker", choices=("site", "cloud"), default=None,
                   help="only that broker's rules (default: any broker)")
    p.add_argument("--role", help="without a registry: the node's role")
    p.add_argument("--site", help="without a registry: the node's site")
    p.add_argument("--policies", dest="paths", nargs="*", metavar="PATH",
                   help="policy files or folders (default: the shipped policies/ and {data-dir}/policies/)")
    common(p)
    p.set_defaults(func=cmd_explain)
