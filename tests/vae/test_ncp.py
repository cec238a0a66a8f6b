"""vae.ncp against known answers: SIR and Langevin on Gaussian toys whose tilted targets are Gaussian in closed form,
the NCE classifier against the Bayes-optimal log-ratio of a toy with a known aggregate posterior, and, marked slow,
a tiny NVAE trained on scikit-learn's digits with one classifier per latent group."""
from __future__ import annotations

import copy
import math
import pickle
from types import SimpleNamespace

import pytest
import torch
from _tiny import digits_16, train_tiny
from torch import Tensor, nn

from vae.config import ConfigError
from vae.ncp import (
    NCPVAE,
    NCPConfig,
    classifier_for,
    context_channels,
    group_seed,
    make_all_pairs,
    make_pairs,
    nce_loss,
    train_group_classifier,
)
from vae.nvae import NVAE, NVAEConfig


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for these tiny models: on the shared 2-core machine two threads spin against the other
    engineers' jobs and an NVAE step took 4 s instead of 0.15 s. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# Toys with NVAE's top-down hooks.


class _Gauss:
    def __init__(self, mu: Tensor, sigma: Tensor) -> None:
        self.mu, self.sigma = mu, sigma

    def sample_given_eps(self, eps: Tensor) -> Tensor:
        return self.mu + self.sigma * eps


class GaussianChain(nn.Module):
    """Groups of d units on 1×1 maps: z_0 ~ N(0, I), z_k | z_{k-1} ~ N(ρ·z_{k-1}, s²I); the decoder state after group
    k is z_k itself, so the context of group k is z_{k-1}. Posterior q(z_k | z_<k, x) = N(prior mean + x_k, τ²I), x_k
    the k-th block of d channels of x (B, d·K, 1, 1)."""

    def __init__(self, d: int = 2, groups: int = 2, rho: float = 0.8, s: float = 0.6, tau: float = 0.6) -> None:
        super().__init__()
        self.register_buffer("rho", torch.tensor(rho))
        self.d, self.s, self.tau = d, s, tau
        self.num_groups = groups
        self.latent_shapes = [(d, 1, 1)] * groups

    def top_state(self, b: int) -> Tensor:
        return torch.zeros(b, self.d, 1, 1, device=self.rho.device)

    def group_context(self, k: int, state: Tensor) -> Tensor:
        return state

    def group_prior(self, k: int, context: Tensor, temperature: float = 1.0) -> _Gauss:
        if k == 0:
            return _Gauss(torch.zeros_like(context), torch.full_like(context, temperature))
        return _Gauss(self.rho * context, torch.full_like(context, self.s * temperature))

    def group_absorb(self, k: int, context: Tensor, z: Tensor) -> Tensor:
        return z

    def standard_eps(self, b: int) -> list[Tensor]:
        return [torch.randn(b, *shape, device=self.rho.device) for shape in self.latent_shapes]

    def prior_path(self, eps: list[Tensor], temperature: float = 1.0) -> tuple[list, Tensor]:
        state, steps = self.top_state(eps[0].shape[0]), []
        for k in range(self.num_groups):
            context = self.group_context(k, state)
            z = self.group_prior(k, context, temperature).sample_given_eps(eps[k])
            steps.append(SimpleNamespace(z=z, context=context))
            state = self.group_absorb(k, context, z)
        return steps, state

    def encode(self, x: Tensor) -> list[Tensor]:
        return list(x.split(self.d, dim=1))

    def group_posterior(self, k: int, context: Tensor, feature: Tensor, prior: _Gauss) -> _Gauss:
        return _Gauss(prior.mu + feature, torch.full_like(feature, self.tau))

    def group_flow(self, k: int, z0: Tensor) -> Tensor:
        return z0


class Ratio(nn.Module):
    """A classifier stand-in with a given logit fn(z (B, d), context (B, d)) -> (B,)."""

    def __init__(self, latent_shape, context_channels: int, fn) -> None:
        super().__init__()
        self.latent_shape, self.context_channels, self.fn = tuple(latent_shape), context_channels, fn

    def embed_context(self, context: Tensor) -> Tensor:
        return context

    def score(self, z: Tensor, features: Tensor) -> Tensor:
        return self.fn(z.flatten(1), features.flatten(1))

    def forward(self, z: Tensor, context: Tensor) -> Tensor:
        return self.score(z, self.embed_context(context))


