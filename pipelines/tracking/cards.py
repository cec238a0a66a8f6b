"""Model cards: the markdown description of each registered version (what it is, its data and config, its key
metrics, how to load and serve it), and the note added when a version becomes champion."""
from __future__ import annotations

import datetime
from typing import Any

from pipelines.data import read_manifest
from pipelines.redaction import redact_text
from pipelines.tracking.lineage import config_hash, manifest_sha256

_RECIPES = {
    "nvae": ("train", "pipelines/train_vae.py", "an NVAE (hierarchical VAE)", ("val/", "eval/")),
    "ncp": ("ncp", "pipelines/train_ncp.py", "an NCP-VAE (a frozen NVAE with a noise-contrastive prior)",
            ("eval/", "ncp/", "val/")),
    "gwae": ("tune", "pipelines/tune_gwae.py", "the best GWAE of a Ray Tune search", ("best/",)),
}


def _metric_split(key: str, eval_split: str) -> str:
    prefix = key.split("/", 1)[0]
    return {"val": "val", "test": "test", "train": "train", "best": "val (best trial)",
            "eval": eval_split}.get(prefix, "-")


def model_card(tracker, name: str, version: str, config: Any, run_id: str) -> str:
    """The markdown description of a registered version, from its run (tags, metrics, data) and its config."""

    family = name.rsplit("-", 1)[-1]
    stage, recipe, what, prefixes = _RECIPES.get(family, ("?", "?", "a vaepipe model", ("val/",)))
    run = tracker.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    data_cfg = config.tune.data if family == "gwae" else config.data
    manifest = read_manifest(data_cfg.path)
    fs_path = redact_text(data_cfg.path)
    c, h, w = manifest.shape
    splits = " / ".join(f"{s} {n}" for s, n in manifest.splits.items() if n)
    eval_split = "test" if manifest.splits.get("test", 0) else "val"  # eval/ metrics: the held-out split
    uri = f"models:/{name}/{version}"
    rows = [(k, _metric_split(k, eval_split), v) for k, v in sorted(metrics.items())
            if k.startswith(prefixes) and k.count("/") == 1 and not k.endswith("seconds")]
    metric_lines = "\n".join(f"| `{k}` | {s} | {v:.6g} |" for k, s, v in rows[:24]) or "| (none logged) | | |"
    sampling = {"nvae": '"n": 16, "temperature": 0.8', "ncp": '"n": 16, "method": "sir"', "gwae": '"n": 16'}
    python_sample = {"nvae": "model.sample(16, temperature=0.8)", "ncp": 'model.sample(16, method="sir")',
                     "gwae": "model.sample(16)"}
    source_model = _pinned(tracker, tags.get("vaepipe.source_model", "none"))
    chash = tags.get("vaepipe.config_hash") or config_hash(config)
    manifest_sha, data_tag = manifest_sha256(data_cfg.path), tags.get("vaepipe.dataset", "?")
    return f"""# {name} v{version}

{what[0].upper() + what[1:]} for {c}x{h}x{w} images, made by the `{stage}` stage of vaepipe.

| | |
| --- | --- |
| recipe | `vaepipe {stage}` ({recipe}), config `{getattr(config, 'name', '?')}` |
| config hash | `{chash}` (sha256 of the resolved config; `config.yaml` of the run) |
| data | `{manifest.name}` at `{fs_path}`: {c}x{h}x{w}, {splits} |
| data digest | dataset.json sha256 `{manifest_sha}`; content sha256 `{manifest.sha256}` (run tag `{data_tag}`) |
| source model | {source_model if source_model != 'none' else 'none (trained from scratch)'} |
| pipeline run | `{tags.get('vaepipe.pipeline_run', '?')}`; stage run `{run_id}` |
| code | git `{tags.get('vaepipe.git_commit', 'unknown')}` |
| registered | {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} |

## Key metrics
| metric | split | value |
| --- | --- | --- |
{metric_lines}

## Use it
Load our own class (PyTorch):

    import mlflow
    model = mlflow.pytorch.load_model("{uri}", map_location="cpu").eval()
    images = {python_sample[family]}   # (16, {c}, {h}, {w}) in [0, 1]

Through pyfunc (requests: sample, reconstruct, encode, log_likelihood; images as PNG bytes):

    import pandas as pd
    served = mlflow.pyfunc.load_model("{uri}")
    answer = served.predict(pd.DataFrame({{"request": ["sample"]}}), params={{{sampling[family]}}})

Serve it over REST:

    mlflow models serve -m {uri} --env-manager local --host 127.0.0.1 --port 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{{"dataframe_records": [{{"request": "sample"}}], "params": {{{sampling[family]}}}}}'
"""


def _pinned(tracker, uri: str) -> str:
    """An alias URI with the version it pointed at now (aliases move; the card must keep naming the same model)."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    name, alias = uri[len("models:/"):].split("@", 1)
    try:
        return f"{uri} (version {tracker.get_model_version_by_alias(name, alias).version} at registration)"
    except Exception:
        return uri


def describe_version(tracker, name: str, version: str | int, config: Any, run_id: str) -> str:
    """Write the model card as the description of `name` version `version`; returns it."""
    text = model_card(tracker, name, str(version), config, run_id)
    tracker.set_description(name, version, text)
    return text


def note_promotion(tracker, name: str, version: str | int, metric: str, direction: str, value: float | None,
                   previous: str | None, previous_value: float | None, forced: bool) -> str:
    """Append to a version's card why it became champion: the metric comparison with the champion it replaced."""
    mv = tracker.model_version(name, version)
    shown = "unchecked" if value is None else f"{value:.6g}"
    if previous is None:
        why = f"first champion of `{name}`; `{metric}` = {shown}"
    elif previous_value is None:
        why = f"replaced v{previous}, which has no `{metric}`; this version has {shown}"
    else:
        better = (value is not None and (value < previous_value if direction == "min" else value > previous_value))
        verdict = "better" if better else ("equal" if value == previous_value else "worse")
        why = (f"`{metric}` = {shown} against {previous_value:.6g} of v{previous} ({direction} is better: {verdict})")
    if forced:
        why += "; promoted with --force"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (mv.description or f"# {name} v{version}\n").rstrip() + f"\n\n## Champion since {when}\n{why}.\n"
    tracker.set_description(name, version, text)
    return text
