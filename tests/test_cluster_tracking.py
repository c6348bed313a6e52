"""The refusal to track a multi-node study into a local sqlite/file store, decided without a cluster."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.tracking import TrackingError, check_cluster_tracking, is_local_uri, local_tracking_refusal

ROOT = Path(__file__).resolve().parent.parent
HERE = {"localhost", "127.0.0.1", "node-a", "10.0.0.5"}
SQLITE = "sqlite:////tmp/x/mlflow.db"


def test_local_stores():
    assert is_local_uri(SQLITE) and is_local_uri("file:///tmp/mlruns") and is_local_uri("/tmp/mlruns")
    assert is_local_uri("mlruns")
    assert not is_local_uri("http://mlflow.internal:5000") and not is_local_uri("postgresql://h/db")


@pytest.mark.parametrize("uri,nodes,address,refused", [
    (SQLITE, 1, None, False),                         # a local Ray started by valind
    (SQLITE, 1, "127.0.0.1:6379", False),             # a one-node head on this machine (ray job submit)
    (SQLITE, 1, "10.0.0.5:6379", False),              # this machine's own address
    (SQLITE, 3, "10.0.0.5:6379", True),               # the head of a 3-node cluster
    (SQLITE, 2, None, True),
    (SQLITE, 1, "ray://10.9.9.9:10001", True),        # a remote head (Ray client)
    ("file:///tmp/mlruns", 1, "http://head.example:8265", True),
    ("/tmp/mlruns", 4, "auto", True),
    ("http://mlflow.internal:5000", 4, "ray://10.9.9.9:10001", False),
])
def test_decision(uri, nodes, address, refused):
    msg = local_tracking_refusal(uri, nodes, address, HERE)
    assert (msg is not None) == refused
    if refused:
        assert uri in msg and "mlflow server" in msg and "tracking.uri" in msg


def test_gpu_work_the_connected_nodes_cannot_hold_means_more_nodes():
    # an autoscaling cluster (cluster.yaml: min_workers 0) starts as a lone CPU head
    assert local_tracking_refusal(SQLITE, 1, "10.0.0.5:6379", HERE, gpus_wanted=4, gpus_seen=0)
    assert local_tracking_refusal(SQLITE, 1, "10.0.0.5:6379", HERE, gpus_wanted=1, gpus_seen=8) is None
    assert local_tracking_refusal(SQLITE, 1, None, HERE, gpus_wanted=4, gpus_seen=0) is None  # valind's own Ray


def test_check_refuses_a_remote_head_without_connecting(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.255.255.1:10001")
    monkeypatch.delenv("VALIND_ALLOW_LOCAL_TRACKING", raising=False)
    with pytest.raises(TrackingError, match="remote head"):
        check_cluster_tracking(SQLITE)
    check_cluster_tracking("http://mlflow.internal:5000")
    monkeypatch.setenv("VALIND_ALLOW_LOCAL_TRACKING", "1")
    check_cluster_tracking(SQLITE)


def test_valind_run_refuses_before_any_compute(tmp_path):
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(tmp_path)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": "ray://10.255.255.1:10001"}
    for k in ("MLFLOW_TRACKING_URI", "VALIND_ALLOW_LOCAL_TRACKING"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refusing to run a multi-node study" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "smoke" / "stages").exists() and not (tmp_path / "smoke" / "mlflow.db").exists()


def test_artifact_location_is_set_when_the_experiment_is_created(tmp_path):
    from runner.tracking import Tracker
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", "s", tmp_path, artifact_location=str(tmp_path / "arts"))
    assert t.client.get_experiment(t.experiment_id).artifact_location == (tmp_path / "arts").as_uri()
    d = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "e2", "s", tmp_path)
    assert d.client.get_experiment(d.experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_experiment_opens_on_the_runs_table(tmp_path):
    from mlflow.tracking import MlflowClient

    from runner.tracking import EXPERIMENT_KIND, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("made-before")  # by a valind that set no kind
    for name in ("fresh", "made-before"):
        tr = Tracker(uri, name, "s", tmp_path)
        assert client.get_experiment(tr.experiment_id).tags[EXPERIMENT_KIND] == "custom_model_development"
    assert tr.experiment_id == old