def _toy(fns, **chain) -> NCPVAE:
    vae = GaussianChain(groups=len(fns), **chain)
    return NCPVAE(vae, [Ratio(vae.latent_shapes[k], vae.d, fn) for k, fn in enumerate(fns)], NCPConfig())


def _with(model: NCPVAE, **changes) -> NCPVAE:
    model.cfg = model.cfg.replace(**changes)
    return model


def _flat(zs: list[Tensor]) -> Tensor:
    return torch.cat([z.flatten(1) for z in zs], dim=1).double()


# ---------------------------------------------------------------------------------------------------------------------
# SIR and Langevin against closed forms.


def test_sir_with_constant_ratio_is_base_sampling_on_a_chain():
    torch.manual_seed(0)
    model = _with(_toy([lambda z, c: torch.full((len(z),), 3.0)] * 2, d=1), sir_proposals=5, sample_batch_size=20000)
    z = _flat(model.sample_latents(20000, "sir"))  # (n, 2): z_0, z_1
    assert model.last_stats["ess"] == pytest.approx([5.0, 5.0])  # uniform weights: ESS = M exactly
    # Base prior: z_0 ~ N(0, 1), z_1 = 0.8·z_0 + 0.6·n, so Var z_1 = 0.64 + 0.36 = 1 and Cov = 0.8.
    se = 1.0 / math.sqrt(20000)
    assert z.mean(0).abs().max() < 4 * se
    cov = torch.cov(z.T)
    assert cov[0, 0].item() == pytest.approx(1.0, abs=6 * se * math.sqrt(2))
    assert cov[1, 1].item() == pytest.approx(1.0, abs=6 * se * math.sqrt(2))
    assert cov[0, 1].item() == pytest.approx(0.8, abs=6 * se * math.sqrt(2))


def test_sir_matches_a_quadratic_tilt_in_two_dimensions():
    # log r(z) = −a‖z − m‖²/2 on N(0, I): the target is N(m·a/(1 + a), I/(1 + a)).
    torch.manual_seed(1)
    a, m = 1.0, torch.tensor([1.5, -1.0])
    model = _with(_toy([lambda z, c: -0.5 * a * ((z - m) ** 2).sum(1)]), sir_proposals=500, sample_batch_size=1000)
    z = _flat(model.sample_latents(4000, "sir"))
    assert z.mean(0).tolist() == pytest.approx((m * a / (1 + a)).tolist(), abs=0.04)
    assert z.var(0).tolist() == pytest.approx([1 / (1 + a)] * 2, abs=0.04)
    assert 1.0 <= model.last_stats["ess"][0] <= 500.0
    base = _flat(model.sample_latents(4000, "base"))
    assert base.var(0).tolist() == pytest.approx([1.0, 1.0], abs=0.08)  # the control: base sampling ignores r
    assert model.last_stats["mean_log_r"] < -1.0


def test_langevin_matches_a_quadratic_tilt_in_two_dimensions():
    # The same target in ε space (z = ε here). Unadjusted Langevin with step η has stationary variance
    # 1/(λ(1 − ηλ/4)), λ = 1 + a: 0.505 at η = 0.02, within the tolerance of the exact 0.5.
    torch.manual_seed(2)
    a, m = 1.0, torch.tensor([1.5, -1.0])
    model = _with(
        _toy([lambda z, c: -0.5 * a * ((z - m) ** 2).sum(1)]),
        langevin_steps=500, langevin_step_size=0.02, sample_batch_size=4000,
    )
    z = _flat(model.sample_latents(4000, "langevin"))
    assert z.mean(0).tolist() == pytest.approx((m * a / (1 + a)).tolist(), abs=0.04)
    assert z.var(0).tolist() == pytest.approx([1 / (1 + a)] * 2, abs=0.03)
    stats = model.last_stats
    assert stats["method"] == "langevin" and stats["steps"] == 500 and stats["energy_end"] < stats["energy_start"]


