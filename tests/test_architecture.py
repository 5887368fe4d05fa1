"""The house rules of the code base, read from the source: import directions, a test file per pass, lint, docs.

Tier (c) of the tests (docs/architecture.md, "Tests"): invariants of the repository
itself. Imports are read with `ast`, so a rule holds for every import
statement, not only the ones executed at import time.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tedfx"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (relative imports resolved), including `from x import y` as x and x.y."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _forbidden(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in _imports(path) if any(m == p or m.startswith(p + ".") for p in prefixes))


RUNTIME_MUST_NOT_IMPORT = ("tedfx.passes", "tedfx.predict", "tedfx.check", "tedfx.api", "tedfx.pipeline",
                           "tedfx.backend")


@pytest.mark.parametrize("path", sorted((PACKAGE / "runtime").glob("*.py")), ids=lambda p: p.name)
def test_the_runtime_never_imports_passes_predictions_checks_or_doors(path):
    assert _forbidden(path, RUNTIME_MUST_NOT_IMPORT) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "passes").glob("*.py")), ids=lambda p: p.name)
def test_passes_never_import_the_runtime_or_the_doors(path):
    assert _forbidden(path, ("tedfx.runtime", "tedfx.api", "tedfx.pipeline", "tedfx.predict", "tedfx.check")) == []


def test_the_import_reader_sees_relative_imports():
    """The rule tests above would pass vacuously if relative imports were not resolved."""
    imports = _imports(PACKAGE / "runtime" / "executor.py")
    assert "tedfx.runtime.grad_sync" in imports and "tedfx.collectives" in imports


def _pass_functions() -> dict[str, Path]:
    """{name of every `*_pass` function defined in tedfx/passes: its file}."""
    found = {}
    for path in sorted((PACKAGE / "passes").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_pass"):
                found[node.name] = path
    return found


def test_every_pass_has_a_single_process_test_file():
    """Each pass is called by name in a test under tests/passes/ (which starts no process)."""
    passes = _pass_functions()
    assert len(passes) >= 8
    tests = {p: p.read_text() for p in (ROOT / "tests" / "passes").glob("test_*.py")}
    untested = [name for name in passes if not any(re.search(rf"\b{name}\b", text) for text in tests.values())]
    assert untested == []
    assert not any("tedfx.launch" in text or "launch(" in text for text in tests.values())


def test_every_pass_is_in_the_pipeline():
    """A pass is added by one file and one line in tedfx/pipeline.py: no pass is left out of it."""
    pipeline = (PACKAGE / "pipeline.py").read_text()
    assert [name for name in _pass_functions() if not re.search(rf"\b{name}\b", pipeline)] == []


def test_no_reference_to_documents_outside_the_repository():
    pattern = re.compile(r"\b(DESIGN|STYLE)(\.md)?\s*§")
    texts = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]
    for folder in ("tedfx", "tests", "benchmarks", "examples"):
        texts += (ROOT / folder).rglob("*.py")
    offending = [str(p.relative_to(ROOT)) for p in texts if pattern.search(p.read_text(errors="replace"))]
    assert offending == []


def test_docs_cited_by_the_code_exist():
    """Every `docs/<name>.md` a source file cites is in the repository."""
    cited = set()
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        cited |= set(re.findall(r"docs/([\w-]+\.md)", path.read_text()))
    assert cited, "no citation found: the pattern is wrong"
    assert sorted(name for name in cited if not (ROOT / "docs" / name).exists()) == []


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_and_the_architecture_doc_name_every_module():
    """docs/architecture.md's Modules table names every module by path; the README's table by name."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    readme = (ROOT / "README.md").read_text()
    readme_table = readme[readme.index("## Architecture"):readme.index("## State dict")]
    modules = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 40
    assert [str(p.relative_to(ROOT)) for p in modules if f"`{p.relative_to(ROOT)}`" not in doc] == []
    assert [p.stem for p in modules if p.stem not in readme_table] == []
