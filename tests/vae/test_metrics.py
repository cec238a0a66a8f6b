"""vae.metrics against closed forms: a linear-Gaussian VAE whose log p(x) and ELBO are known exactly, designed latent
codes for active units, Gaussian feature sets for the Fréchet distance and precision/recall; and, marked slow, the
likelihood bounds of a tiny NVAE trained on scikit-learn's digits."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _tiny import digits_16, train_tiny
from torch import Tensor, nn

from vae import metrics

LOG_2PI = math.log(2.0 * math.pi)


def _mvn_logpdf(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


class LinearGaussianVAE(nn.Module):
    """p(z) = N(0, I_d), p(x|z) = N(Wz + b, s²I_D), and a deliberately imperfect encoder q(z|x) = N(0.9·m(x), 1.5·v)
    where N(m(x), Σ) is the exact posterior and v = diag Σ. Then log p(x) = log N(x; b, WWᵀ + s²I) and
    ELBO(x) = log p(x) − KL(q(z|x) ‖ p(z|x)) in closed form. float64 throughout."""

    def __init__(self, d: int = 4, dim_x: int = 8, s: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(dim_x, d, generator=g, dtype=torch.float64))
        self.register_buffer("b", torch.randn(dim_x, generator=g, dtype=torch.float64))
        self.s, self.d = s, d
        post_cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + self.w.T @ self.w / s**2)
        self.register_buffer("post_cov", post_cov)
        self.register_buffer("post_map", post_cov @ self.w.T / s**2)  # m(x) = post_map·(x − b)
        self.register_buffer("q_var", 1.5 * torch.diagonal(post_cov))
        self.rows_seen: list[int] = []
        self.modes_seen: list[bool] = []

    def marginal_cov(self) -> Tensor:
        return self.w @ self.w.T + self.s**2 * torch.eye(len(self.b), dtype=torch.float64)

    def sample_x(self, n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        chol = torch.linalg.cholesky(self.marginal_cov())
        return self.b + torch.randn(n, len(self.b), generator=g, dtype=torch.float64) @ chol.T

    def log_px(self, x: Tensor) -> Tensor:
        return _mvn_logpdf(x, self.b, self.marginal_cov())

    def _exact_posterior_mean(self, x: Tensor) -> Tensor:
        return (x - self.b) @ self.post_map.T

    def _q_mean(self, x: Tensor) -> Tensor:
        return 0.9 * self._exact_posterior_mean(x)

    def elbo(self, x: Tensor) -> Tensor:
        """log p(x) − KL(N(q_mean, diag q_var) ‖ N(m(x), Σ)), exactly."""
        prec = torch.linalg.inv(self.post_cov)
        diff = self._exact_posterior_mean(x) - self._q_mean(x)
        kl = 0.5 * (
            torch.trace(prec @ torch.diag(self.q_var))
            + ((diff @ prec) * diff).sum(1)
            - self.d
            + torch.logdet(self.post_cov)
            - torch.log(self.q_var).sum()
        )
        return self.log_px(x) - kl

    def log_weights(self, x: Tensor) -> Tensor:
        self.rows_seen.append(len(x))
        self.modes_seen.append(self.training)
        mean, std = self._q_mean(x), self.q_var.sqrt()
        eps = torch.randn_like(mean)
        z = mean + std * eps
        log_q = (-0.5 * eps**2 - torch.log(std) - 0.5 * LOG_2PI).sum(1)
        log_pz = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(1)
        resid = x - z @ self.w.T - self.b
        log_px_z = (-0.5 * (resid / self.s) ** 2 - math.log(self.s) - 0.5 * LOG_2PI).sum(1)
        return log_px_z + log_pz - log_q

    def forward(self, x: Tensor) -> SimpleNamespace:
        return SimpleNamespace(nelbo=-self.log_weights(x))  # single-sample, as a VAE's training forward

    def posterior_means(self, x: Tensor) -> list[Tensor]:
        return [self._q_mean(x).reshape(len(x), self.d, 1, 1)]


@pytest.fixture(scope="module")
def toy() -> LinearGaussianVAE:
    return LinearGaussianVAE()


def test_bits_per_dim_converts_nats():
    assert metrics.bits_per_dim(math.log(2.0) * 784, 784) == pytest.approx(1.0)
    nll = torch.tensor([3072 * math.log(2.0) * 2.9, 0.0])
    assert torch.allclose(metrics.bits_per_dim(nll, 3 * 32 * 32), torch.tensor([2.9, 0.0]))
    with pytest.raises(ValueError, match="num_dims"):
        metrics.bits_per_dim(1.0, 0)


def test_iw_nll_matches_closed_form_log_px(toy):
    torch.manual_seed(0)
    x = toy.sample_x(64, seed=1)
    true_nll = -toy.log_px(x)
    gap = (toy.log_px(x) - toy.elbo(x)).mean().item()
    assert gap > 1.0  # the encoder is loose enough that only a real importance-weighted estimate closes the gap
    nll = metrics.importance_weighted_nll(toy, x, k=4000)
    assert nll.shape == (64,) and nll.dtype == torch.float64
    err = nll - true_nll
    assert err.abs().max().item() < 0.15, err
    assert abs(err.mean().item()) < 0.02  # the bias, O(Var w / K), and the MC noise averaged over 64 examples


def test_iw_nll_ragged_chunks_and_exact_layout(toy):
    x = toy.sample_x(16, seed=2)
    # One pass of K copies must give exactly the manual reference: rows c·B..c·B+B−1 are copy c of the batch.
    torch.manual_seed(3)
    ref_w = toy.log_weights(x.repeat(50, 1)).reshape(50, 16)
    ref = -(torch.logsumexp(ref_w, 0) - math.log(50))
    torch.manual_seed(3)
    assert torch.allclose(metrics.importance_weighted_nll(toy, x, k=50, chunk_size=50), ref)
    # A ragged last chunk (2000 = 285·7 + 5) still estimates log p(x).
    torch.manual_seed(4)
    nll = metrics.importance_weighted_nll(toy, x, k=2000, chunk_size=7)
    assert (nll + toy.log_px(x)).abs().max().item() < 0.15


def test_iw_nll_chunk_size_follows_memory_budget(toy):
    x = toy.sample_x(8, seed=5)
    row_bytes = x[0].numel() * x.element_size()  # the toy has no submodules: a row costs just its input
    toy.rows_seen.clear()
    metrics.importance_weighted_nll(toy, x, k=95, memory_budget=10 * 8 * row_bytes)
    assert toy.rows_seen[1:] == [80] * 9 + [40]  # after the probe: chunks of 10 copies, the last one of 5
    toy.rows_seen.clear()
    metrics.importance_weighted_nll(toy, x, k=95, memory_budget=1)
    assert toy.rows_seen[1:] == [8] * 95  # a budget below one copy still runs, one copy per pass


class WithActivations(LinearGaussianVAE):
    """The toy plus one layer whose (B, 120) float64 output stands for a network's activations: 960 bytes per row."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 120, dtype=torch.float64)

    def log_weights(self, x: Tensor) -> Tensor:
        return super().log_weights(x) + 0.0 * self.hidden(x).sum(1)


