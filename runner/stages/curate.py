"""curate: value subsets, size-matched random controls, the positive arm and the held-out split.

Under data.subset_size: all the kept values are known only here: `Study.runs()` reads them from
this stage's curation.json (`rule["kept"]`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from runner.context import StudyContext
from runner.data.curate import CURATE_VERSION, curate
from runner.data.sources import prompt_text
from runner.progress import say
from runner.stages.annotate import ANNOTATE, Annotated
from runner.stages.keys import Key
from runner.stages.unit import Done, StageResult, Unit
from runner.store import read_parquet, safe_name, write_json, write_parquet


@dataclass(frozen=True)
class Curated(StageResult):
    """The curate stage's result: its unit, holding each condition's subset and the held-out split."""
    stage: ClassVar[str] = "curate"
    unit: Unit

    def subset(self, condition: str) -> Path:
        """A condition's training pairs."""
        return self.unit / "subsets" / f"{safe_name(condition)}.parquet"

    @property
    def held_out(self) -> Path:
        return self.unit / "held_out.parquet"

    @property
    def table(self) -> Path:
        return self.unit / "table.parquet"

    @property
    def conditions(self) -> Path:
        """Each condition's size, source mix, flip share and length profile (runner.data.matching)."""
        return self.unit / "conditions.parquet"

    @property
    def curation(self) -> Path:
        """curation.json: the rule (sizes, kept and dropped values), stats and examples."""
        return self.unit / "curation.json"


def _controls(ctx: StudyContext, run: Any) -> dict[str, Any]:
    """The controls section as curation sees it (not prompt_only): `positive.items` is the suite's size, not curation's;
    `match` enters only when per_value (pooled is what every earlier curation did: their keys stand)."""
    c = ctx.spec.controls
    exclude: dict[str, Any] = {"positive": {"items"}} if c.positive else {}
    exclude["prompt_only"] = True  # an untrained arm: no subset of its own
    if c.match == "pooled":
        exclude["match"] = True
    dumped: dict[str, Any] = c.model_dump(mode="json", exclude=exclude)
    return dumped


CURATE = Key("curate", {
    "curation version": lambda c, r: CURATE_VERSION,
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


def run(ctx: StudyContext) -> Curated:
    unit = CURATE.unit(ctx)
    if unit.cached():
        say(f"curate: cached ({unit.info()['summary']}) [{unit.key}]")
        return Curated(unit)
    annotated = ctx.need(Annotated)
    unit.produce("subsets", lambda: _curate(ctx, unit, annotated))
    return Curated(unit)


def _curate(ctx: StudyContext, unit: Unit, annotated: Annotated) -> Done:
    s = ctx.spec
    pairs = read_parquet(annotated.pairs)
    ann = read_parquet(annotated.annotations)
    tok = ctx.tokenizer(s.models[0].name)

    def token_length(pair: Any) -> int:
        text = prompt_text(list(pair["prompt"])) + "\n" + pair["chosen"] + "\n" + pair["rejected"]
        return len(tok(text, add_special_tokens=False)["input_ids"])

    cur = curate(pairs, ann, list(s.values.induced), s.data, s.controls, length_fn=token_length)
    for cond, df in cur.subsets.items():
        write_parquet(df, unit / "subsets" / f"{safe_name(cond)}.parquet")
    write_parquet(cur.held_out, unit / "held_out.parquet")
    write_parquet(cur.table, unit / "table.parquet")
    write_parquet(cur.overlap, unit / "overlap.parquet")
    write_parquet(cur.conditions, unit / "conditions.parquet")
    if len(cur.control_bins):
        write_parquet(cur.control_bins, unit / "control_bins.parquet")
    write_json({"rule": cur.rule, "stats": cur.stats, "examples": cur.examples}, unit / "curation.json")
    n = cur.rule["N"]
    sizes = f"{n} pairs" if n is not None else \
        "unequal sizes (" + ", ".join(f"{v} {k}" for v, k in cur.rule["sizes"].items()) + ")"
    summary = f"{len(cur.subsets)} subsets of {sizes}, {len(cur.held_out)} held out"
    if cur.rule["dropped"]:
        summary += "; dropped below min_subset_size: " + ", ".join(f"{v} ({k})" for v, k in cur.rule["dropped"].items())
    say(f"curate: done — {summary} [{unit.key}]")
    return Done({"summary": summary, "n": n, "stats": cur.stats}, inputs=(annotated.unit,))
