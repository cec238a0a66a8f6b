"""NVAE's stabilisers (Vahdat & Kautz, 2020, Sec. 3.2 and App. A): KL warm-up, KL balancing, spectral regularisation.

- KL warm-up: β_t = max(min((t − c)/A, 1), β_min), A = anneal_portion·T, c = const_portion·T.
- KL balancing (only while β_t < 1): group l gets γ_l ∝ (batch-mean |KL_l| + 0.01)/α_l, rescaled to mean 1 and
  detached, with the 'square' normaliser α_s ∝ (2^s)²/(groups in scale s). Groups at large resolutions (many
  positions) and with few siblings get a large α, so their (large) KL is not allowed to dominate while others collapse.
- Spectral regularisation: L_SR = λ·(Σ_layers σ_max(W) + Σ_BN max|γ|) with σ_max of each kernel reshaped to
  C_out × (C_in·k·k) estimated by power iteration (Miyato et al., 2018), 4 iterations per step and 40 at the first
  call; λ is constant or annealed log-linearly from λ_init with the same β_t.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kl_coefficient(
    step: int, total_steps: int, anneal_portion: float = 0.3, const_portion: float = 1e-4, min_coeff: float = 1e-4
) -> float:
    """KL warm-up β_t: min_coeff for the first const_portion of training, then linear up to 1 at
    (const_portion + anneal_portion)·total_steps, then 1."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0 (the number of optimiser steps of the whole run)")
    if not anneal_portion > 0:
        raise ValueError(f"anneal_portion={anneal_portion} must be > 0; use a tiny value to disable the warm-up")
    anneal = anneal_portion * total_steps
    const = const_portion * total_steps
    return max(min((step - const) / anneal, 1.0), min_coeff)


def kl_balance_alphas(groups_per_scale: list[int], scales_hw: list[int]) -> Tensor:
    """Normalisers α (L,) of the 'square' rule, one per latent group.

    Both lists are ordered as the top-down decoder visits the scales: smallest resolution first. groups_per_scale[i]
    is the number of groups at the i-th scale, scales_hw[i] its side length (H = W). The α's come out in the order the
    decoder samples the groups (all groups of scale 0, then scale 1, ...), i.e. the order of `kl_per_group`'s columns.
    α ∝ (hw_i/hw_0)²/groups_i, which is NVAE's (2^s)²/groups_s when each scale doubles; normalised so min α = 1.
    """
    if len(groups_per_scale) != len(scales_hw) or not groups_per_scale:
        raise ValueError(
            f"groups_per_scale {groups_per_scale} and scales_hw {scales_hw} must be non-empty and of equal length "
            "(one entry per latent scale)"
        )
    if any(g <= 0 for g in groups_per_scale) or any(s <= 0 for s in scales_hw):
        raise ValueError(f"groups_per_scale {groups_per_scale} and scales_hw {scales_hw} must all be positive")
    if any(b <= a for a, b in zip(scales_hw, scales_hw[1:])):
        raise ValueError(
            f"scales_hw {scales_hw} must increase: list the scales smallest resolution first, as the top-down "
            "decoder visits them (reverse both lists if they are finest first)"
        )
    alphas = torch.cat(
        [torch.full((g,), (hw / scales_hw[0]) ** 2 / g) for g, hw in zip(groups_per_scale, scales_hw)]
    )
    return alphas / alphas.min()


def balanced_kl(kl_per_group: Tensor, alphas: Tensor, beta: float, balance: bool) -> tuple[Tensor, Tensor]:
    """kl_per_group (B, L) nats, alphas (L,) -> (β·Σ_l γ_l·KL_l (B,), γ (L,)).

    While balancing (balance and β < 1), γ_l ∝ (batch-mean |KL_l| + 0.01)/α_l with mean(γ) = 1, detached so it only
    reweights the gradient; otherwise γ = 1 and the term is the plain β-weighted KL.
    """
    if kl_per_group.dim() != 2 or alphas.shape != (kl_per_group.shape[1],):
        raise ValueError(
            f"balanced_kl: kl_per_group must be (B, L) and alphas (L,), got {tuple(kl_per_group.shape)} and "
            f"{tuple(alphas.shape)}; build alphas with kl_balance_alphas for the same groups"
        )
    alphas = alphas.to(kl_per_group)
    if balance and beta < 1.0:
        gammas = (kl_per_group.detach().abs().mean(dim=0) + 0.01) / alphas
        gammas = gammas / gammas.mean()
    else:
        gammas = torch.ones_like(alphas)
    return beta * (kl_per_group * gammas).sum(dim=1), gammas


