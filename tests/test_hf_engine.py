"""The transformers engine batches prompts by length and answers in request order."""


def test_batches_by_length_answer_in_request_order():
    from evaluation.types import Request
    from runner.engines.base import EngineConfig
    from runner.engines.hf_engine import TransformersEngine
    from runner.models import prepare_smollm2

    words = "the cat sat on a mat and then it ran far away from home".split()
    # lengths out of order, so sorting them moves requests between batches
    lengths = [9, 1, 14, 3, 12, 2, 7, 5]
    reqs = [Request(messages=({"role": "user", "content": " ".join(words[:n])},), max_tokens=8) for n in lengths]
    engine = TransformersEngine(EngineConfig(model=str(prepare_smollm2()), backend="transformers", dtype="float32",
                                             max_model_len=256), batch_size=3)
    batched = engine.generate(reqs)
    engine.batch_size = 1
    alone = engine.generate(reqs)
    assert batched == alone
    assert len(set(alone)) >= 6  # most prompts get answers of their own: a shuffled order would show


def test_token_logprobs_sum_to_the_score():
    from evaluation.types import ScoreRequest
    from runner.engines.base import EngineConfig
    from runner.engines.hf_engine import TransformersEngine
    from runner.models import prepare_tiny

    engine = TransformersEngine(EngineConfig(model=str(prepare_tiny()), backend="transformers", dtype="float32",
                                             max_model_len=256))
    reqs = [ScoreRequest(messages=({"role": "user", "content": f"Name {n} colours."},), continuation=c)
            for n in (2, 3) for c in (" Red and blue.", " No")]
    per_token = engine.token_logprobs(reqs)
    assert [len(x) for x in per_token] == [len(engine.tokenizer.encode(r.continuation, add_special_tokens=False))
                                          for r in reqs]
    assert [sum(x) for x in per_token] == engine.score(reqs)
    assert all(lp < 0 for x in per_token for lp in x) and len({round(x[0], 5) for x in per_token}) > 1
