"""`make demo`: the embedded default on one machine, from `configs/demo.yaml`.

Prepares both offline data sets (digits for the NVAE stages, the regions factor set for the GWAE search) whatever stages
the config names, then runs the pipeline (`vaepipe run`) on a local Ray with the sqlite tracking store, and prints
where the results are and how to open them.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipelines.config import load_config


def run_demo(config_path: str, overrides: list[str] | None = None) -> int:
    from pipelines.data import ensure_dataset
    from pipelines.run import open_hint, run_pipeline, summary_table

    cfg = load_config(config_path, overrides)
    t0 = time.perf_counter()
    print(f"vaepipe demo: {config_path} (name={cfg.name}, stages={', '.join(cfg.stages)})", flush=True)
    datasets = [cfg.data] + ([cfg.tune.data] if cfg.tune.data.path != cfg.data.path else [])
    for data in datasets:
        ensure_dataset(data)
    parent, results, timings = run_pipeline(cfg)

    from pipelines.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking)
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")\n")
    print(summary_table(results))
    for r in results:
        if r.stage == "tune":
            from pipelines.tune_gwae import summary_line

            print(summary_line(r))
    print("\nWhere the results are:")
    for data in datasets:
        print(f"  data       {Path(data.path).resolve()}   (vaepipe data inspect {data.path})")
    print(f"  tracking   {uri}   (pipeline run {parent}, experiment vaepipe/{cfg.name})")
    for r in results:
        if r.model_uri:
            print(f"  model      {r.model_uri}")
    print("\nOpen them:")
    print(f"  {open_hint(uri)}")
    print(f"  vaepipe runs list --config {config_path}")
    print(f"  python -c \"import mlflow; mlflow.set_tracking_uri('{uri}'); "
          f"m = mlflow.pytorch.load_model('models:/{cfg.name}-nvae@candidate'); print(m.sample(4).shape)\"")
    return 0
