"""The stages on a real multi-node Ray cluster on loopback (head + two worker nodes, tests/pipelines/_cluster.py):
every server bound to 127.0.0.1; the whole pipeline as a Ray Job through `vaepipe submit`, with train's two workers
on two nodes, ncp's groups spread over the nodes and tune's trials on several; ncp's group tasks retried on another
node when theirs dies, without rerunning finished groups."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from _cluster import cluster_driver, loopback_cluster  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[2]


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that one of `pids` holds, from /proc."""
    import ipaddress
    import socket

    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            host, port = f[1].split(":")
            raw = bytes.fromhex(host)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw)
            if family == socket.AF_INET6 and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            out.append((str(addr), int(port, 16), inodes[f[9]]))
    return out


def _cluster_pids(cluster) -> set[int]:
    """The nodes' `ray start` processes, their descendants, and every process naming the cluster's temp dir."""
    parent, marked = {}, set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if cluster.root in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    marked.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    pids = {n.pid for n in cluster.nodes} | marked
    grew = True
    while grew:
        more = {p for p, pp in parent.items() if pp in pids} - pids
        grew, pids = bool(more), pids | more
    return pids


def test_three_labelled_nodes_all_on_loopback(loopback_cluster):
    nodes = loopback_cluster.alive_nodes()
    assert set(nodes) == {"head", "w1", "w2"}
    assert {n["node_ip"] for n in nodes.values()} == {"127.0.0.1"}
    assert {name: n["resources_total"]["CPU"] for name, n in nodes.items()} == {"head": 1, "w1": 2, "w2": 2}
    assert all(n["resources_total"][f"node_{name}"] == 1 for name, n in nodes.items())
    sockets = _listening(_cluster_pids(loopback_cluster))
    ports = {port for _, port, _ in sockets}
    gcs_port, dash_port = int(loopback_cluster.gcs_address.rsplit(":", 1)[1]), int(loopback_cluster.dashboard.rsplit(":", 1)[1])
    assert {gcs_port, dash_port} <= ports and len(sockets) > 15, sockets  # GCS, dashboard, raylets, agents, ...
    assert [s for s in sockets if s[0] != "127.0.0.1"] == []  # nothing on another interface or on all of them


def _submit(argv: list[str]) -> int:
    """`vaepipe submit ...` in this process, through the real parser and error handling."""
    from pipelines.cli import main

    return main(argv)


def test_pipeline_as_a_ray_job_uses_every_node(loopback_cluster, cluster_driver, digits16, tmp_path, capfd):
    """train: 2 workers of 2 CPUs, so one per worker node, checkpointing to a storage path both see (a local
    directory is shared on one machine); ncp: 4 group tasks, SPREAD; tune: 2 trials of 2 CPUs at once."""
    from ray.util.state import list_actors, list_tasks

    from pipelines.config import load_config

    work = tmp_path / "work"
    overrides = [
        "name=clustertest", f"data.path={digits16}", f"tune.data.path={tmp_path / 'shapes16'}",
        "tune.data.image_size=16", "tune.data.rgb=false", "tune.data.num_examples=1200",
        "gwae.image_shape=[1,16,16]", f"tracking.workdir={work}", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        f"train.storage_path={tmp_path / 'ray'}", f"tune.storage_path={tmp_path / 'ray'}",
        "train.epochs=1", "train.num_workers=2", "train.cpus_per_worker=2", "train.batch_size=64",
        "train.val_iw_examples=0",
        "ncp.steps=30", "ncp.eval_every=15", "ncp.val_examples=64", "ncp.eval_samples=32", "ncp.langevin_steps=5",
        "ncp.sir_proposals=4", "ncp.log_z_samples=16", "ncp.classifier_channels=8",
        "tune.num_samples=2", "tune.max_concurrent_trials=2", "tune.cpus_per_trial=2", "tune.epochs=2",
        "tune.steps_per_epoch=5", "tune.eval_examples=100", "tune.search=random",
    ]
    cfg = load_config(REPO / "tests" / "base.yaml", overrides)  # fails here, not in the job, if a key is wrong
    argv = ["submit", str(REPO / "tests" / "base.yaml"), "--address", loopback_cluster.dashboard, "--no-pip"]
    for o in overrides:
        argv += ["--set", o]
    t0 = time.monotonic()
    code = _submit(argv)
    took = time.monotonic() - t0
    out = capfd.readouterr()
    with capfd.disabled():
        print(f"\n[figure] vaepipe submit of the small pipeline on 3 loopback nodes: {took:.0f} s")
    assert code == 0, (out.out + out.err)[-4000:]
    assert "SUCCEEDED" in out.out

    names, state = loopback_cluster.node_ids(), loopback_cluster.dashboard
    workers = [a for a in list_actors(address=state, filters=[("class_name", "=", "RayTrainWorker")], limit=1000,
                                                  detail=True)]
    assert {names.get(a.node_id) for a in workers} == {"w1", "w2"}, [(a.node_id, a.state) for a in workers]
    groups = list_tasks(address=state, filters=[("func_or_class_name", "=", "train_group")], limit=1000,
                        detail=True)
    assert len({t.task_id for t in groups}) == 4
    assert len({names.get(t.node_id) for t in groups}) >= 2, [names.get(t.node_id) for t in groups]
    trials = list_actors(address=state, filters=[("class_name", "=", "ImplicitFunc")], limit=1000, detail=True)
    assert {names.get(a.node_id) for a in trials} == {"w1", "w2"}, [names.get(a.node_id) for a in trials]

    import mlflow

    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    for family in ("nvae", "ncp", "gwae"):
        assert client.get_model_version_by_alias(f"clustertest-{family}", "candidate")


