"""Preference-pair loaders: HH-RLHF, UltraFeedback (binarized), PKU-SafeRLHF, HelpSteer 2, the Tulu 3
preference mixture and local jsonl/json/parquet files, normalised to one table of PreferencePair rows.

Each source is one `Source` entry in `SOURCES` (runner.data.registry); the spec's source names, the
loader and `valind plan` all read that registry. Every source yields raw rows in a deterministic
order; a source whose rows are single responses first groups them (`Source.group`); its converter
turns a (grouped) row into a pair or raises `_Drop`, so all sources share the same validity rules
and drop accounting.

Where a source's pairs are derived rather than given:
- PKU-SafeRLHF subset "better" uses `better_response_id`, "safer" uses `safer_response_id`. The
  dataset sets safer_response_id even when both responses are equally safe (both safe or both
  unsafe); those pairs are kept as labelled.
- HelpSteer 2 rates each response alone (0-4 per attribute); the two consecutive rows that share a
  prompt form a pair: chosen has the higher helpfulness, a tie is broken by correctness, and pairs
  still tied are dropped ("tied"). Multi-turn prompts are split into messages at their
  "<extra_id_1>User" / "<extra_id_1>Assistant" markers. HelpSteer 2's separate pairwise preference
  annotations (its preference/ files) are not used.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import socket
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse

import pandas as pd

from evaluation.types import PAIR_COLUMNS
from runner.data.convert import (ROLES, _as_messages, _as_prompt, _convert_hh, _convert_helpsteer2,  # noqa: F401
                                  _convert_message_lists, _pku_converter, group_consecutive_prompts, split_helpsteer2,
                                  split_hh)
from runner.data.registry import SOURCES, Converter, DataError, Rows, Source, _Drop, get_source, register  # noqa: F401
from runner.spec_sections import SourceSpec

COLUMNS = (*PAIR_COLUMNS, "n_turns")
DROP_REASONS = ("missing_field", "empty_response", "no_final_assistant_turn", "identical",
                "over_length", "malformed", "duplicate_id", "tied")
EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")

# --- public entry point ------------------------------------------------------------------------

def load_pairs(source: SourceSpec, data_dir: Path | None, max_chars: int
               ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Load one source as PreferencePair rows plus drop counts by reason.

    Columns: pair_id, source, prompt (list of {"role","content"} ending with a user message),
    chosen, rejected (final assistant responses), n_turns (user messages in the prompt).
    A pair is over-length when its longer side (prompt text + response) exceeds `max_chars`.
    `source.max_pairs` keeps the first N valid pairs in file order (rows after them are not read).
    """
    data_dir = Path(data_dir) if data_dir is not None else None
    label, prefix, rows, convert = _resolve(source, data_dir)
    drops = {r: 0 for r in DROP_REASONS}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for idx, row in rows:
        try:
            prompt, chosen, rejected, pid = convert(row)
            _check(prompt, chosen, rejected, max_chars)
            pair_id = str(pid) if pid is not None else f"{prefix}/{idx:06d}"
            if pair_id in seen:
                raise _Drop("duplicate_id")
        except _Drop as d:
            drops[d.reason] += 1
            continue
        seen.add(pair_id)
        out.append({"pair_id": pair_id, "source": label, "prompt": prompt,
                    "chosen": chosen, "rejected": rejected,
                    "n_turns": sum(m["role"] == "user" for m in prompt)})
        if source.max_pairs is not None and len(out) >= source.max_pairs:
            break
    return pd.DataFrame(out, columns=list(COLUMNS)), drops


def prompt_text(prompt: list[dict]) -> str:
    """The prompt messages' contents joined by blank lines (for lengths and previews)."""
    return "\n\n".join(m["content"] for m in prompt)


# --- resolution --------------------------------------------------------------------------------

