"""What the cluster can hold, and what the running stages ask an autoscaler for.

The most a cluster can hold is its live resources, or, where the spec declares a `cluster:` (an
autoscaler's maximum: `min_workers: 0` shows few or no GPUs at start), that many GPUs. Each stage
asks the autoscaler for its engine pools' or training cells' resources at its start
(`ray.autoscaler.sdk.request_resources`: a request, not a reservation, and nothing on a cluster
without an autoscaler) and clears the request at its end, so nodes are not released mid-stage and
re-acquired."""
from __future__ import annotations

import math
from contextlib import contextmanager

from evaluation.errors import ValindError


class CapacityError(ValindError):
    """A pool or a training cell that the cluster can never hold."""


def capacity(cluster=None, resources: dict | None = None) -> dict[str, float]:
    """The most the cluster can hold: its live CPUs (and the most on one node), its GPUs or those of
    the spec's `cluster:` (nodes × gpus_per_node) where more, and the most GPUs on one node.
    `resources`: a cluster's totals instead of the live one's (no Ray needed)."""
    if resources is None:
        import ray
        resources = ray.cluster_resources()
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    else:
        nodes = [resources]
    declared = cluster.nodes * cluster.gpus_per_node if cluster else 0
    return {"CPU": resources.get("CPU", 0), "GPU": max(resources.get("GPU", 0), declared),
            "node_cpus": max((n.get("CPU", 0) for n in nodes), default=0),
            "node_gpus": max([n.get("GPU", 0) for n in nodes] + [cluster.gpus_per_node if cluster else 0])}


def fit_actors(what: str, actors: int, cpus: float, gpus: float, cluster=None, quiet: bool = False) -> int:
    """`actors` capped at how many of `cpus` CPU and `gpus` GPU the cluster can ever hold at once
    (saying so); none at all is an error naming the pool (waiting for it would last forever). GPU
    actors are counted by GPUs (a GPU node brings a CPU per GPU); with no GPU seen nor declared yet
    (an autoscaler's nodes still to come) they are not capped."""
    cap = capacity(cluster)
    where = "the spec's cluster: section" if cluster else "the live cluster"
    kind, need = ("GPU", gpus) if gpus else ("CPU", cpus)
    if not cap[kind]:
        return actors
    if need > cap[f"node_{kind.lower()}s"]:
        raise CapacityError(f"engine pool for {what}: an actor asks for {need:g} {kind}, and no node of the cluster "
                            f"has that many (at most {cap[f'node_{kind.lower()}s']:g} a node, from {where}); lower "
                            f"engine.{kind.lower()}s_per_actor")
    fit = math.floor(cap[kind] / need + 1e-9)
    if fit < actors and not quiet:
        from runner.progress import say
        say(f"  engine pool for {what}: engine.actors {actors} capped at {fit}: the cluster holds at most "
            f"{cap[kind]:g} {kind} ({where}), each actor asks for {need:g}")
    return min(actors, fit)


def engine_bundles(ctx, model: str) -> list[dict]:
    """One bundle per actor of a model's engine pool, as many as the cluster can hold."""
    e = ctx.engine_spec(model)
    cpus = float(e.cpus_per_actor or 1)
    bundle = {"CPU": cpus, **({"GPU": e.gpus_per_actor} if e.gpus_per_actor else {})}
    return [bundle] * fit_actors(model, e.actors, cpus, e.gpus_per_actor, ctx.spec.cluster, quiet=True)


def stage_bundles(ctx, stage: str) -> list[dict]:
    """What a stage's pools (opened one after another: the largest; judges opened together: all)
    or training cells (as many as run at once) ask for. Needs Ray (read when Demand asks)."""
    s = ctx.spec
    if stage == "annotate":
        judges = [s.annotate.judge_model] + ([s.annotate.check.judge_model] if s.annotate.check else [])
        return max((engine_bundles(ctx, m) for m in judges), key=_gpus)
    if stage == "generate":
        return max((engine_bundles(ctx, m.name) for m in s.models), key=_gpus)
    if stage == "score":
        judged = [b for m in sorted(ctx.judge_models()) for b in engine_bundles(ctx, m)]
        return max([judged] + [engine_bundles(ctx, m.name) for m in s.models], key=_gpus)
    if stage == "train":
        from runner.sweep import max_concurrent
        t = s.train
        per = {"CPU": float(t.cpus_per_worker), **({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {})}
        return [per] * t.workers * max_concurrent(t, s.cluster)
    return []


def _gpus(bundles: list[dict]) -> tuple[float, float]:
    return sum(b.get("GPU", 0) for b in bundles), sum(b.get("CPU", 0) for b in bundles)


class Demand:
    """The autoscaler request of the stages running (nested: a stage pulls earlier ones): theirs
    together, asked at each stage's start and end (request_resources replaces the last request;
    an empty one clears it). Nothing is asked while Ray is not started; `ask` then does it."""

    def __init__(self) -> None:
        self._stages: list = []  # per running stage: a function that gives its bundles
        self.asked: list[dict] | None = None  # the last request made

    @contextmanager
    def stage(self, bundles):
        """`bundles()`: the stage's bundles, read when Ray is up."""
        self._stages.append(bundles)
        try:
            self.ask()
            yield
        finally:
            self._stages.pop()
            self.ask()

    def ask(self) -> None:
        import ray
        if not ray.is_initialized():
            return
        from ray.autoscaler.sdk import request_resources
        want = []
        for bundles in self._stages:
            try:
                want += bundles()
            except Exception as e:  # noqa: BLE001 - a request is a hint; the pool that cannot fit says so
                from runner.progress import say
                say(f"  (nothing asked of the autoscaler for a stage: {type(e).__name__}: {e})")
        if want != self.asked:
            request_resources(bundles=want)
            self.asked = want
