"""The data layer: sources, the Parquet writer, the manifest checks, both readers and the CLI, on real files.

Datasets here are small (a few hundred 16x16 images) but span several shards and row groups, so shard boundaries,
the shuffle window and multi-chunk columns are exercised as they are at full size.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from pipelines.config import DataConfig
from pipelines.data import (
    DatasetError,
    InMemoryShard,
    ParquetImageReader,
    ensure_dataset,
    iter_torch_batches,
    load_source,
    load_split,
    make_shapes,
    prepare_dataset,
    ray_dataset,
    read_manifest,
    verify,
)
from pipelines.data import prepare as prepare_mod
from pipelines.cli.data import register
from pipelines.data.shapes import FACTOR_RANGES, SHAPES
from vae.config import ConfigError

SHAPES_CFG = DataConfig(source="shapes", image_size=16, num_examples=400, rgb=True, seed=3)
ROWS_PER_SHARD = 70  # 320 training rows → 4 full shards and one of 40
ROWS_PER_GROUP = 32  # several row groups per shard: columns arrive in several chunks


@pytest.fixture(scope="module")
def shapes_ds(tmp_path_factory):
    """A prepared RGB shapes dataset (several shards per split) and the source arrays it was made from."""
    out = tmp_path_factory.mktemp("data") / "shapes16"
    image_bytes = 3 * 16 * 16
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_mod, "SHARD_BYTES", ROWS_PER_SHARD * image_bytes)
        mp.setattr(prepare_mod, "ROW_GROUP_BYTES", ROWS_PER_GROUP * image_bytes)
        manifest = prepare_dataset(SHAPES_CFG, out=str(out), progress=False)
    return out, manifest, load_source(SHAPES_CFG)


def _files(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ------------------------------------------------------------------------------------------------ round trip


def test_manifest_describes_the_shards(shapes_ds):
    out, manifest, src = shapes_ds
    assert manifest == read_manifest(str(out))
    assert manifest.shape == (3, 16, 16)
    assert manifest.splits == {"train": 320, "val": 40, "test": 40}
    assert [s.rows for s in manifest.shards["train"]] == [70, 70, 70, 70, 40]
    assert manifest.label_names == SHAPES
    assert manifest.factor_names == ("shape", "scale", "rotation", "pos_x", "pos_y", "hue")
    assert manifest.factor_ranges[1] == FACTOR_RANGES["scale"]
    assert manifest.source["config"]["num_examples"] == 400 and manifest.source["vaepipe_version"]
    for split in manifest.shards.values():
        for shard in split:
            assert hashlib.sha256((out / shard.path).read_bytes()).hexdigest() == shard.sha256
    checked = verify(manifest, str(out))
    assert checked.shards == 7 and checked.bytes == manifest.total_bytes
    assert len(manifest.sha256) == 64 and manifest.sha256 != hashlib.sha256(b"").hexdigest()


def test_pyarrow_reader_round_trip_is_exact(shapes_ds):
    out, manifest, src = shapes_ds
    for split in ("train", "val", "test"):
        want = src.splits[split]
        reader = ParquetImageReader(str(out), split, batch_size=32, image_dtype=torch.uint8)
        assert reader.verified.shards == len(manifest.shards[split])  # checked once, when built
        batches = list(reader)
        assert len(batches) == len(reader) == -(-len(want) // 32)
        images = torch.cat([b["image"] for b in batches]).numpy()
        assert images.dtype == np.uint8 and np.array_equal(images, want.images)
        assert np.array_equal(torch.cat([b["label"] for b in batches]).numpy(), want.labels)
        assert np.array_equal(torch.cat([b["factors"] for b in batches]).numpy(), want.factors)
    whole = load_split(str(out), "train")
    assert whole["image"].dtype == torch.float32 and whole["image"].shape == (320, 3, 16, 16)
    assert 0.0 <= whole["image"].min() and whole["image"].max() <= 1.0
    assert np.array_equal((whole["image"] * 255).round().to(torch.uint8).numpy(), src.splits["train"].images)


def test_pyarrow_reader_shuffles_by_seed_and_epoch(shapes_ds):
    out, _, src = shapes_ds
    want = src.splits["train"]

    def epoch(reader):
        return torch.cat([b["factors"] for b in reader]).numpy()

    a = ParquetImageReader(str(out), batch_size=50, shuffle=True, seed=1)
    first, again = epoch(a), epoch(ParquetImageReader(str(out), batch_size=50, shuffle=True, seed=1))
    assert np.array_equal(first, again)  # same seed, same epoch
    second = epoch(a)  # the next pass is the next epoch
    assert not np.array_equal(first, second)
    key = lambda f: f[np.lexsort(f.T[::-1])]  # noqa: E731  (rows sorted: the same multiset of examples)
    assert np.array_equal(key(first), key(want.factors)) and np.array_equal(key(second), key(want.factors))
    assert not np.array_equal(first, want.factors)
    # Rows move between shards, not only within one.
    first_shard = {tuple(r) for r in want.factors[:ROWS_PER_SHARD]}
    assert sum(tuple(r) in first_shard for r in first[:ROWS_PER_SHARD]) < ROWS_PER_SHARD
    dropped = ParquetImageReader(str(out), batch_size=50, shuffle=True, drop_last=True)
    sizes = [len(b["image"]) for b in dropped]
    assert sizes == [50] * 6 == [50] * len(dropped)


def test_ray_reader_round_trip_is_exact(shapes_ds, ray_local):
    out, manifest, src = shapes_ds
    want = src.splits["train"]
    ds = ray_dataset(str(out), "train")
    batches = list(iter_torch_batches(ds, batch_size=64))
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches]).numpy()
    factors = torch.cat([b["factors"] for b in batches]).numpy()
    assert images.dtype == torch.float32 and images.shape == (320, 3, 16, 16) and float(images.max()) <= 1.0
    pixels = (images * 255).round().to(torch.uint8).numpy()
    # Ray may hand blocks over out of order: match rows by their (unique) factor vectors.
    order = {f.tobytes(): i for i, f in enumerate(want.factors)}
    idx = np.array([order[f.tobytes()] for f in factors])
    assert sorted(idx) == list(range(320))
    assert np.array_equal(pixels, want.images[idx])
    assert np.array_equal(labels, want.labels[idx])


def test_ray_reader_without_factors_gives_empty_factors(tmp_path, ray_local):
    out = tmp_path / "digits8"
    prepare_dataset(DataConfig(source="digits", val_fraction=0.0, test_fraction=0.5), out=str(out), progress=False)
    want = load_split(str(out), "test", image_dtype=torch.uint8)
    batches = list(iter_torch_batches(ray_dataset(str(out), "test"), batch_size=1000, image_dtype=torch.uint8))
    got = torch.cat([b["image"] for b in batches])
    assert got.dtype == torch.uint8 and sorted(map(bytes, got.flatten(1).numpy())) == sorted(
        map(bytes, want["image"].flatten(1).numpy())
    )
    assert all(b["factors"].shape == (len(b["image"]), 0) for b in batches)
    # val_fraction=0: an empty split that still reads as empty, not as an error.
    assert read_manifest(str(out)).splits["val"] == 0
    assert list(ParquetImageReader(str(out), "val")) == [] and len(ParquetImageReader(str(out), "val")) == 0


def test_mock_object_store_round_trip(monkeypatch):
    # pyarrow's in-memory filesystem stands in for an object store: no atomic rename, dataset.json written last.
    fs = pafs._MockFileSystem()
    cfg = DataConfig(source="shapes", image_size=8, num_examples=60, seed=5)
    manifest = prepare_dataset(cfg, out="bucket/shapes8", progress=False, filesystem=fs)
    assert fs.get_file_info("bucket/shapes8/dataset.json").type == pafs.FileType.File
    reader = ParquetImageReader("bucket/shapes8", "train", batch_size=100, image_dtype=torch.uint8, filesystem=fs)
    batch = next(iter(reader))
    assert np.array_equal(batch["image"].numpy(), load_source(cfg).splits["train"].images)
    again = prepare_dataset(cfg.replace(seed=6), out="bucket/shapes8", overwrite=True, progress=False, filesystem=fs)
    assert again.sha256 != manifest.sha256 and read_manifest("bucket/shapes8", fs).sha256 == again.sha256

    # A crash half-way through an overwrite leaves a directory that readers refuse, not a stale-looking dataset.
    def crash(*args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(prepare_mod, "_write_shard", crash)
    with pytest.raises(OSError, match="connection reset"):
        prepare_dataset(cfg, out="bucket/shapes8", overwrite=True, progress=False, filesystem=fs)
    with pytest.raises(DatasetError, match="has no dataset.json"):
        ParquetImageReader("bucket/shapes8", filesystem=fs)


# --------------------------------------------------------------------------------------------------- sources


def test_digits_resize_is_smooth_and_split_by_seed(tmp_path):
    src = load_source(DataConfig(source="digits", image_size=16))
    train = src.splits["train"]
    assert train.images.shape[1:] == (1, 16, 16) and train.images.dtype == np.uint8
    assert sum(len(s) for s in src.splits.values()) == 1797
    assert (len(src.splits["val"]), len(src.splits["test"])) == (180, 180)
    # Bilinear upsampling makes intermediate grey levels; nearest-neighbour would keep the 17 original ones.
    assert len(np.unique(train.images)) > 100 and train.images.max() >= 250
    native = load_source(DataConfig(source="digits"))
    assert native.splits["train"].images.shape[1:] == (1, 8, 8)
    assert set(np.unique(native.splits["train"].images)) <= {round(v * 255 / 16) for v in range(17)}
    other = load_source(DataConfig(source="digits", seed=1))
    assert not np.array_equal(native.splits["train"].labels, other.splits["train"].labels)
    manifest = prepare_dataset(DataConfig(source="digits", image_size=32), out=str(tmp_path / "d32"), progress=False)
    assert manifest.shape == (1, 32, 32) and manifest.label_names == tuple("0123456789") and manifest.num_factors == 0


def test_shapes_are_deterministic_and_factors_drive_the_pixels():
    images, labels, factors = make_shapes(600, image_size=32, rgb=True, seed=7)
    again = make_shapes(600, image_size=32, rgb=True, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((images, labels, factors), again))
    assert not np.array_equal(images, make_shapes(600, image_size=32, rgb=True, seed=8)[0])
    assert np.array_equal(make_shapes(100, image_size=32, rgb=True, seed=7)[0], images[:100])  # prefix-stable
    assert images.shape == (600, 3, 32, 32) and factors.dtype == np.float32
    assert np.array_equal(labels, factors[:, 0].astype(np.int64)) and set(labels) == {0, 1, 2, 3}
    for j, name in enumerate(("shape", "scale", "rotation", "pos_x", "pos_y", "hue")):
        lo, hi = FACTOR_RANGES[name]
        assert lo <= factors[:, j].min() and factors[:, j].max() <= hi
        assert factors[:, j].max() - factors[:, j].min() > 0.9 * (hi - lo)  # the whole range is used
    # The factors are real: area grows with scale^2 per shape, the centroid follows pos_x, the colour follows hue.
    mass = images.astype(np.float64).max(axis=1).sum(axis=(1, 2)) / 255
    for k in range(4):
        m = labels == k
        assert np.corrcoef(mass[m], factors[m, 1] ** 2)[0, 1] > 0.97
    cover = images.max(axis=1).astype(np.float64)
    cx = (cover * np.arange(32)).sum(axis=(1, 2)) / cover.sum(axis=(1, 2))
    assert np.corrcoef(cx, factors[:, 3])[0, 1] > 0.97
    red = images[:, 0].sum(axis=(1, 2)) / images.sum(axis=(1, 2, 3))
    assert red[np.abs(factors[:, 5] - 0.0) < 0.05].mean() > 0.6 and red[np.abs(factors[:, 5] - 0.5) < 0.05].mean() < 0.1
    grey = make_shapes(10, image_size=64, rgb=False, seed=0)
    assert grey[0].shape == (10, 1, 64, 64) and grey[2].shape == (10, 5)


def test_folder_source_reads_real_pngs(tmp_path):
    root = tmp_path / "pictures"
    rng = np.random.default_rng(0)
    for cls, n in (("cats", 6), ("dogs", 4)):
        (root / cls / "nested").mkdir(parents=True)
        for i in range(n):
            size = (40, 30) if i % 2 else (24, 24)  # mixed, non-square sizes are centre-cropped
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / ("nested" if i == 0 else "") / f"{i}.png")
    Image.fromarray(np.full((20, 20), 200, dtype=np.uint8)).save(root / "loose.png")
    (root / "notes.txt").write_text("not an image")

    cfg = DataConfig(source="folder", source_path=str(root), image_size=8, val_fraction=0.0, test_fraction=0.0)
    manifest = prepare_dataset(cfg, out=str(tmp_path / "out"), progress=False)
    assert manifest.shape == (3, 8, 8) and manifest.label_names == ("cats", "dogs")
    assert manifest.splits == {"train": 11, "val": 0, "test": 0}
    data = load_split(str(tmp_path / "out"), "train", image_dtype=torch.uint8)
    assert sorted(data["label"].tolist()) == [-1] + [0] * 6 + [1] * 4
    loose = data["image"][data["label"] == -1][0]
    assert torch.all(loose == 200)  # grey image, replicated into the 3 channels

    with pytest.raises(DatasetError, match="different sizes.*--image-size"):
        load_source(cfg.replace(image_size=None))
    with pytest.raises(DatasetError, match="no images"):
        load_source(cfg.replace(source_path=str(tmp_path / "out" / "val")))
    with pytest.raises(DatasetError, match="does not exist"):
        load_source(cfg.replace(source_path=str(tmp_path / "nowhere")))


def test_torchvision_source_without_files_or_network_says_where_to_put_them(tmp_path, monkeypatch):
    # A proxy on a closed local port makes every download fail at once, whatever this machine's network.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(DatasetError) as err:
        load_source(DataConfig(source="mnist", cache_dir=str(tmp_path / "cache")))
    assert time.perf_counter() - start < 60
    msg = str(err.value)
    assert "downloading them failed" in msg and f"{tmp_path / 'cache'}/MNIST/raw/" in msg
    assert "train-images-idx3-ubyte.gz" in msg
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz .*cifar-10-batches-py"):
        load_source(DataConfig(source="cifar10", cache_dir=str(tmp_path / "cache")))


# ------------------------------------------------------------------------------------------- refusals, errors


def test_missing_manifest_names_the_prepare_command(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist.*vaepipe data prepare"):
        read_manifest(str(tmp_path / "nothing"))
    (tmp_path / "half").mkdir()
    with pytest.raises(DatasetError, match=r"has no dataset.json.*vaepipe data prepare"):
        ParquetImageReader(str(tmp_path / "half"))


@pytest.fixture
def digits_copy(tmp_path):
    out = tmp_path / "digits"
    prepare_dataset(DataConfig(source="digits", image_size=16), out=str(out), progress=False)
    return out


def test_tampered_shard_is_refused(digits_copy):
    shard = digits_copy / "train" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    expected = r"train/part-00000.parquet .*does not match its checksum.*vaepipe data prepare digits"
    with pytest.raises(DatasetError, match=expected):
        ParquetImageReader(str(digits_copy), "train")
    ParquetImageReader(str(digits_copy), "val")  # the other splits are still fine
    with pytest.raises(DatasetError, match="checksum"):
        verify(read_manifest(str(digits_copy)), str(digits_copy))


def test_missing_shard_is_refused(digits_copy):
    (digits_copy / "test" / "part-00000.parquet").unlink()
    with pytest.raises(DatasetError, match=r"shard test/part-00000.parquet .*is missing.*--overwrite"):
        ray_dataset(str(digits_copy), "test")


def test_manifest_that_disagrees_with_the_shards_is_refused(digits_copy):
    mpath = digits_copy / "dataset.json"
    original = json.loads(mpath.read_text())
    edited = dict(original, shape=[1, 8, 8])
    mpath.write_text(json.dumps(edited))
    with pytest.raises(DatasetError, match=r"images of 256 bytes, but dataset.json says shape \[1, 8, 8\] = 64 bytes"):
        load_split(str(digits_copy), "val")
    edited = dict(original, factors={"names": ["size"], "ranges": [[0, 1]]})
    mpath.write_text(json.dumps(edited))
    expected = r"has schema .*factors: null.* but dataset.json expects .*factors: fixed_size_list"
    with pytest.raises(DatasetError, match=expected):
        load_split(str(digits_copy), "val")
    with pytest.raises(DatasetError, match="has no split 'valid'; it has train, val, test"):
        ParquetImageReader(str(digits_copy), "valid")


def test_prepare_refuses_a_non_empty_target_and_keeps_the_old_data(digits_copy):
    before = _files(digits_copy)
    cfg = DataConfig(source="shapes", image_size=8, num_examples=50)
    expected = r"already holds a prepared dataset \(digits-16\); nothing was changed.*--overwrite"
    with pytest.raises(DatasetError, match=expected):
        prepare_dataset(cfg, out=str(digits_copy), progress=False)
    assert _files(digits_copy) == before
    manifest = prepare_dataset(cfg, out=str(digits_copy), overwrite=True, progress=False)
    assert read_manifest(str(digits_copy)) == manifest and manifest.name == "shapes-8"
    assert [p.name for p in digits_copy.parent.iterdir() if p.name.startswith(".")] == []  # no temporaries left

    foreign = digits_copy.parent / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(DatasetError, match="not part of a vaepipe dataset.*refusing"):
        prepare_dataset(cfg, out=str(foreign), overwrite=True, progress=False)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"


def test_a_crash_while_writing_leaves_nothing_that_looks_complete(digits_copy, monkeypatch):
    before = _files(digits_copy)
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    real = prepare_mod._write_shard
    monkeypatch.setattr(prepare_mod, "_write_shard", failing_write)
    cfg = DataConfig(source="digits", image_size=8)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(cfg, out=str(digits_copy.parent / "fresh"), progress=False)
    assert not (digits_copy.parent / "fresh").exists()
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(cfg, out=str(digits_copy), overwrite=True, progress=False)
    assert _files(digits_copy) == before  # the old dataset is untouched
    assert sorted(p.name for p in digits_copy.parent.iterdir()) == ["digits"]


def test_ensure_dataset_prepares_once_and_refuses_a_different_config(tmp_path):
    cfg = DataConfig(source="shapes", image_size=8, num_examples=40, path=str(tmp_path / "auto"))
    made = ensure_dataset(cfg, progress=False)
    stamp = (tmp_path / "auto" / "dataset.json").stat().st_mtime_ns
    assert ensure_dataset(cfg.replace(cache_dir="/elsewhere"), progress=False) == made  # reused, not remade
    assert (tmp_path / "auto" / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match=r"data.num_examples: 40 there, 80 asked.*--num-examples 80 --overwrite"):
        ensure_dataset(cfg.replace(num_examples=80), progress=False)
    assert read_manifest(cfg.path) == made


# ------------------------------------------------------------------------------------------------------- CLI


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vaepipe")
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_prepare_and_inspect(tmp_path, capsys):
    out = tmp_path / "shapes"
    argv = ["--image-size", "16", "--num-examples", "120", "--rgb", "--seed", "2"]
    assert _cli("data", "prepare", "shapes", "--out", str(out), *argv) == 0
    printed = capsys.readouterr().out
    assert "train/part-00000.parquet: 96 rows" in printed and "dataset shapes-16-rgb" in printed
    manifest = read_manifest(str(out))
    assert manifest.splits == {"train": 96, "val": 12, "test": 12} and manifest.source["config"]["seed"] == 2

    assert _cli("data", "inspect", str(out)) == 0
    printed = capsys.readouterr().out
    lo, hi = FACTOR_RANGES["scale"]
    assert "verified 3 shard(s)" in printed and f"factors shape [0, 3], scale [{lo:g}, {hi:g}]" in printed
    with Image.open(out / "examples.png") as grid:
        assert grid.mode == "RGB" and grid.width >= 256
    assert _cli("data", "inspect", str(out), "--png", str(tmp_path / "grid.png")) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0

    with pytest.raises(DatasetError, match="--overwrite"):
        _cli("data", "prepare", "digits", "--out", str(out))
    assert _cli("data", "prepare", "digits", "--out", str(out), "--overwrite") == 0
    assert read_manifest(str(out)).name == "digits-8"

    with pytest.raises(ConfigError, match="--num-examples applies to source"):
        _cli("data", "prepare", "digits", "--out", str(tmp_path / "x"), "--num-examples", "5")
    with pytest.raises(ConfigError, match="data.val_fraction"):
        _cli("data", "prepare", "digits", "--out", str(tmp_path / "x"), "--val-fraction", "0.9")
    with pytest.raises(ConfigError, match="source 'folder' needs the image folder"):
        _cli("data", "prepare", "folder", "--out", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()



# ------------------------------------------------------------------------------------ the papers' data protocols
#
# The torchvision sources run on tiny files written here in the formats torchvision reads (idx for MNIST, pickled
# batches for CIFAR-10, JPEG + partition lists for CelebA): the same code path as the real data sets, offline.


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int = 100, n_test: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(1, 256, size=(n_train, 28, 28), dtype=np.uint8),  # no 0: the border is ours
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(1, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, a in arrays.items():
        _write_idx(raw / name, a)
    return arrays


def test_mnist_is_zero_padded_to_32_with_the_official_test_set(tmp_path):
    want = _fake_mnist(tmp_path / "cache")
    cfg = DataConfig(source="mnist", cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    manifest = prepare_dataset(cfg, out=str(tmp_path / "mnist"), progress=False)
    assert manifest.shape == (1, 32, 32) and manifest.name == "mnist-32"
    assert manifest.splits == {"train": 80, "val": 20, "test": 30}
    notes = manifest.source["notes"]
    assert "zero-padded 28x28 -> 32x32" in notes and "official 100/30 train/test split" in notes
    assert "test = the official 30-image test set" in notes and "val = 20 images carved" in notes
    test = load_split(str(tmp_path / "mnist"), "test", image_dtype=torch.uint8)["image"].numpy()
    # The border is exactly zero and the digit is every original pixel, in place: a pad, not a resize.
    assert not test[:, :, :2].any() and not test[:, :, 30:].any() and not test[:, :, :, :2].any()
    assert not test[:, :, :, 30:].any()
    assert np.array_equal(test[:, 0, 2:30, 2:30], want["t10k-images-idx3-ubyte"])
    train = load_split(str(tmp_path / "mnist"), "train", image_dtype=torch.uint8)["image"].numpy()
    val = load_split(str(tmp_path / "mnist"), "val", image_dtype=torch.uint8)["image"].numpy()
    official = {a.tobytes() for a in want["train-images-idx3-ubyte"]}
    carved = [a.tobytes() for a in np.concatenate([train, val])[:, 0, 2:30, 2:30]]
    assert set(carved) == official and len(carved) == len(official)  # train + val = the official training set
    # The stored pixels are grey levels: binarisation happens when images are drawn.
    assert len(np.unique(train)) > 200
    native = load_source(cfg.replace(image_size=28))
    assert native.splits["test"].images.shape[1:] == (1, 28, 28)
    assert np.array_equal(native.splits["test"].images[:, 0], want["t10k-images-idx3-ubyte"])


def test_cifar10_keeps_the_official_50k_10k_split(tmp_path, monkeypatch):
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "cache" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        batches[name] = rng.integers(0, 256, size=(12, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": batches[name], "labels": list(rng.integers(0, 10, 12))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    # These files are ours, not the published ones: only their checksums would differ.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    cfg = DataConfig(source="cifar10", cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    src = load_source(cfg)
    assert src.shape == (3, 32, 32) and src.name == "cifar10-32"
    assert (len(src.splits["train"]), len(src.splits["val"]), len(src.splits["test"])) == (54, 6, 12)
    test = src.splits["test"].images.reshape(12, -1)
    assert np.array_equal(test, batches["test_batch"])  # the official test set, in order, untouched
    official_train = {r.tobytes() for k, b in batches.items() if k != "test_batch" for r in b}
    mine = {r.tobytes() for s in ("train", "val") for r in src.splits[s].images.reshape(len(src.splits[s]), -1)}
    assert mine == official_train
    assert "official 60/12 train/test split" in src.notes and "val = 6 images carved" in src.notes
    assert src.label_names[0] == "airplane"


def test_celeba64_takes_the_official_face_box(tmp_path, monkeypatch):
    import torchvision.datasets.celeba as tv_celeba

    base = tmp_path / "cache" / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 8)]
    for i, name in enumerate(names):
        # 178x218 (W x H): white inside the box (left 15, top 40, side 148), black elsewhere; a mid-grey bar marks
        # the box's left edge so a flipped or shifted crop shows.
        img = np.zeros((218, 178, 3), dtype=np.uint8)
        img[40:188, 15:163] = 255
        img[40:188, 15:35] = 128
        Image.fromarray(img).save(base / "img_align_celeba" / name, quality=100)
    split_of = [0, 0, 0, 1, 1, 2, 2]  # torchvision needs two or more images per split
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {s}\n" for n, s in zip(names, split_of)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} 1\n" for n in names))
    for fname, cols in (("list_bbox_celeba.txt", ["x_1", "y_1", "width", "height"]),
                        ("list_landmarks_align_celeba.txt", ["lefteye_x", "lefteye_y"]),
                        ("list_attr_celeba.txt", ["Smiling"])):
        rows = "".join(f"{n} " + " ".join("1" for _ in cols) + "\n" for n in names)
        (base / fname).write_text(f"{len(names)}\n" + " ".join(cols) + "\n" + rows)
    monkeypatch.setattr(tv_celeba, "check_integrity", lambda *a, **k: True)
    src = load_source(DataConfig(source="celeba64", cache_dir=str(tmp_path / "cache")))
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 3, "val": 2, "test": 2}
    img = src.splits["train"].images[0].astype(int)  # (3, 64, 64)
    assert img.shape == (3, 64, 64)
    # Inside the box the crop has no black rows: a centred crop (top 35) would bring 5 black rows (2 after resize).
    assert img[:, :, 10:].min() > 230 and img[:, :, :8].max() < 140 and img[:, :, :8].min() > 115
    # The grey bar is on the left (not flipped) and spans the full height (no black rows above or below it).
    assert abs(img[:, 0, :8].mean() - 128) < 12 and abs(img[:, -1, :8].mean() - 128) < 12
    assert "left 15, top 40" in src.notes


def test_binarisation_draws_bernoulli_of_the_grey_level():
    from pipelines.data.readers import binarize_images, protocol_generator

    p = torch.linspace(0, 1, 11).view(1, 1, 1, 11).expand(4000, 1, 1, 11).contiguous()
    x = binarize_images(p, protocol_generator(0))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    freq = x.mean(0).flatten()
    # Monte Carlo: 4000 draws per level, standard error <= 0.008.
    assert torch.allclose(freq, p[0].flatten(), atol=0.035)
    assert freq[0] == 0 and freq[-1] == 1
    assert torch.equal(x, binarize_images(p, protocol_generator(0)))
    assert not torch.equal(x, binarize_images(p, protocol_generator(1)))
    with pytest.raises(ValueError, match="float"):
        binarize_images((p * 255).to(torch.uint8), protocol_generator(0))


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory):
    """A prepared 'mnist' data set made from fake idx files (32x32 after the pad, grey levels stored)."""
    root = tmp_path_factory.mktemp("mnistlike")
    _fake_mnist(root / "cache", n_train=200, n_test=40, seed=3)
    cfg = DataConfig(source="mnist", cache_dir=str(root / "cache"), val_fraction=0.2)
    prepare_dataset(cfg, out=str(root / "mnist"), progress=False)
    return str(root / "mnist")


def test_training_streams_binarise_afresh_and_evaluation_streams_repeat(mnist_like):
    grey = load_split(mnist_like, "train")["image"]
    reader = ParquetImageReader(mnist_like, "train", batch_size=40, shuffle=True, seed=5, binarize="dynamic")
    first, second = list(reader), list(reader)  # two epochs
    for batch in first:
        assert set(batch["image"].unique().tolist()) <= {0.0, 1.0}
    # The epochs draw differently, each as often as the grey levels say (200 images of 1024 pixels: a mean within
    # 0.01 is many standard errors wide).
    e1 = torch.cat([b["image"] for b in first])
    e2 = torch.cat([b["image"] for b in second])
    rows = lambda e: sorted(r.tobytes() for r in e.to(torch.uint8).flatten(1).numpy())  # noqa: E731  (order-free)
    assert rows(e1) != rows(e2)  # new draws, not only a new order
    assert abs(e1.mean().item() - grey.mean().item()) < 0.01 and abs(e2.mean().item() - grey.mean().item()) < 0.01
    again = ParquetImageReader(mnist_like, "train", batch_size=40, shuffle=True, seed=5, binarize="dynamic")
    assert torch.equal(torch.cat([b["image"] for b in again]), e1)  # seeded: the first epoch repeats exactly

    val = ParquetImageReader(mnist_like, "val", batch_size=16, binarize="dynamic")
    v1, v2 = torch.cat([b["image"] for b in val]), torch.cat([b["image"] for b in val])
    assert torch.equal(v1, v2) and set(v1.unique().tolist()) == {0.0, 1.0}
    whole = load_split(mnist_like, "val", binarize="dynamic", seed=0)["image"]
    assert torch.equal(whole, load_split(mnist_like, "val", binarize="dynamic", seed=0)["image"])
    assert not torch.equal(whole, load_split(mnist_like, "val", binarize="dynamic", seed=1)["image"])
    assert torch.equal(load_split(mnist_like, "val")["image"], load_split(mnist_like, "val", binarize="none")["image"])
    with pytest.raises(ValueError, match="float image_dtype"):
        ParquetImageReader(mnist_like, "val", binarize="dynamic", image_dtype=torch.uint8)
    with pytest.raises(ValueError, match="choose one of none, dynamic"):
        ParquetImageReader(mnist_like, "val", binarize="static")


def test_flips_mirror_about_half_of_the_training_images(mnist_like):
    plain = load_split(mnist_like, "train")["image"]
    reader = ParquetImageReader(mnist_like, "train", batch_size=160, hflip=True)
    flipped = next(iter(reader))["image"]
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())  # each image is itself or its mirror image, nothing else
    assert 0.35 < mirrored.float().mean().item() < 0.65  # 160 fair coins
    assert torch.equal(next(iter(ParquetImageReader(mnist_like, "train", batch_size=160)))["image"], plain)


def test_shifts_translate_each_image_by_at_most_the_given_pixels():
    """A single bright pixel moves by its image's own (dy, dx) in [-2, 2]², every offset turns up, and a pixel
    shifted out of the frame leaves zeros (no wrap-around)."""
    from pipelines.data.readers import image_transform

    x = torch.zeros(400, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    x[:2, 0, 4, 4], x[:2, 0, 0, 0] = 0.0, 1.0  # two images with their pixel in a corner
    moved = image_transform(shift=2, seed=3)(x)
    where = [tuple(p.tolist()) for p in moved[2:, 0].flatten(1).argmax(1).unsqueeze(1)]
    offsets = {(i // 9 - 4, i % 9 - 4) for (i,) in where}
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # 25 offsets among 398 draws
    assert torch.allclose(moved[2:].flatten(1).sum(1), torch.ones(398))  # nothing lost inside the frame
    assert set(moved[:2].flatten(1).sum(1).tolist()) <= {0.0, 1.0}  # a corner pixel may leave the frame
    assert torch.equal(image_transform(shift=2, seed=3)(x), moved) and image_transform(shift=0) is None
    with pytest.raises(ValueError, match="shift=-1"):
        image_transform(shift=-1)


def test_in_memory_shards_partition_the_split_and_shuffle_by_seed(shapes_ds):
    out, _, src = shapes_ds
    want = torch.from_numpy(src.splits["train"].images).float() / 255
    shards = [InMemoryShard(str(out), "train", rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [107, 107, 106]  # rows rank, rank + 3, ...: every row once
    ordered = [torch.cat(list(s.batches(50))) for s in shards]
    for rank, rows in enumerate(ordered):
        assert rows.dtype == torch.float32 and torch.allclose(rows, want[rank::3])
    a = torch.cat(list(shards[0].batches(50, shuffle_seed=7, drop_last=True)))
    b = torch.cat(list(shards[0].batches(50, shuffle_seed=7, drop_last=True)))
    c = torch.cat(list(shards[0].batches(50, shuffle_seed=8, drop_last=True)))
    assert len(a) == 100 and torch.equal(a, b) and not torch.equal(a, c)  # the order is the seed's alone
    whole = torch.cat(list(shards[0].batches(50, shuffle_seed=7)))
    key = lambda x: x.flatten(1)[torch.argsort(x.flatten(1).sum(1))]  # noqa: E731  (the same multiset of rows)
    assert torch.equal(key(whole), key(ordered[0])) and not torch.equal(whole, ordered[0])
    with pytest.raises(ValueError, match="rank 3"):
        InMemoryShard(str(out), "train", 3, 3)


def test_the_train_stage_in_memory_stream_applies_the_protocol(mnist_like):
    """The train stage's batches from a worker's in-memory share: binarised afresh each epoch, validation binarised
    the same way every time and never flipped or shifted, whole worker batches only when training."""
    from pipelines.config import load_config
    from pipelines.train_vae import _batches

    cfg = load_config(None, [f"data.path={mnist_like}", "data.source=mnist", "data.binarize=dynamic",
                             "data.hflip=true", "data.shift=2", "nvae.preset=mnist", "nvae.decoder=bernoulli",
                             "train.batch_size=64", "train.num_workers=2"])
    train = InMemoryShard(mnist_like, "train", 1, 2)
    epoch0, epoch1 = (list(_batches(train, cfg, seed=s, train=True)) for s in (10, 11))
    assert [len(b) for b in epoch0] == [32, 32]  # 80 of the 160 rows, whole worker batches
    assert all(set(b.unique().tolist()) <= {0.0, 1.0} for b in epoch0)
    assert not torch.equal(torch.cat(epoch0), torch.cat(epoch1))
    val = InMemoryShard(mnist_like, "val", 0, 2)
    v1, v2 = (torch.cat(list(_batches(val, cfg, seed=0, train=False))) for _ in range(2))
    assert torch.equal(v1, v2) and len(v1) == 20
    assert not v1[:, :, :, :2].any() and not v1[:, :, :, 30:].any()  # unflipped, unshifted: the border stays 0
    assert any(b[:, :, :, :2].any() or b[:, :, :, 30:].any() for b in epoch0)  # training shifts digits into it


@pytest.mark.slow
def test_the_train_stage_stream_applies_the_protocol(mnist_like, ray_local):
    """The train stage's own batch stream over a Ray dataset: worker batches of the global batch, binarised afresh
    each epoch, validation binarised the same way every time and never flipped."""
    from pipelines.config import load_config
    from pipelines.train_vae import _batches

    cfg = load_config(None, [f"data.path={mnist_like}", "data.source=mnist", "data.binarize=dynamic",
                             "data.hflip=true", "data.shift=2", "nvae.preset=mnist", "nvae.decoder=bernoulli",
                             "train.batch_size=64", "train.num_workers=2", "train.shuffle_buffer=0"])
    assert cfg.train.worker_batch_size == 32
    ds = ray_dataset(mnist_like, "train")
    epoch0 = list(_batches(ds, cfg, seed=10, train=True))
    epoch1 = list(_batches(ds, cfg, seed=11, train=True))
    assert [len(b) for b in epoch0] == [32] * 5  # 160 rows in whole worker batches
    assert all(set(b.unique().tolist()) <= {0.0, 1.0} for b in epoch0)
    assert not torch.equal(torch.cat(epoch0), torch.cat(epoch1))
    val = ray_dataset(mnist_like, "val")
    v1, v2 = torch.cat(list(_batches(val, cfg, seed=0, train=False))), torch.cat(list(_batches(val, cfg, 0, False)))
    assert torch.equal(v1, v2) and len(v1) == 40
    grey = load_split(mnist_like, "val")["image"]
    # Unflipped: where the stored pixel is 0 (the padded border) the draw is 0; flipping would move the digit.
    assert not v1[:, :, :, :2].any() and not v1[:, :, :, 30:].any()
    p = grey[:, :, 2:30, 2:30]
    assert abs(v1[:, :, 2:30, 2:30].mean().item() - p.mean().item()) < 0.02


def test_a_dataset_made_by_an_older_protocol_is_refused(tmp_path):
    _fake_mnist(tmp_path / "cache")
    cfg = DataConfig(source="mnist", cache_dir=str(tmp_path / "cache"), path=str(tmp_path / "mnist"))
    made = ensure_dataset(cfg, progress=False)
    assert made.source["protocol"] == prepare_mod.PROTOCOLS["mnist"] == 2
    assert ensure_dataset(cfg, progress=False).sha256 == made.sha256  # the current protocol is reused
    # A dataset written before the pad (no protocol recorded) would train on resized digits: refused, with the fix.
    path = tmp_path / "mnist" / "dataset.json"
    doc = json.loads(path.read_text())
    del doc["source"]["protocol"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"older vaepipe \(protocol 1; now 2.*vaepipe data prepare mnist .*--overwrite"):
        ensure_dataset(cfg, progress=False)
    # Sources whose protocol never changed are not affected.
    digits = DataConfig(source="digits", path=str(tmp_path / "digits"))
    ensure_dataset(digits, progress=False)
    path = tmp_path / "digits" / "dataset.json"
    doc = json.loads(path.read_text())
    del doc["source"]["protocol"]
    path.write_text(json.dumps(doc))
    assert ensure_dataset(digits, progress=False).name == "digits-8"


@pytest.mark.demo  # 60 s, in `make test-demo`: CI's 20 minutes have no room left for it
def test_binarised_mnist_recipe_trains_and_evaluates_against_its_published_figure(
        mnist_like, ray_local, mlflow_store, tmp_path, capsys):
    """The CR-NVAE MNIST recipe shrunk to the tiny architecture, end to end: dynamic binarisation through the train
    stage (the Bernoulli decoder scores only binary data, CR's warped copies included), then `vaepipe evaluate`
    scores binarised test draws, names the split and prints the paper's figure beside the run's."""
    import mlflow

    from pipelines.cli import main
    from pipelines.config import load_config
    from pipelines.train_vae import run_train

    t = mlflow_store
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "crvae-mnist.yaml", [
        f"data.path={mnist_like}", "nvae.preset=tiny", "train.epochs=1", "train.batch_size=40", "train.num_workers=1",
        "train.use_gpu=false", "train.cpus_per_worker=1", "train.val_iw_examples=8", "train.judge_samples=0", "train.val_iw_samples=2", "train.log_every_steps=1",
        f"train.storage_path={tmp_path / 'ray'}", f"tracking.workdir={t.workdir}",
        f"tracking.tracking_uri={t.tracking_uri}", f"tracking.artifact_location={t.artifact_location}"])
    assert (cfg.data.binarize, cfg.nvae.decoder, cfg.nvae.crop, cfg.train.worker_batch_size) == (
        "dynamic", "bernoulli", 2, 40)
    result = run_train(cfg)
    client = mlflow.MlflowClient(t.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["data.binarize"] == "dynamic" and run.data.params["paper.value"] == "76.93"
    assert np.isfinite(run.data.metrics["val/iw_nll"]) and run.data.metrics["train/cr_kl"] >= 0
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 4  # 160 rows / global batch 40

    capsys.readouterr()
    assert main(["evaluate", "models:/crvae-mnist-nvae@candidate", "--data", mnist_like, "--k", "4",
                 "--max-examples", "16", "--samples", "0", "--tracking-uri", t.tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "split: test (16 of its 40 images, mnist-32); binarisation: dynamic (evaluation seed 0)" in out
    line = next(ln for ln in out.splitlines() if "published:" in ln)
    assert line.startswith("test/iw_nll_k4: ") and "published: 76.93 nats (CR-VAE" in line
    assert "not comparable" in line and "K=1000" in line  # K = 4 is not the paper's K = 1000
    logged = client.get_run(result.run_id).data.metrics
    assert logged["test/iw_nll_k4"] > 0 and not any(k.startswith("eval/iw_nll") for k in logged)
