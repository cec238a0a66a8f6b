"""Procedural sprites with known generative factors, made offline with numpy (a dSprites-like test set).

Each image holds one antialiased sprite on black: a square, an ellipse, a heart or a triangle, with a scale, a
rotation, a position and (for the RGB variant) a hue, all drawn independently and uniformly. The factors are the
ground truth for disentanglement metrics, and the shape class is the label.

Every shape is a signed distance function in sprite-local units (the sprite fits the unit circle), so a pixel's
coverage is simply `clip(0.5 - distance_in_pixels, 0, 1)`: antialiased edges at any image size without
supersampling, and whole chunks of images render with a handful of array operations.

    images, labels, factors = make_shapes(50_000, image_size=64, rgb=True, seed=0)  # a few seconds
"""
from __future__ import annotations

import math

import numpy as np

SHAPES = ("square", "ellipse", "heart", "triangle")

# Rotation covers an eighth of a turn. The square repeats every quarter turn (the triangle every third, the ellipse
# every half): over a quarter turn a square at 0 and one at π/2 are the same image, so the factor wrapped round and
# no code could be read off it. Over [0, π/4] every shape is distinct at every angle and the factor has two ends.
FACTOR_RANGES: dict[str, tuple[float, float]] = {
    "shape": (0.0, float(len(SHAPES) - 1)),
    "scale": (0.6, 1.0),
    "rotation": (0.0, math.pi / 4),
    "pos_x": (0.0, 1.0),
    "pos_y": (0.0, 1.0),
    "hue": (0.0, 1.0),
}

# The sprite's radius in pixels is scale * image_size * _RADIUS; the centre stays far enough from the border that
# the largest sprite is never clipped, so position and scale are independent factors. At 16×16 a sprite spans 6 to
# 10 px across (it was 4 to 8 with radius 0.25 and scales from 0.5: shape and rotation were hardly visible).
_RADIUS = 0.3
# Images rendered per numpy pass: bounds memory (a few float32 arrays of chunk * size^2) and keeps arrays in cache.
_CHUNK = 512

# Heart: a diamond (square turned 45 degrees) with two circles on its upper edges; these constants fit it in the
# unit circle and centre it vertically.
_HEART_H = 0.74
_HEART_Y0 = 0.1035 * _HEART_H


def factor_names(rgb: bool) -> tuple[str, ...]:
    names = ("shape", "scale", "rotation", "pos_x", "pos_y")
    return names + ("hue",) if rgb else names