def test_ncp_groups_spread_and_a_lost_node_reruns_only_its_groups(loopback_cluster, cluster_driver, tmp_path):
    """ncp's own task options (SPREAD, retries) on four tasks shaped like its groups: one finishes at once, three
    run long; then a worker node holding a running group is killed (SIGKILL of its raylet and workers). The killed
    node's groups run again on a surviving node; the finished group is never rerun. Runs last: it loses a node."""
    ray = cluster_driver
    from pipelines.train_ncp import group_task_options
    from vae.ncp import NCPConfig

    log = tmp_path / "attempts"
    log.mkdir()

    def group(k: int, seconds: float) -> str:
        node = ray.get_runtime_context().get_node_id()
        (log / f"{k}-{node}-{time.time_ns()}").touch()
        time.sleep(seconds)
        return node

    # SPREAD places on nodes with room: wait until what the job before released (its workers and trials) is free.
    free_by = time.monotonic() + 120
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < free_by, (ray.available_resources(), ray.cluster_resources())
        time.sleep(0.5)
    task = ray.remote(group).options(**group_task_options(NCPConfig()))
    refs = [task.remote(0, 0.0)] + [task.remote(k, 40.0) for k in (1, 2, 3)]
    names = loopback_cluster.node_ids()
    deadline = time.monotonic() + 240
    while len({p.name.split("-")[0] for p in log.iterdir()}) < 4:
        assert time.monotonic() < deadline, sorted(p.name for p in log.iterdir())
        time.sleep(0.5)
    first = {int(p.name.split("-")[0]): names[p.name.split("-")[1]] for p in log.iterdir()}
    # No node has room for all three long groups, so they run on two or three nodes (SPREAD is best effort: which
    # nodes is Ray's choice); killing one of them must cost only its own groups.
    assert len({first[k] for k in (1, 2, 3)}) >= 2, first
    assert ray.get(refs[0], timeout=60) is not None
    victim = next(first[k] for k in (1, 2, 3) if first[k] != "head")
    t_kill = time.monotonic()
    loopback_cluster.kill_node(victim)
    results = ray.get(refs[1:], timeout=400)
    recovered = time.monotonic() - t_kill
    attempts: dict[int, list[str]] = {}
    for p in sorted(log.iterdir(), key=lambda p: int(p.name.split("-")[2])):
        k, node, _ = p.name.split("-")
        attempts.setdefault(int(k), []).append(names[node])
    print(f"\n[figure] ncp group on a killed node ({victim}) finished elsewhere {recovered:.0f} s after the kill "
          f"(group run 40 s); attempts {attempts}")
    assert len(attempts[0]) == 1  # finished before the loss: not rerun
    lost = [k for k in (1, 2, 3) if first[k] == victim]
    for k in lost:
        assert len(attempts[k]) == 2 and attempts[k][1] != victim, attempts
        assert names[results[k - 1]] != victim
    for k in set((1, 2, 3)) - set(lost):
        assert attempts[k] == [first[k]]


