"""The report's results: the paper's claims, one table per induced value, co-expression, side effects."""
from __future__ import annotations

import numpy as np
import pandas as pd

from evaluation.claims import NEGATIVE_VALUES
from evaluation.contrasts import EXPRESSES_PREFIX, VALUES_SUITE
from evaluation.report.figures import forest_plots, heatmap
from evaluation.report.markup import SHORT_ES, Figures, esc, na, table

CONTRAST_SHOW = ["stage", "model", "condition", "metric", "judge", "primary", "reference", "n_seeds", "n_items",
                 "n_unscored_pairs", "mean_condition", "mean_reference", "effect", "se", "df", "ci_lo",
                 "ci_hi", "p_value", "p_holm", "p_bh", "effect_size", "effect_size_kind", "significant"]
_PER_VALUE_SHOW = ["suite", "metric", "judge", "primary", "reference", "n_seeds", "n_items", "mean_condition",
                   "mean_reference", "effect", "95% CI", "p_value", "p_holm", "p_bh", "effect_size", "significant"]
_SUITE_ORDER = ("safety", "anthropomorphism", "sycophancy", "qa", "values")


def claims_section(claims: pd.DataFrame | None, positive_values: tuple[str, ...] | None) -> str:
    which = ("exclude " + " and ".join(sorted(NEGATIVE_VALUES)) + " (our reading; the paper does not list them)"
             if positive_values is None else "are the spec's values.positive: " + ", ".join(positive_values))
    return ('<p class="note">Each claim of the paper, tested on every contrast that bears on it, each counted '
            'once by its primary judge: "for" and "against" count contrasts significant (Holm) whose CI '
            f'excludes 0 on the predicted and on the opposite side; for a "stays stable" claim "for" counts the '
            'contrasts shown equivalent within ±margin (two one-sided tests, analyze.equivalence_margin) and '
            '"against" the changed ones. "level": per-model contrasts, or contrasts pooled across models (see '
            f'"Across models"). "Positive" values {esc(which)}.</p>'
            + table(claims, "Claims table"))


def per_value_section(contrasts_df: pd.DataFrame, alpha: float) -> str:
    """One table per induced value: its own expression and every side-effect metric, against
    the controls and against the base model (other values' expression is in the co-expression section)."""
    note = ('<p class="note">effect = mean paired (item-by-item) '
            'difference condition − reference over trained runs; 95% CI and p from one t-test with trained '
            'runs and items as crossed random factors (docs/STATISTICS.md), so a CI excludes 0 exactly '
            'when p &lt; α; p_holm / p_bh corrected per (model, reference) over the primary judge of '
            f'each metric; highlighted rows are primary and have p_holm &lt; {alpha:g}; rows with '
            '"primary" empty are other judges of the same contrast (sensitivity). Effect size: Cohen\'s h '
            'for rates, d = effect / SD of one (run, item) difference for continuous metrics.</p>')
    c = contrasts_df[contrasts_df["kind"] == "value"]
    if c.empty:
        return note + na("Per-value results")
    if "stage" in c.columns:  # models of several stages: one block per stage, in by_stage's order
        return note + "".join(f"<h3>{esc(stage)} models</h3>" + _per_value_tables(d, "h4")
                              for stage, d in c.groupby("stage", sort=False))
    return note + _per_value_tables(c, "h3")


def _compact(c: pd.DataFrame) -> pd.DataFrame:
    """CI as one column and the effect-size kind folded into its value, so the table fits a page."""
    c = c.copy()
    c["95% CI"] = [f"[{lo:+.3g}, {hi:+.3g}]" if np.isfinite(lo) and np.isfinite(hi) else ""
                   for lo, hi in zip(c["ci_lo"].astype(float), c["ci_hi"].astype(float))]
    c["effect_size"] = [f"{SHORT_ES.get(k, k)} {v:.3g}" if pd.notna(v) else ""
                        for k, v in zip(c["effect_size_kind"], c["effect_size"].astype(float))]
    return c


def _per_value_tables(c: pd.DataFrame, h: str) -> str:
    out = []
    for (model, _), d in c.groupby(["model", "condition"], sort=True):
        value = str(d["value"].iloc[0])
        own = d["metric"] == f"{EXPRESSES_PREFIX}{value}"
        d = d[(d["suite"] != VALUES_SUITE) | own].assign(_side=~own)  # own expression first
        d = d.assign(_sens=~d["primary"]).sort_values(["_side", "suite", "metric", "reference", "_sens", "judge"])
        out.append(f"<{h}>{esc(value)} <span class='note'>({esc(model)})</span></{h}>")
        out.append(table(_compact(d)[_PER_VALUE_SHOW], f"Results for {value}", highlight="significant",
                         collapse_over=200))
    return "".join(out)


def coexpression_section(figs: Figures, co: pd.DataFrame | None, crosstalk: pd.DataFrame | None) -> str:
    if co is None or co.empty:
        return na("Co-expression matrix (no 'expresses/<value>' metrics in suite 'values')")
    out = ['<p class="note">Cells: effect of inducing the row value on the expression rate of the '
           'column value, against controls (against base where a model has no controls). '
           '"related" = significantly positive off-diagonal, "contrastive" = significantly '
           'negative (Holm-corrected within the study family).</p>']
    for (model, judge), _ in co.groupby(["model", "judge"], sort=True):
        out.append(f"<h3>{esc(model)} — judge {esc(judge)}</h3>")
        out.append(heatmap(figs, co, str(model), str(judge)))
    labelled = co[co["label"].isin(["related", "contrastive"])]
    out.append("<h3>Related and contrastive pairs</h3>")
    out.append(table(labelled, "Related/contrastive pairs") if not labelled.empty
               else '<p class="note">No significant off-diagonal cells.</p>')
    out.append(table(co, "Full co-expression table"))
    out.append("<h3>Whole-matrix test</h3>")
    if crosstalk is not None and not crosstalk.empty:
        out.append('<p class="note">Null hypothesis: inducing a value moves no other value (every '
                   'off-diagonal cell is 0). Simes\' combination of the cells\' p-values.</p>')
        out.append(table(crosstalk, "Whole-matrix test"))
    else:
        out.append(na("Whole-matrix test (needs off-diagonal cells)"))
    return "".join(out)


def side_effects_section(figs: Figures, contrasts_df: pd.DataFrame | None) -> str:
    """Per suite: forest plots and every contrast."""
    if contrasts_df is None:
        return na("Contrasts")
    out = []
    order = {s: i for i, s in enumerate(_SUITE_ORDER)}
    for suite, c in sorted(contrasts_df.groupby("suite"), key=lambda kv: (order.get(kv[0], 9), kv[0])):
        out.append(f"<h3>{esc(suite)}</h3>" + forest_plots(figs, c, str(suite)))
        cols = [k for k in CONTRAST_SHOW if k in c.columns]
        out.append(table(c[cols], f"All {suite} contrasts", highlight="significant", collapse_over=0))
    return "".join(out)
