"""Self-contained HTML report of a value-induction study (tables + matplotlib figures as base64 PNG).

Everything shown is computed by the caller (``analyze``); this module only formats. Any missing
input produces a "not available" line instead of an error.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from evaluation import analyze  # noqa: E402
from evaluation.sanity import adapter_verdicts  # noqa: E402

__all__ = ["write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f0f0f0}td.s{text-align:left}tr.sig td{background:#fff3d6}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px}
.na{color:#a33;font-style:italic}.note{color:#555;font-size:13px}
.ok{border-left:4px solid #27ae60;padding-left:.6em}.bad{border-left:4px solid #c0392b;padding-left:.6em}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
"""

_MAX_ROWS = 2000  # beyond this a table is truncated, with a note, to keep the file usable

_CONTRAST_SHOW = ["stage", "model", "condition", "metric", "judge", "primary", "reference", "n_seeds", "n_items",
                  "n_unscored_pairs", "mean_condition", "mean_reference", "effect", "se", "df", "ci_lo",
                  "ci_hi", "p_value", "p_holm", "p_bh", "effect_size", "effect_size_kind", "significant"]


# ----------------------------------------------------------------------------- formatting

def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x, col: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if col.startswith("p_") or col == "p_value":
            return f"{x:.2e}" if 0 < x < 1e-3 else f"{x:.3f}"
        return f"{x:.4g}"
    return str(x)


def _na(what: str) -> str:
    return f'<p class="na">{_esc(what)}: not available.</p>'


def _table(df: pd.DataFrame | None, what: str, highlight: str | None = None,
           collapse_over: int = 60) -> str:
    """HTML table with every header and cell escaped; long tables go inside <details>."""
    if df is None or not isinstance(df, pd.DataFrame) or df.empty:
        return _na(what)
    note = ""
    if len(df) > _MAX_ROWS:
        note = f'<p class="note">Showing the first {_MAX_ROWS} of {len(df)} rows.</p>'
        df = df.head(_MAX_ROWS)
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cls = ' class="sig"' if highlight and bool(row.get(highlight, False)) else ""
        cells = []
        for c in df.columns:
            v = row[c]
            is_text = not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool)
            cells.append(f'<td{" class=s" if is_text else ""}>{_esc(_fmt(v, str(c)))}</td>')
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    t = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"
    if len(df) > collapse_over:
        return f"<details><summary>{_esc(what)} ({len(df)} rows)</summary>{t}</details>"
    return t


