"""Keys that cannot forget an input.

`test_every_spec_field_is_in_a_key_or_reviewed` is generated from the spec's pydantic models: it
changes every field of a spec that turns on every optional section, one at a time, and checks that
the field changes some unit's key unless runner.stages.keys.OUTSIDE_KEYS lists it (with the reason
it cannot change a result), and that no listed field changes one. The other tests edit what units
read from outside the store (template files, local data files, model weights, data files, hub
commits) in place and check that the keys follow the content.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from evaluation.suites.registry import SUITES
from runner.spec import Spec, SpecError, parse_spec
from runner.stages.keys import OUTSIDE_KEYS, outside_keys

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("VALIND_DATA_DIR", raising=False)  # data.data_dir is read from the spec here


def all_keys(d: dict, base: Path) -> dict:
    """Every unit key of the spec `d`: study-level ones and one per run of the per-run ones."""
    from runner.pipeline import Study
    from runner.stages import KEYS
    study = Study(parse_spec(d), base_dir=base)
    out = {}
    for name, key in KEYS.items():
        if key.per_run:
            out.update({(name, r.run_id): key(study.ctx, r) for r in study.runs()})
        else:
            out[name] = key(study.ctx)
    return out


def _rich_spec(tmp: Path, data_dir: Path) -> dict:
    """The smoke spec with every optional section on (except the engine sections, see _activate)."""
    local = tmp / "pairs.jsonl"
    local.write_text("".join(json.dumps({"q": f"question {i}", "good": f"yes {i}", "bad": f"no {i}"}) + "\n"
                             for i in range(8)))
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp / "studies")
    d["models"] = [{"name": "tiny", "path": "tiny-llama"}, {"name": "hub", "path": "org/Model-1B", "revision": "v1"}]
    d["seeds"] = {"values": [0, 1], "adaptive": {"target_ci_halfwidth": 0.1, "max": 4}}
    d["controls"]["positive"] = {"items": 8}
    d["data"]["data_dir"] = str(data_dir)
    d["data"]["sources"].append({"name": "local", "path": str(local), "columns": {"prompt": "q", "chosen": "good",
                                                                                  "rejected": "bad"}})
    d["annotate"]["check"] = {"judge_model": "hub", "sample": 10}
    d["train"]["system_prompt"] = "You are kind."
    d["train"]["eval_at"] = [0.5, 1.0]
    d["generate"]["system_prompt"] = "train"
    d["score"]["suites"]["anthropomorphism"] = {"judge": "tiny"}
    d["score"]["suites"]["values"] = {"judge": None}
    d["analyze"]["primary_judges"] = {"safety/refusal": "substring"}
    d["tracking"] = {"uri": "sqlite:///x.db", "experiment": "e", "artifact_location": "/tmp/artifacts"}
    d["cluster"] = {"nodes": 1, "gpus_per_node": 8}
    return parse_spec(d).model_dump(mode="json")  # every field, defaults included


def _fields(model: type[BaseModel], prefix: str = ""):
    """(path, annotation) of every leaf field; nested sections recurse, lists of sections as [i]."""
    for name, f in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        ann = f.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        model = lambda t: isinstance(t, type) and issubclass(t, BaseModel)  # noqa: E731
        if path == "score.suites":  # each suite's own settings model (evaluation.suites: Suite.settings)
            for suite, s in SUITES.items():
                yield from _fields(s.settings, f"{path}.{suite}")
        elif typing.get_origin(ann) is list and args and model(args[0]):
            yield from _fields(args[0], f"{path}[]")
        elif model(ann) or (len(args) == 1 and model(args[0])):
            yield from _fields(ann if model(ann) else args[0], path)
        else:
            yield path, ann


def _get(d, parts):
    for p in parts:
        d = d[p]
    return d


def _set(d, parts, value):
    for p in parts[:-1]:
        d = d[p]
    d[parts[-1]] = value


def _parts(path: str, index: int) -> list:
    out = []
    for p in path.split("."):
        if p.endswith("[]"):
            out += [p[:-2], index]
        else:
            out.append(p)
    return out


def _candidates(path: str, ann, value, ctx: dict) -> list:
    """Other values for a field, most natural first; the first that validates is used."""
    special = {
        "models[].name": lambda v: [None],  # renamed with its references: _rename
        "models[].path": lambda v: ["smollm2-135m"],
        "models[].chat_template": lambda v: [ctx["template"]],
        "models[].revision": lambda v: ["v2"],
        "data.data_dir": lambda v: [ctx["data_same"]],  # the same files elsewhere (contents: test_a_data_file...)
        "data.sources[].name": lambda v: ["ultrafeedback"],
        "data.sources[].columns": lambda v: [{"prompt": "q", "chosen": "bad", "rejected": "good"}],
        "annotate.judge_model": lambda v: ["org/Judge-3B"], "data.subset_size": lambda v: [v + 1], "annotate.check.judge_model": lambda v: ["org/Judge-2B"],
        "score.suites.values.judge": lambda v: ["hub"], "score.suites.safety.llm_judge": lambda v: ["hub"],
        "score.suites.anthropomorphism.judge": lambda v: ["hub"], "score.suites.safety.harm_judge": lambda v: ["hub"],
        "score.check.judge_model": lambda v: ["org/Judge-2B"],
        "values.induced": lambda v: [v + ["empathy"]], "values.positive": lambda v: [v[1:]],
        "seeds.values": lambda v: [v + [2]], "seeds.adaptive.metrics": lambda v: [["safety/*"]],
        "seeds.adaptive.conditions": lambda v: [["value-*"]], "generate.suites": lambda v: [v[1:]],
        "score.suites.safety.judges": lambda v: [v[1:]], "annotate.max_pairs": lambda v: [1000], "score.benchmarks": lambda v: [v + ["gsm8k"]],
        "train.lora.target_modules": lambda v: [["q_proj", "v_proj"]], "train.eval_at": lambda v: [[0.25, 1.0]],
        "analyze.primary_judges": lambda v: [{"safety/refusal": "strmatch"}],
        "analyze.equivalence_margin": lambda v: [{"qa/acc": 0.1}],
        "tracking.artifact_location": lambda v: ["/tmp/other"], "train.adapters_per_group": lambda v: [2],
        "train.eval_at_steps": lambda v: [[1]],
    }
    if path in special:
        return special[path](value)
    args = typing.get_args(ann)
    if ann is bool or bool in args:
        return [not value] if value is not None else [True, False]
    if typing.get_origin(ann) is typing.Literal or any(typing.get_origin(a) is typing.Literal for a in args):
        options = [o for a in (ann, *args) if typing.get_origin(a) is typing.Literal for o in typing.get_args(a)]
        return [o for o in options if o != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, 1, 2]
    if isinstance(value, float):
        return [value * 1.5, value / 2, value + 0.05]
    if isinstance(value, str):
        return [value + "x", "x", "/tmp/x"]
    if value is None:
        return [1, 2, 0.5, 0.1, "x", "/tmp/x", True]
    return []


def _rename(d: dict) -> dict:
    """models[0] renamed, and every reference to it."""
    return json.loads(json.dumps(d).replace('"tiny"', '"tiny2"'))


# fields that are read only when another field says so: (that field, its value) in the compared specs
NEEDS = {"train.label_smoothing": ("train.method", "cdpo"), "train.eval_at_steps": ("train.eval_at", [1.0])}


def _activate(d: dict, path: str) -> dict:
    """The spec a field is compared against: an optional engine section on its path set (to the root
    engine's values, so setting it alone changes nothing a run computes), or NEEDS met."""
    d = copy.deepcopy(d)
    for section in ("annotate", "generate"):
        if path.startswith(f"{section}.engine.") and d[section]["engine"] is None:
            d[section]["engine"] = copy.deepcopy(d["engine"])
    if path in NEEDS:
        other, value = NEEDS[path]
        _set(d, other.split("."), value)
    return d


def test_every_spec_field_is_in_a_key_or_reviewed(tmp_path, tiny_model, data_dir, offline_hub):
    data_copy = tmp_path / "data-copy"
    shutil.copytree(data_dir, data_copy)
    ctx = {"template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
           "data_same": str(data_dir)}
    base = _rich_spec(tmp_path, data_copy)
    base_keys = {}
    in_key, outside, problems = [], [], []
    for path, ann in _fields(Spec):
        reviewed = outside_keys(path)
        spec0 = _activate(base, path)
        n = len(_get(spec0, _parts(path.split("[]")[0], 0))) if "[]" in path else 1
        changed, tried = None, False
        for index in range(n):
            parts = _parts(path, index)
            try:
                value = _get(spec0, parts)
            except (KeyError, TypeError, IndexError):
                continue
            for cand in [c for c in _candidates(path, ann, value, ctx) if c != value or c is None]:
                new = _rename(spec0) if path == "models[].name" else copy.deepcopy(spec0)
                if path != "models[].name":
                    _set(new, parts, cand)
                try:
                    parse_spec(new)
                except SpecError:
                    continue
                tried = True
                k0 = base_keys.setdefault(json.dumps(spec0, sort_keys=True), all_keys(spec0, tmp_path))
                k1 = all_keys(new, tmp_path)
                diff = sorted(str(k) for k in set(k0) | set(k1) if k0.get(k) != k1.get(k))
                if diff:
                    changed = (cand, diff[:3])
                    break
                if reviewed is None:  # try the next candidate: this one may be the same by coincidence
                    continue
                break
            if changed:
                break
        if not tried:  # a field that admits one value (annotate.prompt_version) must be reviewed
            if reviewed is None:
                problems.append(f"{path}: no valid other value to try (add one to _candidates)")
            outside.append(path)
            continue
        if changed and reviewed:
            problems.append(f"{path} is listed in OUTSIDE_KEYS ({reviewed!r}) but changes {changed[1]}")
        elif not changed and not reviewed:
            problems.append(f"{path} changes no unit's key: add it to a key, or to OUTSIDE_KEYS with the reason "
                            "it cannot change a result")
        (in_key if changed else outside).append(path)
    assert not problems, "\n".join(problems)
    assert len(in_key) > 80 and outside  # the enumeration reached the spec's fields
    unused = [p for p in OUTSIDE_KEYS if not any(outside_keys(f) == OUTSIDE_KEYS[p] for f in outside)]
    assert not unused, f"OUTSIDE_KEYS entries matching no field: {unused}"


# ----------------------------------------------------------------- content, not names

def _smoke(tmp_path: Path, **sections) -> dict:
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path / "studies")
    d.update(sections)
    return d


