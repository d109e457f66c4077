"""Size-dependent hyper-parameter rules: a constant, a formula string or a table.

A sweep trains models of many sizes, and the right learning rate or batch size depends on the size.
Rules say how, in the sweep file:

    lr: 0.003                                   # a constant
    lr: "0.003 * (params / 1e6) ** -0.25"       # a formula
    lr: [{max_params: 1e6, value: 3e-3},        # a table: the first row whose max_params >= params;
         {value: 1e-3}]                         # a last row without max_params catches the rest

Formulas are parsed into a Python AST and only a whitelist is evaluated: numbers, the names in
RULE_NAMES, + - * / // % **, unary minus, and calls of the functions in RULE_FUNCTIONS. Nothing else
(no attributes, no subscripts, no other names) is accepted, so a sweep file can never run code.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Union

# What a rule may refer to. params: non-embedding parameters of the model of this run;
# params_total: with embeddings; tokens: the run's nominal token budget (before rounding to steps).
RULE_NAMES: tuple[str, ...] = (
    "params",
    "params_total",
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "tokens",
)

RULE_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "exp": math.exp,
    "min": min,
    "max": max,
    "round": round,
    "floor": math.floor,
    "ceil": math.ceil,
    "abs": abs,
}

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    # Powers in floats: an integer power like 10 ** 10 ** 10 would otherwise run for ever.
    ast.Pow: lambda base, exponent: float(base) ** float(exponent),
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class RuleError(ValueError):
    """A rule that cannot be parsed or evaluated; the caller adds the file and key path."""


@dataclass(frozen=True)
class Formula:
    """An arithmetic expression over RULE_NAMES, checked against the whitelist when built."""

    text: str

    def __post_init__(self) -> None:
        try:
            tree = ast.parse(self.text, mode="eval")
        except SyntaxError as exc:
            raise RuleError(f"formula {self.text!r} is not valid arithmetic: {exc.msg}") from None
        _check(tree.body, self.text)
        object.__setattr__(self, "_tree", tree.body)

    def evaluate(self, context: dict[str, float]) -> float:
        try:
            value = _eval(self._tree, context)  # type: ignore[attr-defined]
        except (ArithmeticError, ValueError) as exc:
            raise RuleError(f"formula {self.text!r} failed for {context}: {exc}") from None
        # A negative base to a fractional power gives a complex number in Python.
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RuleError(f"formula {self.text!r} gave {value!r} for {context}; a finite real is needed")
        return value


@dataclass(frozen=True)
class TableRow:
    value: float
    max_params: float | None = None  # None: catches every size above the previous rows


@dataclass(frozen=True)
class Table:
    """Rows sorted by max_params; the first row whose max_params >= params gives the value."""

    rows: tuple[TableRow, ...]

    def __post_init__(self) -> None:
        if not self.rows:
            raise RuleError("a table needs at least one row")
        bounds = [row.max_params for row in self.rows]
        if any(b is None for b in bounds[:-1]):
            raise RuleError("only the last table row may omit max_params")
        finite = [b for b in bounds if b is not None]
        if finite != sorted(finite) or len(set(finite)) != len(finite):
            raise RuleError(f"table max_params must increase strictly, got {finite}")

    def evaluate(self, context: dict[str, float]) -> float:
        params = context["params"]
        for row in self.rows:
            if row.max_params is None or params <= row.max_params:
                return row.value
        raise RuleError(
            f"no table row covers params={params:.4g} (largest max_params is "
            f"{self.rows[-1].max_params:.4g}; add a last row without max_params)"
        )


Rule = Union[float, int, Formula, Table]


def evaluate_rule(rule: Rule, context: dict[str, float]) -> float:
    if isinstance(rule, (Formula, Table)):
        return rule.evaluate(context)
    return rule


def _check(node: ast.AST, text: str) -> None:
    """Reject every construct outside the whitelist, naming it."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise RuleError(f"formula {text!r}: only numbers are allowed as constants, got {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id not in RULE_NAMES:
            raise RuleError(
                f"formula {text!r}: unknown name {node.id!r}; allowed: {', '.join(RULE_NAMES)}"
            )
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, text)
        _check(node.right, text)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, text)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in RULE_FUNCTIONS:
            raise RuleError(
                f"formula {text!r}: only these functions may be called: {', '.join(RULE_FUNCTIONS)}"
            )
        if node.keywords:
            raise RuleError(f"formula {text!r}: keyword arguments are not allowed")
        for arg in node.args:
            _check(arg, text)
    else:
        raise RuleError(
            f"formula {text!r}: {type(node).__name__} is not allowed; use numbers, "
            f"{', '.join(RULE_NAMES)}, + - * / // % ** and {', '.join(RULE_FUNCTIONS)}()"
        )


def _eval(node: ast.AST, context: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return context[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, context), _eval(node.right, context))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, context))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)  # guaranteed by _check
    return RULE_FUNCTIONS[node.func.id](*(_eval(arg, context) for arg in node.args))
