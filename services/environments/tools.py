"""Tools a policy calls from its completions, and how the calls are written.

A call is found in a policy turn's text by a ``ToolFormat``: ``xml`` is
``<tool>calculator</tool><args>12*(3+4)</args>``; ``json`` is the Hermes / Qwen chat templates'
``<tool_call>{"name": "calculator", "arguments": {"expression": "12*(3+4)"}}</tool_call>``;
any other regular expression with the named groups ``name`` and ``args`` works too (``args``
then is the tool's one argument, as text).

Built-in tools (``TOOLS``): ``calculator`` (arithmetic on numbers: + - * / // % ** and
parentheses, evaluated from Python's syntax tree, never ``eval``) and ``python`` (code run in
the sandbox, ``services.environments.sandbox``). ``run_tool`` never raises: an unknown tool, bad
arguments, a crash or a limit reached is a ``ToolResult`` with ``error`` set, whose text the
policy reads back.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from dataclasses import dataclass

from services.environments.sandbox import SandboxLimits, describe, run_python

FORMATS = {
    "xml": r"<tool>\s*(?P<name>[\w.-]+)\s*</tool>\s*<args>(?P<args>.*?)</args>",
    "json": r"<tool_call>\s*(?P<json>\{.*?\})\s*</tool_call>",
}
ARGUMENT_OF = {"calculator": "expression", "python": "code"}  # a json call's argument for each tool


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: str
    span: tuple[int, int]  # where in the turn's text


@dataclass(frozen=True)
class ToolResult:
    text: str
    error: bool = False


def find_tool_calls(text: str, tool_format: str = "xml") -> list[ToolCall]:
    """The calls in ``text``, in order; ``tool_format`` a name of FORMATS or a regular expression
    with the groups ``name`` and ``args``. A json call that does not parse is a call of the
    tool "?" (run_tool answers it with an error), so the policy learns of it."""
    pattern = re.compile(FORMATS.get(tool_format, tool_format), re.DOTALL)
    calls = []
    for match in pattern.finditer(text):
        if "json" in pattern.groupindex:
            try:
                payload = json.loads(match["json"])
                name = str(payload["name"])
                arguments = payload.get("arguments", {})
                args = arguments if isinstance(arguments, str) else str(arguments.get(ARGUMENT_OF.get(name, ""), ""))
            except (ValueError, KeyError, TypeError, AttributeError):
                name, args = "?", match["json"]
        else:
            name, args = match["name"], match["args"]
        calls.append(ToolCall(name, args.strip(), match.span()))
    return calls


# ---------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e100
MAX_EXPRESSION = 500  # characters: a parse of deeply nested parentheses must stay cheap


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression; ValueError naming what is not allowed."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError):
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            result = _BINARY[type(node.op)](left, right)
            if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
                raise ValueError("the result is out of range")
            return result
        raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.unparse(node)!r}")

    try:
        result = value(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    if isinstance(result, float) and math.isfinite(result) and result.is_integer():
        return int(result)
    return result


def run_tool(call: ToolCall, limits: SandboxLimits = SandboxLimits()) -> ToolResult:
    """What the policy reads back after ``call``."""
    if call.name == "calculator":
        try:
            return ToolResult(str(calculate(call.args)))
        except ValueError as exc:
            return ToolResult(f"error: {exc}", error=True)
    if call.name == "python":
        result = run_python(call.args, limits)
        return ToolResult(describe(result, limits), error=not result.ok)
    return ToolResult(f"error: no tool {call.name!r} (tools: {', '.join(TOOLS)})", error=True)


TOOLS = ("calculator", "python")
