"""Stage 1 — train: an NVAE trained data-parallel on Ray Train (V2), tracked in MLflow, registered as `<name>-nvae`.

    vaepipe train configs/demo.yaml [--resume | --from-run RUN_ID] [--set train.epochs=5]

Recipe layout: the driver side is `run_train` (validate → open the MLflow run → fit → log and
register the model); the worker side is `train_loop_per_worker` (setup → train → save_checkpoint / load_checkpoint),
the only code that touches Ray Train. The model math lives in `vae/`.

Contracts kept here:
- the MLflow run is created on the driver and its id passed to the controller-side `MLflowReporter`, the one writer
  of metrics and pictures, so a restarted worker never opens a second run;
- `ray.train.report` is a barrier: every rank calls it at the same steps, rank 0 alone attaches the checkpoint;
- a checkpoint is one directory (model, EMA, optimizer, scheduler, scaler, step, epoch, RNG states, config) that
  counts only once its `COMPLETE` marker is written, and resume is exact on one CPU worker.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines import checkpoints, errors
from pipelines.config import PipelineConfig
from pipelines.data import ray_dataset, read_manifest, verify
from pipelines.data.readers import InMemoryShard, image_transform, iter_torch_batches
from pipelines.errors import ConfigError, TrainingError
from pipelines.ray_env import init_ray, interruptible, loopback_torch_config, storage_path, use_assigned_cpus
from pipelines.redaction import redact_mapping
from pipelines.reporting import Progress, StageResult, png_bytes
from pipelines.sample_quality import judge_temperatures
from pipelines.tracking import MetricSink, Tracker, find_resumable, stage_run
from pipelines.tracking.cards import describe_version

STAGE = "train"
CHECKPOINT_KIND = "train"
PICTURES_DIR = "pictures"


class Diverged(errors.Diverged):
    """Raised in a worker when the model diverged: every rank sees it at the same step (the figures are all-reduced),
    so the loop ends cleanly instead of failing a worker, which Ray would retry from a checkpoint only to diverge
    again. The code travels to the driver as the `train/diverged` metric."""

    # Codes of the `train/diverged` metric, which carries the divergence to the driver through MLflow.
    NONFINITE_UPDATES, NONFINITE_VALIDATION = 1.0, 2.0

    def __init__(self, code: float, message: str) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------------------
# The plan: numbers the driver works out once and every worker shares.


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    train_examples: int
    steps_per_epoch: int
    total_steps: int
    heartbeat_dir: str
    init_checkpoint: str | None = None  # --from-run: weights to start from
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedules still follow total_steps
    in_memory: bool = False  # each worker reads its share of the data once (InMemoryShard) instead of streaming
    data_path: str = ""  # the dataset as workers find it: absolute (their working directory is the run's)


def plan_steps(train_examples: int, world: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """(steps per epoch, total steps) for `batch_size` images per worker (the global batch / world)."""
    # Every rank must run the same number of steps (DDP and report() are barriers): the streaming split gives each
    # rank floor(N / world) rows, of which we use whole batches only.
    per_rank = train_examples // max(1, world)
    steps_per_epoch = per_rank // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.batch_size: the global batch of {batch_size * max(1, world)} ({batch_size} per worker × "
            f"{max(1, world)} workers) is larger than the {train_examples} training examples; lower train.batch_size"
        )
    return steps_per_epoch, steps_per_epoch * epochs


def lr_factor(step: int, warmup_steps: int, total_steps: int, lr: float, lr_min: float) -> float:
    """NVAE's schedule: linear warm-up, then cosine decay from lr to lr_min (as a factor of lr)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return (lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))) / lr


# ----------------------------------------------------------------------------------------------------------------
# Worker side.


@dataclasses.dataclass
class TrainState:
    model: torch.nn.Module
    ema: torch.optim.swa_utils.AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0
    epoch: int = 0
    skipped_total: int = 0
    skipped_in_row: int = 0

    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model


