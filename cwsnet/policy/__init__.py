"""Policies as data (docs/policies.md): YAML files of declarative rules, checked with errors that
name file, line, column and field, evaluated by sans-I/O engines that explain every decision.

    pset = load_policies([Path("policies"), data_dir / "policies"])   # PolicyError if any file is bad
    d = AccessEngine(pset).decide(Subject("dev-1", "device", "home"), "publish", "cws/v1/home/dev-1/status")
    d.allowed, d.rule, d.explain()

Kinds so far: ``access`` (who may publish, subscribe, command or read what). Conditions are CEL
expressions (cel-python), compiled once, with a size limit.
"""

from cwsnet.policy.access import AccessEngine, Decision, Subject
from cwsnet.policy.loader import PolicyError, PolicySet, load_policies

# every kind registers itself with the loader when its module is imported
from cwsnet.policy import automation, offload, qos, routing  # noqa: E402,F401  isort: skip

__all__ = ["AccessEngine", "Decision", "PolicyError", "PolicySet", "Subject", "load_policies"]