def test_iw_nll_chunk_size_counts_module_activations_on_cpu():
    model = WithActivations()
    x = model.sample_x(8, seed=5)
    per_row = 120 * 8 + 8 * 8  # the hidden layer's output row plus the input row
    metrics.importance_weighted_nll(model, x, k=30, memory_budget=7 * 8 * per_row + 100)
    assert model.rows_seen == [4] + [56] * 4 + [16]  # a probe of 4 rows, then chunks of 7 copies


def test_iw_nll_is_below_nelbo_and_tightens_with_k(toy):
    torch.manual_seed(6)
    x = toy.sample_x(512, seed=7)
    true_nelbo = -toy.elbo(x).mean().item()
    assert metrics.negative_elbo(toy, x.split(100)) == pytest.approx(true_nelbo, abs=0.1)
    ks = (1, 3, 10, 100, 1000)
    means = [metrics.importance_weighted_nll(toy, x, k=k).mean().item() for k in ks]
    assert means[0] == pytest.approx(true_nelbo, abs=0.1)  # K = 1 is the single-sample ELBO
    # Up to K = 100 each step gains ≥ 0.07 nats, well above the ≤ 0.02 MC noise of a mean over 512 examples; from
    # 100 to 1000 the expected gain (~0.01) is within the noise, so only "not worse" is asserted there.
    assert all(later < earlier for earlier, later in zip(means[:4], means[1:4])), means
    assert means[4] < means[3] + 0.01
    assert means[4] < true_nelbo - 1.0
    assert means[-1] > -toy.log_px(x).mean().item() - 0.02  # still a bound on the true NLL


