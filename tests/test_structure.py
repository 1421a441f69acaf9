"""The package stays one a newcomer can hold in their head: no function over 60 lines, no
parameter list over 7 (self and cls not counted), read from the source with ast."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
MAX_LINES, MAX_PARAMETERS = 60, 7


def functions():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.name}:{node.lineno} {node.name}", node


def parameters(node: ast.FunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a]
    return len(names) - (names[:1] in (["self"], ["cls"]))


def test_no_function_is_over_60_lines():
    long = {name: node.end_lineno - node.lineno + 1 for name, node in functions()
            if node.end_lineno - node.lineno + 1 > MAX_LINES}
    assert not long, long


def test_no_parameter_list_is_over_7():
    wide = {name: parameters(node) for name, node in functions() if parameters(node) > MAX_PARAMETERS}
    assert not wide, wide