def ema_with_warmup(decay: float):
    """EMA whose decay ramps up as min(decay, (1+n)/(10+n)) over the n updates so far: with a fixed 0.999 the
    average of a short run would still be mostly the random initialisation."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - d)
        for e, p in zip(ema_params, params):
            if not e.is_floating_point():
                e.copy_(p)  # counters such as BN's num_batches_tracked

    return update


def setup(cfg: PipelineConfig, plan: TrainPlan, device: torch.device) -> TrainState:
    from vae import NVAE

    t = cfg.train
    model = NVAE(cfg.nvae).to(device)
    if device.type == "cuda" and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if t.use_ema:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_with_warmup(t.ema_decay), use_buffers=True)
    optimizer = torch.optim.Adamax(model.parameters(), lr=t.lr, eps=t.adamax_eps, weight_decay=t.weight_decay)
    warmup = int(round(t.warmup_epochs * plan.steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, plan.total_steps, t.lr, t.lr_min)
    )
    # Only fp16 needs loss scaling (bf16 has fp32's range); its state is checkpointed either way.
    use_scaler = device.type == "cuda" and t.amp == "fp16"
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=use_scaler)
    return TrainState(model, ema, optimizer, scheduler, scaler)


def autocast(cfg: PipelineConfig, device: torch.device):
    if device.type != "cuda" or cfg.train.amp == "none":
        return nullcontext()  # CPU runs stay fp32: the safe default; bf16 is a switch
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def training_step(state: TrainState, ddp_model: torch.nn.Module, x: torch.Tensor | list[torch.Tensor],
                  cfg: PipelineConfig, device: torch.device, total_steps: int) -> dict[str, torch.Tensor | float]:
    """One update. Owns the loss, the non-finite check and the gradient skip with a cap on skips in a row.

    `x` is one batch, or the micro-batches of one step when an elastic run has fewer workers than its maximum: their
    gradients are accumulated (each loss over their number; DDP all-reduces only after the last), so the update is
    the one of their union. The skip decision reads the gradient norm after DDP's all-reduce, so every rank decides
    the same way."""
    t = cfg.train
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    state.model.set_step(state.step, total_steps)
    state.optimizer.zero_grad(set_to_none=True)
    outs = []
    for i, xi in enumerate(xs):
        last = i == len(xs) - 1
        with nullcontext() if last or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync():
            with autocast(cfg, device):
                out = ddp_model(xi)
            state.scaler.scale(out.loss / len(xs) if len(xs) > 1 else out.loss).backward()
        outs.append(out)
    state.scaler.unscale_(state.optimizer)
    # grad_clip = 0 measures the norm (for the skip rule and the logs) without clipping.
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), t.grad_clip or math.inf)
    norm = grad_norm.item()  # the one device sync of a step that does not log
    bad = not math.isfinite(norm) or (t.skip_grad_norm > 0 and norm > t.skip_grad_norm)
    if bad and not state.scaler.is_enabled():
        state.optimizer.zero_grad(set_to_none=True)
        state.skipped_total += 1
        state.skipped_in_row += 1
        if state.skipped_in_row > t.max_skipped_steps:
            raise Diverged(
                Diverged.NONFINITE_UPDATES,
                f"{state.skipped_in_row} updates in a row had a non-finite loss or gradient (last loss "
                f"{out.loss.item():.4g}, grad norm {grad_norm.item():.4g}). Likely fixes: lower train.lr, raise "
                f"nvae.lambda_sr (or set nvae.sr_anneal=true), lower train.grad_clip; check the data for NaNs."
            )
    else:
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.skipped_in_row = 0
        if state.ema is not None:
            state.ema.update_parameters(state.model)
    state.scheduler.step()
    state.step += 1
    # Detached tensors, no device sync per step: the loop turns them into floats (step_metrics) on logging steps.
    kl = torch.cat([o.kl_per_group.detach() for o in outs])
    stats: dict[str, torch.Tensor | float] = {
        "train/loss": torch.stack([o.loss.detach() for o in outs]).mean(),
        "train/nelbo": torch.cat([o.nelbo.detach() for o in outs]).mean(),
        "train/recon": torch.cat([o.recon.detach() for o in outs]).mean(),
        "train/kl": kl.sum(1).mean(),
        "train/grad_norm": grad_norm.detach(),
        "train/lr": state.optimizer.param_groups[0]["lr"],
        "train/kl/group": kl.mean(0),  # (L,), logged as train/kl/group_NN
    }
    for key in ("beta", "lambda_sr", "sr_loss", "bn_loss", "cr_kl", "sigma", "equivalent_beta"):
        if key in out.stats:
            v = out.stats[key]
            stats[f"train/{key}"] = v.detach().float().mean() if torch.is_tensor(v) else float(v)
    return stats


def step_metrics(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """training_step's statistics as floats, read from the device in one transfer; the per-group KL (L,) becomes
    train/kl/group_00 ... group_{L-1}."""
    tensors = [v.reshape(-1).float() for v in stats.values() if torch.is_tensor(v)]
    values = torch.cat(tensors).tolist() if tensors else []
    metrics: dict[str, float] = {}
    for key, v in stats.items():
        if not torch.is_tensor(v):
            metrics[key] = float(v)
            continue
        mine, values = values[: v.numel()], values[v.numel():]
        if key == "train/kl/group":
            metrics.update({f"train/kl/group_{i:02d}": x for i, x in enumerate(mine)})
        else:
            metrics[key] = mine[0]
    return metrics


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(state: TrainState, directory: Path, cfg: PipelineConfig, batches_into_epoch: int) -> None:
    """Write one checkpoint directory (pipelines.checkpoints: the marker goes last)."""
    checkpoints.save(directory, {
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "batches_into_epoch": batches_into_epoch,
        "skipped_total": state.skipped_total,
        "rng": _rng_state(),
        "config": redact_mapping(cfg.to_dict()),  # checkpoints become artifacts: no credentials in them
    }, cfg, kind=CHECKPOINT_KIND)


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    return checkpoints.load(directory, kind=CHECKPOINT_KIND)


def load_checkpoint(state: TrainState, payload: dict[str, Any], restore_rng: bool) -> int:
    """Restore everything a checkpoint holds; returns how many batches of the current epoch were already done."""
    state.model.load_state_dict(payload["model"])
    if state.ema is not None and payload.get("ema") is not None:
        state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.scaler.load_state_dict(payload["scaler"])
    state.step, state.epoch = payload["step"], payload["epoch"]
    state.skipped_total = payload.get("skipped_total", 0)
    if restore_rng:
        _set_rng_state(payload["rng"])
    return payload.get("batches_into_epoch", 0)


def _all_reduce_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


@torch.no_grad()
def evaluate(state: TrainState, batches, cfg: PipelineConfig, device: torch.device, world: int) -> dict[str, float]:
    """Validation negative ELBO, bits/dim and importance-weighted NLL (small K) of the EMA model, summed over ranks.

    Every figure is a discrete likelihood (Gaussian decoders score 8-bit bins in eval mode) divided by the pixels the
    loss scores (`model.scored_dims`, the central crop); a Gaussian decoder's continuous density, the training
    objective's scale, is logged as val/nelbo_continuous_nats."""
    from vae.metrics import importance_weighted_nll

    model = state.eval_model()
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # nelbo, n, iw_nll, n_iw, continuous nelbo
    iw_budget = cfg.train.val_iw_examples
    for batch in batches:
        x = batch.to(device)
        out = model(x)
        sums[0] += out.nelbo.double().sum()
        sums[1] += x.shape[0]
        if "nelbo_continuous" in out.stats:
            sums[4] += out.stats["nelbo_continuous"].double() * x.shape[0]
        if iw_budget > 0:
            xi = x[:iw_budget]
            try:
                sums[2] += importance_weighted_nll(model, xi, k=cfg.train.val_iw_samples).double().sum()
            except RuntimeError:
                if torch.isfinite(out.nelbo).all():
                    raise
                sums[2] += math.nan  # a broken model: the figure is logged as NaN and the loop ends the run
            sums[3] += xi.shape[0]
            iw_budget -= xi.shape[0]
    model.train()
    sums = _all_reduce_sum(sums, world)
    dims = model.scored_dims
    nelbo = (sums[0] / sums[1].clamp(min=1)).item()
    metrics = {"val/nelbo": nelbo, "val/bpd": nelbo / (dims * math.log(2))}
    if cfg.nvae.decoder.startswith("gaussian"):
        metrics["val/nelbo_continuous_nats"] = (sums[4] / sums[1].clamp(min=1)).item()
    if sums[3] > 0:
        iw = (sums[2] / sums[3]).item()
        metrics.update({"val/iw_nll": iw, "val/iw_bpd": iw / (dims * math.log(2))})
    return metrics


