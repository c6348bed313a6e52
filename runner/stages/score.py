"""score: every run's generations through its suites' judges, QA benchmarks through
lm-evaluation-harness, and the refusal judges' agreement with human labels."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from evaluation.judges import judge_agreement, refusal, score_suite
from evaluation.suites import registry as suites
from evaluation.suites.registry import ExtraJudge
from evaluation.types import SCORE_COLUMNS
from runner.context import Run, StageError, StudyContext
from runner.progress import say
from runner.spec import eval_suites, suite_settings
from runner.spec_views import llm_judges
from runner.stages.generate import GENERATE, ITEMS, Generated, load_items, suite_versions
from runner.stages.keys import Key
from runner.stages.qa import QA, qa_path, raise_failed, run_qa
from runner.stages.unit import Done, StageResult, Unit, producing
from runner.store import read_parquet, readable, write_parquet


@dataclass(frozen=True)
class Scored(StageResult):
    """The score stage's result: each run's scores.parquet (run id -> path)."""
    stage: ClassVar[str] = "score"
    scores: dict[str, Path]


def refusal_llm_judge(ctx: StudyContext) -> str | None:
    """The refusal LLM judge's model, where score.suites.safety.judges has the LLM judge (the spec requires it then)."""
    return ctx.spec.score.safety.llm_judge if "llm" in ctx.spec.score.safety.judges else None


def judge_engines(ctx: StudyContext) -> dict[str, tuple[str, bool]]:
    """Each suite's LLM judges: "<suite>" (its `judge`) or "<suite>/<extra>" → (model, needs log-probs)."""
    return llm_judges(ctx.spec)


def extra_judges(ctx: StudyContext, suite: str) -> dict[str, ExtraJudge]:
    """Suite `suite`'s extra LLM judges (e.g. safety's harm classifier), by their judge_engines name."""
    st = suite_settings(ctx.spec)
    return {f"{suite}/{k}": x for k, x in suites.get(suite).extra_judges(st).items() if x.model}


def _engine_key(c: StudyContext, r: Any = None) -> dict[str, Any]:
    """The judge engines' identities; an extra judge's with its version (a suite's own judge's version
    is in the suite's)."""
    return {n: [c.engine_identity(m), extra_judges(c, n.split("/", 1)[0])[n].version] if "/" in n
            else c.engine_identity(m) for n, (m, _) in judge_engines(c).items()}


SCORE = Key("score", {
    "generate": lambda c, r: GENERATE(c, r),
    "suite settings": lambda c, r: asdict(suite_settings(c.spec)),
    "suite versions": suite_versions,
    "judge engines": _engine_key,
    "qa": lambda c, r: QA(c, r) if c.spec.score.benchmarks else None,
}, per_run=True)

AGREEMENT = Key("agreement", {
    "score.suites.safety.judges": lambda c, r: c.spec.score.safety.judges,
    "refusal judge version": lambda c, r: refusal.VERSION,
    "refusal LLM judge": lambda c, r: (c.engine_identity(j) if (j := refusal_llm_judge(c)) else None),
    "data dir": lambda c, r: c.data_marker(),
})


def run(ctx: StudyContext) -> Scored:
    runs = ctx.runs()
    todo = [r for r in runs if not SCORE.unit(ctx, r).cached()]
    say(f"score: {len(runs)} runs, {len(runs) - len(todo)} cached")
    if todo:
        gens = ctx.need(Generated).generations
        items = load_items(ctx)
        st = suite_settings(ctx.spec)
        judges = judge_engines(ctx)
        # The judges first, on the pools generation left open where those serve them (on CPUs the
        # merged-LoRA pool scores too): one engine start fewer. The others are closed for theirs.
        ctx.pools.close(keep=[p for m, logprob in judges.values() if (p := ctx.pools.find(m, scores=logprob))])
        together = len({ctx.model_path(m) for m, _ in judges.values()})  # pools that split the free CPUs
        engines = {n: ctx.pools.get(m, scores=logprob, share=together) for n, (m, logprob) in judges.items()}
        left = [r for r in todo if not _judged(ctx, r)]  # a resumed stage keeps its judged runs
        for i in range(0, len(left), RUNS_PER_PASS):
            _judge(ctx, left[i:i + RUNS_PER_PASS], gens, items, engines, st)
    agreement(ctx)
    if todo:
        # QA last, after the engines are closed: its tasks never wait for CPUs or GPUs idle engines hold
        ctx.pools.close()
        with producing([SCORE.unit(ctx, r) for r in todo], "QA benchmarks"):
            failed = run_qa(ctx, todo) if ctx.spec.score.benchmarks else {}
        for r in todo:  # every run whose QA is saved is finished, whatever became of the others'
            if r.run_id in failed:
                SCORE.unit(ctx, r).mark_failed(f"QA benchmarks: {failed[r.run_id]}")
            else:
                _finish(ctx, r)
        raise_failed(failed)
    say(f"score: done — {len(runs)} runs")
    return Scored({r.run_id: SCORE.unit(ctx, r) / "scores.parquet" for r in runs})


