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


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_parquet(tmp, index=False)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file is left behind, and none at `path`
        raise
    tmp.replace(path)


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


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
