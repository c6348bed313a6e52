"""Evaluation suites (prompt sets). Every module in this package registers one `Suite`
(evaluation.suites.registry); a suite outside it registers itself when imported.

Items: suite, item_id (stable), messages (list of {"role","content"}), metadata columns."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pandas as pd

from ._common import stratified_sample
from .registry import SUITES, Suite, SuiteSettings, get, register

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name != "registry":
        importlib.import_module(f"{__name__}.{_m.name}")


def load_suite(name: str, data_dir: Path | None, limit: int | None = None, seed: int = 0, **kwargs) -> pd.DataFrame:
    """Load suite `name`; extra kwargs go to its loader (e.g. held_out_prompts)."""
    return get(name).load_items(Path(data_dir) if data_dir else None, limit, seed, **kwargs)


__all__ = ["SUITES", "Suite", "SuiteSettings", "register", "get", "load_suite", "stratified_sample"]
