"""generate: every run's responses to the evaluation suites (one engine per base model serves the
base and all its LoRA adapters), with a second turn for items that need a follow-up."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from evaluation.sanity import PROBE_COLUMNS, probe_texts
from evaluation.suites import registry as suites
from evaluation.types import Request, ScoreRequest
from runner.context import Run, StageError, StudyContext
from runner.engines.base import AdapterError, check_adapter
from runner.progress import say
from runner.spec import content_hash, eval_suites, generation_system_prompt, suite_settings
from runner.stages.curate import CURATE, Curated
from runner.stages.keys import Key
from runner.stages.train import Trained, cell_unit
from runner.stages.unit import Done, StageResult, Unit, producing
from runner.store import atomic_dir, read_parquet, readable, write_parquet


@dataclass(frozen=True)
class Generated(StageResult):
    """The generate stage's result: each run's generations.parquet (run id -> path); a trained LoRA
    run's adapter probe is probe.parquet beside it."""
    stage: ClassVar[str] = "generate"
    generations: dict[str, Path]


def suite_versions(ctx: StudyContext, run: Any = None) -> dict[str, str]:
    """Each evaluated suite's declared version (its items, scoring and judges)."""
    return {n: suites.get(n).version for n in eval_suites(ctx.spec)}


ITEMS = Key("items", {
    "suites": suite_versions,
    "generate.items_per_suite": lambda c, r: c.spec.generate.items_per_suite,
    "generate.sampling.seed": lambda c, r: c.spec.generate.sampling.seed,
    "controls.positive": lambda c, r: c.spec.controls.positive,
    "curate (held-out prompts)": lambda c, r: CURATE(c),
    "data dir": lambda c, r: c.data_marker(),
})

GENERATE = Key("generate", {
    "run": lambda c, r: r.run_id,  # its rows are the run's own (two models of the same weights: two units)
    "items": lambda c, r: ITEMS(c),
    "generate.sampling": lambda c, r: c.spec.generate.sampling,
    "engine": lambda c, r: c.engine_identity(r.model),
    "train cell": lambda c, r: r.cell_key or "base",
    # under train.eval_at_steps the run id names the step, and the share needs the subsets' sizes
    "progress (train.eval_at)": lambda c, r: None if c.spec.train.eval_at_steps else r.progress,
    "system prompt": lambda c, r: system_prompt(c, r),
    "adapter probe": lambda c, r: probe_definition(c, r),
}, per_run=True)

# The adapter probe (evaluation.sanity): each trained run's per-token log-probs of the base model's
# responses to PROBE_ITEMS items, beside the base model's and a zero adapter's from the same pass.
PROBE_VERSION = "logprob-probe-1"  # bump when the probe's texts, batches or engines change
# Every side is a forward over every prompt token and an adapter swap: in the demo 32 texts took 105 s
# of a 432 s generation, 16 took 59 s of 422 s on the same busy 2 cores (22 s of 266 s when quieter);
# the measure is a mean over ~550 tokens, and its margins held (evaluation/sanity.py).
PROBE_ITEMS = 16
PROBE_CHUNK = 8  # texts per engine call, for every side: vLLM's numerics depend on the batch


def probe_definition(ctx: StudyContext, r: Run) -> list[Any] | None:
    """What defines a run's adapter probe (a key input): only trained LoRA runs are probed."""
    return [PROBE_VERSION, PROBE_ITEMS, PROBE_CHUNK] if r.cell_key and ctx.spec.train.finetune == "lora" else None


def system_prompt(ctx: StudyContext, r: Run) -> str | None:
    """The system message this run generates with (generate.system_prompt; runner.spec.generation_system_prompt);
    a prompt-only run (controls.prompt_only), its value's training system prompt whatever generate.system_prompt
    says: that prompt is the arm. The generate key holds the text."""
    if r.kind == "prompt":
        return ctx.spec.train.system_text(r.value)
    return generation_system_prompt(ctx.spec, r.condition, trained=bool(r.cell_key))


def load_items(ctx: StudyContext) -> pd.DataFrame:
    """Every suite's items (a unit of its own: generation and scoring read the same table)."""
    unit = ITEMS.unit(ctx)
    return read_parquet(unit.ensure("suite items", lambda: _items(ctx, unit)) / "items.parquet")


