"""MLflow tracking for vaepipe: where runs go, how they are tagged, and the model registry.

    tracker = Tracker.connect(cfg.tracking)
    parent = tracker.start_pipeline_run(cfg)
    run_id = tracker.start_stage_run(cfg, "train", parent, dataset_tag=dataset_tag(cfg.data.path))
    tracker.log_metrics(run_id, {"train/loss": 1.23}, step=10)
    version = tracker.register_model(f"runs:/{run_id}/model", f"{cfg.name}-nvae")  # alias "candidate"
    tracker.end_run(run_id)

Everything takes an explicit run id and goes through one `MlflowClient`: no fluent active-run state, so a run
is created once on the driver and any Ray worker (or a retried one) logs to it by id. A `Tracker` pickles to
the already-resolved store, so workers never re-resolve `$MLFLOW_TRACKING_URI` or a relative workdir.

The store is `sqlite:///<workdir>/mlflow.db` unless the config or `$MLFLOW_TRACKING_URI` names another.
SQLite allows one writer at a time, so the driver creates and migrates the DB before any worker starts, and
every call is retried with backoff on "database is locked".
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import random
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from pipelines.redaction import redact_text, redact_value, split_credentials

if TYPE_CHECKING:
    import torch

    from pipelines.config import PipelineConfig, TrackingConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPERIMENT_PREFIX = "vaepipe/"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
NONE_TAG = "none"  # the value of a lineage tag that does not apply (a train stage has no source model)
_DB_SCHEMES = ("postgresql", "mysql", "mssql")
_TRUNCATED = "...[truncated]"  # a config's full values are in its config.yaml artifact
_LOCK_RETRIES = 6
_ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


class TrackingUnavailableError(RuntimeError):
    """The tracking store cannot be reached or used; the message names the URI (credentials masked) and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))


class ModelIntegrityError(RuntimeError):
    """A logged model's files differ from the sha256 recorded when it was logged, or none was recorded: vaepipe
    refuses to unpickle it."""


# The digest of a logged model's files (a version tag; a run tag `vaepipe.model_sha256.<name>`; a LoggedModel tag)
# and, where it fits, the per-file list it was computed from.
MODEL_SHA256_TAG = "vaepipe.model_sha256"
MODEL_FILES_TAG = "vaepipe.model_files"
_MODEL_FILES_TAG_MAX = 5000  # MLflow's limit on a model version tag's value
# Loading a model whose digest was never recorded (logged by another tool, or before vaepipe recorded digests).
ALLOW_UNVERIFIED_ENV = "VAEPIPE_ALLOW_UNVERIFIED_MODELS"
# Files MLflow itself writes into a downloaded model directory; not part of what was logged.
_MODEL_DIR_NOISE = ("registered_model_meta",)

# MLflow's REST client takes a server's credentials from these variables, never from the URI.
_CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


# ---------------------------------------------------------------------------------------------- resolution


def _urlopen(url: str, timeout: float):
    """urlopen with the proxies of the environment as it is now (urllib's global opener keeps the first call's),
    and none for a loopback server."""
    host = urllib.parse.urlparse(url).hostname or ""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({} if loopback else None))
    return opener.open(url, timeout=timeout)


def resolve_tracking_uri(cfg: "TrackingConfig") -> str:
    """cfg.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<abs workdir>/mlflow.db (directory checked).

    An http(s) URI with `user:password@` comes back without them, which go to MLflow's own
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (inherited by a local Ray started afterwards)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        clean = take_uri_credentials(uri)
        if not cfg.tracking_uri and clean != uri:
            os.environ["MLFLOW_TRACKING_URI"] = clean  # every process started from here inherits it, password-free
        return clean
    return f"sqlite:///{_checked_workdir(cfg.workdir) / 'mlflow.db'}"


def take_uri_credentials(uri: str) -> str:
    """`uri` without user-info for http(s) servers, whose user and password are moved into MLflow's variables."""
    if _scheme(uri) not in ("http", "https"):
        return uri
    clean, user, password = split_credentials(uri)
    for key, value in zip(_CREDENTIAL_ENV, (user, password)):
        if value is not None:
            os.environ[key] = value
    return clean


