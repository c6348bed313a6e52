"""A pool of Ray actors, each holding one engine; requests are fanned out in batches."""
from __future__ import annotations

import itertools
import os
import time
from typing import Sequence

import ray

from evaluation.errors import ValindError
from evaluation.types import Request, ScoreRequest
from runner.engines.base import EngineConfig, make_engine
from runner.engines.cores import bind_engine_threads
from runner.progress import progress, say


@ray.remote
class EngineActor:
    def __init__(self, cfg: EngineConfig):
        self.cores = None
        if not ray.get_gpu_ids():  # on CPUs: threads on cores of its own (GPU actors are left as they are)
            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
            self.cores = bind_engine_threads(max(1, cpus), cfg.tensor_parallel)["cores"]
        self.engine = make_engine(cfg)

    def info(self) -> dict:
        return {"name": self.engine.name, "version": self.engine.version, "cores": self.cores,
                "lora_scores": self.engine.lora_scores, "serial_adapters": self.engine.serial_adapters}

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()

    def generate(self, requests: Sequence[Request]) -> list[str]:
        marker = os.environ.get("VALIND_TEST_ENGINE_DIES")  # fault injection: die once, mid-stage
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return self.engine.generate(requests)

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        return self.engine.score(requests)

    def token_logprobs(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        return self.engine.token_logprobs(requests)


def _holders() -> str:
    """What holds the cluster's CPUs and GPUs: placement groups' reservations, and live actors by
    class (listing actors needs Ray's dashboard; without it, say so)."""
    from collections import Counter
    held = Counter()
    for g in ray.util.placement_group_table().values():
        if g["state"] == "CREATED":
            res = sum(map(Counter, g["bundles"].values()), Counter())
            held[f"placement group {g['name'] or g['placement_group_id'][:8]}: {_res(res)}"] += 1
    try:
        from ray.util.state import list_actors
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
    """`Engine` over N actors. One engine per base model serves every LoRA adapter of it."""

    def __init__(self, cfg: EngineConfig, actors: int = 1, gpus_per_actor: float = 0.0,
                 cpus_per_actor: float = 1.0, batch_size: int = 64, startup_timeout_s: float = 1800,
                 in_flight: int = 2, max_restarts: int | None = None):
        self.cfg, self.batch_size, self.cpus, self.gpus = cfg, batch_size, cpus_per_actor, gpus_per_actor
        # A lost node takes all its actors at once (8 on an 8-GPU node): by default each actor may be
        # replaced once, and any pool at least 3 times.
        self.in_flight, self.restarts, self.max_restarts = in_flight, 0, max_restarts or max(3, actors)
        self.startup_timeout_s, t0 = startup_timeout_s, time.monotonic()
        self._opts = opts = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}
        self._replaced: dict = {}  # dead actor -> its replacement
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
        for ref, actor in zip(infos, list(self.actors)):
            try:
                info = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # died while starting (its node was lost, say)
                info = ray.get(self._replace(actor, e).info.remote())
            self.cores.append(info["cores"])
        self.name, self.version = info["name"], info["version"]
        self.lora_scores = info["lora_scores"]  # a LoRA engine that can also score log-probs
        self.serial_adapters = info["serial_adapters"]  # adapters served one after another, not batched together
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
        pending = {}
        free = list(self.actors) * self.in_flight  # the next batch is queued while one is being served
        todo = list(range(len(batches)))
        with progress(total=len(items), desc=desc) as bar:
            while todo or pending:
                while free and todo:
                    b, actor = todo.pop(0), free.pop()
                    pending[getattr(actor, method).remote(batches[b])] = (b, actor)
                done, _ = ray.wait(list(pending), num_returns=1)
                b, actor = pending.pop(done[0])
                try:
                    results[b] = ray.get(done[0])
                except ray.exceptions.RayActorError as e:  # resubmit the batch to a fresh actor
                    todo.insert(0, b)
                    free.append(self._replace(actor, e))
                    continue
                free.append(actor)
                bar.update(len(batches[b]))
        return [x for r in results for x in r]

    def _replace(self, dead, error: Exception):
        """The actor that took over from `dead` (started now, the first time it is asked for)."""
        if dead not in self._replaced:
            self.restarts += 1
            if self.restarts > self.max_restarts:
                raise EngineError(f"engine pool for {self.cfg.model}: actors died {self.restarts} times "
                                  f"(limit {self.max_restarts}); last: {error}") from error
            say(f"  engine pool for {self.cfg.model}: an actor died ({type(error).__name__}); restarting it "
                f"and resubmitting its batches (restart {self.restarts} of at most {self.max_restarts})")
            new = EngineActor.options(**self._opts).remote(self.cfg)
            try:
                ray.get(new.info.remote(), timeout=self.startup_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                ray.kill(new)
                raise EngineError(f"engine pool for {self.cfg.model}: the actor replacing a dead one did not start "
                                  f"within {self.startup_timeout_s:g}s (ray status: is there room for "
                                  f"{self.cpus:g} CPU and {self.gpus:g} GPU?)") from e
            self.actors = [new if a == dead else a for a in self.actors]
            self._replaced[dead] = new
        return self._replaced[dead]

    def generate(self, requests: Sequence[Request], desc: str = "generate") -> list[str]:
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