def test_evaluation_runs_in_eval_mode_and_restores_training(toy):
    toy.train()
    toy.modes_seen.clear()
    metrics.negative_elbo(toy, [toy.sample_x(4, seed=8)])
    metrics.importance_weighted_nll(toy, toy.sample_x(4, seed=8), k=3)
    assert toy.modes_seen and not any(toy.modes_seen)
    assert toy.training


def test_iw_nll_rejects_bad_arguments(toy):
    x = toy.sample_x(2, seed=9)
    with pytest.raises(ValueError, match="k=0"):
        metrics.importance_weighted_nll(toy, x, k=0)
    with pytest.raises(TypeError, match="x.float\\(\\) / 255"):
        metrics.importance_weighted_nll(toy, (x * 255).to(torch.uint8), k=2)
    with pytest.raises(ValueError, match="no examples"):
        metrics.mean_importance_weighted_nll(toy, [], k=2)


class DesignedCodes(nn.Module):
    """Two latent groups whose posterior means are fixed scalings of the input's first 7 coordinates (+ a large offset,
    which the variance must ignore): unit variances are known exactly."""

    SCALES = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.01, 0.0, 0.3], dtype=torch.float64)  # var 1, .25, .04, ...

    def posterior_means(self, x: Tensor) -> list[Tensor]:
        codes = 1e4 + x[:, :7] * self.SCALES
        return [codes[:, :3].reshape(-1, 3, 1, 1), codes[:, 3:].reshape(-1, 1, 2, 2)]


def test_active_units_counts_informative_units():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1000, 7, generator=g, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0, unbiased=False)  # unit population variance exactly
    count, variance = metrics.active_units(DesignedCodes(), x.split(143))  # ragged batches
    assert count == 4  # units with variance 1, .25, .04 and .09 pass 0.01; 0.0025, 1e-4 and 0 do not
    assert torch.allclose(variance, DesignedCodes.SCALES**2, atol=1e-6)
    assert metrics.active_units(DesignedCodes(), x.split(500), threshold=0.05)[0] == 3
    with pytest.raises(ValueError, match="at least 2 examples"):
        metrics.active_units(DesignedCodes(), [x[:1]])


