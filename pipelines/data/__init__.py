"""The data layer: sources → sharded Parquet + dataset.json → verified torch batches (pyarrow or Ray Data).

    from pipelines.data import prepare_dataset, ParquetImageReader, ray_dataset, iter_torch_batches
    manifest = prepare_dataset(DataConfig(source="digits", image_size=16), out="runs/data/digits16")
    for batch in ParquetImageReader("runs/data/digits16", "train", batch_size=64, shuffle=True): ...

On disk: DIR/{train,val,test}/part-NNNNN.parquet (zstd; columns image, label, factors) and DIR/dataset.json
(shape, counts, label and factor names, the sha256 of every shard, the source and how it was made).

The names below are imported on first use: Ray Data's read tasks import `pipelines.data.columns` to decode blocks,
and eager re-exports would make every such worker import torch (seconds) before its first block.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetError": "manifest",
    "Manifest": "manifest",
    "Shard": "manifest",
    "Verified": "manifest",
    "read_manifest": "manifest",
    "verify": "manifest",
    "ensure_dataset": "prepare",
    "prepare_dataset": "prepare",
    "InMemoryShard": "readers",
    "ParquetImageReader": "readers",
    "iter_torch_batches": "readers",
    "load_split": "readers",
    "ray_dataset": "readers",
    "to_torch_batch": "readers",
    "make_shapes": "shapes",
    "SOURCES": "sources",
    "SourceData": "sources",
    "Split": "sources",
    "load_source": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipelines.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
