"""lm-eval benchmarks on the offline data: task loading, parity with lm-eval's CLI, LoRA, hub-only MMLU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from evaluation.benchmarks import (OFFLINE_TASKS, PER_ITEM_COLUMNS, BenchmarkError, model_args,  # noqa: E402
                                   run_benchmarks, write_task_dir)


def _loglik(raw: str) -> list[float]:
    return [ll for ll, _greedy in json.loads(raw)["filtered_resps"]]


@pytest.fixture(scope="module")
def base_run(tiny_model, data_dir):
    # a random model never stops early: cap GSM8K's generations to keep this cheap
    return run_benchmarks(tiny_model, None, list(OFFLINE_TASKS), data_dir, limit=5, backend="hf",
                          max_gen_toks=32)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # init_lora_weights=False: random B too, so the adapter actually changes the outputs
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, cfg).save_pretrained(out)
    return str(out)


def test_task_dir_renders_absolute_data_paths(data_dir, tmp_path):
    d = write_task_dir(data_dir, tmp_path / "tasks")
    text = (d / "valind_gsm8k.yaml").read_text()
    assert "@DATA_DIR@" not in text
    assert str(data_dir.resolve() / "qa" / "gsm8k-test.jsonl") in text
    assert (d / "utils.py").exists()
    with pytest.raises(BenchmarkError, match="missing benchmark data"):
        write_task_dir(tmp_path / "nowhere", tmp_path / "t2")


def test_unknown_task_and_backend(tiny_model, data_dir, tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark tasks"):
        run_benchmarks(tiny_model, None, ["arc_easy"], data_dir, limit=1)
    with pytest.raises(BenchmarkError, match="unknown backend"):
        model_args(tiny_model, None, "tgi")
    assert model_args("m", "/a", "hf")["peft"] == "/a"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 100}')
    args = model_args("m", str(adapter), "vllm")
    assert args["lora_local_path"] == str(adapter) and args["max_lora_rank"] == 128  # vLLM's next rank up


def test_offline_tasks_run_on_tiny_model(base_run):
    summary, items = base_run
    assert set(summary) == set(OFFLINE_TASKS)
    assert set(summary["valind_openbookqa"]) >= {"acc", "acc_norm"}
    assert "acc" in summary["valind_truthfulqa_mc"]
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(summary["valind_gsm8k"])
    assert list(items.columns) == list(PER_ITEM_COLUMNS)
    assert (items.suite == "qa").all() and (items.judge == "lm-eval").all() and items.scored.all()
    for task in OFFLINE_TASKS:
        ids = items.loc[items.item_id.str.startswith(task + "/"), "item_id"].unique().tolist()
        assert ids == [f"{task}/{i}" for i in range(5)]
    # each per-item metric averages to the summary value
    for (task, metric), v in items.assign(task=items.item_id.str.split("/").str[0]) \
            .groupby(["task", "metric"]).value.mean().items():
        assert summary[task][metric] == pytest.approx(v)
    # TruthfulQA MC1: the best answer plus every incorrect answer of the first CSV row (7)
    assert len(_loglik(items[items.item_id == "valind_truthfulqa_mc/0"].raw.iloc[0])) == 8


def test_matches_lm_eval_cli(tiny_model, data_dir, tmp_path):
    include = write_task_dir(data_dir, tmp_path / "tasks")
    out = tmp_path / "cli-out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={tiny_model},dtype=float32", "--tasks", "valind_openbookqa",
           "--include_path", str(include), "--limit", "8", "--batch_size", "1", "--device", "cpu",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli_results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["valind_openbookqa"]
    cli_samples = [json.loads(line) for line in next(out.rglob("samples_valind_openbookqa_*.jsonl")).open()]

    summary, items = run_benchmarks(tiny_model, None, ["valind_openbookqa"], data_dir, limit=8, batch_size=1)
    s = summary["valind_openbookqa"]
    assert s["acc"] == cli_results["acc,none"] and s["acc_norm"] == cli_results["acc_norm,none"]
    assert len(cli_samples) == 8
    for cs in cli_samples:
        mine = items[items.item_id == f"valind_openbookqa/{cs['doc_id']}"].set_index("metric")
        assert mine.loc["acc", "value"] == cs["acc"] and mine.loc["acc_norm", "value"] == cs["acc_norm"]
        # the CLI's samples file writes the floats as strings (repr), so exact equality holds
        assert _loglik(mine.loc["acc", "raw"]) == [float(ll) for ll, _ in cs["filtered_resps"]]


def test_lora_adapter_changes_loglikelihoods(base_run, tiny_model, adapter_dir, data_dir):
    summary, items = run_benchmarks(tiny_model, adapter_dir, ["valind_openbookqa"], data_dir, limit=5)
    assert {"acc", "acc_norm"} <= set(summary["valind_openbookqa"])
    base = base_run[1]
    base = base[base.item_id.str.startswith("valind_openbookqa/") & (base.metric == "acc")]
    mine = items[items.metric == "acc"]
    assert mine.item_id.tolist() == base.item_id.tolist()  # the runs pair up item by item
    for a, b in zip(mine.raw, base.raw):
        la, lb = _loglik(a), _loglik(b)
        assert len(la) == len(lb) and la != pytest.approx(lb, abs=1e-4)


def test_mmlu_offline_fails_naming_the_dataset(tiny_model, data_dir):
    # conftest sets HF_HUB_OFFLINE=1; without it the hub is unreachable here all the same
    with pytest.raises(BenchmarkError, match=r"valind_mmlu.*'cais/mmlu'.*not available offline"):
        run_benchmarks(tiny_model, None, ["valind_mmlu"], data_dir, limit=2)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("VALIND_TEST_VLLM"),
                    reason="vLLM start-up takes ~1 min per run on CPU; set VALIND_TEST_VLLM=1")
def test_vllm_backend_matches_hf_and_applies_lora(base_run, tiny_model, adapter_dir, data_dir):
    pytest.importorskip("vllm")
    base = base_run[1]
    base = base[base.item_id.str.startswith("valind_openbookqa/") & (base.metric == "acc")].head(3)
    _, plain = run_benchmarks(tiny_model, None, ["valind_openbookqa"], data_dir, limit=3, backend="vllm")
    _, lora = run_benchmarks(tiny_model, adapter_dir, ["valind_openbookqa"], data_dir, limit=3, backend="vllm")
    plain, lora = plain[plain.metric == "acc"], lora[lora.metric == "acc"]
    assert plain.item_id.tolist() == lora.item_id.tolist() == base.item_id.tolist()
    for p, lo, b in zip(plain.raw, lora.raw, base.raw):
        assert _loglik(p) == pytest.approx(_loglik(b), abs=1e-3)  # different kernels, same model
        assert _loglik(lo) != pytest.approx(_loglik(p), abs=1e-4)
