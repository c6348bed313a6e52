"""Grouped LoRA training under memory pressure (runner.train.group, runner.stages.train): an
out-of-memory step retried at half the adapters per forward, groups split once one per forward is
too many, the memory model's logits term, and `valind run` refusing a layout that cannot fit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from runner.spec import LoraSpec, TrainSpec, parse_spec
from runner.train.cell import Cell, Group

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def examples(tiny_model, data_dir):
    from transformers import AutoTokenizer

    from runner.data.sources import load_pairs
    from runner.spec import SourceSpec
    from runner.train.batches import encode_pairs
    from runner.train.launch import compute_reference_logps

    pairs, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", max_pairs=16), data_dir, 4000)
    ex = encode_pairs(AutoTokenizer.from_pretrained(tiny_model), pairs, 96)
    for e, (c, r) in zip(ex, compute_reference_logps(tiny_model, ex, 4, 2, False)):
        e.ref_chosen, e.ref_rejected = c, r
    return ex


def _cells(tiny_model, n, tmp_path=None):
    train = TrainSpec(batch_size=4, micro_batch_size=2, workers=1, max_length=96, lr=2e-3, epochs=1, bf16=False,
                      lora=LoraSpec(r=4, alpha=8))
    return [Cell(cell_id=f"c{k}", seed=5 + k, train=train, pairs="", model_path=tiny_model, model_id="tiny",
                 out_dir="", work_dir=str(tmp_path or ""), ref_cache="") for k in range(n)]


def test_an_out_of_memory_at_4_per_forward_finishes_at_2_equal_to_a_clean_run(tiny_model, examples, monkeypatch,
                                                                             capsys):
    """fp32, 4 adapters (2, 2, 2 and 3 optimizer steps). A forward of more than 2 adapters' micro-batches
    runs out of memory (injected: VALIND_OOM_ABOVE, on every attempt): the first step is taken again at
    2 per forward, and every adapter equals the clean run's at 4 per forward."""
    from runner.train.adapters import adapter_state
    from runner.train.group import OOM_ABOVE_ENV, build_group, run_steps

    torch.set_num_threads(2)
    subsets = [examples[:8], examples[4:12], examples[8:16], examples[:12]]
    cells = _cells(tiny_model, 4)

    def trained(oom_above):
        if oom_above is None:
            monkeypatch.delenv(OOM_ABOVE_ENV, raising=False)
        else:
            monkeypatch.setenv(OOM_ABOVE_ENV, str(oom_above))
        model, router, slots = build_group(cells, subsets, CPU)
        stepped = [len(s) for s in run_steps(model, router, slots, 0, CPU, per_forward=4)]
        assert stepped == [4, 4, 1]
        return {s.name: adapter_state(model, s.name) for s in slots}, slots

    clean, clean_slots = trained(None)
    assert "out of memory" not in capsys.readouterr().out
    got, slots = trained(2)
    assert "out of memory at 4 adapters per forward; taking the step again at 2 per forward" in capsys.readouterr().out
    assert [h["per_forward"] for h in clean_slots[3].history] == [4, 4, 1]
    assert [h["per_forward"] for h in slots[3].history] == [2, 2, 1]  # the last step: one adapter left
    for s, c in zip(slots, clean_slots):
        assert [h["step"] for h in s.history] == [h["step"] for h in c.history]
        worst = max((got[s.name][k] - clean[s.name][k]).abs().max().item() for k in clean[s.name])
        print(f"{s.cell.cell_id}: max |after out of memory - clean| {worst:.2e}")
        assert worst < 1e-5, (s.cell.cell_id, worst)
        assert max(v.abs().max().item() for k, v in got[s.name].items() if "lora_B" in k) > 1e-3  # it trained


