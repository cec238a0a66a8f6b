"""vae/regularizers.py: KL warm-up and balancing rules, the SR schedule, spectral norms by power iteration."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vae.regularizers import (
    SpectralRegularizer,
    balanced_kl,
    batchnorm_penalty,
    kl_balance_alphas,
    kl_coefficient,
    sr_coefficient,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_kl_coefficient_endpoints_and_linearity():
    total = 10_000  # c = 1 step, A = 3000 steps
    assert kl_coefficient(0, total) == 1e-4
    assert kl_coefficient(1, total) == 1e-4
    assert kl_coefficient(3001, total) == 1.0
    assert kl_coefficient(total, total) == 1.0
    for t in (301, 1501, 2701):
        assert kl_coefficient(t, total) == pytest.approx((t - 1) / 3000)
    # equal steps give equal increments while annealing
    b = [kl_coefficient(t, total) for t in (1000, 1500, 2000)]
    assert b[1] - b[0] == pytest.approx(b[2] - b[1])
    assert kl_coefficient(0, total, min_coeff=0.05) == 0.05
    with pytest.raises(ValueError, match="total_steps=0"):
        kl_coefficient(0, 0)


def test_sr_coefficient_constant_and_annealed_endpoints():
    assert sr_coefficient(0, 1000, lam=1e-2) == 1e-2
    assert sr_coefficient(999, 1000, lam=1e-2) == 1e-2
    start = sr_coefficient(0, 1000, lam=1e-2, anneal=True, lam_init=10.0)
    assert start == pytest.approx(10.0, rel=1e-3)
    assert sr_coefficient(1000, 1000, lam=1e-2, anneal=True, lam_init=10.0) == pytest.approx(1e-2, rel=1e-12)
    # half-way through the warm-up (β = 0.5) λ is the geometric mean: the schedule is linear in log λ
    t_half = 1000 * (1e-4 + 0.15)
    assert sr_coefficient(t_half, 1000, lam=1e-2, anneal=True, lam_init=10.0) == pytest.approx(
        math.sqrt(1e-2 * 10.0), rel=1e-6
    )
    with pytest.raises(ValueError, match="must be > 0"):
        sr_coefficient(0, 1000, lam=0.0)


def test_kl_balance_alphas_square_rule_and_order():
    # decoder order: 4x4 scale with 2 groups, then 8x8 with 3 groups, then 16x16 with 1 group
    alphas = kl_balance_alphas([2, 3, 1], [4, 8, 16])
    raw = [1 / 2] * 2 + [4 / 3] * 3 + [16 / 1]
    expected = torch.tensor(raw) / min(raw)
    assert torch.allclose(alphas, expected)
    assert alphas.min() == 1.0
    # NVAE's adaptive groups (finest scale 10, then 5), listed smallest first
    assert torch.allclose(kl_balance_alphas([5, 10], [8, 16]), torch.tensor([1.0] * 5 + [2.0] * 10))
    with pytest.raises(ValueError, match="smallest resolution first"):
        kl_balance_alphas([10, 5], [16, 8])
    with pytest.raises(ValueError, match="equal length"):
        kl_balance_alphas([2, 2], [4])


def test_balanced_kl_follows_the_rule_while_warming_up():
    kl = torch.rand(16, 5) * torch.tensor([0.0, 0.1, 1.0, 5.0, 20.0])
    kl.requires_grad_(True)
    alphas = kl_balance_alphas([2, 3], [4, 8])
    term, gammas = balanced_kl(kl, alphas, beta=0.3, balance=True)
    assert gammas.mean().item() == pytest.approx(1.0)
    assert not gammas.requires_grad
    # γ·α / (mean|KL| + 0.01) is the same for every group
    ratio = gammas * alphas / (kl.detach().abs().mean(0) + 0.01)
    assert torch.allclose(ratio, ratio[0].expand(5), rtol=1e-5)
    assert torch.allclose(term, 0.3 * (kl * gammas).sum(1))
    term.sum().backward()  # γ is a constant: dterm/dKL_l = β·γ_l
    assert torch.allclose(kl.grad, 0.3 * gammas.expand(16, 5))
    # a collapsed group (KL ≈ 0) is weighted less than an active one with the same α
    assert gammas[0] < gammas[1]


@pytest.mark.parametrize("beta,balance", [(1.0, True), (0.3, False), (1.0, False)])
def test_balanced_kl_is_plain_when_off(beta, balance):
    kl = torch.rand(8, 4)
    term, gammas = balanced_kl(kl, torch.tensor([1.0, 2.0, 4.0, 4.0]), beta=beta, balance=balance)
    assert torch.equal(gammas, torch.ones(4))
    assert torch.allclose(term, beta * kl.sum(1))


def test_balanced_kl_rejects_mismatched_alphas():
    with pytest.raises(ValueError, match="build alphas with kl_balance_alphas"):
        balanced_kl(torch.rand(8, 4), torch.ones(3), beta=0.5, balance=True)


SHAPES = [
    torch.Size([8, 4, 3, 3]),
    torch.Size([8, 4, 3, 3]),  # same shape: shares a batched group with the first
    torch.Size([16, 8, 1, 1]),
    torch.Size([6, 36]),  # same matrix view (6 × 36) as the next conv: grouped with it
    torch.Size([6, 4, 3, 3]),
    torch.Size([3, 20]),
]


def _reference(weights):
    return sum(torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1).double(), ord=2) for w in weights)


def test_spectral_regularizer_matches_the_largest_singular_values():
    weights = [torch.randn(s, requires_grad=True) for s in SHAPES]
    sr = SpectralRegularizer(SHAPES)
    assert len(sr.matrix_shapes) == 4
    value = sr(weights)  # the first call runs the 40 init iterations
    assert bool(sr.initialized)
    assert value.item() == pytest.approx(_reference(weights).item(), rel=1e-3)
    # later calls track slowly changing weights with 4 iterations each
    with torch.no_grad():
        for w in weights:
            w.mul_(1.0 + 0.01 * torch.randn_like(w))
    for _ in range(5):
        value = sr(weights)
    assert value.item() == pytest.approx(_reference(weights).item(), rel=1e-3)


def test_spectral_regularizer_gradient_is_the_spectral_norm_gradient():
    weights = [torch.randn(s, requires_grad=True) for s in SHAPES]
    sr = SpectralRegularizer(SHAPES, n_init_iterations=200)
    sr(weights).backward()
    for w in weights:
        w2 = w.detach().clone().requires_grad_(True)
        torch.linalg.matrix_norm(w2.reshape(w2.shape[0], -1), ord=2).backward()
        assert torch.allclose(w.grad, w2.grad, atol=1e-3), tuple(w.shape)


def test_spectral_regularizer_state_dict_round_trip_resumes_exactly():
    weights = [torch.randn(s) for s in SHAPES]
    sr = SpectralRegularizer(SHAPES)
    sr(weights)
    state = {k: v.clone() for k, v in sr.state_dict().items()}
    assert {"initialized", "u0", "v0", "u3", "v3"} <= set(state)
    torch.manual_seed(123)  # a fresh module starts from other random vectors
    resumed = SpectralRegularizer(SHAPES)
    assert not bool(resumed.initialized)
    resumed.load_state_dict(state)
    assert bool(resumed.initialized)
    moved = [w + 0.1 * torch.randn_like(w) for w in weights]
    assert torch.equal(sr(moved), resumed(moved))
    for k, v in sr.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_spectral_regularizer_rejects_other_weights():
    sr = SpectralRegularizer(SHAPES[:2])
    with pytest.raises(ValueError, match="same order, as at construction"):
        sr([torch.randn(SHAPES[2]), torch.randn(SHAPES[0])])
    with pytest.raises(ValueError, match="no matrix view"):
        SpectralRegularizer([torch.Size([8])])


def test_batchnorm_penalty_sums_max_abs_gamma_of_affine_norms():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(36, affine=False),
                        nn.Linear(36, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.1]))
        net[5].weight.copy_(torch.tensor([0.3, 0.2, -0.7]))
    penalty = batchnorm_penalty(net)
    assert penalty.item() == pytest.approx(2.0 + 0.7)
    penalty.backward()
    assert net[1].weight.grad.tolist() == [0.0, -1.0, 0.0, 0.0]
    assert batchnorm_penalty(nn.Linear(3, 3)).item() == 0.0


def _einsum_power_iteration(weights, u, v, n_iter):
    """The textbook batched power iteration, written independently of the module: v ← Wᵀu/‖·‖, u ← Wv/‖·‖, σ = uᵀWv."""
    w = torch.stack([x.reshape(x.shape[0], -1) for x in weights]).double()
    u, v = u.double(), v.double()
    for _ in range(n_iter):
        v = torch.nn.functional.normalize(torch.einsum("gij,gi->gj", w, u), dim=1)
        u = torch.nn.functional.normalize(torch.einsum("gij,gj->gi", w, v), dim=1)
    return u, v, torch.einsum("gi,gij,gj->g", u, w, v)


def test_batched_power_iteration_follows_the_textbook_iterates():
    """Same start, same number of iterations: the module's u, v and σ are the textbook iteration's, and after the long
    first run σ is the largest singular value."""
    weights = [torch.randn(s) for s in SHAPES]
    sr = SpectralRegularizer(SHAPES, n_power_iterations=3, n_init_iterations=300)
    starts = [(sr.get_buffer(f"u{g}").clone(), sr.get_buffer(f"v{g}").clone()) for g in range(len(sr.matrix_shapes))]
    total = sr(weights)
    expected_total = 0.0
    for g, (u0, v0) in enumerate(starts):
        members = [weights[i] for i in sr.members[g]]
        u, v, sigma = _einsum_power_iteration(members, u0, v0, 300)
        torch.testing.assert_close(sr.get_buffer(f"u{g}").double(), u, atol=1e-5, rtol=0)
        torch.testing.assert_close(sr.get_buffer(f"v{g}").double(), v, atol=1e-5, rtol=0)
        exact = torch.stack([torch.linalg.matrix_norm(m.reshape(m.shape[0], -1).double(), ord=2) for m in members])
        torch.testing.assert_close(sigma, exact, rtol=1e-5, atol=0)
        expected_total += sigma.sum().item()
    assert total.item() == pytest.approx(expected_total, rel=1e-6)
    starts = [(sr.get_buffer(f"u{g}").clone(), sr.get_buffer(f"v{g}").clone()) for g in range(len(sr.matrix_shapes))]
    moved = [w + 0.05 * torch.randn_like(w) for w in weights]
    total = sr(moved)  # warm: 3 iterations from the kept vectors
    expected = sum(_einsum_power_iteration([moved[i] for i in sr.members[g]], u0, v0, 3)[2].sum().item()
                   for g, (u0, v0) in enumerate(starts))
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_nvae_penalty_on_the_forward_kernels_equals_the_penalty_on_recomputed_ones():
    """The training forward hands the spectral penalty the kernels it convolved with; loss and every gradient equal
    those of the penalty on kernels normalised again after the forward, and the BN term equals Σ max|γ| layer by
    layer. No kernel stays kept after the step."""
    import copy

    from vae import NVAE, NVAEConfig
    from vae.layers import Conv2d

    model = NVAE(NVAEConfig.preset("tiny", num_nf=1, lambda_sr=0.5)).train()
    with torch.no_grad():  # BN scales apart from 1, so the max picks one channel per layer
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    reference = copy.deepcopy(model)
    x = torch.rand(4, 1, 16, 16)
    torch.manual_seed(1)
    out = model(x)
    out.loss.backward()
    torch.manual_seed(1)
    expected = reference._forward(x, [])  # the kernels recomputed by sr_weights() after the forward
    expected.loss.backward()
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert out.stats["sr_loss"].item() == pytest.approx(expected.stats["sr_loss"].item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    layer_by_layer = sum(m.weight.abs().max() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert out.stats["bn_loss"].item() == pytest.approx(layer_by_layer.item(), rel=1e-6)
    assert all(m.kept_weight is None and not m.keep_weight for m in model.modules() if isinstance(m, Conv2d))
