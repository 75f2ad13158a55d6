"""The shape of the code: imports only point down, and the README's Layout names every module.

    shared/ (the contract)
      <-  api/ (the OpenAI surface, pure)  <-  serving/ (the shared request path)
      <-  scaling/, batch/ (feature packages)
      <-  gateway/ (HTTP), worker/ (engine)
      <-  control/ (CLI, supervisor, status, admin)

Function-level imports count too: an upward one is a cycle in disguise.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "api", "serving", "scaling", "batch", "gateway", "worker", "control")
ALLOWED = {
    "shared": {"shared"},
    "api": {"shared", "api"},
    "serving": {"shared", "api", "serving"},
    "scaling": {"shared", "api", "serving", "scaling"},
    "batch": {"shared", "api", "serving", "batch"},
    "gateway": {"shared", "api", "serving", "scaling", "batch", "gateway"},
    "worker": {"shared", "worker"},
    "control": set(PACKAGES),
}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def upward(package: str, paths: list[Path]) -> set[str]:
    """The imports of ``paths`` (modules of ``package``) that point up or sideways."""
    ours = {*PACKAGES, "tests", "loadtest"}
    return {
        f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name} imports {name}"
        for path in paths
        for name in imported_packages(path) & ours
        if name not in ALLOWED[package]
    }


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
    wrong = upward(package, modules(package))
    assert not wrong, sorted(wrong)


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from gateway.app import create_app\n    return create_app\n")
    assert upward("serving", [probe]) == {"probe.py imports gateway"}
    probe.write_text("from batch.role import serve\n")
    assert upward("serving", [probe]) == {"probe.py imports batch"}
    probe.write_text("import control.cli\n")
    assert upward("batch", [probe]) == {"probe.py imports control"}
    probe.write_text("from api.errors import APIError\nfrom shared.names import Names\n")
    assert upward("serving", [probe]) == set()


def test_the_readme_layout_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    named = {m for m in re.findall(r"`([a-z_]+(?:/[a-z_]+)+\.py)`", layout) if m.split("/")[0] in PACKAGES}
    present = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in modules(pkg) if p.name != "__init__.py"}
    assert present - named == set(), "modules the README's Layout does not describe"
    assert named - present == set(), "modules the README's Layout names that do not exist"


def test_the_readme_configuration_table_lists_every_setting() -> None:
    from shared.settings import BackgroundSettings, GatewaySettings, WorkerSettings

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ", 1)]
    names = {
        f"SWITCHYARD_{n.upper()}"
        for s in (GatewaySettings, BackgroundSettings, WorkerSettings)
        for n in s.model_fields
    }
    names = {"REDIS_URL" if n == "SWITCHYARD_REDIS_URL" else n for n in names}
    assert sorted(n for n in names if f"`{n}`" not in table) == []
