"""Stage tune on a local Ray and a real sqlite MLflow store, over `regions` images (16×16 grey) made offline."""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

import tune_spaces
from pipelines.cli.stages import register
from pipelines.config import PipelineConfig, load_config
from pipelines.tune_gwae import COLLAPSED_SCORE, discrete_factors, objective, run_tune, selection_score, trial_seed
from vae.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
SPACE_HEADER = "# vaepipe tune configs/demo.yaml --space {}\n"


@pytest.fixture(scope="module")
def regions16(tmp_path_factory) -> str:
    from pipelines.data import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "regions16"
    prepare_dataset(_data_cfg(str(out)), str(out), progress=False)
    return str(out)


def _data_cfg(path: str):
    from pipelines.config import DataConfig

    return DataConfig(path=path, source="regions", image_size=16, num_examples=1500, val_fraction=0.15,
                      test_fraction=0.15, seed=0)


def make_cfg(regions16: str, store, tmp_path: Path, space: Path, **tune):
    return load_config(REPO / "configs" / "demo.yaml", cfg_overrides(regions16, store, tmp_path, space, **tune))


def cfg_overrides(regions16: str, store, tmp_path: Path, space: Path, **tune) -> list[str]:
    """A GWAE small enough for 2 busy cores: z = 4, narrow nets, one critic step, 8 steps of 32 per epoch (16 steps
    at lr 1e-3 take it out of the collapsed start: measured PSNR 15.0 dB against the mean image's 13.1)."""
    overrides = [
        f"tune.data.path={regions16}", "tune.data.source=regions", "tune.data.image_size=16",
        "tune.data.num_examples=1500", "tune.data.val_fraction=0.15", "tune.data.test_fraction=0.15",
        "gwae.image_shape=[1,16,16]", "gwae.z_dim=4", "gwae.base_channels=8",
        "gwae.hidden_dim=32", "gwae.critic_channels=4", "gwae.critic_steps=1", "tune.batch_size=32",
        "tune.steps_per_epoch=8", "tune.eval_examples=150", "tune.max_failures=0", f"tune.space={space}",
        f"tune.storage_path={tmp_path / 'ray'}", f"tracking.workdir={store.workdir}",
        f"tracking.tracking_uri={store.tracking_uri}", f"tracking.artifact_location={store.artifact_location}",
    ]
    return overrides + [f"tune.{k}={v}" for k, v in tune.items()]


def write_space(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE_HEADER.format(path) + body)
    return path


def test_objective_is_the_weighted_sum_and_a_missing_term_is_an_error():
    assert objective({"dci": 0.5, "psnr": 20.0, "auroc": 0.9}, {"dci": 1.0, "psnr": 0.01}) == pytest.approx(0.7)
    with pytest.raises(KeyError):
        objective({"psnr": 20.0}, {"dci": 1.0})


def test_discrete_factors_are_the_few_whole_number_columns():
    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(0, 4, 200), rng.random(200), rng.integers(0, 40, 200)], axis=1)
    assert discrete_factors(factors.astype(np.float32)) == (0,)


def test_trial_seed_follows_the_sampled_values_and_the_trial_number_only():
    point = {"gwae.lambda_w": 0.3, "gwae.prior": "np"}
    a = trial_seed(0, point, "a1b2c_00001")
    assert a == trial_seed(0, {"gwae.prior": "np", "gwae.lambda_w": 0.3}, "ffff0_00001")  # another search, same trial
    assert a != trial_seed(0, point, "a1b2c_00002")  # a repeat of the same grid point
    assert a != trial_seed(0, {**point, "gwae.lambda_w": 0.31}, "a1b2c_00001") and a != trial_seed(1, point,
                                                                                                 "a1b2c_00001")
    assert trial_seed(0, point, "3fa8b2c1") == trial_seed(0, point, "77aa0011")  # Optuna ids carry no number


def test_grid_points_share_seeds_repeat_by_repeat():
    """A grid of 3 priors run twice: trials 0-2 are repeat 0, trials 3-5 repeat 1 (Tune's order). Every prior of one
    repeat trains from the same seed (paired); the two repeats differ."""
    seeds = [trial_seed(0, {"gwae.prior": p, "gwae.lr": 1e-3}, f"ab_{i:05d}", ("gwae.prior",), 3)
             for i, p in enumerate(["fnp", "gaussian", "uniform"] * 2)]
    assert len(set(seeds[:3])) == 1 and len(set(seeds[3:])) == 1 and seeds[0] != seeds[3]
    assert seeds[0] != trial_seed(0, {"gwae.prior": "fnp", "gwae.lr": 3e-3}, "ab_00000", ("gwae.prior",), 3)