def resolve_artifact_location(cfg: "TrackingConfig", tracking_uri: str) -> str | None:
    """The artifact root for experiments we create, as a URI; None lets an http server proxy artifacts.

    A local default must be absolute: MLflow's own default is relative to the creating process's working
    directory, which differs between the driver and Ray workers.
    """
    if cfg.artifact_location:
        return _as_uri(cfg.artifact_location)
    if _scheme(tracking_uri) in ("http", "https"):
        return None
    return _as_uri(str(Path(cfg.workdir).expanduser().resolve() / "mlartifacts"))


def _as_uri(location: str) -> str:
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location.rstrip("/")
    return Path(location).expanduser().resolve().as_uri()


def _scheme(uri: str) -> str:
    # "postgresql+psycopg2" and "postgresql" are the same store to us.
    return urllib.parse.urlparse(uri).scheme.split("+", 1)[0].lower()


def check_tracking_server(uri: str, timeout_s: float) -> None:
    """Make sure `uri` is usable within `timeout_s`, or raise TrackingUnavailableError naming the fix.

    http(s): poll `/health` (falling back to the REST API behind proxies without it) until the deadline.
    sqlite: create and migrate the DB, and its registry tables, here and now: on the driver, before workers.
    postgresql/mysql/mssql: open the store, bounded by the timeout.
    """
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        _wait_for_http(uri, timeout_s)
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None:
            _touch_store(uri)
        else:
            _check_sqlite_file(path)
            # Two first runs on a new store would race in MLflow's schema migration ("duplicate column name"):
            # one process at a time creates and migrates it; the others then find it ready.
            _with_store_lock(path, lambda: _touch_store(uri))
    elif scheme in _DB_SCHEMES:
        _with_timeout(lambda: _touch_store(uri), timeout_s, uri)
    elif scheme in ("", "file"):
        raise TrackingUnavailableError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use a database such as "
            f"sqlite:///{Path(uri.removeprefix('file://') or 'runs').expanduser().resolve() / 'mlflow.db'} "
            "(set tracking.tracking_uri or MLFLOW_TRACKING_URI), or leave both unset for <workdir>/mlflow.db"
        )
    else:
        raise TrackingUnavailableError(
            f"tracking URI {uri!r} has scheme {scheme!r}, which vaepipe does not support; use http(s)://HOST:PORT "
            "(a `mlflow server`), sqlite:///ABS/PATH/mlflow.db, or postgresql/mysql/mssql:// database URIs"
        )


