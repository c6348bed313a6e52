"""valind rehearse: a spec's orchestration on a small real cluster, before its GPUs are paid for.

The spec keeps its stage order, pools, engine counts and concurrency rules; what costs GPUs is
shrunk. Every model becomes a tiny random Llama (one per base model, so each base model is its
own unit of work and every pool hand-over happens), every judge the tiny judge, data and item
counts a few dozen, and the grid every base model × 2 values + 1 random control × 1 seed. GPUs
are mapped onto the cluster's CPUs: a pool or training cell that held a share of the spec's
cluster GPUs holds the same share of the local CPUs (at least one). Figures: the orchestration
overhead per training cell (its wall time minus its optimizer steps), the concurrency reached
against the ideal, the engine-pool start-ups, and what the full grid's orchestration would cost.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import ray
import yaml
from ray.util.state import list_actors

from evaluation.benchmarks import HUB_TASKS
from evaluation.errors import InputError
from evaluation.suites import registry as suite_registry
from runner.capacity import max_concurrent
from runner.cluster import init_ray
from runner.local_cluster import LocalCluster
from runner.models import prepare_tiny
from runner.pipeline import Study
from runner.progress import say
from runner.spec import EngineSpec, Spec, load_spec, parse_spec
from runner.spec_views import model_fields
from runner.stages.train import cell_timings
from runner.store import write_json
from runner.tracking import KIND_TAG

# The values the tiny random judge emits most (jobs/smoke.yaml): others may curate too few pairs.
TINY_JUDGE_VALUES = ("humor", "fairness")
TINY_JUDGE = "tiny-llama"


def _spec_gpus(spec: Spec) -> float:
    """GPUs of the spec's cluster (the largest pool or grid when it declares none); 0 on a CPU spec."""
    if spec.cluster:
        return spec.cluster.nodes * spec.cluster.gpus_per_node
    pools = [e.actors * e.gpus_per_actor for e in (spec.engine, spec.annotate.engine, spec.generate.engine) if e]
    return max(pools + [spec.train.workers * spec.train.gpus_per_worker])


def _share(gpus: float, total: float, cpus: int, cap: int) -> int:
    """The local CPUs for something that holds `gpus` of `total` (all of them on a CPU spec)."""
    want = round(gpus / total * cpus) if total and gpus else cpus
    return max(1, min(cap, want))


def _engine(e: EngineSpec, total: float, cpus: int) -> dict:
    return {"backend": e.backend, "dtype": "float32", "max_model_len": 512,
            "actors": _share(e.actors * e.gpus_per_actor, total, cpus, e.actors),
            "batch_size": 8,  # small batches: the few items still spread over every actor
            "startup_timeout_s": min(e.startup_timeout_s, 300)}


