"""pipelines.tracking against a real sqlite store on disk and a real `mlflow server` on loopback."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import socket
import sqlite3
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
from pipelines.tracking import Tracker, TrackingUnavailableError, dataset_tag, list_pipeline_runs

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
    data = dataset_tag(_manifest(tmp_path))
    parent = tracker.start_pipeline_run(cfg, run_name="pipe")
    child = tracker.start_stage_run(cfg, "ncp", parent, dataset_tag=data, source_model="models:/x-nvae@candidate")

    tracker.log_metrics(child, {"train/loss": 3.0, "val/bpd": torch.tensor(1.5)}, step=0)
    tracker.log_metrics(child, {"train/loss": 2.0, "val/bpd": np.float32(1.25)}, step=5)
    tracker.log_metrics(child, {"train/loss": float("inf"), "val/bpd": float("nan")}, step=9)
    grid = torch.linspace(0, 1, 3 * 8 * 8).reshape(3, 8, 8)
    tracker.log_image(child, grid, "samples/grid.png")
    tracker.log_image(child, np.full((4, 5), 7, dtype=np.uint8), "gray.png")
    tracker.log_dict(child, {"fid": 12.5}, "eval/metrics.json")
    tracker.end_run(child, "FAILED")
    tracker.end_run(parent)

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
    run_id = tracker.start_stage_run(cfg, "train", tracker.start_pipeline_run(cfg))
    params = {f"extra.p{i:03d}": i for i in range(250)}  # MLflow takes 100 params per request
    params["extra.long"] = "x" * 7000  # over MLflow's 6000-character value limit
    tracker.log_params(run_id, params)
    tracker.log_metrics(run_id, {f"m/{i:04d}": float(i) for i in range(1200)}, step=3)  # 1000 per request

    run = tracker.client.get_run(run_id)
    assert all(run.data.params[f"extra.p{i:03d}"] == str(i) for i in range(250))
    long = run.data.params["extra.long"]
    assert len(long) == 6000 and long.startswith("xxx") and long.endswith("[truncated]")
    assert len([k for k in run.data.metrics if k.startswith("m/")]) == 1200
    assert run.data.metrics["m/1199"] == 1199.0


def test_register_model_with_alias_loads_back_and_is_listed(store, tmp_path, capsys):
    tracker = Tracker.connect(store)
    cfg = _config(store)
    parent = tracker.start_pipeline_run(cfg, run_name="pipe")
    child = tracker.start_stage_run(cfg, "train", parent)
    torch.manual_seed(0)
    model = _Sampler()
    model_uri = tracker.log_pytorch_model(child, model)
    name = f"{cfg.name}-nvae"
    assert tracker.register_model(model_uri, name, tags={"bpd": 1.5}) == "1"
    v2 = tracker.register_model(f"runs:/{child}/model", name)  # a run-relative URI works as well
    assert v2 == "2"
    tracker.end_run(child)
    tracker.end_run(parent)

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
    tracking.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["runs", "list", "--config", str(cfg_file), "--limit", "5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert parent in out and child in out and f"vaepipe/{cfg.name}" in out
    assert f"{name} v2 @candidate" in out and f"{name} v1 @champion" in out


def test_runs_list_with_tracking_uri_and_no_store(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    tracking.register(parser.add_subparsers(dest="command", required=True))
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
    monkeypatch.setattr(tracking.time, "sleep", delays.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise mlflow.exceptions.MlflowException("wrapped") from sqlite3.OperationalError("database is locked")
        return "ok"

    assert tracking._retry_locked(flaky) == "ok"
    assert len(calls) == 3 and len(delays) == 2 and delays[0] < 0.4 <= delays[1]  # backing off
    with pytest.raises(ValueError):
        tracking._retry_locked(lambda: (_ for _ in ()).throw(ValueError("other")))
    assert len(delays) == 2  # other errors are not retried

    def always_locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        tracking._retry_locked(always_locked)


def test_bad_inputs_name_the_fix(mlflow_server):
    tracker = Tracker(mlflow_server.uri)  # every check fires before a request is made
    with pytest.raises(ValueError, match="PNG"):
        tracker.log_image("run", torch.zeros(3, 4, 4), "grid.jpg")
    with pytest.raises(ValueError, match="make_grid"):
        tracking._image_to_uint8_hwc(torch.zeros(2, 3, 4, 4))
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
