"""Read a prepared dataset as torch batches: plain pyarrow (`ParquetImageReader`, `load_split`) or Ray Data
(`ray_dataset`, `iter_torch_batches`).

Every batch is the same dict whichever reader made it:

    {"image":   (B, C, H, W) float32 in [0, 1] (or uint8 when asked),
     "label":   (B,) int64, -1 where an example has no label,
     "factors": (B, F) float32, F = 0 for datasets without factors}

Both readers read `dataset.json` and verify the checksums and schemas of the split's shards once, when they are
built, and refuse a mismatch with a DatasetError.

    reader = ParquetImageReader("runs/data/digits16", "train", batch_size=64, shuffle=True)
    for batch in reader: ...

    ds = ray_dataset("runs/data/digits16", "train")          # on the driver; TorchTrainer(datasets={"train": ds})
    shard = ray.train.get_dataset_shard("train")             # in the worker
    for batch in iter_torch_batches(shard, batch_size=64, drop_last=True): ...

The papers' data protocols act when images are drawn, never on the stored pixels (the Parquet keeps grey levels):
`binarize="dynamic"` makes every draw x ~ Bernoulli(grey level) and `hflip=True` flips a random half of the images
left to right. `image_transform` builds that step for any stream of batches; the pyarrow readers take the same
switches. Training streams draw afresh each epoch; evaluation streams use a fixed seed, so their figures repeat.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipelines.data.columns import Arrays, decode_ray_batch, decode_table
from pipelines.data.manifest import Manifest, check_split, join, read_manifest, resolve, verify

if TYPE_CHECKING:
    import ray.data


def _scale(image: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels → `dtype` in [0, 1]."""
    if isinstance(image, torch.Tensor) and image.device.type != "cpu":
        return image.to(dtype).div_(255.0)
    # On the CPU numpy does this in one single-threaded pass, 10x faster than torch's two multi-threaded passes
    # (which stall when other processes share the cores, as Ray workers do).
    pixels = image.numpy() if isinstance(image, torch.Tensor) else image
    out = torch.from_numpy(np.multiply(pixels, np.float32(1.0 / 255.0), dtype=np.float32))
    return out if dtype == torch.float32 else out.to(dtype)


# ---------------------------------------------------------------------------------------------- data protocols

BINARIZE_MODES = ("none", "dynamic")


def protocol_generator(seed: int | Sequence[int]) -> torch.Generator:
    """A CPU generator for the protocol's random draws, seeded from one int or a tuple (e.g. seed, rank, epoch)."""
    parts = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    state = np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def binarize_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x ~ Bernoulli(p) per pixel, p = the grey level in [0, 1]; returns 0/1 in the input's dtype and device."""
    if not images.is_floating_point():
        raise ValueError(f"binarisation needs grey levels in [0, 1] (a float tensor), got {images.dtype}; "
                         f"read the images with a float image_dtype")
    u = torch.rand(images.shape, generator=generator, dtype=images.dtype)  # on the generator's (CPU) device
    return (u.to(images.device) < images).to(images.dtype)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, C, H, W) flipped left to right with probability 1/2."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, C, H, W) translated by its own (dy, dx), each uniform in [-pixels, pixels], zero-filled."""
    b, _, h, w = images.shape
    offsets = torch.randint(-pixels, pixels + 1, (2, b), generator=generator)
    padded = torch.nn.functional.pad(images, (pixels,) * 4)
    out = torch.empty_like(images)
    for dy in range(-pixels, pixels + 1):
        for dx in range(-pixels, pixels + 1):
            rows = ((offsets[0] == dy) & (offsets[1] == dx)).nonzero().squeeze(1).to(images.device)
            if len(rows):
                out[rows] = padded[rows, :, pixels - dy:pixels - dy + h, pixels - dx:pixels - dx + w]
    return out


