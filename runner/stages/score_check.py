"""score.check: a second judge re-scores a random sample of the trained runs' responses with each
suite's LLM judges (the same prompts and parsing), and each judge's agreement with it is stored
(evaluation.agreement), reported and logged: the judges checked on the generations the study's
claims rest on, not only on training data (annotate.check).

One study-level unit (`score_check`), produced after score and read by analyze (`check_result`):
changing the check re-scores only its sample, never the study's scores.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluation.agreement import agreement
from evaluation.judges import score_suite
from evaluation.judges.registry import external_judges
from runner.context import Run, StageError, StudyContext
from runner.progress import say
from runner.spec import suite_settings
from runner.stages.generate import GENERATE, Generated, load_items
from runner.stages.keys import Key
from runner.stages.score import SCORE, Scored, extra_judges, judge_engines, score_extra
from runner.stages.unit import Done, Unit
from runner.store import read_parquet, write_csv, write_parquet
from runner.tracking import Tracker

KINDS = ("value", "control", "positive")  # the trained arms whose responses are checked (final adapters)
SAMPLING = "uniform-per-suite-1"  # how the sample is drawn (_sample): the key holds it


def checked_runs(ctx: StudyContext) -> list[Run]:
    """The runs whose responses are sampled: every trained value, control and positive run at its end."""
    return [r for r in ctx.runs() if r.kind in KINDS and r.final]


def checked_suites(ctx: StudyContext) -> list[str]:
    """The suites that have an LLM judge (their own or an extra one), in the study's order."""
    return list(dict.fromkeys(n.split("/", 1)[0] for n in judge_engines(ctx)))


def _check_engine(c: StudyContext, r: Any = None) -> Any:
    check = c.spec.score.check
    return c.engine_identity(check.judge_model) if check else None


SCORE_CHECK = Key("score_check", {
    "score.check": lambda c, r: c.spec.score.check,
    "check judge engine": _check_engine,
    "scores": lambda c, r: [(run.run_id, SCORE(c, run)) for run in checked_runs(c)] if c.spec.score.check else None,
    "sampling": lambda c, r: SAMPLING,
})


def _sample(gens: pd.DataFrame, suite: str, n: int, seed: int) -> pd.DataFrame:
    """n of the suite's responses drawn uniformly without replacement; the draw depends on the seed and
    the suite's name only (rows sorted first, so not on the order the runs were read in)."""
    g = gens[gens["suite"] == suite].sort_values(["run_id", "item_id"]).reset_index(drop=True)
    rng = np.random.default_rng([seed, zlib.crc32(suite.encode())])
    return g.iloc[np.sort(rng.choice(len(g), size=min(n, len(g)), replace=False))].reset_index(drop=True)


