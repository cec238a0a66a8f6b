"""`vaepipe config|train|ncp|tune|run|demo`: the config commands and the three stages, alone or chained.

    vaepipe config show configs/demo.yaml --set train.epochs=5
    vaepipe train configs/demo.yaml [--resume [RUN_ID] | --from-run RUN_ID]
    vaepipe ncp configs/demo.yaml --model models:/demo-nvae@candidate [--resume [RUN_ID]]
    vaepipe tune configs/demo.yaml [--space gwae_weights | PATH] [--resume [RUN_ID]]
    vaepipe run configs/demo.yaml [--resume PIPELINE_RUN_ID]

Each handler imports its stage when it runs, so parsing (and `--help`) imports none of torch, Ray or MLflow.
"""
from __future__ import annotations

import argparse
import sys

from pipelines.cli.args import add_address, add_config_args, resume_arg
from pipelines.errors import ConfigError


def config_show(args: argparse.Namespace) -> int:
    from pipelines.config import dump_config, load_config

    sys.stdout.write(dump_config(load_config(args.config, args.overrides)))
    return 0


def config_validate(args: argparse.Namespace) -> int:
    from pipelines.config import load_config

    load_config(args.config, args.overrides)
    print(f"{args.config}: valid")
    return 0


def train(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.train_vae import run_train

    if args.resume and args.from_run:
        raise ConfigError("--resume continues an interrupted run; --from-run starts a new one: pass only one")
    cfg = load_config(args.config, args.overrides)
    print(run_train(cfg, resume=args.resume, from_run=args.from_run, ray_address=args.address).summary())
    return 0


def ncp(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.train_ncp import run_ncp

    cfg = load_config(args.config, args.overrides)
    print(run_ncp(cfg, model_uri=args.model, resume=args.resume, ray_address=args.address).summary())
    return 0


def tune(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.tune_gwae import run_tune

    cfg = load_config(args.config, args.overrides)
    if args.space:
        cfg = cfg.replace(tune=cfg.tune.replace(space=args.space))
    print(run_tune(cfg, resume=args.resume, ray_address=args.address).summary())
    return 0


def run(args: argparse.Namespace) -> int:
    from pipelines.pipeline import main_run

    return main_run(args.config, args.overrides, args.resume, args.address)


def demo(args: argparse.Namespace) -> int:
    from pipelines.pipeline import run_demo

    return run_demo(args.config, args.overrides)


def _shipped_spaces() -> str:
    from pathlib import Path

    import tune_spaces

    return ", ".join(sorted(p.stem for p in Path(tune_spaces.__file__).parent.glob("*.yaml")))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or check a config")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the resolved config (defaults, file and overrides merged)")
    add_config_args(show)
    show.set_defaults(func=config_show)
    val = csub.add_parser("validate", help="check a config without running anything")
    add_config_args(val)
    val.set_defaults(func=config_validate)

    p = sub.add_parser("train", help="stage 1: train the NVAE on Ray Train and register <name>-nvae")
    add_config_args(p)
    resume_arg(p, "train")
    p.add_argument("--from-run", default=None, metavar="RUN_ID", help="start from another train run's final checkpoint")
    add_address(p)
    p.set_defaults(func=train)

    p = sub.add_parser("ncp", help="stage 2: noise-contrastive prior classifiers on a frozen NVAE; register <name>-ncp")
    add_config_args(p)
    p.add_argument("--model", default=None, metavar="MODEL_URI",
                   help="the NVAE to improve (default: models:/<name>-nvae@candidate)")
    resume_arg(p, "ncp", "; only the missing groups are trained")
    add_address(p)
    p.set_defaults(func=ncp)

    p = sub.add_parser("tune", help="stage 3: Ray Tune over GWAE weights and priors; register <name>-gwae")
    add_config_args(p)
    p.add_argument("--space", default=None, metavar="NAME_OR_PATH",
                   help=f"search space: a YAML file, or one shipped in tune_spaces/ ({_shipped_spaces()}); "
                        f"overrides tune.space")
    resume_arg(p, "tune", "; unfinished and errored trials go on from their last checkpoints")
    add_address(p)
    p.set_defaults(func=tune)

    p = sub.add_parser("run", help="the whole pipeline (data → train → ncp → tune) under one MLflow parent run")
    add_config_args(p)
    p.add_argument("--resume", default=None, metavar="PIPELINE_RUN_ID",
                   help="continue a pipeline run: finished stages are skipped, an interrupted one resumes")
    add_address(p)
    p.set_defaults(func=run)

    p = sub.add_parser("demo", help="run the embedded demo (what `make demo` runs)")
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=demo)
