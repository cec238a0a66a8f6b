"""A PNG grid of a prepared dataset's first examples (`vaepipe data inspect`)."""
from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.utils import make_grid

from pipelines.data.manifest import resolve
from pipelines.data.readers import ParquetImageReader
from pipelines.errors import DatasetError

GRID_EXAMPLES = 64


def write_grid(path: str, out: str, n: int = GRID_EXAMPLES, split: str = "train") -> int:
    """Draw the first `n` examples of `split` as a PNG grid at `out` (any pyarrow path); returns how many."""
    # The checksums were just verified by the caller; reading the first batch is all that is needed here.
    reader = ParquetImageReader(path, split, batch_size=n, image_dtype=torch.uint8, verify=False)
    batch = next(iter(reader), None)
    if batch is None:
        raise DatasetError(f"{path} has no {split} examples to draw")
    images = batch["image"]
    nrow = max(1, int(len(images) ** 0.5 + 0.5))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=128)  # (3, H', W') uint8; grey gets 3 channels
    side = grid.shape[-1]
    scale = max(1, 512 // side)  # small images (8x8 digits) are enlarged so the grid is readable
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    fs, target = resolve(out)
    with fs.open_output_stream(target) as f:
        f.write(buf.getvalue())
    return len(images)

