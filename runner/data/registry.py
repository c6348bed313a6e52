"""The preference-source registry: one `Source` entry per source the spec's data.sources[].name may
name. It sits below the spec (runner.spec_sections checks names against it); the built-in sources
(runner.data.sources) register at its first lookup, a plugin's through `valind.plugins`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from evaluation.errors import ValindError
from evaluation.registry import Registry

if TYPE_CHECKING:
    from runner.spec_sections import SourceSpec

Converter = Callable[[dict], tuple]  # row -> (prompt, chosen, rejected, pair_id or None); raises _Drop
Rows = Iterator[tuple[int, dict]]    # (row index in the file or hub split, raw row)


class DataError(ValindError):
    """A preference source that cannot be read or resolved; the message names the file or dataset."""


class _Drop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


@dataclass(frozen=True)
class Source:
    """One preference source. The format strings below may use {name}, {subset}, {split} (after
    aliasing) and {file} (the stem of a local source's path)."""
    name: str                                   # the spec's data.sources[].name
    hub_id: str | None                          # Hugging Face dataset; None: no hub fallback
    converter: Callable[[SourceSpec], Converter]
    splits: tuple[str, ...] = ()                # () = the split is not checked (local files)
    split_aliases: dict[str, str] = field(default_factory=dict)  # spec split -> dataset split
    rows: dict[str, int] = field(default_factory=dict)  # "split" or "subset/split" -> rows (valind plan)
    subsets: tuple[str, ...] = ()               # allowed `subset` values; () = subset unused
    default_subset: str | None = None
    refused_subsets: dict[str, str] = field(default_factory=dict)  # subset -> why it is not usable
    file_stem: str = "{name}-{split}"           # <data_dir>/preference/<file_stem><ext>, before the hub
    hub_kwargs: dict[str, str] = field(default_factory=dict)  # extra load_dataset() kwargs
    pair_prefix: str = "{name}/{split}"         # pair_id = <pair_prefix>/<row index>
    label: str = "{name}"                       # the pairs' `source` column
    reader: Callable[[SourceSpec, Path | None], Rows] | None = None
    # ^ reads the (index, row)s itself instead of the data dir / hub lookup (local files)
    group: Callable[[Rows], Rows] | None = None
    # ^ combines raw rows into the converter's rows (per-response rows -> one row per prompt); a
    #   grouped row keeps its first raw row's index, so pair_ids point into the file

    def dataset_split(self, split: str) -> str:
        return self.split_aliases.get(split, split)

    def n_rows(self, spec: SourceSpec) -> int | None:
        """Rows of the split (and subset) a spec asks for, if known."""
        split, subset = self.dataset_split(spec.split), spec.subset or self.default_subset
        return self.rows.get(f"{subset}/{split}", self.rows.get(split))


SOURCES: Registry[Source] = Registry("preference source", builtins="runner.data.sources")


def register(source: Source) -> Source:
    """Add a source under its name (which the spec's data.sources[].name then accepts)."""
    return SOURCES.add(source.name, source)


def get_source(name: str) -> Source:
    try:
        return SOURCES.get(name)
    except KeyError:
        raise DataError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}") from None
