"""The package's layering, checked by a real tool (import-linter) and one AST rule it cannot express.

Contracts live in pyproject.toml ([tool.importlinter]): pipeline layers, the runtime imports no planner,
the data side imports nothing of the activation side, no import cycles.  See ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "memstrata"


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports (import-linter, a dev dependency) is not installed: run make test")
    p = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": str(Path(sys.executable).parent)})
    assert p.returncode == 0 and "0 broken" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]


def _private_imports(path: Path) -> list[str]:
    """`from X import _name` where X is another memstrata package (a private name crossing a package line)."""
    tree = ast.parse(path.read_text())
    own = path.relative_to(PKG).parts[:-1]  # the package this file belongs to
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and not (node.module or "").startswith("memstrata"):
            continue
        if node.level:
            base = list(own)[: len(own) - (node.level - 1)] if node.level > 1 else list(own)
            target = base + ((node.module or "").split(".") if node.module else [])
        else:
            target = (node.module or "").split(".")[1:]
        if own and tuple(target[: len(own)]) == own:
            continue  # inside the same package: private helpers may be shared
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                out.append(f"{path.relative_to(PKG)}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return out


def test_no_private_names_cross_package_lines():
    """e.g. plan/ imports no private simulator names (SimResult, run, try_run are public)."""
    bad = [hit for f in sorted(PKG.rglob("*.py")) for hit in _private_imports(f)]
    assert bad == []


def test_private_name_rule_is_not_vacuous(tmp_path):
    probe = PKG / "plan" / "_probe_private.py"
    probe.write_text("from ..simulate import _Clock\n")
    try:
        assert _private_imports(probe) == ["plan/_probe_private.py: from ..simulate import _Clock"]
    finally:
        probe.unlink()
