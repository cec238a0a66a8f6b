"""Registered vaepipe models as services: the pyfunc flavour, its request codec, dataset lineage and the model card.

Every registered model (`<name>-nvae`, `<name>-ncp`, `<name>-gwae`) is one MLflow model directory with two flavours:

    pytorch          mlflow.pytorch.load_model(uri)  -> our own NVAE / NCPVAE / GWAE object (pickle + code paths)
    python_function  mlflow.pyfunc.load_model(uri)   -> a GenerativeModelServer; `mlflow models serve` serves it

The request form (the model's signature holds it: inputs, outputs and params):

    input   a DataFrame, one row per request
              request  string   "sample" | "reconstruct" | "encode" | "log_likelihood"
              image    binary   a PNG of one image of the model's size (gray for 1 channel, RGB for 3); empty
                                (or absent) for "sample". Over REST, binary values travel base64-encoded, and a
                                batch that mixes "sample" rows with image rows gives the sample rows "".
    params  n (long, 1)             images per "sample" row
            temperature (double, 1) prior temperature of "sample" (NVAE, NCP)
            method (string, "")     NCP sampling: "sir" (the default), "langevin" or "base"
            mode (string, "sample") "sample" draws from p(x|z), "mean" returns its mean (sample, reconstruct)
            k (long, 100)           importance samples of "log_likelihood"
            seed (long, -1)         seed the draw (>= 0) for repeatable answers
    output  a DataFrame, one row per answer; `input_row` says which request row it answers
              sample, reconstruct  image (binary PNG)
              encode               group, latent_shape, latents: one row per latent group (NVAE, NCP: the
                                   posterior means, top group first; GWAE: one group, the encoder mean)
              log_likelihood       nll_nats, bits_per_dim, estimator: the importance-weighted bound with k draws
                                   (NCP: under its own prior, normalisers by Monte Carlo); a GWAE has no likelihood

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_records": [{"request": "sample"}], "params": {"n": 4, "temperature": 0.8}}'

At logging time this file is also copied into the model's code directory as `vaepipe_serving.py`, the pyfunc loader
module, so a model serves with nothing of vaepipe installed; everything the served path needs (numpy, torch, PIL,
mlflow) is imported at the top, and the rest of vaepipe only inside the functions that run in the pipeline.
"""
from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

REQUESTS = ("sample", "reconstruct", "encode", "log_likelihood")
KINDS = {"NVAE": "nvae", "NCPVAE": "ncp", "GWAE": "gwae"}
LOADER_MODULE = "vaepipe_serving"  # the name this file has inside a logged model's code directory
PARAM_DEFAULTS: dict[str, Any] = {"n": 1, "temperature": 1.0, "method": "", "mode": "sample", "k": 100, "seed": -1}
MAX_SAMPLES = 1024  # per request row: a bound on one call's memory and time
MAX_K = 10000


