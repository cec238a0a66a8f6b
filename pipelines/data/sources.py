"""Data sources: each turns a `DataConfig` into uint8 CHW images, labels and factors, split into train/val/test.

    digits    scikit-learn's bundled 8x8 handwritten digits (offline), grey levels 0..16 scaled to 0..255
    shapes    procedural sprites with ground-truth factors (offline, any size and count; see shapes.py)
    regions   four quadrants of independent brightness: ground-truth factors for disentanglement (offline; regions.py)
    mnist     torchvision MNIST, 28x28 zero-padded to 32x32 (NVAE's protocol; grey levels kept, binarised when
              drawn); official 10k test set, val carved from the 60k training set
    cifar10   torchvision CIFAR-10, official 50k/10k split: the official 10k test set, val carved from the 50k
    celeba64  torchvision CelebA (aligned faces): the 148x148 face box at left 15, top 40 of the 178x218 images,
              resized to image_size (64); official train/valid/test splits
    folder    any folder of images (recursive), centre-cropped square and resized; labels from sub-folder names

The torchvision sources look for their files in `cache_dir` first and only then try to download them (with a
socket timeout, so a firewalled machine fails instead of hanging); when both fail the error says exactly which
files to put where. torchvision is imported only when one of them is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np

from pipelines.data import regions as regions_mod
from pipelines.data import shapes as shapes_mod
from pipelines.data.manifest import DatasetError

if TYPE_CHECKING:
    from pipelines.config import DataConfig

Log = Optional[Callable[[str], None]]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Seconds a stalled download may block before the source gives up with the "put the files here" error.
DOWNLOAD_TIMEOUT_S = 60.0
# MNIST's 28x28 digits are zero-padded by 2 pixels to 32x32 (NVAE, CR-NVAE), never resized.
MNIST_PADDED = 32
# CelebA-64's face box in the 178x218 aligned images (left, top, side): 148x148 starting 15 px from the left and
# 40 px from the top, the crop NVAE and the VAE-GAN line of work use, then resized to 64x64.
CELEBA_BOX = (15, 40, 148)


@dataclasses.dataclass
class Split:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: Optional[np.ndarray] = None  # (N,) int64; -1 marks an example without a label
    factors: Optional[np.ndarray] = None  # (N, F) float32

    def __len__(self) -> int:
        return len(self.images)


@dataclasses.dataclass
class SourceData:
    name: str
    splits: dict[str, Split]
    label_names: tuple[str, ...] = ()
    factor_names: tuple[str, ...] = ()
    factor_ranges: tuple[tuple[float, float], ...] = ()
    notes: str = ""  # how the images were made, one line, recorded in dataset.json

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"].images.shape[1:])  # type: ignore[return-value]


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) example counts for fractions of n; refuses a split that leaves no training data."""
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise DatasetError(
            f"{n} examples leave no training data with val_fraction={val_fraction} and test_fraction={test_fraction}; "
            f"lower the fractions or use more examples"
        )
    return n - n_val - n_test, n_val, n_test


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded random partition of range(n) into train/val/test by fractions of n."""
    n_train, n_val, _ = split_sizes(n, val_fraction, test_fraction)
    perm = np.random.default_rng(seed).permutation(n)
    return {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased resize of uint8 (N, C, H, W) to (N, C, size, size); strokes stay smooth both ways."""
    if images.shape[-2:] == (size, size):
        return images
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), images.shape[1], size, size), dtype=np.uint8)
    step = 4096  # bounds the float32 copy
    for i in range(0, len(images), step):
        x = torch.from_numpy(images[i : i + step]).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + step] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def zero_pad(images: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) uint8 centred on a black (zero) size x size canvas: MNIST's 28 -> 32 adds 2 pixels on each side,
    leaving every digit pixel as it was (a resize would blur the strokes and change the likelihood)."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if size < h or size < w:
        raise DatasetError(f"cannot zero-pad {h}x{w} images to {size}x{size}: the target is smaller")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, c, size, size), dtype=images.dtype)
    out[:, :, top : top + h, left : left + w] = images
    return out


def _take(images: np.ndarray, labels: Optional[np.ndarray], idx: np.ndarray) -> Split:
    return Split(images[idx], None if labels is None else labels[idx])


# ---------------------------------------------------------------------------------------------------- offline


