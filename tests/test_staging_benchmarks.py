"""`valind stage` of the QA benchmarks read from the hub (evaluation.benchmarks.HUB_TASKS), against the fake
hub (tests/fake_hub.py): what staging caches is what lm-eval's task itself loads with HF_HUB_OFFLINE=1.
Fast: no Ray, no model."""
import os
import subprocess
import sys

import pytest
import yaml
import fake_hub
from fake_hub import FakeHub, Repo
from test_staging import ROOT, _parquet, _stage

from evaluation.benchmarks import HUB_TASKS

# cais/mmlu as the hub lays it out: one folder of parquet files per config (57 subjects and `all`), mapped
# to configs and splits by the README's YAML `configs:`, with the features in its `dataset_info:`
MMLU_SPLITS = {"test": 3, "validation": 2, "dev": 2, "auxiliary_train": 2}
MMLU_README = """---
dataset_info:
- config_name: abstract_algebra
  features: &features
  - name: question
    dtype: string
  - name: subject
    dtype: string
  - name: choices
    sequence: string
  - name: answer
    dtype:
      class_label:
        names:
          '0': A
          '1': B
          '2': C
          '3': D
- config_name: all
  features: *features
configs:
- config_name: abstract_algebra
  data_files:
  - split: test
    path: abstract_algebra/test-*
  - split: validation
    path: abstract_algebra/validation-*
  - split: dev
    path: abstract_algebra/dev-*
- config_name: all
  data_files:
  - split: test
    path: all/test-*
  - split: validation
    path: all/validation-*
  - split: dev
    path: all/dev-*
  - split: auxiliary_train
    path: all/auxiliary_train-*
---
# MMLU
"""


def mmlu_repo() -> Repo:
    """A few rows per split of `all`, and one subject's folder (another config: never fetched)."""
    def rows(split: str, n: int) -> bytes:
        return _parquet([{"question": f"{split} q{i}?", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"],
                          "answer": i % 4} for i in range(n)], n)
    files = {f"all/{s}-00000-of-00001.parquet": rows(s, n) for s, n in MMLU_SPLITS.items()}
    files |= {f"abstract_algebra/{s}-00000-of-00001.parquet": rows(s, 1) for s in ("test", "validation", "dev")}
    return Repo({"README.md": MMLU_README.encode(), **files})


@pytest.fixture
def bench_spec(tmp_path):
    """The smoke spec (a builtin model, its data source in a data dir of its own) scoring MMLU: one hub item."""
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["score"]["benchmarks"] = ["mmlu"]
    (tmp_path / "data" / "preference").mkdir(parents=True)
    (tmp_path / "data" / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz").write_bytes(b"")
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(d))
    return tmp_path / "bench.yaml"


# lm-eval's own task, built as evaluation.benchmarks.run_benchmarks builds it (its task dir, its TaskManager):
# Task.download calls load_dataset(dataset_path, dataset_name, **dataset_kwargs), all splits
LM_EVAL_LOADS = """
import sys, tempfile
from pathlib import Path
from evaluation.benchmarks import _load_tasks, write_task_dir
with tempfile.TemporaryDirectory() as tmp:
    _, tasks = _load_tasks(sys.argv[2:], write_task_dir(Path(sys.argv[1]), Path(tmp), sys.argv[2:]))
for t in tasks:
    docs = list(t.test_docs())
    print(f"{t.config.task}: {t.config.dataset_path} [{t.config.dataset_name}] splits "
          f"{sorted(t.dataset)}, {len(docs)} test docs, first {docs[0]['question']!r} answer {docs[0]['answer']}")
"""


PREFLIGHT_SAYS = """
from runner.preflight_inputs import _benchmark
row = _benchmark("mmlu", None)
print(row.ok, row.detail[:120])
"""


def test_staged_hub_benchmarks_are_what_lm_evals_task_loads_offline_with_no_request(bench_spec, tmp_path):
    assert HUB_TASKS == {"valind_mmlu": "cais/mmlu"}  # a new hub task: give it a repo here
    home = tmp_path / "hf"
    with FakeHub({}, datasets={"cais/mmlu": mmlu_repo()}) as hub:
        env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.url,
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

        def lm_eval_loads():
            return subprocess.run([sys.executable, "-c", LM_EVAL_LOADS, str(bench_spec.parent / "data"), *HUB_TASKS],
                                  env=env, capture_output=True, text=True, timeout=120)
        job = lm_eval_loads()  # not staged: lm-eval's load fails offline, naming the dataset, asking nothing
        print(job.stderr.strip().splitlines()[-1])
        assert job.returncode == 1 and "valind_mmlu needs the Hugging Face dataset 'cais/mmlu', which is not " \
            "available offline: HF_HUB_OFFLINE is set" in job.stderr, job.stderr[-3000:]
        assert sum(hub.counts.values()) == 0, hub.counts

        def preflight_says():  # `valind preflight`'s benchmark row, offline: the same load as the task's
            return subprocess.run([sys.executable, "-c", PREFLIGHT_SAYS], env=env, capture_output=True, text=True,
                                  timeout=120).stdout.strip()
        assert preflight_says().startswith("False not in the data directory, HF_HUB_OFFLINE is set and the hub "
                                           "dataset cais/mmlu does not load from the local cache")

        r = _stage(bench_spec, home, hub)
        print(r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 hub item(s) staged" in r.stdout and "dataset cais/mmlu [all]" in r.stdout
        assert f"[{sum(MMLU_SPLITS.values())} rows]" in r.stdout  # every split of `all`, as lm-eval loads it
        fetched = sorted(k.split("/", 6)[6] for k in hub.counts if k.startswith("GET /datasets/cais/mmlu/resolve/"))
        print("fetched:", fetched)
        assert fetched == ["README.md", *sorted(f"all/{s}-00000-of-00001.parquet" for s in MMLU_SPLITS)]

        hub.counts.clear()
        r = _stage(bench_spec, home, hub, HF_HUB_OFFLINE="1")  # what `valind stage` offline says the job will find
        print(r.stdout)
        assert r.returncode == 0 and f"[{sum(MMLU_SPLITS.values())} rows]" in r.stdout, r.stdout + r.stderr
        job = lm_eval_loads()  # the task itself, offline, on what was staged
        print(job.stdout)
        assert job.returncode == 0, job.stdout + job.stderr[-3000:]
        assert job.stdout.splitlines() == [
            "valind_mmlu: cais/mmlu [all] splits ['auxiliary_train', 'dev', 'test', 'validation'], "
            "3 test docs, first 'test q0?' answer 0"], job.stdout
        assert preflight_says() == "True hub dataset cais/mmlu, loaded from the local cache"
        assert sum(hub.counts.values()) == 0, hub.counts  # not one request: the staged copy was found
