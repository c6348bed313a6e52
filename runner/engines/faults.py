"""Fault injection into engine actors, for tests only (tests/test_pool_faults.py).

With VALIND_TEST_ENGINE_FAULTS set to a directory (workers inherit it), an actor obeys the files in
it at each point it reaches (`start`, or a call: `generate`, `score`, `token_logprobs`):
`<point>.delay` holds seconds to wait there, each time (`start.delay`: a node that comes up late);
`<point>.die`, `<point>.hang`, `<point>.dead` are taken by the first actor to reach the point, which
then exits / sleeps forever / raises vLLM's EngineDeadError. Each point reached, and each fault
taken, is logged to calls.log as "pid point time"."""
from __future__ import annotations

import os
import time

ENV = "VALIND_TEST_ENGINE_FAULTS"


def fault(point: str) -> None:
    d = os.environ.get(ENV)
    if not d:
        return
    try:
        with open(os.path.join(d, f"{point}.delay")) as f:
            time.sleep(float(f.read()))
    except FileNotFoundError:
        pass
    _log(d, point)
    for kind in ("die", "hang", "dead"):
        path = os.path.join(d, f"{point}.{kind}")
        try:
            os.rename(path, path + ".taken")  # one actor takes it
        except FileNotFoundError:
            continue
        _log(d, f"{point}.{kind}")
        if kind == "die":
            os._exit(1)
        if kind == "hang":
            time.sleep(10 ** 6)
        from vllm.v1.engine.exceptions import EngineDeadError  # deferred: vLLM (~10 s), for this fault only
        raise EngineDeadError("(injected by VALIND_TEST_ENGINE_FAULTS)")


def _log(d: str, what: str) -> None:
    with open(os.path.join(d, "calls.log"), "a") as f:
        f.write(f"{os.getpid()} {what} {time.time():.3f}\n")
