"""valind rehearse's spec mapping and figures, without a cluster."""
from pathlib import Path

import pytest

from runner.rehearse import concurrency, rehearsal_spec
from runner.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cpus,annotate,generate,train_workers", [(4, 4, 4, 1), (8, 8, 8, 1), (64, 8, 32, 4)])
def test_paper_gpus_map_onto_local_cpus(tmp_path, cpus, annotate, generate, train_workers):
    full = load_spec(ROOT / "jobs" / "paper.yaml")
    data, notes = rehearsal_spec(full, cpus, str(tmp_path))
    spec = parse_spec(data, "rehearsal")
    # a pool keeps its share of the cluster: the 32-GPU judge and generation pools fill the local CPUs
    assert spec.annotate.engine.actors == annotate and spec.generate.engine.actors == generate
    assert spec.engine.actors == 1  # 1 of 32 GPUs: the least is one actor
    engines = (spec.engine, spec.annotate.engine, spec.generate.engine)
    assert all(e.gpus_per_actor == 0 and e.tensor_parallel == 1 for e in engines)
    assert spec.train.workers == train_workers and spec.train.gpus_per_worker == 0
    assert spec.train.batch_size % (spec.train.workers * spec.train.micro_batch_size) == 0
    assert spec.train.gradient_checkpointing == full.train.gradient_checkpointing  # kept: what runs, not what costs
    # every base model, each its own tiny model (own cache units: every pool hand-over happens)
    assert [m.name for m in spec.models] == [m.name for m in full.models]
    assert len({m.path for m in spec.models}) == len(full.models)
    assert spec.values.induced == ["humor", "fairness"] and spec.controls.count == 1
    assert spec.controls.positive is None and spec.seeds.values == [0]
    assert spec.annotate.judge_model == spec.score.safety.llm_judge == spec.score.suite("anthropomorphism").judge == "tiny-llama"
    assert "mmlu" not in spec.score.benchmarks and "gsm8k" not in spec.score.benchmarks
    assert spec.tracking.uri is None and spec.tracking.artifact_location is None  # the cluster's server
    assert spec.cluster is None and spec.study.name == "paper-rehearsal"
    assert any("32 in the spec" in n for n in notes)


def test_models_cut_and_cpu_spec(tmp_path):
    full = load_spec(ROOT / "jobs" / "smoke.yaml")  # no GPUs: pools keep their counts up to the CPUs
    spec = parse_spec(rehearsal_spec(full, 2, str(tmp_path), models=1)[0], "rehearsal")
    assert len(spec.models) == 1 and spec.train.workers == 2 and spec.engine.actors == 1


def test_concurrency_of_cell_timings():
    cells = [{"start": 0, "end": 10, "wall_s": 10}, {"start": 0, "end": 10, "wall_s": 10},
             {"start": 10, "end": 20, "wall_s": 10}]
    assert concurrency(cells) == pytest.approx(1.5)
    # the cells of one group (runner.train.group) are one worker group in flight
    grouped = [{**c, "group": ["a", "b"]} for c in cells[:2]] + cells[2:]
    assert concurrency(grouped) == pytest.approx(1.0)
