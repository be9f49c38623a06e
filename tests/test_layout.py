"""The shape the code keeps, so that a newcomer can follow a job through it (issue 9)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "uploader"
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 45, 250, 450
MAX_TOP_LEVEL = 10  # modules beside the subpackages: the daemon and what every package shares


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def span(node: ast.AST) -> int:
    assert isinstance(node, ast.stmt) and node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_functions_and_classes_stay_small(path: Path) -> None:
    source = path.read_text()
    too_big = [f"module: {len(source.splitlines())} lines"] if len(source.splitlines()) > MAX_MODULE else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and span(node) > MAX_FUNCTION:
            too_big.append(f"{node.name} (line {node.lineno}): {span(node)} lines")
        elif isinstance(node, ast.ClassDef) and span(node) > MAX_CLASS:
            too_big.append(f"class {node.name} (line {node.lineno}): {span(node)} lines")
    assert not too_big, too_big


def imported(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


DAEMON_SIDE = sorted(
    [PACKAGE / "daemon.py", *(PACKAGE / "pipeline").glob("*.py"), *(PACKAGE / "state").glob("*.py")]
)
OPERATORS_SIDE = sorted([*(PACKAGE / "cli").glob("*.py"), *(PACKAGE / "web").glob("*.py")])


@pytest.mark.parametrize("path", DAEMON_SIDE + OPERATORS_SIDE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_daemon_and_the_pipeline_speak_only_the_source_protocol(path: Path) -> None:
    """Whatever the broker, the daemon, the pipeline and a job's state see `source.base` (and
    `open_source`), the commands and the web side `source.base` (and `open_admin`): no module
    of a broker's own."""
    brokers = {m for m in imported(path) if m.startswith("uploader.source.") and m != "uploader.source.base"}
    assert not brokers


def test_the_ring_is_pure() -> None:
    uses = imported(PACKAGE / "pipeline" / "ring.py")
    assert not {m for m in uses if m.startswith(("uploader", "asyncio", "redis", "time"))}


def test_the_top_level_keeps_only_what_every_package_shares() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


# --- no import cycle: a module imported is a module finished, never one half run ---


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: at module level, also within a plain
    `if`, `try` or `with`; not under `if TYPE_CHECKING:`, nor in a function or class."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from runtime_imports(node.body)
            yield from runtime_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from runtime_imports(block)
        elif isinstance(node, ast.With):
            yield from runtime_imports(node.body)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of `package` and the modules of `package` it imports; `from a.b import c`
    counts as importing a.b.c when c is a submodule, else a.b."""
    paths = {module_name(path, package.parent): path for path in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        uses: set[str] = set()
        for node in runtime_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                uses.update(alias.name for alias in node.names if alias.name in paths)
                continue
            base = node.module or ""
            if node.level:  # relative: from the module's own package up
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join([*here[: len(here) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in paths:
                    uses.add(f"{base}.{alias.name}")
                elif base in paths:
                    uses.add(base)
        graph[name] = uses - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for used in sorted(graph[module]):
            if used not in index:
                visit(used)
                low[module] = min(low[module], low[used])
            elif used in stack:
                low[module] = min(low[module], index[used])
        if low[module] == index[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", [PACKAGE, REPO / "bench"], ids=lambda p: p.name)
def test_no_import_cycle(package: Path) -> None:
    assert cycles(import_graph(package)) == []
