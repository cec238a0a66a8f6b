"""Evaluation metrics of the VAEs: likelihood bounds, latent usage, representation quality, sample quality, images.

- Bits per dimension: bpd = NLL_nats / (D·ln 2) (NVAE, Vahdat & Kautz 2020, Sec. 5).
- Importance-weighted NLL (IWAE bound; Burda et al., 2016, Eq. 8; NVAE evaluates with K = 1000):
    log p(x) ≈ log (1/K) Σ_k w_k,   w_k = p(x|z_k)·p(z_k) / q(z_k|x),   z_k ~ q(z|x).
  A lower bound on log p(x) for every K, equal in expectation to the ELBO at K = 1, non-decreasing in K in
  expectation and consistent as K → ∞ (Burda et al., Thm. 1); the NLL reported is its negative.
- Active units (Burda et al., 2016, Sec. 5.2): A_u = Var_x(E_{q(z|x)}[z_u]); unit u is active when A_u > 0.01.
- Linear probe: logistic regression on standardised posterior means (CR-VAE, Sinha & Dieng 2021, Sec. 5).
- Fréchet distance between Gaussian fits of two feature sets (Heusel et al., 2017, whose FID is this distance in
  Inception-v3 pool features; in any other feature space it is not FID):
    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}).
- Improved precision and recall (Kynkäänniemi et al., 2019, Eqs. 1-3): the union of k-NN balls around each set's
  points estimates its manifold; precision = share of generated points inside the real manifold, recall = share of
  real points inside the generated one.
- Image grids (uint8, ready for PNG artifacts): samples, reconstructions, latent traversals.

Model interface (duck-typed; `vae.nvae.NVAE` implements it), each function uses only what it names:
  `model(x).nelbo` (B,) nats; `model.log_weights(x)` (B,) = log p(x|z) + log p(z) − log q(z|x) for ONE z ~ q(z|x);
  `model.posterior_means(x)` list of (B, ...) per latent group; and for latent traversals NVAE's top-down building
  blocks `num_groups`, `top_state(B)`, `group_context(k, state)`, `group_flow(k, z0)`, `group_absorb(k, context, z)`,
  `decode(state)` and `output_distribution(params)` (see `_decode_codes`).
`batches` is any iterable of image tensors (B, C, H, W) float in [0, 1], or of (images, labels) pairs. Every model
evaluation runs in eval mode under no_grad on the model's device and restores the model's previous mode.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import make_grid

# Memory one importance-weighted pass may use on CPU when the chunk size is chosen automatically (on CUDA the
# default is half of the device's free memory).
CPU_MEMORY_BUDGET = 2 * 1024**3


def bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Negative log-likelihood in nats -> bits per dimension, NLL / (D·ln 2), D the values the likelihood scores:
    `model.scored_dims` for an NVAE, C·(H − 2·crop)·(W − 2·crop). Meaningful for discrete likelihoods only (an NVAE in
    eval mode gives those for every decoder); a continuous density per dimension can even be negative."""
    if num_dims < 1:
        raise ValueError(f"num_dims={num_dims} must be >= 1: pass the number of modelled dimensions, C·H·W")
    return nll_nats / (num_dims * math.log(2.0))


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _split_batch(batch: object) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        images, labels = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        raise TypeError(
            f"a batch must be an image tensor (B, C, H, W) or an (images, labels) pair, got {type(batch).__name__}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"images must be float in [0, 1], got {images.dtype}; convert uint8 images with x.float() / 255"
        )
    return images, labels


def negative_elbo(model: nn.Module, batches: Iterable) -> float:
    """Mean over all examples of `model(x).nelbo` (nats per example; a single-sample estimate for a VAE)."""
    total, count = 0.0, 0
    device = _device(model)
    with _evaluating(model):
        for batch in batches:
            x, _ = _split_batch(batch)
            nelbo = model(x.to(device)).nelbo  # (B,)
            total += nelbo.double().sum().item()
            count += nelbo.numel()
    if count == 0:
        raise ValueError("negative_elbo: `batches` yielded no examples")
    return total / count


