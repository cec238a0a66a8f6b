"""What Ray Train costs over a plain PyTorch loop at the demo's scale: digits 16×16, demo.yaml's tiny NVAE, batch 64,
one worker with `train.cpus_per_worker` threads. All in one process, interleaved (A B C D A B C D ...):

    A  plain loop: the stage's own `setup`, `training_step`, `evaluate`, `picture_pngs` and `save_checkpoint` on
       batches from an in-memory tensor (`InMemoryShard`, drawn through the worker's own `_batches`), the same
       cadence as the stage (metrics every `log_every_steps`, a checkpoint every `checkpoint_every_steps` and at each
       epoch's end, validation and pictures each epoch), in this process, torch threads = cpus_per_worker;
    B  `run_train` (the real stage: TorchTrainer, 1 worker, MLflow in a temporary sqlite store), data in memory;
    C  the same, data streamed by Ray Data (`train.in_memory_max_mb=0`);
    D  the same as B with 2 workers × 32 images (the same global batch of 64), one epoch: the DDP step cost.

Each of A, B, C is a whole multi-epoch run (`--epochs`, 3 by default, over the full train split, validation every
epoch). Three figures come out of them:
  1. steady state: images/s over the report intervals that contain no epoch start (nor the run's start), from the
     stage's own train/images_per_s in the MLflow history (A measures the same intervals with its own clock);
  2. whole run, split in three: start-up (the call until the first step starts: worker processes, model, data),
     the training span (first step until the last epoch's validation and checkpoint are done) and, for the stage,
     the tail (the final checkpoint copied to MLflow, the model logged and registered). "Overhead beyond start-up"
     compares the training spans, so the per-epoch cost shows apart from the one-off costs;
  3. the time of one optimizer step, 2 workers (DDP, gloo) vs 1.
Ratios are taken within each repeat (paired, interleaved) and printed as the median with min–max. Before each run
the script waits (up to 15 s) for the CPUs to be idle, so one run's winding down does not land in the next.

    flock /tmp/vaepipe-slow.lock .venv/bin/python benchmarks/train_overhead.py             # ~8 min on 2 cores
    flock /tmp/vaepipe-slow.lock .venv/bin/python benchmarks/train_overhead.py --quick     # ~2 min: 1 repeat, 1 epoch

`--repeats N`, `--epochs N` size it by hand; `--verbose` shows the stage's own output (otherwise it goes to a log
file named at the end). The timestamps of the stage's metrics are written by the Ray Train controller when it logs
a report, a few milliseconds after the worker's clock: start-up and span carry that small lag at both ends.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# demo.yaml gives each worker 1 CPU. Set before torch loads, and inherited by the local Ray and its workers (Ray
# leaves an OMP_NUM_THREADS it finds alone): every process here runs with the threads of one worker.
os.environ["OMP_NUM_THREADS"] = os.environ.get("VAEPIPE_BENCH_THREADS", "1")

import torch  # noqa: E402

from pipelines.config import DataConfig, load_config  # noqa: E402
from pipelines.data import ensure_dataset, read_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 64  # the global batch of every run


def config(data: str, work: str, *, workers: int, epochs: int, in_memory: bool):
    """demo.yaml at the benchmark's scale: `workers` × (64 / workers) images, its log/checkpoint cadence."""
    return load_config(REPO / "configs" / "demo.yaml", [
        f"data.path={data}", f"tracking.workdir={work}", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        f"train.storage_path={work}/ray", f"train.num_workers={workers}", f"train.batch_size={BATCH}",
        f"train.epochs={epochs}", "train.val_every_epochs=1", f"train.in_memory_max_mb={2048 if in_memory else 0}",
    ])


@dataclasses.dataclass
class Run:
    steady: float  # images/s over the report intervals without an epoch start
    startup: float  # s from the call to the first step's start
    span: float  # s from the first step's start to the end of the last epoch (validation, checkpoint)
    tail: float = 0.0  # s after that until the call returned (the stage: model logging and registration)

    @property
    def wall(self) -> float:
        return self.startup + self.span + self.tail

    def __str__(self) -> str:
        return (f"steady {self.steady:.1f} img/s, start-up {self.startup:.2f} s, training {self.span:.1f} s, "
                f"tail {self.tail:.1f} s")


def steady_rate(intervals: list[tuple[int, int, float]], steps_per_epoch: int) -> float:
    """images/s over the intervals (previous report step, report step, seconds) that start no epoch: an interval
    after report step p holds an epoch's first batch when p is 0 or a multiple of the steps per epoch."""
    kept = [(s - p, dt) for p, s, dt in intervals if p > 0 and p % steps_per_epoch != 0]
    if not kept:
        raise SystemExit("no report interval away from an epoch start: run more epochs or more steps per epoch")
    return BATCH * sum(n for n, _ in kept) / sum(dt for _, dt in kept)


