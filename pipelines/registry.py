"""The model-registry workflow: promote a version to `champion`, sample any registered model, evaluate one on data.

    vaepipe promote demo-nvae --from-alias candidate            # checks val/bpd against the current champion
    vaepipe sample models:/demo-ncp@candidate --n 64 --out grid.png --method sir
    vaepipe evaluate models:/demo-nvae@champion --data runs/data/digits16 --k 1000

Models load with plain `mlflow.pytorch.load_model`; every command takes `--config` (for its tracking section) or
`--tracking-uri`.
"""
from __future__ import annotations

import math
import time

import mlflow
import torch

from pipelines.data import load_split, read_manifest
from pipelines.errors import ConfigError, ModelIntegrityError
from pipelines.reporting import Ticker
from pipelines.sample_quality import reference_binarize, sample_quality_metrics
from pipelines.tracking import MetricSink, Tracker, verified_model_dir
from pipelines.tracking.cards import note_promotion
from vae.factor_metrics import dci, discrete_factors, psnr
from vae.metrics import bits_per_dim, importance_weighted_nll

# The metric that decides a promotion, per model family (the registered name's suffix), and its direction.
# The ncp stage's score is a Fréchet distance in vaepipe's own feature space on the val split (not FID).
PROMOTION_METRICS = {"nvae": ("val/bpd", "min"), "ncp": ("val/fd_vaepipe_sir", "min"),
                     "gwae": ("best/objective", "max")}


def _version(tracker: Tracker, name: str, version: str | None, alias: str | None):
    try:
        if version is not None:
            return tracker.model_version(name, version)
        return tracker.get_model_version_by_alias(name, alias)
    except Exception:
        known = tracker.registered_model_names()
        what = f"version {version}" if version is not None else f"alias @{alias}"
        raise ConfigError(f"registered model {name!r} has no {what} in {tracker.tracking_uri}; "
                          f"registered models: {', '.join(known) or 'none'}") from None


def _metric_of(tracker, mv, metric: str) -> float | None:
    run = tracker.get_run(mv.run_id) if mv.run_id else None
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
        champion = tracker.get_model_version_by_alias(name, "champion")
    except LookupError:
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
    tracker.activate()
    try:
        local = verified_model_dir(tracker, model_uri)
        return mlflow.pytorch.load_model(local, map_location="cpu")
    except ModelIntegrityError:
        raise
    except Exception as e:
        known = tracker.registered_model_names()
        raise ConfigError(f"cannot load {model_uri!r} from {tracker.tracking_uri} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); registered models: {', '.join(known) or 'none'}") from None


def sample_images(model, n: int, method: str | None, temperature: float, bn_batches: int = 0) -> torch.Tensor:
    """(n, C, H, W) in [0, 1] from any vaepipe model; `method` only for NCP-VAE models. An NVAE draws with its BN
    statistics re-estimated at `temperature` from `bn_batches` batches of prior samples (0: the trained ones)."""
    model.eval()
    with torch.no_grad() if method != "langevin" else torch.enable_grad():
        if type(model).__name__ == "NCPVAE":
            return model.sample(n, method=method or "sir", temperature=temperature).detach()
        if method not in (None, "base"):
            raise ConfigError(f"--method {method} needs an NCP-VAE model (models:/<name>-ncp@...); "
                              f"{type(model).__name__} samples from its own prior: drop --method")
        if type(model).__name__ == "GWAE":
            return model.sample(n).detach()
        with model.bn_readjusted(temperature, bn_batches):
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
        return dict(tracker.get_run(run_id).data.params) if run_id else {}
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
    model = load_registered(tracker, model_uri)
    model.eval()
    manifest = read_manifest(data)
    params = run_params(tracker, model_uri) if params is None else params
    binarize = binarize_mode(params, model)
    arrays = load_split(data, split, binarize=binarize, seed=EVAL_SEED)
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
            metrics.update(ncp_likelihood_metrics(model, x, ncp_k, ncp_z_samples))
    if kind == "GWAE" and manifest.factor_names and arrays["factors"].shape[1]:
        with torch.no_grad():
            mu, _ = model.encode(x)
            metrics["eval/psnr"] = psnr(x, model.reconstruct(x)).mean().item()
        factors = arrays["factors"][:max_examples].numpy()
        scores = dci(mu.numpy(), factors, discrete_factors=discrete_factors(factors))
        metrics.update({f"eval/dci_{k_}": float(v) for k_, v in scores.items()})
    tags: dict[str, str] = {}
    if samples > 0 and len(x) > 3:
        methods = ["sir", "langevin", "base"] if kind == "NCPVAE" else [None]
        reference = reference_binarize(model, binarize)
        real = x if reference == binarize else load_split(data, split, binarize=reference)["image"][:max_examples]
        quality, tags = sample_quality_metrics(
            tracker, data, real[:samples], lambda n, method: sample_images(model, n, method, 1.0), methods,
            inception_weights, "--inception-weights", "evaluate")
        metrics.update({f"eval/{key}": v for key, v in quality.items()})
    # Every figure says which split it comes from: eval/x → <split>/x (the timing stays eval/seconds).
    metrics = {(f"{split}/{key[len('eval/'):]}" if key.startswith("eval/") else key): v for key, v in metrics.items()}
    metrics["eval/seconds"] = time.perf_counter() - t0
    if log:
        mv_run = _run_of(tracker, model_uri)
        if mv_run:
            MetricSink(tracker, mv_run).log(metrics, step=0)
            if tags:
                tracker.set_tags(mv_run, tags)
    return metrics


def _iw_nll(model, x: torch.Tensor, k: int, batch_size: int, label: str, rows: int = 2048) -> torch.Tensor:
    """(N,) importance-weighted NLL with K draws, in blocks of about `rows` model rows (a batch times a block of
    draws) so that a progress line with an ETA can follow the work; blocks combine exactly: p̂ = Σ_b K_b·p̂_b / K."""
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


def ncp_likelihood_metrics(model, x: torch.Tensor, k: int, z_samples: int | None = None,
                           batch_size: int = 64) -> dict[str, float]:
    """The NCP prior's own importance-weighted NLL of images x (nats per image) with its Monte Carlo error, as
    `eval/` metrics: `ncp_iw_nll_k{K}`, `..._mc_se` (delta method over the normaliser estimates), `..._mc_bias`
    (their Jensen bias: the NLL is too low by about this), `ncp_gain_k{K}` (the base NVAE's IW-NLL minus the NCP one on
    the same draws; > 0: the NCP prior explains the data better), `ncp_log_z_samples` (M) and `ncp_log_z/group_00`."""
    m = model.cfg.log_z_samples if z_samples is None else int(z_samples)
    ticker = Ticker(f"evaluate: NCP IW-NLL K={k}, M={m} prior draws per normaliser", len(x) * k, "draws")
    ticker(0)
    out = model.importance_weighted_nll(x.split(batch_size), k=k, n_samples=m, progress=ticker)
    print(f"[evaluate] NCP prior: NLL {out['nll']:.3f} ± {out['mc_se']:.3f} nats (Monte Carlo error of the "
          f"normalisers; K={k}, M={m}); base NVAE on the same draws {out['base_nll']:.3f}", flush=True)
    return {f"eval/ncp_iw_nll_k{k}": out["nll"], f"eval/ncp_iw_nll_k{k}_mc_se": out["mc_se"],
            f"eval/ncp_iw_nll_k{k}_mc_bias": out["mc_bias"], f"eval/ncp_gain_k{k}": out["gain"],
            "eval/ncp_log_z_samples": float(m), "eval/ncp_log_z/group_00": out["log_z_top"]}
