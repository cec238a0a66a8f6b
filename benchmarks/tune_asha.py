"""Ray Tune over GWAE (Nakagawa et al., ICLR 2023) on `regions` images: what ASHA saves, what the search finds, how
the priors compare at one budget, and how the data reaches the trials.

    .venv/bin/python benchmarks/tune_asha.py                                   # ~10 min on 2 busy CPU cores
    .venv/bin/python benchmarks/tune_asha.py --samples 4 --epochs 4 --steps 8  # a quick look

Everything runs through the real stage (`run_tune`: a local Ray, a sqlite MLflow store in --workdir) and reads its
results back from the tune run's `results/trials.parquet`:
1. the weights search (tune_spaces/gwae_weights.yaml, random search with a fixed seed) with ASHA, then the same
   trials without a scheduler: random search samples the same values, and each trial's seed follows its values and
   number, so both runs train the same models and differ only in what ASHA stops (its grace period is 40% of the
   budget). Reported: trial-epochs, wall time, the best objective (dci + 0.01·psnr by default) and which trial
   found it;
2. the priors at one budget, a grid over fnp / gaussian / uniform with --replicates paired seeds (repeat k of every
   prior starts from the same seed) and the config's default weights: DCI of each prior and the OoD AUROC against
   the held-out class 3, by the critic in the paper's direction (`auroc`), by the prior-likelihood baseline
   (`auroc_prior`) and by reconstruction error (`auroc_recon`), at the end of the budget, mean ± sd over seeds.
   benchmarks/gwae_priors.py makes the paired comparison with more seeds and confidence intervals;
3. shipping the data to a trial: `ray.get` of the arrays the driver put in the object store once, against each
   trial reading and verifying the Parquet splits itself (`load_trial_data` in a task), median of 5 tasks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

PRIORS_SPACE = """# .venv/bin/python benchmarks/tune_asha.py   (written by the benchmark: the prior comparison)
gwae.prior: {type: grid, values: [fnp, gaussian, uniform]}
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=8, help="trials of the weights search (default 8)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial: ASHA's max_t (default 10)")
    p.add_argument("--steps", type=int, default=30, help="GWAE updates per epoch (default 30)")
    p.add_argument("--replicates", type=int, default=2, help="seeds per prior in the prior comparison (default 2)")
    p.add_argument("--examples", type=int, default=20000, help="regions images, 16×16 grey (default 20000)")
    p.add_argument("--concurrent", type=int, default=2, help="trials at a time (default 2)")
    p.add_argument("--workdir", default=None, help="data, MLflow store and Ray results (default: a temp dir)")
    p.add_argument("--skip-priors", action="store_true", help="only the ASHA comparison and the data shipping")
    return p.parse_args()


def config(args: argparse.Namespace, workdir: Path, name: str, **tune):
    from pipelines.config import load_config

    overrides = [
        f"name={name}", f"tracking.workdir={workdir / 'runs'}", f"tune.storage_path={workdir / 'ray'}",
        f"tune.data.path={workdir / 'regions16'}", "tune.data.source=regions", "tune.data.image_size=16",
        f"tune.data.num_examples={args.examples}", "tune.data.val_fraction=0.15", "tune.data.test_fraction=0.15",
        "gwae.image_shape=[1,16,16]", "gwae.z_dim=4", "gwae.base_channels=8", "gwae.hidden_dim=64",
        "gwae.critic_channels=4", "gwae.critic_steps=5", "gwae.lr=1e-3", "gwae.lr_critic=1e-3", "tune.batch_size=64",
        f"tune.steps_per_epoch={args.steps}", f"tune.epochs={args.epochs}", "tune.eval_examples=2000",
        "tune.ood_class=3", f"tune.max_concurrent_trials={args.concurrent}", "tune.search=random",
        "tune.max_failures=0", f"tune.grace_period={max(1, -(-4 * args.epochs // 10))}",
    ]
    return load_config(None, overrides + [f"tune.{k}={v}" for k, v in tune.items()])


def search(cfg) -> tuple[pd.DataFrame, float]:
    """Run the stage; its trial table (from the tune run's artifacts) and the wall time."""
    import mlflow

    from pipelines.tune_gwae import run_tune

    t0 = time.perf_counter()
    result = run_tune(cfg)
    seconds = time.perf_counter() - t0
    path = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="results/trials.parquet")
    return pd.read_parquet(path), seconds


def best_of(table: pd.DataFrame) -> tuple[float, str]:
    row = table.loc[table["best_objective"].idxmax()]
    return float(row["best_objective"]), str(row["trial_id"])


