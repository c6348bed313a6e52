"""Self-contained HTML report of a value-induction study (tables + matplotlib figures as base64 PNG).

`render` only formats a `evaluation.report_inputs.ReportInputs`, which the analyze stage computes
(`evaluation.assemble.build_report_inputs`) and stores: nothing here computes a statistic, so a
report re-renders from the store as it was. Any missing input gives a "not available" line, never
an error. One module per part of the report: `opening` (title, sensitivity, findings), `results`
(claims, per value, co-expression, side effects), `checks` (along training, A/A, power, judges,
curation), `appendix`; `markup` and `figures` are their building blocks.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before any submodule imports pyplot: the report draws without a display

from evaluation.report import across, appendix, checks, doses, judge_check, opening, results  # noqa: E402
from evaluation.report.markup import CSS, Figures, anchor_sections, esc, na  # noqa: E402
from evaluation.report_inputs import ReportInputs  # noqa: E402

__all__ = ["render"]


def _sections(figs: Figures, inputs: ReportInputs) -> list[str]:
    """The report's sections after its header, in order, each opening with its <h2>."""
    con, alpha = inputs.contrasts, inputs.info.alpha
    sec = [opening.sensitivity(inputs),
           "<h2>Summary</h2>" + (opening.summary(con, alpha) if con is not None else na("Contrasts"))]
    if con is not None:
        sec.append("<h2>The paper's claims</h2>" + results.claims_section(inputs.claims, inputs.info.positive_values))
        sec.append("<h2>Results by induced value</h2>" + results.per_value_section(con, alpha))
    sec += ["<h2>Co-expression of values</h2>" + results.coexpression_section(figs, inputs.coexpression,
                                                                               inputs.crosstalk),
            "<h2>Side effects by suite</h2>" + results.side_effects_section(figs, con), *doses.sections(inputs),
            "<h2>Across models</h2>" + across.across_models_section(inputs),
            "<h2>Effects along training</h2>" + checks.along_training_section(figs, inputs),
            "<h2>A/A check (control against control)</h2>" + checks.aa_section(inputs),
            "<h2>Seeds and power</h2>" + checks.power_section(figs, inputs),
            "<h2>Judge agreement</h2>" + checks.judges_section(figs, inputs),
            "<h2>Judges on the trained runs' responses</h2>" + judge_check.section(inputs),
            "<h2>Curation</h2>" + checks.curation_section(inputs),
            "<h2>Appendix</h2>" + appendix.appendix(inputs)]
    return sec


def render(inputs: ReportInputs, out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` (figures also in ``out_dir/figures``) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = Figures(out_dir)
    body, toc = anchor_sections("".join(_sections(figs, inputs)))
    title = esc(inputs.info.name or "Value-induction report")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
           f"<style>{CSS}</style></head><body>{opening.header(inputs)}"
           f'<p class="note">Contents: {toc}</p>{body}</body></html>')
    path = out_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
