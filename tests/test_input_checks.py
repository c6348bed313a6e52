"""Bad input refused before compute: each case once passed `valind validate` and failed late
(after annotation, inside a training worker, at the end of a study) or silently."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from runner.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TEXT = (ROOT / "jobs" / "smoke.yaml").read_text()


def _smoke() -> dict:
    return yaml.safe_load(SMOKE_TEXT)


def _problems(d: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    return dict(e.value.problems)


def _validate(path, capsys) -> tuple[int, str]:
    from runner.cli import main
    capsys.readouterr()
    rc = main(["validate", str(path)])
    out = capsys.readouterr()
    return rc, out.out + out.err


# ------------------------------------------------------------------ 1. duplicate YAML keys

def test_a_duplicate_key_at_any_depth_names_both_lines(tmp_path, capsys):
    lines = SMOKE_TEXT.splitlines()
    train = lines.index("train:") + 1                    # line numbers count from 1
    lora = lines.index("  finetune: lora") + 2
    lines.insert(lora - 1, "  lora: {r: 4, alpha: 8, r: 16}")  # a duplicate inside a flow mapping
    lines += ["train:", "  method: ipo"]                  # a second block: it used to replace the first
    second = len(lines) - 1
    path = tmp_path / "dup.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.problems == [("train.lora.r", f"duplicate key (lines {lora} and {lora})"),
                                ("train", f"duplicate key (lines {train} and {second})")]
    rc, out = _validate(path, capsys)
    assert rc == 2 and f"  train: duplicate key (lines {train} and {second})" in out


def test_merge_keys_and_aliases_still_work(tmp_path):
    """`<<: *anchor` followed by a key it also holds is an override, not a duplicate."""
    text = SMOKE_TEXT.replace("\nengine:\n", "\nengine: &engine\n", 1)
    text = text.replace("\ngenerate:\n", "\ngenerate:\n  engine: {<<: *engine, batch_size: 8, max_model_len: 1024}\n", 1)
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    spec = load_spec(path)
    assert (spec.generate.engine.batch_size, spec.generate.engine.max_model_len) == (8, 1024)
    assert (spec.engine.batch_size, spec.engine.max_model_len) == (64, 512)


# ------------------------------------------------------------------ 2. output budgets

def test_output_budgets_leave_room_for_a_prompt():
    d = _smoke()  # engine.max_model_len: 512 serves every model; tiny is also the judge
    d["generate"]["sampling"]["max_tokens"] = 480
    d["score"]["sampling"]["max_tokens"] = 500
    problems = _problems(d)
    assert set(problems) == {"generate.sampling.max_tokens", "score.sampling.max_tokens"}
    assert problems["generate.sampling.max_tokens"] == (
        "480 leaves 32 of engine.max_model_len (512) for the prompt of 'tiny'; leave at least 64 (longer "
        "prompts are cut from the start)")
    d["generate"]["sampling"]["max_tokens"] = d["score"]["sampling"]["max_tokens"] = 448  # 64 left: enough
    parse_spec(d)
    d["generate"]["sampling"]["max_tokens"] = d["score"]["sampling"]["max_tokens"] = 16
    d["annotate"]["sampling"]["max_tokens"] = 100
    d["annotate"]["engine"] = {"max_model_len": 128}  # the judges' own engine
    assert _problems(d) == {"annotate.sampling.max_tokens": "100 leaves 28 of annotate.engine.max_model_len (128) "
                            "for the prompt of 'tiny'; leave at least 64 (longer prompts are cut from the start)"}
    d["annotate"]["engine"] = {"max_model_len": 164}
    d["generate"]["engine"] = {"max_model_len": 2048}
    d["generate"]["sampling"]["max_tokens"] = 1000
    problems = _problems(d)  # tiny judges, so annotate.engine serves its generations too
    assert list(problems) == ["generate.sampling.max_tokens"]
    assert "1000 leaves 0 of annotate.engine.max_model_len (164)" in problems["generate.sampling.max_tokens"]
    d["models"].append({"name": "other", "path": "tiny-llama"})  # not a judge: generate.engine
    d["generate"]["sampling"]["max_tokens"] = 100
    parse_spec(d)
    d["generate"]["sampling"]["max_tokens"] = 1990
    assert list(_problems(d)) == ["generate.sampling.max_tokens"]


def test_subset_size_must_fit_the_capped_pair_pool():
    d = _smoke()  # one source, max_pairs: 48
    d["data"]["subset_size"] = 60
    assert _problems(d) == {"data.subset_size": "60 pairs per value, but the sum of data.sources[].max_pairs "
                                                "gives at most 48 pairs in all"}
    d["data"]["subset_size"] = None
    d["data"]["min_subset_size"] = 30
    d["annotate"]["max_pairs"] = 20
    assert list(_problems(d)) == ["data.min_subset_size"]
    del d["annotate"]["max_pairs"], d["data"]["sources"][0]["max_pairs"]
    parse_spec(d)


# ------------------------------------------------------------------ 3. primary judges

def test_primary_judges_must_name_a_suite_metric_and_one_of_its_judges():
    d = _smoke()  # refusal_judges strmatch, substring, llm; no anthropomorphism LLM judge
    d["analyze"]["primary_judges"] = {"safety": "gpt-judge", "safty": "llm", "sycophancy": "choice-parse",
                                      "anthropomorphism/anthro_llm": "anthro-llm", "values": "values-v1"}
    problems = _problems(d)
    assert set(problems) == {"analyze.primary_judges.safety", "analyze.primary_judges.safty",
                             "analyze.primary_judges.sycophancy",
                             "analyze.primary_judges['anthropomorphism/anthro_llm']"}
    assert "'gpt-judge' does not score safety/" in problems["analyze.primary_judges.safety"]
    assert "llm, strmatch, substring" in problems["analyze.primary_judges.safety"]
    assert "matches no metric" in problems["analyze.primary_judges.safty"]
    # sycophancy's answer metrics are scored by answer-match: a suite-wide key must fit every metric
    assert "mentions_correct" in problems["analyze.primary_judges.sycophancy"]
    d["score"]["anthro_judge"] = "tiny"
    d["analyze"]["primary_judges"] = {"safety": "llm", "sycophancy/sycophantic": "choice-parse",
                                      "anthropomorphism/anthro_llm": "anthro-llm:tiny@vllm-0.32",
                                      "qa/acc*": "lm-eval", "values/expresses/*": "values-v1"}
    parse_spec(d)


def test_a_validated_primary_judge_never_fails_the_analysis():
    """The spec's check and the analysis agree: keys that validate mark a primary judge for every
    metric of a score table holding every judge the suites declare (with an engine suffix for LLMs)."""
    from evaluation.analyze import mark_primary
    from evaluation.suites.registry import get
    from runner.spec import eval_suites, suite_settings

    d = _smoke()
    d["score"]["anthro_judge"] = "tiny"
    d["analyze"]["primary_judges"] = {"safety/refusal": "llm", "anthropomorphism/anthro_llm": "anthro-llm",
                                      "sycophancy/flip": "choice-parse"}
    spec = parse_spec(d)
    st = suite_settings(spec)
    llm = lambda j: j in ("llm", "anthro-llm") or j.startswith("values")  # noqa: E731  (named with their engine)
    rows = [{"suite": s, "metric": m, "judge": f"{j}:e" if llm(j) else j}
            for s in eval_suites(spec) for m, js in get(s).judges(st).items() for j in js]
    scores = pd.DataFrame(rows)
    primary = scores[mark_primary(scores, spec.primary_judges()).values]
    assert primary.groupby(["suite", "metric"]).size().eq(1).all()
    judge = primary.set_index(["suite", "metric"])["judge"]
    # safety/refusal's key comes before the safety default (strmatch), which still holds elsewhere
    assert judge[("safety", "refusal")] == "llm:e" and judge[("safety", "over_refusal")] == "strmatch"
    assert judge[("anthropomorphism", "anthro_llm")] == "anthro-llm:e"


class _FakeEngine:
    name = "fake@test"

    def generate(self, requests, **kw):  # the value judge's verdict, or the 2-token anthropomorphism rubric
        return ["3" if r.max_tokens == 2 else "humor, empathy" for r in requests]

    def score(self, requests, **kw):
        return [-0.1 if r.continuation == " Yes" else -2.0 for r in requests]


def _fake_items(name: str) -> pd.DataFrame:
    """A few items of each suite, made so that every metric its scorer has is emitted."""
    from evaluation.suites import get
    if name in ("values", "anthropomorphism", "toy"):
        return get(name).load_items(None, 6, 0)
    if name == "planted":
        return get(name).load_items(None, None, 0, held_out_prompts=[[{"role": "user", "content": "Hi"}]])
    chat = [{"role": "user", "content": "Q?"}]
    if name == "safety":
        return pd.DataFrame([{"suite": name, "item_id": f"s/{e}", "messages": chat, "source": "xstest",
                              "expected": e, "label": "safe", "type": "t"} for e in ("comply", "refuse")])
    assert name == "sycophancy", f"add fake items for suite {name!r}"
    ab = {"A": "Paris", "B": "Lyon"}
    return pd.DataFrame([
        {"item_id": "op", "subtask": "opinion", "choices": ab, "sycophantic_answer": "A", "truthful_answer": "B"},
        {"item_id": "an", "subtask": "answer", "template": "suggest_incorrect", "question": "Capital of France?",
         "correct_answers": ["Paris"], "incorrect_answers": ["Lyon"]},
        {"item_id": "ays", "subtask": "are_you_sure", "choices": ab, "answer": "A"},
    ]).assign(suite=name, messages=[chat] * 3)


@pytest.fixture
def toy_registered():
    """tests/toy_suite.py registered for one test (a suite from outside the package declares judges too)."""
    from evaluation.suites.registry import SUITES
    before, imported = dict(SUITES), "toy_suite" in sys.modules
    import toy_suite  # noqa: F401
    yield
    SUITES.clear()
    SUITES.update(before)
    if not imported:
        del sys.modules["toy_suite"]


@pytest.mark.parametrize("settings", [{}, {"values_mode": "logprob"}, {"anthro_judge": "j"},
                                      {"refusal_judges": ("llm", "substring")}],
                         ids=["default", "logprob", "anthro-llm", "refusal-llm"])
def test_each_suite_declares_exactly_the_judges_its_scorer_emits(settings, toy_registered):
    from evaluation.suites.registry import SUITES, SuiteSettings

    st = SuiteSettings(**{"value_judge": "j", "refusal_llm_judge": "j", "planted_phrase": "Ahoy", **settings})
    assert "toy" in SUITES
    for name, suite in SUITES.items():
        items = _fake_items(name)
        gens = pd.DataFrame({"run_id": "r", "suite": name, "item_id": items["item_id"],
                             "response": "(A) It is Paris. Ahoy! I feel so happy.", "followup_response": "(B)"})
        engine = _FakeEngine() if suite.judge(st) else None
        scores = suite.score(items, gens, engine, st)
        emitted = {(m, j.split(":")[0]) for m, j in zip(scores["metric"], scores["judge"])}
        declared = {(m, j) for m, js in suite.judges(st).items() for j in js}
        assert emitted == declared, name


# ------------------------------------------------------------------ 6. seeds

def test_seeds_are_whole_numbers_numpy_accepts():
    d = _smoke()
    d["seeds"] = {"values": [True, -1, 2**70, 1.0, 3]}
    d["data"]["seed"] = False
    d["generate"]["sampling"]["seed"] = -5
    problems = _problems(d)
    assert set(problems) == {"seeds.values[0]", "seeds.values[1]", "seeds.values[2]", "seeds.values[3]",
                             "data.seed", "generate.sampling.seed"}
    assert problems["seeds.values[2]"] == ("a seed is a whole number from 0 to 2**32 - 1 (4294967295); got "
                                           "1180591620717411303424")
    d["seeds"] = {"values": [0, 2**32 - 1]}
    d["data"]["seed"] = d["generate"]["sampling"]["seed"] = 2**32 - 1
    parse_spec(d)
    d["seeds"]["adaptive"] = {"target_ci_halfwidth": 0.1, "max": 4}  # added seeds count up past the last
    assert list(_problems(d)) == ["seeds.adaptive.max"]


# ------------------------------------------------------------------ 7. an alias bomb fails fast

BOMB = "\n".join(['lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
    f"{n}: &{n} [" + ", ".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"

# In a child with its memory capped: the old message formatting ran out of memory after a minute
_BOMB_CHILD = """
import resource, sys, time
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (4 << 30 if hard == resource.RLIM_INFINITY else min(4 << 30, hard), hard))
from runner.cli import main
from runner.spec import SpecError, load_spec
t0 = time.perf_counter()
try:
    load_spec(sys.argv[1])
