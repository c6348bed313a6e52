"""Reliability and security: fault injection, bad input, no lost results, safe defaults.

Only `test_kill_driver_mid_study_and_resume` runs real compute (marked slow); everything else
works on synthetic store content, fake engines and in-process calls.
"""
from __future__ import annotations

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from runner.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SMOKE = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())


def _spec_dict(tmp_path: Path, **sections) -> dict:
    d = json.loads(json.dumps(SMOKE))
    d["study"]["output_dir"] = str(tmp_path / "studies")
    d.update(sections)
    return d


def _write_spec(tmp_path: Path, d: dict, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


# ============================================================ 1. kill the driver, rerun

def _valind_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


# The kill-the-driver test shares its smoke run with the end-to-end tests: tests/test_e2e.py.


# ============================================================ 2. fuzzed specs: exit 2 with messages

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ANY = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                 st.lists(st.one_of(st.integers(), st.text(max_size=8)), max_size=3),
                 st.dictionaries(st.text(max_size=8), st.integers(), max_size=3))
_NUMERIC = {("controls", "count"), ("data", "held_out_fraction"), ("data", "min_subset_size"), ("data", "subset_size"),
            ("data", "max_chars"), ("train", "lr"), ("train", "epochs"), ("train", "batch_size"), ("train", "workers"),
            ("train", "micro_batch_size"), ("train", "beta"), ("engine", "max_model_len"), ("engine", "batch_size"),
            ("analyze", "min_effect"), ("analyze", "alpha"), ("generate", "items_per_suite")}
_SECTIONS = ["study", "models", "values", "controls", "seeds", "data", "annotate", "engine", "train", "generate",
             "score", "analyze", "tracking"]


def _paths(d, prefix=()):
    """Every (path) into a nested dict/list of the spec."""
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


_BASE_PATHS = _paths(SMOKE)


def _set(d, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _delete(d, path):
    for k in path[:-1]:
        d = d[k]
    del d[path[-1]]


@st.composite
def mutated_specs(draw):
    d = json.loads(json.dumps(SMOKE))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["type", "unknown_key", "delete", "range", "value", "model", "section"]))
        if op == "type":
            path = draw(st.sampled_from(_BASE_PATHS))
            try:
                _set(d, path, draw(_ANY))
            except (KeyError, IndexError, TypeError):
                pass
        elif op == "unknown_key":
            section = draw(st.sampled_from(_SECTIONS))
            target = d.get(section)
            if isinstance(target, dict):
                target[draw(st.text(min_size=1, max_size=12))] = draw(_ANY)
            else:
                d[draw(st.text(min_size=1, max_size=12))] = draw(_ANY)
        elif op == "delete":
            path = draw(st.sampled_from(_BASE_PATHS))
            try:
                _delete(d, path)
            except (KeyError, IndexError, TypeError):
                pass
        elif op == "range":
            section, key = draw(st.sampled_from(sorted(_NUMERIC)))
            sec = d.setdefault(section, {}) if isinstance(d.get(section, {}), dict) else {}
            sec[key] = draw(st.one_of(st.integers(-10**6, 0), st.floats(-1e9, 1e9), st.integers(10**9, 10**20),
                                      st.sampled_from([float("nan"), float("inf"), -float("inf")])))
        elif op == "value":
            d["values"] = {"induced": draw(st.lists(st.one_of(st.sampled_from(["humor", "empathy"]),
                                                              st.text(max_size=12)), max_size=4))}
        elif op == "model":
            d["models"] = [{"name": draw(st.one_of(st.text(max_size=12), st.sampled_from(["../../x", "..", "a/b"]))),
                            "path": draw(st.text(max_size=12))}]
            d["annotate"] = {**(d.get("annotate") if isinstance(d.get("annotate"), dict) else {}),
                             "judge_model": draw(st.text(max_size=12))}
        else:
            d.pop(draw(st.sampled_from(_SECTIONS)), None)
    return d


def _validate(path, capsys) -> tuple[int, str]:
    from runner.cli import main
    capsys.readouterr()
    try:
        rc = main(["validate", str(path)])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def _assert_clean_rejection(rc, text, path):
    assert rc == 2, text
    assert "Traceback" not in text
    assert f"{path}:" in text and "problem(s)" in text
    lines = [x for x in text.splitlines() if x.startswith("  ")]
    assert lines and all(": " in x for x in lines), text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(d=mutated_specs())
