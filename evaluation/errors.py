"""The root of valind's exceptions, shared by `evaluation` and `runner`.

It lives in `evaluation` because that is the bottom layer: both packages may import it, and
`evaluation` must never import the runner. The CLI (`runner.cli.main`) catches `ValindError`,
prints its message without a traceback and exits with its `exit_code`.
"""
from __future__ import annotations


class ValindError(Exception):
    """Root of valind's errors: the CLI prints the message (no traceback) and exits with exit_code."""
    exit_code = 1


class InputError(ValindError):
    """Bad input the user must fix (a spec, a file, a flag): exit 2."""
    exit_code = 2