def test_selection_sinks_collapsed_epochs_whatever_the_direction():
    good = {"objective": 0.7, "collapsed": 0.0}
    assert selection_score(good, "objective", "max") == 0.7
    assert selection_score({**good, "collapsed": 1.0}, "objective", "max") == -COLLAPSED_SCORE
    assert selection_score({**good, "collapsed": 1.0}, "objective", "min") == COLLAPSED_SCORE


def test_asha_grace_period_must_be_a_real_share_of_the_budget():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.tune.grace_period >= 0.4 * cfg.tune.epochs
    with pytest.raises(ConfigError, match=r"tune.grace_period: 1 is under 40% of tune.epochs=10.*>= 4"):
        load_config(REPO / "configs" / "demo.yaml", ["tune.epochs=10", "tune.grace_period=1"])
    load_config(REPO / "configs" / "demo.yaml", ["tune.epochs=10", "tune.grace_period=1", "tune.scheduler=none"])


def test_regions_are_made_of_four_visible_independent_factors(tmp_path):
    from pipelines.data import prepare_dataset, read_manifest
    from pipelines.data.regions import LOW, SPAN, make_regions

    images, labels, factors = make_regions(4000, image_size=16, seed=1)
    assert images.shape == (4000, 1, 16, 16) and factors.shape == (4000, 4)
    assert np.array_equal(make_regions(100, image_size=16, seed=1)[0], images[:100])  # prefix-stable
    quadrants = [images[:, 0, r:r + 8, c:c + 8] for r in (0, 8) for c in (0, 8)]
    for k, q in enumerate(quadrants):  # each quadrant is flat, at the grey level of its own factor
        assert (q.min(axis=(1, 2)) == q.max(axis=(1, 2))).all()
        assert np.abs(q[:, 0, 0] / 255.0 - (LOW + SPAN * factors[:, k])).max() <= 0.5 / 255 + 1e-6
    corr = np.corrcoef(factors.T) - np.eye(4)
    assert np.abs(corr).max() < 0.05  # independent
    assert np.array_equal(labels, factors.argmax(axis=1)) and np.bincount(labels).min() > 900
    out = tmp_path / "regions8"
    from pipelines.config import DataConfig

    prepare_dataset(DataConfig(path=str(out), source="regions", image_size=8, num_examples=300, rgb=True),
                    str(out), progress=False)
    manifest = read_manifest(str(out))
    assert manifest.shape == (3, 8, 8) and manifest.factor_names == ("top_left", "top_right", "bottom_left",
                                                                        "bottom_right")
    assert len(manifest.label_names) == 4


def test_trial_data_holds_out_the_ood_class_or_draws_seeded_noise(regions16, mlflow_store, tmp_path):
    from pipelines.data import read_manifest
    from pipelines.tune_gwae import check_inputs, load_trial_data

    space = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n")
    manifest = read_manifest(regions16)
    noise = load_trial_data(make_cfg(regions16, mlflow_store, tmp_path, space, ood_class="null"), manifest)
    assert noise["ood_images"].shape == (150, 1, 16, 16) and noise["ood_images"].dtype == np.uint8
    assert np.array_equal(noise["ood_images"], load_trial_data(
        make_cfg(regions16, mlflow_store, tmp_path, space, ood_class="null"), manifest)["ood_images"])
    assert len(noise["train"]) == manifest.splits["train"] and len(noise["eval_images"]) == 150
    # the default: class 3 (bottom-right quadrant brightest) held out of training, its val images the OoD set
    held = load_trial_data(make_cfg(regions16, mlflow_store, tmp_path, space), manifest)
    assert 0 < len(held["train"]) < len(noise["train"]) and (held["eval_labels"] != 3).all()
    assert len(held["ood_images"]) > 0 and len(held["eval_images"]) == 150
    assert 150 + len(held["ood_images"]) <= manifest.splits["val"]
    ood = held["ood_images"].astype(float)
    assert (ood[:, 0, 8:, 8:].mean(axis=(1, 2)) > ood[:, 0, :8, :8].mean(axis=(1, 2))).all()
    # the test split is another set of images, with its own held-out class
    test = load_trial_data(make_cfg(regions16, mlflow_store, tmp_path, space), manifest, "test")
    assert not np.array_equal(test["eval_images"][:20], held["eval_images"][:20]) and (test["eval_labels"] != 3).all()
    with pytest.raises(ConfigError, match="tune.ood_class: 4 is not a label"):
        check_inputs(make_cfg(regions16, mlflow_store, tmp_path, space, ood_class=4),
                     tune_spaces.load_space(str(space), PipelineConfig), manifest)


