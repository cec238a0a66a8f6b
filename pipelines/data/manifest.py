"""The prepared dataset's contract: `dataset.json`, its `Manifest`, and the checks readers run before reading.

A prepared dataset is a directory on any pyarrow filesystem:

    DIR/dataset.json
    DIR/{train,val,test}/part-NNNNN.parquet   # columns image, label, factors (see columns.py)

`dataset.json` names the image shape, the examples per split, the label and factor names, the sha256 of every
shard and how the data was made. Its presence marks the dataset complete: it is always written last.
`verify` recomputes every checksum and checks every shard's schema against the manifest, so a reader never
trains on a changed, truncated or mismatched file without saying so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import time
from typing import Any, Iterable, NamedTuple, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.columns import shard_schema
from pipelines.errors import DatasetError

MANIFEST_NAME = "dataset.json"
FORMAT = "vaepipe.dataset/1"
SPLITS = ("train", "val", "test")


def resolve(path: str, filesystem: Optional[pafs.FileSystem] = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or any URI pyarrow understands (s3://, gs://, hdfs://, file://)."""
    path = str(path)
    if filesystem is not None:
        return filesystem, path.rstrip("/") or "/"
    if "://" in path:
        try:
            fs, root = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise DatasetError(
                f"cannot open {path!r}: {e}; use a local path or an s3://, gs:// or hdfs:// URI"
            ) from None
        return fs, root.rstrip("/") or "/"
    # from_uri refuses relative paths; local ones are taken from the working directory.
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str  # relative to the dataset directory, e.g. "train/part-00000.parquet"
    rows: int
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What `dataset.json` holds. `source` records how the data was made: the source name, the DataConfig as a
    dict, the vaepipe version, the creation time and a line of notes."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    splits: dict[str, int]
    shards: dict[str, tuple[Shard, ...]]
    label_names: tuple[str, ...] = ()
    factor_names: tuple[str, ...] = ()
    factor_ranges: tuple[tuple[float, float], ...] = ()
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def image_bytes(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def num_factors(self) -> int:
        return len(self.factor_names)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def schema(self) -> pa.Schema:
        return shard_schema(self.shape, self.num_factors)

    @property
    def sha256(self) -> str:
        """The dataset's content digest: sha256 over the shape and every shard's checksum. Preparing the same data
        again gives the same value (the creation time is not part of it), so it identifies data in run tags."""
        shards = {split: [s.sha256 for s in v] for split, v in sorted(self.shards.items())}
        content = {"shape": list(self.shape), "shards": shards}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for shards in self.shards.values() for s in shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "shape": list(self.shape),
            "splits": dict(self.splits),
            "label_names": list(self.label_names),
            "factors": {"names": list(self.factor_names), "ranges": [list(r) for r in self.factor_ranges]},
            "shards": {s: [dataclasses.asdict(x) for x in v] for s, v in self.shards.items()},
            "source": self.source,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        factors = d.get("factors") or {}
        return cls(
            name=str(d["name"]),
            shape=tuple(int(x) for x in d["shape"]),  # type: ignore[arg-type]
            splits={str(k): int(v) for k, v in d["splits"].items()},
            shards={str(k): tuple(Shard(**x) for x in v) for k, v in d["shards"].items()},
            label_names=tuple(d.get("label_names") or ()),
            factor_names=tuple(factors.get("names") or ()),
            factor_ranges=tuple((float(lo), float(hi)) for lo, hi in factors.get("ranges") or ()),
            source=dict(d.get("source") or {}),
        )

    def summary(self) -> str:
        """A few human-readable lines: what `vaepipe data inspect` prints first."""
        c, h, w = self.shape
        lines = [f"dataset {self.name}: {c}x{h}x{w} uint8 images, content sha256 {self.sha256[:16]}"]
        for split in SPLITS:
            if split in self.splits:
                shards = self.shards.get(split, ())
                mb = sum(s.bytes for s in shards) / 1e6
                lines.append(f"  {split:<5} {self.splits[split]:>8} examples in {len(shards)} shard(s), {mb:.1f} MB")
        if self.label_names:
            names = ", ".join(self.label_names[:12]) + (", ..." if len(self.label_names) > 12 else "")
            lines.append(f"  labels  {self.num_classes} classes: {names}")
        else:
            lines.append("  labels  none")
        if self.factor_names:
            ranges = ", ".join(f"{n} [{lo:g}, {hi:g}]" for n, (lo, hi) in zip(self.factor_names, self.factor_ranges))
            lines.append(f"  factors {ranges}")
        else:
            lines.append("  factors none")
        src = self.source
        lines.append(
            f"  made by  vaepipe {src.get('vaepipe_version', '?')} from source {src.get('name', '?')!r} "
            f"at {src.get('created', '?')}"
        )
        if src.get("notes"):
            lines.append(f"  notes   {src['notes']}")
        return "\n".join(lines)


def prepare_command(manifest_or_config: Manifest | dict[str, Any] | None, path: str) -> str:
    """The `vaepipe data prepare` command line that (re)makes a dataset, for error messages."""
    cfg: dict[str, Any] = {}
    if isinstance(manifest_or_config, Manifest):
        cfg = dict(manifest_or_config.source.get("config") or {})
    elif isinstance(manifest_or_config, dict):
        cfg = manifest_or_config
    words = ["vaepipe", "data", "prepare", str(cfg.get("source", "SOURCE")), "--out", str(path)]
    if cfg.get("source_path"):
        words += ["--source-path", str(cfg["source_path"])]
    if cfg.get("image_size"):
        words += ["--image-size", str(cfg["image_size"])]
    if cfg.get("seed"):
        words += ["--seed", str(cfg["seed"])]
    for key in ("val_fraction", "test_fraction"):
        if cfg.get(key) is not None:
            words += ["--" + key.replace("_", "-"), f"{cfg[key]:g}"]
    if cfg.get("source") == "shapes":
        words += ["--num-examples", str(cfg.get("num_examples"))]
        if cfg.get("rgb"):
            words.append("--rgb")
    return " ".join(shlex.quote(w) for w in words)


def read_manifest(path: str, filesystem: Optional[pafs.FileSystem] = None) -> Manifest:
    """Read `DIR/dataset.json`; a missing or unreadable manifest is a DatasetError naming the prepare command."""
    fs, root = resolve(path, filesystem)
    mpath = join(root, MANIFEST_NAME)
    info = fs.get_file_info(mpath)
    if info.type != pafs.FileType.File:
        where = "does not exist" if fs.get_file_info(root).type == pafs.FileType.NotFound else "has no dataset.json"
        raise DatasetError(
            f"{path} {where}: it is not a prepared vaepipe dataset (or its preparation did not finish, since "
            f"dataset.json is written last). Prepare it with `{prepare_command(None, path)}`, "
            f"e.g. `vaepipe data prepare digits --out {path} --image-size 16`."
        )
    with fs.open_input_stream(mpath) as f:
        raw = f.read()
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{mpath} is not valid JSON ({e}); prepare the dataset again with --overwrite") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise DatasetError(
            f"{mpath} has format {found!r}, but this vaepipe reads {FORMAT!r}; prepare the dataset again with "
            f"this version (vaepipe data prepare ... --overwrite)"
        )
    try:
        manifest = Manifest.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(
            f"{mpath} is missing or has a malformed field ({e!r}); prepare the dataset again with --overwrite"
        ) from None
    if len(manifest.shape) != 3 or min(manifest.shape) < 1:
        raise DatasetError(
            f"{mpath}: shape {list(manifest.shape)} is not [C, H, W]; prepare the dataset again with --overwrite"
        )
    return manifest


