"""The stages, in data-flow order: annotate → curate → train → generate → score → analyze.

Each module declares the keys of the units it writes (runner.stages.keys) and a `run(ctx)` that
produces them through `Unit`s (runner.stages.unit), pulling its inputs with `ctx.need(<an earlier
stage's result type>)`. This package imports every stage; no module below it imports the package."""
from __future__ import annotations

from runner.stages import analyze, annotate, curate, generate, qa, score, score_check, train
from runner.stages.keys import ADAPTIVE, FOLDER_STAGE, Key, render_key_table

__all__ = ["STAGES", "KEYS", "FOLDER_STAGE", "key_table"]

STAGES = {m.__name__.rsplit(".", 1)[1]: m for m in (annotate, curate, train, generate, score, analyze)}
KEYS: dict[str, Key] = {k.stage: k for k in (annotate.ANNOTATE, annotate.ANNOTATE_CHECK, curate.CURATE, train.TRAIN,
                                             generate.ITEMS, generate.GENERATE, qa.QA, score.SCORE, score.AGREEMENT,
                                             score_check.SCORE_CHECK, analyze.ANALYZE, ADAPTIVE)}  # store folder -> Key


def key_table() -> str:
    """The markdown table of every declared key, in data-flow order (docs/ARCHITECTURE.md's)."""
    return render_key_table(KEYS.values())
