"""The one path by which stage metrics reach MLflow.

    sink = MetricSink(tracker, run_id)
    sink.log({"train/loss": 1.23, "val/bpd": 1.1}, step=100)

Rules, the same for every stage (the train stage's Ray Train callback, the tune stage's trial callback, the ncp
stage and the evaluations on the driver):
- names are namespaced, `section/name` (`train/loss`, `val/bpd`, `trial/psnr`, `ncp/wall_seconds`): a bare name is
  a bug and raises;
- values must be numbers; non-finite ones are logged as NaN, so a diverging run shows it (MLflow would clamp ±inf to
  ±1.8e308 and flatten the chart);
- requests are batched within MLflow's limit (`Tracker.log_metrics`), each retried while SQLite is locked;
- a step is logged once per metric: when a restarted worker (or a resumed run) replays steps that already reached
  MLflow, the replayed values are dropped, so the history has no duplicate steps. A sink opened on a resumed run
  (`resumed=True`) reads each metric's last logged step from the store the first time it sees that metric.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from pipelines.tracking.tracker import Tracker


class MetricSink:
    def __init__(self, tracker: Tracker, run_id: str, resumed: bool = False) -> None:
        self.tracker, self.run_id, self.resumed = tracker, run_id, resumed
        self._last_step: dict[str, int] = {}
        self.dropped = 0  # values not logged because their step had been logged before (replays)

    def log(self, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> dict[str, Any]:
        """Log `metrics` at `step`; returns what was logged (replayed steps left out)."""
        step = int(step)
        bare = [k for k in metrics if "/" not in k.strip("/")]
        if bare:
            raise ValueError(f"metric names must be namespaced as section/name (train/loss, val/bpd, trial/psnr); "
                             f"got {', '.join(map(repr, bare))}")
        fresh = {k: v for k, v in metrics.items() if step > self._watermark(k)}
        self.dropped += len(metrics) - len(fresh)
        if fresh:
            ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
            self.tracker.log_metrics(self.run_id, fresh, step=step, timestamp_ms=ts)
            for k in fresh:
                self._last_step[k] = step
        return fresh

    def _watermark(self, key: str) -> int:
        if key not in self._last_step:
            history = self.tracker.metric_history(self.run_id, key) if self.resumed else []
            self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]
