"""The expression language of `when:` and `search.constraints`, evaluated without `eval`.

An expression is parsed with Python's `ast` and admitted only if every node is one of: literals
(numbers, strings, true/false), config keys (`model.heads`), comparisons (`== != < <= > >=`),
arithmetic on numbers (`+ - * / // %`), `and`/`or`/`not`, and `in`/`not in` over a literal list.
Nothing else (names, calls, attributes of anything but a section, subscripts, `**`) is accepted,
so nothing from an experiment file is ever run as code. Errors, at parse or evaluation time, are
`ExprError`s whose one-line message quotes the expression.
"""
from __future__ import annotations

import ast
import operator

from tinyvit.config import KEYS

COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
LANGUAGE = ("literals, config keys such as model.heads, == != < <= > >=, + - * / // %, "
            "and/or/not, `in` over a literal list")


class ExprError(ValueError):
    """An expression outside the language, or one that fails on the values it is given."""


class Expr:
    """A parsed, admitted expression: `keys` are the config keys it reads."""

    def __init__(self, text, where: str):
        if not isinstance(text, str):
            raise ExprError(f"{where} must be an expression string, got {text!r}")
        self.text, self.where = text, where
        try:
            self.tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError:
            raise ExprError(f"{where}: '{text}' is not a valid expression") from None
        self.keys: list[str] = []
        self._admit(self.tree)

    def __call__(self, values: dict) -> bool:
        """Evaluate with `values` ({dotted key: value}); the result must be true or false."""
        try:
            result = self._eval(self.tree, values)
        except ExprError:
            raise
        except (TypeError, ZeroDivisionError, OverflowError, ValueError) as e:
            shown = ", ".join(f"{k}={values.get(k)!r}" for k in self.keys)
            raise ExprError(f"{self.where}: '{self.text}' fails with {shown}: {e}") from None
        if not isinstance(result, bool):
            raise ExprError(f"{self.where}: '{self.text}' must give true or false, got {result!r}")
        return result

    def _refuse(self, what: str):
        raise ExprError(f"{self.where}: '{self.text}' uses {what}, which the expression "
                        f"language does not allow (allowed: {LANGUAGE})")

    def _admit(self, node) -> None:
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (bool, int, float, str)):
                self._refuse(f"the literal {node.value!r}")
        elif isinstance(node, ast.Attribute):
            key = f"{node.value.id}.{node.attr}" if isinstance(node.value, ast.Name) else None
            if key not in KEYS:
                self._refuse(f"'{ast.unparse(node)}' (not a config key)")
            self.keys.append(key)
        elif isinstance(node, ast.Name):
            # YAML writes true/false; Python spellings of the same are literals too
            if node.id not in ("true", "false"):
                self._refuse(f"the name '{node.id}' (not a config key such as model.heads)")
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self._admit(value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            self._admit(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
            self._admit(node.left)
            self._admit(node.right)
        elif isinstance(node, ast.Compare) and all(type(op) in COMPARE for op in node.ops):
            self._admit(node.left)
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)):
                    if not isinstance(right, (ast.List, ast.Tuple)):
                        self._refuse("`in` over something other than a literal list")
                    for element in right.elts:
                        if not isinstance(element, ast.Constant):
                            self._refuse("a list element that is not a literal")
                        self._admit(element)
                else:
                    self._admit(right)
        else:
            self._refuse(f"'{ast.unparse(node)}'")

    def _eval(self, node, values: dict):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Attribute):
            key = f"{node.value.id}.{node.attr}"
            if key not in values:
                raise ExprError(f"{self.where}: '{self.text}' reads {key}, which has no value")
            return values[key]
        if isinstance(node, ast.Name):
            return node.id == "true"
        if isinstance(node, ast.BoolOp):  # short-circuits as Python does
            result = None
            for value in node.values:
                result = self._truth(self._eval(value, values))
                if result == isinstance(node.op, ast.Or):
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            operand = self._eval(node.operand, values)
            if isinstance(node.op, ast.Not):
                return not self._truth(operand)
            return operator.neg(self._number(operand)) if isinstance(node.op, ast.USub) \
                else self._number(operand)
        if isinstance(node, ast.BinOp):  # numbers only: 'x' * 10**9 would be a memory bomb
            left, right = self._number(self._eval(node.left, values)), \
                self._number(self._eval(node.right, values))
            return ARITHMETIC[type(node.op)](left, right)
        left = self._eval(node.left, values)
        for op, right_node in zip(node.ops, node.comparators):
            right = ([e.value for e in right_node.elts] if isinstance(op, (ast.In, ast.NotIn))
                     else self._eval(right_node, values))
            # 4 == '4' is merely false in Python: here it is the mistake it almost always is
            for other in right if isinstance(right, list) else [right]:
                if _kind(left) != _kind(other):
                    raise TypeError(f"cannot compare {left!r} with {other!r}")
            if not COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def _number(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"arithmetic needs numbers, got {value!r}")
        return value

    def _truth(self, value) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"and/or/not need true or false, got {value!r}")
        return value


def _kind(value) -> str:
    return "text" if isinstance(value, str) else "number"
