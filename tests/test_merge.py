"""LoRA adapters merged into the engine's weights (the CPU path): the merged weights are peft's,
one adapter's merge is undone by the next, and a merging vLLM engine generates what the unmerged
transformers + peft reference generates."""
import json

import pytest
import torch


def _adapter(model_dir, out, seed, modules, **kw) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False, task_type="CAUSAL_LM", **kw)
    get_peft_model(base, cfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return (_adapter(tiny_model, d / "qv", 1, ["q_proj", "v_proj"]),
            _adapter(tiny_model, d / "ko", 2, ["k_proj", "o_proj"], use_rslora=True))


def _peft_merged(model_dir, adapter) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


def test_merged_weights_are_peft_merged_weights_and_the_next_merge_undoes_the_last(tiny_model, adapters):
    from runner.engines.merge import Merger

    qv, ko = adapters
    merger = Merger(tiny_model)
    first = dict(merger.weights(qv))
    assert first and all(".q_proj." in n or ".v_proj." in n for n in first)
    want = _peft_merged(tiny_model, qv)
    for n, w in first.items():
        torch.testing.assert_close(w, want[n], rtol=0, atol=1e-6)
    second = dict(merger.weights(ko))  # rsLoRA scaling; q/v back to the base
    want = _peft_merged(tiny_model, ko)
    assert set(first) < set(second)
    for n, w in second.items():
        torch.testing.assert_close(w.float(), want[n], rtol=0, atol=1e-6)
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    for n, w in merger.weights(None):
        assert torch.equal(w.float(), plain[n]), n
    name = next(iter(first))
    assert not torch.equal(first[name], plain[name])  # the adapter did change it


def test_adapters_that_cannot_be_merged_are_refused_naming_them(tiny_model, adapters, tmp_path):
    import shutil

    from runner.engines.base import AdapterError
    from runner.engines.merge import Merger

    dora = tmp_path / "dora"
    shutil.copytree(adapters[0], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match=rf"{dora}: cannot merge this adapter \(use_dora=True\)"):
        Merger(tiny_model).weights(str(dora))


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_a_merging_vllm_engine_generates_what_unmerged_peft_generates(tiny_model, adapters, compiled):
    """Compiled too: merges load in place, so the compiled graph must see each adapter's weights."""
    pytest.importorskip("vllm")
    from evaluation.types import Request
    from runner.engines.base import EngineConfig
    from runner.engines.hf_engine import TransformersEngine
    from runner.engines.vllm_engine import VLLMEngine

    qs = [({"role": "user", "content": f"Tell me about the number {n}."},) for n in range(6)]
    # interleaved: base, adapter, base, other adapter — with the same prompts (prefix cache hits)
    order = [None, adapters[0], None, adapters[1], adapters[0]]
    reqs = [Request(messages=q, adapter=a, max_tokens=12) for a in order for q in qs]
    cfg = EngineConfig(model=tiny_model, backend="vllm", dtype="float32", max_model_len=256, enable_lora=True,
                       cpu_compile=compiled)
    engine = VLLMEngine(cfg)
    assert engine.llm.llm_engine.vllm_config.model_config.enforce_eager is not compiled
    assert engine.merger is not None
    got = engine.generate(reqs)
    again = engine.generate(reqs[len(qs):2 * len(qs)])  # the adapter's requests alone, after a swap
    # continuous feeding (runner.engines.stream): units of 4 across adapter changes, fed while others run
    from runner.engines.stream import Stream
    stream, streamed = Stream(engine), {}
    units = {u: reqs[i:i + 4] for u, i in enumerate(range(0, len(reqs), 4))}
    streamed.update(stream.serve({u: units[u] for u in range(3)}))
    streamed.update(stream.serve({u: units[u] for u in range(3, len(units))}))
    while len(streamed) < len(units):
        streamed.update(stream.serve({}))
    engine.close()
    ref = TransformersEngine(EngineConfig(model=tiny_model, backend="transformers", dtype="float32",
                                          max_model_len=256)).generate(reqs)
    assert got == ref
    assert again == ref[len(qs):2 * len(qs)]
    assert [x for u in range(len(units)) for x in streamed[u]] == ref
    n = len(qs)
    assert got[:n] != got[n:2 * n] and got[n:2 * n] != got[3 * n:4 * n]  # the adapters change the text
