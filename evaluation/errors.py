"""The root of valind's exceptions, shared by `evaluation` and `runner`.

It lives in `evaluation` because that is the bottom layer: both packages may import it, and
`evaluation` must never import the runner. The CLI (`runner.cli.main`) catches `ValindError`,
prints its message without a traceback and exits with its `exit_code`.
"""
from __future__ import annotations

import reprlib


class ValindError(Exception):
    """Root of valind's errors: the CLI prints the message (no traceback) and exits with exit_code."""
    exit_code = 1


class InputError(ValindError):
    """Bad input the user must fix (a spec, a file, a flag): exit 2."""
    exit_code = 2


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value) for an error message, at most `limit` characters and bounded work: a YAML alias
    bomb is a list of a billion items, whose full repr runs out of memory after a minute."""
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. an int past Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()  # items past these counts and depths become "..."
    r.maxlevel = 3
    r.maxdict = r.maxlist = r.maxtuple = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 4
    r.maxstring = r.maxother = 80
    r.maxlong = 40
    return r


_REPR = _bounded_repr()
