"""generate: every run's responses to the evaluation suites (one engine per base model serves the
base and all its LoRA adapters), with a second turn for items that need a follow-up."""
from __future__ import annotations

import json
import time

import pandas as pd

from evaluation.suites import registry as suites
from evaluation.types import Request
from runner.context import StageError
from runner.progress import say
from runner.spec import eval_suites, generation_system_prompt, suite_settings
from runner.stages.curate import CURATE
from runner.stages.keys import Key
from runner.store import read_parquet, write_parquet


def suite_versions(ctx, run=None) -> dict[str, str]:
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
    "items": lambda c, r: ITEMS(c),
    "generate.sampling": lambda c, r: c.spec.generate.sampling,
    "engine": lambda c, r: c.engine_identity(r.model),
    "train cell": lambda c, r: r.cell_key or "base",
    "progress (train.eval_at)": lambda c, r: r.progress,
    "system prompt": lambda c, r: system_prompt(c, r),
}, per_run=True)


def system_prompt(ctx, r) -> str | None:
    """The system message this run generates with (generate.system_prompt; runner.spec.generation_system_prompt)."""
    return generation_system_prompt(ctx.spec, r.condition, trained=bool(r.cell_key))


def load_items(ctx) -> pd.DataFrame:
    """Every suite's items (a unit of its own: generation and scoring read the same table)."""
    key = ITEMS(ctx)
    path = ctx.store.unit("items", key) / "items.parquet"
    if ctx.store.done("items", key):
        return read_parquet(path)
    st, held = suite_settings(ctx.spec), None
    frames = []
    for name in eval_suites(ctx.spec):
        suite, kw = suites.get(name), {}
        if suite.held_out:
            held = held or [list(p) for p in read_parquet(ctx.need("curate") / "held_out.parquet")["prompt"]]
            kw = {"held_out_prompts": held}
        frames.append(suite.load_items(ctx.data_dir, suite.limit(st), st.seed, **kw))
    items = pd.concat(frames, ignore_index=True)
    write_parquet(items, path)
    ctx.store.mark_done("items", key, {"items": len(items)}, inputs=[("curate", CURATE(ctx))] if held else [])
    return items


def run(ctx):
    runs = ctx.runs()
    todo = [r for r in runs if not ctx.store.done("generate", GENERATE(ctx, r))]
    say(f"generate: {len(runs)} runs, {len(runs) - len(todo)} cached")
    if todo:
        adapters = ctx.need("train") if any(r.cell_key for r in todo) else {}
        _check_adapters(ctx, todo, adapters)  # before any engine starts
        items = load_items(ctx)
        groups: dict[tuple[str, str | None], list] = {}
        for r in todo:  # one engine per base model serves the base and all its LoRA adapters
            full = r.cell_key and ctx.spec.train.finetune == "full"
            groups.setdefault((r.model, str(adapters[r.run_id]) if full else None), []).append(r)
        for i, ((model, full_path), group) in enumerate(groups.items()):
            if i:  # this model's engines may need every GPU the last one's hold (whose pool the judges may reuse)
                ctx.pools.close()
            with ctx.failing("generate", [GENERATE(ctx, r) for r in group], f"generate {model}"):
                _generate(ctx, model, full_path, group, items, adapters)
    say(f"generate: done — {len(runs)} runs")
    return {r.run_id: ctx.store.unit("generate", GENERATE(ctx, r)) / "generations.parquet" for r in runs}


def _generate(ctx, model, full_path, group, items, adapters) -> None:
    from runner.train.batches import with_system  # the rule training applies, applied the same way here

    sp = ctx.spec.generate.sampling
    systems = {r.run_id: system_prompt(ctx, r) for r in group}
    lora = any(r.cell_key for r in group) and not full_path
    t0 = time.perf_counter()
    pool = ctx.pools.get(model, enable_lora=lora, path=full_path, tokens=len(group) * len(items) * sp.max_tokens)

    def request(r, messages) -> Request:
        adapter = str(adapters[r.run_id]) if (r.cell_key and lora) else None
        return Request(messages=tuple(with_system(messages, systems[r.run_id])), adapter=adapter,
                       max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, seed=sp.seed)

    texts = pool.generate([request(r, m) for r in group for m in items["messages"]], desc=f"generate {model}")
    n = len(items)
    first = [texts[k * n:(k + 1) * n] for k in range(len(group))]
    second = followups(items, first, lambda k, msgs: request(group[k], msgs), pool)
    for k, r in enumerate(group):
        df = pd.DataFrame({"run_id": r.run_id, "suite": items["suite"], "item_id": items["item_id"],
                           "response": first[k], "followup_response": second[k], "engine": pool.name,
                           "engine_version": pool.version, "sampling": json.dumps(sp.model_dump()),
                           "adapter": str(adapters.get(r.run_id, "")) if r.cell_key else "",
                           "system_prompt": systems[r.run_id] or ""})
        key = GENERATE(ctx, r)
        write_parquet(df, ctx.store.unit("generate", key) / "generations.parquet")
        ctx.store.mark_done("generate", key, {"run_id": r.run_id, "items": n}, inputs=generate_inputs(ctx, r))
    say(f"  {model}: {len(group)} runs × {n} items in {time.perf_counter() - t0:.0f}s")


def generate_inputs(ctx, r) -> list[tuple[str, str]]:
    """The units a run's generations are computed from: the items, and its trained cell."""
    return [("items", ITEMS(ctx))] + ([("train", r.cell_key)] if r.cell_key else [])


def followups(items: pd.DataFrame, first: list[list[str]], request, engine) -> list[list[str | None]]:
    """Second turns, per run, for the items whose suite asks for one (`needs_followup`); None elsewhere.
    `request(k, messages)` builds run k's request."""
    need = items.get("needs_followup", pd.Series(False, index=items.index)).fillna(False).astype(bool)
    idx = [i for i in range(len(items)) if need.iloc[i]]
    out: list[list[str | None]] = [[None] * len(items) for _ in first]
    if not idx:
        return out
    rows = [items.iloc[i] for i in idx]
    reqs = [request(k, suites.get(row["suite"]).followup(row, first[k][i]))
            for k in range(len(first)) for i, row in zip(idx, rows)]
    texts = engine.generate(reqs, desc="follow-ups")
    for k in range(len(first)):
        for j, i in enumerate(idx):
            out[k][i] = texts[k * len(idx) + j]
    return out


def _check_adapters(ctx, runs, adapters) -> None:
    from runner.engines.base import AdapterError, check_adapter
    if ctx.spec.train.finetune != "lora":
        return
    for r in runs:
        if r.cell_key:
            try:
                check_adapter(adapters[r.run_id])
            except AdapterError as e:
                ctx.store.mark_failed("generate", GENERATE(ctx, r), f"{r.run_id}: {e}")
                raise StageError(f"generate: {r.run_id}: {e}") from None