class _Figures:
    """Saves figures to out_dir/figures and returns <img> tags with the PNG embedded."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.used: set[str] = set()

    def add(self, fig, name: str, alt: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "figure"
        base, i = stem, 1
        while stem in self.used:
            i += 1
            stem = f"{base}_{i}"
        self.used.add(stem)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        png = buf.getvalue()
        (self.dir / f"{stem}.png").write_bytes(png)
        b64 = base64.b64encode(png).decode("ascii")
        return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


# ----------------------------------------------------------------------------- figures

def _forest(figs: _Figures, df: pd.DataFrame, suite: str, reference: str, part: int) -> str:
    df = df.iloc[::-1]  # matplotlib draws the first row at the bottom
    labels = [f"{r.model} · {r.condition} · {r.metric} [{r.judge}]" for r in df.itertuples()]
    y = np.arange(len(df))
    eff = df["effect"].to_numpy(float)
    lo = np.clip(eff - df["ci_lo"].to_numpy(float), 0, None)
    hi = np.clip(df["ci_hi"].to_numpy(float) - eff, 0, None)
    sig = df["significant"].to_numpy(bool)
    fig, ax = plt.subplots(figsize=(9, max(2.0, 0.26 * len(df) + 1.0)))
    for mask, color, lab in ((~sig, "#777777", "n.s."), (sig, "#c0392b", "significant (Holm)")):
        if mask.any():
            ax.errorbar(eff[mask], y[mask], xerr=[lo[mask], hi[mask]], fmt="o", color=color,
                        ms=4, capsize=2, lw=1, label=lab)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel(f"effect vs {reference} (mean paired difference, 95% CI)")
    ax.set_title(f"{suite}: effect vs {reference}" + (f" (part {part})" if part > 1 else ""))
    ax.legend(fontsize=7, loc="best")
    return figs.add(fig, f"forest_{suite}_{reference}_{part}", f"Forest plot {suite} vs {reference}")


def _forest_plots(figs: _Figures, c: pd.DataFrame, suite: str, chunk: int = 80) -> str:
    parts = []
    for reference, d in c.groupby("reference", sort=True):
        d = d[np.isfinite(d["effect"].to_numpy(float))]
        for k, start in enumerate(range(0, len(d), chunk), start=1):
            parts.append(_forest(figs, d.iloc[start:start + chunk], suite, reference, k))
    return "".join(parts) or _na(f"Forest plot for suite {suite}")


def _heatmap(figs: _Figures, co: pd.DataFrame, model: str, judge: str) -> str:
    m = analyze.coexpression_matrix(co, model, judge, "effect")
    lab = analyze.coexpression_matrix(co, model, judge, "label").reindex_like(m)
    sig = analyze.coexpression_matrix(co, model, judge, "significant").reindex_like(m)
    vals = m.to_numpy(float)
    vmax = np.nanmax(np.abs(vals)) if np.isfinite(vals).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    n_r, n_c = vals.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n_c + 2), max(3, 0.5 * n_r + 1.5)))
    im = ax.imshow(vals, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    marks = {"related": "+", "contrastive": "−"}
    for i in range(n_r):
        for j in range(n_c):
            if np.isfinite(vals[i, j]):
                mark = marks.get(lab.iat[i, j], "")
                if lab.iat[i, j] == "induced" and pd.notna(sig.iat[i, j]) and bool(sig.iat[i, j]):
                    mark = "*"
                dark = abs(vals[i, j]) > 0.6 * vmax  # white text stays readable on dark cells
                ax.text(j, i, f"{vals[i, j]:.2f}{mark}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_xticks(range(n_c), list(m.columns), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_r), list(m.index), fontsize=8)
    ax.set_xlabel("expressed value")
    ax.set_ylabel("induced value")
    ax.set_title(f"Co-expression Δ — {model} [{judge}]\n(+ related, − contrastive, * induced; Holm)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="effect (rate difference)")
    return figs.add(fig, f"coexpression_{model}_{judge}", f"Co-expression heatmap {model} {judge}")


def _agreement_figure(figs: _Figures, agreement: pd.DataFrame) -> str:
    """Accuracy (Wilson 95% CI) and Cohen's kappa of each judge against the human labels."""
    from statsmodels.stats.proportion import proportion_confint

    a = agreement.dropna(subset=["accuracy"])
    if a.empty:
        return ""
    n = a["n"].to_numpy(int)
    acc = a["accuracy"].to_numpy(float)
    lo, hi = proportion_confint(np.round(acc * n), n, alpha=0.05, method="wilson")
    y = np.arange(len(a))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.45 * len(a) + 1.4), sharey=True)
    ax1.errorbar(acc, y, xerr=[acc - lo, hi - acc], fmt="o", color="#2c3e50", capsize=3)
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("accuracy vs human labels (Wilson 95% CI)")
    ax1.set_yticks(y, [str(j) for j in a["judge"]], fontsize=8)
    ax2.barh(y, a["kappa"].to_numpy(float), color="#2980b9")
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_xlim(min(-0.2, float(np.nanmin(a["kappa"])) - 0.05), 1)
    ax2.set_xlabel("Cohen's κ (0 = chance)")
    fig.suptitle(f"Refusal judges against {int(n.max())} human-labelled responses", fontsize=9)
    return figs.add(fig, "judge_agreement", "Judge agreement with human labels")


# ----------------------------------------------------------------------------- sections

def _header(extras: dict, runs: pd.DataFrame | None) -> str:
    name = extras.get("study_name") or "Value-induction study"
    out = [f"<h1>{_esc(name)}</h1>"]
    if extras.get("description"):
        out.append(f"<p>{_esc(extras['description'])}</p>")
    if isinstance(runs, pd.DataFrame) and not runs.empty:
        kinds = runs.groupby("kind")["condition"].nunique()
        seeds = sorted({int(s) for s in runs["seed"].dropna()})
        positive = " + a positive control (planted marker)" if kinds.get("positive", 0) else ""
        out.append(f"<p>{runs['model'].nunique()} model(s) × ({kinds.get('value', 0)} induced value(s){positive} + "
                   f"{kinds.get('control', 0)} random-subset control arm(s)"
                   + (", each matched to one value's size and length profile"
                      if "match" in runs.columns and runs["match"].notna().any() else "")
                   + f") × seeds {seeds}, plus each "
                   f"base model: {len(runs)} evaluated runs.</p>")
    if extras.get("system_prompt"):
        out.append(f"<p>{_esc(_system_prompt_line(extras['system_prompt']))}</p>")
    version = extras.get("code_version")
    out.append(f'<p class="note">Code version {_esc(version)}; generated '
               f'{_esc(_dt.datetime.now().isoformat(timespec="seconds"))}. The exact spec is in the appendix.</p>'
               if version else _na("Code version"))
    if extras.get("notes"):
        out.append(f'<p class="note">{_esc(extras["notes"])}</p>')
    return "".join(out)


