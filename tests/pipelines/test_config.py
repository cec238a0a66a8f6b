"""Config loading: YAML + overrides → validated frozen dataclasses; every error names key, value and fix."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import PipelineConfig, TrainConfig, load_config
from vae.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_demo_config_loads_with_preset_and_is_frozen():
    cfg = load_config(DEMO)
    assert cfg.name == "demo"
    assert cfg.nvae.image_shape == (1, 16, 16)
    assert cfg.data.source == "digits" and cfg.data.image_size == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_round_trip_through_dict_is_identity():
    cfg = load_config(DEMO, ["train.epochs=3", "train.lr=0.005"])
    again = PipelineConfig.from_dict(cfg.to_dict())
    assert again == cfg
    flat = cfg.flat()
    assert flat["train.epochs"] == 3 and flat["nvae.image_shape"] == [1, 16, 16]


def test_overrides_convert_types():
    cfg = load_config(DEMO, ["train.epochs=7", "train.lr=1e-3", "train.use_ema=false", "data.image_size=null",
                             "nvae.image_shape=[1,32,32]"])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.use_ema is False
    assert cfg.data.image_size is None
    assert cfg.nvae.image_shape == (1, 32, 32)


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*did you mean 'epochs'"):
        load_config(DEMO, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, {"trian": {"epochs": 1}}))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.epochs=-1", r"train.epochs: -1 is out of range; allowed: > 0"),
        ("train.epochs=two", r"train.epochs: expected an integer, got 'two'"),
        ("train.lr=0", r"train.lr: 0.0 is out of range"),
        ("train.use_ema=maybe", r"train.use_ema: expected true or false, got 'maybe'"),
        ("data.source=digitz", r"data.source: 'digitz' is not allowed.*did you mean 'digits'"),
        ("data.val_fraction=0.9", r"data.val_fraction: 0.9 is out of range; allowed: <= 0.5"),
        ("stages=[train,nce]", r"stages: 'nce' is not a stage.*did you mean 'ncp'"),
        ("name=my model", r"name: 'my model' must be letters"),
        ("train.lr_min=1", r"train.lr_min: 1.0 is above train.lr"),
        ("data.source=folder", r"data.source_path: source 'folder' needs"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEMO, [override])


def test_bad_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="nvae.preset"):
        load_config(write(tmp_path, {"nvae": {"preset": "huge"}}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(DEMO, ["train.epochs"])


def test_train_config_direct_construction_validates():
    with pytest.raises(ConfigError, match="train.batch_size"):
        TrainConfig(batch_size=0)


def test_cli_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(DEMO), "--set", "train.epochs=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 4 and shown["nvae"]["image_shape"] == [1, 16, 16]


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["config", "show", str(DEMO), "--set", "train.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert "vaepipe: error: train.epochs: 0 is out of range" in err and "Traceback" not in err
