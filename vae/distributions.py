"""Shared numerics of the VAEs: soft clamp, diagonal Normals with NVAE's residual parameterisation, Gaussian KL,
and the decoder (output) distributions.

- Normal and the residual-Normal posterior: NVAE (Vahdat & Kautz, 2020), Sec. 3.2 / Eq. 2. The prior of a group is
  N(μ_p, σ_p); the encoder predicts (Δμ, log Δσ) and the posterior is N(μ_p + Δμ, σ_p·Δσ), whose KL to the prior is
  0.5·(Δμ²/σ_p² + Δσ² − 1) − log Δσ. Safeguards from NVAE: μ and log σ pass through 5·tanh(·/5) and
  σ = exp(log σ) + 1e-2.
- DiscMixLogistic: the discretized logistic mixture of PixelCNN++ (Salimans et al., 2017, Sec. 2.1-2.2) with
  channel-autoregressive means, on n-bit data mapped to [−1, 1].
- DiscGaussian: the bin mass of a Gaussian on n-bit data in [0, 1] (σ-VAE, Rybkin et al., 2021, Sec. 4, "discrete
  variant"); the calibrated likelihood to compare Gaussian decoders in bits/dim.
- GaussianDecoder: the σ-VAE decoder N(x; μ, σ²I) with a shared σ that is optimal (σ*² = batch MSE), learned or
  fixed; −log p = D·ln σ + ‖x − μ‖²/(2σ²) + (D/2)·ln 2π. A density of continuous pixels, not a probability: compare
  it with other decoders (nats, bits/dim) only through `discretized()`.
- Bernoulli: for binary data (NVAE's MNIST/Omniglot decoder, on dynamically binarised images); refuses grey levels.

Every output distribution takes the decoder's raw output and gives elementwise log-likelihoods (B, C, H, W) for x in
[0, 1]; the model sums (and crops) them itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)
SIGMA_FLOOR = 1e-2  # NVAE adds this to exp(log σ) so that no group can shrink to a point mass
OUTPUT_KINDS = ("dml", "bernoulli", "gaussian_optimal", "gaussian_learned", "gaussian_fixed")


def _full_precision(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32. Decoder and posterior heads may run under autocast, but a bin of width 2/255 is as wide as
    bf16's resolution near 1, and KLs are sums of small differences: all likelihood math runs in fp32 or better."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def soft_clamp(x: Tensor, bound: float = 5.0) -> Tensor:
    """bound·tanh(x/bound): identity near 0, smoothly saturating at ±bound (keeps gradients, unlike a hard clamp)."""
    return bound * torch.tanh(x / bound)


def gaussian_kl(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Elementwise KL(N(mu1, sigma1²) ‖ N(mu2, sigma2²)) = log(σ2/σ1) + (σ1² + (μ1 − μ2)²)/(2σ2²) − ½."""
    return torch.log(sigma2) - torch.log(sigma1) + (sigma1**2 + (mu1 - mu2) ** 2) / (2.0 * sigma2**2) - 0.5


def residual_normal_kl(delta_mu: Tensor, delta_sigma: Tensor, sigma_p: Tensor) -> Tensor:
    """Elementwise KL(N(μ_p + Δμ, (σ_p·Δσ)²) ‖ N(μ_p, σ_p²)) = 0.5·(Δμ²/σ_p² + Δσ² − 1) − log Δσ (NVAE Eq. 2)."""
    return 0.5 * (delta_mu**2 / sigma_p**2 + delta_sigma**2 - 1.0) - torch.log(delta_sigma)


