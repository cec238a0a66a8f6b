"""Stage 2 — ncp: noise-contrastive priors on a frozen NVAE, one classifier per latent group, groups in parallel.

    vaepipe ncp configs/demo.yaml --model models:/demo-nvae@candidate [--resume] [--set ncp.steps=500]

Recipe: the driver loads the registered NVAE by URI, freezes it and puts it in Ray's object store once; one Ray task
per latent group trains that group's classifier (`vae.ncp.train_group_classifier`) on its own data reader, sized by
`ncp.cpus_per_group` / `ncp.gpus_per_group`. Each finished classifier is logged to the MLflow run at once, so a group
that fails (after Ray's retries) loses nothing already trained, and `--resume` trains only the missing groups. The
composite NCP-VAE is evaluated on the val split (per-group accuracy and NCE loss, the KL-reduction estimate, base vs
SIR vs Langevin samples by the Fréchet distance in vaepipe's own feature space, and Inception FID/KID when weights are
configured) and registered as `<name>-ncp`.
"""
from __future__ import annotations

import hashlib
import io
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipelines import checkpoints
from pipelines.config import PipelineConfig
from pipelines.data import ParquetImageReader, load_split, read_manifest
from pipelines.errors import ConfigError
from pipelines.ray_env import init_ray, use_assigned_cpus
from pipelines.registry import load_registered
from pipelines.reporting import StageResult, png_bytes
from pipelines.sample_quality import reference_binarize, sample_quality_metrics
from pipelines.tracking import OpenRun, Tracker, stage_run
from pipelines.tracking.cards import describe_version
from vae.metrics import sample_grid
from vae.ncp import NCPVAE, NCPConfig, classifier_for, freeze, train_group_classifier

STAGE = "ncp"
CLASSIFIER_DIR = "classifiers"
CHECKPOINT_KIND = "ncp-classifier"


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: the frozen VAE must come out of the stage bit-identical."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _batches_fn(data_path: str, batch_size: int, seed: int, binarize: str = "none"):
    # The data protocol the VAE was trained under: with dynamic binarisation training draws change every epoch and
    # validation draws are fixed by the seed.
    readers = {
        "train": ParquetImageReader(data_path, "train", batch_size=batch_size, shuffle=True, seed=seed,
                                    drop_last=True, binarize=binarize),
        "val": ParquetImageReader(data_path, "val", batch_size=batch_size, verify=False, binarize=binarize,
                                  seed=seed),
    }

    def batches(split: str):
        for batch in readers[split]:
            yield batch["image"]

    return batches


def train_group(vae, k: int, data_path: str, ncp_config: dict, binarize: str = "none") -> dict[str, Any]:
    """One Ray task: the classifier of latent group k. Returns its weights (bytes), history and timing."""
    import os

    cfg = NCPConfig.from_dict(ncp_config)
    use_assigned_cpus()  # groups share the cores; torch would take them all
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.gpus_per_group > 0 else "cpu")
    vae = vae.to(device)
    started = time.time()

    shown_at = [0]

    def progress(step: int, metrics: dict[str, float]) -> None:
        if step < shown_at[0] + cfg.steps / 3 and step < cfg.steps:
            return  # about three lines per group: the driver adds one when the group is done
        shown_at[0] = step
        shown = "  ".join(f"{name.split('/')[1]} {v:.3f}" for name, v in metrics.items() if name.startswith("val/"))
        print(f"[ncp] group {k:02d}  step {step}/{cfg.steps}  {shown}", flush=True)

    classifier, history = train_group_classifier(vae, k, _batches_fn(data_path, cfg.batch_size, cfg.seed + k, binarize),
                                                 cfg, progress=progress)
    buf = io.BytesIO()
    torch.save({k_: v.cpu() for k_, v in classifier.state_dict().items()}, buf)
    return {"group": k, "state": buf.getvalue(), "history": history, "start": started, "end": time.time(),
            "pid": os.getpid()}


