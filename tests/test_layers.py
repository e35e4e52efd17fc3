"""The layers of DESIGN.md hold: core knows nothing of orchestration, tasks nothing of flows, and flows
only wire tasks (of the core they read its settings and its error types, and they do no maths)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "stitchtime_core": {"prefect", "boto3", "botocore", "click", "typer", "tasks", "flows", "deployments"},
    "tasks": {"flows", "deployments", "click", "typer"},
    "flows": {"deployments", "torch", "numpy", "cv2", "dlib", "boto3", "botocore"},
}
FLOWS_MAY_READ = {"stitchtime_core.config", "stitchtime_core.errors"}
"""The only modules of the core that flows import: settings and error types."""


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, by its full name, at any depth of the file (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    offending = {str(f.relative_to(ROOT)): sorted(name for name in imported_modules(f)
                                                  if name.split(".")[0] in FORBIDDEN[package])
                 for f in _files(package)}
    assert {f: bad for f, bad in offending.items() if bad} == {}


def test_flows_read_only_the_settings_and_errors_of_the_core() -> None:
    offending = {str(f.relative_to(ROOT)): sorted(name for name in imported_modules(f)
                                                  if name.split(".")[0] == "stitchtime_core"
                                                  and name not in FLOWS_MAY_READ)
                 for f in _files("flows")}
    assert {f: bad for f, bad in offending.items() if bad} == {}


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import prefect\n    from boto3.session import Session\n"
                      "    from stitchtime_core.models import registry\n")
    assert imported_modules(sample) == {"prefect", "boto3.session", "stitchtime_core.models"}
