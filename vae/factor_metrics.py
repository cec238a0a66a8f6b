"""Metrics of learned representations against ground truth: DCI, clustering agreement, OoD AUROC, PSNR.

- DCI (Eastwood & Williams, "A Framework for the Quantitative Evaluation of Disentangled Representations", ICLR 2018),
  as GWAE evaluates it (vaetc's random forests of 10 trees, depth chosen from {2, 4, 8, 12}, Gini importances).
  One forest per factor k predicts v_k from the codes c; R_dk = importance of code d for factor k. Every split
  considers every code (max_features=None): with a random subset of codes per split (scikit-learn's classifier
  default, √D) a split often cannot use the one informative code and takes an unrelated one instead, which spreads
  importance onto nuisance codes; a perfect code of 5 factors with 3 nuisance codes then scored D 0.92 and C 0.90.
    P_dk = R_dk / Σ_k' R_dk'        D_d = 1 − H_K(P_d·),  H_K the entropy in base K
    disentanglement = Σ_d ρ_d·D_d,  ρ_d = Σ_k R_dk / Σ_dk R_dk
    P̃_dk = R_dk / Σ_d' R_d'k        C_k = 1 − H_D(P̃_·k),  completeness = mean_k C_k
    informativeness = mean_k of the held-out score: R² clipped to [0, 1] for continuous factors (1 − NMSE, so 0 is
    "no better than the mean"), accuracy for discrete ones.
  The data are split 60/20/20: forests are fitted on the first part, the depth is chosen on the second, and the
  chosen forest's importances and its score on the third (never seen in fitting or selection) are reported.
- Clustering: normalised mutual information (arithmetic mean normaliser) and adjusted Rand index
  (Hubert & Arabie, 1985) between cluster assignments and labels; both are invariant to relabelling.
- OoD: AUROC of a score where higher means more out-of-distribution (in = negative class, out = positive class).
- PSNR = 10·log10(1 / MSE) per image, for data in [0, 1].
- Collapse: an autoencoder whose reconstructions do not depend on its input (their spread across inputs near zero,
  or a PSNR no better than the mean image's), or whose samples have no variety, is collapsed, whatever its other
  scores say (a collapsed model's critic can still separate anything from its one output image).

scikit-learn is imported inside the functions that need it, so importing `vae` stays light.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray | Sequence


def _as_array(name: str, values: ArrayLike, ndim: int) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        shape = "(N, D)" if ndim == 2 else "(N,)"
        raise ValueError(f"{name}: expected an array of shape {shape}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or inf; pass finite values")
    return array


def _entropy(p: np.ndarray, base: int, axis: int) -> np.ndarray:
    """Entropy of the distributions along `axis` in base `base`, with 0·log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=axis) / np.log(base)


def dci_from_importances(importance: np.ndarray) -> tuple[float, float]:
    """(disentanglement, completeness) of an importance matrix R (D codes, K factors) of non-negative entries."""
    r = np.abs(np.asarray(importance, dtype=np.float64))
    d, k = r.shape
    if d < 2 or k < 2:
        raise ValueError(
            f"DCI needs >= 2 code dimensions and >= 2 factors (entropies in base D and K), got {d} and {k}"
        )
    total = r.sum()
    if total <= 0:
        return 0.0, 0.0
    per_code = r.sum(axis=1)  # (D,)
    p_code = r / np.where(per_code > 0, per_code, 1.0)[:, None]
    disentanglement = float(((1.0 - _entropy(p_code, k, axis=1)) * per_code / total).sum())
    per_factor = r.sum(axis=0)  # (K,)
    p_factor = r / np.where(per_factor > 0, per_factor, 1.0)[None, :]
    completeness_k = np.where(per_factor > 0, 1.0 - _entropy(p_factor, d, axis=0), 0.0)
    return disentanglement, float(completeness_k.mean())


# A factor whose values are this few whole numbers is a class, which DCI classifies rather than regresses.
MAX_DISCRETE_VALUES = 16


def discrete_factors(factors: ArrayLike) -> tuple[int, ...]:
    """Columns of `factors` (N, K) with at most MAX_DISCRETE_VALUES distinct whole-number values (e.g. a shape
    class): the `discrete_factors` argument of `dci`."""
    factors = np.asarray(factors)
    columns = (np.unique(factors[:, k]) for k in range(factors.shape[1]))
    return tuple(k for k, v in enumerate(columns) if len(v) <= MAX_DISCRETE_VALUES and np.all(v == np.round(v)))