def _system_prompt_line(sp: dict) -> str:
    """Whether the training system prompt is present at generation time ({"text", "per_value",
    "at_generation": "none" | "train"}, from train.system_prompt and generate.system_prompt)."""
    text = sp.get("text")
    if not text:
        return "System prompt in training: none; at generation: absent."
    per_value = bool(sp.get("per_value"))
    train = f"“{text}” (" + ("per value: each value arm and its matched controls get their value's text"
                             if per_value else "fixed: the same for every trained run") + ")"
    if sp.get("at_generation") != "train":
        return f"System prompt in training: {train}; at generation: absent."
    if per_value:
        return (f"System prompt in training: {train}; at generation: present for trained runs (each its own "
                "text), absent for base models (a {value} template has no value for them), so effects against "
                "a base model include the system prompt's own.")
    return f"System prompt in training: {train}; at generation: present (trained runs and base models)."


_STAGES = ("base", "sft", "instruct")  # models[i].stage, in the order the report groups results


def _model_stages(runs: pd.DataFrame | None) -> dict[str, str] | None:
    """model → stage when the study's models span more than one stage; None: results are not grouped."""
    if runs is None or "stage" not in runs.columns:
        return None
    st = runs.drop_duplicates("model").set_index("model")["stage"].astype(str)
    return st.to_dict() if st.nunique() > 1 else None


def _by_stage(df: pd.DataFrame, stages: dict[str, str]) -> pd.DataFrame:
    """A "stage" column first and rows ordered base → sft → instruct (their order kept within a stage)."""
    df = df.assign(stage=df["model"].map(stages))
    rank = df["stage"].map({s: i for i, s in enumerate(_STAGES)}).fillna(len(_STAGES)).to_numpy()
    return df.iloc[np.argsort(rank, kind="stable")][["stage"] + [c for c in df.columns if c != "stage"]]


def _short_judges(c: pd.DataFrame) -> pd.DataFrame:
    """Judge names without their model/version suffix ("llm:smollm2-135m@vllm-0.32.0" → "llm") for
    result tables, unless that would merge two judges; the provenance table keeps the full names."""
    full = pd.Series(c["judge"].astype(str).unique())
    short = full.str.split(":").str[0]
    if short.nunique() < len(full):
        return c
    return c.assign(judge=c["judge"].astype(str).map(dict(zip(full, short))))


def _summary(contrasts_df: pd.DataFrame, extras: dict, alpha: float) -> str:
    """The findings in sentences: what is significant after correction, else what comes closest."""
    c = contrasts_df[np.isfinite(contrasts_df["effect"].to_numpy(float)) & contrasts_df["primary"]
                     & (contrasts_df["family"] == "study")]
    sig = c[c["significant"].fillna(False).astype(bool)]
    n_bh = int((c["p_bh"] < alpha).sum())
    by_ref = ", ".join(f"{n} against {r}" for r, n in c.groupby("reference").size().items())
    out = [f"<p>{len(c)} paired contrasts of the study ({_esc(by_ref)}; each scored by its primary judge, "
           f"other judges are sensitivity analyses in the tables); <b>{len(sig)} significant after Holm</b> at "
           f"α = {alpha:g} ({n_bh} after Benjamini-Hochberg).</p>"]
    one_run = c[c["inference"] != "runs × items"]
    if len(one_run):
        out.append(f"<p><b>{len(one_run)} contrast(s) rest on a single trained run</b>: run-to-run variance is "
                   "unmeasured there, so they get a CI over items but no p-value and make no claim across "
                   "training runs.</p>")

    def sentence(r) -> str:
        who = f"inducing {r.value}" if r.kind == "value" else r.condition
        model = f"{r.model} ({r.stage})" if hasattr(r, "stage") else r.model
        return (f"{_esc(model)}: {_esc(who)} changes {_esc(r.suite)}/{_esc(r.metric)} "
                f"[{_esc(r.judge)}] by {r.effect:+.3g} (95% CI {r.ci_lo:+.3g} to {r.ci_hi:+.3g}) against "
                f"{_esc(r.reference)}; p = {_fmt(r.p_value, 'p_value')}, Holm p = {_fmt(r.p_holm, 'p_holm')}, "
                f"{_esc(_SHORT_ES.get(r.effect_size_kind, r.effect_size_kind))} = {_fmt(r.effect_size)} ({int(r.n_seeds)} run(s), "
                f"{int(r.n_items)} items).")
    if len(sig):
        top = sig.sort_values("p_holm").head(15)
        out.append("<ul>" + "".join(f"<li>{sentence(r)}</li>" for r in top.itertuples()) + "</ul>")
        if len(sig) > len(top):
            out.append(f'<p class="note">…and {len(sig) - len(top)} more in the tables below.</p>')
    else:
        near = c.assign(_abs=c["effect_size"].abs()).sort_values(["p_value", "_abs"], ascending=[True, False],
                                                                 na_position="last")
        out.append("<p>No effect is significant after correction. The contrasts closest to it (smallest "
                   "uncorrected p), none significant:</p><ul>"
                   + "".join(f"<li>{sentence(r)}</li>" for r in near.head(5).itertuples()) + "</ul>")
    return "".join(out)


