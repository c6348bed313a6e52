"""The induced × expressed co-expression matrix of the values suite and its whole-matrix test."""
from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation import stats
from evaluation.contrasts import EXPRESSES_PREFIX, VALUES_SUITE, Row

# ----------------------------------------------------------------------------- co-expression

def _induced_value(condition: str, value: object) -> str:
    if isinstance(value, str) and value:
        return value
    return condition.removeprefix("value-")


def coexpression(contrasts_df: pd.DataFrame, alpha: float = 0.05, correction: str = "holm") -> pd.DataFrame:
    """Induced × expressed effects (long form) for ``expresses/<value>`` metrics of the values suite.

    Uses the contrast against control, or against base where a cell has no control contrast.
    ``label`` is "related" for a significantly positive off-diagonal cell, "contrastive" for a
    significantly negative one, "induced" on the diagonal, "" otherwise; significance is the
    chosen corrected p (``p_holm`` or ``p_bh`` from :func:`contrasts`) below ``alpha``.
    """
    cols = ["model", "judge", "induced", "expressed", "reference", "effect", "ci_lo", "ci_hi",
            "p_value", "p_holm", "p_bh", "effect_size", "n_seeds", "n_items", "diagonal",
            "significant", "label"]
    if contrasts_df is None or len(contrasts_df) == 0:
        return pd.DataFrame(columns=cols)
    c = contrasts_df[(contrasts_df["suite"] == VALUES_SUITE)
                     & contrasts_df["metric"].astype(str).str.startswith(EXPRESSES_PREFIX)
                     & (contrasts_df["kind"] == "value") & contrasts_df["primary"]].copy()
    if c.empty:
        return pd.DataFrame(columns=cols)
    c["induced"] = [_induced_value(k, v) for k, v in zip(c["condition"], c["value"])]
    c["expressed"] = c["metric"].str.removeprefix(EXPRESSES_PREFIX)
    # Prefer the control reference; keep base only for cells without one.
    c["_pref"] = (c["reference"] != "control").astype(int)
    c = (c.sort_values(["model", "judge", "induced", "expressed", "_pref"], kind="stable")
          .drop_duplicates(["model", "judge", "induced", "expressed"], keep="first"))
    pcol = {"holm": "p_holm", "fdr_bh": "p_bh"}[correction]
    c["diagonal"] = c["induced"] == c["expressed"]
    c["significant"] = (c[pcol] < alpha).fillna(False).astype(bool)
    c["label"] = np.select(
        [c["diagonal"], c["significant"] & (c["effect"] > 0), c["significant"] & (c["effect"] < 0)],
        ["induced", "related", "contrastive"], default="")
    return c[cols].reset_index(drop=True)


def coexpression_matrix(coexp: pd.DataFrame, model: str | None = None, judge: str | None = None,
                        column: str = "effect") -> pd.DataFrame:
    """Square induced × expressed pivot of one column of :func:`coexpression` for one model/judge."""
    c = coexp
    if model is not None:
        c = c[c["model"] == model]
    if judge is not None:
        c = c[c["judge"] == judge]
    m = c.pivot_table(index="induced", columns="expressed", values=column, aggfunc="first")
    order = sorted(set(m.index) | set(m.columns))
    return m.reindex(index=[v for v in order if v in m.index], columns=order)


def crosstalk_tests(coexp: pd.DataFrame, alpha: float = 0.05) -> list[Row]:
    """Whole-matrix test per (model, judge): does inducing a value move ANY other value?

    Simes' combination of the off-diagonal cells' crossed-test p-values: the global null is
    "every off-diagonal cell is 0". It inherits the cells' run-level inference (the earlier
    label-permutation null ignored run-to-run variance and was over-conservative), and it is
    valid under the positive dependence that a shared control arm induces.
    """
    out: list[Row] = []
    if coexp is None or coexp.empty:
        return out
    off = coexp[~coexp["diagonal"].astype(bool)]
    for (model, judge), c in off.groupby(["model", "judge"], sort=True):
        p = stats.simes(c["p_value"].to_numpy(float))
        out.append(dict(model=model, judge=judge, reference=", ".join(sorted(set(c["reference"]))),
                        n_cells=int(c["p_value"].notna().sum()), p_value=p,
                        significant=bool(np.isfinite(p) and p < alpha),
                        n_related=int((c["label"] == "related").sum()),
                        n_contrastive=int((c["label"] == "contrastive").sum())))
    return out
