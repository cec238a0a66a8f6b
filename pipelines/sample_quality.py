"""Sample-quality services shared by `vaepipe evaluate` and the ncp stage: the in-project feature extractor, trained
once per dataset and kept in MLflow, Inception weights from a path or an MLflow artifact, and progress lines with an
ETA for the long evaluation passes.

The extractor (`vae.quality.SampleQuality`) defines the feature space of `fd_vaepipe`, so every score must come from
the same one. It lives in the MLflow experiment `vaepipe/feature-extractors`, one FINISHED run per dataset content and
recipe, tagged `vaepipe.dataset_sha256` (the manifest's content digest) and `vaepipe.extractor_key` (the recipe and the
extractor code's version); the first caller trains and logs it, every later one downloads it. Scores name the run
they were computed with (`vaepipe.feature_extractor_run`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipelines.data import load_split, read_manifest
from pipelines.errors import ConfigError
from pipelines.reporting import Ticker
from pipelines.tracking import dataset_tag
from pipelines.tracking.runs import service_run
from vae.quality import (
    DEFAULT_RECIPE, EXTRACTOR_VERSION, INCEPTION_WEIGHTS_FILE, JUDGE_RECIPE, InceptionScores, SampleQuality,
    inception_weights_help,
)

EXPERIMENT = "feature-extractors"
STAGE = "feature_extractor"
ARTIFACT_DIR = "extractor"
ARTIFACT_FILE = "sample_quality.pt"


# ---------------------------------------------------------------------------------------------- feature extractor


def extractor_key(recipe: dict[str, Any] | None = None) -> str:
    """16 hex digits naming the extractor's recipe and code version: a different key is a different feature space."""
    content = {"version": EXTRACTOR_VERSION, "recipe": {**DEFAULT_RECIPE, **(recipe or {})}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def find_extractor_run(tracker, dataset_sha256: str, key: str):
    """The newest FINISHED extractor run for this data content and recipe, or None."""
    runs = tracker.find_runs(
        EXPERIMENT, stage=STAGE, max_results=1,
        filter_string=(f"tags.`vaepipe.dataset_sha256` = '{dataset_sha256}' and "
                       f"tags.`vaepipe.extractor_key` = '{key}' and attributes.status = 'FINISHED'"),
    )
    return runs[0] if runs else None


def feature_extractor(tracker, data_path: str, recipe: dict[str, Any] | None = None, role: str = "feature extractor"):
    """(SampleQuality, run_id): the extractor of the dataset at `data_path`, downloaded from MLflow when one was
    logged for the same content and recipe, else trained on its train split (labels when every image has one,
    rotations otherwise), logged, and returned. Prints what it does (naming it `role`), and an ETA while training."""
    manifest = read_manifest(data_path)
    sha, key = manifest.sha256, extractor_key(recipe)
    run = find_extractor_run(tracker, sha, key)
    if run is not None:
        local = tracker.download_artifacts(run.info.run_id, f"{ARTIFACT_DIR}/{ARTIFACT_FILE}")
        quality = SampleQuality.from_state(torch.load(local, map_location="cpu", weights_only=True))
        acc = run.data.metrics.get("val/accuracy")
        print(f"[quality] {role} of {manifest.name} (sha256 {sha[:12]}): reusing run {run.info.run_id}"
              + (f" (held-out accuracy {acc:.3f})" if acc is not None else ""), flush=True)
        return quality, run.info.run_id
    return _train_and_log(tracker, data_path, manifest, key, recipe or {}, role)


def sample_judge(tracker, data_path: str):
    """(SampleQuality, run_id) of the judge of samples (`vae.quality.JUDGE_RECIPE`: a second classifier, trained on
    the labels with blobs and shuffled pixels as "not a class", never used to select anything), cached in MLflow like
    the extractor; (None, None) when the data set has no labels to judge by."""
    manifest = read_manifest(data_path)
    if not manifest.label_names:
        return None, None
    judge, run_id = feature_extractor(tracker, data_path, JUDGE_RECIPE, role="judge of samples")
    return (judge, run_id) if judge.task == "labels" else (None, None)


def _train_and_log(tracker, data_path: str, manifest, key: str, recipe: dict[str, Any], role: str):
    train = load_split(data_path, "train")
    labels = train["label"] if manifest.label_names and int(train["label"].min()) >= 0 else None
    task = "labels" if labels is not None else "rotations"
    tags = {"vaepipe.dataset": dataset_tag(data_path), "vaepipe.dataset_sha256": manifest.sha256,
            "vaepipe.extractor_key": key}
    name = f"{manifest.name}-{manifest.sha256[:8]}-{role.split()[0]}"  # digits-1a2b3c4d-feature / -judge
    with service_run(tracker, EXPERIMENT, STAGE, tags, run_name=name) as run:
        run_id = run.run_id
        print(f"[quality] no {role} for {manifest.name} (sha256 {manifest.sha256[:12]}) yet: training one "
              f"on {len(train['image'])} train images ({task}), once; MLflow run {run_id} in vaepipe/{EXPERIMENT}",
              flush=True)
        epochs = {**_default_recipe(), **recipe}["epochs"]
        ticker = Ticker("quality", epochs, "epochs", every_s=5.0)

        def progress(info: dict[str, Any]) -> None:
            ticker(info["epoch"], f"loss {info['train_loss']:.3f}  held-out accuracy {info['val_accuracy']:.3f}")
            run.log_metrics({"train/loss": info["train_loss"], "val/accuracy": info["val_accuracy"]},
                            step=info["epoch"])

        quality = SampleQuality.fit(train["image"], labels, progress=progress, **recipe)
        tracker.log_params(run_id, {**{f"recipe.{k}": v for k, v in quality.recipe.items()}, "task": quality.task,
                                    "train_images": len(train["image"])})
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / ARTIFACT_FILE
            torch.save(quality.state(), path)
            tracker.log_artifact(run_id, path, artifact_path=ARTIFACT_DIR)
    return quality, run_id


def _default_recipe() -> dict[str, Any]:
    return dict(DEFAULT_RECIPE)


# ---------------------------------------------------------------------------------------------- Inception weights


def inception_weights_path(tracker, spec: str, where: str) -> str:
    """A local file for the Inception weights named by `spec`: a local path (or file:// URI), or an MLflow artifact
    URI (runs:/RUN_ID/PATH, mlflow-artifacts:/..., models:/..., s3://..., any URI MLflow can download). `where` is
    the setting that holds `spec`, for the error messages."""
    spec = spec.strip()
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    if "://" not in spec and not spec.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"{where}: no Inception weights at {path!r}. {inception_weights_help(where + ' PATH')}")
        return path
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=spec, tracking_uri=tracker.tracking_uri)
    except Exception as e:
        raise ConfigError(f"{where}: cannot download {spec!r} from MLflow ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}). {inception_weights_help(where + ' URI')}") from None
    if os.path.isdir(local):  # an artifact directory: the weights file inside it
        inside = os.path.join(local, INCEPTION_WEIGHTS_FILE)
        if not os.path.isfile(inside):
            raise ConfigError(f"{where}: {spec!r} is a directory without {INCEPTION_WEIGHTS_FILE}; point at the file")
        local = inside
    return local


