"""Object storage end to end on a real S3-compatible server on loopback (moto's standalone server, the S3 REST API
over HTTP): data prepared to s3://, its manifest checks, tamper detection and no half data set that looks complete;
Ray Train checkpoints on an s3:// storage path, and a resume from there; an `mlflow server` whose artifacts go to
the bucket, a model loaded back in a fresh process. Credentials come from the standard AWS variables (fake ones
here) with AWS_ENDPOINT_URL, and never reach output, params or tags."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUCKET = "vaepipe"
SECRET = "fake-secret-key-0123456789"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (port chosen by the OS) with one bucket; the AWS variables point at it for
    this module and are put back afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "fake-access-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    # pyarrow also writes empty "directory/" marker objects: only files count
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))


def test_prepare_to_s3_is_verified_and_tampering_is_refused(s3, capsys):
    from pipelines.cli import main
    from pipelines.data.manifest import DatasetError, read_manifest, verify

    uri = f"s3://{BUCKET}/digits16"
    assert main(["data", "prepare", "digits", "--out", uri, "--image-size", "16"]) == 0
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    keys = _keys(s3, "digits16/")
    assert "digits16/dataset.json" in keys and "digits16/train/part-00000.parquet" in keys
    assert not any(".tmp" in k for k in keys)
    manifest = read_manifest(uri)
    assert manifest.splits["train"] + manifest.splits["val"] + manifest.splits["test"] == 1797
    assert verify(manifest, uri).shards == len(keys) - 1
    # The plain reader reads it back from S3, checksums first.
    from pipelines.data.readers import load_split

    val = load_split(uri, "val")
    assert val["image"].shape == (manifest.splits["val"], 1, 16, 16)

    # One changed byte in a shard object: refused, naming the shard and the command that remakes it.
    shard = "digits16/val/part-00000.parquet"
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=shard)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=shard, Body=bytes(body))
    with pytest.raises(DatasetError, match=r"val/part-00000.parquet.*does not match its checksum.*--overwrite"):
        verify(manifest, uri)
    s3.delete_object(Bucket=BUCKET, Key=shard)
    with pytest.raises(DatasetError, match="is missing"):
        verify(manifest, uri)


def test_a_preparation_cut_short_on_s3_never_looks_complete(s3, monkeypatch):
    """A crash after some shards: the prefix holds Parquet objects but no dataset.json, so every reader refuses it;
    an overwrite that fails the same way leaves no stale manifest over mixed shards either."""
    from pipelines.config import DataConfig
    from pipelines.data import prepare as prep
    from pipelines.data.manifest import DatasetError, read_manifest

    uri = f"s3://{BUCKET}/cut"
    cfg = DataConfig(source="digits", path=uri, image_size=16)
    real = prep._write_shard
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("connection reset (simulated crash)")
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "_write_shard", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        prep.prepare_dataset(cfg, progress=False)
    assert _keys(s3, "cut/") == ["cut/train/part-00000.parquet"]
    with pytest.raises(DatasetError, match="preparation did not finish"):
        read_manifest(uri)

    monkeypatch.setattr(prep, "_write_shard", real)
    prep.prepare_dataset(cfg, overwrite=True, progress=False)
    assert read_manifest(uri).splits["train"] > 0
    calls.clear()
    monkeypatch.setattr(prep, "_write_shard", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        prep.prepare_dataset(cfg, overwrite=True, progress=False)
    assert "cut/dataset.json" not in _keys(s3, "cut/")  # the old manifest went first
    with pytest.raises(DatasetError, match="preparation did not finish"):
        read_manifest(uri)


@pytest.fixture(scope="module")
def mlflow_on_s3(s3, tmp_path_factory):
    """`mlflow server` with a sqlite backend and --artifacts-destination s3://vaepipe/mlflow (proxied: clients need
    no S3 credentials); the server reads the AWS variables like any S3 client."""
    root = tmp_path_factory.mktemp("mlflow_s3")
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{BUCKET}/mlflow"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{uri}/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    try:
        yield uri, root
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=3)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        log.close()


@pytest.fixture(scope="module")
def ray_with_s3_env(s3):
    """A local Ray whose workers get the AWS variables (a Ray started before them would not pass them on); the
    session Ray, if one runs, is stopped first and started again afterwards."""
    import ray

    from pipelines.ray_env import start_local_ray

    had_local = ray.is_initialized()
    if had_local:
        ray.shutdown()
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    start_local_ray(num_cpus=4, object_store_memory=512 * 1024**2, runtime_env={"env_vars": {**aws, "TQDM_DISABLE": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()
        if had_local:
            start_local_ray(num_cpus=4, object_store_memory=512 * 1024**2, log_to_driver=True,
                            runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})


@pytest.mark.slow
@pytest.mark.cluster  # an object store on loopback: with the multi-node tests in `make test-cluster`
def test_train_with_data_checkpoints_and_artifacts_on_s3(s3, mlflow_on_s3, ray_with_s3_env, tmp_path, capfd):
    """Data read through Ray Data from s3://, checkpoints on an s3:// storage path, resumed from there; pictures,
    checkpoints and the registered model in the bucket through the tracking server; load_model in a fresh process
    with no S3 credentials; the secret in no param, tag or output."""
    import mlflow

    from pipelines.config import load_config
    from pipelines.data import prepare_dataset
    from pipelines.train_vae import run_train

    data = f"s3://{BUCKET}/train-digits16"
    uri, _ = mlflow_on_s3

    def cfg(**train):
        over = [f"data.path={data}", "name=s3test", f"tracking.workdir={tmp_path / 'work'}",
                f"tracking.tracking_uri={uri}", f"train.storage_path=s3://{BUCKET}/ray", "train.log_every_steps=10",
                "train.val_iw_examples=0", "train.epochs=1", "train.batch_size=64", "train.num_workers=1",
                "train.in_memory_max_mb=0",  # streamed by Ray Data, as a dataset too large for memory would be
                "train.checkpoint_every_steps=10", "train.use_ema=false"]
        return load_config(REPO / "tests" / "base.yaml", over + [f"train.{k}={v}" for k, v in train.items()])

    prepare_dataset(cfg().data, progress=False)
    first = run_train(cfg(max_steps=15))  # cut short after a checkpoint at step 10 and one at the stop
    ray_keys = _keys(s3, "ray/")
    assert any("/checkpoint" in k for k in ray_keys), ray_keys[:20]
    client = mlflow.MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    client.set_terminated(first.run_id, "KILLED")  # what an interrupted (Ctrl-C) run looks like to --resume
    resumed = run_train(cfg(), resume=True)
    assert resumed.run_id == first.run_id and client.get_run(first.run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(first.run_id, "train/resumed_from_step")] == [15]
    out = capfd.readouterr()

    run = client.get_run(first.run_id)
    art = _keys(s3, "mlflow/")
    assert any(k.endswith(".png") for k in art), art[:20]  # pictures
    assert any("model" in k and k.endswith(("model.pth", "data/model.pth", "MLmodel")) for k in art), art[:30]
    assert any(k.endswith("config.yaml") for k in art)
    version = client.get_model_version_by_alias("s3test-nvae", "candidate")
    assert version.source
    shown = out.out + out.err + repr(run.data.params) + repr(run.data.tags)
    assert SECRET not in shown and "fake-access-key" not in shown

    script = textwrap.dedent(f"""
        import mlflow, torch
        mlflow.set_tracking_uri({uri!r})
        m = mlflow.pytorch.load_model("models:/s3test-nvae@candidate")
        assert type(m).__name__ == "NVAE", type(m)
        x = m.sample(2)
        assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}  # the server proxies S3
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
