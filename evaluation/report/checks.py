"""The report's checks on the study itself: effects along training, the A/A check, seeds and power,
judge agreement and provenance, curation."""
from __future__ import annotations

import pandas as pd

from evaluation.report.figures import agreement_figure, along_training, trajectory
from evaluation.report.markup import Figures, esc, na, table
from evaluation.report_inputs import ReportInputs


def along_training_section(figs: Figures, inputs: ReportInputs) -> str:
    """Dose-response: each primary effect against training progress (train.eval_at) with its 95% CI
    band, and the slope of each effect over progress (a run's checkpoints as repeated measures)."""
    p = inputs.along_points
    if p is None or p.empty:
        return ('<p class="note">Measured at the end of training only (train.eval_at: '
                f'{esc(list(inputs.info.eval_at))}); list fractions such as [0.25, 0.5, 1.0] to see effects '
                'appear along training.</p>')
    out = ['<p class="note">Each point: the contrast at that share of training, each training run '
           'counted once (base model at 0). The slope test fits one slope per (training run, item) from '
           "that run's own checkpoints and tests them with runs and items crossed, so checkpoints are "
           'repeated measures of a run, never extra runs (docs/STATISTICS.md).</p>']
    arms = p[p["kind"] != "control"]  # the induced (and planted) arms; a control's own path is in the table
    arms = arms.assign(metric=arms["metric"].where(arms["suite"] != "values", "own value expressed"))
    for (model, suite), d in arms.groupby(["model", "suite"], sort=True):
        out.append(along_training(figs, d, str(model), str(suite)))
    if inputs.along_trend is not None:
        out.append(table(inputs.along_trend, "Slopes over training", highlight="significant", collapse_over=40))
    out.append(table(p, "Contrasts at each point", collapse_over=0))
    return "".join(out)


def aa_section(inputs: ReportInputs) -> str:
    aa, detail = inputs.tables.aa, inputs.tables.aa_detail
    if not isinstance(aa, pd.DataFrame) or aa.empty:
        return na("A/A check (set controls.aa_check: true with controls.count >= 2)")
    return ('<p class="note">control-0 against control-1 (per-value controls: control-&lt;v&gt;-0 against '
            'control-&lt;v&gt;-1 for each value), paired by seed and item, on every metric, tested and '
            'Holm-corrected over the same families of primary-judge rows as the study\'s contrasts. Both arms '
            'are random subsets, so every difference is noise: a study should show a significant comparison '
            'in at most α of such checks. More than that says the tests are anticonservative for this '
            'design.</p>' + table(aa, "A/A checks")
            + (table(detail, "A/A comparisons", highlight="significant", collapse_over=0)
               if detail is not None else ""))


def power_section(figs: Figures, inputs: ReportInputs) -> str:
    out = ["<p class='note'>Planned from the variance components of each contrast (run-to-run, item × "
           "condition, residual). The item × condition part repeats in every run, so it sets a floor on the "
           "CI half-width that no number of seeds goes below; where that floor is above the target the "
           "answer is more items, not more seeds. Power is against the smallest effect of interest "
           "(analyze.min_effect), not the observed effect.</p>"]
    if inputs.info.adaptive:
        out.append(f"<p>{esc(inputs.info.adaptive)}</p>")
    traj = inputs.tables.adaptive_trajectory
    if isinstance(traj, pd.DataFrame) and not traj.empty:
        out.append("<h3>Trajectory of seeds.adaptive</h3>" + trajectory(figs, traj)
                   + table(traj, "Trajectory", collapse_over=40))
    out.append(table(inputs.tables.power, "Power table", collapse_over=40))
    return "".join(out)


def judges_section(figs: Figures, inputs: ReportInputs) -> str:
    """Judge agreement with human labels, the value labeller's check, and which judge scored what."""
    agreement = inputs.tables.judge_agreement
    out = [agreement_figure(figs, agreement) if isinstance(agreement, pd.DataFrame)
           and {"accuracy", "kappa", "n"} <= set(agreement.columns) else "",
           table(agreement, "Judge agreement"), _label_check(inputs), "<h3>Which judge scored what</h3>"]
    if inputs.provenance is None:
        out.append(na("Judge provenance"))
    else:
        out.append('<p class="note">Every number in this report is tied to the judge named in its '
                   '<code>judge</code> column (result tables show the name before ":"); this table lists '
                   'which judge, with its model and engine version, scored each metric.</p>'
                   + table(inputs.provenance, "Judge provenance"))
    return "".join(out)


