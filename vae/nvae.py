"""NVAE: a deep hierarchical VAE (Vahdat & Kautz, "NVAE: A Deep Hierarchical Variational Autoencoder", NeurIPS 2020),
with σ-VAE decoders (Rybkin et al., ICML 2021) and CR-VAE consistency regularisation (Sinha & Dieng, NeurIPS 2021).

Model (paper Sec. 3, Fig. 2): latents z = (z_1 .. z_L) in groups over spatial scales; the top-down decoder
starts from a learned constant and visits the groups coarsest scale first. The prior is p(z_1) = N(0, I) and
p(z_l | z_<l) = N(μ_p, σ_p) from the decoder state (ELU, 1×1 conv); the posterior is residual,
q(z_l | z_<l, x) = N(μ_p + Δμ, σ_p·Δσ) (Eq. 2), (Δμ, log Δσ) from a 3×3 conv of the bottom-up encoder features
plus a 1×1 conv of the decoder state. Optional shift-only autoregressive flows act on posterior samples
(log-det 0).

Objective per step (NVAE's training code): recon + β_t·Σ_l γ_l·KL_l + λ_SR·(Σ_conv σ_max(W) + Σ_BN max|γ|),
β_t the KL warm-up and γ the KL balancing coefficients (`vae.regularizers`). Without flows KL_l is the analytic
Gaussian KL given the sampled z_<l; with flows it is the single-sample log q(z_l|·) − log p(z_l|·).

CR-NVAE (Sinha & Dieng, 2021, Eq. 3 applied group by group): ELBO(x) + ELBO(t(x)) − λ·Σ_l KL(q(z_l|z_<l, t(x)) ‖ q(z_l|z_<l, x)), z sampled along
one path from q(·|t(x)) and both conditionals evaluated on the same decoder state. The flows do not see x, so the KL
of the base Normals equals the KL after the (shared) flow exactly.

Departures, each for a stated reason:
- A reading that gives expansion-3 inverted-residual cells to both pre- and post-process is tempting. Pre-process belongs to the
  encoder, and the `res_mbconv` recipe is "BN-Swish cells in the encoder, depthwise-separable cells in the
  decoder", so pre-process uses encoder (BN-Swish) cells and only post-process uses the expansion-3 cells.
- The encoder sees what the likelihood scores: DML inputs are rounded to `num_x_bits`, Bernoulli inputs binarised
  at 0.5 (the Bernoulli decoder scores x > 0.5), Gaussian inputs are left continuous.
- The top prior is exactly N(0, I) (its raw log σ is set so that exp(clamp(·)) + 1e-2 = 1), not N(0, 1.01²).
- BN re-adjustment resets the decoder's running statistics and takes their exact average over the sampled batches
  (cumulative average) instead of an EMA over 500 batches, and skips batches with non-finite outputs.
- In eval mode the loss is the plain negative ELBO (β = 1, no balancing, no SR, no CR), and it is a probability for
  every decoder: the Gaussian decoders score the bin masses of the discretized Gaussian at `num_x_bits` (σ-VAE's
  discrete variant) with a σ that does not depend on the batch (optimal σ: the running estimate of the training
  MSE), so nats and bits/dim compare across decoders and an image's score does not depend on its batch.
- Likelihoods and KLs are computed in fp32 even under autocast.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from vae.configs import PRESETS, NVAEConfig  # noqa: F401  (re-exported: `from vae.nvae import NVAEConfig`)
from vae.crvae import consistency_kl, make_transform
from vae.distributions import (
    SIGMA_FLOOR,
    GaussianDecoder,
    Normal,
    OutputDistribution,
    make_output_distribution,
    output_channels,
)
from vae.layers import BN_MOMENTUM, Conv2d, DecoderCell, EncoderCell, PairedFlow
from vae.regularizers import (
    SpectralRegularizer,
    affine_norms,
    balanced_kl,
    batchnorm_penalty,
    kl_balance_alphas,
    kl_coefficient,
    sr_coefficient,
)

# Raw log σ of the top prior: exp(5·tanh(r/5)) + 1e-2 = 1 exactly, so p(z_1) is N(0, I).
_TOP_LOG_SIGMA = 5.0 * math.atanh(math.log(1.0 - SIGMA_FLOOR) / 5.0)


@dataclasses.dataclass
class GroupStep:
    """One latent group k on a top-down path. Shapes: z, eps (B, C_z, h_k, w_k); context (B, C_dec_k, h_k, w_k)."""

    prior: Normal  # p(z_k | z_<k), from `context`
    posterior: Normal | None  # base Normal of q(z_k | z_<k, x) before the flows; None on a prior path
    z: Tensor  # what the decoder consumed (after the flows on a posterior path)
    eps: Tensor  # the standard-normal noise behind z (z_base = μ + σ·ε of the posterior, or of the prior)
    context: Tensor  # decoder state summarising z_<k, after group k's decoder cells
    log_q: Tensor | None  # (B,) log q(z_k | z_<k, x) (the flows only shift: log-det 0); None on a prior path


@dataclasses.dataclass
class NVAEOutput:
    """What `NVAE.forward` returns. Per-example values are in nats; pixel sums run over the (cropped) image."""

    loss: Tensor  # () to minimise: see NVAE.forward
    nelbo: Tensor  # (B,) recon + Σ kl_per_group (β = 1)
    recon: Tensor  # (B,) −log p(x | z)
    kl_per_group: Tensor  # (B, L)
    log_px_z: Tensor  # (B,) log p(x | z) for the one sampled z
    log_pz: Tensor  # (B,) log p(z) = Σ_l log p(z_l | z_<l)
    log_qz: Tensor  # (B,) log q(z | x) = Σ_l log q(z_l | z_<l, x)
    dist: OutputDistribution  # p(x | z) over the whole image, for reconstructions
    stats: dict[str, Tensor]  # detached: beta, kl_total, gammas (L,); training: lambda_sr, sr_loss, bn_loss, cr_kl;
    # Gaussian decoders: sigma, equivalent_beta, and in eval mode nelbo_continuous (batch mean of the negative ELBO
    # under the continuous density, the training objective's scale; nelbo itself is then the discretized one)


@dataclasses.dataclass
class _Elbo:
    feats: list[Tensor]
    steps: list[GroupStep]
    loss_dist: OutputDistribution
    dist: OutputDistribution
    log_px: Tensor  # (B,)
    log_px_continuous: Tensor | None  # (B,) the continuous Gaussian density when log_px is its discretization
    kl: Tensor  # (B, L)
    log_p: Tensor  # (B, L)
    cr_kl: Tensor | None  # (B,)


class NVAE(nn.Module):
    """x (B, C, H, W) in [0, 1] -> NVAEOutput. Groups are indexed top-down: k = 0 is the top (coarsest) group."""

    def __init__(self, cfg: NVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c_img, height, width = cfg.image_shape
        c_z, se, pre, n_scales = cfg.num_latent_per_group, cfg.use_se, cfg.num_preprocess_blocks, cfg.num_latent_scales

        bottom_up, n = [], cfg.num_groups_per_scale
        for _ in range(n_scales):
            bottom_up.append(n)
            if cfg.ada_groups:
                n = max(n // 2, cfg.min_groups_per_scale)
        self.groups_per_scale: list[int] = bottom_up[::-1]  # coarsest scale first, the decoder's order
        self.num_groups = sum(bottom_up)
        scale_of = [i for i, g in enumerate(self.groups_per_scale) for _ in range(g)]  # group -> scale (0 = coarsest)
        hs = [height // 2 ** (pre + n_scales - 1 - i) for i in range(n_scales)]
        ws = [width // 2 ** (pre + n_scales - 1 - i) for i in range(n_scales)]
        self.latent_shapes: list[tuple[int, int, int]] = [(c_z, hs[s], ws[s]) for s in scale_of]
        enc_ch = [cfg.num_channels_enc * 2 ** (pre + n_scales - 1 - i) for i in range(n_scales)]
        dec_ch = [cfg.num_channels_dec * 2 ** (pre + n_scales - 1 - i) for i in range(n_scales)]

        # Bottom-up encoder: stem, pre-process (last cell of each block down-samples), tower (finest scale first).
        ch = cfg.num_channels_enc
        self.stem = Conv2d(c_img, ch, 3, padding=1)
        cells = []
        for _ in range(pre):
            for i in range(cfg.num_preprocess_cells):
                down = i == cfg.num_preprocess_cells - 1
                cells.append(EncoderCell(ch, down=down, use_se=se))
                ch = 2 * ch if down else ch
        self.preprocess = nn.Sequential(*cells)
        self.enc_groups = nn.ModuleList()
        self.enc_down = nn.ModuleList()
        self._enc_down_after: dict[int, int] = {}  # last encoder group of bottom-up scale s -> down cell s
        for s, groups in enumerate(bottom_up):
            for _ in range(groups):
                cells = [EncoderCell(ch, use_se=se) for _ in range(cfg.num_cell_per_cond_enc)]
                self.enc_groups.append(nn.Sequential(*cells))
            if s < n_scales - 1:
                self._enc_down_after[len(self.enc_groups) - 1] = s
                self.enc_down.append(EncoderCell(ch, down=True, use_se=se))
                ch *= 2
        self.enc0 = nn.Sequential(nn.ELU(), Conv2d(enc_ch[0], enc_ch[0], 1))

        # Top-down decoder. Modules of groups k >= 1 only (the top group has no cells, a fixed prior and no decoder
        # state to condition on) are indexed k − 1, so no parameter is ever unused (DDP requires it).
        self.top_state0 = nn.Parameter(torch.randn(1, dec_ch[0], hs[0], ws[0]))
        self.dec_groups = nn.ModuleList(
            nn.Sequential(*(DecoderCell(dec_ch[scale_of[k]], 6, use_se=se) for _ in range(cfg.num_cell_per_cond_dec)))
            for k in range(1, self.num_groups)
        )
        self.prior_heads = nn.ModuleList(
            nn.Sequential(nn.ELU(), Conv2d(dec_ch[scale_of[k]], 2 * c_z, 1)) for k in range(1, self.num_groups)
        )
        self.post_context = nn.ModuleList(
            Conv2d(dec_ch[scale_of[k]], enc_ch[scale_of[k]], 1) for k in range(1, self.num_groups)
        )
        self.post_heads = nn.ModuleList(
            Conv2d(enc_ch[scale_of[k]], 2 * c_z, 3, padding=1) for k in range(self.num_groups)
        )
        self.combiners = nn.ModuleList(
            Conv2d(dec_ch[scale_of[k]] + c_z, dec_ch[scale_of[k]], 1) for k in range(self.num_groups)
        )
        self.flows = nn.ModuleList(
            nn.Sequential(*(PairedFlow(c_z) for _ in range(cfg.num_nf))) for _ in range(self.num_groups)
        )
        self.dec_up = nn.ModuleList(DecoderCell(dec_ch[i], 6, up=True, use_se=se) for i in range(n_scales - 1))
        ends = [sum(self.groups_per_scale[: i + 1]) - 1 for i in range(n_scales - 1)]
        self._up_after = {k: i for i, k in enumerate(ends)}  # last group of scale i -> up cell i

        # Post-process (first cell of each block up-samples), then the output head.
        ch = dec_ch[-1]
        cells = []
        for _ in range(cfg.num_postprocess_blocks):
            for i in range(cfg.num_postprocess_cells):
                cells.append(DecoderCell(ch, 3, up=i == 0, use_se=se))
                ch = ch // 2 if i == 0 else ch
        self.postprocess = nn.Sequential(*cells)
        out_ch = output_channels(cfg.decoder, c_img, cfg.num_mixture_dec)
        self.head = nn.Sequential(nn.ELU(), Conv2d(ch, out_ch, 3, padding=1))
        if cfg.decoder == "gaussian_learned":
            self.log_sigma = nn.Parameter(torch.zeros(()))  # σ-VAE's shared learned σ, init 1
        if cfg.decoder == "gaussian_optimal":
            # σ for evaluation and sampling, estimated on training data: log of the running average of the training
            # batches' MSE (σ*² = MSE), updated by every training forward, and how many batches it has seen.
            self.register_buffer("running_log_sigma", torch.zeros(()))
            self.register_buffer("sigma_updates", torch.zeros((), dtype=torch.long))

        # Schedules (set_step) live in buffers so that checkpoints carry them; until set_step runs: β = 1, λ = λ_SR.
        self.register_buffer("kl_beta", torch.tensor(1.0))
        self.register_buffer("sr_lambda", torch.tensor(float(cfg.lambda_sr)))
        self.register_buffer("kl_alphas", kl_balance_alphas(self.groups_per_scale, hs), persistent=False)
        shapes = [m.weight.shape for m in self.modules() if isinstance(m, Conv2d)]  # = their effective kernels
        self.spectral = SpectralRegularizer(shapes, cfg.sr_power_iters) if cfg.lambda_sr > 0 else None

    # ----------------------------------------------------------------------------------------------------------
    # Building blocks of the paths, public so that NCP (per-group classifiers, SIR, Langevin) can drive the decoder.

    def encode(self, x: Tensor) -> list[Tensor]:
        """x (B, C, H, W) in [0, 1] -> encoder features per group, top-down: [k] is (B, C_enc_k, h_k, w_k)."""
        self._check_input(x)
        s = self.preprocess(self.stem(2.0 * self._as_scored(x) - 1.0))
        feats = []
        for i, cells in enumerate(self.enc_groups):
            s = cells(s)
            feats.append(s)
            if i in self._enc_down_after:
                s = self.enc_down[self._enc_down_after[i]](s)
        feats[-1] = self.enc0(feats[-1])  # the top group reads the end of the tower
        return feats[::-1]

    def top_state(self, batch_size: int) -> Tensor:
        """The learned constant the decoder starts from, (B, C_dec_0, h_0, w_0)."""
        return self.top_state0.expand(batch_size, -1, -1, -1)

    def group_context(self, k: int, state: Tensor) -> Tensor:
        """Run group k's decoder cells on the state (identity for the top group)."""
        return state if k == 0 else self.dec_groups[k - 1](state)

    def group_prior(self, k: int, context: Tensor, temperature: float = 1.0) -> Normal:
        """p(z_k | z_<k) (B, C_z, h_k, w_k); the temperature multiplies σ."""
        if k == 0:
            shape = (context.shape[0], *self.latent_shapes[0])
            zeros = torch.zeros(shape, device=context.device)
            return Normal(zeros, torch.full_like(zeros, _TOP_LOG_SIGMA), temperature)
        mu, log_sigma = self.prior_heads[k - 1](context).float().chunk(2, dim=1)
        return Normal(mu, log_sigma, temperature)

    def group_posterior(self, k: int, context: Tensor, feature: Tensor, prior: Normal) -> Normal:
        """Residual posterior q(z_k | z_<k, x) before flows, from encoder feature k and the decoder context."""
        h = feature if k == 0 else feature + self.post_context[k - 1](context)
        delta_mu, delta_log_sigma = self.post_heads[k](h).float().chunk(2, dim=1)
        return Normal.residual(prior, delta_mu, delta_log_sigma)

    def group_flow(self, k: int, z0: Tensor) -> Tensor:
        """Group k's posterior flows (identity without flows): base sample z0 -> z, log-det 0."""
        return self.flows[k](z0)

    def group_absorb(self, k: int, context: Tensor, z: Tensor) -> Tensor:
        """Combine z_k into the decoder state (concat, 1×1 conv); up-sample when group k ends a scale."""
        state = self.combiners[k](torch.cat([context, z.to(context.dtype)], dim=1))
        return self.dec_up[self._up_after[k]](state) if k in self._up_after else state

    def decode(self, state: Tensor) -> Tensor:
        """Final decoder state -> output-distribution parameters (B, output_channels, H, W)."""
        return self.head(self.postprocess(state)).float()

    def output_distribution(self, params: Tensor) -> OutputDistribution:
        cfg = self.cfg
        log_sigma = None
        if cfg.decoder == "gaussian_learned":
            log_sigma = self.log_sigma
        elif cfg.decoder == "gaussian_optimal":
            log_sigma = self.running_log_sigma
        return make_output_distribution(
            cfg.decoder, params, num_channels=cfg.image_shape[0], num_mix=cfg.num_mixture_dec,
            num_bits=cfg.num_x_bits, log_sigma=log_sigma, fixed_sigma=cfg.fixed_sigma, fit_sigma=self.training,
        )

    @property
    def scored_dims(self) -> int:
        """How many values the likelihood scores, C·(H − 2·crop)·(W − 2·crop): bits/dim = NLL / (scored_dims·ln 2)."""
        return self.cfg.scored_dims

    # ----------------------------------------------------------------------------------------------------------
    # Paths through the hierarchy.

    def _posterior_path(
        self, feats: list[Tensor], use_mean: bool = False, cross: list[Tensor] | None = None,
        log_q_graph: bool = True,
    ) -> tuple[list[GroupStep], Tensor, Tensor | None]:
        """Sample z ~ q(z|x) group by group. With `cross` (another input's features) also sum over groups the
        KL(q(z_k|z_<k, this input) ‖ q(z_k|z_<k, other input)) on the same decoder states -> (B,)."""
        state = self.top_state(feats[0].shape[0])
        steps, cross_kl = [], None
        for k in range(self.num_groups):
            context = self.group_context(k, state)
            prior = self.group_prior(k, context)
            q = self.group_posterior(k, context, feats[k], prior)
            if use_mean:
                z0, eps = q.mu, torch.zeros_like(q.mu)
            else:
                z0, eps = q.sample()
            z = self.group_flow(k, z0)
            with torch.set_grad_enabled(log_q_graph and torch.is_grad_enabled()):
                log_q = q.log_prob(z0).flatten(1).sum(1)
            steps.append(GroupStep(prior, q, z, eps, context, log_q))
            if cross is not None:
                q_other = self.group_posterior(k, context, cross[k], prior)
                kl = consistency_kl(q.mu, q.sigma, q_other.mu, q_other.sigma)
                cross_kl = kl if cross_kl is None else cross_kl + kl
            state = self.group_absorb(k, context, z)
        return steps, state, cross_kl

    def encode_path(self, x: Tensor) -> list[GroupStep]:
        """One posterior sample z ~ q(z|x), group by group, with each group's prior, posterior, z and context."""
        steps, _, _ = self._posterior_path(self.encode(x))
        return steps

    def prior_path(self, eps: list[Tensor], temperature: float = 1.0) -> tuple[list[GroupStep], Tensor]:
        """z_k = μ_k + T·σ_k·ε_k through the prior, group by group. eps[k] (B, *latent_shapes[k]).
        Differentiable in eps (Langevin in ε space). Returns the steps and the final decoder state."""
        if len(eps) != self.num_groups:
            raise ValueError(f"prior_path: got {len(eps)} noise tensors, the model has {self.num_groups} groups")
        state = self.top_state(eps[0].shape[0])
        steps = []
        for k in range(self.num_groups):
            context = self.group_context(k, state)
            prior = self.group_prior(k, context, temperature)
            z = prior.sample_given_eps(eps[k])
            steps.append(GroupStep(prior, None, z, eps[k], context, None))
            state = self.group_absorb(k, context, z)
        return steps, state

    def decode_from_eps(
        self, eps: list[Tensor], temperature: float = 1.0
    ) -> tuple[OutputDistribution, list[GroupStep]]:
        """Decode prior noise: p(x | z(ε)) and the per-group steps."""
        steps, state = self.prior_path(eps, temperature)
        return self.output_distribution(self.decode(state)), steps

    def standard_eps(self, batch_size: int) -> list[Tensor]:
        """ε ~ N(0, I) for every group: [(B, *latent_shapes[k])]."""
        device = self.top_state0.device
        return [torch.randn(batch_size, *shape, device=device) for shape in self.latent_shapes]

    # ----------------------------------------------------------------------------------------------------------
    # Objective.

    def _elbo(self, x: Tensor, cross: list[Tensor] | None = None, log_pq_graph: bool = True) -> _Elbo:
        """log_pq_graph=False computes the per-group log p and log q without autograd history (a loss without flows
        uses the analytic KL instead)."""
        feats = self.encode(x)
        steps, state, cross_kl = self._posterior_path(feats, cross=cross, log_q_graph=log_pq_graph)
        params = self.decode(state)
        dist = self.output_distribution(params)
        c = self.cfg.crop
        loss_dist = dist if c == 0 else self.output_distribution(params[:, :, c:-c, c:-c])
        target = x if c == 0 else x[:, :, c:-c, c:-c]
        with torch.autocast(x.device.type, enabled=False):  # the likelihood in fp32 under any autocast
            log_px = loss_dist.log_prob(target).flatten(1).sum(1)
            log_px_continuous = None
            if not self.training and isinstance(loss_dist, GaussianDecoder):
                log_px_continuous = log_px
                log_px = loss_dist.discretized(self.cfg.num_x_bits).log_prob(target).flatten(1).sum(1)
            with torch.set_grad_enabled(log_pq_graph and torch.is_grad_enabled()):
                log_p = torch.stack([s.prior.log_prob(s.z.float()).flatten(1).sum(1) for s in steps], dim=1)
            if self.cfg.num_nf > 0:
                kl = torch.stack([s.log_q for s in steps], dim=1) - log_p
            else:
                kl = torch.stack([s.posterior.kl(s.prior).flatten(1).sum(1) for s in steps], dim=1)
        return _Elbo(feats, steps, loss_dist, dist, log_px, log_px_continuous, kl, log_p, cross_kl)

    def forward(self, x: Tensor) -> NVAEOutput:
        """x (B, C, H, W) in [0, 1] -> NVAEOutput.

        Training: loss = mean_B[recon + β_t·Σ_l γ_l·KL_l] + λ_SR·(Σ σ_max + Σ max|γ_BN|), plus with CR
        mean_B[recon(t(x)) + β_t·Σ γ·KL(t(x)) + λ_CR·KL(q(·|t(x)) ‖ q(·|x))]. Eval: loss = mean_B[nelbo].
        """
        if not (self.training and self.spectral is not None and torch.is_grad_enabled()):
            return self._forward(x, [])
        convs = self._penalty_layers()[0]
        for m in convs:  # the spectral penalty reuses the kernels this forward computes
            m.keep_weight = True
        try:
            return self._forward(x, convs)
        finally:
            for m in convs:
                m.keep_weight, m.kept_weight = False, None

    def _forward(self, x: Tensor, kept: list[Conv2d]) -> NVAEOutput:
        cfg = self.cfg
        e = self._elbo(x, log_pq_graph=cfg.num_nf > 0)  # without flows the loss needs no log p or log q graph
        beta = float(self.kl_beta) if self.training else 1.0
        kl_term, gammas = balanced_kl(e.kl, self.kl_alphas, beta, cfg.kl_balance)
        per_example = kl_term - e.log_px
        stats: dict[str, Tensor] = {"beta": self.kl_beta.new_tensor(beta), "gammas": gammas.detach()}
        if self.training and cfg.cr_lambda > 0:
            e_t = self._elbo(make_transform(cfg.cr_transform)(x), cross=e.feats, log_pq_graph=cfg.num_nf > 0)
            kl_term_t, _ = balanced_kl(e_t.kl, self.kl_alphas, beta, cfg.kl_balance)
            per_example = per_example + kl_term_t - e_t.log_px + cfg.cr_lambda * e_t.cr_kl
            stats["cr_kl"] = e_t.cr_kl.mean().detach()
        loss = per_example.mean()
        if self.training and self.spectral is not None:
            weights = [m.kept_weight if m.kept_weight is not None else m.effective_weight() for m in kept]
            sr = self.spectral(weights if kept else self.sr_weights())
            bn = batchnorm_penalty(self._penalty_layers()[1])
            loss = loss + self.sr_lambda * (sr + bn)  # the buffer, not float(): no device sync mid-step
            stats.update(lambda_sr=self.sr_lambda.detach().clone(), sr_loss=sr.detach(), bn_loss=bn.detach())
        if cfg.decoder.startswith("gaussian"):
            stats.update(sigma=e.loss_dist.sigma.detach(), equivalent_beta=e.loss_dist.equivalent_beta.detach())
            if self.training and cfg.decoder == "gaussian_optimal":
                self._update_running_sigma(e.loss_dist.batch_mse)
            if e.log_px_continuous is not None:
                stats["nelbo_continuous"] = (e.kl.sum(1) - e.log_px_continuous).mean().detach()
        recon = -e.log_px
        stats["kl_total"] = e.kl.sum(1).mean().detach()
        return NVAEOutput(
            loss=loss, nelbo=recon + e.kl.sum(1), recon=recon, kl_per_group=e.kl, log_px_z=e.log_px,
            log_pz=e.log_p.sum(1), log_qz=torch.stack([s.log_q for s in e.steps], dim=1).sum(1), dist=e.dist,
            stats=stats,
        )

    @torch.no_grad()
    def _update_running_sigma(self, batch_mse: Tensor) -> None:
        """running MSE ← lerp(running MSE, batch MSE, m) with m = max(BN momentum, 1/(n + 1)) after n batches: the plain
        average of the first batches, then an exponential one, so that no trace of the initial σ = 1 is left."""
        rate = (1.0 / (self.sigma_updates + 1).float()).clamp_min(BN_MOMENTUM)
        mse = torch.exp(2.0 * self.running_log_sigma).lerp(batch_mse.to(self.running_log_sigma), rate)
        self.running_log_sigma.copy_(0.5 * torch.log(mse.clamp_min(1e-30)))
        self.sigma_updates.add_(1)

    def set_step(self, step: int, total_steps: int) -> None:
        """Set the KL warm-up β_t and the spectral weight λ_SR for optimiser step `step` of `total_steps`."""
        cfg = self.cfg
        warmup = (cfg.kl_anneal_portion, cfg.kl_const_portion, cfg.kl_const_coeff)
        self.kl_beta.fill_(kl_coefficient(step, total_steps, *warmup))
        if cfg.lambda_sr > 0:
            lam = sr_coefficient(step, total_steps, cfg.lambda_sr, cfg.sr_anneal, cfg.lambda_sr_init, *warmup)
            self.sr_lambda.fill_(lam)

    def sr_weights(self) -> list[Tensor]:
        """The effective kernels of every conv layer, in a fixed order: what the spectral regulariser sees."""
        return [m.effective_weight() for m in self._penalty_layers()[0]]

    def _penalty_layers(self) -> tuple[list[Conv2d], list[nn.Module]]:
        """The conv layers (in module order) and the affine BN layers the penalties read, found on first use (after
        any BN conversion, e.g. to SyncBatchNorm) instead of walking the modules every step."""
        layers = self.__dict__.get("_penalty_cache")
        if layers is None:
            layers = ([m for m in self.modules() if isinstance(m, Conv2d)], affine_norms(self))
            self._penalty_cache = layers
        return layers

    # ----------------------------------------------------------------------------------------------------------
    # Using a trained model.

    def log_weights(self, x: Tensor) -> Tensor:
        """(B,) log p(x|z) + log p(z) − log q(z|x) for one z ~ q(z|x); logsumexp over K of these (x repeated K
        times) minus log K is the importance-weighted bound."""
        e = self._elbo(x)
        return e.log_px + e.log_p.sum(1) - torch.stack([s.log_q for s in e.steps], dim=1).sum(1)

    @property
    def picture_mode(self) -> Literal["sample", "mean"]:
        """What `sample` draws unless told: the mean of p(x|z) for the Bernoulli decoder (pixel probabilities, which
        is how NVAE shows its binarised-MNIST samples: independent binary draws read as noise, to eyes and to feature
        extractors alike), a sample of p(x|z) for every other decoder."""
        return "mean" if self.cfg.decoder == "bernoulli" else "sample"

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, mode: Literal["sample", "mean"] | None = None) -> Tensor:
        """(n, C, H, W) in [0, 1]: z from the prior with every σ multiplied by `temperature`, then a sample of
        p(x|z) or its mean (None: `picture_mode`). Uses the current mode: call eval() first, and for NVAE's sampling
        protocol draw inside `bn_readjusted(temperature)`."""
        if temperature < 0:
            raise ValueError(f"sample: temperature {temperature} must be >= 0 (1 is the model; 0.6-0.9 are typical)")
        dist, _ = self.decode_from_eps(self.standard_eps(n), temperature)
        return self._draw(dist, mode or self.picture_mode)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mode: Literal["sample", "mean"] = "mean") -> Tensor:
        """(B, C, H, W) in [0, 1]: decode one z ~ q(z|x)."""
        _, state, _ = self._posterior_path(self.encode(x))
        return self._draw(self.output_distribution(self.decode(state)), mode)

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> list[Tensor]:
        """μ of each group's base posterior (B, *latent_shapes[k]), along the path that feeds every group the
        means of the groups above (deterministic; with flows z_k is flow(μ_k), and μ_k is the pre-flow mean)."""
        steps, _, _ = self._posterior_path(self.encode(x), use_mean=True)
        return [s.posterior.mu for s in steps]

    @torch.no_grad()
    def readjust_bn(self, num_batches: int = 100, batch_size: int = 16, temperature: float = 1.0) -> int:
        """Re-estimate the decoder's BN running statistics from prior samples at `temperature` (NVAE's
        --readjust_bn), as the exact average over `num_batches` batches. A batch whose decoder output or statistics
        are non-finite is skipped (its update undone). Leaves the model in eval mode; returns the skipped count."""
        if num_batches < 1 or batch_size < 2:
            raise ValueError(
                f"readjust_bn: need num_batches >= 1 and batch_size >= 2 (batch norm), got {num_batches}, {batch_size}"
            )
        bns = self._decoder_norms()
        buffers = _norm_buffers(bns)
        original = [t.clone() for t in buffers]
        momenta = [bn.momentum for bn in bns]
        skipped = 0
        try:
            self.train()
            for bn in bns:
                bn.momentum = None  # cumulative average over the batches
                bn.reset_running_stats()
            for _ in range(num_batches):
                before = [t.clone() for t in buffers]
                _, state = self.prior_path(self.standard_eps(batch_size), temperature)
                finite = [torch.isfinite(self.decode(state)).all()] + [torch.isfinite(t).all() for t in buffers]
                if not bool(torch.stack(finite).all()):
                    _copy_into(buffers, before)
                    skipped += 1
            if skipped == num_batches:
                raise RuntimeError(
                    f"readjust_bn: all {num_batches} batches at temperature {temperature} gave non-finite outputs; "
                    "the running statistics were left unchanged. Check the model for NaN weights or lower the "
                    "temperature"
                )
        except BaseException:
            _copy_into(buffers, original)
            raise
        finally:
            for bn, momentum in zip(bns, momenta):
                bn.momentum = momentum
            self.eval()
        return skipped

    @contextlib.contextmanager
    def bn_readjusted(self, temperature: float, num_batches: int = 20, batch_size: int = 100):
        """A block in which the decoder's BN statistics are re-estimated at `temperature` (`readjust_bn`: NVAE's
        sampling protocol, which matters most below temperature 1) and the model is in eval mode; on leaving it the
        trained statistics and the previous train/eval mode come back. num_batches=0 leaves the statistics as they
        are (the block only switches to eval mode)."""
        buffers = _norm_buffers(self._decoder_norms())
        saved = [t.clone() for t in buffers]
        was_training = self.training
        try:
            if num_batches > 0:
                self.readjust_bn(num_batches, batch_size, temperature)
            self.eval()
            yield self
        finally:
            with torch.no_grad():
                _copy_into(buffers, saved)
            self.train(was_training)

    def _decoder_norms(self) -> list[nn.BatchNorm2d]:
        return [m for part in (self.dec_groups, self.dec_up, self.postprocess) for m in part.modules()
                if isinstance(m, nn.BatchNorm2d)]

    # ----------------------------------------------------------------------------------------------------------

    def _as_scored(self, x: Tensor) -> Tensor:
        """The input as the likelihood scores it: n-bit levels (DML), binary (Bernoulli), as is (Gaussians)."""
        if self.cfg.decoder == "dml":
            levels = 2**self.cfg.num_x_bits - 1
            return torch.round(x * levels) / levels
        if self.cfg.decoder == "bernoulli":
            return (x > 0.5).to(x.dtype)
        return x

    def _check_input(self, x: Tensor) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point():
            got = getattr(x, "dtype", type(x))
            raise TypeError(f"NVAE expects a float tensor in [0, 1], got {got}; convert 8-bit images: x.float() / 255")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.cfg.image_shape:
            raise ValueError(
                f"NVAE expects images of shape (B, {', '.join(map(str, self.cfg.image_shape))}) (nvae.image_shape), "
                f"got {tuple(x.shape)}; resize or pad the data, or set nvae.image_shape={list(x.shape[1:])}"
            )
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(
                f"NVAE expects pixel values in [0, 1], got [{x.min().item():.3g}, {x.max().item():.3g}] (or NaN); "
                "map [-1, 1] data with (x + 1) / 2"
            )

    @staticmethod
    def _draw(dist: OutputDistribution, mode: str) -> Tensor:
        if mode == "mean":
            return dist.mean()
        if mode == "sample":
            return dist.sample()
        raise ValueError(f"mode {mode!r} is not 'sample' or 'mean'")


def _norm_buffers(bns: list[nn.BatchNorm2d]) -> list[Tensor]:
    return [t for bn in bns for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def _copy_into(tensors: list[Tensor], values: list[Tensor]) -> None:
    for t, v in zip(tensors, values):
        t.copy_(v)
