"""Write a source's images as sharded Parquet plus `dataset.json`: what `vaepipe data prepare` runs.

    manifest = prepare_dataset(DataConfig(source="shapes", image_size=64, rgb=True), out="runs/data/shapes64")

Shards hold about 64 MB of image bytes each (before zstd; a decoded shard stays a bounded piece of memory).

Completeness, per filesystem:
- Local disks (POSIX rename is atomic): everything is written into a hidden temporary sibling directory
  (`.NAME.tmp-XXXX`) and renamed into place at the end, so a crash never leaves a directory that looks complete.
  An overwrite moves the old data aside (`.NAME.old-XXXX`) only once the new data is whole, renames the new data in
  and then deletes the old; a crash between those two renames leaves the old data in `.NAME.old-XXXX`.
- Object stores (s3://, gs://, ...) have no atomic directory rename: the data is written in place and
  `dataset.json` is written last, so its presence is what marks a dataset complete (readers refuse a directory
  without it). An overwrite deletes the old `dataset.json` first for the same reason.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import time
import uuid
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.columns import encode_table
from pipelines.data.manifest import (
    MANIFEST_NAME,
    SPLITS,
    DatasetError,
    Manifest,
    Shard,
    join,
    prepare_command,
    read_manifest,
    resolve,
)
from pipelines.data.sources import SourceData, load_source

if TYPE_CHECKING:
    from pipelines.config import DataConfig

SHARD_BYTES = 64 * 2**20  # image bytes per shard, before compression
ROW_GROUP_BYTES = 16 * 2**20  # row groups let streaming readers hold a quarter shard at a time
# Directory entries a previous preparation may leave: only a directory holding nothing else may be overwritten.
_OURS = {MANIFEST_NAME, "examples.png", *SPLITS}


def _version() -> str:
    try:
        return importlib.metadata.version("vaepipe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def prepare_dataset(
    cfg: DataConfig,
    out: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    *,
    filesystem: Optional[pafs.FileSystem] = None,
) -> Manifest:
    """Make the dataset `cfg` describes and write it to `out` (default `cfg.path`).

    A non-empty target is refused unless `overwrite`, and even then only when it holds a vaepipe dataset (never an
    unrelated folder); the old data stays intact until the new data is complete. Returns the written Manifest.
    """
    path = str(out if out is not None else cfg.path)
    cfg = cfg.replace(path=path)
    log: Optional[Callable[[str], None]] = (lambda line: print(line, flush=True)) if progress else None
    fs, root = resolve(path, filesystem)
    exists = _check_target(fs, root, path, overwrite)
    start = time.perf_counter()
    data = load_source(cfg, log)
    if log:
        counts = ", ".join(f"{k} {len(v)}" for k, v in data.splits.items())
        log(f"made {data.name}: {counts} examples in {time.perf_counter() - start:.1f}s; writing {path}")
    if fs.type_name == "local":
        parent, base = root.rsplit("/", 1)
        fs.create_dir(parent, recursive=True)
        tmp = join(parent, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            manifest = _write_dataset(fs, tmp, data, cfg, log)
            _swap_in(fs, tmp, root, exists)
        except BaseException:
            _delete_dir(fs, tmp)
            raise
    else:
        if exists:
            _clear_in_place(fs, root)
        manifest = _write_dataset(fs, root, data, cfg, log)
    if log:
        log(f"wrote {path} in {time.perf_counter() - start:.1f}s:\n{manifest.summary()}")
    return manifest


# The DataConfig fields that change what a source makes (path and cache_dir only say where things are).
_CONTENT_FIELDS = {
    "digits": ("image_size", "seed", "val_fraction", "test_fraction"),
    "shapes": ("image_size", "seed", "val_fraction", "test_fraction", "num_examples", "rgb"),
    "regions": ("image_size", "seed", "val_fraction", "test_fraction", "num_examples", "rgb"),
    "mnist": ("image_size", "seed", "val_fraction"),
    "cifar10": ("image_size", "seed", "val_fraction"),
    "celeba64": ("image_size",),
    "folder": ("image_size", "seed", "val_fraction", "test_fraction", "rgb", "source_path"),
}
# How a source makes its images, when that changed in a way its config does not show. A dataset made by an older
# protocol is refused by `ensure_dataset` (its figures would not be the paper's). 2: MNIST zero-padded to 32 (was a
# resize), CelebA-64's face box at top 40 (was centred at top 35).
PROTOCOLS = {"mnist": 2, "celeba64": 2}


def ensure_dataset(cfg: DataConfig, progress: bool = True) -> Manifest:
    """The manifest of the dataset at `cfg.path`, preparing it first when there is none (what stages call).

    An existing dataset made from a different configuration is an error, never silently reused or replaced.
    """
    fs, root = resolve(cfg.path)
    if fs.get_file_info(join(root, MANIFEST_NAME)).type != pafs.FileType.File:
        return prepare_dataset(cfg, progress=progress)
    manifest = read_manifest(root, fs)
    made_by, wanted_protocol = manifest.source.get("protocol", 1), PROTOCOLS.get(cfg.source, 1)
    if made_by < wanted_protocol:
        raise DatasetError(
            f"{cfg.path} holds a {cfg.source} dataset made by an older vaepipe (protocol {made_by}; now "
            f"{wanted_protocol}: {manifest.source.get('notes', '')!r} is no longer how the paper's images are made). "
            f"Prepare it again: `{prepare_command(cfg.to_dict(), cfg.path)} --overwrite`"
        )
    made = manifest.source.get("config") or {}
    wanted = cfg.to_dict()
    keys = ("source",) + _CONTENT_FIELDS.get(cfg.source, ())
    diffs = [f"data.{k}: {made.get(k)!r} there, {wanted[k]!r} asked" for k in keys if made.get(k) != wanted[k]]
    if diffs:
        raise DatasetError(
            f"{cfg.path} holds a dataset made with a different configuration ({'; '.join(diffs)}). Point data.path "
            f"at another directory, or replace it: `{prepare_command(wanted, cfg.path)} --overwrite`"
        )
    return manifest


def _check_target(fs: pafs.FileSystem, root: str, path: str, overwrite: bool) -> bool:
    """True when `root` exists (and may be replaced); raises before any work when it must not be touched."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"{path} is a file; --out must name a directory (new or empty)")
    entries = [e.base_name for e in fs.get_file_info(pafs.FileSelector(root))]
    if not entries:
        return True
    if not overwrite:
        try:
            what = f"a prepared dataset ({read_manifest(root, fs).name})"
        except DatasetError:
            what = f"{len(entries)} entries ({', '.join(sorted(entries)[:4])})"
        raise DatasetError(
            f"{path} already holds {what}; nothing was changed. Pass --overwrite (overwrite=True) to replace it, "
            f"or choose another --out."
        )
    foreign = sorted(set(entries) - _OURS)
    if foreign:
        raise DatasetError(
            f"{path} holds files that are not part of a vaepipe dataset ({', '.join(foreign[:4])}); refusing to "
            f"replace it even with --overwrite. Choose a new or empty --out."
        )
    return True


