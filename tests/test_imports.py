"""Every module imports, without cycles, on the oldest Python pyproject claims (3.10: no
tomllib in the standard library, tomli instead)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for p in (REPO / "vitexp").rglob("*.py"))


@pytest.mark.slow
def test_every_module_imports_without_tomllib():
    """What Python 3.10 sees: `import tomllib` fails; tomli (pyproject's dependency there) stands in."""
    code = ("import sys, tomllib, importlib; sys.modules['tomli'] = tomllib; sys.modules['tomllib'] = None\n"
            f"for m in {MODULES!r}: importlib.import_module(m)\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def _imports(path: Path) -> set[str]:
    """vitexp modules PATH imports, at module level and inside functions alike (a lazy import
    hides a cycle from Python, not from a reader)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitexp"):
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                    for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vitexp")}
    return out & set(MODULES)


def test_no_import_cycles():
    graph = {m: _imports(REPO / (m.replace(".", "/") + ".py")) if (REPO / (m.replace(".", "/") + ".py")).exists()
             else _imports(REPO / m.replace(".", "/") / "__init__.py") for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph.get(m, ()):
            if n != m and not m.startswith(n + "."):  # a package importing its own modules is no cycle
                visit(n, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


def test_no_function_is_longer_than_60_lines():
    long = []
    for p in (REPO / "vitexp").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{p.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_the_trainer_imports_no_feature():
    """Fine-tuning and distillation reach a trial through the trainer's `Feature` hooks and the
    table in `vitexp.features`, never through an import in the trainer."""
    imported = _imports(REPO / "vitexp" / "trainer.py")
    assert "vitexp.features" in imported
    assert not imported & {"vitexp.distill", "vitexp.finetune", "vitexp.source"}, imported
