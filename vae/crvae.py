"""Consistency regularisation for VAEs (CR-VAE; Sinha & Dieng, NeurIPS 2021, Eq. 3).

For a random semantics-preserving transformation t, the objective adds to ELBO(x) + ELBO(t(x)) the penalty
−λ·KL(q(z|t(x)) ‖ q(z|x)): the posterior of the *transformed* input is the first argument. For diagonal Gaussians
KL = Σ_d [log(σ_x/σ_t) + (σ_t² + (μ_t − μ_x)²)/(2σ_x²) − ½].

The transformation presets follow the paper's code (torchvision affine, vertical flip, colour jitter). A torchvision
v2 transform draws one set of parameters per call, i.e. one transformation for a whole batch; CR needs one per
image, so the same operations are applied here batched with per-image parameters: one `affine_grid`/`grid_sample`
for rotation, translation, scale and flip, and elementwise brightness, contrast and hue. `affine` and `adjust_hue`
match torchvision.transforms.v2.functional's `affine` (bilinear) and `adjust_hue` image by image (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from vae.configs import TRANSFORM_PRESETS
from vae.distributions import gaussian_kl



def consistency_kl(mu_t: Tensor, sigma_t: Tensor, mu_x: Tensor, sigma_x: Tensor) -> Tensor:
    """Σ over all non-batch dims of KL(q(z|t(x)) ‖ q(z|x)) -> (B,). Arguments: posterior of t(x) first, then of x."""
    return gaussian_kl(mu_t, sigma_t, mu_x, sigma_x).flatten(1).sum(dim=1)


def affine(x: Tensor, angle: Tensor, translate: Tensor, scale: Tensor, vflip: Tensor | None = None) -> Tensor:
    """Per-image affine warp about the image centre, bilinear, zero fill.

    x (B, C, H, W); angle (B,) degrees in torchvision's sense (positive turns the content clockwise); translate
    (B, 2) pixels (right, down); scale (B,); vflip (B,) bool: flip vertically before the rest. Equals torchvision's
    `affine(img, angle, translate, scale, shear=0, interpolation=BILINEAR)` image by image.
    """
    b, _, h, w = x.shape
    rad = angle.to(x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    flip = torch.ones_like(cos) if vflip is None else 1.0 - 2.0 * vflip.to(x.dtype)
    s = scale.to(x.dtype)
    # Forward map in pixel coordinates (y down): p' = s·R·diag(1, flip)·p + t, with R turning clockwise on screen.
    # affine_grid wants the inverse map from output to input in normalised coordinates (−1..1 across each side).
    inv = torch.stack(
        [
            torch.stack([cos / s, sin / s], dim=1),
            torch.stack([-flip * sin / s, flip * cos / s], dim=1),
        ],
        dim=1,
    )  # (B, 2, 2) = (s·R·diag(1, flip))⁻¹
    to_norm = torch.tensor([2.0 / w, 2.0 / h], dtype=x.dtype, device=x.device)
    lin = inv * to_norm.view(1, 2, 1) / to_norm.view(1, 1, 2)  # D⁻¹·A⁻¹·D with D = diag(w/2, h/2)
    shift = -(inv @ translate.to(x.dtype).unsqueeze(-1)).squeeze(-1) * to_norm  # −D⁻¹·A⁻¹·t
    theta = torch.cat([lin, shift.unsqueeze(-1)], dim=2)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    hr = torch.remainder((g - b) / safe, 6.0)
    hg = (b - r) / safe + 2.0
    hb = (r - g) / safe + 4.0
    hue = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    return torch.stack([hue, s, maxc], dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(dim=1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6.0).long()
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    # The six sectors of the hue circle, each an (r, g, b) choice among v, p, q, t.
    table = torch.stack(
        [torch.stack(c, dim=1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], dim=1
    )  # (B, 6, 3, H, W)
    index = i.unsqueeze(1).unsqueeze(1).expand(-1, 1, 3, -1, -1)
    return table.gather(1, index).squeeze(1)


def adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate the hue of each RGB image x (B, 3, H, W) in [0, 1] by hue (B,) turns in [−0.5, 0.5]."""
    hsv = _rgb_to_hsv(x)
    shifted = torch.remainder(hsv[:, 0] + hue.to(x.dtype).view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack([shifted, hsv[:, 1], hsv[:, 2]], dim=1))


