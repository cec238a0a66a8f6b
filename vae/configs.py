"""The hyperparameters of each model family as frozen, validated dataclasses: NVAE (with its named presets, the
published numbers written out), the NCP classifiers, and GWAE.

They import neither torch nor the models, so a config loads, validates and prints in a fraction of a second; the
model files (`vae.nvae`, `vae.ncp`, `vae.gwae`) re-export them next to the modules they configure.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from typing import ClassVar, Literal

from vae.config import Config, ConfigError, in_range, non_negative, one_of, positive

# CR-VAE's transformation presets (vae.crvae builds them).
TRANSFORM_PRESETS = ("identity", "simple", "large", "flip", "color")


@dataclasses.dataclass(frozen=True)
class NVAEConfig(Config):
    _prefix: ClassVar[str] = "nvae."
    # Images the model sees (C, H, W) in [0, 1], after any padding (MNIST: 28 padded to 32).
    image_shape: tuple[int, int, int] = dataclasses.field(default=(1, 16, 16), metadata=positive())
    # The loss ignores this many pixels on each side (MNIST: 2, scoring the central 28×28 of the 32×32 pad).
    crop: int = dataclasses.field(default=0, metadata=non_negative())
    # --- architecture (NVAE's flag names); channels double at each down-sampling
    num_channels_enc: int = dataclasses.field(default=16, metadata=positive())
    num_channels_dec: int = dataclasses.field(default=16, metadata=positive())
    num_preprocess_blocks: int = dataclasses.field(default=1, metadata=non_negative())  # each halves H and W
    num_preprocess_cells: int = dataclasses.field(default=1, metadata=positive())
    num_postprocess_blocks: int = dataclasses.field(default=1, metadata=non_negative())  # each doubles H and W
    num_postprocess_cells: int = dataclasses.field(default=1, metadata=positive())
    num_latent_scales: int = dataclasses.field(default=2, metadata=positive())
    num_groups_per_scale: int = dataclasses.field(default=2, metadata=positive())  # at the finest scale
    ada_groups: bool = False  # halve the group count at each coarser scale ...
    min_groups_per_scale: int = dataclasses.field(default=1, metadata=positive())  # ... down to this floor
    num_latent_per_group: int = dataclasses.field(default=4, metadata=positive())  # latent channels per group
    num_cell_per_cond_enc: int = dataclasses.field(default=1, metadata=positive())
    num_cell_per_cond_dec: int = dataclasses.field(default=1, metadata=positive())
    num_nf: int = dataclasses.field(default=0, metadata=non_negative())  # paired shift flows per group
    use_se: bool = True
    # --- decoder distribution: discretized logistic mixture, Bernoulli, or σ-VAE Gaussian (σ* / learned / fixed)
    decoder: Literal["dml", "bernoulli", "gaussian_optimal", "gaussian_learned", "gaussian_fixed"] = "dml"
    num_mixture_dec: int = dataclasses.field(default=10, metadata=positive())
    num_x_bits: int = dataclasses.field(default=8, metadata=in_range(1, 8))
    fixed_sigma: float = dataclasses.field(default=1.0, metadata=positive())  # gaussian_fixed only
    # --- KL warm-up β_t = max(min((t − const·T)/(anneal·T), 1), const_coeff) and KL balancing while β_t < 1
    kl_anneal_portion: float = dataclasses.field(default=0.3, metadata=in_range(0.0, 1.0, lo_open=True))
    kl_const_portion: float = dataclasses.field(default=1e-4, metadata=in_range(0.0, 1.0))
    kl_const_coeff: float = dataclasses.field(default=1e-4, metadata=in_range(0.0, 1.0))
    kl_balance: bool = True
    # --- spectral regularisation λ_SR (0 turns it off); optionally annealed log-linearly from lambda_sr_init
    lambda_sr: float = dataclasses.field(default=1e-2, metadata=non_negative())
    sr_anneal: bool = False
    lambda_sr_init: float = dataclasses.field(default=10.0, metadata=positive())
    sr_power_iters: int = dataclasses.field(default=4, metadata=positive())
    # --- CR-VAE: λ (0 = off) and the transformation preset of vae.crvae
    cr_lambda: float = dataclasses.field(default=0.0, metadata=non_negative())
    cr_transform: str = dataclasses.field(default="simple", metadata=one_of(*TRANSFORM_PRESETS))

    @property
    def num_downsamplings(self) -> int:
        return self.num_preprocess_blocks + self.num_latent_scales - 1

    @property
    def scored_dims(self) -> int:
        """How many values the likelihood scores, C·(H − 2·crop)·(W − 2·crop): what bits/dim divides by (784 for
        MNIST padded to 32×32 with crop 2)."""
        c, h, w = self.image_shape
        return c * (h - 2 * self.crop) * (w - 2 * self.crop)

    def validate(self) -> None:
        c, h, w = self.image_shape
        factor = 2**self.num_downsamplings
        for side_name, side in (("height", h), ("width", w)):
            if side % factor:
                lower = side // factor * factor
                near = f"{lower} or {lower + factor}" if lower else f"{factor}"
                raise ConfigError(
                    f"{self._key('image_shape')}: {list(self.image_shape)} has {side_name} {side}, which cannot be "
                    f"halved {self.num_downsamplings} times ({self.num_preprocess_blocks} pre-process blocks + "
                    f"{self.num_latent_scales} latent scales − 1); use a multiple of {factor}, e.g. {near} (pad or "
                    f"resize the data), or lower {self._key('num_preprocess_blocks')} / "
                    f"{self._key('num_latent_scales')}"
                )
        k = self._key
        checks = [
            (self.num_postprocess_blocks != self.num_preprocess_blocks, "num_postprocess_blocks",
             f"must equal {k('num_preprocess_blocks')}={self.num_preprocess_blocks} (each post-process block undoes "
             "one pre-process down-sampling); set both to the same value"),
            (2 * self.crop >= min(h, w), "crop",
             f"leaves nothing of a {h}×{w} image; use a crop below {(min(h, w) + 1) // 2} (0 scores all of it)"),
            (self.decoder == "dml" and c > 4, "decoder",
             f"models 1 to 4 image channels, image_shape has {c}; use a gaussian_* decoder"),
            (self.ada_groups and self.min_groups_per_scale > self.num_groups_per_scale, "min_groups_per_scale",
             f"exceeds {k('num_groups_per_scale')}={self.num_groups_per_scale}; the floor must not be above it"),
            (self.kl_const_portion + self.kl_anneal_portion > 1.0, "kl_anneal_portion",
             f"+ {k('kl_const_portion')}={self.kl_const_portion} > 1: the KL warm-up would outlast training"),
            (self.sr_anneal and self.lambda_sr == 0, "sr_anneal",
             f"needs {k('lambda_sr')} > 0 (the annealing is log-linear); set lambda_sr=1e-2 or sr_anneal=false"),
        ]
        for failed, name, why in checks:
            if failed:
                raise ConfigError(f"{k(name)}: {getattr(self, name)!r} {why}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "NVAEConfig":
        """A named configuration ("tiny", "mnist", "cifar10", "celeba64") with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown NVAE preset {name!r}; choose one of {', '.join(PRESETS)}")
        unknown = [k for k in overrides if k not in cls.field_names()]
        if unknown:
            known = ", ".join(cls.field_names())
            raise ConfigError(f"unknown key nvae.{unknown[0]!r} in preset overrides; known keys: {known}")
        return PRESETS[name].replace(**overrides)


