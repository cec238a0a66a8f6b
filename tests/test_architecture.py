"""The architecture as contracts (pyproject.toml [tool.importlinter]), checked by import-linter: the layers of
pipelines/ import downwards only, no package has an import cycle, vae/ knows nothing of the pipeline, tune_spaces/
stands alone. A second test breaks a copy of the tree on purpose and checks that the contracts catch it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "4 kept, 0 broken" in out.stdout


def test_the_contracts_catch_an_upward_import_and_a_cycle(tmp_path):
    for name in ("pipelines", "vae", "tune_spaces"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    errors = tmp_path / "pipelines" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom pipelines.cli import args  # noqa: E402\n")  # a service → the CLI
    sink = tmp_path / "pipelines" / "tracking" / "sink.py"
    sink.write_text(sink.read_text() + "\nfrom pipelines.tracking import runs  # noqa: E402\n")  # runs → sink → runs
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert "pipelines.errors -> pipelines.cli.args" in out.stdout, out.stdout[-4000:]
    assert "no import cycles between the modules of any package BROKEN" in out.stdout.replace("\n", " ")
