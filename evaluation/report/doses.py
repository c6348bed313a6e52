"""The report's dose and prompting sections: how many optimizer steps and epochs each condition
trained (train.steps_per_condition), and training vs. prompting (controls.prompt_only): each value's
trained runs against its prompt-only run, and the prompt-only runs against the base model."""
from __future__ import annotations

import pandas as pd

from evaluation.report.markup import table
from evaluation.report_inputs import ReportInputs

_SHOW = ["model", "condition", "suite", "metric", "judge", "reference", "n_seeds", "n_items", "mean_condition",
         "mean_reference", "effect", "ci_lo", "ci_hi", "p_value", "p_holm", "significant"]


def sections(inputs: ReportInputs) -> list[str]:
    """The sections that apply: doses where the runs carry steps, prompting where there is a prompt arm."""
    out = []
    if (d := doses(inputs.runs)) is not None:
        out.append("<h2>Doses</h2>" + d)
    if (p := prompting(inputs.contrasts)) is not None:
        out.append("<h2>Training vs. prompting</h2>" + p)
    return out


def dose_table(runs: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per (model, condition): the optimizer steps its final adapter trained and the passes (epochs,
    fractional) over its subset they make; None where the runs do not carry steps."""
    if runs is None or "step" not in runs.columns or "epochs" not in runs.columns:
        return None
    t = runs[runs["step"].notna() & ~runs["kind"].isin(["base", "prompt"])]
    if t.empty:
        return None
    return (t.groupby(["model", "condition"], sort=False)
             .agg(kind=("kind", "first"), seeds=("run_id", "count"), steps=("step", "first"),
                  epochs=("epochs", "first")).reset_index())


def doses(runs: pd.DataFrame | None) -> str | None:
    d = dose_table(runs)
    if d is None:
        return None
    equal = d["steps"].nunique() == 1
    note = ("Every condition trained the same number of optimizer steps (train.steps_per_condition: equal, "
            "the largest condition's schedule); smaller subsets were repeated, reshuffled each epoch."
            if equal else "Each condition trained its own schedule (epochs × its subset's batches).")
    return f'<p class="note">{note}</p>' + table(d.assign(epochs=d["epochs"].round(2)), "Doses", collapse_over=40)


def prompting_table(contrasts: pd.DataFrame | None) -> pd.DataFrame | None:
    """The primary rows of each value against its prompt-only run, then of the prompt-only runs
    against the base model; None without a prompt arm."""
    if contrasts is None or contrasts.empty:
        return None
    c = contrasts[contrasts["primary"].astype(bool)]
    rows = c[(c["reference"] == "prompt") | (c["kind"] == "prompt")]
    if rows.empty:
        return None
    rows = rows.assign(_order=(rows["kind"] == "prompt").astype(int))
    return rows.sort_values(["_order", "model", "condition", "suite", "metric"], kind="stable")[
        [k for k in _SHOW if k in rows.columns]].reset_index(drop=True)


def prompting(contrasts: pd.DataFrame | None) -> str | None:
    t = prompting_table(contrasts)
    if t is None:
        return None
    return ('<p class="note">Reference "prompt": a value\'s trained runs against the base model generating with '
            "that value's training system prompt and no training (controls.prompt_only): what training adds "
            "to prompting. The prompt-only runs against the base model (reference \"base\", condition "
            "prompt-&lt;value&gt;): what the prompt alone does. One prompt-only run per model and value (its "
            "generation is seeded; nothing is trained), so these contrasts replicate over the trained runs "
            "and items; they are Holm-corrected in families of their own and never replace the headline "
            "verdicts (against the controls).</p>" + table(t, "Training vs. prompting", highlight="significant"))
