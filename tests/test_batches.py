import pandas as pd
import pytest
import torch

from runner.train.batches import (collate, encode, encode_pairs, fit, pack_rows, pair_batch, response_logps,
                                   sequence_logps)


def _tok(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def test_encode_response_is_template_suffix(tiny_model):
    tok = _tok(tiny_model)
    prompt = [{"role": "user", "content": "Hi there"}]
    p, r = encode(tok, prompt, "Hello!")
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "Hello!"}], tokenize=True,
                                   return_dict=False)
    assert p + r == list(full)
    assert tok.decode(r).startswith("Hello!")
    assert tok.eos_token in tok.decode(r)


def test_fit_truncates_prompt_left_and_response_right():
    p, (c, r) = fit(list(range(100)), [list(range(50)), list(range(10))], 64)
    assert len(p) + len(c) <= 64 and p[-1] == 99 and c[0] == 0
    assert p == list(range(100))[-len(p):]


def test_masks_cover_only_response_tokens():
    b = collate([([1, 2, 3], [4, 5]), ([1], [6, 7, 8])], pad_id=0)
    assert b["response_mask"].tolist() == [[False, False, False, True, True], [False, True, True, True, False]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_sequence_logps_matches_manual_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    b = collate([([1, 2, 3], [4, 5]), ([1], [6, 7, 8])], pad_id=0)
    got = sequence_logps(logits, b["input_ids"], b["response_mask"])
    lp = torch.log_softmax(logits, -1)
    want0 = lp[0, 2, 4] + lp[0, 3, 5]
    want1 = lp[1, 0, 6] + lp[1, 1, 7] + lp[1, 2, 8]
    assert torch.allclose(got, torch.stack([want0, want1]), atol=1e-6)


def test_response_logps_skipping_prompt_logits_is_exact(tiny_model):
    from transformers import AutoModelForCausalLM
    tok = _tok(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pairs = pd.DataFrame({"pair_id": ["a", "b"],
                          "prompt": [[{"role": "user", "content": "Tell me a long story about cats " * 3}],
                                     [{"role": "user", "content": "Hi"}]],
                          "chosen": ["Sure, here it is.", "Hello, friend!"], "rejected": ["No.", "Go away"]})
    ex = encode_pairs(tok, pairs, 128)
    batch = pair_batch(ex, tok.pad_token_id)
    with torch.no_grad():
        full = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"], batch["response_mask"])
        fast = response_logps(model, batch)
    assert torch.allclose(full, fast, atol=1e-5)


def test_pack_rows_shares_rows_and_restarts_positions():
    b = collate([([1, 2], [3]), ([4], [5, 6, 7, 8]), ([9], [10])], pad_id=0)
    p = pack_rows(b)
    assert p["input_ids"].shape == (2, 5)
    assert p["seq_index"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 2, 2]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert p["input_ids"].tolist() == [[4, 5, 6, 7, 8], [1, 2, 3, 9, 10]]
    assert p["response_mask"].tolist() == [[False, True, True, True, True], [False, False, True, False, True]]
    assert pack_rows(collate([([1, 2], [3]), ([4], [5, 6])], pad_id=0)) is None  # nothing to gain


def test_packed_response_logps_equal_padded(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    tok = _tok(tiny_model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    pairs = pd.DataFrame({"pair_id": list("abcd"),
                          "prompt": [[{"role": "user", "content": "Tell me a long story about cats " * 6}],
                                     [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Why?"}],
                                     [{"role": "user", "content": "What is two plus two?"}]],
                          "chosen": ["Sure, here it is. " * 3, "Hello, friend!", "Because.", "Four"],
                          "rejected": ["No.", "Go away", "I don't know, honestly " * 4, "Five"]})
    batch = pair_batch(encode_pairs(tok, pairs, 128), tok.pad_token_id)
    assert pack_rows(batch)["input_ids"].shape[0] < batch["input_ids"].shape[0]
    with torch.no_grad():
        full = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"], batch["response_mask"])
        packed = response_logps(model, batch)
        padded = response_logps(model, batch, pack=False)
    assert torch.allclose(full, packed, atol=1e-4)
    assert torch.allclose(full, padded, atol=1e-4)
    # gradients flow to the adapter through the packed path
    model.train()
    response_logps(model, batch).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_gradient_checkpointing_gives_lora_the_same_gradients(tiny_model):
    """train.gradient_checkpointing recomputes activations; the LoRA gradients must not change."""
    from runner.spec import TrainSpec
    from runner.train.cell import Cell
    from runner.train.loop import build_model

    tok = _tok(tiny_model)
    pairs = pd.DataFrame({"pair_id": ["a"], "prompt": [[{"role": "user", "content": "Hi there"}]],
                          "chosen": ["Hello, friend!"], "rejected": ["Go away"]})
    batch = pair_batch(encode_pairs(tok, pairs, 64), tok.pad_token_id)
    grads = []
    for ckpt in (False, True):
        train = TrainSpec(bf16=False, gradient_checkpointing=ckpt, lora={"r": 4, "dropout": 0.0})
        cell = Cell(cell_id="c", seed=0, train=train, pairs="", model_path=tiny_model, model_id="t", out_dir="",
                    work_dir="", ref_cache="")
        torch.manual_seed(0)
        model = build_model(cell).train()
        assert model.is_gradient_checkpointing == ckpt
        for name, p in model.named_parameters():  # lora_B starts at 0: give it a value so lora_A gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        response_logps(model, batch).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def _pairs(prompt):
    return pd.DataFrame({"pair_id": ["a"], "prompt": [prompt], "chosen": ["Hello, friend!"], "rejected": ["Go away"]})


def test_system_prompt_is_tokenised_before_the_prompt(tiny_model):
    """train.system_prompt opens every prompt (replacing the template's default system message);
    the responses' ids do not change, the prompt's (which the reference log-prob cache hashes) do."""
    tok = _tok(tiny_model)
    user = [{"role": "user", "content": "Hi there"}]
    plain = encode_pairs(tok, _pairs(user), 256)[0]
    ex = encode_pairs(tok, _pairs(user), 256, system_prompt="You value humor.")[0]
    text = tok.decode(ex.prompt)
    assert text.startswith("<|im_start|>system\nYou value humor.<|im_end|>")
    assert text.index("You value humor.") < text.index("Hi there")
    assert "SmolLM" not in text and "SmolLM" in tok.decode(plain.prompt)  # the template's default is replaced
    assert (ex.chosen, ex.rejected) == (plain.chosen, plain.rejected) and ex.prompt != plain.prompt
    other = encode_pairs(tok, _pairs(user), 256, system_prompt="You value fairness.")[0]
    assert other.prompt != ex.prompt


def test_system_prompt_joins_an_existing_leading_system_message():
    from runner.train.batches import with_system
    user = {"role": "user", "content": "Hi"}
    assert with_system([user], None) == [user]
    assert with_system([user], "Ours.") == [{"role": "system", "content": "Ours."}, user]
    theirs = [{"role": "system", "content": "Theirs."}, user]
    assert with_system(theirs, "Ours.") == [{"role": "system", "content": "Ours.\n\nTheirs."}, user]
    assert theirs[0]["content"] == "Theirs."  # the pair's own messages are not modified


def test_a_control_matched_to_a_value_gets_that_values_system_prompt(tiny_model):
    """The random control matched to a value trains with exactly the value arm's system prompt."""
    from runner.spec import TrainSpec, condition_value

    tok = _tok(tiny_model)
    train = TrainSpec(system_prompt="You value {value}.")
    text = {c: train.system_text(condition_value(c))
            for c in ("value-open-mindedness", "control-open-mindedness-1", "value-humor")}
    assert text["value-open-mindedness"] == text["control-open-mindedness-1"] == "You value open-mindedness."
    user = [{"role": "user", "content": "Hi there"}]
    ids = {c: encode_pairs(tok, _pairs(user), 256, system_prompt=t)[0].prompt for c, t in text.items()}
    assert ids["value-open-mindedness"] == ids["control-open-mindedness-1"] != ids["value-humor"]
    assert TrainSpec(system_prompt="Be kind.").system_text(condition_value("control-0")) == "Be kind."
    with pytest.raises(ValueError, match="no value"):
        train.system_text(condition_value("control-0"))
