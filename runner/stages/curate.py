"""curate: value subsets, size-matched random controls, the positive arm and the held-out split.

Under data.subset_size: all the kept values are known only here: `Study.runs()` reads them from
this stage's curation.json (`rule["kept"]`)."""
from __future__ import annotations

from runner.progress import say
from runner.stages.annotate import ANNOTATE
from runner.stages.keys import Key
from runner.store import read_parquet, safe_name, write_json, write_parquet


def _controls(ctx, run) -> dict:
    """The controls section as curation sees it: `positive.items` is the suite's size, not curation's;
    `match` enters only when per_value (pooled is what every earlier curation did: their keys stand)."""
    c = ctx.spec.controls
    exclude: dict = {"positive": {"items"}} if c.positive else {}
    if c.match == "pooled":
        exclude["match"] = True
    return c.model_dump(mode="json", exclude=exclude)


CURATE = Key("curate", {
    "annotate": lambda c, r: ANNOTATE(c),
    "data.held_out_fraction": lambda c, r: c.spec.data.held_out_fraction,
    "data.subset_size": lambda c, r: c.spec.data.subset_size,
    "data.min_subset_size": lambda c, r: c.spec.data.min_subset_size,
    "data.rule": lambda c, r: c.spec.data.rule,
    "data.seed": lambda c, r: c.spec.data.seed,
    "values.induced": lambda c, r: c.spec.values.induced,
    "controls": _controls,
    "length tokenizer (models[0])": lambda c, r: c.model_id(c.spec.models[0].name),
})


def run(ctx):
    key = CURATE(ctx)
    if ctx.store.done("curate", key):
        say(f"curate: cached ({ctx.store.info('curate', key)['summary']}) [{key}]")
        return ctx.store.unit("curate", key)
    ann_unit = ctx.need("annotate")
    with ctx.failing("curate", key, "subsets"):
        return _curate(ctx, key, ctx.store.unit("curate", key), ann_unit)


def _curate(ctx, key, unit, ann_unit):
    from runner.data.curate import curate
    from runner.data.sources import prompt_text

    s = ctx.spec
    pairs = read_parquet(ann_unit / "pairs.parquet")
    ann = read_parquet(ann_unit / "annotations.parquet")
    tok = ctx.tokenizer(s.models[0].name)

    def token_length(pair) -> int:
        text = prompt_text(list(pair["prompt"])) + "\n" + pair["chosen"] + "\n" + pair["rejected"]
        return len(tok(text, add_special_tokens=False)["input_ids"])

    cur = curate(pairs, ann, list(s.values.induced), s.data, s.controls, length_fn=token_length)
    for cond, df in cur.subsets.items():
        write_parquet(df, unit / "subsets" / f"{safe_name(cond)}.parquet")
    write_parquet(cur.held_out, unit / "held_out.parquet")
    write_parquet(cur.table, unit / "table.parquet")
    write_parquet(cur.overlap, unit / "overlap.parquet")
    if len(cur.control_bins):
        write_parquet(cur.control_bins, unit / "control_bins.parquet")
    write_json({"rule": cur.rule, "stats": cur.stats, "examples": cur.examples}, unit / "curation.json")
    n = cur.rule["N"]
    sizes = f"{n} pairs" if n is not None else \
        "unequal sizes (" + ", ".join(f"{v} {k}" for v, k in cur.rule["sizes"].items()) + ")"
    summary = f"{len(cur.subsets)} subsets of {sizes}, {len(cur.held_out)} held out"
    if cur.rule["dropped"]:
        summary += "; dropped below min_subset_size: " + ", ".join(f"{v} ({k})" for v, k in cur.rule["dropped"].items())
    ctx.store.mark_done("curate", key, {"summary": summary, "n": n, "stats": cur.stats},
                        inputs=[("annotate", ANNOTATE(ctx))])
    say(f"curate: done — {summary} [{key}]")
    return unit
