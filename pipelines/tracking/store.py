"""The tracking store: where runs go (config, $MLFLOW_TRACKING_URI, or sqlite:///<workdir>/mlflow.db), a check that
it can be used before anything starts, and a retry while SQLite reports "database is locked".

SQLite allows one writer at a time, so the driver creates and migrates the DB before any worker starts, and every
call is retried with backoff on "database is locked".
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.errors import TrackingUnavailableError
from pipelines.redaction import split_credentials

if TYPE_CHECKING:
    from pipelines.config import TrackingConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

_DB_SCHEMES = ("postgresql", "mysql", "mssql")
_LOCK_RETRIES = 6
# MLflow's REST client takes a server's credentials from these variables, never from the URI.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


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
    if scheme(uri) not in ("http", "https"):
        return uri
    clean, user, password = split_credentials(uri)
    for key, value in zip(CREDENTIAL_ENV, (user, password)):
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
    if scheme(tracking_uri) in ("http", "https"):
        return None
    return _as_uri(str(Path(cfg.workdir).expanduser().resolve() / "mlartifacts"))


def _as_uri(location: str) -> str:
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location.rstrip("/")
    return Path(location).expanduser().resolve().as_uri()


def scheme(uri: str) -> str:
    # "postgresql+psycopg2" and "postgresql" are the same store to us.
    return urllib.parse.urlparse(uri).scheme.split("+", 1)[0].lower()


def check_tracking_server(uri: str, timeout_s: float) -> None:
    """Make sure `uri` is usable within `timeout_s`, or raise TrackingUnavailableError naming the fix.

    http(s): poll `/health` (falling back to the REST API behind proxies without it) until the deadline.
    sqlite: create and migrate the DB, and its registry tables, here and now: on the driver, before workers.
    postgresql/mysql/mssql: open the store, bounded by the timeout.
    """
    kind = scheme(uri)
    if kind in ("http", "https"):
        _wait_for_http(uri, timeout_s)
    elif kind == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            _touch_store(uri)
        else:
            _check_sqlite_file(path)
            # Two first runs on a new store would race in MLflow's schema migration ("duplicate column name"):
            # one process at a time creates and migrates it; the others then find it ready.
            _with_store_lock(path, lambda: _touch_store(uri))
    elif kind in _DB_SCHEMES:
        _with_timeout(lambda: _touch_store(uri), timeout_s, uri)
    elif kind in ("", "file"):
        raise TrackingUnavailableError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 refuses; use a database such as "
            f"sqlite:///{Path(uri.removeprefix('file://') or 'runs').expanduser().resolve() / 'mlflow.db'} "
            "(set tracking.tracking_uri or MLFLOW_TRACKING_URI), or leave both unset for <workdir>/mlflow.db"
        )
    else:
        raise TrackingUnavailableError(
            f"tracking URI {uri!r} has scheme {kind!r}, which vaepipe does not support; use http(s)://HOST:PORT "
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


def sqlite_path(uri: str) -> Path | None:
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
        retry_locked(lambda: client.search_experiments(max_results=1))
        retry_locked(lambda: client.search_registered_models(max_results=1))
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


def retry_locked(fn: Callable[[], T]) -> T:
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
