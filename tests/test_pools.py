"""Engine pools: which open pool serves a stage's requests; on a cluster they fill, generation closes
each base model's engines before the next model's start, and a pool whose actors cannot all be
placed goes on with those that started (fails when none did), saying what it asked for; it never hangs."""
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_generation_hands_the_cluster_from_one_base_model_to_the_next(tmp_path, tiny_model, ray_2cpu, capsys):
    from evaluation.types import Request
    from runner.engines.pool import EngineError, EnginePool
    from runner.pipeline import Study
    from runner.spec import parse_spec
    from runner.store import write_json

    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "tiny-b")  # a second base model (its own identity)
    d["models"] = [{"name": "a", "path": "tiny-llama"}, {"name": "b", "path": str(tmp_path / "tiny-b")}]
    d["annotate"]["judge_model"] = "a"
    d["values"]["induced"] = ["humor"]
    d["controls"] = {"count": 1}
    d["train"]["finetune"] = "full"
    # two actors of one CPU each: every engine pool holds the whole (2-CPU) cluster
    d["engine"] = {"backend": "transformers", "actors": 2, "max_model_len": 256, "startup_timeout_s": 30}
    d["generate"] = {"suites": ["anthropomorphism"], "items_per_suite": 2, "sampling": {"max_tokens": 4}}
    d["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    study = Study(parse_spec(d), "", base_dir=tmp_path)
    study.store.mark_done("annotate", study.key("annotate"), {"pairs": 8, "unscored": 0})
    study.store.mark_done("curate", study.key("curate"), {"summary": "synthetic"})
    cells = [r for r in study.runs() if r.cell_key]
    for r in cells:  # fully fine-tuned cells: a copy of the base model each
        unit = study.store.unit("train", r.cell_key)
        shutil.copytree(tiny_model, unit / "model")
        (unit / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
        write_json({"train": study.spec.train.model_dump(mode="json"), "bf16": False}, unit / "cell.json")
        study.store.mark_done("train", r.cell_key)

    import ray
    gens = study.need("generate").generations  # six pools in turn (2 bases, 4 full cells), each filling the cluster
    assert len(gens) == 6 and all(Path(p).exists() for p in gens.values())
    assert len(study.ctx.pools._open) == 1  # the last one stays open, for the judges that can use it
    study.ctx.pools.close()
    assert ray.available_resources().get("CPU") == 2  # closed pools give their CPUs back before returning
    first_two = sorted(os.sched_getaffinity(0))[:2]
    for pool in study.ctx.pools.opened:  # the two actors of each pool compute on cores of their own
        assert sorted(c for cores in pool.cores for c in cores) == first_two, pool.cores

    ctx = study.ctx  # a pool opened while another holds the cluster closes that one first
    first = ctx.pools.get("a", path=str(study.store.unit("train", cells[0].cell_key) / "model"))
    ctx.pools.get("b", path=str(study.store.unit("train", cells[-1].cell_key) / "model"))
    assert first.actors == [] and len(ctx.pools._open) == 1
    with pytest.raises(EngineError, match=r"2 of 2 actor\(s\) did not start within 30s; each asks for 1 CPU and 0 GPU, the cluster has 0 CPU"):
        EnginePool(ctx.pools.config("a"), actors=2, startup_timeout_s=30)  # one that cannot be placed: a clear error
    ctx.pools.close()
    # three actors on two CPUs: the pool goes on with the two that started, and says what held the third
    pool = EnginePool(ctx.pools.config("a"), actors=3, startup_timeout_s=30, batch_size=1)
    assert pool.size == len(pool.actors) == 2 and ray.available_resources().get("CPU", 0) == 0
    reqs = [Request(messages=({"role": "user", "content": f"Count to {i}"},), max_tokens=2) for i in range(3)]
    assert len(pool.generate(reqs)) == 3
    pool.close()
    out = capsys.readouterr().out
    assert "1 of 3 actor(s) did not start within 30s" in out and "going on with 2" in out, out[-2000:]


@pytest.mark.slow
def test_a_dead_engine_actor_is_restarted_and_its_batch_resubmitted(tmp_path, tiny_model, monkeypatch):
    import ray

    from evaluation.types import Request
    from runner.cluster import init_ray
    from runner.engines import EngineConfig, EnginePool

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("VALIND_TEST_ENGINE_DIES", str(tmp_path / "died"))  # workers inherit it
    init_ray(num_cpus=2)
    try:
        cfg = EngineConfig(model=tiny_model, backend="transformers", max_model_len=256)
        reqs = [Request(messages=({"role": "user", "content": f"Count to {i}"},), max_tokens=4) for i in range(6)]
        pool = EnginePool(cfg, actors=1, batch_size=2)
        got = pool.generate(reqs)  # the actor dies on its first batch
        assert (tmp_path / "died").exists() and pool.restarts == 1
        assert got == pool.generate(reqs) and len(got) == 6  # resubmitted batches: same answers, in order
        pool.close()
    finally:
        ray.shutdown()



def test_an_open_pool_serves_what_it_can():
    """A LoRA pool serves base-model generation, and scoring only where its engine scores with
    adapters enabled (merged on CPUs); the judges reuse it then, else they get a pool of their own.
    Scoring with adapters asks for an engine that merges them (the adapter probe on GPUs)."""
    from types import SimpleNamespace

    from runner.pools import Pools

    pools = Pools(SimpleNamespace(model_path=lambda m: f"/models/{m}"))
    merged, vllm_lora, plain = (SimpleNamespace(lora_scores=x) for x in (True, False, True))
    pools._open[("/models/a", None, True)] = merged
    pools._open[("/models/b", None, True)] = vllm_lora
    assert pools.find("a") is merged and pools.find("a", scores=True) is merged
    assert pools.find("a", enable_lora=True) is merged and pools.find("a", path="/cells/x") is None
    assert pools.find("b") is vllm_lora and pools.find("b", scores=True) is None
    pools._open[("/models/b", None, False)] = plain
    assert pools.find("b", scores=True) is plain and pools.find("b", enable_lora=True) is vllm_lora
    assert pools.find("c") is None


def test_batches_are_cut_where_a_serial_engine_changes_adapter():
    from evaluation.types import Request
    from runner.engines.pool import EnginePool

    reqs = [Request(messages=({"role": "user", "content": f"{a}{i}"},), adapter=a)
            for a, n in (("x", 5), (None, 2), ("y", 3)) for i in range(n)]
    pool = object.__new__(EnginePool)
    pool.batch_size, pool.serial_adapters = 4, True
    assert [[r.adapter for r in b] for b in pool._batches(reqs)] == [["x"] * 4, ["x"], [None] * 2, ["y"] * 3]
    pool.serial_adapters = False  # vLLM's LoRA path batches adapters together
    assert [len(b) for b in pool._batches(reqs)] == [4, 4, 2]


def test_fixed_chunks_make_the_batches_whatever_the_pool():
    """token_logprobs' `chunk`: each adapter's requests in batches of that many, whatever the pool's
    batch size or engine, so the adapter probe computes every side in the same batches."""
    from evaluation.types import ScoreRequest
    from runner.engines.pool import EnginePool

    reqs = [ScoreRequest(messages=({"role": "user", "content": f"q{i}"},), continuation="x", adapter=a)
            for a in (None, "zero", "x") for i in range(10)]
    layouts = []
    for batch_size, serial in ((4, True), (64, False), (3, False)):
        pool = object.__new__(EnginePool)
        pool.batch_size, pool.serial_adapters = batch_size, serial
        layouts.append([[(r.adapter, r.messages) for r in b] for b in pool._batches(reqs, chunk=8)])
    assert layouts[0] == layouts[1] == layouts[2]
    assert [len(b) for b in layouts[0]] == [8, 2] * 3
    # each adapter's texts in the same batches
    assert [[m for _, m in b] for b in layouts[0][:2]] == [[m for _, m in b] for b in layouts[0][2:4]]


def test_a_cpu_engine_is_compiled_for_long_generation_unless_the_spec_says(tmp_path):
    from runner.pipeline import Study
    from runner.pools import CPU_COMPILE_MIN_TOKENS
    from runner.spec import parse_spec

    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    m = d["models"][0]["name"]
    pools = Study(parse_spec(d), "", base_dir=tmp_path).ctx.pools
    assert not pools.config(m).cpu_compile  # judges and short generation: eager starts in half the time
    assert not pools.config(m, tokens=CPU_COMPILE_MIN_TOKENS - 1).cpu_compile
    assert pools.config(m, enable_lora=True, tokens=CPU_COMPILE_MIN_TOKENS).cpu_compile
    for setting in (True, False):
        d.setdefault("engine", {})["cpu_compile"] = setting
        pools = Study(parse_spec(d), "", base_dir=tmp_path).ctx.pools
        assert pools.config(m).cpu_compile is setting
        assert pools.config(m, tokens=10 * CPU_COMPILE_MIN_TOKENS).cpu_compile is setting


def test_scoring_with_adapters_asks_for_an_engine_that_merges_them(tmp_path):
    """vLLM's LoRA path (GPUs) gives no prompt log-probs; the adapter probe's pool merges adapters
    into the weights there too."""
    from runner.engines.vllm_engine import engine_kwargs
    from runner.pipeline import Study
    from runner.spec import parse_spec

    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    pools = Study(parse_spec(d), "", base_dir=tmp_path).ctx.pools
    generating, probing = pools.config("tiny", enable_lora=True), pools.config("tiny", enable_lora=True, scores=True)
    assert (generating.lora_mode, probing.lora_mode) == ("auto", "merge")
    assert pools.config("tiny", scores=True).lora_mode == "auto"  # no adapters: nothing to merge
    on_gpu = engine_kwargs(generating, gpu=True), engine_kwargs(probing, gpu=True)
    assert on_gpu[0]["enable_lora"] and "worker_extension_cls" not in on_gpu[0]
    assert on_gpu[1]["worker_extension_cls"] == "runner.engines.merge.MergedWeights" and "enable_lora" not in on_gpu[1]
