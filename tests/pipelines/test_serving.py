"""Registered models as services: both flavours in one model, the request codec, answers checked against the torch
model, a real `mlflow models serve` on loopback per model kind, dataset lineage and the model card."""
from __future__ import annotations

import base64
import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines import serving
from pipelines.tracking import cards, lineage
from pipelines.processes import free_port

REPO = Path(__file__).resolve().parents[2]
KINDS = ("nvae", "ncp", "gwae")
_SERVE_START_TIMEOUT_S = 120.0
_REQUEST_TIMEOUT_S = 60.0


def _tiny_module():
    spec = importlib.util.spec_from_file_location("_tiny_for_serving", REPO / "tests" / "vae" / "_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ codec (fast)


def test_png_codec_round_trips_gray_and_rgb_and_refuses_what_it_cannot_read():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(1, 16, 16), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(3, 8, 12), dtype=np.uint8)
    assert np.array_equal(serving.decode_png(serving.encode_png(gray), (1, 16, 16), 0), gray)
    assert np.array_equal(serving.decode_png(serving.encode_png(rgb), (3, 8, 12), 0), rgb)
    b64 = base64.b64encode(serving.encode_png(gray)).decode()  # what a JSON client sends
    assert np.array_equal(serving.decode_png(b64, (1, 16, 16), 0), gray)
    floats = torch.from_numpy(gray).float() / 255.0  # float images in [0, 1] encode to the same levels
    assert np.array_equal(serving.decode_png(serving.encode_png(floats), (1, 16, 16), 0), gray)
    with pytest.raises(serving.RequestError, match=r"row 3: the image is 16x16 pixels, the model takes 32x32"):
        serving.decode_png(serving.encode_png(gray), (1, 32, 32), 3)
    with pytest.raises(serving.RequestError, match="not a readable PNG"):
        serving.decode_png(b"not a png", (1, 16, 16), 0)
    with pytest.raises(serving.RequestError, match="needs 'image'"):
        serving.decode_png(b"", (1, 16, 16), 0)


def test_signature_declares_inputs_outputs_and_params_with_defaults():
    sig = serving.request_signature()
    assert sig.inputs.input_names() == ["request", "image"]
    assert {c.name for c in sig.outputs.inputs} >= {"input_row", "request", "image", "latents", "bits_per_dim"}
    defaults = {p.name: p.default for p in sig.params.params}
    assert defaults == serving.PARAM_DEFAULTS


# ------------------------------------------------------------------------------------------------ tiny models


def _tiny_models(x: torch.Tensor) -> dict[str, torch.nn.Module]:
    from vae.gwae import GWAE, GWAEConfig
    from vae.ncp import NCPConfig, NCPVAE, classifier_for

    nvae = _tiny_module().train_tiny(x, 256, 4, seed=0)  # a few steps: the answers are compared, not judged
    ncp_cfg = NCPConfig(classifier_channels=8, classifier_blocks=1, sir_proposals=4, langevin_steps=3)
    torch.manual_seed(1)
    ncp = NCPVAE(nvae, [classifier_for(nvae, k, ncp_cfg) for k in range(nvae.num_groups)], ncp_cfg)
    torch.manual_seed(2)
    gwae = GWAE(GWAEConfig.for_images((1, 16, 16), z_dim=4, base_channels=8, hidden_dim=32, num_components=3)).eval()
    return {"nvae": nvae.eval(), "ncp": ncp.eval(), "gwae": gwae}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_template_db):
    """The three model kinds logged the way the stages log them (Tracker.log_pytorch_model) and registered as
    serving-<kind> in one sqlite store; also what MLflow logged while doing it."""
    import shutil

    from pipelines.config import TrackingConfig
    from pipelines.tracking import Tracker

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serving_store")
    shutil.copyfile(mlflow_template_db, root / "mlflow.db")
    cfg = TrackingConfig(workdir=str(root), tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                         artifact_location=str(root / "mlartifacts"), connect_timeout_s=10.0)
    tracker = Tracker.connect(cfg)
    x, _ = _tiny_module().digits_16()
    models = _tiny_models(x)
    exp = tracker.experiment_id("serving")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logging.getLogger("mlflow").addHandler(handler)
    uris, run_ids = {}, {}
    try:
        for kind, model in models.items():
            run_id = tracker.client.create_run(exp, run_name=kind).info.run_id
            example = (x[:1] * 255).round().to(torch.uint8).numpy()
            logged = tracker.log_pytorch_model(run_id, model, name="model", input_example=example)
            version = tracker.register_model(logged, f"serving-{kind}")
            tracker.end_run(run_id)
            uris[kind], run_ids[kind] = f"models:/serving-{kind}/{version}", run_id
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    yield {"tracker": tracker, "cfg": cfg, "models": models, "uris": uris, "run_ids": run_ids, "x": x,
           "warnings": [r.getMessage() for r in records], "root": root}