@torch.no_grad()
def picture_pngs(state: TrainState, x: torch.Tensor, device: torch.device, bn_batches: int) -> dict[str, bytes]:
    """Samples at temperatures 1.0 and 0.7 (BN statistics re-estimated at each from `bn_batches` batches) and
    reconstructions beside their inputs, as PNG bytes."""
    from vae.metrics import reconstruction_grid, sample_grid

    model = state.eval_model()
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        bn_batches = 0  # rank 0 draws alone: a training-mode SyncBatchNorm would wait for the other ranks
    pics = {}
    for temp in (1.0, 0.7):
        with model.bn_readjusted(temp, bn_batches):
            samples = model.sample(36, temperature=temp)
        pics[f"samples_t{temp:.1f}"] = png_bytes(sample_grid(samples, nrow=6), f"samples, temperature {temp:.1f}")
    model.eval()
    x = x[:16].to(device)
    pics["reconstructions"] = png_bytes(reconstruction_grid(x, model.reconstruct(x)),
                                        "pairs: validation input | its reconstruction")
    model.train()
    return pics


def _heartbeat(plan: TrainPlan, rank: int, step: int) -> None:
    # Lets operators (and the failure test) see which process is which rank and how far it got.
    path = Path(plan.heartbeat_dir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "rank": rank, "step": step, "time": time.time()}))
    tmp.replace(path / f"rank{rank}.json")


