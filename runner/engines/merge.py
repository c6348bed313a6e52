"""LoRA adapters merged into the base weights they modify, as (checkpoint name, tensor) pairs.

On CPUs vLLM applies an adapter per token in plain torch (about 4x the cost of the base model);
an engine that loads W + scale·B·A into the modules an adapter touches, one adapter at a time,
generates at base-model speed. Only plain LoRA on linear weights is merged; anything else
(DoRA, biases, modules_to_save, fan-in-fan-out layouts) is refused, naming the adapter.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from runner.engines.base import AdapterError, check_adapter


def _tensors(path: Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if names is None or k in names}


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{model_dir}: no safetensors weights to merge LoRA adapters into")
    return files


class Merger:
    """Merges adapters into one base model's weights; keeps the touched base weights for undoing.

    `packed`: the engine's fused modules ({"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}). vLLM
    re-processes a fused layer only once all of its parts are loaded, so an adapter that touches
    one part loads the others too."""

    def __init__(self, model_dir: str, packed: dict[str, list[str]] | None = None):
        self.model_dir = Path(model_dir)
        self.packed = list((packed or {}).values())
        self.base: dict[str, torch.Tensor] = {}  # checkpoint name -> base weight, for every module touched so far

    def _base(self, names: set[str]) -> None:
        missing = names - set(self.base)
        for f in _weight_files(self.model_dir) if missing else ():
            self.base.update(_tensors(f, missing))
        if lost := names - set(self.base):
            raise AdapterError(f"{self.model_dir}: the base model has no weight {sorted(lost)[0]} that an adapter modifies")

    def weights(self, adapter: str | None) -> list[tuple[str, torch.Tensor]]:
        """What to load so the model is base + `adapter`: every weight any adapter so far has touched
        (restored where this one leaves it alone; all of them for `adapter=None`)."""
        deltas = self._deltas(adapter) if adapter else {}
        self._base(self._with_fused_parts(set(deltas)))
        return [(n, w.float() + deltas[n] if n in deltas else w) for n, w in self.base.items()]  # the engine casts

    def _with_fused_parts(self, names: set[str]) -> set[str]:
        out = set(names)
        for n in names:
            parent, _, leaf = n.removesuffix(".weight").rpartition(".")
            for parts in self.packed:
                if leaf in parts:
                    out |= {f"{parent}.{p}.weight" for p in parts}
        return out

    def _deltas(self, adapter: str) -> dict[str, torch.Tensor]:
        path = check_adapter(adapter)
        cfg = json.loads((path / "adapter_config.json").read_text())
        bad = [k for k, ok in (("peft_type", cfg.get("peft_type", "LORA") == "LORA"), ("use_dora", not cfg.get("use_dora")),
                               ("bias", cfg.get("bias", "none") == "none"), ("modules_to_save", not cfg.get("modules_to_save")),
                               ("fan_in_fan_out", not cfg.get("fan_in_fan_out"))) if not ok]
        if bad:
            raise AdapterError(f"{path}: cannot merge this adapter ({', '.join(f'{k}={cfg.get(k)!r}' for k in bad)}); "
                               "serve it with engine LoRA instead")
        r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise AdapterError(f"{path}: per-module ranks (rank_pattern/alpha_pattern) are not merged; use engine LoRA")
        file = path / "adapter_model.safetensors"
        if not file.is_file():
            raise AdapterError(f"{path}: only safetensors adapters are merged (no adapter_model.safetensors)")
        t = _tensors(file)
        out = {}
        for key, a in t.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = t[key.replace(".lora_A.", ".lora_B.")]
            out[f"{module}.weight"] = scale * (b.float() @ a.float())
        if not out or len(out) * 2 != len(t):
            raise AdapterError(f"{path}: expected lora_A/lora_B pairs only, found {sorted(t)[:4]}…")
        return out


class MergedWeights:
    """Mixed into vLLM's workers (`worker_extension_cls`): loads a file of merged weights in place."""

    def packed_modules(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in getattr(self.model_runner.get_model(), "packed_modules_mapping", {}).items()}

    def load_merged(self, path: str) -> None:
        # Only the adapters' modules are loaded: vLLM warns about every other layer ("Failed to load
        # weights", "not loaded") and keeps it as it is, which is the point.
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=list(load_file(path).items()))
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