# "tiny" (ours): 2 scales × 2 groups on 16×16 images, for tests and the demo. The others are the published models
# (README commands and paper App. A), every architecture number written out.
_BASE = NVAEConfig()
PRESETS: dict[str, NVAEConfig] = {
    "tiny": _BASE,
    "mnist": _BASE.replace(
        image_shape=(1, 32, 32), crop=2, decoder="bernoulli",
        num_channels_enc=32, num_channels_dec=32,
        num_preprocess_blocks=2, num_preprocess_cells=3, num_postprocess_blocks=2, num_postprocess_cells=3,
        num_latent_scales=2, num_groups_per_scale=10, ada_groups=True, min_groups_per_scale=1,
        num_latent_per_group=20, num_cell_per_cond_enc=2, num_cell_per_cond_dec=2,
        num_nf=0, use_se=True, lambda_sr=1e-2,
    ),
    "cifar10": _BASE.replace(
        image_shape=(3, 32, 32), crop=0, decoder="dml", num_mixture_dec=10, num_x_bits=8,
        num_channels_enc=128, num_channels_dec=128,
        num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
        num_latent_scales=1, num_groups_per_scale=30, ada_groups=False,
        num_latent_per_group=20, num_cell_per_cond_enc=2, num_cell_per_cond_dec=2,
        num_nf=1, use_se=True, lambda_sr=1e-2,
    ),
    "celeba64": _BASE.replace(
        image_shape=(3, 64, 64), crop=0, decoder="dml", num_mixture_dec=10, num_x_bits=8,
        num_channels_enc=64, num_channels_dec=64,
        num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2,
        num_latent_scales=3, num_groups_per_scale=20, ada_groups=True, min_groups_per_scale=1,
        num_latent_per_group=20, num_cell_per_cond_enc=2, num_cell_per_cond_dec=2,
        num_nf=1, use_se=True, lambda_sr=1e-1,
    ),
}


