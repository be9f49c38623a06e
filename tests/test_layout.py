"""The shape the code keeps, so that a newcomer can follow a job through it (issue 9)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "uploader"
MAX_FUNCTION, MAX_CLASS, MAX_MODULE = 45, 250, 450


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


def beanstalk_names(path: Path) -> set[str]:
    return {
        alias.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "uploader.source.beanstalkd.wire"
        for alias in node.names
    }


@pytest.mark.parametrize("path", sorted((PACKAGE / "pipeline").glob("*.py")), ids=lambda p: p.name)
def test_past_the_source_nothing_speaks_beanstalkd(path: Path) -> None:
    assert "uploader.source.beanstalkd.wire" not in imported(path)


def test_the_daemon_takes_only_the_completion_producer_from_the_client() -> None:
    assert beanstalk_names(PACKAGE / "daemon.py") == {"Producer"}


def test_the_ring_is_pure() -> None:
    uses = imported(PACKAGE / "pipeline" / "ring.py")
    assert not {m for m in uses if m.startswith(("uploader", "asyncio", "redis", "time"))}
