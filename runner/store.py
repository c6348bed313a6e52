"""The study store: stage outputs under content hashes, atomic writes, units that verify themselves.

A unit is `<study dir>/stages/<folder>/<key>/`. It is complete once its `_DONE.json` is written
(last): it records each output file's size, modification time and digest, and the digests of the
upstream units the unit was computed from. A unit whose files no longer match (truncated, rewritten,
missing), or whose inputs were recomputed since, is not done: it is named once, and in a driver that
holds the study lock (`Store(heal=True)`) cleared, so its stage recomputes it and what depends on it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from evaluation.errors import ValindError
from runner.progress import say
from runner.secrets import redact

DONE, FAILED = "_DONE.json", "_FAILED.json"
MISSING = "missing"  # Store.problem of a unit that never finished
HOST = socket.gethostname()
# a temporary name: .<final name>.tmp-<host>-<pid> (the writer, so a sweep can tell a dead one's leftovers)
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
STALE_TMP_S = 24 * 3600  # another host's leftovers are swept after this long (its pids cannot be checked)
# Units published as one directory (a training cell): a damaged file discards the whole unit. Other
# units keep the files that still verify, which their stage resumes from (annotation batches, judge scores).
WHOLE_UNITS = {"train"}


class StoreError(ValindError):
    """A store file that cannot be read or written; `path` names it."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


def safe_name(name: str) -> str:
    """A file name that cannot escape its directory (no separators, no dot-dot)."""
    out = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name).strip(".")
    if not out:
        raise StoreError(f"unusable name {name!r}")
    return out[:200]


def tmp_path(final: Path) -> Path:
    """A temporary sibling of `final` that names its writer (host and pid)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{HOST}-{os.getpid()}")


@contextmanager
def _writing(path: Path):
    """A full disk becomes a StoreError naming the directory, not an OSError traceback."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"no space left on the device holding {Path(path).parent} (writing {Path(path).name}): "
                             "free some space and rerun; finished units are kept", path) from None
        raise


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling dir; rename it to `final` only if the block finishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _writing(final):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _atomic_write(path: Path, write) -> None:
    """write(tmp) then rename tmp to `path`: a failed write leaves no file, and none at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with _writing(path):
            write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    _atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV injection"),
# and valind's CSVs hold model outputs and outside data, and are opened in spreadsheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell that would start a formula, with "'" before it (a spreadsheet shows it as text);
    also one whose quotes precede such a start, so that `csv_uncell` undoes exactly this. Numbers
    and other cells are unchanged."""
    if isinstance(value, str) and value.lstrip("'").startswith(FORMULA_START):
        return "'" + value
    return value


def csv_uncell(value: Any) -> Any:
    """The cell `csv_cell` was given (for CSVs valind reads back, e.g. a labelled audit)."""
    if isinstance(value, str) and value.startswith("'") and value[1:].lstrip("'").startswith(FORMULA_START):
        return value[1:]
    return value


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """Every CSV valind writes: atomic, with header and text cells through `csv_cell`."""
    out = df.copy()
    out.columns = [csv_cell(c) for c in out.columns]
    for i, col in enumerate(out.columns):
        if out.dtypes.iloc[i] == object or pd.api.types.is_string_dtype(out.dtypes.iloc[i]):
            out.isetitem(i, out.iloc[:, i].map(csv_cell))
    _atomic_write(path, lambda tmp: out.to_csv(tmp, index=False))


