"""vae/distributions.py: closed forms, Monte Carlo checks, and normalisation of the discretized likelihoods."""
from __future__ import annotations

import math

import pytest
import torch

from vae.distributions import (
    Bernoulli,
    DiscGaussian,
    DiscMixLogistic,
    GaussianDecoder,
    Normal,
    gaussian_kl,
    make_output_distribution,
    output_channels,
    residual_normal_kl,
    soft_clamp,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_soft_clamp_is_bounded_and_near_identity_at_zero():
    x = torch.tensor([-1e6, -5.0, -0.01, 0.0, 0.01, 5.0, 1e6])
    y = soft_clamp(x)
    assert torch.allclose(y, 5.0 * torch.tanh(x / 5.0))
    assert y.abs().max() <= 5.0
    assert torch.allclose(y[2:5], x[2:5], atol=1e-6)
    assert torch.allclose(soft_clamp(torch.tensor(30.0), bound=2.0), torch.tensor(2.0))


def test_normal_parameters_log_prob_and_sampling():
    mu, log_sigma = torch.randn(5) * 4, torch.randn(5) * 4
    d = Normal(mu, log_sigma, temperature=0.7)
    assert torch.allclose(d.mu, 5 * torch.tanh(mu / 5))
    assert torch.allclose(d.sigma, (torch.exp(5 * torch.tanh(log_sigma / 5)) + 1e-2) * 0.7)
    z = torch.randn(5)
    ref = torch.distributions.Normal(d.mu, d.sigma).log_prob(z)
    assert torch.allclose(d.log_prob(z), ref, atol=1e-5)
    eps = torch.randn(5)
    assert torch.allclose(d.sample_given_eps(eps), d.mu + d.sigma * eps)
    zs, eps = Normal(mu.expand(40000, 5), log_sigma.expand(40000, 5)).sample()
    assert torch.allclose(zs, Normal(mu, log_sigma).mu + Normal(mu, log_sigma).sigma * eps)
    sigma1 = Normal(mu, log_sigma).sigma
    se = sigma1 / math.sqrt(40000)
    assert ((zs.mean(0) - d.mu).abs() < 5 * se).all()
    assert torch.allclose(zs.std(0), sigma1, rtol=0.03)


def test_gaussian_kl_matches_torch():
    mu1, mu2 = torch.randn(100), torch.randn(100)
    s1, s2 = torch.rand(100) + 0.1, torch.rand(100) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu1, s1), torch.distributions.Normal(mu2, s2))
    assert torch.allclose(gaussian_kl(mu1, s1, mu2, s2), ref, atol=1e-5)
    assert torch.allclose(gaussian_kl(mu1, s1, mu1, s1), torch.zeros(100), atol=1e-6)


def test_residual_normal_kl_closed_form_equals_gaussian_kl_and_monte_carlo():
    n = 6
    prior = Normal(torch.randn(n), torch.randn(n) * 0.5)
    post = Normal.residual(prior, torch.randn(n) * 0.5, torch.randn(n) * 0.3)
    # the residual posterior is built on the prior's raw parameters
    assert torch.allclose(post.mu, soft_clamp(prior.mu_raw + (post.mu_raw - prior.mu_raw)))
    delta_mu, delta_sigma = post.mu - prior.mu, post.sigma / prior.sigma
    closed = residual_normal_kl(delta_mu, delta_sigma, prior.sigma)
    assert torch.allclose(closed, post.kl(prior), atol=1e-5)
    assert torch.allclose(closed, gaussian_kl(post.mu, post.sigma, prior.mu, prior.sigma), atol=1e-5)
    # Monte Carlo: E_q[log q(z) − log p(z)], tolerance from the estimator's standard error
    m = 200_000
    z = post.mu + post.sigma * torch.randn(m, n, dtype=torch.float64)
    log_ratio = (
        torch.distributions.Normal(post.mu.double(), post.sigma.double()).log_prob(z)
        - torch.distributions.Normal(prior.mu.double(), prior.sigma.double()).log_prob(z)
    )
    est, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(m)
    assert ((est - closed.double()).abs() < 5 * se + 1e-6).all(), (est, closed, se)
    assert (closed > 0).all()


