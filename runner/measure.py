"""`valind plan SPEC`, printed (`plan_spec`), and with `--measure` this cluster's rates from a short
probe, for the plan beside the defaults: above runner.plan (the estimate) and runner.pipeline (the study).

On the Ray cluster the study would run on (RAY_ADDRESS, else a local one), with the spec's own
settings: a few DPO optimizer steps of one cell per model size (runner.train.launch.train_cell: the
spec's train section, pairs that fill train.max_length, as `valind plan` sizes), a batch of judge
requests on the annotation judge's engine pool and a batch of generations on the first model's
(runner.pools, as the stages open them). Rates are per GPU as runner.plan's defaults (per engine
actor or training worker where there are no GPUs). Start-up is timed apart and left out of the rates:
the plan counts it elsewhere. Nothing is written to the study directory.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import pandas as pd

from evaluation.judges.values import build_requests
from evaluation.types import Request
from runner.pipeline import Study
from runner.plan import Plan, disk_bytes, estimate, fmt_hours, params_b, pool_gpus, render
from runner.progress import say
from runner.spec import Spec
from runner.train.cell import Cell

WORDS = ("the value of a kind answer is that it helps people think clearly about what they want and why "
         "honest careful reasons matter more than quick ones in every hard question").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def probe_pairs(n: int, max_length: int, seed: int = 0):
    """n synthetic preference pairs whose prompt and responses each reach max_length tokens, so that
    runner.train.batches.fit cuts every sequence to max_length: the worst case the plan sizes."""
    rng = random.Random(seed)
    return pd.DataFrame([{"pair_id": f"probe-{i}", "source": "probe",
                          "prompt": [{"role": "user", "content": _text(rng, max_length)}],
                          "chosen": _text(rng, max_length), "rejected": _text(rng, max_length)} for i in range(n)])


def _step_seconds(metrics: Path) -> list[float]:
    return [json.loads(x)["step_s"] for x in metrics.read_text().splitlines() if x.strip()]


def measure_train(study, model: str, steps: int, work: Path) -> dict:
    """Pairs/s per GPU (per worker without GPUs) of `steps` optimizer steps of one cell of `model`;
    the first step (warm-up) is left out when there are more."""
    from runner.train.launch import bf16_enabled, train_cell  # deferred: torch and deepspeed, for the probe only

    ctx, t = study.ctx, study.spec.train
    train = t.model_copy(update={"bf16": bf16_enabled(t), "epochs": 1, "eval_at": [1.0],
                                 "checkpoint_every": steps + 1, "max_failures": 0})
    pairs = work / f"{model}.parquet"
    probe_pairs(steps * t.batch_size, t.max_length).to_parquet(pairs)
    m = study.spec.model(model)
    cell = Cell(cell_id=f"probe-{model}", seed=0, train=train, pairs=str(pairs), model_path=ctx.model_path(model),
                model_id="probe", out_dir=str(work / "out" / model), work_dir=str(work / "ray"),
                ref_cache=str(work / "ref"), chat_template=ctx.chat_template(model),
                trust_remote_code=m.trust_remote_code)
    t0 = time.perf_counter()
    train_cell(cell, ctx.tokenizer(model))
    wall = time.perf_counter() - t0
    secs = _step_seconds(Path(cell.out_dir) / "metrics.jsonl")
    timed = secs[1:] or secs
    devices = t.workers * max(1, t.gpus_per_worker)
    return {"pairs_per_s": len(timed) * t.batch_size / sum(timed) / devices, "steps": len(secs),
            "step_s": [round(s, 2) for s in secs], "wall_s": round(wall, 1), "devices": devices}


def measure_judge(study, n: int) -> dict:
    """Judge responses/s per GPU of the annotation judge's pool: n annotation requests after a warm-up."""
    spec, ctx = study.spec, study.ctx
    rng = random.Random(1)
    requests = [build_requests([{"role": "user", "content": _text(rng, 60)}], _text(rng, 200),
                               spec.annotate.sampling.max_tokens) for _ in range(n)]
    t0 = time.perf_counter()
    pool = ctx.pools.get(spec.annotate.judge_model)
    start = time.perf_counter() - t0
    pool.generate(requests[:2], desc="measure: judge warm-up")
    t0 = time.perf_counter()
    pool.generate(requests, desc="measure: judge batch")
    dt = time.perf_counter() - t0
    devices = pool_gpus(spec.section_engine("annotate"))
    return {"responses_per_s": n / dt / devices, "requests": n, "batch_s": round(dt, 2),
            "startup_s": round(start, 1), "devices": devices}


