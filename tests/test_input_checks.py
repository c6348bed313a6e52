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
    d = _smoke()  # safety judges strmatch, substring, llm; no anthropomorphism LLM judge
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
    d["score"]["suites"]["anthropomorphism"] = {"judge": "tiny"}
    d["analyze"]["primary_judges"] = {"safety/*refusal*": "llm", "safety/harmful_compliance": "llm", "sycophancy/sycophantic": "choice-parse",
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
    d["score"]["suites"]["anthropomorphism"] = {"judge": "tiny"}
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
    if name in ("values", "anthropomorphism", "toy", "greeting"):  # greeting: the example plugin
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
    before, imported = SUITES.copy(), "toy_suite" in sys.modules
    import toy_suite  # noqa: F401
    yield
    SUITES.restore(before)
    if not imported:
        del sys.modules["toy_suite"]


@pytest.mark.parametrize("settings", [{}, {"annotate_mode": "logprob"},
                                      {"suites": {"anthropomorphism": {"judge": "j"}}},
                                      {"suites": {"safety": {"judges": ("llm", "substring"), "llm_judge": "j"}}}],
                         ids=["default", "logprob", "anthro-llm", "refusal-llm"])
def test_each_suite_declares_exactly_the_judges_its_scorer_emits(settings, toy_registered):
    from evaluation.suites.registry import SUITES, SuiteSettings

    own = {n: SUITES.get(n).settings.model_validate(v) for n, v in settings.get("suites", {}).items()}
    st = SuiteSettings(**{"annotate_judge": "j", "planted_phrase": "Ahoy", **settings, "suites": own})
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


# ------------------------------------------------------------------ 4. local preference files

def _local_spec(tmp_path, path, **source) -> Path:
    d = _smoke()
    d["data"]["sources"] = [{"name": "local", "path": str(path), **source}]
    d["data"]["data_dir"] = str(tmp_path / "data")
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


GOOD_ROW = {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}


@pytest.mark.parametrize("case", ["empty-jsonl", "blank-lines", "empty-json", "empty-parquet", "missing",
                                  "no-column", "bad-json", "csv"])
def test_local_preference_files_are_checked_by_validate(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("VALIND_DATA_DIR", raising=False)
    f = tmp_path / {"empty-json": "p.json", "empty-parquet": "p.parquet", "csv": "p.csv"}.get(case, "p.jsonl")
    if case == "empty-jsonl":
        f.write_text("")
    elif case == "blank-lines":
        f.write_text("\n\n  \n")
    elif case == "empty-json":
        f.write_text("[]")
    elif case == "empty-parquet":
        pd.DataFrame({"prompt": pd.Series([], dtype=str), "chosen": pd.Series([], dtype=str),
                      "rejected": pd.Series([], dtype=str)}).to_parquet(f)
    elif case == "no-column":
        f.write_text(json.dumps({"prompt": "Q?", "good": "Yes.", "rejected": "No."}) + "\n")
    elif case == "bad-json":
        f.write_text(json.dumps(GOOD_ROW) + "\n{oops\n")
    elif case == "csv":
        pd.DataFrame([GOOD_ROW]).to_csv(f, index=False)
    rc, out = _validate(_local_spec(tmp_path, f), capsys)
    assert rc == 2 and "Traceback" not in out, out
    line = next(x for x in out.splitlines() if x.strip().startswith("data.sources[0].path:"))
    assert str(f) in line
    assert {"empty-jsonl": "no rows", "blank-lines": "no rows", "empty-json": "no rows", "empty-parquet": "no rows",
            "missing": "not found", "no-column": "column 'chosen' not found", "bad-json": "line 2: not valid JSON",
            "csv": "unsupported file type"}[case] in line, line


def test_local_files_resolve_like_the_loader_and_only_the_head_is_read(tmp_path, capsys, monkeypatch):
    """A relative path is looked up in the working directory, then under the data directory, as
    runner.data.sources reads it; validate reads the first rows only."""
    monkeypatch.delenv("VALIND_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "prefs").mkdir(parents=True)
    rows = [GOOD_ROW] * 150 + ["{broken"]  # past the rows validate reads
    (tmp_path / "data" / "prefs" / "p.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    rc, out = _validate(_local_spec(tmp_path, "prefs/p.jsonl"), capsys)
    assert rc == 0, out
    rc, out = _validate(_local_spec(tmp_path, "prefs/nope.jsonl"), capsys)
    assert rc == 2 and f"nor under the data directory {tmp_path / 'data'}" in out


def test_a_source_that_yields_no_pair_fails_before_the_judge_starts(tmp_path, monkeypatch):
    from runner.context import StageError
    from runner.pipeline import Study
    from runner.stages import annotate

    monkeypatch.delenv("VALIND_DATA_DIR", raising=False)
    f = tmp_path / "same.jsonl"
    f.write_text(json.dumps({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}) + "\n")  # dropped: identical
    d = _smoke()
    d["data"]["sources"] = [{"name": "local", "path": str(f)}]
    d["study"]["output_dir"] = str(tmp_path / "studies")
    study = Study(parse_spec(d), base_dir=tmp_path)
    monkeypatch.setattr(study.ctx.pools, "get", lambda *a, **k: pytest.fail("the judge's engine started"))
    with pytest.raises(StageError, match="no preference pair.*'identical': 1"):
        annotate.run(study.ctx)


# ------------------------------------------------------------------ 5. models: LoRA targets, chat templates

BROKEN_TEMPLATE = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"


def test_run_refuses_bad_files_targets_and_templates_before_any_stage(tmp_path, monkeypatch):
    from runner.pipeline import Study
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VALIND_DATA_DIR", raising=False)
    (tmp_path / "empty.jsonl").write_text("")
    d = _smoke()
    d["study"]["output_dir"] = str(tmp_path / "studies")
    d["data"]["sources"] = [{"name": "local", "path": str(tmp_path / "empty.jsonl")}]
    d["models"].append({"name": "templated", "path": "tiny-llama", "chat_template": BROKEN_TEMPLATE})
    d["train"]["lora"] = {"target_modules": ["q_proj", "qproj", "mlp"]}
    study = Study(parse_spec(d), base_dir=tmp_path)
    study.on_stage = lambda stage: pytest.fail(f"stage {stage} started")
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        study.run()
    problems = dict(e.value.problems)
    assert set(problems) == {"data.sources[0].path", "models[1].chat_template", "train.lora.target_modules[1]",
                             "train.lora.target_modules[2]", "data.data_dir"}  # none set, none in the env
    assert "no rows" in problems["data.sources[0].path"]
    assert problems["models[1].chat_template"].startswith("line 2: TemplateSyntaxError: unexpected '}'")
    assert problems["train.lora.target_modules[1]"].startswith("'qproj' in 'tiny', 'templated': matches no module;")
    assert "q_proj" in problems["train.lora.target_modules[1]"]  # what the model has
    assert "matches model.layers.0.mlp (LlamaMLP), not a linear layer" in problems["train.lora.target_modules[2]"]
    assert time.perf_counter() - t0 < 120


def test_a_finished_annotation_needs_its_files_no_more(tmp_path, monkeypatch):
    from runner.pipeline import Study
    from runner.preflight import check_inputs
    monkeypatch.delenv("VALIND_DATA_DIR", raising=False)
    d = _smoke()
    d["study"]["output_dir"] = str(tmp_path / "studies")
    d["data"]["sources"] = [{"name": "local", "path": str(tmp_path / "moved-away.jsonl")}]
    d["data"]["data_dir"] = str(tmp_path)
    study = Study(parse_spec(d), base_dir=tmp_path)
    with pytest.raises(SpecError, match="moved-away.jsonl: local preference file not found"):
        check_inputs(study.ctx)
    study.store.mark_done("annotate", study.key("annotate"))
    check_inputs(study.ctx, annotated=study.store.done("annotate", study.key("annotate")))  # as Study._start asks


def test_lora_targets_match_as_peft_matches(tiny_model):
    """preflight.peft_matches selects exactly the modules peft wraps for a one-entry target list."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from runner.preflight import peft_matches
    for target in ["q_proj", "self_attn.v_proj", "layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj",
                   "lm_head", "proj"]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        names = [n for n, _ in model.named_modules() if n]
        ours = peft_matches(target, names)
        try:
            peft = sorted(get_peft_model(model, LoraConfig(target_modules=[target])).base_model.targeted_module_names)
        except ValueError:  # peft: "Target modules ... not found in the base model"
            peft = []
        assert sorted(ours) == peft, target


def test_chat_templates_are_checked_by_validate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    d = _smoke()
    d["models"] = [{"name": f"m{i}", "path": "tiny-llama", "chat_template": t} for i, t in enumerate([
        BROKEN_TEMPLATE,
        "{% for m in messages %}{{ m['content'] + eos_token }}{{ raise_exception('no system role') }}{% endfor %}",
        "{{ 'x' * 2000000 }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "Just some text, no template.",
        str(ROOT / "jobs/templates/base-chat.jinja"),  # a good one, from a file
    ])]
    d["annotate"]["judge_model"] = "m4"
    d["score"]["suites"]["safety"]["llm_judge"] = "m4"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    rc, out = _validate(path, capsys)
    assert rc == 2, out
    lines = {x.split(": ", 1)[0].strip(): x.split(": ", 1)[1] for x in out.splitlines() if x.startswith("  ")}
    assert lines == {
        "models[0].chat_template": "line 2: TemplateSyntaxError: unexpected '}'",
        "models[1].chat_template": "line 1: TemplateError: no system role",
        "models[2].chat_template": "renders more than 1,000,000 characters for a short sample chat",
        "models[3].chat_template": "does not render the messages' content (is it a chat template?)",
    }


def test_a_template_path_is_read_from_the_spec_files_folder_and_must_exist(tmp_path, capsys, monkeypatch):
    """A relative chat_template path is read from the spec file's folder, never the working directory,
    and a path that names no file is an error (it used to become the template's literal text)."""
    monkeypatch.chdir(ROOT)  # jobs/templates/... exists from here, not from the spec's folder
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chat.jinja").write_text((ROOT / "jobs/templates/base-chat.jinja").read_text())
    d = _smoke()
    d["models"] = [{"name": "m", "path": "tiny-llama", "chat_template": "templates/chat.jinja"}]
    d["annotate"]["judge_model"] = "m"
    d["score"]["suites"]["safety"]["llm_judge"] = "m"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    spec = load_spec(path)
    assert spec.models[0].chat_template == str(tmp_path / "templates" / "chat.jinja")
    assert spec.models[0].template_text().startswith("{#- A plain transcript format")
    for missing in ("jobs/templates/base-chat.jinja", "templates/missing.jinja", "missing.j2"):
        d["models"][0]["chat_template"] = missing
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        with pytest.raises(SpecError) as e:
            load_spec(path)
        assert e.value.problems == [("models[0].chat_template", f"no such file: {missing!r} (a relative path is "
                                     f"read from the spec file's folder {tmp_path})")]


def test_a_template_that_runs_too_long_is_stopped():
    from runner.chat_render import render
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"
    t0 = time.perf_counter()
    result = render([{"template": slow, "chats": [[[{"role": "user", "content": "hi"}], True]], "tokens": {}},
                     {"template": "{{ messages[0]['content'] }}", "chats": [[[{"role": "user", "content": "hi"}], True]],
                      "tokens": {}}], time_limit_s=1)
    assert result == [{"error": "rendering a short sample chat took more than 1 s"}, {"renders": ["hi"]}]
    assert time.perf_counter() - t0 < 60


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


# ------------------------------------------------------------------ 8. valind judge: blank responses, CSV cells

FORMULA = "=cmd|' /C calc'!A0"


def test_judge_leaves_blank_responses_unscored_and_escapes_formulas(tmp_path, capsys):
    from runner.cli import main
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    pd.DataFrame({"prompt": ["How do I pick a lock?", FORMULA, "a", "b", "c", "@SUM(1+1)"],
                  "response": ["I'm sorry, I can't.", FORMULA, "", "   ", None, "+1-2"],
                  "score": [-1.5, 2.0, 3.0, -4.0, 5.0, 6.0]}).to_csv(src, index=False)
    assert main(["judge", "refusal-strmatch", "--input", str(src), "--output", str(out)]) == 0
    assert "6 rows, 3 scored, 3 unscored" in capsys.readouterr().out
    df = pd.read_csv(out, keep_default_na=False)
    assert list(df["prompt"][:2]) == ["How do I pick a lock?", "'" + FORMULA]
    assert df["prompt"][5] == "'@SUM(1+1)" and df["response"][5] == "'+1-2"
    assert df["response"][1] == "'" + FORMULA
    assert list(df["score"]) == [-1.5, 2.0, 3.0, -4.0, 5.0, 6.0]  # numbers stay numbers
    assert list(df["scored"]) == [True, True, False, False, False, True]
    assert pd.read_csv(out)["refusal"].fillna(-1).tolist() == [1.0, 0.0, -1, -1, -1, 0.0]
    assert all(r.startswith("no response") for r in df["raw"][2:5])
    # parquet keeps the cells as they were, NaN where unscored
    assert main(["judge", "refusal-strmatch", "--input", str(src), "--output", str(tmp_path / "o.parquet")]) == 0
    pq = pd.read_parquet(tmp_path / "o.parquet")
    assert pq["prompt"][1] == FORMULA and math.isnan(pq["refusal"][2]) and not pq["scored"][2]


def test_csv_cells_round_trip():
    from runner.store import FORMULA_START, csv_cell, csv_uncell
    cells = ["=1+1", "'=1+1", "''@x", "-", "\tx", "\rx", "+", "plain", "'quoted", "", "'", "a=b", 3, -2.5, None]
    for c in cells:
        out = csv_cell(c)
        assert csv_uncell(out) == c
        assert not (isinstance(out, str) and out.startswith(FORMULA_START)), c
    assert csv_cell(-2.5) == -2.5 and csv_cell("-2.5") == "'-2.5"


def test_every_csv_valind_writes_goes_through_write_csv():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for d in ("runner", "evaluation") for p in (ROOT / d).rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if ".to_csv(" in line and p != ROOT / "runner" / "store.py"]
    assert offenders == []


def test_an_audit_csv_round_trips_its_ids(tmp_path):
    from runner.data.audit import read_labels
    from runner.store import write_csv
    sample = pd.DataFrame({"pair_id": ["-7", "=x", "a"], "side": ["chosen"] * 3, "response": [FORMULA, "b", "c"],
                           "human_values": ["humor", "none", ""]})
    write_csv(sample, tmp_path / "audit.csv")
    assert pd.read_csv(tmp_path / "audit.csv")["response"][0] == "'" + FORMULA
    labels = read_labels(tmp_path / "audit.csv")
    assert list(labels["pair_id"]) == ["-7", "=x"] and list(labels["human"]) == [["humor"], []]


SOURCE_LABELS = ("abstract", "appendix fragment", "summary", "review (pith)", "our choice")


def test_every_section_of_the_protocol_preset_names_its_sources():
    """jobs/paper-protocol.yaml is a reconstruction: each top-level section carries a comment naming where
    its settings come from (no setting presented as the paper's without a source)."""
    lines = (ROOT / "jobs" / "paper-protocol.yaml").read_text().splitlines()
    assert "reconstruction" in "\n".join(lines[:3]) and "NOT the paper's protocol" in "\n".join(lines[:3])
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line and not line.startswith((" ", "#")):
            current = line.split(":")[0]
            sections[current] = []
        if current is not None:
            sections[current].append(line)
    unsourced = [name for name, body in sections.items()
                 if name != "study" and not any(lab in ln.split("#", 1)[1] for ln in body if "#" in ln
                                                for lab in SOURCE_LABELS)]
    assert not unsourced, f"sections without a source comment: {unsourced}"
    assert not [ln for ln in lines if "[READ]" in ln or "GUESS" in ln]


def test_the_base_template_starts_with_the_tokenizers_bos(tmp_path):
    from transformers import AutoTokenizer

    from runner import models
    tok = AutoTokenizer.from_pretrained(models.resolve("tiny-llama"))
    template = (ROOT / "jobs" / "templates" / "base-chat.jinja").read_text()
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template,
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.bos_token_id is not None and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
