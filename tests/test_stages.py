"""The pure pieces of the stages, on plain tables: follow-up placement and annotation layouts."""
import pandas as pd

from runner.stages.annotate import plan_layout
from runner.stages.generate import followups


class Echo:
    def generate(self, requests, desc=""):
        return [f"second:{r}" for r in requests]


def test_followups_land_on_their_own_run_and_item():
    import evaluation.suites  # noqa: F401  (registers sycophancy, which has a follow-up turn)

    items = pd.DataFrame({"suite": ["values", "sycophancy", "sycophancy", "values", "sycophancy"],
                          "item_id": list("abcde"), "messages": [[{"role": "user", "content": "q"}]] * 5,
                          "needs_followup": [None, True, False, None, True]})
    first = [[f"r{k}i{i}" for i in range(5)] for k in range(3)]
    second = followups(items, first, lambda k, msgs: f"run{k}:{msgs[-2]['content']}", Echo())
    for k in range(3):
        assert second[k][0] is None and second[k][2] is None and second[k][3] is None
        assert second[k][1] == f"second:run{k}:r{k}i1" and second[k][4] == f"second:run{k}:r{k}i4"
    assert followups(items.assign(needs_followup=False), first, None, None) == [[None] * 5] * 3


def test_plan_layout_covers_every_row_once():
    for n, b in [(0, 4), (1, 4), (7, 2), (8, 4), (9, 4)]:
        spans = plan_layout(n, b)["spans"]
        assert [i for s, e in spans for i in range(s, e)] == list(range(n))
        assert all(e - s <= b for s, e in spans)
