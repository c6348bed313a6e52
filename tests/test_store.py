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