def rehearsal_spec(spec: Spec, cpus: int, output_dir: str, models: int | None = None) -> tuple[dict, list[str]]:
    """The rehearsal's spec (as YAML data) and one line per mapping that is not plain shrinking."""
    total = _spec_gpus(spec)
    t = spec.train
    workers = _share(t.workers * t.gpus_per_worker, total, cpus, t.workers)
    chosen = [v for v in TINY_JUDGE_VALUES if v in spec.values.induced]
    chosen += [v for v in spec.values.induced if v not in chosen][: 2 - len(chosen)]
    base = spec.models[:models] if models else spec.models
    d = spec.model_dump(mode="json", exclude_none=True)
    d["study"] = {"name": f"{spec.study.name}-rehearsal", "output_dir": output_dir,
                  "description": f"rehearsal of {spec.study.name}: tiny models, shrunk data, GPUs mapped onto CPUs"}
    d["models"] = [{"name": m.name, "path": str(prepare_tiny(seed=i + 1, name=f"tiny-llama-{i + 1}"))}
                   for i, m in enumerate(base)]
    d["values"] = {"induced": chosen, "positive": [v for v in spec.values.positive if v in chosen] or chosen}
    # match kept: a {value} system-prompt template needs controls matched per value (spec validation)
    d["controls"] = {"count": 1, "length_bins": spec.controls.length_bins, "match": spec.controls.match}
    d["seeds"] = {"values": spec.seeds.values[:1]}
    d["data"] = {"sources": [{"name": "hh_rlhf", "subset": "harmless-base", "split": "test", "max_pairs": 48}],
                 "held_out_fraction": spec.data.held_out_fraction, "rule": "chosen",
                 "subset_size": 4, "min_subset_size": 4}
    d["annotate"] = {"judge_model": TINY_JUDGE, "mode": spec.annotate.mode, "sampling": {"max_tokens": 24}}
    d["generate"].update(items_per_suite=4, sampling={"max_tokens": 16})
    for section, e in (("annotate", spec.annotate.engine), ("generate", spec.generate.engine)):
        if e:
            d[section]["engine"] = _engine(e, total, cpus)
    d["engine"] = _engine(spec.engine, total, cpus)
    d["train"] = {**d["train"], "workers": workers, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0,
                  "micro_batch_size": 1, "batch_size": 2 * workers, "max_length": 128, "epochs": min(t.epochs, 2),
                  "lr": 1e-3, "checkpoint_every": 1, "bf16": "auto"}
    sc = d["score"]
    for name, conf in sc.get("suites", {}).items():  # every suite's judge models (runner.spec_views)
        for f in model_fields(suite_registry.get(name).settings):
            if conf.get(f):
                conf[f] = TINY_JUDGE
    if sc.get("check"):  # score.check's judge too (runner.stages.score_check)
        sc["check"] = {**sc["check"], "judge_model": TINY_JUDGE, "sample": 4}
    sc["benchmarks"] = [b for b in spec.score.benchmarks if f"valind_{b}" not in HUB_TASKS and b != "gsm8k"]
    sc["benchmark_limit"], sc["sampling"] = 2, {"max_tokens": 24}
    # lm-eval's hf backend: its vllm one starts a vLLM engine per run's task, minutes on shared CPUs
    sc["benchmark_backend"] = "hf"
    d["tracking"] = {"experiment": f"{spec.tracking.experiment or spec.study.name}-rehearsal"}  # the server's store
    d.pop("cluster", None)
    ran = {"annotate": d["annotate"].get("engine", d["engine"]), "generate": d["generate"].get("engine", d["engine"])}
    notes = [f"grid: {len(base)} base model(s) × values {chosen} + 1 control × seed {spec.seeds.values[0]} "
             f"(full: {len(spec.models)} × {len(spec.conditions())} conditions × {len(spec.seeds.values)} seeds)",
             f"GPUs: {total:g} in the spec → {cpus} local CPUs",
             f"train: {t.workers} worker(s) × {t.gpus_per_worker:g} GPU per cell → {workers} worker(s) × 1 CPU",
             *(f"{k} engine: {e.actors} actor(s) × {e.gpus_per_actor:g} GPU → {ran[k]['actors']} actor(s) × 1 CPU"
               for k, e in (("annotate", spec.section_engine("annotate")),
                            ("generate", spec.section_engine("generate")))),
             f"benchmarks: {sc['benchmarks'] or 'none'} (hub-only and generative ones dropped), 2 items each, "
             f"on lm-eval's hf backend ({spec.score.benchmark_backend} in the spec)"]
    return d, notes


# ------------------------------------------------------------------ fault injection
# The actors whose loss a stage must survive: a stopped node is one that holds one of them.
STAGE_ACTORS = {"train": "RayTrainWorker", "annotate": "EngineActor", "generate": "EngineActor",
                "score": "EngineActor"}


def _node_holding(class_name: str) -> str | None:
    """The node id of a live actor of `class_name` (None when there is none yet)."""
    alive = list_actors(filters=[("state", "=", "ALIVE"), ("class_name", "=", class_name)], limit=100)
    return alive[0].node_id if alive else None


def stop_node_during(study, cluster_dir: str, stage: str, after_s: float) -> list[dict]:
    """`after_s` into `stage`, kill the worker node that holds one of the stage's actors (a training
    worker, an engine), then start a fresh node (an autoscaler's replacement). Returns the list the
    stop is recorded in."""

    def stop() -> None:
        time.sleep(after_s)
        # in training, once a worker group is in its loop (its first line in valind-starts.txt)
        while stage == "train" and not any((study.root / "ray_train").rglob("valind-starts.txt")):
            time.sleep(0.2)
        while (node_id := _node_holding(STAGE_ACTORS[stage])) is None:
            time.sleep(0.2)
        port = next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id)
        c = LocalCluster(cluster_dir)
        node = c.stop_node(next(i for i, w in enumerate(c.state["workers"]) if w["manager_port"] == port),
                           replace=True, delay_s=5)
        say(f"rehearse: stopped worker node {Path(node['temp_dir']).name} (it held a {STAGE_ACTORS[stage]}) "
            f"{after_s:g}s into {stage}, and started a replacement")
        faults.append({"stage": stage, "after_s": after_s, "node": node["temp_dir"],
                             "held": STAGE_ACTORS[stage]})

    def at_stage(name: str) -> None:
        if name == stage:
            threading.Thread(target=stop, daemon=True).start()

    faults: list[dict] = []
    study.on_stage = at_stage
    return faults


# ------------------------------------------------------------------ figures
def concurrency(cells: list[dict]) -> float:
    """Worker groups in flight on average over the span from the first start to the last end (the
    cells of one group, runner.train.group, count once)."""
    span = max(c["end"] for c in cells) - min(c["start"] for c in cells)
    units = {tuple(c["group"]) if c.get("group") else i: c["wall_s"] for i, c in enumerate(cells)}
    return sum(units.values()) / span if span > 0 else 1.0