def inception_scorer(tracker, spec: str, where: str):
    """`vae.quality.InceptionScores` on the weights named by `spec`, on CUDA when there is one."""
    path = inception_weights_path(tracker, spec, where)
    try:
        return InceptionScores(path, device="cuda" if torch.cuda.is_available() else "cpu", where=where + " PATH")
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def inception_features(scorer, images: torch.Tensor, label: str) -> torch.Tensor:
    """Pool features with a progress line: Inception at 299×299 takes about 0.1-0.3 s per image on a CPU core."""
    ticker = Ticker(label, len(images), "images")
    return scorer.features(images, progress=lambda done, total: ticker(done))


# ---------------------------------------------------------------------------------------------- scoring samples


def reference_binarize(model, binarize: str) -> str:
    """How to draw the real images that a model's samples are scored against, given the data protocol `binarize` it
    was trained under: as grey levels when its pictures are pixel probabilities (the mean of a Bernoulli decoder
    estimates the expectation of the binarised data, which is the grey level), as the model's own data otherwise."""
    vae = getattr(model, "vae", model)
    return "none" if getattr(vae, "picture_mode", "sample") == "mean" else binarize


def sample_quality_metrics(tracker, data_path: str, real: torch.Tensor, sample_fn, methods, inception_weights,
                           where: str, label: str) -> tuple[dict[str, float], dict[str, str]]:
    """Scores of `sample_fn(n, method)` (n = len(real) images in [0, 1]) for each method (None: the model's only
    one) against `real`: `fd_vaepipe`, precision, recall, mean_max_prob in the dataset's cached extractor, and, when
    `inception_weights` names a file or artifact, `inception_fid`, `inception_kid`, `inception_kid_std`; names carry
    `_<method>`. On labelled data the judge of samples adds judge_confidence, judge_recognised and
    judge_class_entropy per method, and for `real` (`_real`: what real images score). Returns (metrics without a
    prefix, tags naming the feature extractor's and the judge's runs)."""
    quality, extractor_run = feature_extractor(tracker, data_path)
    judge, judge_run = sample_judge(tracker, data_path)
    inception = inception_scorer(tracker, inception_weights, where) if inception_weights else None
    n = len(real)
    f_real = inception_features(inception, real, f"{label}: Inception, {n} real images") if inception else None
    out: dict[str, float] = {}
    for method in methods:
        suffix = f"_{method}" if method else ""
        print(f"[{label}] sampling {n} images" + (f" by {method}" if method else ""), flush=True)
        fake = sample_fn(n, method)
        out.update({f"{key}{suffix}": float(value) for key, value in quality.score(real, fake).items()})
        if judge is not None:
            out.update({f"{key}{suffix}": value for key, value in judge.judge(fake).items()})
        if inception is not None:
            f_fake = inception_features(inception, fake, f"{label}: Inception, {n} samples{suffix.replace('_', ' ')}")
            scores = inception.score_features(f_real, f_fake)
            out.update({f"inception_fid{suffix}": scores["fid"], f"inception_kid{suffix}": scores["kid"],
                        f"inception_kid_std{suffix}": scores["kid_std"]})
    if inception is not None:
        out["inception_samples"] = float(n)
    tags = {"vaepipe.feature_extractor_run": extractor_run}
    if judge is not None:
        out.update({f"{key}_real": value for key, value in judge.judge(real).items()})  # the judge's ceiling
        tags["vaepipe.judge_run"] = judge_run
    return out, tags


