"""Does a factorised learned prior (FNP) disentangle better than the Gaussian? Paired seeds on the `regions` factors.

    .venv/bin/python benchmarks/gwae_priors.py                    # 8 seeds × 3 priors (+4 old-c runs), 2 workers
    .venv/bin/python benchmarks/gwae_priors.py --seeds 3 --steps 100   # a quick look

GWAE's claim (Nakagawa et al., ICLR 2023) is that the GW objective with a factorised prior gives disentangled codes.
Here every prior trains the same model on the same data, 16×16 grey `regions` images (four quadrants of independent
uniform brightness: four visible, linear, non-circular factors), with z = 4:
- fnp       the factorised neural prior (learned marginals, independent dimensions);
- gaussian  N(0, I), rotation-invariant: the GW objective cannot prefer any rotation of the code, the baseline;
- uniform   a fixed factorised uniform: factorised but not learned, the control.
Seed s gives every prior the same encoder and decoder initialisation and the same minibatches (paired), and
evaluates on the same 2,000 held-out test images, with the DCI split seeded by s. Reported: each run's DCI
(disentanglement D, completeness C, informativeness I), PSNR, collapse check and prior health (the marginals' excess
kurtosis); then the paired differences D_fnp − D_gaussian and D_uniform − D_gaussian with 95% t-intervals.
`--old-c-seeds` adds FNP runs with the distance scale as the reference code handles it (c = 2.5 at the start,
learning at the model's rate) to show what the scale's own rate and data start do to the prior's tails.

Timing: each run's process CPU time is reported with the wall time; on a shared machine the wall time stretches
with the other load, while CPU time / workers estimates the wall time on idle cores.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time

import numpy as np

PRIORS = ("fnp", "gaussian", "uniform")
N_TRAIN, N_TEST = 10_000, 2_000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8, help="paired seeds per prior (default 8)")
    p.add_argument("--steps", type=int, default=300, help="GWAE updates per run, batch 64 (default 300)")
    p.add_argument("--critic-steps", type=int, default=5, help="critic updates per model update (default 5)")
    p.add_argument("--lr", type=float, default=1e-3, help="model and critic RMSprop rate (default 1e-3)")
    p.add_argument("--z-dim", type=int, default=4, help="latent dimensions (default 4, the number of factors)")
    p.add_argument("--old-c-seeds", type=int, default=4, help="FNP runs with the reference's c handling (default 4)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default 2)")
    p.add_argument("--out", default=None, help="write every run's figures to this JSON file, run by run")
    p.add_argument("--summarise", default=None, metavar="JSON", help="only print the summary of a (partial) --out file")
    return p.parse_args()


def one_run(job: dict) -> dict:
    import torch

    from pipelines.data.regions import make_regions
    from vae.factor_metrics import collapse_check, dci
    from vae.gwae import GWAE, GWAEConfig

    torch.set_num_threads(1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    images, _, factors = make_regions(N_TRAIN + N_TEST, image_size=16, seed=0)
    x = torch.from_numpy(images).float() / 255.0
    train, test, test_factors = x[:N_TRAIN], x[N_TRAIN:], factors[N_TRAIN:]
    seed = job["seed"]
    extra = dict(distance_coef_init=2.5, lr_distance_coef=job["lr"]) if job["old_c"] else {}
    cfg = GWAEConfig.for_images((1, 16, 16), z_dim=job["z_dim"], prior=job["prior"], base_channels=8, hidden_dim=64,
                                critic_channels=4, critic_steps=job["critic_steps"], lr=job["lr"], lr_critic=job["lr"],
                                **extra)
    torch.manual_seed(seed)  # encoder and decoder are built before the prior: the same weights for every prior
    model = GWAE(cfg)
    optimizers = model.make_optimizers()
    batches = torch.Generator().manual_seed(seed)
    for _ in range(job["steps"]):
        model.train_step(train[torch.randint(0, N_TRAIN, (64,), generator=batches)], *optimizers)
    model.eval()
    with torch.no_grad():
        mu = model.encode(test)[0]
        report = collapse_check(test, model.reconstruct(test), model.sample(1000))
    scores = dci(mu, test_factors, seed=seed)
    return {**job, "D": scores["disentanglement"], "C": scores["completeness"], "I": scores["informativeness"],
            "psnr": report["psnr"], "mean_image_psnr": report["mean_image_psnr"], "collapsed": report["collapsed"],
            "recon_spread": report["recon_spread"], "data_spread": report["data_spread"],
            **model.prior_health(), "c": model.distance_coef.item(),
            "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}


def paired(runs: list[dict], a: str, b: str) -> tuple[float, float, float, int]:
    """Mean of D_a − D_b over the seeds both have, its 95% t-interval, and the number of pairs."""
    from scipy import stats

    by = {(r["prior"], r["seed"]): r["D"] for r in runs if not r["old_c"]}
    diffs = np.array([by[a, s] - by[b, s] for (p, s) in by if p == a and (b, s) in by])
    n = len(diffs)
    mean = float(diffs.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def main() -> None:
    args = parse_args()
    if args.summarise:
        with open(args.summarise) as f:
            saved = json.load(f)
        summarise(saved["runs"], argparse.Namespace(**saved["args"]), saved.get("wall_s", math.nan))
        return
    # Seed by seed (the old-c run beside its seed's FNP), so a run cut short still holds whole pairs.
    jobs = []
    for s in range(args.seeds):
        jobs += [dict(prior=p, seed=s, old_c=False) for p in PRIORS]
        jobs += [dict(prior="fnp", seed=s, old_c=True)] if s < args.old_c_seeds else []
    common = dict(steps=args.steps, critic_steps=args.critic_steps, lr=args.lr, z_dim=args.z_dim)
    jobs = [{**j, **common} for j in jobs]
    print(f"{len(jobs)} runs of {args.steps} steps (batch 64, {args.critic_steps} critic steps, lr {args.lr:g}, "
          f"z {args.z_dim}) on regions 16×16, {args.workers} workers; DCI on {N_TEST} held-out images", flush=True)
    t0 = time.perf_counter()
    runs = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for r in pool.imap_unordered(one_run, jobs):
            runs.append(r)
            tag = r["prior"] + (" (old c)" if r["old_c"] else "")
            print(f"  {tag:14s} seed {r['seed']}: D {r['D']:.3f} C {r['C']:.3f} I {r['I']:.3f}  psnr {r['psnr']:.1f} "
                  f"(mean image {r['mean_image_psnr']:.1f}){'  COLLAPSED' if r['collapsed'] else ''}  kurtosis max "
                  f"{r['prior_kurtosis_max']:.2f}  |z| max {r['prior_max_abs_z']:.1f}  c {r['c']:.3f}  "
                  f"{r['cpu_s']:.0f} s cpu", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "runs": runs, "wall_s": time.perf_counter() - t0}, f, indent=1)
    summarise(runs, args, time.perf_counter() - t0)


def summarise(runs: list[dict], args: argparse.Namespace, wall: float) -> None:
    cpu = sum(r["cpu_s"] for r in runs)

    print(f"\nper prior (mean ± sd over seeds)")
    groups = [(p, False) for p in PRIORS] + ([("fnp", True)] if args.old_c_seeds else [])
    for prior, old in groups:
        rs = [r for r in runs if r["prior"] == prior and r["old_c"] == old]
        if not rs:
            continue
        cells = "  ".join(f"{k} {np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs]):.3f}"
                          for k in ("D", "C", "I", "psnr", "prior_kurtosis_max", "prior_max_abs_z"))
        collapsed = sum(r["collapsed"] for r in rs)
        print(f"  {prior + (' (old c)' if old else ''):14s} n={len(rs)}  {cells}  collapsed {collapsed}")
    print("\npaired differences in D (95% t-interval)")
    for a, b in (("fnp", "gaussian"), ("uniform", "gaussian"), ("fnp", "uniform")):
        mean, lo, hi, n = paired(runs, a, b)
        print(f"  D_{a} − D_{b}: {mean:+.3f}  [{lo:+.3f}, {hi:+.3f}]  (n = {n} pairs)")
    print(f"\nwall {wall:.0f} s on this machine ({os.cpu_count()} cores, shared); {cpu:.0f} s of CPU in the runs, "
          f"≈ {cpu / 2:.0f} s on 2 idle cores", flush=True)


if __name__ == "__main__":
    main()
