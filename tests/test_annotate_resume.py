"""Annotation resumes on its recorded layout: kill it mid-way, change the engine's actor count,
rerun: every response is judged exactly once, and the batches judged before the kill are kept."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from procs import kill_session, session_pids

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _annotate(path: Path, **popen):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "runner.cli", "annotate", str(path)], cwd=ROOT, env=env,
                            start_new_session=True, **popen)


def test_killed_annotation_resumes_with_another_actor_count(tmp_path, data_dir):
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(tmp_path)
    spec["annotate"]["max_pairs"] = 24
    spec["engine"] = {**spec["engine"], "actors": 1, "batch_size": 2}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    stage = tmp_path / "smoke" / "stages" / "annotate"

    with open(tmp_path / "killed.log", "w") as log:
        proc = _annotate(path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, batches = time.time() + 600, []
        while time.time() < deadline and proc.poll() is None and len(batches) < 3:
            batches = sorted(stage.glob("*/batches/*.parquet"))
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_session(proc.pid)
    assert not session_pids(proc.pid)
    unit = next(stage.iterdir())
    kept = {p.name: p.stat().st_mtime_ns for p in (unit / "batches").glob("*.parquet")}
    layout = json.loads((unit / "layout.json").read_text())
    assert 3 <= len(kept) < len(layout["spans"]), (tmp_path / "killed.log").read_text()[-3000:]
    assert not (unit / "_DONE.json").exists() and layout["batch_size"] == 2 and layout["rows"] == 48

    spec["engine"]["actors"] = 2  # a rerun on a bigger pool: its batches would be twice as large
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    rerun = _annotate(path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, out[-3000:]
    assert [p.name for p in stage.iterdir()] == [unit.name]  # the actor count is not in the key
    assert f"{len(kept)} already judged" in out
    assert json.loads((unit / "layout.json").read_text()) == layout
    assert {p.name: p.stat().st_mtime_ns for p in (unit / "batches").glob("*.parquet") if p.name in kept} == kept

    pairs = pd.read_parquet(unit / "pairs.parquet")
    ann = pd.read_parquet(unit / "annotations.parquet")
    want = [(p, side) for p in pairs["pair_id"] for side in ("chosen", "rejected")]
    assert list(zip(ann["pair_id"], ann["side"])) == want  # same rows, in order, none twice
