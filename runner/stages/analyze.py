"""analyze: statistics over every run's scores (evaluation.assemble), the HTML report, MLflow."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd

from evaluation import sanity
from evaluation.sanity import adapter_lines
from runner.progress import say
from runner.secrets import redact
from runner.spec import system_fields
from runner.stages.annotate import ANNOTATE_CHECK, check_result
from runner.stages.curate import CURATE
from runner.stages.keys import CODE_VERSION, Key
from runner.stages.generate import GENERATE
from runner.stages.score import AGREEMENT, SCORE, agreement
from runner.store import read_json, read_parquet, write_parquet

ANALYSIS_VERSION = "crossed-runs-items-1"  # the analyze key's own: bump when inference changes

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
})


def run(ctx) -> Path:
    key = ANALYZE(ctx)
    unit = ctx.store.unit("analyze", key)
    if ctx.store.done("analyze", key):
        say(f"analyze: cached [{key}]")
    else:
        paths, gen_paths = ctx.need("score"), ctx.need("generate")
        with ctx.failing("analyze", key, "report"):
            _analyze(ctx, key, unit, paths, gen_paths)
    from runner.tracking import log_analysis
    log_analysis(ctx, unit)
    return unit / "report.html"


def _analyze(ctx, key, unit, paths, gen_paths) -> None:
    # deferred: matplotlib and statsmodels load only when a study is analysed
    from evaluation.assemble import AnalysisSettings, analyze_study, build_report_inputs, final_runs
    from evaluation.report import render
    from evaluation.report_inputs import LabelCheck, StudyInfo, StudyTables, SystemPrompt
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
        primary_judges=s.primary_judges(), aa_check=s.controls.aa_check),
        probe=pd.concat(probes, ignore_index=True) if probes else None)
    for line in adapter_lines(res.adapters):
        say(f"analyze: adapter check: {line}")
    tables = {"contrasts": res.contrasts, "metrics": res.metrics, "power": res.power, "adapters": res.adapters,
              "aa_checks": res.aa, "along_training": res.along, "trend": res.trend}
    for name, df in tables.items():
        if df is not None:
            write_parquet(df, unit / f"{name}.parquet")
    cur = ctx.need("curate")
    check = check_result(ctx)
    info = StudyInfo(
        name=s.study.name, description=s.study.description, spec_yaml=redact(ctx.spec_text), code_version=code_version(),
        alpha=a.alpha, system_prompt=SystemPrompt(s.train.system_prompt, bool(s.train.system_prompt and system_fields(
            s.train.system_prompt)), s.generate.system_prompt), eval_at=tuple(s.train.eval_at),
        positive_values=tuple(s.values.positive), adaptive=ctx.seeds.note(),
        curation_rule=read_json(cur / "curation.json").get("rule"),
        label_check=LabelCheck(check["judge"], check["labeller"]) if check else None)
    given = StudyTables(power=res.power, aa=res.aa, aa_detail=res.aa_detail, adapters=res.adapters, along=res.along,
                        trend=res.trend, judge_agreement=agreement(ctx), curation=read_parquet(cur / "table.parquet"),
                        adaptive_trajectory=ctx.seeds.trajectory(res.contrasts, key),
                        label_check=check["table"] if check else None)
    final = final_runs(runs)
    inputs = build_report_inputs(final, scores[scores["run_id"].isin(set(final["run_id"]))], res.contrasts, info,
                                 given)
    report = render(load_report_inputs(save_report_inputs(inputs, unit / "report_inputs")), unit)
    con = res.contrasts
    ctx.store.mark_done("analyze", key, {"report": str(report), "contrasts": len(con)}, inputs=analyze_inputs(ctx))
    say(f"analyze: done — {len(con)} contrasts, {int(con['significant'].sum()) if len(con) else 0} "
        f"significant after Holm [{key}]")


def analyze_inputs(ctx) -> list[tuple[str, str]]:
    """The units the analysis reads: every run's generations and scores, curation, judge agreements."""
    runs = ctx.runs()
    return ([("score", SCORE(ctx, r)) for r in runs] + [("generate", GENERATE(ctx, r)) for r in runs]
            + [("curate", CURATE(ctx)), ("agreement", AGREEMENT(ctx))]
            + ([("annotate_check", ANNOTATE_CHECK(ctx))] if ctx.spec.annotate.check else []))


def sensitivity_lines(ctx) -> list[str]:
    """The positive control's verdict per model from the finished analysis, or that there is none."""
    from evaluation.analyze import positive_control

    key = ANALYZE(ctx)
    if not ctx.store.done("analyze", key):
        return []
    pcs = positive_control(read_parquet(ctx.store.unit("analyze", key) / "contrasts.parquet"), ctx.spec.analyze.alpha)
    return [p["line"] for p in pcs] or ["no positive control (controls.positive): this study's sensitivity is "
                                        "unmeasured"]


def adapter_verdict_lines(ctx) -> list[str]:
    """The adapter check's verdict per model from the finished analysis (evaluation.sanity.adapter_lines)."""
    key = ANALYZE(ctx)
    path = ctx.store.unit("analyze", key) / "adapters.parquet"
    if not ctx.store.done("analyze", key) or not path.exists():
        return []
    return adapter_lines(read_parquet(path))


def code_version() -> str:
    here = Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=5).stdout.strip()
    except Exception:
        sha, dirty = "", ""
    return f"{CODE_VERSION} ({sha or 'unknown commit'}{', modified' if dirty else ''})"