def test_out_of_memory_at_one_per_forward_leaves_each_adapter_to_resume_in_a_smaller_group(tiny_model, examples,
                                                                                          tmp_path, monkeypatch, capsys):
    """fp32, 2 adapters (2 and 3 steps). From step 2 on every forward runs out of memory (injected): the
    step is tried at 2 per forward, then 1, then GroupOutOfMemory leaves both adapters as after step 1.
    The worker's leave_for_split saves them with their notes; each, resumed in a group of one (as a
    split ends), finishes equal to the clean run."""
    from runner.train.adapters import adapter_state
    from runner.train.group import (OOM_ABOVE_ENV, GroupOutOfMemory, _resume, build_group, leave_for_split,
                                    out_of_memory, run_steps)

    torch.set_num_threads(2)
    cells, subsets = _cells(tiny_model, 2, tmp_path), [examples[:8], examples[4:16]]
    monkeypatch.delenv(OOM_ABOVE_ENV, raising=False)
    model, router, slots = build_group(cells, subsets, CPU)
    list(run_steps(model, router, slots, 0, CPU, per_forward=2))
    clean = [adapter_state(model, s.name) for s in slots]

    model, router, slots = build_group(cells, subsets, CPU)
    steps = run_steps(model, router, slots, 0, CPU, per_forward=2)
    next(steps)
    after_one = [adapter_state(model, s.name) for s in slots]
    monkeypatch.setenv(OOM_ABOVE_ENV, "0")
    with pytest.raises(GroupOutOfMemory, match="a group of 2 adapters ran out of memory at 1 adapter per forward") as e:
        next(steps)
    assert "out of memory at 2 adapters per forward; taking the step again at 1 per forward" in capsys.readouterr().out
    for s, want in zip(slots, after_one):
        assert s.step == 1 and len(s.history) == 1 and all(p.grad is None for p in s.params)
        assert all(torch.equal(v, want[k]) for k, v in adapter_state(model, s.name).items())
    leave_for_split(model, slots, e.value)
    assert [out_of_memory(c) for c in cells] == ["a forward of one adapter of a group of 2 adapter(s)"] * 2

    monkeypatch.delenv(OOM_ABOVE_ENV)
    for cell, ex, want in zip(cells, subsets, clean):
        model, router, (slot,) = build_group([cell], [ex], CPU)
        assert _resume(model, slot) and slot.step == 1
        list(run_steps(model, router, [slot], 0, CPU))
        got = adapter_state(model, slot.name)
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        print(f"{cell.cell_id}: max |split and resumed - clean| {worst:.2e}")
        assert worst < 1e-5, (cell.cell_id, worst)


def test_out_of_memory_in_the_optimizer_step_resumes_each_adapter_from_its_last_checkpoint(tiny_model, examples,
                                                                                           tmp_path, monkeypatch):
    """fp32, 4 adapters of 3 steps, checkpointed after each step. At step 1 the optimizer step of a group
    of more than 2 runs out of memory once 2 adapters have stepped (injected: VALIND_OOM_STEP_ABOVE=2@1),
    so the adapters in memory are part-stepped: nothing is saved from them, and each adapter, resumed
    from its step-1 checkpoint in a group of 2, finishes equal to the clean run. Saving the memory's
    state instead (as after an OOM in a forward) is shown to give other adapters."""
    from runner.train.adapters import adapter_state
    from runner.train.group import (OOM_STEP_ENV, GroupOutOfMemory, _resume, _save, build_group, leave_for_split,
                                    out_of_memory, run_steps)

    torch.set_num_threads(2)
    cells, subsets = _cells(tiny_model, 4, tmp_path), [examples[:12], examples[4:16], examples[2:14], examples[:12]]
    monkeypatch.delenv(OOM_STEP_ENV, raising=False)
    model, router, slots = build_group(cells, subsets, CPU)
    list(run_steps(model, router, slots, 0, CPU, per_forward=4))
    clean = [adapter_state(model, s.name) for s in slots]

    def out_of_memory_at_step_1():
        model, router, slots = build_group(cells, subsets, CPU)
        steps = run_steps(model, router, slots, 0, CPU, per_forward=4)
        for s in next(steps):
            _save(model, s, final=False)  # as group_loop's checkpoint_every: 1
        monkeypatch.setenv(OOM_STEP_ENV, "2@1")
        with pytest.raises(GroupOutOfMemory, match="a group of 4 adapters ran out of memory in the optimizer step") as e:
            next(steps)
        monkeypatch.delenv(OOM_STEP_ENV)
        assert not e.value.intact and [s.step for s in slots] == [1] * 4
        return model, slots, e.value

    def resumed_in_pairs():
        got = []
        for pair in (slice(0, 2), slice(2, 4)):
            model, router, two = build_group(cells[pair], subsets[pair], CPU)
            assert all(_resume(model, s) and s.step == 1 for s in two)
            list(run_steps(model, router, two, 0, CPU, per_forward=1))
            got += [adapter_state(model, s.name) for s in two]
        return [max((g[k] - c[k]).abs().max().item() for k in c) for g, c in zip(got, clean)]

    model, slots, e = out_of_memory_at_step_1()
    leave_for_split(model, slots, e)
    assert [out_of_memory(c) for c in cells] == ["the optimizer step of a group of 4 adapter(s)"] * 4
    worst = resumed_in_pairs()
    print("max |split and resumed - clean| " + " ".join(f"{w:.2e}" for w in worst))
    assert max(worst) < 1e-5, worst

    model, slots, e = out_of_memory_at_step_1()
    e.intact = True  # broken on purpose: the part-stepped adapters saved as if intact
    leave_for_split(model, slots, e)
    wrong = resumed_in_pairs()
    print("saved part-stepped: " + " ".join(f"{w:.2e}" for w in wrong))
    assert min(wrong[:2]) > 1e-4 and max(wrong[2:]) < 1e-5, wrong  # the 2 that stepped took the step twice