def figures(study, full: Spec, started: float) -> tuple[list[str], dict]:
    cells = [c for c in cell_timings(study.ctx) if c["start"] >= started]  # trained by this run, not cached
    pools = [{"model": p.cfg.model, "lora": p.cfg.enable_lora, "actors": p.size, "startup_s": p.startup_s,
              "restarts": p.restarts} for p in study.ctx.pools.opened]
    lines, fig = [], {"stage_s": study.stage_seconds, "pools": pools}
    lines.append("stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in study.stage_seconds.items()))
    if cells:
        over = [c["overhead_s"] for c in cells]
        mean = statistics.mean(over)
        ideal = min(len(cells), max_concurrent(study.spec.train))
        reached = concurrency(cells)
        full_cells = len(full.models) * len(full.conditions()) * len(full.seeds.values)
        full_conc = max_concurrent(full.train, full.cluster, resources={})
        hours = full_cells * mean / full_conc / 3600
        gpu_h = full_cells * mean * full.train.workers * full.train.gpus_per_worker / 3600
        fig.update(cells=cells, overhead_mean_s=mean, overhead_median_s=statistics.median(over),
                   concurrency=reached, ideal=ideal, full_cells=full_cells, full_concurrency=full_conc,
                   full_overhead_h=hours, full_overhead_gpu_h=gpu_h,
                   restarted={c["run"]: c["starts"] for c in cells if len(c["starts"]) > 1})
        lines += [f"training cells: {len(cells)}; orchestration overhead per cell (wall − optimizer steps): "
                  f"mean {mean:.1f}s, median {statistics.median(over):.1f}s, "
                  f"max {max(over):.1f}s",
                  f"concurrency: {reached:.2f} worker groups in flight on average, ideal {ideal} "
                  f"({reached / ideal:.0%})",
                  f"full grid: {full_cells} cells, {full_conc} at once → {hours:.1f} h of wall time and "
                  f"{gpu_h:.0f} GPU-hours in per-cell orchestration at this overhead (measured on this "
                  "machine's CPUs: start-up on GPU nodes differs)"]
        for c in cells:
            if len(c["starts"]) > 1:
                lines.append(f"  {c['run']}: worker group started {len(c['starts'])} times, at step(s) "
                             f"{c['starts']} (0: from the start; k > 0: from the step-k checkpoint)")
    if pools:
        lines.append(f"engine pools: {len(pools)} started (hand-overs between stages and base models), "
                     f"start-up mean {statistics.mean(p['startup_s'] for p in pools):.1f}s, "
                     f"{sum(p['actors'] for p in pools)} actor starts, "
                     f"{sum(p['restarts'] for p in pools)} restarted after dying")
    return lines, fig


def mlflow_counts(study) -> tuple[str, dict]:
    """Runs of the study's experiment by name: each cell and run must appear once."""
    tr = study.ctx.tracker
    runs = tr.client.search_runs([tr.experiment_id], max_results=10000)
    dup = sorted(n for n, k in Counter(r.info.run_name for r in runs).items() if k > 1)
    kinds = dict(Counter(r.data.tags.get(KIND_TAG, "?") for r in runs))
    want = sum(r.final for r in study.runs()) + 1  # + the study's parent (eval_at points log into their run)
    line = (f"MLflow ({tr.uri}): {len(runs)} runs, expected {want} "
            f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
            f"{'duplicates: ' + ', '.join(dup) if dup else 'no duplicates'}")
    return line, {"runs": len(runs), "expected": want, "kinds": kinds, "duplicates": dup}


def rehearse(spec_path: str, output_dir: str, models: int | None = None, cluster_dir: str | None = None,
             stop_node: str | None = None) -> dict:
    """Run the rehearsal on the Ray cluster at RAY_ADDRESS (a local one when unset); returns the figures,
    also written to <study>/rehearsal.json."""
    stage, _, after = (stop_node or "").partition(":")
    if stop_node and (not cluster_dir or stage not in STAGE_ACTORS):
        raise InputError(f"--stop-node {stop_node}: needs --cluster-dir (the local cluster whose node to stop) "
                         f"and a stage with actors to lose: {', '.join(STAGE_ACTORS)}")
    full = load_spec(spec_path)
    init_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    data, notes = rehearsal_spec(full, cpus, output_dir, models)
    text = f"# valind rehearse {spec_path}\n" + yaml.safe_dump(data, sort_keys=False)
    spec = parse_spec(data, f"rehearsal of {spec_path}")
    say(f"rehearse {spec_path} on {len([n for n in ray.nodes() if n['Alive']])} node(s), {cpus} CPU(s):")
    for line in notes:
        say(f"  {line}")
    study = Study(spec, text)
    faults = stop_node_during(study, cluster_dir, stage, float(after or 30)) if stop_node else []
    started = time.time()
    study.run()
    lines, fig = figures(study, full, started)
    mline, counts = mlflow_counts(study)
    fig.update(notes=notes, mlflow=counts, faults=faults, wall_s=time.time() - started)
    say("rehearsal figures:")
    for line in [*lines, mline]:
        say(f"  {line}")
    write_json(fig, study.root / "rehearsal.json")
    return fig
