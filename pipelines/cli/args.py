"""Argument pieces shared by several commands; standard library only, so `vaepipe --help` stays instant."""
from __future__ import annotations

import argparse
import math


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


def add_address(p: argparse.ArgumentParser, what: str = "Ray cluster address (default: $RAY_ADDRESS or a local Ray)"):
    p.add_argument("--address", default=None, help=what)


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    """`--config`/`--set` for the tracking section, or `--tracking-uri` directly."""
    p.add_argument("--config", default=None, help="config whose tracking section to use (default: built-in)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides --config)")


def whole_number(text: str, minimum: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be {bound}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    return whole_number(text, 0, "0 or more")


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number above 0 (1.0 samples the prior as "
                                         f"trained; below 1 is sharper)")
    return value


def resume_arg(p: argparse.ArgumentParser, stage: str, extra: str = "") -> None:
    """`--resume [RUN_ID]`: the newest interrupted run of this config, or the one named."""
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_ID",
                   help=f"continue the newest interrupted {stage} run of this config (the same config only; a run "
                        f"that diverged only when named by RUN_ID){extra}")
