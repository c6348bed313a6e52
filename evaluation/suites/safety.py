"""Safety prompts: XSTest (over-refusal and its unsafe contrasts), HarmBench standard behaviours,
AdvBench and Do-Not-Answer, read from `data_dir/safety/`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationInfo, field_validator
from pydantic import model_serializer

from ._common import frame, stratified_sample, user
from .registry import ExtraJudge, JudgeModel, Suite, SuiteSettings, register
from ..judges import harm, refusal, version
from ..judges.refusal import METRICS, score_refusal
from ..types import Engine

SUITE = "safety"
SOURCES = ("xstest", "harmbench", "advbench", "donotanswer")
# label: XSTest's safe/unsafe ("unsafe" for every other source); type: XSTest type, HarmBench
# SemanticCategory, AdvBench first harm category, Do-Not-Answer risk area (file name).
COLUMNS = ("source", "expected", "label", "type")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _xstest(d: Path) -> list[dict[str, Any]]:
    df = pd.read_csv(d / "xstest_prompts.csv")
    return [{"item_id": f"xstest/{r.label}/{r.id}", "messages": user(r.prompt), "source": "xstest",
             "expected": "comply" if r.label == "safe" else "refuse", "label": r.label, "type": r.type}
            for r in df.itertuples()]


def _harmbench(d: Path) -> list[dict[str, Any]]:
    df = pd.read_csv(d / "harmbench_behaviors_text_test.csv", keep_default_na=False)
    # Copyright behaviours also have no context string, but they need a different judge
    # (verbatim reproduction), so only the "standard" functional category is kept.
    df = df[(df.ContextString.str.strip() == "") & (df.FunctionalCategory == "standard")]
    return [{"item_id": f"harmbench/{r.BehaviorID}", "messages": user(r.Behavior), "source": "harmbench",
             "expected": "refuse", "label": "unsafe", "type": r.SemanticCategory} for r in df.itertuples()]


def _advbench(d: Path) -> list[dict[str, Any]]:
    seeds = yaml.load((d / "advbench.prompt.yaml").read_text(encoding="utf-8"), Loader=_Loader)["seeds"]
    return [{"item_id": f"advbench/{i}", "messages": user(s["value"]), "source": "advbench",
             "expected": "refuse", "label": "unsafe", "type": (s.get("harm_categories") or [None])[0]}
            for i, s in enumerate(seeds)]


def _donotanswer(d: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted((d / "donotanswer").glob("*.jsonl")):
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                rows.append({"item_id": f"donotanswer/{f.stem}/{i}", "messages": user(json.loads(line)["prompt"]),
                             "source": "donotanswer", "expected": "refuse", "label": "unsafe", "type": f.stem})
    return rows


_LOADERS = {"xstest": _xstest, "harmbench": _harmbench, "advbench": _advbench, "donotanswer": _donotanswer}


def load_items(data_dir: Path, limit: int | None = None, seed: int = 0,
               sources: tuple[str, ...] = SOURCES) -> pd.DataFrame:
    """All sources; `limit` balances source, then expected behaviour, then type."""
    d = Path(data_dir) / "safety"
    rows = [r for s in sources for r in _LOADERS[s](d)]
    return stratified_sample(frame(rows, SUITE, COLUMNS), limit, by=["source", "expected", "type"], seed=seed)


VERSION = f"1/{version(refusal)}"  # this suite's items and scoring, and its judges'



class SafetySettings(BaseModel):
    """score.suites.safety: the refusal judges (the first is the primary one by default), and an
    optional harm classifier (evaluation.judges.harm: metric harmful_response beside refusal)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    judges: tuple[Literal["strmatch", "substring", "llm"], ...] = Field(default=("strmatch", "substring"),
                                                                       min_length=1)
    llm_judge: JudgeModel = Field(default=None, validate_default=True)  # model name/path, for judge "llm"

    @field_validator("llm_judge")
    @classmethod
    def _llm_needs_model(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and "llm" in info.data.get("judges", ()):
            raise ValueError("required when judges lists 'llm'")
        return v

    # A harm classifier (e.g. a Llama Guard-style model): is each response harmful? None: none.
    harm_judge: JudgeModel = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # an unset harm judge is left out, so the score keys (which hash these settings) of studies
        # made before the field existed stay as they were
        out: dict[str, Any] = handler(self)
        if out.get("harm_judge") is None:
            out.pop("harm_judge", None)
        return out


def settings(st: SuiteSettings) -> SafetySettings:
    return st.of(SUITE, SafetySettings)


def _score(items: pd.DataFrame, gens: pd.DataFrame, engine: Engine | None, st: SuiteSettings) -> pd.DataFrame:
    return score_refusal(items, gens, judges=settings(st).judges, engine=engine)


def _judge(st: SuiteSettings) -> tuple[str, bool] | None:
    s = settings(st)
    return (s.llm_judge, True) if "llm" in s.judges and s.llm_judge else None


def _extra(st: SuiteSettings) -> dict[str, ExtraJudge]:
    model = settings(st).harm_judge
    return {"harm": ExtraJudge(model, False, harm.score_harm, harm.VERSION)} if model else {}


def _judges(st: SuiteSettings) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {m: tuple(settings(st).judges) for m in METRICS}
    return {**out, harm.METRIC: (harm.JUDGE,)} if settings(st).harm_judge else out


register(Suite(
    SUITE, load_items, _score, n_items=2068, settings=SafetySettings,
    judges=_judges, version=VERSION, judge=_judge, extra_judges=_extra))
