"""NCP-VAE: noise-contrastive priors for a trained, frozen NVAE (Aneja, Schwing, Kautz & Vahdat, "A Contrastive
Learning Approach for Training Variational Autoencoder Priors", NeurIPS 2021).

Prior (hierarchical form): p_NCP(z) = Π_k r_k(z_k, z_<k)·p(z_k | z_<k) / Z_k(z_<k), with
r_k ≈ q(z_k | z_<k)/p(z_k | z_<k) the ratio of the aggregate posterior's conditional to the base prior's, and
Z_k(z_<k) = E_{p(z_k|z_<k)}[r_k]. Groups are indexed top-down as in `vae.nvae` (k = 0 is the top group).

Stage 2 (one binary classifier D_k per group; the NVAE frozen): for x from the data and z_<k ~ q(z_<k | x), c_k is the
decoder state that summarises z_<k (what the prior head of group k reads). Positives z_k ~ q(z_k | z_<k, x), label 1;
negatives z_k ~ p(z_k | z_<k) on the *same* c_k, label 0. The NCE (logistic) loss over a balanced batch,
    L_k = ½·E_q[softplus(−ℓ)] + ½·E_p[softplus(ℓ)],   ℓ = D_k(z_k, c_k) the logit,
is minimised by ℓ* = log q/p, so log r_k = ℓ (chance level: L = log 2, accuracy ½).

Sampling (`NCPVAE.sample`):
- SIR, group by group: draw M candidates z_k^(m) ~ p(z_k | z_<k) at the chosen z_<k, weights w_m ∝ exp(ℓ_k^(m)),
  resample one, absorb it into the decoder state, continue. ESS_k = (Σw)²/Σw² ∈ [1, M]. As M → ∞ the samples follow
  Π_k r_k·p_k/Z_k(z_<k) exactly; with a constant r they follow the base prior for every M.
- Langevin in ε space, z_k = μ_k(z_<k) + T·σ_k(z_<k)·ε_k through `NVAE.prior_path`:
      E(ε) = −Σ_k log r_k(z_k(ε), c_k(ε)) + ½‖ε‖²,   ε ← ε − (η/2)·∇E + √η·n,  n ~ N(0, I),  ε_0 ~ N(0, I).
  Its target is the *jointly* normalised p(z)·Π_k r_k / Z. That equals SIR's per-group normalised product only when no
  Z_k depends on z_<k, which holds at the optimum r_k = q_k/p_k (every Z_k ≡ 1) but not for an arbitrary r.
- A temperature T scales every σ of the base prior in all three methods; r itself is not tempered.

Likelihood: log p_NCP(x) ≥ ELBO(x) + Σ_k E_q[log r_k − log Z_k(z_<k)]. Each group's term is exactly the
reduction of E_x KL(q(z|x) ‖ ·) from p to p_NCP in that group; `ncp_gain` estimates it with the inner Monte Carlo
log Ẑ_k(c) = logmeanexp over S prior draws at each posterior context (only the classifier runs on the draws, so the
nested estimate is cheap). E[log Ẑ] ≤ log Z, so the gain is biased upwards by O(1/S).
The likelihood itself (`NCPVAE.importance_weighted_nll`): importance sampling with the frozen encoder as proposal,
    log p_NCP(x) ≈ logmeanexp_i [log p(x|z_i) + log p(z_i) − log q(z_i|x) + Σ_k (log r_k(z_ik) − log Ẑ_k(z_i,<k))],
z_i ~ q(z|x), with Ẑ_k estimated by M prior draws at every draw's own context (nested Monte Carlo; the top group's
context is constant, so Ẑ_0 is estimated once) and the estimate's Monte Carlo error stated by the delta method.

Choices the paper leaves open, each with its reason:
- D_k reads [z_k, 1×1 projection of c_k] through residual Swish-conv blocks without normalisation (its output must
  not depend on what else is in the batch: SIR scores M candidates of one context together), then a global mean pool
  and a linear logit. Blocks after the first halve maps larger than 4×4, to widen the receptive field.
- AdamW at a constant learning rate; early stopping on the held-out NCE loss with the best weights restored.
- For the top group (k = 0) the context is the decoder's learned constant, so Z_0 is a plain expectation; for k > 0
  `log_z_estimate` averages log Ẑ_k over contexts from the base prior (the quantity that matters for one x is
  `ncp_gain`'s estimate at that x's posterior contexts).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae.configs import NCPConfig

METHODS = ("sir", "langevin", "base")
MAX_CONSECUTIVE_SKIPS = 20  # non-finite classifier losses in a row before training gives up
_SCORE_ROWS = 8192  # classifier rows per pass when estimating Z_k (bounds memory, not results)


class _ResBlock(nn.Module):
    """skip(x) + branch(x), branch = Swish-conv3×3-Swish-conv3×3; both halve the map when `down`."""

    def __init__(self, channels: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.conv2(F.silu(self.conv1(F.silu(x))))
        out = x + branch
        return F.avg_pool2d(out, 2) if self.down else out


class GroupClassifier(nn.Module):
    """D_k(z_k, c_k) -> logit = log r_k. z (B, C_z, h, w), context (B, C_dec, h, w) -> (B,)."""

    def __init__(
        self, latent_shape: tuple[int, int, int], context_channels: int, channels: int = 32, num_blocks: int = 2
    ) -> None:
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.context_channels = int(context_channels)
        c_z, h, w = self.latent_shape
        self.context_proj = nn.Conv2d(context_channels, channels, 1)
        self.stem = nn.Conv2d(c_z + channels, channels, 3, padding=1)
        blocks, side = [], min(h, w)
        for i in range(num_blocks):
            down = i > 0 and side > 4
            blocks.append(_ResBlock(channels, down))
            side = side // 2 if down else side
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(channels, 1)

    def embed_context(self, context: Tensor) -> Tensor:
        """(B, C_dec, h, w) -> (B, channels, h, w); SIR embeds a context once for its M candidates."""
        return self.context_proj(context)

    def score(self, z: Tensor, context_features: Tensor) -> Tensor:
        h = self.blocks(self.stem(torch.cat([z.to(context_features.dtype), context_features], dim=1)))
        return self.out(F.silu(h).mean(dim=(2, 3))).squeeze(1)

    def forward(self, z: Tensor, context: Tensor) -> Tensor:
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"GroupClassifier: z has shape {tuple(z.shape)}, this classifier scores latents (B, "
                f"{', '.join(map(str, self.latent_shape))}); pass the z_k of the group it was trained for"
            )
        if context.shape[1] != self.context_channels or context.shape[2:] != z.shape[2:] or len(context) != len(z):
            raise ValueError(
                f"GroupClassifier: context {tuple(context.shape)} does not match z {tuple(z.shape)}; expected "
                f"({len(z)}, {self.context_channels}, {z.shape[2]}, {z.shape[3]}), the decoder state of the same group"
            )
        return self.score(z, self.embed_context(context))


def context_channels(vae: nn.Module) -> list[int]:
    """Channels C_dec_k of the decoder context of every group, probed with one zero-noise prior pass (no RNG used)."""
    eps = [torch.zeros(1, *shape, device=_device(vae)) for shape in vae.latent_shapes]
    was_training = vae.training
    try:
        with torch.no_grad():
            steps, _ = vae.eval().prior_path(eps)  # eval: the probe must not move BN running statistics
    finally:
        vae.train(was_training)
    return [int(s.context.shape[1]) for s in steps]


def classifier_for(vae: nn.Module, k: int, cfg: NCPConfig) -> GroupClassifier:
    """An untrained D_k sized for group k of `vae` (also how the ncp stage rebuilds one from its state_dict)."""
    _check_group(vae, k)
    channels = context_channels(vae)[k]
    return GroupClassifier(vae.latent_shapes[k], channels, cfg.classifier_channels, cfg.classifier_blocks)


# ----------------------------------------------------------------------------------------------------------------
# Training pairs and the per-group training loop.


def freeze(vae: nn.Module) -> nn.Module:
    """Eval mode (BN uses running statistics) and no gradients for any parameter; returns the same module."""
    vae.eval()
    vae.requires_grad_(False)
    return vae


def _posterior_walk(vae: nn.Module, x: Tensor, last: int) -> list[tuple[Tensor, Any, Tensor]]:
    """(z_k ~ q(z_k | z_<k, x), p(z_k | z_<k), c_k) for k = 0..last along one posterior sample, one encoder pass."""
    feats = vae.encode(x)
    state = vae.top_state(x.shape[0])
    out = []
    for k in range(last + 1):
        context = vae.group_context(k, state)
        prior = vae.group_prior(k, context)
        posterior = vae.group_posterior(k, context, feats[k], prior)
        z = vae.group_flow(k, _draw(posterior))
        out.append((z, prior, context))
        if k < last:
            state = vae.group_absorb(k, context, z)
    return out


def make_pairs(vae: nn.Module, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, C, H, W) in [0, 1] -> (z_pos, z_neg, context) for group k: z_pos ~ q(z_k | z_<k, x) and
    z_neg ~ p(z_k | z_<k) (B, C_z, h, w) on the same posterior context (B, C_dec, h, w)."""
    _check_group(vae, k)
    return make_all_pairs(vae, x, last=k)[k]


