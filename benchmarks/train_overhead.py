"""What Ray Train costs: the same tiny NVAE, data and training step as a plain single-process PyTorch loop vs
TorchTrainer with 1 worker (steady-state images/s ratio, start-up time separately), and 2 workers vs 1.

    .venv/bin/python benchmarks/train_overhead.py --steps 120 --batch-size 64

The plain loop calls the stage's own `training_step` on batches from the pyarrow reader, so the difference is Ray
(worker processes, Ray Data streaming, report barriers), not the model. Steady state skips the first report
interval of each run (start-up, first-touch allocations). Torch threads: each Ray worker gets its CPU share; the
plain loop is pinned to the same thread count as one worker for a like-for-like ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from pipelines.config import DataConfig, load_config  # noqa: E402
from pipelines.data import ParquetImageReader, ensure_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def config(data: str, work: str, workers: int, steps: int, batch: int):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"data.path={data}", f"tracking.workdir={work}", f"train.storage_path={work}/ray",
        # `batch` images per worker: train.batch_size is the global batch.
        f"train.num_workers={workers}", f"train.batch_size={batch * max(1, workers)}", "train.epochs=100",
        f"train.max_steps={steps}",
        "train.log_every_steps=10", f"train.checkpoint_every_steps={10 * steps}", "train.val_iw_examples=0",
    ])


def plain_loop(cfg, steps: int, threads: int) -> tuple[float, float]:
    """(steady images/s, seconds to the first step) of the stage's training_step without Ray."""
    from pipelines.train_vae import TrainPlan, seed_everything, setup, training_step

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    seed_everything(0)
    plan = TrainPlan(train_examples=steps * cfg.train.batch_size, steps_per_epoch=steps, total_steps=steps,
                     heartbeat_dir=tempfile.mkdtemp())
    state = setup(cfg, plan, torch.device("cpu"))
    reader = ParquetImageReader(cfg.data.path, "train", batch_size=cfg.train.worker_batch_size, shuffle=True,
                                drop_last=True)
    rates, first, t_int, n_int = [], None, None, 0
    while state.step < steps:
        for batch in reader:
            training_step(state, state.model, batch["image"], cfg, torch.device("cpu"), steps)
            now = time.perf_counter()
            if first is None:
                first, t_int = now - t0, now
            n_int += batch["image"].shape[0]
            if state.step % 10 == 0:
                rates.append(n_int / (now - t_int))
                t_int, n_int = now, 0
            if state.step >= steps:
                break
    return statistics.median(rates[1:] or rates), first


def ray_run(cfg) -> tuple[float, float, float]:
    """(steady images/s, seconds from the call to the first step, total seconds) of the train stage."""
    import mlflow

    from pipelines.train_vae import run_train

    wall0, t0 = time.time(), time.perf_counter()
    result = run_train(cfg)
    total = time.perf_counter() - t0
    client = mlflow.MlflowClient(f"sqlite:///{Path(cfg.tracking.workdir).resolve()}/mlflow.db")
    hist = sorted(client.get_metric_history(result.run_id, "train/images_per_s"), key=lambda m: m.step)
    rate = statistics.median([m.value for m in hist[1:]] or [m.value for m in hist])
    # The first report lands after 10 steps: take their steady-state duration off to get the start-up time.
    first_steps = 10 * cfg.train.batch_size / rate  # the global batch: all workers' images per step
    startup = hist[0].timestamp / 1000.0 - wall0 - first_steps
    return rate, max(startup, 0.0), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", default="runs/bench/digits16")
    args = ap.parse_args()

    ensure_dataset(DataConfig(source="digits", path=args.data, image_size=16), progress=False)
    work = tempfile.mkdtemp(prefix="vaepipe-bench-")
    from pipelines.ray_env import init_ray

    init_ray()
    one = config(args.data, f"{work}/w1", 1, args.steps, args.batch_size)
    two = config(args.data, f"{work}/w2", 2, args.steps, args.batch_size)
    plain_rate, plain_first = plain_loop(one, args.steps, threads=max(1, int(one.train.cpus_per_worker)))
    r1, s1, t1 = ray_run(one)
    r2, s2, t2 = ray_run(two)

    print(f"\ntiny NVAE on digits 16×16, batch {args.batch_size} per worker, {args.steps} steps, "
          f"{os.cpu_count()} cores")
    print(f"{'run':<28}{'images/s':>10}{'start-up s':>12}{'wall s':>9}")
    print(f"{'plain PyTorch loop':<28}{plain_rate:>10.0f}{plain_first:>12.1f}{'':>9}")
    print(f"{'TorchTrainer, 1 worker':<28}{r1:>10.0f}{s1:>12.1f}{t1:>9.1f}")
    print(f"{'TorchTrainer, 2 workers':<28}{r2:>10.0f}{s2:>12.1f}{t2:>9.1f}")
    print(f"\nRay steady-state cost, 1 worker vs plain: {100 * (1 - r1 / plain_rate):+.1f}% "
          f"(ratio {r1 / plain_rate:.3f}; aim: cost under 10%)")
    print(f"2 workers vs 1: {r2 / r1:.2f}× images/s")


if __name__ == "__main__":
    main()
