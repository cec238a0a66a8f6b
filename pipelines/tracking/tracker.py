"""`Tracker`: explicit-run-id access to one MLflow tracking store and model registry.

    tracker = Tracker.connect(cfg.tracking)
    run_id = tracker.create_run("demo", tags={...}, run_name="train")
    tracker.log_params(run_id, {"train.lr": 1e-3})
    version = tracker.register_model(f"runs:/{run_id}/model", "demo-nvae")  # alias "candidate"

Everything takes an explicit run id and goes through one `MlflowClient`, each call retried while SQLite is locked:
no fluent active-run state, so a run is created once on the driver and any Ray worker (or a retried one) logs to it
by id. A `Tracker` pickles to the already-resolved store, so workers never re-resolve `$MLFLOW_TRACKING_URI` or a
relative workdir. Stages use these methods, never the raw client. Metrics go through `pipelines.tracking.sink`;
the life of a run (open, resume, close, lineage) is `pipelines.tracking.runs`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from pipelines.errors import MissingInputError, ModelIntegrityError, TrackingUnavailableError
from pipelines.redaction import redact_text, redact_value
from pipelines.tracking.store import (
    CREDENTIAL_ENV, check_tracking_server, resolve_artifact_location, resolve_tracking_uri, retry_locked, scheme,
    take_uri_credentials,
)

if TYPE_CHECKING:
    import torch

    from pipelines.config import TrackingConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPERIMENT_PREFIX = "vaepipe/"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_TRUNCATED = "...[truncated]"  # a config's full values are in its config.yaml artifact
_ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")

# The digest of a logged model's files (a version tag; a run tag `vaepipe.model_sha256.<name>`; a LoggedModel tag)
# and, where it fits, the per-file list it was computed from.
MODEL_SHA256_TAG = "vaepipe.model_sha256"
MODEL_FILES_TAG = "vaepipe.model_files"
_MODEL_FILES_TAG_MAX = 5000  # MLflow's limit on a model version tag's value
# Loading a model whose digest was never recorded (logged by another tool, or before vaepipe recorded digests).
ALLOW_UNVERIFIED_ENV = "VAEPIPE_ALLOW_UNVERIFIED_MODELS"
# Files MLflow itself writes into a downloaded model directory; not part of what was logged.
_MODEL_DIR_NOISE = ("registered_model_meta",)



def experiment_name(name: str) -> str:
    """`vaepipe/<name>` for a config name; a name that already has the prefix is kept."""
    return name if name.startswith(EXPERIMENT_PREFIX) else f"{EXPERIMENT_PREFIX}{name}"


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) <= MAX_PARAM_VAL_LENGTH:
        return text
    return text[: MAX_PARAM_VAL_LENGTH - len(_TRUNCATED)] + _TRUNCATED


def _metric_value(key: str, value: Any) -> float:
    try:
        v = float(value)  # also 1-element tensors and numpy scalars
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: {value!r} is not a number; log numbers (or 1-element tensors)") from None
    # A diverging run must show it, so non-finite values are kept, as NaN: MLflow would clamp ±inf to
    # ±1.8e308 and flatten every chart of that metric.
    return v if math.isfinite(v) else math.nan


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _image_to_uint8_hwc(image: Any) -> Any:
    """A torch (C,H,W)/(H,W) or numpy (H,W,C)/(H,W) image, float in [0, 1] or uint8, as a uint8 HWC array."""
    import numpy as np

    if hasattr(image, "detach"):  # torch tensor: channels first
        arr = image.detach().float().cpu().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
        if arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(
            f"image of shape {tuple(arr.shape)} is not an image; pass a torch tensor (C,H,W) or (H,W) "
            "or a numpy array (H,W,C) or (H,W), with 1, 3 or 4 channels (torchvision.utils.make_grid for batches)"
        )
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"image dtype {arr.dtype} is not supported; pass float in [0, 1] or uint8")
    return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)




class _PickleNotice(logging.Filter):
    """Drops mlflow.pytorch's warning that pickled models run code when loaded: vaepipe pickles on purpose (MLflow's
    torch.export format loses the models' methods) and the README's Security section says what that means; the
    warning came once per logged model. `vaepipe --verbose` keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("VAEPIPE_VERBOSE") == "1" or not str(record.msg).startswith(
            "Saving pytorch model by Pickle")


