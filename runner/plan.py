"""`valind plan SPEC`: how much work a study is and how long it takes on the declared cluster
(`valind plan --measure`, with this cluster's measured rates: runner.measure).

Counts come from the spec (cells, runs, pairs, items); rates are per GPU, from the spec's `plan:`
section, else a measured annotate unit of this study (`responses_per_s` in its _DONE.json), else
the defaults below, which scale with model size from the anchors in shared/notes/anchors.md §4
(H100-class GPUs, bf16). They are estimates for sizing, not promises.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from evaluation.errors import InputError
from evaluation.suites import registry as suites
from evaluation.types import VALUES
from runner.context import study_runs
from runner.data.registry import SOURCES
from runner.spec import Spec, eval_suites, suite_settings
from runner.train.memory import LORA_TRAINABLE, MEMORY_SHARE, group_layout, layout_problem, model_shape

ROOT = Path(__file__).resolve().parent.parent

# --- documented defaults (per GPU) ---------------------------------------------------------
# Each rate names its public source, or says it is an estimate and why the number. The anchors are
# collected in shared/notes/anchors.md §4; `valind plan --measure` replaces them with this cluster's.
#
# Judge responses/s: 80/params_b, i.e. ~10/s for an 8B judge and ~1.1/s for a 70B one (prompts of
# ~1k tokens with a cached instruction prefix, <=64 output tokens). Estimate, no public source for
# this workload (published vLLM benchmarks report output tokens of long generations, not short
# verdicts on long prompts): 10/s is ~10k prompt tokens/s plus 640 output tokens/s for 8B, below the
# ~12.5k output tok/s of the generation anchor. Capped for tiny models, whose engines are overhead-bound.
JUDGE_RPS_AT_1B, JUDGE_RPS_MAX = 80.0, 100.0
# Output tokens/s: ~12.5k for Llama-3.1-8B bf16 on one H100 80GB with vLLM (third-party benchmark
# table, https://www.morphllm.com/vllm-benchmarks; treated as a ceiling) → 100k/params_b. Lambda's
# vLLM benchmark (https://github.com/LambdaLabsML/vllm-benchmark) backs the 1/params_b scaling for
# models that fit one GPU (data parallel over tensor parallel). The cap is an estimate, no public
# source: tiny models are bound by the engine's per-step overhead, not by their weights.
GEN_TPS_AT_1B, GEN_TPS_MAX = 100_000.0, 30_000.0
# Multi-LoRA batches decode slower than the bare base model: estimate, no measured public source.
# Vendor notes put vLLM's multi-LoRA penalty at ~10% for a few active adapters and growing with their
# number (https://gigagpu.com/vllm-multi-lora-deployment/, no method given); generation here batches
# every adapter of a base model at once (171 for jobs/paper.yaml: 57 cells × 3 eval_at points), hence 30%.
LORA_GEN_FACTOR = 0.7
# DPO pairs/s: ~1 for 8B full fine-tuning at seq 2048, ZeRO-3, 32 H100s (Tulu 3 8B DPO: ~3.0 h wall
# for ~273k pairs, read from the time plots of open-instruct's
# https://github.com/allenai/open-instruct/blob/main/docs/algorithms/dpo.md; Lambert et al. 2024,
# https://arxiv.org/abs/2411.15124), scaled by 8/params_b and 2048/max_length. The cap is an
# estimate, no public source (tiny models are step-overhead-bound).
DPO_PPS_8B_2048, DPO_PPS_MAX = 1.0, 200.0
# LoRA skips the weight-gradient GEMMs, ~1/3 of a training step's FLOPs (forward 2N, backward 4N
# FLOPs per token: Kaplan et al. 2020, https://arxiv.org/abs/2001.08361 §2.1), so at most 1.5× the
# full fine-tuning rate; Hu et al. 2021 (https://arxiv.org/abs/2106.09685 §4.2) measured 1.25× on
# GPT-3 175B. 1.5 is the FLOP bound, an optimistic estimate.
LORA_TRAIN_FACTOR = 1.5
SFT_FACTOR = 2.0        # by construction: one sequence per example instead of DPO's two
# Reference log-probs (forward only) cost ~0.25 of a full-fine-tuning DPO epoch (~0.6 h of ~3.0 h
# building open-instruct's reference cache in the same Tulu 3 8B DPO run, docs/algorithms/dpo.md
# above); computed once per (model, condition): seeds share the cache.
REF_FRACTION = 0.25
# A training worker group's start (Ray workers, process group, base model load, engine set-up):
# estimate, no public source, for 8B-class models on GPUs; on the 2-core CPU a demo cell's start-up
# measured ~18 s.
STARTUP_S = 60.0
# Estimate, no public source: a loglikelihood request is one forward pass over prompt+continuation
# and no decoding, against a judge response's prefill plus up to 64 decode steps.
LOGLIK_PER_JUDGE = 4.0

# Per evaluated run: (loglikelihood requests, generations of <=256 tokens): test-set sizes × answer
# choices from the benchmarks' papers: MMLU 14,042 × 4 (https://arxiv.org/abs/2009.03300),
# TruthfulQA 817 (https://arxiv.org/abs/2109.07958; ×8: an estimate of lm-eval's mc1+mc2 choices per
# question), OpenBookQA 500 × 4 (https://arxiv.org/abs/1809.02789), GSM8K 1,319 generations
# (https://arxiv.org/abs/2110.14168).
BENCHMARKS = {"mmlu": (14_042 * 4, 0), "truthfulqa_mc": (817 * 8, 0), "openbookqa": (500 * 4, 0),
              "gsm8k": (0, 1_319)}
# Parameters of the builtin models (runner.models): counted from their weights.
BUILTIN_PARAMS_B = {"tiny-llama": 0.0065, "smollm2-135m": 0.135}


class PlanError(InputError, ValueError):
    pass


def params_b(name: str, path: str = "", declared: float | None = None) -> float:
    """Billions of parameters: the declared `params_b`, a builtin, or the size in the name ("8B", "135M")."""
    if declared:
        return declared
    for s in (path, name):
        if s in BUILTIN_PARAMS_B:
            return BUILTIN_PARAMS_B[s]
        m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)([bm])(?![a-z])", Path(s).name, re.IGNORECASE)
        if m:
            return float(m.group(1)) / (1000.0 if m.group(2).lower() == "m" else 1.0)
    raise PlanError(f"cannot tell the size of model {name!r} ({path}): give it `params_b`")


def judge_rps(p: float) -> float:
    return min(JUDGE_RPS_MAX, JUDGE_RPS_AT_1B / p)


def gen_tps(p: float) -> float:
    return min(GEN_TPS_MAX, GEN_TPS_AT_1B / p)


def train_pps(p: float, max_length: int, finetune: str, method: str) -> float:
    rate = DPO_PPS_8B_2048 * (8.0 / p) * (2048.0 / max_length)
    rate *= LORA_TRAIN_FACTOR if finetune == "lora" else 1.0
    rate *= SFT_FACTOR if method == "sft" else 1.0
    return min(DPO_PPS_MAX, rate)


def default_cluster(path: Path = ROOT / "cluster.yaml") -> tuple[int, int, str]:
    """(nodes, GPUs per node, where from): cluster.yaml's GPU node type at its max_workers, else 1×8."""
    try:
        conf = yaml.safe_load(path.read_text())
        for name, t in (conf.get("available_node_types") or {}).items():
            gpus = int((t.get("resources") or {}).get("GPU", 0))
            if gpus:
                return int(t.get("max_workers", 1)) or 1, gpus, f"{path.name}: {name}"
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        pass
    return 1, 8, "default"


