"""The `vaepipe` command line: one sub-command per workflow, each a thin shell over a Python function.

    vaepipe config show configs/demo.yaml --set train.epochs=5
    vaepipe data prepare digits --out runs/data/digits16 --image-size 16
    vaepipe train configs/demo.yaml
    vaepipe runs list --config configs/demo.yaml

This package holds every argparse piece and every command handler. It imports only the standard library at import
time; each handler imports the stage it runs, so `vaepipe --help` and `vaepipe config show` start in a fraction of a
second (benchmarks/cli_startup.py).

Errors users can fix (pipelines.errors.UserError: a bad config value, a missing dataset or run, an unreachable
tracking server) print one clear message and exit with status 2, without a traceback; `VAEPIPE_DEBUG=1` shows it.
Ctrl-C exits with 130 after saying how to resume.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Sequence

from pipelines.cli import data, jobs, models, runs, stages

_RESUMABLE = {"train": "vaepipe train CONFIG --resume", "ncp": "vaepipe ncp CONFIG --resume",
              "tune": "vaepipe tune CONFIG --resume", "run": "vaepipe run CONFIG --resume PIPELINE_RUN_ID",
              "demo": "vaepipe run CONFIG --resume PIPELINE_RUN_ID"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaepipe",
        description="Train hierarchical VAEs on Ray, improve them with learned priors, track them in MLflow.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own progress bars and INFO lines too (default: vaepipe's progress lines only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (stages, data, runs, models, jobs):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["VAEPIPE_VERBOSE"] = "1"  # read by the local Ray's processes, which inherit it
    else:
        # MLflow draws a progress bar for every artifact copy (22 lines per registered model); a user's own setting wins.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # Ray folds alike lines of different workers into "[repeated 3x across cluster]", which hides which NCP
        # group said what and flushes a stray line after the run has ended.
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        # A new sqlite store's creation and migration lines ("Creating initial MLflow database tables...").
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        how = _RESUMABLE.get(args.command)
        hint = f"; the interrupted run is KILLED and resumable: `{how}` (`vaepipe runs list` shows it)" if how else ""
        print(f"vaepipe: interrupted{hint}", file=sys.stderr, flush=True)
        return 130
    except BaseException as e:
        from pipelines.errors import USER_ERRORS
        from pipelines.redaction import redact_text

        if not isinstance(e, USER_ERRORS):
            raise
        if os.environ.get("VAEPIPE_DEBUG"):
            traceback.print_exc()
        print(f"vaepipe: error: {redact_text(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
