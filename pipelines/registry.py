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
import os
import time
from pathlib import Path

import torch

from vae.config import ConfigError

# The metric that decides a promotion, per model family (the registered name's suffix), and its direction.
# The ncp stage's score is a Fréchet distance in vaepipe's own feature space on the val split (not FID).
PROMOTION_METRICS = {"nvae": ("val/bpd", "min"), "ncp": ("val/fd_vaepipe_sir", "min"),
                     "gwae": ("best/objective", "max")}


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
    from pipelines.serving import note_promotion

    note_promotion(tracker, name, mv.version, metric, direction, new,
                   str(champion.version) if champion is not None else None,
                   _metric_of(tracker, champion, metric) if champion is not None else None, force)
    shown = f"{metric}={new:.6g}" if new is not None else "unchecked (--force)"
    prev = f" (was v{champion.version})" if champion is not None else ""
    print(f"{name}: champion → v{mv.version}{prev}; {shown}")
    return str(mv.version)


def load_registered(tracker, model_uri: str):
    """The model at `model_uri`, unpickled only after its files match the sha256 recorded when it was logged
    (a ModelIntegrityError otherwise): loading runs the pickle's code as this user."""
    import mlflow

    from pipelines.tracking import ModelIntegrityError, verified_model_dir

    tracker.activate()
    try:
        local = verified_model_dir(tracker, model_uri)
        return mlflow.pytorch.load_model(local, map_location="cpu")
    except ModelIntegrityError:
        raise
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


# `vaepipe evaluate` binarises (data.binarize=dynamic) with this seed: the same model on the same data gives the
# same figure every time.
EVAL_SEED = 0
# Where each published quantity (paper.metric) is found among evaluate's metrics.
PAPER_METRIC_KEYS = {"nll_nats": "{split}/iw_nll_k{k}", "bpd": "{split}/bpd_k{k}",
                     "fid": "{split}/inception_fid"}  # NCP models: {split}/inception_fid_sir
PAPER_UNITS = {"nll_nats": "nats", "bpd": "bits/dim", "fid": ""}


def run_params(tracker, model_uri: str) -> dict[str, str]:
    """The params (the flattened config) of the run that logged `model_uri`; {} when it has none."""
    try:
        run_id = _run_of(tracker, model_uri)
        return dict(tracker.client.get_run(run_id).data.params) if run_id else {}
    except Exception:
        return {}


def binarize_mode(params: dict[str, str], model) -> str:
    """How the model's training run drew its images (data.binarize); models without that record binarise when
    their decoder is Bernoulli, the only decoder that needs binary data."""
    mode = params.get("data.binarize")
    if mode in ("none", "dynamic"):
        return mode
    cfg = getattr(getattr(model, "vae", model), "cfg", None)
    return "dynamic" if getattr(cfg, "decoder", None) == "bernoulli" else "none"


def published_comparison(params: dict[str, str], metrics: dict[str, float], split: str, k: int) -> str | None:
    """One line setting the run's figure beside the published one its recipe records (paper.*), or None."""
    metric, value = params.get("paper.metric"), params.get("paper.value")
    if metric in (None, "None") or value in (None, "None"):
        return None
    paper_split, paper_k = params.get("paper.split", "test"), int(params.get("paper.iw_samples", 1000))
    unit = PAPER_UNITS.get(metric, "")
    source = params.get("paper.source") or "the paper"
    published = f"{float(value):.4g} {unit}".strip()
    key = PAPER_METRIC_KEYS.get(metric, metric).format(split=split, k=k)
    if key not in metrics and f"{key}_sir" in metrics:  # an NCP model: its SIR samples
        key = f"{key}_sir"
    if key not in metrics:
        return f"published {metric}: {published} ({source}); not measured by this evaluation ({key} missing)"
    ours = f"{metrics[key]:.4g} {unit}".strip()
    caveat = ""
    uses_k = metric != "fid"
    if split != paper_split or (uses_k and k != paper_k):
        caveat = (f"  [not comparable: the paper measured the {paper_split} split"
                  + (f" with K={paper_k}" if uses_k else "") + f", this is the {split} split"
                  + (f" with K={k}" if uses_k else "") + "]")
    return f"{key}: {ours}   published: {published} ({source}){caveat}"