def _frame(requests: list[str], images: list[bytes | None]) -> pd.DataFrame:
    return pd.DataFrame({"request": requests, "image": images})


# ------------------------------------------------------------------------------------------------ in-process


def test_logging_validates_the_example_and_writes_both_flavours(registry):
    import mlflow
    from mlflow.models import Model

    assert not [w for w in registry["warnings"] if "serving input example" in w], registry["warnings"]
    for kind, uri in registry["uris"].items():
        info = Model.load(mlflow.artifacts.download_artifacts(uri, tracking_uri=registry["tracker"].tracking_uri))
        assert set(info.flavors) >= {"pytorch", "python_function"}, info.flavors
        assert info.flavors["python_function"]["loader_module"] == serving.LOADER_MODULE
        assert info.signature.inputs is not None and info.signature.outputs is not None
        assert info.signature.params is not None
        assert info.load_input_example is not None
        # the pytorch flavour still gives our own class, which samples with nothing else set up
        loaded = mlflow.pytorch.load_model(uri, map_location="cpu")
        assert type(loaded).__name__ == {"nvae": "NVAE", "ncp": "NCPVAE", "gwae": "GWAE"}[kind]


def test_a_model_serves_with_only_its_own_code(registry, tmp_path):
    """vaepipe's `pipelines` unimportable: the pyfunc loader and `vae` come from the model's code directory."""
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        sys.modules["pipelines"] = None  # any import of vaepipe's pipelines package now fails
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({registry["tracker"].tracking_uri!r})
        served = mlflow.pyfunc.load_model({registry["uris"]["nvae"]!r})
        out = served.predict(pd.DataFrame({{"request": ["sample"]}}), params={{"n": 2}})
        import vae, vaepipe_serving
        print(len(out), vae.__file__, vaepipe_serving.__file__)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    count, vae_file, loader_file = out.stdout.split()[-3:]
    assert count == "2"
    assert Path(vae_file).parts[-3:] == ("code", "vae", "__init__.py"), vae_file
    assert Path(loader_file).parts[-2:] == ("code", "vaepipe_serving.py"), loader_file


