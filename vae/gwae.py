"""GWAE: Gromov-Wasserstein Autoencoders (Nakagawa, Togo, Ogawa & Haseyama, ICLR 2023).

A deterministic-decoder autoencoder G with encoder q(z|x) = N(μ(x), diag σ²(x)) and a *learned* prior π_θ (a
"sampler": ε ~ N(0, I) pushed through a network). Per minibatch of B images, with z_i ~ π_θ and z̃_i ~ q(z|x_i):

  L_GW = 1/B² Σ_ij | c·d_Z(z_i, z_j)/s_z − d_X(G(z_i), G(z_j)) |      estimated GW distortion (p = 1) of the
         c = exp(log c) learnable, s_z = mean_d std(z_·d)                 generative coupling (z, G(z)); no OT solver
  L_W  = 1/B Σ_i ½‖x_i − G(z̃_i)‖²                                        WAE reconstruction, summed over pixels
  L_D  = E_π f(G(z), z) − E_{data·q} f(x, z̃)                              W1 between the joints through the critic f
  L_H  = −1/B Σ_i Σ_d log σ²_d(x_i)                                      keeps the encoder stochastic
  L    = L_GW + λ_W·L_W + λ_D·L_D + λ_H·L_H

The critic f(x, z) (the Kantorovich potential) maximises E_gen f − E_inf f − γ·(GP + δ·E[f²]) with the one-centred
penalty GP = E_t (‖∇_{x,z} f(x̂, ẑ)‖ − 1)², x̂ = t·x + (1−t)·G(z_s), ẑ = t·z̃ + (1−t)·z_s (one t per pair),
γ = 10, δ = 1e-4; every layer is spectral-normalised. 5 critic updates per model update, RMSprop at 1e-4 for both.

Priors, the learned ones ending in a non-affine BatchNorm1d (momentum 0.5) that standardises each latent dimension
over the batch in train mode (and through its running statistics in eval mode):
  NP   z = BN(MLP(ε)), MLP z→4z→4z→4z→z with LeakySiLU(u) = (1−a)·silu(u) + a·u, a = 0.2
  FNP  z_i = BN(f_i(ε_i)): the same MLP per dimension (grouped 1×1 Conv1d), so the dimensions stay independent
  GMP  k = argmax_k(log softmax(ℓ)_k + g_k), g = −log(−log U) (Gumbel-max); z = BN(μ_k + A_k·ε)
  gaussian  z = ε ~ N(0, I), the fixed-prior baseline (no BN)
  uniform   z_i ~ U(−√3, √3) independently: a fixed factorised prior of unit variance (no BN), the control for FNP
At initialisation the NP and FNP samplers' last layer is rescaled so that each raw output dimension has unit variance
on a probe batch: PyTorch's default init leaves their raw variance at 1e-7..1e-3, where BN's ε (1e-5) would cap the
standardised variance well below 1 (0.64 for one FNP dimension) until training grew the scale.
The Gumbel-max choice is not differentiable: the mixture logits ℓ get no gradient and keep their initial value; only
μ_k and A_k learn, as in the reference code. The reference draws ℓ from N(0, 1), which, since they never learn,
fixes unequal random mixture weights; here ℓ starts at 0, equal weights. Switching to Gumbel-softmax would change the
model; we keep the published gradient behaviour.

The distance scale c: `log c` has its own RMSprop learning rate (`lr_distance_coef`, 1e-2 by default) and, unless
`distance_coef_init` is set, starts from the data: on the first training batch, c = mean_{i≠j} ‖x_i − x_j‖ / √(2·z),
since two independent standardised z-dimensional samples lie about √(2·z) apart. At the model's learning rate (1e-4)
and the reference's fixed start (2.5), c hardly moves, and a learned prior can shrink latent distances only through
its marginals: heavy tails (excess kurtosis 30–470, |z| up to 30σ, were seen under FNP in longer runs). Measured on
`regions` (z = 4, 120 steps at 1e-3, seeds 0–1): max excess kurtosis 2.6 and 1.3 with the old handling, 0.2 and
−0.05 with the scale's own rate and data start. `prior_health` measures the
marginals' excess kurtosis (0 for a Gaussian, −1.2 for a uniform); KURTOSIS_ALARM flags the heavy-tailed state.

Choices where the paper and the reference code leave room, each with its reason:
- s_z is detached: it normalises the latent distances and the learnable c carries their scale. After the BN priors
  s_z ≈ 1, so the gradient through it would be ~0 anyway. "Mean per-dimension std" is rotation-invariant only for
  isotropic batches; d_Z itself is Euclidean, so L_GW is exactly invariant for whitened prior batches.
- The critic concatenates its 64-d x and z features without halving: the pair map (x, z) ↦ (h_x, h_z) is already
  1-Lipschitz in the joint norm when each branch is.
- The drift term δ·E[f²] averages f² over both joints together (2B values).
- Non-finite losses or gradients skip the update (the step is reported as skipped); more than
  `max_consecutive_skips` skipped model updates in a row raise RuntimeError (VDVAE's rule: a cap, not silence).
- Spectral-norm parametrizations refuse pickling, so a GWAE pickles as (config, state_dict, mode) and is rebuilt on
  load; `torch.save(model)` and MLflow's pickle flavour therefore work.
- The encoder's log σ² is soft-clamped to ±10 by default (`logvar_bound`): L_H alone is unbounded below, and at
  lr 1e-3 on digits log σ² ran away to ~60 in 11 steps and the loss turned NaN.
- Encoder/decoder widths are base·(1, 2, 4, 8, 8, ...): capped at 8·base (256 by default) for images above 64×64.
"""
from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from vae.configs import GWAEConfig
from vae.distributions import soft_clamp