def dci(
    codes: ArrayLike,
    factors: ArrayLike,
    discrete_factors: Collection[int] | None = None,
    *,
    depths: Sequence[int] = (2, 4, 8, 12),
    n_estimators: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """DCI of codes (N, D) against ground-truth factors (N, K): {"disentanglement", "completeness", "informativeness"}.

    `discrete_factors` holds the indices of the factors to treat as classes (forest classifiers, accuracy); the
    others are regressed (R²). Deterministic for a given seed.
    """
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    c = _as_array("codes", codes, 2)
    v = _as_array("factors", factors, 2)
    if len(c) != len(v):
        raise ValueError(f"codes have {len(c)} rows and factors {len(v)}; pass one code per example")
    if len(c) < 20:
        raise ValueError(f"DCI needs >= 20 examples for its 60/20/20 split, got {len(c)}; use a few hundred or more")
    discrete = set()
    for i in discrete_factors or ():
        if isinstance(i, (bool, np.bool_)) or not 0 <= int(i) < v.shape[1]:
            raise ValueError(
                f"discrete_factors must hold factor indices in [0, {v.shape[1]}), got {i!r} in "
                f"{list(discrete_factors)}; e.g. discrete_factors=[0] for a shape class in column 0"
            )
        discrete.add(int(i))
    order = np.random.default_rng(seed).permutation(len(c))
    n_train, n_val = int(0.6 * len(c)), int(0.2 * len(c))
    train, val, test = np.split(order, [n_train, n_train + n_val])
    importance = np.zeros((c.shape[1], v.shape[1]))
    scores = []
    for k in range(v.shape[1]):
        target = v[:, k]
        if k in discrete:
            target = np.unique(target, return_inverse=True)[1]
        best = None
        for depth in depths:
            forest_cls = RandomForestClassifier if k in discrete else RandomForestRegressor
            forest = forest_cls(n_estimators=n_estimators, max_depth=depth, max_features=None, random_state=seed,
                                n_jobs=1)
            forest.fit(c[train], target[train])
            val_score = forest.score(c[val], target[val])
            if best is None or val_score > best[0]:
                best = (val_score, forest)
        forest = best[1]
        importance[:, k] = forest.feature_importances_
        scores.append(min(max(forest.score(c[test], target[test]), 0.0), 1.0))
    disentanglement, completeness = dci_from_importances(importance)
    return {
        "disentanglement": disentanglement,
        "completeness": completeness,
        "informativeness": float(np.mean(scores)),
    }


def _as_labels(name: str, values: ArrayLike) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected one label per example (N,), got shape {array.shape}")
    return array


def clustering_scores(assignments: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """{"nmi", "ari"} between cluster assignments (N,) and true labels (N,); 1 for a perfect (relabelled) match."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    a, y = _as_labels("assignments", assignments), _as_labels("labels", labels)
    if len(a) != len(y) or len(a) == 0:
        raise ValueError(f"assignments ({len(a)}) and labels ({len(y)}) must be non-empty and of equal length")
    return {"nmi": float(normalized_mutual_info_score(y, a)), "ari": float(adjusted_rand_score(y, a))}


def ood_auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """AUROC of an OoD score (higher = more out-of-distribution): P(score_out > score_in), ties counted half."""
    from sklearn.metrics import roc_auc_score

    s_in, s_out = _as_array("scores_in", scores_in, 1), _as_array("scores_out", scores_out, 1)
    if len(s_in) == 0 or len(s_out) == 0:
        raise ValueError(
            f"ood_auroc needs scores of both sets, got {len(s_in)} in- and {len(s_out)} out-of-distribution scores"
        )
    y = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    return float(roc_auc_score(y, np.concatenate([s_in, s_out])))


def psnr(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-image PSNR in dB for images in [0, 1]: x, x_hat (B, ...) -> (B,); +inf where they are identical."""
    if x.shape != x_hat.shape or x.dim() < 2:
        raise ValueError(
            f"psnr: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must be batches (B, ...) of the same shape"
        )
    mse = (x.double() - x_hat.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(1.0 / mse)).to(x.dtype if x.is_floating_point() else torch.float64)


def spread(images: Tensor) -> float:
    """Root mean over pixels of the variance across the batch: how much a batch (B, ...) varies from image to image
    (0 for a batch of one repeated image)."""
    return images.double().flatten(1).var(dim=0, unbiased=False).mean().sqrt().item()


# A reconstruction or sample batch that varies less than this share of the data's spread is "near zero".
MIN_SPREAD_RATIO = 0.1
# Reconstructions must beat the mean image's PSNR by this much (dB) to count as depending on the input.
MIN_PSNR_GAIN_DB = 0.5


def collapse_check(x: Tensor, x_hat: Tensor, samples: Tensor | None = None) -> dict[str, float | bool | str]:
    """Whether an autoencoder collapsed, from inputs x (B, ...), their reconstructions x_hat and optionally decoded
    prior samples, all in [0, 1]. Returns the figures and the verdict: {"data_spread", "recon_spread",
    "sample_spread" (nan without samples), "psnr", "mean_image_psnr", "collapsed", "collapse_reason"}."""
    if x.shape != x_hat.shape or len(x) < 2:
        raise ValueError(f"collapse_check: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must be batches of >= 2 "
                         f"images of the same shape")
    data = spread(x)
    mean_image = x.double().mean(dim=0, keepdim=True).expand_as(x)
    out: dict[str, float | bool | str] = {
        "data_spread": data, "recon_spread": spread(x_hat),
        "sample_spread": spread(samples) if samples is not None else float("nan"),
        "psnr": psnr(x, x_hat).double().clamp_max(100.0).mean().item(),
        "mean_image_psnr": psnr(x.double(), mean_image).clamp_max(100.0).mean().item(),
    }
    reasons = []
    if out["recon_spread"] < MIN_SPREAD_RATIO * data:
        reasons.append(f"reconstructions barely vary (spread {out['recon_spread']:.3g} vs data {data:.3g})")
    if out["psnr"] < out["mean_image_psnr"] + MIN_PSNR_GAIN_DB:
        reasons.append(f"PSNR {out['psnr']:.2f} dB is no better than the mean image's {out['mean_image_psnr']:.2f} dB")
    if samples is not None and out["sample_spread"] < MIN_SPREAD_RATIO * data:
        reasons.append(f"samples barely vary (spread {out['sample_spread']:.3g} vs data {data:.3g})")
    out["collapsed"] = bool(reasons)
    out["collapse_reason"] = "; ".join(reasons)
    return out
