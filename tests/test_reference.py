"""DPO's reference log-probs computed inside the worker group (runner.train.reference.worker_references)."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from runner.spec import LoraSpec, TrainSpec
from runner.train.cell import Cell

SIZES = (10, 7)  # micro-batches of 4 pairs: [4, 4, 2] and [4, 3], 5 in all: 3 for rank 0, 2 for rank 1


def _subsets(tiny_model, data_dir):
    from transformers import AutoTokenizer

    from runner.data.sources import load_pairs
    from runner.spec import SourceSpec
    from runner.train.batches import encode_pairs

    pairs, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", max_pairs=sum(SIZES)), data_dir, 4000)
    ex = encode_pairs(AutoTokenizer.from_pretrained(tiny_model), pairs, 96)
    return [ex[:SIZES[0]], ex[SIZES[0]:]]


def _cells(tiny_model, finetune, n):
    train = TrainSpec(workers=2, max_length=96, bf16=False, finetune=finetune, lora=LoraSpec(r=4, alpha=8))
    return [Cell(cell_id=f"c{k}", seed=5 + k, train=train, pairs="", model_path=tiny_model, model_id="tiny",
                 out_dir="", work_dir="", ref_cache="") for k in range(n)]


def _moved(model):
    """Every LoRA B non-zero: an adapter left on would change the log-probs (peft starts B at zero)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)


def _worker(rank, tiny_model, data_dir, tmp):
    """One rank of a gloo group of 2, as a training worker runs at step 0: each loop's model and call."""
    import torch.distributed as dist

    from runner.train.batches import response_logps
    from runner.train.group import build_group
    from runner.train.loop import build_model
    from runner.train.reference import cache_paths, worker_references

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    cpu, out = torch.device("cpu"), {}
    for loop, finetune in (("cell", "full"), ("cell", "lora"), ("group", "lora")):
        subsets = _subsets(tiny_model, data_dir)
        paths = [str(p) for p in cache_paths("tiny", False, subsets, f"{tmp}/{loop}-{finetune}")]
        if loop == "group":  # three cells, two of them seeds of one condition: the same pairs, one path
            subsets, paths = subsets + [copy.deepcopy(subsets[0])], paths + [paths[0]]
            model, router, _ = build_group(_cells(tiny_model, "lora", 3), subsets, cpu)
        else:
            model, router = build_model(_cells(tiny_model, finetune, 1)[0]), None
        _moved(model)
        worker_references(model, subsets, paths, 0, cpu, rank, 2, router=router)
        out[f"{loop}-{finetune}"] = [[(e.ref_chosen, e.ref_rejected) for e in ex] for ex in subsets]
        if finetune == "lora" and loop == "cell":  # the adapter is live: it would have changed the numbers
            from runner.train.batches import pair_batch
            with torch.no_grad():
                out["adapter on"] = response_logps(model.eval(), pair_batch(subsets[0][:4], 0)).tolist()
    # a restarted group: the cache rank 0 wrote is read (planted numbers prove it), nothing recomputed
    subsets = _subsets(tiny_model, data_dir)
    path = cache_paths("tiny", False, subsets[:1], f"{tmp}/planted")[0]
    if rank == 0:
        path.parent.mkdir()
        path.write_text(json.dumps([[-1.0, -2.0]] * SIZES[0]))
    dist.barrier()
    worker_references(None, subsets[:1], [str(path)], 0, cpu, rank, 2)
    out["planted"] = [(e.ref_chosen, e.ref_rejected) for e in subsets[0]]
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.mark.slow
def test_reference_in_the_worker_group_equals_the_separate_pass(tmp_path, tiny_model, data_dir):
    """2 gloo ranks, uneven shares, fp32: each loop's model (full fine-tuning, a LoRA cell with its adapter
    disabled, a group's routed adapters routed nowhere) gives today's separate pass to 1e-5 on every
    rank, the cache rank 0 writes is that pass in the cache's format, and a cache found is read."""
    from runner.train.reference import REF_MICRO, cache_paths, cached_logps, subsets_logps

    torch.multiprocessing.spawn(_worker, args=(tiny_model, str(data_dir), str(tmp_path)), nprocs=2)
    subsets = _subsets(tiny_model, data_dir)
    separate = subsets_logps(tiny_model, subsets, REF_MICRO, 2, False, False)
    for rank in (0, 1):
        out = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        for key in ("cell-full", "cell-lora", "group-lora"):
            got = out[key]
            want = separate + [separate[0]] if key.startswith("group") else separate
            assert [len(v) for v in got] == [len(v) for v in want]
            worst = max(abs(a - b) for g, w in zip(got, want) for x, y in zip(g, w) for a, b in zip(x, y))
            print(f"rank {rank} {key}: max |in group - separate| {worst:.2e}")
            assert worst < 1e-5, (rank, key, worst)
        on = out["adapter on"]
        off = [c for c, _ in separate[0][:4]] + [r for _, r in separate[0][:4]]
        assert max(abs(a - b) for a, b in zip(on, off)) > 1e-3  # so disabling it is what made them equal
        assert out["planted"] == [[-1.0, -2.0]] * SIZES[0]
    for key in ("cell-full", "cell-lora", "group-lora"):
        for path, want in zip(cache_paths("tiny", False, subsets, str(tmp_path / key)), separate):
            cached = cached_logps(path, len(want))  # the format the driver reads: a whole [chosen, rejected] list
            assert cached is not None and max(abs(a - b) for x, y in zip(cached, want) for a, b in zip(x, y)) < 1e-5
    assert len(os.listdir(tmp_path / "group-lora")) == 2  # seeds of one condition: one file


