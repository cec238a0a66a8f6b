"""Send `vaepipe run CONFIG` to a Ray cluster as a Ray Job, and watch, list and stop jobs.

    vaepipe submit configs/demo.yaml --address http://HEAD:8265 --set train.epochs=5
    vaepipe jobs status raysubmit_XXXX --address http://HEAD:8265
    vaepipe jobs logs raysubmit_XXXX --follow        # --address defaults to $RAY_ADDRESS

Everything goes through the Jobs SDK (`ray.job_submission.JobSubmissionClient`), which only speaks HTTP to the
head's dashboard (port 8265 by default): never the GCS port (6379) or the Ray Client port (10001).

The job's runtime env uploads the project directory (minus `ALWAYS_EXCLUDED`, `.gitignore` and `.rayignore`), asks
the cluster to `pip install` that uploaded project (so a bare Ray image gets vaepipe, its console script and its
dependencies; `--no-pip` when the image already has it), and forwards MLflow and cloud credentials found in the
environment. Secret values are never printed: only a short allow-list of non-secret settings is shown in clear.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, TextIO
from urllib.parse import urlsplit

from pipelines.errors import UserError
from pipelines.redaction import MASK, has_credentials, redact_text, split_credentials

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

# The head must answer within this many seconds, or we stop: a wrong address should cost seconds, not minutes.
CONNECT_TIMEOUT_S = 5.0
# A head that has just started serves HTTP a few seconds before its job agent can take jobs.
AGENT_WAIT_S = 60.0
# Environment variables forwarded to the job when present locally (tracking server, artifact store credentials).
FORWARDED_ENV_PREFIXES = ("MLFLOW_", "AWS_", "GOOGLE_")
# Forwarded settings whose values are not secret and help to read a submission; every other value is masked.
SHOWN_ENV = frozenset({
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_EXPERIMENT_NAME",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "RAY_AUTH_MODE",
})
# pip expands ${VAR} in the requirements file Ray writes on the node; the runtime-env agent sets this variable to
# the uploaded working directory, so pip installs the project itself, with its console script and dependencies.
PROJECT_REQUIREMENT = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"
# Never uploaded, whatever the working directory's ignore files say (the repo's .rayignore lists them too):
# data, results and checkpoints belong in storage the cluster reads; .env files hold passwords.
# Anchored where a bare name would also hit source packages (pipelines/data/ is code, /data/ is data).
ALWAYS_EXCLUDED = (
    "/runs/", "/data/", ".venv/", "venv/", ".git/", "checkpoints/", "mlruns/", "mlartifacts/",
    "*.db", "*.parquet", "*.ckpt", "*.pt", "*.pth", "*.safetensors", "__pycache__/", "*.egg-info/", ".pytest_cache/",
)
# Files that hold credentials by convention: environment files, keys and certificates, cloud and tool credentials.
SECRET_FILES = (
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".ssh/", ".aws/", ".gcloud/", ".azure/", ".kube/", ".docker/",
    "credentials", "credentials.*", "*credentials*.json", "*-credentials*", "service-account*.json",
    "client_secret*.json", "*secret*.json", "*secret*.yaml", "*secret*.yml", ".netrc", ".pgpass", ".git-credentials",
    ".pypirc", ".npmrc", "auth_token", "*.token", ".htpasswd", "*.kdbx",
    # Templates that document the variables without values stay.
    "!.env.example", "!.env.sample", "!.env.template",
)
UPLOAD_EXCLUDES = ALWAYS_EXCLUDED + SECRET_FILES
TAIL_LINES = 25
_EXCLUDED_SHOWN = 30


# ---------------------------------------------------------------------------------------------- addresses


def normalize_address(address: str | None) -> str:
    """The dashboard URL to talk to: `address`, else $RAY_ADDRESS; it must be http(s)://HOST:PORT."""
    source = "--address"
    if not address:
        address = os.environ.get("RAY_ADDRESS", "")
        source = "$RAY_ADDRESS"
    if not address:
        raise UserError(
            "no Ray cluster given: pass --address http://HEAD:8265 (the head's dashboard) or export "
            "RAY_ADDRESS=http://HEAD:8265"
        )
    address = address.strip().rstrip("/")
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        hint = ""
        if parts.scheme == "ray":
            hint = " (ray:// is the Ray Client port; jobs go to the dashboard)"
        elif address == "auto" or re.fullmatch(r"[\w.-]+:\d+", address):
            hint = " (HOST:PORT without http:// looks like the GCS address, port 6379; jobs go to the dashboard)"
        raise UserError(
            f"{source}={redact_text(address)!r} is not the Ray dashboard's HTTP address{hint}; "
            f"use http://HEAD:8265 (or https://... behind a proxy)"
        )
    return address


