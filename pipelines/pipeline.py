"""`vaepipe run CONFIG` and `make demo`: the whole pipeline under one MLflow parent run.

    vaepipe run configs/demo.yaml [--set train.epochs=5] [--resume PIPELINE_RUN_ID]
    vaepipe demo [configs/demo.yaml]

Data preparation when a data set is missing, then the configured stages in order (train → ncp → tune), each a child
run of the pipeline run. `--resume` reopens an earlier pipeline run of the same config: stages that finished are
skipped (their results are read back from MLflow), and an interrupted stage resumes from its own checkpoints.
`make demo` runs the same on the embedded default and prints where the results are and how to open them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from pipelines.config import PipelineConfig, load_config
from pipelines.data import ensure_dataset
from pipelines.errors import ConfigError
from pipelines.ray_env import init_ray
from pipelines.reporting import StageResult
from pipelines.tracking import END_REASON_TAG, Tracker, pipeline_run, resolve_tracking_uri
from pipelines.train_ncp import run_ncp
from pipelines.train_vae import run_train
from pipelines.tune_gwae import run_tune, summary_line

# The stages, in pipeline order.
STAGES: dict[str, Callable[..., StageResult]] = {"train": run_train, "ncp": run_ncp, "tune": run_tune}


def _finished_stage(tracker: Tracker, parent: str, stage: str) -> StageResult | None:
    for run in tracker.find_runs(parent_run_id=parent, stage=stage, max_results=5):
        if run.info.status == "FINISHED":
            model = run.data.tags.get("vaepipe.registered_model")
            version = run.data.tags.get("vaepipe.registered_version")
            metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("val/", "eval/", "best/"))}
            uri = f"models:/{model}/{version}" if model and version else None
            return StageResult(stage, run.info.run_id, model_uri=uri, registered_model=model,
                               registered_version=version, metrics=metrics)
    return None


def _interrupted_stage(tracker: Tracker, parent: str, stage: str) -> str | None:
    """The run id of `stage` to resume under pipeline run `parent` (None: start it anew)."""
    for run in tracker.find_runs(parent_run_id=parent, stage=stage, max_results=5):
        if run.info.status == "FINISHED":
            continue
        if run.data.tags.get(END_REASON_TAG) == "diverged":
            raise ConfigError(
                f"--resume: the {stage} stage of pipeline run {parent} diverged (run {run.info.run_id}); resuming it "
                f"would diverge again. Start a new pipeline run with a lower learning rate, or continue the stage "
                f"by naming it: `vaepipe {stage} CONFIG --resume {run.info.run_id}`"
            )
        return run.info.run_id
    return None


def _datasets(cfg: PipelineConfig):
    out = []
    if {"train", "ncp"} & set(cfg.stages):
        out.append(cfg.data)
    if "tune" in cfg.stages and cfg.tune.data.path != cfg.data.path:
        out.append(cfg.tune.data)
    return out


def run_pipeline(cfg: PipelineConfig, resume: str | None = None, ray_address: str | None = None,
                 tracker: Tracker | None = None) -> tuple[str, list[StageResult], dict[str, float]]:
    """Run the configured stages; returns (pipeline run id, stage results, seconds per step)."""
    tracker = tracker or Tracker.connect(cfg.tracking)
    timings: dict[str, float] = {}
    for data in _datasets(cfg):
        t = time.perf_counter()
        manifest = ensure_dataset(data)
        print(f"[data] {manifest.name}: {data.path}  shape {list(manifest.shape)}  "
              f"({', '.join(f'{k} {v}' for k, v in manifest.splits.items())})", flush=True)
        timings[f"data:{data.source}"] = time.perf_counter() - t
    data_path = cfg.data.path if {"train", "ncp"} & set(cfg.stages) else cfg.tune.data.path
    results: list[StageResult] = []
    with pipeline_run(tracker, cfg, resume=resume, data_path=data_path) as parent:
        print(f"[run] pipeline run {parent.run_id} (experiment vaepipe/{cfg.name}); stages: {', '.join(cfg.stages)}",
              flush=True)
        init_ray(ray_address)
        for stage in cfg.stages:
            kwargs: dict = {"parent_run_id": parent.run_id}
            if resume:
                done = _finished_stage(tracker, parent.run_id, stage)
                if done is not None:
                    print(f"[run] {stage}: finished in run {done.run_id}, skipped", flush=True)
                    results.append(done)
                    continue
                kwargs["resume"] = _interrupted_stage(tracker, parent.run_id, stage) or False
            if stage == "ncp":
                train = next((r for r in results if r.stage == "train"), None)
                kwargs["model_uri"] = train.model_uri if train else f"models:/{cfg.name}-nvae@candidate"
            t = time.perf_counter()
            result = STAGES[stage](cfg, tracker, **kwargs)
            timings[stage] = time.perf_counter() - t
            if result.registered_model:
                tracker.set_tags(result.run_id, {"vaepipe.registered_model": result.registered_model,
                                                 "vaepipe.registered_version": result.registered_version})
            results.append(result)
    return parent.run_id, results, timings


# The figures a stage's row shows first, when it has them (others follow in name order, four in all).
HEADLINE = {
    "train": ("val/bpd", "val/iw_bpd", "eval/judge_recognised_t0.7", "eval/judge_recognised_t1.0"),
    "ncp": ("val/fd_vaepipe_base", "val/fd_vaepipe_sir", "val/judge_recognised_base", "val/judge_recognised_sir"),
    "tune": ("psnr", "best/psnr", "dci", "best/dci", "collapsed", "search/collapsed_trials"),
}


def _key_metrics(r: StageResult, count: int = 4) -> list[tuple[str, float]]:
    first = [k for k in HEADLINE.get(r.stage, ()) if k in r.metrics]
    rest = [k for k in sorted(r.metrics) if k not in first]
    return [(k, r.metrics[k]) for k in (first + rest)[:count]]


def summary_table(results: list[StageResult]) -> str:
    rows = [("stage", "run id", "registered model", "key metrics")]
    for r in results:
        model = f"{r.registered_model} v{r.registered_version}" if r.registered_model else "-"
        keys = ", ".join(f"{k}={v:.4g}" for k, v in _key_metrics(r))
        rows.append((r.stage, r.run_id, model, keys or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def open_hint(tracking_uri: str, experiment_id: str | None = None) -> str:
    """The command that opens the results (this environment's own mlflow, loopback only) and the page to browse."""
    page = f"#/experiments/{experiment_id}" if experiment_id else ""
    if tracking_uri.startswith("sqlite:///"):
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        return (f"{mlflow_bin} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000   "
                f"# then open http://127.0.0.1:5000/{page}")
    return f"open {tracking_uri.rstrip('/')}/{page} in a browser"


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def headline(r: StageResult) -> str | None:
    """One line of what a stage's pictures show, in figures, or None when it has none to say."""
    m = r.metrics
    if r.stage == "tune":
        return summary_line(r)
    if r.stage == "train" and "eval/judge_recognised_t0.7" in m:
        return (f"NVAE {r.registered_model} v{r.registered_version}: samples the judge recognises (a digit at p >= 0.9)"
                f": {_pct(m['eval/judge_recognised_t0.7'])} at temperature 0.7, "
                f"{_pct(m.get('eval/judge_recognised_t1.0', float('nan')))} at 1.0; real images "
                f"{_pct(m.get('eval/judge_recognised_real', float('nan')))}. Bits/dim {m.get('val/bpd', float('nan')):.3f}")
    if r.stage == "ncp" and "val/fd_vaepipe_base" in m:
        line = (f"NCP {r.registered_model} v{r.registered_version} against its base prior: Fréchet distance in "
                f"vaepipe's features (lower is better) base {m['val/fd_vaepipe_base']:.1f} -> SIR "
                f"{m['val/fd_vaepipe_sir']:.1f}, Langevin {m['val/fd_vaepipe_langevin']:.1f}")
        if "val/judge_recognised_base" in m:
            line += (f"; recognised by the judge base {_pct(m['val/judge_recognised_base'])} -> SIR "
                     f"{_pct(m['val/judge_recognised_sir'])}, Langevin {_pct(m['val/judge_recognised_langevin'])}")
        return line
    return None


def _print_results(results: list[StageResult]) -> None:
    print(summary_table(results))
    for r in results:
        line = headline(r)
        if line:
            print(line)


def main_run(config_path: str, overrides: list[str], resume: str | None, address: str | None) -> int:
    cfg = load_config(config_path, overrides)
    t0 = time.perf_counter()
    tracker = Tracker.connect(cfg.tracking)
    parent, results, timings = run_pipeline(cfg, resume=resume, ray_address=address, tracker=tracker)
    uri = resolve_tracking_uri(cfg.tracking)
    print(f"\nPipeline run {parent} finished in {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")\n")
    _print_results(results)
    print(f"\nOpen the results:\n  {open_hint(uri, tracker.experiment_id(cfg.name))}\n"
          f"  vaepipe runs list --config {config_path}")
    return 0


def run_demo(config_path: str, overrides: list[str] | None = None) -> int:
    """The embedded default: both offline data sets (digits for the NVAE stages, the regions factor set for the GWAE
    search) whatever stages the config names, then the pipeline on a local Ray with the sqlite tracking store."""
    cfg = load_config(config_path, overrides)
    t0 = time.perf_counter()
    print(f"vaepipe demo: {config_path} (name={cfg.name}, stages={', '.join(cfg.stages)})", flush=True)
    datasets = [cfg.data] + ([cfg.tune.data] if cfg.tune.data.path != cfg.data.path else [])
    for data in datasets:
        ensure_dataset(data, progress=False)  # small and quick; the pipeline's [data] line says what it holds
    tracker = Tracker.connect(cfg.tracking)
    parent, results, timings = run_pipeline(cfg, tracker=tracker)
    uri = resolve_tracking_uri(cfg.tracking)
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")\n")
    _print_results(results)
    print("\nWhere the results are:")
    for data in datasets:
        print(f"  data       {Path(data.path).resolve()}   (vaepipe data inspect {data.path})")
    print(f"  tracking   {uri}   (pipeline run {parent}, experiment vaepipe/{cfg.name})")
    for r in results:
        if r.model_uri:
            print(f"  model      {r.model_uri}")
    print("\nOpen them:")
    print("  make ui   # the MLflow UI on http://127.0.0.1:5000, or:")
    print(f"  {open_hint(uri, tracker.experiment_id(cfg.name))}")
    print(f"  vaepipe runs list --config {config_path}")
    print(f"  python -c \"import mlflow; mlflow.set_tracking_uri('{uri}'); "
          f"m = mlflow.pytorch.load_model('models:/{cfg.name}-nvae@candidate'); print(m.sample(4).shape)\"")
    return 0