def llm_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The rows an LLM judge scored: its name carries its engine ("llm:<engine>"), or it is a registered
    judge that needs a model (a plugin's "greeting-llm"); rule-based judges would agree with themselves."""
    needs = {name for name, (model, _) in external_judges().items() if model}
    return scores[scores["judge"].str.contains(":", regex=False) | scores["judge"].isin(needs)]


def run(ctx: StudyContext) -> pd.DataFrame | None:
    """The agreement table (evaluation.agreement.agreement), produced unless cached; None without score.check."""
    check = ctx.spec.score.check
    if check is None:
        return None
    unit = SCORE_CHECK.unit(ctx)
    if unit.cached():
        say(f"score check: cached [{unit.key}]")
    else:
        unit.produce("judge check", lambda: _check(ctx, unit))
    table = read_parquet(unit / "agreement.parquet")
    log_check(ctx.tracker, table, unit.dir, unit.key)
    for line in check_lines(check.judge_model, table):
        say(line)
    return table


def _check(ctx: StudyContext, unit: Unit) -> Done:
    check = ctx.spec.score.check
    assert check is not None
    runs, suites = checked_runs(ctx), checked_suites(ctx)
    if not runs or not suites:
        raise StageError("score.check: " + ("no trained run" if not runs else "no evaluated suite has an LLM "
                                            "judge") + " to check")
    scored, gen_paths = ctx.need(Scored).scores, ctx.need(Generated).generations
    gens = pd.concat([read_parquet(gen_paths[r.run_id], ("run_id", "suite", "item_id", "response")) for r in runs],
                     ignore_index=True)
    sample = pd.concat([_sample(gens, s, check.sample, check.seed) for s in suites], ignore_index=True)
    say(f"score check: {check.judge_model} re-scores {len(sample)} responses of {len(runs)} trained runs "
        f"({', '.join(suites)}; {check.sample} per suite, seed {check.seed})")
    logprobs = any(lp for _, lp in judge_engines(ctx).values())
    ctx.pools.close(keep=[p for p in [ctx.pools.find(check.judge_model, scores=logprobs)] if p is not None])
    engine = ctx.pools.get(check.judge_model, scores=logprobs)
    items, st = load_items(ctx), suite_settings(ctx.spec)
    own = {n for n in judge_engines(ctx) if "/" not in n}
    parts = []
    for s in suites:
        its, g = items[items["suite"] == s], sample[sample["suite"] == s]
        if s in own:
            out = score_suite(s, its, g, engine, st)
            parts.append(llm_rows(out))
        parts += [score_extra(x, its, g, engine) for x in extra_judges(ctx, s).values()]
    judged = pd.concat(parts, ignore_index=True)
    primary = pd.concat([read_parquet(scored[r.run_id]) for r in runs], ignore_index=True)
    table = agreement(primary, judged)
    write_parquet(sample[["run_id", "suite", "item_id"]], unit / "sample.parquet")
    write_parquet(judged, unit / "check.parquet")
    write_parquet(table, unit / "agreement.parquet")
    write_csv(table, unit / "agreement.csv")
    return Done({"judge": check.judge_model, "sampled": len(sample), "unscored": int((~judged["scored"]).sum())},
                inputs=tuple([SCORE.unit(ctx, r) for r in runs] + [GENERATE.unit(ctx, r) for r in runs]))


STATS = ("n", "kappa", "precision", "recall", "f1", "spearman", "kendall", "weighted_kappa")


def log_check(tr: Tracker, table: pd.DataFrame, unit: Path, key: str) -> None:
    """The agreement on the parent run (`check/<suite>/<metric>/<stat>`, defined statistics only), once per unit."""
    parent = tr.parent()

    def log() -> None:
        tr.log_metrics(parent, {f"check/{r['suite']}/{r['metric']}/{s}": float(r[s]) for r in table.to_dict("records")
                                for s in STATS if r[s] == r[s]})
        tr.log_artifacts(parent, unit / "agreement.csv", "score_check")
    tr.once(parent, f"score-check-{key}", log)


def check_lines(judge: str, table: pd.DataFrame) -> list[str]:
    """One line per checked (suite, metric, judge): n, unscored, and the statistics of its kind."""
    def f(x: float) -> str:
        return "n/a" if x != x else f"{x:.3f}"  # NaN: undefined
    out = []
    for r in table.to_dict("records"):
        stats = {"binary": f"precision {f(r['precision'])}, recall {f(r['recall'])}, F1 {f(r['f1'])}, "
                           f"kappa {f(r['kappa'])}",
                 "ordinal": f"Spearman {f(r['spearman'])}, Kendall {f(r['kendall'])}, weighted kappa "
                            f"{f(r['weighted_kappa'])}"}.get(r["kind"], "no verdict to compare")
        out.append(f"score check: {r['suite']}/{r['metric']} ({r['judge']}) vs {judge} on {r['n']} of {r['sampled']} "
                   f"responses: {stats} (unscored: {r['unscored_primary']} by the judge, {r['unscored_check']} "
                   "by the check)")
    return out


def check_result(ctx: StudyContext) -> dict[str, Any] | None:
    """score.check's result for the report: {"judge", "sample", "seed", "table"}; None without a check."""
    check = ctx.spec.score.check
    if check is None:
        return None
    table = run(ctx)
    return {"judge": check.judge_model, "sample": check.sample, "seed": check.seed, "table": table}