def _checked_workdir(workdir: str) -> Path:
    """tracking.workdir as an absolute directory, created if missing, or a TrackingUnavailableError saying why not."""
    path = Path(workdir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise TrackingUnavailableError(
            f"tracking.workdir {workdir!r} is a file ({path}), not a directory; point tracking.workdir at a "
            f"directory (e.g. --set tracking.workdir=runs) or move that file away"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingUnavailableError(
            f"tracking.workdir {path} cannot be created ({e.strerror or e}: {e.filename or path}); point "
            f"tracking.workdir at a directory you can write (e.g. --set tracking.workdir=runs)"
        ) from None
    return path


# How long the store check waits for another writer's lock on a sqlite store before it gives up and says so.
_SQLITE_PROBE_TIMEOUT_S = 2.0
# How long a process waits for another one creating or migrating the same new store (a migration takes ~15 s
# on 2 cores).
_STORE_LOCK_TIMEOUT_S = 120.0


def _check_sqlite_file(path: Path) -> None:
    """Fail in seconds, with the cause and the fix, on a sqlite store MLflow could not use: a directory that is
    not writable, a path that is a directory, a file that is not (or no longer) a SQLite database, a database
    another process keeps locked. MLflow itself answers these with SQLAlchemy tracebacks, some after minutes."""
    import sqlite3

    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise TrackingUnavailableError(
            f"the sqlite store {path} cannot be created: {folder} is a file, not a directory; point tracking.workdir "
            f"(or the sqlite:/// URI) at a directory"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # SQLite writes its journal next to the database: the directory itself must be writable.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vaepipe-write-check-"):
            pass
    except OSError as e:
        raise TrackingUnavailableError(
            f"the sqlite store {path} is in a directory this user cannot write ({e.strerror or e}: {folder}); "
            f"SQLite needs to write its journal there: make it writable (chmod u+w {folder}) or point "
            f"tracking.workdir at a writable directory (e.g. --set tracking.workdir=runs)"
        ) from None
    if not path.exists():
        return
    if path.is_dir():
        raise TrackingUnavailableError(
            f"the sqlite store {path} is a directory, not a database file; move it away or point tracking.workdir "
            f"(or the sqlite:/// URI) elsewhere"
        )
    broken = (
        f"; it cannot be repaired in place: move it aside (mv {path} {path}.broken) and run again to start a new "
        f"store, or restore it from a backup"
    )
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError as e:
        raise TrackingUnavailableError(
            f"the sqlite store {path} cannot be read ({e.strerror or e}); fix its permissions (chmod u+rw {path})"
        ) from None
    if header and header != b"SQLite format 3\x00":
        raise TrackingUnavailableError(f"{path} is not a SQLite database (the file was overwritten){broken}")
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=_SQLITE_PROBE_TIMEOUT_S)
    except sqlite3.Error as e:
        raise TrackingUnavailableError(
            f"the sqlite store {path} cannot be opened for writing ({e}); fix its permissions (chmod u+rw {path})"
        ) from None
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the schema: a cut-off file fails here
        con.execute("BEGIN IMMEDIATE")  # takes the write lock for a moment, as any run will
        con.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise TrackingUnavailableError(
                f"the sqlite store {path} is locked: another process has held its write lock for more than "
                f"{_SQLITE_PROBE_TIMEOUT_S:g} s (`fuser {path}` names it); let it finish or stop it, then run again. "
                f"SQLite takes one writer at a time: for many concurrent runs use a `mlflow server` "
                f"(cluster/README.md)"
            ) from None
        if "readonly" in str(e) or "read-only" in str(e):
            raise TrackingUnavailableError(
                f"the sqlite store {path} is read-only ({e}); make it writable (chmod u+w {path} {folder})"
            ) from None
        raise TrackingUnavailableError(f"the sqlite store {path} is not a usable database ({e}){broken}") from None
    except sqlite3.DatabaseError as e:
        raise TrackingUnavailableError(f"the sqlite store {path} is damaged ({e}){broken}") from None
    finally:
        con.close()


def _with_store_lock(path: Path, fn: Callable[[], None]) -> None:
    from filelock import FileLock, Timeout

    lock = FileLock(f"{path}.lock")
    try:
        with lock.acquire(timeout=_STORE_LOCK_TIMEOUT_S):
            fn()
    except Timeout:
        raise TrackingUnavailableError(
            f"another process has been creating or migrating the sqlite store {path} for more than "
            f"{_STORE_LOCK_TIMEOUT_S:g} s (it holds {lock.lock_file}); let it finish, or if none runs, delete "
            f"{lock.lock_file} and run again"
        ) from None


def _sqlite_path(uri: str) -> Path | None:
    """The DB file of a sqlite URI (relative paths are relative to the working directory, as for sqlite)."""
    path = uri.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def _unreachable(uri: str, why: str) -> TrackingUnavailableError:
    return TrackingUnavailableError(
        f"MLflow tracking server {uri} is not reachable ({why}); start it with "
        f"`mlflow server --host HOST --port PORT --backend-store-uri sqlite:///PATH/mlflow.db "
        f"--artifacts-destination PATH/mlartifacts`, or set tracking.tracking_uri / MLFLOW_TRACKING_URI "
        f"to a running server (unset both for the local sqlite store)"
    )


def _wait_for_http(uri: str, timeout_s: float) -> None:
    base = uri.rstrip("/")
    deadline = time.monotonic() + timeout_s
    why = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _unreachable(uri, f"waited {timeout_s:g} s; last error: {why}")
        try:
            with _urlopen(f"{base}/health", timeout=min(left, 5.0)) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 404 and _rest_api_answers(base, min(max(deadline - time.monotonic(), 0.1), 5.0)):
                return
            why = f"HTTP {e.code} from {base}/health"
        except (urllib.error.URLError, OSError) as e:
            why = str(getattr(e, "reason", e))
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))


