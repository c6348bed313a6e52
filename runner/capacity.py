"""What the cluster can hold, and what the running stages ask an autoscaler for.

The most a cluster can hold is its live resources, or, where the spec declares a `cluster:` (an
autoscaler's maximum: `min_workers: 0` shows few or no GPUs at start), that many GPUs (the
arithmetic: runner.cluster_fit). Each stage asks the autoscaler for its engine pools' or training
cells' resources at its start (`ray.autoscaler.sdk.request_resources`: a request, not a reservation,
and nothing on a cluster without an autoscaler) and clears the request at its end, so nodes are not
released mid-stage and re-acquired."""
from __future__ import annotations

from contextlib import contextmanager

from evaluation.errors import ValindError
from runner import cluster_fit
from runner.cluster_fit import Room
from runner.progress import say
from runner.spec import ClusterSpec, TrainSpec


class CapacityError(ValindError):
    """A pool or a training cell that the cluster can never hold."""


def capacity(cluster: ClusterSpec | None = None, resources: dict | None = None) -> dict[str, float]:
    """The most the cluster can hold (runner.cluster_fit.limits) of the live Ray cluster's alive
    nodes, with the spec's `cluster:`. `resources`: one node's totals instead of the live cluster's
    (no Ray needed)."""
    if resources is None:
        # deferred: ray takes ~0.5 s to import and is needed only where a cluster runs
        import ray
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    else:
        nodes = [resources]
    return cluster_fit.limits(cluster_fit.of_nodes(nodes, "live"), cluster)


def _where(cluster: ClusterSpec | None) -> str:
    return "the spec's cluster: section" if cluster else "the live cluster"


def fit_actors(what: str, actors: int, cpus: float, gpus: float, cluster: ClusterSpec | None = None,
               quiet: bool = False) -> int:
    """`actors` capped at how many of `cpus` CPU and `gpus` GPU the cluster can ever hold at once
    (saying so); none at all is an error naming the pool (waiting for it would last forever). GPU
    actors are counted by GPUs; with no GPU seen nor declared yet (an autoscaler's nodes still to
    come) they are not capped."""
    room = Room.of(capacity(cluster), cpus, gpus)
    if not room.total:
        return actors
    if room.need > room.node:
        raise CapacityError(f"engine pool for {what}: an actor asks for {room.need:g} {room.kind}, and no node of "
                            f"the cluster has that many (at most {room.node:g} a node, from {_where(cluster)}); lower "
                            f"engine.{room.kind.lower()}s_per_actor")
    fit = room.at_once()
    if fit < actors and not quiet:
        say(f"  engine pool for {what}: engine.actors {actors} capped at {fit}: the cluster holds at most "
            f"{room.total:g} {room.kind} ({_where(cluster)}), each actor asks for {room.need:g}")
    return min(actors, fit)


def max_concurrent(train: TrainSpec, cluster: ClusterSpec | None = None, resources: dict | None = None) -> int:
    """How many cells' worker groups fit at once. GPU cells are sized from the spec's `cluster` when
    it declares one: an autoscaling cluster shows few or no GPUs at start-up (min_workers: 0), and
    sizing from that would run the whole grid one cell at a time. A cell the cluster can never hold
    is an error (its trial would wait forever); GPU cells with no GPU seen nor declared wait."""
    room = Room.of(capacity(cluster, resources), train.cpus_per_worker, train.gpus_per_worker)
    if not room.total:
        return 1
    fit = room.at_once(train.workers)
    if fit < 1 or room.need > room.node:
        raise CapacityError(f"train: a cell asks for {train.workers} worker(s) of {room.need:g} {room.kind} and the "
                            f"cluster holds at most {room.total:g} {room.kind}, {room.node:g} a node "
                            f"({_where(cluster)}): lower train.workers or train.{room.kind.lower()}s_per_worker")
    return fit


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
        # deferred: ray takes ~0.5 s to import; a study that never starts it does not pay for it
        import ray
        from ray.autoscaler.sdk import request_resources
        if not ray.is_initialized():
            return
        want = []
        for bundles in self._stages:
            try:
                want += bundles()
            except Exception as e:  # noqa: BLE001 - a request is a hint; the pool that cannot fit says so
                say(f"  (nothing asked of the autoscaler for a stage: {type(e).__name__}: {e})")
        if want != self.asked:
            request_resources(bundles=want)
            self.asked = want
