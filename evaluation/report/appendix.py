"""The report's appendix: runs, per-run metrics, the adapter check, the condition summary, the spec."""
from __future__ import annotations

import pandas as pd

from evaluation.report.markup import esc, na, table
from evaluation.report_inputs import ReportInputs

_ADAPTERS_NOTE = (
    "<p class='note'>The adapter probe: logprob_diff is the mean absolute difference, per token, "
    "between the run's and the base model's log-probs of the base model's own responses to "
    "n_texts items, computed in the same batches; zero_diff is a zero adapter's (every LoRA B = 0) "
    "in those batches, alone_diff the zero adapter's with each text in a batch of its own (the "
    "engine's rounding). A run at or below its threshold (evaluation.sanity.threshold) is flagged; "
    "one without probe log-probs is unchecked. share_changed (greedy responses that differ from "
    "the base run's as strings) only describes: an unchanged model's differ too.</p>")


def appendix(inputs: ReportInputs) -> str:
    out = ["<h3>Runs</h3>" + (table(inputs.runs, "Runs") if inputs.runs is not None else na("Runs table")),
           "<h3>Per-run metrics</h3>"
           + (na("Per-run metrics") if inputs.per_run is None
              else table(inputs.per_run, "Per-run metrics", collapse_over=0))]
    adapters = inputs.tables.adapters
    if isinstance(adapters, pd.DataFrame) and not adapters.empty:
        out.append("<h3>Did each adapter change its model?</h3>" + _ADAPTERS_NOTE
                   + table(adapters, "Adapter check", highlight="flagged", collapse_over=40))
    out.append("<h3>Condition summary (base / control / value)</h3>"
               '<p class="note">Mean over runs of each condition and SD across seeds.</p>'
               + table(inputs.condition_summary, "Condition summary", collapse_over=0))
    spec = inputs.info.spec_yaml
    out.append("<h3>Exact spec</h3>" + (f"<pre>{esc(spec)}</pre>" if spec else na("Spec YAML")))
    return "".join(out)