def sample_factors(n: int, rng: np.random.Generator, rgb: bool = False) -> np.ndarray:
    """Draw `n` factor vectors, independent and uniform over FACTOR_RANGES; (n, F) float32.

    Rows are drawn one after another, so a longer draw with the same seed starts with the shorter one.
    """
    names = factor_names(rgb)
    u = rng.random((n, len(names)))
    out = np.empty((n, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        lo, hi = FACTOR_RANGES[name]
        if name == "shape":
            out[:, j] = np.minimum(np.floor(u[:, j] * len(SHAPES)), len(SHAPES) - 1)
        else:
            out[:, j] = lo + u[:, j] * (hi - lo)
    return out


def _sdf_square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Chebyshev distance: exact along the edges, which is all the antialiasing needs.
    return np.maximum(np.abs(x), np.abs(y)) - 1.0 / math.sqrt(2.0)


def _sdf_ellipse(x: np.ndarray, y: np.ndarray, a: float = 1.0, b: float = 0.6) -> np.ndarray:
    # First-order distance to the level set k = 1 of k = |(x/a, y/b)|: (k - 1) / |grad k|. |grad k| only depends on
    # the direction and lies in [1/a, 1/b]; clipping to that range also defines it at the centre.
    k = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    grad = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2) / np.maximum(k, 1e-6)
    return (k - 1.0) / np.clip(grad, 1.0 / a, 1.0 / b)


def _sdf_triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Equilateral, circumradius 1 (inradius 1/2), a vertex pointing up (image y grows downwards).
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    d = y  # bottom edge's outward normal is (0, 1)
    d = np.maximum(d, -c * x - s * y)
    d = np.maximum(d, c * x - s * y)
    return d - 0.5


def _sdf_heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h, y0 = _HEART_H, _HEART_Y0
    yy = y - y0
    diamond = np.maximum(np.abs(x + yy), np.abs(x - yy)) / math.sqrt(2.0) - h / math.sqrt(2.0)
    r = h / math.sqrt(2.0)
    cy = yy + h / 2  # circle centres at (+-h/2, y0 - h/2): midpoints of the diamond's upper edges
    left = np.sqrt((x + h / 2) ** 2 + cy**2) - r
    right = np.sqrt((x - h / 2) ** 2 + cy**2) - r
    return np.minimum(diamond, np.minimum(left, right))


_SDF = (_sdf_square, _sdf_ellipse, _sdf_heart, _sdf_triangle)


def _hue_to_rgb(hue: np.ndarray) -> np.ndarray:
    """Fully saturated, full-value colours for hues in [0, 1); (n, 3) float32 in [0, 1]."""
    k = (hue[:, None] * 6.0 + np.array([5.0, 3.0, 1.0])) % 6.0
    return (1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def render(factors: np.ndarray, image_size: int, rgb: bool = False) -> np.ndarray:
    """Draw one sprite per factor row; (n, F) float32 → (n, C, S, S) uint8 with C = 3 if rgb else 1."""
    n = len(factors)
    out = np.zeros((n, 3 if rgb else 1, image_size, image_size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        f = factors[start : start + _CHUNK]
        coverage = _coverage(f, image_size)  # (m, S, S) in [0, 1]
        if rgb:
            colour = _hue_to_rgb(f[:, 5]) * 255.0  # (m, 3)
            out[start : start + len(f)] = np.rint(coverage[:, None] * colour[:, :, None, None])
        else:
            out[start : start + len(f), 0] = np.rint(coverage * 255.0)
    return out


def _coverage(f: np.ndarray, size: int) -> np.ndarray:
    shape = f[:, 0].astype(np.int64)
    radius = (f[:, 1] * size * _RADIUS).astype(np.float32)
    lo = size * _RADIUS + 1.0  # centre range keeps the largest sprite (and its soft edge) inside the image
    cx = (lo + f[:, 3] * (size - 2 * lo)).astype(np.float32)
    cy = (lo + f[:, 4] * (size - 2 * lo)).astype(np.float32)
    cos, sin = np.cos(f[:, 2]).astype(np.float32), np.sin(f[:, 2]).astype(np.float32)
    px = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    coverage = np.empty((len(f), size, size), dtype=np.float32)
    for k, sdf in enumerate(_SDF):
        idx = np.flatnonzero(shape == k)
        if idx.size == 0:
            continue
        r = radius[idx, None, None]
        dx = (px[None, None, :] - cx[idx, None, None]) / r  # (m, 1, S)
        dy = (px[None, :, None] - cy[idx, None, None]) / r  # (m, S, 1)
        c, s = cos[idx, None, None], sin[idx, None, None]
        # Rotate pixels by -rotation into the sprite's frame.
        u = dx * c + dy * s
        v = dy * c - dx * s
        dist_px = sdf(u, v) * r
        coverage[idx] = np.clip(0.5 - dist_px, 0.0, 1.0)
    return coverage


def make_shapes(
    n: int, image_size: int = 64, rgb: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` sprites: images (n, C, S, S) uint8, labels (n,) int64 (the shape class), factors (n, F) float32.

    Deterministic in `seed`; a larger `n` with the same seed extends the smaller set.
    """
    if image_size < 4:
        raise ValueError(f"image_size {image_size} is too small for a sprite; use 4 or more (e.g. 16, 32 or 64)")
    rng = np.random.default_rng(seed)
    factors = sample_factors(n, rng, rgb)
    images = render(factors, image_size, rgb)
    return images, factors[:, 0].astype(np.int64), factors