@dataclass(frozen=True)
class BatchTransform:
    """A random transformation drawn independently for every image of a batch.

    Calls map x (B, C, H, W) in [0, 1] to the same shape and range. Order: colour jitter (brightness, contrast, hue;
    torchvision randomises this order, a fixed one changes nothing that matters here), then the affine warp, so the
    area uncovered by the warp stays black as in torchvision. A binary batch (every value 0 or 1, e.g. dynamically
    binarised MNIST) stays binary: the warped image is thresholded at 1/2, so t(x) is data a Bernoulli decoder can
    score.
    """

    preset: str
    degrees: float = 0.0
    translate: float = 0.0  # fraction of the side, like torchvision's RandomAffine(translate=...)
    scale: tuple[float, float] = (1.0, 1.0)
    vflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    hue: float = 0.0

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(
                f"transform {self.preset!r}: expected a float batch (B, C, H, W) in [0, 1], got {x.dtype} of shape "
                f"{tuple(x.shape)}"
            )
        if self.preset == "identity":
            return x
        binary = bool(((x == 0) | (x == 1)).all())
        b, c, h, w = x.shape

        def uniform(lo: float, hi: float, *shape: int) -> Tensor:
            return lo + (hi - lo) * torch.rand(b, *shape, generator=generator, device=x.device, dtype=x.dtype)

        if self.brightness > 0:
            x = (x * uniform(1 - self.brightness, 1 + self.brightness).view(b, 1, 1, 1)).clamp(0.0, 1.0)
        if self.contrast > 0:
            factor = uniform(1 - self.contrast, 1 + self.contrast).view(b, 1, 1, 1)
            gray = TF.rgb_to_grayscale(x) if c == 3 else x.mean(dim=1, keepdim=True)
            x = (factor * x + (1 - factor) * gray.mean(dim=(1, 2, 3), keepdim=True)).clamp(0.0, 1.0)
        if self.hue > 0 and c == 3:
            x = adjust_hue(x, uniform(-self.hue, self.hue))
        angle = uniform(-self.degrees, self.degrees)
        shift = uniform(-self.translate, self.translate, 2) * torch.tensor([w, h], dtype=x.dtype, device=x.device)
        scale = uniform(*self.scale)
        flip = torch.rand(b, generator=generator, device=x.device) < 0.5 if self.vflip else None
        out = affine(x, angle, shift, scale, flip).clamp(0.0, 1.0)
        return (out > 0.5).to(out.dtype) if binary else out


_PRESETS = {
    "identity": BatchTransform("identity"),
    "simple": BatchTransform("simple", degrees=15.0, translate=0.05, scale=(0.9, 1.1)),
    "large": BatchTransform("large", degrees=30.0, translate=0.1, scale=(0.75, 1.25)),
    "flip": BatchTransform("flip", degrees=15.0, translate=0.05, scale=(0.9, 1.1), vflip=True),
    # On 1-channel images the hue jitter is a no-op: only brightness and contrast apply.
    "color": BatchTransform(
        "color", degrees=15.0, translate=0.05, scale=(0.9, 1.1), brightness=0.2, contrast=0.5, hue=0.2
    ),
}


def make_transform(preset: str) -> BatchTransform:
    """The CR-VAE transformation `preset`, one of TRANSFORM_PRESETS: "simple" (rotation ±15°, translation ±5 %, scale
    0.9–1.1), "large" (±30°, ±10 %, 0.75–1.25), "flip" (simple + vertical flip with p = 0.5), "color" (simple +
    brightness 0.2, contrast 0.5, hue 0.2), "identity"."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown transform preset {preset!r}; choose one of {', '.join(TRANSFORM_PRESETS)}")
    return _PRESETS[preset]