def plain_loop(cfg, threads: int) -> Run:
    """The stage's step, validation, pictures and checkpoints at the stage's cadence, without Ray."""
    from pipelines.data.readers import InMemoryShard
    from pipelines.train_vae import (TrainPlan, _batches, evaluate, picture_pngs, plan_steps, save_checkpoint,
                                     seed_everything, setup, step_metrics, training_step)

    torch.set_num_threads(threads)
    t = cfg.train
    device = torch.device("cpu")
    t0 = time.perf_counter()
    seed_everything(t.seed)
    manifest = read_manifest(cfg.data.path)
    spe, total = plan_steps(manifest.splits["train"], 1, t.worker_batch_size, t.epochs)
    with tempfile.TemporaryDirectory(prefix="vaepipe-bench-plain-") as scratch:
        plan = TrainPlan(train_examples=manifest.splits["train"], steps_per_epoch=spe, total_steps=total,
                         heartbeat_dir=scratch)
        state = setup(cfg, plan, device)
        train, val = InMemoryShard(cfg.data.path, "train"), InMemoryShard(cfg.data.path, "val")
        intervals, last_step = [], 0
        t_first = t_last = time.perf_counter()
        while state.step < total:
            done = 0
            for x in _batches(train, cfg, seed=t.seed + 7919 * state.epoch):
                if done >= spe:
                    break
                done += 1
                stats = training_step(state, state.model, x, cfg, device, total)
                end_of_epoch = done == spe
                want_ckpt = state.step % t.checkpoint_every_steps == 0 or end_of_epoch
                if state.step % t.log_every_steps == 0 or want_ckpt:
                    now = time.perf_counter()
                    step_metrics(stats)
                    intervals.append((last_step, state.step, now - t_last))
                    last_step, t_last = state.step, now
                    if end_of_epoch and (state.epoch + 1) % t.val_every_epochs == 0:
                        with torch.random.fork_rng(devices=[]):
                            evaluate(state, _batches(val, cfg, seed=0, train=False), cfg, device, 1)
                            picture_pngs(state, x, device)
                        t_last = time.perf_counter()
                    if want_ckpt:
                        save_checkpoint(state, Path(scratch) / f"step{state.step}", cfg, 0 if end_of_epoch else done)
            state.epoch += 1
        t_end = time.perf_counter()
    return Run(steady_rate(intervals, spe), t_first - t0, t_end - t_first)


def ray_run(cfg) -> Run:
    """The train stage, timed from the call and from the stage's own metrics in its MLflow run."""
    from pipelines.tracking import Tracker
    from pipelines.train_vae import run_train

    tracker = Tracker.connect(cfg.tracking)
    wall0 = time.time()
    result = run_train(cfg, tracker)
    wall1 = time.time()
    spe = int(tracker.get_run(result.run_id).data.params["plan.steps_per_epoch"])
    hist = sorted(tracker.metric_history(result.run_id, "train/images_per_s"), key=lambda m: m.step)
    steps = [0] + [m.step for m in hist]
    # Each report's rate covers the steps since the previous report (validation time excluded): its duration.
    intervals = [(p, m.step, BATCH * (m.step - p) / m.value) for p, m in zip(steps, hist)]
    first_step = hist[0].timestamp / 1000.0 - intervals[0][2]  # the loop's start, on the controller's clock
    last = hist[-1].timestamp / 1000.0
    return Run(steady_rate(intervals, spe), first_step - wall0, last - first_step, wall1 - last)


def settle(limit_s: float = 15.0, idle: float = 0.9) -> float:
    """Wait (at most `limit_s`) until the CPUs are at least `idle` idle over a second: Ray's pre-started workers and
    the last run's processes winding down would otherwise land in the next run's figures. Returns the seconds
    waited."""
    def counters() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, all but guest time

    if not os.path.exists("/proc/stat"):
        time.sleep(2.0)
        return 2.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        i0, a0 = counters()
        time.sleep(1.0)
        i1, a1 = counters()
        if (i1 - i0) / max(1, a1 - a0) >= idle:
            break
    return time.perf_counter() - t0


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}–{max(values):.3g}]"


