"""Store faults a new user meets: each gets one message naming the cause and the fix, within 5 s, and nothing
in the store is lost. Real sqlite files, real processes holding locks, two real first runs racing."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.config import TrackingConfig
from pipelines.tracking import Tracker, TrackingUnavailableError

REPO = Path(__file__).resolve().parents[2]
FAIL_WITHIN_S = 5.0


def _connect_error(tracking: TrackingConfig) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as e:
        Tracker.connect(tracking)
    took = time.monotonic() - t0
    return str(e.value), took


def _report(name: str, took: float) -> None:
    print(f"\n[figure] store fault '{name}': clear error after {took:.2f} s")


def test_a_workdir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    msg, took = _connect_error(TrackingConfig(workdir=str(tmp_path / "runs")))
    _report("tracking.workdir is a file", took)
    assert "is a file" in msg and "tracking.workdir" in msg and took < FAIL_WITHIN_S
    assert (tmp_path / "runs").read_text() == "not a directory"  # untouched


@pytest.mark.parametrize("kind", ["overwritten", "truncated"])
def test_a_corrupt_database(tmp_path, mlflow_template_db, kind):
    db = tmp_path / "mlflow.db"
    if kind == "overwritten":
        db.write_bytes(os.urandom(64 * 1024))
    else:
        db.write_bytes(mlflow_template_db.read_bytes()[: 40 * 1024])  # a copy cut short (disk full, killed copy)
    before = db.read_bytes()
    msg, took = _connect_error(TrackingConfig(workdir=str(tmp_path)))
    _report(f"corrupt mlflow.db ({kind})", took)
    assert took < FAIL_WITHIN_S
    assert str(db) in msg and f"mv {db} {db}.broken" in msg and "backup" in msg
    assert ("not a SQLite database" if kind == "overwritten" else "malformed") in msg
    assert db.read_bytes() == before  # never "repaired" or overwritten


def test_a_locked_database(tmp_path, mlflow_template_db):
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sqlite3, sys, time
            con = sqlite3.connect({str(db)!r}, isolation_level=None)
            con.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg, took = _connect_error(TrackingConfig(workdir=str(tmp_path)))
    finally:
        holder.kill()
        holder.wait()
    _report("mlflow.db locked by another process", took)
    assert took < FAIL_WITHIN_S
    assert "locked" in msg and f"fuser {db}" in msg and "mlflow server" in msg
    Tracker.connect(TrackingConfig(workdir=str(tmp_path)))  # the lock gone, the same store works


_CONNECT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from pipelines.config import TrackingConfig
    from pipelines.tracking import Tracker, TrackingUnavailableError
    t0 = time.monotonic()
    try:
        Tracker.connect(TrackingConfig(workdir={workdir!r}))
    except TrackingUnavailableError as e:
        print(f"{{time.monotonic() - t0:.3f}}")
        print(e)
        sys.exit(3)
    print("connected")
""")


