"""The model-registry workflow: promote a version to `champion`, sample any registered model, evaluate one on data.

    vaepipe promote demo-nvae --from-alias candidate            # checks val/bpd against the current champion
    vaepipe sample models:/demo-ncp@candidate --n 64 --out grid.png --method sir
    vaepipe evaluate models:/demo-nvae@champion --data runs/data/digits16 --k 1000

Models load with plain `mlflow.pytorch.load_model`; every command takes `--config` (for its tracking section) or
`--tracking-uri`.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from vae.config import ConfigError

# The metric that decides a promotion, per model family (the registered name's suffix), and its direction.
PROMOTION_METRICS = {"nvae": ("val/bpd", "min"), "ncp": ("eval/fid_sir", "min"), "gwae": ("best/objective", "max")}


def _tracker(args: argparse.Namespace):
    from pipelines.config import TrackingConfig, load_config
    from pipelines.tracking import Tracker

    if getattr(args, "tracking_uri", None):
        return Tracker.connect(TrackingConfig(tracking_uri=args.tracking_uri))
    cfg = load_config(args.config, args.overrides) if getattr(args, "config", None) else None
    return Tracker.connect(cfg.tracking if cfg else TrackingConfig())


def _version(tracker, name: str, version: str | None, alias: str | None):
    client = tracker.client
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except Exception:
        known = [m.name for m in client.search_registered_models()]
        what = f"version {version}" if version is not None else f"alias @{alias}"
        raise ConfigError(f"registered model {name!r} has no {what} in {tracker.tracking_uri}; "
                          f"registered models: {', '.join(known) or 'none'}") from None


def _metric_of(tracker, mv, metric: str) -> float | None:
    run = tracker.client.get_run(mv.run_id) if mv.run_id else None
    value = run.data.metrics.get(metric) if run else None
    return None if value is None or not math.isfinite(value) else float(value)


def promote(tracker, name: str, version: str | None = None, from_alias: str | None = None,
            metric: str | None = None, direction: str | None = None, force: bool = False) -> str:
    """Move `champion` to a version after checking its metric against the current champion's; returns the version."""
    if (version is None) == (from_alias is None):
        raise ConfigError("promote: pass exactly one of --version V or --from-alias ALIAS")
    family = name.rsplit("-", 1)[-1]
    default_metric, default_direction = PROMOTION_METRICS.get(family, ("val/loss", "min"))
    metric, direction = metric or default_metric, direction or default_direction
    mv = _version(tracker, name, version, from_alias)
    new = _metric_of(tracker, mv, metric)
    try:
        champion = tracker.client.get_model_version_by_alias(name, "champion")
    except Exception:
        champion = None
    if champion is not None and str(champion.version) == str(mv.version):
        print(f"{name} v{mv.version} is already the champion")
        return str(mv.version)
    if not force:
        if new is None:
            raise ConfigError(f"promote: {name} v{mv.version} has no metric {metric!r} on its run {mv.run_id}; "
                              f"pass --metric NAME, or --force to promote without a check")
        if champion is not None:
            old = _metric_of(tracker, champion, metric)
            worse = old is not None and (new > old if direction == "min" else new < old)
            if worse:
                raise ConfigError(
                    f"promote: {name} v{mv.version} has {metric}={new:.6g}, worse than champion v{champion.version} "
                    f"({old:.6g}, {direction} is better); not promoted. Use --force to promote anyway."
                )
    tracker.set_alias(name, "champion", mv.version)
    shown = f"{metric}={new:.6g}" if new is not None else "unchecked (--force)"
    prev = f" (was v{champion.version})" if champion is not None else ""
    print(f"{name}: champion → v{mv.version}{prev}; {shown}")
    return str(mv.version)


def load_registered(tracker, model_uri: str):
    import mlflow

    tracker.activate()
    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as e:
        known = [m.name for m in tracker.client.search_registered_models()]
        raise ConfigError(f"cannot load {model_uri!r} from {tracker.tracking_uri} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); registered models: {', '.join(known) or 'none'}") from None


def sample_images(model, n: int, method: str | None, temperature: float) -> torch.Tensor:
    """(n, C, H, W) in [0, 1] from any vaepipe model; `method` only for NCP-VAE models."""
    model.eval()
    with torch.no_grad() if method != "langevin" else torch.enable_grad():
        if type(model).__name__ == "NCPVAE":
            return model.sample(n, method=method or "sir", temperature=temperature).detach()
        if method not in (None, "base"):
            raise ConfigError(f"--method {method} needs an NCP-VAE model (models:/<name>-ncp@...); "
                              f"{type(model).__name__} samples from its own prior: drop --method")
        if type(model).__name__ == "GWAE":
            return model.sample(n).detach()
        return model.sample(n, temperature=temperature).detach()