def test_pyfunc_answers_match_the_torch_model(registry):
    import mlflow

    from vae.metrics import importance_weighted_nll

    x = registry["x"][:3]
    pngs = [serving.encode_png(img) for img in x]
    levels = torch.from_numpy(np.stack([serving.decode_png(p, (1, 16, 16), 0) for p in pngs])).float() / 255
    for kind, uri in registry["uris"].items():
        model = registry["models"][kind]
        vae_model = model.vae if kind == "ncp" else model
        served = mlflow.pyfunc.load_model(uri)

        # sample: n images per row, in [0, 1] as PNG, repeatable with a seed; what the torch model draws
        out = served.predict(_frame(["sample"], [None]), params={"n": 5, "seed": 7, "mode": "mean"})
        assert list(out["input_row"]) == [0] * 5 and set(out["request"]) == {"sample"}
        again = served.predict(_frame(["sample"], [None]), params={"n": 5, "seed": 7, "mode": "mean"})
        assert list(out["image"]) == list(again["image"])
        torch.manual_seed(7)
        with torch.no_grad() if kind != "ncp" else torch.enable_grad():
            direct = (model.sample(5) if kind == "gwae" else
                      model.sample(5, mode="mean") if kind == "nvae" else model.sample(5, method="sir", mode="mean"))
        assert list(out["image"]) == [serving.encode_png(img) for img in direct]

        # reconstruct and encode: deterministic for mean reconstructions and posterior means
        rec = served.predict(_frame(["reconstruct"] * 3, pngs), params={"mode": "mean", "seed": 5})
        torch.manual_seed(5)  # an NVAE decodes one z ~ q(z|x)
        expected = vae_model.reconstruct(levels) if kind == "gwae" else vae_model.reconstruct(levels, mode="mean")
        got = torch.from_numpy(np.stack([serving.decode_png(p, (1, 16, 16), 0) for p in rec["image"]])).float()
        assert (got / 255 - expected).abs().max().item() <= 0.5 / 255 + 1e-6
        enc = served.predict(_frame(["encode"] * 3, pngs))
        with torch.no_grad():
            means = [vae_model.encode(levels)[0]] if kind == "gwae" else vae_model.posterior_means(levels)
        assert len(enc) == 3 * len(means) and sorted(set(enc["group"])) == list(range(len(means)))
        for _, row in enc.iterrows():
            z = means[row["group"]][row["input_row"]]
            assert row["latent_shape"] == list(z.shape)
            np.testing.assert_allclose(row["latents"], z.detach().flatten().double().numpy(), rtol=1e-5, atol=1e-6)

        # log_likelihood: the importance-weighted bound of the (base) NVAE with the same draws
        if kind == "gwae":
            with pytest.raises(Exception, match="GWAE has no likelihood"):
                served.predict(_frame(["log_likelihood"], pngs[:1]))
            continue
        ll = served.predict(_frame(["log_likelihood"] * 3, pngs), params={"k": 16, "seed": 3})
        torch.manual_seed(3)
        if kind == "ncp" and hasattr(model, "importance_weighted_nll"):  # the NCP prior's own bound, image by image
            with torch.no_grad():
                nll = torch.tensor([model.importance_weighted_nll([levels[j:j + 1]], k=16)["nll"] for j in range(3)],
                                   dtype=torch.float64)
            assert set(ll["estimator"]) == {"importance-weighted bound, k=16, NCP prior (Monte Carlo normalisers)"}
        else:
            nll = importance_weighted_nll(vae_model, levels, k=16)
        np.testing.assert_allclose(ll["nll_nats"].astype(float), nll.numpy(), rtol=1e-6)
        dims = getattr(vae_model, "scored_dims", 256)
        np.testing.assert_allclose(ll["bits_per_dim"].astype(float), nll.numpy() / (dims * math.log(2)), rtol=1e-6)
        assert np.all(ll["bits_per_dim"].astype(float) > 0)


def test_mixed_requests_answer_row_by_row_and_bad_requests_say_why(registry):
    import mlflow

    served = mlflow.pyfunc.load_model(registry["uris"]["ncp"])
    png = serving.encode_png(registry["x"][0])
    out = served.predict(_frame(["encode", "sample", "reconstruct"], [png, b"", png]),
                         params={"n": 2, "method": "langevin", "seed": 0})
    assert list(out["request"]) == ["encode"] * 4 + ["sample"] * 2 + ["reconstruct"]
    assert list(out["input_row"]) == [0] * 4 + [1, 1, 2]
    for method in ("sir", "base", "langevin"):
        assert len(served.predict(_frame(["sample"], [None]), params={"n": 2, "method": method})) == 2
    nvae = mlflow.pyfunc.load_model(registry["uris"]["nvae"])
    with pytest.raises(Exception, match="method='sir' is for NCP-VAE models"):
        nvae.predict(_frame(["sample"], [None]), params={"method": "sir"})
    with pytest.raises(Exception, match="request 'generate' is not one of sample, reconstruct"):
        nvae.predict(_frame(["generate"], [None]))
    with pytest.raises(Exception, match="params.n=0 must be between 1"):
        nvae.predict(_frame(["sample"], [None]), params={"n": 0})
    with pytest.raises(Exception, match="row 0: this request needs 'image'"):
        nvae.predict(_frame(["reconstruct"], [None]))
    gwae = mlflow.pyfunc.load_model(registry["uris"]["gwae"])
    with pytest.raises(Exception, match="GWAE samples from its learned prior, which has no temperature"):
        gwae.predict(_frame(["sample"], [None]), params={"temperature": 0.5})


