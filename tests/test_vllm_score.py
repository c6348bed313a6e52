"""vLLM log-prob scoring: one-token continuations (the judges' " Yes" / " No") come from next-token
log-probs, which keep prefix caching; they must equal the prompt log-prob path they replace."""
import pytest

pytestmark = pytest.mark.slow


def test_next_token_scores_equal_prompt_logprob_scores(tiny_model):
    pytest.importorskip("vllm")
    from evaluation.types import ScoreRequest
    from runner.engines.base import EngineConfig
    from runner.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(EngineConfig(model=tiny_model, backend="vllm", max_model_len=256))
    qs = [({"role": "user", "content": f"Is {n} even? Answer Yes or No."},) for n in range(5)]
    reqs = [ScoreRequest(messages=q, continuation=c) for q in qs for c in (" Yes", " No")]
    reqs.append(ScoreRequest(messages=qs[0], continuation=" Yes it is"))  # several tokens: prompt log-probs
    got, want = engine.score(reqs), engine._prompt_logprob_scores(reqs)
    assert got == pytest.approx(want, abs=1e-4)
    assert len({round(x, 4) for x in got[:10]}) > 2  # the candidates' log-probs differ
    # per token (the adapter probe): one log-prob per continuation token, summing to the score
    per_token = engine.token_logprobs(reqs)
    n = len(engine.tokenizer.encode(" Yes it is", add_special_tokens=False))
    assert [len(x) for x in per_token] == [1] * 10 + [n]
    assert [sum(x) for x in per_token] == pytest.approx(want, abs=1e-5) and len(per_token[-1]) > 1
    with pytest.raises(ValueError, match="without LoRA support but got an adapter"):  # never the base model silently
        engine.token_logprobs([ScoreRequest(messages=qs[0], continuation=" Yes it is", adapter="/some/adapter")])
    engine.close()
