"""The README's cluster path, verbatim (runner.verbatim): nodes from cluster.yaml's own setup and start
commands, the data staged by the README's line, the study submitted with the README's `ray job submit`
line from a clean environment (no venv on PATH, no VALIND_*). A worker node holding an engine is
killed mid-generation and its replacement starts only 120 s later; then the job is stopped mid-QA and
resubmitted, and the rerun recomputes only what was not saved. A worker node holding a training worker is
killed mid-training too (replaced at once), and what the MLflow UI shows is read through the server.

Teardown ends only the processes this test started (by their temp dirs), never `ray stop`."""
import json
import re
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from mlflow_ui import check_what_the_ui_shows
from runner.local_cluster import pids_matching
from runner.verbatim import Machine, readme_lines


@pytest.fixture
def machine(tmp_path, data_dir):
    m = Machine(tmp_path / "machine")
    try:
        m.prepare(data_dir)  # the README's lines before `ray job submit`
        yield m
    finally:
        m.end_faults()  # before teardown: a replacement node due later must not start after it
        dirs = [str(m.cluster.dir), *m.cluster.temp_dirs()]
        m.cluster.down()
        assert not [d for d in dirs if pids_matching(d)], "cluster processes outlived teardown"


@pytest.mark.slow
def test_the_readme_path_verbatim(machine):
    m = machine
    # the nodes run the venv that cluster.yaml's setup built on a node's own disk (not the shared filesystem)
    venv = m.home / "valind-venv"
    assert (venv / "bin" / "valind").exists() and (venv / ".valind-complete").exists()
    assert any("--dry-run" in n and "valind stage jobs/paper.yaml" in n for n in m.notes)  # the README's stage line
    assert all(str(venv / "bin") in c for c in (m.cluster.state["commands"]["head"],
                                                 m.cluster.state["commands"]["worker"]))
    assert (m.shared / "data" / "SOURCES.md").exists()  # staged by the README's rsync-up line
    secret = m.shared / "valind" / "secrets" / "HF_TOKEN"
    assert secret.exists() and secret.stat().st_mode & 0o777 == 0o600
    assert (m.home / ".ray" / "auth_token").exists()  # Ray's token, copied by file_mounts
    spec = m.write_spec(models=1)
    assert spec["data"]["data_dir"].startswith(str(m.shared))
    log = m.root / "job.log"

    # run 1: a worker node holding a training worker killed once a worker group is in its loop (replaced
    # 5 s later); one holding an engine actor killed 20 s into generation, its replacement only 120 s
    # later; the job stopped (`ray job stop`) once QA has saved its first run
    train_hook, train_faults, _ = m.stop_node_during("train", 0, replace_after=5)
    node_hook, faults, _ = m.stop_node_during("generate", 20, replace_after=120)
    job_hook, stopped = m.stop_job_on(r"  QA .*: \d+ items saved")

    def hooks(text):
        for hook in (train_hook, node_hook, job_hook):
            hook(text)

    started = time.time()
    m.submit(log, hooks)  # `ray job submit` exits 0 for a stopped job
    first = log.read_text()
    tail = first[-6000:]
    assert [f["held"] for f in train_faults] == ["RayTrainWorker"], tail
    assert re.search(r"train: done — 3 cells", first), tail
    assert len(faults) == 1 and faults[0]["stage"] == "generate", tail
    assert "a replacement actor was requested" in first, tail  # the pool lost an actor ...
    assert re.search(r"generate: done — \d+ runs", first), tail  # ... and finished on the survivors
    assert stopped["stopped"] and "was stopped" in first, tail  # then the driver was stopped mid-QA
    print(f"run 1: {time.time() - started:.0f}s; job stopped at {stopped['stopped']!r}")

    # run 2: the README's line again; only what was not saved is computed
    log2 = m.root / "job2.log"
    rc = m.submit(log2)
    second = log2.read_text()
    assert rc == 0 and "succeeded" in second, second[-6000:]
    for pattern in (r"train: \d+ cells, \d+ cached", r"generate: \d+ runs, \d+ cached",
                    r"score: \d+ runs, \d+ cached", r"QA benchmarks \(.*\): \d+ runs, \d+ cached"):
        print("run 2:", re.search(pattern, second).group(0))
    cells, cached_cells = map(int, re.search(r"train: (\d+) cells, (\d+) cached", second).groups())
    runs, cached_runs = map(int, re.search(r"generate: (\d+) runs, (\d+) cached", second).groups())
    qa, cached_qa = map(int, re.search(r"QA benchmarks \(.*\): (\d+) runs, (\d+) cached", second).groups())
    assert cells == cached_cells and runs == cached_runs  # nothing trained or generated again
    assert 1 <= cached_qa < qa  # the QA saved before the stop is kept; the rest is computed
    assert len(re.findall(r"  QA .*: \d+ items saved", second)) == qa - cached_qa
    study = m.shared / "valind" / "studies" / "paper-rehearsal"
    assert (study / "report.html").exists()
    _check_the_job_used_and_kept_the_secret(m, first + second, study)
    # every cell trained once though its worker group lost a node (it resumed, or restarted from step 0)
    starts = {json.loads(c.read_text())["cell_id"]: json.loads(c.read_text())["timing"]["starts"]
              for c in study.glob("stages/train/*/cell.json")}
    print("worker-group starts per cell:", starts)
    assert len(starts) == 3 and all(starts.values())
    # what the UI reads, through the server; each run tracked once; artifacts on the server, not the study
    uri = f"http://127.0.0.1:{m.cluster.state['mlflow']['port']}"
    check_what_the_ui_shows(uri, "valind-paper-rehearsal")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("valind-paper-rehearsal").experiment_id])
    assert Counter(r.data.tags["valind.kind"] for r in runs) == {"study": 1, "base": 1, "value": 2, "control": 1}
    assert len({r.info.run_name for r in runs}) == len(runs)  # two submissions, each run tracked once
    stored = Path(m.cluster.state["mlflow"]["dir"]) / "artifacts"
    assert any(p.name == "adapter_config.json" for p in stored.rglob("*")), "no model artifact on the server"