def test_fuzzed_spec_is_valid_or_rejected_with_messages(tmp_path, capsys, d):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True))
    rc, text = _validate(path, capsys)
    if rc == 0:
        assert "valid" in text
    else:
        _assert_clean_rejection(rc, text, path)


@pytest.mark.parametrize("content", [
    b"", b"- a\n- b\n", b"just a string\n", b"42\n", b"\xff\xfe\x00\x89PNG garbage\x00\x01",
    b"study: {name: a}\nx: 2020-99-99\n",            # PyYAML raises ValueError building the date
    b"[" * 3000,                                      # deep nesting: RecursionError inside PyYAML
    b"study: [unclosed\n", b"? [a, b]\n: 1\n", b"study: !!python/object:os.system x\n", b"a: \x00\n",
    os.urandom(512),
], ids=["empty", "list", "string", "int", "binary", "bad-date", "deep", "unclosed", "list-key", "python-tag",
        "nul", "random-bytes"])
def test_non_mapping_and_garbage_specs_exit_2(tmp_path, capsys, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    rc, text = _validate(path, capsys)
    _assert_clean_rejection(rc, text, path)


def test_missing_and_directory_specs_exit_2(tmp_path, capsys):
    for path in (tmp_path / "nope.yaml", tmp_path):
        rc, text = _validate(path, capsys)
        _assert_clean_rejection(rc, text, path)


def test_rejections_keep_yaml_paths(tmp_path, capsys):
    d = _spec_dict(tmp_path)
    d["train"]["lr"] = "fast"
    d["models"][0]["bogus"] = 1
    d["engine"]["max_model_len"] = -5
    del d["annotate"]
    path = _write_spec(tmp_path, d)
    rc, text = _validate(path, capsys)
    _assert_clean_rejection(rc, text, path)
    for where in ("train.lr:", "models[0].bogus: unknown key", "engine.max_model_len:", "annotate: Field required"):
        assert where in text, text


# ============================================================ 3. corrupt inputs

def test_truncated_gzip_names_the_file(tmp_path):
    from runner.data.sources import DataError, load_pairs
    from runner.spec import SourceSpec
    pref = tmp_path / "preference"
    pref.mkdir()
    line = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})
    blob = gzip.compress((line + "\n").encode() * 200)
    path = pref / "hh-rlhf-harmless-base-test.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="hh-rlhf-harmless-base-test.jsonl.gz"):
        load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base"), tmp_path, 4000)


def test_stage_output_missing_a_column_names_the_file(tmp_path):
    from runner.store import StoreError, read_parquet, write_parquet
    p = tmp_path / "stages" / "generate" / "k" / "generations.parquet"
    write_parquet(pd.DataFrame({"run_id": ["r"], "suite": ["values"], "item_id": ["a"]}), p)  # no `response`
    with pytest.raises(StoreError, match=r"generations\.parquet: missing column\(s\) \['response'\]"):
        read_parquet(p, ("run_id", "suite", "item_id", "response"))


class _GarbageEngine:
    name = "garbage"

    def generate(self, requests):
        return ["\x00\x01 ###", "", "the model rambles about nothing", "{]"][: len(requests)] + \
               ["%%%"] * max(0, len(requests) - 4)

    def score(self, requests):
        return [float("nan")] * len(requests)


def test_value_judge_garbage_is_unscored_with_raw_text():
    from evaluation.judges.values import score_values
    items = pd.DataFrame({"suite": "values", "item_id": ["a", "b", "c", "d"],
                          "messages": [[{"role": "user", "content": f"q{i}"}] for i in range(4)]})
    gens = pd.DataFrame({"run_id": "r", "suite": "values", "item_id": ["a", "b", "c", "d"],
                         "response": ["x", "y", "z", "w"]})
    out = score_values(items, gens, _GarbageEngine())
    assert len(out) == 4 * 16 and (~out["scored"]).all() and out["value"].isna().all()
    assert set(out["raw"]) == {"\x00\x01 ###", "", "the model rambles about nothing", "{]"}
    lp = score_values(items, gens, _GarbageEngine(), mode="logprob")
    assert (~lp["scored"]).all() and lp["raw"].str.contains("nan").all()


