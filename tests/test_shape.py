"""The code's shape (issue 11, issue 24 item 7): small modules and functions, no module reaching into
another's private names, imports in one direction (docs/design.md), no import cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "ubdcow"
#: every module: the engine and the tools directly in ubdcow/, the command line (cli/), the filesystem reader (fs/)
ALL = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
#: the engine's layers, bottom up (docs/design.md): a module imports only from its own layer or below
LAYERS = [
    {"errors", "_result", "_deps", "_signals"},
    {"_io"},
    {"format"},
    {"bitmap", "lock"},
    {"backing", "cowfile"},
    {"_readpath"},
    {"_pagewrite"},
    {"image"},
    {"disk"},
]
#: the filesystem reader's layers, bottom up (docs/design.md); below them it may import only these
FS_LAYERS = [
    {"layout", "journal_layout", "crc", "records"},
    {"superblock", "journal_blocks", "partitions"},
    {"journal"},
    {"volume"},
    {"inodes"},
    {"blockmap"},
    {"xattrs"},
    {"dirs", "files"},
    {"walk"},
    {"filesystem"},
    {"openfs", "index"},
    {"delta"},
    {"treediff"},
    {"__init__"},
]
FS_BELOW = {"ubdcow.errors", "ubdcow.disk"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, *, top_level_only: bool) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from X import name`` of the package in ``path`` (``name`` "" for
    ``import X``); ``X`` resolved to a module of the package, or to ``X.name`` when that is a module."""
    me = module_name(path)
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    out.append((f"{module}.{alias.name}", ""))
                elif module in MODULES:
                    out.append((module, alias.name))
        elif isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names if alias.name in MODULES]
    return out


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring."""
    n = (node.end_lineno or node.lineno) - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        n -= (first.end_lineno or first.lineno) - first.lineno + 1
    return n


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_are_small(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    long = [
        f"{node.name} ({body_lines(node)} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: {long}"


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{module_name(path)}: {module}.{name}"
        for path in MODULES.values()
        for module, name in imports(path, top_level_only=False)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private


def test_the_engine_imports_only_from_its_own_layer_or_below() -> None:
    layer = {f"ubdcow.{name}": i for i, names in enumerate(LAYERS) for name in names}
    assert set(layer) <= set(MODULES), set(layer) - set(MODULES)
    upward = [
        f"{module} imports {target}"
        for module, i in layer.items()
        for target, _ in imports(MODULES[module], top_level_only=False)
        if layer.get(target, len(LAYERS)) > i
    ]
    assert not upward


def test_the_filesystem_reader_imports_only_from_its_own_layer_or_below() -> None:
    layer = {"ubdcow.fs" + ("" if name == "__init__" else f".{name}"): i for i, names in enumerate(FS_LAYERS)
             for name in names}  # fmt: skip
    assert set(layer) == {m for m in MODULES if m.startswith("ubdcow.fs")}, "a module of fs/ not in FS_LAYERS"
    wrong = [
        f"{module} imports {target}"
        for module, i in layer.items()
        for target, _ in imports(MODULES[module], top_level_only=False)
        if (target not in FS_BELOW and layer.get(target, len(FS_LAYERS)) > i)
        or (target == "ubdcow.disk" and module != "ubdcow.fs.openfs")  # the disk is opened in one place
    ]
    assert not wrong


def test_the_map_in_design_md_names_every_module_and_only_tests_that_exist() -> None:
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", text))
    # cli/ modules are named with their folder; the engine's, the tools' and fs/'s by their file name
    unnamed = [
        str(p.relative_to(PACKAGE))
        for p in ALL
        if str(p.relative_to(PACKAGE)) not in named and p.name not in named and p.parent.name != "cli"
        or p.parent.name == "cli" and p.name != "__init__.py" and f"cli/{p.name}" not in named
    ]
    assert not unnamed, f"docs/design.md does not name {unnamed}"
    tests = set(re.findall(r"`(test_\w+)`", text))
    assert tests and not [name for name in tests if not (PACKAGE.parent / "tests" / f"{name}.py").exists()]


def cycles(top_level_only: bool, where: str = "ubdcow") -> list[list[str]]:
    graph = {
        m: {t for t, _ in imports(p, top_level_only=top_level_only) if t != m and t.startswith(where)}
        for m, p in MODULES.items()
        if m.startswith(where)
    }
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                found.append(path[path.index(t) :] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycle() -> None:
    assert not cycles(top_level_only=True)  # the whole package, as modules import each other when loaded
    # and with the imports made inside functions too, outside the command line (whose table, cli/app.py,
    # is imported lazily by cli/base.py to name working command lines in hints)
    assert not [c for c in cycles(top_level_only=False) if not all(m.startswith("ubdcow.cli") for m in c)]
