"""The shard columns: their Arrow schema, and numpy ↔ Arrow conversion, vectorised over whole columns.

    image    fixed_size_binary[C*H*W], not null: uint8 pixels in CHW order
    label    int64, null where an example has no label
    factors  fixed_size_list<float32>[F]; Arrow's null type (all rows null) for datasets without factors

Torch-free on purpose: Ray Data's read tasks import this module to decode blocks, and a worker that had to import
torch first would start seconds later.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # images (N, C, H, W) uint8, labels (N,) int64, factors (N, F) f32


def shard_schema(shape: tuple[int, int, int], num_factors: int) -> pa.Schema:
    """The Arrow schema of every shard of a dataset with images of `shape` and `num_factors` factors.

    Arrow has no zero-width lists and Parquet does not round-trip null fixed-size lists, so a dataset without
    factors stores `factors` as Arrow's null type: every row is null, as the data contract says.
    """
    c, h, w = shape
    factors = pa.list_(pa.float32(), num_factors) if num_factors > 0 else pa.null()
    return pa.schema(
        [
            pa.field("image", pa.binary(c * h * w), nullable=False),
            pa.field("label", pa.int64()),
            pa.field("factors", factors),
        ]
    )


def encode_table(images: np.ndarray, labels: Optional[np.ndarray], factors: Optional[np.ndarray]) -> pa.Table:
    """uint8 (N, C, H, W) images, (N,) labels (-1 = none) or None, (N, F) factors or None → an Arrow table.

    The image column wraps the pixel buffer without a per-row copy.
    """
    n, shape = len(images), tuple(images.shape[1:])
    num_factors = 0 if factors is None else factors.shape[1]
    pixels = np.ascontiguousarray(images, dtype=np.uint8)
    image = pa.FixedSizeBinaryArray.from_buffers(pa.binary(int(np.prod(shape))), n, [None, pa.py_buffer(pixels)])
    if labels is None:
        label = pa.nulls(n, pa.int64())
    else:
        label = pa.array(labels, type=pa.int64(), mask=np.asarray(labels) < 0)
    if num_factors:
        values = pa.array(np.ascontiguousarray(factors, dtype=np.float32).reshape(-1))
        factor_col = pa.FixedSizeListArray.from_arrays(values, num_factors)
    else:
        factor_col = pa.nulls(n)
    schema = shard_schema(shape, num_factors)  # type: ignore[arg-type]
    return pa.Table.from_arrays([image, label, factor_col], schema=schema)


def decode_table(table: pa.Table, shape: tuple[int, int, int], num_factors: int) -> Arrays:
    """Arrow rows → numpy arrays: one np.frombuffer over the whole image column, no per-row Python.

    The image array is a read-only view of the Arrow buffer when the column is a single chunk.
    """
    n = table.num_rows
    width = int(np.prod(shape))
    image = table.column("image").combine_chunks()
    if image.type != pa.binary(width):
        raise ValueError(f"image column is {image.type}, expected fixed_size_binary[{width}] for shape {list(shape)}")
    images = np.frombuffer(image.buffers()[1], dtype=np.uint8, count=n * width, offset=image.offset * width)
    labels = pc.fill_null(table.column("label"), -1).to_numpy().astype(np.int64, copy=False)
    if num_factors:
        flat = table.column("factors").combine_chunks().flatten().to_numpy()
        factors = flat.astype(np.float32, copy=False).reshape(n, num_factors)
    else:
        factors = np.zeros((n, 0), dtype=np.float32)
    return images.reshape(n, *shape), labels, factors


def decode_ray_batch(table: pa.Table, shape: tuple[int, int, int], num_factors: int) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: an Arrow block → numpy columns "image", "label" (and "factors")."""
    images, labels, factors = decode_table(table, shape, num_factors)
    out = {"image": images, "label": labels}
    if num_factors:  # Ray's tensor columns need a non-zero width; to_torch_batch fills in (B, 0)
        out["factors"] = factors
    return out