def _check_reachable(address: str, timeout_s: float) -> None:
    """One bounded HTTP request before the SDK's own, which has no timeout and would hang on a silent host."""
    import requests

    shown = redact_text(address)
    try:
        # The same token header the Jobs SDK sends (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or ~/.ray/auth_token).
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        headers = get_auth_headers_if_auth_enabled({})
    except Exception:  # an older Ray without token auth
        headers = {}
    try:
        r = requests.get(f"{address}/api/version", timeout=timeout_s, headers=headers)
    except requests.exceptions.Timeout:
        raise UserError(
            f"the Ray dashboard at {shown} did not answer within {timeout_s:.0f} s; check the address and port "
            f"(dashboard: 8265 by default), a firewall, or your port-forward "
            f"(`kubectl port-forward svc/vaepipe-head-svc 8265:8265`)"
        ) from None
    except requests.exceptions.RequestException as e:
        raise UserError(
            f"cannot reach the Ray dashboard at {shown} ({type(e).__name__}); is the head running "
            f"(`ray start --head --dashboard-host=0.0.0.0`) and the address right? (--address / $RAY_ADDRESS)"
        ) from None
    if r.status_code in (401, 403):
        raise UserError(
            f"the Ray cluster at {shown} requires token authentication: export RAY_AUTH_MODE=token and "
            f"RAY_AUTH_TOKEN (from `ray get-auth-token` on the head, or the cluster's Kubernetes Secret)"
        )
    try:
        ok = r.status_code == 200 and "ray_version" in r.json()
    except ValueError:
        ok = False
    if not ok:
        raise UserError(
            f"{shown} answers HTTP but is not a Ray dashboard (GET /api/version gave {r.status_code}); "
            f"point --address at the head's dashboard port (8265 by default)"
        )


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    # The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; an explicit
    # --address must win, so both are hidden while the client resolves its address.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> "JobSubmissionClient":
    """A Jobs SDK client for the head's dashboard, or a UserError within about `timeout_s` seconds."""
    address = normalize_address(address)
    _check_reachable(address, timeout_s)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _without_address_env():
            return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise UserError(f"the Ray cluster at {redact_text(address)} refused our credentials: {e}") from None
    except (ConnectionError, RuntimeError) as e:
        raise UserError(f"cannot use the Ray Jobs API at {redact_text(address)}: {e}") from None


# ------------------------------------------------------------------------------------------- runtime env


def forwarded_env(environ: Mapping[str, str], extra: Sequence[str] = ()) -> dict[str, str]:
    """MLFLOW_*/AWS_*/GOOGLE_* variables from `environ`, then `KEY=VALUE` items from --env (which win)."""
    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    for item in extra:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            # Never echo the item: it may be a secret with a typo in its name.
            raise UserError(
                f"--env expects KEY=VALUE with KEY a variable name (got an item starting with {key[:20]!r}); "
                f"e.g. --env MLFLOW_TRACKING_URI=http://mlflow:5000"
            )
        env[key] = value
    for key, user_key, password_key in (
        ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    ):
        uri = env.get(key, "")
        if uri.startswith(("http://", "https://")):
            # MLflow's REST client takes credentials from its own variables, not from the URI; and the URI is
            # shown in clear, while these are masked.
            clean, user, password = split_credentials(uri)
            env[key] = clean
            if user is not None:
                env.setdefault(user_key, user)
            if password is not None:
                env.setdefault(password_key, password)
    return env


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """Values safe to print: allow-listed settings in clear (credentials in URLs redacted), the rest masked."""
    return {k: (redact_text(v) if k in SHOWN_ENV else MASK) for k, v in sorted(env.items())}