def test_hierarchical_sir_normalises_per_group_and_langevin_jointly():
    # r_0 = 1, log r_1 = b·z_1 on the chain z_0 ~ N(0, 1), z_1 | z_0 ~ N(ρ z_0, s²). Z_1(z_0) = exp(bρz_0 + b²s²/2)
    # depends on z_0, so the two samplers have different, known targets (module docstring):
    # SIR, Π_k r_k p_k / Z_k: z_0 ~ N(0, 1) untouched, z_1 | z_0 ~ N(ρ z_0 + b s², s²);
    # Langevin, p(z)·r/Z in ε space: ε_0 ~ N(bρ, 1), ε_1 ~ N(bs, 1), so E z_0 = bρ and E z_1 = b(ρ² + s²).
    b, rho, s = 1.0, 0.8, 0.6
    fns = [lambda z, c: torch.zeros(len(z)), lambda z, c: b * z.sum(1)]
    torch.manual_seed(3)
    model = _with(_toy(fns, d=1, rho=rho, s=s), sir_proposals=400, langevin_steps=300, langevin_step_size=0.05,
                  sample_batch_size=4000)
    z = _flat(model.sample_latents(4000, "sir"))
    residual = z[:, 1] - rho * z[:, 0]
    assert z[:, 0].mean().item() == pytest.approx(0.0, abs=0.05)
    assert z[:, 0].var().item() == pytest.approx(1.0, abs=0.07)
    assert residual.mean().item() == pytest.approx(b * s**2, abs=0.03)
    assert residual.var().item() == pytest.approx(s**2, abs=0.03)
    z = _flat(model.sample_latents(4000, "langevin"))
    assert z[:, 0].mean().item() == pytest.approx(b * rho, abs=0.06)
    assert z[:, 1].mean().item() == pytest.approx(b * (rho**2 + s**2), abs=0.08)
    # log r_1 = b·(z_1 − ρ·c) reads the context c = z_0 and has Z_1 = exp(b²s²/2) for every z_0: both samplers then
    # target z_0 ~ N(0, 1), z_1 | z_0 ~ N(ρ z_0 + b s², s²).
    model = _with(_toy([fns[0], lambda z, c: b * (z - rho * c).sum(1)], d=1, rho=rho, s=s), **model.cfg.to_dict())
    for method in ("sir", "langevin"):
        z = _flat(model.sample_latents(4000, method))
        residual = z[:, 1] - rho * z[:, 0]
        assert z[:, 0].mean().item() == pytest.approx(0.0, abs=0.06), method
        assert residual.mean().item() == pytest.approx(b * s**2, abs=0.03), method
        assert residual.var().item() == pytest.approx(s**2, abs=0.03), method
    # log r_1 = b·z_1·c weights the candidates differently for each context: SIR's z_1 | z_0 ~ N((ρ + b s²)·z_0, s²).
    model = _with(_toy([fns[0], lambda z, c: b * (z * c).sum(1)], d=1, rho=rho, s=s), **model.cfg.to_dict())
    z = _flat(model.sample_latents(4000, "sir"))
    slope = (torch.cov(z.T)[0, 1] / z[:, 0].var()).item()
    assert slope == pytest.approx(rho + b * s**2, abs=0.04)
    assert (z[:, 1] - slope * z[:, 0]).var().item() == pytest.approx(s**2, abs=0.03)


