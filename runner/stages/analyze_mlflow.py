"""The analyze stage's MLflow logging: the study's spec and figures on the parent run, the report,
the contrast table and the headline verdicts; each run's metrics and its condition's verdicts in its
child run. Every action is logged once (runner.tracking.Tracker.once), so a rerun adds nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.analyze import verdicts
from runner.context import Run, StudyContext
from runner.spec import content_hash
from runner.stages.annotate import ANNOTATE
from runner.stages.curate import CURATE
from runner.stages.keys import result_view
from runner.stages.score import SCORE
from runner.store import read_parquet
from runner.tracking import TABLE_COLUMNS, VERDICT_STATS, Tracker, flatten, log_run


def log_study(ctx: StudyContext, parent: str) -> None:
    """The study's current spec on its parent run, as tags: MLflow params cannot change, and a study
    directory's spec may grow (more seeds, values, models) or be amended (valind run --amend)."""
    tr, s = ctx.tracker, ctx.spec
    spec_hash = content_hash(result_view(s))
    revisions = {f"revision.{m.name}": ctx.model_revision(m.name) for m in s.models if ctx.model_revision(m.name)}
    tr.once(parent, f"spec-{spec_hash}", lambda: tr.set_tags(parent, {
        "valind.spec_hash": spec_hash, "study": s.study.name, "models": ",".join(m.name for m in s.models),
        "induced": ",".join(s.values.induced), "controls": s.controls.count,
        "seeds": ",".join(map(str, s.seeds.values)), "annotate_key": ANNOTATE(ctx), "curate_key": CURATE(ctx),
        **revisions, **flatten("spec", s.model_dump(mode="json", include={"annotate", "generate", "score", "engine",
                                                                          "analyze", "train", "data"}))}))


def log_analysis(ctx: StudyContext, unit: Path) -> None:
    """The parent run: the spec, data and curation figures, the report, the contrast table and the
    headline verdicts as metrics; each run's metrics and its condition's verdicts in its child."""
    tr = ctx.tracker
    parent = tr.parent()
    log_study(ctx, parent)
    _log_inputs(ctx, tr, parent)
    con = read_parquet(unit / "contrasts.parquet")
    heads = verdicts(con)
    _log_verdicts(ctx, tr, parent, unit, con, heads)
    children = _log_run_metrics(ctx, tr, unit)
    # the adapter probe's measure (evaluation.sanity) on each trained run
    path = unit / "adapters.parquet"
    adapters = {a.run_id: a for a in read_parquet(path).itertuples()} if path.exists() else {}
    # each condition's verdicts on its runs too: the chart view, grouped by condition, compares them
    runs = {r.run_id: r for r in ctx.runs()}
    for owner, rid in children.items():
        r = runs[owner]
        mine = heads[(heads["model"] == r.model) & (heads["condition"] == r.condition)]
        tr.once(rid, f"verdicts-{unit.name}", lambda: tr.log_metrics(rid, {
            f"verdict/{v.suite}/{v.metric}/{stat}": getattr(v, stat) for v in mine.itertuples()
            for stat in VERDICT_STATS}))
        if (a := adapters.get(owner)) is not None and a.status != "unchecked":
            tr.once(rid, f"adapter-{unit.name}", lambda: tr.log_metrics(rid, {
                "adapter/logprob_diff": a.logprob_diff, "adapter/threshold": a.threshold,
                "adapter/flagged": float(a.flagged)}))
        tr.finish(rid)
    tr.finish(parent)


