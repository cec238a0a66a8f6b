"""The ncp stage at demo scale: sample quality of base vs SIR vs Langevin samples, and the stage's wall time with the
latent groups trained in parallel Ray tasks vs one after another.

    .venv/bin/python benchmarks/ncp_stage.py --data digits            # or: --data shapes
    .venv/bin/python benchmarks/ncp_stage.py --data digits --skip-sequential

Trains the demo's tiny NVAE on the data set (demo budget), then runs the ncp stage twice on the registered model:
with `ncp.cpus_per_group=1` (groups side by side on the local Ray's logical CPUs) and with `ncp.cpus_per_group`
equal to all of them (one group at a time). The score is the in-project one (vae/quality.py) on the val split:
fd_vaepipe, a Fréchet distance in the features of a classifier trained on the data (NOT Inception FID, and not
comparable with published FIDs; lower is better), precision and recall in the same features.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

from pipelines.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = {
    "digits": ["data.source=digits", "data.image_size=16", "nvae.image_shape=[1,16,16]"],
    "shapes": ["data.source=shapes", "data.image_size=32", "data.rgb=true", "data.num_examples=6000",
               "nvae.image_shape=[3,32,32]"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=sorted(DATA), default="digits")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--inception-weights", default="", metavar="PATH_OR_URI",
                    help="torch-fidelity's Inception-v3 weights file: adds Inception FID/KID (never downloaded)")
    args = ap.parse_args()

    import ray

    from pipelines.ray_env import init_ray
    from pipelines.data import ensure_dataset
    from pipelines.train_ncp import run_ncp
    from pipelines.train_vae import run_train

    work = tempfile.mkdtemp(prefix="vaepipe-ncp-bench-")
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"name=ncpbench-{args.data}", f"data.path=runs/bench/{args.data}-ncp", *DATA[args.data],
        f"tracking.workdir={work}", f"train.storage_path={work}/ray", f"train.epochs={args.epochs}",
    ])
    ensure_dataset(cfg.data, progress=False)
    init_ray()
    logical = int(ray.cluster_resources().get("CPU", 1))
    trained = run_train(cfg)
    rows = []
    modes = [("parallel", 1.0)] + ([] if args.skip_sequential else [("sequential", float(logical))])
    results = {}
    for label, cpus in modes:
        run_cfg = cfg.replace(ncp=cfg.ncp.replace(cpus_per_group=cpus, inception_weights=args.inception_weights))
        t0 = time.perf_counter()
        result = run_ncp(run_cfg, model_uri=trained.model_uri)
        results[label] = (time.perf_counter() - t0, result)
    wall_par, res = results["parallel"]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    m = client.get_run(res.run_id).data.metrics  # every metric the stage logged, timings included
    print(f"\nncp stage on {args.data} (tiny NVAE, {args.epochs} epochs; ncp.steps={cfg.ncp.steps}, "
          f"{cfg.ncp.eval_samples} samples per method; {os.cpu_count()} cores, {logical} logical CPUs)")
    print("fd_vaepipe: Fréchet distance in vaepipe's own features (not FID), against the val split")
    print(f"{'method':<10}{'fd_vaepipe':>11}{'precision':>11}{'recall':>8}{'max prob':>10}{'s/sample':>10}")
    for method in ("base", "sir", "langevin"):
        rows.append((method, m.get(f"val/fd_vaepipe_{method}"), m.get(f"val/precision_{method}"),
                     m.get(f"val/recall_{method}"), m.get(f"val/mean_max_prob_{method}"),
                     m.get(f"ncp/sample_seconds_{method}", float("nan")) / cfg.ncp.eval_samples))
    for method, fd, prec, rec, prob, sps in rows:
        print(f"{method:<10}{fd:>11.2f}{prec:>11.3f}{rec:>8.3f}{prob:>10.3f}{sps:>10.4f}")
    if "val/inception_fid_sir" in m:
        print(f"Inception FID / KID ({int(m['val/inception_samples'])} samples; published FIDs use 50k): " + ", ".join(
            f"{method} {m[f'val/inception_fid_{method}']:.2f} / {m[f'val/inception_kid_{method}']:.4f}"
            for method in ("base", "sir", "langevin")))
    groups = sorted(k for k in m if k.startswith("val/kl_reduction/group_"))
    print("KL-reduction estimate per group (nats): " + ", ".join(f"{m[k]:.2f}" for k in groups))
    def classifier_seconds(label: str) -> float:
        return client.get_run(results[label][1].run_id).data.metrics["ncp/wall_seconds"]

    print(f"\nclassifier training (all groups), in parallel: {classifier_seconds('parallel'):.0f} s; "
          f"whole stage incl. evaluation: {wall_par:.0f} s")
    if "sequential" in results:
        seq, par = classifier_seconds("sequential"), classifier_seconds("parallel")
        print(f"classifier training, one group at a time: {seq:.0f} s; whole stage: {results['sequential'][0]:.0f} s"
              f"  (parallel trains {seq / par:.2f}× faster)")


if __name__ == "__main__":
    main()
