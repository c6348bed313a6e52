"""On a real multi-node Ray cluster on this machine (head + 2 worker nodes, each its own `ray start`)
with an MLflow tracking server over HTTP: `valind preflight` first, then (`make test-full` only)
jobs/paper.yaml rehearsed by `valind rehearse` with a worker node killed mid-training. One cluster for both (CI's time) and one base model here;
docs/REHEARSAL.md records the rehearsal of all eight.

The cluster is runner.local_cluster's: teardown ends only the processes it started (by their temp
dirs), never `ray stop`."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mlflow_ui import check_what_the_ui_shows
from runner.local_cluster import LocalCluster, pids_matching

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("rehearsal") / "cluster")
    dirs = [str(c.dir)]  # the MLflow server's
    try:
        c.up(workers=2, cpus=2)
        yield c
    finally:
        dirs += c.temp_dirs()  # read back from disk: the replacement node the rehearsal started too
        c.down()
        assert not [d for d in dirs if pids_matching(d)], "cluster processes outlived teardown"


def _env(c: LocalCluster, data_dir, tracking: bool) -> dict:
    env = {**os.environ, **c.env, "HF_HUB_OFFLINE": "1", "VALIND_DATA_DIR": str(data_dir)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(BIN.parent / "torch_extensions"))
    if not tracking:
        env.pop("MLFLOW_TRACKING_URI")
    return env


def _valind(args: list[str], c: LocalCluster, tmp: Path, data_dir) -> tuple[int, str, float]:
    env = {**os.environ, **c.env, "HF_HUB_OFFLINE": "1", "VALIND_DATA_DIR": str(data_dir),
           "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=tmp, env=env, capture_output=True,
                       text=True, timeout=600)
    took = time.perf_counter() - t0
    print(r.stdout[-8000:], r.stderr[-3000:], f"took {took:.1f} s", sep="\n")
    return r.returncode, r.stdout + r.stderr, took


def test_preflight_on_the_rehearsal_cluster(cluster, tmp_path, data_dir):
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(tmp_path / "studies")
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(spec))
    rc, out, took = _valind(["preflight", str(tmp_path / "smoke.yaml")], cluster, tmp_path, data_dir)
    assert rc == 0, out
    assert took < 60, f"preflight took {took:.1f} s on the rehearsal cluster"
    lines = out.splitlines()
    # every node (head and both workers) ran the probe: software, and storage written and read by the others
    assert sum("node software" in line and " ok " in line for line in lines) == 3, out
    assert sum("shared storage" in line and " ok " in line for line in lines) == 3, out
    # (the table folds long details onto more lines: match the row and its first words)
    assert sum("tracking server" in line and " ok " in line and "a probe run created" in line for line in lines) == 1, out
    assert not (tmp_path / "studies" / ".valind-preflight").exists()  # the probes are cleared

    # `valind run` on the cluster: the preflight first, and a problem stops it before any compute
    spec["generate"]["engine"] = {"actors": 1000, "cpus_per_actor": 1}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(spec))
    rc, out, _ = _valind(["run", str(tmp_path / "big.yaml")], cluster, tmp_path, data_dir)
    assert rc == 2 and "problem: fits the cluster (generate.engine.actors)" in out, out
    assert not (tmp_path / "studies" / "smoke").exists()

    # the local sqlite store is refused on a multi-node cluster, before any compute
    r = subprocess.run([str(BIN / "valind"), "run", str(tmp_path / "smoke.yaml")], cwd=tmp_path,
                       env=_env(cluster, data_dir, tracking=False), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "mlflow server" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert not (tmp_path / "studies" / "smoke" / "annotate").exists()


# after the preflight test: it needs the cluster as started (this one stops a node). Not in `make test`
# (CI's time): tests/test_verbatim.py runs the same study on the README's path, a training node lost too.
@pytest.mark.full
def test_paper_rehearsal_survives_a_lost_node(cluster, tmp_path, data_dir):
    out = tmp_path / "studies"
    r = subprocess.run([str(BIN / "valind"), "rehearse", str(ROOT / "jobs" / "paper.yaml"), "--models", "1",
                        "--output-dir", str(out), "--cluster-dir", str(cluster.dir), "--stop-node", "train:20"],
                       cwd=tmp_path, env=_env(cluster, data_dir, tracking=True), capture_output=True, text=True,
                       timeout=1800)
    log = r.stdout[-6000:] + r.stderr[-4000:]
    assert r.returncode == 0, log
    fig = json.loads((out / "paper-rehearsal" / "rehearsal.json").read_text())
    print("\n".join(line for line in r.stdout.splitlines() if line.startswith("  ")))
    # the node that was stopped held a training worker; its cell still finished
    assert [(f["stage"], f["held"]) for f in fig["faults"]] == [("train", "RayTrainWorker")], log
    print("worker-group starts per cell:", {c["run"]: c["starts"] for c in fig["cells"]})
    assert len(cluster.state["workers"]) == 2 and len(cluster.state["stopped"]) == 1  # ... and replaced
    # every cell trained once and every run tracked once, on the HTTP server
    assert len(fig["cells"]) == 3 and all(c["starts"] for c in fig["cells"])
    assert fig["mlflow"]["runs"] == fig["mlflow"]["expected"] == 1 + 3 + 1 and not fig["mlflow"]["duplicates"]
    assert fig["mlflow"]["kinds"] == {"study": 1, "base": 1, "value": 2, "control": 1}
    # three pools: the judge for annotation, the model's LoRA engines, the judge again for scoring
    assert [p["lora"] for p in fig["pools"]] == [False, True, False]
    assert 0 < fig["concurrency"] <= fig["ideal"] + 1e-9 and fig["overhead_mean_s"] > 0
    assert (out / "paper-rehearsal" / "report.html").exists()
    # what the UI reads, through the server's REST API: a model-training experiment lands on its runs
    import urllib.parse
    import urllib.request
    q = urllib.parse.urlencode({"experiment_name": "valind-paper-rehearsal"})
    with urllib.request.urlopen(f"{cluster.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/get-by-name?{q}") as resp:
        tags = {t["key"]: t["value"] for t in json.load(resp)["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    check_what_the_ui_shows(cluster.env["MLFLOW_TRACKING_URI"], "valind-paper-rehearsal")
    # artifacts went through the server (mlflow-artifacts), into its artifact store, not the study dir
    stored = Path(cluster.state["mlflow"]["dir"]) / "artifacts"
    assert any(p.name == "adapter_config.json" for p in stored.rglob("*")), "no model artifact on the server"
