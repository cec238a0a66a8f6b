"""Shared fixtures: one local Ray for the whole session (sized for 2 cores), temporary MLflow stores."""
from __future__ import annotations

import os
import sys

import pytest

# Set before Ray or MLflow is imported anywhere in the test process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.59 turns on token auth for local clusters
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

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
    the train workers (PLATFORM.md), a small object store, no dashboard."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # a fresh local Ray even when a `ray start --head` runs on this machine (test_submit)
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}},
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
