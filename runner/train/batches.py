"""Chat-template tokenisation of preference pairs and padded batches with response-only masks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from evaluation.errors import ValindError


class TokenizeError(ValindError, ValueError):
    pass


def with_system(messages, system: str | None) -> list[dict]:
    """`messages` with `system` first. A prompt that already opens with a system message keeps one:
    ours, a blank line, then its own (many chat templates accept a single leading system message);
    system messages later in the dialogue are left where they are."""
    msgs = [dict(m) for m in messages]
    if system is None:
        return msgs
    if msgs and msgs[0].get("role") == "system":
        return [{"role": "system", "content": f"{system}\n\n{msgs[0]['content']}"}] + msgs[1:]
    return [{"role": "system", "content": system}] + msgs


def encode(tokenizer, prompt: list[dict], response: str, chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the response ids are what the template adds after the prompt."""
    def ids(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True,
                                            chat_template=chat_template, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)

    p = ids(list(prompt), True)
    full = ids(list(prompt) + [{"role": "assistant", "content": response}], False)
    if full[:len(p)] != p:
        raise TokenizeError("the chat template does not render the prompt as a prefix of prompt+response")
    return p, full[len(p):]


def fit(prompt: list[int], responses: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Truncate to max_length: prompt from the left (keeps the last turn), responses from the right."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > max_length:
        keep = max(max_length // 2, max_length - longest)
        prompt = prompt[-keep:] if keep < len(prompt) else prompt
        responses = [r[: max_length - len(prompt)] for r in responses]
    return prompt, responses


@dataclass
class Example:
    """One tokenised preference pair (chosen/rejected share the prompt)."""
    pair_id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def encode_pairs(tokenizer, pairs, max_length: int, chat_template: str | None = None,
                 system_prompt: str | None = None) -> list[Example]:
    """Tokenise every pair, each prompt with `system_prompt` first (`with_system`); an over-long prompt
    loses its oldest tokens (`fit`), the system prompt first of all."""
    out = []
    for row in pairs.itertuples():
        prompt = with_system(row.prompt, system_prompt)
        p, c = encode(tokenizer, prompt, row.chosen, chat_template)
        _, r = encode(tokenizer, prompt, row.rejected, chat_template)
        p, (c, r) = fit(p, [c, r], max_length)
        out.append(Example(row.pair_id, p, c, r))
    return out


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and the mask of response tokens (loss positions)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        resp[i, len(p):n] = True
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def pair_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """[chosen_1..chosen_B, rejected_1..rejected_B] in one padded batch."""
    return pair_blocks([examples], pad_id)


def pair_blocks(blocks: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Blocks of pairs in one padded batch (one block per adapter of a group): each block's chosen
    rows, then its rejected rows; ref_chosen/ref_rejected hold every pair in block order."""
    seqs = [s for ex in blocks for s in [(e.prompt, e.chosen) for e in ex] + [(e.prompt, e.rejected) for e in ex]]
    batch = collate(seqs, pad_id)
    pairs = [e for ex in blocks for e in ex]
    batch["ref_chosen"] = torch.tensor([e.ref_chosen for e in pairs], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([e.ref_rejected for e in pairs], dtype=torch.float32)
    return batch


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over response tokens only (prompt and padding masked).

    `logits` may cover only the last L positions of the sequence. The reference implementation for tests;
    training uses `response_logps`, which never builds prompt or padding logits.
    """
    start = input_ids.shape[1] - logits.shape[1]
    logits = logits[:, :-1].float()
    target = input_ids[:, start + 1:]
    mask = response_mask[:, start + 1:]
    token_logp = torch.gather(logits, 2, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logp * mask).sum(-1)


def pack_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Repack a right-padded batch into fewer rows of the same width (first-fit decreasing).

    Returns input_ids, position_ids (restarting at 0 for every sequence, which is what makes
    transformers mask attention block-diagonally when no attention_mask is given), response_mask
    and seq_index (the batch row each token came from; -1 for padding). None when packing saves
    no row or the batch is not right-padded.
    """
    ids, attn, resp = (batch[k].cpu() for k in ("input_ids", "attention_mask", "response_mask"))
    b, width = ids.shape
    lens = attn.sum(1)
    if not bool((attn == (torch.arange(width, device=attn.device) < lens.unsqueeze(1))).all()):
        return None
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(b), key=lambda i: -int(lens[i])):
        n = int(lens[i])
        r = next((r for r in range(len(rows)) if used[r] + n <= width), None)
        if r is None:
            rows.append([]), used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += n
    if len(rows) == b:
        return None
    out_ids = torch.zeros((len(rows), width), dtype=ids.dtype)  # the tail's ids are never read
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    out_resp = torch.zeros((len(rows), width), dtype=torch.bool)
    seq = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            n = int(lens[i])
            out_ids[r, off:off + n] = ids[i, :n]
            pos[r, off:off + n] = torch.arange(n)
            out_resp[r, off + 1:off + n] = resp[i, 1:n]  # a sequence's first token is never predicted
            seq[r, off:off + n] = i
            off += n
        pos[r, off:] = torch.arange(width - off)  # the tail pad is its own "sequence": no real token sees it
    dev = batch["input_ids"].device
    return {"input_ids": out_ids.to(dev), "position_ids": pos.to(dev), "response_mask": out_resp.to(dev),
            "seq_index": seq.to(dev)}


def _packable(model) -> bool:
    """Only transformers' own architectures are known to turn restarting position_ids into packed masks."""
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return type(base).__module__.startswith("transformers.models.")


def response_logps(model, batch: dict[str, torch.Tensor], pack: bool = True, on_layout=None) -> torch.Tensor:
    """Summed response log-probs per batch row, with no compute spent on padding or prompt logits.

    - Packing: rows are repacked so short sequences share a row (block-diagonal attention via
      restarting position_ids), so the backbone runs over fewer padding tokens.
    - The LM head over a ~50k vocabulary is a large share of a small model's FLOPs, and its float32
      logits (and their softmax gradient) dominate memory traffic. A pre-hook on the output embedding
      hands it only the positions that predict a response token: [n_response_tokens, hidden] instead
      of [rows, width, hidden]. Whatever the model applies after the head (scaling, soft-capping)
      still runs, on the compact rows.

    `on_layout(seq)`, if given, is called before the forward with the token → batch row map
    ([rows, width], -1 for padding) of the layout the model sees (runner.train.adapters.Router).
    """
    b = batch["input_ids"].shape[0]
    packed = pack_rows(batch) if pack and _packable(model) else None
    if packed is not None:
        ids, resp, seq = packed["input_ids"], packed["response_mask"], packed["seq_index"]
        kwargs = {"position_ids": packed["position_ids"], "attention_mask": None}
    else:
        ids, resp = batch["input_ids"], batch["response_mask"]
        seq = torch.arange(b, device=ids.device).unsqueeze(1).expand_as(ids)
        kwargs = {"attention_mask": batch["attention_mask"]}
    if on_layout is not None:
        on_layout(seq)
    pred = torch.zeros_like(resp)
    pred[:, :-1] = resp[:, 1:]  # position t predicts token t+1
    head = getattr(model, "module", model).get_output_embeddings()

    def compact(_module, args, kw):
        if args:
            return (args[0][pred], *args[1:]), kw
        return args, {**kw, "input": kw["input"][pred]}

    handle = head.register_forward_pre_hook(compact, with_kwargs=True)
    try:
        # use_cache=False: with a cache object transformers ignores the packed position_ids
        logits = model(input_ids=ids, logits_to_keep=0, use_cache=False, **kwargs).logits
    finally:
        handle.remove()
    logits = logits.float()
    target = ids[:, 1:][resp[:, 1:]]  # row-major, the same order as the rows of `logits`
    token_logp = logits.gather(1, target.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros(b, dtype=token_logp.dtype, device=ids.device).index_add(0, seq[pred], token_logp)
