"""score: every run's generations through its suites' judges, QA benchmarks through
lm-evaluation-harness, and the refusal judges' agreement with human labels."""
from __future__ import annotations

from dataclasses import asdict

import pandas as pd

from evaluation.judges import refusal, score_suite
from evaluation.suites import registry as suites
from runner.progress import say
from runner.spec import eval_suites, suite_settings
from runner.stages.generate import GENERATE, ITEMS, load_items, suite_versions
from runner.stages.keys import Key
from runner.stages.qa import QA, qa_path, raise_failed, run_qa
from runner.store import read_parquet, readable, write_parquet


def judge_engines(ctx) -> dict[str, tuple[str, bool]]:
    """Each suite's LLM judge: suite → (model, needs log-probs)."""
    st = suite_settings(ctx.spec)
    return {n: j for n in eval_suites(ctx.spec) if (j := suites.get(n).judge(st))}


SCORE = Key("score", {
    "generate": lambda c, r: GENERATE(c, r),
    "suite settings": lambda c, r: asdict(suite_settings(c.spec)),
    "suite versions": suite_versions,
    "judge engines": lambda c, r: {n: c.engine_identity(m) for n, (m, _) in judge_engines(c).items()},
    "qa": lambda c, r: QA(c, r) if c.spec.score.benchmarks else None,
}, per_run=True)

AGREEMENT = Key("agreement", {
    "score.refusal_judges": lambda c, r: c.spec.score.refusal_judges,
    "refusal judge version": lambda c, r: refusal.VERSION,
    "refusal LLM judge": lambda c, r: (c.engine_identity(c.spec.score.refusal_llm_judge)
                                       if "llm" in c.spec.score.refusal_judges else None),
    "data dir": lambda c, r: c.data_marker(),
})


def run(ctx):
    runs = ctx.runs()
    todo = [r for r in runs if not ctx.store.done("score", SCORE(ctx, r))]
    say(f"score: {len(runs)} runs, {len(runs) - len(todo)} cached")
    if todo:
        gens = ctx.need("generate")
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
        with ctx.failing("score", [SCORE(ctx, r) for r in todo], "QA benchmarks"):
            failed = run_qa(ctx, todo) if ctx.spec.score.benchmarks else {}
        for r in todo:  # every run whose QA is saved is finished, whatever became of the others'
            if r.run_id in failed:
                ctx.store.mark_failed("score", SCORE(ctx, r), f"QA benchmarks: {failed[r.run_id]}")
            else:
                _finish(ctx, r)
        raise_failed(failed)
    say(f"score: done — {len(runs)} runs")
    return {r.run_id: ctx.store.unit("score", SCORE(ctx, r)) / "scores.parquet" for r in runs}


RUNS_PER_PASS = 8  # runs judged together: the judges' batches span runs, and a pass's tables stay small


def _judged_path(ctx, r):
    """A run's judge scores, kept in its unit until its QA scores join them in scores.parquet; named
    by the generations they judged, so a resumed stage never keeps scores of generations since redone."""
    gen = ctx.store.files_hash("generate", GENERATE(ctx, r))[:12]
    return ctx.store.unit("score", SCORE(ctx, r)) / f"judged-{gen}.parquet"


def _judged(ctx, r) -> bool:
    """Whether the run's judge scores are kept and readable."""
    return readable(_judged_path(ctx, r), ("run_id", "metric", "value", "scored"))


def _judge(ctx, runs, gens, items, engines, st) -> None:
    with ctx.failing("score", [SCORE(ctx, r) for r in runs], "judges"):
        g = pd.concat([read_parquet(gens[r.run_id], ("run_id", "suite", "item_id", "response")) for r in runs],
                      ignore_index=True)
        scored = pd.concat([score_suite(n, items[items["suite"] == n], g, engines.get(n), st)
                            for n in eval_suites(ctx.spec)], ignore_index=True)
    for r in runs:
        write_parquet(scored[scored["run_id"] == r.run_id].reset_index(drop=True), _judged_path(ctx, r))


def _finish(ctx, r) -> None:
    """A run's scores.parquet: its judge scores and its QA items (its `qa` unit); the unit marked done."""
    key = SCORE(ctx, r)
    qa = [("qa", QA(ctx, r))] if ctx.spec.score.benchmarks else []
    scores = pd.concat([read_parquet(_judged_path(ctx, r))] + [read_parquet(qa_path(ctx, r)) for _ in qa],
                       ignore_index=True)
    write_parquet(scores, ctx.store.unit("score", key) / "scores.parquet")
    unscored = int((~scores["scored"]).sum())
    ctx.store.mark_done("score", key, {"run_id": r.run_id, "rows": len(scores), "unscored": unscored},
                        inputs=[("generate", GENERATE(ctx, r)), ("items", ITEMS(ctx))] + qa)
    say(f"  {r.run_id}: {len(scores)} scores, {unscored} unscored")


def agreement(ctx) -> pd.DataFrame:
    """Each refusal judge against the human labels (safety/refusal_labelled.csv)."""
    from evaluation.judges import judge_agreement

    key = AGREEMENT(ctx)
    path = ctx.store.unit("agreement", key) / "agreement.parquet"
    if ctx.store.done("agreement", key):
        return read_parquet(path)
    judges = list(ctx.spec.score.refusal_judges)
    with ctx.failing("agreement", key, "refusal judge agreement"):
        engine = ctx.pools.get(ctx.spec.score.refusal_llm_judge, scores=True) if "llm" in judges else None
        df = judge_agreement(ctx.data_dir, judges, engine=engine)
        write_parquet(df, path)
        ctx.store.mark_done("agreement", key, {"judges": judges})
    return df
