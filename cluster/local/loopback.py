"""A multi-node Ray cluster on one machine, every node bound to 127.0.0.1: a head and N worker nodes, each with its
own logical resources, node label, temp dir and ports, each a `ray start --block` in its own process group.

    python cluster/local/loopback.py up --workers 2 --state /tmp/vaepipe-cluster.json   # what up.sh runs
    python cluster/local/loopback.py down --state /tmp/vaepipe-cluster.json             # what down.sh runs

The test suite imports `LoopbackCluster` from this file (tests/pipelines/_cluster.py). Only the Python standard
library and the `ray` package of this interpreter are used.

Stopping is by process id: each node's process group, then any process still naming the node's temp dir (Ray gives
some of its processes their own session). Never `ray stop`, which stops every Ray of every user on the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pipelines.processes import free_port, process_alive

LOOPBACK = "127.0.0.1"
LABEL = "vaepipe-node"  # node label key: its value is the node's name (head, w1, w2, ...)


# `ray start` on Linux turns --node-ip-address=127.0.0.1 into the machine's routable address (so that other machines
# could join), and its servers then listen there or on every interface. This runs Ray's own `ray start` with that one
# resolution kept at the loopback address; Ray passes the address on to every process it starts.
# It also waits longer than Ray's fixed 30 s for the node's own raylet to register: several nodes starting on two busy
# cores take longer.
_RAY_START_ON_LOOPBACK = (
    "import sys, time\n"
    "from ray._private import ray_constants, services\n"
    "ray_constants.ENABLE_RAY_CLUSTER = True  # let worker nodes join (the variable below turns it off)\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    f"services.get_node_ip_address = lambda address=None: {LOOPBACK!r}\n"
    "_get_node = services.get_node\n"
    "def get_node(*args, **kwargs):\n"
    "    deadline = time.monotonic() + 600\n"
    "    while True:\n"
    "        try:\n"
    "            return _get_node(*args, **kwargs)\n"
    "        except RuntimeError:\n"
    "            if time.monotonic() > deadline:\n"
    "                raise\n"
    "            time.sleep(1)\n"
    "services.get_node = get_node\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "main()\n"
)


def ray_start_command() -> list[str]:
    return [sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start"]


@dataclasses.dataclass
class Node:
    name: str
    pid: int  # the `ray start --block` process, leader of the node's process group
    temp_dir: str
    num_cpus: float
    log: str


@dataclasses.dataclass
class LoopbackCluster:
    """A running loopback cluster. `gcs_address` is what `ray.init(address=...)` and `RAY_ADDRESS` take;
    `dashboard` is what `vaepipe submit --address` takes."""

    root: str  # holds every node's temp dir; removed by stop()
    gcs_address: str
    dashboard: str
    nodes: list[Node]
    env: dict[str, str]

    # ------------------------------------------------------------------------------------------ start
    @classmethod
    def start(cls, workers: int = 2, head_cpus: float = 1, worker_cpus: float = 2,
              object_store_mb: int = 150, env: dict[str, str] | None = None, timeout_s: float = 600) -> "LoopbackCluster":
        # Short root: Ray's unix socket paths (temp dir + session name + socket name) must stay under ~107 chars.
        root = tempfile.mkdtemp(prefix="vpc", dir="/tmp")
        node_env = dict(os.environ if env is None else env)
        node_env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Longer waits for nodes starting on 2 busy cores.
        node_env.setdefault("RAY_agent_register_timeout_ms", "600000")
        node_env.setdefault("RAY_worker_register_timeout_seconds", "600")
        node_env.setdefault("RAY_raylet_start_wait_time_s", "600")  # how long a raylet waits for its agents
        node_env.pop("RAY_ADDRESS", None)
        # Every process the nodes start (agents, job drivers, workers) connects to 127.0.0.1 as given; with Ray's
        # default they rewrite it to the machine's network address, where nothing listens.
        node_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Jobs run `python` and `vaepipe` from the interpreter's directory (the venv).
        node_env["PATH"] = f"{Path(sys.executable).parent}:{node_env.get('PATH', '')}"
        gcs_port, dash_port = free_port(), free_port()
        cluster = cls(root, f"{LOOPBACK}:{gcs_port}", f"http://{LOOPBACK}:{dash_port}", [], node_env)
        try:
            cluster._start_node("head", head_cpus, object_store_mb, head=True, gcs_port=gcs_port, dash_port=dash_port)
            cluster.wait_for_dashboard(timeout_s)
            cluster.wait_for_nodes(1, timeout_s)  # workers look the head node up in the GCS when they start
            # One node at a time, and again when one gives up: a raylet aborts when its agents take more than
            # ~15 s to start, which happens when several nodes start at once on a busy machine.
            for i in range(1, workers + 1):
                for attempt in range(3):
                    node = cluster.add_worker(f"w{i}", worker_cpus, object_store_mb)
                    try:
                        cluster.wait_for_nodes(i + 1, timeout_s)
                        break
                    except RuntimeError:
                        if attempt == 2:
                            raise
                        cluster.nodes.remove(node)
                        _kill_group(node.pid, signal.SIGKILL)
                        _kill_marked(node.temp_dir)
                        shutil.rmtree(node.temp_dir, ignore_errors=True)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def add_worker(self, name: str, num_cpus: float = 2, object_store_mb: int = 150) -> Node:
        return self._start_node(name, num_cpus, object_store_mb)

    def _start_node(self, name: str, num_cpus: float, object_store_mb: int, head: bool = False,
                    gcs_port: int = 0, dash_port: int = 0) -> Node:
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir, exist_ok=True)
        cmd = [
            *ray_start_command(), "--block", "--disable-usage-stats", f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={num_cpus:g}", "--num-gpus=0", f"--object-store-memory={object_store_mb * 1024**2}",
            f"--labels={LABEL}={name}", f"--resources={json.dumps({f'node_{name}': 1})}", f"--temp-dir={temp_dir}",
            # Every listening port explicit: Ray's defaults (52365, 10001, 8080, ...) clash between nodes on one host.
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        ]
        if head:
            cmd += ["--head", f"--port={gcs_port}", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
                    f"--dashboard-port={dash_port}", f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address={self.gcs_address}"]
        log_path = os.path.join(temp_dir, "ray-start.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc.pid, temp_dir, num_cpus, log_path)
        self.nodes.append(node)
        return node

    # ------------------------------------------------------------------------------------------ state
    def _get(self, path: str, timeout_s: float = 2.0) -> dict:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.dashboard}{path}", timeout=timeout_s) as r:
            return json.loads(r.read().decode())

    def wait_for_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        head = self.nodes[0]
        while True:
            if not process_alive(head.pid):
                raise RuntimeError(f"the Ray head exited: {_tail(head.log)}")
            try:
                if "ray_version" in self._get("/api/version"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray head's dashboard did not answer at {self.dashboard} in {timeout_s:.0f} s")
            time.sleep(0.5)

    def alive_nodes(self) -> dict[str, dict]:
        """{label name: node record} of the nodes the GCS counts alive (through the dashboard's state API)."""
        out = self._get("/api/v0/nodes?limit=100&detail=1", timeout_s=10)
        rows = out["data"]["result"]["result"]
        return {r["labels"].get(LABEL, r["node_id"]): r for r in rows if r["state"] == "ALIVE"}

    def wait_for_nodes(self, n: int, timeout_s: float = 120) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.nodes:
                if not process_alive(node.pid) and node.name in self._expected():
                    raise RuntimeError(f"Ray node {node.name} exited: {_tail(node.log)}")
            try:
                alive = self.alive_nodes()
                if len(alive) == n:
                    return alive
            except (OSError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} Ray nodes expected alive, not there after {timeout_s:.0f} s")
            time.sleep(0.5)

    def _expected(self) -> set[str]:
        return {n.name for n in self.nodes}

    def node_ids(self) -> dict[str, str]:
        """{node id: label name} of the alive nodes."""
        return {r["node_id"]: name for name, r in self.alive_nodes().items()}

    # ------------------------------------------------------------------------------------------ stop
    def kill_node(self, name: str) -> None:
        """Lose a node the hard way: SIGKILL its raylet and everything else it started (no drain)."""
        node = next(n for n in self.nodes if n.name == name)
        _kill_group(node.pid, signal.SIGKILL)
        _kill_marked(node.temp_dir)
        self.nodes.remove(node)

    def stop(self) -> None:
        """Stop every node, workers first, by process group and then by temp dir; remove the temp dirs."""
        for node in reversed(self.nodes):
            _kill_group(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(process_alive(n.pid) for n in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in reversed(self.nodes):
            _kill_group(node.pid, signal.SIGKILL)
        _kill_marked(self.root)
        for node in self.nodes:
            _reap(node.pid)
        self.nodes = []
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ state file
    def to_json(self) -> str:
        return json.dumps({"root": self.root, "gcs_address": self.gcs_address, "dashboard": self.dashboard,
                           "nodes": [dataclasses.asdict(n) for n in self.nodes]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LoopbackCluster":
        d = json.loads(text)
        return cls(d["root"], d["gcs_address"], d["dashboard"], [Node(**n) for n in d["nodes"]], {})


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_marked(marker: str) -> None:
    """SIGKILL every process of this user whose command line names `marker` (a node's unique temp dir): the
    processes Ray moved out of the node's process group."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _tail(path: str, n: int = 3000) -> str:
    try:
        return Path(path).read_text()[-n:]
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loopback.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and worker nodes on 127.0.0.1")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--head-cpus", type=float, default=1)
    up.add_argument("--worker-cpus", type=float, default=2)
    up.add_argument("--object-store-mb", type=int, default=150)
    for s in (up, sub.add_parser("down", help="stop the cluster a state file describes"),
              sub.add_parser("status", help="list the alive nodes")):
        s.add_argument("--state", default=os.environ.get("VAEPIPE_CLUSTER_STATE", "/tmp/vaepipe-loopback.json"))
    args = p.parse_args(argv)
    state = Path(args.state)
    if args.command == "up":
        if state.exists():
            print(f"{state} exists: a loopback cluster may be running; `down` it first (or remove the file)",
                  file=sys.stderr)
            return 2
        cluster = LoopbackCluster.start(args.workers, args.head_cpus, args.worker_cpus, args.object_store_mb)
        state.write_text(cluster.to_json())
        nodes = cluster.alive_nodes()
        print(f"{len(nodes)} Ray nodes on {LOOPBACK}: " + ", ".join(
            f"{name} ({r['resources_total'].get('CPU', 0):g} CPU)" for name, r in sorted(nodes.items())))
        print(f"  export RAY_ADDRESS={cluster.gcs_address}        # drivers: vaepipe run / ray.init()")
        print(f"  vaepipe submit configs/demo.yaml --address {cluster.dashboard} --no-pip")
        print(f"  stop: cluster/local/down.sh   (state in {state})")
        return 0
    if not state.exists():
        print(f"no loopback cluster state at {state}", file=sys.stderr)
        return 1 if args.command == "status" else 0
    cluster = LoopbackCluster.from_json(state.read_text())
    if args.command == "status":
        for name, r in sorted(cluster.alive_nodes().items()):
            print(f"{name:6} {r['node_id'][:12]}  {r['node_ip']}  CPU {r['resources_total'].get('CPU', 0):g}")
        return 0
    cluster.stop()
    state.unlink()
    print(f"stopped the loopback cluster ({cluster.gcs_address})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