def evaluate(tracker, model_uri: str, data: str, split: str = "test", k: int = 1000, max_examples: int = 2000,
             batch_size: int = 128, log: bool = True) -> dict[str, float]:
    """The metrics of the stages on a prepared data set, logged to the model's run as eval/* metrics."""
    from pipelines.data import load_split, read_manifest
    from vae.metrics import bits_per_dim, importance_weighted_nll

    model = load_registered(tracker, model_uri)
    model.eval()
    manifest = read_manifest(data)
    arrays = load_split(data, split)
    x = arrays["image"][:max_examples]
    kind = type(model).__name__
    metrics: dict[str, float] = {}
    dims = math.prod(manifest.shape)
    t0 = time.perf_counter()
    vae_model = getattr(model, "vae", model)
    if hasattr(vae_model, "log_weights"):
        if tuple(getattr(vae_model.cfg, "image_shape", manifest.shape)) != tuple(manifest.shape):
            raise ConfigError(f"--data: {data} has shape {list(manifest.shape)}, the model expects "
                              f"{list(vae_model.cfg.image_shape)}")
        nll = torch.cat([importance_weighted_nll(vae_model, x[i:i + batch_size], k=k)
                         for i in range(0, len(x), batch_size)])
        metrics[f"eval/iw_nll_k{k}"] = nll.mean().item()
        metrics[f"eval/bpd_k{k}"] = float(bits_per_dim(nll.mean().item(), dims))
    if kind == "GWAE" and manifest.factor_names and arrays["factors"].shape[1]:
        from vae.factor_metrics import dci, psnr

        with torch.no_grad():
            mu, _ = model.encode(x)
            metrics["eval/psnr"] = psnr(x, model.reconstruct(x)).mean().item()
        scores = dci(mu.numpy(), arrays["factors"][:max_examples].numpy())
        metrics.update({f"eval/dci_{k_}": float(v) for k_, v in scores.items()})
    if manifest.label_names and "label" in arrays:
        try:
            from vae.quality import SampleQuality
        except ImportError:
            SampleQuality = None
        if SampleQuality is not None:
            train = load_split(data, "train")
            quality = SampleQuality.fit(train["image"], train["label"])
            n = min(len(x), 1000)
            methods = ["sir", "langevin", "base"] if kind == "NCPVAE" else [None]
            for method in methods:
                fake = sample_images(model, n, method, 1.0)
                for key, value in quality.score(x[:n], fake).items():
                    metrics[f"eval/{key}" + (f"_{method}" if method else "")] = float(value)
    metrics["eval/seconds"] = time.perf_counter() - t0
    if log:
        mv_run = _run_of(tracker, model_uri)
        if mv_run:
            tracker.log_metrics(mv_run, metrics, step=0)
    return metrics


def _run_of(tracker, model_uri: str) -> str | None:
    if model_uri.startswith("runs:/"):
        return model_uri.split("/")[1]
    if model_uri.startswith("models:/"):
        ref = model_uri[len("models:/"):]
        name, _, rest = ref.partition("@") if "@" in ref else ref.partition("/")
        mv = _version(tracker, name, None if "@" in ref else rest, rest if "@" in ref else None)
        return mv.run_id
    return None


# ---------------------------------------------------------------------------------------------------------------- CLI


def _add_tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="config whose tracking section to use (default: built-in)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides --config)")


def _cmd_promote(args: argparse.Namespace) -> int:
    promote(_tracker(args), args.name, version=args.version, from_alias=args.from_alias, metric=args.metric,
            direction=args.direction, force=args.force)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from pipelines.common import png_bytes
    from vae.metrics import sample_grid

    tracker = _tracker(args)
    model = load_registered(tracker, args.model_uri)
    torch.manual_seed(args.seed)
    images = sample_images(model, args.n, args.method, args.temperature)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png_bytes(sample_grid(images, nrow=max(1, int(math.sqrt(args.n))))))
    print(f"wrote {args.n} samples of {args.model_uri} to {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate(_tracker(args), args.model_uri, args.data, split=args.split, k=args.k,
                       max_examples=args.max_examples)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.6g}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="move the champion alias to a version after checking its metric")
    p.add_argument("name", help="registered model, e.g. demo-nvae")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", default=None)
    which.add_argument("--from-alias", default=None, metavar="ALIAS", help="e.g. candidate")
    p.add_argument("--metric", default=None, help="run metric to compare (default per family: "
                   + ", ".join(f"{k}: {m} ({d})" for k, (m, d) in PROMOTION_METRICS.items()) + ")")
    p.add_argument("--direction", choices=("min", "max"), default=None)
    p.add_argument("--force", action="store_true", help="promote even if the metric is worse or missing")
    _add_tracking_args(p)
    p.set_defaults(func=_cmd_promote)

    s = sub.add_parser("sample", help="write a PNG grid of samples from a registered model")
    s.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--method", choices=("sir", "langevin", "base"), default=None, help="NCP-VAE sampling method")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    _add_tracking_args(s)
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("evaluate", help="compute a model's metrics on a data set and log them to its run")
    e.add_argument("model_uri")
    e.add_argument("--data", required=True, help="a prepared data set directory")
    e.add_argument("--split", default="test")
    e.add_argument("--k", type=int, default=1000, help="importance samples for the NLL bound")
    e.add_argument("--max-examples", type=int, default=2000)
    _add_tracking_args(e)
    e.set_defaults(func=_cmd_evaluate)
