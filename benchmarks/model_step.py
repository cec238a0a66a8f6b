"""NVAE training-step time, this working tree against a baseline commit, interleaved (the presets of vae/nvae.py).

    .venv/bin/python benchmarks/model_step.py                              # vs HEAD: an uncommitted change's gain
    .venv/bin/python benchmarks/model_step.py --baseline HEAD~1            # vs the previous commit
    .venv/bin/python benchmarks/model_step.py --baseline f044453 --cases mnist:8 mnist:8:nosr --reps 10 --profile
    .venv/bin/python benchmarks/model_step.py --device cuda --cases cifar10:32 cifar10:128:bf16:cl

One step is what the trainer does per batch minus the optimiser: forward in train mode (KL warm-up and balancing
active, spectral regularisation on as in each preset unless the case says `nosr`) and backward of `out.loss`, on a
fixed batch of binary images (valid input for every decoder).

How it stays honest on a shared, noisy machine:
- The baseline is a `git worktree` of the given commit. Each tree runs in its own long-lived worker process (the
  import of `vae` comes from that tree), with the same thread count and the same seed; the two workers never run at
  the same time: the driver asks one for a step, waits, then asks the other.
- Steps alternate A B B A A B ... (each round swaps who goes first, so a slow drift hits both alike), after warm-up
  steps. Each side's figure is the median over the rounds, with its min–max; the ratio is current / baseline of the
  medians (< 1: the current tree is faster).
- CPU time is the worker's process CPU seconds per step, which other processes competing for the cores do not
  inflate as much as wall time; wall time is printed too. On CUDA the step ends with a synchronisation and wall
  time is the figure to read.
- A case without the spectral and BN penalties (`nosr`: the same model, its regulariser switched off for the step)
  next to the same case with them gives the penalties' cost: the median over rounds of the paired difference
  (with − nosr, in the same round), and its share of a step.
`--profile` adds torch.profiler's top entries for one step of the first case in the current tree.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    preset: str
    batch: int
    bf16: bool = False
    channels_last: bool = False
    sr: bool = True

    @classmethod
    def parse(cls, spec: str) -> "Case":
        """"preset:batch[:bf16][:cl][:nosr]", e.g. "mnist:8:nosr"."""
        parts = spec.split(":")
        flags = set(parts[2:])
        unknown = flags - {"bf16", "cl", "nosr"}
        if len(parts) < 2 or not parts[1].isdigit() or unknown:
            raise ValueError(f"case {spec!r}: expected preset:batch[:bf16][:cl][:nosr], e.g. mnist:8 or cifar10:32:bf16")
        return cls(parts[0], int(parts[1]), "bf16" in flags, "cl" in flags, "nosr" not in flags)

    @property
    def name(self) -> str:
        flags = [f for f, on in (("bf16", self.bf16), ("cl", self.channels_last), ("nosr", not self.sr)) if on]
        return ":".join([self.preset, str(self.batch), *flags])


# ---------------------------------------------------------------------------------------------------------------
# Worker: one tree, one process, steps on request.


def serve(tree: str, device_name: str, threads: int) -> None:
    """Read JSON requests from stdin, answer each with one JSON line on stdout."""
    sys.path.insert(0, tree)
    import torch

    torch.set_num_threads(threads)
    import vae
    from vae.nvae import NVAE, NVAEConfig

    if not Path(vae.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"worker for {tree} imported vae from {vae.__file__}")
    device = torch.device(device_name)
    models: dict[str, tuple] = {}

    def build(case: Case):
        torch.manual_seed(0)
        cfg = NVAEConfig.preset(case.preset)
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        model = NVAE(cfg).to(device).train().to(memory_format=fmt)
        model.set_step(0, 100)  # inside the KL warm-up: balancing on, as early in training
        gen = torch.Generator().manual_seed(1)
        x = torch.bernoulli(torch.rand(case.batch, *cfg.image_shape, generator=gen), generator=gen)  # (B, C, H, W)
        return model, x.to(device).contiguous(memory_format=fmt)

    def step(case: Case) -> None:
        model, x = models[case.name]
        spectral = model.spectral
        if not case.sr:
            model.spectral = None  # the forward skips both penalties when there is no regulariser
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
                loss = model(x).loss
            loss.backward()
        finally:
            model.spectral = spectral
        model.zero_grad(set_to_none=True)

    def timed(case: Case) -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        wall, cpu = time.perf_counter(), time.process_time()
        step(case)
        if device.type != "cuda":
            return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20  # activations, gradients, workspace
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "peak_mib": peak}

    for line in sys.stdin:
        request = json.loads(line)
        case = Case(**request["case"])
        if request["op"] == "build":
            with_sr = Case(**{**asdict(case), "sr": True}).name
            # `nosr` steps the same model as its case with the penalties, so the pair differs in nothing else.
            models[case.name] = models[with_sr] if not case.sr and with_sr in models else build(case)
            params = sum(p.numel() for p in models[case.name][0].parameters())
            for _ in range(request["warmup"]):
                step(case)
            answer = {"params": params, "vae": vae.__file__}
        elif request["op"] == "step":
            answer = timed(case)
        elif request["op"] == "profile":
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                timed(case)
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            answer = {"table": prof.key_averages().table(sort_by=sort, row_limit=request["rows"])}
        else:
            raise ValueError(f"unknown request {request['op']!r}")
        print(json.dumps(answer), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Driver.


class Worker:
    def __init__(self, tree: Path, device: str, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(tree))
        cmd = [sys.executable, __file__, "--serve", str(tree), "--device", device, "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=tree)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited (code {self.proc.wait()}); its error is above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def baseline_tree(rev: str) -> tuple[Path, str]:
    """A detached worktree of `rev` in a temporary directory, and the commit it resolved to."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline {rev!r} is not a commit of {REPO}: {commit.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="vaepipe-baseline-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path), rev],
                   check=True, capture_output=True)
    return path, commit.stdout.strip()[:10]


