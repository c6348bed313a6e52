"""annotate: load the preference pairs and judge every response for the 16 values.

The unit is judged in batches, each written as it finishes, so a killed run resumes where it
stopped. The batch layout (size and row spans) is recorded in the unit before the first batch and
reused on resume, whatever the engine section says then: a resumed unit never drops or repeats rows.
"""
from __future__ import annotations

import time

import pandas as pd

from evaluation.judges import values as value_judge
from evaluation.types import VALUES
from runner.context import StageError
from runner.progress import say
from runner.stages.keys import Key
from runner.store import read_json, read_parquet, write_json, write_parquet

ANNOTATE = Key("annotate", {
    "data.sources": lambda c, r: c.spec.data.sources,
    "data.max_chars": lambda c, r: c.spec.data.max_chars,
    "annotate.max_pairs": lambda c, r: c.spec.annotate.max_pairs,
    "annotate.mode": lambda c, r: c.spec.annotate.mode,
    "annotate.logprob_threshold": lambda c, r: c.spec.annotate.logprob_threshold,
    "annotate.sampling.max_tokens": lambda c, r: c.spec.annotate.sampling.max_tokens,
    "judge prompt version": lambda c, r: value_judge.PROMPT_VERSION,
    "judge engine": lambda c, r: c.engine_identity(c.spec.annotate.judge_model),
    "data dir": lambda c, r: c.data_marker(),
})


def run(ctx):
    key = ANNOTATE(ctx)
    if ctx.store.done("annotate", key):
        info = ctx.store.info("annotate", key)
        say(f"annotate: cached ({info['pairs']} pairs, {info['unscored']} unscored responses) [{key}]")
        return ctx.store.unit("annotate", key)
    with ctx.failing("annotate", key, "annotations"):
        return _annotate(ctx, key, ctx.store.unit("annotate", key))


def _annotate(ctx, key, unit):
    s, t0 = ctx.spec, time.perf_counter()
    pairs, drops = _pairs(ctx, unit)
    rows = [(p.pair_id, side, list(p.prompt), getattr(p, side)) for p in pairs.itertuples()
            for side in ("chosen", "rejected")]
    a = s.annotate

    def judge():  # the judge's pool, started on first need: a resumed unit may need none
        return ctx.pools.get(a.judge_model, scores=a.mode == "logprob")

    layout_path = unit / "layout.json"
    if layout_path.exists():
        layout = read_json(layout_path)
        if layout["rows"] != len(rows):
            raise StageError(f"annotate: {unit} was laid out for {layout['rows']} responses but its pairs give "
                             f"{len(rows)}; delete the unit to start it again")
    else:
        pool = judge()
        layout = plan_layout(len(rows), pool.batch_size * len(pool.actors))
        write_json(layout, layout_path)
    spans = layout["spans"]
    path = lambda i: unit / "batches" / f"{i:05d}.parquet"  # noqa: E731
    todo = [i for i in range(len(spans)) if not path(i).exists()]
    say(f"annotate: {len(pairs)} pairs, {len(rows)} responses in {len(spans)} batches of {layout['batch_size']} "
        f"({len(spans) - len(todo)} already judged)")
    judged, t_judge = 0, 0.0
    for i in todo:
        tb = time.perf_counter()
        batch = rows[spans[i][0]:spans[i][1]]
        verdicts = value_judge.judge_values(judge(), [(p, r) for _, _, p, r in batch], mode=a.mode, desc="judge",
                                            threshold=a.logprob_threshold, max_tokens=a.sampling.max_tokens)
        out = pd.DataFrame({"pair_id": [x[0] for x in batch], "side": [x[1] for x in batch]}).join(verdicts)
        write_parquet(out, path(i))
        judged += len(batch)
        t_judge += time.perf_counter() - tb
        say(f"  batch {i + 1}/{len(spans)}: {len(batch) / (time.perf_counter() - tb):.2f} responses/s")
    ann = pd.concat([read_parquet(path(i)) for i in range(len(spans))], ignore_index=True)
    want = [(x[0], x[1]) for x in rows]
    if list(zip(ann["pair_id"], ann["side"])) != want:
        raise StageError(f"annotate: {unit}/batches do not hold each response once in order; delete the unit")
    write_parquet(ann, unit / "annotations.parquet")
    info = {"pairs": len(pairs), "responses": len(ann), "unscored": int((~ann["scored"]).sum()),
            "judged_now": judged, "responses_per_s": judged / t_judge if t_judge else None,
            "drops": drops, "value_counts": _value_counts(ann), "seconds": time.perf_counter() - t0}
    ctx.store.mark_done("annotate", key, info)
    say(f"annotate: done — {len(pairs)} pairs, {info['unscored']} unscored responses"
        + (f", {info['responses_per_s']:.2f} responses/s" if judged else "") + f" [{key}]")
    return unit