def _items(ctx: StudyContext, unit: Unit) -> Done:
    st = suite_settings(ctx.spec)
    held: Curated | None = None
    frames = []
    for name in eval_suites(ctx.spec):
        suite, kw = suites.get(name), {}
        if suite.held_out:
            held = held or ctx.need(Curated)
            kw = {"held_out_prompts": [list(p) for p in read_parquet(held.held_out)["prompt"]]}
        frames.append(suite.load_items(ctx.data_dir, suite.limit(st), st.seed, **kw))
    items = pd.concat(frames, ignore_index=True)
    write_parquet(items, unit / "items.parquet")
    return Done({"items": len(items)}, inputs=(held.unit,) if held else ())


def run(ctx: StudyContext) -> Generated:
    runs = ctx.runs()
    todo = [r for r in runs if not GENERATE.unit(ctx, r).cached()]
    say(f"generate: {len(runs)} runs, {len(runs) - len(todo)} cached")
    if todo:
        adapters = ctx.need(Trained).models if any(r.cell_key for r in todo) else {}
        _check_adapters(ctx, todo, adapters)  # before any engine starts
        items = load_items(ctx)
        groups: dict[tuple[str, str | None], list[Run]] = {}
        for r in todo:  # one engine per base model serves the base and all its LoRA adapters
            full = r.cell_key and ctx.spec.train.finetune == "full"
            groups.setdefault((r.model, str(adapters[r.run_id]) if full else None), []).append(r)
        for i, ((model, full_path), group) in enumerate(groups.items()):
            if i:  # this model's engines may need every GPU the last one's hold (whose pool the judges may reuse)
                ctx.pools.close()
            with producing([GENERATE.unit(ctx, r) for r in group], f"generate {model}"):
                _generate(ctx, model, full_path, group, items, adapters)
    say(f"generate: done — {len(runs)} runs")
    return Generated({r.run_id: GENERATE.unit(ctx, r) / "generations.parquet" for r in runs})


def _generate(ctx: StudyContext, model: str, full_path: str | None, group: list[Run], items: pd.DataFrame,
              adapters: dict[str, Path]) -> None:
    """A base model's runs through one pool, runs_per_chunk runs at a time: each run's unit is saved
    once its chunk is answered (and, for a trained LoRA run, probed), so a killed driver loses only
    the runs in progress. Where the pool cannot score with adapters (vLLM's LoRA path on GPUs), the
    trained runs' answers are kept in their units and all of them are probed after the last chunk,
    on the merging pool that replaces this one."""
    # deferred: torch (runner.train.batches); the rule training applies, applied the same way here
    from runner.train.batches import with_system

    sp = ctx.spec.generate.sampling
    systems = {r.run_id: system_prompt(ctx, r) for r in group}
    lora = any(r.cell_key for r in group) and not full_path
    t0 = time.perf_counter()
    group = sorted(group, key=lambda r: r.kind != "base")  # the base run first: the probe reads its responses
    waiting = [r for r in group if _answered(ctx, r)]  # answered by a driver stopped before saving them
    fresh = [r for r in group if r not in waiting]
    if waiting:
        say(f"  {model}: {len(waiting)} run(s) answered before, kept")
    n, step = len(items), ctx.spec.generate.runs_per_chunk
    pool = ctx.pools.get(model, enable_lora=lora, path=full_path, tokens=len(fresh) * n * sp.max_tokens) if fresh else None

    def request(r: Run, messages: Any) -> Request:
        adapter = str(adapters[r.run_id]) if (r.cell_key and lora) else None
        return Request(messages=tuple(with_system(messages, systems[r.run_id])), adapter=adapter,
                       max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, seed=sp.seed)

    for j in range(0, len(fresh), step):
        chunk = fresh[j:j + step]
        assert pool is not None  # there are fresh runs
        texts = pool.generate([request(r, m) for r in chunk for m in items["messages"]], desc=f"generate {model}")
        first = [texts[k * n:(k + 1) * n] for k in range(len(chunk))]
        second = followups(items, first, lambda k, msgs: request(chunk[k], msgs), pool)
        for k, r in enumerate(chunk):
            df = pd.DataFrame({"run_id": r.run_id, "suite": items["suite"], "item_id": items["item_id"],
                               "response": first[k], "followup_response": second[k], "engine": pool.name,
                               "engine_version": pool.version, "sampling": json.dumps(sp.model_dump()),
                               "adapter": str(adapters.get(r.run_id, "")) if r.cell_key else "",
                               "system_prompt": systems[r.run_id] or ""})
            write_parquet(df, _answered_path(ctx, r))
        waiting += chunk
        now = [r for r in waiting if pool.lora_scores or not (lora and r.cell_key)]
        _save(ctx, model, now, items, adapters, pool, lora)
        waiting = [r for r in waiting if r not in now]
        say(f"  {model}: {min(j + step, len(fresh))} of {len(fresh)} runs answered")
    _save(ctx, model, waiting, items, adapters, pool, lora)
    say(f"  {model}: {len(group)} runs × {n} items in {time.perf_counter() - t0:.0f}s")