def _sensitivity(contrasts_df: pd.DataFrame | None, extras: dict, alpha: float) -> str:
    """What the study can see (the positive control) beside what it wrongly sees (the A/A check),
    and whether every trained run's adapter changed its model at all (evaluation.sanity)."""
    out = []
    pcs = analyze.positive_control(contrasts_df, alpha) if contrasts_df is not None else []
    if pcs:
        out += [f"<p class='{'ok' if p['detected'] else 'bad'}'><b>Sensitivity.</b> {_esc(p['line'])}.</p>"
                for p in pcs]
    else:
        out.append("<p class='na'><b>Sensitivity</b>: not measured (no positive control: set "
                   "controls.positive). Without it a null result cannot be told from a blind pipeline.</p>")
    aa = extras.get("aa_checks")
    if isinstance(aa, pd.DataFrame) and not aa.empty:
        out.append("<p><b>Specificity.</b> A/A check (two random-control arms against each other, where every "
                   "null is true, tested and corrected like the study's contrasts): "
                   + "; ".join(f"{_esc(r.model)}{_aa_match(r)}: {int(r.n_significant)} of {int(r.n_tests)} comparisons "
                               f"significant after Holm ({int(r.n_significant_uncorrected)} before correction)"
                               for r in aa.itertuples()) + ".</p>")
    else:
        out.append("<p class='na'><b>Specificity</b>: no A/A check (controls.aa_check).</p>")
    for v in adapter_verdicts(extras.get("adapters")):
        cls = {"flagged": "bad", "passed": "ok", "unchecked": "na"}[v["status"]]
        out.append(f"<p class='{cls}'><b>Adapters.</b> {_esc(v['line'])}. See the appendix.</p>")
    return "".join(out)


def _aa_match(r) -> str:
    """A per-value A/A row's value in brackets (aa_checks' optional match column); empty otherwise."""
    m = getattr(r, "match", None)
    return f" ({_esc(m)})" if isinstance(m, str) else ""


def _claims_section(contrasts_df: pd.DataFrame, co: pd.DataFrame, crosstalk: list[dict],
                    positive_values: list[str] | None) -> str:
    from evaluation.claims import NEGATIVE_VALUES, claims_table

    t = claims_table(contrasts_df, coexpression=co, crosstalk=crosstalk, positive_values=positive_values)
    which = ("exclude " + " and ".join(sorted(NEGATIVE_VALUES)) + " (our reading; the paper does not list them)"
             if positive_values is None else "are the spec's values.positive: " + ", ".join(positive_values))
    return ('<p class="note">Each claim of the paper, tested on every contrast that bears on it, each counted '
            'once by its primary judge: "for" and "against" count contrasts significant (Holm) whose CI '
            f'excludes 0 on the predicted and on the opposite side. "Positive" values {_esc(which)}.</p>'
            + _table(t, "Claims table"))


_PER_VALUE_SHOW = ["suite", "metric", "judge", "primary", "reference", "n_seeds", "n_items", "mean_condition",
                   "mean_reference", "effect", "95% CI", "p_value", "p_holm", "p_bh", "effect_size", "significant"]
_SHORT_ES = {"cohens_h": "h", "d_per_observation": "d"}


def _compact(c: pd.DataFrame) -> pd.DataFrame:
    """CI as one column and the effect-size kind folded into its value, so the table fits a page."""
    c = c.copy()
    c["95% CI"] = [f"[{lo:+.3g}, {hi:+.3g}]" if np.isfinite(lo) and np.isfinite(hi) else ""
                   for lo, hi in zip(c["ci_lo"].astype(float), c["ci_hi"].astype(float))]
    c["effect_size"] = [f"{_SHORT_ES.get(k, k)} {v:.3g}" if pd.notna(v) else ""
                        for k, v in zip(c["effect_size_kind"], c["effect_size"].astype(float))]
    return c


def _per_value_section(contrasts_df: pd.DataFrame) -> str:
    """One table per induced value: its own expression and every side-effect metric, against
    the controls and against the base model (other values' expression is in the co-expression section)."""
    c = contrasts_df[contrasts_df["kind"] == "value"]
    if c.empty:
        return _na("Per-value results")
    if "stage" in c.columns:  # models of several stages: one block per stage, in _by_stage's order
        return "".join(f"<h3>{_esc(stage)} models</h3>" + _per_value_tables(d, "h4")
                       for stage, d in c.groupby("stage", sort=False))
    return _per_value_tables(c, "h3")