PRIORS = ("np", "fnp", "gmp", "gaussian", "uniform")
LOGIT_EPS = 1e-3  # inputs are clamped to [1e-3, 1 − 1e-3] before the logit: exact 0/1 pixels would map to ±inf
LEAKY_SILU_SLOPE = 0.2
PRIOR_BN_MOMENTUM = 0.5
CRITIC_FEATURES = 64  # width of each critic branch's output; the joint MLP sees 2·64 = 128
# Excess kurtosis of a prior marginal above which the prior is reported unhealthy: a Gaussian has 0, a Laplace 3, a
# Student-t with 5 degrees of freedom 6; the runaway c = 2.5 state was reported at 30 to 470. A freshly initialised FNP is
# heavy-tailed too (its random per-dimension maps: max excess kurtosis 5 to 90 measured at z = 4..64), so the alarm
# means something only after some training.
KURTOSIS_ALARM = 10.0


def _conv_widths(base: int, side: int) -> list[int]:
    """Widths of the stride-2 convs that take a side-`side` image down to 4×4: base·(1, 2, 4, 8), capped at 8·base."""
    return [base * 2 ** min(i, 3) for i in range(int(math.log2(side)) - 2)]


# ---------------------------------------------------------------------------------------------------------------------
# Encoder and decoder (the CNNs of vaetc, the reference's framework)


class Encoder(nn.Module):
    """logit(x) → stride-2 4×4 convs with SiLU down to 4×4 → FC hidden → heads μ and log σ²."""

    def __init__(self, cfg: GWAEConfig) -> None:
        super().__init__()
        c, side, _ = cfg.image_shape
        layers: list[nn.Module] = []
        for width in _conv_widths(cfg.base_channels, side):
            layers += [nn.Conv2d(c, width, 4, 2, 1), nn.SiLU()]
            c = width
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c * 16, cfg.hidden_dim), nn.SiLU())
        self.mu = nn.Linear(cfg.hidden_dim, cfg.z_dim)
        self.logvar = nn.Linear(cfg.hidden_dim, cfg.z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (B, C, H, W) in [0, 1] -> (B, z), (B, z)
        h = self.fc(self.convs(torch.logit(x, eps=LOGIT_EPS)))
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """The encoder's mirror: FC hidden → FC to (width, 4, 4) → stride-2 4×4 transposed convs with SiLU → sigmoid."""

    def __init__(self, cfg: GWAEConfig) -> None:
        super().__init__()
        c, side, _ = cfg.image_shape
        widths = _conv_widths(cfg.base_channels, side)
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_dim, cfg.hidden_dim), nn.SiLU(),
            nn.Linear(cfg.hidden_dim, widths[-1] * 16), nn.SiLU(),
            nn.Unflatten(1, (widths[-1], 4, 4)),
        )
        outs = [c] + widths[:-1]  # the i-th transposed conv undoes the encoder's i-th conv: widths[i] -> outs[i]
        layers: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            layers.append(nn.ConvTranspose2d(widths[i], outs[i], 4, 2, 1))
            layers.append(nn.SiLU() if i > 0 else nn.Sigmoid())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:  # (B, z) -> (B, C, H, W) in [0, 1]
        return self.deconvs(self.fc(z))


