"""Stage train end to end on a local Ray and a real sqlite MLflow store, on the digits data made offline."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.config import load_config
from pipelines.train_vae import lr_factor, plan_steps, read_checkpoint, run_train
from vae.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def make_cfg(digits16: str, store, tmp_path: Path, **train):
    overrides = [f"data.path={digits16}", f"tracking.workdir={store.workdir}",
                 f"tracking.tracking_uri={store.tracking_uri}", f"tracking.artifact_location={store.artifact_location}",
                 f"train.storage_path={tmp_path / 'ray'}", "train.log_every_steps=10", "train.val_iw_examples=32",
                 "train.judge_samples=0"]  # the judge of samples is trained and checked in one test only
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(REPO / "tests" / "base.yaml", overrides)


def test_lr_schedule_warms_up_then_decays_to_min():
    f = [lr_factor(s, 10, 100, 1e-2, 1e-4) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 10, 100, 1e-2, 1e-4) * 1e-2 == pytest.approx(1e-4)
    assert 1e-4 < f[-1] * 1e-2 < 2e-4


def test_ema_warms_up_then_follows_the_configured_decay():
    from pipelines.train_vae import ema_with_warmup

    update = ema_with_warmup(0.999)
    ema, p = [torch.zeros(3)], [torch.ones(3)]
    update(ema, p, torch.tensor(0))
    assert torch.allclose(ema[0], torch.full((3,), 0.9))  # d = 1/10 at the first update
    ema = [torch.zeros(3)]
    update(ema, p, torch.tensor(100000))
    assert torch.allclose(ema[0], torch.full((3,), 0.001))  # the configured 0.999 once warmed up


def test_plan_gives_every_rank_whole_batches_and_refuses_too_small_data():
    assert plan_steps(1437, 2, 32, 3) == (22, 66)
    with pytest.raises(ConfigError, match="train.batch_size"):
        plan_steps(100, 2, 64, 1)


def _assert_lineage_card_and_servable(result, cfg, digits16: str, store) -> None:
    """The train stage logs its data as MLflow dataset inputs, describes the registered version in a model card,
    and registers a model the pyfunc flavour serves."""
    import pandas as pd

    from pipelines import serving
    from pipelines.data import read_manifest
    from pipelines.tracking import lineage

    client = mlflow.MlflowClient(store.tracking_uri)
    inputs = client.get_run(result.run_id).inputs.dataset_inputs
    manifest = read_manifest(digits16)
    assert {i.dataset.name for i in inputs} == {f"{manifest.name}-train", f"{manifest.name}-val"}
    sizes = {i.dataset.name: json.loads(i.dataset.profile)["num_examples"] for i in inputs}
    assert sizes[f"{manifest.name}-train"] == manifest.splits["train"]
    card = client.get_model_version(result.registered_model, result.registered_version).description
    assert card.startswith(f"# {result.registered_model} v{result.registered_version}")
    assert lineage.config_hash(cfg) in card and manifest.sha256 in card and "`val/" in card
    pipeline_run = client.get_run(result.run_id).data.tags["vaepipe.pipeline_run"]
    assert pipeline_run in card and result.run_id in card
    served = mlflow.pyfunc.load_model(result.model_uri)
    out = served.predict(pd.DataFrame({"request": ["sample"]}), params={"n": 2})
    assert [img.shape for img in serving.decode_images(list(out["image"]))] == [(16, 16), (16, 16)]


def _final_state(result) -> dict:
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="checkpoint")
    return read_checkpoint(local)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


@pytest.mark.slow
def test_resume_continues_at_the_same_step_with_identical_state(ray_local, digits16, mlflow_store, tmp_path):
    mlflow.set_tracking_uri(mlflow_store.tracking_uri)
    common = dict(epochs=1, batch_size=64, num_workers=1, checkpoint_every_steps=10, use_ema="false",
                  log_every_steps=5)
    straight_cfg = make_cfg(digits16, mlflow_store, tmp_path / "a", **common)
    straight = run_train(straight_cfg)
    _assert_lineage_card_and_servable(straight, straight_cfg, digits16, mlflow_store)

    # The same run cut short at step 15 (checkpoint at 10 and at the stop), then resumed to the end of the epoch.
    cfg_b = make_cfg(digits16, mlflow_store, tmp_path / "b", **common, max_steps=15)
    first = run_train(cfg_b)
    assert _final_state(first)["step"] == 15
    client = mlflow.MlflowClient()
    client.set_terminated(first.run_id, "FAILED")  # what an interrupted run looks like to --resume
    resumed = run_train(make_cfg(digits16, mlflow_store, tmp_path / "b", **common), resume=True)
    assert resumed.run_id == first.run_id  # the same MLflow run, not a second one
    steps = [m.step for m in client.get_metric_history(first.run_id, "train/loss")]
    assert min(s for s in steps if s > 15) == 20  # continued where it stopped
    assert len(steps) == len(set(steps))
    assert [m.value for m in client.get_metric_history(first.run_id, "train/resumed_from_step")] == [15]
    _assert_same_state(_final_state(straight), _final_state(resumed))


@pytest.mark.slow
def test_two_workers_train_through_a_killed_worker_register_and_the_model_loads_in_a_fresh_process(
        ray_local, digits16, mlflow_store, tmp_path):
    """Two DDP workers for 3 epochs; rank 1 is SIGKILLed at step 25 and Ray restarts both from the last checkpoint.
    The run ends FINISHED with every step logged once, validation improving, pictures, the final checkpoint, and a
    registered model that a fresh process loads and samples from."""
    cfg = make_cfg(digits16, mlflow_store, tmp_path, epochs=3, batch_size=64, num_workers=2,
                   checkpoint_every_steps=10, max_failures=1, judge_samples=200)
    cfg = cfg.replace(train=cfg.train.replace(log_every_steps=5))
    killed: dict = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            for hb in (tmp_path / "ray").glob("*/heartbeat/rank1.json"):
                try:
                    info = json.loads(hb.read_text())
                except (OSError, ValueError):
                    continue
                if info["step"] >= 25:
                    os.kill(info["pid"], signal.SIGKILL)
                    killed.update(info)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_train(cfg)
    thread.join(timeout=1)
    assert killed, "the test never saw rank 1 pass step 25"
    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(result.run_id, "train/loss")
    logged = [m.step for m in history]
    assert len(logged) == len(set(logged)), sorted(logged)  # steps replayed after the restart are not logged twice
    steps = sorted(logged)
    total = int(run.data.params["plan.total_steps"]) if "plan.total_steps" in run.data.params else steps[-1]
    assert steps[-1] == total
    # Ray restarted both workers from the newest checkpoint before the kill: nothing lost beyond the checkpoint
    # interval, and every step up to the end was trained and logged.
    resumed = [m.value for m in client.get_metric_history(result.run_id, "train/resumed_from_step")]
    assert len(resumed) == 1, resumed
    assert killed["step"] - 10 <= resumed[0] <= killed["step"], (killed, resumed)
    assert all(b - a <= 5 for a, b in zip(steps, steps[1:]))
    bpd = [m.value for m in sorted(client.get_metric_history(result.run_id, "val/bpd"), key=lambda m: m.step)]
    assert len(bpd) == 3
    assert bpd[-1] < bpd[0] - 0.05, bpd
    iw = client.get_metric_history(result.run_id, "val/iw_nll")
    nelbo = client.get_metric_history(result.run_id, "val/nelbo")
    assert iw and iw[-1].value <= nelbo[-1].value + 1e-3
    assert run.data.tags["vaepipe.stage"] == "train"
    assert "train/kl/group_00" in run.data.metrics and "train/images_per_s" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(result.run_id, "pictures")}
    assert any("samples_t0.7" in a for a in arts) and any("reconstructions" in a for a in arts)
    assert {a.path for a in client.list_artifacts(result.run_id, "checkpoint")} >= {"checkpoint/state.pt"}
    # The judge of samples (its own MLflow run) saw the final model's samples and real validation digits; the real
    # digits are its ceiling, and this short training stays below it.
    m = run.data.metrics
    assert m["eval/judge_recognised_real"] > 0.6, m
    for t in ("0.7", "1.0"):
        assert 0.0 <= m[f"eval/judge_recognised_t{t}"] < m["eval/judge_recognised_real"], m
    assert client.get_run(run.data.tags["vaepipe.judge_run"]).data.tags["vaepipe.stage"] == "feature_extractor"
    assert result.metrics["eval/judge_recognised_t0.7"] == m["eval/judge_recognised_t0.7"]  # the summary's figure
    mv = client.get_model_version_by_alias("demo-nvae", "candidate")
    assert str(mv.version) == result.registered_version

    script = textwrap.dedent(f"""
        import mlflow, torch
        mlflow.set_tracking_uri({mlflow_store.tracking_uri!r})
        m = mlflow.pytorch.load_model("models:/demo-nvae@candidate")
        assert type(m).__name__ == "NVAE", type(m)
        x = m.sample(4, temperature=0.7)
        assert x.shape == (4, 1, 16, 16) and torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
        print("ok", tuple(x.shape))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok (4, 1, 16, 16)" in out.stdout