def _per_value_tables(c: pd.DataFrame, h: str) -> str:
    out = []
    for (model, cond), d in c.groupby(["model", "condition"], sort=True):
        value = str(d["value"].iloc[0])
        own = d["metric"] == f"{analyze.EXPRESSES_PREFIX}{value}"
        d = d[(d["suite"] != analyze.VALUES_SUITE) | own].assign(_side=~own)  # own expression first
        d = d.assign(_sens=~d["primary"]).sort_values(["_side", "suite", "metric", "reference", "_sens", "judge"])
        out.append(f"<{h}>{_esc(value)} <span class='note'>({_esc(model)})</span></{h}>")
        out.append(_table(_compact(d)[_PER_VALUE_SHOW], f"Results for {value}", highlight="significant",
                          collapse_over=200))
    return "".join(out)


def _curation_section(extras: dict) -> str:
    """The rule and sizes, each value's pairs kept as they are / flipped / dropped, the values dropped
    below min_subset_size (data.subset_size: all), then the curation table."""
    rule, out = extras.get("curation_rule"), []
    if isinstance(rule, dict):
        sizes = ("every eligible pair of each value (unequal sizes)" if rule.get("subset_size") == "all"
                 else f"{rule.get('N')} pairs per condition")
        match = (rule.get("controls") or {}).get("match", "pooled")
        out.append(f"<p>Rule <b>{_esc(rule.get('rule'))}</b>: {_esc(rule.get('description', ''))}. Subsets: "
                   f"{_esc(sizes)}; random controls: {_esc(match)}"
                   + (" (each value's own size and length profile)" if match == "per_value" else "") + ".</p>")
        counts = rule.get("counts") or {}
        if counts:
            drop = ("dropped_both_sides", "dropped_neither_side", "dropped_rejected_only")
            out.append("<p>Eligible pairs per value, kept as they are / flipped / dropped (value on both sides, on "
                       "neither, only on the rejected side): " + "; ".join(
                           f"{_esc(v)} {c['kept_as_is']} / {c['flipped']} / {sum(c[k] for k in drop)} "
                           f"({' + '.join(str(c[k]) for k in drop)})" for v, c in counts.items()) + ".</p>")
        dropped = rule.get("dropped") or {}
        if dropped:
            out.append("<p><b>Dropped value(s)</b>: "
                       + ", ".join(f"{_esc(v)} ({n} eligible pairs)" for v, n in dropped.items())
                       + f": fewer than data.min_subset_size = {rule.get('min_subset_size')} (data.subset_size: "
                         "all drops such values); they have no runs.</p>")
    return "".join(out) + _table(extras.get("curation"), "Curation table")


def _label_check_section(check: dict | None) -> str:
    """annotate.check: the value labeller against a larger judge on a stratified sample."""
    if not isinstance(check, dict):
        return ""
    return (f"<h3>Value labeller against {_esc(check.get('judge'))}</h3>"
            f"<p class='note'>{_esc(check.get('labeller'))}'s value labels against the check judge's (same "
            "prompt) on a sample stratified by the labeller's values (annotate.check): precision = the share "
            "of the labeller's values the check judge also reported, recall = the share of the check judge's "
            "values the labeller reported, Cohen's κ per value; row \"all\" pools every (response, value) "
            "decision.</p>" + _table(check.get("table"), "Labeller check"))


def _aa_section(extras: dict) -> str:
    aa = extras.get("aa_checks")
    if not isinstance(aa, pd.DataFrame) or aa.empty:
        return _na("A/A check (set controls.aa_check: true with controls.count >= 2)")
    detail = extras.get("aa_detail")
    return ('<p class="note">control-0 against control-1 (per-value controls: control-&lt;v&gt;-0 against '
            'control-&lt;v&gt;-1 for each value), paired by seed and item, on every metric, tested and '
            'Holm-corrected over the same families of primary-judge rows as the study\'s contrasts. Both arms '
            'are random subsets, so every difference is noise: a study should show a significant comparison '
            'in at most α of such checks. More than that says the tests are anticonservative for this '
            'design.</p>' + _table(aa, "A/A checks")
            + (_table(detail, "A/A comparisons", highlight="significant", collapse_over=0)
               if detail is not None else ""))
def _judges_section(scores: pd.DataFrame | None, prm: pd.DataFrame) -> str:
    if scores is None or len(scores) == 0 or prm.empty:
        return _na("Judge provenance")
    t = (prm.groupby(["suite", "metric", "judge"], sort=True)
            .agg(n_runs=("run_id", "nunique"), n_scored=("n_scored", "sum"),
                 n_unscored=("n_unscored", "sum")).reset_index())
    return ('<p class="note">Every number in this report is tied to the judge named in its '
            '<code>judge</code> column (result tables show the name before ":"); this table lists '
            'which judge, with its model and engine version, scored each metric.</p>'
            + _table(t, "Judge provenance"))


