"""Safe conditions: Google's CEL (cel-python), compiled once, never ``eval``.

CEL has no loops, no I/O and no side effects; every expression terminates. On top of that a
condition is limited to ``MAX_CHARS`` characters and ``MAX_NODES`` syntax-tree nodes, which bounds
the cost of one evaluation (comprehension macros over inputs are bounded by the inputs, which the
engines keep small). An evaluation error (a missing field, a type mismatch) makes the condition
false and is reported with the decision, never raised.
"""

from __future__ import annotations

import logging
from typing import Any

import celpy
from celpy import celtypes

MAX_CHARS = 2000
MAX_NODES = 400
logging.getLogger("celpy").setLevel(logging.WARNING)  # it logs every transpiled program at INFO
logging.getLogger("celpy.Transpiler").setLevel(logging.CRITICAL)  # evaluation errors come back as notes


class ConditionError(ValueError):
    """A condition that does not compile or is over the limits; the message says why."""


def _count(tree: Any) -> int:
    children = getattr(tree, "children", None)
    return 1 + (sum(_count(c) for c in children) if children else 0)


def to_cel(value: Any) -> Any:
    """A Python value (JSON-like) as a CEL value."""
    return celpy.json_to_cel(value)


class Condition:
    """One compiled CEL expression; ``evaluate(vars)`` returns (bool, error text or None)."""

    _env = celpy.Environment(runner_class=celpy.CompiledRunner)

    def __init__(self, text: str) -> None:
        if len(text) > MAX_CHARS:
            raise ConditionError(f"condition is {len(text)} characters; at most {MAX_CHARS}")
        try:
            ast = self._env.compile(text)
        except celpy.CELParseError as exc:
            line = str(exc).splitlines()[0] if str(exc) else "syntax error"
            raise ConditionError(f"not a valid CEL expression: {line}") from None
        nodes = _count(ast)
        if nodes > MAX_NODES:
            raise ConditionError(f"condition has {nodes} syntax nodes; at most {MAX_NODES}")
        self.text = text
        self._program = self._env.program(ast)

    def evaluate(self, variables: dict[str, Any]) -> tuple[bool, str | None]:
        try:
            result = self._program.evaluate({k: to_cel(v) for k, v in variables.items()})
        except Exception as exc:  # noqa: BLE001 - CEL raises several types; the condition is just false
            return False, f"{type(exc).__name__}: {exc}"
        if isinstance(result, celpy.CELEvalError):
            return False, str(result.args[0]) if result.args else "evaluation error"
        if not isinstance(result, celtypes.BoolType | bool):
            return False, f"condition gave {type(result).__name__}, not a bool"
        return bool(result), None
