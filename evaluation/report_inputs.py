"""Everything a report shows, as one typed object the analyze stage computes and stores.

`ReportInputs` is the boundary between the analysis and the report: `evaluation.assemble.
build_report_inputs` computes it (every table, test and verdict line), `save`/`load` keep it in the
analyze unit's directory (tables as parquet, the rest as one JSON file), and `evaluation.report.render`
only formats it. So a report can be re-rendered from the store without recomputing anything.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["SystemPrompt", "LabelCheck", "JudgeCheck", "StudyInfo", "StudyTables", "Verdict", "ReportInputs", "save", "load"]

FORMAT = 1  # bump when the stored layout changes; load refuses other versions
_JSON = "report_inputs.json"


@dataclass(frozen=True)
class SystemPrompt:
    """The training system prompt (train.system_prompt) and whether generation uses it."""
    text: str | None = None
    per_value: bool = False                        # a {value} template: each value arm gets its own text
    at_generation: str = "none"                    # generate.system_prompt: "none" | "train"
    positive: str | None = None                    # the positive arm's text (a {value} template: a neutral one)


@dataclass(frozen=True)
class LabelCheck:
    """annotate.check: the value labeller against a larger judge (the table is StudyTables.label_check)."""
    judge: str
    labeller: str


@dataclass(frozen=True)
class JudgeCheck:
    """score.check: the LLM judges against a second judge on trained runs' responses (the table is
    StudyTables.score_check)."""
    judge: str
    sample: int                                    # responses per suite, drawn uniformly
    seed: int


@dataclass(frozen=True)
class StudyInfo:
    """What the runner knows about the study; the report prints it as given."""
    name: str | None = None
    description: str | None = None
    notes: str | None = None
    spec_yaml: str | None = None                   # the exact spec, secrets redacted
    code_version: str | None = None
    alpha: float = 0.05
    system_prompt: SystemPrompt | None = None
    eval_at: tuple[float, ...] = (1.0,)            # train.eval_at
    positive_values: tuple[str, ...] | None = None  # values.positive (None: the claims' own reading)
    adaptive: str | None = None                    # a sentence on seeds.adaptive
    curation_rule: dict[str, Any] | None = None    # curation.json's "rule"
    label_check: LabelCheck | None = None
    score_check: JudgeCheck | None = None


@dataclass(frozen=True)
class StudyTables:
    """The analysis' and the runner's tables a report shows as they are (None: not available)."""
    power: pd.DataFrame | None = None
    aa: pd.DataFrame | None = None                 # per model: A/A tests and how many came out significant
    aa_detail: pd.DataFrame | None = None          # every A/A comparison
    adapters: pd.DataFrame | None = None           # evaluation.sanity.adapter_check
    along: pd.DataFrame | None = None              # contrasts at each train.eval_at point
    trend: pd.DataFrame | None = None              # the effects' slopes over training
    judge_agreement: pd.DataFrame | None = None
    curation: pd.DataFrame | None = None
    conditions: pd.DataFrame | None = None         # each value beside its controls (runner.data.matching)
    adaptive_trajectory: pd.DataFrame | None = None  # evaluation.adaptive.snapshot rows of each round
    label_check: pd.DataFrame | None = None
    pooled: pd.DataFrame | None = None             # evaluation.pooled: each contrast pooled across models
    stage_test: pd.DataFrame | None = None         # evaluation.stage_test: own expression by models[i].stage
    score_check: pd.DataFrame | None = None        # evaluation.agreement.agreement


@dataclass(frozen=True)
class Verdict:
    """One verdict line: the positive control ("detected" | "missed") or an adapter check per model
    ("flagged" | "passed" | "unchecked")."""
    status: str                                    # "detected" | "missed" | "flagged" | "passed" | "unchecked"
    line: str


@dataclass(frozen=True)
class ReportInputs:
    """Every value and table of a report, computed (None: not available, said so in the report)."""
    info: StudyInfo
    generated: str                                 # when the analysis ran (ISO, seconds)
    runs: pd.DataFrame | None                      # the final runs (base models and fully trained runs)
    contrasts: pd.DataFrame | None                 # judges shortened, ordered by stage where models span several
    sensitivity: tuple[Verdict, ...]               # the positive control per model
    adapter_verdicts: tuple[Verdict, ...]
    claims: pd.DataFrame | None                    # evaluation.claims.claims_table
    coexpression: pd.DataFrame | None              # evaluation.coexpression.coexpression (long form)
    crosstalk: pd.DataFrame | None                 # the whole-matrix test per (model, judge)
    along_points: pd.DataFrame | None              # headline verdicts at each train.eval_at point
    along_trend: pd.DataFrame | None               # primary slopes over training
    per_run: pd.DataFrame | None                   # per-run metrics (with model, condition, seed)
    provenance: pd.DataFrame | None                # which judge scored which metric
    condition_summary: pd.DataFrame | None         # mean and seed SD per (model, condition)
    tables: StudyTables = field(default_factory=StudyTables)


def _frames(obj: ReportInputs | StudyTables, prefix: str = "") -> dict[str, pd.DataFrame | None]:
    """The DataFrame-or-None fields of a dataclass, by stored name."""
    out: dict[str, pd.DataFrame | None] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None or isinstance(v, pd.DataFrame):
            out[prefix + f.name] = v
    return out


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with its all-NaN object columns as floats: parquet would read them back as None, which
    the report shows as text rather than as a missing number."""
    nan = [c for c in df.columns if df[c].dtype == object and len(df)
           and all(isinstance(v, float) and math.isnan(v) for v in df[c])]
    return df.astype({c: float for c in nan}) if nan else df


