"""A DeepSpeed engine (one process, gloo, CPU) per ZeRO stage: checkpoint, resume through
runner.train.safe_load, and a planted pickle in the checkpoint. Run by tests/test_secrets.py;
prints one JSON line."""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
import deepspeed  # noqa: E402

from runner.train.safe_load import UnsafeCheckpointError, safe_deepspeed_loads  # noqa: E402

MARKER = Path(sys.argv[2])  # the planted pickle's payload creates it


class Payload:
    def __reduce__(self):
        return (Path.write_text, (MARKER, "the checkpoint ran code\n"))


def engine(stage: int, bf16: bool):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    m[0].weight.requires_grad_(False)  # a frozen part, reloaded from the model as a LoRA base is
    if bf16:
        m = m.bfloat16()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    conf = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
            "steps_per_print": 10 ** 9}
    return deepspeed.initialize(model=m, optimizer=opt, config=conf)[0]


def step(eng, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(2, 8, generator=g).to(next(eng.module.parameters()).dtype)
    eng.backward(eng(x).float().pow(2).sum())
    eng.step()


def params(eng) -> list:
    with deepspeed.zero.GatheredParameters(list(eng.module.parameters()), enabled=eng.zero_optimization_stage() == 3):
        return [p.detach().float().clone() for p in eng.module.parameters()]


deepspeed.init_distributed(dist_backend="gloo")
out = {}
for stage, bf16 in [(0, False), (1, False), (2, False), (3, False), (2, True)]:
    name = f"zero{stage}" + ("-bf16" if bf16 else "")
    d = tempfile.mkdtemp()
    a = engine(stage, bf16)
    for i in range(2):
        step(a, i)
    a.save_checkpoint(d, tag="state", exclude_frozen_parameters=True)
    for i in range(2, 4):
        step(a, i)
    b = engine(stage, bf16)
    safe_deepspeed_loads(b)
    b.load_checkpoint(d, tag="state", load_module_strict=False)
    for i in range(2, 4):
        step(b, i)
    diff = max((x - y).abs().max().item() for x, y in zip(params(a), params(b)))
    # plant: the optimizer state (else the model state) replaced by a pickle whose loading writes MARKER
    files = sorted(Path(d, "state").glob("*.pt"))
    planted = [f for f in files if "optim" in f.name] or files
    for f in planted:
        torch.save({"state": Payload()}, f)
    c = engine(stage, bf16)
    safe_deepspeed_loads(c)
    try:
        c.load_checkpoint(d, tag="state", load_module_strict=False)
        refused = None
    except UnsafeCheckpointError as e:
        refused = str(e)
    out[name] = {"resume_max_abs_diff": diff, "planted": [f.name for f in planted], "refused": refused,
                 "payload_ran": MARKER.exists()}
    if stage == 0 and not bf16:  # DeepSpeed's own loader runs the payload: what the refusal prevents
        try:
            engine(stage, bf16).load_checkpoint(d, tag="state", load_module_strict=False)
        except Exception:
            pass
        out["deepspeed_default_ran_payload"] = MARKER.exists()
        MARKER.unlink(missing_ok=True)
print("RESULT " + json.dumps(out))