def _load_classifiers(run: OpenRun, vae, cfg: NCPConfig) -> dict[int, Any]:
    """Classifiers an earlier attempt of this run already logged (for --resume): complete checkpoints only."""
    found: dict[int, Any] = {}
    for art in run.tracker.list_artifacts(run.run_id, CLASSIFIER_DIR):
        name = Path(art.path).name
        if not (art.is_dir and name.startswith("group_")):
            continue
        local = run.tracker.download_artifacts(run.run_id, art.path)
        if not checkpoints.is_complete(local):
            continue  # cut off while it was being logged: trained again
        state = checkpoints.load(local, kind=CHECKPOINT_KIND)
        clf = classifier_for(vae, state["group"], cfg)
        clf.load_state_dict(state["classifier"])
        found[state["group"]] = clf.eval()
    return found


def run_ncp(
    cfg: PipelineConfig,
    tracker: Tracker | None = None,
    *,
    model_uri: str | None = None,
    parent_run_id: str | None = None,
    resume: bool | str = False,
    ray_address: str | None = None,
) -> StageResult:
    """Train the NCP classifiers of a registered NVAE on Ray, evaluate and register the NCP-VAE."""
    model_uri = model_uri or f"models:/{cfg.name}-nvae@candidate"
    manifest = read_manifest(cfg.data.path)
    tracker = tracker or Tracker.connect(cfg.tracking)
    vae = load_registered(tracker, model_uri)
    if type(vae).__name__ != "NVAE":
        raise ConfigError(f"--model: {model_uri} is a {type(vae).__name__}, not an NVAE; pass models:/<name>-nvae@ALIAS")
    if tuple(vae.cfg.image_shape) != tuple(manifest.shape):
        raise ConfigError(f"--model: {model_uri} was trained on images {list(vae.cfg.image_shape)}, the data at "
                          f"{cfg.data.path} are {list(manifest.shape)}; point data.path at the model's data set")
    freeze(vae)
    before = fingerprint(vae)
    with stage_run(tracker, cfg, STAGE, parent_run_id=parent_run_id, resume=resume, data_path=cfg.data.path,
                   splits=("train", "val", "test"), source_model=model_uri) as run:
        result = _train_and_register(cfg, run, vae, model_uri, ray_address)
        after = fingerprint(vae)
        if after != before:
            raise RuntimeError(f"the frozen VAE changed during the ncp stage ({before[:12]} → {after[:12]})")
        run.set_tags({"vaepipe.vae_fingerprint": after})
    return result


def group_task_options(n) -> dict[str, Any]:
    """Ray options of a group's classifier task. SPREAD puts the groups on as many nodes as have room (PACK would fill
    one node first), so losing a node costs few groups. A group whose node dies is a system failure that Ray retries
    on another node (max_retries); a RuntimeError inside the task is retried too. Groups that finished are already
    back on the driver and logged, so nothing finished is lost."""
    return {"num_cpus": n.cpus_per_group, "num_gpus": n.gpus_per_group, "scheduling_strategy": "SPREAD",
            "max_retries": 2, "retry_exceptions": [RuntimeError]}