def test_cli_takes_config_space_resume_overrides_and_address():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "configs/demo.yaml", "--space", "gwae_priors", "--resume",
                              "--set", "tune.epochs=3", "--address", "auto"])
    assert (args.config, args.space, args.resume, args.overrides, args.address) == (
        "configs/demo.yaml", "gwae_priors", True, ["tune.epochs=3"], "auto")
    assert args.func.__name__ == "tune"
    # --resume RUN_ID names the run; without --resume nothing is resumed
    named = parser.parse_args(["tune", "configs/demo.yaml", "--resume", "0123abcd", "--set", "tune.epochs=3"])
    assert (named.resume, named.overrides) == ("0123abcd", ["tune.epochs=3"])
    assert parser.parse_args(["tune", "configs/demo.yaml"]).resume is False


def test_a_broken_space_or_metric_is_refused_before_anything_starts(regions16, mlflow_store, tmp_path):
    space = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n"
                                  "gwae.lamda_d: {type: loguniform, low: 0.1, high: 10}\n")
    cfg = make_cfg(regions16, mlflow_store, tmp_path, space)
    with pytest.raises(ConfigError, match=rf"{space}:3: 'gwae.lamda_d' .*did you mean 'gwae.lambda_d'"):
        run_tune(cfg)
    grid = write_space(tmp_path, "gwae.prior: {type: grid, values: [np, gmp]}\n")
    with pytest.raises(ConfigError, match=rf"{grid}:2: gwae.prior: grid needs tune.search=random"):
        run_tune(make_cfg(regions16, mlflow_store, tmp_path, grid, search="optuna"))
    ok = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n")
    with pytest.raises(ConfigError, match="'nmi' will not be reported"):
        run_tune(make_cfg(regions16, mlflow_store, tmp_path, ok, objective_weights="{nmi: 1.0}"))
    # Nothing was tracked and no Tune experiment was started.
    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    assert client.get_experiment_by_name("vaepipe/demo") is None
    assert not (tmp_path / "ray").exists()