@dataclass
class Row:
    stage: str
    work: str
    rate: str
    source: str
    gpus: int
    gpu_hours: float
    wall_hours: float


@dataclass
class Plan:
    cluster: tuple[int, int, str]
    counts: dict[str, int]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(r.gpu_hours for r in self.rows)

    @property
    def wall_hours(self) -> float:
        return sum(r.wall_hours for r in self.rows)


def pool_gpus(e) -> int:
    """GPUs one engine pool holds (at least one device per actor)."""
    return e.actors * max(1, e.tensor_parallel, math.ceil(e.gpus_per_actor))


def source_pairs(spec: Spec) -> int:
    """Pairs to annotate: each source's max_pairs or its registered size, capped by annotate.max_pairs."""
    total = 0
    for i, src in enumerate(spec.data.sources):
        n = src.max_pairs or SOURCES[src.name].n_rows(src)
        if n is None:
            raise PlanError(f"data.sources[{i}]: size unknown, give it max_pairs")
        total += n
    if spec.annotate.max_pairs:
        total = min(total, spec.annotate.max_pairs)
    return total


@dataclass
class _Sizing:
    """What every stage's rows are computed from: the spec, the cluster, the rates given and the counts."""
    spec: Spec
    total_gpus: int
    measured: dict | None
    measured_rps: float | None
    pairs: int
    subset: int
    items: dict[str, int]  # suite -> items per run
    per_run: int  # items and follow-ups per evaluated run
    runs: int  # evaluated runs
    per_model: Counter  # evaluated runs per base model
    notes: list[str]

    @property
    def eff(self) -> float:
        return self.spec.plan.efficiency

    def used(self, e) -> int:
        """GPUs an engine pool of section `e` holds on this cluster."""
        return min(self.total_gpus, pool_gpus(e))

    def judge(self, model: str) -> tuple[float, str, Any]:
        """(responses/s per GPU, where the rate comes from, engine section) of a judge model."""
        spec, ov, measured = self.spec, self.spec.plan, self.measured
        m = spec.model(model)
        p = params_b(m.name, m.path, m.params_b)
        e = spec.section_engine("annotate")
        if ov.judge_responses_per_s:
            return ov.judge_responses_per_s, "spec plan:", e
        if measured and model in measured["judge"]:
            return measured["judge"][model], "measured", e
        if self.measured_rps and model == spec.annotate.judge_model:  # measured on this judge only
            return self.measured_rps / pool_gpus(e), "measured", e
        return judge_rps(p), f"default {p:g}B", e