def _all_levels(bits: int) -> torch.Tensor:
    levels = 2**bits
    return torch.arange(levels, dtype=torch.float32) / (levels - 1)


@pytest.mark.parametrize("bits", [8, 5])
def test_disc_mix_logistic_one_channel_sums_to_one(bits):
    m = 5
    for scale in (0.5, 3.0):  # ordinary and extreme parameters (log-scales hit the −7 clamp)
        params = torch.randn(4, DiscMixLogistic.num_params(1, m), 1, 1) * scale
        x = _all_levels(bits)
        total = torch.zeros(4)
        for i in range(4):
            d = DiscMixLogistic(params[i : i + 1].expand(len(x), -1, -1, -1), num_mix=m, num_bits=bits)
            lp = d.log_prob(x.view(-1, 1, 1, 1))
            assert lp.shape == (len(x), 1, 1, 1) and torch.isfinite(lp).all()
            total[i] = lp.exp().sum()
        assert torch.allclose(total, torch.ones(4), atol=1e-5), total


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_disc_mix_logistic_three_channels_joint_sums_to_one(scale):
    bits, m = 5, 4
    g = _all_levels(bits)
    x = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=0).reshape(3, -1).T.reshape(-1, 3, 1, 1)
    params = torch.randn(1, DiscMixLogistic.num_params(3, m), 1, 1) * scale
    d = DiscMixLogistic(params.expand(len(x), -1, -1, -1), num_mix=m, num_bits=bits)
    lp = d.log_prob(x)  # (32768, 3, 1, 1)
    assert torch.isfinite(lp).all()
    assert lp.sum(1).exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # each channel's term is the conditional p(x_c | x_<c): for fixed (r, g) the blue terms sum to 1 over blue
    blue = lp[:, 2].reshape(32, 32, 32).exp().sum(-1)
    assert torch.allclose(blue, torch.ones(32, 32), atol=1e-5)
    # ... and the red term is the marginal of red
    red = lp[:, 0].reshape(32, 32, 32)[:, 0, 0].exp().sum()
    assert red.item() == pytest.approx(1.0, abs=1e-5)


def test_disc_mix_logistic_single_component_closed_form():
    bits, levels = 8, 255
    mu, log_s = 0.1, -3.0
    params = torch.tensor([0.0, mu, log_s]).view(1, 3, 1, 1)
    d = DiscMixLogistic(params, num_mix=1, num_bits=bits)
    for k in (0, 3, 140, 255):
        y = 2 * k / levels - 1
        cdf = lambda v: torch.sigmoid(torch.tensor((v - mu) / math.exp(log_s), dtype=torch.float64))  # noqa: E731
        upper = 1.0 if k == levels else cdf(y + 1 / levels)
        lower = 0.0 if k == 0 else cdf(y - 1 / levels)
        expected = math.log(upper - lower)
        got = d.log_prob(torch.full((1, 1, 1, 1), k / levels)).item()
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4), k


def test_disc_mix_logistic_sample_and_mean_agree():
    m = 3
    params = torch.randn(1, DiscMixLogistic.num_params(3, m), 1, 1)
    params[:, m : 4 * m] *= 0.4  # means inside (−1, 1) so the [0, 1] clamp rarely matters
    params[:, 4 * m : 7 * m] = -3.0  # small scales
    params[:, 7 * m :] = 1.5  # strong channel coupling, so the autoregressive part is exercised
    d = DiscMixLogistic(params.expand(50_000, -1, -1, -1), num_mix=m)
    s = d.sample()
    assert s.shape == (50_000, 3, 1, 1)
    assert torch.allclose(s.mean(0), d.mean()[0], atol=0.01), (s.mean(0).flatten(), d.mean()[0].flatten())
    cold = d.sample(temperature=0.1)
    assert cold.var(0).sum() < s.var(0).sum()