def _batches(shard, cfg: PipelineConfig, seed: int, train: bool = True):
    shuffle = train and cfg.train.shuffle_buffer > 0
    # The data protocol acts as images are drawn: training binarises (and flips, and shifts) afresh with each epoch's
    # seed; validation binarises with a fixed seed and never flips or shifts, so its figures repeat.
    transform = image_transform(cfg.data.binarize, cfg.data.hflip and train, (seed, int(train)),
                                shift=cfg.data.shift if train else 0)
    if isinstance(shard, InMemoryShard):
        yield from shard.batches(cfg.train.worker_batch_size, shuffle_seed=seed if shuffle else None,
                                 drop_last=train, transform=transform)
        return
    for batch in iter_torch_batches(
        shard,
        batch_size=cfg.train.worker_batch_size,
        drop_last=train,
        transform=transform,
        local_shuffle_buffer_size=cfg.train.shuffle_buffer if shuffle else None,
        local_shuffle_seed=seed if shuffle else None,
    ):
        yield batch["image"]


def _grouped(batches, n: int):
    """Consecutive groups of `n` batches (a trailing incomplete group is dropped)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    if os.environ.get("VAEPIPE_VERBOSE") != "1":  # Ray Train's INFO line per report doubles the progress line
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # this one is named by its file path
    cfg = PipelineConfig.from_dict(loop_config["config"])
    plan = TrainPlan(**loop_config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_assigned_cpus()  # workers share the cores; torch would take them all
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed + 1009 * rank)
    state = setup(cfg, plan, device)

    skip_batches = 0
    resumed_from: int | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            skip_batches = load_checkpoint(state, read_checkpoint(d), restore_rng=(rank == 0))
        resumed_from = state.step
        if rank != 0:
            seed_everything(cfg.train.seed + 1009 * rank + state.step)
    elif plan.init_checkpoint:
        payload = read_checkpoint(plan.init_checkpoint)
        state.model.load_state_dict(payload["model"])
        if state.ema is not None and payload.get("ema") is not None:
            state.ema.load_state_dict(payload["ema"])
    if cfg.train.use_gpu and world > 1:
        state.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(state.model)
    ddp_model = ray.train.torch.prepare_model(state.model)
    if plan.in_memory:  # verified on the driver; each worker keeps rows rank, rank + world, ... of each split
        train_shard = InMemoryShard(plan.data_path, "train", rank, world)
        val_shard = InMemoryShard(plan.data_path, "val", rank, world)
    else:
        train_shard = ray.train.get_dataset_shard("train")
        val_shard = ray.train.get_dataset_shard("val")

    images_seen, t_last = 0, time.perf_counter()
    stop_at = min(plan.total_steps, plan.max_steps or plan.total_steps)
    # An elastic run below its most workers accumulates `accum` forward passes per step (the same global batch);
    # its shards are larger, so an epoch has as many steps as planned, or one less where rounding takes it.
    accum = cfg.train.accumulation(world)
    steps_this_epoch = min(plan.steps_per_epoch,
                           plan.train_examples // world // (cfg.train.worker_batch_size * accum))
    _heartbeat(plan, rank, state.step)
    while state.step < stop_at:
        batches_done = 0  # optimizer steps into this epoch
        for xs in _grouped(_batches(train_shard, cfg, seed=cfg.train.seed + 7919 * state.epoch + rank), accum):
            if batches_done >= steps_this_epoch or state.step >= stop_at:
                break
            batches_done += 1
            if batches_done <= skip_batches:
                continue  # resuming mid-epoch: these batches were trained on before the checkpoint
            xs = [x.to(device, non_blocking=True) for x in xs]
            if device.type == "cuda" and cfg.train.channels_last:
                xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
            x = xs[-1]
            try:
                stats = training_step(state, ddp_model, xs if accum > 1 else x, cfg, device, plan.total_steps)
            except Diverged as e:
                _report_divergence(state, cfg, rank, stop_at, e)
                return
            images_seen += sum(len(b) for b in xs) * world
            end_of_epoch = batches_done == steps_this_epoch
            stopping = state.step >= stop_at
            validating = stopping or (end_of_epoch and (state.epoch + 1) % cfg.train.val_every_epochs == 0)
            # A checkpoint on the step cadence, at the end, and with each validation (a short epoch of small data
            # would otherwise write one every few steps).
            want_ckpt = state.step % cfg.train.checkpoint_every_steps == 0 or validating
            if state.step % cfg.train.log_every_steps == 0 or want_ckpt:
                now = time.perf_counter()
                metrics = step_metrics(stats)
                metrics.update({
                    "step": state.step, "epoch": state.epoch + 1, "epochs": cfg.train.epochs,
                    "total_steps": stop_at, "train/images_per_s": images_seen / max(now - t_last, 1e-9),
                    "train/skipped_steps": state.skipped_total, "train/world_size": world,
                    "train/accumulation": accum, "train/global_batch": sum(len(b) for b in xs) * world,
                })
                if resumed_from is not None:  # the first report after a restart or --resume says where from
                    metrics["train/resumed_from_step"], resumed_from = resumed_from, None
                images_seen, t_last = 0, now
                pictures = None
                if validating:
                    # Evaluation draws its own random numbers without moving the training stream, so a run resumed
                    # from any checkpoint continues exactly as an uninterrupted one.
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        metrics.update(evaluate(state, _batches(val_shard, cfg, seed=0, train=False), cfg, device,
                                                world))
                        if rank == 0 and math.isfinite(metrics["val/nelbo"]):
                            pictures = picture_pngs(state, x, device, cfg.train.sample_bn_batches)
                    t_last = time.perf_counter()
                    if not math.isfinite(metrics["val/nelbo"]):
                        ray.train.report(metrics)  # the non-finite figures reach MLflow; no broken checkpoint
                        _report_divergence(state, cfg, rank, stop_at, Diverged(
                            Diverged.NONFINITE_VALIDATION, f"the validation NELBO is {metrics['val/nelbo']}"))
                        return
                _report(state, metrics, cfg, rank, want_ckpt, 0 if end_of_epoch else batches_done, end_of_epoch,
                        pictures)
                _heartbeat(plan, rank, state.step)
        skip_batches = 0
        state.epoch += 1
        if batches_done == 0:
            raise TrainingError(f"rank {rank} received no training batches; the dataset shard is empty")


def _report_divergence(state: TrainState, cfg: PipelineConfig, rank: int, stop_at: int, error: Diverged) -> None:
    """Every rank reports the divergence once (a report is a barrier) and its loop returns."""
    import ray.train

    if rank == 0:
        print(f"[train] diverged at step {state.step}: {error}", flush=True)
    ray.train.report({"step": state.step, "epoch": state.epoch + 1, "epochs": cfg.train.epochs,
                      "total_steps": stop_at, "train/diverged": error.code,
                      "train/skipped_steps": state.skipped_total})


def _report(state: TrainState, metrics: dict, cfg: PipelineConfig, rank: int, with_checkpoint: bool,
            batches_into_epoch: int, end_of_epoch: bool, pictures: dict[str, bytes] | None = None) -> None:
    """Report metrics (all ranks, same steps) and, from rank 0, a checkpoint; the epoch's pictures travel inside
    the checkpoint directory (reported metrics must stay JSON) and the controller logs them to MLflow."""
    import ray.train

    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="vaepipe-ckpt-") as d:
        # At the end of an epoch the next resume starts a fresh epoch.
        epoch_saved = state.epoch
        if end_of_epoch:
            state.epoch += 1
        save_checkpoint(state, Path(d), cfg, batches_into_epoch)
        state.epoch = epoch_saved
        if pictures:
            (Path(d) / PICTURES_DIR).mkdir()
            for name, data in pictures.items():
                (Path(d) / PICTURES_DIR / f"{name}_epoch{metrics['epoch']:03d}.png").write_bytes(data)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"checkpoint-step{state.step:08d}",
        )


# ----------------------------------------------------------------------------------------------------------------
# Controller side: the one writer of metrics and pictures to MLflow.


def _make_reporter(sink: MetricSink):
    import ray.train

    class MLflowReporter(ray.train.UserCallback):
        """Runs on the Ray Train controller: sends rank 0's metrics at their step through the stage's metric sink
        (which drops the steps a restarted worker replays), pictures as PNG artifacts, and prints the progress line.
        It survives worker restarts, so a retry never opens a second MLflow run."""

        def __init__(self) -> None:
            self._progress: Progress | None = None
            self._world = 0  # the worker count of the last report

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = dict(metrics[0])
            step = int(m.pop("step"))
            epoch, epochs, total = int(m.pop("epoch")), int(m.pop("epochs")), int(m.pop("total_steps"))
            sink.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=step)
            world = int(m.get("train/world_size", 0))
            if world and self._world and world != self._world:
                event = (f"step {step}: {self._world} -> {world} workers, {int(m.get('train/accumulation', 1))} "
                         f"forward pass(es) per step each")
                sink.tracker.set_tags(sink.run_id, {f"vaepipe.resize.step{step:08d}": event})
                print(f"[train] resized: {event} (the global batch stays the same)", flush=True)
            self._world = world or self._world
            if checkpoint is not None:
                self._log_pictures(checkpoint)
            if self._progress is None:
                self._progress = Progress(STAGE, total)
            shown = {"loss": m.get("train/loss", float("nan")), "img/s": m.get("train/images_per_s", float("nan"))}
            if "val/bpd" in m:
                shown["val_bpd"] = m["val/bpd"]
            print(self._progress.line(step, epoch, epochs, shown), flush=True)

        def _log_pictures(self, checkpoint) -> None:
            import pyarrow.fs

            src = f"{checkpoint.path.rstrip('/')}/{PICTURES_DIR}"
            if checkpoint.filesystem.get_file_info(src).type != pyarrow.fs.FileType.Directory:
                return
            with tempfile.TemporaryDirectory() as d:
                # Copy only the pictures, never the (possibly large, remote) model state.
                pyarrow.fs.copy_files(src, d, source_filesystem=checkpoint.filesystem)
                sink.tracker.log_artifacts(sink.run_id, d, artifact_path=PICTURES_DIR)

    return MLflowReporter()


# ----------------------------------------------------------------------------------------------------------------
# Driver side.


def check_dataset(cfg: PipelineConfig):
    """The dataset must exist, verify, and match the model's image shape — checked before any worker starts."""
    manifest = read_manifest(cfg.data.path)
    if tuple(manifest.shape) != tuple(cfg.nvae.image_shape):
        c, h, w = manifest.shape
        raise ConfigError(
            f"nvae.image_shape: {list(cfg.nvae.image_shape)} does not match the dataset at {cfg.data.path} "
            f"(shape {list(manifest.shape)}); set --set nvae.image_shape=[{c},{h},{w}] or prepare the data with "
            f"--image-size {cfg.nvae.image_shape[-1]}"
        )
    for split in ("train", "val"):
        if manifest.splits.get(split, 0) == 0:
            raise ConfigError(f"data.path: the dataset at {cfg.data.path} has no '{split}' examples; "
                              f"prepare it with data.val_fraction > 0")
    return manifest