logging.getLogger("mlflow.pytorch").addFilter(_PickleNotice())

class Tracker:
    """Explicit-run-id access to one MLflow tracking store and model registry.

    Build it with `Tracker.connect(cfg)`, which resolves and checks the store. It pickles to the resolved
    URIs, so it can be handed to Ray tasks and workers without re-running the checks there.
    """

    def __init__(self, tracking_uri: str, artifact_root: str | None = None, registry_uri: str | None = None):
        self.tracking_uri = take_uri_credentials(tracking_uri)
        self.registry_uri = take_uri_credentials(registry_uri) if registry_uri else self.tracking_uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        self._experiment_ids: dict[str, str] = {}

    @classmethod
    def connect(cls, cfg: "TrackingConfig") -> "Tracker":
        """Resolve the store from `cfg`, check it (creating a sqlite DB), and make it mlflow's process default."""
        uri = resolve_tracking_uri(cfg)
        check_tracking_server(uri, cfg.connect_timeout_s)
        tracker = cls(uri, resolve_artifact_location(cfg, uri), cfg.registry_uri)
        tracker.activate()
        return tracker

    def __reduce__(self):
        # A server's credentials travel with the tracker (Ray's object store, never its logs): a worker on
        # another node has no MLFLOW_TRACKING_USERNAME / _PASSWORD of its own.
        auth = None
        if scheme(self.tracking_uri) in ("http", "https") and any(os.environ.get(k) for k in CREDENTIAL_ENV):
            auth = tuple(os.environ.get(k) for k in CREDENTIAL_ENV)
        return (_restore_tracker, (self.tracking_uri, self.artifact_root, self.registry_uri, auth))

    def __repr__(self) -> str:
        return f"Tracker({redact_text(self.tracking_uri)!r}, artifact_root={redact_text(str(self.artifact_root))!r})"

    def activate(self) -> None:
        """Point mlflow's process-wide URIs here: `runs:/` and `models:/` URIs resolve through them.

        mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI (and the registry's variable); those are put back,
        or a later config without a tracking URI in the same process would silently track into this store."""
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # -- experiments and runs

    def experiment_id(self, name: str) -> str:
        """Get or create the experiment `vaepipe/<name>`, with artifacts under this tracker's artifact root."""
        full = experiment_name(name)
        if full in self._experiment_ids:
            return self._experiment_ids[full]
        exp = retry_locked(lambda: self.client.get_experiment_by_name(full))
        if exp is None:
            location = f"{self.artifact_root}/{full}" if self.artifact_root else None
            try:
                exp_id = retry_locked(lambda: self.client.create_experiment(full, artifact_location=location))
            except MlflowException as e:
                if e.error_code not in _ALREADY_EXISTS:
                    raise
                # Another process created it between our lookup and create.
                exp_id = retry_locked(lambda: self.client.get_experiment_by_name(full)).experiment_id
        elif exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"experiment {full!r} (id {exp.experiment_id}) is deleted; restore it with `mlflow experiments "
                f"restore --experiment-id {exp.experiment_id}` or purge it with `mlflow gc`, then run again"
            )
        else:
            exp_id = exp.experiment_id
        self._experiment_ids[full] = exp_id
        return exp_id

    def create_run(self, experiment: str, tags: Mapping[str, Any], run_name: str | None = None) -> str:
        """Create a run in `vaepipe/<experiment>` with `tags` (credentials masked); returns its id."""
        exp_id = self.experiment_id(experiment)
        clean = {k: str(redact_value(k, v)) for k, v in tags.items()}
        return retry_locked(lambda: self.client.create_run(exp_id, tags=clean, run_name=run_name)).info.run_id

    def get_run(self, run_id: str) -> Run:
        """The run `run_id`, or MissingInputError naming the store and how to list runs."""
        try:
            return retry_locked(lambda: self.client.get_run(run_id))
        except MlflowException as e:
            if e.error_code not in _NOT_FOUND and "not found" not in e.message.lower():
                raise
        raise MissingInputError(f"no run {run_id!r} in {redact_text(self.tracking_uri)}; `vaepipe runs list` shows "
                                f"the runs of this store")

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status: RUNNING reopens it (no end time), the others end it."""
        if status == "RUNNING":
            retry_locked(lambda: self.client.update_run(run_id, status="RUNNING"))
        else:
            self.end_run(run_id, status)

    def metric_history(self, run_id: str, key: str) -> list[Metric]:
        return list(retry_locked(lambda: self.client.get_metric_history(run_id, key)))

    def list_artifacts(self, run_id: str, path: str | None = None) -> list:
        try:
            return list(retry_locked(lambda: self.client.list_artifacts(run_id, path)))
        except (MlflowException, OSError):
            return []

    def log_inputs(self, run_id: str, datasets: Sequence[Any]) -> None:
        retry_locked(lambda: self.client.log_inputs(run_id, datasets=list(datasets)))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params in requests within MLflow's limits; values over 6000 characters are truncated."""
        self._log_params_and_tags(run_id, params, {})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._log_params_and_tags(run_id, {}, tags)

    def _log_params_and_tags(self, run_id: str, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        # Credentials never reach the store: URIs' user-info and secret-named keys' values are masked.
        entities: list[Param | RunTag] = [Param(k, _param_value(redact_value(k, v))) for k, v in params.items()]
        entities += [RunTag(k, str(redact_value(k, v))) for k, v in tags.items()]
        for chunk in _chunks(entities, MAX_PARAMS_TAGS_PER_BATCH):
            ps = [e for e in chunk if isinstance(e, Param)]
            ts = [e for e in chunk if isinstance(e, RunTag)]
            retry_locked(lambda: self.client.log_batch(run_id, params=ps, tags=ts, synchronous=True))

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> None:
        """Write a dict of metrics at `step` in requests within MLflow's limit. Non-finite values are logged as NaN
        (see _metric_value). Stages log through `pipelines.tracking.sink.MetricSink`, which calls this."""
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        entries = [Metric(k, _metric_value(k, v), ts, int(step)) for k, v in metrics.items()]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            retry_locked(lambda: self.client.log_batch(run_id, metrics=chunk, synchronous=True))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        retry_locked(lambda: self.client.set_terminated(run_id, status=status))

    # -- artifacts

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        retry_locked(lambda: self.client.log_artifact(run_id, str(local_path), artifact_path))

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        retry_locked(lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        retry_locked(lambda: self.client.log_text(run_id, text, artifact_file))

    def log_dict(self, run_id: str, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Save a dict as JSON (or YAML when artifact_file ends in .yaml/.yml)."""
        retry_locked(lambda: self.client.log_dict(run_id, dict(dictionary), artifact_file))

    def log_image(self, run_id: str, image: "torch.Tensor | Any", artifact_file: str) -> None:
        """Save an image as a PNG artifact: torch (C,H,W)/(H,W) or numpy (H,W,C)/(H,W), float [0,1] or uint8."""
        from PIL import Image

        if not artifact_file.lower().endswith(".png"):
            raise ValueError(f"log_image writes PNG; name the artifact *.png, not {artifact_file!r}")
        arr = _image_to_uint8_hwc(image)
        directory, filename = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, filename)
            Image.fromarray(arr).save(local, format="PNG")
            self.log_artifact(run_id, local, directory or None)

    def download_artifacts(self, run_id: str, path: str, dst_path: str | os.PathLike | None = None) -> str:
        dst = str(dst_path) if dst_path is not None else None
        return retry_locked(lambda: self.client.download_artifacts(run_id, path, dst))

    # -- models and registry

    def log_pytorch_model(
        self,
        run_id: str,
        model: "torch.nn.Module",
        name: str = "model",
        code_paths: Sequence[str] | None = None,
        pip_requirements: Sequence[str] | None = None,
        input_example: Any = None,
    ) -> str:
        """Log a torch module to `run_id` the way vaepipe models load back, and return its model URI.

        Pickle serialization: MLflow 3's default torch.export (pt2) returns a GraphModule without `sample()`.
        `code_paths` defaults to the `vae` package, so the loaded object is our class with nothing installed.
        Explicit `pip_requirements` (default: the installed torch, torchvision, mlflow, pillow) skip MLflow's slow
        requirement inference. The model also gets a pyfunc flavour
        that serves generation requests, with their signature and a validated example (pipelines/serving.py);
        `input_example` (a batch of images) lends that example its image.
        """
        from pipelines import serving

        if code_paths is None:
            import vae

            code_paths = [str(Path(vae.__file__).resolve().parent)]
        self.activate()  # log_model resolves the run through mlflow's process-wide tracking URI
        # Left to itself, log_model files the LoggedModel under the process's active experiment (the
        # Default one without a fluent run), where `runs:/RUN/model` cannot find it: create it in the run's.
        exp_id = retry_locked(lambda: self.client.get_run(run_id)).info.experiment_id
        logged = retry_locked(lambda: self.client.create_logged_model(exp_id, name=name, source_run_id=run_id))
        # Not retried on a locked store: a second attempt would save the artifacts twice.
        info = serving.log_model(model, name, run_id, logged.model_id, code_paths=list(code_paths),
                                 pip_requirements=pip_requirements, example_images=input_example)
        # Loading unpickles model.pth and imports the code paths: record what was logged, to check before loading.
        self._record_model_digest(run_id, name, logged.model_id, info.model_uri)
        return info.model_uri

    def _record_model_digest(self, run_id: str, name: str, model_id: str | None, model_uri: str) -> None:
        files = model_files_sha256(self.download_model(model_uri))
        digest = files_digest(files)
        retry_locked(lambda: self.client.set_tag(run_id, f"{MODEL_SHA256_TAG}.{name}", digest))
        if model_id:
            retry_locked(lambda: self.client.set_logged_model_tags(model_id, {MODEL_SHA256_TAG: digest}))

    def download_model(self, model_uri: str, dst: str | None = None) -> str:
        """A local copy of a logged model's directory."""
        import mlflow.artifacts

        self.activate()
        dst = dst or tempfile.mkdtemp(prefix="vaepipe-model-")
        return retry_locked(lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=dst, tracking_uri=self.tracking_uri))

    def recorded_model_digest(self, model_uri: str) -> tuple[str | None, str | None]:
        """(digest, per-file list) recorded for `model_uri` when it was logged and registered; Nones if none."""
        ref = model_uri.split(":/", 1)[-1].strip("/")
        if model_uri.startswith("runs:/"):
            run_id, _, name = ref.partition("/")
            tags = retry_locked(lambda: self.client.get_run(run_id)).data.tags
            return tags.get(f"{MODEL_SHA256_TAG}.{name}"), None
        if model_uri.startswith("models:/m-"):
            tags = retry_locked(lambda: self.client.get_logged_model(ref)).tags or {}
            return tags.get(MODEL_SHA256_TAG), None
        if model_uri.startswith("models:/"):
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = retry_locked(lambda: self.client.get_model_version_by_alias(name, alias))
            else:
                name, _, version = ref.partition("/")
                mv = retry_locked(lambda: self.client.get_model_version(name, version))
            return mv.tags.get(MODEL_SHA256_TAG), mv.tags.get(MODEL_FILES_TAG)
        return None, None

    def register_model(
        self,
        model_uri: str,
        name: str,
        alias: str | None = "candidate",
        tags: Mapping[str, Any] | None = None,
        await_s: int = 300,
    ) -> str:
        """Register `model_uri` as a new version of `name` (created if missing), wait for READY, set `alias`."""
        self.activate()  # mlflow resolves runs:/ and models:/ URIs through the process-wide URIs
        # mlflow.register_model prints "Successfully registered model ..." and "Created version ..." on stderr;
        # the stages print their own line with the alias, so those two go unless `vaepipe --verbose`.
        quiet = contextlib.nullcontext() if os.environ.get("VAEPIPE_VERBOSE") == "1" else \
            contextlib.redirect_stderr(io.StringIO())
        with quiet:
            mv = retry_locked(lambda: mlflow.register_model(
                model_uri, name, await_registration_for=await_s, tags={k: str(v) for k, v in (tags or {}).items()}
            ))
        version = str(mv.version)
        self._tag_version_digest(model_uri, name, version)
        status = retry_locked(lambda: self.client.get_model_version(name, version)).status
        if status != "READY":
            raise TrackingUnavailableError(
                f"model {name!r} version {version} is {status} after {await_s} s, not READY; check the registry "
                f"at {self.registry_uri} and set the alias later with Tracker.set_alias"
            )
        if alias:
            self.set_alias(name, alias, version)
        return version

    def _tag_version_digest(self, model_uri: str, name: str, version: str) -> None:
        """The version carries the sha256 of its files: the digest recorded at log time when the source has one
        (and the files still match it), else the files' digest now."""
        files = model_files_sha256(self.download_model(f"models:/{name}/{version}"))
        digest = files_digest(files)
        recorded, _ = self.recorded_model_digest(model_uri) if model_uri.startswith(("runs:/", "models:/m-")) \
            else (None, None)
        if recorded is not None and recorded != digest:
            raise ModelIntegrityError(
                f"{redact_text(model_uri)}: its files changed between logging and registration (sha256 {digest[:12]}"
                f"..., logged as {recorded[:12]}...); not registering it. Log the model again from a trusted run"
            )
        tags = {MODEL_SHA256_TAG: digest}
        listing = "\n".join(f"{h}  {p}" for p, h in sorted(files.items()))
        if len(listing) <= _MODEL_FILES_TAG_MAX:
            tags[MODEL_FILES_TAG] = listing
        for key, value in tags.items():
            retry_locked(lambda: self.client.set_model_version_tag(name, version, key, value))

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        retry_locked(lambda: self.client.set_registered_model_alias(name, alias, str(version)))

    def model_version(self, name: str, version: str | int) -> ModelVersion:
        return retry_locked(lambda: self.client.get_model_version(name, str(version)))

    def registered_model_names(self) -> list[str]:
        return [m.name for m in retry_locked(lambda: self.client.search_registered_models())]

    def set_description(self, name: str, version: str | int, text: str) -> None:
        """The markdown description (model card) of a registered version."""
        retry_locked(lambda: self.client.update_model_version(name, str(version), description=text))

    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        try:
            return retry_locked(lambda: self.client.get_model_version_by_alias(name, alias))
        except MlflowException as e:
            if e.error_code not in _NOT_FOUND and "not found" not in e.message.lower():
                raise
        raise LookupError(
            f"registered model {name!r} has no version with alias {alias!r} in {self.registry_uri}; "
            f"run the stage that registers it, or set the alias with `Tracker.set_alias({name!r}, {alias!r}, VERSION)`"
        )

    def find_runs(
        self,
        experiment: str | None = None,
        *,
        stage: str | None = None,
        pipeline_run: str | None = None,
        parent_run_id: str | None = None,
        filter_string: str | None = None,
        order_by: Sequence[str] = ("attributes.start_time DESC",),
        max_results: int = 100,
    ) -> list[Run]:
        """Runs in `vaepipe/<experiment>` (all vaepipe experiments when None), narrowed by lineage tags."""
        exp_ids = self._experiment_ids_for(experiment)
        if not exp_ids:
            return []
        clauses = [filter_string] if filter_string else []
        for tag, value in (("vaepipe.stage", stage), ("vaepipe.pipeline_run", pipeline_run),
                           ("mlflow.parentRunId", parent_run_id)):
            if value is not None:
                clauses.append(f"tags.`{tag}` = '{_quote(value)}'")
        return list(retry_locked(lambda: self.client.search_runs(
            exp_ids, " and ".join(clauses), max_results=max_results, order_by=list(order_by)
        )))

    def _experiment_ids_for(self, experiment: str | None) -> list[str]:
        if experiment is not None:
            exp = retry_locked(lambda: self.client.get_experiment_by_name(experiment_name(experiment)))
            return [exp.experiment_id] if exp is not None and exp.lifecycle_stage == "active" else []
        exps = retry_locked(lambda: self.client.search_experiments(filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'"))
        return [e.experiment_id for e in exps]


def model_files_sha256(directory: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} of every file of a model directory (MLflow's own download markers left out)."""
    root = Path(directory)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in _MODEL_DIR_NOISE and "__pycache__" not in path.parts:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[path.relative_to(root).as_posix()] = digest.hexdigest()
    return out


def files_digest(files: Mapping[str, str]) -> str:
    """One sha256 over a directory's `{path: sha256}`: any added, removed, renamed or changed file changes it."""
    return hashlib.sha256("\n".join(f"{h}  {p}" for p, h in sorted(files.items())).encode()).hexdigest()


def verified_model_dir(tracker: "Tracker", model_uri: str) -> str:
    """A local copy of the model at `model_uri` whose files match the sha256 recorded when it was logged and
    registered; the model is loaded from this copy, so what was checked is what is unpickled.

    Raises ModelIntegrityError on a mismatch, and when no digest was recorded (unless
    $VAEPIPE_ALLOW_UNVERIFIED_MODELS=1)."""
    expected, listing = tracker.recorded_model_digest(model_uri)
    local = tracker.download_model(model_uri)
    files = model_files_sha256(local)
    actual = files_digest(files)
    shown = redact_text(model_uri)
    if expected is None:
        if os.environ.get(ALLOW_UNVERIFIED_ENV) == "1":
            log.warning("%s has no recorded sha256; loading it unverified (%s=1)", shown, ALLOW_UNVERIFIED_ENV)
            return local
        raise ModelIntegrityError(
            f"{shown} has no recorded sha256 (logged by another tool, or before vaepipe recorded them), so vaepipe "
            f"cannot check it before unpickling it, which runs code as you. Register it again from its run, or, "
            f"if you trust everyone who can write to this store, set {ALLOW_UNVERIFIED_ENV}=1"
        )
    if actual != expected:
        changed = ""
        if listing:
            recorded = {p: h for h, p in (line.split("  ", 1) for line in listing.splitlines() if "  " in line)}
            diff = sorted(p for p in set(recorded) | set(files) if recorded.get(p) != files.get(p))
            changed = f"; changed: {', '.join(diff[:10])}"
        raise ModelIntegrityError(
            f"{shown}: its files do not match the sha256 recorded when it was logged (expected {expected[:16]}..., "
            f"found {actual[:16]}...{changed}). Refusing to load it: unpickling a swapped model runs its code as "
            f"you. Find out who changed the artifact store; restore the files from a trusted copy or register a "
            f"new version from a trusted run"
        )
    return local


def _restore_tracker(tracking_uri: str, artifact_root: str | None, registry_uri: str | None,
                     auth: tuple[str | None, str | None] | None = None) -> Tracker:
    for key, value in zip(CREDENTIAL_ENV, auth or ()):
        if value is not None:
            os.environ.setdefault(key, value)
    tracker = Tracker(tracking_uri, artifact_root, registry_uri)
    tracker.activate()
    return tracker


def _quote(value: str) -> str:
    return value.replace("'", "\\'")
