"""Many adapters trained together on one base (runner.train.group): each equals its cell trained alone."""
import sys
from pathlib import Path

import pytest
import torch

from runner.spec import LoraSpec, TrainSpec
from runner.train.cell import Cell

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def _examples(tiny_model, data_dir, n):
    from transformers import AutoTokenizer

    from runner.data.sources import load_pairs
    from runner.spec import SourceSpec
    from runner.train.batches import encode_pairs
    from runner.train.launch import compute_reference_logps

    pairs, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", max_pairs=n), data_dir, 4000)
    ex = encode_pairs(AutoTokenizer.from_pretrained(tiny_model), pairs, 96)
    for e, (c, r) in zip(ex, compute_reference_logps(tiny_model, ex, 4, 2, False)):
        e.ref_chosen, e.ref_rejected = c, r
    return ex


def _alone(cell, examples):
    """A cell trained alone with peft's own (unrouted) adapter: the math of runner.train.loop (the
    GPU check's grouped-LoRA step compares with the same function)."""
    from group_check import alone
    return alone(cell, examples, torch.device("cpu"))[1]


@pytest.mark.parametrize("checkpointing,per_forward", [(False, None), (True, 2)])
def test_adapters_trained_together_equal_each_alone(tiny_model, data_dir, checkpointing, per_forward):
    from runner.train.adapters import adapter_state
    from runner.train.group import build_group, run_steps

    torch.set_num_threads(2)
    examples = _examples(tiny_model, data_dir, 24)
    train = TrainSpec(batch_size=4, micro_batch_size=2, workers=1, max_length=96, lr=2e-3, epochs=1, bf16=False,
                      gradient_checkpointing=checkpointing, lora=LoraSpec(r=4, alpha=8))
    # unequal subsets: 3, 5 and 4 optimizer steps
    subsets = [examples[:12], examples[4:24], examples[8:24]]
    cells = [Cell(cell_id=f"c{k}", seed=s, train=train, pairs="", model_path=tiny_model, model_id="tiny",
                  out_dir="", work_dir="", ref_cache="") for k, s in enumerate([5, 6, 7])]
    model, router, slots = build_group(cells, subsets, torch.device("cpu"))
    steps = [len(s) for s in run_steps(model, router, slots, 0, torch.device("cpu"), per_forward=per_forward)]
    assert steps == [3, 3, 3, 2, 1], steps  # adapters in each group step (3, 5 and 4 steps)
    for cell, slot, ex in zip(cells, slots, subsets):
        together, alone = adapter_state(model, slot.name), _alone(cell, ex)
        assert together.keys() == alone.keys() and together
        worst = max((together[k] - alone[k]).abs().max().item() for k in alone)
        print(f"{cell.cell_id}: max |together - alone| {worst:.2e}")
        assert worst < 1e-5, (cell.cell_id, worst)
        moved = max(together[k].abs().max().item() for k in together if "lora_B" in k)
        assert moved > 1e-3  # the adapter trained (lora_B starts at zero)
        assert [h["step"] for h in slot.history] == list(range(1, len(ex) // 4 + 1))
        assert slot.history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1


@pytest.mark.slow
def test_a_group_on_ray_train_resumes_each_adapter_from_its_eval_at_save_and_equals_deepspeed_alone(tmp_path, tiny_model, data_dir):
    """Two workers, fp32. A group {a, b} loses a worker after its step 2 with no restarts left; a new
    group {b, a, c} (other slots, one more cell) resumes a and b from their own checkpoints and starts
    c. With checkpoint_every past the end, the resume points are the eval_at saves (0.25: a's step 1
    of 4, b's step 2 of 6). Every adapter, final and part-way, equals its cell trained alone by the
    DeepSpeed path."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from runner.cluster import init_ray
    from runner.data.sources import load_pairs
    from runner.spec import SourceSpec
    from runner.train.launch import TrainError, train_cell, train_group

    init_ray(2)
    pairs, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", max_pairs=16), data_dir, 4000)
    subsets = {"a": pairs[:8], "b": pairs[4:16], "c": pairs[8:16]}
    for k, p in subsets.items():
        p.to_parquet(tmp_path / f"{k}.parquet")
    train = TrainSpec(batch_size=4, micro_batch_size=1, workers=2, max_length=96, lr=1e-3, epochs=2, bf16=False,
                      checkpoint_every=100, max_failures=0, eval_at=[0.25])
    tok = AutoTokenizer.from_pretrained(tiny_model)

    def cell(k, where, seed):
        return Cell(cell_id=k, seed=seed, train=train, pairs=str(tmp_path / f"{k}.parquet"), model_path=tiny_model,
                    model_id="tiny", out_dir=str(tmp_path / where / k), work_dir=str(tmp_path / where / "ray"),
                    ref_cache=str(tmp_path / "ref"))

    seeds = {"a": 3, "b": 4, "c": 5}
    with pytest.raises(TrainError, match="training failed"):
        train_group([cell("a", "group", 3), cell("b", "group", 4)], tok, fail_at_step=2)
    assert not (tmp_path / "group" / "a").exists()  # nothing published
    train_group([cell("b", "group", 4), cell("a", "group", 3), cell("c", "group", 5)], tok, per_forward=2)
    for k in "abc":
        alone = cell(k, "alone", seeds[k])
        train_cell(alone, tok)
        meta = json.loads((tmp_path / "group" / k / "cell.json").read_text())
        starts = meta["timing"]["starts"]
        assert meta["group"] == ["b", "a", "c"]
        assert starts == {"a": [0, 1], "b": [0, 2], "c": [0]}[k], (k, starts)  # each from its eval_at save
        hist = [json.loads(x) for x in (tmp_path / "group" / k / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in hist] == list(range(1, 2 * len(subsets[k]) // 4 + 1))
        for sub in ("model", "progress/0.25"):
            g = load_file(tmp_path / "group" / k / sub / "adapter_model.safetensors")
            a = load_file(tmp_path / "alone" / k / sub / "adapter_model.safetensors")
            assert g.keys() == a.keys() and g
            worst = max((g[n] - a[n]).abs().max().item() for n in g)
            print(f"{k} {sub}: starts {starts}, max |group - alone| {worst:.2e}")
            assert worst < 1e-5, (k, sub, worst)
        assert not (tmp_path / "group" / "ray" / k).exists()  # the work dir is cleaned once published


def test_step_notes_feed_the_progress_bar(tmp_path):
    from runner.train.loop import record_step, steps_done

    cells = [Cell(cell_id=f"c{k}", seed=k, train=TrainSpec(bf16=False), pairs="", model_path="", model_id="",
                  out_dir="", work_dir=str(tmp_path), ref_cache="") for k in range(3)]
    for c in cells[:2]:
        (tmp_path / c.cell_id).mkdir()
    record_step(cells[0], 3, 10)
    record_step(cells[1], 10, 10)
    assert steps_done(cells) == (13, 20)  # c2 has not started


def test_heap_cap_hands_back_a_fragmented_heap_only_when_it_has_grown():
    import psutil
    import torch

    from runner.train.group import HeapCap

    assert HeapCap(torch.device("cuda"))._trim is None  # GPUs: nothing to do
    proc, trims = psutil.Process(), []
    heap = HeapCap(torch.device("cpu"))
    trim, heap._trim = heap._trim, lambda pad: trims.append(trim(pad))
    trim(0)  # what earlier tests left free: handed back before the base is read
    heap.ratio = 1 + 200e6 / proc.memory_info().rss  # the cap: 200 MB above the base
    heap()  # the level after the first forward
    small = [bytearray(b"x" * 100_000) for _ in range(1000)]  # 100 MB of malloc'd (not mmapped) blocks
    del small[:-1]
    heap()
    assert trims == []  # below the cap: left as it is
    chunks = [bytearray(b"x" * 100_000) for _ in range(4000)]  # 400 MB
    del chunks[:-1]  # freed, but the last one keeps the heap's top: nothing returns to the OS by itself
    grown = proc.memory_info().rss
    heap()
    assert len(trims) == 1 and proc.memory_info().rss < grown - 300e6
