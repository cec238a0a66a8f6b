"""Lineage: what a run was made from. The dataset (its manifest digest as a tag, each split as an MLflow dataset
input), the code (git commit), and the config (a hash of everything that decides what is trained).

    tags = {"vaepipe.dataset": dataset_tag("runs/data/digits16"), "vaepipe.git_commit": git_commit(),
            "vaepipe.config_hash": config_hash(cfg)}
    log_dataset_inputs(tracker, run_id, "runs/data/digits16", ("train", "val"))
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow.data.meta_dataset import MetaDataset

from pipelines.data.manifest import MANIFEST_NAME, join, read_manifest, resolve
from pipelines.errors import MissingInputError
from pipelines.redaction import redact_text

NONE_TAG = "none"  # the value of a lineage tag that does not apply (a train stage has no source model)
# Config fields that change how a run is carried out, not what it trains: a run may be resumed with other values.
RESUME_NEUTRAL = ("tracking", "train.max_steps", "train.max_failures", "train.log_every_steps",
                  "tune.max_failures", "ncp.inception_weights")


def config_hash(config: Any) -> str:
    """12 hex of the sha256 of a config as canonical JSON (a PipelineConfig, or its dict), leaving out the fields
    in RESUME_NEUTRAL: two runs with the same hash train the same model, so one may resume the other."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = json.loads(json.dumps(data, default=str))
    for key in RESUME_NEUTRAL:
        section, _, field = key.partition(".")
        if not field:
            data.pop(section, None)
        elif isinstance(data.get(section), dict):
            data[section].pop(field, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def dataset_tag(manifest: str | os.PathLike | Mapping[str, Any]) -> str:
    """`name@<12 hex of sha256>` of a prepared dataset's dataset.json (a path to it or its directory).

    A dict is hashed as canonical JSON (sorted keys, no spaces), since it has no file bytes of its own.
    """
    if isinstance(manifest, Mapping):
        data = dict(manifest)
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        where = "the manifest dict"
    else:
        path = str(manifest)
        if not path.endswith(".json"):
            path = path.rstrip("/") + "/dataset.json"
        raw = _read_bytes(path)
        where = path
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); prepare it again with `vaepipe data prepare`") from None
    name = data.get("name") if isinstance(data, dict) else None
    if not name:
        raise ValueError(f"{where} has no 'name'; prepare the dataset again with `vaepipe data prepare`")
    return f"{name}@{hashlib.sha256(raw).hexdigest()[:12]}"


def _read_bytes(path: str) -> bytes:
    if "://" in path:
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read()
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInputError(f"dataset manifest {p} does not exist; prepare the data with `vaepipe data prepare`")
    return p.read_bytes()


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """$VAEPIPE_GIT_COMMIT (set by `vaepipe submit`, whose upload has no .git), else `git rev-parse HEAD` of the
    repository holding this package, else "unknown" (installed, no git)."""
    if os.environ.get("VAEPIPE_GIT_COMMIT"):
        return os.environ["VAEPIPE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def manifest_sha256(data_path: str) -> str:
    """sha256 of a prepared dataset's dataset.json bytes (what the `vaepipe.dataset` run tag abbreviates)."""
    fs, root = resolve(data_path)
    with fs.open_input_stream(join(root, MANIFEST_NAME)) as f:
        return hashlib.sha256(f.read()).hexdigest()


class SplitDataset(MetaDataset):
    """One split of a prepared dataset as MLflow sees it: metadata only, with a profile (split, size, digests)."""

    def __init__(self, source, name: str, digest: str, schema, profile: dict[str, Any]) -> None:
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _split_datasets(data_path: str, splits: Sequence[str]) -> list:
    """MLflow datasets (metadata only: the shards stay where they are) for the splits of a prepared dataset that it
    has; each with its split's name, directory or URI, shard digest, schema and a profile (split, size, manifest)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array


    manifest = read_manifest(data_path)
    manifest_sha = manifest_sha256(data_path)
    _, root = resolve(data_path)
    # A URI may carry credentials (user-info, signed query strings): the store keeps the source for all to read.
    location = redact_text(data_path.rstrip("/")) if "://" in data_path else root
    schema = Schema([ColSpec("binary", "image"), ColSpec("long", "label", required=False),
                     ColSpec(Array("float"), "factors", required=False)])
    out = []
    for split in splits:
        if not manifest.splits.get(split, 0):
            continue
        shards = [s.sha256 for s in manifest.shards.get(split, ())]
        digest = hashlib.sha256(json.dumps({"shape": list(manifest.shape), "shards": shards}).encode()).hexdigest()
        profile = {"split": split, "num_examples": int(manifest.splits[split]), "shape": list(manifest.shape),
                   "shards": len(shards), "manifest_sha256": manifest_sha, "content_sha256": manifest.sha256}
        with warnings.catch_warnings():  # two registered local sources both claim a plain path: same class
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(f"{location}/{split}")
        out.append((split, SplitDataset(source, f"{manifest.name}-{split}", digest[:12], schema, profile)))
    return out


_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def log_dataset_inputs(tracker, run_id: str, data_path: str, splits: Sequence[str]) -> None:
    """Record each split a stage reads as an MLflow dataset input of `run_id` (the UI's Dataset column): name
    `<dataset>-<split>`, source (the split's directory or URI), digest (its shards' sha256), and a profile with
    the split, its size and the manifest's sha256. Splits the data set does not have are skipped."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, _CONTEXTS.get(split, split)),
                                                         InputTag("vaepipe.split", split)])
              for split, dataset in _split_datasets(data_path, splits)]
    if inputs:
        tracker.log_inputs(run_id, inputs)
