"""The walking skeleton end to end: the smoke study through every real stage on a local Ray cluster.

The first run is killed (driver and everything it started) once a training cell is done; the
rerun must finish the study without training any cell twice or duplicating an MLflow run.
"""
import json
import os
import shutil
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


def valind(*args, cwd=ROOT, timeout=900, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=timeout)
    r.seconds = time.perf_counter() - t0
    return r


def _start(path: Path, log: Path, env=None) -> subprocess.Popen:
    """`valind run` in a session of its own (so it can be killed with all it starts), output to `log`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(path)], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("studies")
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(out)
    path = out / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    train_dir = out / "smoke" / "stages" / "train"
    log = out / "killed.log"
    proc = _start(path, log)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (out / "smoke" / "study.json").exists():
            time.sleep(0.2)
        second = valind("run", str(path), timeout=120)  # started while the first runs: refused at once
        deadline, done = time.time() + 900, []
        while time.time() < deadline and proc.poll() is None and not done:
            done = list(train_dir.glob("*/_DONE.json"))
            time.sleep(0.2)
        assert done, f"no training cell finished (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # every cell published by then (the rerun adopts those not yet marked done), with the mtimes
        # of its marker (None: not marked yet) and its cell.json
        killed = {p.parent.name: (d.stat().st_mtime_ns if (d := p.parent / "_DONE.json").exists() else None,
                                  p.stat().st_mtime_ns) for p in train_dir.glob("*/cell.json")}
    finally:
        kill_session(proc.pid)
    assert not session_pids(proc.pid)
    first = valind("run", str(path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    return path, out / "smoke", first, killed, second


def test_a_second_run_of_the_study_exits_at_once_naming_the_first(smoke):
    *_, second = smoke
    assert second.returncode == 1 and second.seconds < 60, second.stderr[-2000:]
    assert "is in use by another valind: pid" in second.stderr and f"run {second.args[-1]}" in second.stderr


def test_killed_driver_rerun_trains_no_cell_twice(smoke):
    _, root, first, killed, _ = smoke
    assert f"train: 5 cells, {len(killed)} cached" in first.stdout
    for key, (done_mtime, cell_mtime) in killed.items():
        unit = root / "stages" / "train" / key
        assert done_mtime is None or (unit / "_DONE.json").stat().st_mtime_ns == done_mtime
        assert (unit / "cell.json").stat().st_mtime_ns == cell_mtime  # published once, never trained again


def test_report_and_where_things_are(smoke):
    _, root, first, killed, _ = smoke
    assert f"report:  {root / 'report.html'}" in first.stdout
    # per stage, the share of time spent starting engines and training cells rather than computing
    # (training's only when the rerun trained a cell: a group publishes its cells together, so the
    # killed run may have published them all)
    train = next(line for line in first.stdout.splitlines() if line.strip().startswith("train "))
    assert len(killed) == 5 or ("start-up" in train and "of cell time" in train), first.stdout[-2000:]
    assert any(line.strip().startswith("generate ") and "start-up" in line for line in first.stdout.splitlines())
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout
    html = (root / "report.html").read_text()
    assert "<table" in html and "<img" in html
    for section in ("Sensitivity", "Specificity", "Summary", "The paper's claims", "Results by induced value", "Co-expression of values",
                    "Side effects by suite", "Seeds and power", "Judge agreement", "Curation"):
        assert section in html, section
    # the example plugin's suite (examples/valind-toy-suite), its setting's metric and its LLM judge's
    assert "greeting" in html and "says_phrase" in html and "is_greeting" in html
    # controls.aa_check: control-0 against control-1, counted
    assert "A/A check (two random-control arms against each other" in html
    assert "comparisons significant after Holm" in html
    # controls.positive: one seed measures no run-to-run variance, so nothing is detected, and the
    # run's last line says what that means
    assert "positive control NOT detected" in html
    *_, adapters, last = first.stdout.strip().splitlines()
    assert last.startswith("tiny: positive control NOT detected") and "cannot see effects of this size" in last
    # just before it, the adapter probe's verdict: every adapter changed its model (evaluation.sanity)
    assert adapters.startswith("tiny: every checked trained run's adapter changes its model"), adapters
    assert "<b>Adapters.</b> tiny: every checked trained run" in html
    killed_log = (root.parent / "killed.log").read_text()
    assert "annotate: done" in killed_log and "curate: done" in killed_log  # before the kill
    for stage in ("train: done", "generate: done", "score: done", "analyze: done"):
        assert stage in first.stdout
    # score.check: the LLM judges against a second judge on 8 trained runs' responses per suite; the
    # safety suite's harm classifier scored every response (unparseable verdicts unscored, not 0)
    assert "Judges on the trained runs' responses" in html and "harmful_response" in html
    lines = first.stdout.splitlines()
    assert any(x.startswith("score check: safety/refusal (llm) vs tiny on 8 of 8 responses: precision") for x in lines)
    assert any(x.startswith("score check: safety/harmful_response (harm) vs tiny on ") for x in lines)
    assert any(x.startswith("score check: values/expresses/humor (values-v1) vs tiny on ") for x in lines)
    assert any(x.startswith("score check: greeting/is_greeting (greeting-llm) vs tiny on ") for x in lines)
    scores = pd.concat([pd.read_parquet(p) for p in root.glob("stages/score/*/scores.parquet")])
    harm = scores[scores["metric"] == "harmful_response"]
    assert len(harm) == len(scores[scores["metric"] == "refusal"]) / 3 and harm["judge"].str.startswith("harm:").all()
    assert harm["value"].isna().eq(~harm["scored"]).all()


def test_mlflow_has_parent_and_one_child_per_cell(smoke):
    import mlflow
    _, root, _, _, _ = smoke
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["smoke"])
    parents = runs[runs["tags.valind.kind"] == "study"]
    children = runs[runs["tags.valind.kind"] != "study"]
    assert len(parents) == 1
    # one seed: the A/A check has comparisons but no p-values (run-to-run variance unmeasured)
    assert parents["metrics.analyze/contrasts"].iloc[0] > 0 and parents["metrics.aa/tiny/tests"].iloc[0] == 0
    # 1 model × (2 values + the positive control + 2 controls) × 1 seed + the base model
    assert sorted(children["tags.valind.run_id"]) == sorted(
        ["tiny__base", "tiny__value-humor__s0", "tiny__value-fairness__s0", "tiny__positive__s0",
         "tiny__control-0__s0", "tiny__control-1__s0"])
    assert (children["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]).all()
    cells = children[children["tags.valind.kind"] != "base"]
    assert cells["metrics.train/loss"].notna().all()
    assert cells["params.train.zero_stage"].eq("2").all()
    assert children["metrics.safety/refusal/substring"].notna().all()
    # score.check's agreement on the parent run (runner.stages.score_check.log_check)
    assert parents["metrics.check/safety/refusal/n"].iloc[0] == 8 and "metrics.check/safety/harmful_response/n" in parents
    # the example plugin's suite (examples/valind-toy-suite): its own setting's and its own LLM judge's metrics
    assert children["metrics.greeting/says_phrase/greeting-phrase"].notna().all()
    assert children["metrics.greeting/is_greeting/greeting-llm"].notna().all()
    assert runs["status"].eq("FINISHED").all()
    client = mlflow.tracking.MlflowClient()
    rid = cells["run_id"].iloc[0]
    assert len(client.get_metric_history(rid, "train/loss")) >= 2
    assert any(a.path == "model" for a in client.list_artifacts(rid))


def test_rerun_is_cached_and_creates_no_runs(smoke):
    import mlflow
    path, root, _, _, _ = smoke
    again = valind("run", str(path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "annotate: cached" in again.stdout and "curate: cached" in again.stdout
    assert "train: 5 cells, 5 cached" in again.stdout
    assert "generate: 6 runs, 6 cached" in again.stdout and "score: 6 runs, 6 cached" in again.stdout
    assert "analyze: cached" in again.stdout
    assert again.seconds < 30
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    assert len(mlflow.search_runs(experiment_names=["smoke"])) == 7
    status = valind("status", str(path))
    assert status.returncode == 0 and "the study is complete" in status.stdout


def test_changing_a_score_setting_reruns_only_score_and_analyze(smoke, tmp_path):
    path, root, _, _, _ = smoke
    studies = tmp_path / "studies"  # a copy: the shared study keeps its spec for the other tests
    shutil.copytree(root, studies / "smoke", ignore=shutil.ignore_patterns("ray_tune", "ray_train"))
    spec = yaml.safe_load(path.read_text())
    spec["study"]["output_dir"] = str(studies)
    spec["score"]["sampling"]["max_tokens"] = 20
    changed = tmp_path / "smoke-score.yaml"
    changed.write_text(yaml.safe_dump(spec, sort_keys=False))
    refused = valind("run", str(changed))  # the study directory belongs to the spec that made it
    assert refused.returncode == 2 and "score.sampling.max_tokens (24 -> 20)" in refused.stderr, refused.stderr
    r = valind("run", str(changed), "--amend")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "annotate: cached" in r.stdout and "train: 5 cells, 5 cached" in r.stdout
    assert "generate: 6 runs, 6 cached" in r.stdout
    assert "score: 6 runs, 0 cached" in r.stdout and "analyze: done" in r.stdout


def test_adaptive_seeds_add_a_seed_until_the_max(smoke, tmp_path):
    """seeds.adaptive on a copy of the finished smoke study (one seed): a single seed's CI cannot be
    trusted, so `valind run` adds seed 1 to both value conditions, the positive arm and both controls,
    trains and evaluates them, and stops at max: 2, saying so. A rerun computes nothing."""
    import mlflow
    import pandas as pd
    path, root, _, _, _ = smoke
    studies = tmp_path / "studies"
    shutil.copytree(root, studies / "smoke", ignore=shutil.ignore_patterns("ray_tune", "ray_train"))
    spec = yaml.safe_load(path.read_text())
    spec["study"]["output_dir"] = str(studies)
    spec["seeds"]["adaptive"] = {"target_ci_halfwidth": 1e-6, "max": 2}
    adaptive = tmp_path / "smoke-adaptive.yaml"
    adaptive.write_text(yaml.safe_dump(spec, sort_keys=False))

    r = valind("run", str(adaptive))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "adaptive seeds: adding seed 1 to positive, value-fairness, value-humor" in r.stdout
    assert r.stdout.count("adaptive seeds: adding") == 1  # at max: 2 it stops, and says why
    assert "adaptive seeds: value-humor: stop (at the maximum of 2 seeds" in r.stdout
    assert "train: 10 cells, 5 cached" in r.stdout and "generate: 11 runs, 6 cached" in r.stdout
    study = studies / "smoke"
    state = next((study / "stages" / "adaptive").iterdir())  # under the key of the spec that added the seeds
    assert json.loads((state / "seeds.json").read_text()) == {
        "control-0": [1], "control-1": [1], "positive": [1], "value-fairness": [1], "value-humor": [1]}
    rounds = json.loads((state / "trajectory.json").read_text())
    assert sorted(max(r["n_seeds"] for r in rows) for rows in rounds.values()) == [1, 2]
    analyze_units = [u for u in (study / "stages" / "analyze").iterdir() if (u / "_DONE.json").exists()]
    newest = max(analyze_units, key=lambda u: (u / "_DONE.json").stat().st_mtime_ns)
    con = pd.read_parquet(newest / "contrasts.parquet")
    assert set(con.loc[(con["reference"] == "control") & con["effect"].notna(), "n_seeds"]) == {2}
    html = (study / "report.html").read_text()
    assert "Seeds added so far: control-0: 1; control-1: 1; positive: 1; value-fairness: 1; value-humor: 1" in html
    assert "Trajectory of seeds.adaptive" in html
    mlflow.set_tracking_uri(f"sqlite:///{study / 'mlflow.db'}")
    ids = set(mlflow.search_runs(experiment_names=["smoke"])["tags.valind.run_id"].dropna())
    assert {"tiny__value-humor__s1", "tiny__value-fairness__s1", "tiny__control-0__s1", "tiny__control-1__s1"} <= ids

    again = valind("run", str(adaptive))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: 10 cells, 10 cached" in again.stdout and "analyze: cached" in again.stdout
    assert "adaptive seeds: adding" not in again.stdout


def test_a_truncated_generations_file_is_recomputed_with_its_scores_alone(smoke, tmp_path):
    """A finished study with one run's generations.parquet cut short: the rerun names that unit,
    generates and scores that run again (and the analysis that read it), and nothing else."""
    path, root, _, _, _ = smoke
    studies = tmp_path / "studies"
    shutil.copytree(root, studies / "smoke", ignore=shutil.ignore_patterns("ray_tune", "ray_train"))
    spec = yaml.safe_load(path.read_text())
    spec["study"]["output_dir"] = str(studies)
    copy = tmp_path / "smoke.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    gens = sorted((studies / "smoke" / "stages" / "generate").glob("*/generations.parquet"))
    victim = next(g for g in gens if "value-humor" in json.loads((g.parent / "_DONE.json").read_text())["run_id"])
    original = victim.read_bytes()
    victim.write_bytes(original[:-100])
    r = valind("run", str(copy))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"store: generate unit {victim.parent.name}: generations.parquet is" in r.stdout
    assert "train: 5 cells, 5 cached" in r.stdout and "annotate: cached" in r.stdout
    assert "generate: 6 runs, 5 cached" in r.stdout
    assert pd.read_parquet(victim)["run_id"].eq("tiny__value-humor__s0").all()
    if victim.read_bytes() == original:  # generated alone, the same bytes: its scores still hold
        assert "score: 6 runs, 6 cached" in r.stdout and "analyze: cached" in r.stdout
    else:  # new generations: their scores and the analysis that read them, nothing else
        assert "score: 6 runs, 5 cached" in r.stdout and "tiny__value-humor__s0:" in r.stdout
        assert "analyze: done" in r.stdout


def test_a_group_out_of_memory_in_its_optimizer_step_splits_until_it_fits(smoke, tmp_path):
    """The smoke study's 5 cells trained again on a copy, under Ray, with every optimizer step of a
    group of more than 2 adapters out of memory from step 1 on (injected: VALIND_OOM_STEP_ABOVE=2@1) and
    a checkpoint after each step. The group of 5 leaves its adapters at their step-1 checkpoints; the
    driver splits it into 3 and 2, the 3 runs out of memory again and splits into 2 and 1, the lone
    cell resumes its group checkpoint; every adapter equals the clean run's to bf16 rounding."""
    from safetensors.torch import load_file
    path, root, _, _, _ = smoke
    studies = tmp_path / "studies"
    shutil.copytree(root, studies / "smoke", ignore=shutil.ignore_patterns("ray_tune", "ray_train"))
    clean = {json.loads((d / "cell.json").read_text())["cell_id"]: d for d in (root / "stages" / "train").iterdir()
             if (d / "_DONE.json").exists()}
    shutil.rmtree(studies / "smoke" / "stages" / "train")
    spec = yaml.safe_load(path.read_text())
    spec["study"]["output_dir"] = str(studies)
    spec["train"]["checkpoint_every"] = 1  # not in the cells' key: the same study
    copy = tmp_path / "smoke.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    r = valind("train", str(copy), env={"VALIND_OOM_STEP_ABOVE": "2@1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "5 cells in 1 worker group(s) of 5" in out, out[-5000:]
    assert "out of memory in the optimizer step of a group of 5 adapter(s): 2 smaller group(s) of 3, 2, each " \
           "adapter resuming from its checkpoint" in out, out[-5000:]
    assert "out of memory in the optimizer step of a group of 3 adapter(s): 2 smaller group(s) of 2, 1" in out
    assert "failed" not in out and "Traceback" not in out  # a split is not an error
    trained = sorted((studies / "smoke" / "stages" / "train").glob("*/cell.json"))
    assert len(trained) == 5
    lone = 0
    for f in trained:
        meta = json.loads(f.read_text())
        assert meta["timing"]["starts"] in ([0, 1], [0, 1, 1]), meta["timing"]["starts"]  # from step 1's checkpoint
        lone += meta["group"] == [meta["cell_id"]]
        g = load_file(f.parent / "model" / "adapter_model.safetensors")
        c = load_file(clean[meta["cell_id"]] / "model" / "adapter_model.safetensors")
        worst = max(((g[k] - c[k]).abs().max() / c[k].abs().max().clamp_min(1e-8)).item() for k in c)
        print(f"{meta['cell_id']}: group {len(meta['group'])}, starts {meta['timing']['starts']}, "
              f"max |split - clean| / max |clean| {worst:.1e}")
        assert worst < 2e-2, (meta["cell_id"], worst)
    assert lone == 1