def measure_generate(study, model: str, n: int) -> dict:
    """Output tokens/s per GPU of the model's generation pool: n requests of generate.sampling."""
    spec, ctx = study.spec, study.ctx
    sp = spec.generate.sampling
    rng = random.Random(2)
    requests = [Request(messages=({"role": "user", "content": _text(rng, 40)},), max_tokens=sp.max_tokens,
                        temperature=sp.temperature, seed=sp.seed) for _ in range(n)]
    ctx.pools.close()  # its engines may need what the judge's hold
    t0 = time.perf_counter()
    pool = ctx.pools.get(model, tokens=n * sp.max_tokens)
    start = time.perf_counter() - t0
    pool.generate(requests[:2], desc="measure: generation warm-up")
    t0 = time.perf_counter()
    outs = pool.generate(requests, desc="measure: generation batch")
    dt = time.perf_counter() - t0
    tok = ctx.tokenizer(model)
    tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
    devices = pool_gpus(spec.section_engine("generate"))
    return {"tokens_per_s": tokens / dt / devices, "requests": n, "output_tokens": tokens, "batch_s": round(dt, 2),
            "startup_s": round(start, 1), "devices": devices}


def measure_rates(spec: Spec, steps: int = 3, judge_requests: int = 32, gen_requests: int = 16) -> dict:
    """The probe's rates: {"train": {params_b: pairs/s}, "judge": {model: responses/s},
    "generate": (params_b, tokens/s), "details": {...}}, all per GPU."""
    with tempfile.TemporaryDirectory(prefix="valind-measure-") as tmp:
        work = Path(tmp)
        # a study object for its context (model paths, templates, pools) in a scratch directory
        probe = spec.model_copy(update={"study": spec.study.model_copy(update={"output_dir": str(work / "study")})})
        study = Study(probe, base_dir=work)
        study.ctx.ensure_ray()
        out: dict = {"train": {}, "judge": {}, "generate": None, "details": {}}
        try:
            sizes = {}
            for m in spec.models:  # one cell per model size
                sizes.setdefault(params_b(m.name, m.path, m.params_b), m.name)
            for p, name in sizes.items():
                say(f"measure: {steps} DPO steps of {name} ({p:g}B)")
                r = measure_train(study, name, steps, work)
                out["train"][p] = r["pairs_per_s"]
                out["details"][f"train {name}"] = r
            say(f"measure: {judge_requests} judge requests on {spec.annotate.judge_model}")
            r = measure_judge(study, judge_requests)
            out["judge"][spec.annotate.judge_model] = r["responses_per_s"]
            out["details"][f"judge {spec.annotate.judge_model}"] = r
            first = spec.models[0]
            say(f"measure: {gen_requests} generations on {first.name}")
            r = measure_generate(study, first.name, gen_requests)
            out["generate"] = (params_b(first.name, first.path, first.params_b), r["tokens_per_s"])
            out["details"][f"generate {first.name}"] = r
        finally:
            study.ctx.pools.close()
    return out


def measured_judge_rps(spec: Spec, base_dir: Path | None = None) -> float | None:
    """responses/s of this study's finished annotate unit, if any (a whole-pool rate)."""
    try:
        study = Study(spec, base_dir=base_dir)
        key = study.key("annotate")
        if study.store.done("annotate", key):
            return study.store.info("annotate", key).get("responses_per_s") or None
    except Exception:  # a plan must not fail on an unreadable store or an unprepared model
        return None
    return None


def plan_spec(spec: Spec, title: str, measure: bool = False, steps: int = 3) -> Plan:
    """Print the plan; with `measure`, also the plan from this cluster's measured rates."""
    plan = estimate(spec, measured_rps=measured_judge_rps(spec))
    render(plan, f"{title} (default rates)" if measure else title)
    if measure:
        rates = measure_rates(spec, steps=steps)
        measured = estimate(spec, measured=rates)
        render(measured, f"{title} (measured rates)")
        for what, r in rates["details"].items():
            print(f"measured {what}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in r.items()))
        print(f"total GPU-hours: {fmt_hours(plan.gpu_hours)} at the default rates, "
              f"{fmt_hours(measured.gpu_hours)} at the measured ones")
        plan = measured
    disk = disk_bytes(spec)
    print(f"disk: about {sum(disk.values()) / 1e9:,.1f} GB under the study directory ("
          + ", ".join(f"{k} {v / 1e9:,.2g}" for k, v in disk.items()) + " GB); each stage checks its share is free")
    return plan