def _rest_api_answers(base: str, timeout_s: float) -> bool:
    # Any answer below 500 (including 401/403 from an auth proxy) means a live MLflow REST API.
    try:
        with _urlopen(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout=timeout_s):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (urllib.error.URLError, OSError):
        return False


def _touch_store(uri: str) -> None:
    # The first client call on a database URI creates and migrates its tables; do both stores at once.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        _retry_locked(lambda: client.search_experiments(max_results=1))
        _retry_locked(lambda: client.search_registered_models(max_results=1))
    except MlflowException as e:
        raise TrackingUnavailableError(
            f"tracking store {uri} cannot be opened: {e.message}; check the path and its permissions, or, if an "
            f"older MLflow made it, upgrade it with `mlflow db upgrade {uri}`"
        ) from e
    except Exception as e:  # SQLAlchemy's own errors (a damaged database, a driver missing) come through raw
        if type(e).__module__.split(".")[0] != "sqlalchemy":
            raise
        cause = str(getattr(e, "orig", None) or e).splitlines()[0]
        raise TrackingUnavailableError(
            f"tracking store {uri} cannot be used: {cause}; if the database is damaged, move it aside and run "
            f"again to start a new store, or restore it from a backup"
        ) from None


def _with_timeout(fn: Callable[[], None], timeout_s: float, uri: str) -> None:
    # Database drivers can block for minutes on an unroutable host; a daemon thread bounds the wait.
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the caller's thread below
            errors.append(e)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise _unreachable(uri, f"no answer within {timeout_s:g} s")
    if errors:
        raise errors[0]


def _is_locked(e: BaseException) -> bool:
    while e is not None:
        if "database is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _retry_locked(fn: Callable[[], T]) -> T:
    """Call fn, retrying with jittered exponential backoff while SQLite reports "database is locked"."""
    for attempt in range(_LOCK_RETRIES - 1):
        try:
            return fn()
        except Exception as e:
            if not _is_locked(e):
                raise
            delay = 0.2 * 2**attempt * (1 + random.random())
            log.warning("MLflow store is locked by another writer; retrying in %.1f s", delay)
            time.sleep(delay)
    return fn()


# ---------------------------------------------------------------------------------------------- lineage


def dataset_tag(manifest: str | os.PathLike | Mapping[str, Any]) -> str:
    """`name@<12 hex of sha256>` of a prepared dataset's dataset.json (a path to it or its directory).

    A dict is hashed as canonical JSON (sorted keys, no spaces), since it has no file bytes of its own.
    """
    if isinstance(manifest, Mapping):
        data = dict(manifest)
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        where = "the manifest dict"
    else:
        path = str(manifest)
        if not path.endswith(".json"):
            path = path.rstrip("/") + "/dataset.json"
        raw = _read_bytes(path)
        where = path
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); prepare it again with `vaepipe data prepare`") from None
    name = data.get("name") if isinstance(data, dict) else None
    if not name:
        raise ValueError(f"{where} has no 'name'; prepare the dataset again with `vaepipe data prepare`")
    return f"{name}@{hashlib.sha256(raw).hexdigest()[:12]}"


