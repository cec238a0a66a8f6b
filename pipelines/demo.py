"""`make demo`: the embedded default on one machine, from `configs/demo.yaml`.

What runs grows with the project: today it prepares the two offline data sets (digits for the NVAE stages,
procedural shapes for the GWAE search) and prints their summaries and where they are.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pipelines.config import DataConfig, load_config


def demo_datasets(data: DataConfig) -> list[DataConfig]:
    """The configured data set plus the shapes set the tune stage searches on."""
    shapes = DataConfig(
        source="shapes",
        path=str(Path(data.path).parent / "shapes32"),
        image_size=32,
        num_examples=6000,
        rgb=True,
        seed=data.seed,
    )
    return [data] if data.source == "shapes" else [data, shapes]


def run_demo(config_path: str, overrides: list[str] | None = None) -> int:
    from pipelines.data import prepare_dataset, read_manifest

    cfg = load_config(config_path, overrides)
    t0 = time.perf_counter()
    print(f"vaepipe demo: config {config_path} (name={cfg.name})")
    for data in demo_datasets(cfg.data):
        path = Path(data.path)
        if (path / "dataset.json").exists():
            manifest = read_manifest(str(path))
            print(f"[data] {data.source}: already prepared at {path}")
        else:
            print(f"[data] preparing {data.source} → {path}")
            manifest = prepare_dataset(data, str(path))
        splits = ", ".join(f"{k} {v}" for k, v in manifest.splits.items())
        print(f"[data] {manifest.name}: shape {list(manifest.shape)}, {splits}")
    print(f"\nDone in {time.perf_counter() - t0:.1f} s. Results:")
    for data in demo_datasets(cfg.data):
        print(f"  {data.source:8s} {Path(data.path).resolve()}   (look: vaepipe data inspect {data.path})")
    return 0