def shipping(cfg) -> dict[str, float]:
    """Milliseconds for a task to get the trial data: from the object store vs reading Parquet itself."""
    import ray

    from pipelines.data import read_manifest
    from pipelines.tune_gwae import load_trial_data

    manifest = read_manifest(cfg.tune.data.path)
    t0 = time.perf_counter()
    data = load_trial_data(cfg, manifest)
    driver_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ray.put(data)
    put = time.perf_counter() - t0

    @ray.remote(num_cpus=1)
    def from_store(refs: list) -> float:
        start = time.perf_counter()
        arrays = ray.get(refs[0])
        int(arrays["train"][:, :, 0, 0].sum())  # touch the pages
        return time.perf_counter() - start

    @ray.remote(num_cpus=1)
    def from_parquet(cfg_dict: dict) -> float:
        from pipelines.config import PipelineConfig

        start = time.perf_counter()
        c = PipelineConfig.from_dict(cfg_dict)
        arrays = load_trial_data(c, read_manifest(c.tune.data.path))
        int(arrays["train"][:, :, 0, 0].sum())
        return time.perf_counter() - start

    ray.get([from_store.remote([ref]), from_parquet.remote(cfg.to_dict())])  # warm the workers' imports
    store = [ray.get(from_store.remote([ref])) for _ in range(5)]
    parquet = [ray.get(from_parquet.remote(cfg.to_dict())) for _ in range(5)]
    mib = sum(a.nbytes for a in data.values()) / 2**20
    return {"MiB": mib, "driver load_trial_data ms": 1e3 * driver_load, "ray.put ms": 1e3 * put,
            "task ray.get ms": 1e3 * statistics.median(store), "task load_trial_data ms": 1e3 * statistics.median(parquet)}


def main() -> None:
    args = parse_args()
    from pipelines.ray_env import init_ray
    from pipelines.data import ensure_dataset

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vaepipe-tune-bench-")).resolve()
    base = config(args, workdir, "bench-asha")
    ensure_dataset(base.tune.data, progress=False)
    init_ray()
    print(f"workdir {workdir}; {args.samples} trials × {args.epochs} epochs × {args.steps} steps of 64 on "
          f"{args.examples} regions (16×16 grey), {os.cpu_count()} CPU cores", flush=True)

    asha, t_asha = search(config(args, workdir, "bench-asha", space="gwae_weights", num_samples=args.samples,
                                 scheduler="asha", reduction_factor=2))
    full, t_full = search(config(args, workdir, "bench-full", space="gwae_weights", num_samples=args.samples,
                                 scheduler="none"))
    same = sorted(map(tuple, asha[["gwae.lambda_w", "gwae.lambda_d", "gwae.lambda_h"]].round(12).values)) == sorted(
        map(tuple, full[["gwae.lambda_w", "gwae.lambda_d", "gwae.lambda_h"]].round(12).values))
    rows = [("", f"ASHA (rf 2, grace {base.tune.grace_period})", "full budget")]
    rows.append(("trial-epochs", str(asha["epochs"].sum()), str(full["epochs"].sum())))
    rows.append(("trials stopped early", str((asha["outcome"] == "stopped_early").sum()), "0"))
    rows.append(("wall time (s)", f"{t_asha:.0f}", f"{t_full:.0f}"))
    (b_asha, id_asha), (b_full, id_full) = best_of(asha), best_of(full)
    rows.append(("best objective (trial)", f"{b_asha:.4f} ({id_asha[-5:]})", f"{b_full:.4f} ({id_full[-5:]})"))
    rows.append(("same sampled trials", "yes" if same else "NO", ""))
    print_table("1. weights search: ASHA against the same trials at the full budget", rows)
    print("per trial (ASHA run):")
    print(asha[["trial_id", "gwae.lambda_w", "gwae.lambda_d", "gwae.lambda_h", "epochs", "best_objective", "psnr",
                "dci", "auroc"]].to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)

    if not args.skip_priors:
        space = workdir / "priors.yaml"
        space.write_text(PRIORS_SPACE)
        priors, t_priors = search(config(args, workdir, "bench-priors", space=str(space),
                                         num_samples=args.replicates, scheduler="none"))
        rows = [("prior", "DCI dis.", "DCI compl.", "DCI info.", "psnr", "auroc (critic)", "auroc_prior",
                 "auroc_recon", "kurtosis max", "collapsed")]
        for prior, group in priors.groupby("gwae.prior", sort=False):
            keys = ("dci", "dci_completeness", "dci_informativeness", "psnr", "auroc", "auroc_prior", "auroc_recon",
                    "prior_kurtosis_max", "collapsed")
            rows.append((f"{prior} (n={len(group)})", *(mean_sd(group, k) for k in keys)))
        print_table(f"2. priors at {args.epochs} epochs × {args.steps} steps (last epoch; {t_priors:.0f} s)", rows)

    figures = shipping(base)
    print_table("3. trial data (train + eval + OoD arrays)", [("", "value")] + [(k, f"{v:.1f}") for k, v in
                                                                               figures.items()])


def mean_sd(table: pd.DataFrame, key: str) -> str:
    if key not in table or table[key].isna().all():
        return "-"
    return f"{table[key].mean():.3f} ± {table[key].std(ddof=0):.3f}"


def print_table(title: str, rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{title}")
    for i, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print(flush=True)


if __name__ == "__main__":
    main()
