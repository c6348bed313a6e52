"""Preference-pair loaders: HH-RLHF, UltraFeedback (binarized), PKU-SafeRLHF, the Tulu 3 preference
mixture and local jsonl/json/parquet files, normalised to one table of PreferencePair rows.

Every loader yields raw rows in a deterministic order; `_to_pair` turns a row into a pair or a drop
reason, so all sources share the same validity rules and drop accounting.
"""
from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd

from evaluation.types import PAIR_COLUMNS
from runner.spec import SourceSpec

COLUMNS = (*PAIR_COLUMNS, "n_turns")
DROP_REASONS = ("missing_field", "empty_response", "no_final_assistant_turn", "identical",
                "over_length", "malformed", "duplicate_id")

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_NOT_PAIRWISE = ("red-team-attempts",)
HUB_IDS = {
    "hh_rlhf": "Anthropic/hh-rlhf",
    "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
    "pku_saferlhf": "PKU-Alignment/PKU-SafeRLHF",
    "tulu3_preference": "allenai/llama-3.1-tulu-3-8b-preference-mixture",
}
SPLITS = {
    "hh_rlhf": ("train", "test"),
    "ultrafeedback": ("train_prefs", "test_prefs"),
    "pku_saferlhf": ("train", "test"),
    "tulu3_preference": ("train",),
}
# SourceSpec.split defaults to "test"; UltraFeedback names its preference splits *_prefs.
SPLIT_ALIASES = {"ultrafeedback": {"train": "train_prefs", "test": "test_prefs"}}
EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")
ROLES = ("system", "user", "assistant")


class DataError(Exception):
    """A preference source that cannot be read or resolved; the message names the file or dataset."""


class _Drop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


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
    label, rows, convert = _resolve(source, data_dir)
    drops = {r: 0 for r in DROP_REASONS}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for idx, row in rows:
        try:
            prompt, chosen, rejected, pid = convert(row)
            _check(prompt, chosen, rejected, max_chars)
            pair_id = str(pid) if pid is not None else f"{label}/{idx:06d}"
            if pair_id in seen:
                raise _Drop("duplicate_id")
        except _Drop as d:
            drops[d.reason] += 1
            continue
        seen.add(pair_id)
        out.append({"pair_id": pair_id, "source": _source_label(source), "prompt": prompt,
                    "chosen": chosen, "rejected": rejected,
                    "n_turns": sum(m["role"] == "user" for m in prompt)})
        if source.max_pairs is not None and len(out) >= source.max_pairs:
            break
    return pd.DataFrame(out, columns=list(COLUMNS)), drops


def prompt_text(prompt: list[dict]) -> str:
    """The prompt messages' contents joined by blank lines (for lengths and previews)."""
    return "\n\n".join(m["content"] for m in prompt)


# --- resolution --------------------------------------------------------------------------------

def _source_label(source: SourceSpec) -> str:
    if source.name == "local":
        return f"local/{_stem(Path(source.path))}"
    return f"{source.name}/{source.subset}" if source.name == "hh_rlhf" else source.name


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".jsonl.gz", ".jsonl", ".json", ".parquet"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _resolve(source: SourceSpec, data_dir: Path | None
             ) -> tuple[str, Iterator[tuple[int, dict]], Callable[[dict], tuple]]:
    """(pair_id prefix, (index, raw row) iterator, row converter) for a source."""
    if source.name == "local":
        return _resolve_local(source, data_dir)

    name = source.name
    split = SPLIT_ALIASES.get(name, {}).get(source.split, source.split)
    if split not in SPLITS[name]:
        raise DataError(f"{name}: unknown split {source.split!r}; {HUB_IDS[name]} has {list(SPLITS[name])}")
    hub_kwargs: dict[str, Any] = {}
    if name == "hh_rlhf":
        subset = source.subset
        if subset in HH_NOT_PAIRWISE:
            raise DataError(f"hh_rlhf: subset {subset!r} holds red-team transcripts, not preference "
                            f"pairs; use one of {list(HH_SUBSETS)}")
        if subset not in HH_SUBSETS:
            raise DataError(f"hh_rlhf: subset must be one of {list(HH_SUBSETS)}, got {subset!r}")
        stem, hub_kwargs = f"hh-rlhf-{subset}-{split}", {"data_dir": subset}
        convert = _convert_hh
        label = f"hh_rlhf/{subset}/{split}"
    else:
        stem, label = f"{name}-{split}", f"{name}/{split}"
        if name == "pku_saferlhf":
            pick = source.subset or "better"
            if pick not in ("better", "safer"):
                raise DataError(f"pku_saferlhf: subset must be 'better' or 'safer', got {pick!r}")
            convert = _pku_converter(pick)
            label = f"{name}/{pick}/{split}"
        else:
            convert = _convert_message_lists

    tried: list[str] = []
    if data_dir is not None:
        for ext in EXTENSIONS:
            path = data_dir / "preference" / f"{stem}{ext}"
            tried.append(str(path))
            if path.is_file():
                return label, _read_file(path), convert
    hub_id = HUB_IDS[name]
    try:
        rows = _hub_rows(hub_id, split, **hub_kwargs)
    except Exception as e:  # datasets raises many types (offline, missing split, network)
        where = ", ".join(tried) if tried else "none (no data dir)"
        raise DataError(f"{name} ({split}): not found locally (tried {where}) and the hub dataset "
                        f"{hub_id!r} failed to load: {type(e).__name__}: {e}") from None
    return label, enumerate(rows), convert