def _level_frequencies(samples: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    return torch.bincount(torch.round(samples.flatten() * levels).long(), minlength=levels + 1).double()


def _assert_matches_masses(counts: torch.Tensor, log_mass: torch.Tensor) -> None:
    """Sample counts per level against n·mass, bin by bin within 5 binomial standard errors (plus a count)."""
    n = counts.sum()
    mass = log_mass.double().exp()
    assert mass.sum().item() == pytest.approx(1.0, abs=1e-5)
    tolerance = 5 * (n * mass * (1 - mass)).sqrt() + 1.0
    assert ((counts - n * mass).abs() <= tolerance).all(), (counts, n * mass)


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_disc_mix_logistic_samples_follow_its_own_bin_masses(scale):
    """The sampler and the likelihood describe one distribution: the frequency of each 3-bit level among samples
    is the bin mass log_prob gives it (the clamped tails land in the end bins, which extend to ±∞)."""
    bits, m, n = 3, 3, 60_000
    params = torch.randn(1, DiscMixLogistic.num_params(1, m), 1, 1) * scale
    params[:, 2 * m :] = -1.0  # log-scales of about a bin: the masses spread over several levels
    counts = _level_frequencies(DiscMixLogistic(params.expand(n, -1, -1, -1), num_mix=m, num_bits=bits).sample(), bits)
    x = _all_levels(bits).view(-1, 1, 1, 1)
    log_mass = DiscMixLogistic(params.expand(len(x), -1, -1, -1), num_mix=m, num_bits=bits).log_prob(x).flatten()
    _assert_matches_masses(counts, log_mass)


@pytest.mark.parametrize("mu,log_sigma", [(0.4, -1.5), (0.95, -2.0), (0.1, -0.5)])
def test_disc_gaussian_samples_follow_its_own_bin_masses(mu, log_sigma):
    bits, n = 3, 60_000
    d = DiscGaussian(torch.full((n, 1, 1, 1), mu), torch.tensor(log_sigma), num_bits=bits)
    counts = _level_frequencies(d.sample(), bits)
    x = _all_levels(bits).view(-1, 1, 1, 1)
    log_mass = DiscGaussian(torch.full_like(x, mu), torch.tensor(log_sigma), num_bits=bits).log_prob(x).flatten()
    _assert_matches_masses(counts, log_mass)


def test_disc_mix_logistic_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="do not match num_mix=10"):
        DiscMixLogistic(torch.zeros(2, 31, 4, 4), num_mix=10)
    assert DiscMixLogistic.num_params(3, 10) == 100 and DiscMixLogistic.num_params(1, 10) == 30


@pytest.mark.parametrize("bits", [8, 5])
@pytest.mark.parametrize("mu,log_sigma", [(0.3, -2.0), (0.99, -7.0), (0.5, 3.0), (1.4, -3.0), (-0.2, -1.0)])
def test_disc_gaussian_sums_to_one_and_matches_cdf(bits, mu, log_sigma):
    x = _all_levels(bits).view(-1, 1, 1, 1)
    d = DiscGaussian(torch.full_like(x, mu), torch.tensor(log_sigma), num_bits=bits)
    lp = d.log_prob(x)
    assert torch.isfinite(lp).all()
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    levels = 2**bits - 1
    sigma = math.exp(log_sigma)
    edges = (torch.arange(levels + 2, dtype=torch.float64) - 0.5) / levels
    edges[0], edges[-1] = -math.inf, math.inf
    mass = torch.special.ndtr((edges[1:] - mu) / sigma) - torch.special.ndtr((edges[:-1] - mu) / sigma)
    big = mass > 1e-6
    assert torch.allclose(lp.flatten().double()[big], mass[big].log(), rtol=1e-3, atol=1e-4)


