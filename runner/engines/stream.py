"""Continuous feeding, the actor's side: requests arrive in small units and join the engine's running
batch as soon as the engine admits them, so the batch stays full while short answers finish
(a batch run to its longest sequence thins out instead). Each `serve` call adds the units it brings
and steps the engine until at least one unit is complete; the pool keeps a call queued behind the
running one, so the engine never waits for the pool. Plain Python over the engine's `add`/`step`
(runner.engines.vllm_engine), on the actor's own thread: no locks, the same threads as a batch."""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Hashable
from typing import Any, Sequence

import ray

from runner.engines.lost import lost
from runner.progress import progress

# Each serve call brings units of batch_size // UNITS_PER_BATCH requests: small, so that the place
# of a finished unit is refilled soon, and few enough that a call's overhead stays below a step's.
UNITS_PER_BATCH = 8
_FAN_OUTS = itertools.count()  # tags each fan-out's units: one cut short (a refused request) leaves no clash


class Stream:
    """Units in flight on one engine. An engine that holds one adapter at a time (`admits`, merged
    weights on CPUs) gets the next adapter's requests only once the running ones are done: units
    join in the order they came, a unit that spans two adapters as two runs."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.waiting: deque[tuple[Hashable, list[int]]] = deque()  # (unit, its request indices of one run)
        self.requests: dict[Hashable, Sequence] = {}  # unit -> its requests
        self.outs: dict[Hashable, list] = {}  # unit -> texts so far
        self.left: dict[Hashable, int] = {}  # unit -> requests not finished
        self.running: dict[str, tuple[Hashable, int]] = {}  # engine request id -> (unit, index)

    def serve(self, units: dict[Hashable, Sequence]) -> dict[Hashable, list[str]]:
        """Add `units` (id -> requests); return the units complete once the engine has finished at
        least one (all those complete, any call's), or, with nothing left to run, none."""
        for u, reqs in units.items():
            self.requests[u], self.outs[u], self.left[u] = reqs, [None] * len(reqs), len(reqs)
            key = (lambda i: reqs[i].adapter) if getattr(self.engine, "serial_adapters", False) else (lambda i: 0)
            self.waiting.extend((u, list(idx)) for _, idx in itertools.groupby(range(len(reqs)), key=key))
        while True:
            self._admit()
            done = [u for u, n in self.left.items() if n == 0]
            if done or not self.running:
                break
            for rid, text in self.engine.step():
                u, i = self.running.pop(rid)
                self.outs[u][i] = text
                self.left[u] -= 1
        for u in done:
            del self.left[u], self.requests[u]
        return {u: self.outs.pop(u) for u in done}

    def _admit(self) -> None:
        """Queue waiting runs in the engine, in order, while it admits their adapter (any adapter
        when nothing runs: the engine loads it)."""
        while self.waiting:
            u, idx = self.waiting[0]
            reqs = self.requests[u]
            if self.running and not self.engine.admits(reqs[idx[0]].adapter):
                return
            self.waiting.popleft()
            for rid, i in zip(self.engine.add([reqs[i] for i in idx]), idx):
                self.running[rid] = (u, i)


def stream_requests(pool: Any, requests: Sequence, desc: str) -> list[str]:
    """The pool's side: `requests` in units over the pool's actors, each actor holding about
    batch_size × in_flight requests and one `serve` call queued behind its running one; answers
    in request order. An actor lost (or silent for call_timeout_s: no unit finished) hands the
    units it held to the others, as `EnginePool._fan_out` does with batches."""
    units = pool._batches(requests, chunk=max(1, pool.batch_size // UNITS_PER_BATCH))
    tag = next(_FAN_OUTS)
    results: list = [None] * len(units)
    todo = list(range(len(units)))  # units to send, the next first
    held: dict[int, Any] = {}  # unit sent -> its actor, until it comes back
    pending: dict = {}  # serve call ref -> (None, actor)
    pool._join_ready(timeout=0)
    with progress(total=len(requests), desc=desc) as bar:
        while todo or held:
            for actor in pool._timed_out():
                pool._lose(actor, f"no request finished within engine.call_timeout_s ({pool.call_timeout_s:g}s); "
                                  "the actor was killed", pending, todo, held)
            _top_up(pool, units, tag, todo, held, pending)
            if (ref := pool._next_done(pending)) is None:
                continue
            _, actor = pending.pop(ref)
            try:
                got = ray.get(ref)
            except Exception as e:
                if (why := lost(e)) is None:
                    raise  # the engine refused a request: not the actor's fault
                pool._lose(actor, why, pending, todo, held)
                continue
            for (t, u), texts in got.items():
                if t == tag and held.get(u) == actor:  # (a unit given back after a timeout is someone else's now)
                    results[u] = texts
                    del held[u]
                    bar.update(len(texts))
            if any(a == actor for _, a in pending.values()):
                pool._since[actor] = time.monotonic()  # its next call, queued behind this one, begins
            else:
                pool._since.pop(actor, None)
    return [x for r in results for x in r]


def _top_up(pool: Any, units: list, tag: int, todo: list, held: dict, pending: dict) -> None:
    """Per actor: units from `todo` up to batch_size × in_flight requests held, in at most two
    calls (one running, one queued); an actor that holds units always has a call to serve them."""
    calls: dict = {a: 0 for a in pool.actors}
    for _, a in pending.values():
        calls[a] = calls.get(a, 0) + 1
    room = {a: pool.batch_size * pool.in_flight for a in pool.actors}
    for u, a in held.items():
        room[a] = room.get(a, 0) - len(units[u])
    for actor in pool.actors:
        while calls[actor] < 2:
            new: dict[tuple[int, int], list] = {}
            while todo and room[actor] > 0:
                u = todo.pop(0)
                new[(tag, u)], held[u] = units[u], actor
                room[actor] -= len(units[u])
            if not new and (calls[actor] or not any(a == actor for a in held.values())):
                break
            pending[actor.serve.remote(new)] = (None, actor)
            pool._since.setdefault(actor, time.monotonic())
            calls[actor] += 1
