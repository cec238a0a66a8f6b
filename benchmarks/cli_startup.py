"""How long `vaepipe` takes to start, and which heavy libraries a command drags in.

    .venv/bin/python benchmarks/cli_startup.py --repeats 7
    .venv/bin/python benchmarks/cli_startup.py --root /tmp/new_tree --baseline /tmp/old_tree

Each command (`vaepipe --help`, `vaepipe config show configs/demo.yaml`) runs as a fresh Python process with the
source tree under test first on PYTHONPATH and as the working directory, so the same venv measures any checkout or
worktree. The entry point is read from the tree's own pyproject.toml (`[project.scripts] vaepipe`), so the script
works whether the CLI is a module or a package.

Warm figures: the first run of each command warms the OS file cache and is the one that records imports (a hook at
interpreter exit lists every loaded module whose top-level name is torch, ray, mlflow, pyarrow, pandas or yaml,
and `-X importtime` gives the costliest third-party imports); then `--repeats` plain runs are timed, wall
clock around the whole process, and the median and minimum are printed, with the median CPU time (user + system)
of the process, which other load on the machine inflates less than wall time; the load average is printed too.
With `--baseline`, the same is done for a second tree and the ratio baseline / root is printed (above 1: the root
starts faster).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HEAVY = ("torch", "ray", "mlflow", "pyarrow", "pandas", "yaml")
COMMANDS = {
    "--help": ["--help"],
    "config show": ["config", "show", "configs/demo.yaml"],
}
DEFAULT_PYTHON = "/work/main/.venv/bin/python"
REPO = Path(__file__).resolve().parents[1]

# Runs the console-script entry point the way the installed `vaepipe` script does. argparse's --help ends with
# SystemExit, which still runs the exit hook.
CHILD = """\
import importlib, sys
sys.argv = ["vaepipe", *{args!r}]
main = getattr(importlib.import_module({module!r}), {func!r})
sys.exit(main({args!r}))
"""

# Written at interpreter exit to the file named in the environment; registered before anything else is imported,
# so it runs after every other exit hook (they run last-in, first-out).
PROBE = """\
import atexit, json, os, sys
def _vaepipe_probe():
    heavy = {heavy!r}
    mods = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    pkg = sys.modules.get("pipelines")
    with open(os.environ["VAEPIPE_PROBE_OUT"], "w") as f:
        json.dump({{"modules": mods, "pipelines_file": getattr(pkg, "__file__", None)}}, f)
atexit.register(_vaepipe_probe)
"""


@dataclass
class Result:
    command: str
    rc: int = 0
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)   # user + system CPU seconds of each timed process
    modules: list[str] = field(default_factory=list)
    import_s: dict[str, float] = field(default_factory=dict)
    pipelines_file: str | None = None
    error: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def best(self) -> float:
        return min(self.times) if self.times else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")

    def heavy_summary(self) -> str:
        counts = {name: sum(1 for m in self.modules if m.split(".")[0] == name) for name in HEAVY}
        loaded = [f"{name}({n})" for name, n in counts.items() if n]
        return " ".join(loaded) if loaded else "none"


def entry_point(root: Path) -> tuple[str, str]:
    """(module, function) of the `vaepipe` console script declared by the tree's pyproject.toml."""
    pyproject = root / "pyproject.toml"
    try:
        target = tomllib.loads(pyproject.read_text())["project"]["scripts"]["vaepipe"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"cannot read the vaepipe entry point from {pyproject} ({exc!r}); "
                         "pass --root the top of a vaepipe checkout") from None
    module, _, func = target.partition(":")
    return module.strip(), (func or "main").strip()


def child_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTHONSTARTUP", None)
    return env


OWN = ("pipelines", "vae", "tune_spaces")


def import_times(stderr: str, top: int = 8) -> dict[str, float]:
    """Cumulative import time (s) of the costliest third-party top-level libraries, from `-X importtime` output.

    A library's figure includes what it imports in turn (torchvision's includes torch when it came first).
    """
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+\s+\|\s+(\d+)\s+\|\s*(\S+)\s*$", line)
        if not m or "." in m.group(2):
            continue
        name = m.group(2)
        if name in sys.stdlib_module_names or name in OWN or name.startswith("_") or name.endswith("customize"):
            continue
        out[name] = out.get(name, 0.0) + int(m.group(1)) / 1e6
    return dict(sorted(((k, v) for k, v in out.items() if v >= 0.005), key=lambda kv: -kv[1])[:top])


