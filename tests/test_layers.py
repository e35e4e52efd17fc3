"""The layers of DESIGN.md hold: core knows nothing of orchestration, tasks nothing of flows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "stitchtime_core": {"prefect", "boto3", "botocore", "click", "typer", "tasks", "flows", "deployments"},
    "tasks": {"flows", "deployments", "click", "typer"},
    "flows": {"deployments"},
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at any depth of the file (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    offending = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & FORBIDDEN[package]) for f in files}
    assert {f: bad for f, bad in offending.items() if bad} == {}


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import prefect\n    from boto3.session import Session\n")
    assert imported_modules(sample) == {"prefect", "boto3"}
