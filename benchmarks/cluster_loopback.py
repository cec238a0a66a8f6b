"""Multi-node figures on a loopback cluster (cluster/local/loopback.py: a head and worker nodes on 127.0.0.1).

    .venv/bin/python benchmarks/cluster_loopback.py steps [--workers 1 2 3] [--steps 30]
    .venv/bin/python benchmarks/cluster_loopback.py pipeline [--stages train,ncp]

`steps`: DDP step time of the tiny NVAE (batch 32 per worker, gloo) vs the worker count, one worker per node
(SPREAD placement), and the cost of one allreduce of the model's gradients measured alone in the same workers.
`pipeline`: `vaepipe run` of a small config (the same work) on one local Ray node and on a head + 2 worker nodes,
as wall time from the command to its exit (cluster start-up not included).

On one machine every node shares the same cores, so these figures show the overheads (process and network stack,
gloo over loopback TCP), not a speed-up: more nodes on 2 cores cannot compute faster.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _loopback():
    spec = importlib.util.spec_from_file_location("vaepipe_cluster_loopback", REPO / "cluster/local/loopback.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _train_loop(config: dict) -> None:
    import torch
    import torch.distributed as dist
    import ray.train
    import ray.train.torch

    from vae import NVAE, NVAEConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(NVAE(NVAEConfig.preset("tiny", image_shape=(1, 16, 16))))
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    x = torch.rand(config["batch"], 1, 16, 16).round()
    times = []
    for step in range(config["steps"]):
        t0 = time.perf_counter()
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))
    ar = []
    for _ in range(10):
        dist.barrier() if dist.is_initialized() else None
        t0 = time.perf_counter()
        if dist.is_initialized():
            dist.all_reduce(flat)
        ar.append(time.perf_counter() - t0)
    warm = sorted(times[5:])
    if ray.train.get_context().get_world_rank() == 0:  # the figures, by file: on one machine every node sees it
        import json

        with open(config["out"], "w") as f:
            json.dump({"step_s": warm[len(warm) // 2], "allreduce_s": sorted(ar)[len(ar) // 2],
                       "params": flat.numel()}, f)


def steps(args) -> None:
    lb = _loopback()
    if args.state:  # a cluster already up (cluster/local/up.sh --state FILE): used, not stopped
        cluster = lb.LoopbackCluster.from_json(Path(args.state).read_text())
    else:
        cluster = lb.LoopbackCluster.start(workers=max(args.workers) - 1, head_cpus=1, worker_cpus=1)
    try:
        import ray
        import ray.train
        import ray.train.torch

        from pipelines.ray_env import init_ray

        init_ray(cluster.gcs_address)
        names = cluster.node_ids()
        print(f"{len(names)} loopback nodes, {os.cpu_count()} cores; tiny NVAE, batch {args.batch} per worker")
        for n in args.workers:
            with tempfile.TemporaryDirectory() as storage:
                out = os.path.join(storage, "figures.json")
                trainer = ray.train.torch.TorchTrainer(
                    _train_loop, train_loop_config={"batch": args.batch, "steps": args.steps, "out": out},
                    scaling_config=ray.train.ScalingConfig(num_workers=n, resources_per_worker={"CPU": 1},
                                                           placement_strategy="SPREAD"),
                    run_config=ray.train.RunConfig(name=f"steps{n}", storage_path=storage))
                t0 = time.perf_counter()
                trainer.fit()
                import json

                m = json.loads(Path(out).read_text())
            print(f"  {n} worker(s): step {m['step_s'] * 1e3:.0f} ms (median), allreduce of {m['params']:,} "
                  f"float32 {m['allreduce_s'] * 1e3:.1f} ms, fit {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        import ray

        ray.shutdown()
        if not args.state:
            cluster.stop()


SMALL = ["train.epochs=1", "train.num_workers=2", "train.val_iw_examples=0", "ncp.steps=40", "ncp.eval_every=20",
         "ncp.val_examples=64", "ncp.eval_samples=32", "ncp.langevin_steps=5", "ncp.sir_proposals=4",
         "ncp.log_z_samples=16", "ncp.classifier_channels=8", "tune.num_samples=2", "tune.epochs=2",
         "tune.steps_per_epoch=5", "tune.eval_examples=100", "tune.search=random", "tune.data.num_examples=1200"]


def pipeline(args) -> None:
    lb = _loopback()
    work = Path(tempfile.mkdtemp(prefix="clbench"))
    base = [f"stages=[{args.stages}]", f"data.path={work / 'digits16'}", f"tune.data.path={work / 'regions16'}"]
    vaepipe = str(Path(sys.executable).with_name("vaepipe"))

    def run(tag: str, env: dict) -> float:
        over = base + SMALL + [f"tracking.workdir={work / tag}", f"train.storage_path={work / tag / 'ray'}",
                               f"tune.storage_path={work / tag / 'ray'}"]
        cmd = [vaepipe, "run", str(REPO / "configs/demo.yaml")] + [a for o in over for a in ("--set", o)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        took = time.perf_counter() - t0
        if out.returncode:
            raise SystemExit(f"{tag} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return took

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    subprocess.run([vaepipe, "data", "prepare", "digits", "--out", str(work / "digits16"), "--image-size", "16"],
                   env=env, check=True, capture_output=True)
    one = run("one-node", env)
    print(f"1 node (local Ray, {max(4, 2 * (os.cpu_count() or 2))} logical CPUs): {one:.0f} s", flush=True)
    cluster = lb.LoopbackCluster.start(workers=2, head_cpus=1, worker_cpus=2)
    try:
        three = run("three-nodes", {**env, "RAY_ADDRESS": cluster.gcs_address})
    finally:
        cluster.stop()
    print(f"3 loopback nodes (1 + 2 + 2 logical CPUs): {three:.0f} s  (ratio {three / one:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--state", default=None, help="reuse the cluster this up.sh state file describes")
    q = sub.add_parser("pipeline")
    q.add_argument("--stages", default="train,ncp")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    steps(args) if args.what == "steps" else pipeline(args)


if __name__ == "__main__":
    main()
