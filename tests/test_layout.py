"""The shape of the code: imports only point down, docs/development.md's Layout names every module,
and docs/configuration.md lists every setting.

    shared/ (the contract)  <-  gateway/, worker/  <-  control/ (CLI, supervisor, status, admin)

Function-level imports count too: an upward one is a cycle in disguise.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
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


def section(page: Path, heading: str) -> str:
    """The text of ``page`` from ``heading`` up to the next heading of the same level."""
    text = page.read_text()
    level = heading.split(" ")[0]
    part = text[text.index(f"\n{heading}\n") + 1 :]
    end = part.find(f"\n{level} ", 1)
    return part if end == -1 else part[:end]


def test_the_development_layout_names_every_module() -> None:
    layout = section(DOCS / "development.md", "## Layout")
    named = {m for m in re.findall(r"`([a-z_]+/[a-z_]+\.py)`", layout) if m.split("/")[0] in PACKAGES}
    present = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in modules(pkg) if p.name != "__init__.py"}
    assert present - named == set(), "modules docs/development.md's Layout does not describe"
    assert named - present == set(), "modules docs/development.md's Layout names that do not exist"


def test_the_configuration_page_lists_every_setting() -> None:
    from shared.settings import GatewaySettings, JobsSettings, WorkerSettings

    table = (DOCS / "configuration.md").read_text()
    names = {
        f"SWITCHYARD_{n.upper()}"
        for s in (GatewaySettings, JobsSettings, WorkerSettings)
        for n in s.model_fields
    }
    names = {"REDIS_URL" if n == "SWITCHYARD_REDIS_URL" else n for n in names}
    assert sorted(n for n in names if f"`{n}`" not in table) == []