def test_posterior_mean_features_flatten_groups_and_keep_labels(toy):
    x = toy.sample_x(30, seed=11)
    y = torch.arange(30) % 3
    features, labels = metrics.posterior_mean_features(toy, zip(x.split(7), y.split(7)))
    assert features.shape == (30, 4) and features.dtype == torch.float32
    assert torch.equal(labels, y)
    assert torch.allclose(features.double(), toy._q_mean(x), atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        metrics.posterior_mean_features(toy, [x])


def test_linear_probe_separable_vs_noise():
    from sklearn.datasets import load_digits, make_blobs

    feats, y = make_blobs(n_samples=600, centers=3, n_features=5, cluster_std=0.5, center_box=(-20, 20), random_state=0)
    assert metrics.linear_probe_accuracy(feats[:300], y[:300], feats[300:], y[300:]) > 0.99
    rng = np.random.default_rng(0)
    noise, labels = rng.normal(size=(3000, 20)), rng.integers(0, 5, size=3000)
    acc = metrics.linear_probe_accuracy(noise[:1000], labels[:1000], noise[1000:], labels[1000:])
    assert abs(acc - 0.2) < 0.04  # chance for 5 classes; 2000 test points give a standard error of 0.009
    digits = load_digits()
    x, y = digits.data, digits.target
    assert metrics.linear_probe_accuracy(x[:1200], y[:1200], x[1200:], y[1200:]) > 0.9  # multi-class, raw pixels
    with pytest.raises(ValueError, match="single class"):
        metrics.linear_probe_accuracy(noise[:10], np.zeros(10), noise[10:20], np.zeros(10))


def _with_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n points whose sample mean and unbiased sample covariance are exactly `mean` and `cov`."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: sample covariance I
    return mean + z @ np.linalg.cholesky(cov).T


def test_fid_zero_for_identical_sets_and_closed_form():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(12)
    f = rng.normal(size=(500, 6))
    assert metrics.fid_from_features(f, f) < 1e-8
    assert metrics.fid_from_features(f, f[::-1]) < 1e-8  # a set, not a sequence
    # Diagonal covariances commute: d² = ‖μ₁ − μ₂‖² + Σ (σ₁ − σ₂)².
    mu1, mu2 = np.zeros(3), np.array([1.0, -2.0, 0.5])
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])
    f1 = _with_moments(400, mu1, np.diag(sd1**2), seed=13)
    f2 = _with_moments(300, mu2, np.diag(sd2**2), seed=14)
    expected = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    assert metrics.fid_from_features(torch.from_numpy(f1), f2) == pytest.approx(expected, rel=1e-9)
    # General covariances: the scipy.linalg.sqrtm formula.
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((m1 - m2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * sqrtm(cov1 @ cov2).real)
    got = metrics.fid_from_features(_with_moments(200, m1, cov1, 15), _with_moments(200, m2, cov2, 16))
    assert got == pytest.approx(expected, rel=1e-8)
    # Fewer samples than dimensions: rank-deficient covariances still give a finite, non-negative real number.
    assert 0.0 < metrics.fid_from_features(rng.normal(size=(10, 30)), rng.normal(size=(12, 30)) + 1.0) < 1e3


def test_fid_monte_carlo_two_gaussians():
    rng = np.random.default_rng(17)
    f1 = rng.normal(0.0, 1.0, size=(20000, 2))
    f2 = rng.normal(1.0, 2.0, size=(20000, 2))
    assert metrics.fid_from_features(f1, f2) == pytest.approx(2 * 1.0 + 2 * 1.0, abs=0.1)  # d² = Σ (Δμ² + Δσ²)


def test_precision_recall_same_disjoint_and_collapsed():
    rng = np.random.default_rng(18)
    real = rng.normal(size=(1500, 8))
    precision, recall = metrics.precision_recall(real, rng.normal(size=(1500, 8)))
    assert precision > 0.85 and recall > 0.85
    assert metrics.precision_recall(real, rng.normal(size=(1500, 8)) + 10.0) == (0.0, 0.0)
    # Mode collapse: every fake sample lies where real data lives, but covers little of it.
    precision, recall = metrics.precision_recall(real, 0.1 * rng.normal(size=(1500, 8)), chunk_rows=256)
    assert precision > 0.99 and recall < 0.1
    with pytest.raises(ValueError, match="k=3"):
        metrics.precision_recall(real[:3], real[:3])


def test_sample_grid_shapes_dtype_and_values():
    images = torch.rand(10, 1, 16, 12)
    images[0] = 1.0
    grid = metrics.sample_grid(images, nrow=4)
    assert grid.dtype == torch.uint8 and grid.shape == (1, 3 * 18 + 2, 4 * 14 + 2)
    assert (grid[0, 2:18, 2:14] == 255).all()  # first image, full intensity
    assert torch.equal(grid[0, 2 + 18 : 18 + 18, 2:14], (images[4, 0] * 255).round().to(torch.uint8))  # row 2, col 1
    assert metrics.sample_grid(torch.rand(3, 3, 8, 8), nrow=8).shape == (3, 12, 3 * 10 + 2)
    assert metrics.sample_grid(torch.rand(1, 3, 8, 8)).shape == (3, 12, 12)  # a lone image keeps its border
    assert metrics.sample_grid(torch.full((2, 1, 4, 4), 2.0)).max() == 255  # out-of-range samples are clamped
    with pytest.raises(ValueError, match="1 or 3"):
        metrics.sample_grid(torch.rand(2, 2, 8, 8))


def test_reconstruction_grid_puts_each_original_left_of_its_reconstruction():
    x, x_hat = torch.zeros(5, 1, 8, 8), torch.ones(5, 1, 8, 8)
    grid = metrics.reconstruction_grid(x, x_hat, pairs_per_row=2)
    assert grid.dtype == torch.uint8 and grid.shape == (1, 3 * 10 + 2, 4 * 10 + 2)
    assert (grid[0, 2:10, 2:10] == 0).all() and (grid[0, 2:10, 12:20] == 255).all()
    assert (grid[0, 22:30, 2:10] == 0).all() and (grid[0, 22:30, 12:20] == 255).all()  # pair 5 starts row 3
    with pytest.raises(ValueError, match="same shape"):
        metrics.reconstruction_grid(x, x_hat[:4])


# ---------------------------------------------------------------------------------------------------------------------
# On the NVAE itself.


def _reference_posterior_mean_decoding(model, x: Tensor) -> Tensor:
    # NVAE's own deterministic path through the posterior means (private, used only as the reference here).
    _, state, _ = model._posterior_path(model.encode(x), use_mean=True)
    return model.output_distribution(model.decode(state)).mean()


def test_latent_traversal_on_nvae_grid_and_zero_offset_is_the_reconstruction():
    from vae.nvae import NVAE, NVAEConfig

    torch.manual_seed(19)
    model = NVAE(NVAEConfig.preset("tiny", decoder="bernoulli")).eval()
    x = digits_16()[0][:1]
    grid = metrics.latent_traversal(model, x, group=1, channels=[0, 3], values=[-2.0, 0.0, 2.0])
    assert grid.dtype == torch.uint8 and grid.shape == (1, 2 * 18 + 2, 3 * 18 + 2)
    with torch.no_grad():
        expected = metrics.sample_grid(_reference_posterior_mean_decoding(model, x))[:, 2:18, 2:18]
    for row in range(2):  # the middle column (offset 0) of every row is the posterior-mean reconstruction
        assert torch.equal(grid[:, 2 + 18 * row : 18 + 18 * row, 20:36], expected)
    assert not torch.equal(grid[:, 2:18, 2:18], grid[:, 2:18, 20:36])  # a shifted latent changes the image
    assert model.training is False
    with pytest.raises(ValueError, match="groups 0..3"):
        metrics.latent_traversal(model, x, group=4, channels=[0], values=[0.0])
    with pytest.raises(ValueError, match="channels \\[7\\]"):
        metrics.latent_traversal(model, x, group=0, channels=[7], values=[0.0])
    with pytest.raises(ValueError, match="one image"):
        metrics.latent_traversal(model, digits_16()[0][:2], group=0, channels=[0], values=[0.0])


def test_iw_nll_on_an_untrained_nvae_is_finite_and_bounded_by_its_nelbo():
    from vae.nvae import NVAE, NVAEConfig

    torch.manual_seed(20)
    model = NVAE(NVAEConfig.preset("tiny", decoder="dml"))
    x = digits_16()[0][:8]
    nll = metrics.importance_weighted_nll(model, x, k=20)
    assert nll.shape == (8,) and torch.isfinite(nll).all()
    assert model.training  # restored
    assert nll.mean().item() < metrics.negative_elbo(model, [x])


DECODERS = ("dml", "bernoulli", "gaussian_optimal", "gaussian_learned", "gaussian_fixed")


def _scored_data(decoder: str, x: Tensor) -> Tensor:
    """What each decoder scores: the Bernoulli decoder models binary pixels, so its digits are one draw of
    x ~ Bernoulli(grey level) with a fixed seed; the others see the grey levels."""
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(0)) if decoder == "bernoulli" else x


