"""annotate: load the preference pairs and judge every response for the 16 values.

The unit is judged in batches, each written as it finishes, so a killed run resumes where it
stopped. The batch layout (size and row spans) is recorded in the unit before the first batch and
reused on resume, whatever the engine section says then: a resumed unit never drops or repeats rows.
With annotate.check, a larger judge then re-labels a random sample, and the labeller's agreement with it is
stored in a unit of its own (`annotate_check`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from evaluation.judges import values as value_judge
from evaluation.types import VALUES
from runner.context import StageError, StudyContext
from runner.data.audit import ID_COLUMNS, audit_agreement, audit_sample, check_agreement, random_sample, read_labels
from runner.data.sources import load_pairs
from runner.progress import say
from runner.stages.keys import Key
from runner.stages.unit import Done, StageResult, Unit
from runner.store import StoreError, read_parquet, read_state, write_csv, write_json, write_parquet
from runner.tracking import Tracker

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
    "local preference files": lambda c, r: c.local_sources(),
})

# annotate.check's unit, apart from the annotations: changing the check never relabels the data.
# The check judge uses the labeller's prompt, mode and settings, which the annotate key holds.
CHECK_SAMPLING = "random-1"  # "random-1": a uniform random sample (runner.data.audit.random_sample)
ANNOTATE_CHECK = Key("annotate_check", {
    "annotate": lambda c, r: ANNOTATE(c),
    "annotate.check": lambda c, r: c.spec.annotate.check,
    "check sampling": lambda c, r: CHECK_SAMPLING,
    "data.seed": lambda c, r: c.spec.data.seed,
    "check judge engine": lambda c, r: (c.engine_identity(c.spec.annotate.check.judge_model)
                                        if c.spec.annotate.check else None),
})


@dataclass(frozen=True)
class Annotated(StageResult):
    """The annotate stage's result: its unit, holding the pairs and their annotations."""
    stage: ClassVar[str] = "annotate"
    unit: Unit

    @property
    def pairs(self) -> Path:
        return self.unit / "pairs.parquet"

    @property
    def annotations(self) -> Path:
        return self.unit / "annotations.parquet"


def run(ctx: StudyContext) -> Annotated:
    unit = ANNOTATE.unit(ctx)
    if unit.cached():
        info = unit.info()
        say(f"annotate: cached ({info['pairs']} pairs, {info['unscored']} unscored responses) [{unit.key}]")
    else:
        unit.produce("annotations", lambda: _annotate(ctx, unit))
    out = Annotated(unit)
    if ctx.spec.annotate.check:
        check(ctx, out)
    return out


def check(ctx: StudyContext, annotated: Annotated) -> pd.DataFrame:
    """annotate.check: the check judge re-labels a random sample (random_sample, seeded by
    data.seed) with the labeller's prompt and mode; returns the labeller's agreement with it
    (runner.data.audit.check_agreement), logged to the parent MLflow run."""
    c = ctx.spec.annotate.check
    assert c is not None  # run() checks only with annotate.check
    out = ANNOTATE_CHECK.unit(ctx)
    if out.cached():
        say(f"annotate check: cached [{out.key}]")
    else:
        out.produce("labeller check", lambda: _check(ctx, annotated, out))
    agree = read_parquet(out / "agreement.parquet")
    log_check(ctx.tracker, agree, out.dir, out.key)
    unscored = out.info()["unscored"]
    say(check_line(c.judge_model, agree) + (f" ({unscored} unscored by the check judge)" if unscored else ""))
    return agree


def _check(ctx: StudyContext, annotated: Annotated, out: Unit) -> Done:
    a, c = ctx.spec.annotate, ctx.spec.annotate.check
    assert c is not None
    pairs, ann = read_parquet(annotated.pairs), read_parquet(annotated.annotations)
    ids = random_sample(ann, c.sample, seed=ctx.spec.data.seed)
    todo = ids.merge(pairs[["pair_id", "prompt", "chosen", "rejected"]], on="pair_id", how="left")
    if todo.empty:
        raise StageError("annotate check: the labeller scored no response, so there is nothing to check")
    say(f"annotate check: {c.judge_model} re-labels {len(todo)} responses")
    ctx.pools.close()  # the labeller's pool holds the devices a larger check judge needs
    verdicts = value_judge.judge_values(
        ctx.pools.get(c.judge_model, scores=a.mode == "logprob"),
        [(list(r.prompt), getattr(r, r.side)) for r in todo.itertuples()], mode=a.mode, desc="check",
        threshold=a.logprob_threshold, max_tokens=a.sampling.max_tokens)
    judged = todo[list(ID_COLUMNS)].join(verdicts)
    write_parquet(judged, out / "check.parquet")
    agree = check_agreement(ann, judged)
    write_parquet(agree, out / "agreement.parquet")
    write_csv(agree, out / "agreement.csv")
    return Done({"judge": c.judge_model, "sampled": len(judged), "unscored": int((~judged["scored"]).sum())},
                inputs=(annotated.unit,))


def log_check(tr: Tracker, agree: pd.DataFrame, unit: Path, key: str) -> None:
    """annotate.check's agreement (runner.data.audit.check_agreement) on the parent run, once per unit."""
    parent = tr.parent()

    def log() -> None:
        tr.log_metrics(parent, {f"check/{r.value}/{m}": getattr(r, m) for r in agree.itertuples()
                                for m in ("precision", "recall", "kappa")})
        tr.log_artifacts(parent, unit / "agreement.parquet", "annotate_check")
        tr.log_artifacts(parent, unit / "agreement.csv", "annotate_check")
    tr.once(parent, f"annotate-check-{key}", log)