def _units(root: Path, folder: str) -> dict[str, int]:
    """A store folder's finished units: run id -> mtime of its _DONE.json."""
    return {json.loads(d.read_text())["run_id"]: d.stat().st_mtime_ns
            for d in (root / "stages" / folder).glob("*/_DONE.json")}


def _run_until(path: Path, log: Path, done, env=None) -> bool:
    """`valind run` killed with everything it started (SIGKILL to its session) once `done()` holds;
    False if the driver ended first."""
    proc = _start(path, log, env)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not done():
            time.sleep(0.05)
        ended = proc.poll() is not None
    finally:
        kill_session(proc.pid)  # SIGKILL to the driver's session, until none of it is left
    proc.wait(timeout=30)
    assert not session_pids(proc.pid)
    return not ended


def test_driver_killed_mid_generation_reruns_only_the_missing_units(smoke, tmp_path):
    """The finished smoke study with its generations, scores and QA removed: the driver is killed as
    the first run's generations are saved; the rerun generates only the others, retries a crashed QA
    worker's task and fails a deterministically broken run's QA unit alone; the last run computes that
    one only. (A job stopped mid-QA recomputes only the missing QA: tests/test_verbatim.py.)"""
    path, root, _, _, _ = smoke
    studies = tmp_path / "studies"
    shutil.copytree(root, studies / "smoke", ignore=shutil.ignore_patterns("ray_tune", "ray_train"))
    study = studies / "smoke"
    for folder in ("generate", "qa", "score", "analyze"):
        shutil.rmtree(study / "stages" / folder, ignore_errors=True)
    spec = yaml.safe_load(path.read_text())
    spec["study"]["output_dir"] = str(studies)
    spec["generate"]["runs_per_chunk"] = 2  # how runs share the pool: in no key, so the study is the same
    copy = tmp_path / "smoke.yaml"
    copy.write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = 6

    killed = _run_until(copy, tmp_path / "gen.log", lambda: _units(study, "generate"))
    gen = _units(study, "generate")
    assert killed and 1 <= len(gen) < runs, (tmp_path / "gen.log").read_text()[-3000:]

    # runs answered by then but not yet saved (their adapter probe was running) are kept, not generated again
    answered = len(list((study / "stages" / "generate").glob("*/answered-*.parquet")))
    fresh = runs - len(gen) - answered
    every = sorted(_units(root, "generate"))  # the finished study's runs
    crash, broken = every[0], every[-1]
    r = valind("run", str(copy), env={"VALIND_QA_FAULT": f"{crash}=crash,{broken}=error"})
    log = r.stdout + r.stderr
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"generate: {runs} runs, {len(gen)} cached" in log, log[-3000:]
    assert f"tiny: {fresh} of {fresh} runs answered" in log and f"tiny: {fresh + 1} of" not in log
    assert not answered or f"tiny: {answered} run(s) answered before, kept" in log
    assert all(_units(study, "generate")[k] == t for k, t in gen.items())  # saved once, never redone
    assert f"QA benchmarks (openbookqa): {runs} runs, 0 cached" in log
    assert f"QA {crash}: WorkerCrashedError" in log and "(transient): try 2 of 3" in log
    assert f"QA {broken}: failed (not retried): BenchmarkError: unknown benchmark tasks" in log
    assert f"QA benchmarks failed for 1 run(s): {broken}" in r.stderr
    assert sorted(_units(study, "generate")) == every
    qa = _units(study, "qa")
    assert sorted(qa) == sorted(_units(study, "score")) == sorted(set(every) - {broken})
    failed = [json.loads(f.read_text())["error"] for f in (study / "stages" / "qa").glob("*/_FAILED.json")]
    assert len(failed) == 1 and broken in failed[0] and "not retried" in failed[0]

    last = valind("run", str(copy))
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert f"score: {runs} runs, {runs - 1} cached" in last.stdout and "analyze: done" in last.stdout
    assert "QA benchmarks (openbookqa): 1 runs, 0 cached" in last.stdout  # the runs not scored yet: one
    assert all(_units(study, "qa")[k] == t for k, t in qa.items())
    print(f"\nafter the kill mid-generation: {len(gen)} of {runs} runs saved, {answered} answered; the rerun "
          f"generated {fresh} of {runs} and computed QA for {runs} ({crash} retried once, {broken} failed on "
          f"purpose), the next 1 of {runs}")