# ---------------------------------------------------------------------------------------------------------------------
# Priors ("samplers")


class LeakySiLU(nn.Module):
    """(1 − a)·silu(u) + a·u. With a = 0.2 the slope is ≥ 0.8·min silu' + 0.2 ≈ 0.12 > 0: strictly increasing, so
    no layer of the sampler folds its input space onto itself."""

    def __init__(self, slope: float = LEAKY_SILU_SLOPE) -> None:
        super().__init__()
        self.slope = slope

    def forward(self, u: Tensor) -> Tensor:
        return (1.0 - self.slope) * F.silu(u) + self.slope * u


class Prior(nn.Module):
    """A sampler z = T(ε), ε ~ N(0, I_z). Sampling follows the module's device and dtype."""

    standardised: ClassVar[bool] = True  # ends in a BatchNorm that standardises over the batch in train mode

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    def noise(self, n: int) -> Tensor:
        if n < 2 and self.training and self.standardised:
            raise ValueError(
                f"{type(self).__name__}.sample({n}): in train mode the BatchNorm standardises over the batch and needs "
                "n >= 2; draw more samples or call .eval() to use the running statistics"
            )
        return torch.randn(n, self.z_dim, device=self._anchor.device, dtype=self._anchor.dtype)

    def sample(self, n: int) -> Tensor:  # -> (n, z)
        return self(self.noise(n))

    @torch.no_grad()
    def _unit_variance_init(self, last: nn.Module, raw: "typing.Callable[[Tensor], Tensor]") -> None:
        """Rescale and shift the last layer per output dimension so that raw(ε), ε ~ N(0, I), has zero mean and unit
        variance on a probe batch (drawn from its own generator: the global random stream is left alone). Centring
        too keeps float32 BN exact: a mean of 10³ standard deviations would cost it three digits."""
        eps = torch.randn(4096, self.z_dim, generator=torch.Generator().manual_seed(0))
        scale = raw(eps).std(dim=0).clamp_min(1e-12)  # (z,)
        last.weight.div_(scale.view(-1, *([1] * (last.weight.dim() - 1))))
        last.bias.div_(scale)
        last.bias.sub_(raw(eps).mean(dim=0))


class GaussianPrior(Prior):
    """N(0, I): the fixed prior of a plain WAE, a baseline."""

    standardised: ClassVar[bool] = False

    def forward(self, eps: Tensor) -> Tensor:
        return eps


class UniformPrior(Prior):
    """z_i ~ U(−√3, √3) independently: fixed, factorised, zero mean and unit variance; the control that tells what a
    factorised prior does without learning its marginals."""

    standardised: ClassVar[bool] = False

    def noise(self, n: int) -> Tensor:
        return (torch.rand(n, self.z_dim, device=self._anchor.device, dtype=self._anchor.dtype) * 2.0 - 1.0) * 3**0.5

    def forward(self, eps: Tensor) -> Tensor:
        return eps


class NeuralPrior(Prior):
    """NP: z = BN(MLP(ε)), MLP z → 4z → 4z → 4z → z with LeakySiLU."""

    def __init__(self, z_dim: int) -> None:
        super().__init__(z_dim)
        h = 4 * z_dim
        self.net = nn.Sequential(
            nn.Linear(z_dim, h), LeakySiLU(), nn.Linear(h, h), LeakySiLU(), nn.Linear(h, h), LeakySiLU(),
            nn.Linear(h, z_dim),
        )
        self.bn = nn.BatchNorm1d(z_dim, affine=False, momentum=PRIOR_BN_MOMENTUM)
        self._unit_variance_init(self.net[-1], self.net)

    def forward(self, eps: Tensor) -> Tensor:  # (n, z) -> (n, z)
        return self.bn(self.net(eps))