def test_bad_inputs_fail_before_any_worker_starts(digits16, mlflow_store, tmp_path, monkeypatch):
    import pipelines.train_vae as tv

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(tv, "init_ray", no_ray)
    good = make_cfg(digits16, mlflow_store, tmp_path)
    missing = load_config(REPO / "tests" / "base.yaml", [f"data.path={tmp_path / 'nothing'}",
                                                          f"tracking.tracking_uri={mlflow_store.tracking_uri}"])
    with pytest.raises(Exception, match="vaepipe data prepare"):
        run_train(missing)
    unreachable = load_config(REPO / "tests" / "base.yaml", [f"data.path={digits16}",
                                                              "tracking.tracking_uri=http://127.0.0.1:9",
                                                              "tracking.connect_timeout_s=3"])
    t0 = time.time()
    with pytest.raises(Exception, match="127.0.0.1:9"):
        run_train(unreachable)
    assert time.time() - t0 < 20
    with pytest.raises(ConfigError, match="nvae.preset"):
        load_config(REPO / "tests" / "base.yaml", ["nvae.preset=gigantic"])
    wrong_shape = load_config(REPO / "tests" / "base.yaml", [f"data.path={digits16}",
                                                              "nvae.image_shape=[1,32,32]"])
    with pytest.raises(ConfigError, match=r"does not match the dataset"):
        run_train(wrong_shape)
    with pytest.raises(ConfigError, match="no interrupted train run"):
        run_train(good, resume=True)