class Normal:
    """Diagonal Normal with NVAE's safeguards: μ = 5·tanh(μ_raw/5), σ = (exp(5·tanh(log σ_raw/5)) + 1e-2)·temperature.

    The raw (pre-clamp) parameters are kept so that a residual posterior can be built on top of the prior's.
    """

    def __init__(self, mu: Tensor, log_sigma: Tensor, temperature: float = 1.0) -> None:
        self.mu_raw = _full_precision(mu)
        self.log_sigma_raw = _full_precision(log_sigma)
        self.mu = soft_clamp(self.mu_raw)
        self.sigma = (torch.exp(soft_clamp(self.log_sigma_raw)) + SIGMA_FLOOR) * temperature

    @classmethod
    def residual(cls, prior: "Normal", delta_mu: Tensor, delta_log_sigma: Tensor) -> "Normal":
        """NVAE's residual posterior: add Δμ to the prior's raw mean and log Δσ to its raw log σ, then clamp as usual.

        The posterior is therefore N(μ_p + Δμ, σ_p·Δσ) up to the soft clamps and the σ floor, exactly as in NVAE.
        The prior's temperature is not inherited (posteriors are always used at temperature 1). Train with
        `posterior.kl(prior)`: it is the exact Gaussian KL between the two objects used, and equals
        `residual_normal_kl(post.mu − prior.mu, post.sigma / prior.sigma, prior.sigma)` identically.
        """
        return cls(prior.mu_raw + delta_mu, prior.log_sigma_raw + delta_log_sigma)

    def sample(self) -> tuple[Tensor, Tensor]:
        """Reparameterised sample z = μ + σ·ε and the ε ~ N(0, I) it used (NCP's Langevin works in ε space)."""
        eps = torch.randn_like(self.mu)
        return self.sample_given_eps(eps), eps

    def sample_given_eps(self, eps: Tensor) -> Tensor:
        return self.mu + self.sigma * eps

    def log_prob(self, z: Tensor) -> Tensor:
        """Elementwise log N(z; μ, σ²)."""
        return -0.5 * ((z - self.mu) / self.sigma) ** 2 - torch.log(self.sigma) - 0.5 * _LOG_2PI

    def kl(self, other: "Normal") -> Tensor:
        """Elementwise analytic KL(self ‖ other)."""
        return gaussian_kl(self.mu, self.sigma, other.mu, other.sigma)


def _check_params(name: str, params: Tensor, channels: int) -> None:
    if params.dim() != 4 or params.shape[1] != channels:
        raise ValueError(
            f"{name}: expected decoder output of shape (B, {channels}, H, W), got {tuple(params.shape)}; "
            f"make the decoder's last conv output `output_channels(...)` = {channels} channels"
        )


def _check_bits(num_bits: int) -> None:
    if not 1 <= num_bits <= 16:
        raise ValueError(f"num_bits={num_bits} is out of range; use 8 for ordinary images (5 for 256px sets)")