@pytest.mark.slow
def test_asha_search_tracks_every_trial_and_registers_a_loadable_best_model(ray_local, regions16, mlflow_store,
                                                                          tmp_path, capsys):
    space = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.5, high: 2}\n"
                                  "gwae.lambda_h: {type: loguniform, low: 1e-3, high: 1}\n")
    # One trial at a time: ASHA's cuts then depend only on the seeds, not on which trial reports first.
    cfg = make_cfg(regions16, mlflow_store, tmp_path, space, num_samples=4, epochs=4, grace_period=2,
                   reduction_factor=2, max_concurrent_trials=1, search="optuna", seed=0)
    result = run_tune(cfg)

    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    tune_run = client.get_run(result.run_id)
    assert tune_run.info.status == "FINISHED" and tune_run.data.tags["vaepipe.stage"] == "tune"
    pipeline = client.get_run(tune_run.data.tags["mlflow.parentRunId"])
    assert pipeline.data.tags["vaepipe.stage"] == "pipeline"
    trials = client.search_runs([tune_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{result.run_id}'")
    assert len(trials) == 4
    epochs = []
    for run in trials:
        assert run.data.tags["vaepipe.stage"] == "tune-trial" and run.info.status == "FINISHED"
        params = run.data.params
        assert set(params) == {"gwae.lambda_w", "gwae.lambda_h"}
        assert 0.5 <= float(params["gwae.lambda_w"]) <= 2 and 1e-3 <= float(params["gwae.lambda_h"]) <= 1
        curve = client.get_metric_history(run.info.run_id, "trial/objective")
        assert sorted(m.step for m in curve) == list(range(1, len(curve) + 1))
        assert {f"trial/{m}" for m in ("psnr", "dci", "auroc", "auroc_prior", "auroc_recon", "distance_coef",
                                       "loss_gw", "collapsed", "prior_kurtosis_max", "recon_spread", "selection",
                                       "metric_at_init")} <= set(run.data.metrics)
        # every metric of a trial run is namespaced, and no metric has a step logged twice
        assert all(k.startswith("trial/") for k in run.data.metrics), sorted(run.data.metrics)
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_id, key, steps)
        epochs.append(len(curve))
    assert max(epochs) == 4 and min(epochs) < 4, f"ASHA stopped no trial early: {epochs}"
    assert tune_run.data.metrics["search/trials"] == 4
    assert tune_run.data.metrics["search/trial_epochs"] == sum(epochs)
    assert tune_run.data.metrics["search/stopped_early"] == sum(e < 4 for e in epochs)

    table = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                                artifact_path="results/trials.parquet"))
    assert len(table) == 4 and sorted(table["epochs"]) == sorted(epochs)
    assert set(table["outcome"]) <= {"completed", "stopped_early"} and "best_objective" in table
    arts = {a.path for a in client.list_artifacts(result.run_id, "results")}
    assert {"results/trials.csv", "results/objective_vs_params.png"} <= arts
    assert {a.path for a in client.list_artifacts(result.run_id, "pictures")} == {
        "pictures/best_samples.png", "pictures/best_reconstructions.png"}

    model = mlflow.pytorch.load_model(result.model_uri)
    from vae.gwae import GWAE

    assert type(model) is GWAE
    best = table.loc[table["best_objective"].idxmax()]
    assert model.config.lambda_w == pytest.approx(best["gwae.lambda_w"])
    mu, logvar = model.eval().encode(torch.rand(5, 1, 16, 16))
    assert mu.shape == (5, 4) and torch.isfinite(mu).all()
    # chosen on validation, reported on the test split: best/val_objective is the value it was chosen on
    assert result.metrics["val_objective"] == pytest.approx(best["best_objective"])
    assert {"psnr", "dci", "auroc", "auroc_prior", "recon_spread", "data_spread"} <= set(result.metrics)
    assert result.metrics["collapsed"] == 0.0 and result.metrics["psnr"] > result.metrics["mean_image_psnr"]
    assert tune_run.data.metrics["best/psnr"] == pytest.approx(result.metrics["psnr"])
    out = capsys.readouterr().out
    assert "stopped early by ASHA" in out and "registered demo-gwae version 1" in out
    assert "best model on the test split" in out


@pytest.mark.slow
def test_a_failing_trial_is_reported_and_the_search_still_finishes(ray_local, regions16, mlflow_store, tmp_path,
                                                                    capsys):
    # Each value alone is valid (checked before the search); prior gmp with 1 component is not: that trial raises.
    space = write_space(tmp_path, "gwae.prior: {type: grid, values: [np, gmp]}\n"
                                  "gwae.num_components: {type: grid, values: [1]}\n")
    # 32 steps: the np trial must get out of its collapsed start to be registered (16 steps were not enough)
    cfg = make_cfg(regions16, mlflow_store, tmp_path, space, num_samples=1, epochs=2, search="random",
                   scheduler="none", max_concurrent_trials=2, steps_per_epoch=16)
    result = run_tune(cfg)

    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    trials = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{result.run_id}'")
    status = {run.data.params["gwae.prior"]: (run.info.status, run.data.tags["vaepipe.trial_outcome"])
              for run in trials}
    assert status == {"np": ("FINISHED", "completed"), "gmp": ("FAILED", "failed")}
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{result.run_id}/results/trials.csv")))
    failed = table[table["outcome"] == "failed"]
    assert list(failed["gwae.prior"]) == ["gmp"] and "num_components" in failed["error"].iloc[0]
    assert client.get_run(result.run_id).data.metrics["search/failed_trials"] == 1
    assert mlflow.pytorch.load_model(result.model_uri).config.prior == "np"
    out = capsys.readouterr().out
    assert "FAILED (the search goes on)" in out and "failed trial" in out