def test_bernoulli_log_prob_closed_form_and_sampling_frequencies():
    logits = torch.randn(2, 1, 3, 3) * 3
    x = torch.bernoulli(torch.full((2, 1, 3, 3), 0.5))
    p = torch.sigmoid(logits.double())
    expected = x * torch.log(p) + (1 - x) * torch.log1p(-p)
    d = Bernoulli(logits)
    assert torch.allclose(d.log_prob(x).double(), expected, atol=1e-5)
    assert torch.allclose(d.mean(), p.float())
    # Monte Carlo: the share of ones is p (5 standard errors), and t < 1 moves every pixel towards its mode
    n = 40_000
    many = Bernoulli(logits[:1].expand(n, -1, -1, -1))
    share = many.sample().double().mean(0)
    assert ((share - p[0]).abs() <= 5 * (p[0] * (1 - p[0]) / n).sqrt() + 1e-9).all()
    cold = many.sample(temperature=0.5).double().mean(0)
    p_cold = torch.sigmoid(2 * logits[0].double())  # the temperature divides the logits
    assert ((cold - p_cold).abs() <= 5 * (p_cold * (1 - p_cold) / n).sqrt() + 1e-9).all()


@pytest.mark.parametrize("grey", [0.5, 0.999, 1e-3])
def test_bernoulli_refuses_grey_levels_and_names_the_fix(grey):
    x = torch.bernoulli(torch.full((2, 1, 4, 4), 0.5))
    x[1, 0, 2, 3] = grey
    with pytest.raises(ValueError, match=r"1 of 32 values that are not 0 or 1.*data\.binarize=dynamic.*dml, gaussian"):
        Bernoulli(torch.zeros(2, 1, 4, 4)).log_prob(x)


def _sigma_vae_loss(sigma: float, sse: float, dims: int) -> float:
    return dims * math.log(sigma) + sse / (2 * sigma**2)


def test_optimal_sigma_minimises_the_gaussian_loss():
    x, mu = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    d = GaussianDecoder(mu, "optimal")
    lp = d.log_prob(x)
    sse, dims = ((x - mu) ** 2).sum().item(), x.numel()
    # σ*² is the MSE over the whole batch: the stationary point of D·ln σ + SSE/(2σ²)
    sigma_star = math.sqrt(sse / dims)
    best = _sigma_vae_loss(sigma_star, sse, dims)
    assert best <= _sigma_vae_loss(sigma_star * 1.1, sse, dims)
    assert best <= _sigma_vae_loss(sigma_star * 0.9, sse, dims)
    assert all(best <= _sigma_vae_loss(s, sse, dims) + 1e-9 for s in torch.logspace(-3, 1, 200).tolist())
    # the decoder uses one shared scalar, σ* through the soft clip min + softplus(log σ* − min)
    assert d.sigma.dim() == 0
    clipped = -6.0 + math.log1p(math.exp(math.log(sigma_star) + 6.0))
    assert d.log_sigma.item() == pytest.approx(clipped, abs=1e-6)
    sigma = d.sigma.item()
    assert sigma == pytest.approx(sigma_star, rel=1e-2)
    used = _sigma_vae_loss(sigma, sse, dims)
    assert used <= _sigma_vae_loss(sigma_star * 1.1, sse, dims)
    assert used <= _sigma_vae_loss(sigma_star * 0.9, sse, dims)
    # the full Gaussian log density, including the normalising constant
    assert -lp.sum().item() == pytest.approx(used + dims / 2 * math.log(2 * math.pi), rel=1e-5)
    assert d.batch_mse.item() == pytest.approx(sse / dims, rel=1e-6)


