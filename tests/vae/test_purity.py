"""`vae/` is pure PyTorch: every module imports with ray, mlflow and pyarrow blocked (usable in a notebook without the cluster stack)."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import vae

SCRIPT = r"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "mlflow", "pyarrow"}:
            raise ImportError(f"vae/ must not import {name}")
        return None
sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
print("ok", len(sys.argv) - 1)
"""


def test_every_vae_module_imports_without_ray_mlflow_pyarrow():
    modules = ["vae"] + [f"vae.{m.name}" for m in pkgutil.iter_modules([str(Path(vae.__file__).parent)])]
    assert len(modules) > 3
    out = subprocess.run([sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok {len(modules)}"
