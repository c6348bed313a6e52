"""Evaluation suites (prompt sets). Each module has `load_items(data_dir, limit, seed)` returning
an item table: suite, item_id (stable), messages (list of {"role","content"}), metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from . import anthropomorphism, planted, safety, sycophancy, values
from ._common import stratified_sample
from .sycophancy import followup_messages

SUITES: dict[str, Callable[..., pd.DataFrame]] = {
    "values": values.load_items,
    "safety": safety.load_items,
    "anthropomorphism": anthropomorphism.load_items,
    "sycophancy": sycophancy.load_items,
    "planted": planted.load_items,  # the positive control's detector (controls.positive): held-out prompts
}


def load_suite(name: str, data_dir: Path, limit: int | None = None, seed: int = 0, **kwargs) -> pd.DataFrame:
    """Load suite `name`; extra kwargs go to its loader (e.g. values' held_out_prompts)."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    return SUITES[name](Path(data_dir), limit, seed, **kwargs)


__all__ = ["SUITES", "load_suite", "followup_messages", "stratified_sample"]
