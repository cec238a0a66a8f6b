"""The `vaepipe` command line: one sub-command per workflow, each a thin shell over a Python function.

    vaepipe config show configs/demo.yaml --set train.epochs=5
    vaepipe data prepare digits --out runs/data/digits16 --image-size 16
    vaepipe runs list --config configs/demo.yaml

Errors that users can fix (a bad config value, a missing dataset, an unreachable tracking server) print one
clear message and exit with status 2, without a traceback; `VAEPIPE_DEBUG=1` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Callable, Sequence


class UserError(Exception):
    """An error whose message tells the user what to change; printed without a traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from vae.config import ConfigError

    types: list[type[BaseException]] = [ConfigError, UserError, FileNotFoundError]
    from pipelines.train_vae import TrainingError
    from pipelines.tune_gwae import SearchError

    types += [TrainingError, SearchError]
    try:
        from pipelines.data import DatasetError

        types.append(DatasetError)
    except ImportError:
        pass
    try:
        from pipelines.tracking import ModelIntegrityError, TrackingUnavailableError

        types += [TrackingUnavailableError, ModelIntegrityError]
    except ImportError:
        pass
    return tuple(types)


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The `CONFIG [--set key=value ...]` pair every config-driven command takes."""
    if required:
        p.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    else:
        p.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=5 (repeatable)",
    )


def _config_show(args: argparse.Namespace) -> int:
    from pipelines.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def _config_validate(args: argparse.Namespace) -> int:
    from pipelines.config import load_config

    load_config(args.config, args.overrides)
    print(f"{args.config}: valid")
    return 0


def _register_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or check a config")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the resolved config (defaults, file and overrides merged)")
    add_config_args(show)
    show.set_defaults(func=_config_show)
    val = csub.add_parser("validate", help="check a config without running anything")
    add_config_args(val)
    val.set_defaults(func=_config_validate)


def _train(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.train_vae import run_train

    if args.resume and args.from_run:
        raise UserError("--resume continues an interrupted run; --from-run starts a new one: pass only one")
    cfg = load_config(args.config, args.overrides)
    result = run_train(cfg, resume=args.resume, from_run=args.from_run, ray_address=args.address)
    print(result.summary())
    return 0


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="stage 1: train the NVAE on Ray Train and register <name>-nvae")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the newest interrupted train run of this config")
    p.add_argument("--from-run", default=None, metavar="RUN_ID", help="start from another train run's final checkpoint")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=_train)


def _run(args: argparse.Namespace) -> int:
    from pipelines.run import main_run

    return main_run(args.config, args.overrides, args.resume, args.address)


def _register_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline (data → train → ncp → tune) under one MLflow parent run")
    add_config_args(p)
    p.add_argument("--resume", default=None, metavar="PIPELINE_RUN_ID",
                   help="continue a pipeline run: finished stages are skipped, an interrupted one resumes")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=_run)


def _demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaepipe",
        description="Train hierarchical VAEs on Ray, improve them with learned priors, track them in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_config(sub)
    _register_train(sub)
    _register_run(sub)
    registrars: list[Callable[[argparse._SubParsersAction], None]] = []
    for module in ("pipelines.data.cli", "pipelines.tracking", "pipelines.train_ncp", "pipelines.tune_gwae",
                   "pipelines.registry", "pipelines.submit"):
        registrars.append(importlib.import_module(module).register)
    for register in registrars:
        register(sub)
    demo = sub.add_parser("demo", help="run the embedded demo (what `make demo` runs)")
    demo.add_argument("config", nargs="?", default="configs/demo.yaml")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.redaction import redact_text

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as e:
        if os.environ.get("VAEPIPE_DEBUG"):
            traceback.print_exc()
        print(f"vaepipe: error: {redact_text(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
