"""The layers: imports run one way (the pipeline imports neither the study nor the analysis nor the entry point, the
analysis never imports the study), and the study side never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


UPWARD = {
    "pipeline": ("study", "analysis", "main", "command_line", "full_finetuning", "lora_finetuning"),
    "analysis": ("study", "main", "command_line", "full_finetuning", "lora_finetuning"),
}


@pytest.mark.parametrize("layer", UPWARD)
def test_no_layer_imports_a_layer_above_it(layer):
    for path in (ROOT / layer).glob("*.py"):
        upward = {m for m in imported_modules(path) if m.split(".")[0] in UPWARD[layer]}
        assert not upward, f"{layer}/{path.name} imports {upward}"


def test_the_study_side_and_compare_answer_without_torch(tmp_path):
    modules = [f"study.{p.stem}" for p in (ROOT / "study").glob("*.py") if p.stem != "__init__"]
    code = f"import sys, main; [__import__(m) for m in {modules!r}]; "
    code += f"main.main(['compare', '--output_dir', {str(tmp_path)!r}]); sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"no finished runs under {tmp_path}" in done.stdout
