"""transformers + peft engine: the fallback where vLLM cannot run (and the benchmark baseline)."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.types import Request, ScoreRequest
from runner.engines.base import EngineConfig, render_prompt_ids, truncate_left

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class TransformersEngine:
    """Batched greedy/sampled generation, prompts batched by length with left padding; adapters
    loaded by peft on demand.

    Grammar constraints are not supported here: a request that needs one is an error, not a
    silently unconstrained generation.
    """
    lora_scores = True  # with adapters loaded, the base model is the peft model with them switched off
    serial_adapters = True  # each adapter's requests are generated as batches of their own

    def __init__(self, cfg: EngineConfig, batch_size: int = 16):
        self.cfg, self.batch_size = cfg, batch_size
        self.name = f"{Path(cfg.model).name}@transformers-{transformers.__version__}"
        self.version = transformers.__version__
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=_DTYPES[cfg.dtype],
                                                         trust_remote_code=cfg.trust_remote_code)
        self.base.eval()
        self.model = self.base
        self._adapters: dict[str, str] = {}

    def close(self) -> None:
        del self.model, self.base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _use(self, adapter: str | None):
        from peft import PeftModel  # deferred: peft takes ~1 s to import, only for a LoRA request
        if adapter is None:
            return self.base if not self._adapters else _Disabled(self.model)
        if adapter not in self._adapters:
            name = f"a{len(self._adapters)}"
            if not self._adapters:
                self.model = PeftModel.from_pretrained(self.base, adapter, adapter_name=name)
            else:
                self.model.load_adapter(adapter, adapter_name=name)
            self._adapters[adapter] = name
        self.model.set_adapter(self._adapters[adapter])
        return self.model

    @torch.no_grad()
    def generate(self, requests: Sequence[Request]) -> list[str]:
        if any(r.grammar for r in requests):
            raise ValueError("the transformers engine cannot enforce grammars; use the vllm backend")
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.adapter, r.max_tokens, r.temperature, r.top_p, r.seed), []).append(i)
        pad = self.tokenizer.pad_token_id
        for (adapter, max_tokens, temperature, top_p, seed), idx in groups.items():
            model = self._use(adapter)
            ids_of = {i: truncate_left(render_prompt_ids(self.tokenizer, requests[i].messages, self.cfg.chat_template),
                                       self.cfg.max_model_len - max_tokens) for i in idx}
            idx = sorted(idx, key=lambda i: len(ids_of[i]))  # batches of like lengths: less padding to compute
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                seqs = [ids_of[i] for i in chunk]
                width = max(map(len, seqs))
                ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
                torch.manual_seed(seed)
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                     do_sample=temperature > 0, temperature=temperature or None,
                                     top_p=top_p if temperature > 0 else None, pad_token_id=pad)
                for i, row in zip(chunk, gen[:, width:]):
                    out[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return out  # type: ignore[return-value]

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        return [sum(lps) for lps in self.token_logprobs(requests)]

    @torch.no_grad()
    def token_logprobs(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Per continuation token, its log-prob; one request per forward, so no batch layout enters."""
        result = []
        for r in requests:
            model = self._use(r.adapter)
            ids = render_prompt_ids(self.tokenizer, r.messages, self.cfg.chat_template)
            cont = self.tokenizer.encode(r.continuation, add_special_tokens=False)
            ids = truncate_left(ids, self.cfg.max_model_len - len(cont) - 1)
            full = torch.tensor([ids + cont])
            logp = torch.log_softmax(model(input_ids=full).logits[0, :-1].float(), -1)
            tgt = full[0, 1:]
            result.append(logp[len(ids) - 1:, :].gather(1, tgt[len(ids) - 1:, None])[:, 0].tolist())
        return result


class _Disabled:
    """The peft model with adapters switched off, used as the base model."""

    def __init__(self, model):
        self.model = model

    def generate(self, **kw):
        with self.model.disable_adapter():
            return self.model.generate(**kw)

    def __call__(self, **kw):
        with self.model.disable_adapter():
            return self.model(**kw)
