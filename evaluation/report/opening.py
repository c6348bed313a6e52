"""The report's opening: title and design, what the study can and cannot see, the findings in sentences."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from evaluation.report.markup import SHORT_ES, esc, fmt, na
from evaluation.report_inputs import ReportInputs, SystemPrompt


def header(inputs: ReportInputs) -> str:
    info, runs = inputs.info, inputs.runs
    out = [f"<h1>{esc(info.name or 'Value-induction study')}</h1>"]
    if info.description:
        out.append(f"<p>{esc(info.description)}</p>")
    if runs is not None:
        kinds = runs.groupby("kind")["condition"].nunique()
        seeds = sorted({int(s) for s in runs["seed"].dropna()})
        positive = " + a positive control (planted marker)" if kinds.get("positive", 0) else ""
        out.append(f"<p>{runs['model'].nunique()} model(s) × ({kinds.get('value', 0)} induced value(s){positive} + "
                   f"{kinds.get('control', 0)} random-subset control arm(s)"
                   + (", each matched to one value's size and length profile"
                      if "match" in runs.columns and runs["match"].notna().any() else "")
                   + f") × seeds {seeds}, plus each "
                   f"base model: {len(runs)} evaluated runs.</p>")
    if info.system_prompt:
        out.append(f"<p>{esc(system_prompt_line(info.system_prompt))}</p>")
    out.append(f'<p class="note">Code version {esc(info.code_version)}; generated {esc(inputs.generated)}. '
               'The exact spec is in the appendix.</p>' if info.code_version else na("Code version"))
    if info.notes:
        out.append(f'<p class="note">{esc(info.notes)}</p>')
    return "".join(out)


def system_prompt_line(sp: SystemPrompt) -> str:
    """Whether the training system prompt is present at generation time (train.system_prompt and
    generate.system_prompt)."""
    if not sp.text:
        return "System prompt in training: none; at generation: absent."
    train = f"“{sp.text}” (" + ("per value: each value arm and its matched controls get their value's text"
                                if sp.per_value else "fixed: the same for every trained run") + ")"
    if sp.at_generation != "train":
        return f"System prompt in training: {train}; at generation: absent."
    if sp.per_value:
        return (f"System prompt in training: {train}; at generation: present for trained runs (each its own "
                "text), absent for base models (a {value} template has no value for them), so effects against "
                "a base model include the system prompt's own.")
    return f"System prompt in training: {train}; at generation: present (trained runs and base models)."


def sensitivity(inputs: ReportInputs) -> str:
    """What the study can see (the positive control) beside what it wrongly sees (the A/A check),
    and whether every trained run's adapter changed its model at all (evaluation.sanity)."""
    out = []
    if inputs.sensitivity:
        out += [f"<p class='{'ok' if p.status == 'detected' else 'bad'}'><b>Sensitivity.</b> {esc(p.line)}.</p>"
                for p in inputs.sensitivity]
    else:
        out.append("<p class='na'><b>Sensitivity</b>: not measured (no positive control: set "
                   "controls.positive). Without it a null result cannot be told from a blind pipeline.</p>")
    aa = inputs.tables.aa
    if isinstance(aa, pd.DataFrame) and not aa.empty:
        out.append("<p><b>Specificity.</b> A/A check (two random-control arms against each other, where every "
                   "null is true, tested and corrected like the study's contrasts): "
                   + "; ".join(f"{esc(r.model)}{_aa_match(r)}: {int(r.n_significant)} of {int(r.n_tests)} comparisons "
                               f"significant after Holm ({int(r.n_significant_uncorrected)} before correction)"
                               for r in aa.itertuples()) + ".</p>")
    else:
        out.append("<p class='na'><b>Specificity</b>: no A/A check (controls.aa_check).</p>")
    for v in inputs.adapter_verdicts:
        cls = {"flagged": "bad", "passed": "ok", "unchecked": "na"}[v.status]
        out.append(f"<p class='{cls}'><b>Adapters.</b> {esc(v.line)}. See the appendix.</p>")
    return "".join(out)


def _aa_match(r: Any) -> str:
    """A per-value A/A row's value in brackets (aa_checks' optional match column); empty otherwise."""
    m = getattr(r, "match", None)
    return f" ({esc(m)})" if isinstance(m, str) else ""


def _sentence(r: Any) -> str:
    """One contrast as a finding."""
    who = f"inducing {r.value}" if r.kind == "value" else r.condition
    model = f"{r.model} ({r.stage})" if hasattr(r, "stage") else r.model
    return (f"{esc(model)}: {esc(who)} changes {esc(r.suite)}/{esc(r.metric)} "
            f"[{esc(r.judge)}] by {r.effect:+.3g} (95% CI {r.ci_lo:+.3g} to {r.ci_hi:+.3g}) against "
            f"{esc(r.reference)}; p = {fmt(r.p_value, 'p_value')}, Holm p = {fmt(r.p_holm, 'p_holm')}, "
            f"{esc(SHORT_ES.get(r.effect_size_kind, r.effect_size_kind))} = {fmt(r.effect_size)} ({int(r.n_seeds)} "
            f"run(s), {int(r.n_items)} items).")


def summary(contrasts_df: pd.DataFrame, alpha: float) -> str:
    """The findings in sentences: what is significant after correction, else what comes closest."""
    c = contrasts_df[np.isfinite(contrasts_df["effect"].to_numpy(float)) & contrasts_df["primary"]
                     & (contrasts_df["family"] == "study")]
    sig = c[c["significant"].fillna(False).astype(bool)]
    n_bh = int((c["p_bh"] < alpha).sum())
    by_ref = ", ".join(f"{n} against {r}" for r, n in c.groupby("reference").size().items())
    out = [f"<p>{len(c)} paired contrasts of the study ({esc(by_ref)}; each scored by its primary judge, "
           f"other judges are sensitivity analyses in the tables); <b>{len(sig)} significant after Holm</b> at "
           f"α = {alpha:g} ({n_bh} after Benjamini-Hochberg).</p>"]
    one_run = c[~c["inference"].astype(str).str.startswith(("runs × items", "two independent"))]
    if len(one_run):
        out.append(f"<p><b>{len(one_run)} contrast(s) rest on a single trained run</b>: run-to-run variance is "
                   "unmeasured there, so they get a CI over items but no p-value and make no claim across "
                   "training runs.</p>")
    if len(sig):
        top = sig.sort_values("p_holm").head(15)
        out.append("<ul>" + "".join(f"<li>{_sentence(r)}</li>" for r in top.itertuples()) + "</ul>")
        if len(sig) > len(top):
            out.append(f'<p class="note">…and {len(sig) - len(top)} more in the tables below.</p>')
    else:
        near = c.assign(_abs=c["effect_size"].abs()).sort_values(["p_value", "_abs"], ascending=[True, False],
                                                                 na_position="last")
        out.append("<p>No effect is significant after correction. The contrasts closest to it (smallest "
                   "uncorrected p), none significant:</p><ul>"
                   + "".join(f"<li>{_sentence(r)}</li>" for r in near.head(5).itertuples()) + "</ul>")
    return "".join(out)
