"""Progress bars and one-line stage summaries (rich on a terminal, plain lines in logs)."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm.auto import tqdm

from runner.secrets import redact


@contextmanager
def progress(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, file=sys.stderr,
               mininterval=1.0, disable=None if sys.stderr.isatty() else False)
    try:
        yield bar
    finally:
        bar.close()


def say(msg: str) -> None:
    print(redact(msg), flush=True)
