"""The adapter probe end to end on real engines: the generate stage's `probe` on the merging vLLM
pool that generates, then evaluation.sanity.adapter_check. An adapter that changes nothing (a zero
adapter) and one trained at lr 1e-9 are flagged; adapters trained at the demo's lr pass. SmolLM2 in
bf16 is the demo's engine, where rounding alone moves log-probs as much as an lr≈0 adapter does."""
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _trained(model_dir, lora, lr, out, steps=2) -> str:
    """A LoRA adapter trained in-process by peft (SFT on two sentences, AdamW at `lr`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.train.adapters import add_lora

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora, seed=0)
    batch = tok(["Ahoy there! The sea is calm and the ship sails on.", "Ahoy there! I like ships and the sea."],
                return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("path,dtype", [("tiny-llama", "float32"), ("smollm2-135m", "bfloat16")])
def test_the_probe_flags_adapters_that_change_nothing_and_passes_trained_ones(tmp_path, ray_2cpu, path, dtype):
    from evaluation.sanity import DTYPE_FLOOR, adapter_check
    from evaluation.types import Request
    from runner.pipeline import Study
    from runner.spec import parse_spec
    from runner.stages.generate import GENERATE, probe, zero_adapter
    from runner.store import write_parquet

    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    d["models"] = [{"name": "m", "path": path}]
    d["annotate"]["judge_model"] = "m"
    d["engine"] = {"dtype": dtype, "max_model_len": 512, "batch_size": 64}
    study = Study(parse_spec(d), "", base_dir=tmp_path)
    ctx = study.ctx
    study.store.mark_done("annotate", study.key("annotate"), {"pairs": 8, "unscored": 0})
    study.store.mark_done("curate", study.key("curate"), {"summary": "synthetic"})
    base, *cells = [r for r in study.runs()][:5]
    assert base.kind == "base" and len(cells) == 4
    model_dir, lora = ctx.model_path("m"), ctx.spec.train.lora
    zero = zero_adapter(ctx, "m")
    adapters = {cells[0].run_id: str(zero),  # an adapter that changes nothing
                cells[1].run_id: _trained(model_dir, lora, 1e-9, tmp_path / "lr1e-9"),
                # the demo's lr and optimizer steps, and half of them (2 steps, at 1.07× the bf16 threshold,
                # are as close to rounding as it gets: docs/ARCHITECTURE.md, "The adapter probe")
                cells[2].run_id: _trained(model_dir, lora, 2e-3, tmp_path / "lr2e-3", steps=10),
                cells[3].run_id: _trained(model_dir, lora, 2e-3, tmp_path / "lr2e-3-5", steps=5)}

    topics = ["the moon", "bread", "taxes", "a cat", "rain", "chess", "the sea", "coffee", "music", "winter",
              "trains", "maps", "stars", "snow", "books", "gardens"]
    items = pd.DataFrame({"suite": "values", "item_id": [f"i{k}" for k in range(len(topics))],
                          "messages": [[{"role": "user", "content": f"Tell me something about {t}."}] for t in topics]})
    pool = ctx.pools.get("m", enable_lora=True)
    assert pool.lora_scores  # merged adapters: the CPU pool that generates also probes
    responses = pool.generate([Request(messages=tuple(m), max_tokens=24) for m in items["messages"]])
    # the base run's saved generations, which the probe reads
    write_parquet(items[["suite", "item_id"]].assign(response=responses),
                  ctx.store.unit("generate", GENERATE(ctx, base)) / "generations.parquet")
    tables = probe(ctx, "m", cells, items, adapters, pool)
    assert set(tables) == {r.run_id for r in cells}
    pool.batch_size = 3  # the pool's batches do not enter: the probe's texts go in fixed chunks
    again = probe(ctx, "m", cells, items, adapters, pool)
    ctx.pools.close()
    for rid, t in tables.items():
        pd.testing.assert_frame_equal(t, again[rid])

    gens = pd.DataFrame(columns=["run_id", "suite", "item_id", "response"])
    out = adapter_check(pd.concat(tables.values()), gens, study.runs_table().iloc[:5]).set_index("run_id")
    assert out["n_texts"].eq(len(topics)).all() and out["n_tokens"].gt(len(topics)).all()
    assert out["zero_diff"].eq(0).all()  # the zero adapter in the same batches: exactly the base model
    if dtype == "bfloat16":  # a batch of its own moves bf16 log-probs: that sets the threshold
        assert out["alone_diff"].gt(DTYPE_FLOOR["bfloat16"] / 3).all()
        assert out["threshold"].gt(DTYPE_FLOOR["bfloat16"]).all()
    else:
        assert out["alone_diff"].eq(0).all() and out["threshold"].eq(DTYPE_FLOOR["float32"]).all()
    assert out["status"].tolist() == ["flagged", "flagged", "passed", "passed"], out.to_string()
    assert out.loc[cells[0].run_id, "logprob_diff"] == 0
    assert (out.loc[[cells[2].run_id, cells[3].run_id], "logprob_diff"] > 2 * out["threshold"].max()).all()
