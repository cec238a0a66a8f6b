"""The life of every vaepipe run in MLflow: open, resume, heartbeat, close; and the listing of pipeline runs.

    with pipeline_run(tracker, cfg) as parent:                      # the parent run of `vaepipe run`
        with stage_run(tracker, cfg, "train", parent_run_id=parent.run_id, data_path=cfg.data.path) as run:
            ...                                                     # run.run_id, run.resumed, run.sink.log(...)

Both context managers own the whole life of their run, so every stage behaves the same way:
- open: a new run carries its lineage (stage, parent, pipeline run, dataset, source model, git commit, config hash),
  the config as params and `config.yaml`, and each data split as an MLflow dataset input. A stage run opened without
  a parent gets a pipeline run of its own, so `vaepipe runs list` shows it.
- resume (`resume=True`): the newest run of the same stage whose config hash equals this config's and that did not
  finish; a run that diverged only when named (`resume=RUN_ID`), a run of another config never. The reopened run's
  own pipeline run is reopened with it. It says which run it resumes and from which step.
- heartbeat: while the body runs, a thread stamps `vaepipe.heartbeat` on the open runs. A run whose driver was killed
  (SIGKILL, a lost machine) is found by the next command that opens a run of the same config name: its driver process
  is gone (same host) or its heartbeat is stale, and it is closed as KILLED with `vaepipe.end_reason=driver lost`.
- close: FINISHED when the body returns; KILLED on Ctrl-C (resumable); FAILED on any error, with the error as the tag
  `vaepipe.error` and the reason (`diverged`, `failed`) as `vaepipe.end_reason`. Child runs left RUNNING (tune
  trials) are closed with their parent. No path leaves a run RUNNING.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from pipelines.errors import ConfigError
from pipelines.processes import process_alive
from pipelines.redaction import redact_text
from pipelines.tracking.lineage import NONE_TAG, config_hash, dataset_tag, git_commit, log_dataset_inputs
from pipelines.tracking.sink import MetricSink
from pipelines.tracking.store import resolve_tracking_uri, retry_locked, scheme, sqlite_path
from pipelines.tracking.tracker import Tracker, experiment_name

if TYPE_CHECKING:
    from mlflow.entities import Run

    from pipelines.config import PipelineConfig, TrackingConfig

HEARTBEAT_TAG = "vaepipe.heartbeat"  # unix time of the driver's last beat
HEARTBEAT_EVERY_TAG = "vaepipe.heartbeat_s"
DRIVER_TAG = "vaepipe.driver"  # host:pid of the process that opened (or resumed) the run
CONFIG_HASH_TAG = "vaepipe.config_hash"
END_REASON_TAG = "vaepipe.end_reason"  # finished | interrupted | diverged | failed | driver lost
ERROR_TAG = "vaepipe.error"
# Seconds between heartbeats; a run is stale after STALE_BEATS missed beats.
HEARTBEAT_S = float(os.environ.get("VAEPIPE_HEARTBEAT_S", "30"))
STALE_BEATS = 4
_ERROR_CHARS = 1000


def _say(stage: str, text: str) -> None:
    print(f"[{stage}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """A daemon thread that stamps HEARTBEAT_TAG on `run_ids` every `every_s` seconds until stopped."""

    def __init__(self, tracker: Tracker, run_ids: Sequence[str], every_s: float = HEARTBEAT_S) -> None:
        self.tracker, self.run_ids, self.every_s = tracker, list(run_ids), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vaepipe-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        tags = {HEARTBEAT_TAG: f"{time.time():.0f}", HEARTBEAT_EVERY_TAG: f"{self.every_s:g}",
                DRIVER_TAG: driver_id()}
        for run_id in self.run_ids:
            try:
                self.tracker.set_tags(run_id, tags)
            except Exception as e:  # a store hiccup must not kill the run; the next beat tries again
                print(f"[runs] heartbeat of run {run_id} not recorded ({type(e).__name__}); retrying", file=sys.stderr)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()


def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def stale_reason(run: "Run", now: float | None = None) -> str | None:
    """Why a RUNNING run has no live driver (None when it may still have one)."""
    tags = run.data.tags
    driver, beat = tags.get(DRIVER_TAG), tags.get(HEARTBEAT_TAG)
    if not driver or not beat:
        return None  # not opened by this lifecycle (a tune trial, an older run): judged through its parent
    host, _, pid = driver.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        if int(pid) == os.getpid():
            return None
        if not process_alive(int(pid)):
            return f"its driver process {driver} is gone"
    now = time.time() if now is None else now
    every = float(tags.get(HEARTBEAT_EVERY_TAG, HEARTBEAT_S))
    age = now - float(beat)
    if age > STALE_BEATS * every:
        return f"its driver {driver} last beat {age:.0f} s ago (every {every:g} s)"
    return None


def close_stale_runs(tracker: Tracker, experiment: str) -> list[str]:
    """Close, as KILLED, the RUNNING runs of `vaepipe/<experiment>` whose driver is gone, and their RUNNING children.
    Returns their ids."""
    closed = []
    for run in tracker.find_runs(experiment, filter_string="attributes.status = 'RUNNING'", max_results=200):
        why = stale_reason(run)
        if why is None:
            continue
        run_id = run.info.run_id
        tracker.set_tags(run_id, {END_REASON_TAG: "driver lost", ERROR_TAG: f"closed by {driver_id()}: {why}"})
        tracker.end_run(run_id, "KILLED")
        _close_children(tracker, experiment, run_id, "KILLED")
        closed.append(run_id)
        stage = run.data.tags.get("vaepipe.stage", "run")
        print(f"[runs] closed {stage} run {run_id} as KILLED: {why} (resumable with --resume)", flush=True)
    return closed


def _close_children(tracker: Tracker, experiment: str, run_id: str, status: str) -> None:
    for child in tracker.find_runs(experiment, parent_run_id=run_id,
                                   filter_string="attributes.status = 'RUNNING'", max_results=500):
        tracker.end_run(child.info.run_id, status)


# ---------------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class OpenRun:
    """A run while its context is open: its id, its parent's, whether it was resumed, its tags at opening, and the
    metric sink that writes to it."""

    tracker: Tracker
    run_id: str
    stage: str
    parent_run_id: str | None = None
    resumed: bool = False
    resumed_from_step: int | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    owns_parent: bool = False  # a stage run on its own: its pipeline run opens and closes with it
    sink: MetricSink = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.sink = MetricSink(self.tracker, self.run_id, resumed=self.resumed)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        self.sink.log(metrics, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)


def _lineage_tags(cfg: "PipelineConfig", stage: str, data_path: str | None, source_model: str | None) -> dict[str, str]:
    return {"vaepipe.stage": stage, "vaepipe.dataset": dataset_tag(data_path) if data_path else NONE_TAG,
            "vaepipe.source_model": source_model or NONE_TAG, "vaepipe.git_commit": git_commit(),
            CONFIG_HASH_TAG: config_hash(cfg)}


def _log_config(tracker: Tracker, run_id: str, cfg: "PipelineConfig") -> None:
    from pipelines.config import dump_config

    tracker.log_params(run_id, dict(sorted(cfg.flat().items())))
    tracker.log_text(run_id, dump_config(cfg), "config.yaml")


@contextlib.contextmanager
def _closed_if_failing(tracker: Tracker, run_ids: Sequence[str]) -> Iterator[None]:
    """Close `run_ids`, created but not yet owned by a run context, if the rest of the opening fails (a dataset whose
    inputs cannot be read, a store error): KILLED on Ctrl-C, else FAILED with the error, never left RUNNING."""
    try:
        yield
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        tags = {END_REASON_TAG: "interrupted"} if interrupted else {
            END_REASON_TAG: getattr(e, "reason", "failed"),
            ERROR_TAG: redact_text(f"{type(e).__name__}: {e}")[:_ERROR_CHARS]}
        for run_id in run_ids:
            try:
                tracker.set_tags(run_id, tags)
            finally:
                tracker.end_run(run_id, "KILLED" if interrupted else "FAILED")
        raise


def _open_new(tracker: Tracker, cfg: "PipelineConfig", stage: str, parent_run_id: str | None, data_path: str | None,
              splits: Sequence[str], source_model: str | None, run_name: str | None) -> str:
    tags = _lineage_tags(cfg, stage, data_path, source_model)
    if parent_run_id is not None:
        parent = tracker.get_run(parent_run_id)
        tags.update({"mlflow.parentRunId": parent_run_id,
                     "vaepipe.pipeline_run": parent.data.tags.get("vaepipe.pipeline_run", parent_run_id)})
    tags.update({DRIVER_TAG: driver_id(), HEARTBEAT_TAG: f"{time.time():.0f}", HEARTBEAT_EVERY_TAG: f"{HEARTBEAT_S:g}"})
    run_id = tracker.create_run(cfg.name, tags, run_name=run_name or stage)
    with _closed_if_failing(tracker, [run_id]):
        if parent_run_id is None:
            tracker.set_tags(run_id, {"vaepipe.pipeline_run": run_id})
        _log_config(tracker, run_id, cfg)
        if data_path and splits:
            log_dataset_inputs(tracker, run_id, data_path, splits)
    return run_id


def _last_step(tracker: Tracker, run_id: str, metric: str | None) -> int | None:
    if not metric:
        return None
    return max((m.step for m in tracker.metric_history(run_id, metric)), default=None)


def find_resumable(tracker: Tracker, cfg: "PipelineConfig", stage: str, resume: bool | str) -> "Run":
    """The run `--resume` continues: the one named, or the newest unfinished `stage` run of this config.

    Refused (ConfigError, saying why and what to do): a named run of another stage or config, or one that finished;
    with no name, a config with no unfinished run of its own (runs of other configs and runs that diverged are
    listed, since they are not candidates)."""
    want = config_hash(cfg)
    flag = f"vaepipe {stage} CONFIG --resume" if stage != "pipeline" else "vaepipe run CONFIG --resume"
    if isinstance(resume, str):
        run = tracker.get_run(resume)
        tags = run.data.tags
        if tags.get("vaepipe.stage") != stage:
            raise ConfigError(f"--resume {resume}: that is a {tags.get('vaepipe.stage', 'non-vaepipe')!r} run, not a "
                              f"{stage} run; `vaepipe runs list` shows the runs and their stages")
        if run.info.status == "FINISHED" and stage != "pipeline":  # a finished pipeline: every stage is skipped
            raise ConfigError(f"--resume {resume}: that {stage} run finished; nothing to resume (start a new run, or "
                              f"continue from its weights with --from-run where the stage has it)")
        if tags.get(CONFIG_HASH_TAG) != want:
            raise ConfigError(_other_config(resume, tags.get(CONFIG_HASH_TAG), want, stage))
        if run.info.status == "RUNNING" and stale_reason(run) is None and tags.get(DRIVER_TAG) != driver_id():
            raise ConfigError(f"--resume {resume}: the run is still RUNNING under {tags.get(DRIVER_TAG)}; wait for it "
                              f"or stop it first")
        return run
    unfinished = tracker.find_runs(cfg.name, stage=stage, filter_string="attributes.status != 'FINISHED'",
                                   max_results=50)
    skipped = []
    for run in unfinished:
        tags = run.data.tags
        if tags.get(CONFIG_HASH_TAG) != want:
            skipped.append(f"{run.info.run_id} (another config: hash {tags.get(CONFIG_HASH_TAG, 'none')}, this one "
                           f"{want})")
        elif tags.get(END_REASON_TAG) == "diverged":
            skipped.append(f"{run.info.run_id} (it diverged, and would again from its checkpoints; name it to "
                           f"resume it anyway: `{flag} {run.info.run_id}`)")
        elif run.info.status == "RUNNING" and stale_reason(run) is None:
            skipped.append(f"{run.info.run_id} (still RUNNING under {tags.get(DRIVER_TAG, '?')})")
        else:
            return run
    listed = "; ".join(skipped[:5]) if skipped else "none"
    raise ConfigError(f"--resume: experiment {experiment_name(cfg.name)} has no interrupted {stage} run of this "
                      f"config (hash {want}) to resume. Unfinished {stage} runs that do not qualify: {listed}. Run "
                      f"without --resume to start a new one")


def _other_config(run_id: str, theirs: str | None, want: str, stage: str) -> str:
    return (f"--resume {run_id}: that {stage} run was made with another config (hash {theirs or 'none'}; this config "
            f"has {want}), so its checkpoints belong to another model. Resume it with the config it was made with "
            f"(its `config.yaml` artifact), or start a new run (`--from-run` starts one from its weights)")


@contextlib.contextmanager
def _closing(tracker: Tracker, experiment: str, run_ids: Sequence[str]) -> Iterator[None]:
    """Close `run_ids` (the first is the run; the others its own parents) according to how the body ends."""
    status, reason, error = "FAILED", "failed", None
    try:
        with Heartbeat(tracker, run_ids):
            yield
        status, reason = "FINISHED", "finished"
    except KeyboardInterrupt:
        status, reason = "KILLED", "interrupted"
        raise
    except BaseException as e:
        reason = getattr(e, "reason", "failed")
        error = redact_text(f"{type(e).__name__}: {e}")[:_ERROR_CHARS]
        raise
    finally:
        tags = {END_REASON_TAG: reason, **({ERROR_TAG: error} if error else {})}
        for run_id in run_ids:
            try:
                tracker.set_tags(run_id, tags)
                _close_children(tracker, experiment, run_id, "KILLED" if status != "FINISHED" else "FINISHED")
            finally:
                tracker.end_run(run_id, status)


@contextlib.contextmanager
def stage_run(
    tracker: Tracker,
    cfg: "PipelineConfig",
    stage: str,
    *,
    parent_run_id: str | None = None,
    resume: bool | str = False,
    data_path: str | None = None,
    splits: Sequence[str] = ("train", "val"),
    source_model: str | None = None,
    progress_metric: str | None = None,
    run_name: str | None = None,
) -> Iterator[OpenRun]:
    """Open (or resume) the MLflow run of one stage and own it until the body ends; see the module docstring.

    `parent_run_id` hangs the run under a pipeline run (`vaepipe run`); without it the stage opens a pipeline run of
    its own, closed with it. `progress_metric` names the metric whose last step a resume reports."""
    close_stale_runs(tracker, cfg.name)
    owned: list[str] = []
    if resume:
        run = find_resumable(tracker, cfg, stage, resume)
        run_id, tags = run.info.run_id, dict(run.data.tags)
        parent = tags.get("mlflow.parentRunId")
        if parent_run_id is None and parent and tracker.get_run(parent).info.status != "FINISHED":
            parent_run_id = parent
            owned.append(parent)  # the standalone stage's own pipeline run goes on with it
        for rid in [run_id, *owned]:
            tracker.set_status(rid, "RUNNING")
            tracker.set_tags(rid, {END_REASON_TAG: "resumed", DRIVER_TAG: driver_id()})
        step = _last_step(tracker, run_id, progress_metric)
        where = f" from step {step}" if step is not None else ""
        _say(stage, f"resuming run {run_id} ({run.info.run_name}, {run.info.status} since "
                    f"{_when(run.info.end_time)}){where}")
        opened = OpenRun(tracker, run_id, stage, parent_run_id, resumed=True, resumed_from_step=step, tags=tags,
                         owns_parent=bool(owned))
    else:
        if parent_run_id is None:
            parent_run_id = _open_new(tracker, cfg, "pipeline", None, data_path, (), None, run_name or stage)
            owned.append(parent_run_id)
        with _closed_if_failing(tracker, owned):
            run_id = _open_new(tracker, cfg, stage, parent_run_id, data_path, splits, source_model, run_name)
        opened = OpenRun(tracker, run_id, stage, parent_run_id, owns_parent=bool(owned))
    with _closing(tracker, cfg.name, [run_id, *owned]):
        yield opened


@contextlib.contextmanager
def pipeline_run(tracker: Tracker, cfg: "PipelineConfig", *, resume: str | None = None,
                 data_path: str | None = None) -> Iterator[OpenRun]:
    """Open (or, with `resume=RUN_ID`, reopen) the parent run of one `vaepipe run`, and own it until the body ends."""
    close_stale_runs(tracker, cfg.name)
    if resume:
        run = find_resumable(tracker, cfg, "pipeline", resume)
        tracker.set_status(resume, "RUNNING")
        tracker.set_tags(resume, {END_REASON_TAG: "resumed", DRIVER_TAG: driver_id()})
        _say("run", f"resuming pipeline run {resume} ({run.info.run_name})")
        opened = OpenRun(tracker, resume, "pipeline", resumed=True, tags=dict(run.data.tags))
    else:
        run_id = _open_new(tracker, cfg, "pipeline", None, data_path, (), None, f"{cfg.name}-pipeline")
        opened = OpenRun(tracker, run_id, "pipeline")
    with _closing(tracker, cfg.name, [opened.run_id]):
        yield opened


@contextlib.contextmanager
def service_run(tracker: Tracker, experiment: str, stage: str, tags: dict[str, str],
                run_name: str | None = None) -> Iterator[OpenRun]:
    """A run that serves every config (e.g. a dataset's feature extractor in its own experiment): opened with
    `tags` and the lineage that applies (git commit), heartbeat and closed like a stage run."""
    close_stale_runs(tracker, experiment)
    tags = {"vaepipe.stage": stage, "vaepipe.git_commit": git_commit(), "vaepipe.source_model": NONE_TAG, **tags,
            DRIVER_TAG: driver_id(), HEARTBEAT_TAG: f"{time.time():.0f}", HEARTBEAT_EVERY_TAG: f"{HEARTBEAT_S:g}"}
    run_id = tracker.create_run(experiment, tags, run_name=run_name)
    with _closing(tracker, experiment, [run_id]):
        yield OpenRun(tracker, run_id, stage)


def _when(ms: int | None) -> str:
    if not ms:
        return "?"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------------------------------- listing


def list_pipeline_runs(cfg: "TrackingConfig", experiment: str | None = None, limit: int = 20) -> list[dict]:
    """The latest pipeline runs, newest first, each with its stage runs and the model versions they registered.

    Each dict: run_id, name, experiment, status, start_time (datetime), stages (list of dicts with stage,
    run_id, name, status), models (list of dicts with name, version, aliases, run_id). An empty list when
    the local sqlite store does not exist yet (listing never creates one).
    """
    uri = resolve_tracking_uri(cfg)
    if scheme(uri) == "sqlite" and sqlite_path(uri) is not None and not sqlite_path(uri).exists():
        return []
    tracker = Tracker.connect(cfg)
    if experiment is not None:
        close_stale_runs(tracker, experiment)  # what is listed as RUNNING is running
    parents = tracker.find_runs(experiment, stage="pipeline", max_results=limit)
    names = {}
    rows = []
    for run in parents:
        exp_id = run.info.experiment_id
        if exp_id not in names:
            names[exp_id] = tracker.client.get_experiment(exp_id).name
        children = retry_locked(lambda: tracker.client.search_runs(
            [exp_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", order_by=["attributes.start_time ASC"]
        ))
        rows.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "experiment": names[exp_id],
            "status": run.info.status,
            "start_time": datetime.datetime.fromtimestamp(run.info.start_time / 1000),
            "stages": [
                {"stage": c.data.tags.get("vaepipe.stage", "?"), "run_id": c.info.run_id,
                 "name": c.info.run_name, "status": c.info.status}
                for c in children
            ],
            "models": _versions_for_runs(tracker, [run.info.run_id] + [c.info.run_id for c in children]),
        })
    return rows


def _versions_for_runs(tracker: Tracker, run_ids: list[str]) -> list[dict]:
    quoted = ", ".join(f"'{r}'" for r in run_ids)
    versions = retry_locked(lambda: tracker.client.search_model_versions(f"run_id IN ({quoted})"))
    # Version search leaves aliases empty on some stores; the registered model always has them.
    aliases: dict[tuple[str, str], list[str]] = {}
    for name in {v.name for v in versions}:
        for alias, version in retry_locked(lambda: tracker.client.get_registered_model(name)).aliases.items():
            aliases.setdefault((name, str(version)), []).append(alias)
    return sorted(
        ({"name": v.name, "version": str(v.version), "aliases": sorted(aliases.get((v.name, str(v.version)), [])),
          "run_id": v.run_id} for v in versions),
        key=lambda d: (d["name"], int(d["version"])),
    )


def format_runs_table(rows: list[dict]) -> str:
    """One line per pipeline run, then an indented line per stage with its child run and registered models."""
    if not rows:
        return "no pipeline runs yet; start one with `vaepipe run CONFIG`\n"
    header = ("START", "EXPERIMENT", "RUN ID", "NAME", "STATUS")
    lines = [[r["start_time"].strftime("%Y-%m-%d %H:%M:%S"), r["experiment"], r["run_id"], r["name"] or "",
              r["status"]] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for row, line in zip(rows, lines):
        out.append("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
        for s in row["stages"]:
            models = [f"{m['name']} v{m['version']}" + "".join(f" @{a}" for a in m["aliases"])
                      for m in row["models"] if m["run_id"] == s["run_id"]]
            extra = f"  -> {', '.join(models)}" if models else ""
            out.append(f"    {s['stage']:<8} {s['status']:<9} {s['run_id']}  {s['name'] or ''}{extra}".rstrip())
    return "\n".join(out) + "\n"
