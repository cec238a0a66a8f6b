"""What vaepipe exposes and what it writes down: the local Ray listens on loopback only; credentials never reach
the MLflow store, artifacts, the console or Ray's logs. Real local Ray, real sqlite store and `mlflow server`."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _netprobe import is_loopback, listening_sockets, process_tree
from pipelines.redaction import MASK, redact_text, redact_value, split_credentials

REPO = Path(__file__).resolve().parents[2]
VAEPIPE = Path(sys.executable).with_name("vaepipe")


# ------------------------------------------------------------------------------------------------ redaction


@pytest.mark.parametrize("text, shown", [
    ("postgresql://bob:pw@db/mlflow", "postgresql://****@db/mlflow"),
    ("postgresql+psycopg2://bob:p%40ss@db:5432/m", "postgresql+psycopg2://****@db:5432/m"),
    ("http://alice:pw@host:5055", "http://****@host:5055"),
    ("s3://AKIA:xyz@bucket/k and http://u@h/x", "s3://****@bucket/k and http://****@h/x"),
    ("https://host:5000/path?q=a@b", "https://host:5000/path?q=a@b"),  # an '@' after the host is no user-info
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),  # nor one inside a path
    ("no uri here", "no uri here"),
    # presigned and SAS URLs carry their credentials in the query
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&x=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=****&X-Amz-Signature=****&x=1"),
    ("https://a.blob.core.windows.net/c?sv=2020&sig=S%3D&se=1", "https://a.blob.core.windows.net/c?sv=2020&sig=****&se=1"),
    ("https://host/p?page=2&token=t0k", "https://host/p?page=2&token=****"),
])
def test_the_user_info_of_any_uri_is_masked(text, shown):
    assert redact_text(text) == shown


def test_secret_named_keys_are_masked_whole_and_nested_values_redacted():
    assert redact_value("db_password", "hunter2") == MASK
    assert redact_value("AWS_SECRET_ACCESS_KEY", "k") == MASK
    assert redact_value("tracking.api_token", "t") == MASK
    assert redact_value("train.lr", 0.01) == 0.01
    assert redact_value("tracking.tracking_uri", "postgresql://b:pw@db/m") == "postgresql://****@db/m"
    assert redact_value("x", {"token": "t", "uri": "http://u:p@h"}) == {"token": MASK, "uri": "http://****@h"}


def test_http_credentials_split_into_mlflows_variables():
    assert split_credentials("http://alice:p%40ss@host:5055/x") == ("http://host:5055/x", "alice", "p@ss")
    assert split_credentials("http://host:5055") == ("http://host:5055", None, None)


# ------------------------------------------------------------------------------------------------ local Ray


def _ray_sockets(pids: set[int]) -> list[tuple[str, int, int, str]]:
    return [s for s in listening_sockets(pids) if "ray" in s[3] or "gcs_server" in s[3] or "raylet" in s[3]]


def test_the_session_ray_listens_on_loopback_only(ray_local):
    import ray

    @ray.remote
    def pid():
        return os.getpid()

    ray.get([pid.remote() for _ in range(2)])  # workers up, with their own ports
    sockets = _ray_sockets(process_tree(os.getpid()))
    names = {s[3] for s in sockets}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, f"Ray ports reachable from other machines: {exposed}"
    assert ray.util.get_node_ip_address() == "127.0.0.1"


def _grep_tree(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                pass
    return hits


def _sqlite_dump(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


@pytest.mark.slow
def test_a_train_run_exposes_no_port_and_writes_no_credential(digits16, mlflow_server, tmp_path):
    """`vaepipe train` as a user runs it (Ray's default token auth, no RAY_AUTH_MODE), tracking to a live
    `mlflow server` through a `user:password@` URI, with a credential planted in a config value: every socket of
    the run's process tree listens on loopback, and neither password appears anywhere it wrote."""
    uri_secret, value_secret = "PLANTED-uri-pw-5a1f", "PLANTED-value-pw-9c2e"
    host = mlflow_server.uri.removeprefix("http://")
    ray_tmp = Path(tempfile.mkdtemp(prefix="vps", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_AUTH"))}
    env.update(MLFLOW_TRACKING_URI=f"http://alice:{uri_secret}@{host}", RAY_TMPDIR=str(ray_tmp),
               HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_memory_monitor_refresh_ms="0")  # a shared CI box's memory pressure is not this test's subject
    workdir = tmp_path / "work"
    cmd = [str(VAEPIPE), "train", str(REPO / "tests" / "base.yaml"),
           "--set", f"data.path={digits16}", "--set", f"tracking.workdir={workdir}",
           "--set", f"data.cache_dir=s3://AKIAEXAMPLE:{value_secret}@bucket/cache",
           "--set", "train.epochs=1", "--set", "train.max_steps=12", "--set", "train.checkpoint_every_steps=6",
           "--set", "train.log_every_steps=3", "--set", "train.val_iw_examples=16", "--set", "train.judge_samples=0", "--set", "name=sec"]
    seen: dict[tuple[str, int, str], None] = {}
    log = tmp_path / "console.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            while proc.poll() is None:
                for addr, port, _, name in listening_sockets(process_tree(proc.pid)):
                    seen[(addr, port, name)] = None
                time.sleep(0.3)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    console = log.read_text(errors="replace")
    assert proc.returncode == 0, console[-4000:]
    # A console a person can read: vaepipe's own lines, and few of Ray's and MLflow's.
    # Ray's raylet repeats a warning every 10 s while the machine's disk is over 95% full: about the machine, not
    # about this run, so it does not count against the budget.
    lines = [line for line in console.splitlines() if "file_system_monitor" not in line]
    foreign = [line for line in lines if "[train]" not in line]
    print(f"\n[figure] console of `vaepipe train`: {len(lines)} lines, {len(foreign)} of them not vaepipe's")
    assert "Traceback" not in console and len(lines) <= 30 and len(foreign) <= 18, console  # seen: 21 and 15
    sockets = sorted(seen)
    print("\n[figure] listening sockets of `vaepipe train` and its Ray:")
    for addr, port, name in sockets:
        print(f"  {addr}:{port}  {name}")
    assert any("gcs_server" in n for _, _, n in sockets) and any("raylet" in n for _, _, n in sockets), sockets
    assert (tmp_path / "home" / ".ray" / "auth_token").stat().st_mode & 0o077 == 0  # token auth on, token private

    for secret in (uri_secret, value_secret):
        needle = secret.encode()
        assert secret not in console
        assert secret not in _sqlite_dump(mlflow_server.root / "mlflow.db")
        assert not _grep_tree(mlflow_server.root / "artifacts", needle)
        assert not _grep_tree(workdir, needle)  # Ray storage: checkpoints and their config.yaml
        assert not _grep_tree(ray_tmp, needle)  # Ray's session logs, runtime envs, worker output
    assert "s3://****@bucket/cache" in _sqlite_dump(mlflow_server.root / "mlflow.db")  # logged, masked

    # Every socket of Ray (GCS, raylet, object manager, agents, workers, Ray Data actors) and of DDP (its
    # rendezvous store, gloo's connections) is on loopback.
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, f"reachable from other machines: {exposed}"


# ------------------------------------------------------------------------------------------------ credentials


def _cli(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full_env.update(env or {})
    return subprocess.run([str(VAEPIPE), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)


def test_params_tags_and_config_yaml_never_hold_a_credential(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    from pipelines.config import load_config
    from pipelines.tracking import Tracker, pipeline_run, stage_run

    cfg = load_config(REPO / "tests" / "base.yaml", [
        f"tracking.workdir={mlflow_store.workdir}", f"tracking.tracking_uri={mlflow_store.tracking_uri}",
        f"tracking.artifact_location={mlflow_store.artifact_location}",
        "tracking.registry_uri=postgresql://bob:PLANT-reg-1@db/mlflow", "data.cache_dir=s3://AK:PLANT-cache-2@b/c"])
    tracker = Tracker(mlflow_store.tracking_uri, mlflow_store.artifact_location)
    with pipeline_run(tracker, cfg) as run:
        parent = run.run_id
        tracker.log_params(parent, {"db_password": "PLANT-param-3", "endpoint": "https://u:PLANT-param-4@h/x"})
        tracker.set_tags(parent, {"vaepipe.api_token": "PLANT-tag-5", "note": "http://u:PLANT-tag-6@h"})
        # A stage that fails on a credential-bearing URI: its error tag keeps the cause, not the secret.
        with pytest.raises(OSError):
            with stage_run(tracker, cfg, "train", parent_run_id=parent):
                raise OSError("cannot open s3://AK:PLANT-error-7@b/c/shard.parquet")
    client = MlflowClient(mlflow_store.tracking_uri)
    (failed,) = client.search_runs([client.get_run(parent).info.experiment_id], "tags.`vaepipe.stage` = 'train'")
    assert failed.info.status == "FAILED" and "s3://****@b/c/shard.parquet" in failed.data.tags["vaepipe.error"]
    run = client.get_run(parent)
    assert run.data.params["tracking.registry_uri"] == "postgresql://****@db/mlflow"
    assert run.data.params["db_password"] == MASK and run.data.tags["vaepipe.api_token"] == MASK
    text = Path(client.download_artifacts(parent, "config.yaml", str(tmp_path))).read_text()
    assert "postgresql://****@db/mlflow" in text and "s3://****@b/c" in text
    dump = _sqlite_dump(Path(mlflow_store.workdir) / "mlflow.db")
    stored = dump + text + "".join(p.read_text(errors="replace") for p in
                                   Path(mlflow_store.artifact_location).rglob("*") if p.is_file())
    assert "PLANT" not in stored


def test_console_and_errors_mask_uri_credentials(tmp_path):
    shown = _cli(["config", "show", str(REPO / "tests" / "base.yaml"),
                  "--set", "tracking.tracking_uri=postgresql://bob:PLANT-show-1@db/mlflow"])
    assert shown.returncode == 0 and "postgresql://****@db/mlflow" in shown.stdout
    assert "PLANT" not in shown.stdout + shown.stderr
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = _cli(["runs", "list", "--set", "tracking.connect_timeout_s=1"],
                env={"MLFLOW_TRACKING_URI": f"http://alice:PLANT-dead-2@127.0.0.1:{port}"})
    assert dead.returncode == 2 and "Traceback" not in dead.stderr
    assert f"127.0.0.1:{port}" in dead.stderr and "PLANT" not in dead.stdout + dead.stderr


@pytest.mark.slow
def test_user_password_http_uri_reaches_a_live_server(mlflow_server):
    host = mlflow_server.uri.removeprefix("http://")
    out = _cli(["runs", "list"], env={"MLFLOW_TRACKING_URI": f"http://alice:PLANT-live-1@{host}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PLANT" not in out.stdout + out.stderr
    assert "PLANT" not in (mlflow_server.root / "server.log").read_text(errors="replace")


# ------------------------------------------------------------------------------------------------ model files


class _Payload:
    """A pickle that runs a command when it is loaded: what a swapped model.pth can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_swapped_model_file_is_refused_before_unpickling(mlflow_store, tmp_path, capsys):
    import pickle

    import torch

    from pipelines import cli
    from pipelines.config import load_config
    from pipelines.registry import load_registered
    from pipelines.tracking import MODEL_SHA256_TAG, ModelIntegrityError, Tracker
    from vae import NVAE, NVAEConfig

    torch.set_num_threads(1)
    cfg = load_config(REPO / "tests" / "base.yaml", [f"tracking.workdir={mlflow_store.workdir}",
                                                      f"tracking.tracking_uri={mlflow_store.tracking_uri}",
                                                      f"tracking.artifact_location={mlflow_store.artifact_location}"])
    tracker = Tracker.connect(cfg.tracking)
    run_id = tracker.create_run(cfg.name, {"vaepipe.stage": "train"}, run_name="train")
    uri = tracker.log_pytorch_model(run_id, NVAE(NVAEConfig.preset("tiny", image_shape=(1, 8, 8))))
    version = tracker.register_model(uri, "sec-nvae")
    mv = tracker.client.get_model_version("sec-nvae", version)
    assert len(mv.tags[MODEL_SHA256_TAG]) == 64 and "data/model.pth" in mv.tags["vaepipe.model_files"]
    assert type(load_registered(tracker, "models:/sec-nvae@candidate")).__name__ == "NVAE"  # intact: loads

    stored = [p for p in Path(mlflow_store.artifact_location).rglob("model.pth")]
    assert stored, "no model.pth in the artifact store"
    marker = tmp_path / "pwned"
    for path in stored:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    for ref in ("models:/sec-nvae@candidate", f"models:/sec-nvae/{version}", f"runs:/{run_id}/model"):
        with pytest.raises(ModelIntegrityError, match="do not match the sha256") as e:
            load_registered(tracker, ref)
        assert not marker.exists(), f"{ref}: the swapped pickle ran"
    assert "data/model.pth" in str(e.value) or "runs:/" in str(e.value)
    code = cli.main(["sample", "models:/sec-nvae@candidate", "--tracking-uri", mlflow_store.tracking_uri,
                     "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Refusing to load it" in err and "Traceback" not in err and not marker.exists()
