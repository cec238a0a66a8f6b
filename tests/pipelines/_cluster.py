"""Fixtures for tests on a multi-node Ray cluster on loopback: a head and two worker nodes (`w1`, `w2`), each a
`ray start` of its own with its own logical CPUs, temp dir and the node label `vaepipe-node=<name>`, all bound to
127.0.0.1 and stopped by process id (cluster/local/loopback.py; never `ray stop`).

    from _cluster import loopback_cluster, cluster_driver  # noqa: F401  (in a test module)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_loopback():
    name = "vaepipe_cluster_loopback"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "cluster" / "local" / "loopback.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


loopback = _load_loopback()
LoopbackCluster = loopback.LoopbackCluster


@pytest.fixture(scope="module")
def loopback_cluster():
    """Head (1 CPU, dashboard) + w1, w2 (2 logical CPUs each; 5 in all on 2 cores, overcommitted as the other test
    fixtures do), 150 MB object store per node. One per test module: starting three nodes costs a minute or more."""
    import os

    state = os.environ.get("VAEPIPE_TEST_CLUSTER_STATE")  # reuse one from `cluster/local/up.sh --state FILE`
    if state:
        yield LoopbackCluster.from_json(Path(state).read_text())
        return
    cluster = LoopbackCluster.start(workers=2, head_cpus=1, worker_cpus=2, object_store_mb=150)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster_driver(loopback_cluster):
    """This test process as a driver of the loopback cluster. A session Ray (`ray_local`) already running here is
    shut down first and started again afterwards with the same settings, for the test modules that follow."""
    import ray

    had_local = ray.is_initialized()
    if had_local:
        ray.shutdown()
    from pipelines.ray_env import init_ray

    init_ray(loopback_cluster.gcs_address)  # how the stages connect (RAY_ADDRESS / --address)
    try:
        yield ray
    finally:
        ray.shutdown()
        if had_local:
            from pipelines.ray_env import start_local_ray

            start_local_ray(num_cpus=4, object_store_memory=512 * 1024**2, log_to_driver=True,
                            runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