class Verified(NamedTuple):
    shards: int
    bytes: int
    seconds: float


def check_split(manifest: Manifest, split: str, path: str) -> None:
    if split not in manifest.splits:
        raise DatasetError(f"{path} has no split {split!r}; it has {', '.join(manifest.splits)}")


def verify(
    manifest: Manifest,
    path: str,
    splits: Optional[Iterable[str]] = None,
    filesystem: Optional[pafs.FileSystem] = None,
) -> Verified:
    """Check that every shard of `splits` (all by default) exists, has the sha256 the manifest records, and has the
    schema, image byte size and row count the manifest promises. Raises DatasetError on the first mismatch."""
    fs, root = resolve(path, filesystem)
    redo = prepare_command(manifest, path) + " --overwrite"
    start = time.perf_counter()
    names = list(manifest.splits) if splits is None else list(splits)
    expected = manifest.schema
    n_shards = n_bytes = 0
    for split in names:
        check_split(manifest, split, path)
        shards = manifest.shards.get(split, ())
        if sum(s.rows for s in shards) != manifest.splits[split]:
            raise DatasetError(
                f"{join(path, MANIFEST_NAME)}: split {split!r} lists {manifest.splits[split]} examples but its shards "
                f"hold {sum(s.rows for s in shards)}; the manifest was edited. Prepare the dataset again: `{redo}`"
            )
        for shard in shards:
            full = join(root, shard.path)
            if fs.get_file_info(full).type != pafs.FileType.File:
                raise DatasetError(
                    f"shard {shard.path} listed in {join(path, MANIFEST_NAME)} is missing from {path}: the dataset is "
                    f"incomplete (a copy or sync was cut short?). Copy the whole directory again, or prepare it "
                    f"again: `{redo}`"
                )
            with fs.open_input_file(full) as f:
                buf = f.read_buffer()
            digest = hashlib.sha256(buf).hexdigest()
            if digest != shard.sha256:
                raise DatasetError(
                    f"shard {shard.path} in {path} does not match its checksum in dataset.json (sha256 "
                    f"{digest[:16]}..., expected {shard.sha256[:16]}...): the file changed after preparation "
                    f"(edited, truncated or corrupted). Prepare the dataset again: `{redo}`"
                )
            _check_schema(pq.ParquetFile(pa.BufferReader(buf)), shard, manifest, expected, path, redo)
            n_shards += 1
            n_bytes += buf.size
    return Verified(n_shards, n_bytes, time.perf_counter() - start)


def _check_schema(
    pf: pq.ParquetFile, shard: Shard, manifest: Manifest, expected: pa.Schema, path: str, redo: str
) -> None:
    got = pf.schema_arrow
    image = got.field("image").type if "image" in got.names else None
    if isinstance(image, pa.FixedSizeBinaryType) and image.byte_width != manifest.image_bytes:
        c, h, w = manifest.shape
        raise DatasetError(
            f"shard {shard.path} in {path} holds images of {image.byte_width} bytes, but dataset.json says shape "
            f"[{c}, {h}, {w}] = {manifest.image_bytes} bytes: the manifest and the shards come from different "
            f"preparations. Prepare the dataset again: `{redo}`"
        )
    if not got.remove_metadata().equals(expected):
        raise DatasetError(
            f"shard {shard.path} in {path} has schema ({_schema_line(got)}) but dataset.json expects "
            f"({_schema_line(expected)}): the manifest and the shards come from different preparations. "
            f"Prepare the dataset again: `{redo}`"
        )
    if pf.metadata.num_rows != shard.rows:
        raise DatasetError(
            f"shard {shard.path} in {path} has {pf.metadata.num_rows} rows but dataset.json lists {shard.rows}. "
            f"Prepare the dataset again: `{redo}`"
        )


def _schema_line(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)