def _read_bytes(path: str) -> bytes:
    if "://" in path:
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset manifest {p} does not exist; prepare the data with `vaepipe data prepare`")
    return p.read_bytes()


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """$VAEPIPE_GIT_COMMIT (set by `vaepipe submit`, whose upload has no .git), else `git rev-parse HEAD` of the
    repository holding this package, else "unknown" (installed, no git)."""
    if os.environ.get("VAEPIPE_GIT_COMMIT"):
        return os.environ["VAEPIPE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


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


# ---------------------------------------------------------------------------------------------- tracker


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
        if _scheme(self.tracking_uri) in ("http", "https") and any(os.environ.get(k) for k in _CREDENTIAL_ENV):
            auth = tuple(os.environ.get(k) for k in _CREDENTIAL_ENV)
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
        exp = _retry_locked(lambda: self.client.get_experiment_by_name(full))
        if exp is None:
            location = f"{self.artifact_root}/{full}" if self.artifact_root else None
            try:
                exp_id = _retry_locked(lambda: self.client.create_experiment(full, artifact_location=location))
            except MlflowException as e:
                if e.error_code not in _ALREADY_EXISTS:
                    raise
                # Another process created it between our lookup and create.
                exp_id = _retry_locked(lambda: self.client.get_experiment_by_name(full)).experiment_id
        elif exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"experiment {full!r} (id {exp.experiment_id}) is deleted; restore it with `mlflow experiments "
                f"restore --experiment-id {exp.experiment_id}` or purge it with `mlflow gc`, then run again"
            )
        else:
            exp_id = exp.experiment_id
        self._experiment_ids[full] = exp_id
        return exp_id

    def start_pipeline_run(
        self, config: "PipelineConfig", run_name: str | None = None, dataset_tag: str | None = None
    ) -> str:
        """Create the parent run of one pipeline run (its own `vaepipe.pipeline_run`), with params and config.yaml."""
        run = self._create_run(config, run_name, {"vaepipe.stage": "pipeline"})
        run_id = run.info.run_id
        tags = {"vaepipe.pipeline_run": run_id, "vaepipe.dataset": dataset_tag or NONE_TAG}
        self._log_config(run_id, config, tags)
        return run_id

    def start_stage_run(
        self,
        config: "PipelineConfig",
        stage: str,
        parent_run_id: str,
        dataset_tag: str | None = None,
        source_model: str | None = None,
        run_name: str | None = None,
    ) -> str:
        """Create a stage's child run under `parent_run_id`, tagged with its lineage, holding config and params."""
        parent = _retry_locked(lambda: self.client.get_run(parent_run_id))
        pipeline_run = parent.data.tags.get("vaepipe.pipeline_run", parent_run_id)
        tags = {
            "mlflow.parentRunId": parent_run_id,
            "vaepipe.stage": stage,
            "vaepipe.pipeline_run": pipeline_run,
            "vaepipe.dataset": dataset_tag or NONE_TAG,
            "vaepipe.source_model": source_model or NONE_TAG,
        }
        run = self._create_run(config, run_name or stage, tags)
        self._log_config(run.info.run_id, config, {})
        return run.info.run_id

    def _create_run(self, config: "PipelineConfig", run_name: str | None, tags: dict[str, str]) -> Run:
        tags = {"vaepipe.git_commit": git_commit(), "vaepipe.source_model": NONE_TAG, **tags}
        exp_id = self.experiment_id(config.name)
        return _retry_locked(lambda: self.client.create_run(exp_id, tags=tags, run_name=run_name))

    def _log_config(self, run_id: str, config: "PipelineConfig", tags: dict[str, str]) -> None:
        from pipelines.config import dump_config

        self._log_params_and_tags(run_id, dict(sorted(config.flat().items())), tags)
        self.log_text(run_id, dump_config(config), "config.yaml")

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
            _retry_locked(lambda: self.client.log_batch(run_id, params=ps, tags=ts, synchronous=True))

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> None:
        """Log a dict of metrics at `step`, batched. Non-finite values are logged as NaN (see _metric_value)."""
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        entries = [Metric(k, _metric_value(k, v), ts, int(step)) for k, v in metrics.items()]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            _retry_locked(lambda: self.client.log_batch(run_id, metrics=chunk, synchronous=True))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        _retry_locked(lambda: self.client.set_terminated(run_id, status=status))

    # -- artifacts

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        _retry_locked(lambda: self.client.log_artifact(run_id, str(local_path), artifact_path))

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        _retry_locked(lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        _retry_locked(lambda: self.client.log_text(run_id, text, artifact_file))

    def log_dict(self, run_id: str, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Save a dict as JSON (or YAML when artifact_file ends in .yaml/.yml)."""
        _retry_locked(lambda: self.client.log_dict(run_id, dict(dictionary), artifact_file))

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
        return _retry_locked(lambda: self.client.download_artifacts(run_id, path, dst))

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
        exp_id = _retry_locked(lambda: self.client.get_run(run_id)).info.experiment_id
        logged = _retry_locked(lambda: self.client.create_logged_model(exp_id, name=name, source_run_id=run_id))
        # Not retried on a locked store: a second attempt would save the artifacts twice.
        info = serving.log_model(model, name, run_id, logged.model_id, code_paths=list(code_paths),
                                 pip_requirements=pip_requirements, example_images=input_example)
        # Loading unpickles model.pth and imports the code paths: record what was logged, to check before loading.
        self._record_model_digest(run_id, name, logged.model_id, info.model_uri)
        return info.model_uri

    def _record_model_digest(self, run_id: str, name: str, model_id: str | None, model_uri: str) -> None:
        files = model_files_sha256(self.download_model(model_uri))
        digest = files_digest(files)
        _retry_locked(lambda: self.client.set_tag(run_id, f"{MODEL_SHA256_TAG}.{name}", digest))
        if model_id:
            _retry_locked(lambda: self.client.set_logged_model_tags(model_id, {MODEL_SHA256_TAG: digest}))

    def download_model(self, model_uri: str, dst: str | None = None) -> str:
        """A local copy of a logged model's directory."""
        import mlflow.artifacts

        self.activate()
        dst = dst or tempfile.mkdtemp(prefix="vaepipe-model-")
        return _retry_locked(lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=dst, tracking_uri=self.tracking_uri))

    def recorded_model_digest(self, model_uri: str) -> tuple[str | None, str | None]:
        """(digest, per-file list) recorded for `model_uri` when it was logged and registered; Nones if none."""
        ref = model_uri.split(":/", 1)[-1].strip("/")
        if model_uri.startswith("runs:/"):
            run_id, _, name = ref.partition("/")
            tags = _retry_locked(lambda: self.client.get_run(run_id)).data.tags
            return tags.get(f"{MODEL_SHA256_TAG}.{name}"), None
        if model_uri.startswith("models:/m-"):
            tags = _retry_locked(lambda: self.client.get_logged_model(ref)).tags or {}
            return tags.get(MODEL_SHA256_TAG), None
        if model_uri.startswith("models:/"):
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = _retry_locked(lambda: self.client.get_model_version_by_alias(name, alias))
            else:
                name, _, version = ref.partition("/")
                mv = _retry_locked(lambda: self.client.get_model_version(name, version))
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
        mv = _retry_locked(lambda: mlflow.register_model(
            model_uri, name, await_registration_for=await_s, tags={k: str(v) for k, v in (tags or {}).items()}
        ))
        version = str(mv.version)
        self._tag_version_digest(model_uri, name, version)
        status = _retry_locked(lambda: self.client.get_model_version(name, version)).status
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
            _retry_locked(lambda: self.client.set_model_version_tag(name, version, key, value))

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        _retry_locked(lambda: self.client.set_registered_model_alias(name, alias, str(version)))

    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        try:
            return _retry_locked(lambda: self.client.get_model_version_by_alias(name, alias))
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
        return list(_retry_locked(lambda: self.client.search_runs(
            exp_ids, " and ".join(clauses), max_results=max_results, order_by=list(order_by)
        )))

    def _experiment_ids_for(self, experiment: str | None) -> list[str]:
        if experiment is not None:
            exp = _retry_locked(lambda: self.client.get_experiment_by_name(experiment_name(experiment)))
            return [exp.experiment_id] if exp is not None and exp.lifecycle_stage == "active" else []
        exps = _retry_locked(lambda: self.client.search_experiments(filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'"))
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
    for key, value in zip(_CREDENTIAL_ENV, auth or ()):
        if value is not None:
            os.environ.setdefault(key, value)
    tracker = Tracker(tracking_uri, artifact_root, registry_uri)
    tracker.activate()
    return tracker


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


# ---------------------------------------------------------------------------------------------- listing and CLI


def list_pipeline_runs(cfg: "TrackingConfig", experiment: str | None = None, limit: int = 20) -> list[dict]:
    """The latest pipeline runs, newest first, each with its stage runs and the model versions they registered.

    Each dict: run_id, name, experiment, status, start_time (datetime), stages (list of dicts with stage,
    run_id, name, status), models (list of dicts with name, version, aliases, run_id). An empty list when
    the local sqlite store does not exist yet (listing never creates one).
    """
    uri = resolve_tracking_uri(cfg)
    if _scheme(uri) == "sqlite" and _sqlite_path(uri) is not None and not _sqlite_path(uri).exists():
        return []
    tracker = Tracker.connect(cfg)
    parents = tracker.find_runs(experiment, stage="pipeline", max_results=limit)
    names = {}
    rows = []
    for run in parents:
        exp_id = run.info.experiment_id
        if exp_id not in names:
            names[exp_id] = tracker.client.get_experiment(exp_id).name
        children = _retry_locked(lambda: tracker.client.search_runs(
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
    versions = _retry_locked(lambda: tracker.client.search_model_versions(f"run_id IN ({quoted})"))
    # Version search leaves aliases empty on some stores; the registered model always has them.
    aliases: dict[tuple[str, str], list[str]] = {}
    for name in {v.name for v in versions}:
        for alias, version in _retry_locked(lambda: tracker.client.get_registered_model(name)).aliases.items():
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


def _runs_list(args: argparse.Namespace) -> int:
    from pipelines.config import load_config

    cfg = load_config(args.config, args.overrides)
    tracking = cfg.tracking.replace(tracking_uri=args.tracking_uri) if args.tracking_uri else cfg.tracking
    experiment = args.experiment or (cfg.name if args.config else None)
    rows = list_pipeline_runs(tracking, experiment=experiment, limit=args.limit)
    print(format_runs_table(rows), end="")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vaepipe runs list ...` to the top-level CLI."""
    from pipelines.cli import add_config_args

    runs = subparsers.add_parser("runs", help="inspect tracked pipeline runs")
    sub = runs.add_subparsers(dest="runs_cmd", required=True, metavar="COMMAND")
    lst = sub.add_parser("list", help="list the latest pipeline runs with their stages and registered models")
    add_config_args(lst, required=False)
    lst.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from the config, "
                     "$MLFLOW_TRACKING_URI, or sqlite:///<workdir>/mlflow.db)")
    lst.add_argument("--experiment", default=None, help="config name or vaepipe/<name> (default: the config's "
                     "name with --config, else every vaepipe experiment)")
    lst.add_argument("--limit", type=_positive_int, default=20, help="how many pipeline runs to show (default 20)")
    lst.set_defaults(func=_runs_list)