# ------------------------------------------------------------------------------------------------ lineage and card


def test_dataset_inputs_name_source_digest_split_and_size(registry, digits16):
    from pipelines.data import read_manifest

    tracker = registry["tracker"]
    run_id = tracker.client.create_run(tracker.experiment_id("serving")).info.run_id
    lineage.log_dataset_inputs(tracker, run_id, digits16, ("train", "val", "test"))
    manifest = read_manifest(digits16)
    inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    by_split = {next(t.value for t in i.tags if t.key == "vaepipe.split"): i for i in inputs}
    assert set(by_split) == {s for s in ("train", "val", "test") if manifest.splits.get(s)}
    digests = set()
    for split, item in by_split.items():
        ds = item.dataset
        context = next(t.value for t in item.tags if t.key == "mlflow.data.context")
        assert context == {"train": "training", "val": "validation", "test": "testing"}[split]
        assert ds.name == f"{manifest.name}-{split}"
        assert json.loads(ds.source)["uri"].rstrip("/").endswith(f"digits16/{split}")
        profile = json.loads(ds.profile)
        assert profile["num_examples"] == manifest.splits[split] and profile["split"] == split
        assert profile["content_sha256"] == manifest.sha256
        import hashlib
        assert profile["manifest_sha256"] == hashlib.sha256((Path(digits16) / "dataset.json").read_bytes()).hexdigest()
        digests.add(ds.digest)
    assert len(digests) == len(by_split)  # each split's shards give it its own digest


def test_model_card_and_promotion_reason(registry, digits16):
    from pipelines.config import load_config
    from pipelines.registry import promote

    tracker = registry["tracker"]
    cfg = load_config(REPO / "tests" / "base.yaml", [f"data.path={digits16}", f"tune.data.path={digits16}"])
    name = "serving-nvae"
    v1 = registry["uris"]["nvae"].rsplit("/", 1)[1]
    run1 = registry["run_ids"]["nvae"]
    tracker.log_metrics(run1, {"val/bpd": 2.5, "val/nelbo": 310.0}, step=0)
    tracker.set_tags(run1, {"vaepipe.pipeline_run": "PIPE1", "vaepipe.source_model": "none",
                            "vaepipe.dataset": "digits16@abc"})
    card = cards.describe_version(tracker, name, v1, cfg, run1)
    stored = tracker.client.get_model_version(name, v1).description
    assert stored == card
    assert lineage.config_hash(cfg) in card and "`vaepipe train`" in card
    from pipelines.data import read_manifest
    assert read_manifest(digits16).sha256 in card
    assert "| `val/bpd` | val | 2.5 |" in card and "PIPE1" in card
    assert f'mlflow.pytorch.load_model("models:/{name}/{v1}"' in card
    assert f"mlflow models serve -m models:/{name}/{v1} --env-manager local" in card

    for kind, stage, what in (("ncp", "ncp", "An NCP-VAE"), ("gwae", "tune", "The best GWAE")):
        other = cards.describe_version(tracker, f"serving-{kind}", registry["uris"][kind].rsplit("/", 1)[1], cfg,
                                         registry["run_ids"][kind])
        assert other.splitlines()[2].startswith(what) and f"`vaepipe {stage}`" in other, other[:400]

    promote(tracker, name, version=v1)
    # a second, better version of the same model takes over; its card says against what
    run2 = tracker.client.create_run(tracker.experiment_id("serving")).info.run_id
    tracker.log_metrics(run2, {"val/bpd": 2.1}, step=0)
    source = tracker.client.get_model_version(name, v1).source
    v2 = tracker.client.create_model_version(name, source, run_id=run2).version
    tracker.set_tags(run2, {"vaepipe.source_model": f"models:/{name}@champion"})  # aliases move: the card pins it
    assert f"models:/{name}@champion (version {v1} at registration)" in cards.describe_version(
        tracker, name, v2, cfg, run2)
    promote(tracker, name, version=str(v2))
    first = tracker.client.get_model_version(name, v1).description
    second = tracker.client.get_model_version(name, str(v2)).description
    assert "Champion since" in first and "first champion" in first
    assert f"`val/bpd` = 2.1 against 2.5 of v{v1} (min is better: better)" in second
    assert second.startswith(f"# {name} v{v2}")