def test_nce_classifier_learns_the_bayes_optimal_log_ratio():
    # One group: x ~ N(1, 0.5²), q(z|x) = N(x, 0.6²), so the aggregate posterior is N(1, 0.61) against p = N(0, 1)
    # and log r* = log N(z; 1, 0.61) − log N(z; 0, 1).
    def log_r_star(z: Tensor) -> Tensor:
        return (-0.5 * (z - 1.0) ** 2 / 0.61 - 0.5 * math.log(0.61) + 0.5 * z**2).sum(1)

    vae = GaussianChain(d=1, groups=1, tau=0.6)
    g = torch.Generator().manual_seed(4)
    data = 1.0 + 0.5 * torch.randn(9000, 1, 1, 1, generator=g)
    train, val, test = data[:4000], data[4000:5000], data[5000:]  # 4000 test examples: E_q[log r] to ±0.02

    def batches(split: str):
        return train[torch.randperm(len(train), generator=g)].split(256) if split == "train" else [val]

    cfg = NCPConfig(classifier_channels=16, classifier_blocks=1, steps=600, eval_every=50, lr=3e-3, batch_size=256,
                    patience=4)
    seen = []
    classifier, history = train_group_classifier(vae, 0, batches, cfg, progress=lambda step, m: seen.append((step, m)))
    torch.manual_seed(5)
    z_pos, z_neg, context = make_pairs(vae, test[:1000], 0)
    with torch.no_grad():
        optimal, _ = nce_loss(log_r_star(z_pos.flatten(1)), log_r_star(z_neg.flatten(1)))
        learned, accuracy = nce_loss(classifier(z_pos, context), classifier(z_neg, context))
        grid = torch.linspace(-1.0, 2.5, 50).view(-1, 1, 1, 1)  # where both densities have mass
        error = (classifier(grid, torch.zeros_like(grid)) - log_r_star(grid.flatten(1))).abs().mean()
    assert learned.item() < optimal.item() + 0.01  # held-out NCE loss at the Bayes optimum (≈ 0.61 here)
    assert accuracy.item() > 0.6
    assert error.item() < 0.15
    assert history["best_val_nce_loss"] == min(history["val_nce_loss"]) < math.log(2)
    assert [s for s, _ in seen] == history["step"] and "val/nce_loss/group_00" in seen[0][1]
    # With the exact log-ratio, Z = E_p[r*] = 1 and the gain is KL(N(1, 0.61) ‖ N(0, 1)) = 0.552 nats.
    exact = NCPVAE(vae, [Ratio((1, 1, 1), 1, lambda z, c: log_r_star(z))], NCPConfig(log_z_samples=4000))
    assert exact.log_z_estimate(0) == pytest.approx(0.0, abs=0.03)
    kl = 0.5 * (0.61 + 1.0 - 1.0 - math.log(0.61))
    gain = exact.ncp_gain(test.split(1000), n_prior_samples=2000)
    assert gain["examples"] == 4000 and gain["e_q_log_z"][0] == pytest.approx(0.0, abs=0.02)
    assert gain["gain"][0] == pytest.approx(kl, abs=0.05)
    learned_gain = NCPVAE(vae, [classifier]).ncp_gain([test[:1000]], n_prior_samples=500)["gain"][0]
    assert learned_gain == pytest.approx(kl, abs=0.1)


