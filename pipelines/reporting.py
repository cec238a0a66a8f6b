"""What stages show: the result a stage returns, pictures as PNG bytes, and progress lines with an ETA."""
from __future__ import annotations

import dataclasses
import io
import math
import time
from typing import Any

import numpy as np


@dataclasses.dataclass
class StageResult:
    stage: str
    run_id: str
    model_uri: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        reg = f"{self.registered_model} v{self.registered_version}" if self.registered_model else "-"
        keys = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.metrics.items()) if isinstance(v, (int, float)))
        return f"{self.stage}: run {self.run_id}  model {reg}  {keys}"


# Pictures are enlarged (nearest neighbour, whole factors) until their short side reaches this: a grid of 16x16
# digits is ~110 pixels wide, a smudge in a browser.
MIN_PICTURE_SIDE = 256
_CAPTION_HEIGHT = 14


def png_bytes(image: Any, caption: str | None = None, min_side: int = MIN_PICTURE_SIDE) -> bytes:
    """Encode a (C,H,W) or (H,W) uint8/float-in-[0,1] tensor or array as PNG bytes, enlarged by a whole factor
    (nearest neighbour: pixels stay pixels) until the short side is at least `min_side`, with an optional caption
    line above it."""
    from PIL import Image, ImageDraw

    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    picture = Image.fromarray(arr)
    factor = max(1, -(-min_side // max(1, min(picture.size))))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    if caption:
        framed = Image.new(picture.mode, (picture.width, picture.height + _CAPTION_HEIGHT), "white" if
                           picture.mode == "RGB" else 255)
        framed.paste(picture, (0, _CAPTION_HEIGHT))
        ImageDraw.Draw(framed).text((2, 1), caption, fill="black" if picture.mode == "RGB" else 0)
        picture = framed
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """One line per report: epoch, step, loss, images/s and ETA from the observed step rate."""

    def __init__(self, stage: str, total_steps: int) -> None:
        self.stage, self.total = stage, max(1, total_steps)
        self.t0: float | None = None
        self.step0 = 0

    def line(self, step: int, epoch: int, epochs: int, values: dict[str, float]) -> str:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.step0 = now, step
        rate = (step - self.step0) / (now - self.t0) if now > self.t0 and step > self.step0 else float("nan")
        eta = format_eta((self.total - step) / rate) if rate == rate and rate > 0 else "?"
        shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        return f"[{self.stage}] epoch {epoch}/{epochs}  step {step}/{self.total}  {shown}  eta {eta}"


class Ticker:
    """Progress lines `[label] done/total unit  elapsed  eta` at most every `every_s` seconds (and at the end)."""

    def __init__(self, label: str, total: int, unit: str = "", every_s: float = 10.0) -> None:
        self.label, self.total, self.unit, self.every_s = label, max(1, int(total)), unit, every_s
        self.t0 = time.perf_counter()
        self.last = -math.inf

    def __call__(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        eta = format_eta(elapsed / done * (self.total - done)) if done > 0 else "?"
        unit = f" {self.unit}" if self.unit else ""
        print(f"[{self.label}] {done}/{self.total}{unit}  {format_eta(elapsed)} elapsed  eta {eta}"
              + (f"  {extra}" if extra else ""), flush=True)
