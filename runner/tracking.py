"""MLflow: one parent run per study, one child run per (model, condition, seed) and per base model.

Runs are found again by tags, so a rerun never creates a second run for the same cell, and
what was already logged is remembered in the study store so metric histories are not doubled.
Only the driver logs.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

from evaluation.errors import ValindError
from runner.cluster import init_ray
from runner.secrets import redact, secret_values
from runner.spec import content_hash
from runner.store import read_json, read_parquet, safe_name

if TYPE_CHECKING:
    import pandas as pd

STUDY_TAG, RUN_TAG, KIND_TAG, CELL_TAG = "valind.study", "valind.run_id", "valind.kind", "valind.cell_key"
MODEL_STAGE_TAG = "valind.model_stage"  # base | sft | instruct: filter and group runs by it in the UI
GROUP_KEYS = ("model", "condition", "value", "seed")  # child-run tags valind.<key> beside the params (and valind.kind)
VERDICT_STATS = ("effect", "ci_lo", "ci_hi", "p_holm")  # per headline contrast (evaluation.analyze.verdicts)
TABLE_COLUMNS = ["model", "condition", "kind", "value", "suite", "metric", "judge", "reference", "primary",
                 "n_seeds", "n_items", "effect", "ci_lo", "ci_hi", "p_value", "p_holm", "p_bh", "significant",
                 "effect_size", "effect_size_kind"]


class TrackingError(ValindError, RuntimeError):
    pass


def tracking_uri(spec_uri: str | None, root: Path) -> str:
    return spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def is_local_uri(uri: str) -> bool:
    """A tracking store that is a file on this machine (sqlite, file:, a plain path)."""
    return urlparse(uri).scheme in ("", "sqlite", "file")


def _host(address: str) -> str:
    rest = address.split("://", 1)[-1]
    if rest.startswith("["):  # [ipv6]:port
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def local_hosts() -> set[str]:
    """Names and addresses of this machine (a RAY_ADDRESS on one of them is not remote)."""
    hosts = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "auto", "local"}
    try:
        name = socket.gethostname()
        hosts |= {name, socket.getfqdn(), *socket.gethostbyname_ex(name)[2]}
    except OSError:
        pass
    try:  # every interface: Ray names a node by its interface address, which /etc/hosts may not list
        import psutil  # deferred: psutil is optional (the interfaces are a refinement)
        hosts |= {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    except Exception:
        pass
    return hosts


def local_tracking_refusal(uri: str, nodes: int, ray_address: str | None, here: set[str],
                           gpus_wanted: float = 0.0, gpus_seen: float = 0.0) -> str | None:
    """Why a study must not track into `uri` on this cluster, or None when it may.

    A sqlite/file store lives on the driver's disk: on a multi-node cluster (more than one alive
    node, a remote head, or GPU work the connected nodes cannot hold, which an autoscaler will add
    nodes for) it is invisible to the other nodes and dies with the head.
    """
    if not is_local_uri(uri):
        return None
    host = _host(ray_address) if ray_address else None
    if host and host not in here and not host.startswith("127."):
        why = f"RAY_ADDRESS={ray_address} is a remote head"
    elif nodes > 1:
        why = f"the Ray cluster has {nodes} nodes"
    elif ray_address and gpus_wanted > gpus_seen:
        why = f"the spec asks for {gpus_wanted:g} GPU(s) per task and the cluster has {gpus_seen:g} so far"
    else:
        return None
    return (f"refusing to run a multi-node study ({why}) with MLflow tracking at {uri}, a file on one "
            "node. Start a tracking server, e.g. `mlflow server --backend-store-uri postgresql://… "
            "--artifacts-destination s3://…`, and set tracking.uri (or MLFLOW_TRACKING_URI) to its "
            "http(s):// address; tracking.artifact_location sets where artifacts go. "
            "VALIND_ALLOW_LOCAL_TRACKING=1 overrides this check.")


def check_cluster_tracking(uri: str, gpus_wanted: float = 0.0) -> None:
    """Raise TrackingError (before any compute) when a multi-node study would track into a local file."""
    if not is_local_uri(uri) or os.environ.get("VALIND_ALLOW_LOCAL_TRACKING", "0") not in ("", "0"):
        return
    address = os.environ.get("RAY_ADDRESS")
    here = local_hosts() if address else set()
    nodes, gpus = 1, 0.0
    if address and local_tracking_refusal(uri, 1, address, here) is None:
        # an existing cluster: count its nodes (a remote head needs no count)
        alive = [n for n in init_ray().nodes() if n.get("Alive")]
        nodes, gpus = len(alive), max((n.get("Resources", {}).get("GPU", 0.0) for n in alive), default=0.0)
    elif not address:  # valind starts its own one-node Ray, unless this process already joined one
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            nodes = sum(1 for n in sys.modules["ray"].nodes() if n.get("Alive"))
    msg = local_tracking_refusal(uri, nodes, address, here, gpus_wanted, gpus)
    if msg:
        raise TrackingError(msg)


def _retry(fn: Callable, *args, attempts: int = 4, **kw):
    """Retry transient tracking failures with exponential backoff."""
    for i in range(attempts):
        try:
            return fn(*args, **kw)
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** i)


# The MLflow UI opens a "model training" experiment on its runs table (a GenAI one on traces).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class Tracker:
    def __init__(self, uri: str, experiment: str, study: str, root: Path, artifact_location: str | None = None):
        # deferred: mlflow takes seconds to import
        import mlflow
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" line per run
        self.uri, self.study, self.root = uri, study, root
        self.client = MlflowClient(tracking_uri=uri)
        # what was logged is remembered per (tracking server, experiment): a new URI gets everything again
        self.marks = root / "tracking" / hashlib.sha256(f"{uri}\n{experiment}".encode()).hexdigest()[:16]
        try:
            with _fail_fast():  # an unreachable server is reported in seconds, before any compute
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    default = (root / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
                    artifacts = artifact_location or default
                    if artifacts and artifacts.startswith("/"):
                        artifacts = Path(artifacts).as_uri()
                    exp_id = self.client.create_experiment(experiment, artifact_location=artifacts,
                                                           tags={EXPERIMENT_KIND: MODEL_TRAINING})
                else:
                    exp_id = exp.experiment_id
                    if EXPERIMENT_KIND not in exp.tags:  # made by an older valind: land on the runs too
                        self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_TRAINING)
        except Exception as e:
            raise TrackingError(redact(f"MLflow at {uri} is not usable: {type(e).__name__}: {e}")) from None
        self.experiment_id = exp_id
        self.mlflow = mlflow
        self._runs: dict[str, str] = {}

    def _find(self, run_key: str, kind: str, parent: str | None, cell: str = "") -> str:
        """The run of (run_key, cell), found by its tags, else created: never a second one."""
        if (run_key, cell) in self._runs:
            return self._runs[run_key, cell]
        flt = (f"tags.`{STUDY_TAG}` = '{self.study}' and tags.`{RUN_TAG}` = '{run_key}'"
               + (f" and tags.`{CELL_TAG}` = '{cell}'" if cell else ""))
        found = _retry(self.client.search_runs, [self.experiment_id], flt, max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {STUDY_TAG: self.study, RUN_TAG: run_key, KIND_TAG: kind, **({CELL_TAG: cell} if cell else {})}
            if parent:
                tags["mlflow.parentRunId"] = parent
            run = _retry(self.client.create_run, self.experiment_id, tags=tags, run_name=run_key)
            run_id = run.info.run_id
        self._runs[run_key, cell] = run_id
        return run_id

    def parent(self) -> str:
        return self._find(f"study:{self.study}", "study", None)

    def child(self, run_key: str, kind: str, cell: str) -> str:
        """An evaluated model's run: one per (run id, trained cell); a cell trained anew under changed
        settings (valind run --amend) is another model, with its own run and params."""
        return self._find(run_key, kind, self.parent(), cell)

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
        from mlflow.entities import Param  # deferred: mlflow
        existing = _retry(self.client.get_run, run_id).data.params
        new = [Param(k[:250], redact(str(v))[:6000]) for k, v in params.items() if k[:250] not in existing]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            _retry(self.client.log_batch, run_id, params=new[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric  # deferred: mlflow
        now = int(time.time() * 1000)
        ms = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
        for i in range(0, len(ms), 500):
            _retry(self.client.log_batch, run_id, metrics=ms[i:i + 500])

    def log_history(self, run_id: str, history: list[dict]) -> None:
        from mlflow.entities import Metric  # deferred: mlflow
        now = int(time.time() * 1000)
        ms = [Metric(_metric_key(f"train/{k}"), float(v), now, int(h["step"]))
              for h in history for k, v in h.items() if k != "step"]
        for i in range(0, len(ms), 500):
            _retry(self.client.log_batch, run_id, metrics=ms[i:i + 500])

    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        with _redacted(Path(path)) as path:  # text artifacts never carry environment secrets
            self._log_artifacts(run_id, path, artifact_path)

    def _log_artifacts(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            _retry(self.client.log_artifacts, run_id, str(path), artifact_path)
        else:
            _retry(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_table(self, run_id: str, df: pd.DataFrame, artifact_file: str) -> None:
        """A table artifact MLflow's UI shows as a table and `mlflow.load_table` reads back."""
        _retry(self.client.log_table, run_id, df, artifact_file)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag  # deferred: mlflow
        new = [RunTag(k[:250], redact(str(v))[:8000]) for k, v in tags.items()]
        for i in range(0, len(new), 100):
            _retry(self.client.log_batch, run_id, tags=new[i:i + 100])

    def finish(self, run_id: str) -> None:
        _retry(self.client.set_terminated, run_id, "FINISHED")


