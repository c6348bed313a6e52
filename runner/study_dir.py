"""A study directory has one driver at a time and one spec.

- `StudyLock`: an flock on `<study>/.valind.lock`, held by the driver for its life (the kernel drops it
  when the process dies, however it dies); a second driver exits at once naming the first.
- `claim`: `<study>/study.json` records the spec that owns the directory (its fields that can change
  a result, runner.stages.keys.result_view) and the commits its hub models resolved to. Another spec
  under the same study.name is refused, unless it only adds work (more seeds, values, models or
  controls), which is recorded and shown, or the user amends the study on purpose (`--amend`).
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from evaluation.errors import InputError, ValindError
from runner.progress import say
from runner.spec import Spec, content_hash
from runner.stages.keys import result_view
from runner.store import HOST, read_state, write_json


class StudyBusy(ValindError):
    """Another driver holds the study directory."""


class StudyLock:
    def __init__(self, root: Path, command: str):
        self.root, self.command, self._fd = Path(root), command, None

    def __enter__(self) -> "StudyLock":
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".valind.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = read_state(self.root / ".valind.owner", {}) or {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if "started" in owner else "?"
            raise StudyBusy(f"{self.root} is in use by another valind: pid {owner.get('pid', '?')} on host "
                            f"{owner.get('host', '?')}, started {since} ({owner.get('command', '?')}); wait for it to "
                            "finish or stop it, then rerun (finished units are kept)") from None
        self._fd = fd
        write_json({"pid": os.getpid(), "host": HOST, "started": time.time(), "command": self.command},
                   self.root / ".valind.owner")
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            (self.root / ".valind.owner").unlink(missing_ok=True)
            os.close(self._fd)  # releases the flock
            self._fd = None


def _adds(old, new, path: str) -> bool:
    """Whether changing field `path` from `old` to `new` (None: absent) only adds work."""
    if path in ("seeds.values", "values.induced"):
        return isinstance(old, list) and isinstance(new, list) and set(old) <= set(new)
    if path == "controls.count":
        return isinstance(old, int) and isinstance(new, int) and new >= old
    if path == "models":  # new models, every recorded one as it was
        news = {m["name"]: m for m in new}
        return all(news.get(m["name"]) == m for m in old)
    return path == "seeds.adaptive" or path.startswith("seeds.adaptive.")  # its state is keyed by the spec


def _flat(d, prefix: str = "") -> dict:
    """Dotted paths of a spec view; `models` and lists stay whole (they are compared as values)."""
    out = {}
    for k, v in d.items():
        p = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and p != "models":
            out.update(_flat(v, p))
        else:
            out[p] = v
    return out


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes that only add work, other changes) between two result views, as readable lines."""
    a, b = _flat(old), _flat(new)
    adds, other = [], []
    for p in sorted(set(a) | set(b)):
        if a.get(p) != b.get(p):
            line = f"{p} ({_short(a.get(p))} -> {_short(b.get(p))})"
            (adds if _adds(a.get(p), b.get(p), p) else other).append(line)
    return adds, other


def claim(root: Path, spec: Spec, amend: bool = False) -> None:
    """Record `spec` as the owner of the study directory, or refuse it (InputError) when it changes
    what the recorded spec computes."""
    path = root / "study.json"
    rec = read_state(path)
    view = result_view(spec)
    h = content_hash(view)
    if not isinstance(rec, dict) or "spec" not in rec:
        if (root / "stages").is_dir():
            say(f"{root}: no study.json (an older valind, or an unreadable one): this spec now owns the directory")
        rec = {"spec_hash": h, "spec": view, "revisions": {}, "history": [{"time": time.time(), "spec_hash": h,
                                                                             "change": "created"}]}
    elif rec["spec_hash"] != h:
        adds, other = changes(rec["spec"], view)
        if other and not amend:
            raise InputError(
                f"{root} holds the study of another spec (study.json), and this one changes what it computes: "
                + "; ".join(other[:12]) + (f"; and {len(other) - 12} more" if len(other) > 12 else "")
                + ". One study directory holds the results of one spec: give this spec its own study.name, or "
                "rerun with --amend to make it this study's spec (units whose inputs changed are recomputed; "
                "the others are kept)")
        for line in adds + other:
            say(f"study: {'amended' if line in other else 'adds'} {line}")
        rec["history"].append({"time": time.time(), "spec_hash": h, "change": ("amended: " if other else "adds: ")
                               + "; ".join(adds + other)})
        rec.update(spec_hash=h, spec=view)
    write_json(rec, path)


def recorded_revisions(root: Path, spec: Spec) -> dict[str, str]:
    """The hub commits a study's first run resolved, for the revisions its models still ask for (name
    -> sha): a resumed study loads the same commits."""
    rec = read_state(Path(root) / "study.json") or {}
    asked = {m.name: m.revision for m in spec.models}
    return {name: pair[1] for name, pair in (rec.get("revisions") or {}).items()
            if isinstance(pair, list) and len(pair) == 2 and asked.get(name) == pair[0]}  # judges: no revision


def record_revisions(root: Path, spec: Spec, commits: dict[str, str]) -> None:
    """Keep the commits the study's hub models resolved to, with the revision each was asked at."""
    path = root / "study.json"
    rec = read_state(path) or {}
    asked = {m.name: m.revision for m in spec.models}
    new = {**(rec.get("revisions") or {}), **{n: [asked.get(n), c] for n, c in commits.items()}}
    if new != rec.get("revisions"):
        rec["revisions"] = new
        write_json(rec, path)
