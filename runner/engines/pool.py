"""A pool of Ray actors, each holding one engine; requests are fanned out in batches, or streamed
to engines that take them continuously (runner.engines.stream), and an actor lost mid-stage hands
its requests to the others while its replacement starts in the background."""
from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from typing import Sequence

import ray
from ray.util.state import list_actors

from evaluation.errors import ValindError
from evaluation.types import Request, ScoreRequest
from runner.engines.base import EngineConfig
from runner.engines.cores import bind_engine_threads
from runner.engines.factory import make_engine
from runner.engines.faults import fault
from runner.engines.lost import first_line, lost
from runner.engines.stream import Stream, stream_requests
from runner.progress import progress, say


@ray.remote
class EngineActor:
    def __init__(self, cfg: EngineConfig):
        fault("start")
        self.cores = None
        if not ray.get_gpu_ids():  # on CPUs: threads on cores of its own (GPU actors are left as they are)
            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
            self.cores = bind_engine_threads(max(1, cpus), cfg.tensor_parallel)["cores"]
        self.engine = make_engine(cfg)
        self.stream = Stream(self.engine) if getattr(self.engine, "continuous", False) else None

    def info(self) -> dict:
        return {"name": self.engine.name, "version": self.engine.version, "cores": self.cores,
                "lora_scores": self.engine.lora_scores, "serial_adapters": self.engine.serial_adapters,
                "continuous": self.stream is not None}

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()

    def generate(self, requests: Sequence[Request]) -> list[str]:
        _dies_once()
        fault("generate")
        return self.engine.generate(requests)

    def serve(self, units: dict) -> dict:
        """Continuous feeding (runner.engines.stream): add these units, return those complete."""
        _dies_once()
        fault("generate")
        assert self.stream is not None, "serve() on an engine that takes whole batches only"
        return self.stream.serve(units)

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        fault("score")
        return self.engine.score(requests)

    def token_logprobs(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        fault("token_logprobs")
        return self.engine.token_logprobs(requests)


def _dies_once() -> None:
    marker = os.environ.get("VALIND_TEST_ENGINE_DIES")  # fault injection: die once, mid-stage
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def _holders() -> str:
    """What holds the cluster's CPUs and GPUs: placement groups' reservations, and live actors by
    class (listing actors needs Ray's dashboard; without it, say so)."""
    held: Counter = Counter()
    for g in ray.util.placement_group_table().values():
        if g["state"] == "CREATED":
            res = sum(map(Counter, g["bundles"].values()), Counter())
            held[f"placement group {g['name'] or g['placement_group_id'][:8]}: {_res(res)}"] += 1
    try:
        for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000, raise_on_missing_output=False):
            if a.required_resources and not a.placement_group_id:  # (those in a group are counted in it)
                held[f"actor {a.class_name}: {_res(a.required_resources)}"] += 1
    except Exception as e:  # noqa: BLE001 - a diagnostic inside an error message
        held[f"(live actors not listed: {type(e).__name__})"] += 1
    return "held by: " + ("; ".join(f"{n} × {k}" for k, n in held.items()) or "nothing listed")


def _res(r) -> str:
    return f"{r.get('CPU', 0):g} CPU {r.get('GPU', 0):g} GPU"


class EngineError(ValindError):
    """An engine pool that could not start, or whose actors kept dying."""