def find_project_root(config_path: Path) -> Path:
    """The nearest directory above the config holding a pyproject.toml, else the current directory."""
    for parent in config_path.resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd().resolve()


def _quiet_logger() -> logging.Logger:
    quiet = logging.getLogger(f"{__name__}.upload_check")  # Ray logs every ignore file it reads at INFO
    quiet.propagate = False
    return quiet


def _is_uploaded(working_dir: Path, path: Path) -> bool:
    """Whether Ray's packaging (UPLOAD_EXCLUDES plus every .gitignore/.rayignore on the way down) keeps `path`."""
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    checks = [_get_excludes(working_dir, list(UPLOAD_EXCLUDES))]
    node = working_dir
    for part in path.relative_to(working_dir).parts:
        checks += get_excludes_from_ignore_files(node, include_gitignore=True, logger=_quiet_logger())
        node = node / part
        if any(check(node) for check in checks):
            return False
    return True


def excluded_paths(working_dir: str | os.PathLike) -> list[str]:
    """What the upload leaves out, relative to `working_dir`, as Ray's packaging walks it: an excluded directory
    once (`runs/`), not its contents."""
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    root = Path(working_dir).resolve()
    out: list[str] = []

    def walk(node: Path, checks: list) -> None:
        checks = checks + get_excludes_from_ignore_files(node, include_gitignore=True, logger=_quiet_logger())
        for child in sorted(node.iterdir()):
            if any(check(child) for check in checks):
                out.append(child.relative_to(root).as_posix() + ("/" if child.is_dir() else ""))
            elif child.is_dir() and not child.is_symlink():
                walk(child, checks)

    walk(root, [_get_excludes(root, list(UPLOAD_EXCLUDES))])
    return out


@contextlib.contextmanager
def _gitignore_honoured() -> Iterator[None]:
    # RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 would make Ray upload what .gitignore keeps out (often secrets).
    saved = os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = saved


# Secret environment variables reach the job in this package, not as runtime-env variables: Ray's runtime-env
# agent logs every runtime env it creates, variables included, on each node (runtime_env_agent.log).
JOB_ENV_MODULE = "vaepipe_job_env"
_JOB_ENV_INIT = '''"""Environment of a vaepipe Ray job, shipped as a package because Ray logs runtime-env variables."""
import json
import os
from pathlib import Path


def load():
    """Ray runs this in every worker of the job (worker_process_setup_hook)."""
    for key, value in json.loads(Path(__file__).with_name("env.json").read_text()).items():
        os.environ.setdefault(key, value)
'''
_JOB_ENV_MAIN = '''"""`python -m vaepipe_job_env COMMAND`: the job's entrypoint, run by a shell with the environment loaded."""
import os
import sys

from . import load

load()
os.execvp("sh", ["sh", "-c", sys.argv[1]])
'''


def split_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(settings shown in clear, secrets): what may travel as runtime-env variables, and what may not."""
    shown = {k: v for k, v in env.items() if k in SHOWN_ENV or k == "VAEPIPE_GIT_COMMIT"}
    return shown, {k: v for k, v in env.items() if k not in shown}


def write_job_env_package(secret_env: Mapping[str, str], parent: str | os.PathLike) -> Path:
    """`parent/vaepipe_job_env/` holding `secret_env`, readable by this user only until Ray uploads it."""
    package = Path(parent) / JOB_ENV_MODULE
    package.mkdir(mode=0o700)
    (package / "__init__.py").write_text(_JOB_ENV_INIT)
    (package / "__main__.py").write_text(_JOB_ENV_MAIN)
    fd = os.open(package / "env.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(secret_env), f)
    return package


def wrap_entrypoint(entrypoint: str) -> str:
    """The entrypoint run with the job's secret environment loaded first (`python -m vaepipe_job_env '...'`)."""
    return f"python -m {JOB_ENV_MODULE} {shlex.quote(entrypoint)}"