def evaluate(tracker, model_uri: str, data: str, split: str = "test", k: int = 1000, max_examples: int = 2000,
             batch_size: int = 128, log: bool = True, params: dict[str, str] | None = None, ncp_k: int = 20,
             ncp_z_samples: int | None = None, inception_weights: str | None = None,
             samples: int = 1000) -> dict[str, float]:
    """The metrics of the stages on a prepared data set, named after the split they come from (`test/...`,
    `val/...`) and logged to the model's run. Images are binarised with a fixed seed when the model was trained on
    binarised draws (data.binarize=dynamic).

    NCP models: the frozen NVAE's IW-NLL is `base_iw_nll_k{k}`; the NCP prior's own is `ncp_iw_nll_k{ncp_k}` with its
    Monte Carlo error (`_mc_se`, normalisers from `ncp_z_samples` prior draws per context). Sample quality: the
    Fréchet distance in vaepipe's own features (`fd_vaepipe`, extractor trained once per dataset and reused), and
    Inception FID/KID only when `inception_weights` (a path or an MLflow artifact URI) is given."""
    from pipelines.data import load_split, read_manifest
    from vae.metrics import bits_per_dim

    model = load_registered(tracker, model_uri)
    model.eval()
    manifest = read_manifest(data)
    params = run_params(tracker, model_uri) if params is None else params
    arrays = load_split(data, split, binarize=binarize_mode(params, model), seed=EVAL_SEED)
    x = arrays["image"][:max_examples]
    kind = type(model).__name__
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    vae_model = getattr(model, "vae", model)
    if hasattr(vae_model, "log_weights"):
        if tuple(getattr(vae_model.cfg, "image_shape", manifest.shape)) != tuple(manifest.shape):
            raise ConfigError(f"--data: {data} has shape {list(manifest.shape)}, the model expects "
                              f"{list(vae_model.cfg.image_shape)}")
        # An NCP model's frozen NVAE: its figure is the base model's and says so.
        base = "base_" if kind == "NCPVAE" else ""
        nll = _iw_nll(vae_model, x, k, batch_size, f"evaluate: {'base NVAE ' if base else ''}IW-NLL K={k}")
        metrics[f"eval/{base}iw_nll_k{k}"] = nll.mean().item()
        # a discrete likelihood per scored pixel: Gaussian decoders score 8-bit bins in eval mode, and the crop's
        # border is not scored (MNIST: 784 of 32×32)
        metrics[f"eval/{base}bpd_k{k}"] = float(bits_per_dim(nll.mean().item(), vae_model.scored_dims))
        if kind == "NCPVAE":
            from pipelines.train_ncp import ncp_likelihood_metrics

            metrics.update(ncp_likelihood_metrics(model, x, ncp_k, ncp_z_samples))
    if kind == "GWAE" and manifest.factor_names and arrays["factors"].shape[1]:
        from vae.factor_metrics import dci, discrete_factors, psnr

        with torch.no_grad():
            mu, _ = model.encode(x)
            metrics["eval/psnr"] = psnr(x, model.reconstruct(x)).mean().item()
        factors = arrays["factors"][:max_examples].numpy()
        scores = dci(mu.numpy(), factors, discrete_factors=discrete_factors(factors))
        metrics.update({f"eval/dci_{k_}": float(v) for k_, v in scores.items()})
    tags: dict[str, str] = {}
    if samples > 0 and len(x) > 3:
        from pipelines.sample_quality import sample_quality_metrics

        methods = ["sir", "langevin", "base"] if kind == "NCPVAE" else [None]
        quality, tags = sample_quality_metrics(
            tracker, data, x[:samples], lambda n, method: sample_images(model, n, method, 1.0), methods,
            inception_weights, "--inception-weights", "evaluate")
        metrics.update({f"eval/{key}": v for key, v in quality.items()})
    # Every figure says which split it comes from: eval/x → <split>/x (the timing stays eval/seconds).
    metrics = {(f"{split}/{key[len('eval/'):]}" if key.startswith("eval/") else key): v for key, v in metrics.items()}
    metrics["eval/seconds"] = time.perf_counter() - t0
    if log:
        mv_run = _run_of(tracker, model_uri)
        if mv_run:
            tracker.log_metrics(mv_run, metrics, step=0)
            if tags:
                tracker.set_tags(mv_run, tags)
    return metrics


