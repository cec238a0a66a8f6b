"""`vaepipe submit` and `vaepipe jobs status|logs|stop|list`: the pipeline as a Ray Job on a cluster (the work is in
pipelines.submit).

    vaepipe submit configs/demo.yaml --address http://HEAD:8265 --set train.epochs=5
    vaepipe jobs status raysubmit_XXXX --address http://HEAD:8265
    vaepipe jobs logs raysubmit_XXXX --follow        # --address defaults to $RAY_ADDRESS
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from pipelines.cli.args import add_address, add_config_args
from pipelines.errors import UserError

DASHBOARD = "the head's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"


def submit(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.submit import (
        PROJECT_REQUIREMENT, _EXCLUDED_SHOWN, _is_uploaded, build_runtime_env, connect, excluded_paths,
        find_project_root, follow_job, follow_up_commands, forwarded_env, git_commit, mask_env, normalize_address,
        redact_text, run_entrypoint, split_env, submit_job, tracking_note, wrap_entrypoint,
        write_job_env_package,
    )

    config = Path(args.config)
    cfg = load_config(config, args.overrides)  # a bad config stops here, before any network call
    working_dir = Path(args.working_dir).resolve() if args.working_dir else find_project_root(config)
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {str(working_dir)!r} is not a directory")
    try:
        config_rel = config.resolve().relative_to(working_dir)
    except ValueError:
        raise UserError(
            f"config {str(config)!r} is outside the uploaded directory {str(working_dir)!r}; move it inside "
            f"(e.g. under configs/) or pass --working-dir a directory that holds it"
        ) from None
    if not _is_uploaded(working_dir, working_dir / config_rel):
        raise UserError(
            f"config {config_rel.as_posix()!r} is excluded from the upload (ALWAYS_EXCLUDED, .gitignore or "
            f".rayignore), so the job could not read it; keep configs under configs/"
        )
    env = forwarded_env(os.environ, args.env)
    entrypoint, override_env = run_entrypoint(config_rel.as_posix(), args.overrides)
    env.update(override_env)
    metadata = {"vaepipe.config": config_rel.as_posix(), "vaepipe.name": cfg.name}
    commit = git_commit(working_dir)
    if commit:
        metadata["vaepipe.git_commit"] = commit
        env.setdefault("VAEPIPE_GIT_COMMIT", commit)  # .git is not uploaded: runs read the commit from here
    pip = ([] if args.no_pip else [PROJECT_REQUIREMENT]) + list(args.pip)
    shown_env, secret_env = split_env(env)
    if secret_env:
        metadata["vaepipe.secret_env"] = ",".join(sorted(secret_env))  # names only, for `vaepipe jobs status`
    staging = tempfile.TemporaryDirectory(prefix="vaepipe-submit-")
    package = write_job_env_package(secret_env, staging.name) if secret_env else None
    runtime_env = build_runtime_env(working_dir, shown_env, pip or None, package)
    if package is not None:
        entrypoint = wrap_entrypoint(entrypoint)
    excluded = excluded_paths(working_dir)

    client = connect(args.address)
    address = normalize_address(args.address)
    print(f"submitting `{redact_text(entrypoint)}` to {redact_text(address)}")
    print(f"  working dir: {working_dir}")
    shown = ", ".join(excluded[:_EXCLUDED_SHOWN]) + (f" and {len(excluded) - _EXCLUDED_SHOWN} more"
                                                      if len(excluded) > _EXCLUDED_SHOWN else "")
    print(f"  not uploaded ({len(excluded)}: secrets, data, results; .gitignore, .rayignore): {shown or '-'}")
    print(f"  pip: {', '.join(pip) if pip else '(none: the cluster image provides vaepipe)'}")
    if env:
        print("  env: " + ", ".join(f"{k}={v}" for k, v in mask_env(env).items()))
    note = tracking_note(cfg, env)
    if note:
        print(f"  note: {note}", file=sys.stderr)
    with staging:  # the secrets' package leaves this machine inside the upload, then goes
        job_id = submit_job(
            address,
            entrypoint,
            runtime_env,
            submission_id=args.submission_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            metadata=metadata,
            client=client,
        )
    print(f"job {job_id} submitted")
    print(follow_up_commands(job_id, address), flush=True)
    if args.no_wait:
        return 0
    try:
        return follow_job(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (stop it with `vaepipe jobs stop {job_id}`)",
              file=sys.stderr)
        return 130


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def jobs_status(args: argparse.Namespace) -> int:
    from pipelines.submit import connect, job_details, redact_text

    info = job_details(connect(args.address), args.job_id)
    env_names = sorted(((info.runtime_env or {}).get("env_vars") or {}).keys())
    rows = [
        ("job", info.submission_id or info.job_id),
        ("status", info.status.value),
        ("message", info.message or ""),
        ("entrypoint", redact_text(info.entrypoint)),
        ("started", _fmt_time(info.start_time)),
        ("ended", _fmt_time(info.end_time)),
        ("driver exit code", "" if info.driver_exit_code is None else str(info.driver_exit_code)),
        ("env vars", ", ".join(env_names)),  # names only: the values may be credentials
    ]
    rows += [(k, v) for k, v in sorted((info.metadata or {}).items()) if k.startswith("vaepipe.")]
    for key, value in rows:
        if value:
            print(f"{key + ':':18}{value}")
    return 0


def jobs_logs(args: argparse.Namespace) -> int:
    from pipelines.submit import connect, follow_logs, job_details, report_end, wait_until_done

    client = connect(args.address)
    job_details(client, args.job_id)  # an unknown id gets a clear error before any log request
    if not args.follow:
        sys.stdout.write(client.get_job_logs(args.job_id))
        return 0
    try:
        follow_logs(client, args.job_id, sys.stdout)
    except KeyboardInterrupt:
        return 130
    return report_end(client, wait_until_done(client, args.job_id), sys.stdout, sys.stderr)


def jobs_stop(args: argparse.Namespace, wait_s: float = 30.0) -> int:
    from pipelines.submit import connect, job_details

    client = connect(args.address)
    info = job_details(client, args.job_id)
    if info.status.is_terminal():
        print(f"job {args.job_id} already ended: {info.status.value}")
        return 0
    client.stop_job(args.job_id)
    deadline = time.monotonic() + wait_s
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.2)
        info = job_details(client, args.job_id)
    print(f"job {args.job_id} {info.status.value if info.status.is_terminal() else 'stopping'}")
    return 0


def jobs_list(args: argparse.Namespace) -> int:
    from pipelines.submit import connect, redact_text

    jobs = connect(args.address).list_jobs()
    jobs = [j for j in jobs if j.submission_id]  # drivers started by `ray.init` on the head are not jobs
    jobs.sort(key=lambda j: j.start_time or 0)
    print(f"{'JOB':32} {'STATUS':10} {'STARTED':19}  ENTRYPOINT")
    for j in jobs:
        entry = redact_text(j.entrypoint)
        entry = entry if len(entry) <= 70 else entry[:67] + "..."
        print(f"{j.submission_id:32} {j.status.value:10} {_fmt_time(j.start_time):19}  {entry}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vaepipe submit` and `vaepipe jobs status|logs|stop|list`."""
    p = subparsers.add_parser(
        "submit",
        help="run `vaepipe run CONFIG` on a Ray cluster as a Ray Job and follow it",
        description="Validate CONFIG locally, upload the project, and run `vaepipe run CONFIG --set ...` on the "
        "cluster as a Ray Job; prints the job id, follows its logs and exits with the job's status.",
    )
    add_config_args(p)
    add_address(p, DASHBOARD)
    p.add_argument("--no-wait", action="store_true", help="return after printing the job id")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable; values are never printed)")
    p.add_argument("--pip", action="append", default=[], metavar="PKG", help="extra pip requirement (repeatable)")
    p.add_argument("--no-pip", action="store_true",
                   help="do not pip-install the project on the cluster (its image already has vaepipe)")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="directory to upload and run in (default: the project root holding the config)")
    p.add_argument("--submission-id", default=None, metavar="ID", help="job id to use (default: generated)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, metavar="N",
                   help="CPUs reserved for the `vaepipe run` driver itself")
    p.set_defaults(func=submit)

    jobs = subparsers.add_parser("jobs", help="status, logs, stop and list of Ray Jobs on a cluster")
    jsub = jobs.add_subparsers(dest="jobs_cmd", required=True, metavar="ACTION")
    for name, func, text in (
        ("status", jobs_status, "show a job's status, timing and vaepipe metadata"),
        ("logs", jobs_logs, "print a job's logs"),
        ("stop", jobs_stop, "stop a running job"),
    ):
        q = jsub.add_parser(name, help=text)
        q.add_argument("job_id", metavar="JOB_ID")
        add_address(q, DASHBOARD)
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
        q.set_defaults(func=func)
    q = jsub.add_parser("list", help="list the jobs submitted to the cluster")
    add_address(q, DASHBOARD)
    q.set_defaults(func=jobs_list)