def summary(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f} ({1000 * min(values):.0f}–{1000 * max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="commit to compare against (default HEAD)")
    parser.add_argument("--cases", nargs="+", default=None,
                        help="preset:batch[:bf16][:cl][:nosr] (default: mnist:8 and mnist:8:nosr on CPU; "
                             "cifar10:32 and cifar10:128:bf16:cl on CUDA)")
    parser.add_argument("--reps", type=int, default=8, help="timed rounds (one step per tree per case each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case and tree")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each worker")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--profile", action="store_true", help="print the profiler's top entries (current tree)")
    parser.add_argument("--rows", type=int, default=15, help="profiler rows")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run as the worker for this tree
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.device, args.threads)
        return
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    default = ["mnist:8", "mnist:8:nosr"] if args.device == "cpu" else ["cifar10:32", "cifar10:128:bf16:cl"]
    cases = [Case.parse(c) for c in (args.cases or default)]

    base_path, base_commit = baseline_tree(args.baseline)
    workers = {}
    try:
        workers = {"baseline": Worker(base_path, args.device, args.threads),
                   "current": Worker(REPO, args.device, args.threads)}
        params = {}
        for case in cases:
            for side, worker in workers.items():
                params[side, case.name] = worker.ask(op="build", case=asdict(case), warmup=args.warmup)["params"]
        times = {(side, c.name): {"wall": [], "cpu": [], "peak_mib": []} for side in workers for c in cases}
        order = list(workers)
        for rep in range(args.reps):
            for case in cases:
                for side in order:
                    for measure, value in workers[side].ask(op="step", case=asdict(case)).items():
                        times[side, case.name][measure].append(value)
            order.reverse()
            print(f"round {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
        profile = workers["current"].ask(op="profile", case=asdict(cases[0]), rows=args.rows) if args.profile else None
    finally:
        for worker in workers.values():
            worker.close()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_path)], capture_output=True)
        shutil.rmtree(base_path, ignore_errors=True)

    print(f"baseline {args.baseline} ({base_commit}) vs this working tree; device {args.device}, "
          f"{args.threads} thread(s) per worker, {args.reps} interleaved rounds after {args.warmup} warm-up steps\n")
    print("| case | params (baseline → current) | measure | baseline ms/step, median (min–max) | current ms/step "
          "| current / baseline |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        for measure in ("cpu", "wall"):
            b, c = times["baseline", case.name][measure], times["current", case.name][measure]
            ratio = statistics.median(c) / statistics.median(b)
            print(f"| {case.name} | {params['baseline', case.name]:,} → {params['current', case.name]:,} | "
                  f"{measure} | {summary(b)} | {summary(c)} | {ratio:.3f} |")
    pairs = [(c, Case(**{**asdict(c), "sr": False})) for c in cases if c.sr]
    pairs = [(on, off) for on, off in pairs if off in cases]
    if args.device == "cuda":
        print("\n| case | peak CUDA memory of a step beyond weights and batch, MiB: baseline | current |")
        print("|---|---|---|")
        for case in cases:
            peaks = [max(times[side, case.name]["peak_mib"]) for side in workers]
            print(f"| {case.name} | {peaks[0]:.0f} | {peaks[1]:.0f} |")
    if pairs:
        print("\n| case | tree | spectral + BN penalty: median over rounds of (with − nosr) CPU ms, min–max "
              "| share of the median step |")
        print("|---|---|---|---|")
        for on, off in pairs:
            for side in workers:
                # Paired by round: both steps ran within one round, so slow phases of the machine mostly cancel.
                diffs = [a - b for a, b in zip(times[side, on.name]["cpu"], times[side, off.name]["cpu"])]
                with_sr = statistics.median(times[side, on.name]["cpu"])
                print(f"| {on.name} | {side} | {summary(diffs)} | "
                      f"{100 * statistics.median(diffs) / with_sr:.1f}% of {1000 * with_sr:.0f} ms |")
    if profile:
        print(f"\ntorch.profiler, one step of {cases[0].name}, current tree:\n{profile['table']}")


if __name__ == "__main__":
    main()
