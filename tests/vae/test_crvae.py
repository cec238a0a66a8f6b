"""vae/crvae.py: the consistency KL and the per-image transformation presets (against torchvision)."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vae.crvae import TRANSFORM_PRESETS, adjust_hue, affine, consistency_kl, make_transform


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _digits_batch(n: int = 8) -> torch.Tensor:
    """Real images: scikit-learn's 8×8 digits upsampled to 16×16, in [0, 1] (B, 1, 16, 16)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1)


def test_consistency_kl_zero_for_identical_posteriors_positive_otherwise():
    mu, sigma = torch.randn(4, 3, 2, 2), torch.rand(4, 3, 2, 2) + 0.1
    kl = consistency_kl(mu, sigma, mu, sigma)
    assert kl.shape == (4,) and torch.allclose(kl, torch.zeros(4), atol=1e-6)
    assert (consistency_kl(mu + 0.1, sigma, mu, sigma) > 0).all()
    assert (consistency_kl(mu, sigma * 1.5, mu, sigma) > 0).all()


def test_consistency_kl_direction_is_transformed_first():
    mu_t, s_t = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, 2.0]])
    mu_x, s_x = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.5]])
    # KL(q(z|t(x)) ‖ q(z|x)) = Σ_d log(σ_x/σ_t) + (σ_t² + (μ_t − μ_x)²)/(2σ_x²) − ½
    expected = (torch.log(s_x / s_t) + (s_t**2 + (mu_t - mu_x) ** 2) / (2 * s_x**2) - 0.5).sum()
    reverse = (torch.log(s_t / s_x) + (s_x**2 + (mu_x - mu_t) ** 2) / (2 * s_t**2) - 0.5).sum()
    got = consistency_kl(mu_t, s_t, mu_x, s_x)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(got.item() - reverse.item()) > 1.0


def test_identity_returns_the_input():
    x = _digits_batch()
    assert make_transform("identity")(x) is x


@pytest.mark.parametrize("preset", [p for p in TRANSFORM_PRESETS if p != "identity"])
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_change_each_image_differently_and_keep_shape_and_range(preset, channels):
    one = _digits_batch(1)
    if channels == 3:
        one = torch.cat([one, one.flip(-1), 1 - one], dim=1)  # a colourful image so hue jitter matters
    x = one.expand(6, -1, -1, -1).contiguous()  # six copies of the same image
    out = make_transform(preset)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().flatten(1).amax(1).min() > 0.05  # every image changed
    diffs = [(out[i] - out[j]).abs().max().item() for i in range(6) for j in range(i + 1, 6)]
    assert min(diffs) > 1e-3  # and each one its own way


def test_transform_is_reproducible_with_a_generator():
    x = _digits_batch()
    t = make_transform("color")
    a = t(x, generator=torch.Generator().manual_seed(7))
    b = t(x, generator=torch.Generator().manual_seed(7))
    c = t(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_affine_matches_torchvision_image_by_image():
    x = torch.rand(4, 3, 16, 20)
    angle = torch.tensor([10.0, -25.0, 90.0, 3.0])
    shift = torch.tensor([[2.0, -1.0], [0.0, 3.0], [-1.5, 0.5], [0.3, 0.0]])
    scale = torch.tensor([1.1, 0.8, 1.0, 1.25])
    out = affine(x, angle, shift, scale)
    for i in range(4):
        ref = TF.affine(x[i], angle=float(angle[i]), translate=shift[i].tolist(), scale=float(scale[i]),
                        shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
        assert torch.allclose(out[i], ref, atol=1e-5), i
    flipped = affine(x, torch.zeros(4), torch.zeros(4, 2), torch.ones(4), torch.tensor([True, False, True, False]))
    assert torch.allclose(flipped[0], TF.vertical_flip(x[0]), atol=1e-5)
    assert torch.allclose(flipped[1], x[1], atol=1e-5)


def test_adjust_hue_matches_torchvision_image_by_image():
    x = torch.rand(3, 3, 8, 8)
    x[2, :, :2] = 0.5  # grey pixels have no hue
    hue = torch.tensor([0.1, -0.2, 0.45])
    out = adjust_hue(x, hue)
    for i in range(3):
        assert torch.allclose(out[i], TF.adjust_hue(x[i], float(hue[i])), atol=1e-5), i


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of identity, simple, large, flip, color"):
        make_transform("colour")


def test_transform_rejects_a_non_batch():
    with pytest.raises(ValueError, match=r"expected a float batch \(B, C, H, W\)"):
        make_transform("simple")(torch.rand(1, 16, 16))


def test_binary_batches_stay_binary_and_follow_the_warp():
    """Dynamically binarised digits go through CR's affine warp as binary images (a Bernoulli decoder scores t(x)):
    the output is the thresholded bilinear warp, so it still moves with the transformation."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 1, 16, 16, generator=g) < 0.4).float()
    x[:, :, :3] = 1.0  # a bar at the top that rotation and translation move
    out = make_transform("large")(x, generator=torch.Generator().manual_seed(1))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    grey = make_transform("large")(x * 0.999, generator=torch.Generator().manual_seed(1))
    assert ((grey > 0) & (grey < 1)).any()  # grey batches keep the bilinear values
    # The warp is linear, so the grey run scaled back is the binary run's warp before its threshold.
    assert (out == (grey / 0.999 > 0.5).float()).float().mean() > 0.999
    assert (out != x).float().mean() > 0.05  # every image moved
