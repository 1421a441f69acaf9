"""The package stays one a newcomer can hold in their head: its folders are the README's Layout
map, imports run only down that map, no function is over 60 lines and no parameter list over 7
(self and cls not counted). All read from the source with ast."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
MAX_LINES, MAX_PARAMETERS = 60, 7
# The README's Layout map, top down. A unit is a folder of pipeline/ or one of the modules named
# here; every other module of pipeline/ itself is the driver's ("pipeline"). A module may import
# from its own unit and from the layers below its own, nothing else: `python -m pipeline` the
# command line, which may import the tools, the tools the driver, the driver the worker, and so
# on down; data and records not each other.
LAYERS = [{"pipeline.__main__"}, {"pipeline.cli"}, {"pipeline.bench"}, {"pipeline"}, {"pipeline.worker"},
          {"pipeline.data", "pipeline.records"}, {"pipeline.config"}]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def sources():
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    first_two = ".".join(module.split(".")[:2])
    return first_two if first_two in LEVEL else "pipeline"


def is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(path: Path):
    """The package's modules that `path` imports, anywhere in it (a function's own imports too);
    a relative import is yielded as itself, which no unit allows."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline")
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "pipeline":
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                yield name if is_module(name) else node.module


def arrows() -> set[tuple[str, str]]:
    return {(module_name(path), target) for path in sources() for target in imported(path)}


def test_imports_run_only_down_the_layout():
    wrong = sorted(f"{source} imports {target}" for source, target in arrows()
                   if target.startswith(".") or unit(source) != unit(target)
                   and LEVEL[unit(target)] <= LEVEL[unit(source)])
    assert not wrong, wrong


def test_the_tree_is_the_readme_layout_and_tests_mirror_it():
    section = (ROOT / "README.md").read_text().split("\n## Layout\n")[1].split("\n## ")[0]
    listed = {}
    for folder, modules in re.findall(r"^\| `(pipeline/[\w/]*)` \|[^|]*\| (.*) \|$", section, re.M):
        listed.setdefault(folder, set()).update(re.findall(r"`(\w+\.py)`", modules))
    tree = {}
    for path in sources():
        if path.name != "__init__.py":
            tree.setdefault(f"{path.parent.relative_to(ROOT)}/", set()).add(path.name)
    assert listed == tree
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert {path.name for path in (ROOT / "tests").iterdir() if path.is_dir() and path.name[0] not in "_."} == folders


def functions():
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}", node


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