def _study(tmp_path, monkeypatch, **over):
    from runner.pipeline import Study
    monkeypatch.delenv("VALIND_DATA_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = _spec_dict(tmp_path)
    for section, values in over.items():
        d[section] = {**d.get(section, {}), **values}
    text = yaml.safe_dump(d, sort_keys=False)
    return Study(parse_spec(yaml.safe_load(text)), text, base_dir=tmp_path)


def test_annotation_judge_garbage_is_scored_false():
    from evaluation.judges.values import judge_values

    class Pool:
        def generate(self, requests, desc=""):
            return ["!!!", "none", "humor, fairness", ""][: len(requests)]

        def score(self, requests, desc=""):
            return [float("nan")] * len(requests)

    pairs = [([{"role": "user", "content": "hi"}], "resp")] * 4
    out = judge_values(Pool(), pairs, mode="extract", desc="judge")
    assert list(out["scored"]) == [False, True, True, False]
    assert list(out["raw"]) == ["!!!", "none", "humor, fairness", ""] and out["values"][0] == []
    out = judge_values(Pool(), pairs, mode="logprob", desc="judge")
    assert not out["scored"].any() and all(v == [] for v in out["values"])


def test_check_adapter(tmp_path):
    from runner.engines.base import AdapterError, check_adapter
    with pytest.raises(AdapterError, match="not found"):
        check_adapter(tmp_path / "nope")
    d = tmp_path / "adapter"
    d.mkdir()
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*adapter_model\.safetensors"):
        check_adapter(d)
    (d / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match=str(d)):
        check_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(b"x")
    assert check_adapter(d) == d


def _fake_trained(study, bad: set[str] = frozenset(), plant: str | None = None) -> list:
    """Mark annotate/curate done and publish every training cell, as a finished run would."""
    from runner.store import write_json
    study.store.mark_done("annotate", study.key("annotate"), {"pairs": 48, "unscored": 0})
    study.store.mark_done("curate", study.key("curate"), {"summary": "synthetic"})
    cells = [r for r in study.runs() if r.cell_key]
    for r in cells:
        unit = study.store.unit("train", r.cell_key)
        (unit / "model").mkdir(parents=True)
        if r.run_id not in bad:
            (unit / "model" / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
            (unit / "model" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
        (unit / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.7 - s / 10}) + "\n"
                                                    for s in (1, 2)))
        write_json({"cell_id": r.run_id, "key": r.cell_key, "note": plant or "",
                    "train": study.spec.train.model_dump(mode="json"), "bf16": False}, unit / "cell.json")
        study.store.mark_done("train", r.cell_key, {"run_id": r.run_id})
    return cells


def test_generate_refuses_an_incomplete_adapter_before_any_engine(tmp_path, monkeypatch):
    from runner.pipeline import StageError
    study = _study(tmp_path, monkeypatch, tracking={"uri": f"sqlite:///{tmp_path / 'm.db'}"})
    _fake_trained(study, bad={"tiny__value-fairness__s0"})

    def no_engine(*a, **k):
        raise AssertionError("an engine was started")
    monkeypatch.setattr("runner.pools.Pools.get", no_engine)
    monkeypatch.setattr("runner.stages.generate.load_items", no_engine)
    with pytest.raises(StageError) as e:
        study.need("generate")
    bad = next(r for r in study.runs() if r.run_id == "tiny__value-fairness__s0")
    assert str(study.store.unit("train", bad.cell_key) / "model") in str(e.value) and "adapter_config.json" in str(e.value)
    failed = [r for r in study.status() if r["state"] == "failed"]  # `valind status` shows the failed unit
    assert [(r["stage"], r["unit"]) for r in failed] == [("generate", bad.run_id)]


def test_unit_without_done_marker_is_recomputed(tmp_path, monkeypatch):
    from runner.stages.train import adopt
    from runner.store import Store, write_parquet
    store = Store(tmp_path)
    unit = store.unit("generate", "k")
    write_parquet(pd.DataFrame({"a": [1]}), unit / "generations.parquet")  # output, but no _DONE.json
    assert not store.done("generate", "k")
    # a training cell's dir without its atomically-published cell.json is not adopted either
    study = _study(tmp_path, monkeypatch)
    study.store.mark_done("annotate", study.key("annotate"))
    study.store.mark_done("curate", study.key("curate"))
    r = next(r for r in study.runs() if r.cell_key)
    (study.store.unit("train", r.cell_key) / "model").mkdir(parents=True)
    adopt(study.ctx, r)
    assert not study.store.done("train", r.cell_key)
    # nor one whose cell.json was written for another key (other settings' leftovers)
    (study.store.unit("train", r.cell_key) / "cell.json").write_text('{"key": "another"}')
    adopt(study.ctx, r)
    assert not study.store.done("train", r.cell_key)
    (study.store.unit("train", r.cell_key) / "cell.json").write_text(json.dumps({"key": r.cell_key}))
    adopt(study.ctx, r)
    assert study.store.done("train", r.cell_key)