def _stem(path: Path) -> str:
    name = path.name
    for ext in (".jsonl.gz", ".jsonl", ".json", ".parquet"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _choices(options: tuple[str, ...]) -> str:
    return f"{options[0]!r} or {options[1]!r}" if len(options) == 2 else f"one of {list(options)}"


def _resolve(source: SourceSpec, data_dir: Path | None) -> tuple[str, str, Rows, Converter]:
    """(source label, pair_id prefix, (index, row) iterator after any grouping, row converter)."""
    entry, source, fmt = _formats(source)
    label, prefix = entry.label.format(**fmt), entry.pair_prefix.format(**fmt)
    split = fmt["split"]
    rows = entry.reader(source, data_dir) if entry.reader is not None else _dataset_rows(entry, split, fmt, data_dir)
    if entry.group is not None:
        rows = entry.group(rows)
    return label, prefix, rows, entry.converter(source)


def locate(source: SourceSpec, data_dir: Path | None) -> tuple[Path | None, str | None]:
    """Where a registered (not local) source's rows come from: (its file in the data dir, or None;
    the hub dataset to fall back on, or None). Raises DataError for a bad split or subset."""
    entry, _, fmt = _formats(source)
    files = [p for p in _candidates(entry, fmt, data_dir) if p.is_file()]
    return (files[0] if files else None), entry.hub_id


def _candidates(entry: Source, fmt: dict[str, str], data_dir: Path | None) -> list[Path]:
    if data_dir is None:
        return []
    return [data_dir / "preference" / f"{entry.file_stem.format(**fmt)}{ext}" for ext in EXTENSIONS]


def _formats(source: SourceSpec) -> tuple[Source, SourceSpec, dict[str, str]]:
    """A source's registry entry, the spec with its default subset, and the names its format strings take."""
    entry = get_source(source.name)
    name, split = entry.name, entry.dataset_split(source.split)
    if entry.splits and split not in entry.splits:
        raise DataError(f"{name}: unknown split {source.split!r}; {entry.hub_id or name} has {list(entry.splits)}")
    subset = source.subset or entry.default_subset
    if subset in entry.refused_subsets:
        raise DataError(f"{name}: subset {subset!r} {entry.refused_subsets[subset]}; "
                        f"use one of {list(entry.subsets)}")
    if entry.subsets and subset not in entry.subsets:
        raise DataError(f"{name}: subset must be {_choices(entry.subsets)}, got {subset!r}")
    source = source.model_copy(update={"subset": subset})
    return entry, source, {"name": name, "subset": subset, "split": split,
                           "file": _stem(Path(source.path)) if source.path else ""}


def _dataset_rows(entry: Source, split: str, fmt: dict[str, str], data_dir: Path | None) -> Rows:
    """A registered dataset's (index, row)s: <data_dir>/preference/<file_stem><ext>, else the hub."""
    name = entry.name
    tried: list[str] = []
    for path in _candidates(entry, fmt, data_dir):
        tried.append(str(path))
        if path.is_file():
            return _read_file(path)
    if entry.hub_id is None:
        raise DataError(f"{name} ({split}): not found locally (tried {', '.join(tried) or 'none (no data dir)'})")
    hub_kwargs = {k: v.format(**fmt) for k, v in entry.hub_kwargs.items()}
    where = f"{name} ({split}): not found locally (tried {', '.join(tried) or 'none: VALIND_DATA_DIR is not set'})"
    try:
        rows = hub_rows(entry.hub_id, split, **hub_kwargs)
    except HubUnreachable as e:
        raise DataError(f"{where}, and the Hugging Face hub is unreachable ({e}). Set VALIND_DATA_DIR to a data "
                        "directory that holds it, or HF_HUB_OFFLINE=1 to read the local datasets cache only") from None
    except Exception as e:  # datasets raises many types (offline, missing split, network)
        raise DataError(f"{where}, and the hub dataset {entry.hub_id!r} failed to load: {type(e).__name__}: {e}. "
                        "Set VALIND_DATA_DIR to a data directory that holds it") from None
    return enumerate(rows)


class HubUnreachable(OSError):
    pass


def check_hub(timeout_s: float = 3.0) -> None:
    """Fail in seconds where the hub cannot be reached: `datasets` would retry five times first."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return  # offline mode: datasets reads its cache and says so itself
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise HubUnreachable(f"{url.hostname}:{port}: {e}") from None


def hub_rows(hub_id: str, split: str | None, **kwargs: Any) -> Any:
    """A hub dataset's split (a `datasets.Dataset`; all splits where `split` is None), as `valind stage`
    downloads it and the job reads it, online and offline (tests monkeypatch this).

    A `data_dir` load reads the repo's files of that folder (huggingface_hub's cache) as a local
    dataset: `datasets` keys a hub load with data_dir one way online and another offline, so a
    staged copy was never found offline (huggingface/datasets#6609)."""
    check_hub()
    import datasets  # deferred: heavy; only needed when the data dir lacks the file
    from huggingface_hub import snapshot_download  # deferred: as datasets (reads HF_HOME at import)

    if (data_dir := kwargs.pop("data_dir", None)) is None:
        return datasets.load_dataset(hub_id, split=split, **kwargs)
    files = snapshot_download(hub_id, repo_type="dataset", allow_patterns=[f"{data_dir}/*"])
    return datasets.load_dataset(str(Path(files) / data_dir), split=split, **kwargs)


def hub_load(source: SourceSpec) -> tuple[str | None, str, dict[str, str]]:
    """A registered source's hub dataset, split and load_dataset keywords (hub_rows' arguments)."""
    entry, _, fmt = _formats(source)
    return entry.hub_id, fmt["split"], {k: v.format(**fmt) for k, v in entry.hub_kwargs.items()}


def _local_fields(source: SourceSpec) -> tuple[dict[str, str], str | None]:
    """(our field -> file column for prompt/chosen/rejected, the pair id column or None)."""
    fields = {f: source.columns.get(f, f) for f in ("prompt", "chosen", "rejected")}
    return fields, source.columns.get("pair_id")


def local_path(source: SourceSpec, data_dir: Path | None) -> Path:
    """A local source's file: `path` as given (relative to the working directory), else under data_dir."""
    path = Path(source.path).expanduser()
    if not path.is_absolute() and not path.exists() and data_dir is not None and (data_dir / path).exists():
        path = data_dir / path
    if not path.is_file():
        where = f" (nor under the data directory {data_dir})" if data_dir is not None and not path.is_absolute() else ""
        raise DataError(f"{path}: local preference file not found{where}")
    return path


def check_local(source: SourceSpec, data_dir: Path | None, head: int = 100) -> None:
    """What `valind validate` checks of a local source, reading at most `head` rows: the file exists,
    reads, has rows, and has the mapped columns (DataError naming the file otherwise)."""
    path = local_path(source, data_dir)
    if path.name.endswith(".parquet"):
        rows = _parquet_head(path, head)
    else:
        rows = [r for _, r in itertools.islice(_read_file(path), head)]
    _check_columns(path, source, rows, f" in its first {head} rows" if len(rows) == head else "")


def _read_local(source: SourceSpec, data_dir: Path | None) -> Iterator[tuple[int, dict]]:
    """A local file's rows, after checking that the columns mapping fits the file."""
    path = local_path(source, data_dir)
    rows = list(_read_file(path))
    _check_columns(path, source, [r for _, r in rows])
    return iter(rows)


def _check_columns(path: Path, source: SourceSpec, rows: list[dict], where: str = "") -> None:
    """The file has rows, and the columns mapping names fields we know and columns the rows have."""
    fields, id_col = _local_fields(source)
    unknown = set(source.columns) - {"prompt", "chosen", "rejected", "pair_id"}
    if unknown:
        raise DataError(f"{path}: unknown field(s) in columns mapping: {sorted(unknown)}")
    if not rows:
        raise DataError(f"{path}: the local preference file has no rows")
    present = set().union(*rows)
    for col in [*fields.values(), *([id_col] if id_col else [])]:
        if col not in present:
            raise DataError(f"{path}: column {col!r} not found{where} (columns: {sorted(present)})")


def _local_converter(source: SourceSpec) -> Converter:
    fields, id_col = _local_fields(source)

    def convert(row: dict) -> tuple:
        vals = {f: row.get(c) for f, c in fields.items()}
        if any(v is None for v in vals.values()):
            raise _Drop("missing_field")
        prompt = _as_prompt(vals["prompt"])
        chosen = _local_response(vals["chosen"], prompt)
        rejected = _local_response(vals["rejected"], prompt)
        pid = row.get(id_col) if id_col else None
        if id_col and (pid is None or str(pid) == ""):
            raise _Drop("missing_field")
        return prompt, chosen, rejected, pid

    return convert


# --- file reading ------------------------------------------------------------------------------

def _read_file(path: Path) -> Iterator[tuple[int, dict]]:
    name = path.name
    if name.endswith(".parquet"):
        return enumerate(_read_parquet(path))
    if name.endswith(".json"):
        return enumerate(_read_json(path))
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path)
    raise DataError(f"{path}: unsupported file type (use .jsonl, .jsonl.gz, .json or .parquet)")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            idx = 0
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {lineno}: expected a JSON object")
                yield idx, row
                idx += 1
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        # EOFError is how gzip reports a truncated stream
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("rows"))  # tolerate {"data": [...]} wrappers
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return data


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # deferred: only parquet sources need it
    try:
        # to_pylist keeps nested message lists as Python lists (pandas would give numpy arrays)
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None