def _assert_iw_nll_ignores_the_rest_of_the_batch(model: nn.Module, x: Tensor, k: int) -> Tensor:
    """Image 0 scored in a batch of 8 different digits and in a batch of 8 copies of itself (i.e. with nothing else
    to see): the same shapes under the same seed draw the same noise for row 0, so its IW-NLL must agree to float
    precision unless some statistic is shared across the batch (a σ* refitted on the K·B rows did exactly that)."""
    mixed = x[:8]
    alone = x[:1].expand(8, -1, -1, -1).contiguous()
    torch.manual_seed(31)
    nll_mixed = metrics.importance_weighted_nll(model, mixed, k=k, chunk_size=k)
    torch.manual_seed(31)
    nll_alone = metrics.importance_weighted_nll(model, alone, k=k, chunk_size=k)
    torch.testing.assert_close(nll_mixed[0], nll_alone[0], rtol=1e-6, atol=1e-4)
    assert nll_alone.std() > 0  # the copies drew different noise: the comparison above is not vacuous
    return nll_mixed


@pytest.mark.parametrize("decoder", DECODERS)
def test_iw_nll_of_an_image_does_not_depend_on_its_batch(decoder):
    from vae.nvae import NVAE, NVAEConfig

    torch.manual_seed(40)
    model = NVAE(NVAEConfig.preset("tiny", decoder=decoder, lambda_sr=0.0, num_channels_enc=8, num_channels_dec=8))
    x = _scored_data(decoder, digits_16()[0][:8])
    with torch.no_grad():
        model(x)  # one training forward, so that the σ-VAE decoder has a running σ estimate
    _assert_iw_nll_ignores_the_rest_of_the_batch(model, x, k=4)