_TEXT_SUFFIXES = (".html", ".htm", ".yaml", ".yml", ".json", ".jsonl", ".txt", ".csv", ".md", ".log", ".jinja")


@contextmanager
def _redacted(path: Path):
    """`path`, or a temporary copy of it whose text files have environment secrets replaced by "***"."""
    secrets = secret_values()
    files = ([p for p in ([path] if path.is_file() else path.rglob("*"))
              if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES] if secrets else [])
    dirty = [p for p in files if any(v in p.read_text(errors="replace") for v in secrets)]
    if not dirty:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="valind-redacted-") as tmp:
        copy = Path(tmp) / path.name
        if path.is_dir():
            shutil.copytree(path, copy)
        else:
            shutil.copy2(path, copy)
        for p in dirty:
            target = copy / p.relative_to(path) if path.is_dir() else copy
            target.write_text(redact(p.read_text(errors="replace")))
        yield copy


@contextmanager
def _fail_fast(timeout_s: int = 5):
    """MLflow's HTTP client retries for minutes by default; the start-up probe must fail in seconds."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metric_key(k: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)[:250]


# ------------------------------------------------------------------ what a study logs

def run_params(r) -> dict:
    return {"model": r.model, "model_stage": r.stage, "condition": r.condition, "kind": r.kind,
            "value": r.value or "", "match": r.match or "", "seed": "" if r.seed is None else r.seed}


def log_run(tr, r, params: dict | None = None) -> str:
    """A run's child: its params (run_params + `params`) and, as tags too (the UI groups and filters
    by either), model, stage, condition, kind, value and seed."""
    rid = tr.child(r.run_id, r.kind, r.cell_key or "base")
    tr.log_params(rid, {**run_params(r), **(params or {})})
    tr.set_tags(rid, {MODEL_STAGE_TAG: r.stage, **{f"valind.{k}": v for k, v in run_params(r).items()
                                                  if k in GROUP_KEYS}})
    return rid


def flatten(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(f"{prefix}.{k}", v) if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out
