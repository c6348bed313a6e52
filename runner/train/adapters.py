"""Many LoRA adapters over one frozen base model, each token routed to its own adapter (the mLoRA idea).

peft builds the adapters (one named adapter per cell, each initialised from its cell's seed exactly
as a cell trained alone is); then every LoRA layer's forward is replaced by a routed one: the base
output for every token plus, for the tokens of adapter k only, adapter k's low-rank update. An
adapter sees only its own tokens, so the gradient of a sum of per-adapter losses is, for each
adapter, the gradient of its own loss.
"""
from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from runner.spec import LoraSpec


def lora_config(lora: LoraSpec):
    from peft import LoraConfig  # deferred: peft takes ~4 s to import; full fine-tuning never needs it
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def add_lora(model, lora: LoraSpec, seed: int, name: str = "default"):
    """Add one LoRA adapter initialised from `seed` alone (whatever the global RNG went through before):
    the same adapter whether its cell trains alone or beside others. Returns the PeftModel."""
    from peft import PeftModel, get_peft_model  # deferred: peft takes ~4 s to import; full fine-tuning never needs it

    torch.manual_seed(seed)
    if isinstance(model, PeftModel):
        model.add_adapter(name, lora_config(lora))
        return model
    return get_peft_model(model, lora_config(lora), adapter_name=name)


def save_zero_adapter(model_dir, lora: LoraSpec, out, trust_remote_code: bool = False) -> None:
    """Save to `out` the LoRA adapter `lora` describes on the model in `model_dir`, as peft initialises
    it (A random, every B = 0), so it changes nothing: the adapter probe's null. Built on an empty
    (meta) model, so no base weights are loaded; only the adapter's own tensors are allocated."""
    # deferred: peft (~4 s) and transformers (~2 s), for the adapter probe only
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(lora))  # its LoRA tensors land on the base's meta device
    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer):
            for name in ("lora_A", "lora_B"):
                getattr(layer, name).to_empty(device="cpu")
            layer.reset_lora_parameters("default", init_lora_weights=True)
    peft_model.save_pretrained(str(out))


class Router:
    """Which tokens of the batch in flight belong to which adapter; read by every routed LoRA layer.

    `route(owner)` (owner: batch row → adapter index) spans a micro-batch's forward and backward
    (activation checkpointing runs the forward again inside backward); `layout(seq)` is called with
    the token → batch row map once the rows are packed (runner.train.batches.response_logps)."""

    def __init__(self, names: list[str]):
        self.names = names
        self._owner: torch.Tensor | None = None
        self.index: list[tuple[str, torch.Tensor]] | None = None
        self._cast: tuple | None = None  # (input, dtype, version, the input flattened and cast)

    @contextlib.contextmanager
    def route(self, owner: torch.Tensor):
        self._owner, self.index = owner, None
        try:
            yield
        finally:
            self._owner = self.index = self._cast = None

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x flattened to tokens and cast to the adapters' dtype, once for the layers that share it
        (q, k and v read one input): each cast is saved for backward, three would be three copies."""
        c = self._cast
        if c is None or c[0] is not x or c[1] != dtype or c[2] != x._version:
            c = self._cast = (x, dtype, x._version, x.reshape(-1, x.shape[-1]).to(dtype))
        return c[3]

    def layout(self, seq: torch.Tensor) -> None:
        if self._owner is None:
            raise RuntimeError("Router.layout outside Router.route")
        flat = seq.reshape(-1)
        tok = torch.where(flat >= 0, self._owner[flat.clamp(min=0)], -1)
        self.index = [(name, idx) for k, name in enumerate(self.names)
                      if (idx := (tok == k).nonzero().squeeze(1)).numel()]


def _routed_forward(layer, router: Router, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear forward with each adapter applied to its own tokens only."""
    result = layer.base_layer(x, *args, **kwargs)
    if router.index is None:
        raise RuntimeError("a routed LoRA layer ran outside Router.route/layout")
    if not router.index:
        return result
    a0 = layer.lora_A[router.index[0][0]]
    flat_x = router.cast(x, a0.weight.dtype if getattr(layer, "cast_input_dtype_enabled", True) else x.dtype)
    flat = result.reshape(-1, result.shape[-1])
    # as peft: the update is added in the promoted dtype (fp32 adapters on a bf16 base), then cast back
    dtype = torch.promote_types(flat.dtype, a0.weight.dtype)
    if len(router.index) == 1:  # one adapter in this forward: every token (padding too, as peft does)
        out = flat.to(dtype) + _update(layer, router.index[0][0], flat_x)
    else:
        parts = [_update(layer, name, flat_x.index_select(0, idx)) for name, idx in router.index]
        out = flat.to(dtype).index_add(0, torch.cat([idx for _, idx in router.index]), torch.cat(parts).to(dtype))
    return out.to(result.dtype).view_as(result)


def _update(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """Adapter `name`'s low-rank update of the (flattened, cast) input rows x."""
    return layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]


def build_adapters(model, lora: LoraSpec, seeds: list[int]):
    """K trainable adapters named a0..aK-1 (seeded as `add_lora`) on `model`, routed by a Router.

    Returns (peft model, router, params): params[k] are adapter k's parameters in a fixed order."""
    from peft.tuners.lora import LoraLayer, Linear  # deferred: peft takes ~4 s to import; full fine-tuning never needs it

    names = [f"a{k}" for k in range(len(seeds))]
    for name, seed in zip(names, seeds):
        model = add_lora(model, lora, seed, name)
    router = Router(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, Linear) or module.lora_variant:
                raise ValueError(f"cannot route {type(module).__name__}: only plain LoRA Linear layers")
            module.forward = functools.partial(_routed_forward, module, router)
    params = [list(_params(model, name).values()) for name in names]
    for p in (p for ps in params for p in ps):
        p.requires_grad_(True)
    return model, router, params


def _params(model, name: str) -> dict[str, torch.nn.Parameter]:
    """Adapter `name`'s parameters in model order, keyed without its name (a checkpoint loads into
    any slot)."""
    return {n.replace(f".{name}.", ".ADAPTER."): p for n, p in model.named_parameters() if f".{name}." in n}


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights, keyed without its name."""
    return {n: p.detach().cpu().clone() for n, p in _params(model, name).items()}


def load_adapter_state(model, name: str, state: dict[str, torch.Tensor]) -> None:
    own = _params(model, name)
    if set(own) != set(state):
        raise ValueError(f"adapter checkpoint does not match the model: {sorted(set(own) ^ set(state))[:3]}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n])


def save_adapter(model, name: str, out: Path) -> None:
    """Adapter `name` as a peft adapter directory (what a cell trained alone saves) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
        for f in (Path(tmp) / name).iterdir():
            shutil.move(str(f), out / f.name)