def _subset(spec: Spec, pairs: int, held: int, notes: list[str]) -> int:
    """Pairs per condition: data.subset_size, or assumed from the held-in pairs (saying so in `notes`)."""
    subset = spec.data.subset_size
    if subset is None:
        subset = max(spec.data.min_subset_size, (pairs - held) // len(VALUES))
        notes.append(f"data.subset_size unset: assumed {subset} pairs per condition (held-in pairs / 16)")
    elif subset == "all":  # sizes and kept values are known only after curation
        subset = max(spec.data.min_subset_size, (pairs - held) // len(VALUES))
        notes.append(f"data.subset_size all: assumed {subset} pairs per value subset and its controls (held-in "
                     "pairs / 16) and every value kept; curation sets the real sizes and drops values below "
                     f"data.min_subset_size ({spec.data.min_subset_size})")
    return subset


def _suite_items(spec: Spec, held: int) -> tuple[dict[str, int], int]:
    """Items per run of each evaluation suite, and their follow-up turns."""
    st = suite_settings(spec)
    items, followups = {}, 0
    for name in eval_suites(spec):
        suite = suites.get(name)
        n, cap = suite.n_items + (held if suite.held_out else 0), suite.limit(st)
        items[name] = min(n, cap) if cap else n
        followups += round(suite.n_followups * items[name] / suite.n_items) if suite.n_followups else 0
    return items, followups


def estimate(spec: Spec, cluster: tuple[int, int, str] | None = None, measured_rps: float | None = None,
             measured: dict | None = None) -> Plan:
    """The plan of a study; `measured_rps` is a measured whole-pool judge rate (responses/s);
    `measured`, per-GPU rates of `valind plan --measure` (runner.measure.measure_rates), which take the
    defaults' place (a spec's `plan:` section still wins)."""
    if cluster is None:
        cluster = ((spec.cluster.nodes, spec.cluster.gpus_per_node, "spec") if spec.cluster
                   else default_cluster())
    conds, seeds = spec.conditions(), spec.seeds.values
    pairs, notes = source_pairs(spec), []
    held = int(pairs * spec.data.held_out_fraction)
    subset = _subset(spec, pairs, held, notes)
    items, followups = _suite_items(spec, held)
    per_run = sum(items.values()) + followups
    # the runs the pipeline evaluates (Study.runs, from the same function): every base model, every
    # cell, and every cell's adapter at each train.eval_at point below 1
    evaluated = study_runs(spec, conds, lambda cond: list(seeds))
    t = spec.train
    if len(t.eval_at) > 1 or t.eval_at_steps:
        trained = sum(r.kind not in ("base", "prompt") for r in evaluated)
        where = f"train.eval_at_steps {t.eval_at_steps}" if t.eval_at_steps else f"train.eval_at {t.eval_at}"
        notes.append(f"{where}: each cell's adapter is evaluated at {len(t.eval_at_steps) + 1 if t.eval_at_steps else len(t.eval_at)} "
                     f"points, so generation, scoring and benchmarks cover {trained:,} trained adapters")
    if spec.controls.prompt_only:
        notes.append(f"controls.prompt_only: {sum(r.kind == 'prompt' for r in evaluated)} untrained prompt-only runs "
                     "(one per model and value) are generated and scored like the others")
    if t.steps_per_condition == "equal" and spec.data.subset_size == "all":
        notes.append("train.steps_per_condition: equal: every condition trains the largest subset's steps, known only "
                     f"after curation; assumed here {subset} pairs each, so training may take several times longer")
    s = _Sizing(spec, cluster[0] * cluster[1], measured, measured_rps, pairs, subset, items, per_run,
                len(evaluated), Counter(r.model for r in evaluated), notes)
    plan = Plan(cluster, {"trials (cells)": len(spec.models) * len(conds) * len(seeds), "evaluated runs": s.runs,
                          "preference pairs": pairs, "annotation responses": 2 * pairs,
                          "pairs per condition": subset, "items per run": per_run,
                          "generation requests": s.runs * per_run}, notes=notes)
    plan.rows += _annotate_rows(s) + _train_rows(s) + [_generate_row(s)] + _score_rows(s) + _benchmark_rows(s)
    return plan


def _annotate_rows(s: _Sizing) -> list[Row]:
    """The annotation judge over both responses of every pair, and the check judge over its sample."""
    spec, pairs = s.spec, s.pairs
    rate, src, e = s.judge(spec.annotate.judge_model)
    gh = 2 * pairs / rate / 3600 / s.eff
    used = s.used(e)
    rows = [Row("annotate", f"{2 * pairs:,} responses", f"{rate:.3g} resp/s", src, used, gh, gh / used)]
    if c := spec.annotate.check:  # the check judge re-labels a sample, on the same engine section
        n = min(c.sample, 2 * pairs)
        rate, src, e = s.judge(c.judge_model)
        gh = n / rate / 3600 / s.eff
        used = s.used(e)
        rows.append(Row("  annotate check", f"{n:,} responses", f"{rate:.3g} resp/s", src, used, gh, gh / used))
    return rows


def _train_rows(s: _Sizing) -> list[Row]:
    """One trial per cell, as many at once as worker groups fit; DPO's reference log-probs once per
    (model, condition), on the trials' GPUs (every worker of a trial takes its share at step 0).
    Refuses a worker that cannot hold its model (PlanError)."""
    spec, t, ov, measured = s.spec, s.spec.train, s.spec.plan, s.measured
    conds = spec.conditions()
    cells_per_model = len(conds) * len(spec.seeds.values)
    per_trial = t.workers * max(1, math.ceil(t.gpus_per_worker))
    concurrent = max(1, s.total_gpus // per_trial)
    tr_gh = tr_wall = ref_gh = 0.0
    rates = []
    gpu_gb = spec.cluster.gpu_memory_gb if spec.cluster else 80
    for m in spec.models:
        p = params_b(m.name, m.path, m.params_b)
        if (why := layout_problem(m.name, p, t, gpu_gb, cells_per_model, model_shape(p, m.path))) is not None:
            raise PlanError(why)
        r = (ov.train_pairs_per_s or (measured or {}).get("train", {}).get(p)
             or train_pps(p, t.max_length, t.finetune, t.method))
        rates.append(r)
        cell_gh = s.subset * t.epochs / r / 3600 / s.eff
        tr_gh += cell_gh * cells_per_model
        tr_wall += math.ceil(cells_per_model / concurrent) * cell_gh / per_trial
        if t.method != "sft":
            full = train_pps(p, t.max_length, "full", t.method)
            ref_gh += len(conds) * s.subset * REF_FRACTION / full / 3600 / s.eff
    if (saving := group_saving(spec, gpu_gb, concurrent)) is not None:
        s.notes.append(saving)
    rsrc = "spec plan:" if ov.train_pairs_per_s else "measured" if measured and measured["train"] else "default by size"
    used = min(s.total_gpus, concurrent * per_trial)
    steps = t.epochs * (s.subset // t.batch_size)  # runner.train.doses: every condition assumed s.subset pairs
    rows = [Row("train", f"{len(spec.models) * cells_per_model} cells × {steps:,} steps ({s.subset * t.epochs:,} pairs)",
                f"{min(rates):.3g}–{max(rates):.3g} pairs/s", rsrc, used, tr_gh, tr_wall)]
    if ref_gh:  # at step 0 of each trial on all its workers (runner.train.reference), trials as many at once as train's
        rows.append(Row("  reference log-probs", f"{len(spec.models) * len(conds)} (model, condition), step 0 "
                        f"on each trial's {per_trial} GPU{'s' * (per_trial > 1)}",
                        f"×{1 / REF_FRACTION:g} DPO rate", "default", used, ref_gh, ref_gh / used))
    return rows


def _generate_row(s: _Sizing) -> Row:
    """One pool per base model, models one after another: the base model, then its trained runs."""
    spec, ov, measured, g = s.spec, s.spec.plan, s.measured, s.spec.generate
    ge = spec.section_engine("generate")
    gen_gh = gen_wall = 0.0
    lora = spec.train.finetune == "lora"
    for m in spec.models:
        p = params_b(m.name, m.path, m.params_b)
        r = ov.generate_tokens_per_s or gen_tps(p)
        if measured and measured["generate"] and not ov.generate_tokens_per_s:  # other sizes by 1/params_b
            p0, r0 = measured["generate"]
            r = r0 * p0 / p
        toks = s.per_run * g.sampling.max_tokens  # per run: the base model, then each trained run of it
        trained = s.per_model[m.name] - 1
        hours = toks / r / 3600 / s.eff + toks * trained / (r * (LORA_GEN_FACTOR if lora else 1)) / 3600 / s.eff
        gen_gh += hours
        gen_wall += hours / s.used(ge)
    gsrc = ("spec plan:" if ov.generate_tokens_per_s else "measured" if measured and measured["generate"]
            else "default by size")
    gen_rate = (f"{ov.generate_tokens_per_s:.3g} tok/s" if ov.generate_tokens_per_s
                else f"{measured['generate'][1]:.3g} tok/s at {measured['generate'][0]:g}B" if gsrc == "measured"
                else "tok/s by size")
    return Row("generate", f"{s.runs * s.per_run:,} requests ≤{g.sampling.max_tokens} tok", gen_rate,
               gsrc, s.used(ge), gen_gh, gen_wall)


def _score_rows(s: _Sizing) -> list[Row]:
    """LLM judges over the generations (a suite's own and its extra ones, e.g. the harm judge), and
    score.check's judge over its sample of each judged suite (none when no suite has a judge)."""
    st, check = suite_settings(s.spec), s.spec.score.check
    judged, checked = [], []  # (judge model, requests)
    for name in s.items:
        suite = suites.get(name)
        own = [(j[0], suite.judge_requests(st))] if (j := suite.judge(st)) else []
        per_item = own + [(x.model, 1) for x in suite.extra_judges(st).values()]
        judged += [(model, s.runs * s.items[name] * n) for model, n in per_item]
        if check and per_item:  # the check judge takes each judge's prompts over its sample
            checked.append((check.judge_model, min(check.sample, s.runs * s.items[name]) * sum(n for _, n in per_item)))
    rows = []
    for label, requests in (("score", judged), ("  score check", checked)):
        if requests:
            gh = sum(n / s.judge(model)[0] / 3600 / s.eff for model, n in requests)
            rate, src, e = s.judge(requests[-1][0])
            used = s.used(e)
            rows.append(Row(label, f"{sum(n for _, n in requests):,} judge requests", f"{rate:.3g} resp/s", src,
                            used, gh, gh / used))
    return rows


def _benchmark_rows(s: _Sizing) -> list[Row]:
    """lm-eval's benchmarks on every evaluated run (none when the spec lists none)."""
    spec, benchmarks = s.spec, s.spec.score.benchmarks
    if not benchmarks:
        return []
    bm_gh = 0.0
    for m in spec.models:
        p = params_b(m.name, m.path, m.params_b)
        for b in benchmarks:
            loglik, gens = BENCHMARKS[b]
            bm_gh += s.per_model[m.name] * (loglik / (LOGLIK_PER_JUDGE * judge_rps(p))
                                            + gens * 256 / gen_tps(p)) / 3600 / s.eff
    used = s.used(spec.section_engine("generate"))
    return [Row("benchmarks", f"{', '.join(benchmarks)} × {s.runs} runs", "by size", "default",
                used, bm_gh, bm_gh / used)]


# Bytes a study writes per stage, for the free-space check before each stage (`Study.run`) and
# `valind plan`: upper bounds from the counts, at one byte per character of text.
VERDICT_BYTES, SCORE_ROW_BYTES, ANALYSIS_BYTES = 600, 1_500, 50e6


def disk_bytes(spec: Spec) -> dict[str, float]:
    """Estimated bytes each stage writes under the study directory (training: the published adapters
    or models, every train.eval_at point, and the checkpoints of the cells training at once)."""
    pairs, t, g = source_pairs(spec), spec.train, spec.generate
    conds, seeds = len(spec.conditions()), len(spec.seeds.values)
    subset = spec.data.subset_size if isinstance(spec.data.subset_size, int) else pairs
    cells = conds * seeds
    model_bytes = 0.0
    for m in spec.models:
        n = params_b(m.name, m.path, m.params_b) * 1e9
        kept = n * LORA_TRAINABLE * 4 if t.finetune == "lora" else n * (2 if t.bf16 in (True, "auto") else 4)
        state = kept * 4 if t.finetune == "lora" else n * 16  # weights, Adam moments, fp32 master copy
        at_once = min(cells, spec.cluster.nodes * spec.cluster.gpus_per_node if spec.cluster else 1)
        model_bytes += cells * kept * len(t.eval_at) + at_once * state
    st = suite_settings(spec)
    per_run = 0
    for name in eval_suites(spec):
        suite = suites.get(name)
        n_items = suite.n_items + (int(pairs * spec.data.held_out_fraction) if suite.held_out else 0)
        per_run += min(n_items, suite.limit(st) or n_items)
    runs = len(study_runs(spec, spec.conditions(), lambda cond: list(spec.seeds.values)))
    return {"annotate": pairs * (spec.data.max_chars + 2 * VERDICT_BYTES),
            "curate": (conds + 1) * subset * spec.data.max_chars,
            "train": model_bytes,
            "generate": runs * per_run * g.sampling.max_tokens * 4 * 2,  # ~4 bytes a token, follow-ups
            "score": runs * per_run * SCORE_ROW_BYTES,
            "analyze": ANALYSIS_BYTES}


def memory_problems(spec: Spec) -> list[tuple[str, str]]:
    """(field, why) for each model whose GPU training worker cannot hold its smallest layout
    (runner.train.memory.layout_problem): `valind plan` and, before any compute, `valind run`
    (runner.preflight.check_inputs) refuse it."""
    t = spec.train
    gpu_gb = spec.cluster.gpu_memory_gb if spec.cluster else 80
    cells = len(spec.conditions()) * len(spec.seeds.values)
    out = []
    for m in spec.models:
        p = params_b(m.name, m.path, m.params_b)
        if (why := layout_problem(m.name, p, t, gpu_gb, cells, model_shape(p, m.path))) is not None:
            out.append(("train.adapters_per_group", why))
    return out


def group_saving(spec: Spec, gpu_gb: float, slots: int) -> str | None:
    """What training LoRA cells in groups (runner.train.group, the mLoRA idea) saves on the cluster:
    worker-group start-ups and base-model copies; None when every cell trains alone."""
    t = spec.train
    cells_per_model = len(spec.conditions()) * len(spec.seeds.values)
    share = max(1, slots // len(spec.models))
    sizes = []
    for m in spec.models:
        g, _ = group_layout(params_b(m.name, m.path, m.params_b), t, MEMORY_SHARE * gpu_gb, cells_per_model, share)
        sizes += [math.ceil(cells_per_model / g)] * g
    groups = len(sizes)
    cells = cells_per_model * len(spec.models)
    if groups == cells:
        return None
    gpus = t.workers * max(1, math.ceil(t.gpus_per_worker))
    saved = (cells - groups) * STARTUP_S * gpus / 3600
    return (f"train.adapters_per_group {t.adapters_per_group}: {cells} cells train in {groups} worker groups "
            f"(up to {max(sizes)} LoRA adapters over one frozen base each, from {gpu_gb:g} GB per GPU), so "
            f"{cells - groups} fewer worker-group start-ups, model loads and base-model copies: about "
            f"{saved:,.1f} GPU-hours of start-up saved at {STARTUP_S:g} s each (assumed); the optimizer steps "
            "cost the same in this estimate")


def fmt_hours(hours: float) -> str:
    return f"{hours:,.1f}" if hours >= 1 else f"{hours:.2g}"


def render(plan: Plan, title: str) -> None:
    nodes, per_node, where = plan.cluster
    console = Console(width=120)
    counts = Table(title=f"{title}: work", show_header=False)
    for k, v in plan.counts.items():
        counts.add_row(k, f"{v:,}")
    console.print(counts)
    table = Table(title=f"{title}: on {nodes} node(s) × {per_node} GPU(s) ({where})")
    for col in ("stage", "work", "rate / GPU", "source", "GPUs", "GPU-hours", "wall h"):
        table.add_column(col, justify="right" if col in ("GPUs", "GPU-hours", "wall h") else "left")
    for r in plan.rows:
        table.add_row(r.stage, r.work, r.rate, r.source, str(r.gpus), fmt_hours(r.gpu_hours), fmt_hours(r.wall_hours))
    table.add_row("total", "", "", "", "", fmt_hours(plan.gpu_hours), fmt_hours(plan.wall_hours), style="bold")
    console.print(table)
    for n in plan.notes:
        console.print(f"note: {n}")