# ------------------------------------------------------------------------------------------------ real server


def _post(url: str, body: dict, timeout: float = _REQUEST_TIMEOUT_S) -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _ping(base: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{base}/ping", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serve(model_uri: str, tracking_uri: str, log_path: Path):
    """Start `mlflow models serve` on a free loopback port; returns (process, base URL) once /ping answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # the server execs `uvicorn` by name: this interpreter's scripts come first on PATH
    env.update(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri, "--env-manager",
           "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _SERVE_START_TIMEOUT_S
    while not _ping(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            log = log_path.read_text(errors="replace")[-4000:]
            pytest.fail(f"`{' '.join(cmd)}` did not answer /ping; its log:\n{log}")
        time.sleep(0.5)
    return proc, base


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's own process group (uvicorn and its workers) and wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_mlflow_models_serve_answers_every_request_type(registry, kind, tmp_path):
    import mlflow

    uri = registry["uris"][kind]
    proc, base = serve(uri, registry["tracker"].tracking_uri, tmp_path / "serve.log")
    try:
        x = registry["x"][:2]
        b64 = [base64.b64encode(serving.encode_png(img)).decode() for img in x]
        url = f"{base}/invocations"
        served = mlflow.pyfunc.load_model(uri)
        local_png = [serving.encode_png(img) for img in x]

        status, body = _post(url, {"dataframe_records": [{"request": "sample"}],
                                   "params": {"n": 3, "seed": 0, **({"method": "sir"} if kind == "ncp" else {})}})
        assert status == 200, body
        images = serving.decode_images([a["image"] for a in body["predictions"]])
        assert len(images) == 3 and all(img.shape == (16, 16) and img.dtype == np.uint8 for img in images)
        if kind != "gwae":
            status, body = _post(url, {"dataframe_records": [{"request": "sample"}],
                                       "params": {"n": 2, "temperature": 0.7}})
            assert status == 200 and len(body["predictions"]) == 2, body

        status, body = _post(url, {"dataframe_split": {"columns": ["request", "image"],
                                                       "data": [["reconstruct", b64[0]], ["reconstruct", b64[1]]]},
                                   "params": {"mode": "mean", "seed": 4}})
        assert status == 200, body
        remote = serving.decode_images([a["image"] for a in body["predictions"]])
        local = served.predict(_frame(["reconstruct"] * 2, local_png), params={"mode": "mean", "seed": 4})
        for r, l in zip(remote, serving.decode_images(list(local["image"]))):
            assert np.abs(r.astype(int) - l.astype(int)).max() <= 1  # same model, another process

        status, body = _post(url, {"dataframe_records": [{"request": "encode", "image": b64[0]}]})
        assert status == 200, body
        local = served.predict(_frame(["encode"], local_png[:1]))
        assert [a["group"] for a in body["predictions"]] == list(local["group"])
        for a, (_, row) in zip(body["predictions"], local.iterrows()):
            np.testing.assert_allclose(a["latents"], row["latents"], rtol=1e-4, atol=1e-5)

        status, body = _post(url, {"dataframe_records": [{"request": "log_likelihood", "image": b64[0]}],
                                   "params": {"k": 8, "seed": 1}})
        if kind == "gwae":
            assert status == 400 and "GWAE has no likelihood" in body["message"], body
        else:
            assert status == 200, body
            local = served.predict(_frame(["log_likelihood"], local_png[:1]), params={"k": 8, "seed": 1})
            assert body["predictions"][0]["bits_per_dim"] == pytest.approx(float(local["bits_per_dim"][0]), rel=1e-3)

        # a wrong request is answered with 400 and the reason, and the server keeps serving
        status, body = _post(url, {"dataframe_records": [{"request": "reconstruct",
                                                          "image": base64.b64encode(serving.encode_png(
                                                              np.zeros((1, 8, 8), np.uint8))).decode()}]})
        assert status == 400 and "the model takes 16x16" in body["message"], body
        status, body = _post(url, {"dataframe_records": [{"request": "sample"}], "params": {"n": 1}})
        assert status == 200, body
    finally:
        stop(proc)
    assert proc.poll() is not None
