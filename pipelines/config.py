"""The pipeline's configuration: one frozen dataclass per part, composed in `PipelineConfig`.

    cfg = load_config("configs/demo.yaml", overrides=["train.epochs=5"])

Loading validates everything before anything starts: an unknown key, a wrong type or a value out of range is a
`ConfigError` naming the key, the value and what is allowed. `--set a.b=v` overrides parse `v` as YAML and then
convert it to the field's type.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from pipelines.errors import ConfigError
from vae.config import Config, in_range, non_negative, positive
from vae.config import ConfigError as ModelConfigError
from vae.configs import GWAEConfig, NCPConfig, NVAEConfig


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    _prefix: ClassVar[str] = "data."
    # Where the prepared Parquet dataset lives (any pyarrow filesystem path); prepared on demand.
    path: str = "runs/data/digits16"
    source: Literal["digits", "shapes", "regions", "mnist", "cifar10", "celeba64", "folder"] = "digits"
    # Image side after preparation; None keeps the source's own size (digits: 8, shapes: 64).
    image_size: Optional[int] = None
    # Folder of images for source=folder; download cache for torchvision sources.
    source_path: Optional[str] = None
    # source=folder: read symlinks that lead outside the folder (refused by default: a link can expose any file).
    follow_symlinks: bool = False
    cache_dir: str = "~/.cache/vaepipe"
    seed: int = 0
    # Procedural shapes: how many, and RGB (with a hue factor) or grey.
    num_examples: int = dataclasses.field(default=20000, metadata=positive())
    rgb: bool = False
    val_fraction: float = dataclasses.field(default=0.1, metadata=in_range(0.0, 0.5))
    test_fraction: float = dataclasses.field(default=0.1, metadata=in_range(0.0, 0.5))
    # How the stored grey levels reach the model (the Parquet keeps them as they are). "dynamic": every time an
    # image is drawn for training it is x ~ Bernoulli(grey level); validation and evaluation draw with a fixed seed,
    # so their figures repeat. The Bernoulli decoder needs it (binarised MNIST).
    binarize: Literal["none", "dynamic"] = "none"
    # Random horizontal flips of training images (CIFAR-10, CelebA); never applied to validation or test images.
    hflip: bool = False
    # Random translations of training images by up to this many pixels each way (zero-filled), drawn afresh each
    # epoch; never applied to validation or test images. The demo's 1,437 digits need it (see configs/demo.yaml).
    shift: int = dataclasses.field(default=0, metadata=non_negative())

    def validate(self) -> None:
        if self.image_size is not None and self.image_size < 4:
            raise ConfigError(f"data.image_size: {self.image_size} is too small; use >= 4 or null for the source's size")
        if self.source == "folder" and not self.source_path:
            raise ConfigError("data.source_path: source 'folder' needs the image folder; set data.source_path=/path/to/images")


@dataclasses.dataclass(frozen=True)
class TrackingConfig(Config):
    _prefix: ClassVar[str] = "tracking."
    # Local directory for the default sqlite store and artifacts (and Ray storage when none is set).
    workdir: str = "runs"
    # Any MLflow tracking URI; None means $MLFLOW_TRACKING_URI if set, else sqlite:///<workdir>/mlflow.db.
    tracking_uri: Optional[str] = None
    # Artifact root for experiments this pipeline creates; None means <workdir>/mlartifacts.
    artifact_location: Optional[str] = None
    # Seconds to wait for a tracking server before failing (never hang).
    connect_timeout_s: float = dataclasses.field(default=10.0, metadata=positive())
    registry_uri: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    _prefix: ClassVar[str] = "train."
    epochs: int = dataclasses.field(default=10, metadata=positive())
    # The GLOBAL batch: images per optimizer step over all workers (a recipe means the same on 1 worker or 64).
    # Each worker takes batch_size / max workers of them per forward pass (`worker_batch_size`), so it must divide.
    batch_size: int = dataclasses.field(default=128, metadata=positive())
    # Workers: a number, or [min, max] for elastic training. Elastic, Ray Train runs as many as the cluster has room
    # for between min and max, shrinks when a node is lost and grows when one joins (checked every
    # elastic_resize_interval_s), restarting from the last checkpoint; with fewer than max workers each accumulates
    # gradients over max / workers forward passes, so the global batch stays batch_size.
    num_workers: Union[int, tuple[int, int]] = dataclasses.field(default=2, metadata=in_range(0, None))
    elastic_resize_interval_s: float = dataclasses.field(default=60.0, metadata=positive())
    use_gpu: bool = False
    cpus_per_worker: float = dataclasses.field(default=1.0, metadata=positive())
    gpus_per_worker: float = dataclasses.field(default=1.0, metadata=non_negative())
    lr: float = dataclasses.field(default=1e-2, metadata=positive())
    lr_min: float = dataclasses.field(default=1e-4, metadata=non_negative())
    weight_decay: float = dataclasses.field(default=3e-4, metadata=non_negative())
    adamax_eps: float = dataclasses.field(default=1e-3, metadata=positive())
    warmup_epochs: float = dataclasses.field(default=5.0, metadata=non_negative())
    # Clip the global gradient norm to this (0 = no clipping, as NVAE).
    grad_clip: float = dataclasses.field(default=200.0, metadata=non_negative())
    ema_decay: float = dataclasses.field(default=0.999, metadata=in_range(0.0, 1.0))
    use_ema: bool = True  # NVAE keeps no EMA: the recipes turn it off
    # Mixed precision on GPU (CPU runs stay fp32): bf16 autocast, fp16 with a GradScaler (NVAE's), or none.
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    channels_last: bool = True  # GPU only
    # Skip updates whose gradient norm is non-finite or above this (0 = only non-finite); cap skips in a row.
    skip_grad_norm: float = dataclasses.field(default=0.0, metadata=non_negative())
    max_skipped_steps: int = dataclasses.field(default=20, metadata=positive())
    # Rows in the seeded local shuffle buffer of each worker's data stream (0 = stream order). A dataset held in
    # memory (below) is shuffled fully each epoch whenever this is > 0.
    shuffle_buffer: int = dataclasses.field(default=2048, metadata=non_negative())
    # Datasets whose train + val images take at most this many MB (decoded, uint8) are read once by each worker
    # into memory (its 1/workers share) and shuffled there every epoch; larger ones stream through Ray Data, which
    # starts a new read pipeline for every epoch and validation pass. 0 always streams. Each worker reads the whole
    # split once to take its share, so a node briefly holds about this much per worker while they start.
    in_memory_max_mb: float = dataclasses.field(default=2048.0, metadata=non_negative())
    # Validate (val/* figures, pictures) every this many epochs, and always at the end of the run.
    val_every_epochs: int = dataclasses.field(default=1, metadata=positive())
    log_every_steps: int = dataclasses.field(default=20, metadata=positive())
    checkpoint_every_steps: int = dataclasses.field(default=200, metadata=positive())
    keep_checkpoints: int = dataclasses.field(default=3, metadata=positive())
    # Restarts of all workers from the last checkpoint after a worker or node is lost (a divergence is not retried).
    max_failures: int = dataclasses.field(default=3, metadata=non_negative())
    # Validation importance-weighted NLL: K samples on the first N validation images of each worker.
    val_iw_samples: int = dataclasses.field(default=10, metadata=positive())
    val_iw_examples: int = dataclasses.field(default=128, metadata=non_negative())
    # At the end, this many samples at temperatures 0.7 and 1.0 are shown to the judge of samples (labelled data
    # only: a second classifier trained on the labels) for eval/judge_* figures; 0 turns it off.
    judge_samples: int = dataclasses.field(default=500, metadata=non_negative())
    # NVAE's sampling protocol: before the sample pictures and the judge's samples at each temperature, the decoder's
    # BN statistics are re-estimated from this many batches of 100 prior samples at that temperature (the trained
    # statistics are kept in the model); 0 draws with the training statistics.
    sample_bn_batches: int = dataclasses.field(default=20, metadata=non_negative())
    # Stop after this many steps (smoke runs); the LR and KL schedules still span all epochs.
    max_steps: Optional[int] = dataclasses.field(default=None, metadata=positive())
    seed: int = 0
    # Ray storage for checkpoints; None means <tracking.workdir>/ray.
    storage_path: Optional[str] = None

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def world_size(self) -> int:
        """Workers at full size (num_workers=0 trains in one process)."""
        return max(1, self.max_workers)

    @property
    def worker_batch_size(self) -> int:
        """Images each worker takes per forward pass: the global batch split evenly over the most workers."""
        return self.batch_size // self.world_size

    def accumulation(self, world: int) -> int:
        """Forward passes per optimizer step for `world` workers: enough that world × passes ≥ the most workers
        (exactly the global batch whenever `world` divides the maximum)."""
        return -(-self.world_size // max(1, world))

    def validate(self) -> None:
        if self.lr_min > self.lr:
            raise ConfigError(f"train.lr_min: {self.lr_min} is above train.lr={self.lr}; the cosine decay goes down to lr_min")
        if isinstance(self.num_workers, tuple) and not 1 <= self.min_workers <= self.max_workers:
            raise ConfigError(f"train.num_workers: {list(self.num_workers)} is not [min, max] with 1 <= min <= max; "
                              f"e.g. [1, 4] trains on 1 to 4 workers (elastic), or give one number")
        world = self.world_size
        if self.batch_size % world:
            lower = self.batch_size // world * world
            fits = [n for n in range(1, min(self.batch_size, 64) + 1) if self.batch_size % n == 0]
            raise ConfigError(
                f"train.batch_size: {self.batch_size} is the global batch and does not divide over "
                f"train.num_workers={self.num_workers}; set train.batch_size to a multiple of {world} "
                f"(e.g. {lower or world} or {lower + world}), or train.num_workers to one of "
                f"{', '.join(map(str, fits[-8:]))}"
            )


def _regions_data() -> "DataConfig":
    # 20,000 images leave 3,000 per held-out split: 2,000+ for DCI after the OoD class is set aside.
    return DataConfig(path="runs/data/regions16", source="regions", image_size=16, num_examples=20000,
                      val_fraction=0.15, test_fraction=0.15)


@dataclasses.dataclass(frozen=True)
class TuneConfig(Config):
    _prefix: ClassVar[str] = "tune."
    # The data the GWAE search trains on (regions: four independent, visible factors for DCI).
    data: DataConfig = dataclasses.field(default_factory=_regions_data)
    # A search-space YAML: a path, or the name of a file shipped in tune_spaces/ (e.g. gwae_weights).
    space: str = "gwae_weights"
    num_samples: int = dataclasses.field(default=8, metadata=positive())
    max_concurrent_trials: int = dataclasses.field(default=2, metadata=positive())
    # Training budget per trial (ASHA's max_t, in epochs) and its early-stopping schedule.
    epochs: int = dataclasses.field(default=10, metadata=positive())
    steps_per_epoch: Optional[int] = dataclasses.field(default=None, metadata=positive())
    batch_size: int = dataclasses.field(default=64, metadata=positive())
    scheduler: Literal["asha", "none"] = "asha"
    # ASHA's first cut, in epochs: at least 40% of tune.epochs, so it ranks trained models rather than noise.
    grace_period: int = dataclasses.field(default=4, metadata=positive())
    reduction_factor: int = dataclasses.field(default=2, metadata=in_range(2, None))
    search: Literal["optuna", "random"] = "optuna"
    # What the search optimises: a reported metric name (e.g. dci, auroc, psnr) or "objective", the weighted sum
    # Σ objective_weights[m]·m of reported metrics.
    metric: str = "objective"
    mode: Literal["max", "min"] = "max"
    objective_weights: dict = dataclasses.field(default_factory=lambda: {"dci": 1.0, "psnr": 0.01})
    cpus_per_trial: float = dataclasses.field(default=1.0, metadata=positive())
    gpus_per_trial: float = dataclasses.field(default=0.0, metadata=non_negative())
    # Validation images scored after every epoch (PSNR, DCI, AUROC, NMI/ARI): DCI's forests cost ~1 s per 1000;
    # fewer than 2,000 make DCI noisy. The chosen model is scored again on as many test images.
    eval_examples: int = dataclasses.field(default=2000, metadata=in_range(20, None))
    # The OoD set for AUROC: this label held out of training (its val/test images: same domain, unseen), or
    # uniform-noise images (null), which any model separates.
    ood_class: Optional[int] = dataclasses.field(default=3, metadata=non_negative())
    # Restarts of a crashed trial from its last checkpoint; checkpoints kept per trial (the best by `metric`).
    max_failures: int = dataclasses.field(default=1, metadata=non_negative())
    keep_checkpoints: int = dataclasses.field(default=2, metadata=positive())
    seed: int = 0
    # Ray Tune storage; None means <tracking.workdir>/ray.
    storage_path: Optional[str] = None

    def validate(self) -> None:
        if self.scheduler == "asha" and self.grace_period > self.epochs:
            raise ConfigError(
                f"tune.grace_period: {self.grace_period} is above tune.epochs={self.epochs}; ASHA's first cut comes "
                f"after grace_period epochs, so lower it or raise tune.epochs"
            )
        if self.scheduler == "asha" and self.grace_period < 0.4 * self.epochs:
            raise ConfigError(
                f"tune.grace_period: {self.grace_period} is under 40% of tune.epochs={self.epochs}; ASHA would cut "
                f"trials on barely trained models (noise): use >= {math.ceil(0.4 * self.epochs)}, or "
                f"tune.scheduler=none"
            )
        for name, weight in self.objective_weights.items():
            if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(
                    f"tune.objective_weights: {name!r}: {weight!r} must map a metric name to a number, "
                    f"e.g. {{dci: 1.0, psnr: 0.01}}"
                )


@dataclasses.dataclass(frozen=True)
class PaperConfig(Config):
    """The published figure a recipe reproduces; `vaepipe evaluate` prints the run's own figure beside it."""

    _prefix: ClassVar[str] = "paper."
    # What the paper reports: NLL in nats (MNIST), bits per dimension (colour images) or Inception FID (NCP-VAE);
    # None = no figure.
    metric: Optional[Literal["nll_nats", "bpd", "fid"]] = None
    value: Optional[float] = dataclasses.field(default=None, metadata=positive())
    # The split and importance samples K the paper's figure was measured with.
    split: Literal["train", "val", "test"] = "test"
    iw_samples: int = dataclasses.field(default=1000, metadata=positive())
    source: str = ""  # the paper (and table) the figure comes from

    def validate(self) -> None:
        if (self.metric is None) != (self.value is None):
            raise ConfigError(
                f"paper: metric={self.metric!r} and value={self.value!r} go together; set both (e.g. "
                f"{{metric: nll_nats, value: 78.01}}) or neither"
            )


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Config):
    _prefix: ClassVar[str] = ""
    # Names the MLflow experiment (vaepipe/<name>) and the registered models (<name>-nvae, ...).
    name: str = "demo"
    stages: tuple[str, ...] = ("train",)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    nvae: NVAEConfig = dataclasses.field(default_factory=NVAEConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    ncp: NCPConfig = dataclasses.field(default_factory=NCPConfig)
    gwae: GWAEConfig = dataclasses.field(default_factory=lambda: GWAEConfig(image_shape=(1, 16, 16)))
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    paper: PaperConfig = dataclasses.field(default_factory=PaperConfig)

    STAGES: ClassVar[tuple[str, ...]] = ("train", "ncp", "tune")

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names MLflow models)")
        for s in self.stages:
            if s not in self.STAGES:
                hint = difflib.get_close_matches(s, self.STAGES, n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"stages: {s!r} is not a stage; choose from {', '.join(self.STAGES)}{more}")
        self._check_data_protocol()

    def _check_data_protocol(self) -> None:
        """Combinations of data and model that would train, but on figures no paper's protocol gives."""
        d, m = self.data, self.nvae
        if m.decoder == "bernoulli" and d.binarize != "dynamic":
            raise ConfigError(
                f"data.binarize: {d.binarize!r} feeds grey levels to nvae.decoder='bernoulli', which models binary "
                f"pixels; set data.binarize=dynamic (each draw is x ~ Bernoulli(grey level), evaluation with a fixed "
                f"seed), or choose a decoder for grey levels (dml, gaussian_*)"
            )
        if d.source == "mnist" and d.image_size in (None, 32) and tuple(m.image_shape[1:]) == (32, 32) and m.crop != 2:
            raise ConfigError(
                f"nvae.crop: {m.crop} scores the 2-pixel zero border that data.source=mnist adds around the 28×28 "
                f"digits (28 padded to 32); set nvae.crop=2 so the likelihood covers the 784 digit pixels"
            )
        t = self.tune.data
        if t.binarize != "none" or t.hflip or t.shift:
            key = "binarize" if t.binarize != "none" else "hflip" if t.hflip else "shift"
            raise ConfigError(
                f"tune.data.{key}: {getattr(t, key)!r} is not applied by the tune stage (GWAE trains on the stored "
                f"images); remove it or set it to {dict(binarize='none', hflip='false', shift='0')[key]}"
            )

    @classmethod
    def from_dict(cls, data, prefix=None):  # type: ignore[override]
        data = dict(data or {})
        nvae = data.get("nvae")
        if isinstance(nvae, dict) and "preset" in nvae:
            # `nvae: {preset: tiny, ...}` starts from a named preset and overrides fields of it.
            nvae = dict(nvae)
            preset = nvae.pop("preset")
            try:
                base = NVAEConfig.preset(preset)
            except (KeyError, ValueError) as e:
                raise ConfigError(f"nvae.preset: {e}") from None
            merged = base.to_dict()
            merged.update(nvae)
            data["nvae"] = merged
        try:
            return super().from_dict(data, prefix="")
        except ConfigError:
            raise
        except ModelConfigError as e:  # a section's own checks (types, ranges): a user error like any other
            raise ConfigError(str(e)) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.epochs=5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `a.b=v` strings to a plain nested dict (validation happens when the config is built)."""
    data = _deepcopy(data)
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def read_yaml(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> dict:
    """A config file as plain data. `base: other.yaml` (relative to the file) starts from that file's sections and
    overrides them key by key, so a recipe built on another repeats none of it (e.g. configs/ncp-mnist.yaml)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such as configs/demo.yaml")
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory; pass a YAML file such as configs/demo.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({e}); pass a readable YAML file") from None
    if data is None:
        # An empty file is almost always a mistake (a truncated copy, the wrong path); all defaults are one
        # `name: ...` line away.
        raise ConfigError(
            f"config file {str(p)!r} is empty; write at least `name: NAME` in it (every other key has a default), "
            f"or start from configs/demo.yaml"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (name, data, nvae, train, ...)")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base: {base!r} in {str(p)!r} must be the path of another config file")
    base_path = Path(base) if Path(base).is_absolute() else p.parent / base
    chain = _chain + (str(p.resolve()),)
    if str(base_path.resolve()) in chain:
        raise ConfigError(f"base: {base!r} in {str(p)!r} makes a cycle ({' -> '.join(chain)} -> {base_path}); "
                          f"a config cannot build on itself")
    if not base_path.exists():
        raise ConfigError(f"base: {base!r} in {str(p)!r} does not exist (looked for {str(base_path)!r})")
    return _merge(read_yaml(base_path, chain), data)


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: sections merge key by key, any other value replaces."""
    out = _deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else _deepcopy(v)
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate everything."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return PipelineConfig.from_dict(data)


def dump_config(cfg: PipelineConfig, redact: bool = True) -> str:
    """The resolved config as YAML; credentials (URIs' user-info, values of secret-named keys) masked unless
    `redact=False`, since this text goes to consoles, config.yaml artifacts and checkpoints."""
    from pipelines.redaction import redact_mapping

    data = cfg.to_dict()
    return yaml.safe_dump(redact_mapping(data) if redact else data, sort_keys=False)
