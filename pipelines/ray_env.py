"""Ray for vaepipe: connect to a cluster, or start a local Ray that only this machine can reach, and keep DDP's
rendezvous on the loopback interface with it; and where stages keep their Ray checkpoints."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
# Ray reads this once, at import, to pick the node's address: "0" makes it use the loopback address, which is how
# Ray runs on machines it treats as single-node (macOS, Windows). Every Ray server binds to the node's address.
_RAY_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS) or start a local Ray sized for small machines.

    Locally the logical CPU count is overcommitted (2× the cores, at least 4): Ray Data's read tasks need CPU slots
    next to the train workers, or a 2-core machine "may hang forever" (Ray Data's own warning). The local Ray listens on the
    loopback interface only and keeps Ray's token authentication (see `start_local_ray`)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster's authentication is the cluster's: RAY_AUTH_MODE / RAY_AUTH_TOKEN reach Ray unchanged.
        if _is_loopback_address(address):
            # A cluster on this machine's loopback interface (cluster/local/): Ray would otherwise rewrite
            # 127.0.0.1 to the machine's network address, where nothing listens.
            with _loopback_node():
                ray.init(address=address, _node_ip_address=LOOPBACK)
        else:
            ray.init(address=address)
        _quiet_data()
        return
    cores = os.cpu_count() or 2
    start_local_ray(
        num_cpus=max(4, 2 * cores),
        object_store_memory=min(2 * 1024**3, max(512 * 1024**2, _memory_bytes() // 8)),
        runtime_env={"env_vars": {"TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "1"),
                                   "RAY_DATA_DISABLE_PROGRESS_BARS": "0" if _bars() else "1"},
                     "worker_process_setup_hook": "pipelines.ray_env.quiet_local_workers"},
    )
    _quiet_data()


# Logger levels in the local Ray's worker processes. Ray Train's detached placement-group cleaner asks the state API
# (served by the dashboard) every 2 s whether the train controller is alive, and warns each time it cannot: the local
# Ray has no dashboard, and it ends with the driver that started it, taking every placement group with it, so the
# cleaner has nothing to do here.
_LOCAL_LOG_LEVELS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": "ERROR",
}


def quiet_local_workers() -> None:
    """Runs in every worker process of the local Ray (runtime_env's worker_process_setup_hook): silences the
    lines that are noise on a one-machine Ray without a dashboard, unless `vaepipe --verbose`."""
    import logging

    import ray

    # Ray's state API finds "the" cluster by looking for running ones when no address is given; with a second Ray on
    # the machine (another vaepipe run, a test's) the cleaner's thread died with "Found multiple active Ray
    # instances" and a 27-line traceback. The workers of this Ray name their own.
    try:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # not connected (never in a worker): nothing to name
        pass
    if os.environ.get("VAEPIPE_VERBOSE") != "1":
        for name, level in _LOCAL_LOG_LEVELS.items():
            logging.getLogger(name).setLevel(level)


def use_assigned_cpus() -> int:
    """Give torch as many intra-op threads as the CPUs Ray assigned this task or actor (at least 1), and return that
    number. Torch otherwise sizes its pool by the machine's cores, whatever Ray reserved: on 2 shared cores a tiny-NVAE
    step with 2 threads next to a busy worker took 17 s instead of 0.55 s (OpenMP threads spinning against each
    other). Outside a Ray worker: OMP_NUM_THREADS when set, else the CPUs this process may run on."""
    import math

    import ray
    import torch

    cpus = None
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        if ctx.worker.mode == ray.WORKER_MODE:
            cpus = ctx.get_assigned_resources().get("CPU")
    if cpus is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        cpus = int(os.environ["OMP_NUM_THREADS"])
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, math.floor(cpus))
    torch.set_num_threads(threads)
    return threads


def _bars() -> bool:
    """Ray Data's progress bars only for a person at a terminal: in a log file or CI they are pages of redraws."""
    import sys

    return sys.stdout.isatty() or os.environ.get("VAEPIPE_VERBOSE") == "1"


def _quiet_data() -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = _bars()


def start_local_ray(**init_kwargs: Any) -> None:
    """Start a Ray on this machine that nothing outside it can reach, and connect to it.

    Ray's default local node takes the address of the default route and its GCS, raylet, object manager, workers
    and agents listen on all interfaces; anyone who reaches those ports can run code as this user. Here the node's
    address is 127.0.0.1, so every Ray server binds to the loopback interface, with no dashboard. Authentication
    stays on: without RAY_AUTH_MODE set, Ray turns on token mode for a new local cluster (the token is created in
    ~/.ray/auth_token, kept readable by this user only), so other users of a shared machine cannot use the loopback
    ports either. An explicit RAY_AUTH_MODE (read by Ray when it is imported) is respected."""
    import ray

    with _loopback_node():
        ray.init(
            address="local",  # our own local Ray; a cluster is reached only through --address or RAY_ADDRESS
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            dashboard_host=LOOPBACK,
            **init_kwargs,
        )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray came up on {node_ip}, not {LOOPBACK}, so other machines could reach it; it was stopped. "
            f"This Ray version ignores the loopback setting: pin ray to the version in pyproject.toml"
        )
    _private_token_file()


