"""Shared fixtures: one local Ray for the whole session (sized for 2 cores), temporary MLflow stores."""
from __future__ import annotations

import os
import sys

import pytest

# Set before Ray or MLflow is imported anywhere in the test process.
# Ray >= 2.59 turns on token auth for new local clusters (the stages keep it); the test Ray listens on 127.0.0.1 only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test processes on the cores: one intra-op thread each (and in what they start), since
    # torch's OpenMP threads oversubscribed next to busy processes run many times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, os.path.dirname(__file__))
from _mlflow_fixtures import *  # noqa: E402,F401,F403  (mlflow_store, mlflow_server)


@pytest.fixture(autouse=True)
def _isolated_mlflow_env():
    """MLflow's set_tracking_uri (called inside Ray Tune's MLflow callback too) writes MLFLOW_* variables into the
    process environment; put them back after each test so no later test or subprocess tracks into a dead store."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(saved)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the session: 4 logical CPUs overcommitted on 2 cores so Ray Data read tasks never starve
    the train workers (Ray Data warns it may hang otherwise), a small object store, no dashboard, loopback only."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from pipelines.ray_env import start_local_ray

    # A fresh local Ray even when a `ray start --head` runs on this machine (test_submit), bound to 127.0.0.1 as
    # the stages' own local Ray is.
    start_local_ray(
        num_cpus=4,
        object_store_memory=512 * 1024**2,
        log_to_driver=True,
        runtime_env={"env_vars": {"TQDM_DISABLE": "1"}},
    )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
    except Exception:
        pass
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits16(tmp_path_factory) -> str:
    """scikit-learn's digits resized to 16×16, prepared once per session as a real Parquet data set."""
    from pipelines.config import DataConfig
    from pipelines.data import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "digits16"
    prepare_dataset(DataConfig(source="digits", path=str(out), image_size=16, seed=0), str(out), progress=False)
    return str(out)
