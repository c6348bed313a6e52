"""Contracts shared by the runner and the evaluation code: generation requests and table schemas.

`evaluation` never imports Ray or the runner: judges that need a language model receive an
`Engine` (anything with `generate(requests) -> list[str]`) and hand it `Request`s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

# The closed value list of the paper's judge prompt (Arora et al. 2026, appendix), in its order.
# Defined only here: runner.spec builds its `Value` Literal from it and re-exports it.
VALUES: tuple[str, ...] = (
    "deception", "accuracy", "creativity", "discretion", "honesty", "humor", "open-mindedness",
    "fairness", "curiosity", "empathy", "personalization", "privacy", "violence", "justice",
    "legality", "engagement",
)

Message = dict[str, Any]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Request:
    """One generation: chat messages, optional LoRA adapter dir, optional GBNF grammar constraint."""
    messages: tuple[Message, ...]
    adapter: str | None = None        # path of a PEFT adapter dir; None = the base model
    grammar: str | None = None        # GBNF grammar the output must match (structured outputs)
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class ScoreRequest:
    """Log-probability of `continuation` after the chat `messages` (generation prompt appended)."""
    messages: tuple[Message, ...]
    continuation: str
    adapter: str | None = None


class Engine(Protocol):
    name: str

    def generate(self, requests: Sequence[Request]) -> list[str]: ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]: ...

    def token_logprobs(self, requests: Sequence[ScoreRequest]) -> list[list[float]]: ...


# Column names of the tables that flow between stages (pandas DataFrames / parquet files).
PAIR_COLUMNS = ("pair_id", "source", "prompt", "chosen", "rejected")
ITEM_COLUMNS = ("suite", "item_id", "messages")  # + suite-specific metadata columns
GENERATION_COLUMNS = ("run_id", "suite", "item_id", "response")
SCORE_COLUMNS = ("run_id", "suite", "item_id", "metric", "value", "scored", "judge", "raw")
RUN_COLUMNS = ("run_id", "model", "condition", "kind", "value", "seed")


# The max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that serves adapters of rank r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")