def holds_in_memory(cfg: PipelineConfig, manifest) -> bool:
    """Whether the workers read the data once into memory: its train + val images (decoded) fit the threshold."""
    decoded = manifest.image_bytes * (manifest.splits["train"] + manifest.splits["val"])
    return decoded <= cfg.train.in_memory_max_mb * 2**20


def _checkpoint_of_run(tracker: Tracker, run_id: str) -> str:
    """--from-run: the final checkpoint another train run logged as its `checkpoint` artifact."""
    tracker.get_run(run_id)  # MissingInputError naming the store when there is no such run
    try:
        local = tracker.download_artifacts(run_id, "checkpoint")
    except Exception as e:
        raise ConfigError(f"--from-run: run {run_id} has no 'checkpoint' artifact ({e}); pick a finished train run") from None
    read_checkpoint(local)  # refuses an incomplete one now, not in a worker
    return local


def run_train(
    cfg: PipelineConfig,
    tracker: Tracker | None = None,
    *,
    parent_run_id: str | None = None,
    resume: bool | str = False,
    from_run: str | None = None,
    ray_address: str | None = None,
) -> StageResult:
    """Train the NVAE of `cfg` on Ray Train; log, checkpoint and register it. Everything that can be wrong with the
    inputs (config, data, tracking server, --resume/--from-run targets) fails here, before any worker starts.

    `resume`: True continues the newest interrupted train run of this config, a run id that run."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    manifest = check_dataset(cfg)
    tracker = tracker or Tracker.connect(cfg.tracking)
    init_checkpoint = _checkpoint_of_run(tracker, from_run) if from_run else None
    t = cfg.train
    steps_per_epoch, total_steps = plan_steps(manifest.splits["train"], t.world_size, t.worker_batch_size, t.epochs)
    storage = storage_path(cfg.train.storage_path, cfg.tracking.workdir)
    if resume:
        find_resumable(tracker, cfg, STAGE, resume)  # a wrong --resume target fails before Ray starts
    in_memory = holds_in_memory(cfg, manifest)
    init_ray(ray_address)
    # On the driver, before any run opens: a corrupt or missing shard stops here.
    if in_memory:
        verify(manifest, cfg.data.path, ["train", "val"])
        datasets = None
    else:
        # Same batches in the same order on a rerun: exact resume needs it; shuffling comes from a seeded buffer.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        datasets = {"train": ray_dataset(cfg.data.path, "train"), "val": ray_dataset(cfg.data.path, "val")}
    source = f"runs:/{from_run}/checkpoint" if from_run else None
    with stage_run(tracker, cfg, STAGE, parent_run_id=parent_run_id, resume=resume, data_path=cfg.data.path,
                   source_model=source, progress_metric="train/loss") as run:
        run_id = run.run_id
        if run.resumed:
            ray_name = run.tags["vaepipe.ray_run"]
        else:
            ray_name = f"{cfg.name}-train-{run_id[:12]}"
            run.set_tags({"vaepipe.ray_run": ray_name})
            tracker.log_params(run_id, {"plan.steps_per_epoch": steps_per_epoch, "plan.total_steps": total_steps})
        plan = TrainPlan(
            train_examples=manifest.splits["train"], steps_per_epoch=steps_per_epoch, total_steps=total_steps,
            heartbeat_dir=str(Path(storage) / ray_name / "heartbeat") if "://" not in storage else tempfile.mkdtemp(),
            init_checkpoint=init_checkpoint, max_steps=t.max_steps, in_memory=in_memory,
            data_path=cfg.data.path if "://" in cfg.data.path else os.path.abspath(cfg.data.path),
        )
        resources = {"CPU": t.cpus_per_worker}
        if t.use_gpu:
            resources["GPU"] = t.gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "plan": dataclasses.asdict(plan)},
            torch_config=loopback_torch_config(),  # DDP's rendezvous store on 127.0.0.1 with the local Ray
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                **({"elastic_resize_monitor_interval_s": t.elastic_resize_interval_s} if t.elastic else {})),
            run_config=ray.train.RunConfig(
                name=ray_name,
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
                callbacks=[_make_reporter(run.sink)],
            ),
            datasets=datasets,
        )
        workers = f"{t.min_workers}-{t.max_workers} (elastic)" if t.elastic else str(t.world_size)
        reading = "data in memory" if in_memory else "data streamed by Ray Data"
        print(f"[train] {workers} worker(s) × {t.worker_batch_size} images = global batch {t.batch_size}, "
              f"{steps_per_epoch} steps/epoch × {t.epochs} epochs, {reading}; "
              f"MLflow run {run_id}; checkpoints in {storage}/{ray_name}", flush=True)
        continue_with = (f"vaepipe train CONFIG --resume {run_id}" if run.owns_parent
                         else f"vaepipe run CONFIG --resume {run.parent_run_id}")
        try:
            result = interruptible(trainer.fit)
        except ray.train.TrainingFailedError as e:
            raise TrainingError(
                f"training stopped after Ray restarted the workers train.max_failures={t.max_failures} times "
                f"({_first_line(e)}). Continue from the last checkpoint with `{continue_with}` (same config); "
                f"if workers keep getting lost, give them more memory or raise train.max_failures"
            ) from None
        except KeyboardInterrupt:
            print(f"[train] interrupted; continue from the last checkpoint with `{continue_with}`", flush=True)
            raise
        _stop_if_diverged(cfg, tracker, run_id, result)
        if result.checkpoint is None:
            raise TrainingError(f"training ended without a checkpoint; see the logs in {storage}/{ray_name}")
        return finish(cfg, tracker, run_id, result)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    cause = getattr(error, "worker_failures", None)
    lost = any(word in text.lower() for word in ("health check", "died", "killed"))
    if isinstance(cause, dict) and cause and not lost:  # else Ray's own summary says a worker was lost
        text = str(next(iter(cause.values()))).strip() or text
    return (text.splitlines() or [type(error).__name__])[-1][:300]


def _stop_if_diverged(cfg: PipelineConfig, tracker, run_id: str, result) -> None:
    """After a divergence: keep the newest checkpoint reported with finite figures as the run's `checkpoint`
    artifact and raise the message that says what diverged, where, and how to go on from there."""
    history = tracker.metric_history(run_id, "train/diverged")
    if not history:
        return
    mark = history[-1]
    what = ("the loss or gradient was non-finite for more than train.max_skipped_steps="
            f"{cfg.train.max_skipped_steps} updates in a row" if mark.value == Diverged.NONFINITE_UPDATES
            else "the validation NELBO became non-finite")
    good = [(c, m) for c, m in (result.best_checkpoints or [])
            if all(math.isfinite(v) for k, v in m.items() if k.startswith("train/") and isinstance(v, (int, float)))]
    lr = cfg.train.lr
    head = (f"training diverged at step {mark.step}: {what}. Lower train.lr (now {lr:g}; try --set "
            f"train.lr={lr / 10:g}), or raise nvae.lambda_sr / lower train.grad_clip.")
    if not good:
        raise errors.Diverged(f"{head} No checkpoint was saved before it diverged: start again with the lower rate.")
    checkpoint, metrics = max(good, key=lambda cm: cm[1].get("step", -1))
    with checkpoint.as_directory() as d:
        read_checkpoint(d)  # complete and loadable
        tracker.log_artifacts(run_id, d, artifact_path="checkpoint")
    raise errors.Diverged(
        f"{head} The last good checkpoint (step {metrics.get('step')}) is saved in run {run_id}: continue from it "
        f"with `vaepipe train CONFIG --from-run {run_id} --set train.lr={lr / 10:g}`"
    )


def finish(cfg: PipelineConfig, tracker, run_id: str, result) -> StageResult:
    """Log the final (EMA) model with pickle serialization and our packages as code paths, register it as
    `<name>-nvae` with the alias `candidate` and its model card, and keep the last checkpoint as an artifact."""
    from vae import NVAE

    with result.checkpoint.as_directory() as d:
        payload = read_checkpoint(d)
        tracker.log_artifacts(run_id, d, artifact_path="checkpoint")
    model = NVAE(cfg.nvae)
    model.load_state_dict(checkpoints.model_weights(payload))
    model.eval()
    c, h, w = cfg.nvae.image_shape
    logged_uri = tracker.log_pytorch_model(
        run_id, model, name="model", input_example=np.zeros((1, c, h, w), dtype=np.float32)
    )
    final = {k: float(v) for k, v in (result.metrics or {}).items()
             if isinstance(v, (int, float)) and k.startswith("val/")}
    judged, tags = judge_temperatures(tracker, cfg.data.path, model, cfg.train.judge_samples, seed=cfg.train.seed,
                                      split="val" if read_manifest(cfg.data.path).splits.get("val") else "test",
                                      bn_batches=cfg.train.sample_bn_batches)
    if judged:
        judged = {f"eval/{k}": v for k, v in judged.items()}
        tracker.log_metrics(run_id, judged, step=int((result.metrics or {}).get("step", 0)))
        tracker.set_tags(run_id, tags)
        final.update(judged)
    name = f"{cfg.name}-nvae"
    version = tracker.register_model(logged_uri, name, alias="candidate", tags={"vaepipe.run_id": run_id})
    describe_version(tracker, name, version, cfg, run_id)
    print(f"[train] registered {name} version {version} (alias candidate): models:/{name}@candidate", flush=True)
    return StageResult(STAGE, run_id, model_uri=f"models:/{name}@candidate", registered_model=name,
                       registered_version=str(version), metrics=final)
