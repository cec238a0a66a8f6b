"""Stage tune on a local Ray and a real sqlite MLflow store, over procedural shapes (16×16 grey) made offline."""
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
from pipelines.config import load_config
from pipelines.tune_gwae import discrete_factors, objective, register, run_tune, trial_seed
from vae.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
SPACE_HEADER = "# vaepipe tune configs/demo.yaml --space {}\n"


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory) -> str:
    from pipelines.data import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shapes16"
    prepare_dataset(_data_cfg(str(out)), str(out), progress=False)
    return str(out)


def _data_cfg(path: str):
    from pipelines.config import DataConfig

    return DataConfig(path=path, source="shapes", image_size=16, num_examples=1500, rgb=False, seed=0)


def make_cfg(shapes16: str, store, tmp_path: Path, space: Path, **tune):
    return load_config(REPO / "configs" / "demo.yaml", cfg_overrides(shapes16, store, tmp_path, space, **tune))


def cfg_overrides(shapes16: str, store, tmp_path: Path, space: Path, **tune) -> list[str]:
    """A GWAE small enough for 2 busy cores: z = 4, narrow nets, one critic step, 4 steps of 32 per epoch."""
    overrides = [
        f"tune.data.path={shapes16}", "tune.data.source=shapes", "tune.data.image_size=16", "tune.data.rgb=false",
        "tune.data.num_examples=1500", "gwae.image_shape=[1,16,16]", "gwae.z_dim=4", "gwae.base_channels=8",
        "gwae.hidden_dim=32", "gwae.critic_channels=4", "gwae.critic_steps=1", "tune.batch_size=32",
        "tune.steps_per_epoch=4", "tune.eval_examples=150", "tune.max_failures=0", f"tune.space={space}",
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


def test_trial_data_holds_out_the_ood_class_or_draws_seeded_noise(shapes16, mlflow_store, tmp_path):
    from pipelines.data import read_manifest
    from pipelines.tune_gwae import check_inputs, load_trial_data

    space = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n")
    manifest = read_manifest(shapes16)
    noise = load_trial_data(make_cfg(shapes16, mlflow_store, tmp_path, space), manifest)
    assert noise["ood_images"].shape == (150, 1, 16, 16) and noise["ood_images"].dtype == np.uint8
    assert np.array_equal(noise["ood_images"], load_trial_data(make_cfg(shapes16, mlflow_store, tmp_path, space),
                                                               manifest)["ood_images"])
    assert len(noise["train"]) == manifest.splits["train"] and len(noise["eval_images"]) == 150
    held = load_trial_data(make_cfg(shapes16, mlflow_store, tmp_path, space, ood_class=3), manifest)
    assert 0 < len(held["train"]) < len(noise["train"]) and (held["eval_labels"] != 3).all()
    assert len(held["ood_images"]) > 0 and len(held["eval_images"]) + len(held["ood_images"]) == manifest.splits["val"]
    with pytest.raises(ConfigError, match="tune.ood_class: 4 is not a label"):
        check_inputs(make_cfg(shapes16, mlflow_store, tmp_path, space, ood_class=4),
                     tune_spaces.load_space(str(space)), manifest)


def test_cli_takes_config_space_resume_overrides_and_address():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "configs/demo.yaml", "--space", "gwae_priors", "--resume",
                              "--set", "tune.epochs=3", "--address", "auto"])
    assert (args.config, args.space, args.resume, args.overrides, args.address) == (
        "configs/demo.yaml", "gwae_priors", True, ["tune.epochs=3"], "auto")


def test_a_broken_space_or_metric_is_refused_before_anything_starts(shapes16, mlflow_store, tmp_path):
    space = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n"
                                  "gwae.lamda_d: {type: loguniform, low: 0.1, high: 10}\n")
    cfg = make_cfg(shapes16, mlflow_store, tmp_path, space)
    with pytest.raises(ConfigError, match=rf"{space}:3: 'gwae.lamda_d' .*did you mean 'gwae.lambda_d'"):
        run_tune(cfg)
    grid = write_space(tmp_path, "gwae.prior: {type: grid, values: [np, gmp]}\n")
    with pytest.raises(ConfigError, match=rf"{grid}:2: gwae.prior: grid needs tune.search=random"):
        run_tune(make_cfg(shapes16, mlflow_store, tmp_path, grid, search="optuna"))
    ok = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n")
    with pytest.raises(ConfigError, match="'nmi' will not be reported"):
        run_tune(make_cfg(shapes16, mlflow_store, tmp_path, ok, objective_weights="{nmi: 1.0}"))
    # Nothing was tracked and no Tune experiment was started.
    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    assert client.get_experiment_by_name("vaepipe/demo") is None
    assert not (tmp_path / "ray").exists()


