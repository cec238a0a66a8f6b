"""`make demo` as a newcomer runs it: `vaepipe demo configs/demo.yaml` in a fresh directory, then the README's
snippets against the store it leaves. The demo must prove its methods in figures, not only in pictures:
- the NVAE's samples at temperature 0.7 are recognised by the judge of samples (a classifier trained on real digits,
  separate from the feature extractor that scores) far more often than a model's that memorised its data (0-2%),
  and spread over the digits; real digits are the judge's ceiling;
- NCP's samples score better than the base prior's (Fréchet distance in vaepipe's features, and the judge);
- the registered GWAE reconstructs its inputs (test PSNR well above the mean image's);
- its console stays readable (a line budget).

Marked `demo` (about 6 minutes on 2 cores): `make test-demo` runs it, `make test` does not."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CONSOLE_BUDGET = 140  # lines


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run in a fresh directory (its `runs/` there, as `make demo` leaves it in the repository)."""
    home = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VAEPIPE_"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", str(REPO / "configs" / "demo.yaml"),
         "--set", f"tracking.workdir={home / 'runs'}", "--set", f"data.path={home / 'runs/data/digits16'}",
         "--set", f"tune.data.path={home / 'runs/data/regions16'}"],
        cwd=home, env=env, capture_output=True, text=True, timeout=1500)
    (home / "console.txt").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return home, out.stdout + out.stderr


def _stage_metrics(home: Path) -> dict[str, dict[str, float]]:
    client = mlflow.MlflowClient(f"sqlite:///{home / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vaepipe/demo")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    return {r.data.tags["vaepipe.stage"]: r.data.metrics for r in runs if "vaepipe.stage" in r.data.tags}


@pytest.mark.demo
def test_the_demo_proves_its_methods_in_figures(demo):
    home, console = demo
    m = _stage_metrics(home)
    train, ncp, tune = m["train"], m["ncp"], m["tune"]
    # NVAE: samples at temperature 0.7 recognised as digits (31% seen, 28% at 1.0; 12% with the logistic-mixture
    # decoder on grey levels), of many digits; real digits are the judge's ceiling (89% seen). The plain tiny preset
    # without shifts: 0%.
    assert train["eval/judge_recognised_real"] > 0.7, train
    assert train["eval/judge_recognised_t0.7"] > 0.2, train
    assert train["eval/judge_class_entropy_t0.7"] > 0.7, train  # not all one digit
    # NCP: samples closer to the data than the base prior's (26.5 -> 19.8 seen), and recognised at least as often
    # by one of its samplers (17% -> SIR 19%, Langevin 23% seen).
    assert ncp["val/fd_vaepipe_sir"] < ncp["val/fd_vaepipe_base"], ncp
    best = max(ncp["val/judge_recognised_sir"], ncp["val/judge_recognised_langevin"])
    assert best >= ncp["val/judge_recognised_base"], ncp
    # GWAE: the registered model reconstructs (its test PSNR far above the mean image's).
    assert tune["best/psnr"] > tune["best/mean_image_psnr"] + 6.0, tune
    assert tune["search/collapsed_trials"] < 4
    # The summary says the same, in words.
    assert "at temperature 0.7" in console and "SIR" in console and "psnr" in console


@pytest.mark.demo
def test_the_demo_console_is_readable(demo):
    _, console = demo
    lines = console.splitlines()
    assert len(lines) <= CONSOLE_BUDGET, "\n".join(lines)
    for noise in ("Traceback", "SIGSEGV", "TrainingReport(", "PlacementGroupCleaner", "Configuration for experiment",
                  "A new study created"):
        assert noise not in console, noise
    assert re.search(r"Demo finished in \d+ s \(", console)


@pytest.mark.demo
def test_the_readme_snippets_run_against_the_demo_store(demo):
    """Every Python snippet of the README that loads the demo's models runs as written, from the directory the demo
    ran in (their `sqlite:///runs/mlflow.db` is relative to it), in a fresh process."""
    home, _ = demo
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "models:/demo-" in b]
    assert len(blocks) >= 3
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    for block in blocks:
        out = subprocess.run([sys.executable, "-c", block], cwd=home, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, block + "\n" + out.stderr[-3000:]
    assert not (home / "mlflow.db").exists()  # no stray store beside runs/
