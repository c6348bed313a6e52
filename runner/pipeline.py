"""The stage graph: annotate → curate → train → generate → score → analyze.

Every unit of work is stored under a content hash of (its spec section, its inputs' keys), so a
rerun recomputes nothing, a changed setting recomputes only what it touches, and a run that was
cut off resumes from the last finished unit (annotation batch, training cell, run).
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import ray

from runner import models as model_registry
from runner.progress import say
from runner.secrets import redact
from runner.spec import VALUES, Spec, content_hash
from runner.store import Store, read_parquet, safe_name, write_json, write_parquet

STAGES = ("annotate", "curate", "train", "generate", "score", "analyze")
CODE_VERSION = "valind-0.1"  # part of every key: bump when a stage's semantics change
ANALYSIS_VERSION = "crossed-runs-items-1"  # the analyze key's own: inference changed, training did not


class StageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Run:
    """One evaluated model: a base model, or a trained cell (model × condition × seed)."""
    run_id: str
    model: str
    condition: str
    kind: str               # base | value | control | positive (the planted-behaviour arm)
    value: str | None
    seed: int | None
    cell_key: str | None    # train-unit key; None for a base model


class Study:
    def __init__(self, spec: Spec, spec_text: str = "", base_dir: Path | None = None):
        self.spec, self.spec_text = spec, spec_text
        self.root = spec.output_dir(base_dir or Path.cwd())
        self.store = Store(self.root)
        self.data_dir = spec.data_dir()
        self._tracker = None
        self._tokenizers: dict[str, object] = {}
        self._pools: dict[tuple[str, str | None], object] = {}  # (model, full-model path) -> (pool, lora)
        self._memo: dict[str, object] = {}  # stage results within this process
        seeds_file = self.root / "adaptive_seeds.json"
        self.extra_seeds: dict[str, list[int]] = json.loads(seeds_file.read_text()) if seeds_file.exists() else {}

    # ----------------------------------------------------------------- infrastructure
    def ensure_ray(self):
        from runner.cluster import init_ray
        return init_ray()

    @property
    def tracker(self):
        if self._tracker is None:
            from runner.tracking import Tracker, tracking_uri
            t = self.spec.tracking
            self._tracker = Tracker(tracking_uri(t.uri, self.root), t.experiment or self.spec.study.name,
                                    self.spec.study.name, self.root, t.artifact_location)
        return self._tracker

    def model_path(self, name_or_path: str) -> str:
        return model_registry.resolve(self.spec.model(name_or_path).path)

    @functools.cache
    def model_id(self, name_or_path: str) -> str:
        m = self.spec.model(name_or_path)
        return content_hash(model_registry.identity(m.path), m.chat_template)

    def chat_template(self, name: str) -> str | None:
        t = self.spec.model(name).chat_template
        if t and Path(t).expanduser().is_file():
            return Path(t).expanduser().read_text()
        return t

    def tokenizer(self, name: str):
        if name not in self._tokenizers:
            from transformers import AutoTokenizer
            m = self.spec.model(name)
            self._tokenizers[name] = AutoTokenizer.from_pretrained(self.model_path(name),
                                                                   trust_remote_code=m.trust_remote_code)
        return self._tokenizers[name]

    def engine_spec(self, model: str):
        """The engine section for a model: judges use annotate.engine, evaluated models generate.engine."""
        s = self.spec
        judges = {s.annotate.judge_model, s.score.value_judge, s.score.refusal_llm_judge, s.score.anthro_judge}
        if s.annotate.engine and model in judges:
            return s.annotate.engine
        if s.generate.engine and model in {m.name for m in s.models}:
            return s.generate.engine
        return s.engine

    def engine_config(self, model: str, enable_lora: bool = False, path: str | None = None):
        from runner.engines import EngineConfig
        e, m = self.engine_spec(model), self.spec.model(model)
        return EngineConfig(model=path or self.model_path(model), backend=e.backend, dtype=e.dtype,
                            max_model_len=e.max_model_len, enable_lora=enable_lora,
                            max_lora_rank=self.spec.train.lora.r, max_loras=4, tensor_parallel=e.tensor_parallel,
                            kv_cache_gb=e.kv_cache_gb, chat_template=self.chat_template(model),
                            trust_remote_code=m.trust_remote_code)

    def pool(self, model: str, enable_lora: bool = False, path: str | None = None, scores: bool = False):
        """An engine pool for a model, reused across stages.

        A LoRA pool also serves base-model generation, but not log-prob scoring (`scores`),
        which vLLM cannot do with LoRA enabled: that gets a pool of its own.
        """
        from runner.engines import EnginePool
        mp = self.model_path(model)
        if not enable_lora and (mp, path, False) in self._pools:
            return self._pools[(mp, path, False)]
        if (mp, path, True) in self._pools and not scores:
            return self._pools[(mp, path, True)]
        self.ensure_ray()
        e = self.engine_spec(model)
        say(f"  starting {e.actors} engine actor(s) for {path or model}{' (LoRA)' if enable_lora else ''}")
        pool = EnginePool(self.engine_config(model, enable_lora, path), actors=e.actors,
                          gpus_per_actor=e.gpus_per_actor, batch_size=e.batch_size)
        self._pools[(mp, path, enable_lora)] = pool
        return pool

    def close_pools(self) -> None:
        """Free engines (before training, which needs every core and GPU)."""
        while self._pools:
            self._pools.popitem()[1].close()

    # ----------------------------------------------------------------------- keys
    def _engine_key(self, model: str | None = None) -> dict:
        e = self.engine_spec(model) if model else self.spec.engine
        return {"dtype": e.dtype, "max_model_len": e.max_model_len, "backend": e.backend}

    @functools.cache
    def annotate_key(self) -> str:
        s = self.spec
        return content_hash(CODE_VERSION, "annotate", s.data.sources, s.data.max_chars, s.annotate,
                            self.model_id(s.annotate.judge_model), self._engine_key(s.annotate.judge_model),
                            self._data_marker())

    @functools.cache  # keys feed every cell's key: walk the data dir and read configs once
    def _data_marker(self) -> str:
        # The data directory is an input too: its files (names, sizes, times) feed the keys.
        d = self.data_dir
        if not d or not d.exists():
            return ""
        return content_hash(sorted((str(p.relative_to(d)), p.stat().st_size, int(p.stat().st_mtime))
                                   for p in d.rglob("*") if p.is_file()))

    @functools.cache
    def curate_key(self) -> str:
        s = self.spec
        d = s.data
        return content_hash(CODE_VERSION, "curate", self.annotate_key(), d.held_out_fraction, d.subset_size,
                            d.min_subset_size, d.rule, d.seed, s.values.induced, self._controls_key(),
                            self.model_id(s.models[0].name))

    def _controls_key(self) -> dict:
        """The controls section as curation sees it: without `positive` when it is unset (so specs
        without it keep their keys), and without `positive.items` (the suite's size, not curation)."""
        c = self.spec.controls
        if c.positive is None:
            return c.model_dump(mode="json", exclude={"positive"})
        return c.model_dump(mode="json", exclude={"positive": {"items"}})

    def eval_suites(self) -> list[str]:
        """The suites every run is generated and scored on: generate.suites, plus "planted" (the
        positive control's detector) whenever controls.positive is set."""
        return list(self.spec.generate.suites) + (["planted"] if self.spec.controls.positive else [])

    def cell_key(self, model: str, condition: str, seed: int) -> str:
        return content_hash(CODE_VERSION, "train", self.curate_key(), self.model_id(model), condition, seed,
                            self.spec.train)

    def runs(self) -> list[Run]:
        out = []
        for m in self.spec.models:
            out.append(Run(f"{m.name}__base", m.name, "base", "base", None, None, None))
            for cond in self.spec.conditions():
                kind = cond.split("-", 1)[0]  # value | control | positive
                value = cond.split("-", 1)[1] if kind == "value" else None
                for seed in self.spec.seeds.values + self.extra_seeds.get(cond, []):
                    out.append(Run(f"{m.name}__{cond}__s{seed}", m.name, cond, kind, value, seed,
                                   self.cell_key(m.name, cond, seed)))
        return out

    def _planted_key(self) -> list[dict]:
        """The positive control's settings, for the keys of what its suite touches (nothing when
        it is unset, so specs without it keep their keys)."""
        pos = self.spec.controls.positive
        return [{"planted": pos.model_dump(mode="json")}] if pos else []

    @functools.cache
    def items_key(self) -> str:
        g = self.spec.generate
        return content_hash(CODE_VERSION, "items", g.suites, g.items_per_suite, g.sampling.seed,
                            self.curate_key(), self._data_marker(), *self._planted_key())

    def generate_key(self, run: Run) -> str:
        return content_hash(CODE_VERSION, "generate", self.items_key(), self.spec.generate.sampling,
                            self._engine_key(run.model), self.model_id(run.model), run.cell_key or "base")

    def score_key(self, run: Run) -> str:
        s = self.spec
        judge = s.score.value_judge or s.annotate.judge_model
        return content_hash(CODE_VERSION, "score", self.generate_key(run), s.score, self.model_id(judge),
                            s.annotate.mode, s.annotate.logprob_threshold, *self._planted_key())

    def analyze_key(self) -> str:
        return content_hash(CODE_VERSION, "analyze", ANALYSIS_VERSION,
                            [(r.run_id, self.score_key(r)) for r in self.runs()],
                            self.spec.analyze, self.curate_key(), self.agreement_key())

    @functools.cache
    def agreement_key(self) -> str:
        s = self.spec.score
        return content_hash(CODE_VERSION, "agreement", s.refusal_judges, s.refusal_llm_judge, self._data_marker())

    # ---------------------------------------------------------------------- stages
    def _once(self, stage: str, fn):
        if stage not in self._memo:
            self._memo[stage] = fn()
        return self._memo[stage]

    def annotate(self) -> Path:
        return self._once("annotate", self._annotate)

    def curate(self) -> Path:
        return self._once("curate", self._curate)

    def train(self) -> dict[str, Path]:
        return self._once("train", self._train)

    def generate(self) -> dict[str, Path]:
        return self._once("generate", self._generate)

    def score(self) -> dict[str, Path]:
        return self._once("score", self._score)

    def analyze(self) -> Path:
        return self._once("analyze", self._analyze)

    def _annotate(self) -> Path:
        from evaluation.judges import values as vj
        from runner.data.sources import load_pairs

        s, key = self.spec, self.annotate_key()
        unit = self.store.unit("annotate", key)
        if self.store.done("annotate", key):
            info = self.store.info("annotate", key)
            say(f"annotate: cached ({info['pairs']} pairs, {info['unscored']} unscored responses) [{key}]")
            return unit
        t0 = time.perf_counter()
        pairs_path = unit / "pairs.parquet"
        if pairs_path.exists():
            pairs = read_parquet(pairs_path)
            drops = json.loads((unit / "drops.json").read_text())
        else:
            frames, drops = [], {}
            for i, src in enumerate(s.data.sources):
                df, d = load_pairs(src, self.data_dir, s.data.max_chars)
                frames.append(df)
                drops[f"{i}:{src.name}" + (f"/{src.subset}" if src.subset else "")] = d
            pairs = pd.concat(frames, ignore_index=True)
            if s.annotate.max_pairs:
                pairs = pairs.head(s.annotate.max_pairs)
            if pairs["pair_id"].duplicated().any():
                raise StageError("two sources produced the same pair_id; give them different subsets/paths")
            write_json(drops, unit / "drops.json")
            write_parquet(pairs, pairs_path)
        rows = [(p.pair_id, side, list(p.prompt), getattr(p, side)) for p in pairs.itertuples()
                for side in ("chosen", "rejected")]
        batch = s.engine.batch_size * s.engine.actors
        batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
        todo = [i for i in range(len(batches)) if not (unit / "batches" / f"{i:05d}.parquet").exists()]
        say(f"annotate: {len(pairs)} pairs, {len(rows)} responses in {len(batches)} batches "
            f"({len(batches) - len(todo)} already judged)")
        judged, t_judge = 0, 0.0
        if todo:
            pool = self.pool(s.annotate.judge_model, scores=s.annotate.mode == "logprob")
            for i in todo:
                tb = time.perf_counter()
                out = self._judge_batch(pool, batches[i], vj)
                write_parquet(out, unit / "batches" / f"{i:05d}.parquet")
                judged += len(batches[i])
                t_judge += time.perf_counter() - tb
                say(f"  batch {i + 1}/{len(batches)}: {len(batches[i]) / (time.perf_counter() - tb):.2f} responses/s")
        ann = pd.concat([read_parquet(unit / "batches" / f"{i:05d}.parquet") for i in range(len(batches))],
                        ignore_index=True)
        write_parquet(ann, unit / "annotations.parquet")
        info = {"pairs": len(pairs), "responses": len(ann), "unscored": int((~ann["scored"]).sum()),
                "judged_now": judged, "responses_per_s": judged / t_judge if t_judge else None,
                "drops": drops, "value_counts": _value_counts(ann), "seconds": time.perf_counter() - t0}
        self.store.mark_done("annotate", key, info)
        say(f"annotate: done — {len(pairs)} pairs, {info['unscored']} unscored responses"
            + (f", {info['responses_per_s']:.2f} responses/s" if judged else "") + f" [{key}]")
        return unit

    def audit(self, n: int | None = None, labels: Path | None = None) -> Path:
        """Write a stratified audit sample (n) or score a labelled one against the judge (labels)."""
        from runner.data.audit import audit_agreement, audit_sample, read_labels

        unit = self.annotate()
        ann = read_parquet(unit / "annotations.parquet")
        if labels is None:
            out = self.root / "audit" / f"audit-{self.annotate_key()}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            audit_sample(read_parquet(unit / "pairs.parquet"), ann, n or 100, seed=self.spec.data.seed).to_csv(out, index=False)
            say(f"audit: wrote {out}: fill in `human_values` (comma-separated values from the closed list, "
                f"or 'none'), then run `valind annotate SPEC --audit-labels {out}`")
            return out
        agree = audit_agreement(read_labels(labels), ann)
        out = self.root / "audit" / f"agreement-{self.annotate_key()}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        agree.to_csv(out, index=False)
        tr = self.tracker
        parent = tr.parent()
        tr.log_metrics(parent, {f"audit/{r.value}/{m}": getattr(r, m) for r in agree.itertuples()
                                for m in ("accuracy", "kappa")})
        tr.log_artifacts(parent, out, "audit")
        say(f"audit: {int(agree['n'].iloc[0])} labelled responses; mean kappa {agree['kappa'].mean():.3f}; "
            f"wrote {out}")
        return out

    def _judge_batch(self, pool, rows, vj) -> pd.DataFrame:
        a = self.spec.annotate
        if a.mode == "extract":
            texts = pool.generate([vj.build_requests(p, r, a.sampling.max_tokens) for _, _, p, r in rows],
                                  desc="judge")
            parsed = [vj.parse_values(t) for t in texts]
            return pd.DataFrame({"pair_id": [x[0] for x in rows], "side": [x[1] for x in rows],
                                 "values": [v if v is not None else [] for v in parsed],
                                 "scored": [v is not None for v in parsed], "raw": texts})
        reqs = [vj.logprob_requests(p, r) for _, _, p, r in rows]
        flat = pool.score([q for qs in reqs for q in qs], desc="judge")
        k = 2 * len(VALUES)
        vals, raws, scored = [], [], []
        for i in range(len(rows)):
            probs = vj.values_from_logprobs(flat[i * k:(i + 1) * k])
            ok = all(p == p for p in probs.values())
            vals.append([v for v, p in probs.items() if ok and p > a.logprob_threshold])
            scored.append(ok)
            raws.append(json.dumps(probs))
        return pd.DataFrame({"pair_id": [x[0] for x in rows], "side": [x[1] for x in rows], "values": vals,
                             "scored": scored, "raw": raws})

    def _curate(self) -> Path:
        from runner.data.curate import curate

        s, key = self.spec, self.curate_key()
        unit = self.store.unit("curate", key)
        if self.store.done("curate", key):
            say(f"curate: cached ({self.store.info('curate', key)['summary']}) [{key}]")
            return unit
        ann_unit = self.annotate()
        pairs = read_parquet(ann_unit / "pairs.parquet")
        ann = read_parquet(ann_unit / "annotations.parquet")
        tok = self.tokenizer(s.models[0].name)

        def token_length(pair) -> int:
            from runner.data.sources import prompt_text
            text = prompt_text(list(pair["prompt"])) + "\n" + pair["chosen"] + "\n" + pair["rejected"]
            return len(tok(text, add_special_tokens=False)["input_ids"])

        cur = curate(pairs, ann, list(s.values.induced), s.data, s.controls, length_fn=token_length)
        for cond, df in cur.subsets.items():
            write_parquet(df, unit / "subsets" / f"{safe_name(cond)}.parquet")
        write_parquet(cur.held_out, unit / "held_out.parquet")
        write_parquet(cur.table, unit / "table.parquet")
        write_parquet(cur.overlap, unit / "overlap.parquet")
        if len(cur.control_bins):
            write_parquet(cur.control_bins, unit / "control_bins.parquet")
        write_json({"rule": cur.rule, "stats": cur.stats, "examples": cur.examples}, unit / "curation.json")
        n = len(next(iter(cur.subsets.values())))
        summary = f"{len(cur.subsets)} subsets of {n} pairs, {len(cur.held_out)} held out"
        self.store.mark_done("curate", key, {"summary": summary, "n": n, "stats": cur.stats})
        say(f"curate: done — {summary} [{key}]")
        return unit

    def _train(self) -> dict[str, Path]:
        from runner.sweep import run_grid
        from runner.train.launch import bf16_enabled

        s = self.spec
        cells = [r for r in self.runs() if r.cell_key]
        for r in cells:  # published by a driver that was killed before it could mark the cell done
            self._adopt_cell(r)
        todo = [r for r in cells if not self.store.done("train", r.cell_key)]
        say(f"train: {len(cells)} cells, {len(cells) - len(todo)} cached")
        if todo:
            cur = self.curate()
            self.close_pools()
            self.ensure_ray()
            train = s.train.model_copy(update={"bf16": bf16_enabled(s.train)})  # "auto" resolved once
            say(f"  {train.method}, {train.finetune}, ZeRO-{train.zero_stage}, {'bf16' if train.bf16 else 'fp32'}, "
                f"{train.workers} worker(s) per cell")
            specs = [{"cell_id": safe_name(r.run_id), "seed": r.seed, "train": train.model_dump(mode="json"),
                      "pairs": str(cur / "subsets" / f"{safe_name(r.condition)}.parquet"),
                      "model_path": self.model_path(r.model), "model_id": self.model_id(r.model),
                      "out_dir": str(self.store.unit("train", r.cell_key)), "work_dir": str(self.root / "ray_train"),
                      "ref_cache": str(self.root / "cache" / "reflogps"), "chat_template": self.chat_template(r.model),
                      "trust_remote_code": s.model(r.model).trust_remote_code} for r in todo]
            by_id = {safe_name(r.run_id): r for r in todo}
            errors = run_grid(specs, train, self.root / "ray_tune",
                              f"grid-{content_hash([c['cell_id'] for c in specs], n=8)}",
                              on_complete=lambda c: self._adopt_cell(by_id[c["cell_id"]]))
            failed = []
            for r in todo:
                unit = self.store.unit("train", r.cell_key)
                err = errors.get(safe_name(r.run_id), "the trial did not run")
                self._adopt_cell(r)
                if err is None and self.store.done("train", r.cell_key):
                    last = _last_metrics(unit)
                    say(f"  {r.run_id}: loss {last.get('loss', float('nan')):.4f}, "
                        f"reward accuracy {last.get('rewards/accuracy', float('nan')):.2f}")
                else:  # one failed cell must not lose the others
                    self.store.mark_failed("train", r.cell_key, err or "no model was written")
                    failed.append(f"{r.run_id}: {err}")
            if failed:
                raise StageError(f"train: {len(failed)} cell(s) failed: " + "; ".join(failed))
        self._log_training(cells)
        say(f"train: done — {len(cells)} cells")
        return {r.run_id: self.store.unit("train", r.cell_key) / "model" for r in cells}

    def _adopt_cell(self, r: Run) -> None:
        """Mark a cell done as soon as train_cell has published it (an atomic rename of a finished dir)."""
        unit = self.store.unit("train", r.cell_key)
        if not self.store.done("train", r.cell_key) and (unit / "cell.json").is_file() and (unit / "model").is_dir():
            self.store.mark_done("train", r.cell_key, {"run_id": r.run_id})

    def _log_training(self, cells: list[Run]) -> None:
        tr = self.tracker
        for r in cells:
            unit = self.store.unit("train", r.cell_key)
            rid = tr.child(r.run_id, r.kind)
            tr.log_params(rid, {**_run_params(r), **_flatten("train", self.spec.train.model_dump(mode="json")),
                                "cell_key": r.cell_key, "curate_key": self.curate_key()})
            tr.once(rid, f"train-{r.cell_key}", lambda: (
                tr.log_history(rid, [json.loads(x) for x in (unit / "metrics.jsonl").read_text().splitlines()]),
                tr.log_artifacts(rid, unit / "model", "model"), tr.log_artifacts(rid, unit / "cell.json")))

    def load_items(self) -> pd.DataFrame:
        from evaluation.suites import load_suite

        key = self.items_key()
        path = self.store.unit("items", key) / "items.parquet"
        if path.exists():
            return read_parquet(path)
        g, pos = self.spec.generate, self.spec.controls.positive
        held = read_parquet(self.curate() / "held_out.parquet")
        frames = []
        for suite in self.eval_suites():
            kw = {"held_out_prompts": [list(p) for p in held["prompt"]]} if suite in ("values", "planted") else {}
            limit = pos.items if suite == "planted" else g.items_per_suite  # the cap does not apply to planted
            frames.append(load_suite(suite, self.data_dir, limit=limit, seed=g.sampling.seed, **kw))
        items = pd.concat(frames, ignore_index=True)
        write_parquet(items, path)
        return items

    def _generate(self) -> dict[str, Path]:
        from evaluation.suites.sycophancy import followup_messages
        from evaluation.types import Request

        s, runs = self.spec, self.runs()
        todo = [r for r in runs if not self.store.done("generate", self.generate_key(r))]
        say(f"generate: {len(runs)} runs, {len(runs) - len(todo)} cached")
        if todo:
            adapters = self.train() if any(r.cell_key for r in todo) else {}
            self._check_adapters(todo, adapters)  # before any engine starts
            items = self.load_items()
            sp = s.generate.sampling
            groups: dict[tuple[str, str | None], list[Run]] = {}
            for r in todo:  # one engine per base model serves the base and all its LoRA adapters
                full = r.cell_key and s.train.finetune == "full"
                groups.setdefault((r.model, str(adapters[r.run_id]) if full else None), []).append(r)
            for (model, full_path), group in groups.items():
                lora = any(r.cell_key for r in group) and not full_path
                t0 = time.perf_counter()
                pool = self.pool(model, enable_lora=lora, path=full_path)
                def request(r: Run, messages) -> Request:
                    adapter = str(adapters[r.run_id]) if (r.cell_key and lora) else None
                    return Request(messages=tuple(dict(m) for m in messages), adapter=adapter,
                                   max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, seed=sp.seed)
                reqs = [request(r, it.messages) for r in group for it in items.itertuples()]
                texts = pool.generate(reqs, desc=f"generate {model}")
                n_items = len(items)
                follow = items.get("needs_followup", pd.Series(False, index=items.index)).fillna(False).astype(bool)
                fidx = [i for i in range(n_items) if follow.iloc[i]]
                ftexts = []
                if fidx:
                    freqs = [request(r, followup_messages(items.iloc[i], texts[k * n_items + i]))
                             for k, r in enumerate(group) for i in fidx]
                    ftexts = pool.generate(freqs, desc="follow-ups")
                for k, r in enumerate(group):
                    resp = texts[k * n_items:(k + 1) * n_items]
                    fup = [None] * n_items
                    for j, i in enumerate(fidx):
                        fup[i] = ftexts[k * len(fidx) + j]
                    df = pd.DataFrame({"run_id": r.run_id, "suite": items["suite"], "item_id": items["item_id"],
                                       "response": resp, "followup_response": fup, "engine": pool.name,
                                       "engine_version": pool.version, "sampling": json.dumps(sp.model_dump()),
                                       "adapter": str(adapters.get(r.run_id, "")) if r.cell_key else ""})
                    gkey = self.generate_key(r)
                    write_parquet(df, self.store.unit("generate", gkey) / "generations.parquet")
                    self.store.mark_done("generate", gkey, {"run_id": r.run_id, "items": n_items})
                dt = time.perf_counter() - t0
                say(f"  {model}: {len(group)} runs × {n_items} items in {dt:.0f}s")
        say(f"generate: done — {len(runs)} runs")
        return {r.run_id: self.store.unit("generate", self.generate_key(r)) / "generations.parquet" for r in runs}

    def _check_adapters(self, runs: list[Run], adapters: dict[str, Path]) -> None:
        from runner.engines.base import AdapterError, check_adapter
        if self.spec.train.finetune != "lora":
            return
        for r in runs:
            if r.cell_key:
                try:
                    check_adapter(adapters[r.run_id])
                except AdapterError as e:
                    raise StageError(f"generate: {r.run_id}: {e}") from None

    def _score(self) -> dict[str, Path]:
        from evaluation.judges import score_suite

        s, runs = self.spec, self.runs()
        todo = [r for r in runs if not self.store.done("score", self.score_key(r))]
        say(f"score: {len(runs)} runs, {len(runs) - len(todo)} cached")
        if todo:
            gens = self.generate()
            items = self.load_items()
            # Generation engines are done; QA runs before the judge engines start, so its task
            # never waits for CPUs or GPUs that idle engines hold.
            self.close_pools()
            qa = {r.run_id: self._benchmarks(r) for r in todo} if s.score.benchmarks else {}
            if qa:
                say(f"  QA benchmarks ({', '.join(s.score.benchmarks)}) done for {len(qa)} run(s)")
            engines = self._judge_engines()
            for r in todo:
                g = read_parquet(gens[r.run_id], ("run_id", "suite", "item_id", "response"))
                frames = []
                for suite in self.eval_suites():
                    settings = {"max_tokens": s.score.sampling.max_tokens,
                                "values_mode": "generate" if s.annotate.mode == "extract" else "logprob",
                                "values_threshold": s.annotate.logprob_threshold,
                                "refusal_judges": list(s.score.refusal_judges),
                                "anthro_llm": engines.get("anthropomorphism") is not None,
                                **({"planted_phrase": s.controls.positive.phrase} if s.controls.positive else {})}
                    frames.append(score_suite(suite, items[items["suite"] == suite], g[g["suite"] == suite],
                                              engine=engines.get(suite), settings=settings))
                if r.run_id in qa:
                    frames.append(qa[r.run_id])
                scores = pd.concat(frames, ignore_index=True)
                key = self.score_key(r)
                write_parquet(scores, self.store.unit("score", key) / "scores.parquet")
                unscored = int((~scores["scored"]).sum())
                self.store.mark_done("score", key, {"run_id": r.run_id, "rows": len(scores), "unscored": unscored})
                say(f"  {r.run_id}: {len(scores)} scores, {unscored} unscored")
        self.agreement()
        say(f"score: done — {len(runs)} runs")
        return {r.run_id: self.store.unit("score", self.score_key(r)) / "scores.parquet" for r in runs}

    def _benchmarks(self, r: Run) -> pd.DataFrame:
        """QA benchmarks through lm-evaluation-harness, per item (suite "qa"), with the run's adapter.

        Runs as a Ray task so that on a cluster it lands on a GPU node, not on the driver.
        """
        s = self.spec.score
        adapter = str(self.store.unit("train", r.cell_key) / "model") if r.cell_key else None
        model = self.model_path(r.model)
        if adapter and self.spec.train.finetune == "full":
            model, adapter = adapter, None
        e = self.engine_spec(r.model)  # QA runs in the precision generation runs in
        self.ensure_ray()
        task = _run_benchmarks.options(num_cpus=1, num_gpus=min(1.0, e.gpus_per_actor))
        per_item = ray.get(task.remote(model, adapter, [f"valind_{b}" for b in s.benchmarks], self.data_dir,
                                       s.benchmark_limit, s.benchmark_backend, s.benchmark_batch_size,
                                       "cuda" if e.gpus_per_actor else "cpu", e.dtype))
        return per_item.assign(run_id=r.run_id)

    def _judge_engines(self) -> dict[str, object]:
        """The LLM judge of each suite that has one (engines are shared when the model is)."""
        s = self.spec.score
        out = {}
        if "values" in self.spec.generate.suites:
            out["values"] = self.pool(s.value_judge or self.spec.annotate.judge_model,
                                      scores=self.spec.annotate.mode == "logprob")
        if "safety" in self.spec.generate.suites and "llm" in s.refusal_judges:
            out["safety"] = self.pool(s.refusal_llm_judge, scores=True)
        if "anthropomorphism" in self.spec.generate.suites and s.anthro_judge:
            out["anthropomorphism"] = self.pool(s.anthro_judge)
        return out

    def agreement(self) -> pd.DataFrame:
        """Each refusal judge against the human labels (safety/refusal_labelled.csv)."""
        from evaluation.judges import judge_agreement

        key = self.agreement_key()
        path = self.store.unit("agreement", key) / "agreement.parquet"
        if path.exists():
            return read_parquet(path)
        judges = list(self.spec.score.refusal_judges)
        engine = self.pool(self.spec.score.refusal_llm_judge, scores=True) if "llm" in judges else None
        df = judge_agreement(self.data_dir, judges, engine=engine)
        write_parquet(df, path)
        return df

    def _analyze(self) -> Path:
        from evaluation.analyze import contrasts, per_run_metrics, power_table
        from evaluation.report import write_report

        s, key = self.spec, self.analyze_key()
        unit = self.store.unit("analyze", key)
        if self.store.done("analyze", key):
            say(f"analyze: cached [{key}]")
        else:
            paths = self.score()
            runs = self.runs_table()
            scores = pd.concat([read_parquet(p) for p in paths.values()], ignore_index=True)
            a = s.analyze
            con = contrasts(runs, scores, alpha=a.alpha, primary_judges=self.primary_judges())
            metrics = per_run_metrics(scores)
            cur = self.curate()
            adaptive = s.seeds.adaptive
            power = power_table(con, adaptive.target_ci_halfwidth if adaptive else None, a.min_effect, a.alpha, a.power)
            aa, aa_detail = self._aa_checks(runs, scores)
            extras = {"study_name": s.study.name, "description": s.study.description,
                      "spec_yaml": redact(self.spec_text), "code_version": _code_version(),
                      "alpha": a.alpha, "judge_agreement": self.agreement(),
                      "curation": read_parquet(cur / "table.parquet"), "power": power,
                      "aa_checks": aa, "aa_detail": aa_detail, "adaptive": self._adaptive_note(),
                      "adaptive_trajectory": self._trajectory(con)}
            extras["changed"] = self._changed_share(runs, unit)
            extras["min_changed_share"] = a.min_changed_share
            if aa is not None:
                write_parquet(aa, unit / "aa_checks.parquet")
            write_parquet(power, unit / "power.parquet")
            write_parquet(con, unit / "contrasts.parquet")
            write_parquet(metrics, unit / "metrics.parquet")
            report = write_report(unit, runs, scores, con, extras)
            self.store.mark_done("analyze", key, {"report": str(report), "contrasts": len(con)})
            say(f"analyze: done — {len(con)} contrasts, {int(con['significant'].sum()) if len(con) else 0} "
                f"significant after Holm [{key}]")
        self._log_analysis(unit)
        return unit / "report.html"

    def _changed_share(self, runs: pd.DataFrame, unit: Path) -> pd.DataFrame:
        """Per trained run, the share of items whose response differs from its base model's
        (evaluation.sanity.changed_share), written to changed.parquet; warns about flagged runs."""
        from evaluation.sanity import changed_share

        gens = pd.concat([read_parquet(p, ("run_id", "suite", "item_id", "response"))
                          for p in self.generate().values()], ignore_index=True)
        changed = changed_share(gens, runs, self.spec.analyze.min_changed_share)
        write_parquet(changed, unit / "changed.parquet")
        flagged = changed[changed["flagged"]]
        if len(flagged):
            say(f"analyze: WARNING {len(flagged)} trained run(s) changed fewer than "
                f"{self.spec.analyze.min_changed_share:.0%} of their base model's responses (adapter not applied?): "
                + ", ".join(f"{r.run_id} ({r.share_changed:.0%})" for r in flagged.itertuples()))
        return changed

    def _aa_checks(self, runs: pd.DataFrame, scores: pd.DataFrame) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
        """controls.aa_check: control-0 against control-1 — per model how many comparisons come out
        significant, and every comparison."""
        from evaluation.analyze import aa_check

        if not self.spec.controls.aa_check:
            return None, None
        a, rows, tables = self.spec.analyze, [], []
        for model in self.spec.models:
            res = aa_check(runs, scores, "control-0", "control-1", model=model.name, alpha=a.alpha,
                           primary_judges=self.primary_judges())
            rows.append({"model": model.name, **{k: v for k, v in res.items() if not isinstance(v, pd.DataFrame)}})
            tables.append(res["table"])
        return pd.DataFrame(rows), pd.concat(tables, ignore_index=True)

    def primary_judges(self) -> dict[str, str]:
        """analyze.primary_judges, with safety defaulting to the first of score.refusal_judges."""
        return {"safety": self.spec.score.refusal_judges[0], **self.spec.analyze.primary_judges}

    def _n_seeds(self, condition: str) -> int:
        return len(self.spec.seeds.values) + len(self.extra_seeds.get(condition, []))

    def _adaptive_note(self) -> str | None:
        ad = self.spec.seeds.adaptive
        if not ad:
            return None
        what = "; ".join(f"{c}: {', '.join(map(str, s))}" for c, s in sorted(self.extra_seeds.items())) or "none yet"
        goal = (f"every watched CI within ±{ad.target_ci_halfwidth}" if ad.until == "halfwidth"
                else "every watched contrast significant after correction")
        return f"seeds.adaptive: until {goal}, at most {ad.max} seeds per condition. Seeds added so far: {what}."

    def _adaptive_round(self, con: pd.DataFrame):
        """seeds.adaptive's decision after one analysis, and the round's watched contrasts."""
        from evaluation.adaptive import decide, snapshot

        ad = self.spec.seeds.adaptive
        seeds = {c: self._n_seeds(c) for c in self.spec.conditions()}
        decision = decide(con, seeds, ad.max, ad.until, ad.target_ci_halfwidth, ad.metrics, ad.conditions,
                          self.spec.analyze.alpha)
        return decision, snapshot(con, decision, ad.metrics, ad.conditions)

    def _trajectory(self, con: pd.DataFrame) -> pd.DataFrame | None:
        """The watched contrasts of every adaptive round so far, this one included (from
        adaptive_trajectory.json, which `run` extends after each round)."""
        if not self.spec.seeds.adaptive:
            return None
        done = self._trajectory_rounds()
        _, now = self._adaptive_round(con)
        rows = [r for k, rs in done.items() if k != self.analyze_key() for r in rs] + now
        return pd.DataFrame(rows)

    def _trajectory_rounds(self) -> dict[str, list[dict]]:
        path = self.root / "adaptive_trajectory.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _add_seed(self, conditions: list[str]) -> int:
        """One more seed for these conditions and for every control (they stay paired by seed)."""
        used = set(self.spec.seeds.values) | {x for v in self.extra_seeds.values() for x in v}
        seed = max(used) + 1
        targets = set(conditions) | {c for c in self.spec.conditions() if c.startswith("control-")}
        for cond in sorted(targets):
            self.extra_seeds.setdefault(cond, []).append(seed)
        write_json(self.extra_seeds, self.root / "adaptive_seeds.json")
        self._memo.clear()
        return seed

    def _seeds_to_add(self, unit: Path) -> list[str]:
        """Decide after one analysis; record the round's watched contrasts; say why a condition stops."""
        decision, rows = self._adaptive_round(read_parquet(unit / "contrasts.parquet"))
        rounds = self._trajectory_rounds()
        rounds[self.analyze_key()] = rows
        write_json(rounds, self.root / "adaptive_trajectory.json")
        for cond, why in sorted(decision.reasons.items()):
            if cond not in decision.add:
                say(f"adaptive seeds: {cond}: stop ({why}, {self._n_seeds(cond)} seeds)")
        return decision.add

    def _log_analysis(self, unit: Path) -> None:
        tr = self.tracker
        parent = tr.parent()
        s = self.spec
        tr.log_params(parent, {"study": s.study.name, "models": ",".join(m.name for m in s.models),
                               "induced": ",".join(s.values.induced), "controls": s.controls.count,
                               "seeds": ",".join(map(str, s.seeds.values)), "annotate_key": self.annotate_key(),
                               "curate_key": self.curate_key()})
        ann = self.store.info("annotate", self.annotate_key())
        tr.once(parent, f"data-{self.annotate_key()}", lambda: tr.log_metrics(parent, {
            "data/pairs": ann["pairs"], "data/unscored_responses": ann["unscored"],
            **({"annotate/responses_per_s": ann["responses_per_s"]} if ann.get("responses_per_s") else {}),
            **{f"data/dropped/{src}/{reason}": n for src, d in ann["drops"].items() for reason, n in d.items()},
            **{f"data/expressed/{side}/{v}": n for side, d in ann["value_counts"].items() for v, n in d.items()}}))
        cur = self.store.unit("curate", self.curate_key())
        table = read_parquet(cur / "table.parquet")
        tr.once(parent, f"curate-{self.curate_key()}", lambda: (
            tr.log_metrics(parent, {f"curate/{r.value}/{col}": getattr(r, col) for r in table.itertuples()
                                    for col in ("available", "used") if hasattr(r, col)}),
            tr.log_artifacts(parent, cur / "curation.json", "curation"),
            tr.log_artifacts(parent, cur / "table.parquet", "curation")))
        key = unit.name
        con = read_parquet(unit / "contrasts.parquet")
        summary = {"analyze/contrasts": len(con), "analyze/significant_holm": int(con["significant"].sum()),
                   "analyze/significant_bh": int((con["p_bh"] < s.analyze.alpha).sum())}
        if (unit / "aa_checks.parquet").exists():
            for r in read_parquet(unit / "aa_checks.parquet").itertuples():
                summary |= {f"aa/{r.model}/tests": r.n_tests, f"aa/{r.model}/significant_holm": r.n_significant}
        tr.once(parent, f"analyze-{key}", lambda: (tr.log_artifacts(parent, unit, "report"),
                                                   tr.log_metrics(parent, summary),
                                                   tr.set_tags(parent, {"valind.report": str(unit / "report.html")})))
        metrics = read_parquet(unit / "metrics.parquet")
        runs = {r.run_id: r for r in self.runs()}
        for run_id, df in metrics.groupby("run_id"):
            r = runs[run_id]
            rid = tr.child(run_id, r.kind)
            tr.log_params(rid, _run_params(r))
            vals = {f"{row.suite}/{row.metric}/{row.judge.split(':')[0]}": row.mean for row in df.itertuples()}
            tr.once(rid, f"eval-{self.score_key(r)}", lambda: tr.log_metrics(rid, vals))
            tr.finish(rid)
        tr.finish(parent)

    def runs_table(self) -> pd.DataFrame:
        return pd.DataFrame([{k: v for k, v in asdict(r).items() if k != "cell_key"} for r in self.runs()])

    # ------------------------------------------------------------------- driving
    def run(self, until: str = "analyze") -> Path | None:
        """Run the study up to (and including) a stage; each stage pulls what it needs."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "spec.yaml").write_text(redact(self.spec_text))
        from runner.tracking import check_cluster_tracking, tracking_uri
        s = self.spec
        engines = [e for e in (s.engine, s.annotate.engine, s.generate.engine) if e]
        check_cluster_tracking(tracking_uri(s.tracking.uri, self.root),
                               max([s.train.gpus_per_worker] + [e.gpus_per_actor for e in engines]))
        _ = self.tracker  # MLflow must be reachable before any compute
        t0 = time.perf_counter()
        result = None
        try:
            for stage in STAGES[: STAGES.index(until) + 1]:
                result = getattr(self, stage)()
            while until == "analyze" and self.spec.seeds.adaptive and (need := self._seeds_to_add(Path(result).parent)):
                seed = self._add_seed(need)
                say(f"adaptive seeds: adding seed {seed} to {', '.join(need)} and to the controls")
                result = self.analyze()
        finally:
            self.close_pools()
        say(f"study {self.spec.study.name}: finished in {time.perf_counter() - t0:.0f}s")
        if until == "analyze" and result:
            final = self.root / "report.html"
            final.write_text(Path(result).read_text())
            return final
        return None

    def sensitivity_lines(self) -> list[str]:
        """The positive control's verdict per model from the finished analysis (`valind run`'s last
        words), or that the study has none."""
        from evaluation.analyze import positive_control

        unit = self.store.unit("analyze", self.analyze_key())
        if not self.store.done("analyze", self.analyze_key()):
            return []
        pcs = positive_control(read_parquet(unit / "contrasts.parquet"), self.spec.analyze.alpha)
        return [p["line"] for p in pcs] or ["no positive control (controls.positive): this study's "
                                            "sensitivity is unmeasured"]

    def status(self) -> list[dict]:
        rows = []

        def add(stage: str, unit: str, key: str, stage_dir: str | None = None):
            st = stage_dir or stage
            state = "done" if self.store.done(st, key) else ("failed" if self.store.failed(st, key) else "missing")
            rows.append({"stage": stage, "unit": unit, "key": key, "state": state})

        add("annotate", "annotations", self.annotate_key())
        add("curate", "subsets", self.curate_key())
        for r in self.runs():
            if r.cell_key:
                add("train", r.run_id, r.cell_key)
        for r in self.runs():
            add("generate", r.run_id, self.generate_key(r))
        for r in self.runs():
            add("score", r.run_id, self.score_key(r))
        add("analyze", "report", self.analyze_key())
        return rows


@ray.remote
def _run_benchmarks(model, adapter, tasks, data_dir, limit, backend, batch_size, device, dtype) -> pd.DataFrame:
    import os

    import torch

    from evaluation.benchmarks import run_benchmarks

    # The task claims one CPU so it fits beside an idle engine actor; it runs alone, so use every core.
    torch.set_num_threads(os.cpu_count() or 1)
    _, per_item = run_benchmarks(model, adapter, tasks, data_dir, limit=limit, backend=backend,
                                 batch_size=batch_size, device=device, dtype=dtype)
    return per_item


def _value_counts(ann: pd.DataFrame) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for side, df in ann[ann["scored"]].groupby("side"):
        counts = {v: 0 for v in VALUES}
        for vals in df["values"]:
            for v in vals:
                counts[v] = counts.get(v, 0) + 1
        counts["none"] = int(sum(len(v) == 0 for v in df["values"]))
        out[str(side)] = counts
    return out


def _last_metrics(unit: Path) -> dict:
    lines = (unit / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _run_params(r: Run) -> dict:
    return {"model": r.model, "condition": r.condition, "kind": r.kind, "value": r.value or "",
            "seed": "" if r.seed is None else r.seed}


def _flatten(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(f"{prefix}.{k}", v))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def _code_version() -> str:
    import subprocess
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:
        sha, dirty = "", ""
    return f"{CODE_VERSION} ({sha or 'unknown commit'}{', modified' if dirty else ''})"
