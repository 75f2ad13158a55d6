"""The shape of the code: imports only point down, and the README's Layout names every module.

    shared/ (the contract)  <-  gateway/, worker/  <-  control/ (CLI, supervisor, status, admin)

Function-level imports count too: an upward one is a cycle in disguise.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "gateway", "worker", "control")
ALLOWED = {
    "shared": {"shared"},
    "gateway": {"shared", "gateway"},
    "worker": {"shared", "worker"},
    "control": {"shared", "gateway", "worker", "control"},
}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The top-level names ``path`` imports, wherever the import statement sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_only_point_down(package: str) -> None:
    ours = {*PACKAGES, "tests", "loadtest"}
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules(package)
        for name in imported_packages(path) & ours
        if name not in ALLOWED[package]
    }
    assert not wrong, sorted(wrong)


def test_the_readme_layout_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    named = {m for m in re.findall(r"`([a-z_]+/[a-z_]+\.py)`", layout) if m.split("/")[0] in PACKAGES}
    present = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in modules(pkg) if p.name != "__init__.py"}
    assert present - named == set(), "modules the README's Layout does not describe"
    assert named - present == set(), "modules the README's Layout names that do not exist"


def test_the_readme_configuration_table_lists_every_setting() -> None:
    from shared.settings import GatewaySettings, JobsSettings, WorkerSettings

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ", 1)]
    names = {
        f"SWITCHYARD_{n.upper()}"
        for s in (GatewaySettings, JobsSettings, WorkerSettings)
        for n in s.model_fields
    }
    names = {"REDIS_URL" if n == "SWITCHYARD_REDIS_URL" else n for n in names}
    assert sorted(n for n in names if f"`{n}`" not in table) == []
