"""Stage 3 — tune: Ray Tune over GWAE models (objective weights, priors, learning rates), one nested MLflow run per
trial, the best trial's model registered as `<name>-gwae`.

    vaepipe tune configs/demo.yaml [--space gwae_weights | PATH] [--resume] [--set tune.num_samples=16]

Recipe layout: the driver side is `run_tune` (validate everything → open the MLflow tune run →
fit → `finish`: result table, plot, pictures, register the best model); the trial side is `train_gwae` (setup →
load_checkpoint → train an epoch → evaluate → save_checkpoint and report), the only code a Tune worker runs. The
model math lives in `vae/gwae.py`, the metrics in `vae/factor_metrics.py`, the space files in `tune_spaces/`.

Contracts kept here:
- every input is checked before Ray starts: the space file (file:line for each mistake), each bound and choice
  applied alone to the config, the data's shape, and that the metric and the objective's terms will be reported;
- the driver loads the prepared splits once and ships them with `tune.with_parameters` (uint8 numpy in the object
  store, read zero-copy by the trials): 0.2 ms per trial for 1.2 MiB of shapes, against 8 ms for a trial reading
  and verifying the Parquet splits itself (benchmarks/tune_asha.py);
- one MLflow writer: `TrialRuns` (an `MLflowLoggerCallback`) on the driver opens a run per trial nested under the
  tune run, with the sampled values as params and the per-epoch metrics; a resumed trial reattaches to its run;
- each epoch reports losses, psnr, dci (+ completeness, informativeness) when the data has factors, auroc, nmi/ari
  for GMP priors on labelled data, the distance scale, the prior's health (marginal excess kurtosis), the collapse
  check, objective = Σ tune.objective_weights[m]·m, and `selection`: tune.metric, or the worst possible value when
  the epoch collapsed. ASHA cuts and checkpoints are kept on `selection`, so a collapsed model is never the best.

Honest selection: trials are scored on validation images only (DCI's forest split seeded by the epoch, so each epoch
fits and scores different subsets); the best non-collapsed (trial, epoch) is then measured again on the test split,
never seen before, and those test figures are the registered model's `best/*` metrics (`best/val_<metric>` keeps the
validation value it was chosen on). When every trial collapsed nothing is registered.

OoD: `auroc` scores val images (in) against val images of the held-out `tune.ood_class` (out; uniform noise when
it is null, which any model separates), with the paper's score f(G(μ), μ), higher = more OoD. That direction holds
early in training and can flip once reconstructions get good (see GWAE.ood_score), so `auroc` below 0.5 is a real
reading, not a bug. Beside it: `auroc_prior`, the paper's baseline −log N(μ; 0, I), and `auroc_recon`, the
reconstruction error ½‖x − G(μ)‖²; neither depends on the critic.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

import tune_spaces
from pipelines import checkpoints
from pipelines.config import PipelineConfig
from pipelines.data import ensure_dataset, load_split
from pipelines.errors import ConfigError, SearchError
from pipelines.ray_env import init_ray, storage_path, use_assigned_cpus
from pipelines.reporting import StageResult, png_bytes
from pipelines.tracking import MetricSink, OpenRun, Tracker, experiment_name, find_resumable, stage_run
from pipelines.tracking.cards import describe_version
from vae.factor_metrics import discrete_factors
from vae.gwae import GWAE, GWAEConfig
from vae.metrics import reconstruction_grid, sample_grid

STAGE = "tune"
CHECKPOINT_KIND = "tune-trial"
SEARCHED_SECTIONS = ("gwae",)
# Per-epoch training averages: train_step's key -> the reported name.
TRAIN_TERMS = {"loss": "loss", "gw": "loss_gw", "w": "loss_w", "d": "loss_d", "h": "loss_h",
               "critic_w1": "critic_w1", "critic_gp": "critic_gp"}
# Everything a trial may report (what the MLflow callback logs); `reported_metrics` says which every trial reports.
METRICS = (*TRAIN_TERMS.values(), "skipped_steps", "distance_coef", "psnr", "auroc", "auroc_prior", "auroc_recon",
           "dci", "dci_completeness", "dci_informativeness", "nmi", "ari", "prior_kurtosis_mean", "prior_kurtosis_max",
           "prior_max_abs_z", "recon_spread", "data_spread", "sample_spread", "mean_image_psnr", "collapsed",
           "objective", "selection", "metric_at_init", "epoch")
# `selection` of a collapsed epoch: the worst value in the search's direction (finite: Tune's bookkeeping and
# MLflow both take it).
COLLAPSED_SCORE = 1e9
# Metrics re-measured on the test split for the registered model.
TEST_METRICS = ("psnr", "dci", "dci_completeness", "dci_informativeness", "auroc", "auroc_prior", "auroc_recon",
                "nmi", "ari", "recon_spread", "data_spread", "sample_spread", "mean_image_psnr", "collapsed",
                "prior_kurtosis_max", "objective")


# ----------------------------------------------------------------------------------------------------------------
# The plan: what the driver works out once and every trial shares.


@dataclasses.dataclass(frozen=True)
class TunePlan:
    config: dict  # the PipelineConfig, as a dict; each trial applies its sampled values to it
    steps_per_epoch: int
    discrete_factors: tuple[int, ...]
    grid_keys: tuple[str, ...] = ()  # searched by grid: repeats of a grid point share seeds across its values
    grid_size: int = 1


def load_trial_data(cfg: PipelineConfig, manifest, split: str = "val") -> dict[str, np.ndarray]:
    """Train images, the evaluation set (images, factors, labels) from `split` and its OoD images, as numpy arrays
    (uint8 images). Trials evaluate on "val"; the chosen model is measured again on "test".

    With tune.ood_class the class is held out of training and its `split` images are the OoD set; otherwise the OoD
    set is uniform noise, seeded by tune.seed (and the split)."""
    t = cfg.tune
    train = load_split(t.data.path, "train", image_dtype=torch.uint8)
    held = load_split(t.data.path, split, image_dtype=torch.uint8)
    images, labels = train["image"].numpy(), train["label"].numpy()
    val_images, val_labels, val_factors = held["image"].numpy(), held["label"].numpy(), held["factors"].numpy()
    if t.ood_class is not None:
        images = images[labels != t.ood_class]
        ood = val_images[val_labels == t.ood_class][: t.eval_examples]
        keep = val_labels != t.ood_class
        val_images, val_labels, val_factors = val_images[keep], val_labels[keep], val_factors[keep]
    else:
        rng = np.random.default_rng([t.seed, ("val", "test").index(split)])
        ood = rng.integers(0, 256, size=(min(t.eval_examples, len(val_images)), *manifest.shape), dtype=np.uint8)
    n = t.eval_examples
    return {"train": images, "eval_images": val_images[:n], "eval_factors": val_factors[:n],
            "eval_labels": val_labels[:n], "ood_images": ood}


def reported_metrics(cfg: PipelineConfig, space: Mapping[str, tune_spaces.Param], manifest) -> tuple[str, ...]:
    """The metrics every trial reports (a GMP prior's nmi/ari only when every trial's prior is GMP)."""
    skip = set() if manifest.num_factors >= 2 else {"dci", "dci_completeness", "dci_informativeness"}
    prior = space.get("gwae.prior")
    if (set(prior.candidates()) if prior else {cfg.gwae.prior}) != {"gmp"} or not manifest.label_names:
        skip |= {"nmi", "ari"}
    return tuple(m for m in METRICS if m not in skip)


# ----------------------------------------------------------------------------------------------------------------
# Trial side.


def trial_seed(base: int, sampled: Mapping[str, Any], trial_id: str, grid_keys: tuple[str, ...] = (),
               grid_size: int = 1) -> int:
    """A seed fixed by the sampled values and the trial's number, so a search run again (e.g. with and without ASHA)
    trains each trial the same way, while repeats of one grid point (num_samples > 1) get their own seeds. Random
    search numbers its trials `<prefix>_00003`; Optuna's ids carry no number and its values do not repeat.

    Values searched by grid (`grid_keys`, `grid_size` points) are left out of the key and the replicate is the trial
    number over the grid size (Tune runs the whole grid once per sample): the k-th repeat of every grid point gets
    the same seed, so e.g. priors compared on a grid are compared on paired seeds."""
    number = trial_id.rsplit("_", 1)[-1]
    replicate = int(number) // grid_size if "_" in trial_id and number.isdigit() else 0
    kept = {k: v for k, v in sampled.items() if k not in grid_keys}
    key = json.dumps(kept, sort_keys=True, default=str) + f"#{replicate}"
    return (base + zlib.crc32(key.encode())) % 2**31


def _as_float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0).to(device)


def train_epoch(model, optimizers, images: np.ndarray, steps: int, batch_size: int, gen: torch.Generator,
                device: torch.device) -> dict[str, float]:
    """`steps` GWAE updates on minibatches drawn without replacement (a fresh permutation whenever one runs out)."""
    n = len(images)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * batch_size / n))])
    sums = dict.fromkeys(TRAIN_TERMS, 0.0)
    skipped = 0.0
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size].numpy()
        stats = model.train_step(_as_float(images[idx], device), *optimizers)
        for k in sums:
            sums[k] += stats[k]
        skipped += stats["skipped"]
    out = {TRAIN_TERMS[k]: v / steps for k, v in sums.items()}
    out.update(skipped_steps=skipped, distance_coef=model.distance_coef.item())
    return out


@torch.no_grad()
def evaluate(model, data: dict, discrete: tuple[int, ...], device: torch.device, seed: int = 0) -> dict[str, float]:
    """PSNR of reconstructions, the collapse check, the prior's health, DCI of the encoder means (forest split
    seeded by `seed`), OoD AUROCs (critic, prior baseline, reconstruction error) and (GMP, labels) NMI/ARI."""
    from vae.factor_metrics import clustering_scores, collapse_check, dci, ood_auroc

    model.eval()
    try:
        x = _as_float(data["eval_images"], device)
        ood = _as_float(data["ood_images"], device)
        mu = model.encode(x)[0]
        if not torch.isfinite(mu).all():
            raise FloatingPointError("the encoder's means are not finite: the trial diverged; lower gwae.lr or "
                                     "narrow the space's learning-rate range")
        x_hat = model.decode(mu)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            samples = model.sample(min(len(x), 1000))
        report = collapse_check(x, x_hat, samples)
        out = {k: float(report[k]) for k in ("psnr", "recon_spread", "data_spread", "sample_spread",
                                              "mean_image_psnr", "collapsed")}
        out.update(model.prior_health())
        out["auroc"] = ood_auroc(model.ood_score(x).cpu(), model.ood_score(ood).cpu())
        out["auroc_prior"] = ood_auroc(model.prior_nll_score(x).cpu(), model.prior_nll_score(ood).cpu())
        sse_in = 0.5 * (x - x_hat).pow(2).flatten(1).sum(1)
        sse_out = 0.5 * (ood - model.reconstruct(ood)).pow(2).flatten(1).sum(1)
        out["auroc_recon"] = ood_auroc(sse_in.cpu(), sse_out.cpu())
        factors = data["eval_factors"]
        if factors.shape[1] >= 2:
            scores = dci(mu.cpu(), factors, discrete_factors=discrete, seed=seed)
            out.update(dci=scores["disentanglement"], dci_completeness=scores["completeness"],
                       dci_informativeness=scores["informativeness"])
        labels = data["eval_labels"]
        if model.config.prior == "gmp" and (labels >= 0).all():
            out.update(clustering_scores(model.prior.assign(mu).cpu(), labels))
    finally:
        model.train()
    return out


def objective(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float:
    return float(sum(w * metrics[m] for m, w in weights.items()))


def selection_score(metrics: Mapping[str, float], metric: str, mode: str) -> float:
    """What ASHA cuts on and checkpoints are ranked by: `metric`, or the worst value when the epoch collapsed."""
    if metrics.get("collapsed"):
        return -COLLAPSED_SCORE if mode == "max" else COLLAPSED_SCORE
    return float(metrics[metric])


def save_checkpoint(directory: Path, model, optimizers, epoch: int, gen: torch.Generator, sampled: dict,
                    cfg: PipelineConfig | None = None) -> None:
    """A trial's checkpoint directory (pipelines.checkpoints), with the trial's own config (sampled values in)."""
    checkpoints.save(directory, {
        "model": model.state_dict(), "gwae": model.config.to_dict(), "sampled": dict(sampled), "epoch": epoch,
        "step": epoch, "optimizers": [o.state_dict() for o in optimizers], "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }, cfg, kind=CHECKPOINT_KIND)


def load_checkpoint(directory: Path) -> dict[str, Any]:
    return checkpoints.load(directory, kind=CHECKPOINT_KIND)


def train_gwae(config: dict, *, plan: TunePlan, data: dict) -> None:
    """One trial: the GWAE of the config with the sampled `config` values applied, trained tune.epochs epochs,
    reporting metrics and a checkpoint after each; a restarted trial continues from its last checkpoint."""
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # its INFO line per checkpoint doubles the progress
    cfg = tune_spaces.apply(PipelineConfig.from_dict(plan.config), config)  # validated: a bad combination raises
    t = cfg.tune
    use_assigned_cpus()  # trials share the cores; torch would take them all
    device = torch.device("cuda" if t.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    seed = trial_seed(t.seed, config, tune.get_context().get_trial_id(), plan.grid_keys, plan.grid_size)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GWAE(cfg.gwae).to(device)
    optimizers = model.make_optimizers()
    epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            payload = load_checkpoint(Path(d))
        model.load_state_dict(payload["model"])
        for opt, state in zip(optimizers, payload["optimizers"]):
            opt.load_state_dict(state)
        gen.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        epoch = payload["epoch"]
    init_metric = math.nan
    if epoch == 0:  # the metric at random initialisation: what ASHA's cuts must rise above to mean anything
        with torch.random.fork_rng(devices=[]):
            at_init = evaluate(model, data, plan.discrete_factors, device, seed=seed)
        at_init["objective"] = objective(at_init, t.objective_weights)
        init_metric = float(at_init.get(t.metric, math.nan))
    while epoch < t.epochs:
        metrics = train_epoch(model, optimizers, data["train"], plan.steps_per_epoch, t.batch_size, gen, device)
        metrics.update(evaluate(model, data, plan.discrete_factors, device, seed=seed + epoch))
        epoch += 1
        metrics.update(epoch=epoch, objective=objective(metrics, t.objective_weights))
        if epoch == 1:
            metrics["metric_at_init"] = init_metric
        metrics["selection"] = selection_score(metrics, t.metric, t.mode)
        with tempfile.TemporaryDirectory(prefix="vaepipe-tune-") as d:
            save_checkpoint(Path(d), model, optimizers, epoch, gen, config, cfg)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


# ----------------------------------------------------------------------------------------------------------------
# Driver-side callbacks: the one MLflow writer, and a progress line per result.


def _make_callbacks(tracker: Tracker, tune_run_id: str, experiment: str, tags: dict[str, str], cfg: PipelineConfig):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune import Callback

    epochs, metric = cfg.tune.epochs, cfg.tune.metric

    class TrialRuns(MLflowLoggerCallback):
        """Ray's MLflow logger with four changes: trial runs carry a `vaepipe.trial_id` tag; a trial that starts
        again (a retry, or `--resume` in a new process) reattaches to its run instead of opening a second one; only
        the trial's own metrics are logged, as `trial/<name>`, one batch per epoch through the stage's metric sink;
        and an epoch trained again after a restart (Tune registers a checkpoint a moment after its result) is not
        logged twice."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._sinks: dict[Any, MetricSink] = {}

        def log_trial_start(self, trial) -> None:
            if trial in self._trial_runs:
                return
            found = tracker.find_runs(experiment, parent_run_id=tune_run_id,
                                      filter_string=f"tags.`vaepipe.trial_id` = '{trial.trial_id}'", max_results=1)
            if found:
                run_id = found[0].info.run_id
                tracker.set_status(run_id, "RUNNING")
            else:
                run_tags = {**self.tags, "trial_name": str(trial), "vaepipe.trial_id": trial.trial_id}
                run_id = self.mlflow_util.start_run(tags=run_tags, run_name=str(trial)).info.run_id
                tracker.log_params(run_id, trial.config)
            self._trial_runs[trial] = run_id
            self._sinks[trial] = MetricSink(tracker, run_id, resumed=bool(found))

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            values = {f"trial/{k}": result[k] for k in METRICS if isinstance(result.get(k), (int, float))}
            self._sinks[trial].log(values, step=int(result["training_iteration"]))

        def log_trial_end(self, trial, failed: bool = False) -> None:
            done = int((trial.last_result or {}).get("epoch", 0))
            outcome = "failed" if failed else ("completed" if done >= epochs else "stopped_early")
            tracker.set_tags(self._trial_runs[trial], {"vaepipe.trial_outcome": outcome, "vaepipe.epochs": done})
            super().log_trial_end(trial, failed)

    class ProgressLines(Callback):
        """One line per trial result and per trial end, instead of Ray's table."""

        def __init__(self) -> None:
            super().__init__()
            self.alarmed: set[str] = set()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            from vae.gwae import KURTOSIS_ALARM

            extra = "  ".join(f"{k} {result[k]:.4g}" for k in ("psnr", "dci", "auroc", "auroc_prior") if k in result)
            state = "  COLLAPSED" if result.get("collapsed") else ""
            print(f"[tune] trial {trial.trial_id}  epoch {result['epoch']}/{epochs}  {metric} {result[metric]:.4g}"
                  f"  {extra}{state}", flush=True)
            # A fresh FNP starts heavy-tailed (its random per-dimension maps): judge the prior after training only.
            kurtosis = result.get("prior_kurtosis_max", 0.0)
            if result["epoch"] >= 2 and kurtosis > KURTOSIS_ALARM and trial.trial_id not in self.alarmed:
                self.alarmed.add(trial.trial_id)
                print(f"[tune] warning: trial {trial.trial_id}'s prior has heavy tails at epoch {result['epoch']} (a "
                      f"marginal's excess kurtosis {kurtosis:.1f} > {KURTOSIS_ALARM:g}, |z| up to "
                      f"{result.get('prior_max_abs_z', 0):.0f}σ): it may be shrinking latent distances instead of "
                      f"the scale c; check gwae.lr_distance_coef and train longer", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            done = int((trial.last_result or {}).get("epoch", 0))
            print(f"[tune] trial {trial.trial_id} " + ("finished" if done >= epochs else
                                                        f"stopped early by ASHA after {done}/{epochs} epochs"),
                  flush=True)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            print(f"[tune] trial {trial.trial_id} FAILED (the search goes on); traceback in {trial.error_file}",
                  flush=True)

    logger = TrialRuns(tracker.tracking_uri, registry_uri=tracker.registry_uri, experiment_name=experiment,
                       tags=tags, save_artifact=False)
    return [logger, ProgressLines()]


# ----------------------------------------------------------------------------------------------------------------
# Driver side.


def check_inputs(cfg: PipelineConfig, space: Mapping[str, tune_spaces.Param], manifest) -> None:
    """Everything about the search that can be wrong, refused before Ray starts (and before MLflow is touched)."""
    t = cfg.tune
    for param in space.values():
        if param.section not in SEARCHED_SECTIONS:
            raise ConfigError(f"{param.where}: {param.key}: the tune stage searches {', '.join(SEARCHED_SECTIONS)} "
                              f"fields only (e.g. gwae.lambda_w); set other sections with --set")
        if param.type == "grid" and t.search == "optuna":
            raise ConfigError(f"{param.where}: {param.key}: grid needs tune.search=random (Optuna samples; it "
                              f"cannot enumerate a grid); use type choice, or --set tune.search=random")
    if tuple(manifest.shape) != tuple(cfg.gwae.image_shape):
        c, h, w = manifest.shape
        raise ConfigError(f"gwae.image_shape: {list(cfg.gwae.image_shape)} does not match the dataset at "
                          f"{t.data.path} (shape {list(manifest.shape)}); set --set gwae.image_shape=[{c},{h},{w}]")
    for split in ("train", "val"):
        if manifest.splits.get(split, 0) < 2:
            raise ConfigError(f"tune.data: the dataset at {t.data.path} has too few '{split}' examples; prepare it "
                              f"with more examples or a larger tune.data.val_fraction")
    if t.ood_class is not None and not t.ood_class < len(manifest.label_names):
        raise ConfigError(f"tune.ood_class: {t.ood_class} is not a label of {t.data.path} (labels: "
                          f"{', '.join(manifest.label_names) or 'none'}); pick one of them or null for noise")
    try:
        tune_spaces.check_values(space, cfg)
    except tune_spaces.SpaceError as e:
        raise ConfigError(str(e)) from None
    metrics = reported_metrics(cfg, space, manifest)
    missing = [m for m in [t.metric, *t.objective_weights] if m not in metrics]
    if missing:
        raise ConfigError(
            f"tune.metric / tune.objective_weights: {', '.join(map(repr, missing))} will not be reported by every "
            f"trial of this search (dci needs data with factors, nmi/ari a gmp prior in every trial and labels); "
            f"reported: {', '.join(metrics)}"
        )


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _check_resources(cfg: PipelineConfig) -> None:
    import ray

    have = ray.cluster_resources()
    for key, need in (("CPU", cfg.tune.cpus_per_trial), ("GPU", cfg.tune.gpus_per_trial)):
        if need > have.get(key, 0.0):
            raise ConfigError(f"tune.{key.lower()}s_per_trial: {need:g} {key}s per trial, but the Ray cluster has "
                              f"{have.get(key, 0.0):g}; lower it, or connect to a cluster that has them (--address)")


def _load_space(cfg: PipelineConfig) -> dict[str, tune_spaces.Param]:
    try:
        return tune_spaces.load_space(cfg.tune.space, PipelineConfig)
    except tune_spaces.SpaceError as e:
        raise ConfigError(str(e)) from None


def run_tune(
    cfg: PipelineConfig,
    tracker: Tracker | None = None,
    *,
    parent_run_id: str | None = None,
    resume: bool | str = False,
    ray_address: str | None = None,
) -> StageResult:
    """Search GWAE configurations with Ray Tune; track every trial, register the best model as `<name>-gwae`.

    Every input (config, space file, data, metric names, tracking store, the --resume target) fails here, before any
    trial starts. Failed trials are listed and do not stop the search; SearchError when no trial leaves a model."""
    from ray import tune

    t = cfg.tune
    space = _load_space(cfg)
    manifest = ensure_dataset(t.data)
    check_inputs(cfg, space, manifest)
    data = load_trial_data(cfg, manifest)
    steps = t.steps_per_epoch or len(data["train"]) // t.batch_size
    if steps < 1 or t.batch_size < 2:
        raise ConfigError(f"tune.batch_size: {t.batch_size} needs 2 <= batch_size <= the {len(data['train'])} "
                          f"training images (GWAE compares pairs within a batch)")
    if len(data["eval_images"]) < min(t.eval_examples, 2000):
        print(f"[tune] note: {len(data['eval_images'])} validation images for DCI and PSNR (tune.eval_examples "
              f"{t.eval_examples}); fewer than 2,000 make DCI noisy: prepare more examples", flush=True)
    test_data = load_trial_data(cfg, manifest, "test") if manifest.splits.get("test", 0) >= 2 else None
    grid = {k: p for k, p in space.items() if p.type == "grid"}
    plan = TunePlan(cfg.to_dict(), steps, discrete_factors(data["eval_factors"]), grid_keys=tuple(grid),
                    grid_size=math.prod(len(p.values) for p in grid.values()))
    space_file = next(iter(space.values())).file
    tracker = tracker or Tracker.connect(cfg.tracking)
    storage = storage_path(cfg.tune.storage_path, cfg.tracking.workdir)
    # A checkpoint per epoch forces an experiment snapshot per epoch (what keeps --resume exact); Ray warns about
    # the snapshot rate each time, which is noise for short epochs.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if os.environ.get("VAEPIPE_VERBOSE") != "1":
        # Tune's newer console engine prints an experiment table, a results path and a TensorBoard hint even at
        # verbose=0; its legacy reporter at verbose=0 prints nothing. The stage prints its own line per trial epoch.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if resume:
        find_resumable(tracker, cfg, STAGE, resume)  # a wrong --resume target fails before Ray starts
    init_ray(ray_address)
    _check_resources(cfg)
    trainable = tune.with_resources(tune.with_parameters(train_gwae, plan=plan, data=data),
                                    {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial})
    with stage_run(tracker, cfg, STAGE, parent_run_id=parent_run_id, resume=resume, data_path=t.data.path,
                   ) as run:
        run_id = run.run_id
        if run.resumed:
            ray_name = run.tags["vaepipe.ray_run"]
            if not tune.Tuner.can_restore(f"{storage}/{ray_name}"):
                raise ConfigError(f"--resume: no Tune experiment to restore at {storage}/{ray_name} (tune run "
                                  f"{run_id}); check tune.storage_path, or run without --resume")
            tuner = tune.Tuner.restore(f"{storage}/{ray_name}", trainable, resume_errored=True)
        else:
            ray_name = f"{cfg.name}-tune-{run_id[:12]}"
            run.set_tags({"vaepipe.ray_run": ray_name})
            tracker.log_params(run_id, {"plan.steps_per_epoch": steps, "plan.space_file": space_file})
            tracker.log_artifact(run_id, space_file, "search_space")
            run_tags = tracker.get_run(run_id).data.tags
            trial_tags = {"mlflow.parentRunId": run_id, "vaepipe.stage": "tune-trial",
                          "vaepipe.dataset": run_tags["vaepipe.dataset"], "vaepipe.git_commit": run_tags[
                              "vaepipe.git_commit"], "vaepipe.pipeline_run": run_tags["vaepipe.pipeline_run"]}
            callbacks = _make_callbacks(tracker, run_id, experiment_name(cfg.name), trial_tags, cfg)
            tuner = tune.Tuner(trainable, param_space=tune_spaces.to_tune_space(space),
                               tune_config=_tune_config(t), run_config=_run_config(t, ray_name, storage, callbacks))
        print(f"[tune] {t.num_samples} trial(s) of {t.epochs} epochs × {steps} steps, space {space_file}; "
              f"MLflow run {run_id}; Tune experiment {storage}/{ray_name}", flush=True)
        results = tuner.fit()
        # Tune turns Ctrl+C into an early, normal return, and its in-memory trials then all read as terminated:
        # the saved experiment state tells a partial search (trials not created, or left pending) from a whole one.
        expected = t.num_samples * math.prod(len(p.values) for p in space.values() if p.type == "grid")
        saved = tune.ExperimentAnalysis(f"{storage}/{ray_name}").trials
        ended = sum(trial.status in ("TERMINATED", "ERROR") for trial in saved)
        if len(saved) < expected or ended < len(saved):
            message = (f"the search was interrupted after {ended} of {expected} trials; its state is saved: "
                       f"continue it with `vaepipe tune CONFIG --resume {run_id}`")
            print(f"[tune] {message}", flush=True)
            raise KeyboardInterrupt(message)
        return finish(cfg, run, results, space, data, test_data, plan.discrete_factors)


def _tune_config(t):
    """tune.TuneConfig: the metric, Optuna's TPE or seeded random variants (each with its concurrency cap), ASHA."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    if t.search == "optuna":
        if os.environ.get("VAEPIPE_VERBOSE") != "1":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" per run
        search = {"search_alg": OptunaSearch(seed=t.seed), "max_concurrent_trials": t.max_concurrent_trials}
    else:  # Tune applies max_concurrent_trials to Searchers only; the variant generator takes its own cap
        search = {"search_alg": BasicVariantGenerator(max_concurrent=t.max_concurrent_trials, random_state=t.seed)}
    scheduler = None
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(max_t=t.epochs, grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    return tune.TuneConfig(metric="selection", mode=t.mode, num_samples=t.num_samples, scheduler=scheduler,
                           trial_dirname_creator=_trial_dirname, **search,
                           reuse_actors=True)  # trials share one signature: skip a process start (torch import) each


def _run_config(t, name: str, storage: str, callbacks: list):
    """ray.tune.RunConfig (not ray.train's): storage, trial retries, the best checkpoints kept, quiet output."""
    from ray import tune

    return tune.RunConfig(
        name=name, storage_path=storage, verbose=0, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="selection",
                                                checkpoint_score_order=t.mode),
    )


# ----------------------------------------------------------------------------------------------------------------
# After the search: the table, the plot, the best model.

# The last reported values kept in the result table, and logged as best/<name> for the best trial.
_LAST_COLUMNS = ("objective", "psnr", "dci", "dci_completeness", "dci_informativeness", "auroc", "auroc_prior",
                 "auroc_recon", "nmi", "ari", "distance_coef", "loss", "collapsed", "prior_kurtosis_max",
                 "recon_spread", "data_spread")


def result_table(results, space: Mapping[str, tune_spaces.Param], metric: str, mode: str, epochs: int):
    """One row per trial: id, outcome, epochs trained, the sampled values, the best `metric`, the last metrics, and
    the error of a failed trial."""
    import pandas as pd

    rows = []
    for r in results:
        history = r.metrics_dataframe
        row: dict[str, Any] = {"trial_id": Path(r.path).name.removeprefix("trial_"), "epochs": 0,
                               f"best_{metric}": math.nan}
        row.update({key: (r.config or {}).get(key) for key in space})
        if history is not None and metric in history:
            usable = history[history["collapsed"] == 0] if "collapsed" in history else history
            best = usable[metric].max() if mode == "max" else usable[metric].min()  # nan when every epoch collapsed
            row.update(epochs=int(history["epoch"].max()), **{f"best_{metric}": float(best)})
        row.update({k: v for k, v in (r.metrics or {}).items() if isinstance(v, (int, float)) and k in _LAST_COLUMNS})
        done = row["epochs"]
        row["outcome"] = "failed" if r.error else ("completed" if done >= epochs else "stopped_early")
        row["error"] = _error_text(r.error) if r.error else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _error_text(error: BaseException) -> str:
    """`Type: message` of what the trial raised (a RayTaskError wraps it as `.cause`), on one line."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:500]


def objective_plot(table, space: Mapping[str, tune_spaces.Param], metric: str) -> bytes:
    """PNG: the best `metric` of each trial against each searched value (log x for loguniform ranges)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg renders the PNG
    from matplotlib.ticker import NullFormatter

    column = f"best_{metric}"
    ok = table[table["outcome"] != "failed"]
    fig = Figure(figsize=(4 * len(space), 3.4), layout="constrained")
    axes = fig.subplots(1, len(space), squeeze=False)[0]
    for ax, (key, param) in zip(axes, space.items()):
        if param.type in ("choice", "grid"):
            labels = [str(v) for v in param.values]
            xs = [labels.index(str(v)) for v in ok[key]]
            ax.set_xticks(range(len(labels)), labels)
        else:
            xs = list(ok[key])
            if param.type == "loguniform":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short ranges
            ax.set_xlim(param.low, param.high)  # the whole searched range: shows what the trials covered
        ax.scatter(xs, list(ok[column]), c=["tab:blue" if o == "completed" else "tab:orange" for o in ok["outcome"]])
        ax.set_xlabel(key)
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
    fig.suptitle("blue: full budget, orange: stopped early by ASHA")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def asha_check(results, metric: str, grace_period: int, mode: str = "max") -> tuple[int, int]:
    """(trials whose `metric` at the grace period was better than its value at initialisation (above it for
    mode "max", below for "min"), trials that reached the grace period): ASHA's first cut compares trials there, and
    a cut on a metric still at its initial value is a cut on noise."""
    above = reached = 0
    for r in results:
        h = r.metrics_dataframe
        if h is None or metric not in h or "metric_at_init" not in h or not (h["epoch"] == grace_period).any():
            continue
        reached += 1
        init = h["metric_at_init"].dropna()
        at_grace = float(h.loc[h["epoch"] == grace_period, metric].iloc[-1])
        better = at_grace > float(init.iloc[0]) if mode == "max" else at_grace < float(init.iloc[0])
        above += bool(len(init)) and better
    return above, reached


def finish(cfg: PipelineConfig, run: OpenRun, results, space, data: dict,
           test_data: dict | None = None, discrete: tuple[int, ...] = ()) -> StageResult:
    """Log the result table (Parquet, CSV) and plot, list failed and collapsed trials, pick the best non-collapsed
    (trial, epoch) on validation data, measure it again on the test split (`best/*`), log its sample and
    reconstruction grids and its model, and register it as `<name>-gwae` with alias `candidate`. When every trial
    collapsed, nothing is registered."""
    tracker, run_id = run.tracker, run.run_id
    t = cfg.tune
    table = result_table(results, space, t.metric, t.mode, t.epochs)
    failed = table[table["outcome"] == "failed"]
    for _, row in failed.iterrows():
        print(f"[tune] failed trial {row['trial_id']}: {row['error']}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        table.to_parquet(Path(d) / "trials.parquet", index=False)
        table.to_csv(Path(d) / "trials.csv", index=False)
        (Path(d) / "objective_vs_params.png").write_bytes(objective_plot(table, space, t.metric))
        tracker.log_artifacts(run_id, d, "results")
    trial_epochs = int(table["epochs"].sum())
    collapsed = int(table["collapsed"].fillna(0).astype(bool).sum()) if "collapsed" in table else 0
    counts = {"search/trials": len(table), "search/failed_trials": len(failed), "search/trial_epochs": trial_epochs,
              "search/stopped_early": int((table["outcome"] == "stopped_early").sum()),
              "search/collapsed_trials": collapsed}
    if t.scheduler == "asha":
        above, reached = asha_check(results, t.metric, t.grace_period, t.mode)
        counts["search/asha_above_init"] = above
        if reached and above < reached:
            print(f"[tune] warning: at ASHA's grace period ({t.grace_period} epochs) {t.metric} was better than its value "
                  f"at initialisation in only {above} of {reached} trials; cuts there rank noise: raise "
                  f"tune.grace_period or tune.steps_per_epoch", flush=True)
    run.log_metrics(counts)
    if len(failed) == len(table):
        raise SearchError(f"every one of the {len(table)} trials failed; first error: {failed.iloc[0]['error']}. "
                          f"Fix the cause, then `vaepipe tune CONFIG --resume` re-runs them")
    best = results.get_best_result("selection", t.mode, scope="all", filter_nan_and_inf=True)
    history = best.metrics_dataframe
    best_row = history.loc[history["selection"].idxmax() if t.mode == "max" else history["selection"].idxmin()]
    if bool(best_row.get("collapsed", 0)):
        print(f"[tune] {len(table)} trials ({len(failed)} failed, {collapsed} collapsed): every trained epoch "
              f"collapsed (reconstructions that ignore the input, or samples without variety); nothing registered. "
              f"Train longer (tune.epochs, tune.steps_per_epoch) or narrow the space", flush=True)
        run.set_tags({"vaepipe.best_trial": "none (all collapsed)"})
        return StageResult(STAGE, run_id, metrics={"search/collapsed_trials": float(collapsed)})
    checkpoint = best.get_best_checkpoint("selection", t.mode)
    if checkpoint is None:
        raise SearchError(f"the best trial ({best.path}) kept no checkpoint; raise tune.keep_checkpoints")
    with checkpoint.as_directory() as d:
        payload = load_checkpoint(Path(d))
    model, sampled = GWAE(GWAEConfig.from_dict(payload["gwae"])), payload["sampled"]
    model.load_state_dict(payload["model"])
    model.eval()
    if test_data is not None:  # the chosen model on data no choice has seen
        measured = evaluate(model, test_data, discrete, torch.device("cpu"), seed=t.seed)
        measured["objective"] = objective(measured, t.objective_weights)
        best_metrics = {f"best/{k}": float(measured[k]) for k in TEST_METRICS if k in measured}
    else:
        best_metrics = {f"best/{k}": float(best_row[k]) for k in _LAST_COLUMNS if k in best_row}
    best_metrics[f"best/val_{t.metric}"] = float(best_row[t.metric])
    best_metrics["best/epoch"] = float(best_row["epoch"])
    run.log_metrics(best_metrics, step=int(best_row["epoch"]))
    best_metrics["search/collapsed_trials"] = float(collapsed)
    best_id = Path(best.path).name.removeprefix("trial_")
    tracker.log_params(run_id, {f"best.{k}": v for k, v in sampled.items()})
    run.set_tags({"vaepipe.best_trial": best_id})
    x = torch.from_numpy(data["eval_images"][:16].astype(np.float32) / 255.0)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "best_samples.png").write_bytes(png_bytes(sample_grid(model.sample(36), nrow=6),
                                                             "samples of the best trial's GWAE"))
        (Path(d) / "best_reconstructions.png").write_bytes(png_bytes(
            reconstruction_grid(x, model.reconstruct(x)), "pairs: validation input | its reconstruction"))
        tracker.log_artifacts(run_id, d, "pictures")
    logged_uri = tracker.log_pytorch_model(run_id, model, name="model", input_example=data["eval_images"][:1])
    name = f"{cfg.name}-gwae"
    version = tracker.register_model(logged_uri, name, alias="candidate",
                                     tags={"vaepipe.run_id": run_id, "vaepipe.trial_id": best_id})
    describe_version(tracker, name, version, cfg, run_id)
    print(f"[tune] {len(table)} trials ({len(failed)} failed, {collapsed} collapsed, {trial_epochs} trial-epochs); "
          f"best trial {best_id} (chosen on val: {t.metric} {best_row[t.metric]:.4g} at epoch "
          f"{int(best_row['epoch'])}) with {sampled}", flush=True)
    if test_data is not None:
        m = best_metrics
        dci_text = f"dci {m['best/dci']:.3f}  " if "best/dci" in m else ""
        print(f"[tune] best model on the test split: psnr {m['best/psnr']:.2f} dB (mean image "
              f"{m['best/mean_image_psnr']:.2f})  reconstruction spread {m['best/recon_spread']:.3f} vs data "
              f"{m['best/data_spread']:.3f}  {dci_text}OoD auroc {m['best/auroc']:.3f} (critic), "
              f"{m['best/auroc_prior']:.3f} (prior baseline)", flush=True)
    print(f"[tune] registered {name} version {version} (alias candidate): models:/{name}@candidate", flush=True)
    return StageResult(STAGE, run_id, model_uri=f"models:/{name}@candidate", registered_model=name,
                       registered_version=str(version),
                       metrics={k.removeprefix("best/"): v for k, v in best_metrics.items()})


def summary_line(result: StageResult) -> str:
    """One line of what the tune stage left, for the pipeline's summary: the registered GWAE's test-split figures, or
    that every trial collapsed."""
    m = {k.removeprefix("best/"): v for k, v in result.metrics.items()}
    collapsed = int(m.get("search/collapsed_trials", 0))
    if not result.registered_model:
        return f"GWAE: nothing registered ({collapsed} trial(s) collapsed)"
    parts = [f"psnr {m['psnr']:.1f} dB (mean image {m['mean_image_psnr']:.1f})" if "psnr" in m else "",
             f"reconstruction spread {m['recon_spread']:.3f} vs data {m['data_spread']:.3f}" if "recon_spread" in m
             else "",
             f"dci {m['dci']:.3f}" if "dci" in m else "",
             f"OoD auroc {m['auroc']:.3f} critic / {m['auroc_prior']:.3f} prior baseline" if "auroc_prior" in m
             else ""]
    return (f"GWAE {result.registered_model} v{result.registered_version} on the test split: "
            + ", ".join(p for p in parts if p) + f"; {collapsed} collapsed trial(s) never selected")
