"""Cache keys. Each stage declares, next to the code that reads them, the inputs its unit depends
on; one helper hashes them. A rerun recomputes nothing, a changed input recomputes only the units
downstream of it, and docs/ARCHITECTURE.md's key table is generated from these declarations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from runner.spec import content_hash

CODE_VERSION = "valind-0.2"  # part of every key: bump when a stage's semantics change


@dataclass(frozen=True)
class Key:
    """The key of a store folder (`stage`): a hash of CODE_VERSION, the folder and `inputs`, each
    a name (shown in the key table) and a getter of (ctx, run); per_run keys have one unit per run."""
    stage: str
    inputs: dict[str, Callable[[Any, Any], Any]]
    per_run: bool = False

    def __call__(self, ctx, run=None) -> str:
        return ctx.key(self, run)

    def compute(self, ctx, run=None) -> str:
        if self.per_run and run is None:
            raise ValueError(f"the {self.stage} key is per run")
        return content_hash(CODE_VERSION, self.stage, {name: get(ctx, run) for name, get in self.inputs.items()})


def key_table() -> str:
    """The markdown table of every declared key, in data-flow order."""
    from runner.stages import KEYS
    lines = ["| unit (`stages/<folder>/<key>/`) | one per | hashed inputs |", "|---|---|---|"]
    for k in KEYS.values():
        lines.append(f"| `{k.stage}` | {'run' if k.per_run else 'study'} | "
                     + ", ".join(f"`{name}`" for name in k.inputs) + " |")
    return "\n".join(lines)