@pytest.mark.slow
def test_asha_search_tracks_every_trial_and_registers_a_loadable_best_model(ray_local, shapes16, mlflow_store,
                                                                          tmp_path, capsys):
    space = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n"
                                  "gwae.lambda_h: {type: loguniform, low: 1e-3, high: 1}\n")
    # One trial at a time: ASHA's cuts then depend only on the seeds, not on which trial reports first.
    cfg = make_cfg(shapes16, mlflow_store, tmp_path, space, num_samples=4, epochs=4, grace_period=1,
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
        assert 0.1 <= float(params["gwae.lambda_w"]) <= 10 and 1e-3 <= float(params["gwae.lambda_h"]) <= 1
        curve = client.get_metric_history(run.info.run_id, "objective")
        assert [m.step for m in sorted(curve, key=lambda m: m.step)] == list(range(1, len(curve) + 1))
        assert {"psnr", "dci", "auroc", "auroc_recon", "distance_coef", "loss_gw"} <= set(run.data.metrics)
        epochs.append(len(curve))
    assert max(epochs) == 4 and min(epochs) < 4, f"ASHA stopped no trial early: {epochs}"
    assert tune_run.data.metrics["trial_epochs"] == sum(epochs)
    assert tune_run.data.metrics["stopped_early"] == sum(e < 4 for e in epochs)

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
    assert result.metrics["objective"] == pytest.approx(best["best_objective"])
    out = capsys.readouterr().out
    assert "stopped early by ASHA" in out and "registered demo-gwae version 1" in out


@pytest.mark.slow
def test_a_failing_trial_is_reported_and_the_search_still_finishes(ray_local, shapes16, mlflow_store, tmp_path,
                                                                    capsys):
    # Each value alone is valid (checked before the search); prior gmp with 1 component is not: that trial raises.
    space = write_space(tmp_path, "gwae.prior: {type: grid, values: [np, gmp]}\n"
                                  "gwae.num_components: {type: grid, values: [1]}\n")
    cfg = make_cfg(shapes16, mlflow_store, tmp_path, space, num_samples=1, epochs=2, search="random",
                   scheduler="none", max_concurrent_trials=2)
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
    assert client.get_run(result.run_id).data.metrics["failed_trials"] == 1
    assert mlflow.pytorch.load_model(result.model_uri).config.prior == "np"
    out = capsys.readouterr().out
    assert "FAILED (the search goes on)" in out and "failed trial" in out


INTERRUPTED_SEARCH = """
import json, sys
from pipelines.config import load_config
from pipelines.tune_gwae import run_tune
run_tune(load_config(sys.argv[1], json.loads(sys.argv[2])), ray_address=sys.argv[3])
"""


@pytest.mark.slow
def test_an_interrupted_search_resumes_into_the_same_runs(ray_local, shapes16, mlflow_store, tmp_path):
    space = write_space(tmp_path, "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n")
    tune = dict(num_samples=1, epochs=3, search="random", scheduler="none")
    overrides = cfg_overrides(shapes16, mlflow_store, tmp_path, space, **tune)
    # The first search runs in its own driver process on the session's Ray and gets Ctrl+C at its second epoch:
    # by then the first epoch's checkpoint is registered (Tune saves before it trains on).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_SEARCH, str(REPO / "configs" / "demo.yaml"), json.dumps(overrides),
         ray_local.get_runtime_context().gcs_address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
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
        # whose checkpoint Tune had not registered yet runs (and is logged) again.
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "objective")]
        assert sorted(set(steps)) == [1, 2, 3] and steps.count(1) == 1, steps
        assert run.info.status == "FINISHED"
    assert mlflow.pytorch.load_model(result.model_uri).config.z_dim == 4
