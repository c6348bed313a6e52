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
                     "over_length": 1, "malformed": 2, "duplicate_id": 0, "tied": 0}
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
    monkeypatch.setattr(sources, "hub_rows", offline)
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
    monkeypatch.setattr(sources, "hub_rows", fake)
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


def pku(prompt: str, r0: str, r1: str, safe: tuple[bool, bool], better: int, safer: int) -> dict:
    """A PKU-SafeRLHF row with the dataset's full schema."""
    harm = {"Violence": False, "Privacy Violation": False, "Cybercrime": False}
    return {"prompt": prompt, "response_0": r0, "response_1": r1, "prompt_source": "Alpaca3-70B",
            "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
            "is_response_0_safe": safe[0], "is_response_1_safe": safe[1],
            "response_0_harm_category": {**harm, "Cybercrime": not safe[0]},
            "response_1_harm_category": {**harm, "Cybercrime": not safe[1]},
            "response_0_severity_level": 0 if safe[0] else 2, "response_1_severity_level": 0 if safe[1] else 2,
            "better_response_id": better, "safer_response_id": safer,
            "response_0_sha256": "0" * 64, "response_1_sha256": "1" * 64}


def test_pku_better_and_safer(tmp_path: Path):
    rows = [pku("How to hack X?", "I can't help with that.", "Step 1: ...", (True, False), better=1, safer=0),
            pku("P", "a", "b", (True, False), better=7, safer=0),                      # malformed better id
            pku("Q", "safe a", "safe b", (True, True), better=0, safer=1),             # both safe: safer still labels
            pku("R", "bad a", "worse b", (False, False), better=0, safer=0)]           # both unsafe, agree
    write_jsonl(tmp_path / "preference" / "pku_saferlhf-train.jsonl", rows)
    better, d = load_pairs(SourceSpec(name="pku_saferlhf", split="train"), tmp_path, 4000)
    safer, ds = load_pairs(SourceSpec(name="pku_saferlhf", split="train", subset="safer"), tmp_path, 4000)
    sides = lambda df: list(zip(df["chosen"], df["rejected"]))  # noqa: E731
    # where helpfulness and safety disagree, the two subsets pick opposite sides of the same row
    assert sides(better)[0] == ("Step 1: ...", "I can't help with that.")
    assert sides(safer)[0] == ("I can't help with that.", "Step 1: ...")
    assert sides(better)[1:] == [("safe a", "safe b"), ("bad a", "worse b")] and d["malformed"] == 1
    assert sides(safer)[1:] == [("a", "b"), ("safe b", "safe a"), ("bad a", "worse b")] and sum(ds.values()) == 0
    assert better.iloc[0]["prompt"] == msgs(("user", "How to hack X?"))
    assert better["pair_id"].tolist() == ["pku_saferlhf/better/train/000000", "pku_saferlhf/better/train/000002",
                                          "pku_saferlhf/better/train/000003"]
    assert safer.iloc[0]["pair_id"] == "pku_saferlhf/safer/train/000000"
    with pytest.raises(DataError, match="'better' or 'safer'"):
        load_pairs(SourceSpec(name="pku_saferlhf", subset="kind"), tmp_path, 4000)


def hs2(prompt: str, response: str, helpfulness: int | None, correctness: int, coherence: int = 4) -> dict:
    """A HelpSteer 2 row (one rated response) with the dataset's schema."""
    return {"prompt": prompt, "response": response, "helpfulness": helpfulness, "correctness": correctness,
            "coherence": coherence, "complexity": 2, "verbosity": 1}


HS2_MULTI = "Hi!\n<extra_id_1>Assistant\nHello, how can I help?\n<extra_id_1>User\nTell me a joke."
HS2_ROWS = [
    hs2("c#", "C# is a language by Microsoft.", 3, 4), hs2("c#", "C# is a note.", 1, 2),   # 0: higher helpfulness
    hs2("Sum 2+2", "5", 2, 0), hs2("Sum 2+2", "4", 2, 4),                                   # 2: correctness breaks tie
    hs2("Name a colour", "Red.", 3, 4, 4), hs2("Name a colour", "Blue.", 3, 4, 2),          # 4: tied (coherence unused)
    hs2(HS2_MULTI, "Why did the chicken cross the road?", 2, 3), hs2(HS2_MULTI, "No.", 0, 3),  # 6: multi-turn
    hs2("Lonely prompt", "Only one response.", 4, 4),                                       # 8: unpaired -> malformed
    hs2("Q?", "Yes.", None, 4), hs2("Q?", "No.", 2, 4),                                     # 9: missing_field
    hs2("Q\n<extra_id_1>Assistant\nA", "x", 4, 4), hs2("Q\n<extra_id_1>Assistant\nA", "y", 1, 4),  # 11: malformed
    hs2("Last", "Good.", 4, 4), hs2("Last", "Bad.", 0, 0),                                  # 13
    hs2("Scale?", "a", 5, 4), hs2("Scale?", "b", 1, 1),                                     # 15: score > 4, malformed
]


