"""What reaches Ray's workers: valind's worker env under `ray job submit` (not only the driver's), and
no DeepSpeed accelerator decided on the head (a CPU head must not tell GPU workers to use the CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cluster import local_accelerator, worker_env
from runner.local_cluster import ray_env
from test_job_submit import _head  # a head of its own, ended by pid

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_the_head_decides_no_accelerator_for_its_workers(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as init_ray sets it in a CPU head's driver
    assert "DS_ACCELERATOR" not in worker_env()
    monkeypatch.delenv("DS_ACCELERATOR")
    local_accelerator()  # a worker without CUDA (this machine) picks the CPU for itself
    import os
    assert os.environ["DS_ACCELERATOR"] == "cpu"


@pytest.mark.slow
def test_worker_env_reaches_workers_of_a_submitted_job(tmp_path):
    """The driver's VALIND_DATA_DIR (set for the entrypoint only, not in the job's runtime env) and
    the job's own variables both reach a Ray task; a key both set keeps the job's value."""
    # a node whose own environment names no accelerator (this process's may, from an earlier init_ray)
    with _head({k: v for k, v in ray_env().items() if k != "DS_ACCELERATOR"}) as head:
        _probe_job(head, tmp_path)


def _probe_job(head: dict, tmp_path) -> None:
    probe = ("import os, ray; from runner.cluster import init_ray; init_ray(); "
             "f = ray.remote(lambda: {k: os.environ.get(k) for k in "
             "('VALIND_DATA_DIR', 'HF_HUB_OFFLINE', 'TOKENIZERS_PARALLELISM', 'DS_ACCELERATOR')}); "
             "print('ENV=' + __import__('json').dumps(ray.get(f.options(num_cpus=0).remote())))")
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"},
                   "excludes": [".venv", "studies", ".git", "__pycache__"]}
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
                        "--runtime-env-json", json.dumps(runtime_env), "--",
                        "env", f"VALIND_DATA_DIR={tmp_path}", "DS_ACCELERATOR=cpu", "python", "-c", probe],
                       env=head["env"], capture_output=True, text=True, timeout=300)
    line = next((x for x in r.stdout.splitlines() if x.startswith("ENV=")), None)
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    seen = json.loads(line[4:])
    assert seen["VALIND_DATA_DIR"] == str(tmp_path)  # valind's env reached the worker
    assert seen["HF_HUB_OFFLINE"] == "1" and seen["TOKENIZERS_PARALLELISM"] == "true"  # the job's kept
    assert seen["DS_ACCELERATOR"] is None  # the driver's accelerator stayed in the driver


def test_a_study_without_a_data_directory_is_refused_before_compute(tmp_path):
    """jobs/paper.yaml once set no data directory and `ray job submit` passed none: the suites read a
    None directory and failed at generation, after annotation and training (issue 31, finding 2)."""
    import os

    import yaml
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(tmp_path / "studies")
    # preference pairs from a local file (as jobs/paper.yaml's come from the hub): nothing else needs the
    # data directory before generation
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A kind answer {i}.",
                                         "rejected": f"No. {i}"}) + "\n" for i in range(60)))
    spec["data"] = {**spec["data"], "sources": [{"name": "local", "path": str(pairs)}]}
    spec["data"].pop("data_dir", None)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "VALIND_DATA_DIR"}
    r = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(tmp_path / "s.yaml")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "data.data_dir" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "VALIND_DATA_DIR" in r.stdout + r.stderr
    assert not (tmp_path / "studies" / "smoke" / "annotate").exists()
