"""Test bits/dim of every NVAE decoder on scikit-learn's digits, by the importance-weighted bound at large K, and how
much an image's score depends on the batch it is scored in.

    .venv/bin/python benchmarks/decoder_bpd.py --steps 200 --k 1000 --n-test 16 --threads 1

The same model (the `tiny` preset, 8 channels to fit a CPU), data, seed and training budget for each decoder: DML,
Bernoulli, and the σ-VAE Gaussian with optimal σ*, learned σ and fixed σ = 1. The Bernoulli decoder models binary
pixels, so it trains and is scored on one draw x ~ Bernoulli(grey level) of the digits with a fixed seed; the others
see the grey levels (scored on 8-bit bins by the discrete decoders).

Printed per decoder: test IW-NLL in nats and bits/dim (K importance samples, the first n-test test digits scored as
one batch, chunk copies of it per pass), what kind of figure that is (a probability of 8-bit or binary data, or a
continuous density, which is not comparable and can go negative), the NELBO in bits/dim over the 297 test digits,
and image 0's IW-NLL scored alone against scored with the other n-test − 1 digits.

It runs against whatever `vae` package is first on the path, so the same command measures an older checkout:

    git worktree add /tmp/base f044453 && PYTHONPATH=/tmp/base .venv/bin/python benchmarks/decoder_bpd.py ...

Measured with the command above (2-core shared machine, 2026-12-01), test bits/dim by IW at K = 1000, before (f044453:
Gaussians scored as a continuous density with σ* refitted to each pass's 2000 rows, D = C·H·W) -> after:
  dml 3.491 -> 3.631 | bernoulli 0.564 -> 0.565 | gaussian_optimal −3.573 -> 4.249 | gaussian_learned −1.215 -> 5.085 |
  gaussian_fixed (σ = 1) 1.360 -> 6.803. The DML and Bernoulli likelihoods did not change; their small differences
  come from other changes to the model between the two checkouts. The image-0 columns use different noise for the
  two scorings (K = 100), so they differ by Monte Carlo error; tests/vae/test_metrics.py checks the same question
  exactly, with the same noise.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import vae
from vae import metrics
from vae.nvae import NVAE, NVAEConfig

DECODERS = ("dml", "bernoulli", "gaussian_optimal", "gaussian_learned", "gaussian_fixed")
NUM_TRAIN = 1500  # of the 1797 digits; the remaining 297 are the test split


def load_digits_16() -> Tensor:
    """(1797, 1, 16, 16) float in [0, 1]: value/16, bilinear ×2."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def scored_data(decoder: str, x: Tensor) -> Tensor:
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(0)) if decoder == "bernoulli" else x


def scored_dims(model: NVAE) -> int:
    c, h, w = model.cfg.image_shape
    return getattr(model, "scored_dims", c * (h - 2 * model.cfg.crop) * (w - 2 * model.cfg.crop))


def train(decoder: str, x_train: Tensor, steps: int, batch: int, seed: int) -> tuple[NVAE, float]:
    """NVAE's optimiser (Adamax lr 1e-2, eps 1e-3, wd 3e-4), KL warm-up over 30 % of the steps -> model, seconds."""
    torch.manual_seed(seed)
    model = NVAE(NVAEConfig.preset("tiny", decoder=decoder, num_channels_enc=8, num_channels_dec=8))
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=3e-4)
    g = torch.Generator().manual_seed(seed)  # the same batches for every decoder
    start = time.perf_counter()
    for step in range(steps):
        model.set_step(step, steps)
        out = model(x_train[torch.randint(0, len(x_train), (batch,), generator=g)])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return model.eval(), time.perf_counter() - start


@torch.no_grad()
def evaluate(model: NVAE, decoder: str, x_test: Tensor, k: int, n_test: int, chunk: int, seed: int) -> dict:
    dims_ln2 = scored_dims(model) * math.log(2.0)
    out = model(x_test[:8])
    if decoder == "bernoulli":
        kind = "binary"
    elif decoder.startswith("gaussian") and "nelbo_continuous" not in out.stats:
        kind = "continuous density"
    else:
        kind = "8-bit bins"
    torch.manual_seed(seed)
    nelbo = metrics.negative_elbo(model, x_test.split(100))
    start = time.perf_counter()
    torch.manual_seed(seed)
    iw = metrics.importance_weighted_nll(model, x_test[:n_test], k=k, chunk_size=chunk)
    seconds = time.perf_counter() - start
    k_small = min(k, 100)
    torch.manual_seed(seed)
    alone = metrics.importance_weighted_nll(model, x_test[:1], k=k_small, chunk_size=k_small)[0].item()
    torch.manual_seed(seed)
    in_batch = metrics.importance_weighted_nll(model, x_test[:n_test], k=k_small, chunk_size=k_small)[0].item()
    return {"kind": kind, "iw_nats": iw.mean().item(), "iw_bpd": iw.mean().item() / dims_ln2,
            "nelbo_bpd": nelbo / dims_ln2, "alone": alone, "in_batch": in_batch, "k_small": k_small,
            "iw_seconds": seconds}


def code_version() -> str:
    root = Path(vae.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "vae"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return f"{root} at {rev}" + (" + uncommitted vae/ changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return str(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per decoder")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=1000, help="importance samples per test image")
    parser.add_argument("--n-test", type=int, default=16, help="test digits in the IW-NLL figure (one batch)")
    parser.add_argument("--chunk", type=int, default=125, help="copies of the batch per log_weights pass")
    parser.add_argument("--decoders", default=",".join(DECODERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    decoders = [d for d in args.decoders.split(",") if d]
    unknown = [d for d in decoders if d not in DECODERS]
    if unknown or args.steps < 1 or args.k < 1 or not 2 <= args.n_test <= 297:
        parser.error(f"decoders from {', '.join(DECODERS)}; --steps, --k >= 1; 2 <= --n-test <= 297 ({unknown})")
    x = load_digits_16()
    print(f"vae from {code_version()}")
    print(f"NVAE tiny (8 channels) on digits 16×16, {args.steps} steps × batch {args.batch}, seed {args.seed}; "
          f"IW-NLL with K = {args.k} on the first {args.n_test} test digits as one batch, {args.chunk} copies per "
          f"pass; NELBO over all {len(x) - NUM_TRAIN} test digits; image 0 alone vs in the batch at K = "
          f"{min(args.k, 100)}")
    print("| decoder | figure is | test IW-NLL (nats) | test bits/dim (IW) | test NELBO bits/dim | image 0 alone "
          "| image 0 in batch | train s | IW s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for decoder in decoders:
        data = scored_data(decoder, x)
        model, seconds = train(decoder, data[:NUM_TRAIN], args.steps, args.batch, args.seed)
        r = evaluate(model, decoder, data[NUM_TRAIN:], args.k, args.n_test, args.chunk, args.seed + 1)
        print(f"| {decoder} | {r['kind']} | {r['iw_nats']:.2f} | {r['iw_bpd']:.3f} | {r['nelbo_bpd']:.3f} | "
              f"{r['alone']:.2f} | {r['in_batch']:.2f} | {seconds:.0f} | {r['iw_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
