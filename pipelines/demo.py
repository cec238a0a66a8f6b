"""`make demo`: the embedded default on one machine, from `configs/demo.yaml`.

Prepares the two offline data sets (digits for the NVAE stages, procedural shapes for the GWAE search), then runs
the configured stages under one MLflow pipeline run on a local Ray, and prints where the results are and how to
open them. What runs grows with the project: today that is the train stage.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipelines.config import DataConfig, PipelineConfig, load_config


def demo_datasets(cfg: PipelineConfig) -> list[DataConfig]:
    """The NVAE stages' data set and the tune stage's (digits and shapes in the demo)."""
    out = [cfg.data]
    if cfg.tune.data.path != cfg.data.path:
        out.append(cfg.tune.data)
    return out


def _open_hint(cfg: PipelineConfig, tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000   # then open http://127.0.0.1:5000"
    return f"open {tracking_uri} in a browser"


def run_demo(config_path: str, overrides: list[str] | None = None) -> int:
    from pipelines.common import init_ray
    from pipelines.data import ensure_dataset
    from pipelines.tracking import Tracker, dataset_tag
    from pipelines.train_vae import run_train

    cfg = load_config(config_path, overrides)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    print(f"vaepipe demo: config {config_path} (name={cfg.name}, stages={', '.join(cfg.stages)})", flush=True)
    for data in demo_datasets(cfg):
        t = time.perf_counter()
        manifest = ensure_dataset(data)
        splits = ", ".join(f"{k} {v}" for k, v in manifest.splits.items())
        print(f"[data] {data.source}: {data.path}  shape {list(manifest.shape)}  ({splits})", flush=True)
        timings[f"data/{data.source}"] = time.perf_counter() - t

    tracker = Tracker.connect(cfg.tracking)
    init_ray()
    parent = tracker.start_pipeline_run(cfg, run_name="demo", dataset_tag=dataset_tag(cfg.data.path))
    results = []
    status = "FAILED"
    try:
        if "train" in cfg.stages:
            t = time.perf_counter()
            results.append(run_train(cfg, tracker, parent_run_id=parent))
            timings["train"] = time.perf_counter() - t
        status = "FINISHED"
    finally:
        tracker.end_run(parent, status)

    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s  (" +
          ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    print(f"Pipeline run: {parent} in experiment vaepipe/{cfg.name} at {tracker.tracking_uri}")
    for r in results:
        print("  " + r.summary())
    print("\nWhere the results are:")
    for data in demo_datasets(cfg):
        print(f"  data      {Path(data.path).resolve()}   (vaepipe data inspect {data.path})")
    print(f"  tracking  {tracker.tracking_uri}")
    print(f"  models    " + ", ".join(r.model_uri for r in results if r.model_uri))
    print("\nOpen them:")
    print(f"  {_open_hint(cfg, tracker.tracking_uri)}")
    print(f"  vaepipe runs list --config {config_path}")
    return 0