def _condition_summary(runs: pd.DataFrame, prm: pd.DataFrame) -> pd.DataFrame | None:
    """Mean and seed SD of each metric per (model, condition): base/control/value side by side."""
    if prm.empty or runs is None or runs.empty:
        return None
    m = prm.merge(runs[["run_id", "model", "condition", "kind"]], on="run_id", how="inner")
    if m.empty:
        return None
    g = m.groupby(["suite", "metric", "judge", "model", "kind", "condition"], sort=True)["mean"]
    return g.agg(n_runs="count", mean="mean", sd_across_seeds="std").reset_index()


def _coexpression_section(figs: _Figures, co: pd.DataFrame | None, crosstalk: list[dict]) -> str:
    if co is None or co.empty:
        return _na("Co-expression matrix (no 'expresses/<value>' metrics in suite 'values')")
    out = ['<p class="note">Cells: effect of inducing the row value on the expression rate of the '
           'column value, against controls (against base where a model has no controls). '
           '"related" = significantly positive off-diagonal, "contrastive" = significantly '
           'negative (Holm-corrected within the study family).</p>']
    for (model, judge), _ in co.groupby(["model", "judge"], sort=True):
        out.append(f"<h3>{_esc(model)} — judge {_esc(judge)}</h3>")
        out.append(_heatmap(figs, co, model, judge))
    labelled = co[co["label"].isin(["related", "contrastive"])]
    out.append("<h3>Related and contrastive pairs</h3>")
    out.append(_table(labelled, "Related/contrastive pairs") if not labelled.empty
               else '<p class="note">No significant off-diagonal cells.</p>')
    out.append(_table(co, "Full co-expression table"))
    out.append("<h3>Whole-matrix test</h3>")
    if crosstalk:
        out.append('<p class="note">Null hypothesis: inducing a value moves no other value (every '
                   'off-diagonal cell is 0). Simes\' combination of the cells\' p-values.</p>')
        out.append(_table(pd.DataFrame(crosstalk), "Whole-matrix test"))
    else:
        out.append(_na("Whole-matrix test (needs off-diagonal cells)"))
    return "".join(out)


def _trajectory(figs: _Figures, traj: pd.DataFrame) -> str:
    """CI half-width and p of the watched contrasts after each round of seeds.adaptive."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
    for key, d in traj.groupby(["condition", "suite", "metric"], sort=True):
        d = d.sort_values("n_seeds")
        label = " · ".join(map(str, key))
        ax1.plot(d["n_seeds"], d["ci_halfwidth"], "o-", label=label)
        ax2.plot(d["n_seeds"], d["p_holm"], "o-", label=label)
    ax1.set_xlabel("trained runs per condition")
    ax1.set_ylabel("95% CI half-width")
    ax2.set_xlabel("trained runs per condition")
    ax2.set_ylabel("Holm p")
    ax2.set_yscale("log")
    ax2.axhline(0.05, color="k", lw=0.8, ls="--")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.legend(fontsize=6)
    return figs.add(fig, "adaptive_trajectory", "Adaptive seeds trajectory")


def _along_training_section(figs: _Figures, extras: dict) -> str:
    """Dose-response: each primary effect against training progress (train.eval_at) with its 95% CI
    band, and the slope of each effect over progress (a run's checkpoints as repeated measures)."""
    points, trend = extras.get("along_training"), extras.get("trend")
    if not isinstance(points, pd.DataFrame) or points.empty:
        return ('<p class="note">Measured at the end of training only (train.eval_at: '
                f'{_esc(extras.get("eval_at", [1.0]))}); list fractions such as [0.25, 0.5, 1.0] to see effects '
                'appear along training.</p>')
    out = ['<p class="note">Each point: the contrast at that share of training, each training run '
           'counted once (base model at 0). The slope test fits one slope per (training run, item) from '
           "that run's own checkpoints and tests them with runs and items crossed, so checkpoints are "
           'repeated measures of a run, never extra runs (docs/STATISTICS.md).</p>']
    p = _short_judges(analyze.verdicts(points))
    arms = p[p["kind"] != "control"]  # the induced (and planted) arms; a control's own path is in the table
    arms = arms.assign(metric=arms["metric"].where(arms["suite"] != "values", "own value expressed"))
    for (model, suite), d in arms.groupby(["model", "suite"], sort=True):
        metrics = sorted(d["metric"].unique(), key=lambda m: ("/" in m, m))[:6]  # headline metrics before parts
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 2.8), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for cond, c in d[d["metric"] == metric].groupby("condition", sort=True):
                c = c.sort_values("progress")
                x = np.concatenate([[0.0], c["progress"].to_numpy(float)])
                ax.plot(x, np.concatenate([[0.0], c["effect"].to_numpy(float)]), "o-", ms=3, label=cond)
                ax.fill_between(x, np.concatenate([[0.0], c["ci_lo"].to_numpy(float)]),
                                np.concatenate([[0.0], c["ci_hi"].to_numpy(float)]), alpha=0.2)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("share of training")
            ax.set_title(metric, fontsize=8)
        axes[0][0].set_ylabel("effect vs " + " / ".join(sorted(d["reference"].unique())))
        axes[0][-1].legend(fontsize=6)
        fig.suptitle(f"{model} — {suite}", fontsize=9, y=1.04)
        out.append(figs.add(fig, f"along_training_{model}_{suite}", f"Effects along training {model} {suite}"))
    if isinstance(trend, pd.DataFrame) and not trend.empty:
        t = _short_judges(trend[trend["primary"]])
        out.append(_table(t[["model", "condition", "suite", "metric", "reference", "points", "n_seeds", "slope",
                             "ci_lo", "ci_hi", "p_value", "p_holm", "significant"]],
                          "Slopes over training", highlight="significant", collapse_over=40))
    out.append(_table(p, "Contrasts at each point", collapse_over=0))
    return "".join(out)