def test_a_read_only_store_directory(tmp_path):
    # Root writes anywhere: as root, the store is opened by a process without the capabilities that override
    # file permissions, as an ordinary user would be.
    base = Path(tempfile.mkdtemp(prefix="vaepipe-ro-", dir="/tmp"))
    try:
        store = base / "runs"
        store.mkdir(mode=0o555)
        store.chmod(0o555)
        if os.getuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: cannot make a directory read-only to this process")
            caps = "-dac_override,-dac_read_search"
            out = subprocess.run([setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--", sys.executable,
                                  "-c", _CONNECT.format(repo=str(REPO), workdir=str(store))],
                                 capture_output=True, text=True, timeout=120,
                                 env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
            assert out.returncode == 3, (out.stdout, out.stderr[-3000:])
            took_text, msg = out.stdout.split("\n", 1)
            took = float(took_text)
        else:
            msg, took = _connect_error(TrackingConfig(workdir=str(store)))
        _report("read-only store directory", took)
        assert took < FAIL_WITHIN_S
        assert "cannot write" in msg and f"chmod u+w {store}" in msg and "tracking.workdir" in msg
        assert not (store / "mlflow.db").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_cli_answers_a_store_fault_with_one_line_and_exit_2(tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"garbage" * 1000)
    t0 = time.monotonic()
    out = subprocess.run([str(Path(sys.executable).with_name("vaepipe")), "runs", "list", "--set",
                          f"tracking.workdir={tmp_path}"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    took = time.monotonic() - t0
    print(f"\n[figure] `vaepipe runs list` on a corrupt store: exit {out.returncode} after {took:.2f} s "
          f"(including Python and MLflow imports)")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("vaepipe: error:") and "not a SQLite database" in out.stderr


def test_two_first_runs_racing_on_a_new_store(tmp_path):
    """Both create the same new store at once; the file lock lets one migrate while the other waits."""
    workdir = tmp_path / "new-store"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pipelines.config import TrackingConfig
        from pipelines.tracking import Tracker
        go = float(sys.argv[1])
        time.sleep(max(0.0, go - time.time()))
        tracker = Tracker.connect(TrackingConfig(workdir={str(workdir)!r}))
        print("experiment", tracker.experiment_id("race"))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    go = time.time() + 8.0  # both past their imports, then at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", script, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ids = {out.split()[-1] for out, _ in outs}
    assert len(ids) == 1  # one experiment, created once
    con = sqlite3.connect(workdir / "mlflow.db")
    assert con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1


# ------------------------------------------------------------------------------------------------ divergence


def _tiny_state(lr: float):
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from pipelines.config import load_config
    from pipelines.train_vae import TrainPlan, setup

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(REPO / "tests" / "base.yaml", [f"train.lr={lr}", "train.num_workers=1", "train.batch_size=32",
                                                      "train.max_skipped_steps=3", "train.val_iw_examples=8"])
    x = torch.tensor(load_digits().images[:32] / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=16, mode="bilinear").clamp(0, 1)
    plan = TrainPlan(train_examples=32, steps_per_epoch=1, total_steps=50, heartbeat_dir="")
    return cfg, setup(cfg, plan, torch.device("cpu")), x


def test_a_diverging_model_stops_with_the_designed_error_and_validation_gives_nan():
    import math

    import torch

    from pipelines.train_vae import Diverged, evaluate, training_step

    cfg, state, x = _tiny_state(lr=1e6)
    losses = []
    with pytest.raises(Diverged) as e:
        for _ in range(20):
            losses.append(training_step(state, state.model, x, cfg, torch.device("cpu"), 50)["train/loss"])
    assert e.value.code == Diverged.NONFINITE_UPDATES and "lower train.lr" in str(e.value)
    assert math.isfinite(losses[0]) and all(math.isnan(v) for v in losses[1:])  # NaN kept, not dropped
    assert len(losses) == cfg.train.max_skipped_steps + 1
    metrics = evaluate(state, [x], cfg, torch.device("cpu"), world=1)  # must not raise on a broken model
    assert math.isnan(metrics["val/nelbo"]) and math.isnan(metrics["val/iw_nll"])


@pytest.mark.slow
def test_train_with_an_absurd_learning_rate_ends_with_the_designed_message(ray_local, digits16, mlflow_store,
                                                                           tmp_path):
    import math

    from mlflow import MlflowClient

    from pipelines.config import load_config
    from pipelines.train_vae import TrainingError, run_train

    cfg = load_config(REPO / "tests" / "base.yaml", [
        f"data.path={digits16}", f"tracking.workdir={mlflow_store.workdir}",
        f"tracking.tracking_uri={mlflow_store.tracking_uri}",
        f"tracking.artifact_location={mlflow_store.artifact_location}", f"train.storage_path={tmp_path / 'ray'}",
        "train.lr=1e6", "train.epochs=2", "train.log_every_steps=2", "train.checkpoint_every_steps=4",
        "train.val_iw_examples=16", "train.max_skipped_steps=6"])
    t0 = time.monotonic()
    with pytest.raises(TrainingError) as e:
        run_train(cfg)
    took = time.monotonic() - t0
    msg = str(e.value)
    print(f"\n[figure] train.lr=1e6: designed error after {took:.0f} s: {msg}")
    assert "diverged at step" in msg and "Lower train.lr" in msg and "train.lr=100000" in msg
    client = MlflowClient(mlflow_store.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("vaepipe/demo").experiment_id],
                             "tags.`vaepipe.stage` = 'train'")[0]
    assert run.info.status == "FAILED"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert any(math.isnan(v) for v in losses)  # the non-finite values reached MLflow
    assert not client.get_metric_history(run.info.run_id, "train/resumed_from_step")  # never retried
    assert run.data.tags["vaepipe.end_reason"] == "diverged" and "diverged" in run.data.tags["vaepipe.error"]
    # --resume leaves a diverged run alone unless it is named: it would diverge again from its checkpoints.
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{run.info.run_id} \\(it diverged"):
        run_train(cfg, resume=True)


@pytest.mark.slow
def test_lost_workers_past_max_failures_say_how_to_resume(ray_local, digits16, mlflow_store, tmp_path):
    import json
    import signal
    import threading

    from mlflow import MlflowClient

    from pipelines.config import load_config
    from pipelines.train_vae import TrainingError, run_train

    cfg = load_config(REPO / "tests" / "base.yaml", [
        f"data.path={digits16}", f"tracking.workdir={mlflow_store.workdir}",
        f"tracking.tracking_uri={mlflow_store.tracking_uri}",
        f"tracking.artifact_location={mlflow_store.artifact_location}", f"train.storage_path={tmp_path / 'ray'}",
        "train.epochs=2", "train.log_every_steps=2", "train.checkpoint_every_steps=4", "train.val_iw_examples=16",
        "train.max_failures=0"])
    killed: dict = {}

    def killer():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            for hb in (tmp_path / "ray").glob("*/heartbeat/rank1.json"):
                try:
                    info = json.loads(hb.read_text())
                except (OSError, ValueError):
                    continue
                if info["step"] >= 6:
                    os.kill(info["pid"], signal.SIGKILL)
                    killed.update(info)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(TrainingError) as e:
        run_train(cfg)
    thread.join(timeout=1)
    assert killed, "the test never saw rank 1 pass step 6"
    msg = str(e.value)
    print(f"\n[figure] a worker SIGKILL with train.max_failures=0: {msg}")
    assert "max_failures=0" in msg and "vaepipe train CONFIG --resume" in msg
    client = MlflowClient(mlflow_store.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("vaepipe/demo").experiment_id],
                             "tags.`vaepipe.stage` = 'train'")[0]
    assert run.info.status == "FAILED"  # resumable: --resume picks the newest run that did not finish
