"""Preference loaders on small same-schema fixtures written into tmp_path, plus the real HH file."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from runner.data import sources
from runner.data.sources import DataError, load_pairs, split_hh
from runner.spec import SourceSpec

REAL_DATA = Path(os.environ.get("VALIND_DATA_DIR", "/work/shared/data"))


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{'Human' if r == 'H' else 'Assistant'}: {t}" for r, t in turns)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


CONVO = [("H", "Hi, I feel sad."), ("A", "I'm sorry to hear that."), ("H", "What should I do?")]
HH_ROWS = [
    {"chosen": hh(*CONVO, ("A", "Talk to a friend.")), "rejected": hh(*CONVO, ("A", "Whatever."))},  # ok 3 turns
    {"chosen": hh(("H", "Q?"), ("A", "Yes.")), "rejected": hh(("H", "Q?"), ("A", "No."))},         # ok 1 turn
    {"chosen": hh(("H", "Q?"), ("A", "")), "rejected": hh(("H", "Q?"), ("A", "No."))},             # empty_response
    {"chosen": hh(("H", "Q?"), ("A", "Same.")), "rejected": hh(("H", "Q?"), ("A", "Same."))},      # identical
    {"chosen": hh(("H", "Q1?"), ("A", "A.")), "rejected": hh(("H", "Q2?"), ("A", "B."))},          # malformed: prompts differ
    {"chosen": hh(("H", "Q?"), ("A", "Yes."))},                                                    # missing_field
    {"chosen": hh(("H", "Q?"), ("A", "x" * 500)), "rejected": hh(("H", "Q?"), ("A", "y"))},        # over_length
    {"chosen": hh(("H", "Q?"), ("A", "a"), ("H", "more")), "rejected": hh(("H", "Q?"), ("A", "a"), ("H", "more"))},  # no_final
    {"chosen": "preamble" + hh(("H", "Q?"), ("A", "a")), "rejected": hh(("H", "Q?"), ("A", "b"))},  # malformed
    # consecutive assistant turns merge into one message
    {"chosen": hh(("H", "Q?"), ("A", "part 1"), ("A", "part 2"), ("H", "ok?"), ("A", "yes")),
     "rejected": hh(("H", "Q?"), ("A", "part 1"), ("A", "part 2"), ("H", "ok?"), ("A", "no"))},
]


@pytest.fixture
def hh_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz", HH_ROWS)
    return tmp_path


def test_hh_loads_splits_and_counts_drops(hh_dir: Path):
    df, drops = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base"), hh_dir, max_chars=300)
    assert list(df.columns) == ["pair_id", "source", "prompt", "chosen", "rejected", "n_turns"]
    assert df["pair_id"].tolist() == ["hh_rlhf/harmless-base/test/000000", "hh_rlhf/harmless-base/test/000001",
                                      "hh_rlhf/harmless-base/test/000009"]
    assert drops == {"missing_field": 1, "empty_response": 1, "no_final_assistant_turn": 1, "identical": 1,
                     "over_length": 1, "malformed": 2, "duplicate_id": 0}
    first = df.iloc[0]
    assert first["prompt"] == [{"role": "user", "content": "Hi, I feel sad."},
                               {"role": "assistant", "content": "I'm sorry to hear that."},
                               {"role": "user", "content": "What should I do?"}]
    assert (first["chosen"], first["rejected"], first["n_turns"]) == ("Talk to a friend.", "Whatever.", 2)
    assert df.iloc[1]["n_turns"] == 1 and df.iloc[0]["source"] == "hh_rlhf/harmless-base"
    merged = df.iloc[2]["prompt"]
    assert [m["role"] for m in merged] == ["user", "assistant", "user"]
    assert merged[1]["content"] == "part 1\n\npart 2"


def test_hh_prompt_alternates_and_ends_with_user():
    prompt, response = split_hh(hh(("H", "a"), ("A", "b"), ("H", "c"), ("A", "d"), ("H", "e"), ("A", "final")))
    roles = [m["role"] for m in prompt]
    assert roles == ["user", "assistant"] * 2 + ["user"] and response == "final"
    assert all(r1 != r2 for r1, r2 in zip(roles, roles[1:]))


def test_max_pairs_keeps_first_valid(hh_dir: Path):
    df, drops = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", max_pairs=2), hh_dir, 300)
    assert df["pair_id"].str[-2:].tolist() == ["00", "01"] and sum(drops.values()) == 0


def test_truncated_gzip_names_file(tmp_path: Path):
    path = write_jsonl(tmp_path / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz", HH_ROWS * 20)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=str(path)):
        load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base"), tmp_path, 4000)


def test_invalid_json_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{not json\n')
    with pytest.raises(DataError, match=rf"{path}: line 2"):
        load_pairs(SourceSpec(name="local", path=str(path)), None, 4000)


def test_hh_subset_errors(hh_dir: Path):
    with pytest.raises(DataError, match="red-team-attempts.*not preference"):
        load_pairs(SourceSpec(name="hh_rlhf", subset="red-team-attempts"), hh_dir, 4000)
    with pytest.raises(DataError, match="subset must be one of"):
        load_pairs(SourceSpec(name="hh_rlhf"), hh_dir, 4000)
    with pytest.raises(DataError, match="unknown split"):
        load_pairs(SourceSpec(name="tulu3_preference", split="test"), hh_dir, 4000)


def test_hub_missing_everywhere_is_clear(tmp_path: Path, monkeypatch):
    def offline(hub_id, split, **kw):
        raise ConnectionError("offline")
    monkeypatch.setattr(sources, "_hub_rows", offline)
    with pytest.raises(DataError) as e:
        load_pairs(SourceSpec(name="ultrafeedback"), tmp_path, 4000)
    msg = str(e.value)
    assert "ultrafeedback" in msg and "HuggingFaceH4/ultrafeedback_binarized" in msg
    assert str(tmp_path / "preference" / "ultrafeedback-test_prefs.jsonl.gz") in msg and "offline" in msg


def test_hub_fallback_passes_split_and_subset(monkeypatch):
    calls = []

    def fake(hub_id, split, **kw):
        calls.append((hub_id, split, kw))
        return HH_ROWS[:2]
    monkeypatch.setattr(sources, "_hub_rows", fake)
    df, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="helpful-base", split="train"), None, 4000)
    assert calls == [("Anthropic/hh-rlhf", "train", {"data_dir": "helpful-base"})]
    assert df["pair_id"].iloc[0] == "hh_rlhf/helpful-base/train/000000"


def msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def test_ultrafeedback_from_data_dir(tmp_path: Path):
    rows = [
        {"prompt": "Why?", "prompt_id": "x", "chosen": msgs(("user", "Why?"), ("assistant", "Because.")),
         "rejected": msgs(("user", "Why?"), ("assistant", "Dunno.")), "score_chosen": 8.0, "score_rejected": 3.0},
        {"prompt": "Q", "chosen": msgs(("user", "Q"), ("assistant", "A")),
         "rejected": msgs(("user", "Other"), ("assistant", "B"))},                      # malformed
        {"prompt": "Q", "chosen": msgs(("user", "Q")), "rejected": msgs(("user", "Q"), ("assistant", "B"))},  # no final
        {"prompt": "Q", "rejected": msgs(("user", "Q"), ("assistant", "B"))},           # missing
    ]
    write_parquet(tmp_path / "preference" / "ultrafeedback-test_prefs.parquet", rows)
    df, drops = load_pairs(SourceSpec(name="ultrafeedback", split="test"), tmp_path, 4000)
    assert len(df) == 1 and df.iloc[0]["prompt"] == msgs(("user", "Why?"))
    assert (df.iloc[0]["chosen"], df.iloc[0]["rejected"]) == ("Because.", "Dunno.")
    assert df.iloc[0]["pair_id"] == "ultrafeedback/test_prefs/000000" and df.iloc[0]["source"] == "ultrafeedback"
    assert (drops["malformed"], drops["no_final_assistant_turn"], drops["missing_field"]) == (1, 1, 1)


def test_pku_better_and_safer(tmp_path: Path):
    rows = [{"prompt": "How to X?", "response_0": "r0", "response_1": "r1",
             "better_response_id": 1, "safer_response_id": 0},
            {"prompt": "P", "response_0": "a", "response_1": "b", "better_response_id": 7, "safer_response_id": 0}]
    write_jsonl(tmp_path / "preference" / "pku_saferlhf-train.jsonl", rows)
    better, d = load_pairs(SourceSpec(name="pku_saferlhf", split="train"), tmp_path, 4000)
    safer, _ = load_pairs(SourceSpec(name="pku_saferlhf", split="train", subset="safer"), tmp_path, 4000)
    assert (better.iloc[0]["chosen"], better.iloc[0]["rejected"]) == ("r1", "r0") and d["malformed"] == 1
    assert (safer.iloc[0]["chosen"], safer.iloc[0]["rejected"]) == ("r0", "r1") and len(safer) == 2
    assert better.iloc[0]["prompt"] == msgs(("user", "How to X?"))
    assert better.iloc[0]["pair_id"] != safer.iloc[0]["pair_id"]
    with pytest.raises(DataError, match="'better' or 'safer'"):
        load_pairs(SourceSpec(name="pku_saferlhf", subset="kind"), tmp_path, 4000)


def test_tulu_multi_turn_with_system(tmp_path: Path):
    base = [("system", "Be nice."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Joke?")]
    rows = [{"id": "t1", "source": "x", "chosen": msgs(*base, ("assistant", "Knock knock.")),
             "rejected": msgs(*base, ("assistant", "No."))}]
    write_jsonl(tmp_path / "preference" / "tulu3_preference-train.jsonl.gz", rows)
    df, _ = load_pairs(SourceSpec(name="tulu3_preference", split="train"), tmp_path, 4000)
    assert df.iloc[0]["prompt"] == msgs(*base) and df.iloc[0]["n_turns"] == 2
    assert df.iloc[0]["chosen"] == "Knock knock."


def test_local_column_mapping_jsonl(tmp_path: Path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"id": "a", "q": "Plain prompt", "good": "yes", "bad": "no"},
        {"id": "b", "q": msgs(("user", "u1"), ("assistant", "a1"), ("user", "u2")), "good": "g", "bad": "b"},
        {"id": "c", "q": "p", "good": "same", "bad": "same"},
        {"id": "d", "q": "p", "good": "x"},
        {"id": "a", "q": "dup", "good": "1", "bad": "2"},
    ])
    spec = SourceSpec(name="local", path=str(path), columns={"prompt": "q", "chosen": "good", "rejected": "bad",
                                                             "pair_id": "id"})
    df, drops = load_pairs(spec, None, 4000)
    assert df["pair_id"].tolist() == ["a", "b"] and df["source"].iloc[0] == "local/mine"
    assert df.iloc[0]["prompt"] == msgs(("user", "Plain prompt"))
    assert df.iloc[1]["n_turns"] == 2
    assert (drops["identical"], drops["missing_field"], drops["duplicate_id"]) == (1, 1, 1)


def test_local_relative_to_data_dir_and_json(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.json").write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    df, _ = load_pairs(SourceSpec(name="local", path="sub/p.json"), tmp_path, 4000)
    assert df["pair_id"].tolist() == ["local/p/000000"]


def test_local_missing_mapped_column_names_file_and_column(tmp_path: Path):
    path = write_parquet(tmp_path / "pairs.parquet", [{"question": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=rf"{path}: column 'prompt'"):
        load_pairs(SourceSpec(name="local", path=str(path)), None, 4000)
    with pytest.raises(DataError, match="'pid'"):
        load_pairs(SourceSpec(name="local", path=str(path), columns={"prompt": "question", "pair_id": "pid"}),
                   None, 4000)
    df, _ = load_pairs(SourceSpec(name="local", path=str(path), columns={"prompt": "question"}), None, 4000)
    assert len(df) == 1


def test_unreadable_file_names_it(tmp_path: Path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=str(path)):
        load_pairs(SourceSpec(name="local", path=str(path)), None, 4000)
    with pytest.raises(DataError, match="not found"):
        load_pairs(SourceSpec(name="local", path=str(tmp_path / "nope.jsonl")), None, 4000)


@pytest.mark.skipif(not (REAL_DATA / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz").is_file(),
                    reason="shared data dir missing")
def test_real_hh_harmless_base_test(monkeypatch):
    monkeypatch.setenv("VALIND_DATA_DIR", str(REAL_DATA))
    data_dir = Path(os.environ["VALIND_DATA_DIR"])
    df, drops = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base"), data_dir, max_chars=4000)
    assert len(df) + sum(drops.values()) == 2312
    assert len(df) > 2250 and df["pair_id"].is_unique
    for prompt in df["prompt"]:
        roles = [m["role"] for m in prompt]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))
    assert (df["chosen"].str.strip() != "").all() and (df["chosen"] != df["rejected"]).all()


@pytest.fixture
def toy_source():
    """A source registered only for the test: rows {"q", "good", "bad"} in <data_dir>/preference/toy-<split>.jsonl."""
    def converter(spec: SourceSpec):
        def convert(row: dict) -> tuple:
            if any(row.get(k) is None for k in ("q", "good", "bad")):
                raise sources._Drop("missing_field")
            return [{"role": "user", "content": row["q"]}], row["good"], row["bad"], None
        return convert

    entry = sources.register(sources.Source(name="toy", hub_id=None, converter=converter,
                                            splits=("train", "test"), rows={"train": 70, "test": 7}))
    yield entry
    sources.SOURCES.pop("toy")


def test_a_registered_source_is_loadable_parsable_and_planned(toy_source, tmp_path: Path):
    from runner.plan import source_pairs
    from runner.spec import parse_spec

    write_jsonl(tmp_path / "preference" / "toy-test.jsonl", [{"q": "Q?", "good": "yes", "bad": "no"}, {"q": "Q?"}])
    df, drops = load_pairs(SourceSpec(name="toy"), tmp_path, 4000)
    assert df["pair_id"].tolist() == ["toy/test/000000"] and df["source"].iloc[0] == "toy"
    assert (df.iloc[0]["chosen"], df.iloc[0]["rejected"], drops["missing_field"]) == ("yes", "no", 1)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_pairs(SourceSpec(name="toy", split="dev"), tmp_path, 4000)

    spec = parse_spec({"study": {"name": "t"}, "models": [{"name": "m", "path": "org/Model-8B"}],
                       "values": {"induced": ["humor"]}, "annotate": {"judge_model": "org/Judge-8B"},
                       "data": {"sources": [{"name": "toy", "split": "train"}, {"name": "toy"}]}})
    assert [s.name for s in spec.data.sources] == ["toy", "toy"]
    assert source_pairs(spec) == 77


def test_unknown_source_name_lists_the_registry():
    from runner.spec import SpecError, parse_spec

    with pytest.raises(SpecError) as e:
        parse_spec({"study": {"name": "t"}, "models": [{"name": "m", "path": "org/Model-8B"}],
                    "values": {"induced": ["humor"]}, "annotate": {"judge_model": "org/Judge-8B"},
                    "data": {"sources": [{"name": "foo"}]}})
    assert e.value.problems == [("data.sources[0].name", "unknown source 'foo'; known: hh_rlhf, local, "
                                 "pku_saferlhf, tulu3_preference, ultrafeedback")]


def test_unreachable_hub_fails_in_seconds_naming_the_settings(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"VALIND_DATA_DIR is not set.*hub is unreachable.*HF_HUB_OFFLINE=1"):
        load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", split="test"), None, 4000)
    assert time.perf_counter() - t0 < 10  # not datasets' five retries
