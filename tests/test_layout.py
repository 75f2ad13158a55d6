"""The shape of the code and of its documentation: imports only point down, docs/development.md's
Layout names every module, docs/configuration.md lists every setting, and the README and docs/ link
only to files that exist, every page of docs/ from the README.

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
DOCS = ROOT / "docs"
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


def section(page: Path, heading: str) -> str:
    """The text of ``page`` from ``heading`` up to the next heading of the same level."""
    text = page.read_text()
    level = heading.split(" ")[0]
    part = text[text.index(f"\n{heading}\n") + 1 :]
    end = part.find(f"\n{level} ", 1)
    return part if end == -1 else part[:end]


def test_the_development_layout_names_every_module() -> None:
    layout = section(DOCS / "development.md", "## Layout")
    named = {m for m in re.findall(r"`([a-z_]+(?:/[a-z_]+)+\.py)`", layout) if m.split("/")[0] in PACKAGES}
    present = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in modules(pkg) if p.name != "__init__.py"}
    assert present - named == set(), "modules docs/development.md's Layout does not describe"
    assert named - present == set(), "modules docs/development.md's Layout names that do not exist"


def test_the_configuration_page_lists_every_setting() -> None:
    from shared.settings import BackgroundSettings, GatewaySettings, WorkerSettings

    table = (DOCS / "configuration.md").read_text()
    names = {
        f"SWITCHYARD_{n.upper()}"
        for s in (GatewaySettings, BackgroundSettings, WorkerSettings)
        for n in s.model_fields
    }
    names = {"REDIS_URL" if n == "SWITCHYARD_REDIS_URL" else n for n in names}
    assert sorted(n for n in names if f"`{n}`" not in table) == []


def test_the_readme_settings_read_as_on_the_configuration_page() -> None:
    table = section(ROOT / "README.md", "## Configuration")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    full = (DOCS / "configuration.md").read_text().splitlines()
    assert rows, "the README's Configuration table is empty"
    assert [row for row in rows if row not in full] == []


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def links(page: Path) -> list[str]:
    """The targets of ``page``'s Markdown links, code blocks left out."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def anchors(page: Path) -> set[str]:
    """The anchors a Markdown renderer gives ``page``'s headings (lower case, punctuation dropped)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_readme_links_every_docs_page() -> None:
    linked = {(ROOT / t.split("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in linked) == []


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto: ...
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        missing_anchor = anchor and dest.suffix == ".md" and anchor not in anchors(dest)
        if not dest.exists() or missing_anchor:
            broken.append(target)
    assert broken == []