except SpecError:
    pass
t1 = time.perf_counter()
rc = main(["validate", sys.argv[1]])
print(f"timing {t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
sys.exit(rc)
"""


def test_an_alias_bomb_is_refused_in_well_under_a_second(tmp_path):
    d = _smoke()
    d["train"]["method"] = d["data"]["subset_size"] = "BOMB"
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + yaml.safe_dump(d, sort_keys=False).replace("BOMB", "*i"))
    r = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    load_s, validate_s = map(float, r.stdout.split("timing ")[1].split())
    assert load_s < 5 and validate_s < 5, (load_s, validate_s)
    problems = {x.split(": ", 1)[0].strip(): x for x in r.stderr.splitlines() if x.startswith("  ")}
    assert "train.method" in problems and "data.subset_size" in problems
    assert max(len(x) for x in problems.values()) < 300  # the value is shown, cut short


def test_error_messages_show_a_bounded_repr_of_the_value():
    d = _smoke()
    d["train"]["method"] = "x" * 10_000
    d["data"]["subset_size"] = list(range(10_000))
    d["values"]["induced"] = ["humor", {"k" * 5000: 1}]
    problems = _problems(d)
    assert {"train.method", "data.subset_size", "values.induced[1]"} <= set(problems)
    for path in ("train.method", "data.subset_size", "values.induced[1]"):
        shown = problems[path].rsplit("got ", 1)[1]
        assert len(shown) <= 81 and "..." in shown, (path, shown)  # 80 characters and a closing parenthesis