def _answered_path(ctx: StudyContext, r: Run) -> Path:
    """A run's answers before its unit is saved, named by the adapter they came from (its train
    unit's files), so a cell trained again since is never saved with the old adapter's answers."""
    made_from = cell_unit(ctx, r).files_hash()[:12] if r.cell_key else "base"
    return GENERATE.unit(ctx, r) / f"answered-{made_from}.parquet"


def _answered(ctx: StudyContext, r: Run) -> bool:
    return readable(_answered_path(ctx, r), ("run_id", "suite", "item_id", "response"))


def _save(ctx: StudyContext, model: str, runs: list[Run], items: pd.DataFrame, adapters: dict[str, Path],
          pool: Any, lora: bool) -> None:
    """Mark answered runs' units done: the untrained first (the probe reads the base run's), then the
    trained LoRA runs with their adapter probe."""
    plain = [r for r in runs if not (lora and r.cell_key)]
    trained = [r for r in runs if r not in plain]
    for r in plain:
        _mark(ctx, r, None, len(items))
    probes = probe(ctx, model, trained, items, adapters, pool) if trained else {}
    for r in trained:
        _mark(ctx, r, probes.get(r.run_id), len(items))


def _mark(ctx: StudyContext, r: Run, probed: pd.DataFrame | None, n: int) -> None:
    unit = GENERATE.unit(ctx, r)
    _answered_path(ctx, r).replace(unit / "generations.parquet")
    for stale in unit.dir.glob("answered-*.parquet"):  # a retrained cell's leftovers
        stale.unlink()
    if probed is not None:
        write_parquet(probed, unit / "probe.parquet")
    unit.mark_done({"run_id": r.run_id, "items": n}, inputs=generate_inputs(ctx, r))