def test_early_stopping_keeps_the_best_weights():
    # A classifier that cannot learn (x = 0 and τ = 1 make the posterior the prior, q = p) stops after `patience`
    # evaluations without improvement, and returns the weights of its best evaluation, which are the weights its
    # held-out loss was measured on: the validation pairs are reproducible from group_seed (drawn first).
    vae = GaussianChain(d=1, groups=1, tau=1.0)
    zeros = torch.zeros(512, 1, 1, 1)
    cfg = NCPConfig(classifier_channels=8, classifier_blocks=1, steps=10_000, eval_every=5, patience=3, lr=3e-2,
                    batch_size=512, seed=7)
    classifier, history = train_group_classifier(vae, 0, lambda split: [zeros], cfg)
    assert history["stopped_early"] and history["steps"] < 10_000
    best = history["step"].index(history["best_step"])
    assert len(history["step"]) - 1 - best == 3
    assert history["best_step"] != history["step"][-1]  # the last weights are not the best ones
    assert history["val_nce_loss"][best] == history["best_val_nce_loss"] > math.log(2) - 0.02
    with torch.random.fork_rng():
        torch.manual_seed(group_seed(cfg, 0))
        z_pos, z_neg, context = make_pairs(vae, zeros, 0)
    with torch.no_grad():
        loss, _ = nce_loss(classifier(z_pos, context), classifier(z_neg, context))
    assert loss.item() == pytest.approx(history["best_val_nce_loss"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# On the NVAE itself (untrained, fast).


@pytest.fixture(scope="module")
def untrained_nvae() -> NVAE:
    torch.manual_seed(6)
    return NVAE(NVAEConfig.preset("tiny", decoder="bernoulli")).eval()


def test_constant_ratio_sir_on_the_nvae_matches_base_samples(untrained_nvae):
    from scipy.stats import ks_2samp

    vae = untrained_nvae
    constant = [Ratio(shape, c, lambda z, ctx: torch.full((len(z),), -2.0))
                for shape, c in zip(vae.latent_shapes, context_channels(vae))]
    tilted = [Ratio(shape, c, lambda z, ctx: 2.0 * z.sum(1) / z.shape[1] ** 0.5)
              for shape, c in zip(vae.latent_shapes, context_channels(vae))]
    cfg = NCPConfig(sir_proposals=6, sample_batch_size=200)
    torch.manual_seed(7)
    base = NCPVAE(vae, constant, cfg).sample_latents(600, "base")
    sir = NCPVAE(vae, constant, cfg).sample_latents(600, "sir")
    shifted = NCPVAE(vae, tilted, cfg).sample_latents(600, "sir")
    for k in range(vae.num_groups):
        d = base[k][0].numel()
        random = torch.randn(3, d, generator=torch.Generator().manual_seed(k))
        project = torch.cat([torch.full((1, d), d**-0.5), random])
        project = project / project.norm(dim=1, keepdim=True)
        for row in project:
            p = ks_2samp((base[k].flatten(1) @ row).numpy(), (sir[k].flatten(1) @ row).numpy()).pvalue
            assert p > 1e-3, (k, p)
        # The control: a tilt towards larger latent means is detected on the all-ones direction.
        ones = project[0]
        assert ks_2samp((base[k].flatten(1) @ ones).numpy(), (shifted[k].flatten(1) @ ones).numpy()).pvalue < 1e-6


# The likelihood under the NCP prior and its normalisers (untrained NVAE, default DML decoder, fast).


@pytest.fixture(scope="module")
def dml_nvae() -> NVAE:
    torch.manual_seed(16)
    return NVAE(NVAEConfig.preset("tiny")).eval()


def _linear(vae: NVAE, scale: float) -> list[Ratio]:
    """log r_k = a_k·z_k with a fixed random direction a_k per group, |a_k| = scale."""
    out = []
    for k, (shape, c) in enumerate(zip(vae.latent_shapes, context_channels(vae))):
        a = torch.randn(math.prod(shape), generator=torch.Generator().manual_seed(100 + k))
        a = scale * a / a.norm()
        out.append(Ratio(shape, c, lambda z, ctx, a=a: z @ a))
    return out


def _closed_log_z(vae: NVAE, k: int, context: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """log E_{N(μ, σ²)}[exp(a·z)] = a·μ + ½ Σ a²σ², and the lognormal's Var[r]/E[r]² = exp(Σ a²σ²) − 1."""
    prior = vae.group_prior(k, context)
    mu, var = prior.mu.flatten(1).double(), prior.sigma.flatten(1).double() ** 2
    s2 = (a.double() ** 2 * var).sum(1)
    return mu @ a.double() + 0.5 * s2, torch.expm1(s2)


def test_log_normalizer_matches_the_gaussian_closed_form_and_its_error_is_calibrated(dml_nvae):
    vae = dml_nvae
    ratios = _linear(vae, scale=0.8)
    model = NCPVAE(vae, ratios, NCPConfig())
    torch.manual_seed(17)
    steps, _ = vae.prior_path(vae.standard_eps(4))
    for k in range(vae.num_groups):
        a = ratios[k].fn.__defaults__[0]
        context = steps[k].context
        exact, rel_var = _closed_log_z(vae, k, context, a)
        m = 4000
        log_z, var = model.log_normalizer(k, context, m)
        se = var.sqrt()
        assert (log_z - exact).abs().max() < 4 * se.max(), (k, log_z - exact, se)
        # The delta-method variance against the lognormal's exact one, Var[log Ẑ] ≈ (e^{s²} − 1)/M.
        assert torch.allclose(var, rel_var / m, rtol=0.25), (k, var, rel_var / m)
    # Calibration: over 300 independent estimates with M = 40 the spread of log Ẑ matches the stated error.
    context = steps[2].context[:1].expand(300, -1, -1, -1)
    log_z, var = model.log_normalizer(2, context, 40)
    assert log_z.std().item() == pytest.approx(var.sqrt().mean().item(), rel=0.2)
    exact, _ = _closed_log_z(vae, 2, context[:1], ratios[2].fn.__defaults__[0])
    # Jensen: E[log Ẑ] ≈ log Z − Var/2, below the truth, and the stated bias accounts for it.
    bias = (log_z.mean() - exact[0]).item()
    assert bias == pytest.approx(-0.5 * var.mean().item(), abs=4 * log_z.std().item() / 300**0.5)


def test_zero_logit_classifiers_give_the_base_likelihood(dml_nvae):
    """r ≡ const: p_NCP = p exactly, whatever M; the NCP figure must be the base one on the same draws."""
    vae = dml_nvae
    x = digits_16()[0][:6]
    cfg = NCPConfig(classifier_channels=8)
    zero_logit = [classifier_for(vae, k, cfg) for k in range(vae.num_groups)]
    for clf in zero_logit:
        nn.init.zeros_(clf.out.weight)
        nn.init.zeros_(clf.out.bias)
    constant = [Ratio(shape, c, lambda z, ctx: torch.full((len(z),), 1.7))
                for shape, c in zip(vae.latent_shapes, context_channels(vae))]
    for classifiers in (zero_logit, constant):
        model = NCPVAE(vae, classifiers, cfg)
        torch.manual_seed(18)
        out = model.importance_weighted_nll([x[:4], x[4:]], k=12, n_samples=4, rows_per_pass=20)
        assert out["nll"] == pytest.approx(out["base_nll"], abs=1e-9) and out["gain"] == pytest.approx(0, abs=1e-9)
        assert out["mc_se"] < 1e-6 and out["examples"] == 6 and out["k"] == 12  # every draw scores alike
    # The base figure is NVAE's own importance-weighted bound: the same draws give the same weights.
    torch.manual_seed(19)
    expected = vae.log_weights(x.repeat(3, 1, 1, 1)).double()
    top = model._top_normalizer(8)
    torch.manual_seed(19)
    base, correction, var = model._ncp_rows(x.repeat(3, 1, 1, 1), 4, top)
    assert torch.equal(base, expected) and correction.abs().max() < 1e-9


def test_ncp_log_weight_scores_the_prior_correction_on_the_base_weights_draw(dml_nvae):
    """log w_NCP − log w = Σ_k (a_k·z_k − log Ẑ_k(c_k)) on the z the base weight drew: checked against the same draw
    from `encode_path` (the same RNG stream) and the closed-form log Z_k, within the stated Monte Carlo error."""
    vae = dml_nvae
    ratios = _linear(vae, scale=0.5)
    model = NCPVAE(vae, ratios, NCPConfig())
    x = digits_16()[0][10:15]
    torch.manual_seed(20)
    steps = vae.encode_path(x)
    top = model._top_normalizer(20000)
    torch.manual_seed(20)
    base, correction, var = model._ncp_rows(x, 2000, top)
    expected = torch.zeros(len(x), dtype=torch.float64)
    for k, step in enumerate(steps):
        a = ratios[k].fn.__defaults__[0]
        log_z, _ = _closed_log_z(vae, k, step.context, a)
        expected += step.z.flatten(1).double() @ a.double() - log_z
    assert (correction - expected).abs().max() < 5 * (var.sqrt().max() + 1e-3), (correction - expected, var)
    assert var.sqrt().max() < 0.1  # M = 2000 draws pin each log Ẑ_k down: the check above is tight
    # A tilted prior changes the figure: it is not the base likelihood under another name.
    torch.manual_seed(21)
    out = NCPVAE(vae, _linear(vae, scale=2.0), NCPConfig()).importance_weighted_nll(x, k=8, n_samples=64)
    assert abs(out["gain"]) > 10 * out["mc_se"] > 0
    assert out["nll"] == pytest.approx(out["base_nll"] - out["gain"])


def test_ncp_likelihood_refuses_a_single_normaliser_draw(dml_nvae):
    model = NCPVAE(dml_nvae, _linear(dml_nvae, 0.5), NCPConfig())
    with pytest.raises(ValueError, match="n_samples=1"):
        model.importance_weighted_nll(digits_16()[0][:2], k=2, n_samples=1)


def test_make_pairs_share_the_context_and_the_vae_must_be_frozen(untrained_nvae):
    vae = untrained_nvae
    x = torch.rand(8, 1, 16, 16)
    torch.manual_seed(9)
    pairs = make_all_pairs(vae, x)
    torch.manual_seed(9)
    single = make_pairs(vae, x, 2)
    assert len(pairs) == vae.num_groups
    for (z_pos, z_neg, context), shape, channels in zip(pairs, vae.latent_shapes, context_channels(vae)):
        assert z_pos.shape == z_neg.shape == (8, *shape) and context.shape == (8, channels, *shape[1:])
        assert not z_pos.requires_grad and not torch.equal(z_pos, z_neg)
    assert all(torch.equal(a, b) for a, b in zip(pairs[2][::2], single[::2]))  # same positives and context
    vae.train()
    try:
        with pytest.raises(ValueError, match="training mode.*vae.eval\\(\\)"):
            make_pairs(vae, x, 0)
    finally:
        vae.eval()
    with pytest.raises(ValueError, match="groups 0..3"):
        make_pairs(vae, x, 4)


def test_classifiers_of_another_vae_are_refused(untrained_nvae):
    vae = untrained_nvae
    cfg = NCPConfig(classifier_channels=8, classifier_blocks=1)
    other_latents = NVAE(NVAEConfig.preset("tiny", decoder="bernoulli", num_latent_per_group=5))
    other_width = NVAE(NVAEConfig.preset("tiny", decoder="bernoulli", num_channels_dec=8))
    with pytest.raises(ValueError, match="3 classifiers for a VAE with 4 latent groups.*train_group_classifier"):
        NCPVAE(vae, [classifier_for(vae, k, cfg) for k in range(3)])
    with pytest.raises(ValueError, match=r"classifier 0 scores latents of shape \(5, 4, 4\).*\(4, 4, 4\).*another VAE"):
        NCPVAE(vae, [classifier_for(other_latents, k, cfg) for k in range(4)])
    with pytest.raises(ValueError, match="classifier 0 reads a decoder context of 32 channels.*64"):
        NCPVAE(vae, [classifier_for(other_width, k, cfg) for k in range(4)])
    clf = classifier_for(vae, 2, cfg)
    with pytest.raises(ValueError, match="scores latents \\(B, 4, 8, 8\\)"):
        clf(torch.zeros(2, 4, 4, 4), torch.zeros(2, 32, 4, 4))
    with pytest.raises(ValueError, match="expected \\(2, 32, 8, 8\\)"):
        clf(torch.zeros(2, 4, 8, 8), torch.zeros(2, 16, 8, 8))


def test_config_is_validated():
    with pytest.raises(ConfigError, match="ncp.sir_proposals: 0 is out of range"):
        NCPConfig(sir_proposals=0)
    with pytest.raises(ConfigError, match="ncp.langevin_step_size"):
        NCPConfig(langevin_step_size=0.0)
    with pytest.raises(ConfigError, match="did you mean 'sir_proposals'"):
        NCPConfig.from_dict({"sir_proposal": 10})
    cfg = NCPConfig.from_dict({"steps": 10, "lr": "3e-4"})
    assert cfg.steps == 10 and cfg.lr == 3e-4 and NCPConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------------------------------
# A tiny NVAE trained on digits (slow).


@pytest.fixture(scope="module")
def trained():
    """The tiny preset at 8 channels with the σ-VAE optimal-σ decoder, 150 Adamax steps; then one classifier per
    group, 150 steps each. Digits 0-1399 train, 1400-1599 validate, 1600- test. `active` lists the groups whose test
    KL is above 1 nat: where q(z_k) ≈ p(z_k) (the coarse groups of this short run hold 0.2-0.4 nats) no classifier
    can beat chance and an NCP has nothing to correct."""
    x, _ = digits_16()
    vae = train_tiny(x, n_train=1400, steps=150, seed=10, decoder="gaussian_optimal", num_channels_enc=8,
                     num_channels_dec=8)
    with torch.no_grad():
        kl = vae(x[1600:]).kl_per_group.mean(0)
    active = [k for k in range(vae.num_groups) if kl[k] > 1.0]
    before = copy.deepcopy(vae.state_dict())
    cfg = NCPConfig(classifier_channels=32, classifier_blocks=2, steps=150, eval_every=50, lr=2e-3, batch_size=64,
                    val_examples=200, sir_proposals=16, langevin_steps=10, sample_batch_size=64)

    g = torch.Generator().manual_seed(11)

    def batches(split: str):
        return [x[1400:1600]] if split == "val" else x[:1400][torch.randperm(1400, generator=g)].split(64)

    results = [train_group_classifier(vae, k, batches, cfg) for k in range(vae.num_groups)]
    return SimpleNamespace(vae=vae, before=before, cfg=cfg, x_test=x[1600:], classifiers=[c for c, _ in results],
                           histories=[h for _, h in results], active=active)


@pytest.mark.slow
def test_trained_classifiers_beat_chance_and_leave_the_vae_untouched(trained):
    assert len(trained.active) >= 2, trained.active
    for k in trained.active:
        history = trained.histories[k]
        assert history["best_val_accuracy"] > 0.55, (k, history)
        assert history["best_val_nce_loss"] < math.log(2) - 0.01, (k, history)
    after = trained.vae.state_dict()
    assert after.keys() == trained.before.keys()
    assert all(torch.equal(after[name], trained.before[name]) for name in after)  # parameters and BN buffers
    assert not any(p.requires_grad for p in trained.vae.parameters())


@pytest.mark.slow
def test_trained_ncp_vae_gains_and_samples_by_every_method(trained):
    model = NCPVAE(trained.vae, trained.classifiers, trained.cfg)
    torch.manual_seed(12)
    gain = model.ncp_gain(trained.x_test.split(64), n_prior_samples=64)
    assert all(gain["gain"][k] > 0 for k in trained.active), gain
    assert all(g > -0.05 for g in gain["gain"]), gain  # an inactive group: nothing to gain, little to lose
    assert gain["total"] == pytest.approx(sum(gain["gain"]))
    log_r = {}
    for method in ("base", "sir", "langevin"):
        for mode in ("sample", "mean"):
            images = model.sample(20, method, mode=mode)
            assert images.shape == (20, 1, 16, 16) and torch.isfinite(images).all()
            assert images.min() >= 0.0 and images.max() <= 1.0
        log_r[method] = model.last_stats["mean_log_r"]
        assert model.last_stats["method"] == method
    assert log_r["sir"] > log_r["base"]  # resampling by r moves samples to where the classifiers see q
    model.sample(20, "sir", temperature=0.7)
    ess = model.last_stats["ess"]
    assert len(ess) == trained.vae.num_groups and all(1.0 <= e <= 16.0 for e in ess)
    assert math.isfinite(model.log_z_estimate(0, 256)) and math.isfinite(model.log_z_estimate(3, 64, n_contexts=4))
    with pytest.raises(ValueError, match="method 'mcmc'"):
        model.sample(2, "mcmc")


@pytest.mark.slow
def test_trained_ncp_vae_pickles_moves_and_stays_frozen(trained):
    model = NCPVAE(trained.vae, trained.classifiers, trained.cfg)
    clone = pickle.loads(pickle.dumps(model))
    torch.manual_seed(13)
    a = model.sample(6, "sir", mode="mean")
    torch.manual_seed(13)
    b = clone.sample(6, "sir", mode="mean")
    assert torch.equal(a, b)
    clone.train()
    assert clone.training and not clone.vae.training and not any(c.training for c in clone.classifiers)
    clone.to(torch.device("cpu"))
    assert clone.sample(2, "langevin").shape == (2, 1, 16, 16)
    assert all(torch.equal(v, trained.before[k]) for k, v in trained.vae.state_dict().items())
