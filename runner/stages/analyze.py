"""analyze: statistics over every run's scores (evaluation.assemble), the HTML report, MLflow."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from evaluation import sanity
from evaluation.analyze import positive_control
from evaluation.sanity import adapter_lines
from runner.progress import say
from runner.secrets import redact
from runner.context import StudyContext
from runner.spec import training_system_prompt
from runner.spec_train import system_fields
from runner.stages.analyze_mlflow import log_analysis
from runner.stages.annotate import ANNOTATE_CHECK, check_result
from runner.stages.curate import CURATE, Curated
from runner.stages.keys import CODE_VERSION, Key
from runner.stages.generate import GENERATE, Generated
from runner.stages.score import AGREEMENT, SCORE, Scored, agreement
from runner.stages.score_check import SCORE_CHECK, check_result as score_check_result
from runner.stages.unit import Done, StageResult, Unit
from runner.store import read_json, read_parquet, write_parquet

# the analyze key's own: bump when inference or what the unit stores changes ("report-inputs-1": the
# unit holds report_inputs/, which a report is re-rendered from; units written before lack it; "-2":
# the reference-noise floor, matched seeds, bounded rate CIs, equivalence, pooled and stage tables)
ANALYSIS_VERSION = "crossed-runs-items-2/report-inputs-2"

ANALYZE = Key("analyze", {
    "analysis version": lambda c, r: ANALYSIS_VERSION,
    "scores": lambda c, r: [(run.run_id, SCORE(c, run)) for run in c.runs()],
    "runs table": lambda c, r: c.runs_table().to_dict("records"),
    "study.description (report)": lambda c, r: c.spec.study.description,
    "analyze": lambda c, r: c.spec.analyze,
    "adapter check (evaluation.sanity)": lambda c, r: [sanity.NOISE_FACTOR, sanity.DTYPE_FLOOR],
    "controls.aa_check": lambda c, r: c.spec.controls.aa_check,
    "values.positive (claims)": lambda c, r: c.spec.values.positive,
    "seeds.adaptive": lambda c, r: c.spec.seeds.adaptive,
    "curate (table)": lambda c, r: CURATE(c),
    "agreement": lambda c, r: AGREEMENT(c),
    "annotate check": lambda c, r: ANNOTATE_CHECK(c) if c.spec.annotate.check else None,
    "score check": lambda c, r: SCORE_CHECK(c) if c.spec.score.check else None,
})


@dataclass(frozen=True)
class Analyzed(StageResult):
    """The analyze stage's result: its unit, holding the tables and the report."""
    stage: ClassVar[str] = "analyze"
    unit: Unit

    @property
    def report(self) -> Path:
        return self.unit / "report.html"


def run(ctx: StudyContext) -> Analyzed:
    unit = ANALYZE.unit(ctx)
    if unit.cached():
        say(f"analyze: cached [{unit.key}]")
    else:
        scored, generated = ctx.need(Scored), ctx.need(Generated)
        unit.produce("report", lambda: _analyze(ctx, unit.key, unit.dir, scored.scores, generated.generations))
    log_analysis(ctx, unit.dir)
    return Analyzed(unit)