def build_runtime_env(
    working_dir: str | os.PathLike,
    env_vars: Mapping[str, str] | None = None,
    pip: Sequence[str] | None = (PROJECT_REQUIREMENT,),
    secret_package: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The job's runtime env: the uploaded directory, its pip requirements (None: none), env vars shown in clear,
    and the package of secret variables (see `write_job_env_package`) loaded in every worker."""
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES)}
    if pip:
        runtime_env["pip"] = list(pip)
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if secret_package is not None:
        runtime_env["py_modules"] = [str(secret_package)]
        runtime_env["worker_process_setup_hook"] = f"{JOB_ENV_MODULE}.load"
    return runtime_env


SECRET_OVERRIDE_ENV = "VAEPIPE_SET_{}"


def run_entrypoint(config_rel: str, overrides: Sequence[str] = ()) -> tuple[str, dict[str, str]]:
    """`vaepipe run CONFIG --set ...`, shell-quoted (the job runs it through a shell), and the environment it needs.

    Ray logs a job's entrypoint and shows it to anyone who reaches the dashboard, so an override carrying a
    credential (a URI's user:password@, a secret-named key) travels as an environment variable of the job,
    VAEPIPE_SET_<n>, which the entrypoint expands: `--set 'tracking.tracking_uri='"${VAEPIPE_SET_1}"`."""
    parts = ["vaepipe", "run", shlex.quote(config_rel)]
    env: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and has_credentials(key.strip(), value):
            name = SECRET_OVERRIDE_ENV.format(len(env) + 1)
            env[name] = value
            parts += ["--set", shlex.quote(f"{key}=") + f'"${{{name}}}"']
        else:
            parts += ["--set", shlex.quote(item)]
    return " ".join(parts), env


def git_commit(directory: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


# -------------------------------------------------------------------------------------------- submission


def submit_job(
    address: str | None,
    entrypoint: str,
    runtime_env: Mapping[str, Any] | None = None,
    *,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    metadata: Mapping[str, str] | None = None,
    client: "JobSubmissionClient | None" = None,
    agent_wait_s: float = AGENT_WAIT_S,
) -> str:
    """Submit `entrypoint` as a Ray Job with `runtime_env`; return its submission id.

    The address is checked first (fails in seconds when unreachable). A head that is up but whose job agent is
    still starting ("No available agent") is retried for up to `agent_wait_s` seconds."""
    client = client or connect(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            with _gitignore_honoured():
                return client.submit_job(
                    entrypoint=entrypoint,
                    runtime_env=dict(runtime_env or {}),
                    submission_id=submission_id,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                    metadata=dict(metadata or {}),
                )
        except RuntimeError as e:
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            if "already exists" in str(e):
                raise UserError(
                    f"a job with submission id {submission_id!r} already exists on this cluster; choose another "
                    f"--submission-id or leave it out"
                ) from None
            raise UserError(f"the cluster refused the job: {e}") from None
        except ValueError as e:
            # RuntimeEnv validation (a pip entry, an env var that is not a string, a missing working_dir).
            raise UserError(f"invalid runtime env for the job: {e}") from None


def job_details(client: "JobSubmissionClient", job_id: str) -> "JobDetails":
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(
                f"no job {job_id!r} on this cluster; list them with `vaepipe jobs list --address ...`"
            ) from None
        raise UserError(f"cannot read job {job_id!r}: {e}") from None


def wait_until_started(client: "JobSubmissionClient", job_id: str, poll_s: float = 0.2) -> tuple[str, float]:
    """Poll until the job leaves PENDING (its runtime env is set up); return its status and the wait."""
    start = time.monotonic()
    while True:
        status = job_details(client, job_id).status
        if status.value != "PENDING":
            return status.value, time.monotonic() - start
        time.sleep(poll_s)


def follow_logs(client: "JobSubmissionClient", job_id: str, out: TextIO) -> None:
    """Stream the job's stdout/stderr to `out` until the job ends (the Jobs SDK's websocket tail)."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())


def wait_until_done(client: "JobSubmissionClient", job_id: str, poll_s: float = 0.2) -> "JobDetails":
    # The log stream can close a moment before the job's final status is recorded.
    while True:
        info = job_details(client, job_id)
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)


def tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(deque(text.rstrip("\n").splitlines(), maxlen=n))


def exit_code(info: "JobDetails") -> int:
    """0 when the job SUCCEEDED; the driver's own exit code when it failed with one; 1 otherwise."""
    if info.status.value == "SUCCEEDED":
        return 0
    code = info.driver_exit_code
    return code if isinstance(code, int) and 0 < code < 256 else 1


def report_end(client: "JobSubmissionClient", info: "JobDetails", out: TextIO, err: TextIO) -> int:
    """One line for a success; for anything else the status, Ray's message and the last log lines, on `err`."""
    job_id = info.submission_id or info.job_id
    took = ""
    if info.start_time and info.end_time:
        took = f" in {(info.end_time - info.start_time) / 1000:.1f} s"
    code = exit_code(info)
    if code == 0:
        print(f"job {job_id} SUCCEEDED{took}", file=out)
        return 0
    exit_note = f", exit code {info.driver_exit_code}" if info.driver_exit_code else ""
    print(f"job {job_id} {info.status.value}{took}{exit_note}: {info.message or ''}".rstrip(": "), file=err)
    try:
        logs = client.get_job_logs(job_id)
    except RuntimeError:
        logs = ""
    if logs.strip():
        print(f"--- last {TAIL_LINES} log lines of {job_id} ---", file=err)
        print(tail(logs), file=err)
    return code


def follow_job(
    client: "JobSubmissionClient", job_id: str, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Report when the job starts, stream its logs, and return its exit code (see `exit_code`).
    `out`/`err` default to the sys.stdout/sys.stderr of the moment of the call."""
    out, err = out or sys.stdout, err or sys.stderr
    status, waited = wait_until_started(client, job_id)
    print(f"job {job_id} {status} after {waited:.1f} s", file=out, flush=True)
    if status == "RUNNING":
        follow_logs(client, job_id, out)
    return report_end(client, wait_until_done(client, job_id), out, err)


def follow_up_commands(job_id: str, address: str) -> str:
    a = shlex.quote(redact_text(address))
    return (
        f"  logs:    vaepipe jobs logs {job_id} --address {a} --follow\n"
        f"  status:  vaepipe jobs status {job_id} --address {a}\n"
        f"  stop:    vaepipe jobs stop {job_id} --address {a}\n"
        f"  web:     {redact_text(address)}/#/jobs/{job_id}"
    )


def tracking_note(cfg: Any, env: Mapping[str, str]) -> str | None:
    uri = cfg.tracking.tracking_uri or env.get("MLFLOW_TRACKING_URI")
    if not uri:
        return (
            "no MLFLOW_TRACKING_URI: the job tracks into sqlite inside its working dir on the head node, which goes "
            "away with the cluster; export MLFLOW_TRACKING_URI=http://MLFLOW_HOST:5000 (cluster/README.md)"
        )
    host = (urlsplit(uri).hostname or "") if "://" in uri else ""
    if uri.startswith(("sqlite:", "file:", "/")) or host in ("localhost", "127.0.0.1", "::1"):
        return f"tracking URI {redact_text(uri)} is resolved on the cluster (the head node), not on this machine"
    return None
