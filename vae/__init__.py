"""vaepipe's models in plain PyTorch: `from vae import NVAE, NVAEConfig`.

The package imports lazily: `vae.config` and `vae.configs` (the torch-free hyperparameter dataclasses) load without
torch; `vae.NVAE` imports the model on first use."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["NVAE", "NVAEConfig", "NVAEOutput"]
_LAZY = {"NVAE": "vae.nvae", "NVAEOutput": "vae.nvae", "NVAEConfig": "vae.configs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vae' has no attribute {name!r}")