def pct(ratios: list[float]) -> str:
    """Overheads (ratio - 1) in %, median [min–max]."""
    p = [100 * (r - 1) for r in ratios]
    return f"{statistics.median(p):+.1f}% [{min(p):+.1f}…{max(p):+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of A B C D (default 3)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each whole run A, B, C (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 repeat of 1 epoch: a smoke run, not a figure to quote")
    ap.add_argument("--data", default="runs/bench/digits16")
    ap.add_argument("--verbose", action="store_true", help="show the stage's output instead of logging it")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.epochs = 1, 1

    ensure_dataset(DataConfig(source="digits", path=args.data, image_size=16), progress=False)
    data = os.path.abspath(args.data)
    work = tempfile.mkdtemp(prefix="vaepipe-bench-train-")
    one = config(data, work, workers=1, epochs=args.epochs, in_memory=True)
    streamed = config(data, work, workers=1, epochs=args.epochs, in_memory=False)
    two = config(data, work, workers=2, epochs=1, in_memory=True)
    threads = max(1, int(one.train.cpus_per_worker))
    torch.set_num_threads(threads)
    log_path = Path(work) / "stage-output.log"

    import pipelines.train_vae  # noqa: F401  (and the model code: imports stay out of the plain loop's start-up)
    import vae  # noqa: F401
    from pipelines.ray_env import init_ray
    from pipelines.tracking import Tracker

    # Imports and one-off set-up outside any timed run: Ray itself, Ray Train, and the sqlite store's schema.
    init_ray()
    import ray.train.torch  # noqa: F401

    Tracker.connect(one.tracking)
    runs: dict[str, list[Run]] = {"A": [], "B": [], "C": [], "D": []}
    t_all = time.perf_counter()
    with open(log_path, "w") as log, (contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(log)):
        for r in range(args.repeats):
            for key, run in (("A", lambda: plain_loop(one, threads)), ("B", lambda: ray_run(one)),
                             ("C", lambda: ray_run(streamed)), ("D", lambda: ray_run(two))):
                waited = settle()
                t = time.perf_counter()
                runs[key].append(run())
                print(f"[bench] repeat {r + 1} {key}: {runs[key][-1]} in {time.perf_counter() - t:.1f} s "
                      f"(after {waited:.0f} s waiting for idle CPUs)",
                      file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_all

    A, B, C, D = (runs[k] for k in "ABCD")
    manifest = read_manifest(data)
    print(f"\ndigits 16×16 ({manifest.splits['train']} train / {manifest.splits['val']} val images), demo.yaml's tiny "
          f"NVAE, global batch {BATCH}, {args.epochs} epoch(s) with validation each, {args.repeats} interleaved "
          f"repeat(s), torch threads {threads} per process, {os.cpu_count()} cores; medians [min–max]")
    print(f"{'run':<34}{'steady img/s':>24}{'start-up s':>22}{'training s':>22}{'tail s':>20}")
    rows = (("A plain loop (in memory)", A), ("B TorchTrainer 1w, in memory", B), ("C TorchTrainer 1w, streamed", C))
    for name, rs in rows:
        print(f"{name:<34}{med([x.steady for x in rs]):>24}{med([x.startup for x in rs]):>22}"
              f"{med([x.span for x in rs]):>22}{med([x.tail for x in rs]):>20}")
    print(f"{'D TorchTrainer 2w × 32, in memory':<34}{med([x.steady for x in D]):>24}"
          f"{med([x.startup for x in D]):>22}{'(1 epoch)':>22}{med([x.tail for x in D]):>20}")

    steady_b = [a.steady / b.steady for a, b in zip(A, B)]  # time ratios: > 1 is slower than the plain loop
    steady_c = [a.steady / c.steady for a, c in zip(A, C)]
    span_b = [b.span / a.span for a, b in zip(A, B)]
    span_c = [c.span / a.span for a, c in zip(A, C)]
    print(f"\nrate ratios b/a {med([1 / x for x in steady_b])}, c/a {med([1 / x for x in steady_c])}")
    print(f"training-span overhead over A: B {pct(span_b)}, C {pct(span_c)}; "
          f"whole wall time A {med([x.wall for x in A])} s, B {med([x.wall for x in B])} s, "
          f"C {med([x.wall for x in C])} s")
    step1 = [BATCH / b.steady for b in B]
    step2 = [BATCH / d.steady for d in D]
    print(f"one optimizer step: 1 worker × 64 {1000 * statistics.median(step1):.0f} ms, 2 workers × 32 (DDP) "
          f"{1000 * statistics.median(step2):.0f} ms: ratio 2w/1w {med([s2 / s1 for s1, s2 in zip(step1, step2)])} "
          f"(0.5 would be perfect scaling; the rest is the gloo allreduce of the gradients and the 2 workers sharing "
          f"{os.cpu_count()} cores with the driver and Ray)")
    print(f"benchmark time {elapsed / 60:.1f} min; the stage's output: {log_path}\n")
    print(f"Ray Train steady-state overhead (in memory) {pct(steady_b)} (target ≤ 5%); streamed {pct(steady_c)}")
    print(f"whole-run overhead beyond start-up {pct(span_b)} (in memory; streamed {pct(span_c)}) (target ≤ 5%)")
    startup_extra = [b.startup - a.startup for a, b in zip(A, B)]
    print(f"start-up {statistics.median([b.startup for b in B]):.1f} s (call → first step, in memory; the plain "
          f"loop's {statistics.median([a.startup for a in A]):.2f} s, so Ray adds {med(startup_extra)} s), and "
          f"{statistics.median([b.tail for b in B]):.1f} s after the last epoch (model logged and registered)")


if __name__ == "__main__":
    main()
