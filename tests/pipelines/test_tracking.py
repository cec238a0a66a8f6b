"""pipelines.tracking against a real sqlite store on disk and a real `mlflow server` on loopback."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipelines import tracking
from pipelines.config import PipelineConfig, TrackingConfig
from pipelines.errors import ConfigError, DatasetError, Diverged, MissingInputError
from pipelines.cli import runs as runs_cli
from pipelines.tracking import Tracker, TrackingUnavailableError, dataset_tag, list_pipeline_runs, runs, store as store_mod
from pipelines.tracking.tracker import _image_to_uint8_hwc

STAGE_TAGS = ("vaepipe.stage", "vaepipe.pipeline_run", "vaepipe.dataset", "vaepipe.source_model", "vaepipe.git_commit")


@pytest.fixture(params=["sqlite", "server"])
def store(request) -> TrackingConfig:
    """The same tests against both kinds of store."""
    if request.param == "sqlite":
        return request.getfixturevalue("mlflow_store")
    return request.getfixturevalue("mlflow_server").tracking


def _config(store: TrackingConfig) -> PipelineConfig:
    # The server is shared by the session: a unique name keeps experiments and models apart.
    return PipelineConfig(name=f"t-{uuid.uuid4().hex[:8]}", tracking=store)


def _manifest(tmp_path: Path) -> Path:
    d = tmp_path / "digits16"
    d.mkdir()
    (d / "dataset.json").write_text(json.dumps({"name": "digits16", "shape": [1, 16, 16]}))
    return d


class _Sampler(torch.nn.Module):
    """A model whose extra method must survive logging (the pt2 format would drop it)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.net(x)

    def sample(self, n: int) -> torch.Tensor:
        return torch.sigmoid(self.net.weight.sum() + torch.zeros(n, 2))