def test_failed_writes_leave_no_final_file(tmp_path):
    from runner.store import atomic_dir, write_parquet

    class Boom:
        def to_parquet(self, path, index=False):
            Path(path).write_bytes(b"PAR1 half")
            raise OSError("disk full")
    target = tmp_path / "out" / "x.parquet"
    with pytest.raises(OSError):
        write_parquet(Boom(), target)
    assert not target.exists() and not list(target.parent.iterdir())
    final = tmp_path / "unit"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "model").mkdir()
            raise KeyboardInterrupt
    assert not final.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".unit")]


# ============================================================ 4. MLflow unreachable, retries, re-logging

def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_mlflow_fails_fast_before_compute(tmp_path, capsys, monkeypatch):
    from runner.cli import main
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{_closed_port()}"
    d = _spec_dict(tmp_path)
    d["tracking"] = {"uri": uri}
    path = _write_spec(tmp_path, d)
    t0 = time.perf_counter()
    rc = main(["run", str(path)])
    dt = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 1 and uri in err and "not usable" in err and "Traceback" not in err
    assert dt < 30, dt
    assert not (tmp_path / "studies" / "smoke" / "stages").exists()  # nothing was computed
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the probe's settings are restored


def test_retry_backs_off_then_succeeds(monkeypatch):
    from runner import tracking
    sleeps = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise ConnectionError("transient")
        return x * 2
    assert tracking._retry(flaky, 21) == 42 and len(calls) == 3 and sleeps == [0.5, 1.0]

    def down():
        raise ConnectionError("down")
    sleeps.clear()
    with pytest.raises(ConnectionError):
        tracking._retry(down)
    assert sleeps == [0.5, 1.0, 2.0]