def _train_and_register(cfg: PipelineConfig, run: OpenRun, vae, model_uri: str,
                        ray_address: str | None) -> StageResult:
    import ray

    tracker, run_id = run.tracker, run.run_id
    n = cfg.ncp
    classifiers = _load_classifiers(run, vae, n)
    todo = [k for k in range(vae.num_groups) if k not in classifiers]
    if classifiers:
        print(f"[ncp] {len(classifiers)} group(s) already trained in run {run_id}; training {todo}", flush=True)
    init_ray(ray_address)
    task = ray.remote(train_group).options(**group_task_options(n))
    vae_ref = ray.put(vae)
    pending = {task.remote(vae_ref, k, cfg.data.path, n.to_dict(), cfg.data.binarize): k for k in todo}
    print(f"[ncp] {len(todo)} classifier task(s) on Ray ({n.cpus_per_group} CPU, {n.gpus_per_group} GPU each); "
          f"MLflow run {run_id}", flush=True)
    t0 = time.time()
    spans, failures = [], {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except Exception as e:  # retried by Ray already; keep the others going and report at the end
            failures[k] = e
            print(f"[ncp] group {k:02d} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        clf = classifier_for(vae, k, n)
        clf.load_state_dict(torch.load(io.BytesIO(out["state"]), map_location="cpu"))
        classifiers[k] = clf.eval()
        _log_group(cfg, run, k, out, t0)
        spans.append((out["start"], out["end"]))
        print(f"[ncp] group {k:02d} done: val accuracy {out['history']['best_val_accuracy']:.3f}, "
              f"{out['end'] - out['start']:.0f} s", flush=True)
    if failures:
        raise RuntimeError(
            f"ncp: group(s) {sorted(failures)} failed after retries ({next(iter(failures.values()))}); the "
            f"{len(classifiers)} finished classifier(s) are saved in run {run_id}: rerun with --resume to train the rest"
        )
    wall = time.time() - t0
    busy = sum(e - s for s, e in spans)
    run.log_metrics({"ncp/wall_seconds": wall, "ncp/task_seconds": busy,
                     "ncp/parallelism": busy / wall if wall > 0 else 0.0})

    model = NCPVAE(vae, [classifiers[k] for k in range(vae.num_groups)], n)
    metrics = evaluate_ncp(cfg, run, model)
    uri = tracker.log_pytorch_model(run_id, model, name="model",
                                    input_example=torch.zeros(1, *vae.cfg.image_shape).numpy())
    name = f"{cfg.name}-ncp"
    version = tracker.register_model(uri, name, alias="candidate", tags={"vaepipe.run_id": run_id,
                                                                          "vaepipe.source_model": model_uri})
    describe_version(tracker, name, version, cfg, run_id)
    print(f"[ncp] registered {name} version {version} (alias candidate): models:/{name}@candidate", flush=True)
    return StageResult(STAGE, run_id, model_uri=f"models:/{name}@candidate", registered_model=name,
                       registered_version=str(version), metrics=metrics)


def _log_group(cfg: PipelineConfig, run: OpenRun, k: int, out: dict[str, Any], t0: float) -> None:
    """A finished group: its training curves and timing, and its classifier as a checkpoint directory
    (`classifiers/group_KK`), logged at once so that a later failure loses nothing already trained."""
    history = out["history"]
    for i, step in enumerate(history["step"]):
        row = {f"{m.split('_', 1)[0]}/{m.split('_', 1)[1]}/group_{k:02d}": history[m][i]
               for m in ("train_nce_loss", "train_accuracy", "val_nce_loss", "val_accuracy")}
        run.log_metrics(row, step=step)
    run.log_metrics({f"best/val_accuracy/group_{k:02d}": history["best_val_accuracy"],
                     f"best/val_nce_loss/group_{k:02d}": history["best_val_nce_loss"],
                     f"ncp/task_seconds/group_{k:02d}": out["end"] - out["start"],
                     # when the task ran, in seconds from the stage's submission: shows the overlap
                     f"ncp/task_start/group_{k:02d}": out["start"] - t0,
                     f"ncp/task_end/group_{k:02d}": out["end"] - t0})
    state = torch.load(io.BytesIO(out["state"]), map_location="cpu")
    with tempfile.TemporaryDirectory() as d:
        directory = checkpoints.save(Path(d) / f"group_{k:02d}", {
            "classifier": state, "group": k, "step": cfg.ncp.steps, "history": history,
        }, cfg, kind=CHECKPOINT_KIND)
        run.tracker.log_artifacts(run.run_id, directory, artifact_path=f"{CLASSIFIER_DIR}/group_{k:02d}")


def evaluate_ncp(cfg: PipelineConfig, run: OpenRun, model) -> dict[str, float]:
    """On the val split (the test split stays for `vaepipe evaluate`): the KL-reduction estimate per group, log Z of
    the top group, and base vs SIR vs Langevin samples scored by the Fréchet distance in vaepipe's own feature space
    (`val/fd_vaepipe_<method>`, with precision/recall; the extractor is trained once per dataset and reused), plus
    Inception FID/KID when `ncp.inception_weights` is set."""
    tracker, run_id = run.tracker, run.run_id
    n = cfg.ncp
    split = "val" if _has_split(cfg.data.path, "val") else "test"
    metrics: dict[str, float] = {}
    reader = ParquetImageReader(cfg.data.path, split, batch_size=n.sample_batch_size, verify=False,
                                binarize=cfg.data.binarize, seed=n.seed)
    gain = model.ncp_gain((b["image"] for b in reader))
    for k, g in enumerate(gain["gain"]):
        metrics[f"{split}/kl_reduction/group_{k:02d}"] = g
    metrics[f"{split}/kl_reduction_total"] = gain["total"]
    metrics["ncp/log_z/group_00"] = model.log_z_estimate(0)

    reference = reference_binarize(model, cfg.data.binarize)  # grey levels for a Bernoulli decoder's pictures
    real = load_split(cfg.data.path, split, binarize=reference, seed=n.seed)["image"]
    real = real[:min(n.eval_samples, len(real))]
    grids: dict[str, torch.Tensor] = {}

    def draw(count: int, method: str) -> torch.Tensor:
        t = time.perf_counter()
        torch.manual_seed(n.seed)
        fake = model.sample(count, method=method)
        metrics[f"ncp/sample_seconds_{method}"] = time.perf_counter() - t
        if method == "sir" and "ess" in model.last_stats:
            ess = model.last_stats["ess"]
            metrics["ncp/sir_ess"] = float(sum(ess) / len(ess)) if isinstance(ess, (list, tuple)) else float(ess)
        grids[method] = fake[:36]
        return fake

    scores, tags = sample_quality_metrics(tracker, cfg.data.path, real, draw, ("base", "sir", "langevin"),
                                          n.inception_weights or None, "ncp.inception_weights", "ncp")
    metrics.update({f"{split}/{key}": v for key, v in scores.items()})
    run.set_tags(tags)
    run.log_metrics(metrics)
    side = torch.cat([sample_grid(grids[m], nrow=6) for m in ("base", "sir", "langevin")], dim=2)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "samples_base_sir_langevin.png"
        p.write_bytes(png_bytes(side, "samples: base prior | NCP by SIR | NCP by Langevin"))
        tracker.log_artifact(run_id, p, artifact_path="pictures")
    print(f"[ncp] Fréchet distance in vaepipe's own features (not FID; lower is better), {len(real)} samples vs the "
          f"{split} split: " + ", ".join(f"{m} {metrics[f'{split}/fd_vaepipe_{m}']:.2f}"
                                         for m in ("base", "sir", "langevin")), flush=True)
    if f"{split}/judge_recognised_base" in metrics:
        print(f"[ncp] judge of samples, recognised (p >= 0.9), {len(real)} samples: " + ", ".join(
            f"{m} {metrics[f'{split}/judge_recognised_{m}']:.2f}" for m in ("base", "sir", "langevin"))
            + f", real {split} images {metrics[f'{split}/judge_recognised_real']:.2f}", flush=True)
    if f"{split}/inception_fid_sir" in metrics:
        print(f"[ncp] Inception FID ({len(real)} samples; published FIDs use 50k): " + ", ".join(
            f"{m} {metrics[f'{split}/inception_fid_{m}']:.2f}" for m in ("base", "sir", "langevin")), flush=True)
    # The stage's result (and `vaepipe run`'s summary table) carries the scores; timings and ESS stay in MLflow.
    return {k: v for k, v in metrics.items() if math.isfinite(v) and k.startswith(f"{split}/")}


def _has_split(path: str, split: str) -> bool:
    return read_manifest(path).splits.get(split, 0) > 0