@pytest.mark.slow
def test_a_collapsed_trial_is_marked_and_never_registered(ray_local, regions16, mlflow_store, tmp_path, capsys):
    """lr 1e-9 leaves the model at its initialisation, whose decoder ignores z (one grey image for every input);
    lr 3e-3 learns. The collapsed trial has the higher objective at its end (dci of near-constant codes is noise) or
    not: either way it must not be the registered one."""
    space = write_space(tmp_path, "gwae.lr: {type: grid, values: [1.0e-9, 3.0e-3]}\n")
    cfg = make_cfg(regions16, mlflow_store, tmp_path, space, num_samples=1, epochs=2, search="random",
                   scheduler="none", metric="psnr")
    result = run_tune(cfg)
    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    assert client.get_run(result.run_id).data.metrics["search/collapsed_trials"] == 1
    assert mlflow.pytorch.load_model(result.model_uri).config.lr == pytest.approx(3e-3)
    assert result.metrics["collapsed"] == 0.0
    assert "1 collapsed" in capsys.readouterr().out
    # every trial collapsed: nothing is registered
    cfg = make_cfg(regions16, mlflow_store, tmp_path, write_space(tmp_path, "gwae.lr: {type: grid, values: [1.0e-9]}\n"),
                   num_samples=1, epochs=1, search="random", scheduler="none", metric="psnr")
    nothing = run_tune(cfg)
    assert nothing.model_uri is None and nothing.metrics["search/collapsed_trials"] == 1.0
    assert len(client.search_model_versions("name='demo-gwae'")) == 1
    assert "nothing registered" in capsys.readouterr().out


INTERRUPTED_SEARCH = """
import json, sys
from pipelines.config import load_config
from pipelines.tune_gwae import run_tune
run_tune(load_config(sys.argv[1], json.loads(sys.argv[2])), ray_address=sys.argv[3])
"""


@pytest.mark.slow
def test_an_interrupted_search_resumes_into_the_same_runs(ray_local, regions16, mlflow_store, tmp_path):
    space = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n")
    tune = dict(num_samples=1, epochs=3, search="random", scheduler="none")
    overrides = cfg_overrides(regions16, mlflow_store, tmp_path, space, **tune)
    # The first search runs in its own driver process on the session's Ray and gets Ctrl+C at its second epoch:
    # by then the first epoch's checkpoint is registered (Tune saves before it trains on).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_SEARCH, str(REPO / "configs" / "demo.yaml"), json.dumps(overrides),
         ray_local.get_runtime_context().gcs_address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal, however pytest started
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "epoch 2/3" in line:
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.stdout.readlines()
        proc.wait(timeout=120)
    finally:
        watchdog.cancel()
    out = "".join(lines)
    assert "the search was interrupted after 0 of 1 trials" in out, out[-3000:]

    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("vaepipe/demo").experiment_id],
                                   "tags.`vaepipe.stage` = 'tune'")
    assert killed.info.status == "KILLED"

    result = run_tune(load_config(REPO / "configs" / "demo.yaml", overrides), resume=True)
    assert result.run_id == killed.info.run_id
    tune_run = client.get_run(result.run_id)
    assert tune_run.info.status == "FINISHED"
    assert client.get_run(tune_run.data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
    trials = client.search_runs([tune_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{result.run_id}'")
    assert len(trials) == 1  # the interrupted trial went on in its own run, not a second one
    for run in trials:
        # Resumed from its checkpoint, not from scratch: epoch 1 ran once. An epoch reported just before Ctrl+C
        # whose checkpoint Tune had not registered yet runs again, but its replayed metrics are not logged twice.
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "trial/objective")]
        assert sorted(steps) == [1, 2, 3], steps
        assert run.info.status == "FINISHED"
    assert mlflow.pytorch.load_model(result.model_uri).config.z_dim == 4


def test_asha_check_compares_in_the_direction_of_the_mode():
    from types import SimpleNamespace

    from pipelines.tune_gwae import asha_check

    def trial(at_init: float, at_grace: float):
        frame = pd.DataFrame({"epoch": [1, 2], "objective": [at_init, at_grace], "metric_at_init": [at_init, None]})
        return SimpleNamespace(metrics_dataframe=frame)

    results = [trial(0.1, 0.5), trial(0.5, 0.1), SimpleNamespace(metrics_dataframe=None)]
    assert asha_check(results, "objective", 2, "max") == (1, 2)
    assert asha_check(results, "objective", 2, "min") == (1, 2)
    assert asha_check(results[:1], "objective", 2, "min") == (0, 1)  # rose, so worse for a loss