@pytest.fixture(scope="module", params=DECODERS)
def trained_per_decoder(request):
    """The tiny preset at 8 channels with each decoder, 40 Adamax steps on the first 1500 digits (the Bernoulli
    decoder on a fixed binarisation of them, the fixed-σ decoder at σ = 0.1); the last 297 are the test split."""
    decoder = request.param
    x = _scored_data(decoder, digits_16()[0])
    model = train_tiny(x, n_train=1500, steps=40, seed=41, decoder=decoder, lambda_sr=0.0, num_channels_enc=8,
                       num_channels_dec=8, fixed_sigma=0.1)
    return decoder, model, x[1500:]


@pytest.mark.slow
def test_trained_decoders_give_batch_independent_non_negative_bits_per_dim(trained_per_decoder):
    """Every decoder's bits/dim is a discrete likelihood per scored pixel, so ≥ 0 for every test image (the σ-VAE's
    continuous density reached about −1.2 bits/dim on these digits after 60 steps); and a trained σ-VAE scores each
    image with its running σ, not with one refitted to the batch."""
    decoder, model, x_test = trained_per_decoder
    nll = _assert_iw_nll_ignores_the_rest_of_the_batch(model, x_test, k=10)
    torch.manual_seed(42)
    nll = torch.cat([nll, metrics.importance_weighted_nll(model, x_test[8:64], k=10, chunk_size=10)])
    bpd = metrics.bits_per_dim(nll, model.scored_dims)
    with torch.no_grad():
        out = model(x_test[:64])
    continuous = out.stats.get("nelbo_continuous")
    print(f"{decoder}: IW-NLL (K=10) {bpd.mean().item():.3f} bits/dim, min {bpd.min().item():.3f}"
          + (f"; continuous NELBO {metrics.bits_per_dim(continuous.item(), model.scored_dims):.3f} bits/dim"
             if continuous is not None else ""))
    assert (bpd >= 0).all() and torch.isfinite(bpd).all()
    assert bpd.mean() < 8.0  # better than a uniform 8-bit model: the decoders learned something in 40 steps


@pytest.fixture(scope="module")
def trained_tiny_nvae():
    """The tiny preset with a Bernoulli decoder, 200 Adamax steps (batch 32, NVAE's optimiser settings) on the first
    1500 digits, binarised once with a fixed seed; the last 297 are the test split."""
    x, y = digits_16()
    x = _scored_data("bernoulli", x)
    model = train_tiny(x, n_train=1500, steps=200, seed=21, decoder="bernoulli")
    return model, (x[:1500], y[:1500]), (x[1500:], y[1500:])


@pytest.mark.slow
def test_trained_nvae_iw_nll_below_nelbo_and_tightens_with_k(trained_tiny_nvae):
    model, _, (x_test, _) = trained_tiny_nvae
    batches = x_test[:128].split(64)
    torch.manual_seed(23)
    nelbo = metrics.negative_elbo(model, batches)
    iw = {k: metrics.mean_importance_weighted_nll(model, batches, k=k) for k in (1, 10, 100)}
    assert iw[1] == pytest.approx(nelbo, abs=1.0)  # both single-sample ELBO estimates
    assert iw[100] < iw[10] < iw[1]
    assert iw[100] < nelbo - 1.0  # the IW bound is strictly tighter, by a few nats on digits
    bpd = metrics.bits_per_dim(iw[100], model.scored_dims)
    assert 0.05 < bpd < 0.8  # one Bernoulli draw of the 16×16 digits: measured 0.55 bits/dim (97 nats) at 200 steps


@pytest.mark.slow
def test_trained_nvae_latents_are_used_and_linearly_informative(trained_tiny_nvae):
    model, (x_train, y_train), (x_test, y_test) = trained_tiny_nvae
    count, variance = metrics.active_units(model, x_test.split(100))
    total = sum(math.prod(shape) for shape in model.latent_shapes)
    assert variance.shape == (total,) and 0 < count <= total
    f_train, l_train = metrics.posterior_mean_features(model, zip(x_train.split(250), y_train.split(250)))
    f_test, l_test = metrics.posterior_mean_features(model, [(x_test, y_test)])
    assert f_train.shape == (1500, total)
    assert metrics.linear_probe_accuracy(f_train, l_train, f_test, l_test) > 0.6  # chance is 0.1
