"""A unit's lifecycle: its key, its store directory, whether it is cached, and producing it.

Every stage writes its results through `Unit`s (runner.stages.keys.Key.unit makes one), so each
unit ends with `_DONE.json` (its files and upstream units verified, runner.store) or, when its
production raised, `_FAILED.json` (the error `valind status` shows); a failed unit is produced again
by the next run. Below the stages: it imports only the store.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from runner.store import Store


@dataclass(frozen=True)
class Unit:
    """One stored unit: `<study>/stages/<folder>/<key>/`."""
    store: Store = field(repr=False, compare=False)
    folder: str
    key: str

    @property
    def dir(self) -> Path:
        return self.store.unit(self.folder, self.key)

    def __truediv__(self, name: str) -> Path:
        """A file of the unit: `unit / "scores.parquet"`."""
        return self.dir / name

    def cached(self) -> bool:
        """Whether the unit is complete and intact (its _DONE.json verifies)."""
        return self.store.done(self.folder, self.key)

    def problem(self) -> str | None:
        return self.store.problem(self.folder, self.key)

    def info(self) -> dict[str, Any]:
        """What its _DONE.json records beside the files."""
        info: dict[str, Any] = self.store.info(self.folder, self.key)
        return info

    def failed(self) -> dict[str, Any] | None:
        return self.store.failed(self.folder, self.key)

    def files_hash(self) -> str:
        return self.store.files_hash(self.folder, self.key)

    def mark_done(self, info: dict[str, Any] | None = None, inputs: Iterable[Unit] = (),
                  skip: Iterable[str] = ()) -> None:
        """Complete the unit: its files (all but `skip`) and the upstream units it was computed from."""
        self.store.mark_done(self.folder, self.key, info, inputs=[(u.folder, u.key) for u in inputs], skip=skip)

    def mark_failed(self, error: BaseException | str) -> None:
        self.store.mark_failed(self.folder, self.key, error)

    def ensure(self, label: str, fn: Callable[[], Done]) -> Unit:
        """The unit, produced first (`produce`) unless it is cached."""
        if not self.cached():
            self.produce(label, fn)
        return self

    def produce(self, label: str, fn: Callable[[], Done]) -> None:
        """Produce the unit: `fn` writes its files and says what to record; the unit is then marked
        done, or, if `fn` raised, failed (the error propagates)."""
        with producing([self], label):
            done = fn()
            self.mark_done(done.info, done.inputs, done.skip)


@dataclass(frozen=True)
class Done:
    """What a produced unit records in its _DONE.json (Unit.mark_done's arguments)."""
    info: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[Unit, ...] = ()
    skip: tuple[str, ...] = ()


@contextmanager
def producing(units: Iterable[Unit], label: str) -> Iterator[None]:
    """Produce several units (each marked done inside the block as it finishes): an error marks each
    one not yet done failed (`valind status` shows it) and propagates."""
    units = list(units)
    try:
        yield
    except Exception as e:
        for u in units:
            if not u.cached():
                u.mark_failed(f"{label}: {type(e).__name__}: {e}")
        raise


class StageResult:
    """What a stage's `run(ctx)` returns: a small dataclass per stage naming its `stage`, so that
    `ctx.need(Annotated)` is typed (runner.context.StudyContext.need)."""
    stage: ClassVar[str]
