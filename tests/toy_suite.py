"""A toy evaluation suite, registered from outside the package: the whole of what adding a suite takes."""
import pandas as pd

from evaluation.judges._common import records, row, to_frame
from evaluation.suites import Suite, register

PROMPTS = [f"Answer yes or no: is {n} even?" for n in range(8)]


def load_items(data_dir, limit, seed):
    items = pd.DataFrame({"suite": "toy", "item_id": [f"toy/{i}" for i in range(len(PROMPTS))],
                          "messages": [[{"role": "user", "content": p}] for p in PROMPTS]})
    return items.head(limit) if limit else items


def score(items, generations, engine, settings):
    recs, with_run = records(items, generations)
    rows = [row(g, "says_yes", float("yes" in str(g["response"]).lower()), "toy-exact") for g in recs]
    return to_frame(rows, with_run)


def judges(settings):
    """The metrics `score` emits and their judges (analyze.primary_judges is checked against them)."""
    return {"says_yes": ("toy-exact",)}


register(Suite("toy", load_items, score, n_items=len(PROMPTS), judges=judges))