def judge_temperatures(tracker, data_path: str, model, n: int, temperatures=(0.7, 1.0), seed: int = 0,
                       split: str = "val", bn_batches: int = 0) -> tuple[dict[str, float], dict[str, str]]:
    """The judge of samples on n samples of `model` at each temperature (`judge_<figure>_t<T>`; the decoder's BN
    statistics re-estimated at that temperature from `bn_batches` batches, NVAE's sampling protocol) and on n real
    images of `split` (`judge_<figure>_real`), seeded; ({}, {}) on unlabelled data. Prints one line."""
    if n <= 0:
        return {}, {}
    judge, run_id = sample_judge(tracker, data_path)
    if judge is None:
        return {}, {}
    out: dict[str, float] = {}
    for t in temperatures:
        with torch.random.fork_rng(), model.bn_readjusted(t, bn_batches):
            torch.manual_seed(seed)
            fake = model.sample(n, temperature=t)
        out.update({f"{key}_t{t:.1f}": value for key, value in judge.judge(fake.float().cpu()).items()})
    real = load_split(data_path, split)["image"][:n]
    out.update({f"{key}_real": value for key, value in judge.judge(real).items()})
    print("[quality] judge of samples, recognised (p >= 0.9): " + ", ".join(
        f"temperature {t:.1f} {out[f'judge_recognised_t{t:.1f}']:.2f}" for t in temperatures)
        + f", real {split} images {out['judge_recognised_real']:.2f}", flush=True)
    return out, {"vaepipe.judge_run": run_id}