RUNS_PER_PASS = 8  # runs judged together: the judges' batches span runs, and a pass's tables stay small


def _judged_path(ctx: StudyContext, r: Run) -> Path:
    """A run's judge scores, kept in its unit until its QA scores join them in scores.parquet; named
    by the generations they judged, so a resumed stage never keeps scores of generations since redone."""
    gen = GENERATE.unit(ctx, r).files_hash()[:12]
    return SCORE.unit(ctx, r) / f"judged-{gen}.parquet"


def _judged(ctx: StudyContext, r: Run) -> bool:
    """Whether the run's judge scores are kept and readable."""
    return readable(_judged_path(ctx, r), ("run_id", "metric", "value", "scored"))


def _judge(ctx: StudyContext, runs: list[Run], gens: dict[str, Path], items: pd.DataFrame, engines: dict[str, Any],
           st: Any) -> None:
    with producing([SCORE.unit(ctx, r) for r in runs], "judges"):
        g = pd.concat([read_parquet(gens[r.run_id], ("run_id", "suite", "item_id", "response")) for r in runs],
                      ignore_index=True)
        scored = pd.concat([score_suite(n, items[items["suite"] == n], g, engines.get(n), st)
                            for n in eval_suites(ctx.spec)] + [
            score_extra(extra_judges(ctx, n)[k], items[items["suite"] == n], g[g["suite"] == n], engines[k])
            for k in engines if "/" in k for n in [k.split("/", 1)[0]]], ignore_index=True)
    for r in runs:
        write_parquet(scored[scored["run_id"] == r.run_id].reset_index(drop=True), _judged_path(ctx, r))


def score_extra(judge: ExtraJudge, items: pd.DataFrame, gens: pd.DataFrame, engine: Any) -> pd.DataFrame:
    """An extra judge's score rows (run_id + SCORE_COLUMNS) for one suite's items and generations."""
    return judge.score(items, gens, engine)[list(SCORE_COLUMNS)].reset_index(drop=True)


def _finish(ctx: StudyContext, r: Run) -> None:
    """A run's scores.parquet: its judge scores and its QA items (its `qa` unit); the unit marked done."""
    unit = SCORE.unit(ctx, r)
    qa = [QA.unit(ctx, r)] if ctx.spec.score.benchmarks else []
    scores = pd.concat([read_parquet(_judged_path(ctx, r))] + [read_parquet(qa_path(ctx, r)) for _ in qa],
                       ignore_index=True)
    write_parquet(scores, unit / "scores.parquet")
    unscored = int((~scores["scored"]).sum())
    unit.mark_done({"run_id": r.run_id, "rows": len(scores), "unscored": unscored},
                   inputs=[GENERATE.unit(ctx, r), ITEMS.unit(ctx)] + qa)
    say(f"  {r.run_id}: {len(scores)} scores, {unscored} unscored")


def agreement(ctx: StudyContext) -> pd.DataFrame:
    """Each refusal judge against the human labels (safety/refusal_labelled.csv)."""
    unit = AGREEMENT.unit(ctx)
    return read_parquet(unit.ensure("refusal judge agreement", lambda: _agreement(ctx, unit)) / "agreement.parquet")


def _agreement(ctx: StudyContext, unit: Unit) -> Done:
    judges, llm = list(ctx.spec.score.safety.judges), refusal_llm_judge(ctx)
    if ctx.data_dir is None:  # refused before any compute (runner.preflight.data_dir_problems)
        raise StageError("score: the refusal judges' human labels are read from the data directory, and "
                         "data.data_dir is not set")
    engine = ctx.pools.get(llm, scores=True) if llm else None
    write_parquet(judge_agreement(ctx.data_dir, judges, engine=engine), unit / "agreement.parquet")
    return Done({"judges": judges})
