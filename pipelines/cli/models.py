"""`vaepipe promote|sample|evaluate`: the model-registry commands (their work is in pipelines.registry).

    vaepipe promote demo-nvae --from-alias candidate            # checks val/bpd against the current champion
    vaepipe sample models:/demo-ncp@candidate --n 64 --out grid.png --method sir
    vaepipe evaluate models:/demo-nvae@champion --data runs/data/digits16 --k 1000

Every command takes `--config` (for its tracking section) or `--tracking-uri`.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from pipelines.cli.args import add_tracking_args, non_negative_int, positive_int, temperature
from pipelines.errors import ConfigError


def tracker_of(args: argparse.Namespace):
    """The Tracker of `--tracking-uri`, else of the `--config` tracking section, else of the built-in default."""
    from pipelines.config import TrackingConfig, load_config
    from pipelines.tracking import Tracker

    if getattr(args, "tracking_uri", None):
        return Tracker.connect(TrackingConfig(tracking_uri=args.tracking_uri))
    cfg = load_config(args.config, args.overrides) if getattr(args, "config", None) else None
    return Tracker.connect(cfg.tracking if cfg else TrackingConfig())


def promote(args: argparse.Namespace) -> int:
    from pipelines import registry

    registry.promote(tracker_of(args), args.name, version=args.version, from_alias=args.from_alias, metric=args.metric,
            direction=args.direction, force=args.force)
    return 0


def sample(args: argparse.Namespace) -> int:
    out = _writable_output(args.out)  # before minutes of loading and sampling
    import torch

    from pipelines.registry import load_registered, sample_images
    from pipelines.reporting import png_bytes
    from vae.metrics import sample_grid

    tracker = tracker_of(args)
    model = load_registered(tracker, args.model_uri)
    torch.manual_seed(args.seed)
    images = sample_images(model, args.n, args.method, args.temperature, args.bn_batches)
    try:
        out.write_bytes(png_bytes(sample_grid(images, nrow=max(1, int(math.sqrt(args.n))))))
    except OSError as e:
        raise ConfigError(f"--out: cannot write {out} ({e.strerror or e}); pick a writable path") from None
    print(f"wrote {args.n} samples of {args.model_uri} to {out}")
    return 0


def _writable_output(path: str) -> Path:
    out = Path(path).expanduser()
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a directory; name the PNG file, e.g. --out {out / 'samples.png'}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"--out: directory {folder} does not exist; create it (mkdir -p {folder}) or pick "
                          f"another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"--out: {out} cannot be written (no write permission on {folder if not out.exists() else out});"
                          f" pick a writable path")
    return out


def evaluate(args: argparse.Namespace) -> int:
    from pipelines.data import read_manifest
    from pipelines.registry import EVAL_SEED, evaluate, published_comparison, run_params

    tracker = tracker_of(args)
    params = run_params(tracker, args.model_uri)
    manifest = read_manifest(args.data)
    metrics = evaluate(tracker, args.model_uri, args.data, split=args.split, k=args.k,
                       max_examples=args.max_examples, params=params, ncp_k=args.ncp_k,
                       ncp_z_samples=args.ncp_z_samples, inception_weights=args.inception_weights,
                       samples=args.samples)
    total = manifest.splits.get(args.split, 0)
    binarize = params.get("data.binarize") or "by the decoder"
    print(f"split: {args.split} ({min(args.max_examples, total)} of its {total} images, {manifest.name}); "
          f"binarisation: {binarize} (evaluation seed {EVAL_SEED})")
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.6g}")
    line = published_comparison(params, metrics, args.split, args.k)
    if line:
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="move the champion alias to a version after checking its metric")
    p.add_argument("name", help="registered model, e.g. demo-nvae")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", default=None)
    which.add_argument("--from-alias", default=None, metavar="ALIAS", help="e.g. candidate")
    p.add_argument("--metric", default=None, help="run metric to compare (default per family: nvae: val/bpd "
                   "(min), ncp: val/fd_vaepipe_sir (min), gwae: best/objective (max))")
    p.add_argument("--direction", choices=("min", "max"), default=None)
    p.add_argument("--force", action="store_true", help="promote even if the metric is worse or missing")
    add_tracking_args(p)
    p.set_defaults(func=promote)

    s = sub.add_parser("sample", help="write a PNG grid of samples from a registered model")
    s.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    s.add_argument("--n", type=positive_int, default=64, help="how many samples (default 64)")
    s.add_argument("--out", default="samples.png", help="PNG file to write, in an existing directory")
    s.add_argument("--method", choices=("sir", "langevin", "base"), default=None, help="NCP-VAE sampling method")
    s.add_argument("--temperature", type=temperature, default=1.0, help="prior temperature, > 0 (default 1.0)")
    s.add_argument("--bn-batches", type=non_negative_int, default=20, metavar="N",
                   help="NVAE: re-estimate BN statistics at the temperature from N batches of 100 prior samples "
                        "first, as the train stage's pictures are drawn (default 20; 0: the trained statistics)")
    s.add_argument("--seed", type=int, default=0)
    add_tracking_args(s)
    s.set_defaults(func=sample)

    e = sub.add_parser("evaluate", help="compute a model's metrics on a data set and log them to its run")
    e.add_argument("model_uri")
    e.add_argument("--data", required=True, help="a prepared data set directory")
    e.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="the split to score; the metrics are named after it (test/..., val/...)")
    e.add_argument("--k", type=positive_int, default=1000, help="importance samples for the NLL bound")
    e.add_argument("--max-examples", type=positive_int, default=2000)
    e.add_argument("--ncp-k", type=positive_int, default=20, metavar="K",
                   help="NCP models: importance samples for the NCP prior's own NLL (each needs nested draws for "
                        "the normalisers, so it costs far more per sample than the base bound)")
    e.add_argument("--ncp-z-samples", type=positive_int, default=None, metavar="M",
                   help="NCP models: prior draws per context for each normaliser Z_k (default: the model's "
                        "ncp.log_z_samples); the figure's Monte Carlo error is logged beside it")
    e.add_argument("--samples", type=non_negative_int, default=1000,
                   help="images sampled (per method) for the sample-quality scores; 0 skips them")
    e.add_argument("--inception-weights", default=None, metavar="PATH_OR_URI",
                   help="torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth) as a "
                        "local file or an MLflow artifact URI: adds Inception FID and KID (never downloaded)")
    add_tracking_args(e)
    e.set_defaults(func=evaluate)
