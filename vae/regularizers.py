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


class _RankOneGrad(torch.autograd.Function):
    """σ_g = u_gᵀ W_g v_g, passed in as already computed by the power iteration's last product (so the forward reads
    no weight again), differentiable in W with the spectral-norm gradient u vᵀ (u, v held fixed), formed by
    broadcasting (a batched outer product through bmm, autograd's route, is ~3× slower on a CPU)."""

    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor, v: Tensor, sigma: Tensor) -> Tensor:  # (G, r, c), (G, r), (G, c), (G,)
        ctx.save_for_backward(u, v)
        return sigma.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        u, v = ctx.saved_tensors
        return (grad[:, None] * u)[:, :, None] * v[:, None, :], None, None, None


# On a CPU, weights are stacked a few MiB at a time, so that a chunk is still in cache for the next power iteration
# (and a stack never gets fresh pages from the allocator: glibc serves blocks above its mmap threshold, at most 32 MiB,
# with new pages whose first-touch faults cost more than the products); a weight alone in its chunk is not copied.
# MNIST-flag weights (132 MB), forward and backward on one thread: 142 ms with 16 MiB chunks, 58 with 4, 98 with 2,
# 79 with 1 (medians of 9 on a shared machine).
_CPU_STACK_BYTES = 4 * 2**20


class SpectralRegularizer(nn.Module):
    """Σ_i σ_max(W_i) over a fixed list of weights, by batched power iteration.

    Weights are viewed as matrices C_out × (everything else) and grouped by that matrix shape, in order of first
    appearance; each group keeps its left/right singular-vector estimates as buffers `u{g}` (G, C_out) and `v{g}`
    (G, rest), and `initialized` records whether the long first run has happened, so all of it is in the owning
    model's state_dict and a resume continues the same estimates. The iterations run without gradient; the returned
    σ = uᵀWv is differentiable in W (the usual spectral-norm gradient u vᵀ).

    Every product is a batched row-vector × matrix (`bmm`): Wᵀu as uᵀW, and Wv as vᵀWᵀ on the transposed view. On a
    CPU that form reads W at memory speed, where W @ v as a batched matrix × column is ~4× slower.
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
        # Weight indices of each group, in order: the grouping is fixed, so it is worked out once here.
        self.members: list[list[int]] = [[] for _ in matrix_shapes]
        for i, (g, _) in enumerate(self.group_of):
            self.members[g].append(i)
        for g, ((rows, cols), n) in enumerate(zip(matrix_shapes, counts)):
            self.register_buffer(f"u{g}", F.normalize(torch.randn(n, rows), dim=1))
            self.register_buffer(f"v{g}", F.normalize(torch.randn(n, cols), dim=1))
        self.register_buffer("initialized", torch.tensor(False))
        self._warm: bool | None = None  # `initialized` as a Python bool (no device sync per step); None: read it

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._warm = None  # the loaded `initialized` decides again

    def forward(self, weights: list[Tensor]) -> Tensor:
        """weights: the tensors whose shapes were given at construction, in the same order -> scalar Σ σ_max."""
        if len(weights) != len(self.shapes) or any(w.shape != s for w, s in zip(weights, self.shapes)):
            raise ValueError(
                f"SpectralRegularizer: got {len(weights)} weights of shapes {[tuple(w.shape) for w in weights]}, "
                f"expected {len(self.shapes)} of shapes {[tuple(s) for s in self.shapes]}; pass the same list of "
                "weights, in the same order, as at construction"
            )
        warm = getattr(self, "_warm", None)
        if warm is None:
            warm = bool(self.initialized)
        n_iter = self.n_power_iterations if warm else self.n_init_iterations
        sigmas = []
        # No autocast here: bf16 matmuls would bias the σ estimates; the buffers' dtype (fp32) sets the precision.
        on_cpu = weights[0].device.type == "cpu"
        with torch.autocast(device_type=weights[0].device.type, enabled=False):
            for g, (rows, cols) in enumerate(self.matrix_shapes):
                members = self.members[g]
                step = max(1, _CPU_STACK_BYTES // (4 * rows * cols)) if on_cpu else len(members)
                u_buf, v_buf = getattr(self, f"u{g}"), getattr(self, f"v{g}")
                for start in range(0, len(members), step):
                    chunk = slice(start, start + step)
                    u, v = u_buf[chunk], v_buf[chunk]
                    mats = [weights[i].reshape(rows, cols) for i in members[chunk]]
                    w = (torch.stack(mats) if len(mats) > 1 else mats[0].unsqueeze(0)).to(u.dtype)  # (G, r, c)
                    with torch.no_grad():
                        wd = w.detach()
                        for _ in range(n_iter):
                            v = F.normalize(torch.bmm(u.unsqueeze(1), wd).squeeze(1), dim=1, eps=1e-12)  # Wᵀu
                            wv = torch.bmm(v.unsqueeze(1), wd.transpose(1, 2)).squeeze(1)  # Wv
                            u = wv / wv.norm(dim=1, keepdim=True).clamp_min(1e-12)
                        u_buf[chunk] = u
                        v_buf[chunk] = v
                        sigma = (u * wv).sum(1)  # uᵀWv for the final u and v, from the last product
                    sigmas.append(_RankOneGrad.apply(w, u, v, sigma) if w.requires_grad else sigma)
        self.initialized.fill_(True)
        self._warm = True
        return torch.cat(sigmas).sum()


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def affine_norms(module: nn.Module) -> list[nn.Module]:
    """The affine batch-norm layers of `module`, in module order: what `batchnorm_penalty` sums over."""
    return [m for m in module.modules() if isinstance(m, _NORM_TYPES) and m.affine]


def batchnorm_penalty(module: nn.Module | list[nn.Module]) -> Tensor:
    """Σ over the affine batch-norm layers of `module` (or over a list from `affine_norms`) of max|γ| (NVAE adds it to
    the spectral term: a BN scale can undo what the spectral penalty takes off the convs). A zero scalar when there
    are none. Scales of equal length are stacked, so the cost is a few ops per distinct layer width."""
    norms = affine_norms(module) if isinstance(module, nn.Module) else list(module)
    if not norms:
        p = next(module.parameters(), None) if isinstance(module, nn.Module) else None
        return torch.zeros((), device=p.device if p is not None else None)
    by_width: dict[int, list[Tensor]] = {}
    for m in norms:
        by_width.setdefault(m.weight.numel(), []).append(m.weight)
    return torch.stack([torch.stack(gs).abs().amax(dim=1).sum() for gs in by_width.values()]).sum()
