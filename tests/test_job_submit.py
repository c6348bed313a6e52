"""The smoke study submitted as a Ray job to a head started here, as on a cluster (README: Run on a cluster).

Stopping the head safely: `ray stop` kills every Ray process on the machine, other people's
included. So the head gets its own `--temp-dir` (a fresh directory) and non-default ports, and
teardown terminates only the processes whose command line names that directory (gcs_server,
raylet, dashboard, monitors, agents: Ray passes them the session dir) plus all their descendants
(workers, the job supervisor and the job's driver): SIGTERM, then SIGKILL after a grace period.
`ray start` also records its address in /tmp/ray/ray_current_cluster; that file is restored.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from runner.local_cluster import end_pids, free_port, pids_matching, ray_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CURRENT = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
pytestmark = pytest.mark.slow


@pytest.fixture
def head(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="valind-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    saved = CURRENT.read_text() if CURRENT.exists() else None
    gcs, dash = free_port(), free_port()
    env = ray_env()
    cmd = [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats",
           "--temp-dir", temp_dir, "--object-store-memory", str(1024 ** 3),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temp_dir": temp_dir}
    finally:
        end_pids(pids_matching(temp_dir), grace_s=15)
        assert not pids_matching(temp_dir), "the head's processes outlived teardown"
        if saved is not None:
            CURRENT.write_text(saved)
        elif CURRENT.exists():
            CURRENT.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_smoke_study_as_a_ray_job(head, tmp_path, data_dir, monkeypatch):
    from runner.cluster import worker_env

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for the job client in this process, like the CLI's env

    out = tmp_path / "studies"
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(out)
    spec["controls"] = {"count": 1}  # submission is under test here, not the A/A arm
    spec_path = tmp_path / "smoke.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))

    token = "hf_rehearsal_secret_token_0123456789"  # reaches every worker through the job's runtime env
    env_vars = {**worker_env(), "HF_HUB_OFFLINE": "1", "VALIND_DATA_DIR": str(data_dir), "HF_TOKEN": token}
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(BIN.parent / "torch_extensions")
    env_vars["TORCH_EXTENSIONS_DIR"] = ext  # the venv's prebuilt DeepSpeed ops (Makefile)
    runtime_env = {"env_vars": env_vars,
                   "excludes": [".venv", "studies", ".git", ".pytest_cache", "__pycache__", "*.db", "mlruns"]}
    job_id = f"valind-smoke-{int(time.time())}"
    t0 = time.perf_counter()
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", job_id,
         "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "runner.cli", "run", str(spec_path)],
        env=head["env"], capture_output=True, text=True, timeout=1500)
    logs = r.stdout[-4000:] + r.stderr[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient
    status = JobSubmissionClient(head["address"]).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs}"
    print(f"job {job_id} succeeded in {time.perf_counter() - t0:.0f}s")

    root = out / "smoke"
    assert (root / "report.html").exists() and "<table" in (root / "report.html").read_text()
    assert "analyze: done" in r.stdout, logs
    assert "preflight: 0 problem(s)" in r.stdout, logs  # `valind run` on a cluster checks first (issue 31)
    assert f"report:  {root / 'report.html'}" in r.stdout  # the driver ran the venv's valind on this spec

    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(run.data.tags["valind.kind"] for run in runs)
    assert kinds == ["base", "control", "study", "value", "value"]
    assert all(run.info.status == "FINISHED" for run in runs)
    # the token never lands in what valind writes: logs, report, params, tags, text files of the store
    assert token not in r.stdout + r.stderr + (root / "report.html").read_text()
    assert not [run for run in runs if token in json.dumps({**run.data.params, **run.data.tags})]
    leaks = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".html", ".txt")
             and token in p.read_text(errors="ignore")]
    assert not leaks, leaks