def _analyze(ctx: StudyContext, key: str, unit: Path, paths: dict[str, Path], gen_paths: dict[str, Path]) -> Done:
    # deferred: matplotlib (the report's figures) and statsmodels load only when a study is analysed
    from evaluation.assemble import AnalysisSettings, analyze_study, build_report_inputs, final_runs
    from evaluation.report import render
    from evaluation.report_inputs import JudgeCheck, LabelCheck, StudyInfo, StudyTables, SystemPrompt
    from evaluation.report_inputs import load as load_report_inputs, save as save_report_inputs

    s, a = ctx.spec, ctx.spec.analyze
    runs = ctx.runs_table()
    scores = pd.concat([read_parquet(p) for p in paths.values()], ignore_index=True)
    gens = pd.concat([read_parquet(p, ("run_id", "suite", "item_id", "response")) for p in gen_paths.values()],
                     ignore_index=True)
    probes = [read_parquet(q) for p in gen_paths.values() if (q := p.with_name("probe.parquet")).exists()]
    ad = s.seeds.adaptive
    res = analyze_study(runs, scores, gens, AnalysisSettings(
        alpha=a.alpha, power=a.power, min_effect=a.min_effect, target_halfwidth=ad.target_ci_halfwidth if ad else None,
        primary_judges=s.primary_judges(), aa_check=s.controls.aa_check, equivalence_margin=a.equivalence_margin),
        probe=pd.concat(probes, ignore_index=True) if probes else None)
    for line in adapter_lines(res.adapters):
        say(f"analyze: adapter check: {line}")
    tables = {"contrasts": res.contrasts, "metrics": res.metrics, "power": res.power, "adapters": res.adapters,
              "aa_checks": res.aa, "along_training": res.along, "trend": res.trend, "pooled": res.pooled,
              "stage_test": res.stage_test}
    for name, df in tables.items():
        if df is not None:
            write_parquet(df, unit / f"{name}.parquet")
    cur = ctx.need(Curated)
    check, scheck = check_result(ctx), score_check_result(ctx)
    positive_prompt = training_system_prompt(s.train, "positive") if s.controls.positive else None
    info = StudyInfo(
        name=s.study.name, description=s.study.description, spec_yaml=redact(ctx.spec_text), code_version=code_version(),
        alpha=a.alpha, system_prompt=SystemPrompt(s.train.system_prompt, bool(s.train.system_prompt and system_fields(
            s.train.system_prompt)), s.generate.system_prompt, positive_prompt), eval_at=tuple(s.train.eval_at),
        positive_values=tuple(s.values.positive), adaptive=ctx.seeds.note(),
        curation_rule=read_json(cur.curation).get("rule"),
        label_check=LabelCheck(check["judge"], check["labeller"]) if check else None,
        score_check=JudgeCheck(scheck["judge"], scheck["sample"], scheck["seed"]) if scheck else None)
    given = StudyTables(power=res.power, aa=res.aa, aa_detail=res.aa_detail, adapters=res.adapters, along=res.along,
                        trend=res.trend, judge_agreement=agreement(ctx), curation=read_parquet(cur.table),
                        conditions=read_parquet(cur.conditions) if cur.conditions.exists() else None,
                        adaptive_trajectory=ctx.seeds.trajectory(res.contrasts, key),
                        label_check=check["table"] if check else None, pooled=res.pooled, stage_test=res.stage_test,
                        score_check=scheck["table"] if scheck else None)
    final = final_runs(runs)
    inputs = build_report_inputs(final, scores[scores["run_id"].isin(set(final["run_id"]))], res.contrasts, info,
                                 given)
    report = render(load_report_inputs(save_report_inputs(inputs, unit / "report_inputs")), unit)
    con = res.contrasts
    say(f"analyze: done — {len(con)} contrasts, {int(con['significant'].sum()) if len(con) else 0} "
        f"significant after Holm [{key}]")
    return Done({"report": str(report), "contrasts": len(con)}, inputs=tuple(analyze_inputs(ctx)))


def analyze_inputs(ctx: StudyContext) -> list[Unit]:
    """The units the analysis reads: every run's generations and scores, curation, judge agreements."""
    runs = ctx.runs()
    return ([SCORE.unit(ctx, r) for r in runs] + [GENERATE.unit(ctx, r) for r in runs]
            + [CURATE.unit(ctx), AGREEMENT.unit(ctx)]
            + ([ANNOTATE_CHECK.unit(ctx)] if ctx.spec.annotate.check else [])
            + ([SCORE_CHECK.unit(ctx)] if ctx.spec.score.check else []))


def sensitivity_lines(ctx: StudyContext) -> list[str]:
    """The positive control's verdict per model from the finished analysis, or that there is none."""
    unit = ANALYZE.unit(ctx)
    if not unit.cached():
        return []
    pcs = positive_control(read_parquet(unit / "contrasts.parquet"), ctx.spec.analyze.alpha)
    return [p["line"] for p in pcs] or ["no positive control (controls.positive): this study's sensitivity is "
                                        "unmeasured"]


def adapter_verdict_lines(ctx: StudyContext) -> list[str]:
    """The adapter check's verdict per model from the finished analysis (evaluation.sanity.adapter_lines)."""
    unit = ANALYZE.unit(ctx)
    path = unit / "adapters.parquet"
    if not unit.cached() or not path.exists():
        return []
    return adapter_lines(read_parquet(path))


def code_version() -> str:
    here = Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=5).stdout.strip()
    except Exception:  # no git, or not a checkout: the version says so
        sha, dirty = "", ""
    return f"{CODE_VERSION} ({sha or 'unknown commit'}{', modified' if dirty else ''})"
