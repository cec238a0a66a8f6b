"""`vaepipe run CONFIG`: the whole pipeline under one MLflow parent run.

    vaepipe run configs/demo.yaml [--set train.epochs=5] [--resume PIPELINE_RUN_ID]

Data preparation when a data set is missing, then the configured stages in order (train → ncp → tune), each a child
run of the pipeline run. `--resume` reopens an earlier pipeline run: stages that finished are skipped (their results
are read back from MLflow), and an interrupted stage resumes from its own checkpoints.
"""
from __future__ import annotations

import time
from typing import Callable

from pipelines.common import StageResult, init_ray
from pipelines.config import PipelineConfig, load_config
from vae.config import ConfigError


def _stage_functions() -> dict[str, Callable[..., StageResult]]:
    """The stages this installation has, in pipeline order."""
    from pipelines.train_ncp import run_ncp
    from pipelines.train_vae import run_train
    from pipelines.tune_gwae import run_tune

    return {"train": run_train, "ncp": run_ncp, "tune": run_tune}


def _finished_stage(tracker, parent: str, stage: str) -> StageResult | None:
    runs = tracker.find_runs(parent_run_id=parent, stage=stage, max_results=5)
    for run in runs:
        if run.info.status == "FINISHED":
            model = run.data.tags.get("vaepipe.registered_model")
            version = run.data.tags.get("vaepipe.registered_version")
            metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("val/", "eval/", "best/"))}
            uri = f"models:/{model}/{version}" if model and version else None
            return StageResult(stage, run.info.run_id, model_uri=uri, registered_model=model,
                               registered_version=version, metrics=metrics)
    return None


def _interrupted_stage(tracker, parent: str, stage: str) -> bool:
    return any(r.info.status != "FINISHED" for r in tracker.find_runs(parent_run_id=parent, stage=stage, max_results=5))


def run_pipeline(cfg: PipelineConfig, resume: str | None = None, ray_address: str | None = None,
                 tracker=None) -> tuple[str, list[StageResult], dict[str, float]]:
    """Run the configured stages; returns (pipeline run id, stage results, seconds per step)."""
    from pipelines.data import ensure_dataset
    from pipelines.tracking import Tracker, dataset_tag

    functions = _stage_functions()
    tracker = tracker or Tracker.connect(cfg.tracking)
    timings: dict[str, float] = {}
    for data in _datasets(cfg):
        t = time.perf_counter()
        manifest = ensure_dataset(data)
        print(f"[data] {manifest.name}: {data.path}  shape {list(manifest.shape)}  "
              f"({', '.join(f'{k} {v}' for k, v in manifest.splits.items())})", flush=True)
        timings[f"data:{data.source}"] = time.perf_counter() - t

    if resume:
        try:
            run = tracker.client.get_run(resume)
        except Exception:
            raise ConfigError(f"--resume: no pipeline run {resume!r} in {tracker.tracking_uri}; "
                              f"`vaepipe runs list` shows them") from None
        if run.data.tags.get("vaepipe.stage") != "pipeline":
            raise ConfigError(f"--resume: run {resume} is a {run.data.tags.get('vaepipe.stage')!r} run, "
                              f"not a pipeline run; pass the parent run id from `vaepipe runs list`")
        parent = resume
        tracker.client.set_terminated(parent, "RUNNING")
    else:
        parent = tracker.start_pipeline_run(cfg, run_name=f"{cfg.name}-pipeline", dataset_tag=dataset_tag(cfg.data.path))
    print(f"[run] pipeline run {parent} (experiment vaepipe/{cfg.name}); stages: {', '.join(cfg.stages)}", flush=True)

    init_ray(ray_address)
    results: list[StageResult] = []
    status = "FAILED"
    try:
        for stage in cfg.stages:
            if resume:
                done = _finished_stage(tracker, parent, stage)
                if done is not None:
                    print(f"[run] {stage}: finished in run {done.run_id}, skipped", flush=True)
                    results.append(done)
                    continue
            kwargs = {"parent_run_id": parent}
            if resume and _interrupted_stage(tracker, parent, stage):
                kwargs["resume"] = True
            if stage == "ncp":
                train = next((r for r in results if r.stage == "train"), None)
                kwargs["model_uri"] = train.model_uri if train else f"models:/{cfg.name}-nvae@candidate"
            t = time.perf_counter()
            result = functions[stage](cfg, tracker, **kwargs)
            timings[stage] = time.perf_counter() - t
            if result.registered_model:
                tracker.set_tags(result.run_id, {"vaepipe.registered_model": result.registered_model,
                                                 "vaepipe.registered_version": result.registered_version})
            results.append(result)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_run(parent, status)
    return parent, results, timings


def _datasets(cfg: PipelineConfig):
    out = []
    if {"train", "ncp"} & set(cfg.stages):
        out.append(cfg.data)
    if "tune" in cfg.stages and cfg.tune.data.path != cfg.data.path:
        out.append(cfg.tune.data)
    return out


def summary_table(results: list[StageResult]) -> str:
    rows = [("stage", "run id", "registered model", "key metrics")]
    for r in results:
        model = f"{r.registered_model} v{r.registered_version}" if r.registered_model else "-"
        keys = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items())[:4])
        rows.append((r.stage, r.run_id, model, keys or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def open_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000   # then open http://127.0.0.1:5000"
    return f"open {tracking_uri} in a browser"


def main_run(config_path: str, overrides: list[str], resume: str | None, address: str | None) -> int:
    cfg = load_config(config_path, overrides)
    t0 = time.perf_counter()
    parent, results, timings = run_pipeline(cfg, resume=resume, ray_address=address)
    from pipelines.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking)
    print(f"\nPipeline run {parent} finished in {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")\n")
    print(summary_table(results))
    for r in results:
        if r.stage == "tune":
            from pipelines.tune_gwae import summary_line

            print(summary_line(r))
    print(f"\nOpen the results:\n  {open_hint(uri)}\n  vaepipe runs list --config {config_path}")
    return 0
