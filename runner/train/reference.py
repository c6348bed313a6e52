"""The frozen base model's response log-probs of preference pairs: DPO's reference."""
from __future__ import annotations

import torch

from runner.train.batches import Example, pair_batch, response_logps


def subsets_logps(model_path: str, subsets: list[list[Example]], micro: int, threads: int,
                  trust_remote_code: bool, bf16: bool) -> list[list[tuple[float, float]]]:
    """runner.train.launch.compute_reference_logps of several subsets with one model load (free of Ray:
    launch runs it as a Ray task, bench/group_check.py on a machine without Ray)."""
    from transformers import AutoModelForCausalLM  # deferred: transformers takes ~2 s to import, for this task only

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 trust_remote_code=trust_remote_code).to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = []
    with torch.no_grad():
        for examples in subsets:
            values = []
            for i in range(0, len(examples), micro):
                chunk = examples[i:i + micro]
                b = {k: v.to(device) for k, v in pair_batch(chunk, pad).items()}
                lp = response_logps(model, b).cpu()
                values += list(zip(lp[:len(chunk)].tolist(), lp[len(chunk):].tolist()))
            out.append(values)
    return out