def make_all_pairs(vae: nn.Module, x: Tensor, last: int | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """`make_pairs` for every group 0..last (default: all) from ONE encoder pass and one posterior sample."""
    _require_eval(vae, "make_pairs")
    last = vae.num_groups - 1 if last is None else last
    with torch.no_grad():
        return [(z, _draw(prior), context) for z, prior, context in _posterior_walk(vae, x, last)]


def nce_loss(logits_pos: Tensor, logits_neg: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, accuracy) of a balanced batch: ½·mean softplus(−ℓ_pos) + ½·mean softplus(ℓ_neg); chance = (log 2, ½)."""
    loss = 0.5 * (F.softplus(-logits_pos).mean() + F.softplus(logits_neg).mean())
    accuracy = 0.5 * ((logits_pos > 0).float().mean() + (logits_neg < 0).float().mean())
    return loss, accuracy


def _pair_logits(classifier: GroupClassifier, z_pos: Tensor, z_neg: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
    features = classifier.embed_context(context)
    logits = classifier.score(torch.cat([z_pos, z_neg]), torch.cat([features, features]))
    return logits.chunk(2)


def _nce_step(
    classifier: GroupClassifier, optimizer: torch.optim.Optimizer, z_pos: Tensor, z_neg: Tensor, context: Tensor
) -> tuple[float, float] | None:
    """One optimiser step on a balanced batch -> (loss, accuracy); None, and no update, if the loss is non-finite."""
    loss, accuracy = nce_loss(*_pair_logits(classifier, z_pos, z_neg, context))
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None
    loss.backward()
    optimizer.step()
    return loss.item(), accuracy.item()


def train_group_classifier(
    vae: nn.Module,
    k: int,
    batches_fn: Callable[[str], Iterable],
    cfg: NCPConfig,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[GroupClassifier, dict[str, Any]]:
    """Train D_k on the frozen `vae` (put in eval mode without gradients; its weights and buffers never change).

    batches_fn("train") is called for each pass over the training data and batches_fn("val") once; each yields image
    tensors (B, C, H, W) in [0, 1] or (images, labels) pairs. Every `cfg.eval_every` steps the held-out NCE loss and
    accuracy are measured on fixed pairs from the first `cfg.val_examples` validation images, `progress(step, metrics)`
    receives them as {"train/nce_loss/group_03": ..., "val/accuracy/group_03": ...}, and training stops after
    `cfg.patience` evaluations without a lower held-out loss. Runs in a forked RNG seeded with group_seed(cfg, k), so
    the caller's RNG is untouched; the validation pairs are drawn first (make_pairs chunk by chunk of cfg.batch_size).

    Returns the classifier with its best weights (eval mode, on the VAE's device) and the history: lists "step",
    "train_nce_loss", "train_accuracy", "val_nce_loss", "val_accuracy" per evaluation, and "best_step",
    "best_val_nce_loss", "best_val_accuracy", "stopped_early", "steps", "skipped_steps".
    """
    _check_group(vae, k)
    freeze(vae)
    device = _device(vae)
    names = {f"{split}_{metric}": f"{split}/{metric}/group_{k:02d}"
             for split in ("train", "val") for metric in ("nce_loss", "accuracy")}
    history: dict[str, Any] = {"step": [], **{m: [] for m in names}, "best_step": 0, "best_val_accuracy": math.nan}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(group_seed(cfg, k))
        val_pairs = _validation_pairs(vae, k, batches_fn("val"), cfg.val_examples, cfg.batch_size, device)
        classifier = classifier_for(vae, k, cfg).to(device)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        step, skipped, in_a_row = 0, 0, 0
        best_loss, best_state, bad_evals, stopped_early = math.inf, copy.deepcopy(classifier.state_dict()), 0, False
        run_loss, run_acc, run_count = 0.0, 0.0, 0
        while step < cfg.steps and not stopped_early:
            seen = 0
            for x in _image_chunks(batches_fn("train"), cfg.batch_size):
                seen += 1
                result = _nce_step(classifier, optimizer, *make_pairs(vae, x.to(device), k))
                if result is None:
                    skipped, in_a_row = skipped + 1, in_a_row + 1
                    if in_a_row > MAX_CONSECUTIVE_SKIPS:
                        raise RuntimeError(
                            f"train_group_classifier: group {k} gave a non-finite NCE loss {in_a_row} steps in a row; "
                            f"lower ncp.lr (now {cfg.lr}) or check the VAE for non-finite latents"
                        )
                    continue
                in_a_row, step = 0, step + 1
                run_loss, run_acc, run_count = run_loss + result[0], run_acc + result[1], run_count + 1
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    val_loss, val_acc = _evaluate(classifier, val_pairs)
                    row = {"train_nce_loss": run_loss / run_count, "train_accuracy": run_acc / run_count,
                           "val_nce_loss": val_loss, "val_accuracy": val_acc}
                    history["step"].append(step)
                    for m, v in row.items():
                        history[m].append(v)
                    if progress is not None:
                        progress(step, {names[m]: v for m, v in row.items()})
                    run_loss, run_acc, run_count = 0.0, 0.0, 0
                    if val_loss < best_loss:
                        best_loss, best_state, bad_evals = val_loss, copy.deepcopy(classifier.state_dict()), 0
                        history["best_step"], history["best_val_accuracy"] = step, val_acc
                    else:
                        bad_evals += 1
                        stopped_early = 0 < cfg.patience <= bad_evals
                if step >= cfg.steps or stopped_early:
                    break
            if seen == 0:
                raise ValueError("train_group_classifier: batches_fn('train') yielded no images; check the data split")
    classifier.load_state_dict(best_state)
    classifier.eval()
    history.update(best_val_nce_loss=best_loss, stopped_early=stopped_early, steps=step, skipped_steps=skipped)
    return classifier, history


def group_seed(cfg: NCPConfig, k: int) -> int:
    """The seed of group k's classifier training: distinct per group, so parallel tasks draw independent pairs."""
    return cfg.seed * 100_003 + k


def _validation_pairs(
    vae: nn.Module, k: int, batches: Iterable, limit: int, chunk: int, device: torch.device
) -> list[tuple[Tensor, Tensor, Tensor]]:
    pairs, count = [], 0
    for x in _image_chunks(batches, chunk):
        x = x[: limit - count].to(device)
        pairs.append(make_pairs(vae, x, k))
        count += len(x)
        if count >= limit:
            break
    if count < 2:
        raise ValueError(
            f"train_group_classifier: batches_fn('val') yielded {count} images; early stopping needs held-out data "
            "(at least 2 images, ncp.val_examples by default)"
        )
    return pairs


@torch.no_grad()
def _evaluate(classifier: GroupClassifier, pairs: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[float, float]:
    pos, neg = zip(*(_pair_logits(classifier, *p) for p in pairs))
    loss, accuracy = nce_loss(torch.cat(pos), torch.cat(neg))
    return loss.item(), accuracy.item()


# ----------------------------------------------------------------------------------------------------------------
# The composite model.


class NCPVAE(nn.Module):
    """A frozen NVAE with one classifier per latent group; its prior is Π_k r_k·p(z_k | z_<k) / Z_k.

    `vae` needs NVAE's top-down hooks (num_groups, latent_shapes, top_state, group_context, group_prior,
    group_absorb, prior_path, standard_eps, decode, output_distribution; and encode, group_posterior, group_flow for
    `ncp_gain`). Neither the VAE nor the classifiers ever change: both stay in eval mode without gradients, also
    after `.train()`.
    """

    def __init__(self, vae: nn.Module, classifiers: Sequence[nn.Module], cfg: NCPConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or NCPConfig()
        self.vae = freeze(vae)
        _check_classifiers(vae, classifiers)
        self.classifiers = nn.ModuleList(classifiers).to(_device(vae))
        freeze(self.classifiers)
        self.last_stats: dict[str, Any] = {}

    def train(self, mode: bool = True) -> "NCPVAE":
        # BN running statistics of the VAE must not move while sampling; the wrapper's own flag may change.
        super().train(mode)
        self.vae.eval()
        self.classifiers.eval()
        return self

    @property
    def num_groups(self) -> int:
        return self.vae.num_groups

    def log_r(self, k: int, z_k: Tensor, context: Tensor) -> Tensor:
        """log r_k = D_k's logit, (B,) for z_k (B, C_z, h, w) and the decoder context of group k (B, C_dec, h, w)."""
        _check_group(self.vae, k)
        return self.classifiers[k](z_k, context).float()

    # ------------------------------------------------------------------------------------------------------------
    # Sampling.

    @torch.no_grad()
    def sample(
        self,
        n: int,
        method: Literal["sir", "langevin", "base"] = "sir",
        temperature: float | None = None,
        mode: Literal["sample", "mean"] | None = None,
    ) -> Tensor:
        """(n, C, H, W) in [0, 1] from the NCP prior by `method` at `temperature` (None: cfg.temperature), then a
        sample of p(x | z) or its mean (None: the VAE's `picture_mode`). Diagnostics of the draw land in
        `self.last_stats`."""
        mode = mode or self.vae.picture_mode
        if mode not in ("sample", "mean"):
            raise ValueError(f"sample: mode {mode!r} is not 'sample' or 'mean'")
        _, state = self._sample_path(n, method, temperature)
        images = []
        for chunk in state.split(self.cfg.sample_batch_size):  # decoding is the memory peak: one chunk at a time
            dist = self.vae.output_distribution(self.vae.decode(chunk))
            images.append(dist.mean() if mode == "mean" else dist.sample())
        return torch.cat(images)

    @torch.no_grad()
    def sample_latents(
        self, n: int, method: Literal["sir", "langevin", "base"] = "sir", temperature: float | None = None
    ) -> list[Tensor]:
        """The latents z_k (n, *latent_shapes[k]) of n prior samples, as the decoder consumes them."""
        zs, _ = self._sample_path(n, method, temperature)
        return zs

    def _sample_path(self, n: int, method: str, temperature: float | None) -> tuple[list[Tensor], Tensor]:
        temperature = self.cfg.temperature if temperature is None else float(temperature)
        if method not in METHODS:
            raise ValueError(f"sample: method {method!r} is not one of {', '.join(map(repr, METHODS))}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"sample: n={n!r} must be a positive integer (the number of samples)")
        if temperature < 0:
            raise ValueError(f"sample: temperature {temperature} must be >= 0 (1 is the model; 0.6-0.9 are typical)")
        draw = {"sir": self._sir, "langevin": self._langevin, "base": self._base}[method]
        sizes = _chunk_sizes(n, self.cfg.sample_batch_size)
        chunks = [draw(size, temperature) for size in sizes]
        zs = [torch.cat(parts) for parts in zip(*(c[0] for c in chunks))]
        state = torch.cat([c[1] for c in chunks])
        stats: dict[str, Any] = {"method": method, "temperature": temperature, "samples": n,
                                 "mean_log_r": torch.cat([c[2] for c in chunks]).mean().item()}
        for key in chunks[0][3]:  # per-chunk diagnostics, averaged with the chunk sizes as weights
            per_chunk = torch.tensor([c[3][key] for c in chunks], dtype=torch.float64)  # (chunks,) or (chunks, K)
            weights = torch.tensor(sizes, dtype=torch.float64).view(-1, *[1] * (per_chunk.dim() - 1))
            stats[key] = ((per_chunk * weights).sum(0) / n).tolist()
        if method == "sir":
            stats.update(ess_mean=sum(stats["ess"]) / len(stats["ess"]), proposals=self.cfg.sir_proposals)
        if method == "langevin":
            stats.update(steps=self.cfg.langevin_steps, step_size=self.cfg.langevin_step_size)
        self.last_stats = stats
        return zs, state

    def _sum_log_r(self, steps: list) -> Tensor:
        return torch.stack([self.log_r(k, s.z, s.context) for k, s in enumerate(steps)], dim=1).sum(1)

    def _base(self, n: int, temperature: float) -> tuple[list[Tensor], Tensor, Tensor, dict]:
        steps, state = self.vae.prior_path(self.vae.standard_eps(n), temperature)
        return [s.z for s in steps], state, self._sum_log_r(steps), {}

    def _sir(self, n: int, temperature: float) -> tuple[list[Tensor], Tensor, Tensor, dict]:
        m, vae = self.cfg.sir_proposals, self.vae
        state = vae.top_state(n)
        zs, ess, log_r = [], [], torch.zeros(n, device=state.device)
        for k in range(vae.num_groups):
            context = vae.group_context(k, state)
            prior = vae.group_prior(k, context, temperature)
            eps = torch.randn(n, m, *prior.mu.shape[1:], device=prior.mu.device)
            candidates = prior.mu.unsqueeze(1) + prior.sigma.unsqueeze(1) * eps  # (n, M, C_z, h, w)
            clf = self.classifiers[k]
            features = clf.embed_context(context).repeat_interleave(m, dim=0)  # (n·M, channels, h, w)
            logits = clf.score(candidates.flatten(0, 1), features).float().view(n, m)
            weights = torch.softmax(logits, dim=1)
            pick = torch.multinomial(weights, 1).squeeze(1)
            rows = torch.arange(n, device=pick.device)
            z = candidates[rows, pick]
            zs.append(z)
            ess.append((1.0 / (weights**2).sum(1)).mean().item())
            log_r = log_r + logits[rows, pick]
            state = vae.group_absorb(k, context, z)
        return zs, state, log_r, {"ess": ess}

    def _langevin(self, n: int, temperature: float) -> tuple[list[Tensor], Tensor, Tensor, dict]:
        eta, vae = self.cfg.langevin_step_size, self.vae
        eps = vae.standard_eps(n)
        energies = []
        with torch.enable_grad():
            for step in range(self.cfg.langevin_steps):
                eps = [e.detach().requires_grad_(True) for e in eps]
                steps, _ = vae.prior_path(eps, temperature)
                energy = -self._sum_log_r(steps) + 0.5 * sum(e.flatten(1).pow(2).sum(1) for e in eps)  # (n,)
                grads = torch.autograd.grad(energy.sum(), eps)
                energies.append(energy.detach().mean().item())
                eps = [e.detach() - 0.5 * eta * g + math.sqrt(eta) * torch.randn_like(e) for e, g in zip(eps, grads)]
                if not all(bool(torch.isfinite(e).all()) for e in eps):
                    raise RuntimeError(
                        f"Langevin: ε became non-finite at step {step + 1}; lower ncp.langevin_step_size "
                        f"(now {eta}) or ncp.langevin_steps"
                    )
        steps, state = vae.prior_path(eps, temperature)
        stats = {"energy_start": energies[0], "energy_end": energies[-1]}
        return [s.z for s in steps], state, self._sum_log_r(steps), stats

    # ------------------------------------------------------------------------------------------------------------
    # Normalising constants and the likelihood gain.

    def log_normalizer(self, k: int, context: Tensor, n_samples: int) -> tuple[Tensor, Tensor]:
        """(log Ẑ_k, Var[log Ẑ_k]), both (B,) float64, for each context row c (B, C_dec, h, w):
        log Ẑ_k(c) = logmeanexp over n_samples draws z_k ~ p(z_k | c) of log r_k, and its Monte Carlo variance by the
        delta method, Var[Ẑ]/Ẑ² = s²_r / (n·r̄²) = (mean r² / r̄² − 1)/(n − 1) with s²_r the unbiased variance of
        the draws (NaN for n = 1). E[log Ẑ] ≈ log Z − Var[log Ẑ]/2 (Jensen), so log Ẑ is biased low by O(1/n)."""
        prior = self.vae.group_prior(k, context)
        clf = self.classifiers[k]
        features = clf.embed_context(context)
        b = context.shape[0]
        per_pass = max(1, _SCORE_ROWS // b)
        lse1 = torch.full((b,), -math.inf, device=context.device, dtype=torch.float64)
        lse2 = torch.full_like(lse1, -math.inf)
        for size in _chunk_sizes(n_samples, per_pass):
            eps = torch.randn(b, size, *prior.mu.shape[1:], device=context.device)
            z = (prior.mu.unsqueeze(1) + prior.sigma.unsqueeze(1) * eps).flatten(0, 1)  # (B·size, C_z, h, w)
            logits = clf.score(z, features.repeat_interleave(size, dim=0)).double().view(b, size)
            lse1 = torch.logaddexp(lse1, torch.logsumexp(logits, dim=1))
            lse2 = torch.logaddexp(lse2, torch.logsumexp(2.0 * logits, dim=1))
        log_z = lse1 - math.log(n_samples)
        if n_samples < 2:
            return log_z, torch.full_like(log_z, math.nan)
        ratio = torch.exp(lse2 - 2.0 * lse1 + math.log(n_samples))  # mean r² / r̄² >= 1
        return log_z, (ratio - 1.0).clamp(min=0.0) / (n_samples - 1)

    @torch.no_grad()
    def log_z_estimate(self, k: int, n_samples: int | None = None, n_contexts: int = 16) -> float:
        """Monte-Carlo log Z_k = log E_{p(z_k|z_<k)}[r_k] with n_samples draws (None: cfg.log_z_samples).

        k = 0: one expectation (the top group's context is the decoder's learned constant). k > 0: Z_k depends on
        z_<k, so this is the mean over n_contexts contexts z_<k ~ p of the per-context log Ẑ_k (nested Monte Carlo).
        """
        _check_group(self.vae, k)
        n_samples = self.cfg.log_z_samples if n_samples is None else n_samples
        if n_samples < 1 or n_contexts < 1:
            raise ValueError(f"log_z_estimate: n_samples={n_samples} and n_contexts={n_contexts} must be >= 1")
        if k == 0:
            context = self.vae.group_context(0, self.vae.top_state(1))
        else:
            steps, _ = self.vae.prior_path(self.vae.standard_eps(n_contexts))
            context = steps[k].context
        return self.log_normalizer(k, context, n_samples)[0].mean().item()

    @torch.no_grad()
    def ncp_gain(self, x_batches: Iterable, n_prior_samples: int | None = None) -> dict[str, Any]:
        """Per group, E_q[log r_k] − E_q[log Z_k(z_<k)] over x from `x_batches` and z ~ q(z|x): the estimated drop of
        KL(q‖p) when p(z_k|z_<k) becomes r_k·p/Z_k (nats per example; > 0 means the NCP prior fits q better).

        x_batches yields images (B, C, H, W) in [0, 1] or (images, labels) pairs. log Z_k is estimated at each
        posterior context from n_prior_samples prior draws (None: cfg.log_z_samples). Returns {"gain": [per group],
        "e_q_log_r": [...], "e_q_log_z": [...], "total": Σ gain, "examples": N}.
        """
        n_prior_samples = self.cfg.log_z_samples if n_prior_samples is None else n_prior_samples
        groups = self.num_groups
        sum_r, sum_z, count = [0.0] * groups, [0.0] * groups, 0
        device = _device(self.vae)
        for x in _image_chunks(x_batches, self.cfg.sample_batch_size):
            walk = _posterior_walk(self.vae, x.to(device), groups - 1)
            for k, (z, _, context) in enumerate(walk):
                sum_r[k] += self.log_r(k, z, context).double().sum().item()
                sum_z[k] += self.log_normalizer(k, context, n_prior_samples)[0].sum().item()
            count += x.shape[0]
        if count == 0:
            raise ValueError("ncp_gain: x_batches yielded no images")
        e_r = [s / count for s in sum_r]
        e_z = [s / count for s in sum_z]
        gain = [r - z for r, z in zip(e_r, e_z)]
        return {"gain": gain, "e_q_log_r": e_r, "e_q_log_z": e_z, "total": sum(gain), "examples": count}

    # ------------------------------------------------------------------------------------------------------------
    # The likelihood under the NCP prior.

    def _posterior_rows(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """NVAE's own log w = log p(x|z) + log p(z) − log q(z|x) for one z ~ q(z|x) per row, (R,) float64, and the
        (z_k, c_k) of every group on that path: the latents and decoder contexts it fed to `group_absorb`, recorded
        there, so the prior correction is scored on exactly the z the base weight used."""
        vae, calls = self.vae, []
        absorb = vae.group_absorb

        def record(k: int, context: Tensor, z: Tensor) -> Tensor:
            calls.append((k, context, z))
            return absorb(k, context, z)

        vae.group_absorb = record  # an instance attribute shadows the method for this one pass
        try:
            base = vae.log_weights(x)
        finally:
            del vae.group_absorb
        if [k for k, _, _ in calls] != list(range(self.num_groups)):
            raise RuntimeError(
                f"NCPVAE: the VAE's log_weights absorbed groups {[k for k, _, _ in calls]}, expected each of "
                f"0..{self.num_groups - 1} once along one posterior path; this VAE does not follow NVAE's top-down hooks"
            )
        return base.double(), [(z, context) for _, context, z in calls]

    def _top_normalizer(self, n_samples: int) -> tuple[Tensor, Tensor, Tensor]:
        """(context, log Ẑ_0, Var[log Ẑ_0]) of the top group, whose context is the decoder's learned constant."""
        context = self.vae.group_context(0, self.vae.top_state(1))
        log_z, var = self.log_normalizer(0, context, n_samples)
        return context, log_z[0], var[0]

    def _ncp_rows(self, x: Tensor, n_samples: int, top: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(base log w, Σ_k (log r_k − log Ẑ_k), Σ_k≥1 Var[log Ẑ_k] with the top group's Ẑ from `top` wherever the
        row's top context is the shared constant), each (R,) float64."""
        base, walk = self._posterior_rows(x)
        correction, var = torch.zeros_like(base), torch.zeros_like(base)
        for k, (z, context) in enumerate(walk):
            correction += self.log_r(k, z, context).double()
            if k == 0 and torch.equal(context, top[0].expand_as(context)):
                correction -= top[1]
            else:
                log_z, v = self.log_normalizer(k, context, n_samples)
                correction -= log_z
                var += v
        if not (torch.isfinite(base).all() and torch.isfinite(correction).all()):
            raise RuntimeError("NCPVAE: non-finite importance weights (check the VAE and classifiers for NaN weights)")
        return base, correction, var

    @torch.no_grad()
    def log_weights(self, x: Tensor, n_samples: int | None = None) -> Tensor:
        """(B,) log p(x|z) + log p_NCP(z) − log q(z|x) for one z ~ q(z|x), where
        log p_NCP(z) = log p(z) + Σ_k (log r_k(z_k, c_k) − log Ẑ_k(c_k)) and each Ẑ_k comes from n_samples prior
        draws at the row's context (None: cfg.log_z_samples; the top group's shared Ẑ_0 from 64× as many). With
        `vae.metrics.importance_weighted_nll` this is the NCP model's bound; `importance_weighted_nll` here also
        states the Monte Carlo error of the Ẑ's."""
        n_samples = self.cfg.log_z_samples if n_samples is None else int(n_samples)
        base, correction, _ = self._ncp_rows(x.to(_device(self.vae)), n_samples, self._top_normalizer(64 * n_samples))
        return base + correction

    @torch.no_grad()
    def importance_weighted_nll(
        self,
        batches: Iterable,
        k: int = 100,
        n_samples: int | None = None,
        top_samples: int | None = None,
        rows_per_pass: int = 1024,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """−log p_NCP(x), nats per example averaged over every x of `batches`, by importance sampling with K draws
        z_i ~ q(z|x) of the frozen encoder:
            log p̂_NCP(x) = logmeanexp_i [log w_i + Σ_k (log r_k(z_ik, c_ik) − log Ẑ_k(c_ik))],
        log w_i NVAE's own importance weight and c_ik the decoder context of group k given z_i,<k. Ẑ_k (k ≥ 1) from
        n_samples fresh prior draws at every (draw, group) (None: cfg.log_z_samples); the top group's Ẑ_0, whose
        context is a constant, once from top_samples draws (None: 64·n_samples). The base NVAE's IW-NLL is computed on
        the same draws, so "gain" = base − NCP is a paired difference (> 0: the NCP prior explains the data better).

        Monte Carlo error of the Ẑ's, by the delta method (∂ log p̂(x)/∂ log Ẑ_ik = −π_i, the normalised NCP weights;
        independent draws per (x, i, k ≥ 1), one shared Ẑ_0):
            mc_se² = Var[log Ẑ_0] + N⁻² Σ_x Σ_i π_xi² Σ_k≥1 Var[log Ẑ_xik],
        and the plug-in's Jensen bias, mc_bias ≈ Var[log Ẑ_0]/2 + N⁻¹ Σ_x Σ_i π_xi Σ_k≥1 Var[log Ẑ_xik]/2: the NLL
        estimate is too low by about mc_bias. Neither includes the IW bound's own gap (shrinking with K) or the
        spread over examples.

        batches: images (N, C, H, W) in [0, 1], or batches of them or of (images, labels) pairs; each pass scores about rows_per_pass
        rows; progress(draws done) after each pass (N·K draws in all). Returns {"nll", "base_nll", "gain", "mc_se",
        "mc_bias", "log_z_top", "log_z_top_se", "k", "z_samples", "top_samples", "examples"}.
        """
        n_samples = self.cfg.log_z_samples if n_samples is None else int(n_samples)
        top_samples = 64 * n_samples if top_samples is None else int(top_samples)
        if k < 1 or n_samples < 2 or top_samples < 2 or rows_per_pass < 1:
            raise ValueError(
                f"importance_weighted_nll: k={k} must be >= 1, n_samples={n_samples} and top_samples={top_samples} "
                f">= 2 (a Monte Carlo error needs two draws), rows_per_pass={rows_per_pass} >= 1"
            )
        device = _device(self.vae)
        if torch.is_tensor(batches):
            batches = [batches]
        top = self._top_normalizer(top_samples)
        nll_sum, base_sum, var_sum, bias_sum, count, done = 0.0, 0.0, 0.0, 0.0, 0, 0
        for x in _image_chunks(batches, rows_per_pass):
            x, b = x.to(device), x.shape[0]
            copies_per_pass = max(1, rows_per_pass // b)
            base_w, ncp_w, var_w = [], [], []
            for start in range(0, k, copies_per_pass):
                copies = min(copies_per_pass, k - start)
                base, correction, var = self._ncp_rows(x.repeat(copies, 1, 1, 1), n_samples, top)
                base_w.append(base.view(copies, b))  # copy c is rows c·B .. c·B + B − 1
                ncp_w.append((base + correction).view(copies, b))
                var_w.append(var.view(copies, b))
                done += copies * b
                if progress is not None:
                    progress(done)
            base_w, ncp_w, var_w = torch.cat(base_w), torch.cat(ncp_w), torch.cat(var_w)  # (K, B)
            weights = torch.softmax(ncp_w, dim=0)
            nll_sum -= (torch.logsumexp(ncp_w, dim=0) - math.log(k)).sum().item()
            base_sum -= (torch.logsumexp(base_w, dim=0) - math.log(k)).sum().item()
            var_sum += (weights.pow(2) * var_w).sum().item()
            bias_sum += 0.5 * (weights * var_w).sum().item()
            count += b
        if count == 0:
            raise ValueError("importance_weighted_nll: batches yielded no images")
        var0 = top[2].item()
        return {
            "nll": nll_sum / count, "base_nll": base_sum / count, "gain": (base_sum - nll_sum) / count,
            "mc_se": math.sqrt(var0 + var_sum / count**2), "mc_bias": 0.5 * var0 + bias_sum / count,
            "log_z_top": top[1].item(), "log_z_top_se": math.sqrt(var0), "k": k, "z_samples": n_samples,
            "top_samples": top_samples, "examples": count,
        }


# ----------------------------------------------------------------------------------------------------------------
# Helpers.


def _draw(normal: Any) -> Tensor:
    """One sample μ + σ·ε of a Normal-like object with `mu` and `sigma`."""
    return normal.mu + normal.sigma * torch.randn_like(normal.mu)


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _chunk_sizes(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


def _require_eval(vae: nn.Module, name: str) -> None:
    if vae.training:
        raise ValueError(
            f"{name}: the VAE is in training mode, so its BatchNorm layers would update their running statistics and "
            "the latents would depend on the batch; call vae.eval() (or vae.ncp.freeze(vae)) first"
        )


def _check_group(vae: nn.Module, k: int) -> None:
    if not isinstance(k, int) or not 0 <= k < vae.num_groups:
        raise ValueError(f"group k={k!r} is out of range; the VAE has groups 0..{vae.num_groups - 1} (0 = top)")


def _check_classifiers(vae: nn.Module, classifiers: Sequence[nn.Module]) -> None:
    fix = "train one classifier per group of THIS VAE (train_group_classifier(vae, k, ...) for each group k)"
    if len(classifiers) != vae.num_groups:
        raise ValueError(
            f"NCPVAE: got {len(classifiers)} classifiers for a VAE with {vae.num_groups} latent groups; {fix}"
        )
    channels = context_channels(vae)
    for k, clf in enumerate(classifiers):
        if not isinstance(clf, nn.Module):
            raise TypeError(f"NCPVAE: classifier {k} is a {type(clf).__name__}, not an nn.Module (a GroupClassifier)")
        shape = tuple(getattr(clf, "latent_shape", ()))
        if shape != tuple(vae.latent_shapes[k]):
            raise ValueError(
                f"NCPVAE: classifier {k} scores latents of shape {shape}, but the VAE's group {k} has "
                f"{tuple(vae.latent_shapes[k])}; these classifiers belong to another VAE: {fix}"
            )
        if getattr(clf, "context_channels", None) != channels[k]:
            raise ValueError(
                f"NCPVAE: classifier {k} reads a decoder context of {getattr(clf, 'context_channels', None)} channels, "
                f"but the VAE's group {k} has {channels[k]}; these classifiers belong to another VAE: {fix}"
            )


def _image_chunks(batches: Iterable, size: int) -> Iterator[Tensor]:
    """Image tensors of at most `size` rows from batches of images or (images, labels) pairs."""
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
            raise TypeError(
                "batches must yield float image tensors (B, C, H, W) in [0, 1] or (images, labels) pairs, got "
                f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}; convert uint8 images with "
                "x.float() / 255"
            )
        yield from images.split(size)