def test_no_separate_reference_task_is_asked_of_the_cluster():
    """4 workers of 8 CPUs on nodes of 16 CPUs fit (two nodes); the separate reference task wanted all
    32 CPUs on one node and refused this spec, though it no longer runs (the workers compute it)."""
    import yaml

    from runner import cluster_fit
    from runner.spec import parse_spec

    d = yaml.safe_load((Path(__file__).resolve().parent.parent / "jobs" / "smoke.yaml").read_text())
    d["cluster"] = {"nodes": 2, "gpus_per_node": 8, "cpus_per_node": 16}
    d["train"] = {**d.get("train", {}), "method": "dpo", "workers": 4, "cpus_per_worker": 8, "gpus_per_worker": 1}
    spec = parse_spec(d)
    assert cluster_fit.problems(spec, cluster_fit.declared(spec)) == []
    d["cluster"]["cpus_per_node"] = 15  # the workers themselves still count
    assert [f for f, _ in cluster_fit.problems(parse_spec(d), cluster_fit.declared(parse_spec(d)))] == ["train.workers"]


def test_plan_counts_the_reference_phase_on_every_gpu_of_the_trials():
    """4 GPUs, trials of 2 workers × 1 GPU: 2 trials at once, each computing references on both its GPUs
    (the separate task used 1 GPU per trial: 2 GPUs, twice the wall)."""
    import yaml

    from runner.plan import estimate
    from runner.spec import parse_spec

    spec = parse_spec(yaml.safe_load(yaml.safe_dump({
        "study": {"name": "p"}, "models": [{"name": "m", "path": "org/Model-8B"}],
        "values": {"induced": ["humor", "fairness"]}, "controls": {"count": 1}, "seeds": {"values": [0, 1]},
        "data": {"sources": [{"name": "ultrafeedback", "max_pairs": 1000}], "subset_size": 100},
        "annotate": {"judge_model": "org/Judge-8B"},
        "train": {"max_length": 2048, "epochs": 1, "workers": 2, "gpus_per_worker": 1, "batch_size": 8},
        "plan": {"efficiency": 1.0}, "cluster": {"nodes": 1, "gpus_per_node": 4}})))
    row = next(r for r in estimate(spec).rows if r.stage.strip() == "reference log-probs")
    assert row.gpus == 4 and "each trial's 2 GPUs" in row.work
    assert row.wall_hours == pytest.approx(row.gpu_hours / 4)
