"""The code's shape, checked: layers that only point down, no hidden imports, files that fit in a head.

The layer contract lives in pyproject.toml (`[tool.importlinter]`) and is drawn in
docs/architecture.md; import-linter checks it here, so an upward import fails `make test`.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
KEPT_WHOLE = "Kept whole:"  # a file over MAX_LINES says, near its top, why it is one idea
SOURCES = [ROOT / "dit_video", ROOT / "data_prep", ROOT / "benchmarks", ROOT / "tests", ROOT / "train.py",
           ROOT / "sample.py"]
OUR_PACKAGES = ("dit_video", "data_prep")


def python_files(paths=SOURCES) -> list[Path]:
    files = []
    for p in paths:
        files.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    return files


def test_import_layers_only_point_down():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is not installed: pip install -e '.[dev]'"
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_importing_the_model_pulls_in_no_training_data_or_distributed_code():
    code = ("import sys, dit_video.model; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'deepspeed', 'dit_video', 'data_prep'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert "dit_video.model.dit" in loaded  # the probe itself works
    ours = [m for m in loaded if m.startswith(("dit_video", "data_prep"))]
    assert all(m == "dit_video" or m.startswith("dit_video.model") for m in ours), ours
    assert not [m for m in loaded if not m.startswith(("dit_video", "data_prep"))], loaded


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_over_the_line_bound_without_its_reason(path):
    lines = path.read_text().splitlines()
    if len(lines) > MAX_LINES:
        assert any(KEPT_WHOLE in line for line in lines[:40]), (
            f"{path.relative_to(ROOT)} has {len(lines)} lines (> {MAX_LINES}): split it by job, or say near its "
            f"top, in a line starting '{KEPT_WHOLE}', why it is one idea")


def _local_imports_of_ours(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every `import`/`from ... import` of our packages below module level."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] in OUR_PACKAGES:
                    found.append((inner.lineno, inner.module))
                elif isinstance(inner, ast.Import):
                    found += [(inner.lineno, a.name) for a in inner.names if a.name.split(".")[0] in OUR_PACKAGES]
    return sorted(set(found))


def test_no_function_local_imports_of_our_own_modules():
    """A local import of our own module hides an arrow from the layer check (and usually points the
    wrong way): every such import sits at the top of its module. Tests may import inside tests."""
    offenders = []
    for path in python_files([p for p in SOURCES if p.name != "tests"]):
        offenders += [f"{path.relative_to(ROOT)}:{line} {mod}"
                      for line, mod in _local_imports_of_ours(ast.parse(path.read_text()))]
    assert not offenders, offenders


def test_the_local_import_check_sees_one():
    tree = ast.parse("def f():\n    from dit_video.run import train\n    import numpy\n")
    assert _local_imports_of_ours(tree) == [(2, "dit_video.run")]


def test_readme_fits_two_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
