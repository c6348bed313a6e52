"""Training checkpoints load as tensors and plain containers only: `torch.load(weights_only=True)`.

Checkpoints live on shared storage that many processes and people can write. A pickle loaded with
`weights_only=False` (DeepSpeed's own `TorchCheckpointEngine.load`) runs whatever code the file names,
so one planted file would run code on every node that resumes from it. DeepSpeed's optimizer state
holds three small classes of its own besides tensors and containers; only those are allowed.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from evaluation.errors import ValindError


class UnsafeCheckpointError(ValindError):
    """A checkpoint file holding more than tensors and plain data: refused, never run."""


def _deepspeed_globals() -> list:
    """The non-tensor classes a DeepSpeed ZeRO 0-3 checkpoint pickles (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on fp32 and bf16 checkpoints of each stage)."""
    try:  # deferred: DeepSpeed takes ~3 s to import, and only its own checkpoints need these
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # the grouped-adapter path needs no DeepSpeed
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_tensors(path, map_location=None):
    """torch.load of `path` with weights_only=True (DeepSpeed's optimizer classes allowed); a file
    that needs anything else raises UnsafeCheckpointError naming it, and nothing of it is run."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise UnsafeCheckpointError(
            f"{Path(path)}: refused to load a checkpoint that holds more than tensors and plain data "
            f"(torch.load weights_only=True: it names {found.group(1) if found else 'an unsupported object'}). "
            "valind's training did not write it: delete it (the cell then trains from its last good "
            "checkpoint, or from the start)") from None


def safe_deepspeed_loads(engine) -> None:
    """Make `engine.load_checkpoint` read every file through `load_tensors`."""
    engine.checkpoint_engine.load = load_tensors