class FactorizedNeuralPrior(Prior):
    """FNP: z_i = BN(f_i(ε_i)), one 1 → 4 → 4 → 4 → 1 MLP per dimension as grouped 1×1 Conv1d (groups = z)."""

    def __init__(self, z_dim: int) -> None:
        super().__init__(z_dim)
        h = 4 * z_dim

        def conv(c_in: int, c_out: int) -> nn.Conv1d:
            return nn.Conv1d(c_in, c_out, 1, groups=z_dim)

        self.net = nn.Sequential(
            conv(z_dim, h), LeakySiLU(), conv(h, h), LeakySiLU(), conv(h, h), LeakySiLU(), conv(h, z_dim)
        )
        self.bn = nn.BatchNorm1d(z_dim, affine=False, momentum=PRIOR_BN_MOMENTUM)
        self._unit_variance_init(self.net[-1], lambda eps: self.net(eps.unsqueeze(-1)).squeeze(-1))

    def forward(self, eps: Tensor) -> Tensor:  # (n, z) -> (n, z)
        return self.bn(self.net(eps.unsqueeze(-1)).squeeze(-1))


class GaussianMixturePrior(Prior):
    """GMP: component k by Gumbel-max over logits ℓ, z = BN(μ_k + A_k·ε); μ_k ~ N(0, I), A_k = I + 0.01·noise and
    ℓ = 0 (equal weights) at initialisation.

    The argmax blocks gradients: ℓ never learns (see the module docstring); μ and A do.
    """

    def __init__(self, z_dim: int, num_components: int) -> None:
        super().__init__(z_dim)
        self.means = nn.Parameter(torch.randn(num_components, z_dim))  # (K, z)
        self.scales = nn.Parameter(torch.eye(z_dim) + 0.01 * torch.randn(num_components, z_dim, z_dim))  # A (K, z, z)
        self.logits = nn.Parameter(torch.zeros(num_components))  # (K,)
        self.bn = nn.BatchNorm1d(z_dim, affine=False, momentum=PRIOR_BN_MOMENTUM)

    @property
    def num_components(self) -> int:
        return self.logits.shape[0]

    def draw_components(self, n: int) -> Tensor:  # -> (n,) long
        u = torch.rand(n, self.num_components, device=self.logits.device, dtype=self.logits.dtype)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
        return (F.log_softmax(self.logits.detach(), dim=0) + gumbel).argmax(dim=1)

    def forward(self, eps: Tensor, components: Tensor) -> Tensor:  # (n, z), (n,) -> (n, z)
        u = self.means[components] + torch.einsum("nij,nj->ni", self.scales[components], eps)
        return self.bn(u)

    def sample_with_components(self, n: int) -> tuple[Tensor, Tensor]:  # -> (n, z), (n,)
        eps = self.noise(n)
        components = self.draw_components(n)
        return self(eps, components), components

    def sample(self, n: int) -> Tensor:
        return self.sample_with_components(n)[0]

    def log_responsibilities(self, z: Tensor) -> Tensor:  # (N, z) -> (N, K)
        """log p(k | z) for points z in the prior's (standardised) space, through the BN's running statistics.

        The BN is the same affine map for every component, so its Jacobian cancels in the posterior over k and the
        responsibilities can be computed before it: u = z·sqrt(var + eps) + mean, u | k ~ N(μ_k, A_k A_kᵀ).
        """
        u = z * torch.sqrt(self.bn.running_var + self.bn.eps) + self.bn.running_mean
        diff = (u.unsqueeze(1) - self.means).unsqueeze(-1)  # (N, K, z, 1)
        white = torch.linalg.solve(self.scales.unsqueeze(0), diff).squeeze(-1)  # A_k⁻¹(u − μ_k), (N, K, z)
        log_det = torch.linalg.slogdet(self.scales).logabsdet  # (K,)
        log_lik = -0.5 * white.pow(2).sum(-1) - log_det
        return F.log_softmax(F.log_softmax(self.logits, dim=0) + log_lik, dim=1)

    @torch.no_grad()
    def assign(self, z: Tensor) -> Tensor:  # (N, z) -> (N,) long
        """The component of highest responsibility for each z (e.g. encoder means), for clustering."""
        return self.log_responsibilities(z).argmax(dim=1)


