"""vae/factor_metrics.py: DCI on codes with known structure, NMI/ARI, OoD AUROC and PSNR in closed form."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from vae.factor_metrics import clustering_scores, dci, dci_from_importances, ood_auroc, psnr


@pytest.fixture
def factors() -> np.ndarray:
    """2000 examples of 5 independent uniform factors (x, y, size, angle, intensity, say)."""
    return np.random.default_rng(0).uniform(size=(2000, 5))


# ---------------------------------------------------------------------------------------------------------------------
# DCI


def test_dci_of_importance_matrices_in_closed_form():
    assert dci_from_importances(np.eye(4)) == pytest.approx((1.0, 1.0))
    assert dci_from_importances(np.ones((4, 4))) == pytest.approx((0.0, 0.0), abs=1e-12)
    # one code explains both factors: each factor is fully explained by one code (complete), but that code is not
    # disentangled (uniform over 2 factors → entropy 1 in base 2); the unused code has weight ρ = 0
    d, c = dci_from_importances(np.array([[1.0, 1.0], [0.0, 0.0]]))
    assert d == pytest.approx(0.0, abs=1e-12) and c == pytest.approx(1.0)
    # two codes share factor 1, a third holds factor 2: every code is disentangled; factor 1 is split over 2 of 3
    # codes, C_1 = 1 − log 2/log 3, and C_2 = 1
    d, c = dci_from_importances(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert d == pytest.approx(1.0) and c == pytest.approx((2.0 - math.log(2) / math.log(3)) / 2)


def test_a_perfect_code_with_nuisance_codes_scores_near_one_and_a_rotated_code_does_not():
    """5 factors (one a 4-way class) read off 5 codes, plus 3 codes of pure noise: every factor lives in one code and
    every informative code holds one factor, so D = C = 1 up to the forests' noise. With a random subset of codes
    per split (the classifier's √D default) the same code scored D 0.92, C 0.90: importance leaked to the noise."""
    rng = np.random.default_rng(1)
    n = 2000
    factors = rng.uniform(size=(n, 5))
    factors[:, 0] = rng.integers(0, 4, n)
    perfect = np.concatenate([factors[:, rng.permutation(5)], rng.normal(size=(n, 3))], axis=1)  # D = 8, K = 5
    start = time.perf_counter()
    scores = dci(perfect, factors, discrete_factors=[0])
    elapsed = time.perf_counter() - start
    assert scores["disentanglement"] > 0.97  # measured 1.000
    assert scores["completeness"] > 0.97  # measured 1.000
    assert scores["informativeness"] > 0.95
    assert elapsed < 20.0  # ~1.6 s measured on 1 core
    standard = (perfect - perfect.mean(0)) / perfect.std(0)
    rotated = dci(standard @ np.linalg.qr(rng.normal(size=(8, 8)))[0], factors, discrete_factors=[0])
    assert rotated["disentanglement"] < 0.5 and rotated["completeness"] < 0.5  # measured 0.24, 0.25
    assert rotated["informativeness"] > 0.7  # the information is all there, only mixed


def test_dci_leaks_no_importance_to_a_nuisance_code_in_a_single_split():
    """Depth-1 forests: each tree makes one split, which must always use the informative code. The nuisance code's
    Gini importance is then exactly 0 (any split on it would score lower on every bootstrap sample)."""
    rng = np.random.default_rng(2)
    n = 3000
    factors = rng.integers(0, 2, size=(n, 2)).astype(float)
    codes = np.concatenate([factors, rng.normal(size=(n, 6))], axis=1)
    scores = dci(codes, factors, discrete_factors=[0, 1], depths=(1,))
    assert scores["disentanglement"] == pytest.approx(1.0, abs=1e-9)
    assert scores["completeness"] == pytest.approx(1.0, abs=1e-9)


def test_dci_is_low_for_random_codes(factors):
    codes = np.random.default_rng(2).normal(size=(2000, 10))
    scores = dci(codes, factors)
    assert scores["disentanglement"] < 0.2  # measured 0.10
    assert scores["completeness"] < 0.2
    assert scores["informativeness"] < 0.05


def test_dci_separates_disentanglement_from_informativeness(factors):
    """A rotation of the factors keeps all the information but mixes every code over every factor."""
    rotation = np.linalg.qr(np.random.default_rng(3).normal(size=(5, 5)))[0]
    rotated = dci(factors @ rotation, factors)
    aligned = dci(factors, factors)
    assert rotated["informativeness"] > 0.9
    assert rotated["disentanglement"] < aligned["disentanglement"] - 0.4
    assert rotated["completeness"] < aligned["completeness"] - 0.4


def test_informativeness_falls_as_codes_get_noisier(factors):
    rng = np.random.default_rng(4)
    noise = rng.normal(size=factors.shape)
    info = [dci(factors + s * noise, factors)["informativeness"] for s in (0.0, 0.1, 0.3, 1.0)]
    assert info[0] > info[1] > info[2] > info[3]
    # for a single code c = v + s·n with v ~ U(0, 1), the best R² is at most Var v / (Var v + s²) = 1/(1 + 12 s²)
    assert info[3] < 1.0 / (1.0 + 12.0) + 0.05


def test_discrete_factors_are_classified():
    rng = np.random.default_rng(5)
    shape = rng.integers(0, 3, size=1500)  # a class factor, e.g. square / ellipse / heart
    scale = rng.uniform(size=1500)
    factors = np.stack([shape, scale], axis=1).astype(float)
    codes = np.stack([shape + 0.05 * rng.normal(size=1500), scale, rng.normal(size=1500)], axis=1)
    scores = dci(codes, factors, discrete_factors=[0])
    assert scores["informativeness"] > 0.95  # accuracy on the class factor, R² on the scale
    assert scores["disentanglement"] > 0.97
    with pytest.raises(ValueError, match="factor indices"):
        dci(codes, factors, discrete_factors=[True, False])
    with pytest.raises(ValueError, match="factor indices"):
        dci(codes, factors, discrete_factors=[2])


def test_dci_refuses_bad_input_with_the_fix(factors):
    with pytest.raises(ValueError, match="one code per example"):
        dci(factors[:100], factors)
    with pytest.raises(ValueError, match=">= 2 factors"):
        dci(factors, factors[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        dci(np.full_like(factors, np.nan), factors)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        dci(factors[:, 0], factors)


def test_dci_accepts_tensors_and_is_deterministic(factors):
    a = dci(torch.tensor(factors[:, ::-1].copy()), torch.tensor(factors), seed=7)
    b = dci(factors[:, ::-1], factors, seed=7)
    assert a == b


# ---------------------------------------------------------------------------------------------------------------------
# Clustering, AUROC, PSNR


def test_clustering_scores_are_one_for_a_relabelled_perfect_clustering_and_near_zero_for_random():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 5, size=2000)
    relabel = np.array([3, 0, 4, 1, 2])
    assert clustering_scores(relabel[labels], labels) == pytest.approx({"nmi": 1.0, "ari": 1.0})
    random = clustering_scores(rng.integers(0, 10, size=2000), labels)
    assert abs(random["ari"]) < 0.02 and random["nmi"] < 0.02
    half = labels.copy()
    half[:1000] = rng.integers(0, 5, size=1000)  # half the points reassigned at random
    partial = clustering_scores(torch.tensor(half), torch.tensor(labels))
    assert 0.2 < partial["ari"] < 0.8 and 0.2 < partial["nmi"] < 0.8
    with pytest.raises(ValueError, match="equal length"):
        clustering_scores(labels[:10], labels)


def test_ood_auroc_cases():
    rng = np.random.default_rng(7)
    s_in = rng.normal(size=500)
    assert ood_auroc(s_in, s_in + 100.0) == 1.0  # every OoD score above every in-distribution score
    assert ood_auroc(s_in + 100.0, s_in) == 0.0
    assert ood_auroc(s_in, s_in.copy()) == 0.5  # identical scores: all ties
    # two unit Gaussians a distance δ apart: AUROC = Φ(δ/√2)
    s_out = rng.normal(size=20000) + 1.0
    s_in = rng.normal(size=20000)
    assert ood_auroc(s_in, s_out) == pytest.approx(0.5 * (1 + math.erf(1.0 / 2.0)), abs=0.01)
    with pytest.raises(ValueError, match="both sets"):
        ood_auroc([], [1.0])


def test_psnr_closed_form():
    x = torch.rand(3, 1, 8, 8) * 0.5
    offsets = torch.tensor([0.1, 0.01, 0.3]).view(3, 1, 1, 1)
    got = psnr(x, x + offsets)  # MSE = δ², PSNR = −20·log10 δ
    assert got.shape == (3,)
    assert torch.allclose(got, torch.tensor([20.0, 40.0, -20 * math.log10(0.3)]), atol=1e-3)
    assert torch.isinf(psnr(x, x)).all()
    noisy = psnr(x, x + 0.05 * torch.randn_like(x))
    assert ((noisy > 23) & (noisy < 29)).all()  # σ = 0.05 → ≈ 26 dB
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:2])