def write_json(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


def read_json(path: Path) -> Any:
    """A JSON output file of a unit; an unreadable one is a StoreError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: cannot read JSON ({type(e).__name__}: {e})", Path(path)) from None


_warned: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        say(msg)


def read_state(path: Path, default: Any = None) -> Any:
    """A JSON state file (a marker, cell.json, a cache entry, a study's own records): its content, or
    `default` when it is missing. An unreadable one (truncated, not JSON) is named once and read as
    missing, so what it records is recomputed rather than ending in a traceback."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        _say_once(f"store: {path} is unreadable ({type(e).__name__}): read as missing, so it is recomputed")
        return default


def read_parquet(path: Path, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for truncated/corrupt files
        raise StoreError(f"{path}: cannot read parquet ({type(e).__name__}: {e})", Path(path)) from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StoreError(f"{path}: missing column(s) {missing}", Path(path))
    return df


def readable(path: Path, columns: tuple[str, ...] = ()) -> bool:
    """Whether a parquet file a stage resumes from is there and readable, with `columns`."""
    try:
        read_parquet(path, columns)
        return True
    except StoreError:
        return False


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """blake2b of a file's content (remembered per path, size and modification time)."""
    st = Path(path).stat()
    k = (str(path), st.st_size, st.st_mtime_ns)
    if k not in _DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[k] = h.hexdigest()
    return _DIGESTS[k]


def _is_tmp(name: str) -> bool:
    return bool(_TMP.match(name))


def unit_files(unit: Path, skip: Iterable[str] = ()) -> dict[str, list]:
    """Every output file of a unit: relative path -> [size, mtime_ns, digest] (markers, temporary
    files and paths under `skip` left out)."""
    skip = tuple(skip)
    out = {}
    for p in sorted(Path(unit).rglob("*")):
        rel = p.relative_to(unit).as_posix()
        if (not p.is_file() or rel in (DONE, FAILED) or any(_is_tmp(part) for part in p.relative_to(unit).parts)
                or rel.startswith(skip)):
            continue
        st = p.stat()
        out[rel] = [st.st_size, st.st_mtime_ns, file_digest(p)]
    return out


def _file_problem(unit: Path, rel: str, rec: list) -> str | None:
    p = unit / rel
    try:
        st = p.stat()
    except FileNotFoundError:
        return f"{rel} is missing"
    size, mtime, digest = rec
    if st.st_size != size:
        return f"{rel} is {st.st_size:,} bytes, {size:,} when it was written"
    # a file rewritten since (or copied without its times) is read again; one untouched keeps its digest
    if st.st_mtime_ns != mtime and file_digest(p) != digest:
        return f"{rel} changed since it was written"
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process of this host is alive (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(root: Path) -> list[Path]:
    """Remove temporary files and dirs left by dead writers under `root`: this host's whose pid is
    gone, another host's older than STALE_TMP_S. Returns what was removed."""
    gone, now = [], time.time()
    for p in Path(root).rglob(".*.tmp-*"):
        m = _TMP.match(p.name)
        if not m or not p.exists():
            continue
        host = m["host"] or HOST  # older valind versions wrote no host
        stale = (not pid_alive(int(m["pid"])) if host == HOST
                 else now - p.lstat().st_mtime > STALE_TMP_S)
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


class Store:
    """<study dir>/stages/<folder>/<key>/ … ; a unit is done once its verified _DONE.json says so.

    `heal`: clear units that fail verification so their stage recomputes them (the driver that holds
    the study lock); without it (`valind status`) the store is only read."""

    def __init__(self, root: Path, heal: bool = False):
        self.root = Path(root)
        self.heal = heal
        self._checked: dict[tuple[str, str], str | None] = {}

    def unit(self, stage: str, key: str) -> Path:
        return self.root / "stages" / safe_name(stage) / safe_name(key)

    def done(self, stage: str, key: str) -> bool:
        return self.problem(stage, key) is None

    def problem(self, stage: str, key: str) -> str | None:
        """None when the unit is complete and intact; MISSING when it never finished; else what is wrong."""
        k = (stage, key)
        if k not in self._checked:
            why = self._verify(stage, key)
            self._checked[k] = why
            if why not in (None, MISSING):
                _say_once(f"store: {stage} unit {key}: {why}; it is recomputed")
                if self.heal:
                    self._clear(stage, key, why)
        return self._checked[k]

    def _verify(self, stage: str, key: str) -> str | None:
        d = self.unit(stage, key)
        if not (d / DONE).exists():
            return MISSING
        rec = read_state(d / DONE)
        if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict):
            return "its _DONE.json is unreadable or lists no files"
        for rel, r in rec["files"].items():
            if why := _file_problem(d, rel, r):
                return why
        for ref, h in rec.get("inputs", {}).items():
            up_stage, up_key = ref.split("/", 1)
            up = self.problem(up_stage, up_key)
            if up is not None:
                return f"its input {ref} is {'missing' if up == MISSING else 'invalid'}"
            if self.files_hash(up_stage, up_key) != h:
                return f"its input {ref} was recomputed since"
        return None

    def _clear(self, stage: str, key: str, why: str) -> None:
        """Make a failed unit recomputable: a whole unit (or one whose inputs changed) goes; another
        loses its marker and the files that no longer verify, keeping what its stage resumes from."""
        d = self.unit(stage, key)
        files = (read_state(d / DONE) or {}).get("files")
        if stage in WHOLE_UNITS or why.startswith("its input") or not isinstance(files, dict):
            self._discard(d)
            return
        for rel, r in files.items():
            if _file_problem(d, rel, r):
                (d / rel).unlink(missing_ok=True)
        (d / DONE).unlink(missing_ok=True)

    @staticmethod
    def _discard(d: Path) -> None:
        if d.exists():
            trash = tmp_path(d)
            d.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def invalidate(self, stage: str, key: str, path: Path, why: str) -> None:
        """A unit whose file `path` a later stage could not read: named, and cleared for recomputation
        (the file and the marker; the whole unit where it is published whole)."""
        _say_once(f"store: {stage} unit {key}: {why}; it is recomputed")
        d = self.unit(stage, key)
        if stage in WHOLE_UNITS:
            self._discard(d)
        else:
            Path(path).unlink(missing_ok=True)
            (d / DONE).unlink(missing_ok=True)
        self._checked.clear()

    def files_hash(self, stage: str, key: str) -> str:
        """What a downstream unit records of this (done) unit: a hash of its files' digests."""
        files = read_state(self.unit(stage, key) / DONE, {}).get("files", {})
        blob = json.dumps({rel: r[0:1] + r[2:] for rel, r in files.items()}, sort_keys=True)  # not the times
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()

    def failed(self, stage: str, key: str) -> dict | None:
        p = self.unit(stage, key) / FAILED
        if not p.exists():
            return None
        rec = read_state(p)
        return rec if isinstance(rec, dict) else {"error": "(its _FAILED.json is unreadable)"}

    def mark_done(self, stage: str, key: str, info: dict | None = None,
                  inputs: Iterable[tuple[str, str]] = (), skip: Iterable[str] = ()) -> None:
        """Complete a unit: its files (all under it but `skip`) and its upstream units (`inputs`:
        (folder, key) pairs, each done) recorded in _DONE.json, written last."""
        d = self.unit(stage, key)
        (d / FAILED).unlink(missing_ok=True)
        ins = {}
        for s, k in inputs:
            if not self.done(s, k):
                raise StoreError(f"{stage} unit {key}: its input {s}/{k} is not done")
            ins[f"{s}/{k}"] = self.files_hash(s, k)
        write_json({"finished": time.time(), **(info or {}), "files": unit_files(d, skip), "inputs": ins}, d / DONE)
        # units found complete stay so (stages never redo a complete unit); the others are checked again
        self._checked = {k: v for k, v in self._checked.items() if v is None}

    def mark_failed(self, stage: str, key: str, err: BaseException | str) -> None:
        """Record a unit's error and traceback in its _FAILED.json, secrets masked (runner.secrets)."""
        text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        try:
            write_json({"time": time.time(), "error": redact(text),
                        "traceback": redact(traceback.format_exc()[-4000:])}, self.unit(stage, key) / FAILED)
        except (OSError, StoreError) as e:  # a full disk must not hide the error being recorded
            _say_once(f"store: could not record that {stage} unit {key} failed ({e})")
        self._checked.pop((stage, key), None)

    def info(self, stage: str, key: str) -> dict:
        return read_state(self.unit(stage, key) / DONE, {})
