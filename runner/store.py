"""The study store: stage outputs under content hashes, atomic writes, done/failed markers."""
from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.errors import ValindError


class StoreError(ValindError):
    pass


def safe_name(name: str) -> str:
    """A file name that cannot escape its directory (no separators, no dot-dot)."""
    out = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name).strip(".")
    if not out:
        raise StoreError(f"unusable name {name!r}")
    return out[:200]


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling dir; rename it to `final` only if the block finishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _write_atomic(path: Path, write) -> None:
    """write(tmp) then rename tmp to `path`: a failed write leaves no file, and none at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    _write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV injection"),
# and valind's CSVs hold model outputs and outside data, and are opened in spreadsheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell that would start a formula, with "'" before it (a spreadsheet shows it as text);
    also one whose quotes precede such a start, so that `csv_uncell` undoes exactly this. Numbers
    and other cells are unchanged."""
    if isinstance(value, str) and value.lstrip("'").startswith(FORMULA_START):
        return "'" + value
    return value


def csv_uncell(value: Any) -> Any:
    """The cell `csv_cell` was given (for CSVs valind reads back, e.g. a labelled audit)."""
    if isinstance(value, str) and value.startswith("'") and value[1:].lstrip("'").startswith(FORMULA_START):
        return value[1:]
    return value


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """Every CSV valind writes: atomic, with header and text cells through `csv_cell`."""
    out = df.copy()
    out.columns = [csv_cell(c) for c in out.columns]
    for i, col in enumerate(out.columns):
        if out.dtypes.iloc[i] == object or pd.api.types.is_string_dtype(out.dtypes.iloc[i]):
            out.isetitem(i, out.iloc[:, i].map(csv_cell))
    _write_atomic(path, lambda tmp: out.to_csv(tmp, index=False))


def write_json(obj: Any, path: Path) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_parquet(path: Path, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for truncated/corrupt files
        raise StoreError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StoreError(f"{path}: missing column(s) {missing}")
    return df


class Store:
    """<study dir>/stages/<stage>/<key>/ … ; a unit is complete once its _DONE.json exists."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def unit(self, stage: str, key: str) -> Path:
        return self.root / "stages" / safe_name(stage) / safe_name(key)

    def done(self, stage: str, key: str) -> bool:
        return (self.unit(stage, key) / "_DONE.json").exists()

    def failed(self, stage: str, key: str) -> dict | None:
        p = self.unit(stage, key) / "_FAILED.json"
        return json.loads(p.read_text()) if p.exists() else None

    def mark_done(self, stage: str, key: str, info: dict | None = None) -> None:
        d = self.unit(stage, key)
        (d / "_FAILED.json").unlink(missing_ok=True)
        write_json({"finished": time.time(), **(info or {})}, d / "_DONE.json")

    def mark_failed(self, stage: str, key: str, err: BaseException | str) -> None:
        text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        write_json({"time": time.time(), "error": text, "traceback": traceback.format_exc()[-4000:]},
                   self.unit(stage, key) / "_FAILED.json")

    def info(self, stage: str, key: str) -> dict:
        return json.loads((self.unit(stage, key) / "_DONE.json").read_text())
