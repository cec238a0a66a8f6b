"""The σ-VAE effect at small scale (Rybkin, Daniilidis & Levine, "Simple and Effective VAE Training with
Calibrated Decoders", ICML 2021) on the NVAE `tiny` preset and scikit-learn's digits.

    .venv/bin/python benchmarks/sigma_vae.py --steps 300

The same model, data, seed and training budget; only the Gaussian decoder N(x; μ(z), σ²I) changes:
- gaussian_optimal: σ*² = the batch MSE, recomputed every step (the paper's analytic σ);
- gaussian_learned: one shared log σ, an nn.Parameter initialised at 0;
- gaussian_fixed:  σ = 1, i.e. MSE-sum with β = 2σ² = 2 (posterior collapse expected).

Each model is then scored on the held-out digits with one calibrated metric: the negative ELBO in bits/dim under the
discretized Gaussian (8-bit bins, `vae.distributions.DiscGaussian`) with ONE σ per model fitted on the training set
(σ² = the training MSE of the decoder mean at z ~ q(z|x), the maximum-likelihood shared σ for that mean), so every
decoder is judged by the same rule whatever σ it trained with. Also printed: the model's own negative ELBO (eval
mode: the same discretized Gaussian under the model's own σ, for σ* the running estimate kept during training), the
σ the model ends with and its equivalent β = 2σ², test MSE, KL, and active units (Burda et al.'s 0.01 threshold).
Expected (the paper's claim): optimal ≈ learned ≪ fixed in bits/dim and MSE; fixed σ = 1 keeps few active units.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from vae import metrics
from vae.distributions import DiscGaussian
from vae.nvae import NVAE, NVAEConfig

DECODERS = ("gaussian_optimal", "gaussian_learned", "gaussian_fixed")
NUM_TRAIN = 1500  # of the 1797 digits; the remaining 297 are the test split


def load_digits_16() -> tuple[Tensor, Tensor]:
    """(train, test) digits as float (N, 1, 16, 16) in [0, 1]: value/16, bilinear ×2."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x[:NUM_TRAIN], x[NUM_TRAIN:]


def model_sigma(model: NVAE) -> float:
    """The σ the decoder uses without data: the running σ* (optimal), the parameter (learned) or the constant."""
    c, h, w = model.cfg.image_shape
    return model.output_distribution(torch.zeros(1, c, h, w)).sigma.item()


def train(decoder: str, x_train: Tensor, steps: int, batch: int, seed: int) -> tuple[NVAE, list[float], float]:
    """NVAE's recipe (Adamax lr 1e-2, eps 1e-3, wd 3e-4; KL warm-up over 30 % of the steps) -> model, σ at each
    quarter of training, seconds."""
    torch.manual_seed(seed)
    model = NVAE(NVAEConfig.preset("tiny", decoder=decoder))
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=3e-4)
    g = torch.Generator().manual_seed(seed)  # the same batches for every decoder
    sigmas, start = [], time.perf_counter()
    for step in range(steps):
        model.set_step(step, steps)
        out = model(x_train[torch.randint(0, len(x_train), (batch,), generator=g)])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if (step + 1) % max(steps // 4, 1) == 0:
            sigmas.append(out.stats["sigma"].item())
    return model.eval(), sigmas, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: NVAE, x_train: Tensor, x_test: Tensor, batch: int = 100) -> dict[str, float]:
    model.eval()
    dims = x_test[0].numel()
    sse = sum(((model(xb).dist.mu - xb) ** 2).double().sum().item() for xb in x_train.split(batch))
    log_sigma_fit = 0.5 * math.log(sse / x_train.numel())
    disc_nelbo, own_nelbo, kl, test_sse = 0.0, 0.0, 0.0, 0.0
    for xb in x_test.split(batch):
        out = model(xb)
        mu = out.dist.mu  # (B, C, H, W), the decoder mean before clamping, as the likelihoods use it
        disc = DiscGaussian(mu, torch.tensor(log_sigma_fit), num_bits=8)
        kl_b = out.kl_per_group.sum(1)  # (B,)
        disc_nelbo += (kl_b - disc.log_prob(xb).flatten(1).sum(1)).sum().item()
        own_nelbo += out.nelbo.sum().item()
        kl += kl_b.sum().item()
        test_sse += ((mu - xb) ** 2).sum().item()
    n = len(x_test)
    count, _ = metrics.active_units(model, x_test.split(batch))
    sigma = model_sigma(model)
    return {
        "sigma": sigma, "beta": 2 * sigma**2, "sigma_fit": math.exp(log_sigma_fit),
        "disc_bpd": metrics.bits_per_dim(disc_nelbo / n, dims), "own_nelbo": own_nelbo / n, "kl": kl / n,
        "test_mse": test_sse / x_test.numel(), "active": count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per decoder")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.steps < 4 or args.batch < 2:
        parser.error("--steps must be >= 4 and --batch >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    x_train, x_test = load_digits_16()
    rows, curves = [], []
    for decoder in DECODERS:
        model, sigmas, seconds = train(decoder, x_train, args.steps, args.batch, args.seed)
        units = sum(math.prod(s) for s in model.latent_shapes)
        rows.append({"decoder": decoder, "seconds": seconds, "units": units, **evaluate(model, x_train, x_test)})
        curves.append((decoder, sigmas))
    print(f"NVAE tiny on digits 16×16, {args.steps} steps × batch {args.batch}, seed {args.seed}; test = {len(x_test)}")
    print("| decoder | σ (model) | β = 2σ² | σ fitted on train | test bpd, disc. Gaussian (σ fit) "
          "| NELBO, own σ, disc. (nats) | KL (nats) | test MSE | active units | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['decoder']} | {r['sigma']:.4f} | {r['beta']:.4f} | {r['sigma_fit']:.4f} | {r['disc_bpd']:.3f} | "
              f"{r['own_nelbo']:.1f} | {r['kl']:.1f} | {r['test_mse']:.5f} | {r['active']}/{r['units']} | "
              f"{r['seconds']:.0f} |")
    quarters = ", ".join(f"{q}%" for q in (25, 50, 75, 100))
    print(f"\nσ of the last training batch at {quarters} of training:")
    for decoder, sigmas in curves:
        print(f"  {decoder}: " + ", ".join(f"{s:.4f}" for s in sigmas))


if __name__ == "__main__":
    main()
