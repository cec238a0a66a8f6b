"""Training-step speed and peak memory of the NVAE presets (NVAE, Vahdat & Kautz 2020; the presets of vae/nvae.py).

    .venv/bin/python benchmarks/model_step.py                 # CPU: tiny (batch 64) and cifar10 (batch 8)
    .venv/bin/python benchmarks/model_step.py --steps 10      # more timed steps per case

One step is what the trainer does per batch minus the optimiser: forward in train mode (KL warm-up and balancing
active, spectral regularisation on as in each preset) and backward of `out.loss`. Throughput is images per second
of wall time over the timed steps after warm-up steps; on a shared CPU also read the process CPU seconds per step,
which other processes competing for the cores do not inflate.

Peak memory:
- CPU: the growth of the process's peak resident set size from just before the first step to after the last one,
  read as VmHWM from /proc/self/status (Linux; elsewhere `resource.getrusage(RUSAGE_SELF).ru_maxrss`, the same
  high-water mark except that Linux carries ru_maxrss over from the parent across fork + exec). Every case runs in
  a fresh subprocess, so the high-water mark of one case cannot hide the next. tracemalloc is not used: it sees only
  Python's allocator, not tensor storage.
- CUDA: `torch.cuda.max_memory_allocated` minus what was allocated before the first step (the weights and the
  batch): activations, gradients and workspace. On CUDA the fp32 cases are followed by bf16 autocast +
  channels_last at larger batches.
Both deltas are printed with the absolute peak (the whole process's RSS on CPU, all allocations on CUDA).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from vae.nvae import PRESETS, NVAE, NVAEConfig


@dataclass(frozen=True)
class Case:
    preset: str
    batch: int
    device: str
    bf16: bool = False
    channels_last: bool = False


CPU_CASES = (Case("tiny", 64, "cpu"), Case("cifar10", 8, "cpu"))
CUDA_CASES = (
    Case("tiny", 512, "cuda"),
    Case("tiny", 512, "cuda", bf16=True, channels_last=True),
    Case("cifar10", 32, "cuda"),  # NVAE's batch per V100
    Case("cifar10", 32, "cuda", bf16=True, channels_last=True),
    Case("cifar10", 128, "cuda", bf16=True, channels_last=True),
    Case("celeba64", 16, "cuda"),  # NVAE's batch per V100
    Case("celeba64", 64, "cuda", bf16=True, channels_last=True),
)
# Batch per GPU of the published runs (NVAE README), for the preset table; "tiny" is ours.
PAPER_BATCH = {"tiny": "-", "mnist": "200", "cifar10": "32", "celeba64": "16"}


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


def run_case(case: Case, warmup: int, steps: int) -> dict:
    """Time `steps` forward+backward steps after `warmup` ones, in this process."""
    torch.manual_seed(0)
    cfg = NVAEConfig.preset(case.preset)
    device = torch.device(case.device)
    model = NVAE(cfg).to(device).train()
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.rand(case.batch, *cfg.image_shape, device=device).contiguous(memory_format=memory_format)  # (B, C, H, W)
    model.set_step(0, 100)  # inside the KL warm-up: balancing on, as early in training

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
            loss = model(x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_mib()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if device.type == "cuda":
        total_mib = torch.cuda.max_memory_allocated() / 2**20
        peak_mib = total_mib - base / 2**20
        measure = "cuda.max_memory_allocated"
    else:
        total_mib = peak_rss_mib()
        peak_mib = total_mib - base
        measure = "peak RSS (VmHWM)"
    return {
        **case.__dict__, "images_per_s": case.batch * steps / seconds, "ms_per_step": 1000 * seconds / steps,
        "cpu_s_per_step": cpu_seconds / steps, "peak_mib": peak_mib, "total_mib": total_mib, "memory": measure,
        "threads": torch.get_num_threads(),
    }


def run_isolated(case: Case, warmup: int, steps: int, threads: int | None) -> dict:
    """`run_case` in a fresh interpreter, so its peak memory is its own."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(case.__dict__), "--warmup", str(warmup)]
    cmd += ["--steps", str(steps)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def preset_table(cases: list[Case]) -> str:
    lines = [
        "| preset | image | groups | latent units | params (M) | paper batch/GPU | batches benchmarked |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in PRESETS:
        model = NVAE(NVAEConfig.preset(name))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        units = sum(c * h * w for c, h, w in model.latent_shapes)
        runs = [f"{c.batch} ({c.device}{' bf16' if c.bf16 else ''})" for c in cases if c.preset == name]
        shape = "×".join(map(str, model.cfg.image_shape))
        lines.append(
            f"| {name} | {shape} | {model.num_groups} | {units} | {params:.2f} | {PAPER_BATCH[name]} | "
            f"{', '.join(runs) or '-'} |"
        )
    return "\n".join(lines)


def results_table(results: list[dict]) -> str:
    lines = [
        "| preset | device | precision | channels_last | batch | images/s | ms/step | process CPU s/step | peak Δ MiB "
        "| peak total MiB | memory measure | threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        precision = "bf16 autocast" if r["bf16"] else "fp32"
        lines.append(
            f"| {r['preset']} | {r['device']} | {precision} | {r['channels_last']} | {r['batch']} | "
            f"{r['images_per_s']:.1f} | {r['ms_per_step']:.0f} | {r['cpu_s_per_step']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['total_mib']:.0f} | {r['memory']} | {r['threads']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case before timing")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA cases even if a GPU is present")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one case as JSON, run in this process
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_case(Case(**json.loads(args.worker)), args.warmup, args.steps)))
        return
    cases = list(CPU_CASES)
    if torch.cuda.is_available() and not args.cpu_only:
        cases += CUDA_CASES
    results = []
    for case in cases:
        results.append(run_isolated(case, args.warmup, args.steps, args.threads))
        print(f"done: {case}", file=sys.stderr, flush=True)
    print(preset_table(cases) + "\n")
    print(results_table(results))


if __name__ == "__main__":
    main()
