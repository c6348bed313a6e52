"""Evaluation suites (prompt sets). Every module in this package registers one `Suite`
(evaluation.suites.registry), imported at the registry's first lookup; a suite outside it registers
itself when imported (a plugin: through the `valind.plugins` entry point).

Items: suite, item_id (stable), messages (list of {"role","content"}), metadata columns."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ._common import stratified_sample
from .registry import SUITES, NoSettings, Suite, SuiteSettings, get, register


def load_suite(name: str, data_dir: Path | None, limit: int | None = None, seed: int = 0,
               **kwargs: Any) -> pd.DataFrame:
    """Load suite `name`; extra kwargs go to its loader (e.g. held_out_prompts)."""
    return get(name).load_items(Path(data_dir) if data_dir else None, limit, seed, **kwargs)


__all__ = ["SUITES", "NoSettings", "Suite", "SuiteSettings", "register", "get", "load_suite", "stratified_sample"]
