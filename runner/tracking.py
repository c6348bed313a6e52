"""MLflow: one parent run per study, one child run per (model, condition, seed) and per base model.

Runs are found again by tags, so a rerun never creates a second run for the same cell, and
what was already logged is remembered in the study store so metric histories are not doubled.
Only the driver logs.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from runner.store import safe_name

STUDY_TAG, RUN_TAG, KIND_TAG = "valind.study", "valind.run_id", "valind.kind"


class TrackingError(RuntimeError):
    pass


def tracking_uri(spec_uri: str | None, root: Path) -> str:
    return spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def _retry(fn: Callable, *args, attempts: int = 4, **kw):
    """Retry transient tracking failures with exponential backoff."""
    for i in range(attempts):
        try:
            return fn(*args, **kw)
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** i)


class Tracker:
    def __init__(self, uri: str, experiment: str, study: str, root: Path):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri, self.study, self.root = uri, study, root
        self.client = MlflowClient(tracking_uri=uri)
        self.marks = root / "tracking"
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                artifacts = (root / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
                exp_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
        except Exception as e:
            raise TrackingError(f"MLflow at {uri} is not usable: {type(e).__name__}: {e}") from None
        self.experiment_id = exp_id
        self.mlflow = mlflow
        self._runs: dict[str, str] = {}

    def _find(self, run_key: str, kind: str, parent: str | None) -> str:
        if run_key in self._runs:
            return self._runs[run_key]
        flt = f"tags.`{STUDY_TAG}` = '{self.study}' and tags.`{RUN_TAG}` = '{run_key}'"
        found = _retry(self.client.search_runs, [self.experiment_id], flt, max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {STUDY_TAG: self.study, RUN_TAG: run_key, KIND_TAG: kind}
            if parent:
                tags["mlflow.parentRunId"] = parent
            run = _retry(self.client.create_run, self.experiment_id, tags=tags, run_name=run_key)
            run_id = run.info.run_id
        self._runs[run_key] = run_id
        return run_id

    def parent(self) -> str:
        return self._find(f"study:{self.study}", "study", None)

    def child(self, run_key: str, kind: str) -> str:
        return self._find(run_key, kind, self.parent())

    # --- idempotent logging -----------------------------------------------------------
    def _mark(self, run_id: str, what: str) -> Path:
        return self.marks / safe_name(run_id) / safe_name(what)

    def once(self, run_id: str, what: str, fn: Callable[[], Any]) -> bool:
        """Run a logging action unless it was already done for this (run, what)."""
        mark = self._mark(run_id, what)
        if mark.exists():
            return False
        fn()
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text("ok\n")
        return True

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        existing = _retry(self.client.get_run, run_id).data.params
        new = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if k[:250] not in existing]
        if new:
            _retry(self.client.log_batch, run_id, params=new)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        ms = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
        for i in range(0, len(ms), 500):
            _retry(self.client.log_batch, run_id, metrics=ms[i:i + 500])

    def log_history(self, run_id: str, history: list[dict]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        ms = [Metric(_metric_key(f"train/{k}"), float(v), now, int(h["step"]))
              for h in history for k, v in h.items() if k != "step"]
        for i in range(0, len(ms), 500):
            _retry(self.client.log_batch, run_id, metrics=ms[i:i + 500])

    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            _retry(self.client.log_artifacts, run_id, str(path), artifact_path)
        else:
            _retry(self.client.log_artifact, run_id, str(path), artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            _retry(self.client.set_tag, run_id, k, v)

    def finish(self, run_id: str) -> None:
        _retry(self.client.set_terminated, run_id, "FINISHED")


def _metric_key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)[:250]