def _is_loopback_address(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in (LOOPBACK, "localhost")


@contextlib.contextmanager
def _loopback_node():
    """Ray's address choice set to the loopback interface while Ray starts or connects."""
    from ray._private import ray_constants

    saved_env = os.environ.get(_RAY_SINGLE_NODE_ENV)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_SINGLE_NODE_ENV] = "0"  # inherited by the GCS, the raylet and every worker they start
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_RAY_SINGLE_NODE_ENV, None)
        else:
            os.environ[_RAY_SINGLE_NODE_ENV] = saved_env


def loopback_torch_config():
    """Ray Train's TorchConfig, except that on a loopback-only Ray (`start_local_ray`) DDP's rendezvous store
    listens on 127.0.0.1 too: torch's c10d TCPStore otherwise binds to all interfaces, whatever MASTER_ADDR says."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute_single(0, _serve_rendezvous_on_loopback)
            super().on_start(worker_group, backend_config)

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    return LoopbackTorchConfig()


_RENDEZVOUS_STORES: list = []  # kept alive: torch reuses a multi-tenant store only while it exists


def _serve_rendezvous_on_loopback() -> None:
    """In the rank-0 worker: start the rendezvous store on a socket bound to 127.0.0.1 and make the address Ray
    Train hands to every rank point at it; torch's process-group setup then reuses this store (multi-tenant, same
    port) instead of binding its own on all interfaces. Nothing changes on a Ray reachable from other nodes."""
    import socket

    import ray
    import ray.train._internal.utils as train_utils
    import torch.distributed as dist

    if ray.util.get_node_ip_address() != LOOPBACK:
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, None, True, multi_tenant=True, master_listen_fd=sock.detach(),
                          wait_for_workers=False)
    _RENDEZVOUS_STORES[:] = [store]
    train_utils.get_address_and_port = lambda: (LOOPBACK, port)


def _private_token_file() -> None:
    # Ray writes a new token with the default umask (often world-readable).
    from pathlib import Path

    token = Path.home() / ".ray" / "auth_token"
    try:
        if token.is_file() and token.stat().st_uid == os.getuid() and token.stat().st_mode & 0o077:
            token.chmod(0o600)
    except OSError:
        pass


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 1024**3


def storage_path(configured: str | None, workdir: str) -> str:
    """Where Ray keeps a stage's checkpoints: the configured path, else <tracking.workdir>/ray; local paths absolute
    (Ray workers run in other working directories)."""
    path = configured or str(Path(workdir) / "ray")
    return path if "://" in path else str(Path(path).expanduser().resolve())


def interruptible(fn, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a helper thread while this (main) thread waits, so that Ctrl-C reaches the caller as
    KeyboardInterrupt. Ray Train installs its own SIGINT handler when `fit()` runs on the main thread, and that handler
    ends the process with SystemExit, past every `finally` that would close the MLflow runs; on another thread it
    installs none. The thread is a daemon: after an interrupt the process ends without waiting for it, and Ray's own
    shutdown stops what it started."""
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the waiting thread below
            box["error"] = e

    thread = threading.Thread(target=target, name=f"vaepipe-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.25)
    if "error" in box:
        raise box["error"]
    return box.get("value")