def test_pipeline_and_stage_runs_round_trip(store, tmp_path):
    tracker = Tracker.connect(store)
    cfg = _config(store)
    manifest = _manifest(tmp_path)
    data = dataset_tag(manifest)
    grid = torch.linspace(0, 1, 3 * 8 * 8).reshape(3, 8, 8)
    with tracking.pipeline_run(tracker, cfg, data_path=str(manifest)) as pipe:
        parent = pipe.run_id
        # A stage whose body raises closes FAILED, with the error as a tag; its pipeline run goes on.
        with pytest.raises(RuntimeError, match="boom"):
            with tracking.stage_run(tracker, cfg, "ncp", parent_run_id=parent, data_path=str(manifest), splits=(),
                                    source_model="models:/x-nvae@candidate") as run:
                child = run.run_id
                assert run.parent_run_id == parent and not run.resumed
                assert tracker.get_run(child).info.status == "RUNNING"
                run.log_metrics({"train/loss": 3.0, "val/bpd": torch.tensor(1.5)}, step=0)
                run.log_metrics({"train/loss": 2.0, "val/bpd": np.float32(1.25)}, step=5)
                run.log_metrics({"train/loss": float("inf"), "val/bpd": float("nan")}, step=9)
                tracker.log_image(child, grid, "samples/grid.png")
                tracker.log_image(child, np.full((4, 5), 7, dtype=np.uint8), "gray.png")
                tracker.log_dict(child, {"fid": 12.5}, "eval/metrics.json")
                raise RuntimeError("boom")

    client = tracker.client
    p, c = client.get_run(parent), client.get_run(child)
    assert p.data.tags["vaepipe.stage"] == "pipeline" and p.data.tags["vaepipe.pipeline_run"] == parent
    assert all(t in p.data.tags for t in STAGE_TAGS)
    assert c.data.tags["mlflow.parentRunId"] == parent
    assert c.data.tags["vaepipe.stage"] == "ncp"
    assert c.data.tags["vaepipe.pipeline_run"] == parent
    assert c.data.tags["vaepipe.dataset"] == data and len(data.removeprefix("digits16@")) == 12
    assert c.data.tags["vaepipe.source_model"] == "models:/x-nvae@candidate"
    assert c.data.tags["vaepipe.git_commit"] == tracking.git_commit() != ""
    assert (p.info.status, c.info.status) == ("FINISHED", "FAILED")
    assert c.data.tags[runs.END_REASON_TAG] == "failed" and c.data.tags[runs.ERROR_TAG] == "RuntimeError: boom"
    assert p.data.tags[runs.END_REASON_TAG] == "finished" and runs.ERROR_TAG not in p.data.tags
    assert p.data.tags[runs.CONFIG_HASH_TAG] == c.data.tags[runs.CONFIG_HASH_TAG] == tracking.config_hash(cfg)
    assert c.data.tags[runs.DRIVER_TAG] == runs.driver_id() and float(c.data.tags[runs.HEARTBEAT_TAG]) > 0
    assert c.data.params == {k: str(v) for k, v in cfg.flat().items()}

    history = sorted(client.get_metric_history(child, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history[:2]] == [(0, 3.0), (5, 2.0)]
    assert history[2].step == 9 and math.isnan(history[2].value)  # inf kept as NaN, not clamped to 1.8e308
    bpd = sorted(client.get_metric_history(child, "val/bpd"), key=lambda m: m.step)
    assert [m.value for m in bpd[:2]] == [1.5, 1.25] and math.isnan(bpd[2].value)

    got = Path(tracker.download_artifacts(child, "config.yaml", tmp_path / "dl"))
    assert yaml.safe_load(got.read_text()) == cfg.to_dict()
    parent_config = Path(tracker.download_artifacts(parent, "config.yaml", tmp_path / "p"))
    assert yaml.safe_load(parent_config.read_text()) == cfg.to_dict()
    png = np.asarray(Image.open(tracker.download_artifacts(child, "samples/grid.png", tmp_path / "img")))
    assert png.shape == (8, 8, 3)
    np.testing.assert_array_equal(png, (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    gray = np.asarray(Image.open(tracker.download_artifacts(child, "gray.png", tmp_path / "img2")))
    assert gray.shape == (4, 5) and (gray == 7).all()
    metrics_json = Path(tracker.download_artifacts(child, "eval/metrics.json", tmp_path / "j"))
    assert json.loads(metrics_json.read_text()) == {"fid": 12.5}

    artifact_location = client.get_experiment(c.info.experiment_id).artifact_location
    if store.artifact_location:
        assert artifact_location == Path(store.artifact_location).resolve().as_uri() + f"/vaepipe/{cfg.name}"
    else:  # the server proxies artifacts
        assert artifact_location.startswith("mlflow-artifacts:")
    assert [r.info.run_id for r in tracker.find_runs(cfg.name, stage="ncp")] == [child]
    assert {r.info.run_id for r in tracker.find_runs(cfg.name, pipeline_run=parent)} == {child, parent}

    # A pickled tracker (what a Ray worker receives) logs to the same run without re-resolving anything.
    clone = pickle.loads(pickle.dumps(tracker))
    assert clone.tracking_uri == tracker.tracking_uri and clone.artifact_root == tracker.artifact_root
    clone.log_metrics(child, {"after/pickle": 1.0}, step=1)
    assert client.get_run(child).data.metrics["after/pickle"] == 1.0


def test_batches_past_mlflow_limits_and_truncates_long_params(mlflow_server):
    # Against the server, which enforces MLflow's per-request limits on what it receives.
    tracker = Tracker.connect(mlflow_server.tracking)
    cfg = _config(mlflow_server.tracking)
    run_id = tracker.create_run(cfg.name, {"vaepipe.stage": "train"}, run_name="train")
    params = {f"extra.p{i:03d}": i for i in range(250)}  # MLflow takes 100 params per request
    params["extra.long"] = "x" * 7000  # over MLflow's 6000-character value limit
    tracker.log_params(run_id, params)
    sink = tracking.MetricSink(tracker, run_id)  # the path every stage's metrics take
    assert len(sink.log({f"m/{i:04d}": float(i) for i in range(1200)}, step=3)) == 1200  # 1000 per request

    run = tracker.client.get_run(run_id)
    assert all(run.data.params[f"extra.p{i:03d}"] == str(i) for i in range(250))
    long = run.data.params["extra.long"]
    assert len(long) == 6000 and long.startswith("xxx") and long.endswith("[truncated]")
    assert len([k for k in run.data.metrics if k.startswith("m/")]) == 1200
    assert run.data.metrics["m/1199"] == 1199.0


def test_register_model_with_alias_loads_back_and_is_listed(store, tmp_path, capsys):
    tracker = Tracker.connect(store)
    cfg = _config(store)
    torch.manual_seed(0)
    model = _Sampler()
    name = f"{cfg.name}-nvae"
    # A stage run on its own opens (and closes) a pipeline run of its own, so `runs list` shows it.
    with tracking.stage_run(tracker, cfg, "train") as run:
        child, parent = run.run_id, run.parent_run_id
        model_uri = tracker.log_pytorch_model(child, model)
        assert tracker.register_model(model_uri, name, tags={"bpd": 1.5}) == "1"
        v2 = tracker.register_model(f"runs:/{child}/model", name)  # a run-relative URI works as well
        assert v2 == "2"
    assert parent != child and tracker.get_run(parent).info.status == "FINISHED"

    mv = tracker.get_model_version_by_alias(name, "candidate")
    assert str(mv.version) == "2" and mv.run_id == child
    assert tracker.client.get_model_version(name, "1").tags["bpd"] == "1.5"
    tracker.set_alias(name, "champion", 1)
    assert str(tracker.get_model_version_by_alias(name, "champion").version) == "1"
    with pytest.raises(LookupError, match=f"{name}.*nope"):
        tracker.get_model_version_by_alias(name, "nope")

    tracker.activate()
    loaded = mlflow.pytorch.load_model(f"models:/{name}@candidate")
    assert type(loaded).__name__ == "_Sampler"
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(loaded.sample(2), model.sample(2))

    rows = list_pipeline_runs(store, experiment=cfg.name)
    assert [r["run_id"] for r in rows] == [parent]
    assert [(s["stage"], s["run_id"], s["status"]) for s in rows[0]["stages"]] == [("train", child, "FINISHED")]
    assert [(m["version"], m["aliases"]) for m in rows[0]["models"]] == [("1", ["champion"]), ("2", ["candidate"])]

    # `vaepipe runs list --config FILE` takes the store and the experiment from the config.
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"name": cfg.name, "tracking": store.to_dict()}))
    parser = argparse.ArgumentParser()
    runs_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["runs", "list", "--config", str(cfg_file), "--limit", "5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert parent in out and child in out and f"vaepipe/{cfg.name}" in out
    assert f"{name} v2 @candidate" in out and f"{name} v1 @champion" in out


def test_runs_list_with_tracking_uri_and_no_store(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    runs_cli.register(parser.add_subparsers(dest="command", required=True))
    missing = tmp_path / "none" / "mlflow.db"
    args = parser.parse_args(["runs", "list", "--tracking-uri", f"sqlite:///{missing}"])
    assert args.func(args) == 0
    assert "no pipeline runs yet" in capsys.readouterr().out
    assert not missing.exists()  # listing never creates a store
    with pytest.raises(SystemExit):
        parser.parse_args(["runs", "list", "--limit", "0"])


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_within_timeout():
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as err:
        Tracker.connect(TrackingConfig(tracking_uri=uri, connect_timeout_s=1.5))
    assert time.monotonic() - start < 1.5 + 2.0
    assert uri in str(err.value) and "mlflow server" in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)


@pytest.mark.parametrize("uri, fix", [("ftp://host/x", "does not support"), ("file:///tmp/mlruns", "sqlite:///")])
def test_unsupported_schemes_are_refused(uri, fix):
    with pytest.raises(TrackingUnavailableError, match=fix):
        tracking.check_tracking_server(uri, 1.0)


def test_env_tracking_uri_is_used_when_config_has_none(tmp_path, monkeypatch):
    env_db = tmp_path / "env" / "mlflow.db"
    env_db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    cfg = TrackingConfig(workdir=str(tmp_path / "wd"))
    tracker = Tracker.connect(cfg)
    assert tracker.tracking_uri == f"sqlite:///{env_db}" and env_db.exists()
    assert not (tmp_path / "wd" / "mlflow.db").exists()
    assert tracker.artifact_root == (tmp_path / "wd" / "mlartifacts").resolve().as_uri()
    explicit = TrackingConfig(workdir=str(tmp_path / "wd"), tracking_uri="sqlite:////x/y.db")
    assert tracking.resolve_tracking_uri(explicit) == "sqlite:////x/y.db"  # the config wins over the env

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    relative = TrackingConfig(workdir="rel")
    assert tracking.resolve_tracking_uri(relative) == f"sqlite:///{(tmp_path / 'rel').resolve()}/mlflow.db"
    assert (tmp_path / "rel").is_dir()
    server = TrackingConfig(tracking_uri="http://127.0.0.1:5000")
    assert tracking.resolve_artifact_location(server, server.tracking_uri) is None  # the server proxies artifacts


def test_dataset_tag_hashes_the_manifest_bytes(tmp_path):
    d = _manifest(tmp_path)
    digest = hashlib.sha256((d / "dataset.json").read_bytes()).hexdigest()[:12]
    assert dataset_tag(d) == dataset_tag(d / "dataset.json") == dataset_tag(str(d)) == f"digits16@{digest}"
    assert dataset_tag({"name": "shapes", "n": 1}).startswith("shapes@")
    assert dataset_tag({"name": "shapes", "n": 1}) != dataset_tag({"name": "shapes", "n": 2})
    with pytest.raises(ValueError, match="no 'name'"):
        dataset_tag({"shape": [1, 8, 8]})
    with pytest.raises(FileNotFoundError, match="vaepipe data prepare"):
        dataset_tag(tmp_path / "missing")


def test_retries_only_while_the_database_is_locked(monkeypatch):
    delays: list[float] = []
    monkeypatch.setattr(store_mod.time, "sleep", delays.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise mlflow.exceptions.MlflowException("wrapped") from sqlite3.OperationalError("database is locked")
        return "ok"

    assert store_mod.retry_locked(flaky) == "ok"
    assert len(calls) == 3 and len(delays) == 2 and delays[0] < 0.4 <= delays[1]  # backing off
    with pytest.raises(ValueError):
        store_mod.retry_locked(lambda: (_ for _ in ()).throw(ValueError("other")))
    assert len(delays) == 2  # other errors are not retried

    def always_locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        store_mod.retry_locked(always_locked)


def test_bad_inputs_name_the_fix(mlflow_server):
    tracker = Tracker(mlflow_server.uri)  # every check fires before a request is made
    with pytest.raises(ValueError, match="PNG"):
        tracker.log_image("run", torch.zeros(3, 4, 4), "grid.jpg")
    with pytest.raises(ValueError, match="make_grid"):
        _image_to_uint8_hwc(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.end_run("run", "DONE")
    with pytest.raises(TypeError, match="'train/loss'"):
        tracker.log_metrics("run", {"train/loss": "high"}, step=0)


def test_connecting_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    """Two configs in one process, neither naming a tracking URI, track into their own workdirs."""
    import os

    from pipelines.config import TrackingConfig
    from pipelines.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = Tracker.connect(TrackingConfig(workdir=str(tmp_path / "a")))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = Tracker.connect(TrackingConfig(workdir=str(tmp_path / "b")))
    assert first.tracking_uri.endswith("/a/mlflow.db") and second.tracking_uri.endswith("/b/mlflow.db")


# ------------------------------------------------------------------------------------------------ metric sink


def test_metric_sink_refuses_bare_names_and_logs_non_finite_values_as_nan(mlflow_store):
    tracker = Tracker.connect(mlflow_store)
    run_id = tracker.create_run("sink", {"vaepipe.stage": "train"})
    sink = tracking.MetricSink(tracker, run_id)
    for bad in ({"loss": 1.0}, {"train/loss": 1.0, "psnr": 2.0}, {"/loss": 1.0}, {"loss/": 1.0}):
        with pytest.raises(ValueError, match="namespaced") as e:
            sink.log(bad, step=0)
        assert repr(next(k for k in bad if "/" not in k.strip("/"))) in str(e.value)
    assert tracker.get_run(run_id).data.metrics == {}  # a refused batch logs none of its values

    logged = sink.log({"train/loss": float("inf"), "train/grad_norm": float("-inf"), "val/bpd": float("nan"),
                       "val/nelbo": torch.tensor(2.5)}, step=3)
    assert set(logged) == {"train/loss", "train/grad_norm", "val/bpd", "val/nelbo"}
    for key in ("train/loss", "train/grad_norm", "val/bpd"):
        (m,) = tracker.metric_history(run_id, key)
        assert m.step == 3 and math.isnan(m.value), (key, m.value)  # not clamped to ±1.8e308, not dropped
    assert [m.value for m in tracker.metric_history(run_id, "val/nelbo")] == [2.5]


def test_metric_sink_drops_replayed_steps_also_across_a_resume(mlflow_store):
    tracker = Tracker.connect(mlflow_store)
    run_id = tracker.create_run("sink", {"vaepipe.stage": "train"})
    first = tracking.MetricSink(tracker, run_id)
    for step in range(5):
        first.log({"train/loss": float(step), "val/bpd": 10.0 + step}, step=step)
    assert first.log({"train/loss": 99.0}, step=2) == {} and first.dropped == 1  # a restarted worker replays

    # The driver comes back (a resumed run): a new sink learns each metric's last step from the store.
    second = tracking.MetricSink(tracker, run_id, resumed=True)
    for step in range(3, 8):
        second.log({"train/loss": 100.0 + step, "val/bpd": 200.0 + step}, step=step)
    assert second.dropped == 4  # steps 3 and 4 of both metrics

    loss = sorted((m.step, m.value) for m in tracker.metric_history(run_id, "train/loss"))
    assert loss == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)]
    bpd = [m.step for m in tracker.metric_history(run_id, "val/bpd")]
    assert sorted(bpd) == list(range(8))  # every step once: no duplicates
    # Without resumed=True a sink knows nothing of the store: that is what would have duplicated the steps.
    fresh = tracking.MetricSink(tracker, run_id)
    assert fresh.log({"train/loss": -1.0}, step=7) == {"train/loss": -1.0}


# ------------------------------------------------------------------------------------------------ run lifecycle


def _running(tracker: Tracker, cfg: PipelineConfig) -> list[str]:
    return [r.info.run_id for r in tracker.find_runs(cfg.name, filter_string="attributes.status = 'RUNNING'")]


@pytest.mark.parametrize("ending, status, reason, error", [
    (None, "FINISHED", "finished", None),
    (KeyboardInterrupt, "KILLED", "interrupted", None),
    (ValueError("shard part-00003.parquet is corrupt"), "FAILED", "failed",
     "ValueError: shard part-00003.parquet is corrupt"),
    (Diverged("train/loss is NaN at step 12"), "FAILED", "diverged", "Diverged: train/loss is NaN at step 12"),
])
def test_stage_run_closes_itself_and_its_own_pipeline_run(mlflow_store, ending, status, reason, error):
    tracker = Tracker.connect(mlflow_store)
    cfg = _config(mlflow_store)

    def body():
        with tracking.stage_run(tracker, cfg, "train") as run:
            ids.extend([run.run_id, run.parent_run_id])
            assert set(_running(tracker, cfg)) == set(ids)
            # A child left RUNNING under it (a tune trial's run) is closed with it.
            ids.append(tracker.create_run(cfg.name, {"mlflow.parentRunId": run.run_id}, run_name="trial"))
            run.log_metrics({"train/loss": 1.0}, step=0)
            if ending is not None:
                raise ending

    ids: list[str] = []
    if ending is None:
        body()
    else:
        with pytest.raises(ending if isinstance(ending, type) else type(ending)):
            body()
    run_id, parent_id, trial_id = ids
    run, parent = tracker.get_run(run_id), tracker.get_run(parent_id)
    assert parent.data.tags["vaepipe.stage"] == "pipeline" and run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.tags["vaepipe.pipeline_run"] == parent_id
    for r in (run, parent):
        assert r.info.status == status and r.info.end_time is not None
        assert r.data.tags[runs.END_REASON_TAG] == reason
        assert r.data.tags.get(runs.ERROR_TAG) == error
    assert tracker.get_run(trial_id).info.status == ("FINISHED" if status == "FINISHED" else "KILLED")
    assert _running(tracker, cfg) == []  # no path leaves a run RUNNING


def test_a_failure_while_opening_leaves_no_run_running(mlflow_store, tmp_path):
    """The manifest passes the dataset tag but its splits cannot be read as dataset inputs: the runs created so far
    (the stage's and its own pipeline run) close FAILED with the error, before any body runs."""
    tracker = Tracker.connect(mlflow_store)
    cfg = _config(mlflow_store)
    with pytest.raises(DatasetError, match="prepare the dataset again"):
        with tracking.stage_run(tracker, cfg, "train", data_path=str(_manifest(tmp_path)), splits=("train", "val")):
            pytest.fail("the body ran although the run could not be opened")
    opened = tracker.find_runs(cfg.name)
    assert sorted(r.data.tags["vaepipe.stage"] for r in opened) == ["pipeline", "train"]
    for r in opened:
        assert r.info.status == "FAILED" and r.data.tags[runs.END_REASON_TAG] == "failed"
        assert r.data.tags[runs.ERROR_TAG].startswith("DatasetError: ")
    assert _running(tracker, cfg) == []


def test_resume_reopens_the_run_and_its_pipeline_run(mlflow_store):
    tracker = Tracker.connect(mlflow_store)
    cfg = _config(mlflow_store)
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run(tracker, cfg, "train") as first:
            first.log_metrics({"train/loss": 2.0}, step=10)
            raise KeyboardInterrupt
    with tracking.stage_run(tracker, cfg, "train", resume=True, progress_metric="train/loss") as again:
        assert (again.run_id, again.parent_run_id, again.resumed) == (first.run_id, first.parent_run_id, True)
        assert again.resumed_from_step == 10
        assert set(_running(tracker, cfg)) == {first.run_id, first.parent_run_id}
        again.log_metrics({"train/loss": 1.5}, step=10)  # the replayed step is dropped
        again.log_metrics({"train/loss": 1.0}, step=20)
    assert [(m.step, m.value) for m in sorted(tracker.metric_history(first.run_id, "train/loss"),
                                              key=lambda m: m.step)] == [(10, 2.0), (20, 1.0)]
    for rid in (first.run_id, first.parent_run_id):
        assert tracker.get_run(rid).info.status == "FINISHED"
    assert _running(tracker, cfg) == [] and len(tracker.find_runs(cfg.name, stage="train")) == 1


def _killed_train_run(tracker: Tracker, cfg: PipelineConfig) -> str:
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run(tracker, cfg, "train") as run:
            raise KeyboardInterrupt
    return run.run_id


def test_find_resumable_refuses_a_run_of_another_config(mlflow_store):
    tracker = Tracker.connect(mlflow_store)
    cfg = _config(mlflow_store)
    other = cfg.replace(train=cfg.train.replace(lr=cfg.train.lr * 10))  # same name (experiment), another model
    mine, theirs = tracking.config_hash(cfg), tracking.config_hash(other)
    assert mine != theirs
    # Fields that only change how a run is carried out keep the hash: such a config may resume it.
    assert tracking.config_hash(cfg.replace(train=cfg.train.replace(max_failures=7))) == mine
    run_id = _killed_train_run(tracker, cfg)

    with pytest.raises(ConfigError, match=f"another config.*hash {mine}.*this config has {theirs}"):
        tracking.find_resumable(tracker, other, "train", run_id)
    with pytest.raises(ConfigError, match=f"no interrupted train run of this config \\(hash {theirs}\\)") as e:
        tracking.find_resumable(tracker, other, "train", True)
    assert run_id in str(e.value) and f"hash {mine}" in str(e.value)
    with pytest.raises(ConfigError, match="another config"):
        with tracking.stage_run(tracker, other, "train", resume=run_id):
            pytest.fail("a run of another config was resumed")
    assert _running(tracker, cfg) == []
    assert tracking.find_resumable(tracker, cfg, "train", True).info.run_id == run_id
    assert tracker.get_run(run_id).info.status == "KILLED"  # the refusals left it as it was
    with pytest.raises(MissingInputError, match="runs list"):
        tracking.find_resumable(tracker, cfg, "train", "0" * 32)  # a mistyped id


def test_find_resumable_skips_a_diverged_run_unless_named(mlflow_store):
    tracker = Tracker.connect(mlflow_store)
    cfg = _config(mlflow_store)
    interrupted = _killed_train_run(tracker, cfg)
    time.sleep(0.01)  # the diverged run is the newer one
    with pytest.raises(Diverged):
        with tracking.stage_run(tracker, cfg, "train") as run:
            raise Diverged("val/bpd is inf")
    diverged = run.run_id
    assert tracker.get_run(diverged).data.tags[runs.END_REASON_TAG] == "diverged"

    assert tracking.find_resumable(tracker, cfg, "train", True).info.run_id == interrupted
    assert tracking.find_resumable(tracker, cfg, "train", diverged).info.run_id == diverged  # named: allowed
    with tracking.stage_run(tracker, cfg, "train", resume=True) as again:
        assert again.run_id == interrupted
    with pytest.raises(ConfigError, match=f"{diverged} \\(it diverged.*--resume {diverged}"):
        tracking.find_resumable(tracker, cfg, "train", True)  # only the diverged one is left
    with pytest.raises(ConfigError, match="finished; nothing to resume"):
        tracking.find_resumable(tracker, cfg, "train", interrupted)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _driven_run(tracker: Tracker, cfg: PipelineConfig, pid: int, beat_age_s: float) -> str:
    return tracker.create_run(cfg.name, {
        "vaepipe.stage": "train", runs.DRIVER_TAG: f"{socket.gethostname()}:{pid}",
        runs.HEARTBEAT_TAG: f"{time.time() - beat_age_s:.0f}", runs.HEARTBEAT_EVERY_TAG: "30"})


def test_close_stale_runs_closes_runs_whose_driver_is_gone_and_leaves_live_ones(mlflow_store):
    tracker = Tracker.connect(mlflow_store)
    cfg = _config(mlflow_store)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = _driven_run(tracker, cfg, _dead_pid(), beat_age_s=0)  # fresh beat, but its process is gone
        child = tracker.create_run(cfg.name, {"mlflow.parentRunId": dead})
        silent = _driven_run(tracker, cfg, alive.pid, beat_age_s=10 * 30)  # alive, but 10 beats missed
        live = _driven_run(tracker, cfg, alive.pid, beat_age_s=5)
        assert sorted(tracking.close_stale_runs(tracker, cfg.name)) == sorted([dead, silent])
        for rid, why in ((dead, "is gone"), (silent, "last beat")):
            run = tracker.get_run(rid)
            assert run.info.status == "KILLED" and run.data.tags[runs.END_REASON_TAG] == "driver lost"
            assert why in run.data.tags[runs.ERROR_TAG]
        assert tracker.get_run(child).info.status == "KILLED"
        assert tracker.get_run(live).info.status == "RUNNING"
        assert tracking.close_stale_runs(tracker, cfg.name) == []  # nothing more to close
        # The next stage run of this config closes the stale runs itself; the live one stays.
        alive.kill()
        alive.wait()
        with tracking.stage_run(tracker, cfg, "ncp"):
            assert tracker.get_run(live).info.status == "KILLED"
    finally:
        alive.kill()
        alive.wait()
    assert _running(tracker, cfg) == []