class DiscMixLogistic:
    """Discretized mixture of M logistics over n-bit data, channel-autoregressive for colour (PixelCNN++).

    Channel layout of `params` (B, P, H, W), P = M·(1 + 2C + C(C−1)/2):
      [0, M)                       mixture logits π_m (shared by the channels of a pixel)
      [M, M + C·M)                 means μ_{c,m}, channel-major (channel c occupies M consecutive slices)
      [M + C·M, M + 2C·M)          log-scales s_{c,m}, clamped at ≥ −7
      [M + 2C·M, P)                tanh-squashed coefficients a_{c,j,m} for j < c, in the order (1,0), (2,0), (2,1), …
    So C = 3 gives 10·M (PixelCNN++'s layout up to ordering) and C = 1 gives 3·M. Data x ∈ [0, 1] is mapped to
    y = 2x − 1 ∈ [−1, 1]; the mean of channel c in component m is μ_{c,m} + Σ_{j<c} a_{c,j,m}·y_j. Bins have width
    2/(2^bits − 1); the lowest and highest bins extend to −∞ and +∞ so the masses sum to 1 exactly.
    """

    def __init__(self, params: Tensor, num_mix: int = 10, num_bits: int = 8) -> None:
        _check_bits(num_bits)
        if params.dim() != 4:
            raise ValueError(f"DiscMixLogistic: expected params of shape (B, P, H, W), got {tuple(params.shape)}")
        channels = next((c for c in (1, 2, 3, 4) if self.num_params(c, num_mix) == params.shape[1]), None)
        if channels is None:
            raise ValueError(
                f"DiscMixLogistic: {params.shape[1]} parameter channels do not match num_mix={num_mix} "
                f"(expected {self.num_params(1, num_mix)} for 1 image channel or {self.num_params(3, num_mix)} for 3)"
            )
        self.num_mix, self.num_channels, self.num_bits = num_mix, channels, num_bits
        params = _full_precision(params)
        b, _, h, w = params.shape
        m, c = num_mix, channels
        self.logits = params[:, :m]  # (B, M, H, W)
        self.means = params[:, m : m + c * m].reshape(b, c, m, h, w)
        self.log_scales = torch.clamp(params[:, m + c * m : m + 2 * c * m].reshape(b, c, m, h, w), min=-7.0)
        n_coeff = c * (c - 1) // 2
        self.coeffs = torch.tanh(params[:, m + 2 * c * m :].reshape(b, n_coeff, m, h, w))

    @staticmethod
    def num_params(num_channels: int, num_mix: int) -> int:
        return num_mix * (1 + 2 * num_channels + num_channels * (num_channels - 1) // 2)

    def _component_means(self, c: int, earlier: list[Tensor]) -> Tensor:
        """Means of channel c in every component, (B, M, H, W), given the earlier channels' values (each (B, 1, H, W)
        or per component (B, M, H, W)); coefficient a_{c,j} sits at index c(c−1)/2 + j."""
        mean = self.means[:, c]
        for j in range(c):
            mean = mean + self.coeffs[:, c * (c - 1) // 2 + j] * earlier[j]
        return mean

    def log_prob(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) in [0, 1] -> (B, C, H, W) log p(x_c | x_<c) per channel; their sum is log p(pixel).

        x is rounded to the nearest of the 2^bits levels. The mixture couples the channels, so channel c gets the
        chain-rule term log p(x_≤c) − log p(x_<c) with p(x_≤c) = Σ_m π_m Π_{j≤c} p_m(x_j | x_<j) (exact: each
        component's factor for a later channel sums to 1 over that channel's levels).
        """
        _check_params("DiscMixLogistic.log_prob x", x, self.num_channels)
        levels = 2**self.num_bits - 1
        k = torch.round(x.clamp(0.0, 1.0) * levels)  # bin index 0..levels
        y = k * (2.0 / levels) - 1.0  # bin centre in [−1, 1]
        earlier = [y[:, j : j + 1] for j in range(self.num_channels)]
        means = torch.stack([self._component_means(c, earlier) for c in range(self.num_channels)], dim=1)
        centered = y.unsqueeze(2) - means  # (B, C, M, H, W)
        inv_s = torch.exp(-self.log_scales)
        upper = inv_s * (centered + 1.0 / levels)
        lower = inv_s * (centered - 1.0 / levels)
        # log(σ(u) − σ(l)) = log σ(u) + log σ(−l) + log(1 − e^(l−u)): stable for every scale, no branch needed
        # (the clamp only bites when exp(−log_scale) underflows; it keeps the unselected branches of the
        # torch.where below finite, so their zero gradients do not turn into NaN)
        gap = (lower - upper).clamp(max=-1e-20)
        log_mid = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(gap))
        log_first = F.logsigmoid(upper)  # lowest bin: P(Y < y + half bin)
        log_last = F.logsigmoid(-lower)  # highest bin: P(Y > y − half bin)
        kk = k.unsqueeze(2)
        log_comp = torch.where(kk == 0, log_first, torch.where(kk == levels, log_last, log_mid))
        log_pi = torch.log_softmax(self.logits, dim=1)  # (B, M, H, W)
        joint = torch.logsumexp(log_pi.unsqueeze(1) + torch.cumsum(log_comp, dim=1), dim=2)  # (B, C, H, W)
        return torch.cat([joint[:, :1], joint[:, 1:] - joint[:, :-1]], dim=1)

    def sample(self, temperature: float = 1.0) -> Tensor:
        """(B, C, H, W) in [0, 1]: one component per pixel (Gumbel-max), then the channels in order; the temperature
        multiplies the logistic scales."""
        gumbel = -torch.log(-torch.log(torch.rand_like(self.logits).clamp(1e-10, 1.0 - 1e-10)))
        choice = F.one_hot(torch.argmax(self.logits + gumbel, dim=1), self.num_mix).permute(0, 3, 1, 2)
        choice = choice.to(self.means.dtype).unsqueeze(1)  # (B, 1, M, H, W)
        scales = (torch.exp(self.log_scales) * choice).sum(2)  # (B, C, H, W)
        u = torch.rand_like(scales).clamp(1e-5, 1.0 - 1e-5)
        noise = temperature * scales * (torch.log(u) - torch.log1p(-u))
        ys: list[Tensor] = []
        for c in range(self.num_channels):
            mean_c = (self._component_means(c, ys) * choice[:, 0]).sum(1, keepdim=True)
            ys.append((mean_c + noise[:, c : c + 1]).clamp(-1.0, 1.0))
        return (torch.cat(ys, dim=1) + 1.0) / 2.0

    def mean(self) -> Tensor:
        """(B, C, H, W) in [0, 1]: the mixture mean of the continuous model, E[y_c] = Σ_m π_m·E_m[y_c], where each
        component's channel means are propagated through the autoregressive coefficients."""
        m_means: list[Tensor] = []
        for c in range(self.num_channels):
            m_means.append(self._component_means(c, m_means))
        pi = torch.softmax(self.logits, dim=1).unsqueeze(1)
        y = (torch.stack(m_means, dim=1) * pi).sum(2)
        return (y.clamp(-1.0, 1.0) + 1.0) / 2.0


class DiscGaussian:
    """Gaussian N(μ, σ²) on [0, 1] discretized to 2^bits levels: the mass of each bin of width 1/(2^bits − 1) around
    the level, the outer bins extended to ±∞. `mu` (B, C, H, W); `log_sigma` broadcasts against it (a shared scalar
    from the σ-VAE decoder or a per-pixel map)."""

    def __init__(self, mu: Tensor, log_sigma: Tensor, num_bits: int = 8) -> None:
        _check_bits(num_bits)
        self.mu = _full_precision(mu)
        self.sigma = torch.exp(_full_precision(log_sigma)).expand_as(self.mu)
        self.num_bits = num_bits

    def log_prob(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) in [0, 1], rounded to the nearest level -> (B, C, H, W) log bin mass."""
        levels = 2**self.num_bits - 1
        k = torch.round(x.clamp(0.0, 1.0) * levels)
        half = 0.5 / levels
        centre = (k / levels - self.mu) / self.sigma
        upper = centre + half / self.sigma
        lower = centre - half / self.sigma
        # Work in the lower tail (flip the bin when it lies above the mean) where log Φ is accurate.
        flip = centre > 0
        a = torch.where(flip, -lower, upper)
        b = torch.where(flip, -upper, lower)
        log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
        log_mid = log_a + torch.log(-torch.expm1((log_b - log_a).clamp(max=-1e-20)))  # clamp: finite when unused
        # A bin much narrower than σ: the difference of two log Φ loses digits, the midpoint rule does not.
        narrow = (a - b) < 1e-3
        log_pdf = -0.5 * centre**2 - 0.5 * _LOG_2PI + torch.log(2.0 * half / self.sigma)
        log_mid = torch.where(narrow, log_pdf, log_mid)
        log_first = torch.special.log_ndtr(upper)
        log_last = torch.special.log_ndtr(-lower)
        return torch.where(k == 0, log_first, torch.where(k == levels, log_last, log_mid))

    def sample(self, temperature: float = 1.0) -> Tensor:
        y = self.mu + temperature * self.sigma * torch.randn_like(self.mu)
        levels = 2**self.num_bits - 1
        return torch.round(y.clamp(0.0, 1.0) * levels) / levels

    def mean(self) -> Tensor:
        return self.mu.clamp(0.0, 1.0)


class Bernoulli:
    """Bernoulli decoder over binary images. `log_prob` refuses grey levels: thresholding them would score a different,
    static binarisation of the data, and a Bernoulli "likelihood" of a grey level is not a probability of anything."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = _full_precision(logits)  # (B, C, H, W)

    def log_prob(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) with values in {0, 1} -> (B, C, H, W) log p(x)."""
        grey = (x != 0) & (x != 1)
        if bool(grey.any()):
            raise ValueError(
                f"Bernoulli decoder: x has {int(grey.sum())} of {x.numel()} values that are not 0 or 1 (e.g. "
                f"{x[grey][0].item():.4g}); it models binary pixels. Binarise the data (data.binarize=dynamic draws "
                "x ~ Bernoulli(grey level) each time an image is used, as NVAE does for MNIST; in code: "
                "torch.bernoulli(x)), or choose a decoder for grey levels (dml, gaussian_*)"
            )
        return -F.binary_cross_entropy_with_logits(self.logits, x.to(self.logits.dtype), reduction="none")

    def sample(self, temperature: float = 1.0) -> Tensor:
        """Binary (B, C, H, W); the temperature divides the logits (t < 1 sharpens towards the mode)."""
        return torch.bernoulli(torch.sigmoid(self.logits / temperature))

    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)


def soft_clip_below(x: Tensor, minimum: float) -> Tensor:
    """minimum + softplus(x − minimum): ≈ x above the floor, ≈ minimum below it, smooth in between (σ-VAE)."""
    return minimum + F.softplus(x - minimum)


class GaussianDecoder:
    """σ-VAE decoder N(x; μ, σ²I) with one σ shared by all pixels and images.

    mode "optimal": with fit_sigma (training), σ*² = mean squared error over the whole batch (B·C·H·W elements),
      recomputed in every `log_prob` and detached (at σ* the loss is stationary in σ, so the gradient wrt μ is the
      same either way: envelope theorem); the fitted MSE is left in `batch_mse` for the model's running estimate.
      σ* is a training device: it makes an image's likelihood depend on the other images of its batch. Without
      fit_sigma (evaluation) σ is `log_sigma`, an estimate made on training data that the caller keeps, so each
      image is scored on its own. Before any fitting `log_prob`, `sigma` and `sample` also use `log_sigma` if given.
      log σ is soft-clipped from below at −6 so near-perfect reconstructions do not blow up the loss; as in the σ-VAE
      code the clip is applied everywhere, which raises σ above σ* by log(1 + e^(−(log σ* + 6))) in log space:
      +0.6 % at σ* = 0.43, +2.5 % at σ* = 0.1.
    mode "learned": σ = exp(soft-clip(log_sigma)), log_sigma a shared scalar nn.Parameter owned by the model (init 0).
    mode "fixed": σ = fixed_sigma (σ = 1 is plain MSE-sum, i.e. β = 2 in the β ↔ 2σ² correspondence).
    """

    MODES = ("optimal", "learned", "fixed")
    LOG_SIGMA_MIN = -6.0

    def __init__(
        self,
        mu: Tensor,
        mode: str,
        log_sigma: Tensor | None = None,
        fixed_sigma: float = 1.0,
        fit_sigma: bool = True,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"GaussianDecoder: unknown mode {mode!r}; choose one of {', '.join(self.MODES)}")
        if mode == "learned" and log_sigma is None:
            raise ValueError("GaussianDecoder(mode='learned') needs log_sigma: pass the model's shared nn.Parameter")
        if mode == "optimal" and not fit_sigma and log_sigma is None:
            raise ValueError(
                "GaussianDecoder(mode='optimal', fit_sigma=False) needs log_sigma: pass a σ estimated on training "
                "data (NVAE keeps one as `running_log_sigma`)"
            )
        if mode == "fixed" and not fixed_sigma > 0:
            raise ValueError(f"GaussianDecoder: fixed_sigma={fixed_sigma} must be > 0")
        self.mu = _full_precision(mu)  # (B, C, H, W)
        self.mode = mode
        self.fit_sigma = mode == "optimal" and fit_sigma
        self.batch_mse: Tensor | None = None  # () the MSE σ* was last fitted to (optimal mode with fit_sigma)
        self._log_sigma: Tensor | None = None
        if mode == "fixed":
            self._log_sigma = torch.tensor(math.log(fixed_sigma), device=mu.device, dtype=self.mu.dtype)
        elif log_sigma is not None:
            self._log_sigma = soft_clip_below(_full_precision(log_sigma).reshape(()), self.LOG_SIGMA_MIN)
            if mode == "optimal":
                self._log_sigma = self._log_sigma.detach()

    @property
    def log_sigma(self) -> Tensor:
        if self._log_sigma is None:
            raise RuntimeError(
                "GaussianDecoder(mode='optimal'): σ* is fitted by log_prob(x); call log_prob first, or pass "
                "log_sigma (a running estimate) to sample without data"
            )
        return self._log_sigma

    @property
    def sigma(self) -> Tensor:
        """The shared σ as a scalar tensor."""
        return torch.exp(self.log_sigma)

    @property
    def equivalent_beta(self) -> Tensor:
        """β = 2σ²: the KL weight of a β-VAE with MSE-sum reconstruction that has the same optimum."""
        return 2.0 * self.sigma**2

    def log_prob(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) in [0, 1] -> (B, C, H, W) full Gaussian log density, incl. −½·ln 2π."""
        sq = (x - self.mu) ** 2
        if self.fit_sigma:
            self.batch_mse = sq.mean().detach()
            self._log_sigma = soft_clip_below(0.5 * torch.log(self.batch_mse.clamp_min(1e-30)), self.LOG_SIGMA_MIN)
        log_sigma = self.log_sigma
        return -0.5 * sq * torch.exp(-2.0 * log_sigma) - log_sigma - 0.5 * _LOG_2PI

    def sample(self, temperature: float = 1.0) -> Tensor:
        return (self.mu + temperature * self.sigma * torch.randn_like(self.mu)).clamp(0.0, 1.0)

    def mean(self) -> Tensor:
        return self.mu.clamp(0.0, 1.0)

    def discretized(self, num_bits: int = 8) -> DiscGaussian:
        """The same Gaussian as bin masses on n-bit data: the likelihood to report bits/dim with."""
        return DiscGaussian(self.mu, self.log_sigma, num_bits)


OutputDistribution = DiscMixLogistic | Bernoulli | GaussianDecoder


def output_channels(kind: str, num_channels: int, num_mix: int) -> int:
    """How many channels the decoder must output for `make_output_distribution(kind, ...)`."""
    _check_kind(kind)
    if kind == "dml":
        return DiscMixLogistic.num_params(num_channels, num_mix)
    return num_channels


def make_output_distribution(
    kind: str,
    params: Tensor,
    *,
    num_channels: int,
    num_mix: int,
    num_bits: int,
    log_sigma: Tensor | None = None,
    fixed_sigma: float = 1.0,
    fit_sigma: bool = True,
) -> OutputDistribution:
    """The decoder distribution of `kind` from the decoder's raw output params (B, output_channels(...), H, W).
    log_sigma, fixed_sigma, fit_sigma: see GaussianDecoder."""
    _check_kind(kind)
    _check_params(f"make_output_distribution({kind!r})", params, output_channels(kind, num_channels, num_mix))
    if kind == "dml":
        return DiscMixLogistic(params, num_mix=num_mix, num_bits=num_bits)
    if kind == "bernoulli":
        return Bernoulli(params)
    return GaussianDecoder(
        params, kind.removeprefix("gaussian_"), log_sigma=log_sigma, fixed_sigma=fixed_sigma, fit_sigma=fit_sigma
    )


def _check_kind(kind: str) -> None:
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output distribution {kind!r}; choose one of {', '.join(OUTPUT_KINDS)}")