def test_accumulated_micro_batches_update_with_the_mean_of_their_gradients():
    """An elastic run below its most workers takes each step over several forward passes: the update must use the mean
    of the micro-batches' gradients, each computed at the same weights, as DDP's all-reduce over that many workers
    would. (Spectral regularisation off: its power iteration advances with every forward pass.)"""
    import copy

    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from pipelines.train_vae import TrainPlan, seed_everything, setup, training_step

    cfg = load_config(REPO / "tests" / "base.yaml", ["nvae.lambda_sr=0", "train.grad_clip=0", "train.use_ema=false",
                                                        "train.num_workers=[1,2]", "train.batch_size=32"])
    assert cfg.train.accumulation(1) == 2 and cfg.train.worker_batch_size == 16
    x = torch.tensor(load_digits().images[:32] / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=16, mode="bilinear").clamp(0, 1)
    seed_everything(0)
    state = setup(cfg, TrainPlan(train_examples=32, steps_per_epoch=1, total_steps=10, heartbeat_dir=""),
                  torch.device("cpu"))
    fresh = [copy.deepcopy(state.model) for _ in range(2)]
    recorded = {}
    step = state.optimizer.step

    def recording_step(*a, **k):
        recorded["grads"] = [p.grad.clone() for p in state.model.parameters()]
        return step(*a, **k)

    state.optimizer.step = recording_step
    torch.manual_seed(1)
    stats = training_step(state, state.model, [x[:16], x[16:]], cfg, torch.device("cpu"), 10)
    torch.manual_seed(1)  # the same noise, drawn in the same order, for the micro-batches one at a time
    grads = []
    for model, xb in zip(fresh, (x[:16], x[16:])):
        model.set_step(0, 10)
        model(xb).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert state.step == 1 and torch.isfinite(stats["train/loss"])
    for got, g1, g2 in zip(recorded["grads"], *grads):
        torch.testing.assert_close(got, (g1 + g2) / 2, rtol=1e-4, atol=1e-6)
    # One pass of the union would not be the same update (BatchNorm's statistics are per forward pass).
    union = copy.deepcopy(fresh[0])
    union.zero_grad()
    torch.manual_seed(1)
    union(x).loss.backward()
    assert any(not torch.allclose(u.grad, r, rtol=1e-3, atol=1e-5)
               for u, r in zip(union.parameters(), recorded["grads"]))
