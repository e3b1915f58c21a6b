"""The layers: the one-run pipeline never imports the study side, and the study side never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_pipeline_never_imports_the_study_or_analysis_side():
    for path in (ROOT / "pipeline").glob("*.py"):
        upward = {m for m in imported_modules(path) if m.split(".")[0] in ("study", "analysis", "main")}
        assert not upward, f"{path.name} imports {upward}"


def test_the_study_side_and_compare_answer_without_torch(tmp_path):
    modules = [f"study.{p.stem}" for p in (ROOT / "study").glob("*.py") if p.stem != "__init__"]
    code = f"import sys, main; [__import__(m) for m in {modules!r}]; "
    code += f"main.main(['compare', '--output_dir', {str(tmp_path)!r}]); sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"no finished runs under {tmp_path}" in done.stdout
