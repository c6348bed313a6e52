"""Row converters: one source's raw row (or grouped rows) -> (prompt, chosen, rejected, pair id or
None), raising `_Drop` with the reason a row is not a usable pair (runner.data.sources counts them)."""
from __future__ import annotations

import re
from typing import Any

from runner.data.registry import Converter, Rows, _Drop

ROLES = ("system", "user", "assistant")

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(dialogue: str) -> tuple[list[dict], str]:
    """Split an HH-RLHF transcript into prompt messages (ending with user) and the final response.

    Consecutive turns of the same speaker (a few HH transcripts have them) are merged, joined by a
    blank line, so the prompt alternates user/assistant.
    """
    parts = _HH_TURN.split(dialogue)
    if parts[0].strip():
        raise _Drop("malformed")  # text before the first turn marker
    msgs: list[dict] = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        text = text.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] = f"{msgs[-1]['content']}\n\n{text}".strip()
        else:
            msgs.append({"role": role, "content": text})
    return _split_messages(msgs)


def _split_messages(msgs: list[dict]) -> tuple[list[dict], str]:
    """(prompt, final assistant content) of a message list; checks roles and alternation."""
    if not msgs:
        raise _Drop("malformed")
    if msgs[-1]["role"] != "assistant":
        raise _Drop("no_final_assistant_turn")
    prompt, response = msgs[:-1], msgs[-1]["content"]
    convo = [m for m in prompt if m["role"] != "system"]
    if not convo or convo[-1]["role"] != "user" or convo[0]["role"] != "user":
        raise _Drop("malformed")
    if any(a["role"] == b["role"] for a, b in zip(convo, convo[1:])):
        raise _Drop("malformed")
    return prompt, response


def _as_messages(value: Any) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise _Drop("malformed")
    msgs = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _Drop("malformed")
        msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


def _as_prompt(value: Any) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _Drop("malformed")
        return [{"role": "user", "content": value}]
    msgs = _as_messages(value)
    convo = [m for m in msgs if m["role"] != "system"]
    if not convo or convo[-1]["role"] != "user":
        raise _Drop("malformed")
    return msgs


def _convert_hh(row: dict) -> tuple:
    c, r = row.get("chosen"), row.get("rejected")
    if c is None or r is None:
        raise _Drop("missing_field")
    if not isinstance(c, str) or not isinstance(r, str):
        raise _Drop("malformed")
    cp, cr = split_hh(c)
    rp, rr = split_hh(r)
    if cp != rp:
        raise _Drop("malformed")
    return cp, cr, rr, None


def _convert_message_lists(row: dict) -> tuple:
    """UltraFeedback / Tulu 3: chosen and rejected are full conversations incl. the prompt turns."""
    c, r = row.get("chosen"), row.get("rejected")
    if c is None or r is None:
        raise _Drop("missing_field")
    cp, cr = _split_messages(_as_messages(c))
    rp, rr = _split_messages(_as_messages(r))
    if cp != rp:
        raise _Drop("malformed")
    return cp, cr, rr, None


def _pku_converter(pick: str) -> Converter:
    key = f"{pick}_response_id"

    def convert(row: dict) -> tuple:
        vals = [row.get(k) for k in ("prompt", "response_0", "response_1", key)]
        if any(v is None for v in vals):
            raise _Drop("missing_field")
        prompt, r0, r1, best = vals
        if best not in (0, 1) or not isinstance(r0, str) or not isinstance(r1, str):
            raise _Drop("malformed")
        chosen, rejected = (r0, r1) if best == 0 else (r1, r0)
        return _as_prompt(prompt), chosen, rejected, None

    return convert


HS2_RANK = ("helpfulness", "correctness")  # HelpSteer 2: compared in this order, higher is chosen
_HS2_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


def group_consecutive_prompts(rows: Rows) -> Rows:
    """HelpSteer 2: runs of consecutive rows with the same prompt, as (index of the run's first
    row, {"prompt", "responses": [rows]}). The dataset stores each prompt's two responses next to
    each other; grouping only neighbours keeps this streaming and never joins unrelated rows."""
    start, run = 0, []
    for idx, row in rows:
        if run and row.get("prompt") != run[0].get("prompt"):
            yield start, {"prompt": run[0].get("prompt"), "responses": run}
            run = []
        if not run:
            start = idx
        run.append(row)
    if run:
        yield start, {"prompt": run[0].get("prompt"), "responses": run}


def split_helpsteer2(prompt: str) -> list[dict]:
    """A HelpSteer 2 prompt as messages. Multi-turn prompts hold the earlier turns inline:
    "{user 1}\n<extra_id_1>Assistant\n{assistant 1}\n<extra_id_1>User\n{user 2}"."""
    parts = _HS2_TURN.split(prompt)
    msgs = [{"role": "user", "content": parts[0]}]
    msgs += [{"role": who.lower(), "content": text} for who, text in zip(parts[1::2], parts[2::2])]
    if any(not m["content"].strip() or "<extra_id_" in m["content"] for m in msgs):
        raise _Drop("malformed")  # an empty turn, or a marker we do not know (e.g. <extra_id_0>System)
    if msgs[-1]["role"] != "user" or any(a["role"] == b["role"] for a, b in zip(msgs, msgs[1:])):
        raise _Drop("malformed")
    return msgs


def _score(v: Any) -> int:
    """A 0-4 attribute score. Files written through pandas hold them as floats (NaN for a gap)."""
    if isinstance(v, float) and v != v:
        raise _Drop("missing_field")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or not 0 <= v <= 4:
        raise _Drop("malformed")
    return int(v)


def _convert_helpsteer2(group: dict) -> tuple:
    """A prompt's two rated responses -> (prompt, chosen, rejected): see HS2_RANK; ties drop."""
    responses = group["responses"]
    if len(responses) != 2:
        raise _Drop("malformed")  # a prompt without exactly two responses
    for r in responses:
        if any(r.get(k) is None for k in ("prompt", "response", *HS2_RANK)):
            raise _Drop("missing_field")
        if not isinstance(r["prompt"], str) or not isinstance(r["response"], str):
            raise _Drop("malformed")
    a, b = responses
    key_a, key_b = (tuple(_score(r[k]) for k in HS2_RANK) for r in responses)
    if key_a == key_b:
        raise _Drop("tied")
    chosen, rejected = (a, b) if key_a > key_b else (b, a)
    return split_helpsteer2(group["prompt"]), chosen["response"], rejected["response"], None