def test_elastic_training_grows_with_a_joining_node_and_shrinks_when_it_is_lost(loopback_cluster, cluster_driver,
                                                                                 digits16, tmp_path):
    """train.num_workers=[1, 2] with one 2-CPU worker per node. After the node loss above, one worker node is left:
    training starts with 1 worker accumulating 2 forward passes per step; a node that joins brings it to 2 workers;
    losing that node brings it back to 1. Each resize restarts from the last checkpoint, is logged (train/world_size,
    a vaepipe.resize.* tag), keeps the global batch, and the run ends FINISHED with no duplicate steps."""
    import threading

    import mlflow

    from pipelines.config import load_config
    from pipelines.train_vae import run_train

    work = tmp_path / "work"
    cfg = load_config(REPO / "tests" / "base.yaml", [
        "name=elastictest", f"data.path={digits16}", f"tracking.workdir={work}",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", f"train.storage_path={tmp_path / 'ray'}",
        "train.epochs=4", "train.num_workers=[1,2]", "train.cpus_per_worker=2", "train.batch_size=64",
        "train.val_iw_examples=0", "train.log_every_steps=2", "train.checkpoint_every_steps=6",
        "train.elastic_resize_interval_s=3", "train.max_failures=3",
    ])
    for extra in sorted(n for n in loopback_cluster.alive_nodes() if n != "head")[1:]:
        loopback_cluster.kill_node(extra)  # one worker node to start from (the test before lost one already)
    loopback_cluster.wait_for_nodes(2)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run_train(cfg)), daemon=True)
    thread.start()
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)

    def world_sizes() -> list[int]:
        exp = client.get_experiment_by_name("vaepipe/elastictest")
        runs = client.search_runs([exp.experiment_id], "tags.`vaepipe.stage` = 'train'") if exp else []
        if not runs:
            return []
        box["run_id"] = runs[0].info.run_id
        history = sorted(client.get_metric_history(runs[0].info.run_id, "train/world_size"), key=lambda m: m.step)
        return [int(m.value) for m in history]

    def wait_for(world: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not (world_sizes()[-1:] == [world]):
            assert thread.is_alive() and time.monotonic() < deadline, (world, world_sizes())
            time.sleep(0.5)

    wait_for(1)
    loopback_cluster.add_worker("w3", num_cpus=2)
    wait_for(2)
    t_kill = time.monotonic()
    loopback_cluster.kill_node("w3")
    wait_for(1)
    print(f"\n[figure] elastic train: back to 1 worker {time.monotonic() - t_kill:.0f} s after losing a node")
    thread.join(timeout=600)
    assert "result" in box, "training did not finish"
    run = client.get_run(box["run_id"])
    assert run.info.status == "FINISHED"
    sizes = world_sizes()
    assert [w for i, w in enumerate(sizes) if i == 0 or w != sizes[i - 1]] == [1, 2, 1], sizes
    accumulation = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "train/accumulation"),
                                                 key=lambda m: m.step)]
    assert {(w, a) for w, a in zip(sizes, accumulation)} == {(1, 2), (2, 1)}
    batches = {m.value for m in client.get_metric_history(run.info.run_id, "train/global_batch")}
    assert batches == {64.0}, batches  # the recipe's global batch on 1 worker and on 2
    events = {k: v for k, v in run.data.tags.items() if k.startswith("vaepipe.resize.")}
    assert len(events) == 2 and any("1 -> 2 workers" in v for v in events.values()), events
    # Steps lost to the node loss: from the furthest step the 2-worker group reached back to where 1 worker resumed.
    reached = max(m.step for m in client.get_metric_history(run.info.run_id, "train/world_size") if m.value == 2)
    resumed = sorted(client.get_metric_history(run.info.run_id, "train/resumed_from_step"), key=lambda m: m.step)
    lost = reached - int(resumed[-1].value)
    print(f"[figure] elastic train: {len(resumed)} restarts, resize events {sorted(events.values())}, {lost} steps "
          f"lost to the node loss (checkpoint every {cfg.train.checkpoint_every_steps})")
    assert 0 <= lost <= cfg.train.checkpoint_every_steps, (lost, reached, [m.value for m in resumed])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == int(run.data.params["plan.total_steps"])