def plan_layout(n_rows: int, batch_size: int) -> dict:
    """Row spans of `batch_size` over n_rows, as recorded in the unit."""
    return {"rows": n_rows, "batch_size": batch_size,
            "spans": [[i, min(i + batch_size, n_rows)] for i in range(0, n_rows, batch_size)]}


def _pairs(ctx, unit) -> tuple[pd.DataFrame, dict]:
    from runner.data.sources import load_pairs

    pairs_path = unit / "pairs.parquet"
    if pairs_path.exists():
        return read_parquet(pairs_path), read_json(unit / "drops.json")
    s = ctx.spec
    frames, drops = [], {}
    for i, src in enumerate(s.data.sources):
        df, d = load_pairs(src, ctx.data_dir, s.data.max_chars)
        frames.append(df)
        drops[f"{i}:{src.name}" + (f"/{src.subset}" if src.subset else "")] = d
    pairs = pd.concat(frames, ignore_index=True)
    if s.annotate.max_pairs:
        pairs = pairs.head(s.annotate.max_pairs)
    if pairs["pair_id"].duplicated().any():
        raise StageError("annotate: two sources produced the same pair_id; give them different subsets/paths")
    write_json(drops, unit / "drops.json")
    write_parquet(pairs, pairs_path)
    return pairs, drops


def _value_counts(ann: pd.DataFrame) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for side, df in ann[ann["scored"]].groupby("side"):
        counts = {v: 0 for v in VALUES}
        for vals in df["values"]:
            for v in vals:
                counts[v] = counts.get(v, 0) + 1
        counts["none"] = int(sum(len(v) == 0 for v in df["values"]))
        out[str(side)] = counts
    return out


def audit(ctx, n: int | None = None, labels=None):
    """Write a stratified audit sample (n) or score a labelled one against the judge (labels)."""
    from runner.data.audit import audit_agreement, audit_sample, read_labels
    from runner.tracking import log_audit

    unit = ctx.need("annotate")
    ann = read_parquet(unit / "annotations.parquet")
    if labels is None:
        out = ctx.root / "audit" / f"audit-{ANNOTATE(ctx)}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        sample = audit_sample(read_parquet(unit / "pairs.parquet"), ann, n or 100, seed=ctx.spec.data.seed)
        sample.to_csv(out, index=False)
        say(f"audit: wrote {out}: fill in `human_values` (comma-separated values from the closed list, "
            f"or 'none'), then run `valind annotate SPEC --audit-labels {out}`")
        return out
    agree = audit_agreement(read_labels(labels), ann)
    out = ctx.root / "audit" / f"agreement-{ANNOTATE(ctx)}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    agree.to_csv(out, index=False)
    log_audit(ctx.tracker, agree, out)
    say(f"audit: {int(agree['n'].iloc[0])} labelled responses; mean kappa {agree['kappa'].mean():.3f}; "
        f"wrote {out}")
    return out