def _key(d: dict, tmp_path: Path, stage: str = "train") -> str:
    keys = all_keys(d, tmp_path)
    return keys[stage] if stage in keys else next(v for k, v in keys.items() if k[0] == stage and "value" in k[1])


def test_a_chat_template_file_is_keyed_by_its_content(tmp_path, tiny_model):
    tpl = tmp_path / "chat.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    d = _smoke(tmp_path)
    d["models"][0]["chat_template"] = str(tpl)
    before = _key(d, tmp_path)
    tpl.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")  # edited in place
    assert _key(d, tmp_path) != before


def test_a_local_preference_file_is_keyed_by_its_content(tmp_path, tiny_model):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    d = _smoke(tmp_path)
    d["data"]["sources"] = [{"name": "local", "path": str(f)}]
    before = _key(d, tmp_path, "annotate")
    st = f.stat()
    f.write_text(json.dumps({"prompt": "q", "chosen": "b", "rejected": "a"}) + "\n")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same time: only the content differs
    assert _key(d, tmp_path, "annotate") != before


def test_a_data_file_is_keyed_by_its_content(tmp_path, tiny_model, data_dir):
    copy_ = tmp_path / "data"
    shutil.copytree(data_dir, copy_)
    d = _smoke(tmp_path)
    d["data"]["data_dir"] = str(copy_)
    before = _key(d, tmp_path, "annotate")
    moved = tmp_path / "moved"
    shutil.copytree(copy_, moved)
    assert _key({**d, "data": {**d["data"], "data_dir": str(moved)}}, tmp_path, "annotate") == before  # a copy
    f = copy_ / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz"
    st = f.stat()
    rows = gzip.decompress(f.read_bytes()).decode().splitlines()
    f.write_bytes(gzip.compress(("\n".join(rows[1:] + rows[:1]) + "\n").encode()))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _key(d, tmp_path, "annotate") != before


