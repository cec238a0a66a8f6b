"""The README is the user's manual, so what it tells people to type must work as written:
- every `vaepipe ...` command in it parses with the real command line (its subcommand, options and values);
- every `make` target it names exists, and every file it points at (configs, benchmarks, search spaces, manifests) is
  in the repository;
- its Python API snippet runs as it stands.
The snippets that need the demo's registered models run against a real demo store in tests/test_demo.py."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipelines.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# Placeholders the README uses for ids only a real run prints; any well-formed id parses the same.
PLACEHOLDERS = {"3f2c…": "3f2c0000", "5d1e…": "5d1e0000", "raysubmit_XXXX": "raysubmit_0000"}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _shell_lines() -> list[str]:
    """The commands of the bash blocks, continuation lines joined and comments dropped."""
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _vaepipe_commands() -> list[list[str]]:
    commands = []
    for line in _shell_lines():
        for old, new in PLACEHOLDERS.items():
            line = line.replace(old, new)
        words = shlex.split(line)
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]  # VAR=value prefixes
        if words and words[0] == "vaepipe":
            commands.append(words[1:])
    return commands


def test_the_readme_has_the_commands_it_documents():
    commands = {c[0] for c in _vaepipe_commands()}
    # every stage and tool command has at least one example
    assert {"train", "ncp", "tune", "run", "data", "config", "promote", "sample", "evaluate", "submit", "jobs",
            "runs"} <= commands, commands


@pytest.mark.parametrize("argv", _vaepipe_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_vaepipe_command_in_the_readme_parses(argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of refusing, or of answering --help
        assert e.code == 0 and "--help" in argv, f"`vaepipe {' '.join(argv)}` does not parse (exit {e.code})"
        return
    assert callable(args.func)


def test_every_make_target_and_file_the_readme_names_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    named = set(re.findall(r"`make ([a-z][a-z-]*)", README)) | {
        w[1] for w in (shlex.split(line) for line in _shell_lines()) if len(w) > 1 and w[0] == "make"}
    assert named and named <= targets, named - targets
    paths = set(re.findall(r"(?<![\w/.])((?:configs|benchmarks|tune_spaces|cluster)/[\w./-]+\.(?:py|yaml|md|sh))",
                           README))
    assert len(paths) > 10
    missing = sorted(p for p in paths if not (REPO / p).exists() and "{" not in p)
    assert not missing, missing
    for group in re.findall(r"configs/ncp-\{([\w,]+)\}\.yaml", README):
        for name in group.split(","):
            assert (REPO / f"configs/ncp-{name}.yaml").exists(), name


def test_the_python_api_snippet_runs():
    import torch

    block = next(b for b in _blocks("python") if "from vae import NVAE" in b)
    namespace = {"x": torch.rand(2, 1, 16, 16), "n": 2}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].nelbo.shape == (2,)