def make_prior(cfg: GWAEConfig) -> Prior:
    if cfg.prior == "np":
        return NeuralPrior(cfg.z_dim)
    if cfg.prior == "fnp":
        return FactorizedNeuralPrior(cfg.z_dim)
    if cfg.prior == "gmp":
        return GaussianMixturePrior(cfg.z_dim, cfg.num_components)
    if cfg.prior == "uniform":
        return UniformPrior(cfg.z_dim)
    return GaussianPrior(cfg.z_dim)


def excess_kurtosis(z: Tensor) -> Tensor:
    """(n, d) -> (d,): E[(z − μ)⁴]/σ⁴ − 3 per column (population moments); 0 for a Gaussian, −1.2 for a uniform."""
    centred = z - z.mean(dim=0)
    var = centred.pow(2).mean(dim=0).clamp_min(torch.finfo(z.dtype).tiny)
    return centred.pow(4).mean(dim=0) / var.pow(2) - 3.0


# ---------------------------------------------------------------------------------------------------------------------
# Critic (Kantorovich potential) and the losses


class Critic(nn.Module):
    """f(x, z): spectral-normalised conv x-branch (LeakyReLU 0.2) down to 1×1 → FC 64; z-branch MLP z → 256 → 256 →
    64; concatenated → MLP 128 → 256 → 256 → 1. Every layer is spectral-normalised."""

    def __init__(self, cfg: GWAEConfig) -> None:
        super().__init__()
        c, side, _ = cfg.image_shape
        layers: list[nn.Module] = []
        for i in range(int(math.log2(side))):
            width = cfg.critic_channels * 2**i
            layers += [spectral_norm(nn.Conv2d(c, width, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c = width
        self.x_branch = nn.Sequential(
            *layers, nn.Flatten(), spectral_norm(nn.Linear(c, CRITIC_FEATURES)), nn.LeakyReLU(0.2)
        )
        self.z_branch = nn.Sequential(
            spectral_norm(nn.Linear(cfg.z_dim, 256)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(256, 256)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(256, CRITIC_FEATURES)), nn.LeakyReLU(0.2),
        )
        self.joint = nn.Sequential(
            spectral_norm(nn.Linear(2 * CRITIC_FEATURES, 256)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(256, 256)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(256, 1)),
        )

    def forward(self, x: Tensor, z: Tensor) -> Tensor:  # (B, C, H, W), (B, z) -> (B,)
        return self.joint(torch.cat([self.x_branch(x), self.z_branch(z)], dim=1)).squeeze(1)


def pairwise_distances(v: Tensor) -> Tensor:
    """(B, ...) -> (B, B) Euclidean distances between the flattened rows; exact zeros, with zero gradient, on the
    diagonal (sqrt has an infinite slope at 0)."""
    v = v.flatten(1)
    # Centring leaves distances unchanged but shrinks ‖v‖², so the Gram-matrix form loses less to cancellation;
    # the Gram form avoids the (B, B, D) difference tensor that would cost O(B²·D) memory on images.
    v = v - v.mean(dim=0, keepdim=True)
    sq = v.pow(2).sum(dim=1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * v @ v.T
    off = ~torch.eye(len(v), dtype=torch.bool, device=v.device)
    d2 = torch.where(off, d2.clamp_min(1e-12), torch.ones_like(d2))
    return torch.where(off, d2.sqrt(), torch.zeros_like(d2))


def gw_loss(z: Tensor, x: Tensor, distance_coef: Tensor | float) -> Tensor:
    """L_GW = mean over the B² pairs of |c·d_Z/s_z − d_X| for the generative coupling (z_i, x_i = G(z_i)).

    z (B, z) prior samples, x (B, ...) their decodings, c = distance_coef; s_z = mean per-dim std of z (detached).
    """
    if len(z) < 2 or len(x) != len(z):
        raise ValueError(
            f"gw_loss: needs >= 2 latent samples and one decoding each, got z {tuple(z.shape)} and x {tuple(x.shape)}"
        )
    scale_z = z.detach().std(dim=0).mean()
    return (distance_coef * pairwise_distances(z) / scale_z - pairwise_distances(x)).abs().mean()


def gradient_penalty(critic: nn.Module, x_inf: Tensor, z_inf: Tensor, x_gen: Tensor, z_gen: Tensor) -> Tensor:
    """One-centred GP E_t (‖∇_{x,z} f(x̂, ẑ)‖ − 1)² at interpolates of paired joint samples, one t per pair for both
    x and z. The graph is kept (create_graph) so the penalty trains the critic."""
    t = torch.rand(len(x_inf), device=x_inf.device, dtype=x_inf.dtype)
    tx = t.view(-1, *([1] * (x_inf.dim() - 1)))
    x_hat = (tx * x_inf.detach() + (1.0 - tx) * x_gen.detach()).requires_grad_(True)
    z_hat = (t.unsqueeze(1) * z_inf.detach() + (1.0 - t.unsqueeze(1)) * z_gen.detach()).requires_grad_(True)
    grad_x, grad_z = torch.autograd.grad(critic(x_hat, z_hat).sum(), (x_hat, z_hat), create_graph=True)
    norm = (grad_x.flatten(1).pow(2).sum(1) + grad_z.pow(2).sum(1) + 1e-12).sqrt()
    return (norm - 1.0).pow(2).mean()


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No parameter gradients for `module` (inputs still get theirs): the model update must not train the critic."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _finite_backward(loss: Tensor, params: list[nn.Parameter]) -> bool:
    """Backpropagate `loss` if it is finite and keep the gradients only if they are finite too."""
    if not torch.isfinite(loss).item():
        return False
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)).item():
        for p in params:
            p.grad = None
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# The model


class GWAE(nn.Module):
    """Encoder q(z|x), decoder G, learned prior π_θ, critic f, and the learnable latent distance scale c."""

    def __init__(self, config: GWAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.prior = make_prior(config)
        self.critic = Critic(config)
        start = config.distance_coef_init
        self.log_distance_coef = nn.Parameter(torch.tensor(math.log(start if start is not None else 1.0)))
        # Whether c has its starting value (set, or taken from the data); saved with the weights.
        self.register_buffer("distance_coef_ready", torch.tensor(start is not None))
        self.register_load_state_dict_pre_hook(_ready_if_missing)
        self._consecutive_skips = 0

    def __reduce__(self):
        # parametrizations.spectral_norm modules refuse pickling: rebuild from the config and the weights instead.
        return (_rebuild_gwae, (self.config.to_dict(), self.state_dict(), self.training))

    @property
    def distance_coef(self) -> Tensor:
        return self.log_distance_coef.exp()

    def model_parameters(self) -> list[nn.Parameter]:
        """Everything but the critic: encoder, decoder, prior and log c."""
        return [p for name, p in self.named_parameters() if not name.startswith("critic.")]

    def make_optimizers(self) -> tuple[torch.optim.RMSprop, torch.optim.RMSprop]:
        """(model optimiser, critic optimiser): RMSprop at lr and lr_critic, as in the reference code, with log c in
        a group of its own at lr_distance_coef."""
        cfg = self.config
        others = [p for p in self.model_parameters() if p is not self.log_distance_coef]
        groups = [{"params": others}, {"params": [self.log_distance_coef], "lr": cfg.lr_distance_coef}]
        return (
            torch.optim.RMSprop(groups, lr=cfg.lr),
            torch.optim.RMSprop(self.critic.parameters(), lr=cfg.lr_critic),
        )

    @torch.no_grad()
    def init_distance_coef(self, x: Tensor) -> float:
        """Start c from images x (B, C, H, W): the mean pixel distance between distinct images over √(2·z_dim), the
        typical distance of two standardised prior samples. Returns c; train_step calls it on its first batch when
        the config gives no distance_coef_init."""
        if len(x) < 2 or not torch.isfinite(x).all():
            raise ValueError(f"init_distance_coef needs >= 2 finite images, got {len(x)} "
                             f"({'finite' if torch.isfinite(x).all() else 'with NaN or inf'})")
        n = len(x)
        mean_distance = pairwise_distances(x.float()).sum() / (n * (n - 1))
        coef = (mean_distance / math.sqrt(2.0 * self.config.z_dim)).clamp_min(1e-6)
        self.log_distance_coef.copy_(coef.log().to(self.log_distance_coef))
        self.distance_coef_ready.fill_(True)
        return coef.item()

    @torch.no_grad()
    def prior_health(self, n: int = 4096) -> dict[str, float]:
        """Excess kurtosis of the prior's marginals over n samples, and their largest |z| in standard deviations:
        {"prior_kurtosis_mean", "prior_kurtosis_max", "prior_max_abs_z"}. Draws in eval mode on a forked random
        stream, so training is not perturbed."""
        was_training = self.prior.training
        with torch.random.fork_rng(devices=[]):
            self.prior.eval()
            try:
                z = self.prior.sample(n).double()
            finally:
                self.prior.train(was_training)
        kurtosis = excess_kurtosis(z)
        max_abs = ((z - z.mean(dim=0)).abs() / z.std(dim=0).clamp_min(1e-12)).max()
        return {"prior_kurtosis_mean": kurtosis.mean().item(), "prior_kurtosis_max": kurtosis.max().item(),
                "prior_max_abs_z": max_abs.item()}

    def _check_images(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.config.image_shape):
            raise ValueError(
                f"GWAE expects images (B, {', '.join(map(str, self.config.image_shape))}) in [0, 1], got "
                f"{tuple(x.shape)}; resize the data or build the model with GWAEConfig.for_images(shape)"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (B, C, H, W) -> μ (B, z), log σ² (B, z)
        self._check_images(x)
        mu, logvar = self.encoder(x)
        if self.config.logvar_bound is not None:
            logvar = soft_clamp(logvar, self.config.logvar_bound)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:  # (B, z) -> (B, C, H, W) in [0, 1]
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """G(μ(x)): the deterministic reconstruction through the encoder mean."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:  # -> (n, C, H, W) in [0, 1]
        """Decoded prior samples; call .eval() first so the prior's BN uses its running statistics."""
        return self.decode(self.prior.sample(n))

    def _joint_samples(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """z̃ ~ q(z|x) (reparameterised), z_s ~ π_θ and one decoder pass over both -> log σ², z̃, G(z̃), z_s, G(z_s)."""
        if len(x) < 2:
            raise ValueError(f"GWAE needs minibatches of >= 2 images (pairwise distances), got {len(x)}")
        mu, logvar = self.encode(x)
        z_q = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        z_s = self.prior.sample(len(x))
        x_q, x_s = self.decode(torch.cat([z_q, z_s])).split(len(x))
        return logvar, z_q, x_q, z_s, x_s

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        """The model's objective on a minibatch x (B, C, H, W): {"loss", "gw", "w", "d", "h"} as scalar tensors."""
        cfg = self.config
        logvar, z_q, x_q, z_s, x_s = self._joint_samples(x)
        gw = gw_loss(z_s, x_s, self.distance_coef)
        w = 0.5 * (x - x_q).pow(2).flatten(1).sum(dim=1).mean()
        f = self.critic(torch.cat([x_s, x]), torch.cat([z_s, z_q]))
        f_gen, f_inf = f.split(len(x))
        d = f_gen.mean() - f_inf.mean()
        h = -logvar.sum(dim=1).mean()
        loss = gw + cfg.lambda_w * w + cfg.lambda_d * d + cfg.lambda_h * h
        return {"loss": loss, "gw": gw, "w": w, "d": d, "h": h}

    def critic_loss(self, x: Tensor) -> dict[str, Tensor]:
        """The critic's objective on fresh samples: {"loss", "w1", "gp", "drift"};
        loss = −w1 + γ·(gp + δ·drift), w1 = E_gen f − E_inf f, drift = E[f²] over both joints."""
        cfg = self.config
        with torch.no_grad():
            _, z_q, _, z_s, x_s = self._joint_samples(x)
        f = self.critic(torch.cat([x_s, x]), torch.cat([z_s, z_q]))
        f_gen, f_inf = f.split(len(x))
        w1 = f_gen.mean() - f_inf.mean()
        gp = gradient_penalty(self.critic, x, z_q, x_s, z_s)
        drift = f.pow(2).mean()
        return {"loss": -w1 + cfg.gp_weight * (gp + cfg.drift * drift), "w1": w1, "gp": gp, "drift": drift}

    @torch.no_grad()
    def ood_score(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B,)
        """f(G(μ(x)), μ(x)): the critic's value on the generated pair at the encoder mean; higher = more OoD, as in
        the reference's evaluation. Call .eval() first (spectral norm then stops updating its vectors).

        The direction is empirical, not guaranteed: on digits 0–4 vs uniform noise (16×16, z = 8, GMP) the AUROC was
        1.0 from 50 to 550 steps at lr 1e-4, but once reconstructions got good (SSE < ~5, reached at lr 3e-4..1e-3)
        noise scored *lower* and the AUROC fell to ~0 (the encoder put noise at |μ| ≈ 0.5 against ≈ 1.9 for digits,
        and the trained critic was low there). Check the direction on held-out data before relying on the score.
        """
        mu = self.encode(x)[0]
        return self.critic(self.decode(mu), mu)

    @torch.no_grad()
    def prior_nll_score(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B,)
        """−log N(μ(x); 0, I) = ½‖μ‖² + (z/2)·log 2π: the prior-likelihood OoD baseline the paper reports beside
        the critic's score (higher = more OoD). It ignores the learned prior, as the paper's baseline does."""
        mu = self.encode(x)[0]
        return 0.5 * mu.pow(2).sum(dim=1) + 0.5 * mu.shape[1] * math.log(2.0 * math.pi)

    def train_step(
        self, x: Tensor, opt_model: torch.optim.Optimizer, opt_critic: torch.optim.Optimizer
    ) -> dict[str, float]:
        """`critic_steps` critic updates (fresh prior and posterior samples each), then one model update.

        An update whose loss or gradient is not finite is skipped; "skipped" reports 1.0 when the model update was,
        "critic_skipped" how many critic updates were. More than max_consecutive_skips skipped model updates in a
        row raise RuntimeError. Returns the last critic step's terms, the model's terms and c as floats.
        """
        cfg = self.config
        if not bool(self.distance_coef_ready) and torch.isfinite(x).all():  # a bad batch is skipped below
            self.init_distance_coef(x)
        critic_params = list(self.critic.parameters())
        critic_skipped = 0
        for _ in range(cfg.critic_steps):
            opt_critic.zero_grad(set_to_none=True)
            critic_terms = self.critic_loss(x)
            if _finite_backward(critic_terms["loss"], critic_params):
                opt_critic.step()
            else:
                critic_skipped += 1
        opt_model.zero_grad(set_to_none=True)
        with _frozen(self.critic):
            terms = self.losses(x)
            ok = _finite_backward(terms["loss"], self.model_parameters())
        if ok:
            opt_model.step()
            self._consecutive_skips = 0
        else:
            self._consecutive_skips += 1
            if self._consecutive_skips > cfg.max_consecutive_skips:
                raise RuntimeError(
                    f"GWAE.train_step: {self._consecutive_skips} model updates in a row had a non-finite loss or "
                    f"gradient (last loss {terms['loss'].item()}); check that the inputs are finite and in [0, 1], "
                    "lower gwae.lr / gwae.lr_critic, or raise gwae.max_consecutive_skips"
                )
        metrics = {k: v.item() for k, v in terms.items()}
        metrics.update({f"critic_{k}": v.item() for k, v in critic_terms.items()})
        metrics.update(
            distance_coef=self.distance_coef.item(), skipped=float(not ok), critic_skipped=float(critic_skipped)
        )
        return metrics


def _ready_if_missing(module, state_dict, prefix, *args) -> None:
    """Weights saved before c had a readiness flag come from trained models: their c is set."""
    state_dict.setdefault(prefix + "distance_coef_ready", torch.tensor(True))


def _rebuild_gwae(config: dict, state: dict[str, Tensor], training: bool) -> GWAE:
    reference = state["log_distance_coef"]  # the saved model's device and dtype
    model = GWAE(GWAEConfig.from_dict(config)).to(device=reference.device, dtype=reference.dtype)
    model.load_state_dict(state)
    return model.train(training)
