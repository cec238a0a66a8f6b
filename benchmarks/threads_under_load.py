"""Torch threads next to busy workers: a tiny-NVAE training step with the CPUs it was given (vaepipe's setting, 1
thread for a 1-CPU task) against torch's default (one thread per core), on an idle machine and beside busy workers.

    .venv/bin/python benchmarks/threads_under_load.py                 # load = one busy worker per core
    .venv/bin/python benchmarks/threads_under_load.py --busy 1 --rounds 8

Why: a Ray task that was given 1 CPU but lets torch open a thread per core makes OpenMP threads spin against the
other workers' threads. Every process vaepipe starts on Ray (train workers, NCP groups, tune trials) now calls
`pipelines.ray_env.use_assigned_cpus()`; this benchmark shows what that is worth.

How it stays honest: the busy workers are plain processes running a 1-thread torch training loop (what a Ray train
worker with 1 CPU does). The measured process alternates its thread count between steps (A B B A ...), so drift hits
both alike; each figure is the median over rounds of the wall time of one step, with its min-max; the ratio is
default / assigned. The idle figures come first, before any load starts.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _busy(stop) -> None:
    import torch

    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(32, 16, 16, 16)
    while not stop.is_set():
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()


def _model_step():
    import torch

    from vae import NVAE, NVAEConfig

    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny")).train()
    model.set_step(100, 1000)
    x = (torch.rand(64, 1, 16, 16) > 0.5).float()

    def step() -> float:
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(x).loss.backward()
        return time.perf_counter() - t

    return step


def _measure(step, settings: dict[str, int], rounds: int) -> dict[str, list[float]]:
    import torch

    times: dict[str, list[float]] = {name: [] for name in settings}
    names = list(settings)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            torch.set_num_threads(settings[name])
            times[name].append(step())
    return times


def _report(label: str, times: dict[str, list[float]]) -> dict[str, float]:
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {label:>6}  {name:<28} {1000 * medians[name]:8.0f} ms  [{1000 * min(t):.0f}-{1000 * max(t):.0f}]")
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ap.add_argument("--busy", type=int, default=cores, help="busy 1-thread workers beside the measured process")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--given", type=int, default=1, help="CPUs the measured process was given (its Ray num_cpus)")
    args = ap.parse_args()
    import torch

    default = torch.get_num_threads() if "OMP_NUM_THREADS" not in os.environ else cores
    settings = {f"assigned ({args.given} thread)": args.given, f"torch default ({default} threads)": default}
    print(f"tiny NVAE, batch 64, forward + backward; {cores} cores; {args.busy} busy 1-thread worker(s) under load")
    step = _model_step()
    for _ in range(2):
        step()  # warm-up
    idle = _report("idle", _measure(step, settings, args.rounds))
    stop = mp.Event()
    workers = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.busy)]
    for w in workers:
        w.start()
    time.sleep(2.0)
    try:
        loaded = _report("loaded", _measure(step, settings, args.rounds))
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)
    a, d = list(settings)
    print(f"ratio default / assigned: idle {idle[d] / idle[a]:.2f}, loaded {loaded[d] / loaded[a]:.2f}")


if __name__ == "__main__":
    main()
