"""Judge audit: a stratified sample of annotations for human labelling, and agreement on it; the
random sample annotate.check re-labels, and the labeller's agreement with the check judge."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.types import VALUES
from runner.data.sources import DataError, prompt_text
from runner.store import csv_uncell

ID_COLUMNS = ("pair_id", "side")


def audit_sample(pairs: pd.DataFrame, annotations: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """About n scored responses, spread over the values the judge reported (and 'none')."""
    ann = annotations[annotations["scored"]].merge(pairs[["pair_id", "prompt", "chosen", "rejected"]], on="pair_id")
    rng = np.random.default_rng(seed)
    strata = {v: ann.index[ann["values"].map(lambda vs, v=v: v in list(vs))] for v in VALUES}
    strata["none"] = ann.index[ann["values"].map(len) == 0]
    strata = {k: idx for k, idx in strata.items() if len(idx)}
    per = max(1, n // max(1, len(strata)))
    chosen: list[int] = []
    for idx in strata.values():
        free = [i for i in idx if i not in set(chosen)]
        chosen += rng.choice(free, size=min(per, len(free)), replace=False).tolist() if free else []
    chosen = chosen[:n]
    out = ann.loc[chosen]
    return pd.DataFrame({
        "pair_id": out["pair_id"].values, "side": out["side"].values,
        "conversation": [prompt_text(list(p)) for p in out["prompt"]],
        "response": [row[row_side] for row, row_side in zip(out.to_dict("records"), out["side"])],
        "judge_values": [", ".join(v) if len(v) else "none" for v in out["values"]],
        "human_values": "",
    })


def random_sample(annotations: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """n scored responses (pair_id, side) drawn uniformly without replacement (seeded), in table order.

    annotate.check samples at random, not by the labeller's own values: on a sample stratified by
    what the labeller reported, pooled precision over-weights rare values and recall is inflated
    (responses the labeller gave no value are under-drawn), so neither is the population's figure."""
    scored = annotations.loc[annotations["scored"], list(ID_COLUMNS)]
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(scored), size=min(n, len(scored)), replace=False))
    return scored.iloc[picked].reset_index(drop=True)


def read_labels(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read the labelled audit CSV ({e})") from None
    missing = [c for c in (*ID_COLUMNS, "human_values") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    for c in ID_COLUMNS:  # written through runner.store.write_csv, which guards formula-like cells
        df[c] = df[c].map(csv_uncell)
    df = df[df["human_values"].astype(str).str.strip() != ""]
    if df.empty:
        raise DataError(f"{path}: no row has human_values filled in")
    parsed = []
    for i, text in enumerate(df["human_values"].astype(str)):
        vals = [v.strip().lower() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in VALUES and v != "none"]
        if bad:
            raise DataError(f"{path}: row {i + 2}: unknown value(s) {bad} (use the closed list or 'none')")
        parsed.append([v for v in vals if v != "none"])
    return df.assign(human=parsed)


def audit_agreement(labels: pd.DataFrame, annotations: pd.DataFrame) -> pd.DataFrame:
    """Per value: accuracy and Cohen's kappa of the judge's presence labels against the human's."""
    from evaluation.stats import cohen_kappa  # deferred: scipy/statsmodels load only when needed

    merged = labels.merge(annotations[[*ID_COLUMNS, "values", "scored"]], on=list(ID_COLUMNS), how="inner")
    merged = merged[merged["scored"]]
    rows = []
    for v in VALUES:
        h = np.array([v in x for x in merged["human"]], dtype=int)
        j = np.array([v in list(x) for x in merged["values"]], dtype=int)
        rows.append({"value": v, "n": len(h), "human_yes": int(h.sum()), "judge_yes": int(j.sum()),
                     "accuracy": float((h == j).mean()) if len(h) else float("nan"), "kappa": cohen_kappa(h, j)})
    return pd.DataFrame(rows)


def check_agreement(labeller: pd.DataFrame, check: pd.DataFrame) -> pd.DataFrame:
    """The labeller's value labels against a check judge's on the same responses (pair_id, side).

    Only responses both judges scored count. Per value and overall ("all": every (response, value)
    decision pooled): n responses, each judge's yes count, both_yes, precision = both_yes /
    labeller_yes (of the values the labeller reported, the share the check judge also reported), recall = both_yes / check_yes and Cohen's kappa; NaN where undefined."""
    from evaluation.stats import cohen_kappa  # deferred: scipy/statsmodels load only when needed

    cols = [*ID_COLUMNS, "values", "scored"]
    m = labeller[cols].merge(check[cols], on=list(ID_COLUMNS), suffixes=("_l", "_c"))
    m = m[m["scored_l"] & m["scored_c"]]
    lab = np.array([[v in list(x) for v in VALUES] for x in m["values_l"]], dtype=int).reshape(-1, len(VALUES))
    chk = np.array([[v in list(x) for v in VALUES] for x in m["values_c"]], dtype=int).reshape(-1, len(VALUES))

    def row(name: str, a: np.ndarray, b: np.ndarray) -> dict:
        both, ly, cy = int((a & b).sum()), int(a.sum()), int(b.sum())
        return {"value": name, "n": len(m), "labeller_yes": ly, "check_yes": cy, "both_yes": both,
                "precision": both / ly if ly else float("nan"), "recall": both / cy if cy else float("nan"),
                "kappa": cohen_kappa(a.tolist(), b.tolist())}

    return pd.DataFrame([row(v, lab[:, i], chk[:, i]) for i, v in enumerate(VALUES)]
                        + [row("all", lab.ravel(), chk.ravel())])
