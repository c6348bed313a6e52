"""The report's "Across models" section: each contrast pooled across the study's models
(evaluation.pooled) and the value × stage test (evaluation.stage_test). Formats only."""
from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation.report.markup import esc, na, table
from evaluation.report_inputs import ReportInputs
from evaluation.stage_test import stage_line

_POOLED_SHOW = ["pool", "condition", "suite", "metric", "judge", "reference", "k_models", "effect", "95% CI", "df",
                "p_value", "p_holm", "p_bh", "tau2", "i2", "equivalence", "significant"]
_STAGE_SHOW = ["value", "reference", "k_instruct", "k_other", "effect_instruct", "effect_other", "difference",
               "95% CI", "df", "p_value", "p_holm", "significant"]

_NOTE = ('<p class="note">Each contrast estimated in at least two models (primary judge, two or more runs each) '
         'is pooled across them by a random-effects meta-analysis of the per-model estimates: DerSimonian–Laird '
         'between-model variance τ², a Hartung–Knapp–Sidik–Jonkman t interval on k − 1 df (its scale floored at '
         '1), plus the item × condition variance the models share by answering the same items '
         '(docs/STATISTICS.md, "Across models"). With two models the interval is very wide: one df for the '
         'between-model variance. Holm and BH per (pool, reference, family), as per model. Pool "all models" '
         'covers every model; a family name (models[i].family) the models of that family. I² is the share of '
         'the estimates\' dispersion beyond their sampling error.</p>')


def _ci(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(**{"95% CI": [f"[{lo:+.3g}, {hi:+.3g}]" if np.isfinite(lo) and np.isfinite(hi) else ""
                                   for lo, hi in zip(df["ci_lo"].astype(float), df["ci_hi"].astype(float))]})


def across_models_section(inputs: ReportInputs) -> str:
    pooled, st = inputs.tables.pooled, inputs.tables.stage_test
    runs = inputs.runs
    n_models = runs["model"].nunique() if runs is not None else 0
    out = [_NOTE]
    if pooled is None or pooled.empty:
        out.append(na(f"Pooled contrasts (the study has {n_models} model{'s' if n_models != 1 else ''}; "
                      "pooling needs a contrast tested in at least two)"))
    else:
        p = _ci(pooled)
        out.append(table(p[[c for c in _POOLED_SHOW if c in p.columns]], "Pooled contrasts", highlight="significant"))
    out.append("<h3>Value × stage: own expression, instruct models against the others</h3>")
    out.append('<p class="note">Per induced value, the instruct models\' own-expression effect pooled as above '
               '(one model: its own estimate) minus the other stages\' (base, sft); SE from both, Welch–'
               'Satterthwaite df; Holm across values.</p>')
    if st is None or st.empty:
        return "".join(out) + f"<p>{esc(stage_line(None, ''))}.</p>"
    for ref in st["reference"].unique():
        out.append(f"<p><b>Against the {esc(ref)}:</b> {esc(stage_line(st, str(ref)))}.</p>")
    s = _ci(st)
    out.append(table(s[_STAGE_SHOW], "Value × stage test", highlight="significant"))
    return "".join(out)