class RequestError(MlflowException):
    """A request the model cannot answer as asked; the scoring server returns it as HTTP 400 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


# ---------------------------------------------------------------------------------------------------- signature


def request_signature():
    """The signature every vaepipe model is logged with: the request frame, the answer frame and the params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec("string", "request"), ColSpec("binary", "image", required=False)])
    outputs = Schema([
        ColSpec("long", "input_row"),
        ColSpec("string", "request"),
        ColSpec("binary", "image", required=False),
        ColSpec("long", "group", required=False),
        ColSpec(Array("long"), "latent_shape", required=False),
        ColSpec(Array("double"), "latents", required=False),
        ColSpec("double", "nll_nats", required=False),
        ColSpec("double", "bits_per_dim", required=False),
        ColSpec("string", "estimator", required=False),
    ])
    types = {int: "long", float: "double", str: "string"}
    params = ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in PARAM_DEFAULTS.items()])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def request_example(image_shape: Sequence[int], image: np.ndarray | None = None) -> tuple[pd.DataFrame, dict]:
    """An input example that exercises two request types: a 'sample' row and a 'reconstruct' row, with params."""
    if image is None:
        c, h, w = image_shape
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.broadcast_to(((xx + yy) * 255 // max(1, h + w - 2)).astype(np.uint8), (c, h, w))
    frame = pd.DataFrame({"request": ["sample", "reconstruct"], "image": [b"", encode_png(image)]})
    return frame, {"n": 2, "temperature": 1.0, "seed": 0}


# ---------------------------------------------------------------------------------------------------- codec


def encode_png(image: Any) -> bytes:
    """A (C, H, W) or (H, W) image, uint8 or float in [0, 1] (numpy or torch), as PNG bytes."""
    from PIL import Image

    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: Any, image_shape: Sequence[int], row: int) -> np.ndarray:
    """PNG bytes (or a base64 string of them) -> a (C, H, W) uint8 array of the model's shape, or a RequestError."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = image_shape
    if isinstance(data, str):
        try:
            data = base64.b64decode(data)
        except ValueError:
            raise RequestError(f"row {row}: 'image' is a string but not base64; send a base64-encoded PNG") from None
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RequestError(f"row {row}: this request needs 'image', a PNG of {h}x{w} pixels ({_channels(c)})")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(f"row {row}: 'image' is not a readable PNG ({e}); send PNG bytes, base64-encoded in JSON")
    if img.size != (w, h):
        raise RequestError(f"row {row}: the image is {img.size[1]}x{img.size[0]} pixels, the model takes {h}x{w}; "
                           f"resize it to {h}x{w} first")
    arr = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    return arr[None] if c == 1 else np.transpose(arr, (2, 0, 1))


def _channels(c: int) -> str:
    return "grayscale" if c == 1 else "RGB"


def decode_images(b64_or_bytes: Sequence[Any]) -> list[np.ndarray]:
    """Answer images (PNG bytes or base64 strings, as in a REST response) as (H, W) or (H, W, 3) uint8 arrays."""
    from PIL import Image

    out = []
    for item in b64_or_bytes:
        raw = base64.b64decode(item) if isinstance(item, str) else bytes(item)
        out.append(np.asarray(Image.open(io.BytesIO(raw))))
    return out


# ---------------------------------------------------------------------------------------------------- the service


class GenerativeModelServer:
    """The pyfunc face of an NVAE, NCP-VAE or GWAE: answers request frames (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        kind = KINDS.get(type(model).__name__)
        if kind is None:
            raise TypeError(f"GenerativeModelServer serves NVAE, NCPVAE and GWAE models, not {type(model).__name__}")
        self.kind = kind
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vae = model.vae if kind == "ncp" else model  # the NVAE that encodes and scores (NCP: the frozen base)
        cfg = getattr(self.vae, "cfg", None) or getattr(self.vae, "config")
        self.image_shape = tuple(int(v) for v in cfg.image_shape)

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        frame = _as_frame(model_input)
        p = self._params(params)
        if p["seed"] >= 0:
            torch.manual_seed(p["seed"])
        answers: list[dict[str, Any]] = []
        by_request: dict[str, list[int]] = {}
        for i, request in enumerate(frame["request"].tolist()):
            if request not in REQUESTS:
                raise RequestError(f"row {i}: request {request!r} is not one of {', '.join(REQUESTS)}")
            by_request.setdefault(request, []).append(i)
        for request, rows in by_request.items():
            if request == "sample":
                for i in rows:
                    answers += [{"input_row": i, "request": request, "image": encode_png(x)}
                                for x in self._sample(p)]
                continue
            images = frame["image"] if "image" in frame.columns else pd.Series([None] * len(frame))
            x = torch.from_numpy(np.stack([decode_png(images.iloc[i], self.image_shape, i) for i in rows]))
            x = x.to(self.device, torch.float32) / 255.0
            answers += getattr(self, f"_{request}")(x, rows, p)
        answers.sort(key=lambda a: a["input_row"])  # stable: a request's answers keep their order
        return _answer_frame(answers)

    def _params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        p = {**PARAM_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        unknown = sorted(set(p) - set(PARAM_DEFAULTS))
        if unknown:
            raise RequestError(f"unknown params {unknown}; the model takes {', '.join(PARAM_DEFAULTS)}")
        try:
            p = {k: type(PARAM_DEFAULTS[k])(v) for k, v in p.items()}
        except (TypeError, ValueError):
            raise RequestError(f"params {dict(params or {})} do not fit their types "
                               f"(n, k, seed: integers; temperature: a number; method, mode: strings)") from None
        if not 1 <= p["n"] <= MAX_SAMPLES:
            raise RequestError(f"params.n={p['n']} must be between 1 and {MAX_SAMPLES} (images per 'sample' row)")
        if not 1 <= p["k"] <= MAX_K:
            raise RequestError(f"params.k={p['k']} must be between 1 and {MAX_K} (importance samples)")
        if not (math.isfinite(p["temperature"]) and p["temperature"] >= 0):
            raise RequestError(f"params.temperature={p['temperature']} must be >= 0 (1 is the model; 0.6-0.9 typical)")
        if p["mode"] not in ("sample", "mean"):
            raise RequestError(f"params.mode={p['mode']!r} must be 'sample' (draw from p(x|z)) or 'mean'")
        if self.kind == "ncp":
            p["method"] = p["method"] or "sir"
            if p["method"] not in ("sir", "langevin", "base"):
                raise RequestError(f"params.method={p['method']!r} must be 'sir', 'langevin' or 'base' (NCP sampling)")
        elif p["method"] not in ("", "base"):
            raise RequestError(f"params.method={p['method']!r} is for NCP-VAE models (models:/<name>-ncp@...); this "
                               f"{self.kind.upper()} samples from its own prior: leave method out")
        if self.kind == "gwae" and p["temperature"] != 1.0:
            raise RequestError("params.temperature: a GWAE samples from its learned prior, which has no temperature; "
                               "leave temperature out (or 1.0)")
        return p

    def _sample(self, p: dict[str, Any]) -> torch.Tensor:
        if self.kind == "ncp":
            with torch.no_grad() if p["method"] != "langevin" else torch.enable_grad():
                return self.model.sample(p["n"], method=p["method"], temperature=p["temperature"], mode=p["mode"])
        if self.kind == "gwae":
            return self.model.sample(p["n"])
        return self.model.sample(p["n"], temperature=p["temperature"], mode=p["mode"])

    def _reconstruct(self, x: torch.Tensor, rows: list[int], p: dict[str, Any]) -> list[dict[str, Any]]:
        x_hat = self.vae.reconstruct(x) if self.kind == "gwae" else self.vae.reconstruct(x, mode=p["mode"])
        return [{"input_row": i, "request": "reconstruct", "image": encode_png(img)} for i, img in zip(rows, x_hat)]

    def _encode(self, x: torch.Tensor, rows: list[int], p: dict[str, Any]) -> list[dict[str, Any]]:
        with torch.no_grad():
            groups = [self.vae.encode(x)[0]] if self.kind == "gwae" else self.vae.posterior_means(x)
        out = []
        for j, i in enumerate(rows):
            for g, z in enumerate(groups):
                out.append({"input_row": i, "request": "encode", "group": g, "latent_shape": list(z.shape[1:]),
                            "latents": z[j].flatten().double().cpu().tolist()})
        return out

    def _log_likelihood(self, x: torch.Tensor, rows: list[int], p: dict[str, Any]) -> list[dict[str, Any]]:
        from vae.metrics import bits_per_dim, importance_weighted_nll

        if self.kind == "gwae":
            raise RequestError("log_likelihood: a GWAE has no likelihood (it is fitted with a Gromov-Wasserstein "
                               "objective, not a decoder density); ask an NVAE or NCP-VAE model, or use 'encode' "
                               "and 'reconstruct'")
        dims = getattr(self.vae, "scored_dims", None) or math.prod(self.image_shape)  # a crop's border is not scored
        if self.kind == "ncp" and hasattr(self.model, "importance_weighted_nll"):
            # the NCP prior's own likelihood: its normalisers Z_k are estimated per image, so images go one by one
            with torch.no_grad():
                nll = [self.model.importance_weighted_nll([x[j:j + 1]], k=p["k"])["nll"] for j in range(len(x))]
            estimator = f"importance-weighted bound, k={p['k']}, NCP prior (Monte Carlo normalisers)"
        else:
            with torch.no_grad():
                nll = importance_weighted_nll(self.vae, x, k=p["k"]).cpu().tolist()
            estimator = f"importance-weighted bound, k={p['k']}" + (", the frozen NVAE's prior" if self.kind == "ncp"
                                                                     else "")
        return [{"input_row": i, "request": "log_likelihood", "nll_nats": float(v),
                 "bits_per_dim": float(bits_per_dim(float(v), dims)), "estimator": estimator}
                for i, v in zip(rows, nll)]


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, Mapping):
        frame = pd.DataFrame({k: v if isinstance(v, (list, tuple, np.ndarray)) else [v]
                              for k, v in model_input.items()})
    elif isinstance(model_input, list) and all(isinstance(r, Mapping) for r in model_input):
        frame = pd.DataFrame(list(model_input))
    else:
        raise RequestError(f"input of type {type(model_input).__name__} is not a request frame; send a DataFrame "
                           "(or records) with a 'request' column and, for images, an 'image' column of PNG bytes")
    if "request" not in frame.columns or len(frame) == 0:
        raise RequestError(f"the input needs a 'request' column ({', '.join(REQUESTS)}) and at least one row")
    return frame.reset_index(drop=True)


_ANSWER_COLUMNS = ("input_row", "request", "image", "group", "latent_shape", "latents", "nll_nats", "bits_per_dim",
                   "estimator")


def _answer_frame(answers: list[dict[str, Any]]) -> pd.DataFrame:
    """The answers with the columns some answer has, None (JSON null) where an answer has no value."""
    present = [c for c in _ANSWER_COLUMNS if any(c in a for a in answers)]
    data = {c: pd.Series([a.get(c) for a in answers], dtype=object) for c in present}
    frame = pd.DataFrame(data)
    if "input_row" in frame:
        frame["input_row"] = frame["input_row"].astype("int64")
    return frame


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> GenerativeModelServer:
    """pyfunc loader: `path` is the model directory; the torch object loads through its pytorch flavour."""
    import mlflow.pytorch

    device = (model_config or {}).get("device") or os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    if not device:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with _quiet_copies():
        model = mlflow.pytorch.load_model(path, map_location=device)
    return GenerativeModelServer(model, device)


@contextlib.contextmanager
def _quiet_copies():
    """MLflow copies a local model directory before loading it, with a progress bar per copy that would land in
    every server log and stage output: off while inside."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


# ---------------------------------------------------------------------------------------------------- logging


def save_model(path: str, mlflow_model, pytorch_model: torch.nn.Module, code_paths: Sequence[str],
               pip_requirements: Sequence[str], example_image: np.ndarray | None = None, **_: Any) -> None:
    """The flavour writer `Model.log` calls: the pytorch flavour as mlflow.pytorch writes it (pickle, our code), then
    a python_function flavour whose loader is this file, with the request signature and a validated example."""
    import mlflow.pytorch
    from mlflow import pyfunc
    from mlflow.models.model import MLMODEL_FILE_NAME

    common = dict(mlflow_model=mlflow_model, serialization_format="pickle", code_paths=list(code_paths),
                  pip_requirements=list(pip_requirements))
    if type(pytorch_model).__name__ not in KINDS:  # any other module: the pytorch flavour as MLflow writes it
        mlflow.pytorch.save_model(pytorch_model, path, **common)
        return
    server = GenerativeModelServer(pytorch_model)
    mlflow.pytorch.save_model(pytorch_model, path, signature=request_signature(),
                              input_example=request_example(server.image_shape, example_image), **common)
    mlflow_model.flavors.pop(pyfunc.FLAVOR_NAME, None)
    pyfunc.add_to_model(mlflow_model, loader_module=LOADER_MODULE, code="code", conda_env="conda.yaml",
                        python_env="python_env.yaml", model_config={"device": None})
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def log_model(model: torch.nn.Module, name: str, run_id: str, model_id: str | None = None,
              code_paths: Sequence[str] | None = None, pip_requirements: Sequence[str] | None = None,
              example_images: Any = None):
    """Log `model` with both flavours to `run_id` (into the LoggedModel `model_id` when given); returns ModelInfo.

    `code_paths` default to the `vae` package; this file joins them as the pyfunc loader module. `example_images`
    (a batch, uint8 or float in [0, 1]) gives the input example its image; without it a gradient stands in."""
    import sys

    from mlflow.models import Model

    if code_paths is None:
        import vae

        code_paths = [str(Path(vae.__file__).resolve().parent)]
    if pip_requirements is None:  # pinned to what logged it: a pickled module loads back under the same versions
        from importlib.metadata import version

        pip_requirements = [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision", "mlflow")]
        pip_requirements.append(f"pillow>={version('pillow').split('.')[0]}")
    example = None
    if example_images is not None:
        first = np.asarray(example_images[0])
        example = first if first.dtype == np.uint8 else (np.clip(first, 0, 1) * 255 + 0.5).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        loader = Path(tmp) / f"{LOADER_MODULE}.py"
        shutil.copyfile(Path(__file__).resolve(), loader)
        with _quiet_copies():  # Model.log loads the model back to check its input example
            return Model.log(artifact_path=None, name=name, flavor=sys.modules[__name__], run_id=run_id,
                             model_id=model_id, pytorch_model=model, code_paths=[*code_paths, str(loader)],
                             pip_requirements=list(pip_requirements), example_image=example)