def sr_coefficient(
    step: int,
    total_steps: int,
    lam: float,
    anneal: bool = False,
    lam_init: float = 10.0,
    anneal_portion: float = 0.3,
    const_portion: float = 1e-4,
    min_coeff: float = 1e-4,
) -> float:
    """Spectral-regularisation weight: lam, or with `anneal` log-linear from lam_init to lam along the KL warm-up,
    log λ_t = β_t·log lam + (1 − β_t)·log lam_init (NVAE's `weight_decay_norm_anneal`). Since β_0 = min_coeff,
    λ_0 is lam_init up to a factor (lam/lam_init)^min_coeff; λ reaches lam exactly when the warm-up ends."""
    if not (lam > 0 and lam_init > 0):
        raise ValueError(f"sr_coefficient: lam={lam} and lam_init={lam_init} must be > 0 (the schedule is log-linear)")
    if not anneal:
        return lam
    beta = kl_coefficient(step, total_steps, anneal_portion, const_portion, min_coeff)
    return math.exp(beta * math.log(lam) + (1.0 - beta) * math.log(lam_init))


class SpectralRegularizer(nn.Module):
    """Σ_i σ_max(W_i) over a fixed list of weights, by batched power iteration.

    Weights are viewed as matrices C_out × (everything else) and grouped by that matrix shape, in order of first
    appearance; each group keeps its left/right singular-vector estimates as buffers `u{g}` (G, C_out) and `v{g}`
    (G, rest), and `initialized` records whether the long first run has happened, so all of it is in the owning
    model's state_dict and a resume continues the same estimates. The iterations run without gradient; the returned
    σ = uᵀWv is differentiable in W (the usual spectral-norm gradient u vᵀ).
    """

    def __init__(self, shapes: list[torch.Size], n_power_iterations: int = 4, n_init_iterations: int = 40) -> None:
        super().__init__()
        if not shapes:
            raise ValueError("SpectralRegularizer needs at least one weight shape (the conv kernels to regularise)")
        if n_power_iterations < 1 or n_init_iterations < 1:
            raise ValueError("SpectralRegularizer: n_power_iterations and n_init_iterations must be >= 1")
        self.shapes = [torch.Size(s) for s in shapes]
        self.n_power_iterations = n_power_iterations
        self.n_init_iterations = n_init_iterations
        matrix_shapes: list[tuple[int, int]] = []
        self.group_of: list[tuple[int, int]] = []  # weight i -> (group, index inside the group)
        counts: list[int] = []
        for shape in self.shapes:
            if len(shape) < 2:
                raise ValueError(
                    f"SpectralRegularizer: weight shape {tuple(shape)} has no matrix view; pass conv or linear "
                    "weights only (biases and norms are handled by batchnorm_penalty)"
                )
            mat = (shape[0], shape[1:].numel())
            if mat not in matrix_shapes:
                matrix_shapes.append(mat)
                counts.append(0)
            g = matrix_shapes.index(mat)
            self.group_of.append((g, counts[g]))
            counts[g] += 1
        self.matrix_shapes = matrix_shapes
        for g, ((rows, cols), n) in enumerate(zip(matrix_shapes, counts)):
            self.register_buffer(f"u{g}", F.normalize(torch.randn(n, rows), dim=1))
            self.register_buffer(f"v{g}", F.normalize(torch.randn(n, cols), dim=1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, weights: list[Tensor]) -> Tensor:
        """weights: the tensors whose shapes were given at construction, in the same order -> scalar Σ σ_max."""
        if len(weights) != len(self.shapes) or any(w.shape != s for w, s in zip(weights, self.shapes)):
            raise ValueError(
                f"SpectralRegularizer: got {len(weights)} weights of shapes {[tuple(w.shape) for w in weights]}, "
                f"expected {len(self.shapes)} of shapes {[tuple(s) for s in self.shapes]}; pass the same list of "
                "weights, in the same order, as at construction"
            )
        groups: list[list[Tensor]] = [[] for _ in self.matrix_shapes]
        for w, (g, _) in zip(weights, self.group_of):
            groups[g].append(w.reshape(w.shape[0], -1))
        n_iter = self.n_power_iterations if bool(self.initialized) else self.n_init_iterations
        sigmas = []
        # No autocast here: bf16 matmuls would bias the σ estimates; the buffers' dtype (fp32) sets the precision.
        with torch.autocast(device_type=weights[0].device.type, enabled=False):
            for g, mats in enumerate(groups):
                u, v = getattr(self, f"u{g}"), getattr(self, f"v{g}")
                w = torch.stack(mats).to(u.dtype)  # (G, rows, cols)
                with torch.no_grad():
                    for _ in range(n_iter):
                        v = F.normalize(torch.einsum("gij,gi->gj", w, u), dim=1, eps=1e-12)
                        u = F.normalize(torch.einsum("gij,gj->gi", w, v), dim=1, eps=1e-12)
                    getattr(self, f"u{g}").copy_(u)
                    getattr(self, f"v{g}").copy_(v)
                sigmas.append(torch.einsum("gi,gij,gj->g", u, w, v))  # (G,)
        self.initialized.fill_(True)
        return torch.cat(sigmas).sum()


def batchnorm_penalty(module: nn.Module) -> Tensor:
    """Σ over the affine batch-norm layers of `module` of max|γ| (NVAE adds it to the spectral term: a BN scale can
    undo what the spectral penalty takes off the convs). A zero scalar when there are none."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    terms = [m.weight.abs().max() for m in module.modules() if isinstance(m, norms) and m.affine]
    if not terms:
        p = next(module.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).sum()
