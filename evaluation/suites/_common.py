"""Helpers shared by the suite loaders: chat construction, stable hashing, stratified sampling."""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

import pandas as pd


def user(content: str) -> list[dict[str, Any]]:
    """A one-turn chat."""
    return [{"role": "user", "content": content}]


def stable_key(seed: int, unit: str) -> str:
    # A content hash, not a RNG draw: an item's rank must not depend on row order or on which
    # other items are loaded, so that ids sampled at one limit stay sampled when files grow.
    return hashlib.sha1(f"{seed}|{unit}".encode()).hexdigest()


def short_hash(text: str, n: int = 10) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def _allocate(sizes: Sequence[int], n: int) -> list[int]:
    """Split n as evenly as possible over groups of the given sizes (caps redistribute)."""
    alloc = [0] * len(sizes)
    open_ = [i for i, s in enumerate(sizes) if s > 0]
    left = n
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        # Extra units go to the first groups in sorted-key order: deterministic.
        for rank, i in enumerate(open_):
            want = share + (1 if rank < extra else 0)
            take = min(want, sizes[i] - alloc[i])
            alloc[i] += take
            left -= take
        open_ = [i for i in open_ if alloc[i] < sizes[i]]
    return alloc


def stratified_sample(df: pd.DataFrame, limit: int | None, by: Sequence[str], seed: int = 0,
                      unit: str = "item_id") -> pd.DataFrame:
    """Deterministic, hierarchically balanced sample of `limit` rows.

    `limit` is split evenly across the groups of `by[0]`, then within each group evenly across
    `by[1]`, and so on; a group smaller than its share gives the rest to its siblings. Inside the
    last level rows are ranked by a hash of (seed, row[unit]), so rows sharing a unit value in
    sibling groups (e.g. the same question under several templates) are picked together.
    The result keeps the input's row order.
    """
    if limit is None or limit >= len(df):
        return df.reset_index(drop=True)
    if limit <= 0:
        return df.iloc[0:0].reset_index(drop=True)
    keys = df[unit].astype(str).map(lambda u: stable_key(seed, u))
    keys = keys + "|" + df["item_id"].astype(str)  # tie-break within a unit

    def pick(index: pd.Index, n: int, level: int) -> list[Any]:
        if level == len(by):
            return list(keys.loc[index].sort_values(kind="mergesort").index[:n])
        groups = sorted(df.loc[index].groupby(by[level], sort=True, dropna=False).groups.items(),
                        key=lambda kv: str(kv[0]))
        alloc = _allocate([len(ix) for _, ix in groups], n)
        out: list[Any] = []
        for (_, ix), k in zip(groups, alloc):
            if k:
                out += pick(pd.Index(ix), k, level + 1)
        return out

    chosen = set(pick(df.index, limit, 0))
    return df[df.index.isin(chosen)].reset_index(drop=True)


def frame(rows: Iterable[dict[str, Any]], suite: str, columns: Sequence[str]) -> pd.DataFrame:
    """Rows -> item table with ITEM_COLUMNS first; checks id uniqueness."""
    df = pd.DataFrame(list(rows))
    df.insert(0, "suite", suite)
    df = df[["suite", "item_id", "messages", *columns]]
    dup = df["item_id"][df["item_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{suite}: duplicate item ids {list(dup[:5])}")
    return df