def test_groups_that_ran_out_of_memory_split_in_halves_of_their_unpublished_cells(tmp_path, tiny_model):
    from runner.stages.train import split_out_of_memory
    from runner.train.group import oom_file, out_of_memory

    cells = _cells(tiny_model, 6, tmp_path)
    big, other, lone = Group(tuple(cells[:5]), 2), Group((cells[5],), 1), Group((cells[4],), 1)
    assert split_out_of_memory([big, other], lambda c: True) == []  # no note: nothing to split
    for c in cells:
        oom_file(c).parent.mkdir(parents=True, exist_ok=True)
        oom_file(c).write_text(json.dumps({"adapters": 5, "where": "the optimizer step"}))
    assert out_of_memory(cells[0]) == "the optimizer step of a group of 5 adapter(s)"
    published = {"c1"}
    split = split_out_of_memory([big, other], lambda c: c.cell_id not in published)
    assert [[c.cell_id for c in g.cells] for g in split] == [["c0", "c2"], ["c3", "c4"]]
    assert {g.per_forward for g in split} == {1}
    # halves of one: each a group of one, resumed from its checkpoint; a lone cell's error stands
    assert [[c.cell_id for c in g.cells] for g in split_out_of_memory(split[:1], lambda c: True)] == [["c0"], ["c2"]]
    assert split_out_of_memory([lone], lambda c: True) == []
    # a group's last cell, left out of memory alone (its note: a group of 1), is not run alone again
    oom_file(cells[3]).write_text(json.dumps({"adapters": 1, "where": "a forward of one adapter"}))
    assert split_out_of_memory([Group(tuple(cells[2:4]), 1)], lambda c: c.cell_id == "c3") == []
    assert [[c.cell_id for c in g.cells] for g in split_out_of_memory([Group(tuple(cells[3:5]), 1)],
                                                                     lambda c: c.cell_id == "c4")] == [["c4"]]


def test_the_logits_term_counts_the_fp32_copies_response_logps_makes():
    """The peak of response_logps' last lines (the upcast, logsumexp, gather; then backward), measured
    in fresh processes as peak resident memory (Linux's VmHWM) at 200 and 600 × 128,256 logits: the
    slope between the two, free of the process's fixed share, is the model's LOGIT_BYTES."""
    from runner.train.memory import LOGIT_BYTES, micro_batch_gb

    code = """
import sys, torch
torch.set_num_threads(1)
N, V = int(sys.argv[1]), 128256
x = torch.randn(N, 64, dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(V, 64, dtype=torch.bfloat16) * 0.01
target = torch.randint(0, V, (N,))
def kb(field):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) from here on
base = kb("VmRSS")
logits = (x @ w.T).float()  # as runner.train.batches.response_logps
tok = logits.gather(1, target.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
del logits
torch.zeros(1).index_add(0, torch.zeros(N, dtype=torch.long), tok).sum().backward()
print(kb("VmHWM") - base)
"""
    peak = {n: int(subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True,
                                  check=True).stdout) for n in (200, 600)}
    measured = (peak[600] - peak[200]) / (400 * 128_256)
    print(f"measured {measured:.2f} bytes per logit; the model counts {LOGIT_BYTES}")
    # 16.00 (two venvs here); the peak over one size alone adds a fixed 10-130 MB that varies by install.
    # Three fp32 copies would be 12.
    assert LOGIT_BYTES - 1 <= measured <= LOGIT_BYTES + 1
    t = TrainSpec(micro_batch_size=2, max_length=512, gradient_checkpointing=True, bf16=True)
    logits = 2 * 2 * 512 * 128_256 * LOGIT_BYTES / 1e9
    assert micro_batch_gb(8, t, (4096, 32, 128_256)) == pytest.approx(2 * 2 * 512 * 4096 * (2 * 32 + 34) / 1e9 + logits)


