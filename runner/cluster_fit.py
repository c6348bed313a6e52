"""What a cluster can hold, and whether each training cell and engine pool of a spec ever fits it.

Pure arithmetic, no Ray: `declared(spec)` is the cluster the spec declares (its `cluster:` section,
else cluster.yaml's node types at their max_workers: the autoscaler's maximum), `of_nodes` a live
one (ray.nodes() or this machine). `valind validate`/`plan` refuse a cell or a pool that can never
fit the declared cluster; `valind preflight` checks the live one. `limits` and `Room` size what runs
at once on a live cluster an autoscaler may still grow (runner.capacity: engine actors, training cells).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from runner.spec import SpecError

ROOT = Path(__file__).resolve().parent.parent
Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class Node:
    cpus: float | None  # None: not declared (CPU demands are then not checked)
    gpus: float


@dataclass(frozen=True)
class Capacity:
    nodes: tuple[Node, ...]
    where: str  # where the figures come from, for messages

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @property
    def cpus(self) -> float:
        return sum(n.cpus or 0 for n in self.nodes)

    def describe(self) -> str:
        counts: dict[Node, int] = {}
        for n in self.nodes:
            counts[n] = counts.get(n, 0) + 1
        parts = [f"{k} × ({'? CPUs' if n.cpus is None else f'{n.cpus:g} CPUs'}, {n.gpus:g} GPUs)"
                 for n, k in counts.items()]
        return f"{' + '.join(parts) or 'no nodes'} ({self.where})"


@dataclass(frozen=True)
class Need:
    """`count` identical units (training workers, engine actors), each placed on one node."""
    what: str     # "a training cell", "the generate.engine pool"
    count: int
    cpus: float   # per unit
    gpus: float   # per unit
    count_field: str  # the spec field that sets `count` ("train.workers", "generate.engine.actors")
    unit_field: str   # the field that sets a unit's size ("train.gpus_per_worker", ...)


def fits(cap: Capacity, cpus: float, gpus: float) -> float:
    """How many units of (cpus, gpus) the nodes hold at once (inf: nothing declared limits them)."""
    total = 0.0
    for n in cap.nodes:
        k = math.inf
        if gpus > 0:
            k = math.floor(n.gpus / gpus + 1e-9)
        if cpus > 0 and n.cpus is not None:
            k = min(k, math.floor(n.cpus / cpus + 1e-9))
        total += k
    return total


def limits(live: Capacity, cluster=None) -> dict[str, float]:
    """The most a cluster can hold: its live CPUs (and the most on one node), its GPUs or those of the
    spec's `cluster:` (nodes × gpus_per_node, an autoscaler's maximum) where more, and the most GPUs on
    one node, live or declared."""
    declared_gpus = cluster.nodes * cluster.gpus_per_node if cluster else 0
    return {"CPU": live.cpus, "GPU": max(live.gpus, declared_gpus),
            "node_cpus": max((n.cpus or 0 for n in live.nodes), default=0),
            "node_gpus": max([n.gpus for n in live.nodes] + [cluster.gpus_per_node if cluster else 0])}


@dataclass(frozen=True)
class Room:
    """Units of one size against a cluster's `limits`, counted by GPUs where a unit needs any (a GPU
    node brings a CPU per GPU), else by CPUs."""
    kind: str     # "GPU" or "CPU"
    need: float   # of `kind`, per unit
    total: float  # the cluster's most of `kind`; 0: none seen nor declared yet (nothing to count against)
    node: float   # the most of `kind` on one node

    @classmethod
    def of(cls, most: dict[str, float], cpus: float, gpus: float) -> Room:
        kind, need = ("GPU", gpus) if gpus > 0 else ("CPU", cpus)
        return cls(kind, need, most[kind], most[f"node_{kind.lower()}s"])

    def at_once(self, per_group: int = 1) -> int:
        """How many groups of `per_group` units the cluster's total holds at once."""
        return math.floor(self.total / (self.need * per_group) + 1e-9)


def demands(spec) -> list[Need]:
    """A training cell's worker group (its reference log-probs run inside it, runner.train.reference)
    and each engine section's pool (an actor takes 1 CPU at least)."""
    t = spec.train
    out = [Need("a training cell", t.workers, t.cpus_per_worker, t.gpus_per_worker, "train.workers",
                  "train.gpus_per_worker" if t.gpus_per_worker else "train.cpus_per_worker")]
    for field, e in engine_sections(spec):
        out.append(Need(f"the {field} pool", e.actors, e.cpus_per_actor or 1, e.gpus_per_actor,
                          f"{field}.actors", f"{field}.gpus_per_actor" if e.gpus_per_actor else f"{field}.cpus_per_actor"))
    return out


def engine_sections(spec) -> list[tuple[str, object]]:
    """The engine sections that serve some model: annotate.engine, generate.engine, and `engine`
    where one of them is unset."""
    used = [(f, e) for f, e in (("annotate.engine", spec.annotate.engine), ("generate.engine", spec.generate.engine))
            if e is not None]
    return used if len(used) == 2 else [("engine", spec.engine), *used]


def problems(spec, cap: Capacity) -> Problems:
    """(field, message) for each demand that can never fit `cap`: one unit larger than every node,
    or more units than the nodes hold together."""
    out = []
    for d in demands(spec):
        unit = f"{d.cpus:g} CPU" + (f" and {d.gpus:g} GPU" if d.gpus else "")
        if fits(cap, d.cpus, d.gpus) >= d.count:
            continue
        if fits(cap, d.cpus, d.gpus) == 0:
            out.append((d.unit_field, f"{d.what} needs {unit} on one node, and no node of the cluster has that: "
                                      f"{cap.describe()}; lower {d.unit_field} or declare larger nodes"))
        else:
            out.append((d.count_field, f"{d.what} needs {d.count} × ({unit}) at once and the cluster holds at most "
                                       f"{fits(cap, d.cpus, d.gpus):g}: {cap.describe()}; lower {d.count_field} "
                                       "or declare a larger cluster"))
    return out


def declared(spec, path: Path = ROOT / "cluster.yaml") -> Capacity:
    """The spec's `cluster:` (GPU nodes; CPUs only where cpus_per_node is given), else every node type
    of cluster.yaml at its max_workers (the head once), else nothing known (an empty capacity)."""
    c = spec.cluster
    if c is not None:
        return Capacity((Node(c.cpus_per_node, c.gpus_per_node),) * c.nodes, "the spec's cluster:")
    try:
        conf = yaml.safe_load(path.read_text())
        nodes: list[Node] = []
        head = conf.get("head_node_type")
        for name, t in (conf.get("available_node_types") or {}).items():
            res = t.get("resources") or {}
            k = 1 if name == head else int(t.get("max_workers", conf.get("max_workers", 1)))
            nodes += [Node(float(res.get("CPU", 0)), float(res.get("GPU", 0)))] * k
        if nodes:
            return Capacity(tuple(nodes), f"{path.name} at max_workers")
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        pass
    return Capacity((), "no cluster declared")


def of_nodes(resources: list[dict], where: str) -> Capacity:
    """A live cluster from each alive node's resources ({"CPU": .., "GPU": ..}, as ray.nodes() gives)."""
    return Capacity(tuple(Node(float(r.get("CPU", 0)), float(r.get("GPU", 0))) for r in resources), where)


def check(spec, source: str = "spec") -> None:
    """`valind validate`/`plan`: SpecError naming each cell or pool that never fits the declared cluster."""
    cap = declared(spec)
    found = problems(spec, cap) if cap.nodes else []
    if found:
        raise SpecError(source, found)
