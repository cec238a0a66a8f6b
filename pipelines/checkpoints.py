"""The one checkpoint format of every stage: a directory holding

    state.pt      everything to continue from (torch.save of a dict: model, EMA, optimizer, step, RNG states, ...)
    config.yaml   the resolved config that made it (credentials masked)
    COMPLETE      written last, as JSON {"kind", "step", "time"}: a directory without it was cut off mid-write

    save(directory, {"model": ..., "step": 100}, cfg, kind="train")
    payload = load(directory)                 # CheckpointError for an incomplete or foreign directory
    newest = load_latest("runs/ray/demo-train-x")   # (path, payload) of the newest complete one below, or None
    weights = model_weights(payload)          # the EMA's weights when it has them, else the model's

The train stage's checkpoints, each tune trial's, and each ncp group classifier's are such directories; Ray Train and
Ray Tune carry them as `ray.train.Checkpoint` directories, MLflow keeps the final ones as artifacts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from pipelines.errors import MissingInputError

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
COMPLETE_MARKER = "COMPLETE"
# torch.optim.swa_utils.AveragedModel keeps the averaged module under this prefix, next to its update counter.
_EMA_PREFIX = "module."


class CheckpointError(MissingInputError):
    """A directory is not a complete vaepipe checkpoint (cut off mid-write, or something else)."""


def save(directory: str | Path, state: Mapping[str, Any], config: Any = None, kind: str = "checkpoint") -> Path:
    """Write `state` (and `config`, a PipelineConfig or YAML text) as a checkpoint directory; the COMPLETE marker
    goes last, so a crash mid-write never looks complete. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / COMPLETE_MARKER).unlink(missing_ok=True)
    torch.save(dict(state), directory / STATE_FILE)
    if config is not None:
        (directory / CONFIG_FILE).write_text(config if isinstance(config, str) else _dump(config))
    marker = {"kind": kind, "step": state.get("step", state.get("epoch")), "time": time.time()}
    (directory / COMPLETE_MARKER).write_text(json.dumps(marker))
    return directory


def _dump(config: Any) -> str:
    from pipelines.config import dump_config

    return dump_config(config)  # masks credentials: checkpoints become artifacts


def is_complete(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / COMPLETE_MARKER).is_file() and (directory / STATE_FILE).is_file()


def load(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The state of a complete checkpoint directory (on the CPU); CheckpointError otherwise. With `kind`, a
    checkpoint of another kind (a tune trial's where a train checkpoint is expected) is refused too."""
    directory = Path(directory)
    if not is_complete(directory):
        raise CheckpointError(
            f"{directory} is not a complete vaepipe checkpoint (no {COMPLETE_MARKER} marker or {STATE_FILE}); it was "
            f"probably cut off while being written: use an earlier checkpoint"
        )
    if kind is not None:
        found = json.loads((directory / COMPLETE_MARKER).read_text() or "{}").get("kind")
        if found not in (kind, None):
            raise CheckpointError(f"{directory} is a {found} checkpoint, not a {kind} one; point at a {kind} "
                                  f"checkpoint")
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)


def load_latest(root: str | Path, kind: str | None = None) -> tuple[Path, dict[str, Any]] | None:
    """(directory, state) of the newest complete checkpoint at or below `root` (by the step its marker records, then
    its time); incomplete ones are skipped. None when there is none."""
    root = Path(root)
    found = []
    for marker in root.rglob(COMPLETE_MARKER):
        directory = marker.parent
        if not is_complete(directory):
            continue
        try:
            info = json.loads(marker.read_text() or "{}")
        except json.JSONDecodeError:
            continue
        if kind is not None and info.get("kind") not in (kind, None):
            continue
        found.append(((info.get("step") or -1, info.get("time") or 0.0), directory))
    if not found:
        return None
    directory = max(found, key=lambda f: f[0])[1]
    return directory, load(directory)


def unwrap_ema(ema_state: Mapping[str, Any]) -> dict[str, Any]:
    """The averaged module's own state dict from an AveragedModel's (its `module.` prefix stripped, the update
    counter left out)."""
    return {k[len(_EMA_PREFIX):]: v for k, v in ema_state.items() if k.startswith(_EMA_PREFIX)}


def model_weights(state: Mapping[str, Any]) -> dict[str, Any]:
    """The weights to ship from a checkpoint: the EMA's when it kept one, else the trained model's."""
    if state.get("ema") is not None:
        return unwrap_ema(state["ema"])
    return dict(state["model"])
