"""Regions: images split into four quadrants whose brightness varies independently, a factor set made offline.

In the spirit of 3D Shapes' floor, wall and object colours, every factor is a visible, linear and non-circular
property of a fixed part of the image: quadrant k (top-left, top-right, bottom-left, bottom-right) is filled with the
grey level 0.1 + 0.8·v_k, v_k ~ U(0, 1) independently. A code that reads each v_k off one latent dimension is
perfectly disentangled, and D = C = 1 is reachable: no factor hides another, none wraps round, none is a few pixels.
With `rgb` each quadrant keeps its own fixed tint (red, green, blue, yellow) and only its brightness varies.

The label is the brightest quadrant (argmax_k v_k, four classes): holding one class out of training (e.g.
`tune.ood_class: 3`) leaves an out-of-distribution set from the same domain, images whose bottom-right quadrant
outshines the others.

    images, labels, factors = make_regions(10_000, image_size=16, seed=0)  # well under a second
"""
from __future__ import annotations

import numpy as np

REGIONS = ("top_left", "top_right", "bottom_left", "bottom_right")
FACTOR_RANGES: dict[str, tuple[float, float]] = {name: (0.0, 1.0) for name in REGIONS}
LABELS = tuple(f"{name}_brightest" for name in REGIONS)
LOW, SPAN = 0.1, 0.8  # grey level = LOW + SPAN·v: never pure black or white, so every value stays visible
TINTS = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.4, 1.0], [1.0, 1.0, 0.2]], dtype=np.float32)


def factor_names() -> tuple[str, ...]:
    return REGIONS


def sample_factors(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` rows of four independent U(0, 1) brightness factors; (n, 4) float32. Prefix-stable in n for one seed."""
    return rng.random((n, len(REGIONS))).astype(np.float32)


def render(factors: np.ndarray, image_size: int, rgb: bool = False) -> np.ndarray:
    """(n, 4) factors → (n, C, S, S) uint8, C = 3 if rgb else 1. Quadrant k covers rows/columns of its half."""
    if image_size < 2 or image_size % 2:
        raise ValueError(f"regions: image_size {image_size} must be even (four equal quadrants); use 8, 16 or 32")
    n, h = len(factors), image_size // 2
    level = LOW + SPAN * factors.astype(np.float32)  # (n, 4)
    colours = level[:, :, None] * (TINTS[None] if rgb else np.ones((1, 4, 1), dtype=np.float32))  # (n, 4, C)
    out = np.empty((n, colours.shape[2], image_size, image_size), dtype=np.uint8)
    values = np.rint(colours * 255.0).astype(np.uint8)
    for k, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, r * h:(r + 1) * h, c * h:(c + 1) * h] = values[:, k, :, None, None]
    return out


def make_regions(
    n: int, image_size: int = 16, rgb: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` images (n, C, S, S) uint8, labels (n,) int64 (the brightest quadrant), factors (n, 4) float32.

    Deterministic in `seed`; a larger `n` with the same seed extends the smaller set.
    """
    factors = sample_factors(n, np.random.default_rng(seed))
    return render(factors, image_size, rgb), factors.argmax(axis=1).astype(np.int64), factors