def test_local_model_weights_are_keyed_by_their_content(tmp_path, tiny_model):
    """Weights swapped in place (same path, same size, same time) change every key of the model; a copy
    of the same weights elsewhere changes none."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    d = _smoke(tmp_path)
    d["models"][0]["path"] = str(model)
    before = _key(d, tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    d2 = copy.deepcopy(d)
    d2["models"][0]["path"] = str(moved)
    assert _key(d2, tmp_path) == before
    w = model / "model.safetensors"
    st = w.stat()
    blob = bytearray(w.read_bytes())
    blob[-100:] = bytes(100)  # the end of the last tensor
    w.write_bytes(bytes(blob))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _key(d, tmp_path) != before


def test_a_hub_model_is_keyed_by_its_commit(tmp_path, monkeypatch, tiny_model):
    """A hub id resolves to its commit (offline: the local cache's ref); a pinned 40-hex revision is
    used as given; the commit is in the keys and recorded for the study's later runs."""
    from huggingface_hub import constants

    from runner.models import ModelError, hub_commit
    cache = tmp_path / "hub"
    refs = cache / "models--org--Model-1B" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    (refs / "v2").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_commit("org/Model-1B") == "a" * 40 and hub_commit("org/Model-1B", "v2") == "b" * 40
    assert hub_commit("org/Model-1B", "c" * 40) == "c" * 40
    with pytest.raises(ModelError, match="cannot resolve revision 'v3'"):
        hub_commit("org/Model-1B", "v3")
    d = _smoke(tmp_path)
    d["models"] = [{"name": "tiny", "path": "tiny-llama"}, {"name": "hub", "path": "org/Model-1B"}]
    keys_main = all_keys(d, tmp_path)
    (refs / "main").write_text("d" * 40)  # main moved on: a new study would be keyed by the new commit
    keys_moved = all_keys(d, tmp_path)
    hub_train = [k for k in keys_main if isinstance(k, tuple) and k[1].startswith("hub__")]
    assert hub_train and all(keys_main[k] != keys_moved[k] for k in hub_train)
    tiny_train = [k for k in keys_main if isinstance(k, tuple) and k[1].startswith("tiny__") and k[0] == "train"]
    assert all(keys_main[k] == keys_moved[k] for k in tiny_train)
    # a study records the commits of its first run and keeps using them (study.json)
    from runner.pipeline import Study
    from runner.study_dir import record_revisions
    spec = parse_spec(d)
    study = Study(spec, base_dir=tmp_path)
    record_revisions(study.root, spec, {"hub": "a" * 40})
    again = Study(spec, base_dir=tmp_path)
    assert again.ctx.model_revision("hub") == "a" * 40
    pinned = copy.deepcopy(d)
    pinned["models"][1]["revision"] = "v2"  # another revision asked for: resolved anew
    assert Study(parse_spec(pinned), base_dir=tmp_path).ctx.model_revision("hub") == "b" * 40


def test_a_suite_version_is_in_the_item_and_score_keys(tmp_path, tiny_model, monkeypatch):
    from evaluation.suites import registry
    d = _smoke(tmp_path)
    before = all_keys(d, tmp_path)
    safety = registry.SUITES["safety"]
    monkeypatch.setitem(registry.SUITES, "safety", type(safety)(**{**safety.__dict__, "version": safety.version + "'"}))
    after = all_keys(d, tmp_path)
    changed = {k if isinstance(k, str) else k[0] for k in before if before[k] != after[k]}
    assert changed == {"items", "generate", "score", "score_check", "analyze"}  # generations follow the items


def test_fields_that_cannot_change_results_retrain_nothing(tmp_path, tiny_model):
    d = _smoke(tmp_path)
    before = all_keys(d, tmp_path)
    d["train"].update(max_failures=3, checkpoint_every=7, report_every=2)
    d["engine"].update(actors=3, batch_size=7)
    assert all_keys(d, tmp_path) == before


def test_a_leftover_adaptive_state_steers_only_the_spec_that_wrote_it(tmp_path, tiny_model):
    """Seeds added by seeds.adaptive live under a key of the spec that added them: a spec without
    seeds.adaptive (or another one) never reads them. An older valind's adaptive_seeds.json is ignored."""
    from runner.pipeline import Study
    d = _smoke(tmp_path)
    d["seeds"] = {"values": [0], "adaptive": {"target_ci_halfwidth": 0.1, "max": 8}}
    adaptive = Study(parse_spec(d), base_dir=tmp_path)
    adaptive.seeds.add(["value-humor"])
    assert {r.seed for r in Study(parse_spec(d), base_dir=tmp_path).runs() if r.condition == "value-humor"} == {0, 1}
    root = adaptive.root
    (root / "adaptive_seeds.json").write_text(json.dumps({"value-humor": [7]}))
    plain = copy.deepcopy(d)
    plain["seeds"] = {"values": [0]}
    assert {r.seed for r in Study(parse_spec(plain), base_dir=tmp_path).runs()} == {0, None}
    other = copy.deepcopy(d)
    other["train"]["lr"] = 2e-3
    assert {r.seed for r in Study(parse_spec(other), base_dir=tmp_path).runs()} == {0, None}


def test_unreadable_adaptive_state_is_read_as_none(tmp_path, tiny_model, capsys):
    from runner.pipeline import Study
    d = _smoke(tmp_path)
    d["seeds"] = {"values": [0], "adaptive": {"target_ci_halfwidth": 0.1, "max": 8}}
    study = Study(parse_spec(d), base_dir=tmp_path)
    study.seeds.add(["value-humor"])
    (study.seeds.dir / "seeds.json").write_text('{"value-humor": [1')
    again = Study(parse_spec(d), base_dir=tmp_path)
    assert {r.seed for r in again.runs() if r.seed is not None} == {0}
    assert "seeds.json is unreadable" in capsys.readouterr().out
