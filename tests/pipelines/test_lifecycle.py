"""The life of a stage's MLflow runs under real interruptions: Ctrl-C (SIGINT) to a `vaepipe train` driver, a driver
killed outright (SIGKILL), a corrupt shard found before training, and `--resume` aimed at a run of another config."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from pipelines.config import load_config
from pipelines.errors import ConfigError, DatasetError
from pipelines.tracking import Tracker, stage_run
from pipelines.train_vae import run_train

REPO = Path(__file__).resolve().parents[2]


def _overrides(digits16: str, store, tmp_path: Path, **train) -> list[str]:
    out = [f"data.path={digits16}", f"tracking.workdir={store.workdir}", f"tracking.tracking_uri={store.tracking_uri}",
           f"tracking.artifact_location={store.artifact_location}", f"train.storage_path={tmp_path / 'ray'}",
           "train.log_every_steps=5", "train.checkpoint_every_steps=10", "train.val_iw_examples=16", "train.judge_samples=0"]
    return out + [f"train.{k}={v}" for k, v in train.items()]


def _driver(args: list[str], tmp_path: Path, name: str) -> subprocess.Popen:
    """`vaepipe ARGS` in its own process group (its own local Ray), stdout and stderr into tmp_path/name.log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    log = open(tmp_path / f"{name}.log", "w")
    # SIGINT's default action in the driver, as at a terminal: a test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and so would the driver.
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_line(proc: subprocess.Popen, log: Path, needle: str, timeout_s: float = 240.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if needle in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended (rc {proc.returncode}) before {needle!r}:\n"
                                 + log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no {needle!r} within {timeout_s:g} s:\n" + log.read_text(errors="replace")[-3000:])


def _runs(store) -> dict[str, object]:
    client = mlflow.MlflowClient(store.tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.data.tags.get("vaepipe.stage"): r for r in client.search_runs(exps)}


@pytest.mark.slow
def test_ctrl_c_then_sigkill_then_resume(ray_local, digits16, mlflow_store, tmp_path):
    args = ["train", str(REPO / "tests" / "base.yaml")]
    for o in _overrides(digits16, mlflow_store, tmp_path, epochs=2, batch_size=64, num_workers=1):
        args += ["--set", o]

    # Ctrl-C: exit 130 with the command that resumes, both runs KILLED (resumable), none RUNNING.
    first = _driver(args, tmp_path, "first")
    _wait_for_line(first, tmp_path / "first.log", "step 10/")
    os.kill(first.pid, signal.SIGINT)
    assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    text = (tmp_path / "first.log").read_text()
    assert "interrupted" in text and "vaepipe train CONFIG --resume" in text
    runs = _runs(mlflow_store)
    train_id = runs["train"].info.run_id
    for stage in ("train", "pipeline"):
        assert runs[stage].info.status == "KILLED", (stage, runs[stage].info.status)
        assert runs[stage].data.tags["vaepipe.end_reason"] == "interrupted"

    # The resumed driver is killed outright: nothing closes its runs, they stay RUNNING.
    second = _driver(args + ["--resume"], tmp_path, "second")
    _wait_for_line(second, tmp_path / "second.log", "step 20/")
    assert f"resuming run {train_id}" in (tmp_path / "second.log").read_text()
    os.killpg(second.pid, signal.SIGKILL)
    second.wait(timeout=60)
    assert {s: r.info.status for s, r in _runs(mlflow_store).items()} == {"train": "RUNNING", "pipeline": "RUNNING"}

    # The next command of that config closes them (driver gone), and --resume finishes the same run.
    cfg = load_config(REPO / "tests" / "base.yaml",
                      _overrides(digits16, mlflow_store, tmp_path, epochs=2, batch_size=64, num_workers=1))
    result = run_train(cfg, resume=True)
    assert result.run_id == train_id
    runs = _runs(mlflow_store)
    assert {s: r.info.status for s, r in runs.items()} == {"train": "FINISHED", "pipeline": "FINISHED"}
    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    steps = [m.step for m in client.get_metric_history(train_id, "train/loss")]
    assert len(steps) == len(set(steps)), sorted(steps)  # replayed steps are not logged twice
    assert max(steps) == int(runs["train"].data.params["plan.total_steps"])
    resumed_from = [m.value for m in client.get_metric_history(train_id, "train/resumed_from_step")]
    assert len(resumed_from) == 2 and resumed_from[0] == 10 and resumed_from[1] >= 20, resumed_from


@pytest.mark.slow
def test_a_corrupt_shard_stops_training_before_any_run_opens(ray_local, digits16, mlflow_store, tmp_path):
    data = tmp_path / "digits16"
    shutil.copytree(digits16, data)
    shard = sorted((data / "train").glob("*.parquet"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cfg = load_config(REPO / "tests" / "base.yaml", _overrides(str(data), mlflow_store, tmp_path))
    with pytest.raises(DatasetError, match="sha256|checksum"):
        run_train(cfg)
    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    assert not [r for r in client.search_runs(exps) if r.info.status == "RUNNING"]


def test_resume_refuses_a_run_of_another_config(digits16, mlflow_store, tmp_path, monkeypatch):
    import pipelines.train_vae as tv

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a refused --resume")

    monkeypatch.setattr(tv, "init_ray", no_ray)
    old = load_config(REPO / "tests" / "base.yaml", _overrides(digits16, mlflow_store, tmp_path, lr=0.01))
    tracker = Tracker.connect(old.tracking)
    with pytest.raises(RuntimeError):
        with stage_run(tracker, old, "train", data_path=digits16) as run:
            run.set_tags({"vaepipe.ray_run": "x"})
            raise RuntimeError("worker lost")
    assert tracker.get_run(run.run_id).info.status == "FAILED"
    new = load_config(REPO / "tests" / "base.yaml", _overrides(digits16, mlflow_store, tmp_path, lr=0.002))
    with pytest.raises(ConfigError, match="no interrupted train run of this config") as e:
        run_train(new, resume=True)
    assert run.run_id in str(e.value) and "another config" in str(e.value)
    with pytest.raises(ConfigError, match="another config"):
        run_train(new, resume=run.run_id)
    # Resume-neutral fields (how far to go, how often to log) may differ: the old run qualifies.
    same = load_config(REPO / "tests" / "base.yaml",
                       _overrides(digits16, mlflow_store, tmp_path, lr=0.01, max_steps=7, log_every_steps=3))
    with pytest.raises(AssertionError, match="Ray must not start"):
        run_train(same, resume=True)