def image_transform(
    binarize: str = "none", hflip: bool = False, seed: int | Sequence[int] = 0, shift: int = 0
) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The protocol's per-draw step for a stream of (B, C, H, W) image batches, or None when it does nothing.

    One generator, seeded by `seed`, serves the whole stream in order: the same seed over the same batches gives the
    same images. Give training a seed that changes every epoch (fresh draws) and evaluation a fixed one.
    """
    if binarize not in BINARIZE_MODES:
        raise ValueError(f"binarize={binarize!r}; choose one of {', '.join(BINARIZE_MODES)}")
    if shift < 0:
        raise ValueError(f"shift={shift} must be >= 0 (pixels of random translation)")
    if binarize == "none" and not hflip and not shift:
        return None
    generator = protocol_generator(seed)

    def transform(images: torch.Tensor) -> torch.Tensor:
        if hflip:
            images = random_hflip(images, generator)
        if shift:
            images = random_shift(images, shift, generator)
        if binarize == "dynamic":
            images = binarize_images(images, generator)
        return images

    return transform


def to_torch_batch(batch: dict[str, Any], image_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A batch dict of numpy arrays or tensors (e.g. from Ray's iter_torch_batches) → the reader's batch dict.

    Images become `image_dtype`: floating types are scaled to [0, 1], torch.uint8 keeps the raw pixels.
    """
    image = batch["image"]
    if image_dtype.is_floating_point:
        image = _scale(image, image_dtype)
    elif image_dtype == torch.uint8:
        image = torch.as_tensor(image)
    else:
        raise ValueError(f"image_dtype {image_dtype} is neither a float type nor torch.uint8")
    factors = batch.get("factors")
    if factors is None:
        factors = image.new_zeros((image.shape[0], 0), dtype=torch.float32)
    return {
        "image": image,
        "label": torch.as_tensor(batch["label"], dtype=torch.int64),
        "factors": torch.as_tensor(factors, dtype=torch.float32),
    }


def _open(path: str, split: str, filesystem: Optional[pafs.FileSystem], check: bool):
    fs, root = resolve(path, filesystem)
    manifest = read_manifest(root, fs)
    check_split(manifest, split, path)
    verified = verify(manifest, root, [split], fs) if check else None
    return fs, root, manifest, verified


def _read_shard(fs: pafs.FileSystem, full: str, manifest: Manifest) -> Arrays:
    with fs.open_input_file(full) as f:
        table = pq.ParquetFile(f).read()
    return decode_table(table, manifest.shape, manifest.num_factors)


class ParquetImageReader:
    """Torch batches from one split of a prepared dataset, with plain pyarrow (no Ray needed).

    With `shuffle`, every epoch visits the shards in a new order and mixes the rows of `shuffle_window` shards at a
    time (a full shuffle for datasets of up to that many shards, about 5,000 64x64 RGB images each). The order
    depends only on `seed` and the epoch: each pass over the reader is the next epoch, or call `set_epoch`.

    `binarize` and `hflip` apply the data protocol as batches are drawn (float images only). With `shuffle` (a
    training stream) the draws change with the epoch; without it (an evaluation stream) every pass draws the same.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        image_dtype: torch.dtype = torch.float32,
        shuffle_window: int = 2,
        verify: bool = True,
        filesystem: Optional[pafs.FileSystem] = None,
        binarize: str = "none",
        hflip: bool = False,
    ) -> None:
        if (binarize != "none" or hflip) and not image_dtype.is_floating_point:
            raise ValueError(f"binarize={binarize!r} / hflip={hflip} act on float images; use a float image_dtype")
        image_transform(binarize, hflip)  # refuses an unknown mode now, not at the first batch
        self.binarize, self.hflip = binarize, hflip
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1 shard, got {shuffle_window}")
        self._fs, self._root, self.manifest, self.verified = _open(path, split, filesystem, verify)
        self.path, self.split = path, split
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.image_dtype, self.shuffle_window = image_dtype, shuffle_window
        self.epoch = 0
        self.num_examples = self.manifest.splits[split]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng = np.random.default_rng([self.seed, epoch])
        self._transform = image_transform(self.binarize, self.hflip,
                                          (self.seed, epoch) if self.shuffle else (self.seed,))
        shards = list(self.manifest.shards[self.split])
        if self.shuffle:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        window = self.shuffle_window if self.shuffle else 1
        carry: Optional[Arrays] = None
        for start in range(0, len(shards), window):
            group = shards[start : start + window]
            parts = [_read_shard(self._fs, join(self._root, s.path), self.manifest) for s in group]
            if carry is not None:
                parts.insert(0, carry)
            # One concatenation per window: gives a writable array torch can share, and lets a shuffle gather.
            images, labels, factors = (np.concatenate([p[i] for p in parts]) for i in range(3))
            if self.shuffle:
                perm = rng.permutation(len(images))
                images, labels, factors = images[perm], labels[perm], factors[perm]
            full = len(images) - len(images) % self.batch_size
            for lo in range(0, full, self.batch_size):
                yield self._batch(images, labels, factors, lo, lo + self.batch_size)
            carry = (images[full:], labels[full:], factors[full:])
        if carry is not None and len(carry[0]) and not self.drop_last:
            yield self._batch(*carry, 0, len(carry[0]))

    def _batch(self, images: np.ndarray, labels: np.ndarray, factors: np.ndarray, lo: int, hi: int) -> dict:
        batch = to_torch_batch(
            {"image": images[lo:hi], "label": labels[lo:hi], "factors": factors[lo:hi]}, self.image_dtype
        )
        if self._transform is not None:
            batch["image"] = self._transform(batch["image"])
        return batch


def load_split(
    path: str,
    split: str,
    image_dtype: torch.dtype = torch.float32,
    verify: bool = True,
    filesystem: Optional[pafs.FileSystem] = None,
    binarize: str = "none",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A whole (small) split as one batch dict, in the order it was written. Holds everything in memory.

    `binarize="dynamic"` draws the split's binary images once with `seed` (the evaluation protocol: the same seed
    gives the same images, whatever batches they are later scored in).
    """
    if binarize != "none" and not image_dtype.is_floating_point:
        raise ValueError(f"binarize={binarize!r} acts on float images; use a float image_dtype")
    transform = image_transform(binarize, False, seed)
    fs, root, manifest, _ = _open(path, split, filesystem, verify)
    parts = [_read_shard(fs, join(root, s.path), manifest) for s in manifest.shards[split]]
    images, labels, factors = (np.concatenate([p[i] for p in parts]) for i in range(3))
    batch = to_torch_batch({"image": images, "label": labels, "factors": factors}, image_dtype)
    if transform is not None:
        batch["image"] = transform(batch["image"])
    return batch