def probe(ctx: StudyContext, model: str, trained: list[Run], items: pd.DataFrame, adapters: dict[str, Path],
          pool: Any) -> dict[str, pd.DataFrame]:
    """Per run of `trained` (trained LoRA runs of `model`), its adapter probe (evaluation.sanity.PROBE_COLUMNS):
    the per-token log-probs of the base model's saved responses to a seed-determined sample of the
    items, under the run, the base model and a zero adapter, all computed now in chunks of
    PROBE_CHUNK texts (whichever process generated the base run), and the zero adapter again with
    each text alone (the engine's rounding). {} where there is nothing to probe. `pool`: the open
    one, or None."""
    from runner.train.batches import with_system  # deferred: torch

    base = next(r for r in ctx.runs() if r.model == model and r.kind == "base")
    responses = read_parquet(GENERATE.unit(ctx, base) / "generations.parquet")
    texts = probe_texts(items, responses, PROBE_ITEMS, ctx.spec.generate.sampling.seed)
    if texts.empty:  # no base response to probe with: the runs stay unchecked
        return {}
    if pool is None or not pool.lora_scores:
        # vLLM's LoRA path (GPUs) gives no prompt log-probs: the probe runs on an engine that merges
        # adapters into the weights instead, which replaces this one (both may not fit)
        pool = ctx.pools.get(model, enable_lora=True, scores=True)
    zero = str(zero_adapter(ctx, model))
    messages = [tuple(with_system(m, system_prompt(ctx, base))) for m in texts["messages"]]

    def requests(adapter: str | None) -> list[ScoreRequest]:
        return [ScoreRequest(messages=m, continuation=t, adapter=adapter) for m, t in zip(messages, texts["response"])]

    sides = [None, zero] + [str(adapters[r.run_id]) for r in trained]
    lps = pool.token_logprobs([q for a in sides for q in requests(a)], chunk=PROBE_CHUNK, desc=f"adapter probe {model}")
    alone = pool.token_logprobs(requests(zero), chunk=1, desc=f"adapter probe {model} (zero adapter, alone)")
    m = len(texts)
    per_side = [lps[i * m:(i + 1) * m] for i in range(len(sides))]
    tokens = [len(x) for x in per_side[0]]
    rows = texts[["suite", "item_id"]].loc[texts.index.repeat(tokens)].reset_index(drop=True)
    rows["token"] = [t for n in tokens for t in range(n)]

    def flat(side: list[list[float]]) -> list[float]:
        if [len(x) for x in side] != tokens:
            raise RuntimeError(f"adapter probe {model}: token counts differ between sides")
        return [lp for x in side for lp in x]

    common = rows.assign(base=flat(per_side[0]), zero=flat(per_side[1]), zero_alone=flat(alone),
                         dtype=ctx.engine_spec(model).dtype)
    return {r.run_id: common.assign(run_id=r.run_id, logprob=flat(per_side[2 + i]))[list(PROBE_COLUMNS)]
            for i, r in enumerate(trained)}


def zero_adapter(ctx: StudyContext, model: str) -> Path:
    """The spec's LoRA on `model` with every B = 0 (it changes nothing), built once per study."""
    from runner.train.adapters import save_zero_adapter  # deferred: torch

    lora = ctx.spec.train.lora
    path = ctx.root / "cache" / "zero-adapter" / content_hash(ctx.model_id(model), lora.model_dump(mode="json"))
    if not path.is_dir():
        with atomic_dir(path) as tmp:
            save_zero_adapter(ctx.model_path(model), lora, tmp,
                              trust_remote_code=ctx.spec.model(model).trust_remote_code)
    return path


def generate_inputs(ctx: StudyContext, r: Run) -> list[Unit]:
    """The units a run's generations are computed from: the items, and its trained cell."""
    return [ITEMS.unit(ctx)] + ([cell_unit(ctx, r)] if r.cell_key else [])


def followups(items: pd.DataFrame, first: list[list[str]], request: Callable[[int, Any], Request],
              engine: Any) -> list[list[str | None]]:
    """Second turns, per run, for the items whose suite asks for one (`needs_followup`); None elsewhere.
    `request(k, messages)` builds run k's request."""
    need = items.get("needs_followup", pd.Series(False, index=items.index)).fillna(False).astype(bool)
    idx = [i for i in range(len(items)) if need.iloc[i]]
    out: list[list[str | None]] = [[None] * len(items) for _ in first]
    if not idx:
        return out
    rows = [items.iloc[i] for i in idx]

    def second_turn(row: Any, response: str) -> list[dict[str, Any]]:
        turn = suites.get(row["suite"]).followup
        if turn is None:
            raise StageError(f"generate: suite {row['suite']!r} marks item {row['item_id']!r} needs_followup "
                             "but declares no followup")
        return turn(row, response)
    reqs = [request(k, second_turn(row, first[k][i])) for k in range(len(first)) for i, row in zip(idx, rows)]
    texts = engine.generate(reqs, desc="follow-ups")
    for k in range(len(first)):
        for j, i in enumerate(idx):
            out[k][i] = texts[k * len(idx) + j]
    return out


def _check_adapters(ctx: StudyContext, runs: list[Run], adapters: dict[str, Path]) -> None:
    if ctx.spec.train.finetune != "lora":
        return
    for r in runs:
        if r.cell_key:
            try:
                check_adapter(adapters[r.run_id])
            except AdapterError as e:
                GENERATE.unit(ctx, r).mark_failed(f"{r.run_id}: {e}")
                raise StageError(f"generate: {r.run_id}: {e}") from None