def _power_section(figs: _Figures, extras: dict) -> str:
    out = ["<p class='note'>Planned from the variance components of each contrast (run-to-run, item × "
           "condition, residual). The item × condition part repeats in every run, so it sets a floor on the "
           "CI half-width that no number of seeds goes below; where that floor is above the target the "
           "answer is more items, not more seeds. Power is against the smallest effect of interest "
           "(analyze.min_effect), not the observed effect.</p>"]
    if extras.get("adaptive"):
        out.append(f"<p>{_esc(extras['adaptive'])}</p>")
    traj = extras.get("adaptive_trajectory")
    if isinstance(traj, pd.DataFrame) and not traj.empty:
        out.append("<h3>Trajectory of seeds.adaptive</h3>" + _trajectory(figs, traj)
                   + _table(traj, "Trajectory", collapse_over=40))
    out.append(_table(extras.get("power"), "Power table", collapse_over=40))
    return "".join(out)


def _anchor_sections(body: str) -> tuple[str, str]:
    """Give each <h2> an id (report.html#seeds-and-power links to it) and return a contents line."""
    links = []

    def anchor(m: re.Match) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", html.unescape(m.group(1)).lower()).strip("-")
        links.append(f'<a href="#{slug}">{m.group(1)}</a>')
        return f'<h2 id="{slug}">{m.group(1)}</h2>'
    body = re.sub(r"<h2>(.*?)</h2>", anchor, body)
    return body, " · ".join(links)


# ----------------------------------------------------------------------------- entry point