def test_results_relog_to_a_new_tracking_uri(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    uri_a, uri_b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"

    def history(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("smoke")
        runs = client.search_runs([exp.experiment_id])
        cells = [r for r in runs if r.data.tags.get("valind.kind") not in ("study", "base")]
        return ({r.data.tags["valind.run_id"]: len(client.get_metric_history(r.info.run_id, "train/loss"))
                 for r in cells}, len(runs), {r.info.run_id: [a.path for a in client.list_artifacts(r.info.run_id)]
                                               for r in cells})

    study = _study(tmp_path, monkeypatch, tracking={"uri": uri_a})
    _fake_trained(study)
    study.run(until="train")
    first = history(uri_a)
    n_cells = len(study.spec.conditions())  # 2 values + positive + 2 controls, one seed
    assert len(first[0]) == n_cells == 5 and set(first[0].values()) == {2} and first[1] == n_cells + 1  # + parent
    # the same URI again: nothing doubled, no new runs
    _study(tmp_path, monkeypatch, tracking={"uri": uri_a}).run(until="train")
    assert history(uri_a)[:2] == first[:2]
    # a new server gets everything logged again, from the store, without compute
    _study(tmp_path, monkeypatch, tracking={"uri": uri_b}).run(until="train")
    second = history(uri_b)
    assert second[:2] == first[:2]
    assert all("model" in arts and "cell.json" in arts for arts in second[2].values())


# ============================================================ 5. nothing escapes the study dir

@pytest.mark.parametrize("evil", ["../../x", "..", "../x", "/etc", "a/b", ".hidden", "x" * 65, "a\\b", "", "-a"])
def test_study_and_model_names_cannot_traverse(tmp_path, evil):
    d = _spec_dict(tmp_path)
    d["study"]["name"] = evil
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert "study.name" in e.value.render()
    d = _spec_dict(tmp_path)
    d["models"][0]["name"] = evil
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert "models[0].name" in e.value.render()


@pytest.mark.parametrize("evil", ["../../x", "..", "/abs/path", "a/../../b", "control-../../x", "....//", "\x00x"])
def test_store_keeps_everything_under_the_root(tmp_path, evil):
    from runner.store import Store, StoreError, safe_name
    root = tmp_path / "study"
    store = Store(root)
    try:
        name = safe_name(evil)
    except StoreError:
        return
    assert "/" not in name and name not in ("", ".", "..")
    for unit in (store.unit(evil, "k"), store.unit("train", evil), store.unit(evil, evil)):
        assert root.resolve() in unit.resolve().parents


def test_output_dir_is_the_study_name_under_output_dir(tmp_path):
    d = _spec_dict(tmp_path)
    spec = parse_spec(d)
    assert spec.output_dir() == (tmp_path / "studies" / "smoke").resolve()
    d["study"]["output_dir"] = "rel/out"
    assert parse_spec(d).output_dir(tmp_path) == (tmp_path / "rel" / "out" / "smoke").resolve()
    # every condition and run id is a single safe path component
    from runner.pipeline import Study
    from runner.store import safe_name
    study = Study(parse_spec(d), "", base_dir=tmp_path)
    for r in study.runs():
        assert safe_name(r.run_id) == r.run_id and safe_name(r.condition) == r.condition
    assert study.root.parent == (tmp_path / "rel" / "out").resolve()


# ============================================================ 6. secrets and safe defaults

TOKEN = "hf_planted_abcdef123456"


def test_redact():
    from runner.secrets import redact, secret_values
    env = {"HF_TOKEN": TOKEN, "MY_SERVICE_PASSWORD": "hunter2hunter2", "SHORT_KEY": "abc", "PATH": "/usr/bin:/bin",
           "AWS_SECRET_ACCESS_KEY": "AKIAsecretsecret", "SOME_SECRET": "s3cr3t-value"}
    assert set(secret_values(env)) == {TOKEN, "hunter2hunter2", "AKIAsecretsecret", "s3cr3t-value"}
    text = f"token {TOKEN} pw hunter2hunter2 abc /usr/bin s3cr3t-value"
    assert redact(text, env) == "token *** pw *** abc /usr/bin ***"
    assert redact(None, env) is None and redact("", env) == ""


def test_planted_token_never_reaches_mlflow_artifacts_or_logs(tmp_path, monkeypatch, capsys):
    from runner.progress import say
    from runner.tracking import Tracker
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("VALIND_TEST_API_KEY", "another-secret-value-42")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = _study(tmp_path, monkeypatch, tracking={"uri": uri},
                   study={"description": f"leaked {TOKEN} and another-secret-value-42"},
                   train={"system_prompt": f"Be brief. {TOKEN}"})  # lands in a param
    assert TOKEN in study.spec_text
    _fake_trained(study, plant=TOKEN)  # cell.json (a text artifact) carries the token too
    study.run(until="train")
    tr = study.ctx.tracker
    parent = tr.parent()
    tr.set_tags(parent, {"note": f"tag {TOKEN}"})
    tr.log_params(parent, {"description": study.spec.study.description})
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text(f"<pre>{study.spec_text}</pre>")
    (report / "spec.yaml").write_text(study.spec_text)
    tr.log_artifacts(parent, report, "report")
    tr.log_artifacts(parent, report / "spec.yaml")
    say(f"a log line with {TOKEN}")
    out = capsys.readouterr()
    assert TOKEN in (report / "spec.yaml").read_text()  # the source files are left alone

    def files():
        yield tmp_path / "mlflow.db"
        yield from (p for p in (study.root / "mlartifacts").rglob("*") if p.is_file())
        yield study.root / "spec.yaml"
        yield from (p for p in (study.root / "tracking").rglob("*") if p.is_file())
    checked = list(files())
    assert len(checked) > 5 and any(p.name == "report.html" for p in checked)
    for p in checked:
        blob = p.read_bytes()
        assert TOKEN.encode() not in blob and b"another-secret-value-42" not in blob, p
    assert TOKEN not in out.out + out.err and "***" in out.out
    client = Tracker(uri, "smoke", "smoke", study.root).client
    run = client.get_run(parent)
    assert run.data.tags["note"] == "tag ***" and "***" in run.data.params["description"]
    cell = next(r for r in client.search_runs([tr.experiment_id]) if r.data.tags["valind.kind"] == "value")
    assert cell.data.params["train.system_prompt"] == "Be brief. ***"


def test_cli_error_messages_are_redacted(tmp_path, capsys, monkeypatch):
    from runner.cli import main
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    d = _spec_dict(tmp_path)
    d["tracking"] = {"uri": f"http://user:{TOKEN}@127.0.0.1:{_closed_port()}"}
    rc = main(["run", str(_write_spec(tmp_path, d))])
    err = capsys.readouterr().err
    assert rc == 1 and "not usable" in err and TOKEN not in err


def test_trust_remote_code_is_off_by_default():
    from runner.engines.base import EngineConfig
    from runner.spec import ModelSpec
    assert ModelSpec(name="m", path="p").trust_remote_code is False
    assert EngineConfig(model="p").trust_remote_code is False
    spec = parse_spec(json.loads(json.dumps(SMOKE)))
    assert all(m.trust_remote_code is False for m in spec.models)
    assert spec.model("some/hub-id").trust_remote_code is False


def test_local_ray_has_no_dashboard(monkeypatch):
    import ray

    from runner import cluster
    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # init_ray exports the worker env
    cluster.init_ray()
    assert seen["include_dashboard"] is False
    assert seen.get("dashboard_host", "127.0.0.1") == "127.0.0.1"


def test_printed_mlflow_ui_command_binds_localhost(tmp_path, capsys, monkeypatch):
    from runner import cli
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = _study(tmp_path, monkeypatch)
    cli._print_where(study, study.root / "report.html")
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "--host 127.0.0.1" in out
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "mlflow ui --" in line]
    assert commands and all("--host 127.0.0.1" in line for line in commands)


def test_a_qa_failure_keeps_the_judged_runs(tmp_path, monkeypatch):
    """Judges run before QA; a QA failure marks the units failed, and the rerun judges nothing again."""
    from runner.stages import score
    from runner.stages.generate import GENERATE, ITEMS
    from runner.stages.qa import QA, qa_path
    from runner.store import write_parquet

    study = _study(tmp_path, monkeypatch, tracking={"uri": f"sqlite:///{tmp_path / 'm.db'}"},
                   score={"benchmarks": ["openbookqa"], "suites": {"safety": {"judges": ["strmatch"]}}})
    _fake_trained(study)
    items = ITEMS(study.ctx)
    write_parquet(pd.DataFrame({"suite": ["toy"], "item_id": ["i0"]}), study.store.unit("items", items) / "items.parquet")
    study.store.mark_done("items", items)
    for r in study.runs():
        key = GENERATE(study.ctx, r)
        write_parquet(pd.DataFrame({"run_id": [r.run_id], "suite": ["toy"], "item_id": ["i0"], "response": ["hi"]}),
                      study.store.unit("generate", key) / "generations.parquet")
        study.store.mark_done("generate", key, {"run_id": r.run_id, "items": 1})
    judged = []

    def judge(name, items, g, engine, st):
        judged.extend(g["run_id"])
        return pd.DataFrame({"run_id": g["run_id"], "suite": name, "item_id": g["item_id"], "metric": "m",
                             "value": 1.0, "scored": True, "judge": "fake", "raw": ""})

    monkeypatch.setattr(score, "load_items", lambda ctx: pd.DataFrame({"suite": ["toy"], "item_id": ["i0"]}))
    monkeypatch.setattr(score, "eval_suites", lambda spec: ["toy"])
    monkeypatch.setattr(score, "judge_engines", lambda ctx: {})
    monkeypatch.setattr(score, "score_suite", judge)
    monkeypatch.setattr(score, "agreement", lambda ctx: None)

    def qa_down(ctx, runs):
        raise RuntimeError("lm-eval is down")
    monkeypatch.setattr(score, "run_qa", qa_down)
    with pytest.raises(RuntimeError, match="lm-eval is down"):
        study.need("score")
    runs = study.runs()
    assert sorted(judged) == sorted(r.run_id for r in runs)
    assert {(s["stage"], s["state"]) for s in study.status() if s["stage"] == "score"} == {("score", "failed")}

    judged.clear()
    qa = lambda r: pd.DataFrame({"run_id": [r.run_id], "suite": ["qa"], "item_id": ["obqa/0"], "metric": ["acc"],  # noqa: E731
                                 "value": [0.0], "scored": [True], "judge": ["lm-eval"], "raw": [""]})

    def qa_saved(ctx, todo):  # each run's QA unit, as runner.stages.qa saves it
        for r in todo:
            write_parquet(qa(r), qa_path(ctx, r))
            ctx.store.mark_done("qa", QA(ctx, r), {"run_id": r.run_id})
        return {}
    monkeypatch.setattr(score, "run_qa", qa_saved)
    out = _study(tmp_path, monkeypatch, tracking={"uri": f"sqlite:///{tmp_path / 'm.db'}"},
                 score={"benchmarks": ["openbookqa"], "suites": {"safety": {"judges": ["strmatch"]}}}).need("score").scores
    assert judged == []  # every run's judge scores were kept
    for r in runs:
        df = pd.read_parquet(out[r.run_id])
        assert list(df["suite"]) == ["toy", "qa"] and list(df["run_id"]) == [r.run_id] * 2
