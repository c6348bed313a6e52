"""`valind plan`: the counts and hours of a small hand-built spec, and the shipped paper spec."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.measure import measured_judge_rps
from runner.plan import PlanError, default_cluster, estimate, params_b
from runner.spec import AnnotateCheck, PositiveControlSpec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent


def _spec(score=None, **plan):
    return parse_spec({
        "study": {"name": "p"},
        "models": [{"name": "m", "path": "org/Model-8B"}],
        "values": {"induced": ["humor", "fairness"]},
        "controls": {"count": 1},
        "seeds": {"values": [0, 1]},
        "data": {"sources": [{"name": "ultrafeedback", "max_pairs": 1000}], "subset_size": 100},
        "annotate": {"judge_model": "org/Judge-8B"},
        "train": {"max_length": 2048, "epochs": 1, "workers": 2, "gpus_per_worker": 1, "batch_size": 8},
        "generate": {"suites": ["values", "safety"], "items_per_suite": 50, "sampling": {"max_tokens": 100}},
        "plan": {"efficiency": 1.0, **plan},
        "cluster": {"nodes": 1, "gpus_per_node": 4},
        **({"score": score} if score else {}),
    })


def test_counts_and_hours_of_a_small_spec():
    plan = estimate(_spec())
    c = plan.counts
    assert (c["trials (cells)"], c["evaluated runs"], c["annotation responses"]) == (6, 7, 2000)
    assert (c["items per run"], c["generation requests"]) == (100, 700)  # 50 values (48 + 100 held out, capped) + 50 safety
    rows = {r.stage.strip(): r for r in plan.rows}
    assert rows["annotate"].gpu_hours == pytest.approx(2000 / 10 / 3600)           # 8B judge: 10 responses/s/GPU
    assert rows["train"].gpu_hours == pytest.approx(6 * 100 / 1.5 / 3600)         # 8B LoRA DPO at 2048: 1.5 pairs/s/GPU
    assert rows["train"].wall_hours == pytest.approx(3 * 100 / 1.5 / 3600 / 2)     # 2 trials of 2 GPUs at once, 3 waves
    assert rows["reference log-probs"].gpu_hours == pytest.approx(3 * 100 * 0.25 / 1.0 / 3600)
    assert rows["generate"].gpu_hours == pytest.approx(10_000 / 12_500 / 3600 + 6 * 10_000 / (12_500 * 0.7) / 3600)
    assert rows["score"].gpu_hours == pytest.approx(7 * 50 / 10 / 3600)
    assert plan.gpu_hours == pytest.approx(sum(r.gpu_hours for r in plan.rows))


def test_positive_control_is_counted():
    base = estimate(_spec())
    spec = _spec()
    spec = spec.model_copy(update={"controls": spec.controls.model_copy(update={"positive": PositiveControlSpec(items=24)})})
    plan = estimate(spec)
    c, c0 = plan.counts, base.counts
    assert c["trials (cells)"] == c0["trials (cells)"] + 2 and c["evaluated runs"] == c0["evaluated runs"] + 2
    assert c["items per run"] == c0["items per run"] + 24        # 100 held-out prompts, 24 of them planted items
    rows = {r.stage.strip(): r for r in plan.rows}
    assert rows["train"].gpu_hours == pytest.approx(8 * 100 / 1.5 / 3600)
    assert rows["score"].gpu_hours == pytest.approx(9 * 50 / 10 / 3600)  # the planted judge is a string match


def test_overrides_and_measured_rates():
    assert {r.stage: r.gpu_hours for r in estimate(_spec(judge_responses_per_s=20)).rows}["annotate"] == \
        pytest.approx(2000 / 20 / 3600)
    measured = estimate(_spec(), measured_rps=5.0)  # a whole-pool rate; the default pool holds 1 GPU
    assert measured.rows[0].source == "measured" and measured.rows[0].gpu_hours == pytest.approx(2000 / 5 / 3600)
    spec_override_wins = estimate(_spec(judge_responses_per_s=20), measured_rps=5.0)
    assert spec_override_wins.rows[0].source == "spec plan:"


def test_measured_rate_is_read_from_the_study_dir(tmp_path, offline_hub):
    from runner.pipeline import Study
    spec = _spec()
    assert measured_judge_rps(spec, base_dir=tmp_path) is None
    study = Study(spec, base_dir=tmp_path)
    study.store.mark_done("annotate", study.key("annotate"), {"responses_per_s": 7.5})
    assert measured_judge_rps(spec, base_dir=tmp_path) == 7.5


def test_model_sizes_and_cluster_default():
    assert params_b("x", "meta-llama/Llama-3.1-8B-Instruct") == 8
    assert params_b("x", "Qwen/Qwen2.5-72B-Instruct") == 72
    assert params_b("smol", "HuggingFaceTB/SmolLM2-135M-Instruct") == pytest.approx(0.135)
    assert params_b("x", "some/model", declared=13) == 13
    assert default_cluster() == (4, 8, "cluster.yaml: gpu_8xh100")


def test_paper_plan_prints_a_table_with_a_positive_total():
    plan = estimate(load_spec(ROOT / "jobs" / "paper.yaml"))
    assert plan.counts["trials (cells)"] == 8 * 19 * 3 and plan.gpu_hours > 0 and plan.wall_hours > 0  # + positive
    r = subprocess.run([sys.executable, "-m", "runner.cli", "plan", "jobs/paper.yaml"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "GPU-hours" in r.stdout and "total" in r.stdout and "annotate" in r.stdout


def test_plan_refuses_training_that_cannot_fit_a_gpu():
    d = yaml.safe_load((ROOT / "jobs" / "paper.yaml").read_text())
    assert estimate(parse_spec(d)).gpu_hours > 0  # gradient checkpointing on: 8B fits an 80 GB GPU
    d["train"]["gradient_checkpointing"] = False
    # the first model that cannot: 3B's smallest group, 48 GB of activations and 34 of logits (LOGIT_BYTES)
    with pytest.raises(PlanError, match=r"llama-3.2-3b needs about 8\d GB per worker as a group of a single LoRA "
                                        r"adapter .* has 80 GB .*gradient_checkpointing: true"):
        estimate(parse_spec(d))
    d["cluster"]["gpu_memory_gb"] = 141  # H200
    assert estimate(parse_spec(d)).gpu_hours > 0


def test_train_memory_estimate_scales_as_documented():
    from runner.train.memory import train_memory_gb
    from runner.spec import TrainSpec

    lora = TrainSpec(bf16=True, micro_batch_size=1, max_length=2048, workers=1, batch_size=8)
    full = lora.model_copy(update={"finetune": "full"})
    ckpt = lora.model_copy(update={"gradient_checkpointing": True})
    assert train_memory_gb(8, lora) - train_memory_gb(8, ckpt) > 15  # micro-batch 1 × 2 × 2048 tokens
    # bf16 weights (16 GB) dominate once activations are recomputed; the logits' fp32 copies take 8.4 GB
    assert 16 < train_memory_gb(8, ckpt) < 30
    assert train_memory_gb(8, full) > train_memory_gb(8, lora) + 100  # grads + fp32 Adam of all 8B: 112 GB
    assert train_memory_gb(8, full.model_copy(update={"zero_stage": 3, "workers": 8})) < train_memory_gb(8, full) / 3


def test_per_value_controls_are_counted_and_subset_size_all_is_noted():
    base = estimate(_spec())
    spec = _spec()
    per_value = spec.model_copy(update={"controls": spec.controls.model_copy(update={"match": "per_value"})})
    c = estimate(per_value).counts
    # 2 values × (value arm + its own control) × 2 seeds, against 2 × (1 + 1 pooled control) before
    assert c["trials (cells)"] == 8 == base.counts["trials (cells)"] + 2 and c["evaluated runs"] == 9
    every = per_value.model_copy(update={"data": per_value.data.model_copy(update={"subset_size": "all"})})
    plan = estimate(every)
    assert plan.counts["trials (cells)"] == 8 and plan.counts["pairs per condition"] == (1000 - 100) // 16
    assert any("data.subset_size all" in n and "drops values below" in n for n in plan.notes)


def test_annotate_check_is_counted_on_the_check_judge():
    spec = _spec()
    ann = spec.annotate.model_copy(update={"check": AnnotateCheck(judge_model="org/Judge-70B", sample=300)})
    rows = {r.stage.strip(): r for r in estimate(spec.model_copy(update={"annotate": ann})).rows}
    assert rows["annotate check"].work == "300 responses"
    assert rows["annotate check"].gpu_hours == pytest.approx(300 / (80 / 70) / 3600)  # a 70B judge: 80/70 resp/s
    ann = ann.model_copy(update={"check": AnnotateCheck(judge_model="org/Judge-70B", sample=5000)})
    assert {r.stage.strip(): r for r in estimate(spec.model_copy(update={"annotate": ann})).rows}[
        "annotate check"].work == "2,000 responses"  # no more than there are
    assert "annotate check" not in {r.stage.strip() for r in estimate(spec).rows}


def test_the_harm_judge_and_the_score_check_are_counted():
    """7 runs × 50 items per suite: the values judge, the safety LLM judge and its harm judge (8B: 10
    responses/s); score.check's 70B judge over 20 responses per judged suite, with each judge's prompts."""
    rows = {r.stage.strip(): r for r in estimate(_spec(score={
        "suites": {"safety": {"judges": ["strmatch", "llm"], "llm_judge": "org/Judge-8B", "harm_judge": "org/Guard-8B"}},
        "check": {"judge_model": "org/Judge-70B", "sample": 20}})).rows}
    assert rows["score"].work == "1,050 judge requests"
    assert rows["score"].gpu_hours == pytest.approx(3 * 7 * 50 / 10 / 3600)
    assert rows["score check"].work == "60 judge requests"  # values 20, safety 20 + harm 20
    assert rows["score check"].gpu_hours == pytest.approx(60 / (80 / 70) / 3600)
    assert "score check" not in {r.stage.strip() for r in estimate(_spec()).rows}


def test_adapters_per_group_from_memory_and_the_paper_saving_line(tiny_model):
    from runner.train.memory import adapters_per_group, group_memory_gb, model_shape

    t = load_spec(ROOT / "jobs" / "paper.yaml").train
    # one base copy; each adapter adds its state, each micro-batch in a forward its activations
    fwd = group_memory_gb(8, t, 2, 2) - group_memory_gb(8, t, 2, 1)
    state = group_memory_gb(8, t, 2, 1) - group_memory_gb(8, t, 1, 1)
    assert fwd > state > 0
    assert group_memory_gb(8, t, 5, 4) == pytest.approx(group_memory_gb(8, t, 1, 1) + 4 * state + 3 * fwd)
    k, per = adapters_per_group(8, t, 72, cells=57)
    assert 1 <= per <= k <= 57 and group_memory_gb(8, t, k, per) <= 72  # fits, and no larger choice does:
    assert k == 57 or group_memory_gb(8, t, k + 1, per) > 72
    assert per == k or group_memory_gb(8, t, per + 1, per + 1) > 72
    assert adapters_per_group(8, t, 1e6, cells=5) == (5, 5)  # never more than the cells
    assert adapters_per_group(8, t.model_copy(update={"gpus_per_worker": 0}), 1e6, cells=5) == (5, 1)  # CPU
    assert adapters_per_group(8, t.model_copy(update={"adapters_per_group": 2}), 1e6, cells=5) == (2, 2)
    assert adapters_per_group(8, t.model_copy(update={"adapters_per_group": 1}), 1e6, cells=5) == (1, 1)
    assert adapters_per_group(8, t.model_copy(update={"finetune": "full"}), 1e6, cells=5) == (1, 1)
    # a local model's own shape (config.json), else one from its size
    cfg = json.loads((Path(tiny_model) / "config.json").read_text())
    assert model_shape(0.0065, tiny_model) == (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"])
    assert model_shape(8) == pytest.approx((4402, 34.4, 128_256), rel=1e-3)
    notes = estimate(load_spec(ROOT / "jobs" / "paper.yaml")).notes
    line = next(n for n in notes if n.startswith("train.adapters_per_group"))
    groups = int(re.search(r"456 cells train in (\d+) worker groups", line).group(1))
    assert 8 <= groups < 456 and "GPU-hours of start-up saved" in line, line
    d = yaml.safe_load((ROOT / "jobs" / "paper.yaml").read_text())
    d["train"]["adapters_per_group"] = 1
    assert not any(n.startswith("train.adapters_per_group") for n in estimate(parse_spec(d)).notes)


def test_plan_counts_every_run_the_pipeline_evaluates(tmp_path, monkeypatch):
    """train.eval_at: generation, judge scoring and benchmarks cover each part-way adapter, and the
    plan's evaluated runs are the runs the pipeline builds (Study.runs), not a count of its own."""
    import hashlib

    import runner.models
    from runner.pipeline import Study
    # the offline_hub fixture's stand-in, set without it (raising=False) so that this test also runs,
    # and fails on its assertions, on commits from before hub commits entered the keys
    monkeypatch.setattr(runner.models, "hub_commit", lambda repo, revision=None:
                        hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest(), raising=False)
    spec = _spec()
    spec = spec.model_copy(update={
        "train": spec.train.model_copy(update={"eval_at": [0.25, 0.5, 1.0]}),
        "score": spec.score.model_copy(update={"benchmarks": ["gsm8k"]})})
    runs = Study(spec, base_dir=tmp_path).runs()
    plan = estimate(spec)
    assert plan.counts["evaluated runs"] == len(runs) == 1 + 6 * 3  # the base, 6 cells × 3 points
    assert plan.counts["generation requests"] == len(runs) * 100
    rows = {r.stage.strip(): r for r in plan.rows}
    # the base model at 12.5k tok/s, each of the 18 trained runs at the multi-LoRA rate
    assert rows["generate"].gpu_hours == pytest.approx(10_000 / 12_500 / 3600 + 18 * 10_000 / (12_500 * 0.7) / 3600)
    assert rows["score"].gpu_hours == pytest.approx(19 * 50 / 10 / 3600)
    assert rows["benchmarks"].gpu_hours == pytest.approx(19 * 1_319 * 256 / 12_500 / 3600)  # GSM8K: generations only