def _leaf_tensors(output: object) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _leaf_tensors(item)]
    return []


def _pass_memory(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(fixed bytes, bytes per row) of a no-grad `log_weights` pass, measured on probes of x's first rows.

    CUDA: the allocator's peak above the baseline for 1 and for n ≤ 4 rows, fitted as fixed + n·per_row (the fixed
    part holds what every pass builds once, e.g. the weight-normalised kernels). This resets the device's peak
    statistics. CPU has no allocator to ask: every leaf module's output is summed as if all stayed alive, per row.
    That overcounts what no-grad frees early and misses functional intermediates; on the NVAE presets it came out
    3× (tiny) to 28× (cifar10) above the measured growth of the peak RSS, i.e. it errs towards smaller chunks.
    """
    n = min(len(x), 4)
    row_bytes = x[0].numel() * x.element_size()
    if x.is_cuda:

        def peak(rows: Tensor) -> int:
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            base = torch.cuda.memory_allocated(x.device)
            model.log_weights(rows)
            torch.cuda.synchronize(x.device)
            return torch.cuda.max_memory_allocated(x.device) - base

        one = peak(x[:1])
        if n == 1:
            return 0, one + row_bytes
        per_row = max(math.ceil((peak(x[:n]) - one) / (n - 1)), 0) + row_bytes
        return max(one - per_row, 0), per_row
    total = 0

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        total += sum(t.numel() * t.element_size() for t in _leaf_tensors(output))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model.log_weights(x[:n])
    finally:
        for handle in handles:
            handle.remove()
    return 0, math.ceil(total / n) + row_bytes


def importance_weighted_nll(
    model: nn.Module,
    x: Tensor,
    k: int = 1000,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """−log p(x) ≈ −(logsumexp_k log w_k − log K) per example, (B,) nats in float64 on the model's device.

    x: (B, C, H, W) float in [0, 1]. The K samples are drawn by repeating the batch: each pass feeds chunk_size copies
    of x, i.e. chunk_size·B rows, to `model.log_weights`. chunk_size=None picks the largest one whose pass fits
    `memory_budget` bytes (default: half the free CUDA memory, or CPU_MEMORY_BUDGET), as measured by `_pass_memory`;
    lower the batch size if even one copy does not fit.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1 (the number of importance samples; NVAE reports K = 1000)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1, or None to choose it from memory_budget")
    x, _ = _split_batch(x)
    b = x.shape[0]
    with _evaluating(model):
        x = x.to(_device(model))
        if chunk_size is None:
            if memory_budget is None:
                memory_budget = torch.cuda.mem_get_info(x.device)[0] // 2 if x.is_cuda else CPU_MEMORY_BUDGET
            fixed, per_row = _pass_memory(model, x)
            chunk_size = max(1, min(k, (memory_budget - fixed) // (per_row * b)))
        log_w: list[Tensor] = []
        for start in range(0, k, chunk_size):
            copies = min(chunk_size, k - start)
            rows = x.repeat(copies, *([1] * (x.dim() - 1)))  # (copies·B, ...): copy c is rows c·B .. c·B + B − 1
            lw = model.log_weights(rows)
            if lw.shape != (copies * b,):
                raise ValueError(
                    f"model.log_weights must return one value per row, shape ({copies * b},), got {tuple(lw.shape)}"
                )
            if torch.isnan(lw).any() or torch.isposinf(lw).any():
                raise RuntimeError(
                    "model.log_weights returned NaN or +inf: the model is numerically broken on this batch "
                    "(check for non-finite parameters or BatchNorm running statistics)"
                )
            log_w.append(lw.double().reshape(copies, b))
        log_w_all = torch.cat(log_w)  # (K, B)
    return -(torch.logsumexp(log_w_all, dim=0) - math.log(k))


def mean_importance_weighted_nll(
    model: nn.Module,
    batches: Iterable,
    k: int = 1000,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> float:
    """Mean of `importance_weighted_nll` over every example of `batches` (nats per example)."""
    total, count = 0.0, 0
    for batch in batches:
        x, _ = _split_batch(batch)
        nll = importance_weighted_nll(model, x, k=k, chunk_size=chunk_size, memory_budget=memory_budget)
        total += nll.sum().item()
        count += nll.numel()
    if count == 0:
        raise ValueError("mean_importance_weighted_nll: `batches` yielded no examples")
    return total / count


def _flat_posterior_means(model: nn.Module, x: Tensor) -> Tensor:
    """(B, U): the posterior means of all groups, flattened and concatenated in group order."""
    return torch.cat([m.flatten(1) for m in model.posterior_means(x)], dim=1)


def active_units(model: nn.Module, batches: Iterable, threshold: float = 0.01) -> tuple[int, Tensor]:
    """(number of units with A_u > threshold, A (U,) float64 on CPU), A_u the variance over the data of E_q[z_u].

    Units are the flattened posterior means of all groups (channel × position for spatial groups, in the order of
    `posterior_means`). The variance is the population one (divisor N), accumulated in float64 around the first
    batch's mean, so the datasets need not fit in memory.
    """
    device = _device(model)
    count, shift, total, total_sq = 0, None, None, None
    with _evaluating(model):
        for batch in batches:
            x, _ = _split_batch(batch)
            means = _flat_posterior_means(model, x.to(device)).double().cpu()  # (B, U)
            if shift is None:
                shift = means.mean(dim=0)
                total, total_sq = torch.zeros_like(shift), torch.zeros_like(shift)
            centred = means - shift
            total += centred.sum(dim=0)
            total_sq += (centred**2).sum(dim=0)
            count += means.shape[0]
    if count < 2:
        raise ValueError(f"active_units needs at least 2 examples to measure a variance, got {count}")
    variance = (total_sq / count - (total / count) ** 2).clamp_min(0.0)
    return int((variance > threshold).sum().item()), variance


def posterior_mean_features(model: nn.Module, batches: Iterable) -> tuple[Tensor, Tensor]:
    """(features (N, U) float32 on CPU, labels (N,) int64): flattened posterior means, the linear probe's input.

    `batches` must yield (images, labels) pairs.
    """
    device = _device(model)
    features: list[Tensor] = []
    labels: list[Tensor] = []
    with _evaluating(model):
        for batch in batches:
            x, y = _split_batch(batch)
            if y is None:
                raise ValueError("posterior_mean_features needs labels: make `batches` yield (images, labels) pairs")
            features.append(_flat_posterior_means(model, x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    if not features:
        raise ValueError("posterior_mean_features: `batches` yielded no examples")
    return torch.cat(features), torch.cat(labels)


def _as_matrix(name: str, features: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, Tensor):
        array = features.detach().cpu().double().numpy()
    else:
        array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a feature matrix (N, D), got shape {array.shape}; flatten each example")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or inf; features must be finite")
    return array


def linear_probe_accuracy(
    features_train: Tensor | np.ndarray,
    y_train: Tensor | np.ndarray,
    features_test: Tensor | np.ndarray,
    y_test: Tensor | np.ndarray,
    max_iter: int = 2000,
) -> float:
    """Test accuracy of an L2-regularised (C = 1) logistic regression fitted on standardised training features.

    The standardisation is fitted on the training features only, so no test statistics leak into the probe.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = _as_matrix("features_train", features_train), _as_matrix("features_test", features_test)
    y_tr, y_te = np.asarray(y_train).reshape(-1), np.asarray(y_test).reshape(-1)
    if len(train) != len(y_tr) or len(test) != len(y_te):
        raise ValueError(
            f"features and labels differ in length: train {len(train)} vs {len(y_tr)}, test {len(test)} vs {len(y_te)}"
        )
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train features have {train.shape[1]} dims, test features {test.shape[1]}; extract both with one model"
        )
    if len(np.unique(y_tr)) < 2:
        raise ValueError("linear_probe_accuracy: the training labels hold a single class; a probe needs at least two")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(train, y_tr)
    return float(probe.score(test, y_te))


def frechet_distance(features_1: Tensor | np.ndarray, features_2: Tensor | np.ndarray) -> float:
    """Fréchet distance d² between Gaussian fits (mean, unbiased covariance) of two feature sets (N_i, D); it is FID
    only when the features are Inception-v3's pool features.

    Tr (Σ₁Σ₂)^{1/2} is computed as Σ_i sqrt(λ_i) over the eigenvalues of the symmetric PSD matrix
    Σ₁^{1/2} Σ₂ Σ₁^{1/2}, which has the same spectrum as Σ₁Σ₂. This equals the usual scipy.linalg.sqrtm(Σ₁Σ₂) trace
    but stays real and exact for the rank-deficient covariances that N < D samples give (where sqrtm returns complex
    noise).
    """
    f1, f2 = _as_matrix("features_1", features_1), _as_matrix("features_2", features_2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}; use the same feature extractor")
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError(f"need >= 2 examples per set to fit a covariance, got {len(f1)} and {len(f2)}")
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    cov1 = np.atleast_2d(np.cov(f1, rowvar=False))
    cov2 = np.atleast_2d(np.cov(f2, rowvar=False))
    eigval, eigvec = np.linalg.eigh(cov1)
    sqrt_cov1 = (eigvec * np.sqrt(eigval.clip(min=0.0))) @ eigvec.T
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2.0).clip(min=0.0)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)
    return max(d2, 0.0)  # rounding can leave −1e-12 for identical sets


fid_from_features = frechet_distance  # the earlier public name, kept for existing callers


def _kth_neighbour_radii(points: Tensor, k: int, chunk_rows: int) -> Tensor:
    """(N,) distance from each point to its k-th nearest neighbour in the same set, itself excluded."""
    # k + 1 smallest: each point is its own nearest neighbour at distance 0.
    radii = [torch.cdist(c, points).topk(k + 1, dim=1, largest=False).values[:, k] for c in points.split(chunk_rows)]
    return torch.cat(radii)


def _share_inside(queries: Tensor, centres: Tensor, radii: Tensor, chunk_rows: int) -> float:
    """Share of queries within radii[i] of some centre i (inside the union of the k-NN balls)."""
    inside = [(torch.cdist(chunk, centres) <= radii).any(dim=1) for chunk in queries.split(chunk_rows)]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    features_real: Tensor | np.ndarray, features_fake: Tensor | np.ndarray, k: int = 3, chunk_rows: int = 1024
) -> tuple[float, float]:
    """(precision, recall) of Kynkäänniemi et al. (2019) with k-NN manifolds (k = 3 in the paper).

    Distances are Euclidean in float64; pairwise distances are formed chunk_rows query rows at a time.
    """
    real = torch.from_numpy(_as_matrix("features_real", features_real))
    fake = torch.from_numpy(_as_matrix("features_fake", features_fake))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}; use the same feature extractor"
        )
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k={k} must be >= 1 and smaller than both set sizes ({len(real)}, {len(fake)})")
    precision = _share_inside(fake, real, _kth_neighbour_radii(real, k, chunk_rows), chunk_rows)
    recall = _share_inside(real, fake, _kth_neighbour_radii(fake, k, chunk_rows), chunk_rows)
    return precision, recall


def _check_images(name: str, images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(
            f"{name}: expected float images (B, 1 or 3, H, W) in [0, 1], got {images.dtype} of shape "
            f"{tuple(images.shape)}"
        )


def sample_grid(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Images (B, C, H, W) float in [0, 1] (clamped) -> uint8 grid (C, R·(H + p) + p, n·(W + p) + p), C = 1 or 3.

    n = min(nrow, B) images per row, R = ceil(B / n) rows, p = padding; a single image gets the same border. Grey
    images stay one channel (torchvision.io.write_png takes either).
    """
    _check_images("sample_grid", images)
    if nrow < 1:
        raise ValueError(f"nrow={nrow} must be >= 1 (images per row)")
    images = images.detach().float().clamp(0.0, 1.0).cpu()
    if len(images) == 1:  # make_grid returns a lone image without its border
        grid = F.pad(images[0], (padding,) * 4, value=pad_value)
    else:
        grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)[: images.shape[1]]
    return (grid * 255.0).round().to(torch.uint8)


def reconstruction_grid(x: Tensor, x_hat: Tensor, pairs_per_row: int = 8, padding: int = 2) -> Tensor:
    """uint8 grid of (original, reconstruction) pairs, each original immediately left of its reconstruction.

    x, x_hat: (B, C, H, W) in [0, 1]. Shape: (C, R·(H + p) + p, 2n·(W + p) + p), n = min(pairs_per_row, B) pairs per
    row and R = ceil(B / n) rows.
    """
    _check_images("reconstruction_grid x", x)
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must have the same shape")
    pairs = torch.stack([x.detach(), x_hat.detach().to(x.dtype)], dim=1).flatten(0, 1)  # (2B, C, H, W), interleaved
    return sample_grid(pairs, nrow=2 * min(pairs_per_row, len(x)), padding=padding)


def _decode_codes(model: nn.Module, codes: list[Tensor]) -> Tensor:
    """Mean image (B, C, H, W) of p(x | z) for given pre-flow codes z0_k (B, *latent shape k) of every group, run
    through the top-down path: z_k = flow_k(z0_k) is absorbed into the decoder state group by group. At the
    posterior means this is the decoding along the path `posterior_means` follows."""
    state = model.top_state(codes[0].shape[0])
    for k, z0 in enumerate(codes):
        context = model.group_context(k, state)
        state = model.group_absorb(k, context, model.group_flow(k, z0))
    return model.output_distribution(model.decode(state)).mean()


def latent_traversal(
    model: nn.Module, x: Tensor, group: int, channels: Sequence[int], values: Sequence[float], padding: int = 2
) -> Tensor:
    """uint8 grid (C, R·(H + p) + p, V·(W + p) + p) of decoded means: row i shifts latent channel channels[i] of
    `group` by values[j] in column j, at every position of the group's map; all other latents stay at x's posterior
    means (later groups are not re-inferred, so the row shows what that one channel controls).

    x: one image, (1, C, H, W) or (C, H, W), float in [0, 1]. values are offsets from the posterior mean in latent
    units (the top group's prior is N(0, I), so ±3 spans it); include 0 to show the reconstruction itself.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    _check_images("latent_traversal x", x)
    if x.shape[0] != 1:
        raise ValueError(f"latent_traversal traverses one image; got a batch of {x.shape[0]}, pass x[i : i + 1]")
    if not 0 <= group < model.num_groups:
        raise ValueError(f"group={group} is out of range; the model has groups 0..{model.num_groups - 1} (0 = top)")
    if not channels or not values:
        raise ValueError("latent_traversal needs at least one channel and one value")
    with _evaluating(model):
        means = model.posterior_means(x.to(_device(model)))
        num_channels = means[group].shape[1]
        bad = [c for c in channels if not 0 <= c < num_channels]
        if bad:
            raise ValueError(f"channels {bad} are out of range; group {group} has channels 0..{num_channels - 1}")
        n = len(channels) * len(values)
        codes = [m.expand(n, *m.shape[1:]).clone() for m in means]  # row-major: image i·V + j is (channel i, value j)
        chan = torch.tensor(list(channels), device=codes[group].device).repeat_interleave(len(values))
        shift = torch.tensor(list(values), dtype=codes[group].dtype, device=codes[group].device).repeat(len(channels))
        codes[group][torch.arange(n), chan] += shift.view(n, *([1] * (codes[group].dim() - 2)))
        images = _decode_codes(model, codes)
    return sample_grid(images, nrow=len(values), padding=padding)
