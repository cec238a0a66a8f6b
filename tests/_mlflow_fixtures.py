"""MLflow fixtures for the test suite: a fresh sqlite store per test, and one real `mlflow server` per session.

`tests/conftest.py` star-imports this module, so it exports only fixture names and imports nothing heavy at
module level (pipelines.config pulls in the models; mlflow takes seconds to import).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest
from pipelines.processes import free_port

if TYPE_CHECKING:
    from pipelines.config import TrackingConfig

__all__ = ["mlflow_store", "mlflow_server", "mlflow_template_db"]

# A cold `mlflow server` answers /health after ~12 s on 2 cores; a busy CI box can be several times slower.
_SERVER_START_TIMEOUT_S = float(os.environ.get("VAEPIPE_TEST_SERVER_START_TIMEOUT_S", "90"))


@dataclasses.dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    tracking: "TrackingConfig"  # points at the server; artifacts are proxied by it (no artifact_location)
    root: Path  # holds the server's sqlite DB, artifacts and log


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow sqlite DB, made once: migrating a new DB costs ~4 s on 2 cores."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}")
    client.search_experiments(max_results=1)  # creates and migrates the tracking tables
    client.search_registered_models(max_results=1)  # and the registry's
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, mlflow_template_db: Path) -> "TrackingConfig":
    """A TrackingConfig for a fresh sqlite store and artifact directory under this test's tmp_path."""
    from pipelines.config import TrackingConfig

    workdir = tmp_path / "tracking"
    workdir.mkdir()
    shutil.copyfile(mlflow_template_db, workdir / "mlflow.db")
    return TrackingConfig(
        workdir=str(workdir),
        tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
        artifact_location=str(workdir / "mlartifacts"),
        connect_timeout_s=10.0,
    )


def _healthy(uri: str) -> bool:
    try:
        # No proxy: urllib's global opener may hold one from an earlier test's environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` on loopback with a sqlite backend and proxied artifacts, shared by the session."""
    from pipelines.config import TrackingConfig

    root = tmp_path_factory.mktemp("mlflow_server")
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    if not mlflow_exe.exists():
        pytest.fail(f"no `mlflow` executable next to {sys.executable}; install mlflow into this environment")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = [
        str(mlflow_exe), "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log_path, "wb") as log:
        # Its own process group: the server forks uvicorn and a job runner, and all of them must go at the end.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {proc.returncode}" if proc.poll() is not None else (
                    f"did not answer /health within {_SERVER_START_TIMEOUT_S:.0f} s")
                pytest.fail(f"mlflow server at {uri} {why}; its log:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.25)
        yield MlflowServer(
            uri=uri,
            tracking=TrackingConfig(workdir=str(root / "client"), tracking_uri=uri, connect_timeout_s=10.0),
            root=root,
        )
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server's process group (its own, from start_new_session), leaving no child behind."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        # uvicorn's graceful shutdown waits on the test process's keep-alive connections; don't wait long.
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is still draining
    except ProcessLookupError:
        pass
    proc.wait()
