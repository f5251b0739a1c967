"""Load a policy set from folders of YAML files; refuse the whole set on any error.

Errors read ``file:line:col: field: message``, one per problem, all of them at once. The set is
the defaults shipped in ``policies/`` plus a site's own in ``{data-dir}/policies/``; a site policy
with the same name as a default replaces it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cwsnet.config import _describe, _LineLoader, _PosDict, _position
from cwsnet.errors import ConfigError, CwsError
from cwsnet.policy.schema import KINDS, Strict


class PolicyError(ConfigError):
    """An invalid policy set: ``problems`` lists every ``file:line:col: field: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Loaded:
    policy: Any  # a schema model (AccessPolicy, ...)
    source: str  # file:line where the policy starts
    rule_sources: dict[str, str] = field(default_factory=dict)  # rule name -> file:line of the rule


@dataclass
class PolicySet:
    policies: list[Loaded] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    digest: str = ""  # SHA-256 over the files' bytes, names and order: what a reload compares

    def of_kind(self, kind: str) -> list[Loaded]:
        return [p for p in self.policies if p.policy.kind == kind]


def _where(path: Path, pos: tuple[int, int] | None) -> str:
    return f"{path}:{pos[0]}:{pos[1]}" if pos else f"{path}:1:1"


def _documents(path: Path, text: str, problems: list[str]) -> list[tuple[Any, int]]:
    loader = _LineLoader(text)
    loader.name = str(path)
    loader.positions = {}  # type: ignore[attr-defined]
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            docs.append((loader.construct_document(node), node.start_mark.line + 1))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = (mark.line + 1, mark.column + 1) if mark else None
        problems.append(f"{_where(path, pos)}: not valid YAML: {getattr(exc, 'problem', exc)}")
    except CwsError as exc:  # a duplicate key, from the line loader
        problems.append(str(exc))
    finally:
        loader.dispose()
    return docs


def _validate(path: Path, doc: Any, line: int, problems: list[str]) -> Strict | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        problems.append(f"{path}:{line}:1: a policy must be a mapping (kind, name, rules, ...)")
        return None
    kind = doc.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        pos = _position(doc, ("kind",)) or (line, 1)
        problems.append(f"{_where(path, pos)}: kind: must be one of {', '.join(KINDS)} (got {kind!r})")
        return None
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            pos = _position(doc, loc) or (line, 1)
            problems.append(f"{_where(path, pos)}: {_describe(err)}")
        return None


def policy_files(folders: list[Path]) -> list[Path]:
    files = []
    for folder in folders:
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        elif folder.is_file():
            files.append(folder)
    return files


def load_policies(folders: list[Path]) -> PolicySet:
    """Every policy in the YAML files of ``folders`` (later folders override same-named policies)."""
    problems: list[str] = []
    by_name: dict[str, Loaded] = {}
    h = hashlib.sha256()
    files = policy_files(folders)
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{path}:1:1: cannot read: {exc.strerror}")
            continue
        h.update(str(path).encode() + b"\0" + data + b"\0")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            problems.append(f"{path}:1:1: not UTF-8 text")
            continue
        seen_here: set[str] = set()
        for doc, line in _documents(path, text, problems):
            policy = _validate(path, doc, line, problems)
            if policy is None:
                continue
            name = policy.name  # type: ignore[attr-defined]
            if name in seen_here:
                pos = _position(doc, ("name",)) if isinstance(doc, _PosDict) else None
                problems.append(f"{_where(path, pos or (line, 1))}: name: two policies in this file are "
                                f"named {name!r}")
                continue
            seen_here.add(name)
            rules = {}
            for i, rule in enumerate(getattr(policy, "rules", [])):
                pos = _position(doc, ("rules", i, "name"))
                rules[rule.name] = f"{path}:{pos[0] if pos else line}"
            by_name[name] = Loaded(policy, f"{path}:{line}", rules)
    if problems:
        raise PolicyError(problems)
    return PolicySet(list(by_name.values()), [str(p) for p in files], h.hexdigest())