def _parquet_head(path: Path, n: int) -> list[dict]:
    import pyarrow.parquet as pq  # deferred: only parquet sources need it
    try:
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=n), None)
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    return [] if batch is None else batch.to_pylist()


def _local_response(value: Any, prompt: list[dict]) -> str:
    if isinstance(value, str):
        return value
    msgs = _as_messages(value)
    if not msgs:
        raise _Drop("malformed")
    if msgs[-1]["role"] != "assistant":
        raise _Drop("no_final_assistant_turn")
    # a full conversation is accepted only if it continues this pair's prompt
    if msgs[:-1] and msgs[:-1] != prompt:
        raise _Drop("malformed")
    return msgs[-1]["content"]


def _check(prompt: list[dict], chosen: str, rejected: str, max_chars: int) -> None:
    if not chosen.strip() or not rejected.strip():
        raise _Drop("empty_response")
    if chosen.strip() == rejected.strip():
        raise _Drop("identical")
    if len(prompt_text(prompt)) + max(len(chosen), len(rejected)) > max_chars:
        raise _Drop("over_length")


# --- the registered sources --------------------------------------------------------------------

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")

register(Source(
    name="hh_rlhf", hub_id="Anthropic/hh-rlhf", converter=lambda _: _convert_hh,
    splits=("train", "test"), subsets=HH_SUBSETS,
    refused_subsets={"red-team-attempts": "holds red-team transcripts, not preference pairs"},
    rows={"harmless-base/train": 42_537, "harmless-base/test": 2_312,
          "helpful-base/train": 43_835, "helpful-base/test": 2_354,
          "helpful-online/train": 22_007, "helpful-online/test": 1_137,
          "helpful-rejection-sampled/train": 52_421, "helpful-rejection-sampled/test": 2_749},
    file_stem="hh-rlhf-{subset}-{split}", hub_kwargs={"data_dir": "{subset}"},
    pair_prefix="{name}/{subset}/{split}", label="{name}/{subset}",
))
register(Source(
    name="ultrafeedback", hub_id="HuggingFaceH4/ultrafeedback_binarized",
    converter=lambda _: _convert_message_lists, splits=("train_prefs", "test_prefs"),
    # SourceSpec.split defaults to "test"; UltraFeedback names its preference splits *_prefs.
    split_aliases={"train": "train_prefs", "test": "test_prefs"},
    rows={"train_prefs": 61_135, "test_prefs": 2_000},
))
register(Source(
    name="pku_saferlhf", hub_id="PKU-Alignment/PKU-SafeRLHF",
    converter=lambda spec: _pku_converter(spec.subset), splits=("train", "test"),
    subsets=("better", "safer"), default_subset="better",
    rows={"train": 73_907, "test": 8_211}, pair_prefix="{name}/{subset}/{split}",
))
register(Source(
    name="helpsteer2", hub_id="nvidia/HelpSteer2", converter=lambda _: _convert_helpsteer2,
    group=group_consecutive_prompts, splits=("train", "validation"),
    # SourceSpec.split defaults to "test"; HelpSteer 2's held-out split is "validation".
    split_aliases={"test": "validation"},
    rows={"train": 10_162, "validation": 519},  # prompts (= candidate pairs): 20,324 and 1,038 responses
))
register(Source(
    name="tulu3_preference", hub_id="allenai/llama-3.1-tulu-3-8b-preference-mixture",
    converter=lambda _: _convert_message_lists, splits=("train",), rows={"train": 272_898},
))
register(Source(
    name="local", hub_id=None, converter=_local_converter, reader=_read_local,
    pair_prefix="local/{file}", label="local/{file}",
))