def test_optimal_sigma_without_fitting_scores_each_image_alone():
    """Evaluation (fit_sigma=False) scores with the given σ: an image's log-likelihood does not change with the
    other images of its batch, while the training fit (σ*² = batch MSE) does."""
    x, mu = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    other = torch.rand(4, 1, 8, 8)
    log_sigma = torch.tensor(-1.5)
    fixed = GaussianDecoder(mu, "optimal", log_sigma=log_sigma, fit_sigma=False)
    alone = GaussianDecoder(mu[:1], "optimal", log_sigma=log_sigma, fit_sigma=False)
    torch.testing.assert_close(fixed.log_prob(x)[:1], alone.log_prob(x[:1]))
    sigma = math.exp(-6 + math.log1p(math.exp(-1.5 + 6)))  # the usual soft clip, nothing fitted
    torch.testing.assert_close(fixed.log_prob(x), torch.distributions.Normal(mu, sigma).log_prob(x))
    assert fixed.batch_mse is None
    mixed = torch.cat([x[:1], other[1:]])
    fit_a, fit_b = GaussianDecoder(mu, "optimal"), GaussianDecoder(mu, "optimal")
    assert not torch.allclose(fit_a.log_prob(x)[:1], fit_b.log_prob(mixed)[:1])  # what evaluation must not do
    with pytest.raises(ValueError, match="fit_sigma=False\) needs log_sigma"):
        GaussianDecoder(mu, "optimal", fit_sigma=False)


def test_equivalent_beta_gives_the_beta_vae_gradient():
    """β = 2σ² is the KL weight under which a β-VAE with MSE-sum reconstruction, SSE + β·KL, has exactly 2σ² times
    the σ-VAE loss's gradient (−log N(x; μ, σ²I) + KL), so both reach the same optimum."""
    x = torch.rand(3, 1, 5, 5)
    theta = torch.randn(3, 1, 5, 5, requires_grad=True)
    for sigma in (0.07, 0.4, 1.0):
        mu = torch.sigmoid(theta)
        kl = (theta**2).sum() + 0.3 * theta.sum() ** 2  # any differentiable stand-in for the KL term
        d = GaussianDecoder(mu, "fixed", fixed_sigma=sigma)
        (g_sigma,) = torch.autograd.grad(-d.log_prob(x).sum() + kl, theta, retain_graph=True)
        (g_beta,) = torch.autograd.grad(((x - mu) ** 2).sum() + d.equivalent_beta * kl, theta)
        torch.testing.assert_close(g_beta, 2 * sigma**2 * g_sigma, rtol=1e-5, atol=1e-6)


def test_optimal_sigma_is_detached_and_gives_the_envelope_gradient():
    x = torch.rand(4, 1, 8, 8)
    mu = (x + 2.0 * torch.randn(4, 1, 8, 8)).requires_grad_(True)  # σ* ≈ 2: the soft clip is negligible here
    d = GaussianDecoder(mu, "optimal")
    (g_detached,) = torch.autograd.grad(d.log_prob(x).sum(), mu)
    assert not d.sigma.requires_grad
    assert torch.allclose(g_detached, (x - mu) / d.sigma**2, rtol=1e-5, atol=1e-7)
    # differentiating through σ* (−log p = (D/2)·ln MSE + const) gives the same gradient wrt μ
    mse = ((x - mu) ** 2).mean()
    (g_full,) = torch.autograd.grad(-(x.numel() / 2) * torch.log(mse), mu)
    assert torch.allclose(g_detached, g_full, rtol=1e-2, atol=1e-6)


