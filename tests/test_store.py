import pytest

from runner.store import Store, StoreError, atomic_dir, read_parquet, safe_name, write_parquet


def test_atomic_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "unit"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("killed")
    assert not final.exists() and not list(tmp_path.iterdir())
    with atomic_dir(final) as tmp:
        (tmp / "whole.txt").write_text("x")
    assert (final / "whole.txt").exists()


def test_names_cannot_escape(tmp_path):
    store = Store(tmp_path)
    for evil in ("../../etc/passwd", "/abs/path", "a/../../b"):
        unit = store.unit("train", evil)
        assert tmp_path in unit.resolve().parents
    with pytest.raises(StoreError):
        safe_name("..")


def test_done_and_failed_markers(tmp_path):
    store = Store(tmp_path)
    assert not store.done("s", "k")
    try:
        raise ValueError("boom")
    except ValueError as e:
        store.mark_failed("s", "k", e)
    assert "boom" in store.failed("s", "k")["error"]
    store.mark_done("s", "k", {"n": 1})
    assert store.done("s", "k") and store.failed("s", "k") is None and store.info("s", "k")["n"] == 1


def test_corrupt_parquet_names_the_file(tmp_path):
    import pandas as pd
    p = tmp_path / "t.parquet"
    write_parquet(pd.DataFrame({"a": [1, 2]}), p)
    with pytest.raises(StoreError, match="missing column"):
        read_parquet(p, ("a", "b"))
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(StoreError, match="t.parquet"):
        read_parquet(p)


# ------------------------------------------------------------------ units that verify themselves

def _unit(store, stage="generate", key="k", rows=3, **done):
    import pandas as pd
    write_parquet(pd.DataFrame({"a": range(rows)}), store.unit(stage, key) / "out.parquet")
    store.mark_done(stage, key, **done)
    return store.unit(stage, key) / "out.parquet"


def test_a_truncated_output_makes_its_unit_missing_and_named(tmp_path, capsys):
    store = Store(tmp_path)
    f = _unit(store)
    assert store.done("generate", "k")
    f.write_bytes(f.read_bytes()[:-10])
    fresh = Store(tmp_path)  # verification is per process: a new driver
    assert not fresh.done("generate", "k")
    assert "out.parquet is" in fresh.problem("generate", "k") and "when it was written" in fresh.problem("generate", "k")
    assert "store: generate unit k: out.parquet is" in capsys.readouterr().out
    assert f.exists() and (f.parent / "_DONE.json").exists()  # a reader (valind status) changes nothing
    healer = Store(tmp_path, heal=True)
    assert not healer.done("generate", "k")
    assert not f.exists() and not (f.parent / "_DONE.json").exists()  # cleared: the stage recomputes it


def test_a_rewritten_output_of_the_same_size_is_caught(tmp_path):
    store = Store(tmp_path)
    f = _unit(store)
    data = f.read_bytes()
    f.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit flipped: same size, new time
    assert not Store(tmp_path).done("generate", "k")
    assert Store(tmp_path).problem("generate", "k") == "out.parquet changed since it was written"


def test_an_unreadable_or_old_marker_is_not_done(tmp_path):
    store = Store(tmp_path)
    _unit(store)
    done = store.unit("generate", "k") / "_DONE.json"
    for text in ("", "{", '{"finished": 1}'):  # empty, truncated, without the files (an older valind)
        done.write_text(text)
        assert not Store(tmp_path).done("generate", "k")
    (store.unit("generate", "k") / "_FAILED.json").write_text("{")
    assert Store(tmp_path).failed("generate", "k") == {"error": "(its _FAILED.json is unreadable)"}


def test_a_unit_whose_input_was_recomputed_is_recomputed(tmp_path):
    import pandas as pd
    store = Store(tmp_path)
    _unit(store, "generate", "g")
    _unit(store, "score", "s", inputs=[("generate", "g")])
    assert Store(tmp_path).done("score", "s")
    write_parquet(pd.DataFrame({"a": [5, 6]}), store.unit("generate", "g") / "out.parquet")  # regenerated
    store.mark_done("generate", "g")
    healer = Store(tmp_path, heal=True)
    assert healer.done("generate", "g")
    assert healer.problem("score", "s") == "its input generate/g was recomputed since"
    assert not store.unit("score", "s").exists()  # scores of other generations: gone, whole
    # an input redone with the same content changes nothing downstream
    _unit(store, "score", "s", inputs=[("generate", "g")])
    write_parquet(pd.DataFrame({"a": [5, 6]}), store.unit("generate", "g") / "out.parquet")
    store.mark_done("generate", "g")
    assert Store(tmp_path).done("score", "s")
    # a missing input: the downstream unit is not done either
    (store.unit("generate", "g") / "_DONE.json").unlink()
    assert Store(tmp_path).problem("score", "s") == "its input generate/g is missing"


def test_a_damaged_training_cell_is_discarded_whole(tmp_path):
    store = Store(tmp_path, heal=True)
    unit = store.unit("train", "c")
    (unit / "model").mkdir(parents=True)
    (unit / "model" / "adapter_model.safetensors").write_bytes(b"x" * 64)
    (unit / "cell.json").write_text("{}")
    store.mark_done("train", "c")
    (unit / "model" / "adapter_model.safetensors").write_bytes(b"x" * 10)
    assert not Store(tmp_path, heal=True).done("train", "c") and not unit.exists()


def test_a_corrupt_state_file_reads_as_missing(tmp_path, capsys):
    from runner.store import read_state
    p = tmp_path / "state.json"
    assert read_state(p, {"a": 1}) == {"a": 1}
    p.write_text('{"step": 3')
    assert read_state(p) is None
    assert "state.json is unreadable (JSONDecodeError)" in capsys.readouterr().out


def test_sweep_removes_only_dead_writers_leftovers(tmp_path):
    import os
    import time

    from runner.store import HOST, sweep
    dead = tmp_path / "stages" / "x" / f".unit.tmp-{HOST}-999999999"
    dead.mkdir(parents=True)
    (dead / "half").write_text("x")
    alive = tmp_path / f".out.parquet.tmp-{HOST}-{os.getpid()}"
    alive.write_text("x")
    old_style = tmp_path / ".cache.json.tmp-999999998"  # written by an older valind (no host)
    old_style.write_text("x")
    elsewhere = tmp_path / ".a.tmp-otherhost-1"
    elsewhere.write_text("x")
    stale = tmp_path / ".b.tmp-otherhost-2"
    stale.write_text("x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    gone = sweep(tmp_path)
    assert set(gone) == {dead, old_style, stale}
    assert alive.exists() and elsewhere.exists() and not dead.exists()


def test_a_full_disk_is_a_message_naming_the_directory(tmp_path, monkeypatch):
    import errno

    import pandas as pd

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    target = tmp_path / "unit" / "x.parquet"
    with pytest.raises(StoreError, match=f"no space left on the device holding {target.parent}"):
        write_parquet(pd.DataFrame({"a": [1]}), target)
    assert not list(target.parent.iterdir())
    store = Store(tmp_path)
    monkeypatch.setattr("runner.store.write_json", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    store.mark_failed("s", "k", "boom")  # the failure it records is lost, the error being handled is not hidden