@dataclasses.dataclass(frozen=True)
class NCPConfig(Config):
    _prefix: ClassVar[str] = "ncp."
    # --- the classifier D_k of each group: residual CNN width and depth
    classifier_channels: int = dataclasses.field(default=32, metadata=positive())
    classifier_blocks: int = dataclasses.field(default=2, metadata=positive())
    # --- training, per group: at most `steps` AdamW steps of `batch_size` images (larger batches are split)
    steps: int = dataclasses.field(default=2000, metadata=positive())
    batch_size: int = dataclasses.field(default=64, metadata=positive())
    lr: float = dataclasses.field(default=1e-3, metadata=positive())
    weight_decay: float = dataclasses.field(default=1e-4, metadata=non_negative())
    # Held-out NCE loss every `eval_every` steps on pairs from the first `val_examples` validation images; stop after
    # `patience` evaluations without improvement (0: never stop early) and keep the best weights.
    eval_every: int = dataclasses.field(default=100, metadata=positive())
    val_examples: int = dataclasses.field(default=1024, metadata=in_range(2, None))
    patience: int = dataclasses.field(default=5, metadata=non_negative())
    seed: int = 0
    # --- sampling: SIR proposals M per group; Langevin steps and step size η in ε space; prior temperature
    sir_proposals: int = dataclasses.field(default=50, metadata=positive())
    langevin_steps: int = dataclasses.field(default=100, metadata=positive())
    langevin_step_size: float = dataclasses.field(default=0.05, metadata=in_range(0.0, 2.0, lo_open=True))
    temperature: float = dataclasses.field(default=1.0, metadata=non_negative())
    sample_batch_size: int = dataclasses.field(default=64, metadata=positive())  # samples drawn together
    log_z_samples: int = dataclasses.field(default=256, metadata=positive())  # prior draws S per context for Ẑ_k
    # --- read by the ncp stage (pipelines/): resources of each group's Ray task, samples per method to evaluate
    cpus_per_group: float = dataclasses.field(default=1.0, metadata=positive())
    gpus_per_group: float = dataclasses.field(default=0.0, metadata=non_negative())
    eval_samples: int = dataclasses.field(default=500, metadata=in_range(4, None))
    # torch-fidelity's Inception-v3 weights (a local path or an MLflow artifact URI) to add Inception FID/KID to the
    # stage's evaluation; "" leaves them out (they are never downloaded).
    inception_weights: str = ""


# ----------------------------------------------------------------------------------------------------------------
# The classifier.




