"""Config loading: YAML + overrides → validated frozen dataclasses; every error names key, value and fix."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
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


# `vaepipe ARGS` as `python -m pipelines.cli` runs it, reporting at exit which heavy packages got imported.
_HEAVY = ("torch", "ray", "mlflow", "pyarrow")
_LOADED_AT_EXIT = """
import atexit, json, runpy, sys
def report():
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    sys.__stderr__.write("LOADED=" + json.dumps(loaded) + "\\n")
atexit.register(report)
sys.argv = ["vaepipe", *ARGS]
runpy.run_module("pipelines.cli", run_name="__main__", alter_sys=True)
"""


def _heavy_loaded(args: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    code = _LOADED_AT_EXIT.replace("HEAVY", repr(_HEAVY)).replace("ARGS", repr(args))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED="))
    return proc, json.loads(line.removeprefix("LOADED="))


@pytest.mark.parametrize("args, says", [
    (["--help"], "usage: vaepipe"),
    (["config", "show", "configs/demo.yaml"], "name: demo"),
    (["config", "validate", "configs/demo.yaml"], "valid"),
])
def test_help_and_config_commands_import_no_heavy_package(args, says):
    proc, loaded = _heavy_loaded(args)
    assert proc.returncode == 0 and says in proc.stdout, proc.stderr[-2000:]
    assert loaded == [], f"`vaepipe {' '.join(args)}` imported {loaded}"


def test_the_import_probe_sees_a_heavy_import(tmp_path):
    """The probe above can fail: a command that does need MLflow is reported as loading it."""
    proc, loaded = _heavy_loaded(["runs", "list", "--tracking-uri", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"])
    assert proc.returncode == 0 and "no pipeline runs yet" in proc.stdout, proc.stderr[-2000:]
    assert "mlflow" in loaded


# ------------------------------------------------------------------------------------------ shipped recipes

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RECIPES = {  # file: (global batch, workers, epochs, λ_SR, flows, binarize, hflip, paper metric, paper value)
    "nvae-mnist": (400, 2, 400, 1e-2, 0, "dynamic", False, "nll_nats", 78.01),
    "crvae-mnist": (400, 2, 400, 1e-2, 0, "dynamic", False, "nll_nats", 76.93),
    "nvae-cifar10": (256, 8, 400, 1e-2, 1, "none", True, "bpd", 2.91),
    "nvae-celeba64": (128, 8, 90, 1e-1, 1, "none", True, "bpd", 2.03),
}


def test_every_shipped_config_loads_validates_and_opens_with_its_command():
    names = {p.stem for p in CONFIGS}
    assert {"demo", *RECIPES, "ncp-mnist", "ncp-cifar10", "ncp-celeba64"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "vaepipe " in first and f"configs/{path.name}" in first, path.name


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_carry_the_papers_training_setup(recipe):
    batch, workers, epochs, sr, flows, binarize, hflip, metric, value = RECIPES[recipe]
    path = REPO / "configs" / f"{recipe}.yaml"
    cfg = load_config(path)
    t, m, d = cfg.train, cfg.nvae, cfg.data
    assert (t.batch_size, t.num_workers, t.epochs) == (batch, workers, epochs)
    assert t.worker_batch_size * t.num_workers == batch  # 200, 32, 16 per GPU: the README commands
    assert (t.lr, t.lr_min, t.warmup_epochs, t.weight_decay, t.adamax_eps) == (1e-2, 1e-4, 5, 3e-4, 1e-3)
    assert (m.kl_anneal_portion, m.kl_const_portion, m.kl_const_coeff) == (0.3, 1e-4, 1e-4)
    assert (m.lambda_sr, m.sr_anneal, m.num_nf) == (sr, False, flows)
    # Departures from the paper are off: no EMA, no clipping, fp16 with a GradScaler.
    assert (t.use_ema, t.grad_clip, t.amp) == (False, 0.0, "fp16")
    assert (d.binarize, d.hflip) == (binarize, hflip)
    assert (cfg.paper.metric, cfg.paper.value, cfg.paper.split, cfg.paper.iw_samples) == (metric, value, "test", 1000)
    assert m.cr_lambda > 0 if recipe.startswith("crvae") else m.cr_lambda == 0
    if "mnist" in recipe:
        assert (d.source, d.image_size, m.image_shape, m.crop, m.decoder) == ("mnist", 32, (1, 32, 32), 2, "bernoulli")
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"{value:g}" in header and "V100" in header and " h" in header  # figure, hardware and time


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "celeba64"])
def test_ncp_recipes_build_on_their_nvae_recipe(dataset):
    base = load_config(REPO / "configs" / f"nvae-{dataset}.yaml")
    ncp = load_config(REPO / "configs" / f"ncp-{dataset}.yaml")
    assert ncp.stages == ("ncp",) and ncp.name == base.name  # finds <name>-nvae@candidate, registers <name>-ncp
    assert (ncp.data, ncp.nvae, ncp.train) == (base.data, base.nvae, base.train)
    assert ncp.paper != base.paper  # NVAE's figure is not NCP-VAE's
    assert ncp.paper.metric in (None, "fid")


def test_demo_keeps_its_effective_batch():
    cfg = load_config(DEMO)
    assert (cfg.train.batch_size, cfg.train.num_workers, cfg.train.worker_batch_size) == (64, 2, 32)
    # The tests' base: the demo with short-run train settings, on grey levels with the logistic-mixture decoder.
    tests = load_config(REPO / "tests" / "base.yaml")
    assert tests.nvae == cfg.nvae.replace(decoder="dml", num_latent_per_group=4)
    assert tests.data == dataclasses.replace(cfg.data, binarize="none") and tests.train.batch_size == 128


# ------------------------------------------------------------------------------------------- global batch


def test_batch_size_is_global_and_split_evenly_over_workers():
    assert TrainConfig(batch_size=400, num_workers=2).worker_batch_size == 200
    assert TrainConfig(batch_size=400, num_workers=8).worker_batch_size == 50
    assert TrainConfig(batch_size=400, num_workers=0).worker_batch_size == 400  # in-process: one worker
    assert TrainConfig(batch_size=7, num_workers=1).worker_batch_size == 7
    with pytest.raises(ConfigError, match=r"train.batch_size: 400 is the global batch.*num_workers=3.*multiple of 3"):
        TrainConfig(batch_size=400, num_workers=3)
    # The same recipe on another cluster size: the per-worker batch changes, the global one never does.
    for workers in (1, 2, 4, 8, 16):
        cfg = load_config(REPO / "configs" / "nvae-mnist.yaml", [f"train.num_workers={workers}"])
        assert cfg.train.worker_batch_size * workers == 400
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(REPO / "configs" / "nvae-cifar10.yaml", ["train.num_workers=3"])


def test_plan_uses_the_worker_batch():
    from pipelines.train_vae import plan_steps

    cfg = load_config(DEMO)
    # 1437 digits over 2 workers: 718 rows each, 22 whole batches of 32 (the global 64 per step).
    assert plan_steps(1437, 2, cfg.train.worker_batch_size, 3) == (22, 66)
    with pytest.raises(ConfigError, match=r"global batch of 256 \(128 per worker × 2 workers\)"):
        plan_steps(200, 2, 128, 1)


# ---------------------------------------------------------------------------------- data protocol checks


def test_bernoulli_decoder_on_grey_levels_is_refused():
    mnist = REPO / "configs" / "nvae-mnist.yaml"
    with pytest.raises(ConfigError, match=r"data.binarize: 'none' feeds grey levels to nvae.decoder='bernoulli'"
                                          r".*set data.binarize=dynamic"):
        load_config(mnist, ["data.binarize=none"])
    with pytest.raises(ConfigError, match="data.binarize=dynamic"):
        load_config(DEMO, ["data.binarize=none"])  # the demo's Bernoulli decoder on grey levels
    assert load_config(DEMO, ["nvae.decoder=dml", "data.binarize=none"]).data.binarize == "none"
    with pytest.raises(ConfigError, match=r"data.binarize: 'static' is not allowed; choose one of 'none', 'dynamic'"):
        load_config(DEMO, ["data.binarize=static"])


def test_padded_mnist_must_be_scored_on_the_digits():
    with pytest.raises(ConfigError, match=r"nvae.crop: 0 scores the 2-pixel zero border.*set nvae.crop=2"):
        load_config(REPO / "configs" / "nvae-mnist.yaml", ["nvae.crop=0"])
    # Native 28x28 MNIST has no border to skip.
    native = load_config(REPO / "configs" / "nvae-mnist.yaml",
                         ["data.image_size=28", "nvae.image_shape=[1,28,28]", "nvae.crop=0",
                          "nvae.num_preprocess_blocks=1", "nvae.num_postprocess_blocks=1"])
    assert native.nvae.crop == 0


def test_tune_data_refuses_protocol_switches_it_does_not_apply():
    with pytest.raises(ConfigError, match=r"tune.data.hflip: True is not applied by the tune stage"):
        load_config(DEMO, ["tune.data.hflip=true"])
    with pytest.raises(ConfigError, match=r"tune.data.shift: 2 is not applied .* set it to 0"):
        load_config(DEMO, ["tune.data.shift=2"])
    with pytest.raises(ConfigError, match=r"data.shift: -1 is out of range"):
        load_config(DEMO, ["data.shift=-1"])


def test_switches_for_departures_from_the_paper():
    cfg = load_config(DEMO, ["train.grad_clip=0", "train.amp=fp16", "train.use_ema=false"])
    assert (cfg.train.grad_clip, cfg.train.amp, cfg.train.use_ema) == (0.0, "fp16", False)
    with pytest.raises(ConfigError, match="train.grad_clip: -1.0 is out of range"):
        load_config(DEMO, ["train.grad_clip=-1"])
    with pytest.raises(ConfigError, match="train.amp: 'fp32' is not allowed"):
        load_config(DEMO, ["train.amp=fp32"])


# --------------------------------------------------------------------------------------- base: and paper:


def test_base_builds_on_another_config_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"name": "a", "train": {"epochs": 3, "lr": 0.005}}))
    child = write(tmp_path, {"base": "a.yaml", "train": {"epochs": 4}})
    cfg = load_config(child)
    assert (cfg.name, cfg.train.epochs, cfg.train.lr) == ("a", 4, 0.005)
    assert load_config(child, ["train.epochs=9"]).train.epochs == 9  # overrides come last
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"base": "cfg.yaml"}))
    write(tmp_path, {"base": "loop.yaml"})
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match=r"base: 'gone.yaml' .* does not exist"):
        load_config(write(tmp_path, {"base": "gone.yaml"}))


def test_paper_figure_needs_metric_and_value():
    with pytest.raises(ConfigError, match=r"paper: metric='bpd' and value=None go together"):
        load_config(DEMO, ["paper.metric=bpd"])
    with pytest.raises(ConfigError, match=r"paper.metric: 'nats' is not a valid"):
        load_config(DEMO, ["paper.metric=nats", "paper.value=1"])


def test_evaluate_sets_the_run_figure_beside_the_published_one():
    from pipelines.registry import binarize_mode, published_comparison

    params = {k: str(v) for k, v in load_config(REPO / "configs" / "nvae-mnist.yaml").flat().items()}
    line = published_comparison(params, {"test/iw_nll_k1000": 80.5, "eval/seconds": 3.0}, "test", 1000)
    assert line == ("test/iw_nll_k1000: 80.5 nats   published: 78.01 nats "
                    "(NVAE (Vahdat & Kautz, NeurIPS 2020), binarized MNIST)")
    off = published_comparison(params, {"val/iw_nll_k100": 81.0}, "val", 100)
    assert off.startswith("val/iw_nll_k100: 81 nats") and "not comparable" in off and "test split with K=1000" in off
    assert "missing" in published_comparison(params, {}, "test", 1000)
    cifar = {k: str(v) for k, v in load_config(REPO / "configs" / "nvae-cifar10.yaml").flat().items()}
    assert "published: 2.91 bits/dim" in published_comparison(cifar, {"test/bpd_k1000": 3.4}, "test", 1000)
    demo = {k: str(v) for k, v in load_config(DEMO).flat().items()}
    assert published_comparison(demo, {"test/bpd_k1000": 3.4}, "test", 1000) is None
    grey = {k: str(v) for k, v in load_config(DEMO, ["nvae.decoder=dml", "data.binarize=none"]).flat().items()}
    assert binarize_mode(params, None) == "dynamic" and binarize_mode(grey, None) == "none"
    assert binarize_mode(demo, None) == "dynamic"
