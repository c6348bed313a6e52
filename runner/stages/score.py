"""score: every run's generations through its suites' judges, QA benchmarks through
lm-evaluation-harness, and the refusal judges' agreement with human labels."""
from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import ray

from evaluation.judges import score_suite
from evaluation.suites import registry as suites
from runner.progress import say
from runner.spec import eval_suites, suite_settings
from runner.stages.generate import GENERATE, load_items
from runner.stages.keys import Key
from runner.stages.train import adapter_path
from runner.store import read_parquet, write_parquet


def judge_engines(ctx) -> dict[str, tuple[str, bool]]:
    """Each suite's LLM judge: suite → (model, needs log-probs)."""
    st = suite_settings(ctx.spec)
    return {n: j for n in eval_suites(ctx.spec) if (j := suites.get(n).judge(st))}


SCORE = Key("score", {
    "generate": lambda c, r: GENERATE(c, r),
    "suite settings": lambda c, r: asdict(suite_settings(c.spec)),
    "judge engines": lambda c, r: {n: c.engine_identity(m) for n, (m, _) in judge_engines(c).items()},
    "score.benchmarks": lambda c, r: [c.spec.score.benchmarks, c.spec.score.benchmark_limit,
                                      c.spec.score.benchmark_backend],
}, per_run=True)

AGREEMENT = Key("agreement", {
    "score.refusal_judges": lambda c, r: c.spec.score.refusal_judges,
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
        # Generation engines are done; QA runs before the judge engines start, so its task
        # never waits for CPUs or GPUs that idle engines hold.
        ctx.pools.close()
        with ctx.failing("score", [SCORE(ctx, r) for r in todo], "QA benchmarks"):
            qa = _benchmarks(ctx, todo) if ctx.spec.score.benchmarks else {}
        if qa:
            say(f"  QA benchmarks ({', '.join(ctx.spec.score.benchmarks)}) done for {len(qa)} run(s)")
        st = suite_settings(ctx.spec)
        judges = judge_engines(ctx)
        together = len({ctx.model_path(m) for m, _ in judges.values()})  # pools that split the free CPUs
        engines = {n: ctx.pools.get(m, scores=logprob, share=together) for n, (m, logprob) in judges.items()}
        for i in range(0, len(todo), RUNS_PER_PASS):
            _score(ctx, todo[i:i + RUNS_PER_PASS], gens, items, qa, engines, st)
    agreement(ctx)
    say(f"score: done — {len(runs)} runs")
    return {r.run_id: ctx.store.unit("score", SCORE(ctx, r)) / "scores.parquet" for r in runs}


RUNS_PER_PASS = 8  # runs judged together: the judges' batches span runs, and a pass's tables stay small


def _score(ctx, runs, gens, items, qa, engines, st) -> None:
    with ctx.failing("score", [SCORE(ctx, r) for r in runs], "judges"):
        g = pd.concat([read_parquet(gens[r.run_id], ("run_id", "suite", "item_id", "response")) for r in runs],
                      ignore_index=True)
        scored = pd.concat([score_suite(n, items[items["suite"] == n], g, engines.get(n), st)
                            for n in eval_suites(ctx.spec)] + [qa[r.run_id] for r in runs if r.run_id in qa],
                           ignore_index=True)
    for r in runs:
        key, scores = SCORE(ctx, r), scored[scored["run_id"] == r.run_id].reset_index(drop=True)
        write_parquet(scores, ctx.store.unit("score", key) / "scores.parquet")
        unscored = int((~scores["scored"]).sum())
        ctx.store.mark_done("score", key, {"run_id": r.run_id, "rows": len(scores), "unscored": unscored})
        say(f"  {r.run_id}: {len(scores)} scores, {unscored} unscored")


def agreement(ctx) -> pd.DataFrame:
    """Each refusal judge against the human labels (safety/refusal_labelled.csv)."""
    from evaluation.judges import judge_agreement

    key = AGREEMENT(ctx)
    path = ctx.store.unit("agreement", key) / "agreement.parquet"
    if path.exists():
        return read_parquet(path)
    judges = list(ctx.spec.score.refusal_judges)
    with ctx.failing("agreement", key, "refusal judge agreement"):
        engine = ctx.pools.get(ctx.spec.score.refusal_llm_judge, scores=True) if "llm" in judges else None
        df = judge_agreement(ctx.data_dir, judges, engine=engine)
        write_parquet(df, path)
    return df


def _benchmarks(ctx, runs) -> dict[str, pd.DataFrame]:
    """QA benchmarks through lm-evaluation-harness, per item (suite "qa"), with each run's adapter.

    One Ray task per run, so that on a cluster they land on GPU nodes, all at once. On CPUs they
    run one after another: each uses every core of its node.
    """
    s = ctx.spec.score
    ctx.ensure_ray()

    def submit(r):
        adapter = str(adapter_path(ctx, r)) if r.cell_key else None
        model = ctx.model_path(r.model)
        if adapter and ctx.spec.train.finetune == "full":
            model, adapter = adapter, None
        e = ctx.engine_spec(r.model)  # QA runs in the precision generation runs in
        task = _run_benchmarks.options(num_cpus=1, num_gpus=min(1.0, e.gpus_per_actor))
        return task.remote(model, adapter, [f"valind_{b}" for b in s.benchmarks], ctx.data_dir, s.benchmark_limit,
                           s.benchmark_backend, s.benchmark_batch_size, "cuda" if e.gpus_per_actor else "cpu",
                           e.dtype)

    if any(ctx.engine_spec(r.model).gpus_per_actor for r in runs):
        results = ray.get([submit(r) for r in runs])
    else:
        results = [ray.get(submit(r)) for r in runs]
    return {r.run_id: df.assign(run_id=r.run_id) for r, df in zip(runs, results)}


@ray.remote
def _run_benchmarks(model, adapter, tasks, data_dir, limit, backend, batch_size, device, dtype) -> pd.DataFrame:
    import os

    import torch

    from evaluation.benchmarks import run_benchmarks

    # The task claims one CPU so it fits beside an idle engine actor; it runs alone, so use every core.
    torch.set_num_threads(os.cpu_count() or 1)
    _, per_item = run_benchmarks(model, adapter, tasks, data_dir, limit=limit, backend=backend,
                                 batch_size=batch_size, device=device, dtype=dtype)
    return per_item
