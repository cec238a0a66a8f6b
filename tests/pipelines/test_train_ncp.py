"""Stage ncp end to end: a tiny NVAE trained here on digits, then one classifier per group in parallel Ray tasks; and
the sample-quality services it shares with `vaepipe evaluate` (the feature extractor kept in MLflow, Inception weights
from a path or an artifact) on a real MLflow store."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.config import load_config
from vae.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def make_cfg(digits16: str, store, tmp_path: Path, *extra: str):
    return load_config(REPO / "tests" / "base.yaml", [
        f"data.path={digits16}", f"tracking.workdir={store.workdir}", f"tracking.tracking_uri={store.tracking_uri}",
        f"tracking.artifact_location={store.artifact_location}", f"train.storage_path={tmp_path / 'ray'}",
        "train.epochs=2", "train.num_workers=1", "train.batch_size=64", "train.val_iw_examples=0",
        "ncp.steps=150", "ncp.eval_every=50", "ncp.val_examples=128", "ncp.eval_samples=64",
        "ncp.langevin_steps=10", "ncp.sir_proposals=8", "ncp.log_z_samples=32", "ncp.classifier_channels=16",
        *extra,
    ])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # train + ncp stage + evaluate: over 10 minutes when the 2 shared cores are busy
def test_ncp_stage_trains_groups_in_parallel_and_registers_a_sampling_model(ray_local, digits16, mlflow_store,
                                                                             tmp_path, capsys):
    from pipelines.train_ncp import fingerprint, run_ncp

    cfg = make_cfg(digits16, mlflow_store, tmp_path)
    model_uri = _trained_in_process(cfg, mlflow_store)
    mlflow.set_tracking_uri(mlflow_store.tracking_uri)
    vae_before = fingerprint(mlflow.pytorch.load_model(model_uri))

    result = run_ncp(cfg, model_uri=model_uri)
    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    run = client.get_run(result.run_id)
    m = run.data.metrics
    groups = 4
    # log 2 is the held-out NCE loss of a classifier that cannot tell the two kinds of sample apart. The coarse
    # groups of so short a training hold little KL (their aggregate posterior is close to the prior: 0.68-0.69 seen),
    # the fine ones a lot (0.23-0.48): no classifier is worse than chance, the groups learn well on average, and at
    # least half of them clearly beat it.
    nce = [m[f"best/val_nce_loss/group_{k:02d}"] for k in range(groups)]
    accuracy = [m[f"best/val_accuracy/group_{k:02d}"] for k in range(groups)]
    assert max(nce) < math.log(2) + 0.01 and sum(nce) / groups < math.log(2) - 0.05, nce
    assert sum(a > 0.6 for a in accuracy) >= groups // 2, accuracy
    # Observed overlap, not assumed: some groups' measured task spans overlap in time (how many run at once depends
    # on the CPUs the shared test Ray has free), and their summed task time exceeds the training wall time.
    spans = sorted((m[f"ncp/task_start/group_{k:02d}"], m[f"ncp/task_end/group_{k:02d}"]) for k in range(groups))
    overlaps = [min(a[1], b[1]) - max(a[0], b[0]) for i, a in enumerate(spans) for b in spans[i + 1:]]
    assert max(overlaps) > 1.0, spans
    assert m["ncp/parallelism"] > 1.05, m["ncp/parallelism"]
    assert run.data.tags["vaepipe.source_model"] == model_uri
    assert run.data.tags["vaepipe.vae_fingerprint"] == vae_before  # frozen: bit-identical
    for method in ("base", "sir", "langevin"):
        assert f"val/fd_vaepipe_{method}" in m
    assert not any(re.search(r"(^|[/_])fid($|_)", key) for key in m)  # no Inception weights: no FID, nothing called so
    assert run.data.tags["vaepipe.feature_extractor_run"]
    # each group's classifier is a checkpoint directory (state, config, completion marker written last)
    assert {a.path for a in client.list_artifacts(result.run_id, "classifiers")} == {
        f"classifiers/group_{k:02d}" for k in range(groups)}
    for k in range(groups):
        assert {a.path for a in client.list_artifacts(result.run_id, f"classifiers/group_{k:02d}")} == {
            f"classifiers/group_{k:02d}/{name}" for name in ("state.pt", "config.yaml", "COMPLETE")}
    from pipelines import checkpoints

    registered = mlflow.pytorch.load_model("models:/demo-ncp@candidate")
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="classifiers/group_01",
                                                tracking_uri=mlflow_store.tracking_uri)
    state = checkpoints.load(local, kind="ncp-classifier")
    assert state["group"] == 1 and state["step"] == cfg.ncp.steps
    assert load_config(Path(local) / "config.yaml").ncp == cfg.ncp
    logged = registered.classifiers[1].state_dict()
    assert set(state["classifier"]) == set(logged)
    assert all(torch.equal(state["classifier"][key], logged[key].cpu()) for key in logged)  # the registered weights
    assert any("samples_base_sir_langevin" in a.path for a in client.list_artifacts(result.run_id, "pictures"))

    script = textwrap.dedent(f"""
        import mlflow, torch
        mlflow.set_tracking_uri({mlflow_store.tracking_uri!r})
        m = mlflow.pytorch.load_model("models:/demo-ncp@candidate")
        assert type(m).__name__ == "NCPVAE", type(m)
        for method in ("sir", "langevin", "base"):
            x = m.sample(3, method=method)
            assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1, method
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # only what the script sets
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    # `vaepipe evaluate` on the NCP model: the base NVAE's figure under base_, the NCP prior's own beside it with its
    # Monte Carlo error, the stage's feature extractor reused (not retrained), Inception FID/KID from a weights file.
    from pipelines.cli import main

    weights = _random_inception_weights(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "models:/demo-ncp@candidate", "--data", digits16, "--k", "8", "--ncp-k", "4",
                 "--ncp-z-samples", "8", "--max-examples", "12", "--samples", "8", "--inception-weights", str(weights),
                 "--tracking-uri", mlflow_store.tracking_uri]) == 0
    printed = capsys.readouterr().out
    assert "reusing run" in printed and "training one" not in printed
    assert "eta" in printed  # the long passes report progress
    m = client.get_run(result.run_id).data.metrics
    assert "test/iw_nll_k8" not in m  # the base NVAE's figure is never logged as the NCP model's
    assert m["test/base_iw_nll_k8"] > 0 and m["test/ncp_iw_nll_k4"] > 0
    assert m["test/ncp_iw_nll_k4_mc_se"] > 0 and m["test/ncp_log_z_samples"] == 8
    for method in ("base", "sir", "langevin"):
        assert f"test/fd_vaepipe_{method}" in m and m[f"test/inception_fid_{method}"] > 0
    assert m["test/inception_samples"] == 8
    tags = client.get_run(result.run_id).data.tags
    assert tags["vaepipe.feature_extractor_run"] == run.data.tags["vaepipe.feature_extractor_run"]