def _hub_rows(hub_id: str, split: str, **kwargs: Any) -> Iterable[dict]:
    """Rows of a hub dataset split (tests monkeypatch this)."""
    import datasets  # heavy; only needed when the data dir lacks the file
    return datasets.load_dataset(hub_id, split=split, **kwargs)


def _resolve_local(source: SourceSpec, data_dir: Path | None):
    path = Path(source.path).expanduser()
    if not path.is_absolute() and not path.exists() and data_dir is not None and (data_dir / path).exists():
        path = data_dir / path
    if not path.is_file():
        raise DataError(f"{path}: local preference file not found")
    fields = {f: source.columns.get(f, f) for f in ("prompt", "chosen", "rejected")}
    id_col = source.columns.get("pair_id")
    unknown = set(source.columns) - {"prompt", "chosen", "rejected", "pair_id"}
    if unknown:
        raise DataError(f"{path}: unknown field(s) in columns mapping: {sorted(unknown)}")
    rows = list(_read_file(path))
    present: set[str] = set()
    for _, r in rows:
        present.update(r)
    for col in [*fields.values(), *([id_col] if id_col else [])]:
        if rows and col not in present:
            raise DataError(f"{path}: column {col!r} not found (columns: {sorted(present)})")

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

    return f"local/{_stem(path)}", iter(rows), convert


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
    import pyarrow.parquet as pq
    try:
        # to_pylist keeps nested message lists as Python lists (pandas would give numpy arrays)
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None


# --- row conversion ----------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(dialogue: str) -> tuple[list[dict], str]:
    """Split an HH-RLHF transcript into prompt messages (ending with user) and the final response.

    Consecutive turns of the same speaker (a few HH transcripts have them) are merged, joined by a
    blank line, so the prompt alternates user/assistant.
    """
    parts = _HH_TURN.split(dialogue)
    if parts[0].strip():
        raise _Drop("malformed")  # text before the first turn marker
    msgs: list[dict] = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        text = text.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] = f"{msgs[-1]['content']}\n\n{text}".strip()
        else:
            msgs.append({"role": role, "content": text})
    return _split_messages(msgs)


def _split_messages(msgs: list[dict]) -> tuple[list[dict], str]:
    """(prompt, final assistant content) of a message list; checks roles and alternation."""
    if not msgs:
        raise _Drop("malformed")
    if msgs[-1]["role"] != "assistant":
        raise _Drop("no_final_assistant_turn")
    prompt, response = msgs[:-1], msgs[-1]["content"]
    convo = [m for m in prompt if m["role"] != "system"]
    if not convo or convo[-1]["role"] != "user" or convo[0]["role"] != "user":
        raise _Drop("malformed")
    if any(a["role"] == b["role"] for a, b in zip(convo, convo[1:])):
        raise _Drop("malformed")
    return prompt, response


def _as_messages(value: Any) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise _Drop("malformed")
    msgs = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _Drop("malformed")
        msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


def _as_prompt(value: Any) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _Drop("malformed")
        return [{"role": "user", "content": value}]
    msgs = _as_messages(value)
    convo = [m for m in msgs if m["role"] != "system"]
    if not convo or convo[-1]["role"] != "user":
        raise _Drop("malformed")
    return msgs


def _convert_hh(row: dict) -> tuple:
    c, r = row.get("chosen"), row.get("rejected")
    if c is None or r is None:
        raise _Drop("missing_field")
    if not isinstance(c, str) or not isinstance(r, str):
        raise _Drop("malformed")
    cp, cr = split_hh(c)
    rp, rr = split_hh(r)
    if cp != rp:
        raise _Drop("malformed")
    return cp, cr, rr, None


def _convert_message_lists(row: dict) -> tuple:
    """UltraFeedback / Tulu 3: chosen and rejected are full conversations incl. the prompt turns."""
    c, r = row.get("chosen"), row.get("rejected")
    if c is None or r is None:
        raise _Drop("missing_field")
    cp, cr = _split_messages(_as_messages(c))
    rp, rr = _split_messages(_as_messages(r))
    if cp != rp:
        raise _Drop("malformed")
    return cp, cr, rr, None


def _pku_converter(pick: str) -> Callable[[dict], tuple]:
    key = f"{pick}_response_id"

    def convert(row: dict) -> tuple:
        vals = [row.get(k) for k in ("prompt", "response_0", "response_1", key)]
        if any(v is None for v in vals):
            raise _Drop("missing_field")
        prompt, r0, r1, best = vals
        if best not in (0, 1) or not isinstance(r0, str) or not isinstance(r1, str):
            raise _Drop("malformed")
        chosen, rejected = (r0, r1) if best == 0 else (r1, r0)
        return _as_prompt(prompt), chosen, rejected, None

    return convert


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
