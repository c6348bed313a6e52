"""The stages, in data-flow order: annotate → curate → train → generate → score → analyze.

Each module declares the keys of the units it writes (runner.stages.keys) and a `run(ctx)` that
produces them, pulling its inputs with `ctx.need(<earlier stage>)`."""
from __future__ import annotations

from runner.stages import analyze, annotate, curate, generate, qa, score, train
from runner.stages.keys import ADAPTIVE

STAGES = {m.__name__.rsplit(".", 1)[1]: m for m in (annotate, curate, train, generate, score, analyze)}
KEYS = {k.stage: k for k in (annotate.ANNOTATE, annotate.ANNOTATE_CHECK, curate.CURATE, train.TRAIN, generate.ITEMS,
                              generate.GENERATE, qa.QA, score.SCORE, score.AGREEMENT, analyze.ANALYZE,
                              ADAPTIVE)}  # store folder -> Key
# the stage that writes each store folder (a unit a later stage cannot read is recomputed by it)
FOLDER_STAGE = {"annotate": "annotate", "annotate_check": "annotate", "curate": "curate", "train": "train",
                "items": "generate", "generate": "generate", "qa": "score", "score": "score", "agreement": "score",
                "analyze": "analyze"}