def _iw_nll(model, x: torch.Tensor, k: int, batch_size: int, label: str, rows: int = 2048) -> torch.Tensor:
    """(N,) importance-weighted NLL with K draws, in blocks of about `rows` model rows (a batch times a block of
    draws) so that a progress line with an ETA can follow the work; blocks combine exactly: p̂ = Σ_b K_b·p̂_b / K."""
    from pipelines.sample_quality import Ticker
    from vae.metrics import importance_weighted_nll

    ticker, done, out = Ticker(label, len(x) * k, "draws"), 0, []
    ticker(0)
    for i in range(0, len(x), batch_size):
        xb, log_p = x[i:i + batch_size], []
        block = max(1, min(k, rows // len(xb)))
        for start in range(0, k, block):
            kb = min(block, k - start)
            log_p.append(math.log(kb) - importance_weighted_nll(model, xb, k=kb).cpu())  # log(K_b·p̂_b)
            done += len(xb) * kb
            ticker(done)
        out.append(math.log(k) - torch.logsumexp(torch.stack(log_p), dim=0))
    return torch.cat(out)


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

    out = _writable_output(args.out)  # before minutes of loading and sampling
    tracker = _tracker(args)
    model = load_registered(tracker, args.model_uri)
    torch.manual_seed(args.seed)
    images = sample_images(model, args.n, args.method, args.temperature)
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


def _whole_number(text: str, minimum: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be {bound}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, "at least 1")


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number above 0 (1.0 samples the prior as "
                                         f"trained; below 1 is sharper)")
    return value


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.data import read_manifest

    tracker = _tracker(args)
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
    p.add_argument("--metric", default=None, help="run metric to compare (default per family: "
                   + ", ".join(f"{k}: {m} ({d})" for k, (m, d) in PROMOTION_METRICS.items()) + ")")
    p.add_argument("--direction", choices=("min", "max"), default=None)
    p.add_argument("--force", action="store_true", help="promote even if the metric is worse or missing")
    _add_tracking_args(p)
    p.set_defaults(func=_cmd_promote)

    s = sub.add_parser("sample", help="write a PNG grid of samples from a registered model")
    s.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    s.add_argument("--n", type=_positive_int, default=64, help="how many samples (default 64)")
    s.add_argument("--out", default="samples.png", help="PNG file to write, in an existing directory")
    s.add_argument("--method", choices=("sir", "langevin", "base"), default=None, help="NCP-VAE sampling method")
    s.add_argument("--temperature", type=_temperature, default=1.0, help="prior temperature, > 0 (default 1.0)")
    s.add_argument("--seed", type=int, default=0)
    _add_tracking_args(s)
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("evaluate", help="compute a model's metrics on a data set and log them to its run")
    e.add_argument("model_uri")
    e.add_argument("--data", required=True, help="a prepared data set directory")
    e.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="the split to score; the metrics are named after it (test/..., val/...)")
    e.add_argument("--k", type=_positive_int, default=1000, help="importance samples for the NLL bound")
    e.add_argument("--max-examples", type=_positive_int, default=2000)
    e.add_argument("--ncp-k", type=_positive_int, default=20, metavar="K",
                   help="NCP models: importance samples for the NCP prior's own NLL (each needs nested draws for "
                        "the normalisers, so it costs far more per sample than the base bound)")
    e.add_argument("--ncp-z-samples", type=_positive_int, default=None, metavar="M",
                   help="NCP models: prior draws per context for each normaliser Z_k (default: the model's "
                        "ncp.log_z_samples); the figure's Monte Carlo error is logged beside it")
    e.add_argument("--samples", type=_non_negative_int, default=1000,
                   help="images sampled (per method) for the sample-quality scores; 0 skips them")
    e.add_argument("--inception-weights", default=None, metavar="PATH_OR_URI",
                   help="torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth) as a "
                        "local file or an MLflow artifact URI: adds Inception FID and KID (never downloaded)")
    _add_tracking_args(e)
    e.set_defaults(func=_cmd_evaluate)