def _gpu_spec(tmp_path, gpu_gb: float) -> dict:
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path / "studies")
    d["train"].update(gpus_per_worker=1)
    d["cluster"] = {"nodes": 1, "gpus_per_node": 2, "cpus_per_node": 4, "gpu_memory_gb": gpu_gb}
    return d


def test_memory_problems_name_the_model_and_the_group_setting(tmp_path):
    from runner.plan import PlanError, estimate, memory_problems

    assert memory_problems(parse_spec(_gpu_spec(tmp_path, 80))) == []
    (field, why), = memory_problems(parse_spec(_gpu_spec(tmp_path, 0.1)))
    assert field == "train.adapters_per_group"
    assert why.startswith("train: tiny needs about") and "a group of a single LoRA adapter" in why
    d = _gpu_spec(tmp_path, 0.1)
    d["train"]["adapters_per_group"] = 1
    assert "each cell alone under DeepSpeed" in memory_problems(parse_spec(d))[0][1]
    with pytest.raises(PlanError, match="train: tiny needs about"):
        estimate(parse_spec(d))


def test_run_refuses_a_layout_that_cannot_fit_before_any_stage(tmp_path, monkeypatch):
    from runner.pipeline import Study
    from runner.spec import SpecError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = Study(parse_spec(_gpu_spec(tmp_path, 0.1)), base_dir=tmp_path)
    study.on_stage = lambda stage: pytest.fail(f"stage {stage} started")
    with pytest.raises(SpecError) as e:
        study.run()
    problems = dict(e.value.problems)
    assert list(problems) == ["train.adapters_per_group"], problems
    assert "(cluster.gpu_memory_gb × train.gpus_per_worker)" in problems["train.adapters_per_group"]


def test_checkpoints_by_time_are_resume_points(tiny_model, examples, tmp_path):
    """train.checkpoint_every_s: "auto" is 15 min on GPU workers and off on CPU ones; `time_due` says when
    it has passed (the DeepSpeed loop), and a group adapter saved because it was due (checkpoint_every
    far off) is the point a new group resumes it from. A save that ignored `due` would leave none."""
    import time

    from runner.train.group import _checkpoint, _resume, build_group, checkpoint_dir, run_steps
    from runner.train.loop import time_due

    assert TrainSpec(gpus_per_worker=1).checkpoint_seconds() == 900.0
    assert TrainSpec().checkpoint_seconds() is None and TrainSpec(checkpoint_every_s=30).checkpoint_seconds() == 30.0
    assert not time_due(None, 0.0, 1, CPU) and not time_due(3600.0, time.monotonic(), 1, CPU)
    assert time_due(0.0, time.monotonic(), 1, CPU)

    torch.set_num_threads(2)
    cell = _cells(tiny_model, 1, tmp_path)[0]  # checkpoint_every: 50, two steps in all
    model, router, (slot,) = build_group([cell], [examples[:8]], CPU)
    next(run_steps(model, router, [slot], 0, CPU))
    _checkpoint(model, slot, [], due=False)
    assert not (checkpoint_dir(cell) / "state.json").exists()  # step 1: neither due nor a checkpoint_every step
    _checkpoint(model, slot, [], due=True)
    model, router, (again,) = build_group([cell], [examples[:8]], CPU)
    assert _resume(model, again) and again.step == 1