def save(inputs: ReportInputs, directory: Path) -> Path:
    """Write `inputs` under `directory` (created): one parquet file per table, the rest in one JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    tables = {**_frames(inputs), **_frames(inputs.tables, "tables.")}
    present = sorted(k for k, v in tables.items() if v is not None)
    for name in present:
        df = tables[name]
        assert df is not None
        _parquet_safe(df).to_parquet(directory / f"{name}.parquet")
    meta = {"format": FORMAT, "info": dataclasses.asdict(inputs.info), "generated": inputs.generated,
            "sensitivity": [dataclasses.asdict(v) for v in inputs.sensitivity],
            "adapter_verdicts": [dataclasses.asdict(v) for v in inputs.adapter_verdicts], "tables": present}
    (directory / _JSON).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    return directory


def _info(d: dict[str, Any]) -> StudyInfo:
    sp, lc, sc = d.pop("system_prompt"), d.pop("label_check"), d.pop("score_check", None)
    return StudyInfo(**{**d, "eval_at": tuple(d["eval_at"]),
                        "positive_values": None if d["positive_values"] is None else tuple(d["positive_values"])},
                     system_prompt=SystemPrompt(**sp) if sp is not None else None,
                     label_check=LabelCheck(**lc) if lc is not None else None,
                     score_check=JudgeCheck(**sc) if sc is not None else None)


def load(directory: Path) -> ReportInputs:
    """The ReportInputs `save` wrote to `directory`."""
    path = directory / _JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stored report inputs (the analyze stage writes them)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads format {FORMAT}: rerun analyze")
    frames = {name: pd.read_parquet(directory / f"{name}.parquet") for name in meta["tables"]}
    own = {k: v for k, v in frames.items() if not k.startswith("tables.")}
    given = {k.removeprefix("tables."): v for k, v in frames.items() if k.startswith("tables.")}
    optional = {f.name: None for f in dataclasses.fields(ReportInputs)
                if f.name not in ("info", "generated", "sensitivity", "adapter_verdicts", "tables")}
    return ReportInputs(info=_info(meta["info"]), generated=meta["generated"],
                        sensitivity=tuple(Verdict(**v) for v in meta["sensitivity"]),
                        adapter_verdicts=tuple(Verdict(**v) for v in meta["adapter_verdicts"]),
                        tables=StudyTables(**given), **{**optional, **own})
