"""The report's score.check section: each LLM judge against a second judge on a random sample of the
trained runs' responses (evaluation.agreement), where the study's claims sit."""
from __future__ import annotations

from evaluation.report.markup import esc, table
from evaluation.report_inputs import ReportInputs

BINARY = ["suite", "metric", "judge", "sampled", "n", "unscored_primary", "unscored_check", "primary_yes",
          "check_yes", "both_yes", "precision", "recall", "f1", "kappa"]
ORDINAL = ["suite", "metric", "judge", "sampled", "n", "unscored_primary", "unscored_check", "spearman", "kendall",
           "weighted_kappa"]


def section(inputs: ReportInputs) -> str:
    """The check judge, how the sample was drawn, and the agreement of each binary and ordinal metric."""
    check, t = inputs.info.score_check, inputs.tables.score_check
    if check is None or t is None:
        return ('<p class="note">No check of the judges on the trained runs\' responses (score.check: '
                '{judge_model, sample} re-scores a random sample of them with a second judge).</p>')
    out = [f"<p class='note'>{esc(check.judge)} re-scored a uniform random sample of {check.sample} responses per "
           f"suite (seed {check.seed}; fewer where a suite has fewer) of the trained runs (value, control and "
           "positive arms, final adapters) with each suite's LLM-judge prompts. Each judge is compared with it on "
           "the responses both scored (n); an unparseable verdict is unscored, not 0, and counted in "
           "<code>unscored_*</code>. Binary metrics: precision, recall and F1 of the study's judge taking the "
           "check judge as the reference, and Cohen's κ; other metrics: Spearman's ρ, Kendall's τ-b and, for "
           "integer ratings, quadratically weighted κ.</p>"]
    for kind, cols, what in (("binary", BINARY, "Binary judges"), ("ordinal", ORDINAL, "Ordinal and continuous")):
        part = t[t["kind"] == kind] if kind == "binary" else t[t["kind"] != "binary"]  # "unscored" rows too
        if len(part):
            out.append(f"<h3>{what}</h3>" + table(part[cols].reset_index(drop=True), f"Judge check ({kind})",
                                                  collapse_over=40))
    return "".join(out)