def _digits(cfg: DataConfig, log: Log) -> SourceData:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    size = cfg.image_size or 8
    images = resize(images, size)
    labels = d.target.astype(np.int64)
    idx = split_indices(len(images), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return SourceData(
        name=f"digits-{size}",
        splits={k: _take(images, labels, v) for k, v in idx.items()},
        label_names=tuple(str(i) for i in range(10)),
        notes="sklearn load_digits, levels 0..16 scaled to 0..255"
        + (f", bilinear antialiased resize 8 -> {size}" if size != 8 else ""),
    )


def _shapes(cfg: DataConfig, log: Log) -> SourceData:
    size, n = cfg.image_size or 64, cfg.num_examples
    n_train, n_val, _ = split_sizes(n, cfg.val_fraction, cfg.test_fraction)
    images, labels, factors = shapes_mod.make_shapes(n, size, cfg.rgb, cfg.seed)
    # Rows are i.i.d. draws, so contiguous slices are random splits (and views: no copy of the pixels).
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    names = shapes_mod.factor_names(cfg.rgb)
    return SourceData(
        name=f"shapes-{size}" + ("-rgb" if cfg.rgb else ""),
        splits={k: Split(images[a:b], labels[a:b], factors[a:b]) for k, (a, b) in bounds.items()},
        label_names=shapes_mod.SHAPES,
        factor_names=names,
        factor_ranges=tuple(shapes_mod.FACTOR_RANGES[k] for k in names),
        notes=f"procedural sprites, {n} examples, seed {cfg.seed}, factors drawn independently and uniformly",
    )


def _regions(cfg: DataConfig, log: Log) -> SourceData:
    size, n = cfg.image_size or 16, cfg.num_examples
    n_train, n_val, _ = split_sizes(n, cfg.val_fraction, cfg.test_fraction)
    images, labels, factors = regions_mod.make_regions(n, size, cfg.rgb, cfg.seed)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    return SourceData(
        name=f"regions-{size}" + ("-rgb" if cfg.rgb else ""),
        splits={k: Split(images[a:b], labels[a:b], factors[a:b]) for k, (a, b) in bounds.items()},
        label_names=regions_mod.LABELS,
        factor_names=regions_mod.factor_names(),
        factor_ranges=tuple(regions_mod.FACTOR_RANGES[k] for k in regions_mod.factor_names()),
        notes=f"four quadrants of independent uniform brightness, {n} examples, seed {cfg.seed}",
    )


# ----------------------------------------------------------------------------------------------- torchvision

_WHERE = {
    "mnist": "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz (from https://ossci-datasets.s3.amazonaws.com/mnist/) in {root}/MNIST/raw/",
    "cifar10": "put cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) in "
    "{root}/, or its extracted folder as {root}/cifar-10-batches-py/",
    "celeba64": "download the aligned-and-cropped CelebA images from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
    "and extract img_align_celeba.zip to {root}/celeba/img_align_celeba/, and put list_eval_partition.txt, "
    "list_attr_celeba.txt, identity_CelebA.txt, list_bbox_celeba.txt and list_landmarks_align_celeba.txt in "
    "{root}/celeba/",
}


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's urlopen calls have no timeout of their own; a default one turns a stalled network into an error.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _open_torchvision(source: str, make: Callable[[bool], object], root: str, log: Log):
    """Build a torchvision dataset from files in `root`, downloading them only when they are not there yet."""
    try:
        return make(False)
    except RuntimeError:
        pass  # not there yet: try the download
    if log:
        log(f"{source}: files not found in {root}; downloading them there")
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return make(True)
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError, or ImportError (gdown)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(
            f"{source}: the files are not in {root} and downloading them failed ({type(e).__name__}: {reason}). "
            f"On a machine without internet access, {_WHERE[source].format(root=root)}; then run the same "
            f"command again (or point --cache-dir at the folder that holds them)."
        ) from None


def _tv_datasets():
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DatasetError(f"the torchvision sources need torchvision ({e}); pip install torchvision") from None
    return tvd


def _mnist_like(cfg: DataConfig, log: Log, source: str) -> SourceData:
    tvd = _tv_datasets()
    root = os.path.expanduser(cfg.cache_dir)
    cls = tvd.MNIST if source == "mnist" else tvd.CIFAR10
    train = _open_torchvision(source, lambda dl: cls(root=root, train=True, download=dl), root, log)
    test = _open_torchvision(source, lambda dl: cls(root=root, train=False, download=dl), root, log)

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # MNIST (N, H, W); CIFAR (N, H, W, C)
        return np.ascontiguousarray(x, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)

    (x_tr, y_tr), (x_te, y_te) = arrays(train), arrays(test)
    return _official_split(source, cls.__name__, root, x_tr, y_tr, x_te, y_te, train.classes, cfg)


def _official_split(source: str, what: str, root: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray,
                    y_te: np.ndarray, classes, cfg: DataConfig) -> SourceData:
    """MNIST / CIFAR-10 arrays (N, C, H, W) as the papers use them: the official test set as the test split, val
    carved from the official training set, MNIST zero-padded to 32 (other sizes resized)."""
    native = x_tr.shape[-1]
    size = cfg.image_size or (MNIST_PADDED if source == "mnist" else native)
    if source == "mnist" and size > native:
        x_tr, x_te = zero_pad(x_tr, size), zero_pad(x_te, size)
        how = f"zero-padded {native}x{native} -> {size}x{size} (the digits' pixels unchanged)"
    else:
        x_tr, x_te = resize(x_tr, size), resize(x_te, size)
        how = f"bilinear antialiased resize {native} -> {size}" if size != native else ""
    # The official test set stays the test split (comparable numbers); val is carved from the training set.
    idx = split_indices(len(x_tr), cfg.val_fraction, 0.0, cfg.seed)
    n_train, n_val = len(idx["train"]), len(idx["val"])
    names = tuple(c.split(" - ")[0] for c in classes)  # MNIST's classes read "0 - zero"
    return SourceData(
        name=f"{source}-{size}",
        splits={
            "train": _take(x_tr, y_tr, idx["train"]),
            "val": _take(x_tr, y_tr, idx["val"]),
            "test": Split(x_te, y_te),
        },
        label_names=names,
        notes=f"torchvision {what} from {root}; official {len(x_tr)}/{len(x_te)} train/test split: test = the "
        f"official {len(x_te)}-image test set; val = {n_val} images carved (seed {cfg.seed}) from the official "
        f"training set, which leaves {n_train} for training"
        + (f"; {how}" if how else "")
        + ("; stored as grey levels (binarise when drawn: data.binarize=dynamic)" if source == "mnist" else ""),
    )


def crop_box(width: int, height: int, crop: Optional[int | tuple[int, int, int]]) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) square a crop takes: None = the largest centred square, an int = a centred
    square of that side, (left, top, side) = that square exactly."""
    if isinstance(crop, tuple):
        left, top, side = crop
        if left + side > width or top + side > height:
            raise DatasetError(f"the crop (left {left}, top {top}, side {side}) falls outside a {width}x{height} image")
        return left, top, left + side, top + side
    side = crop or min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _load_images(
    paths: list[Path], mode: str, size: int, crop: Optional[int | tuple[int, int, int]], log: Log, what: str
) -> np.ndarray:
    """Decode, crop (see `crop_box`) and resize image files; (N, C, size, size) uint8.

    Threads overlap the decoding: PIL releases the GIL while it decodes and resizes.
    """
    from PIL import Image

    def one(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert(mode)
            box = crop_box(im.width, im.height, crop)
            side = box[2] - box[0]
            im = im.crop(box)
            if side != size:
                im = im.resize((size, size), Image.Resampling.BILINEAR)  # PIL widens the filter when shrinking
            a = np.asarray(im)
        return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]

    images = np.empty((len(paths), 3 if mode == "RGB" else 1, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, image in enumerate(pool.map(one, paths)):
            images[i] = image
            if log and (i + 1) % 20000 == 0:
                log(f"{what}: {i + 1}/{len(paths)} images")
    return images


def _celeba(cfg: DataConfig, log: Log) -> SourceData:
    tvd = _tv_datasets()
    root = os.path.expanduser(cfg.cache_dir)
    size = cfg.image_size or 64
    crop = CELEBA_BOX
    folder = Path(root) / "celeba" / "img_align_celeba"
    splits = {}
    for name, tv_split in (("train", "train"), ("val", "valid"), ("test", "test")):
        ds = _open_torchvision(
            "celeba64", lambda dl, s=tv_split: tvd.CelebA(root=root, split=s, target_type=[], download=dl), root, log
        )
        images = _load_images([folder / f for f in ds.filename], "RGB", size, crop, log, f"celeba64 {name}")
        splits[name] = Split(images)
    return SourceData(
        name=f"celeba-{size}",
        splits=splits,
        notes=f"torchvision CelebA from {root}; official train/valid/test splits; the {crop[2]}x{crop[2]} face box at "
        f"left {crop[0]}, top {crop[1]} of the 178x218 aligned images, bilinear antialiased resize to {size}",
    )


# ---------------------------------------------------------------------------------------------------- folder


def _folder(cfg: DataConfig, log: Log) -> SourceData:
    from PIL import Image

    if not cfg.source_path:
        raise DatasetError("source 'folder' needs the image folder: pass --source-path /path/to/images")
    root = Path(os.path.expanduser(cfg.source_path))
    if not root.is_dir():
        raise DatasetError(
            f"image folder {str(root)!r} does not exist or is not a folder; point --source-path at a folder of images"
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not cfg.follow_symlinks:
        _refuse_links_out_of(root, files)
    if not files:
        raise DatasetError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}; point --source-path at a folder of images "
            f"(sub-folders become labels)"
        )
    # The label is the first sub-folder under root; images directly in root have none (-1).
    parts = [p.relative_to(root).parts for p in files]
    classes = sorted({q[0] for q in parts if len(q) > 1})
    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_index[q[0]] if len(q) > 1 else -1 for q in parts], dtype=np.int64)

    sizes, colour = set(), cfg.rgb
    for p in files:
        try:
            with Image.open(p) as im:  # reads the header only
                sizes.add(im.size)
                colour = colour or im.mode not in ("1", "L", "LA", "I", "I;16", "F")
        except Image.DecompressionBombError as e:
            _refuse_huge(p, None, str(e))
        except OSError as e:
            raise DatasetError(f"{p} is not a readable image ({e}); remove or convert it, then prepare again") from None
        _refuse_huge(p, im.size)
    size = cfg.image_size
    if size is None:
        squares = {min(s) for s in sizes}
        if len(squares) != 1:
            examples = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
            raise DatasetError(
                f"the images under {root} have different sizes ({examples}, ...); choose the output size with "
                f"--image-size N"
            )
        size = squares.pop()
    mode = "RGB" if colour else "L"
    images = _load_images(files, mode, size, None, log, "folder")
    idx = split_indices(len(files), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    has_labels = bool(classes)
    return SourceData(
        name=f"folder-{root.name}-{size}",
        splits={k: _take(images, labels if has_labels else None, v) for k, v in idx.items()},
        label_names=tuple(classes),
        notes=f"{len(files)} images under {root}, {mode}, centre square crop, bilinear resize to {size}"
        + ("; labels from sub-folder names" if has_labels else "; no labels (no sub-folders)"),
    )


# A larger image is refused before it is decoded: 100 Mpixels decode to 300 MB (RGB) per image and thread.
MAX_FOLDER_IMAGE_PIXELS = 100_000_000


def _refuse_huge(path: Path, size: Optional[tuple[int, int]], pil_error: str = "") -> None:
    if size is not None and size[0] * size[1] <= MAX_FOLDER_IMAGE_PIXELS:
        return
    if size is not None:
        shown = f"{size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.0f} Mpixels)"
    else:  # PIL refused to open it: "Image size (196000000 pixels) exceeds limit ..."
        pixels = "".join(c for c in pil_error.split("pixels")[0] if c.isdigit())
        shown = f"{int(pixels) / 1e6:.0f} Mpixels" if pixels else "over PIL's size limit"
    raise DatasetError(
        f"{path} is {shown}, above the {MAX_FOLDER_IMAGE_PIXELS // 1_000_000} Mpixel limit for one image (a huge "
        f"scan, or a file made to exhaust memory); downscale it first (e.g. `convert {path} -resize 4096x4096 "
        f"{path}`) or remove it from the folder"
    )


def _refuse_links_out_of(root: Path, files: list[Path]) -> None:
    """Refuse images that are, or sit under, symlinks leading outside `root`: a link in a shared folder could
    make the dataset (and everyone who reads it) carry any file this user can read."""
    top = root.resolve()
    outside = [p for p in files if not p.resolve().is_relative_to(top)]
    if outside:
        shown = ", ".join(f"{p} -> {p.resolve()}" for p in outside[:3])
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise DatasetError(
            f"{len(outside)} image(s) under {root} are symlinks to files outside it ({shown}{more}); copy them into "
            f"the folder, remove the links, or pass --follow-symlinks (--set data.follow_symlinks=true) to read them"
        )


_SOURCES: dict[str, Callable[..., SourceData]] = {
    "digits": _digits,
    "shapes": _shapes,
    "regions": _regions,
    "mnist": lambda cfg, log: _mnist_like(cfg, log, "mnist"),
    "cifar10": lambda cfg, log: _mnist_like(cfg, log, "cifar10"),
    "celeba64": _celeba,
    "folder": _folder,
}
SOURCES = tuple(_SOURCES)


def load_source(cfg: DataConfig, log: Log = None) -> SourceData:
    """Make the images `cfg` describes; `log` receives progress lines."""
    if cfg.source not in _SOURCES:
        raise DatasetError(f"unknown source {cfg.source!r}; choose one of {', '.join(_SOURCES)}")
    return _SOURCES[cfg.source](cfg, log)