class InMemoryShard:
    """One worker's rows of a split (rows `rank`, `rank + world`, ...), read once with pyarrow and kept as uint8
    pixels, served as float batches in [0, 1] for as many passes as wanted.

    This is the training path for datasets that fit in memory: an epoch is a gather from memory, where a Ray Data
    stream starts a new read pipeline for every pass. The shard is the same for a given (rank, world) every time,
    so a pass's order depends only on its seed (exact resume)."""

    def __init__(self, path: str, split: str, rank: int = 0, world: int = 1, *, verify: bool = False,
                 filesystem: Optional[pafs.FileSystem] = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        images = load_split(path, split, image_dtype=torch.uint8, verify=verify, filesystem=filesystem)["image"]
        self.images = images[rank::world].clone()  # a copy: the rest of the split is freed

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, *, shuffle_seed: Optional[int] = None, drop_last: bool = False,
                transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Iterator[torch.Tensor]:
        """One pass as float32 image batches. `shuffle_seed`: a full shuffle drawn from that seed (None keeps the
        stored order). `transform` (e.g. from `image_transform`) is applied to each batch."""
        n = len(self.images)
        order = None
        if shuffle_seed is not None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(shuffle_seed)))
        stop = n - n % batch_size if drop_last else n
        for lo in range(0, stop, batch_size):
            rows = self.images[order[lo:lo + batch_size]] if order is not None else self.images[lo:lo + batch_size]
            x = _scale(rows, torch.float32)
            yield transform(x) if transform is not None else x


# ---------------------------------------------------------------------------------------------------- Ray Data


def ray_dataset(
    path: str,
    split: str = "train",
    *,
    shuffle_files: bool = False,
    verify: bool = True,
    filesystem: Optional[pafs.FileSystem] = None,
    **read_kwargs: Any,
) -> "ray.data.Dataset":
    """A Ray Dataset over one split: read_parquet over its shards → uint8 (N, C, H, W) "image", int64 "label" and
    float32 (N, F) "factors" (when the dataset has factors) numpy columns.

    Call it on the driver (it verifies the shards there, once) and hand the result to a trainer; read it with
    `iter_torch_batches`. On a multi-node cluster `path` must be storage every node sees (s3://, gs://, NFS).
    `read_kwargs` go to `ray.data.read_parquet` (e.g. `override_num_blocks`, `ray_remote_args`).
    """
    import ray.data

    fs, root, manifest, _ = _open(path, split, filesystem, verify)
    files = [join(root, s.path) for s in manifest.shards[split]]
    ds = ray.data.read_parquet(files, filesystem=fs, shuffle="files" if shuffle_files else None, **read_kwargs)
    return ds.map_batches(
        decode_ray_batch,
        batch_format="pyarrow",
        batch_size=None,  # whole blocks: the decode is a view over the block's buffer, any size is cheap
        zero_copy_batch=True,
        fn_kwargs={"shape": manifest.shape, "num_factors": manifest.num_factors},
    )


def iter_torch_batches(
    data: Any,
    batch_size: int = 64,
    image_dtype: torch.dtype = torch.float32,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    **kwargs: Any,
) -> Iterator[dict[str, torch.Tensor]]:
    """The reader's batch dicts from a `ray_dataset` (or a `get_dataset_shard` iterator of one).

    `transform` (e.g. from `image_transform`) is applied to each batch's images. `kwargs` go to Ray's
    `iter_torch_batches` (drop_last, local_shuffle_buffer_size, local_shuffle_seed, prefetch_batches, device).
    """
    for batch in data.iter_torch_batches(batch_size=batch_size, **kwargs):
        out = to_torch_batch(batch, image_dtype)
        if transform is not None:
            out["image"] = transform(out["image"])
        yield out