def _label_check(inputs: ReportInputs) -> str:
    """annotate.check: the value labeller against a larger judge on a random sample."""
    check = inputs.info.label_check
    if check is None:
        return ""
    return (f"<h3>Value labeller against {esc(check.judge)}</h3>"
            f"<p class='note'>{esc(check.labeller)}'s value labels against the check judge's (same "
            "prompt) on a uniform random sample of the scored responses (annotate.check, seeded by data.seed; "
            "not stratified by the labeller's values, so these are population estimates): precision = the share "
            "of the labeller's values the check judge also reported, recall = the share of the check judge's "
            "values the labeller reported, Cohen's κ per value; row \"all\" pools every (response, value) "
            "decision.</p>" + table(inputs.tables.label_check, "Labeller check"))


def curation_section(inputs: ReportInputs) -> str:
    """The rule and sizes, each value's pairs kept as they are / flipped / dropped, the values dropped
    below min_subset_size (data.subset_size: all), then the curation table."""
    rule, out = inputs.info.curation_rule, []
    if isinstance(rule, dict):
        sizes = ("every eligible pair of each value (unequal sizes)" if rule.get("subset_size") == "all"
                 else f"{rule.get('N')} pairs per condition")
        match = (rule.get("controls") or {}).get("match", "pooled")
        out.append(f"<p>Rule <b>{esc(rule.get('rule'))}</b>: {esc(rule.get('description', ''))}. Subsets: "
                   f"{esc(sizes)}; random controls: {esc(match)}"
                   + (" (each value's own size and length profile)" if match == "per_value" else "") + ".</p>")
        counts = rule.get("counts") or {}
        if counts:
            drop = ("dropped_both_sides", "dropped_neither_side", "dropped_rejected_only")
            out.append("<p>Eligible pairs per value, kept as they are / flipped / dropped (value on both sides, on "
                       "neither, only on the rejected side): " + "; ".join(
                           f"{esc(v)} {c['kept_as_is']} / {c['flipped']} / {sum(c[k] for k in drop)} "
                           f"({' + '.join(str(c[k]) for k in drop)})" for v, c in counts.items()) + ".</p>")
        dropped = rule.get("dropped") or {}
        if dropped:
            out.append("<p><b>Dropped value(s)</b>: "
                       + ", ".join(f"{esc(v)} ({n} eligible pairs)" for v, n in dropped.items())
                       + f": fewer than data.min_subset_size = {rule.get('min_subset_size')} (data.subset_size: "
                         "all drops such values); they have no runs.</p>")
    return "".join(out) + _positive_line(inputs) + _conditions(inputs.tables.conditions) + table(
        inputs.tables.curation, "Curation table")


def _positive_line(inputs: ReportInputs) -> str:
    """The positive arm's size (and how it was chosen) and the system prompt it trains with."""
    rule = inputs.info.curation_rule
    pos = rule.get("positive") if isinstance(rule, dict) else None
    if not isinstance(pos, dict):
        return ""
    sp = inputs.info.system_prompt
    prompt = "" if sp is None or sp.positive is None else (
        f"; it trains with the system prompt \"{esc(sp.positive)}\""
        + (" (fixed and neutral: the {value} template has no value for it)" if sp.per_value else ""))
    return (f"<p>Positive control: {esc(pos.get('N'))} pairs ({esc(pos.get('size', ''))}), "
            f"{esc(pos.get('planted'))} of them planted with \"{esc(pos.get('phrase'))}\"{prompt}.</p>")


def _conditions(df: pd.DataFrame | None) -> str:
    """Each value beside its controls: size, source mix, flip share, length median and quartiles."""
    if df is None or df.empty:
        return ""
    shown = pd.DataFrame({
        "condition": df["condition"], "pairs": df["pairs"], "sources": df["sources"],
        "flipped": [("—" if pd.isna(f) else f"{int(f)} ({s:.0%})") for f, s in zip(df["flipped"], df["flip_share"])],
        "length median [IQR]": [f"{m:.0f} [{a:.0f}–{b:.0f}]" for m, a, b in
                                zip(df["length_median"], df["length_q1"], df["length_q3"])]})
    return ("<p class='note'>Each value beside its random controls: a matched control (controls.match: "
            "per_value) has its value's size, pairs per source and flipped pairs per source; lengths in "
            "tokens of models[0]'s tokenizer.</p>" + table(shown, "Conditions side by side", collapse_over=40))