def log_audit(tr: Tracker, agree: pd.DataFrame, path: Path) -> None:
    parent = tr.parent()
    tr.log_metrics(parent, {f"audit/{r.value}/{m}": getattr(r, m) for r in agree.itertuples()
                            for m in ("accuracy", "kappa")})
    tr.log_artifacts(parent, path, "audit")


def check_line(judge: str, agree: pd.DataFrame) -> str:
    """The overall row of a check_agreement table in one line (precision first: the share of the labeller's values the check judge also finds)."""
    r = agree.set_index("value").loc["all"]
    def f(x: float, pct: bool) -> str:
        return "n/a" if x != x else (f"{x:.2%}" if pct else f"{x:.3f}")  # NaN: undefined
    return (f"annotate check: labeller vs {judge} on {int(r['n'])} responses: precision {f(r['precision'], True)}, "
            f"recall {f(r['recall'], True)}, kappa {f(r['kappa'], False)}")


def check_result(ctx: StudyContext) -> dict[str, Any] | None:
    """annotate.check's result for the report: {"judge", "labeller", "table"}; None without a check."""
    c = ctx.spec.annotate.check
    if not c:
        return None
    ctx.need(Annotated)  # runs the check if this process has not yet
    table = read_parquet(ANNOTATE_CHECK.unit(ctx) / "agreement.parquet")
    return {"judge": c.judge_model, "labeller": ctx.spec.annotate.judge_model, "table": table}


def _annotate(ctx: StudyContext, target: Unit) -> Done:
    s, t0, unit = ctx.spec, time.perf_counter(), target.dir
    pairs, drops = _pairs(ctx, unit)
    rows = [(p.pair_id, side, list(p.prompt), getattr(p, side)) for p in pairs.itertuples()
            for side in ("chosen", "rejected")]
    a = s.annotate

    def judge() -> Any:  # the judge's pool, started on first need: a resumed unit may need none
        return ctx.pools.get(a.judge_model, scores=a.mode == "logprob")

    layout_path = unit / "layout.json"
    layout = read_state(layout_path)
    if layout is not None:
        if layout.get("rows") != len(rows) or not isinstance(layout.get("spans"), list):
            raise StageError(f"annotate: {unit} was laid out for {layout['rows']} responses but its pairs give "
                             f"{len(rows)}; delete the unit to start it again")
    else:
        pool = judge()
        layout = plan_layout(len(rows), pool.batch_size * len(pool.actors))
        write_json(layout, layout_path)
    spans = layout["spans"]
    def path(i: int) -> Path:
        return unit / "batches" / f"{i:05d}.parquet"
    todo = [i for i in range(len(spans)) if not _judged_batch(path(i), spans[i])]
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
    say(f"annotate: done — {len(pairs)} pairs, {info['unscored']} unscored responses"
        + (f", {info['responses_per_s']:.2f} responses/s" if judged else "") + f" [{target.key}]")
    return Done(info, skip=("batches/",))  # annotations.parquet holds every batch


def _judged_batch(path: Path, span: list[int]) -> bool:
    """Whether a batch file holds its span's verdicts (a truncated or partial one is judged again)."""
    if not path.exists():
        return False
    try:
        return len(read_parquet(path, ("pair_id", "side", "values", "scored"))) == span[1] - span[0]
    except StoreError as e:
        say(f"annotate: {e}: judged again")
        return False


def plan_layout(n_rows: int, batch_size: int) -> dict[str, Any]:
    """Row spans of `batch_size` over n_rows, as recorded in the unit."""
    return {"rows": n_rows, "batch_size": batch_size,
            "spans": [[i, min(i + batch_size, n_rows)] for i in range(0, n_rows, batch_size)]}


def _pairs(ctx: StudyContext, unit: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    pairs_path = unit / "pairs.parquet"
    drops = read_state(unit / "drops.json")
    if pairs_path.exists() and drops is not None:
        try:
            return read_parquet(pairs_path), drops
        except StoreError as e:
            say(f"annotate: {e}: the pairs are loaded again")
    s = ctx.spec
    frames: list[pd.DataFrame] = []
    drops = {}
    for i, src in enumerate(s.data.sources):
        df, d = load_pairs(src, ctx.data_dir, s.data.max_chars)
        frames.append(df)
        drops[f"{i}:{src.name}" + (f"/{src.subset}" if src.subset else "")] = d
    pairs = pd.concat(frames, ignore_index=True)
    if pairs.empty:  # before the judge's engine starts: it would have nothing to judge
        dropped = {k: {r: n for r, n in d.items() if n} for k, d in drops.items()}
        raise StageError(f"annotate: the sources gave no preference pair (dropped, by source and reason: {dropped})")
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


def audit(ctx: StudyContext, n: int | None = None, labels: Path | None = None) -> Path:
    """Write a stratified audit sample (n) or score a labelled one against the judge (labels)."""
    annotated = ctx.need(Annotated)
    ann = read_parquet(annotated.annotations)
    if labels is None:
        out = ctx.root / "audit" / f"audit-{ANNOTATE(ctx)}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        sample = audit_sample(read_parquet(annotated.pairs), ann, n or 100, seed=ctx.spec.data.seed)
        write_csv(sample, out)
        say(f"audit: wrote {out}: fill in `human_values` (comma-separated values from the closed list, "
            f"or 'none'), then run `valind annotate SPEC --audit-labels {out}`")
        return out
    agree = audit_agreement(read_labels(labels), ann)
    out = ctx.root / "audit" / f"agreement-{ANNOTATE(ctx)}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(agree, out)
    log_audit(ctx.tracker, agree, out)
    say(f"audit: {int(agree['n'].iloc[0])} labelled responses; mean kappa {agree['kappa'].mean():.3f}; "
        f"wrote {out}")
    return out