@dataclasses.dataclass(frozen=True)
class GWAEConfig(Config):
    _prefix: ClassVar[str] = "gwae."
    # Images (C, H, W) in [0, 1]; square with a power-of-two side ≥ 8 (the encoder halves it down to 4×4).
    image_shape: tuple[int, int, int] = dataclasses.field(default=(1, 16, 16), metadata=positive())
    z_dim: int = dataclasses.field(default=64, metadata=positive())
    prior: Literal["np", "fnp", "gmp", "gaussian", "uniform"] = "np"
    num_components: int = dataclasses.field(default=10, metadata=positive())  # K of the "gmp" prior
    # --- architecture: encoder widths base·(1, 2, 4, 8), FC hidden_dim; critic x-branch widths critic_channels·2^i
    base_channels: int = dataclasses.field(default=32, metadata=positive())
    hidden_dim: int = dataclasses.field(default=256, metadata=positive())
    critic_channels: int = dataclasses.field(default=8, metadata=positive())
    # --- objective weights (paper names λ_W, λ_D, λ_H; code coef_w, coef_d, coef_qentropy)
    lambda_w: float = dataclasses.field(default=1.0, metadata=non_negative())
    lambda_d: float = dataclasses.field(default=1.0, metadata=non_negative())
    lambda_h: float = dataclasses.field(default=0.03, metadata=non_negative())
    # c's initial value; null starts it from the first training batch (mean pixel distance / √(2·z_dim)). The
    # reference code starts at 2.5 whatever the data.
    distance_coef_init: float | None = dataclasses.field(default=None, metadata=positive())
    # --- critic: gradient-penalty weight γ, drift δ (inside the ×γ), updates per model update
    gp_weight: float = dataclasses.field(default=10.0, metadata=non_negative())
    drift: float = dataclasses.field(default=1e-4, metadata=non_negative())
    critic_steps: int = dataclasses.field(default=5, metadata=positive())
    # --- RMSprop learning rates, and how many skipped (non-finite) model updates in a row are tolerated
    lr: float = dataclasses.field(default=1e-4, metadata=positive())
    lr_critic: float = dataclasses.field(default=1e-4, metadata=positive())
    lr_distance_coef: float = dataclasses.field(default=1e-2, metadata=positive())  # log c's own rate
    max_consecutive_skips: int = dataclasses.field(default=10, metadata=positive())
    # Soft bound b on the encoder's log σ² (b·tanh(·/b), NVAE's ±5 on log σ); null turns it off. L_H rewards large
    # σ without limit, so once the decoder ignores z nothing stops log σ² growing until z̃ overflows.
    logvar_bound: float | None = dataclasses.field(default=10.0, metadata=positive())

    def validate(self) -> None:
        key = self._key("image_shape")
        _, h, w = self.image_shape
        if h != w:
            raise ConfigError(
                f"{key}: {list(self.image_shape)} is not square; GWAE's conv stacks halve height and width together, "
                f"so resize or pad the data to a square power-of-two side (e.g. {_nearest_pow2(max(h, w))})"
            )
        if h < 8 or h & (h - 1):
            raise ConfigError(
                f"{key}: side {h} is not a power of two >= 8; the encoder halves it with stride-2 convs down to 4×4, "
                f"so resize the data to 8, 16, 32 or 64 (nearest: {_nearest_pow2(h)})"
            )
        if self.prior == "gmp" and self.num_components < 2:
            raise ConfigError(
                f"{self._key('num_components')}: {self.num_components} is not a mixture; the 'gmp' prior needs >= 2 "
                "components (10 for digits), or use prior='np'"
            )

    @classmethod
    def for_images(cls, shape: Sequence[int], **overrides) -> "GWAEConfig":
        """The config for a data set of images `shape` = [C, H, W] (as in dataset.json), other fields overridden."""
        if len(shape) != 3:
            raise ConfigError(f"gwae.image_shape: expected [C, H, W], got {list(shape)}; add the channel count")
        names = cls.field_names()
        for k in overrides:
            if k == "image_shape":
                raise ConfigError("gwae.image_shape: pass the shape once, as for_images' first argument")
            if k not in names:
                hint = difflib.get_close_matches(k, names, n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(names)}"
                raise ConfigError(f"unknown key gwae.{k!r}{more}")
        return cls(image_shape=tuple(int(s) for s in shape), **overrides)


def _nearest_pow2(n: int) -> int:
    return max(8, 2 ** round(math.log2(max(n, 1))))


