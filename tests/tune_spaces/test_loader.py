"""tune_spaces: every shipped space loads and fits the demo config; each kind of mistake is a SpaceError naming the
file and the line; the sections come from the config class passed in; the package imports nothing of the project
(nor torch, Ray or MLflow)."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tune_spaces
from pipelines.config import PipelineConfig, load_config
from tune_spaces import SpaceError
from vae.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", tune_spaces.shipped_spaces())
def test_every_shipped_space_loads_fits_the_demo_config_and_names_its_command(name):
    from ray.tune.search.sample import Domain

    path = tune_spaces.space_path(name)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# vaepipe tune ") and f"--space {name}" in first
    space = tune_spaces.load_space(name, PipelineConfig)
    assert space and all(key.startswith("gwae.") for key in space)
    tune_spaces.check_values(space, load_config(REPO / "configs" / "demo.yaml"))
    domains = tune_spaces.to_tune_space(space)
    assert set(domains) == set(space)
    assert all(isinstance(d, Domain) or list(d) == ["grid_search"] for d in domains.values())
    if any(p.type == "grid" for p in space.values()):  # Optuna cannot run a grid: the command must say random
        assert "tune.search=random" in first


def test_the_priors_space_is_a_grid_of_priors_with_everything_else_fixed():
    space = tune_spaces.load_space("gwae_priors", PipelineConfig)
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
    space = tune_spaces.load_space(str(path), PipelineConfig)
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
    with pytest.raises(SpaceError) as err:
        tune_spaces.load_space(str(path), PipelineConfig)
    assert f"{path}:{line}:" in str(err.value), str(err.value)
    assert message in str(err.value)


def test_an_empty_file_and_an_unknown_name_are_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# vaepipe tune configs/demo.yaml --space empty.yaml\n")
    with pytest.raises(SpaceError, match=f"{empty}:1: the file defines no parameters"):
        tune_spaces.load_space(str(empty), PipelineConfig)
    with pytest.raises(SpaceError, match="did you mean 'gwae_weights'"):
        tune_spaces.load_space("gwae_weight", PipelineConfig)


def test_a_value_the_config_refuses_is_caught_before_any_trial_with_its_line(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml")
    path = tmp_path / "space.yaml"
    path.write_text("# vaepipe tune configs/demo.yaml --space space.yaml\n"
                    "gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}\n"
                    "gwae.lambda_h: {type: uniform, low: -0.5, high: 0.5}\n")
    space = tune_spaces.load_space(str(path), PipelineConfig)  # well-formed: the range is fine for a float in general
    with pytest.raises(SpaceError, match=rf"{path}:3: gwae.lambda_h = -0.5 is refused by the config: .*>= 0"):
        tune_spaces.check_values(space, cfg)


def test_apply_validates_the_sampled_values_through_the_config():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    out = tune_spaces.apply(cfg, {"gwae.lambda_w": 3, "gwae.z_dim": 8.0, "gwae.prior": "gmp"})
    assert out.gwae.lambda_w == 3.0 and out.gwae.z_dim == 8 and isinstance(out.gwae.z_dim, int)
    assert out.gwae.prior == "gmp" and out.train == cfg.train
    with pytest.raises(ConfigError, match="gwae.num_components") as err:  # the config's own error, unwrapped
        tune_spaces.apply(cfg, {"gwae.prior": "gmp", "gwae.num_components": 1})
    assert not isinstance(err.value, SpaceError)


@pytest.mark.parametrize("case", ["control character", "not UTF-8"])
def test_a_file_that_is_not_yaml_text_is_refused_naming_the_line(tmp_path, case):
    path = tmp_path / "space.yaml"
    head = b"# vaepipe tune configs/demo.yaml --space space.yaml\ngwae.lambda_w: "
    path.write_bytes(head + (b"\x07\n" if case == "control character" else b"\xff\xfe\n"))
    with pytest.raises(SpaceError, match=rf"{path}:{2 if case == 'control character' else 1}: "):
        tune_spaces.load_space(str(path), PipelineConfig)


# A config that is not the project's: sections come from the class passed in, its validation raises a plain
# ValueError, and the annotations are strings (this module has `from __future__ import annotations`).
@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 0.1
    steps: int = 10
    kind: str = "sgd"

    def __post_init__(self):
        if self.lr > 1:
            raise ValueError(f"optim.lr: {self.lr} must be <= 1")


@dataclasses.dataclass(frozen=True)
class Toy:
    name: str = "toy"
    optim: Optim = dataclasses.field(default_factory=Optim)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Toy:
        return cls(name=data["name"], optim=Optim(**data["optim"]))


def test_sections_and_field_types_come_from_the_config_class_passed_in(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("optim.lr: {type: loguniform, low: 1e-3, high: 2}\n"
                    "optim.steps: {type: randint, low: 5, high: 20}\n"
                    "optim.kind: {type: choice, values: [sgd, adam]}\n")
    space = tune_spaces.load_space(path, Toy)
    assert list(space) == ["optim.lr", "optim.steps", "optim.kind"]
    out = tune_spaces.apply(Toy(), {"optim.lr": 0.5, "optim.kind": "adam"})
    assert out == Toy(optim=Optim(lr=0.5, kind="adam"))
    with pytest.raises(SpaceError, match=rf"{path}:1: optim.lr = 2.0 is refused by the config: optim.lr: 2.0 must "
                                         r"be <= 1"):
        tune_spaces.check_values(space, Toy())  # a plain ValueError from the config, wrapped with the file and line
    cases = {  # what the project's config would accept is refused here, and the other way round
        "gwae.lambda_w: {type: uniform, low: 0, high: 1}": "sections: optim",
        "name.x: {type: choice, values: [a]}": "sections: optim",  # a str field is not a section
        "optim.steps: {type: uniform, low: 1, high: 5}": "integer field",  # int from a string annotation
        "optim.kind: {type: uniform, low: 0, high: 1}": "not a number field",
        "optim.lrr: {type: uniform, low: 0, high: 1}": "did you mean 'optim.lr'",
    }
    for body, message in cases.items():
        path.write_text(body + "\n")
        with pytest.raises(SpaceError, match=rf"{path}:1: .*{message}"):
            tune_spaces.load_space(path, Toy)
    with pytest.raises(SpaceError, match="sections: optim"):
        tune_spaces.load_space("gwae_weights", Toy)  # a shipped space names PipelineConfig's sections


def test_a_config_class_without_sections_is_a_type_error():
    for bad in (dict, Toy(), Optim):  # not a class; not a dataclass; a dataclass with no dataclass-typed field
        with pytest.raises(TypeError, match="sections|dataclass"):
            tune_spaces.load_space("gwae_weights", bad)


def test_the_package_source_imports_nothing_of_the_project_anywhere():
    """Function bodies and TYPE_CHECKING blocks included: the subprocess test below only sees import time."""
    found = []
    for path in (REPO / "tune_spaces").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.name}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in ("pipelines", "vae", "torch", "mlflow")]
    assert found == []


def test_importing_and_using_tune_spaces_loads_nothing_of_the_project_nor_torch_ray_mlflow(tmp_path):
    space = tmp_path / "toy.yaml"
    space.write_text("optim.lr: {type: uniform, low: 0.01, high: 0.5}\n")
    code = textwrap.dedent(f"""\
        import dataclasses, sys
        import tune_spaces

        @dataclasses.dataclass
        class Optim:
            lr: float = 0.1

        @dataclasses.dataclass
        class Toy:
            optim: Optim = dataclasses.field(default_factory=Optim)
            def to_dict(self):
                return dataclasses.asdict(self)
            @classmethod
            def from_dict(cls, data):
                return cls(optim=Optim(**data["optim"]))

        space = tune_spaces.load_space({str(space)!r}, Toy)
        tune_spaces.check_values(space, Toy())
        assert tune_spaces.apply(Toy(), {{"optim.lr": 0.2}}).optim.lr == 0.2
        assert "gwae_weights" in tune_spaces.shipped_spaces()
        print(sorted(m for m in ("pipelines", "vae", "torch", "ray", "mlflow") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