def _check_the_job_used_and_kept_the_secret(m: Machine, logs: str, study) -> None:
    """`valind run` checked the cluster first; the driver read the Hugging Face token from the secrets
    directory, and it is in no job log, no text file of the study and no MLflow param or tag."""
    assert "preflight: 0 problem(s)" in logs
    assert "valind: secrets from $VALIND_SECRETS_DIR: HF_TOKEN" in logs
    token = (m.shared / "valind" / "secrets" / "HF_TOKEN").read_text().strip()
    assert token and token not in logs
    leaks = [p for p in study.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".html", ".txt")
             and token in p.read_text(errors="ignore")]
    assert not leaks, leaks
    client = mlflow.tracking.MlflowClient(tracking_uri=f"http://127.0.0.1:{m.cluster.state['mlflow']['port']}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and not [r for r in runs if token in json.dumps({**r.data.params, **r.data.tags})]


def test_readme_lines_are_the_ones_rehearsed():
    lines = readme_lines()
    assert "ray up cluster.yaml" in lines and lines[0].startswith("ray get-auth-token")
    assert any(x.startswith("ray rsync-up cluster.yaml") for x in lines)
    submit = next(x for x in lines if x.startswith("ray job submit"))
    assert submit.endswith("-- valind run jobs/paper.yaml")


def test_the_rehearsal_spec_leaves_the_suites_to_the_job(tmp_path):
    """A suite registered in this process only (tests/toy_suite.py) must not reach the job's spec."""
    import json

    import yaml

    import toy_suite  # noqa: F401  (registers "toy" here)
    m = Machine(tmp_path)
    m.cluster.dir.mkdir(parents=True)
    (m.cluster.dir / "cluster.json").write_text(json.dumps(
        {"head": {"dashboard_port": 1}, "cpus": 2, "workers": [{}, {}], "mlflow": {"port": 2}}))
    (m.laptop / "jobs").mkdir(parents=True)
    m.write_spec(models=1)
    written = yaml.safe_load((m.laptop / "jobs" / "paper.yaml").read_text())
    assert "suites" not in written["generate"]