def test_measured_rates_take_the_defaults_place():
    """`valind plan --measure`'s rates (runner.measure) replace the defaults, labelled "measured";
    generation scales the measured model's rate to other sizes by 1/params_b; a spec's plan: wins."""
    spec = _spec()
    rates = {"train": {8.0: 3.0}, "judge": {"org/Judge-8B": 20.0}, "generate": (4.0, 10_000.0), "details": {}}
    rows = {r.stage.strip(): r for r in estimate(spec, measured=rates).rows}
    assert all(rows[s].source == "measured" for s in ("annotate", "train", "generate", "score"))
    assert rows["annotate"].gpu_hours == pytest.approx(2000 / 20 / 3600)
    assert rows["train"].gpu_hours == pytest.approx(6 * 100 / 3.0 / 3600)
    assert rows["generate"].gpu_hours == pytest.approx(10_000 / 5_000 / 3600 + 6 * 10_000 / (5_000 * 0.7) / 3600)
    assert rows["reference log-probs"].source == "default"  # not probed
    wins = {r.stage.strip(): r for r in estimate(_spec(train_pairs_per_s=2.0), measured=rates).rows}
    assert wins["train"].source == "spec plan:" and wins["annotate"].source == "measured"


@pytest.mark.slow
def test_plan_measure_on_the_smoke_spec(capsys):
    """`valind plan --measure` on a local Ray cluster: DPO steps of the tiny model through train_cell,
    a judge batch and a generation batch through the engine pools; the second plan is from them."""
    from runner.measure import plan_spec

    spec = load_spec(ROOT / "jobs" / "smoke.yaml")
    plan = plan_spec(spec, "smoke", measure=True, steps=2)
    out = capsys.readouterr().out
    assert "smoke (default rates)" in out and "smoke (measured rates)" in out
    rows = {r.stage.strip(): r for r in plan.rows}
    assert {rows[s].source for s in ("annotate", "train", "generate", "score")} == {"measured"}
    assert all(rows[s].gpu_hours > 0 for s in rows)
    assert re.search(r"measured train tiny: pairs_per_s [\d.]+, steps 2", out), out
    assert "measured judge tiny" in out and "measured generate tiny" in out
