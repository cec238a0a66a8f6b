"""The pipeline's configuration: one frozen dataclass per part, composed in `PipelineConfig`.

    cfg = load_config("configs/demo.yaml", overrides=["train.epochs=5"])

Loading validates everything before anything starts: an unknown key, a wrong type or a value out of range is a
`ConfigError` naming the key, the value and what is allowed. `--set a.b=v` overrides parse `v` as YAML and then
convert it to the field's type.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from vae.config import Config, ConfigError, in_range, non_negative, positive
from vae.gwae import GWAEConfig
from vae.ncp import NCPConfig
from vae.nvae import NVAEConfig

SOURCES = ("digits", "shapes", "regions", "mnist", "cifar10", "celeba64", "folder")


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
    cache_dir: str = "~/.cache/vaepipe"
    seed: int = 0
    # Procedural shapes: how many, and RGB (with a hue factor) or grey.
    num_examples: int = dataclasses.field(default=20000, metadata=positive())
    rgb: bool = False
    val_fraction: float = dataclasses.field(default=0.1, metadata=in_range(0.0, 0.5))
    test_fraction: float = dataclasses.field(default=0.1, metadata=in_range(0.0, 0.5))

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
    batch_size: int = dataclasses.field(default=64, metadata=positive())  # per worker
    num_workers: int = dataclasses.field(default=2, metadata=in_range(0, None))
    use_gpu: bool = False
    cpus_per_worker: float = dataclasses.field(default=1.0, metadata=positive())
    gpus_per_worker: float = dataclasses.field(default=1.0, metadata=non_negative())
    lr: float = dataclasses.field(default=1e-2, metadata=positive())
    lr_min: float = dataclasses.field(default=1e-4, metadata=non_negative())
    weight_decay: float = dataclasses.field(default=3e-4, metadata=non_negative())
    adamax_eps: float = dataclasses.field(default=1e-3, metadata=positive())
    warmup_epochs: float = dataclasses.field(default=5.0, metadata=non_negative())
    grad_clip: float = dataclasses.field(default=200.0, metadata=positive())
    ema_decay: float = dataclasses.field(default=0.999, metadata=in_range(0.0, 1.0))
    use_ema: bool = True
    # Mixed precision on GPU (CPU runs stay fp32): bf16 autocast, fp16 with a GradScaler, or none.
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    channels_last: bool = True  # GPU only
    # Skip updates whose gradient norm is non-finite or above this (0 = only non-finite); cap skips in a row.
    skip_grad_norm: float = dataclasses.field(default=0.0, metadata=non_negative())
    max_skipped_steps: int = dataclasses.field(default=20, metadata=positive())
    # Rows in the seeded local shuffle buffer of each worker's data stream (0 = stream order).
    shuffle_buffer: int = dataclasses.field(default=2048, metadata=non_negative())
    log_every_steps: int = dataclasses.field(default=20, metadata=positive())
    checkpoint_every_steps: int = dataclasses.field(default=200, metadata=positive())
    keep_checkpoints: int = dataclasses.field(default=3, metadata=positive())
    max_failures: int = dataclasses.field(default=1, metadata=non_negative())
    # Validation importance-weighted NLL: K samples on the first N validation images of each worker.
    val_iw_samples: int = dataclasses.field(default=10, metadata=positive())
    val_iw_examples: int = dataclasses.field(default=128, metadata=non_negative())
    # Stop after this many steps (smoke runs); the LR and KL schedules still span all epochs.
    max_steps: Optional[int] = dataclasses.field(default=None, metadata=positive())
    seed: int = 0
    # Ray storage for checkpoints; None means <tracking.workdir>/ray.
    storage_path: Optional[str] = None

    def validate(self) -> None:
        if self.lr_min > self.lr:
            raise ConfigError(f"train.lr_min: {self.lr_min} is above train.lr={self.lr}; the cosine decay goes down to lr_min")


def _shapes_data() -> "DataConfig":
    return DataConfig(path="runs/data/shapes32", source="shapes", image_size=32, num_examples=6000, rgb=True)


@dataclasses.dataclass(frozen=True)
class TuneConfig(Config):
    _prefix: ClassVar[str] = "tune."
    # The data the GWAE search trains on (shapes: ground-truth factors for DCI).
    data: DataConfig = dataclasses.field(default_factory=_shapes_data)
    # A search-space YAML: a path, or the name of a file shipped in tune_spaces/ (e.g. gwae_weights).
    space: str = "gwae_weights"
    num_samples: int = dataclasses.field(default=8, metadata=positive())
    max_concurrent_trials: int = dataclasses.field(default=2, metadata=positive())
    # Training budget per trial (ASHA's max_t, in epochs) and its early-stopping schedule.
    epochs: int = dataclasses.field(default=10, metadata=positive())
    steps_per_epoch: Optional[int] = dataclasses.field(default=None, metadata=positive())
    batch_size: int = dataclasses.field(default=64, metadata=positive())
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = dataclasses.field(default=2, metadata=positive())
    reduction_factor: int = dataclasses.field(default=2, metadata=in_range(2, None))
    search: Literal["optuna", "random"] = "optuna"
    # What the search optimises: a reported metric name (e.g. dci, auroc, psnr) or "objective", the weighted sum
    # Σ objective_weights[m]·m of reported metrics.
    metric: str = "objective"
    mode: Literal["max", "min"] = "max"
    objective_weights: dict = dataclasses.field(default_factory=lambda: {"dci": 1.0, "psnr": 0.01})
    cpus_per_trial: float = dataclasses.field(default=1.0, metadata=positive())
    gpus_per_trial: float = dataclasses.field(default=0.0, metadata=non_negative())
    # Validation images scored after every epoch (PSNR, DCI, AUROC, NMI/ARI): DCI's forests cost ~1 s per 1000.
    eval_examples: int = dataclasses.field(default=1000, metadata=in_range(20, None))
    # The OoD set for AUROC: uniform-noise images (None), or this label held out of training (its val images).
    ood_class: Optional[int] = dataclasses.field(default=None, metadata=non_negative())
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
        for name, weight in self.objective_weights.items():
            if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(
                    f"tune.objective_weights: {name!r}: {weight!r} must map a metric name to a number, "
                    f"e.g. {{dci: 1.0, psnr: 0.01}}"
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
    gwae: GWAEConfig = dataclasses.field(default_factory=lambda: GWAEConfig(image_shape=(3, 32, 32)))
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    STAGES: ClassVar[tuple[str, ...]] = ("train", "ncp", "tune")

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names MLflow models)")
        for s in self.stages:
            if s not in self.STAGES:
                hint = difflib.get_close_matches(s, self.STAGES, n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"stages: {s!r} is not a stage; choose from {', '.join(self.STAGES)}{more}")

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
        return super().from_dict(data, prefix="")


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


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such as configs/demo.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (name, data, nvae, train, ...)")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate everything."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return PipelineConfig.from_dict(data)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
