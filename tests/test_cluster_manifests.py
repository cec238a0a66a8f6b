"""The files under cluster/ (KubeRay, cluster launcher, tracking server, image) parse and carry what the docs say.

Docker and Kubernetes cannot run here, so these are structural checks, plus Ray's own validator for the
cluster-launcher configs and our own config loader for every `vaepipe run` / `vaepipe submit` the files and
cluster/README.md show."""
from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import jobs
from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
GPU_MEDIUM = "Memory"


def _load(rel: str) -> dict:
    return yaml.safe_load((CLUSTER / rel).read_text())


def _pods(cluster_spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return pods


def _dockerfile_ray_version() -> str:
    m = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", (CLUSTER / "Dockerfile").read_text())
    assert m, "cluster/Dockerfile must build on a rayproject/ray:X.Y.Z-py311-gpu image"
    return m.group(1)


def _check_vaepipe_command(cmd: str) -> None:
    """A `vaepipe run|submit CONFIG --set ...` line: the config exists and loads with its overrides, and the
    submit options are ones `vaepipe submit` accepts."""
    argv = shlex.split(cmd)
    assert argv[:2] in (["vaepipe", "run"], ["vaepipe", "submit"]), cmd
    if argv[1] == "submit":
        parser = argparse.ArgumentParser(prog="vaepipe")
        jobs.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(argv[1:])
        config, overrides = args.config, args.overrides
    else:
        config = argv[2]
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert (REPO / config).is_file(), f"{cmd}: {config} is not in the repository"
    load_config(REPO / config, overrides)


# --------------------------------------------------------------------------------------------- all files


def test_every_yaml_parses_and_opens_with_the_command_that_uses_it():
    assert {p.relative_to(CLUSTER).as_posix() for p in YAMLS} >= {
        "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "aws.yaml", "gcp.yaml", "mlflow/docker-compose.yaml"}
    for path in [*YAMLS, CLUSTER / "Dockerfile", CLUSTER / "mlflow/.env.example"]:
        rel = path.relative_to(REPO).as_posix()
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{rel} must open with a comment giving its command"
        assert re.search(r"\b(kubectl apply -f|ray up|docker compose -f|docker build -f|cp) ", first), (rel, first)
        assert rel in first or (rel.endswith(".env.example") and "docker-compose.yaml" in path.read_text()), rel
        if path.suffix == ".yaml":
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs and all(isinstance(d, dict) for d in docs), rel


def test_every_vaepipe_command_shown_is_valid():
    shown = []
    for path in [*YAMLS, CLUSTER / "README.md"]:
        for line in path.read_text().splitlines():
            # Command lines only (code blocks, comment lines, the RayJob entrypoint), not prose mentions.
            m = re.match(r"\s*(?:#\s*)?(vaepipe (?:submit|run) .*)", line)
            if m:
                shown.append(m.group(1).split(" #")[0].strip())
    assert len(shown) >= 6, shown
    for cmd in shown:
        _check_vaepipe_command(cmd)


# ------------------------------------------------------------------------------------------------ KubeRay


def test_raycluster_has_cpu_head_autoscaled_gpu_workers_and_memory_shm():
    rc = _load("kuberay/raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"] == _dockerfile_ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "a worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1 and res["requests"] == res["limits"]
    images = set()
    for name, pod in _pods(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        c = pod["containers"][0]
        shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == GPU_MEDIUM, name
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["key"] == "MLFLOW_TRACKING_URI", name
        images.add(c["image"])
    dockerfile_tag = re.search(r"-t (\S+) \.", (CLUSTER / "Dockerfile").read_text().splitlines()[0]).group(1)
    assert images == {dockerfile_tag}


def test_rayjob_runs_the_pipeline_and_cleans_up():
    from ray.runtime_env import RuntimeEnv

    rj = _load("kuberay/rayjob.yaml")
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    spec = rj["spec"]
    assert spec["entrypoint"].startswith("vaepipe run configs/")
    _check_vaepipe_command(spec["entrypoint"])
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # what Ray will be handed
    # The RayJob's cluster is the standalone RayCluster: one definition, no drift.
    assert spec["rayClusterSpec"] == _load("kuberay/raycluster.yaml")["spec"]


def _strict(schema):
    """The CRD schema with undeclared fields refused: the API server prunes unknown fields silently, so a typo
    (`workerGroupSpec`, `shutdownAfterJobFinish`) would go unnoticed; `kubectl apply --validate=strict` refuses it."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_validator(kind: str):
    import json

    import jsonschema

    schema = json.loads((CLUSTER / "kuberay" / "schemas" / f"{kind.lower()}-v1.json").read_text())
    assert "kuberay" in schema.pop("$comment") and schema["properties"]["spec"]["type"] == "object"
    schema = _strict(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _schema_errors(kind: str, manifest: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in _crd_validator(kind).iter_errors(manifest))


@pytest.mark.parametrize("rel,kind", [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob")])
def test_kuberay_manifests_validate_against_the_kuberay_crd_schemas(rel, kind):
    manifest = _load(rel)
    assert manifest["kind"] == kind
    assert _schema_errors(kind, manifest) == []


def test_crd_schema_validation_catches_what_parsing_does_not():
    rc, rj = _load("kuberay/raycluster.yaml"), _load("kuberay/rayjob.yaml")
    typo = copy.deepcopy(rj)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")  # silently dropped by k8s
    assert any("shutdownAfterJobFinish" in e and "not allowed" in e for e in _schema_errors("RayJob", typo))
    as_text = copy.deepcopy(rj)
    as_text["spec"]["ttlSecondsAfterFinished"] = "600s"
    assert any(e.startswith("spec.ttlSecondsAfterFinished") for e in _schema_errors("RayJob", as_text))
    wrong_type = copy.deepcopy(rc)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e and "integer" in e for e in _schema_errors("RayCluster", wrong_type))
    no_containers = copy.deepcopy(rc)
    del no_containers["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert any("containers" in e and "required" in e for e in _schema_errors("RayCluster", no_containers))


# ----------------------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("rel,gpu_hint", [("aws.yaml", r"^(g4dn|g5|g6|p3|p4d|p5)\."), ("gcp.yaml", None)])
def test_launcher_config_passes_rays_validator_and_has_gpu_workers(rel, gpu_hint):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(rel)
    validate_config(prepare_config(copy.deepcopy(raw)))  # Ray's schema: a misspelt key fails here
    assert raw["provider"]["type"] == rel.split(".")[0]
    assert raw["max_workers"] >= 1 and raw["head_node_type"] in raw["available_node_types"]
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1]
    assert gpu, "a worker node type with GPU resources"
    for t in gpu:
        if gpu_hint:
            assert re.match(gpu_hint, t["node_config"]["InstanceType"]), t["node_config"]["InstanceType"]
        else:
            assert t["node_config"]["guestAccelerators"][0]["acceleratorCount"] == t["resources"]["GPU"]
    assert any(o.startswith("--shm-size=") for o in raw["docker"]["run_options"])
    assert raw["docker"]["image"] == f"rayproject/ray:{_dockerfile_ray_version()}-py311-gpu"
    assert any("pip install" in c and "/vaepipe" in c for c in raw["setup_commands"])
    assert raw["file_mounts"]["/home/ray/vaepipe"] == "."
    assert {".venv", "runs", "data"} <= set(raw["rsync_exclude"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key


# ----------------------------------------------------------------------------------------- tracking server


def test_mlflow_compose_has_postgres_minio_and_a_healthy_server():
    compose = _load("mlflow/docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "create-buckets", "mlflow"} <= set(services)
    for name in ("postgres", "minio", "mlflow"):
        hc = services[name]["healthcheck"]
        assert hc["test"] and hc["retries"] >= 3, name
    deps = services["mlflow"]["depends_on"]
    assert deps["postgres"]["condition"] == deps["minio"]["condition"] == "service_healthy"
    assert deps["create-buckets"]["condition"] == "service_completed_successfully"
    cmd = services["mlflow"]["command"]
    assert cmd.startswith("mlflow server ")
    assert re.search(r"--backend-store-uri postgresql://\S+@postgres:5432/", cmd)
    assert re.search(r"--artifacts-destination s3://\S+", cmd) and "--serve-artifacts" in cmd
    assert "--allowed-hosts" in cmd
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000" and "AWS_SECRET_ACCESS_KEY" in env
    assert "psycopg2" in services["mlflow"]["build"]["dockerfile_inline"]
    assert set(compose["volumes"]) >= {"postgres-data", "minio-data"}


def test_every_compose_variable_is_set_in_env_example():
    text = (CLUSTER / "mlflow/docker-compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    example = (CLUSTER / "mlflow/.env.example").read_text()
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, flags=re.M))
    assert used and used <= defined, used - defined


def test_dockerfile_installs_the_project_on_the_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:", text, flags=re.M) and "FROM ${RAY_IMAGE}" in text
    assert re.search(r"^WORKDIR /app$", text, flags=re.M)
    assert re.search(r"pip install [^\n]*-e \.", text)
    for pkg in ("vae", "pipelines", "tune_spaces", "configs"):
        assert re.search(rf"^COPY .*\b{pkg} \./{pkg}$", text, flags=re.M), pkg