def measure(root: Path, python: str, name: str, args: list[str], repeats: int, timeout: float) -> Result:
    module, func = entry_point(root)
    code = CHILD.format(args=args, module=module, func=func)
    env = child_env(root)
    res = Result(name)
    with tempfile.TemporaryDirectory() as tmp:
        probe_out = Path(tmp) / "probe.json"
        probe_env = {**env, "VAEPIPE_PROBE_OUT": str(probe_out)}
        probe_code = PROBE.format(heavy=HEAVY) + code
        warm = subprocess.run([python, "-X", "importtime", "-c", probe_code], cwd=root, env=probe_env,
                              capture_output=True, text=True, timeout=timeout)
        res.rc = warm.returncode
        if probe_out.exists():
            probe = json.loads(probe_out.read_text())
            res.modules, res.pipelines_file = probe["modules"], probe["pipelines_file"]
        res.import_s = import_times(warm.stderr)
        if warm.returncode != 0:
            tail = [ln for ln in warm.stderr.splitlines() if not ln.startswith("import time:")][-12:]
            res.error = "\n".join(tail)
            return res
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        run = subprocess.run([python, "-c", code], cwd=root, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, timeout=timeout)
        res.times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        res.cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        res.rc = res.rc or run.returncode
    return res


def report(root: Path, results: list[Result]) -> None:
    print(f"\n== {root}")
    expected = str((root / "pipelines").resolve())
    for r in results:
        if r.pipelines_file and not str(Path(r.pipelines_file).resolve()).startswith(expected):
            print(f"  WARNING: {r.command!r} imported pipelines from {r.pipelines_file}, not from this tree")
    print(f"  {'command':<13} {'median s':>9} {'min s':>8} {'cpu s':>7} {'rc':>3}  heavy modules loaded (submodules)")
    for r in results:
        print(f"  {r.command:<13} {r.median:>9.3f} {r.best:>8.3f} {r.cpu_median:>7.3f} {r.rc:>3}  {r.heavy_summary()}")
    for r in results:
        if r.import_s:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r.import_s.items())
            print(f"  {r.command}: costliest imports, cumulative s (-X importtime, warm-up run): {parts}")
        if r.error:
            print(f"  {r.command}: FAILED (exit {r.rc}); last lines of stderr:")
            print("    " + r.error.replace("\n", "\n    "))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=REPO, help="source tree to measure (default: this checkout)")
    p.add_argument("--baseline", type=Path, default=None, help="a second tree to compare against (e.g. the "
                   "commit before a change, as a git worktree)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per command after one warm-up run")
    p.add_argument("--python", default=DEFAULT_PYTHON if Path(DEFAULT_PYTHON).exists() else sys.executable,
                   help="interpreter of the venv that has the dependencies")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for one run")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    roots = [args.root.resolve()] + ([args.baseline.resolve()] if args.baseline else [])
    for r in roots:
        if not (r / "pipelines").is_dir():
            p.error(f"{r} has no pipelines/ directory; pass --root the top of a vaepipe checkout")
    print(f"python: {args.python}; {args.repeats} timed runs per command after 1 warm-up; wall clock per process")
    for name, cmd in COMMANDS.items():
        print(f"  {name!r}: vaepipe {shlex.join(cmd)}")
    print("load average at start (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
          + f" on {os.cpu_count()} CPUs")
    all_results: list[list[Result]] = []
    for root in roots:
        all_results.append([measure(root, args.python, name, cmd, args.repeats, args.timeout)
                            for name, cmd in COMMANDS.items()])
        report(root, all_results[-1])
    if args.baseline:
        new, old = all_results
        print(f"\n== ratio baseline / root (above 1: {roots[0].name} starts faster)")
        for a, b in zip(new, old):
            if a.times and b.times:
                print(f"  {a.command:<13} median {b.median / a.median:6.2f}x   min {b.best / a.best:6.2f}x   "
                      f"cpu {b.cpu_median / a.cpu_median:6.2f}x")
    print("load average at end (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    failed = any(r.rc for rs in all_results for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