def test_helpsteer2_pairs_from_attribute_scores(tmp_path: Path):
    write_jsonl(tmp_path / "preference" / "helpsteer2-train.jsonl.gz", HS2_ROWS)
    df, drops = load_pairs(SourceSpec(name="helpsteer2", split="train"), tmp_path, 4000)
    assert df["pair_id"].tolist() == [f"helpsteer2/train/{i:06d}" for i in (0, 2, 6, 13)]  # first row of each pair
    assert list(zip(df["chosen"], df["rejected"])) == [
        ("C# is a language by Microsoft.", "C# is a note."), ("4", "5"),
        ("Why did the chicken cross the road?", "No."), ("Good.", "Bad.")]
    assert drops == {"missing_field": 1, "empty_response": 0, "no_final_assistant_turn": 0, "identical": 0,
                     "over_length": 0, "malformed": 3, "duplicate_id": 0, "tied": 1}
    assert df.iloc[0]["prompt"] == msgs(("user", "c#")) and df.iloc[0]["source"] == "helpsteer2"
    assert df.iloc[2]["prompt"] == msgs(("user", "Hi!"), ("assistant", "Hello, how can I help?"),
                                        ("user", "Tell me a joke.")) and df.iloc[2]["n_turns"] == 2


def test_helpsteer2_pair_ids_are_stable(tmp_path: Path):
    write_jsonl(tmp_path / "a" / "preference" / "helpsteer2-train.jsonl", HS2_ROWS)
    write_parquet(tmp_path / "b" / "preference" / "helpsteer2-train.parquet", HS2_ROWS)
    spec = SourceSpec(name="helpsteer2", split="train")
    first, drops = load_pairs(spec, tmp_path / "a", 4000)
    again, _ = load_pairs(spec, tmp_path / "a", 4000)
    parquet, parquet_drops = load_pairs(spec, tmp_path / "b", 4000)  # pandas stores the scores as floats here
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(first, parquet)
    assert drops == parquet_drops
    head, _ = load_pairs(spec.model_copy(update={"max_pairs": 2}), tmp_path / "a", 4000)
    assert head["pair_id"].tolist() == first["pair_id"].tolist()[:2]


def test_helpsteer2_split_alias_hub_and_size(monkeypatch, tmp_path: Path):
    calls = []

    def fake(hub_id, split, **kw):
        calls.append((hub_id, split, kw))
        return HS2_ROWS[:4]
    monkeypatch.setattr(sources, "hub_rows", fake)
    df, _ = load_pairs(SourceSpec(name="helpsteer2"), tmp_path, 4000)  # spec default "test" -> validation
    assert calls == [("nvidia/HelpSteer2", "validation", {})]
    assert df["pair_id"].tolist() == ["helpsteer2/validation/000000", "helpsteer2/validation/000002"]
    with pytest.raises(DataError, match=r"unknown split 'dev'.*\['train', 'validation'\]"):
        load_pairs(SourceSpec(name="helpsteer2", split="dev"), tmp_path, 4000)
    entry = sources.get_source("helpsteer2")  # plan sizes by pairs: one per prompt (two responses)
    assert entry.n_rows(SourceSpec(name="helpsteer2")) == 1038 // 2
    assert entry.n_rows(SourceSpec(name="helpsteer2", split="train")) == 20_324 // 2


@pytest.mark.parametrize("prompt, roles", [
    ("Plain <extra_id_1> text mentioning User", None),             # an unknown marker shape: malformed
    ("A\n<extra_id_1>Assistant\nB\n<extra_id_1>User\nC\n<extra_id_1>Assistant\nD\n<extra_id_1>User\nE",
     ["user", "assistant", "user", "assistant", "user"]),
    ("<extra_id_0>System\nBe terse.\n<extra_id_1>User\nQ", None),   # system marker: not in HelpSteer 2
    ("Q\n<extra_id_1>User\nQ again", None),                        # two user turns in a row
    ("Q\n<extra_id_1>Assistant\n\n<extra_id_1>User\nQ2", None),     # empty assistant turn
])
def test_split_helpsteer2(prompt: str, roles: list[str] | None):
    if roles is None:
        with pytest.raises(sources._Drop) as e:
            sources.split_helpsteer2(prompt)
        assert e.value.reason == "malformed"
    else:
        out = sources.split_helpsteer2(prompt)
        assert [m["role"] for m in out] == roles and [m["content"] for m in out] == list("ABCDE")


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
    sources.SOURCES.remove("toy")


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
    assert e.value.problems == [("data.sources[0].name", "unknown source 'foo'; known: helpsteer2, hh_rlhf, "
                                 "local, pku_saferlhf, tulu3_preference, ultrafeedback")]


def test_unreachable_hub_fails_in_seconds_naming_the_settings(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"VALIND_DATA_DIR is not set.*hub is unreachable.*HF_HUB_OFFLINE=1"):
        load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", split="test"), None, 4000)
    assert time.perf_counter() - t0 < 10  # not datasets' five retries
