"""`vaepipe runs list`: the latest pipeline runs with their stage runs and registered models.

    vaepipe runs list --config configs/demo.yaml
    vaepipe runs list --tracking-uri http://127.0.0.1:5000 --experiment demo --limit 5
"""
from __future__ import annotations

import argparse

from pipelines.cli.args import add_config_args, positive_int


def runs_list(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.tracking import format_runs_table, list_pipeline_runs

    cfg = load_config(args.config, args.overrides)
    tracking = cfg.tracking.replace(tracking_uri=args.tracking_uri) if args.tracking_uri else cfg.tracking
    experiment = args.experiment or (cfg.name if args.config else None)
    rows = list_pipeline_runs(tracking, experiment=experiment, limit=args.limit)
    print(format_runs_table(rows), end="")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser("runs", help="inspect tracked pipeline runs")
    sub = runs.add_subparsers(dest="runs_cmd", required=True, metavar="COMMAND")
    lst = sub.add_parser("list", help="list the latest pipeline runs with their stages and registered models")
    add_config_args(lst, required=False)
    lst.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from the config, "
                     "$MLFLOW_TRACKING_URI, or sqlite:///<workdir>/mlflow.db)")
    lst.add_argument("--experiment", default=None, help="config name or vaepipe/<name> (default: the config's "
                     "name with --config, else every vaepipe experiment)")
    lst.add_argument("--limit", type=positive_int, default=20, help="how many pipeline runs to show (default 20)")
    lst.set_defaults(func=runs_list)
