"""What the input checks share (runner.preflight, runner.preflight_inputs, runner.preflight_cluster):
a check's result row, and the sample chat every chat template must render."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.spec import Spec

# The sample chat every template must render (multi-turn, as preference prompts are); with a system
# message first only when the study sends one (train.system_prompt): not every template accepts it.
SYSTEM = "You are valind's template check."
TURNS = ("Hello! This is a sample question.", "Hello. This is a sample answer.", "And a second question?")
RESPONSE = "And a second answer."
# Special tokens for rendering without a tokenizer (`valind validate`): templates concatenate them
PLACEHOLDER_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def sample_chat(spec: Spec) -> list[dict[str, Any]]:
    """The prompt of the sample chat (see SYSTEM)."""
    roles = ("user", "assistant", "user")
    head = [{"role": "system", "content": SYSTEM}] if spec.train.system_prompt is not None else []
    return head + [{"role": r, "content": t} for r, t in zip(roles, TURNS)]


@dataclass(frozen=True)
class Row:
    """One line of `valind preflight`'s table."""
    check: str
    where: str    # the spec field, file or node it concerns
    ok: bool
    detail: str   # what was found, or the problem
    fix: str = ""