def _swap_in(fs: pafs.FileSystem, tmp: str, root: str, exists: bool) -> None:
    """Rename the finished `tmp` to `root`; an existing `root` moves aside first and is deleted only afterwards."""
    if not exists:
        fs.move(tmp, root)
        return
    parent, base = root.rsplit("/", 1)
    old = join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
    fs.move(root, old)
    try:
        fs.move(tmp, root)
    except BaseException:
        fs.move(old, root)  # put the old data back
        raise
    _delete_dir(fs, old)


def _clear_in_place(fs: pafs.FileSystem, root: str) -> None:
    manifest = join(root, MANIFEST_NAME)
    if fs.get_file_info(manifest).type == pafs.FileType.File:
        fs.delete_file(manifest)  # first: from here on the directory no longer claims to be complete
    fs.delete_dir_contents(root, missing_dir_ok=True)


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _write_dataset(
    fs: pafs.FileSystem, root: str, data: SourceData, cfg: DataConfig, log: Optional[Callable[[str], None]]
) -> Manifest:
    shape = data.shape
    image_bytes = int(np.prod(shape))
    rows_per_shard = max(1, SHARD_BYTES // image_bytes)
    rows_per_group = max(1, ROW_GROUP_BYTES // image_bytes)
    shards: dict[str, tuple[Shard, ...]] = {}
    for split in SPLITS:
        part = data.splits[split]
        fs.create_dir(join(root, split), recursive=True)
        written = []
        # An empty split still gets one (empty) shard, so every split has a schema a reader can check.
        for k, lo in enumerate(range(0, max(len(part), 1), rows_per_shard)):
            hi = min(lo + rows_per_shard, len(part))
            table = encode_table(
                part.images[lo:hi],
                None if part.labels is None else part.labels[lo:hi],
                None if part.factors is None else part.factors[lo:hi],
            )
            rel = f"{split}/part-{k:05d}.parquet"
            written.append(_write_shard(fs, join(root, rel), rel, table, rows_per_group))
            if log:
                log(f"  {rel}: {table.num_rows} rows, {written[-1].bytes / 1e6:.1f} MB")
        shards[split] = tuple(written)
    manifest = Manifest(
        name=data.name,
        shape=shape,
        splits={s: len(data.splits[s]) for s in SPLITS},
        shards=shards,
        label_names=tuple(data.label_names),
        factor_names=tuple(data.factor_names),
        factor_ranges=tuple(data.factor_ranges),
        source={
            "name": cfg.source,
            "config": cfg.to_dict(),
            "vaepipe_version": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "writer": f"pyarrow {pa.__version__}",
            "notes": data.notes,
            "protocol": PROTOCOLS.get(cfg.source, 1),
        },
    )
    with fs.open_output_stream(join(root, MANIFEST_NAME)) as f:  # last: its presence marks the dataset complete
        f.write(manifest.to_json().encode())
    return manifest


def _write_shard(fs: pafs.FileSystem, full: str, rel: str, table: pa.Table, rows_per_group: int) -> Shard:
    sink = pa.BufferOutputStream()
    # No dictionary or statistics for the image column: both cost time and bytes and no reader uses them.
    with pq.ParquetWriter(
        sink, table.schema, compression="zstd", use_dictionary=["label"], write_statistics=["label"]
    ) as writer:
        writer.write_table(table, row_group_size=rows_per_group)
    buf = sink.getvalue()
    with fs.open_output_stream(full) as f:
        f.write(buf)
    return Shard(path=rel, rows=table.num_rows, bytes=buf.size, sha256=hashlib.sha256(buf).hexdigest())
