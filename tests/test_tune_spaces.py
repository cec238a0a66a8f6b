"""tune_spaces: every shipped space loads and fits the demo config; each kind of mistake is refused naming the file
and the line; the package imports without torch or Ray."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tune_spaces
from pipelines.config import load_config
from vae.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", tune_spaces.shipped_spaces())
def test_every_shipped_space_loads_fits_the_demo_config_and_names_its_command(name):
    from ray.tune.search.sample import Domain

    path = tune_spaces.space_path(name)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# vaepipe tune ") and f"--space {name}" in first
    space = tune_spaces.load_space(name)
    assert space and all(key.startswith("gwae.") for key in space)
    tune_spaces.check_values(space, load_config(REPO / "configs" / "demo.yaml"))
    domains = tune_spaces.to_tune_space(space)
    assert set(domains) == set(space)
    assert all(isinstance(d, Domain) or list(d) == ["grid_search"] for d in domains.values())
    if any(p.type == "grid" for p in space.values()):  # Optuna cannot run a grid: the command must say random
        assert "tune.search=random" in first


def test_the_priors_space_is_a_grid_of_priors_with_everything_else_fixed():
    space = tune_spaces.load_space("gwae_priors")
    assert list(space) == ["gwae.prior"] and space["gwae.prior"].type == "grid"
    assert {"fnp", "gaussian", "uniform"} <= set(space["gwae.prior"].values)


def test_shipped_names_cover_the_weights_and_priors_spaces():
    assert {"gwae_weights", "gwae_priors"} <= set(tune_spaces.shipped_spaces())


def test_a_path_loads_and_every_type_maps_onto_its_ray_domain(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    path = tmp_path / "all.yaml"
    path.write_text(textwrap.dedent("""\
        # vaepipe tune configs/demo.yaml --space all.yaml
        gwae.lambda_w: {type: loguniform, low: 1e-2, high: 10}
        gwae.lambda_h: {type: uniform, low: 0, high: 0.1}
        gwae.z_dim: {type: quniform, low: 4, high: 16, q: 4}
        gwae.critic_steps: {type: randint, low: 1, high: 6}
        gwae.prior: {type: choice, values: [np, fnp, gmp]}
        gwae.num_components: {type: grid, values: [2, 4]}
    """))
    space = tune_spaces.load_space(str(path))
    assert list(space) == ["gwae.lambda_w", "gwae.lambda_h", "gwae.z_dim", "gwae.critic_steps", "gwae.prior",
                           "gwae.num_components"]
    assert space["gwae.lambda_w"].low == pytest.approx(1e-2)  # "1e-2" is a string to YAML 1.1
    assert space["gwae.prior"].where == f"{path}:6"
    assert space["gwae.z_dim"].candidates() == [4, 16]
    assert space["gwae.critic_steps"].candidates() == [1, 5]  # randint's high is exclusive, as in Ray
    domains = tune_spaces.to_tune_space(space)
    assert isinstance(domains["gwae.lambda_w"], Float) and isinstance(domains["gwae.critic_steps"], Integer)
    assert isinstance(domains["gwae.prior"], Categorical)
    assert domains["gwae.num_components"] == {"grid_search": [2, 4]}
    tune_spaces.check_values(space, load_config(REPO / "configs" / "demo.yaml"))


BAD = {
    "unknown field, closest suggested": ("gwae.lambda_v: {type: uniform, low: 0, high: 1}", 2, "gwae.lambda_w"),
    "unknown section": ("gwea.lambda_w: {type: uniform, low: 0, high: 1}", 2, "did you mean 'gwae'"),
    "not section.field": ("lambda_w: {type: uniform, low: 0, high: 1}", 2, "section.field"),
    "low >= high": ("gwae.lambda_w:\n  type: uniform\n  low: 2\n  high: 1", 4, "low (2) must be below high (1)"),
    "non-positive loguniform": ("gwae.lambda_h: {type: loguniform, low: 0, high: 1}", 2, "loguniform needs low > 0"),
    "unknown type": ("gwae.lambda_w:\n  type: log_uniform\n  low: 0.1\n  high: 1", 3, "did you mean 'loguniform'"),
    "empty choice": ("gwae.prior:\n  type: choice\n  values: []", 4, "non-empty list"),
    "unknown option": ("gwae.lambda_w: {type: uniform, lo: 0, high: 1}", 2, "did you mean 'low'"),
    "missing option": ("gwae.lambda_w: {type: quniform, low: 0, high: 1}", 2, "'q' is missing"),
    "continuous on an int field": ("gwae.z_dim: {type: uniform, low: 2, high: 8}", 2, "randint or quniform"),
    "numbers on a choice field": ("gwae.prior: {type: uniform, low: 0, high: 1}", 2, "choice or grid"),
    "non-integer randint": ("gwae.critic_steps: {type: randint, low: 1.5, high: 4}", 2, "must be integers"),
    "repeated key": ("gwae.lambda_w: {type: uniform, low: 0, high: 1}\ngwae.lambda_w: {type: uniform, low: 0, "
                     "high: 2}", 3, "repeated (first at line 2)"),
    "invalid YAML": ("gwae.lambda_w: {type: uniform, low: 0\ngwae.lambda_d: 1", 3, "not valid YAML"),
    "not a mapping": ("gwae.lambda_w: [0.1, 1]", 2, "must be a mapping"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_mistakes_are_refused_naming_the_file_and_the_line(tmp_path, case):
    body, line, message = BAD[case]
    path = tmp_path / "space.yaml"
    path.write_text("# vaepipe tune configs/demo.yaml --space space.yaml\n" + body + "\n")
    with pytest.raises(ConfigError) as err:
        tune_spaces.load_space(str(path))
    assert f"{path}:{line}:" in str(err.value), str(err.value)
    assert message in str(err.value)


def test_an_empty_file_and_an_unknown_name_are_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# vaepipe tune configs/demo.yaml --space empty.yaml\n")
    with pytest.raises(ConfigError, match=f"{empty}:1: the file defines no parameters"):
        tune_spaces.load_space(str(empty))
    with pytest.raises(ConfigError, match="did you mean 'gwae_weights'"):
        tune_spaces.load_space("gwae_weight")


def test_a_value_the_config_refuses_is_caught_before_any_trial_with_its_line(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml")
    path = tmp_path / "space.yaml"
    path.write_text("# vaepipe tune configs/demo.yaml --space space.yaml\n"
                    "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n"
                    "gwae.lambda_h: {type: uniform, low: -0.5, high: 0.5}\n")
    space = tune_spaces.load_space(str(path))  # well-formed: the range is fine for a float in general
    with pytest.raises(ConfigError, match=rf"{path}:3: gwae.lambda_h = -0.5 is refused by the config: .*>= 0"):
        tune_spaces.check_values(space, cfg)


def test_apply_validates_the_sampled_values_through_the_config():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    out = tune_spaces.apply(cfg, {"gwae.lambda_w": 3, "gwae.z_dim": 8.0, "gwae.prior": "gmp"})
    assert out.gwae.lambda_w == 3.0 and out.gwae.z_dim == 8 and isinstance(out.gwae.z_dim, int)
    assert out.gwae.prior == "gmp" and out.train == cfg.train
    with pytest.raises(ConfigError, match="gwae.num_components"):
        tune_spaces.apply(cfg, {"gwae.prior": "gmp", "gwae.num_components": 1})


def test_importing_tune_spaces_pulls_in_neither_torch_nor_ray():
    code = "import sys, tune_spaces; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
