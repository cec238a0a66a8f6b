"""Shared by the vae tests: digits at 16×16 and a tiny NVAE trained briefly with NVAE's optimiser settings."""
from __future__ import annotations

import torch
from torch import Tensor


def digits_16() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as (1797, 1, 16, 16) float in [0, 1] (bilinear ×2 of value/16) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x, torch.tensor(digits.target)


def train_tiny(x: Tensor, n_train: int, steps: int, seed: int, batch: int = 32, **preset_overrides):
    """The tiny preset (with overrides) after `steps` Adamax steps (lr 1e-2, eps 1e-3, wd 3e-4) on random batches of
    the first `n_train` images, KL warm-up over the steps; returned in eval mode."""
    from vae.nvae import NVAE, NVAEConfig

    torch.manual_seed(seed)
    model = NVAE(NVAEConfig.preset("tiny", **preset_overrides))
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=3e-4)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        model.set_step(step, steps)
        loss = model(x[torch.randint(0, n_train, (batch,), generator=g)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