def _trained_in_process(cfg, store) -> str:
    """The config's NVAE after its train.epochs of the train stage's own update on the data, in this process, logged
    as the train stage logs its model: the ncp stage's input. (Train on Ray, and its hand-over to ncp, have their own
    end-to-end tests; here it would only add Ray's start-up.)"""
    import numpy as np

    from pipelines.data import InMemoryShard, read_manifest
    from pipelines.tracking import Tracker
    from pipelines.train_vae import TrainPlan, _batches, plan_steps, seed_everything, setup, training_step

    cpu = torch.device("cpu")
    examples = read_manifest(cfg.data.path).splits["train"]
    per_epoch, total = plan_steps(examples, 1, cfg.train.worker_batch_size, cfg.train.epochs)
    seed_everything(cfg.train.seed)
    state = setup(cfg, TrainPlan(examples, per_epoch, total, heartbeat_dir=""), cpu)
    shard = InMemoryShard(cfg.data.path, "train")
    for epoch in range(cfg.train.epochs):
        for x in _batches(shard, cfg, seed=cfg.train.seed + 7919 * epoch):
            training_step(state, state.model, x, cfg, cpu, total)
    assert state.step == total
    model = state.eval_model().eval()
    tracker = Tracker.connect(store)
    run_id = tracker.create_run(cfg.name, {"vaepipe.stage": "train"}, run_name="train")
    uri = tracker.log_pytorch_model(run_id, model, name="model", input_example=np.zeros((1, 1, 16, 16), np.float32))
    tracker.end_run(run_id)
    return uri


