"""Request latency of served vaepipe models on CPU: p50 and p95 per request type, over a bounded loop on loopback.

    .venv/bin/python benchmarks/serving_latency.py                       # the demo's model sizes, logged here
    .venv/bin/python benchmarks/serving_latency.py --requests 50 --threads 2
    .venv/bin/python benchmarks/serving_latency.py --tracking-uri sqlite:///runs/mlflow.db \\
        --models models:/demo-nvae@candidate models:/demo-ncp@candidate models:/demo-gwae@candidate

Without --models it builds the three kinds at the sizes of configs/demo.yaml (NVAE `tiny` 1x16x16, its NCP-VAE
with the demo's SIR proposals and Langevin steps, the demo's GWAE), untrained: a request's cost does not depend on
the weights. Each model is logged as the stages log it, registered in a temporary sqlite store, and served by a real
`mlflow models serve --env-manager local` on 127.0.0.1 with one worker. Every request type is sent `--warmup` times,
then `--requests` times (each type stops early after `--max-seconds`); the time is the client's, from sending the
JSON to reading the whole answer.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]


def demo_models() -> dict[str, object]:
    import torch

    from pipelines.config import load_config
    from vae import NVAE
    from vae.gwae import GWAE
    from vae.ncp import NCPVAE, classifier_for

    cfg = load_config(REPO / "configs" / "demo.yaml")
    torch.manual_seed(0)
    nvae = NVAE(cfg.nvae).eval()
    ncp = NCPVAE(nvae, [classifier_for(nvae, k, cfg.ncp) for k in range(nvae.num_groups)], cfg.ncp).eval()
    return {"nvae": nvae, "ncp": ncp, "gwae": GWAE(cfg.gwae).eval()}


def register_demo_models(workdir: Path) -> tuple[str, dict[str, str]]:
    from pipelines.config import TrackingConfig
    from pipelines.tracking import Tracker

    tracking = TrackingConfig(workdir=str(workdir), tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
                              artifact_location=str(workdir / "mlartifacts"))
    tracker = Tracker.connect(tracking)
    exp = tracker.experiment_id("serving-latency")
    uris = {}
    for kind, model in demo_models().items():
        run_id = tracker.client.create_run(exp, run_name=kind).info.run_id
        logged = tracker.log_pytorch_model(run_id, model, name="model")
        version = tracker.register_model(logged, f"latency-{kind}")
        tracker.end_run(run_id)
        uris[kind] = f"models:/latency-{kind}/{version}"
    return tracker.tracking_uri, uris


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def start_server(model_uri: str, tracking_uri: str, threads: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS=str(threads),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri, "--env-manager",
           "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with _OPENER.open(f"{base}/ping", timeout=2) as resp:
                if resp.status == 200:
                    return proc, base
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"{' '.join(cmd)} did not start; log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def post(url: str, body: bytes) -> float:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with _OPENER.open(req, timeout=300) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
    return time.perf_counter() - t0


def requests_for(kind: str, image_b64: str, n: int, k: int) -> dict[str, dict]:
    sample = {"dataframe_records": [{"request": "sample"}], "params": {"n": n}}
    out = {}
    if kind == "ncp":
        for method in ("sir", "langevin", "base"):
            out[f"sample n={n} ({method})"] = {**sample, "params": {"n": n, "method": method}}
    else:
        out[f"sample n={n}"] = sample
    for request in ("reconstruct", "encode"):
        out[f"{request} 1 image"] = {"dataframe_records": [{"request": request, "image": image_b64}]}
    if kind != "gwae":
        out[f"log_likelihood 1 image k={k}"] = {"dataframe_records": [{"request": "log_likelihood",
                                                                       "image": image_b64}], "params": {"k": k}}
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, metavar="URI", help="registered models to serve (default: "
                    "the demo's sizes, built and registered here)")
    ap.add_argument("--tracking-uri", default=None, help="the store holding --models")
    ap.add_argument("--requests", type=int, default=30, help="timed requests per type (default 30)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop a request type after this long")
    ap.add_argument("--n", type=int, default=16, help="images per sample request")
    ap.add_argument("--k", type=int, default=100, help="importance samples per log_likelihood request")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    ap.add_argument("--image-shape", type=int, nargs=3, default=(1, 16, 16), metavar=("C", "H", "W"),
                    help="the models' image shape (default: the demo's 1 16 16)")
    args = ap.parse_args()

    import numpy as np

    from pipelines import serving

    tmp = Path(tempfile.mkdtemp(prefix="serving_latency_"))
    try:
        if args.models:
            if not args.tracking_uri:
                ap.error("--models needs --tracking-uri (the store that holds them)")
            tracking_uri = args.tracking_uri
            uris = {m.split("/")[1].split("@")[0].rsplit("-", 1)[-1]: m for m in args.models}
        else:
            t0 = time.perf_counter()
            tracking_uri, uris = register_demo_models(tmp)
            print(f"logged and registered {len(uris)} demo-sized models in {time.perf_counter() - t0:.1f} s")
        rows = []
        for kind, uri in uris.items():
            proc, base = start_server(uri, tracking_uri, args.threads, tmp / f"{kind}.log")
            try:
                image = np.random.default_rng(0).integers(0, 256, size=tuple(args.image_shape), dtype=np.uint8)
                b64 = base64.b64encode(serving.encode_png(image)).decode()
                for name, body in requests_for(kind, b64, args.n, args.k).items():
                    data = json.dumps(body).encode()
                    for _ in range(args.warmup):
                        post(f"{base}/invocations", data)
                    times, start = [], time.perf_counter()
                    while len(times) < args.requests and time.perf_counter() - start < args.max_seconds:
                        times.append(post(f"{base}/invocations", data))
                    rows.append((kind, name, len(times), 1e3 * statistics.median(times),
                                 1e3 * percentile(times, 0.95)))
                    print(f"{kind:5s} {name:32s} {len(times):4d} requests  p50 {rows[-1][3]:8.1f} ms  "
                          f"p95 {rows[-1][4]:8.1f} ms", flush=True)
            finally:
                stop_server(proc)
        print(f"\nCPU, {os.cpu_count()} cores, server torch threads {args.threads}, one uvicorn worker, loopback:")
        print(f"| model | request | requests | p50 ms | p95 ms |\n| --- | --- | ---: | ---: | ---: |")
        for kind, name, count, p50, p95 in rows:
            print(f"| {kind} | {name} | {count} | {p50:.1f} | {p95:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
