"""MLflow tracking for vaepipe, in four parts:

    store     where runs go and whether that store can be used (resolve the URI, check it, retry on a locked DB)
    tracker   `Tracker`: runs, params, tags, artifacts, models and the registry, all by explicit run id
    sink      `MetricSink`: the one path of every stage's metrics (namespaced names, one NaN rule, no replays)
    runs      the life of a run (`stage_run`, `pipeline_run`: open, resume, heartbeat, close) and the run listing
    lineage   what a run was made from (dataset, git commit, config hash)
    cards     the model card of each registered version

The names most code needs are importable from here.
"""
from pipelines.errors import ModelIntegrityError, TrackingUnavailableError
from pipelines.tracking.lineage import NONE_TAG, config_hash, dataset_tag, git_commit, log_dataset_inputs
from pipelines.tracking.runs import (
    END_REASON_TAG, OpenRun, close_stale_runs, find_resumable, format_runs_table, list_pipeline_runs, pipeline_run,
    stage_run,
)
from pipelines.tracking.sink import MetricSink
from pipelines.tracking.store import check_tracking_server, resolve_artifact_location, resolve_tracking_uri
from pipelines.tracking.tracker import (
    MODEL_SHA256_TAG, Tracker, experiment_name, files_digest, model_files_sha256, verified_model_dir,
)

__all__ = [
    "END_REASON_TAG", "MODEL_SHA256_TAG", "NONE_TAG", "MetricSink", "ModelIntegrityError", "OpenRun", "Tracker",
    "TrackingUnavailableError", "check_tracking_server", "close_stale_runs", "config_hash", "dataset_tag",
    "experiment_name", "files_digest", "find_resumable", "format_runs_table", "git_commit", "list_pipeline_runs",
    "log_dataset_inputs", "model_files_sha256", "pipeline_run", "resolve_artifact_location", "resolve_tracking_uri",
    "stage_run", "verified_model_dir",
]
