"""`valind preflight` on a real multi-node Ray cluster on this machine (runner.local_cluster: a head
and 2 worker nodes, an MLflow server over HTTP): a probe task pinned to every node, in under 60 s;
and `valind run` on a cluster runs it before any compute (issue 31, item 1)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runner.local_cluster import LocalCluster, pids_matching

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "cluster")
    dirs = [str(c.dir)]
    try:
        c.up(workers=2, cpus=2)
        yield c
    finally:
        dirs += c.temp_dirs()
        c.down()
        assert not [d for d in dirs if pids_matching(d)], "cluster processes outlived teardown"


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
    assert "a probe run created and deleted" in out
    assert not (tmp_path / "studies" / ".valind-preflight").exists()  # the probes are cleared

    # `valind run` on the cluster: the preflight first, and a problem stops it before any compute
    spec["generate"]["engine"] = {"actors": 1000, "cpus_per_actor": 1}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(spec))
    rc, out, _ = _valind(["run", str(tmp_path / "big.yaml")], cluster, tmp_path, data_dir)
    assert rc == 2 and "problem: fits the cluster (generate.engine.actors)" in out, out
    assert not (tmp_path / "studies" / "smoke").exists()
