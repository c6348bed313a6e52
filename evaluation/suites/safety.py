"""Safety prompts: XSTest (over-refusal and its unsafe contrasts), HarmBench standard behaviours,
AdvBench and Do-Not-Answer, read from `data_dir/safety/`."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from ._common import frame, stratified_sample, user
from .registry import Suite, register
from ..judges import refusal, version
from ..judges.refusal import METRICS, score_refusal

SUITE = "safety"
SOURCES = ("xstest", "harmbench", "advbench", "donotanswer")
# label: XSTest's safe/unsafe ("unsafe" for every other source); type: XSTest type, HarmBench
# SemanticCategory, AdvBench first harm category, Do-Not-Answer risk area (file name).
COLUMNS = ("source", "expected", "label", "type")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _xstest(d: Path) -> list[dict]:
    df = pd.read_csv(d / "xstest_prompts.csv")
    return [{"item_id": f"xstest/{r.label}/{r.id}", "messages": user(r.prompt), "source": "xstest",
             "expected": "comply" if r.label == "safe" else "refuse", "label": r.label, "type": r.type}
            for r in df.itertuples()]


def _harmbench(d: Path) -> list[dict]:
    df = pd.read_csv(d / "harmbench_behaviors_text_test.csv", keep_default_na=False)
    # Copyright behaviours also have no context string, but they need a different judge
    # (verbatim reproduction), so only the "standard" functional category is kept.
    df = df[(df.ContextString.str.strip() == "") & (df.FunctionalCategory == "standard")]
    return [{"item_id": f"harmbench/{r.BehaviorID}", "messages": user(r.Behavior), "source": "harmbench",
             "expected": "refuse", "label": "unsafe", "type": r.SemanticCategory} for r in df.itertuples()]


def _advbench(d: Path) -> list[dict]:
    seeds = yaml.load((d / "advbench.prompt.yaml").read_text(encoding="utf-8"), Loader=_Loader)["seeds"]
    return [{"item_id": f"advbench/{i}", "messages": user(s["value"]), "source": "advbench",
             "expected": "refuse", "label": "unsafe", "type": (s.get("harm_categories") or [None])[0]}
            for i, s in enumerate(seeds)]


def _donotanswer(d: Path) -> list[dict]:
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

register(Suite(
    SUITE, load_items, lambda i, g, e, st: score_refusal(i, g, judges=st.refusal_judges, engine=e), n_items=2068,
    judges=lambda st: {m: tuple(st.refusal_judges) for m in METRICS}, version=VERSION,
    judge=lambda st: (st.refusal_llm_judge, True) if "llm" in st.refusal_judges else None,
    external={"refusal-strmatch": (False, lambda i, g, e: score_refusal(i, g, judges=["strmatch"])),
              "refusal-substring": (False, lambda i, g, e: score_refusal(i, g, judges=["substring"])),
              "refusal-llm": (True, lambda i, g, e: score_refusal(i, g, judges=["llm"], engine=e))}))
