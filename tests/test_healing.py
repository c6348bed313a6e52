"""Units that heal: a stage that cannot read an earlier stage's file gets that unit recomputed, a
stage whose outputs do not fit the disk is refused before it starts, and `valind status` reads a
corrupt store without a traceback. (Verification itself: tests/test_store.py; on a real study:
tests/test_e2e.py's truncated generations.)"""
from __future__ import annotations

import json
import types

import pandas as pd
import pytest

from runner.stages import STAGES
from runner.store import StoreError, read_parquet, write_parquet
from test_reliability import _fake_trained, _study, _write_spec, _spec_dict


def _fake_generate(writes: list[bytes | None]):
    """A generate stage writing generations.parquet (or, for bytes, that content) once per call
    that finds its unit missing."""
    calls = []

    def run(ctx):
        calls.append("generate")
        unit = ctx.store.unit("generate", "g1")
        if not ctx.store.done("generate", "g1"):
            content = writes.pop(0)
            if content is None:
                write_parquet(pd.DataFrame({"response": ["hi"]}), unit / "generations.parquet")
            else:
                unit.mkdir(parents=True, exist_ok=True)
                (unit / "generations.parquet").write_bytes(content)
            ctx.store.mark_done("generate", "g1")
        return unit / "generations.parquet"
    return run, calls


def test_an_upstream_file_a_stage_cannot_read_is_recomputed(tmp_path, monkeypatch, capsys):
    """generations.parquet written broken (its digest recorded as written, so it verifies): score
    cannot read it, the generate unit is cleared and redone, and score then runs on the new file."""
    study = _study(tmp_path, monkeypatch)
    study.store.heal = True
    generate, calls = _fake_generate([b"PAR1 not a parquet file", None])

    def score(ctx):
        df = read_parquet(ctx.need("generate"))
        calls.append("score")
        return df
    monkeypatch.setitem(STAGES, "generate", types.SimpleNamespace(run=generate))
    monkeypatch.setitem(STAGES, "score", types.SimpleNamespace(run=score))
    monkeypatch.setattr(study, "_check_space", lambda stage: None)
    out = study.need("score")
    assert list(out["response"]) == ["hi"] and calls == ["generate", "generate", "score"]
    assert "store: generate unit g1: score could not read it" in capsys.readouterr().out


def test_an_upstream_unit_is_healed_once(tmp_path, monkeypatch):
    """A unit that is broken again after its recomputation fails the stage (no endless loop)."""
    study = _study(tmp_path, monkeypatch)
    study.store.heal = True
    generate, calls = _fake_generate([b"broken", b"broken again"])
    monkeypatch.setitem(STAGES, "generate", types.SimpleNamespace(run=generate))
    monkeypatch.setitem(STAGES, "score", types.SimpleNamespace(run=lambda ctx: read_parquet(ctx.need("generate"))))
    monkeypatch.setattr(study, "_check_space", lambda stage: None)
    with pytest.raises(StoreError, match="generations.parquet: cannot read parquet"):
        study.need("score")
    assert calls == ["generate", "generate"]


def test_a_stage_whose_outputs_do_not_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil
    study = _study(tmp_path, monkeypatch)
    study.store.heal = True
    started = []
    monkeypatch.setitem(STAGES, "annotate", types.SimpleNamespace(run=lambda ctx: started.append(1)))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(StoreError, match=r"annotate is expected to write about .* GB .* and 0.00 GB is free: short by"):
        study.need("annotate")
    assert not started
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**12, used=0, free=10**12))
    study.need("annotate")
    assert started


def test_status_reads_a_corrupt_store_without_a_traceback(tmp_path, monkeypatch, capsys):
    from runner.cli import main
    study = _study(tmp_path, monkeypatch)
    cells = _fake_trained(study)
    root = study.root
    (study.store.unit("annotate", study.key("annotate")) / "_DONE.json").write_text('{"files": {')
    (study.store.unit("train", cells[0].cell_key) / "_DONE.json").unlink()
    (study.store.unit("train", cells[0].cell_key) / "_FAILED.json").write_text("{")
    (study.store.unit("train", cells[1].cell_key) / "cell.json").write_text("not json")
    (root / "study.json").write_text("{")
    spec = _write_spec(tmp_path, _spec_dict(tmp_path))
    assert main(["status", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "invalid: train" in out and "failed: train" in out
    assert "Traceback" not in out
    assert json.loads(json.dumps(study.status()))  # a plain table


def test_a_truncated_annotation_batch_is_judged_again(tmp_path, capsys):
    from runner.stages.annotate import _judged_batch
    batch = tmp_path / "00000.parquet"
    write_parquet(pd.DataFrame({"pair_id": ["a", "a"], "side": ["chosen", "rejected"], "values": [[], []],
                                "scored": [True, True]}), batch)
    assert _judged_batch(batch, [0, 2])
    assert not _judged_batch(batch, [0, 3])  # fewer rows than its span
    batch.write_bytes(batch.read_bytes()[:-30])
    assert not _judged_batch(batch, [0, 2]) and "judged again" in capsys.readouterr().out


def test_a_corrupt_reference_cache_entry_is_computed_again(tmp_path, capsys):
    from runner.train.reference import cached_logps as _cached_logps
    entry = tmp_path / "ref.json"
    entry.write_text(json.dumps([[-1.0, -2.0], [-3.0, -4.0]]))
    assert _cached_logps(entry, 2) == [[-1.0, -2.0], [-3.0, -4.0]]
    for broken in ('[[-1.0, -2.0], [-3.0', json.dumps([[-1.0, -2.0]]), json.dumps({"a": 1})):
        entry.write_text(broken)
        assert _cached_logps(entry, 2) is None
    assert "computed again" in capsys.readouterr().out