def write_report(out_dir: Path, runs: pd.DataFrame | None, scores: pd.DataFrame | None,
                 contrasts_df: pd.DataFrame | None, extras: dict | None = None) -> Path:
    """Write ``out_dir/report.html`` (figures also in ``out_dir/figures``) and return its path.

    ``extras`` (all optional): study_name, spec_yaml, code_version, notes, alpha, description,
    judge_agreement (DataFrame), curation (DataFrame), curation_rule (curation.json's "rule": the
    rule, kept/flipped/dropped counts, dropped values), aa_checks and aa_detail (DataFrames), power
    (DataFrame), adaptive (a sentence on seeds.adaptive), adaptive_trajectory (DataFrame from
    ``evaluation.adaptive.snapshot`` rows), adapters (``evaluation.sanity.adapter_check``),
    system_prompt ({"text", "per_value", "at_generation"}: the header's system-prompt line), label_check
    ({"judge", "labeller", "table"}: annotate.check's agreement, runner.data.audit.check_agreement). A
    ``stage`` column in ``runs`` with more than one stage groups the results by stage (base → sft → instruct).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extras = dict(extras or {})
    alpha = float(extras.get("alpha", 0.05))
    figs = _Figures(out_dir)
    prm = analyze.per_run_metrics(scores) if scores is not None else analyze.per_run_metrics(None)
    have_runs = isinstance(runs, pd.DataFrame) and not runs.empty
    have_c = isinstance(contrasts_df, pd.DataFrame) and not contrasts_df.empty
    stages = _model_stages(runs if have_runs else None)
    co, crosstalk = None, []
    if have_c:
        contrasts_df = _short_judges(contrasts_df)
        if stages:
            contrasts_df = _by_stage(contrasts_df, stages)
        co = analyze.coexpression(contrasts_df, alpha=alpha)  # read by the claims and co-expression sections
        crosstalk = analyze.crosstalk_tests(co, alpha)

    sec = [_header(extras, runs if have_runs else None),
           _sensitivity(contrasts_df if have_c else None, extras, alpha)]
    sec.append("<h2>Summary</h2>" + (_summary(contrasts_df, extras, alpha) if have_c else _na("Contrasts")))
    if have_c:
        sec.append("<h2>The paper's claims</h2>" + _claims_section(contrasts_df, co, crosstalk, extras.get("positive_values")))
        sec.append('<h2>Results by induced value</h2><p class="note">effect = mean paired (item-by-item) '
                   'difference condition − reference over trained runs; 95% CI and p from one t-test with trained '
                   'runs and items as crossed random factors (docs/STATISTICS.md), so a CI excludes 0 exactly '
                   'when p &lt; α; p_holm / p_bh corrected per (model, reference) over the primary judge of '
                   f'each metric; highlighted rows are primary and have p_holm &lt; {alpha:g}; rows with '
                   '"primary" empty are other judges of the same contrast (sensitivity). Effect size: Cohen\'s h '
                   'for rates, d = effect / SD of one (run, item) difference for continuous metrics.</p>'
                   + _per_value_section(contrasts_df))
    sec.append("<h2>Co-expression of values</h2>")
    sec.append(_coexpression_section(figs, co, crosstalk))
    sec.append("<h2>Side effects by suite</h2>")
    if have_c:
        order = {s: i for i, s in enumerate(("safety", "anthropomorphism", "sycophancy", "qa", "values"))}
        for suite, c in sorted(contrasts_df.groupby("suite"), key=lambda kv: (order.get(kv[0], 9), kv[0])):
            sec.append(f"<h3>{_esc(suite)}</h3>" + _forest_plots(figs, c, str(suite)))
            cols = [k for k in _CONTRAST_SHOW if k in c.columns]
            sec.append(_table(c[cols], f"All {suite} contrasts", highlight="significant", collapse_over=0))
    else:
        sec.append(_na("Contrasts"))
    sec.append("<h2>Effects along training</h2>" + _along_training_section(figs, extras))
    sec.append("<h2>A/A check (control against control)</h2>" + _aa_section(extras))
    sec.append("<h2>Seeds and power</h2>" + _power_section(figs, extras))
    agreement = extras.get("judge_agreement")
    sec.append("<h2>Judge agreement</h2>"
               + (_agreement_figure(figs, agreement) if isinstance(agreement, pd.DataFrame)
                  and {"accuracy", "kappa", "n"} <= set(agreement.columns) else "")
               + _table(agreement, "Judge agreement") + _label_check_section(extras.get("label_check"))
               + "<h3>Which judge scored what</h3>"
               + _judges_section(scores, prm))
    sec.append("<h2>Curation</h2>" + _curation_section(extras))

    sec.append("<h2>Appendix</h2><h3>Runs</h3>" + (_table(runs, "Runs") if have_runs else _na("Runs table")))
    sec.append("<h3>Per-run metrics</h3>")
    if prm.empty:
        sec.append(_na("Per-run metrics"))
    else:
        t = prm.merge(runs[["run_id", "model", "condition", "seed"]], on="run_id", how="left") \
            if have_runs else prm
        sec.append(_table(t, "Per-run metrics", collapse_over=0))
    adapters = extras.get("adapters")
    if isinstance(adapters, pd.DataFrame) and not adapters.empty:
        sec.append("<h3>Did each adapter change its model?</h3>"
                   "<p class='note'>The adapter probe: logprob_diff is the mean absolute difference, per token, "
                   "between the run's and the base model's log-probs of the base model's own responses to "
                   "n_texts items, computed in the same batches; zero_diff is a zero adapter's (every LoRA B = 0) "
                   "in those batches, alone_diff the zero adapter's with each text in a batch of its own (the "
                   "engine's rounding). A run at or below its threshold (evaluation.sanity.threshold) is flagged; "
                   "one without probe log-probs is unchecked. share_changed (greedy responses that differ from "
                   "the base run's as strings) only describes: an unchanged model's differ too.</p>"
                   + _table(adapters, "Adapter check", highlight="flagged", collapse_over=40))
    summary = _condition_summary(runs if have_runs else None, prm)
    sec.append("<h3>Condition summary (base / control / value)</h3>"
               '<p class="note">Mean over runs of each condition and SD across seeds.</p>'
               + _table(_by_stage(summary, stages) if stages and summary is not None else summary,
                        "Condition summary", collapse_over=0))
    spec = extras.get("spec_yaml")
    sec.append("<h3>Exact spec</h3>" + (f"<pre>{_esc(spec)}</pre>" if spec else _na("Spec YAML")))

    body, toc = _anchor_sections("".join(sec[1:]))
    sec = [sec[0], f'<p class="note">Contents: {toc}</p>', body]
    title = _esc(extras.get("study_name") or "Value-induction report")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
           f"<style>{_CSS}</style></head><body>{''.join(sec)}</body></html>")
    path = out_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