class EnginePool:
    """`Engine` over N actors. One engine per base model serves every LoRA adapter of it.

    An actor is lost when it dies (its node gone), its vLLM engine dies (EngineDeadError) or a call
    runs past `call_timeout_s` (it is killed): its batches go to the other actors at once, and a
    replacement is started in the background that joins the fan-out when placed. At most
    `max_restarts` replacements (a crash-looping engine is not restarted forever); the pool fails
    only when no actor is left and no replacement starts within `startup_timeout_s`."""

    def __init__(self, cfg: EngineConfig, actors: int = 1, gpus_per_actor: float = 0.0,
                 cpus_per_actor: float = 1.0, batch_size: int = 64, startup_timeout_s: float = 1800,
                 in_flight: int = 2, max_restarts: int | None = None, call_timeout_s: float = 1800):
        self.cfg, self.batch_size, self.cpus, self.gpus = cfg, batch_size, cpus_per_actor, gpus_per_actor
        # A lost node takes all its actors at once (8 on an 8-GPU node): by default each actor may be
        # replaced once, and any pool at least 3 times.
        self.in_flight, self.restarts, self.max_restarts = in_flight, 0, max_restarts or max(3, actors)
        self.startup_timeout_s, self.call_timeout_s, t0 = startup_timeout_s, call_timeout_s, time.monotonic()
        self._opts = opts = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}
        self._starting: dict = {}  # info ref of a replacement being started -> (actor, requested at)
        self._since: dict = {}  # actor -> when the call it is serving began (for call_timeout_s)
        self.losses: list[str] = []  # why each lost actor was lost, in order
        self.actors = [EngineActor.options(**opts).remote(cfg) for _ in range(actors)]
        infos = [a.info.remote() for a in self.actors]
        ready, _ = ray.wait(infos, num_returns=actors, timeout=startup_timeout_s)
        if len(ready) < actors:
            # Actors that cannot be placed wait forever; say what they asked for and what holds the
            # rest. The pool goes on with those that started (a lost GPU costs speed, not the study).
            free = ray.available_resources()
            why = (f"{actors - len(ready)} of {actors} actor(s) did not start within {startup_timeout_s:g}s; each asks "
                   f"for {cpus_per_actor:g} CPU and {gpus_per_actor:g} GPU, the cluster has {free.get('CPU', 0):g} "
                   f"CPU and {free.get('GPU', 0):g} GPU free ({_holders()})")
            started = [k for k, ref in enumerate(infos) if ref in ready]
            for k, a in enumerate(self.actors):  # the others: never placed, or still starting
                if k not in started:
                    ray.kill(a)
            if not started:
                self.actors = []
                raise EngineError(f"engine pool for {cfg.model}: {why}. Close other pools, or lower engine.actors / "
                                  "engine.gpus_per_actor (engine.startup_timeout_s sets the wait)")
            say(f"  engine pool for {cfg.model}: {why}; going on with {len(started)}")
            infos, self.actors = [infos[k] for k in started], [self.actors[k] for k in started]
        self.size = len(self.actors)  # those that started (kept for reports after close)
        self.cores = []  # per actor: the CPU cores its threads are bound to (None on GPUs)
        self._info = None
        for ref, actor in zip(infos, list(self.actors)):
            try:
                self._info = ray.get(ref)
                self.cores.append(self._info["cores"])
            except ray.exceptions.RayActorError as e:  # died while starting (its node was lost, say)
                self._lose(actor, f"it died while starting ({first_line(e)})", {}, [])
        self._wait_for_replacement()
        info = self._info
        self.name, self.version = info["name"], info["version"]
        self.lora_scores = info["lora_scores"]  # a LoRA engine that can also score log-probs
        self.serial_adapters = info["serial_adapters"]  # adapters served one after another, not batched together
        # generation streamed to the engines (engine.feeding), where they take requests one by one
        self.continuous = cfg.feeding == "continuous" and info["continuous"]
        self.startup_s = time.monotonic() - t0

    def _batches(self, items: Sequence, chunk: int | None = None) -> list[list]:
        """Consecutive batches of at most batch_size. An engine that serves one adapter at a time
        (`serial_adapters`) runs a batch that spans two adapters as two passes, the second often a
        small one: its batches are also cut where the adapter changes. `chunk`: batches of that many
        requests of one adapter instead, whatever the pool's batch size and engine."""
        size = chunk or self.batch_size
        if not (self.serial_adapters or chunk):
            return [list(items[i:i + size]) for i in range(0, len(items), size)]
        out = []
        for _, same in itertools.groupby(items, key=lambda r: r.adapter):
            same = list(same)
            out += [same[i:i + size] for i in range(0, len(same), size)]
        return out

    def _fan_out(self, method: str, items: Sequence, desc: str, chunk: int | None = None) -> list:
        batches = self._batches(items, chunk)
        results: list = [None] * len(batches)
        pending: dict = {}  # call ref -> (batch, actor)
        todo = list(range(len(batches)))  # batches to submit, the next first
        self._join_ready(timeout=0)
        with progress(total=len(items), desc=desc) as bar:
            while todo or pending:
                for actor in self._timed_out():
                    self._lose(actor, f"a call ran past engine.call_timeout_s ({self.call_timeout_s:g}s); "
                                      "the actor was killed", pending, todo)
                self._submit(method, batches, todo, pending)
                if (ref := self._next_done(pending)) is None:
                    continue
                b, actor = pending.pop(ref)
                try:
                    results[b] = ray.get(ref)
                except Exception as e:
                    if (why := lost(e)) is None:
                        raise  # the engine refused the request: not the actor's fault
                    todo.insert(0, b)
                    self._lose(actor, why, pending, todo)
                    continue
                if any(a == actor for _, a in pending.values()):
                    self._since[actor] = time.monotonic()  # its next call, queued behind this one, begins
                else:
                    self._since.pop(actor, None)
                bar.update(len(batches[b]))
        return [x for r in results for x in r]

    def _submit(self, method: str, batches: list, todo: list, pending: dict) -> None:
        """Give each actor batches until it has `in_flight` (the next is queued while one is served)."""
        load = {a: 0 for a in self.actors}
        for _, a in pending.values():
            load[a] = load.get(a, 0) + 1
        for _ in range(self.in_flight):
            for actor in self.actors:
                if todo and load[actor] < self.in_flight:
                    b = todo.pop(0)
                    pending[getattr(actor, method).remote(batches[b])] = (b, actor)
                    self._since.setdefault(actor, time.monotonic())
                    load[actor] += 1

    def _timed_out(self) -> list:
        """The actors whose current call has run call_timeout_s or longer."""
        now = time.monotonic()
        return [a for a, t in self._since.items() if now - t >= self.call_timeout_s]

    def _next_done(self, pending: dict):
        """The next finished call of `pending`; None (loop again) when no actor is left (after waiting
        for a replacement), a call ran past call_timeout_s, or a replacement joined the pool."""
        if not pending:  # no actor left: only a replacement can go on
            self._wait_for_replacement()
            return None
        done, _ = ray.wait(list(pending) + list(self._starting), num_returns=1, timeout=self._next_deadline())
        if not done:  # a call ran past call_timeout_s: taken out at the top of the loop
            return None
        if done[0] in self._starting:
            self._join(done[0])
            return None
        return done[0]

    def _next_deadline(self) -> float | None:
        """Seconds until the oldest running call passes call_timeout_s (None: no call running)."""
        if not self._since:
            return None
        return max(0.0, min(self._since.values()) + self.call_timeout_s - time.monotonic())

    def _lose(self, actor, why: str, pending: dict, todo: list, held: dict | None = None) -> None:
        """Take a lost actor out (killed, in case it hangs or its engine died under a live actor):
        its batches in flight (streamed: the units it `held`) go back to the front of `todo`, and a
        replacement is requested."""
        if not any(a == actor for a in self.actors):
            return  # already lost (another of its calls reported first)
        self.actors = [a for a in self.actors if a != actor]
        self._since.pop(actor, None)
        ray.kill(actor, no_restart=True)
        back = [pending.pop(ref)[0] for ref, (_, a) in list(pending.items()) if a == actor]
        if held is not None:  # streamed: the units it held, whichever of its calls brought them
            back = [u for u, a in held.items() if a == actor]
            for u in back:
                del held[u]
        todo[:0] = sorted(back)
        self.losses.append(why)
        say(f"  engine pool for {self.cfg.model}: an actor was lost: {why}; its batches go to the "
            f"{len(self.actors)} other actor(s) now")
        self._request_replacement()

    def _request_replacement(self) -> None:
        """Start a replacement in the background, within the restart budget."""
        if self.restarts >= self.max_restarts:
            say(f"  engine pool for {self.cfg.model}: no replacement: {self.restarts} of at most "
                f"{self.max_restarts} restarts used; going on with {len(self.actors)} actor(s)")
            return
        self.restarts += 1
        new = EngineActor.options(**self._opts).remote(self.cfg)
        self._starting[new.info.remote()] = (new, time.monotonic())
        say(f"  engine pool for {self.cfg.model}: a replacement actor was requested (restart {self.restarts} of "
            f"at most {self.max_restarts}); it joins when placed")

    def _join(self, ref) -> None:
        """A replacement answered: it joins the actors, or, dead while starting, counts as lost."""
        new, asked = self._starting.pop(ref)
        try:
            self._info = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            ray.kill(new, no_restart=True)
            why = f"the replacement actor died while starting ({first_line(e)})"
            self.losses.append(why)
            say(f"  engine pool for {self.cfg.model}: {why}")
            self._request_replacement()
            return
        self.actors.append(new)
        self.cores.append(self._info["cores"])
        say(f"  engine pool for {self.cfg.model}: replacement actor joined after {time.monotonic() - asked:.0f} s")

    def _join_ready(self, timeout: float) -> None:
        if self._starting:
            done, _ = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=timeout)
            for ref in done:
                self._join(ref)

    def _wait_for_replacement(self) -> None:
        """With no actor left, wait up to startup_timeout_s for a replacement; else fail, saying why."""
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.actors:
            gone = f"{len(self.losses)} actor(s) lost (last: {self.losses[-1] if self.losses else '-'})"
            if not self._starting:
                raise EngineError(f"engine pool for {self.cfg.model}: no actor left, {gone}, and no replacement "
                                  f"can be started ({self.restarts} of at most {self.max_restarts} restarts used)")
            done, _ = ray.wait(list(self._starting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                for actor, _ in self._starting.values():
                    ray.kill(actor, no_restart=True)
                self._starting.clear()
                raise EngineError(f"engine pool for {self.cfg.model}: no actor left, {gone}, and no replacement "
                                  f"started within engine.startup_timeout_s ({self.startup_timeout_s:g}s; ray "
                                  f"status: is there room for {self.cpus:g} CPU and {self.gpus:g} GPU?)")
            self._join(done[0])

    def generate(self, requests: Sequence[Request], desc: str = "generate") -> list[str]:
        if self.continuous:
            return stream_requests(self, requests, desc)
        return self._fan_out("generate", requests, desc)

    def score(self, requests: Sequence[ScoreRequest], desc: str = "score") -> list[float]:
        return self._fan_out("score", requests, desc)

    def token_logprobs(self, requests: Sequence[ScoreRequest], chunk: int,
                       desc: str = "log-probs") -> list[list[float]]:
        """Per-token log-probs of each continuation, each engine call one `chunk` of one adapter's
        requests: the batch a text is computed in depends on the requests alone, never on the
        pool's batch size or actor count (vLLM's numerics depend on the batch)."""
        return self._fan_out("token_logprobs", requests, desc, chunk)

    def close(self, timeout_s: float = 120) -> None:
        """Shut the engines down (vLLM's engine-core processes hold GPU memory that killing the
        actor can leave behind), kill the actors, and wait until their CPUs and GPUs are free again."""
        for actor, _ in self._starting.values():  # replacements not placed (or not started) yet
            ray.kill(actor, no_restart=True)
        self._starting.clear()
        if not self.actors:
            return
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=timeout_s)
        except Exception as e:  # a dead or stuck actor: killing it is all that is left
            say(f"  engine pool for {self.cfg.model}: shutdown failed ({type(e).__name__}), killing its actors")
        held = {"CPU": self.cpus * len(self.actors), "GPU": self.gpus * len(self.actors)}
        before = ray.available_resources()
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = ray.available_resources()
            if all(now.get(k, 0) >= before.get(k, 0) + v - 1e-6 for k, v in held.items() if v):
                return
            time.sleep(0.2)
        say(f"  engine pool for {self.cfg.model}: its resources were not back after {timeout_s:g}s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
