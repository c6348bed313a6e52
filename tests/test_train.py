"""Training through Ray Train + DeepSpeed on CPU: a real DPO cell, and recovery from a dead worker."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _cell(tmp: Path, tiny_model: str, data_dir: Path, name: str, fail_at_step=None):
    from transformers import AutoTokenizer

    from runner.cluster import init_ray
    from runner.data.sources import load_pairs
    from runner.spec import SourceSpec, TrainSpec
    from runner.train.cell import Cell
    from runner.train.launch import bf16_enabled, train_cell

    init_ray(2)
    subset = tmp / "pairs.parquet"
    if not subset.exists():
        pairs, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", max_pairs=8), data_dir, 4000)
        pairs.to_parquet(subset)
    train = TrainSpec(batch_size=4, micro_batch_size=1, workers=2, zero_stage=2, max_length=96, lr=1e-3,
                      epochs=2, checkpoint_every=1, max_failures=1, eval_at=[0.25, 0.5])
    train = train.model_copy(update={"bf16": bf16_enabled(train)})  # as the driver does, once
    out = tmp / name
    cell = Cell(cell_id=name, seed=3, train=train, pairs=str(subset), model_path=tiny_model, model_id="tiny",
                out_dir=str(out), work_dir=str(tmp / "ray"), ref_cache=str(tmp / "ref"))
    res = train_cell(cell, tokenizer=AutoTokenizer.from_pretrained(tiny_model), fail_at_step=fail_at_step)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "cell.json").read_text())
    timing = meta.pop("timing")
    assert timing["end"] > timing["start"] and 0 < timing["steps_s"] < timing["end"] - timing["start"]
    res["starts"] = timing["starts"]
    assert meta == {"cell_id": name, "key": "", "seed": 3, "n_pairs": 8, "ref_cache_hit": res["ref_cache_hit"],
                    "steps": 4, "epochs": 2.0,  # 8 pairs, batch 4, 2 epochs (runner.train.doses)
                    "train": train.model_dump(mode="json"), "bf16": train.bf16, "system_prompt": None}
    return out, history, res


def test_cell_needs_resolved_bf16():
    from runner.spec import TrainSpec
    from runner.train.cell import Cell

    args = dict(cell_id="c", seed=0, pairs="p.parquet", model_path="m", model_id="m", out_dir="o", work_dir="w",
                ref_cache="r")
    with pytest.raises(ValueError, match="resolve train.bf16 before building a Cell"):
        Cell(train=TrainSpec(), **args)  # bf16: "auto"
    cell = Cell(train=TrainSpec(bf16=False), **args)
    with pytest.raises(AttributeError):
        cell.seed = 1  # frozen


def test_dead_worker_recovers_to_the_same_adapter(tmp_path, tiny_model, data_dir):
    clean, hist, res = _cell(tmp_path, tiny_model, data_dir, "clean")
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert hist[-1]["loss"] < hist[0]["loss"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "lr", "tokens_per_s"):
        assert key in hist[-1]
    assert not res["ref_cache_hit"] and res["starts"] == [0]
    # Intermediate checkpoints hold the adapter and its optimizer state, not the frozen base (29 MB)
    ckpt_mb = [h["checkpoint_mb"] for h in hist if "checkpoint_mb" in h]
    assert len(ckpt_mb) == 3 and max(ckpt_mb) < 0.1 * sum(
        p.stat().st_size for p in Path(tiny_model).glob("*.safetensors")) / 2**20, ckpt_mb

    killed, hist_k, res_k = _cell(tmp_path, tiny_model, data_dir, "killed", fail_at_step=2)
    assert res_k["ref_cache_hit"]  # same model and subset: the reference log-probs came from disk
    assert res_k["starts"] == [0, 1]  # the worker group restarted once, from the step-1 checkpoint
    assert [h["step"] for h in hist_k] == [1, 2, 3, 4]
    a = load_file(clean / "model" / "adapter_model.safetensors")
    b = load_file(killed / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert any(torch.count_nonzero(a[k]) for k in a if "lora_B" in k)  # the adapter actually trained
    # train.eval_at: the adapters after steps 1 and 2 of 4, the same whether or not a worker died
    # (the killed run lost step 2's and redid it from the step-1 checkpoint)
    part = {f: load_file(clean / "progress" / f / "adapter_model.safetensors") for f in ("0.25", "0.5")}
    for f, adapter in part.items():
        again = load_file(killed / "progress" / f / "adapter_model.safetensors")
        assert max((adapter[k] - again[k]).abs().max().item() for k in adapter) < 1e-5, f
    steps = [part["0.25"], part["0.5"], a]
    for x, y in zip(steps, steps[1:]):  # each one further along
        assert max((x[k] - y[k]).abs().max().item() for k in x) > 1e-4


def test_comm_op_load_survives_a_lock_left_by_a_killed_worker(tmp_path):
    """torch's JIT lock file, left by a worker killed mid-load, must not hang the next cell (it did)."""
    import os
    import shutil
    import subprocess
    import sys

    built = Path(os.environ["TORCH_EXTENSIONS_DIR"], "deepspeed_shm_comm")  # `make setup` builds it
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / built.name)
    (ext / built.name / "lock").touch()  # what a SIGKILL during the load leaves behind
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "DS_ACCELERATOR": "cpu"}
    load = ("from runner.train.loop import load_comm_op; load_comm_op(); "
            "from deepspeed.comm.torch import build_shm_op; print(build_shm_op().__file__)")
    out = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(str(ext / built.name / "deepspeed_shm_comm.so"))
    assert not (ext / built.name / "lock").exists()
