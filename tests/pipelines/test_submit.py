"""`vaepipe submit` and `vaepipe jobs`: address checks, env forwarding and masking, upload exclusions, and real
Ray Jobs on a real head started with `ray start --head` on loopback (the `slow` tests).

The head is a separate Ray from the in-process `ray_local` fixture: this module only talks to it over HTTP. It
is started in its own process group and torn down by signalling that group (never `ray stop`, which would kill
every Ray on a shared machine, including other test sessions').
"""
from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines import cli, submit
from pipelines.errors import UserError
from pipelines.redaction import redact_text
from pipelines.processes import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _cli(argv: list[str]) -> int:
    """`vaepipe ...` in this process, through the real parser and error handling (pipelines.cli.main)."""
    return cli.main(argv)


# ------------------------------------------------------------------------------------ without a cluster


def test_address_comes_from_flag_or_ray_address_and_must_be_the_dashboard(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.normalize_address("http://10.0.0.5:8265/") == "http://10.0.0.5:8265"
    with pytest.raises(UserError, match="--address http://HEAD:8265"):
        submit.normalize_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert submit.normalize_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(UserError, match=r"\$RAY_ADDRESS.*GCS address"):
        submit.normalize_address(None)
    with pytest.raises(UserError, match="Ray Client port"):
        submit.normalize_address("ray://head:10001")
    with pytest.raises(UserError) as e:
        submit.normalize_address("ray://alice:hunter2@head:10001")
    assert "hunter2" not in str(e.value)


def test_unreachable_head_fails_fast_naming_the_address():
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(UserError, match=f"cannot reach the Ray dashboard at {address}"):
        submit.submit_job(address, "echo never", {})
    assert time.monotonic() - t0 < 10


def test_silent_head_times_out_instead_of_hanging():
    with socket.socket() as srv:  # accepts connections (backlog) but never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        address = f"http://127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(UserError, match=f"{address} did not answer within 1 s"):
            submit.connect(address, timeout_s=1.0)
        assert time.monotonic() - t0 < 5


def test_an_http_server_that_is_not_ray_is_refused():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 for everything
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(UserError, match="not a Ray dashboard"):
            submit.connect(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=2.0)
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_are_forwarded_but_masked():
    environ = {
        "MLFLOW_TRACKING_URI": "http://bob:pw123@mlflow:5000",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json",
        "HOME": "/root",
    }
    env = submit.forwarded_env(environ, ["MY_TOKEN=tok-999", "AWS_SECRET_ACCESS_KEY=override-secret"])
    assert env == {
        # user:password@ of an http tracking URI becomes MLflow's own (masked) variables
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_USERNAME": "bob",
        "MLFLOW_TRACKING_PASSWORD": "pw123",
        "AWS_SECRET_ACCESS_KEY": "override-secret",
        "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json",
        "MY_TOKEN": "tok-999",
    }
    shown = submit.mask_env(env)
    assert shown["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert shown["AWS_SECRET_ACCESS_KEY"] == shown["MY_TOKEN"] == shown["MLFLOW_TRACKING_PASSWORD"] == submit.MASK
    assert not any(s in repr(shown) for s in ("pw123", "override-secret", "tok-999", "sa.json"))
    assert redact_text("vaepipe run c.yaml --set tracking.tracking_uri=https://u:pw9@h:5000") == (
        "vaepipe run c.yaml --set tracking.tracking_uri=https://****@h:5000")
    with pytest.raises(UserError, match="KEY=VALUE") as e:
        submit.forwarded_env({}, ["no-equals-sign-secretvalue"])
    assert "secretvalue" not in str(e.value)


def test_runtime_env_and_entrypoint_are_what_ray_accepts(tmp_path):
    from ray.runtime_env import RuntimeEnv

    env = submit.build_runtime_env(tmp_path, {"MLFLOW_TRACKING_URI": "http://m:5000"}, [submit.PROJECT_REQUIREMENT])
    parsed = RuntimeEnv(**env)  # Ray's own validation, as submit_job runs it
    assert parsed["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]
    assert parsed["env_vars"] == {"MLFLOW_TRACKING_URI": "http://m:5000"}
    assert "/runs/" in parsed["excludes"] and ".venv/" in parsed["excludes"]
    assert "pip" not in submit.build_runtime_env(tmp_path, {}, None)
    cmd, extra = submit.run_entrypoint("configs/my demo.yaml", ["train.epochs=2", "name=a b"])
    assert shlex.split(cmd) == [
        "vaepipe", "run", "configs/my demo.yaml", "--set", "train.epochs=2", "--set", "name=a b"]
    assert extra == {}


def test_overrides_with_credentials_travel_as_env_not_in_the_entrypoint():
    cmd, extra = submit.run_entrypoint("configs/demo.yaml", [
        "tracking.tracking_uri=postgresql://bob:pw-77@db/mlflow", "train.epochs=2", "data.aws_secret_key=k-88"])
    assert "pw-77" not in cmd and "k-88" not in cmd
    assert extra == {"VAEPIPE_SET_1": "postgresql://bob:pw-77@db/mlflow", "VAEPIPE_SET_2": "k-88"}
    # The job's shell expands the variables back into the same arguments.
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {cmd.removeprefix('vaepipe run ')}"],
                         env={**extra, "PATH": os.environ["PATH"]}, capture_output=True, text=True).stdout
    assert out.splitlines() == ["configs/demo.yaml", "--set", "tracking.tracking_uri=postgresql://bob:pw-77@db/mlflow",
                                "--set", "train.epochs=2", "--set", "data.aws_secret_key=k-88"]
    assert set(submit.mask_env(extra).values()) == {submit.MASK}


def test_repo_rayignore_keeps_runs_venv_data_and_checkpoints_out():
    lines = {ln.strip() for ln in (REPO / ".rayignore").read_text().splitlines() if ln.strip() and ln[0] != "#"}
    assert set(submit.UPLOAD_EXCLUDES) <= lines, "keep .rayignore and submit.UPLOAD_EXCLUDES in step"
    kept = lambda rel: submit._is_uploaded(REPO, REPO / rel)  # noqa: E731
    for rel in ("runs/mlflow.db", "runs/data/digits16/dataset.json", ".venv/bin/python", "data/x.parquet",
                "checkpoints/step_100/model.pt", "mlruns/0/meta.yaml", ".git/HEAD", "cluster/mlflow/.env",
                ".env.local", "secrets.env", "configs/deploy.pem", "tls.key", "credentials.json", ".aws/credentials",
                "gcp-credentials.json", "cluster/.netrc"):
        assert not kept(rel), rel
    for rel in ("configs/demo.yaml", "pipelines/data/prepare.py", "vae/nvae.py", "pyproject.toml",
                "cluster/mlflow/.env.example", "cluster/kuberay/rayjob.yaml"):
        assert kept(rel), rel


def test_secret_files_and_gitignored_files_are_left_out_and_listed(tmp_path, monkeypatch):
    for rel in ("pipelines/x.py", "configs/demo.yaml", ".env", ".env.local", "secrets.env", "deploy/tls.key",
                "deploy/ca.pem", "credentials.json", "sub/.aws/credentials", "notes/private.txt", ".env.example"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / ".gitignore").write_text("notes/private.txt\n")
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")  # .gitignore is honoured all the same
    excluded = submit.excluded_paths(tmp_path)
    assert set(excluded) == {".env", ".env.local", "secrets.env", "deploy/tls.key", "deploy/ca.pem",
                             "credentials.json", "sub/.aws/credentials", "notes/private.txt"}, excluded
    # Ray's own packaging of the runtime env agrees: what it zips is what excluded_paths does not list.
    from ray._private.runtime_env.packaging import create_package
    zipped = tmp_path.parent / f"{tmp_path.name}.zip"
    with submit._gitignore_honoured():
        create_package(str(tmp_path), zipped, excludes=list(submit.UPLOAD_EXCLUDES), include_gitignore=True)
    import zipfile
    names = {n.rstrip("/") for n in zipfile.ZipFile(zipped).namelist()}
    assert {"pipelines/x.py", "configs/demo.yaml", ".env.example"} <= names
    assert not any(n.endswith((".env", ".env.local", "secrets.env", ".key", ".pem", "credentials.json",
                               "private.txt")) or ".aws" in n for n in names), names


def test_bad_config_or_config_outside_upload_stops_before_any_network(tmp_path, capfd):
    dead = f"http://127.0.0.1:{free_port()}"  # were the address tried, the error would name it instead
    assert _cli(["submit", str(REPO / "configs/demo.yaml"), "--set", "train.epochs=0", "--address", dead]) == 2
    assert "train.epochs" in capfd.readouterr().err
    (tmp_path / "pyproject.toml").write_text("[project]\nname='p'\n")
    (tmp_path / ".gitignore").write_text("/runs/\n")
    (tmp_path / "runs").mkdir()
    shutil.copy(REPO / "configs/demo.yaml", tmp_path / "runs/demo.yaml")
    assert _cli(["submit", str(tmp_path / "runs/demo.yaml"), "--address", dead]) == 2
    assert "excluded from the upload" in capfd.readouterr().err
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yaml"
    shutil.copy(REPO / "configs/demo.yaml", outside)
    assert _cli(["submit", str(outside), "--address", dead, "--working-dir", str(tmp_path)]) == 2
    assert "outside the uploaded directory" in capfd.readouterr().err


def test_cli_registers_submit_and_jobs(capsys):
    from pipelines.cli import jobs

    choices = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"submit", "jobs"} <= set(choices)
    assert choices["submit"].get_default("func") is jobs.submit
    with pytest.raises(SystemExit) as e:
        cli.main(["submit", "--help"])
    assert e.value.code == 0 and "--address" in capsys.readouterr().out
    # the module's own register() adds the same two commands to any parser
    parser = argparse.ArgumentParser(prog="vaepipe")
    jobs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["jobs", "status", "raysubmit_x", "--address", "http://h:8265"])
    assert (args.job_id, args.address, args.func) == ("raysubmit_x", "http://h:8265", jobs.jobs_status)


