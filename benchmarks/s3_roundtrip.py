"""S3 round trip: a data set prepared to S3, read back through the pyarrow reader and Ray Data, and a checkpoint
saved to and restored from S3; each against the same work on local disk.

    .venv/bin/python benchmarks/s3_roundtrip.py [--num-examples 20000] [--image-size 32] [--endpoint URL]

Without --endpoint it starts moto's S3 server on 127.0.0.1 (an S3 REST API in a thread of this process: an upper
bound on the protocol's cost on one machine, not a figure for AWS S3). With --endpoint (e.g. a MinIO) it uses the
AWS variables of the environment and the bucket --bucket. Prints seconds and MB/s per step.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-examples", type=int, default=20000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--endpoint", default=None)
    p.add_argument("--bucket", default="vaepipe-bench")
    p.add_argument("--checkpoint-mb", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=4)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    server = None
    if args.endpoint is None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    else:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import boto3
    import numpy as np
    import pyarrow.fs as pafs
    import torch

    torch.set_num_threads(1)
    from pipelines.ray_env import start_local_ray
    from pipelines.config import DataConfig
    from pipelines.data import prepare_dataset
    from pipelines.data.manifest import read_manifest, verify
    from pipelines.data.readers import iter_torch_batches, load_split, ray_dataset

    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=args.bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    local_root = tempfile.mkdtemp(prefix="s3bench")
    targets = {"local": os.path.join(local_root, "shapes"), "s3": f"s3://{args.bucket}/bench/shapes"}
    cfg = DataConfig(source="shapes", image_size=args.image_size, num_examples=args.num_examples, rgb=True)
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    start_local_ray(num_cpus=args.num_cpus, object_store_memory=512 * 1024**2,
                    runtime_env={"env_vars": {**aws, "TQDM_DISABLE": "1"}})
    rows = []
    for where, path in targets.items():
        manifest, t_prep = _timed(lambda: prepare_dataset(cfg.replace(path=path), path, progress=False))
        mb = manifest.total_bytes / 1e6
        _, t_verify = _timed(lambda: verify(read_manifest(path), path))
        batch, t_load = _timed(lambda: load_split(path, "train", verify=False))
        n = batch["image"].shape[0]
        rates = []
        for _ in range(2):  # the first Ray Data pass includes starting its read tasks
            ds = ray_dataset(path, "train", verify=False)
            t0, seen = time.perf_counter(), 0
            for b in iter_torch_batches(ds, batch_size=256):
                seen += b["image"].shape[0]
            rates.append(seen / (time.perf_counter() - t0))
        rows.append((where, f"prepare {t_prep:.1f} s ({mb:.1f} MB Parquet)", f"verify {t_verify:.2f} s "
                     f"({mb / t_verify:.0f} MB/s)", f"pyarrow read {n / t_load:.0f} img/s",
                     f"Ray Data {max(rates):.0f} img/s (first pass {rates[0]:.0f})"))
        print("  " + " | ".join(rows[-1]), flush=True)

    # A checkpoint directory like the train stage's (model + optimizer state), saved and restored through the
    # same pyarrow filesystem Ray Train uses for its storage_path.
    ckpt = os.path.join(local_root, "ckpt")
    os.makedirs(ckpt)
    n_floats = args.checkpoint_mb * 2**20 // 4
    torch.save({"model": torch.randn(n_floats // 3), "optimizer": torch.randn(2 * n_floats // 3)},
               os.path.join(ckpt, "state.pt"))
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)) / 1e6
    for where, dest in (("local", os.path.join(local_root, "storage/ckpt")), ("s3", f"s3://{args.bucket}/ray/ckpt")):
        fs, root = pafs.FileSystem.from_uri(dest)
        fs.create_dir(root, recursive=True)
        _, t_save = _timed(lambda: pafs.copy_files(ckpt, root, destination_filesystem=fs))
        back = os.path.join(local_root, f"restored-{where}")
        os.makedirs(back)
        _, t_load = _timed(lambda: pafs.copy_files(root, back, source_filesystem=fs))
        same = torch.equal(torch.load(os.path.join(back, "state.pt"))["model"],
                           torch.load(os.path.join(ckpt, "state.pt"))["model"])
        rows.append((where, f"checkpoint {size:.0f} MB: save {t_save:.2f} s ({size / t_save:.0f} MB/s)",
                     f"restore {t_load:.2f} s ({size / t_load:.0f} MB/s)", f"identical {same}"))
    print(f"\nS3 round trip ({'moto on 127.0.0.1' if server else args.endpoint}), {args.num_examples} RGB "
          f"{args.image_size}x{args.image_size} shapes, {os.cpu_count()} cores")
    for r in rows:
        print("  " + " | ".join(r))
    shutil.rmtree(local_root, ignore_errors=True)
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