def _log_inputs(ctx: StudyContext, tr: Tracker, parent: str) -> None:
    """The data (annotate) and curation figures on the parent run."""
    ann_unit, cur_unit = ANNOTATE.unit(ctx), CURATE.unit(ctx)
    ann = ann_unit.info()
    tr.once(parent, f"data-{ann_unit.key}", lambda: tr.log_metrics(parent, {
        "data/pairs": ann["pairs"], "data/unscored_responses": ann["unscored"],
        **({"annotate/responses_per_s": ann["responses_per_s"]} if ann.get("responses_per_s") else {}),
        **{f"data/dropped/{src}/{reason}": n for src, d in ann["drops"].items() for reason, n in d.items()},
        **{f"data/expressed/{side}/{v}": n for side, d in ann["value_counts"].items() for v, n in d.items()}}))
    table = read_parquet(cur_unit / "table.parquet")

    def log_curation() -> None:
        tr.log_metrics(parent, {f"curate/{r.value}/{col}": getattr(r, col) for r in table.itertuples()
                                for col in ("available", "used") if hasattr(r, col)})
        tr.log_artifacts(parent, cur_unit / "curation.json", "curation")
        tr.log_artifacts(parent, cur_unit / "table.parquet", "curation")
    tr.once(parent, f"curate-{cur_unit.key}", log_curation)


def _log_verdicts(ctx: StudyContext, tr: Tracker, parent: str, unit: Path, con: pd.DataFrame,
                  heads: pd.DataFrame) -> None:
    """The report, the contrast table and the headline verdicts on the parent run."""
    summary: dict[str, Any] = {"analyze/contrasts": len(con), "analyze/significant_holm": int(con["significant"].sum()),
                               "analyze/significant_bh": int((con["p_bh"] < ctx.spec.analyze.alpha).sum())}
    if (unit / "aa_checks.parquet").exists():
        for r in read_parquet(unit / "aa_checks.parquet").itertuples():
            who = f"{r.model}/{r.match}" if isinstance(getattr(r, "match", None), str) else r.model  # per_value
            summary |= {f"aa/{who}/tests": r.n_tests, f"aa/{who}/significant_holm": r.n_significant}
    summary |= {f"verdict/{r.model}/{r.condition}/{r.suite}/{r.metric}/{stat}": getattr(r, stat)
                for r in heads.itertuples() for stat in VERDICT_STATS}
    # across models (evaluation.pooled, evaluation.stage_test): counts here, the tables as JSON
    across = {n: read_parquet(unit / f"{n}.parquet") for n in ("pooled", "stage_test")
              if (unit / f"{n}.parquet").exists()}
    for name, t in across.items():
        summary |= {f"{name}/tests": len(t), f"{name}/significant_holm": int(t["significant"].sum())}

    def log() -> None:
        tr.log_artifacts(parent, unit, "report")
        tr.log_metrics(parent, summary)
        tr.log_table(parent, con[[c for c in TABLE_COLUMNS if c in con.columns]], "verdicts/contrasts.json")
        for name, t in across.items():
            tr.log_table(parent, t, f"verdicts/{name}.json")
        tr.set_tags(parent, {"valind.report": str(unit / "report.html")})
    tr.once(parent, f"analyze-{unit.name}", log)


def _log_run_metrics(ctx: StudyContext, tr: Tracker, unit: Path) -> dict[str, str]:
    """Each run's metrics in its child run; returns the children (final run id -> MLflow run id)."""
    metrics = read_parquet(unit / "metrics.parquet")
    runs = {r.run_id: r for r in ctx.runs()}
    final: dict[tuple[str, str, int | None], Run] = {(r.model, r.condition, r.seed): r for r in runs.values()
                                                     if r.final}  # a checkpoint's training run
    children: dict[str, str] = {}
    for run_id, df in metrics.groupby("run_id"):
        r = runs[run_id]
        # an eval_at checkpoint logs into its training run's child, at step = percent of training:
        # MLflow charts the metric against step, and its runs table shows the last (the final) one
        owner = r if r.final else final[(r.model, r.condition, r.seed)]
        if owner.run_id not in children:
            children[owner.run_id] = log_run(tr, owner)
        rid = children[owner.run_id]
        vals = {f"{row.suite}/{row.metric}/{row.judge.split(':')[0]}": row.mean for row in df.itertuples()}
        tr.once(rid, f"eval-{SCORE(ctx, r)}", lambda: tr.log_metrics(
            rid, vals, step=round(r.progress * 100)))
    return children