# ------------------------------------------------------------------------------- with a real Ray head


@dataclass
class Head:
    address: str
    temp_dir: str


def _kill_leftovers(marker: str) -> None:
    """Processes of this head that left its process group (Ray gives some their own): found by the head's
    unique temp dir in their command line, stopped by pid."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on loopback with its own ports, temp dir and process group, token auth off."""
    with _started_head({"RAY_AUTH_MODE": "disabled"}) as head:
        yield head


@contextlib.contextmanager
def _started_head(auth_env: dict[str, str]):
    temp_dir = tempfile.mkdtemp(prefix="vps", dir="/tmp")  # short: unix socket paths are limited to ~107 chars
    dash = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **auth_env,
               PATH=f"{VENV_BIN}:{os.environ['PATH']}")  # jobs find `python` and `vaepipe` of this venv
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--port={free_port()}", "--node-ip-address=127.0.0.1",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        # Every other listening port explicit too: the defaults (52365, 10001, ...) clash with other local Rays.
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2", f"--object-store-memory={200 * 1024**2}", f"--temp-dir={temp_dir}",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
            try:
                submit.connect(address, timeout_s=1.0)
                break
            except UserError as e:
                if "token authentication" in str(e):  # a token head answers: ready for token holders
                    break
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield Head(address, temp_dir)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=3)  # a graceful drain can take 30 s; the head holds nothing worth waiting for
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        _kill_leftovers(temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def project(tmp_path) -> Path:
    """A small project to upload, with the directories the upload must leave behind."""
    (tmp_path / "hello.py").write_text(textwrap.dedent("""
        import os, sys, time
        time.sleep(1)  # long enough for the test to see RUNNING
        files = sorted(os.path.relpath(os.path.join(d, f), ".") for d, _, fs in os.walk(".") for f in fs)
        print("hello from vaepipe")
        print("uploaded:", " ".join(files))
        print("secret delivered:", os.environ.get("AWS_SECRET_ACCESS_KEY") == "sekrit-42")
        if "--worker" in sys.argv:  # and to the job's Ray workers
            import ray
            ray.init()
            seen = ray.get(ray.remote(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY") == "sekrit-42").remote())
            print("secret delivered to workers:", seen)
        print("auth mode:", os.environ.get("RAY_AUTH_MODE"))
        for i in range(40):
            print(f"log line {i}")
        sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 0)
    """))
    for rel in ("runs/mlflow.db", "data/big.bin", ".venv/bin/python", "checkpoints/c.pt", "sub/model.ckpt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    return tmp_path


@pytest.mark.slow
def test_job_succeeds_streams_its_logs_and_gets_the_env(ray_head, project, capfd, tmp_path):
    env = submit.forwarded_env({"AWS_SECRET_ACCESS_KEY": "sekrit-42", "AWS_REGION": "eu-west-1", "PATH": "/x"})
    shown, secret = submit.split_env(env)
    assert shown == {"AWS_REGION": "eu-west-1"} and secret == {"AWS_SECRET_ACCESS_KEY": "sekrit-42"}
    package = submit.write_job_env_package(secret, tmp_path)
    client = submit.connect(ray_head.address)
    t0 = time.monotonic()
    job_id = submit.submit_job(ray_head.address, submit.wrap_entrypoint("python hello.py --worker"),
                               submit.build_runtime_env(project, shown, None, package),
                               client=client, metadata={"vaepipe.config": "none", "vaepipe.secret_env": "AWS_SECRET_ACCESS_KEY"})
    status, waited = submit.wait_until_started(client, job_id, poll_s=0.05)
    to_running = time.monotonic() - t0
    assert status == "RUNNING"
    code = submit.follow_job(client, job_id)
    out = capfd.readouterr().out
    with capfd.disabled():
        print(f"\n[figure] submit -> RUNNING on the local head: {to_running:.2f} s "
              f"(of which after submit_job returned: {waited:.2f} s)")
    assert code == 0
    assert "hello from vaepipe" in out and f"job {job_id} SUCCEEDED" in out
    assert "secret delivered: True" in out and "auth mode: disabled" in out
    assert "secret delivered to workers: True" in out
    # Ray logs every runtime env it creates (runtime_env_agent.log): the secret is in none of the head's logs.
    logs = [p for p in Path(ray_head.temp_dir).rglob("*") if p.is_file() and not p.is_symlink() and "logs" in p.parts]
    assert any(p.name.startswith("runtime_env_agent") for p in logs)
    leaked = [str(p) for p in logs if b"sekrit-42" in p.read_bytes()]
    assert not leaked, leaked
    uploaded = next(ln for ln in out.splitlines() if ln.startswith("uploaded:")).split()[1:]
    assert "hello.py" in uploaded
    left_behind = ("runs", "data", ".venv", "checkpoints")
    assert not [f for f in uploaded if f.split("/")[0] in left_behind or f.endswith(".ckpt")]

    assert _cli(["jobs", "status", job_id, "--address", ray_head.address]) == 0
    status_out = capfd.readouterr().out
    assert "SUCCEEDED" in status_out and "AWS_SECRET_ACCESS_KEY" in status_out and "vaepipe.config" in status_out
    assert "sekrit-42" not in status_out
    assert _cli(["jobs", "logs", job_id, "--address", ray_head.address]) == 0
    assert "log line 39" in capfd.readouterr().out
    assert _cli(["jobs", "logs", job_id, "--address", ray_head.address, "--follow"]) == 0
    assert f"job {job_id} SUCCEEDED" in capfd.readouterr().out
    assert _cli(["jobs", "list", "--address", ray_head.address]) == 0
    listing = capfd.readouterr().out
    assert job_id in listing and "hello.py" in listing


@pytest.mark.slow
def test_failing_job_exits_non_zero_with_its_last_log_lines(ray_head, project, capfd):
    client = submit.connect(ray_head.address)
    t0 = time.monotonic()
    job_id = submit.submit_job(ray_head.address, "python hello.py 3", submit.build_runtime_env(project, {}, None),
                               client=client)
    assert submit.wait_until_started(client, job_id, poll_s=0.05)[0] == "RUNNING"
    with capfd.disabled():
        print(f"\n[figure] submit -> RUNNING on a warm head (second job): {time.monotonic() - t0:.2f} s")
    assert submit.follow_job(client, job_id) == 3
    err = capfd.readouterr().err
    assert f"job {job_id} FAILED" in err and "exit code 3" in err
    assert f"last {submit.TAIL_LINES} log lines" in err and "log line 39" in err
    assert "log line 0\n" not in err  # only the tail
    assert _cli(["jobs", "logs", job_id, "--address", ray_head.address, "--follow"]) == 3
    assert _cli(["jobs", "status", "raysubmit_does_not_exist", "--address", ray_head.address]) == 2
    assert "no job 'raysubmit_does_not_exist'" in capfd.readouterr().err


@pytest.mark.slow
def test_cli_no_wait_returns_at_once_masks_secrets_and_stop_works(ray_head, tmp_path, capfd, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='p'\n")
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs/demo.yaml", tmp_path / "configs/demo.yaml")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-aws-1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://carol:sekrit-pw@mlflow.example:5000")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # an explicit --address must win over it
    t0 = time.monotonic()
    code = _cli(["submit", str(tmp_path / "configs/demo.yaml"), "--address", ray_head.address, "--no-wait",
                 "--no-pip", "--set", "train.epochs=1", "--env", "MY_API_TOKEN=sekrit-tok",
                 "--submission-id", "vaepipe-test-nowait"])
    took = time.monotonic() - t0
    captured = capfd.readouterr()
    with capfd.disabled():
        print(f"\n[figure] vaepipe submit --no-wait returned in {took:.2f} s")
    assert code == 0 and took < 10
    out = captured.out + captured.err
    assert "job vaepipe-test-nowait submitted" in out
    assert "vaepipe jobs logs vaepipe-test-nowait" in out and "vaepipe jobs stop vaepipe-test-nowait" in out
    assert "vaepipe run configs/demo.yaml --set train.epochs=1" in out  # inside the wrapper that loads the secrets
    assert "AWS_SECRET_ACCESS_KEY=****" in out and "MY_API_TOKEN=****" in out
    # user:password@ in an http tracking URI travels as MLflow's own username/password variables, masked here
    assert "MLFLOW_TRACKING_URI=http://mlflow.example:5000" in out and "MLFLOW_TRACKING_PASSWORD=****" in out
    assert "sekrit" not in out

    assert _cli(["jobs", "stop", "vaepipe-test-nowait", "--address", ray_head.address]) == 0
    assert "job vaepipe-test-nowait" in capfd.readouterr().out
    client = submit.connect(ray_head.address)
    assert client.get_job_status("vaepipe-test-nowait").is_terminal()
    assert _cli(["submit", str(tmp_path / "configs/demo.yaml"), "--address", ray_head.address, "--no-wait",
                 "--no-pip", "--submission-id", "vaepipe-test-nowait"]) == 2
    assert "already exists" in capfd.readouterr().err


def _run_command_exists() -> bool:
    out = subprocess.run([str(VENV_BIN / "vaepipe"), "run", "--help"], capture_output=True, text=True)
    return out.returncode == 0


@pytest.mark.slow
@pytest.mark.cluster  # the whole pipeline as a job: the 3-node job in test_cluster.py covers it as well
def test_real_pipeline_run_through_submit(ray_head, capfd):
    assert _run_command_exists(), "`vaepipe run --help` failed: the job's entrypoint would not start"
    t0 = time.monotonic()
    code = _cli(["submit", str(REPO / "configs/demo.yaml"), "--address", ray_head.address, "--no-pip",
                 "--set", "train.epochs=1", "--set", "train.num_workers=1", "--set", "stages=[train]"])
    took = time.monotonic() - t0
    out = capfd.readouterr()
    with capfd.disabled():
        print(f"\n[figure] vaepipe submit of the demo (1 epoch, train only) finished in {took:.1f} s; last lines:")
        print(submit.tail(out.out, 12))
    assert code == 0, out.err[-3000:]
    assert "RUNNING after" in out.out and "SUCCEEDED" in out.out


@pytest.mark.slow
def test_submit_to_a_token_auth_head_sends_the_token(project, tmp_path):
    """A head started with RAY_AUTH_MODE=token: `vaepipe submit` without the token is told how to send it; with
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN the job runs (and the token is not forwarded into the job's env)."""
    token = "vaepipe-test-token-" + os.urandom(8).hex()
    with _started_head({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as head:
        (project / "pyproject.toml").write_text("[project]\nname='p'\n")
        shutil.copy(REPO / "configs/demo.yaml", project / "demo.yaml")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "MLFLOW_"))}
        base["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
        cmd = [str(VENV_BIN / "vaepipe"), "submit", str(project / "demo.yaml"), "--address", head.address,
               "--no-pip", "--no-wait"]
        refused = subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "requires token authentication" in refused.stderr
        assert "Traceback" not in refused.stderr
        sent = subprocess.run(cmd, env={**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                              capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0, sent.stderr[-3000:]
        assert "submitted" in sent.stdout and token not in sent.stdout + sent.stderr