def _random_inception_weights(tmp_path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random He-initialised weights, saved as the real checkpoint would be."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from vae.quality import INCEPTION_WEIGHTS_FILE

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.save({}, tmp_path / "empty.pt")
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pt"))
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), tmp_path / INCEPTION_WEIGHTS_FILE)
    return tmp_path / INCEPTION_WEIGHTS_FILE


def test_missing_model_lists_what_is_registered(digits16, mlflow_store, tmp_path):
    from pipelines.train_ncp import run_ncp

    cfg = make_cfg(digits16, mlflow_store, tmp_path)
    with pytest.raises(ConfigError, match=r"cannot load 'models:/nothing-nvae@candidate'.*registered models: none"):
        run_ncp(cfg, model_uri="models:/nothing-nvae@candidate")


def test_feature_extractor_is_trained_once_per_dataset_logged_and_reused(digits16, mlflow_store, capsys):
    from pipelines.data import read_manifest
    from pipelines.sample_quality import EXPERIMENT, feature_extractor
    from pipelines.tracking import Tracker

    torch.set_num_threads(1)
    tracker = Tracker.connect(mlflow_store)
    recipe = {"epochs": 2, "width": 8}
    first, run_id = feature_extractor(tracker, digits16, recipe)
    assert "training one" in capsys.readouterr().out
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vaepipe.stage"] == "feature_extractor"
    assert {"train/loss", "val/accuracy"} <= set(run.data.metrics) and all("/" in k for k in run.data.metrics)
    assert run.data.tags["vaepipe.dataset_sha256"] == read_manifest(digits16).sha256
    assert tracker.client.get_experiment(run.info.experiment_id).name == f"vaepipe/{EXPERIMENT}"
    assert [a.path for a in tracker.client.list_artifacts(run_id, "extractor")] == ["extractor/sample_quality.pt"]

    again, same_id = feature_extractor(Tracker.connect(mlflow_store), digits16, recipe)
    out = capsys.readouterr().out
    assert same_id == run_id and "reusing" in out and "training" not in out
    x = torch.rand(8, 1, 16, 16)
    assert torch.equal(again.features(x), first.features(x)) and again.recipe == first.recipe

    _, other_id = feature_extractor(tracker, digits16, {"epochs": 1, "width": 8})  # another recipe: another space
    assert other_id != run_id


def test_inception_weights_come_from_a_path_or_an_artifact_and_are_never_downloaded(mlflow_store, tmp_path):
    from pipelines.sample_quality import inception_weights_path
    from pipelines.tracking import Tracker
    from vae.quality import INCEPTION_WEIGHTS_FILE

    tracker = Tracker.connect(mlflow_store)
    with pytest.raises(ConfigError, match=f"no Inception weights at .*{INCEPTION_WEIGHTS_FILE}.*--inception-weights"):
        inception_weights_path(tracker, str(tmp_path / "missing.pth"), "--inception-weights")
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"not really weights")
    assert inception_weights_path(tracker, str(weights), "--inception-weights") == str(weights)
    run_id = tracker.client.create_run(tracker.experiment_id("weights")).info.run_id
    tracker.log_artifact(run_id, weights, artifact_path="inception")
    tracker.end_run(run_id)
    local = inception_weights_path(tracker, f"runs:/{run_id}/inception/{INCEPTION_WEIGHTS_FILE}", "x")
    assert Path(local).read_bytes() == b"not really weights"
    local = inception_weights_path(tracker, f"runs:/{run_id}/inception", "x")  # the folder holding it
    assert Path(local).name == INCEPTION_WEIGHTS_FILE
    with pytest.raises(ConfigError, match="cannot download"):
        inception_weights_path(tracker, f"runs:/{run_id}/nothing/here.pth", "ncp.inception_weights")


def test_samples_are_scored_against_what_they_depict():
    from types import SimpleNamespace

    from pipelines.sample_quality import reference_binarize
    from vae import NVAE, NVAEConfig

    bern = NVAE(NVAEConfig.preset("tiny", decoder="bernoulli"))
    dml = NVAE(NVAEConfig.preset("tiny"))
    # A Bernoulli decoder's pictures are pixel probabilities: the grey levels are what binarised draws average to.
    assert reference_binarize(bern, "dynamic") == "none"
    assert reference_binarize(SimpleNamespace(vae=bern), "dynamic") == "none"  # an NCP model's frozen NVAE
    assert reference_binarize(dml, "dynamic") == "dynamic" and reference_binarize(dml, "none") == "none"