def test_learned_and_fixed_sigma_modes():
    x, mu = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    log_sigma = torch.nn.Parameter(torch.tensor(-1.0))
    d = GaussianDecoder(mu, "learned", log_sigma=log_sigma)
    lp = d.log_prob(x)
    sigma = math.exp(-6 + math.log1p(math.exp(-1.0 + 6)))
    assert d.sigma.item() == pytest.approx(sigma, rel=1e-6)
    ref = torch.distributions.Normal(mu, sigma).log_prob(x)
    assert torch.allclose(lp, ref, atol=1e-5)
    lp.sum().backward()
    assert log_sigma.grad is not None and log_sigma.grad.abs() > 0
    f = GaussianDecoder(mu, "fixed", fixed_sigma=1.0)
    assert torch.allclose(f.log_prob(x), torch.distributions.Normal(mu, 1.0).log_prob(x), atol=1e-6)
    assert torch.equal(f.mean(), mu.clamp(0, 1))
    # Monte Carlo: away from the [0, 1] clamp a sample is μ + T·σ·ε
    centre = torch.full((20_000, 1, 1, 1), 0.5)
    s = GaussianDecoder(centre, "fixed", fixed_sigma=0.04).sample(temperature=0.5)
    assert s.mean().item() == pytest.approx(0.5, abs=5 * 0.02 / math.sqrt(20_000))
    assert s.std().item() == pytest.approx(0.02, rel=0.03)


def test_gaussian_decoder_errors_teach():
    mu = torch.rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="choose one of optimal, learned, fixed"):
        GaussianDecoder(mu, "optimum")
    with pytest.raises(ValueError, match="needs log_sigma"):
        GaussianDecoder(mu, "learned")
    with pytest.raises(RuntimeError, match="call log_prob first"):
        GaussianDecoder(mu, "optimal").sample()
    assert GaussianDecoder(mu, "optimal", log_sigma=torch.tensor(-2.0)).sample().shape == mu.shape


def test_discretized_gaussian_decoder_sums_to_one():
    x = _all_levels(8).view(-1, 1, 1, 1)
    d = GaussianDecoder(torch.full_like(x, 0.4), "fixed", fixed_sigma=0.1).discretized(8)
    assert d.log_prob(x).exp().sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "kind,cls", [("dml", DiscMixLogistic), ("bernoulli", Bernoulli), ("gaussian_optimal", GaussianDecoder),
                 ("gaussian_learned", GaussianDecoder), ("gaussian_fixed", GaussianDecoder)]
)
@pytest.mark.parametrize("channels", [1, 3])
def test_make_output_distribution(kind, cls, channels):
    p = output_channels(kind, channels, num_mix=10)
    assert p == ({1: 30, 3: 100}[channels] if kind == "dml" else channels)
    params = torch.randn(2, p, 4, 4)
    d = make_output_distribution(kind, params, num_channels=channels, num_mix=10, num_bits=8,
                                 log_sigma=torch.zeros(()))
    assert isinstance(d, cls)
    x = torch.rand(2, channels, 4, 4)
    lp = d.log_prob(torch.bernoulli(x) if kind == "bernoulli" else x)
    assert lp.shape == (2, channels, 4, 4) and torch.isfinite(lp).all()
    for out in (d.sample(), d.mean()):
        assert out.shape == (2, channels, 4, 4) and torch.isfinite(out).all()


def test_make_output_distribution_errors_name_the_fix():
    with pytest.raises(ValueError, match="choose one of dml, bernoulli"):
        output_channels("logistic", 3, 10)
    with pytest.raises(ValueError, match=r"output `output_channels\(...\)` = 100 channels"):
        make_output_distribution("dml", torch.zeros(1, 30, 4, 4), num_channels=3, num_mix=10, num_bits=8)


def test_half_precision_decoder_output_is_evaluated_in_fp32():
    params = torch.randn(2, 30, 4, 4)
    x = torch.rand(2, 1, 4, 4)
    full = DiscMixLogistic(params, num_mix=10).log_prob(x)
    half = DiscMixLogistic(params.bfloat16(), num_mix=10).log_prob(x)
    assert half.dtype == torch.float32
    assert torch.allclose(half, DiscMixLogistic(params.bfloat16().float(), num_mix=10).log_prob(x))
    assert full.dtype == torch.float32
    prior, post = Normal(torch.randn(5).bfloat16(), torch.randn(5).bfloat16()), Normal(torch.randn(5), torch.randn(5))
    assert post.kl(prior).dtype == torch.float32
