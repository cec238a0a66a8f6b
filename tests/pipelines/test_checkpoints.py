"""pipelines.checkpoints: the one checkpoint directory format (state.pt, config.yaml, COMPLETE written last), on disk."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch.optim.swa_utils import AveragedModel

from pipelines import checkpoints
from pipelines.config import PipelineConfig
from pipelines.errors import MissingInputError, UserError


def _state(step: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state()}


def test_save_then_load_round_trips_state_config_and_marker(tmp_path):
    cfg = PipelineConfig(name="ckpt")
    state = _state(step=40)
    out = checkpoints.save(tmp_path / "ckpt", state, cfg, kind="train")
    assert out == tmp_path / "ckpt" and checkpoints.is_complete(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [checkpoints.STATE_FILE, checkpoints.CONFIG_FILE, checkpoints.COMPLETE_MARKER])
    marker = json.loads((out / checkpoints.COMPLETE_MARKER).read_text())
    assert marker["kind"] == "train" and marker["step"] == 40 and marker["time"] > 0
    assert yaml.safe_load((out / checkpoints.CONFIG_FILE).read_text()) == cfg.to_dict()

    back = checkpoints.load(out, kind="train")
    assert back["step"] == 40 and torch.equal(back["rng"], state["rng"])
    assert back["model"].keys() == state["model"].keys()
    assert all(torch.equal(back["model"][k], state["model"][k]) for k in state["model"])
    assert back["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0  # the optimizer's moments came back
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert checkpoints.load(out)["step"] == 40  # kind is optional
    with pytest.raises(checkpoints.CheckpointError, match="is a train checkpoint, not a tune-trial one"):
        checkpoints.load(out, kind="tune-trial")


def test_a_directory_without_its_marker_is_refused(tmp_path):
    cut = checkpoints.save(tmp_path / "cut", _state(step=5), kind="train")
    (cut / checkpoints.COMPLETE_MARKER).unlink()  # what a crash between state.pt and the marker leaves
    assert not checkpoints.is_complete(cut)
    with pytest.raises(checkpoints.CheckpointError, match="not a complete vaepipe checkpoint.*use an earlier") as e:
        checkpoints.load(cut)
    assert isinstance(e.value, MissingInputError) and isinstance(e.value, UserError)
    assert isinstance(e.value, FileNotFoundError)
    # A marker without the state it vouches for is refused too, and so is an empty or missing directory.
    shutil.copytree(cut, tmp_path / "no_state")
    (tmp_path / "no_state" / checkpoints.STATE_FILE).unlink()
    (tmp_path / "no_state" / checkpoints.COMPLETE_MARKER).write_text(json.dumps({"kind": "train", "step": 5}))
    for bad in (tmp_path / "no_state", tmp_path / "missing"):
        with pytest.raises(checkpoints.CheckpointError):
            checkpoints.load(bad)
    # Saving again over a cut directory makes it whole.
    checkpoints.save(cut, _state(step=6), kind="train")
    assert checkpoints.load(cut)["step"] == 6


def test_load_latest_picks_the_highest_complete_step(tmp_path):
    root = tmp_path / "trial"
    assert checkpoints.load_latest(root) is None  # nothing there yet
    checkpoints.save(root / "checkpoint_000001", _state(step=30), kind="train")
    checkpoints.save(root / "checkpoint_000000", _state(step=10), kind="train")
    checkpoints.save(root / "later" / "checkpoint_000002", _state(step=20), kind="train")  # newer, lower step
    cut = checkpoints.save(root / "checkpoint_000003", _state(step=50), kind="train")
    (cut / checkpoints.COMPLETE_MARKER).unlink()  # the newest one was cut off mid-write
    checkpoints.save(root / "other" / "checkpoint_x", _state(step=90), kind="tune-trial")

    path, state = checkpoints.load_latest(root, kind="train")
    assert path == root / "checkpoint_000001" and state["step"] == 30
    path, state = checkpoints.load_latest(root)  # any kind
    assert path == root / "other" / "checkpoint_x" and state["step"] == 90


def test_unwrap_ema_strips_the_averaged_model_prefix_and_model_weights_prefers_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = AveragedModel(model)
    ema.update_parameters(model)  # the first update copies the model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)  # the second averages: the EMA now lags the model by 0.5
    raw = ema.state_dict()
    assert "n_averaged" in raw and all(k.startswith("module.") for k in raw if k != "n_averaged")

    weights = checkpoints.unwrap_ema(raw)
    assert set(weights) == set(model.state_dict())  # prefix gone, the update counter left out
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(weights, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], ema.module.state_dict()[k]) for k in weights)

    chosen = checkpoints.model_weights({"model": model.state_dict(), "ema": raw})
    assert all(torch.equal(chosen[k], weights[k]) for k in weights)
    torch.testing.assert_close(chosen["0.weight"], model.state_dict()["0.weight"] - 0.5)  # the average, not the model
    plain = checkpoints.model_weights({"model": model.state_dict(), "ema": None})
    assert all(torch.equal(plain[k], model.state_dict()[k]) for k in plain)
