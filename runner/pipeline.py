"""A study: its runs, driving the stages (runner.stages) up to one of them, adaptive seeds, status.

Every unit of work is stored under a key hashed from the inputs its stage declares, so a rerun
recomputes nothing, a changed setting recomputes only what it touches, and a run that was cut off
resumes from the last finished unit (annotation batch, training cell, run).
"""
from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from runner.capacity import stage_bundles
from runner.context import Doses, Run, StageError, StudyContext, study_runs
from runner.plan import PlanError, disk_bytes
from runner.preflight import check_inputs
from runner.progress import say
from runner.secrets import redact
from runner.seeds import SeedBook
from runner.spec import Spec
from runner.stages import FOLDER_STAGE, KEYS, STAGES, analyze, annotate
from runner.stages.analyze import Analyzed
from runner.stages.curate import Curated
from runner.stages.train import TRAIN, cell_timings
from runner.stages.unit import Unit
from runner.store import MISSING, StoreError, read_json, read_parquet, sweep
from runner.study_dir import StudyLock, claim, record_revisions, recorded_revisions
from runner.tracking import check_cluster_tracking, tracking_uri
from runner.train.doses import condition_steps

__all__ = ["Study", "Run", "StageError", "STAGES"]


class Study:
    def __init__(self, spec: Spec, spec_text: str = "", base_dir: Path | None = None):
        self.spec, self.spec_text = spec, spec_text
        self.root = spec.output_dir(base_dir or Path.cwd())
        self.seeds = SeedBook(spec, self.root)
        self.ctx = StudyContext(spec, spec_text, self.root, runs=self.runs, runs_table=self.runs_table,
                                need=self.need, seeds=self.seeds)
        self.store = self.ctx.store
        self.ctx.revisions.update(recorded_revisions(self.root, spec))  # hub commits of its first run
        self._done: dict[str, Any] = {}  # stage results within this process
        self.stage_seconds: dict[str, float] = {}
        self.stage_startup: dict[str, tuple[float, float]] = {}  # stage -> (start-up s, busy s)
        self.on_stage: Callable[[str], None] | None = None  # called as a stage starts (fault injection)
        self._sizes: dict[str, Any] = {}  # the curate unit's key and each subset's size (Study.doses)

    # ------------------------------------------------------------------ runs
    def runs(self) -> list[Run]:
        kept = self.kept_values()
        conds = self.spec.conditions(kept)
        return study_runs(self.spec, conds, self.seeds.seeds, lambda r: TRAIN(self.ctx, r),
                          doses=self.doses(conds), values=kept)

    def _steps_known(self) -> bool:
        """Whether the runs carry steps: train.eval_at_steps places points by step, and under
        steps_per_condition: equal the report gives each condition's steps and epochs."""
        t = self.spec.train
        return bool(t.eval_at_steps) or t.steps_per_condition == "equal"

    def doses(self, conds: list[str]) -> Doses | None:
        """Each condition's (optimizer steps, subset size), from the curate stage's subsets, where the
        runs carry steps and curation is done; else None. Never runs curate: the keys do not depend on
        it (a step point is named by its run id), and the train stage pulls curate before it lists the
        cells it trains."""
        key = self.key("curate") if self._steps_known() else None
        if key is None or not self.store.done("curate", key):
            return None
        if self._sizes.get("unit") != key or not set(conds) <= set(self._sizes):
            curated = Curated(Unit(self.store, "curate", key))
            self._sizes = {"unit": key, **{c: pq.ParquetFile(curated.subset(c)).metadata.num_rows for c in conds}}
        sizes = {c: int(self._sizes[c]) for c in conds}
        steps = condition_steps(sizes, self.spec.train)
        return lambda c: (steps[c], sizes[c])

    def kept_values(self) -> list[str]:
        """The induced values that get runs. Under data.subset_size: all, curation drops values below
        min_subset_size, so they are known only from the curate stage's result (produced here if
        needed, which annotates first); the equal-N modes keep every value (or fail in curate)."""
        if self.spec.data.subset_size != "all":
            return list(self.spec.values.induced)
        curated = self.need("curate")
        assert isinstance(curated, Curated)
        return read_json(curated.curation)["rule"]["kept"]

    def runs_known(self) -> bool:
        """Whether `runs()` can answer without running a stage (see kept_values)."""
        return self.spec.data.subset_size != "all" or self.store.done("curate", self.key("curate"))

    def runs_table(self) -> pd.DataFrame:
        """The runs as a table (no cell_key); step and epochs only where known (the analysis key
        holds this table: a study without them keeps its key)."""
        t = pd.DataFrame([{k: v for k, v in asdict(r).items() if k != "cell_key"} for r in self.runs()])
        return t.drop(columns=[c for c in ("step", "epochs") if c in t and t[c].isna().all()])

    def key(self, stage: str, run: Run | None = None) -> str:
        """The key of a store folder's unit (of `run`'s, for per-run keys)."""
        return KEYS[stage](self.ctx, run)

    # --------------------------------------------------------------- driving
    def need(self, stage: str) -> Any:
        """A stage's result, produced once per process (each stage pulls the ones it reads; the
        stages, typed: `ctx.need(<the stage's result type>)`)."""
        if stage not in self._done:
            if self.on_stage:
                self.on_stage(stage)
            if self.store.heal:
                self._check_space(stage)
            t0, since, pools = time.perf_counter(), time.time(), len(self.ctx.pools.opened)
            with self.ctx.demand.stage(lambda: stage_bundles(self.ctx, stage)):  # asked of an autoscaler
                self._done[stage] = self._healing(stage)
            self.stage_seconds[stage] = time.perf_counter() - t0
            self.stage_startup[stage] = self._startup(stage, since, pools)
        return self._done[stage]

    def _healing(self, stage: str):
        """Run a stage. A unit of an earlier stage whose file it cannot read is cleared and recomputed
        (each once), and the stage runs again: the broken upstream unit is redone, not this one failed."""
        healed: set[tuple[str, str]] = set()
        while True:
            try:
                return STAGES[stage].run(self.ctx)
            except StoreError as e:
                unit = self._unit_of(e.path)
                if (not self.store.heal or unit is None or unit in healed
                        or FOLDER_STAGE.get(unit[0], stage) == stage):
                    raise
                healed.add(unit)
                self.store.invalidate(*unit, e.path, f"{stage} could not read it ({e})")
                order = list(STAGES)
                for st in order[order.index(FOLDER_STAGE[unit[0]]):order.index(stage)]:
                    self._done.pop(st, None)

    def _unit_of(self, path: Path | None) -> tuple[str, str] | None:
        """(store folder, key) of a file inside a unit, else None."""
        try:
            folder, key, *_ = Path(path).relative_to(self.root / "stages").parts
            return folder, key
        except (TypeError, ValueError):
            return None

    def _check_space(self, stage: str) -> None:
        """Refuse to start a stage whose outputs (runner.plan.disk_bytes, for its units not yet done)
        do not fit the free space of the study directory's filesystem, naming the shortfall."""
        try:
            need = disk_bytes(self.spec)[stage] * self._pending(stage)
        except PlanError:  # a source of unknown size: nothing to check against
            return
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise StoreError(f"{self.root}: {stage} is expected to write about {need / 1e9:,.2f} GB (valind plan's "
                             f"disk estimate) and {free / 1e9:,.2f} GB is free: short by {(need - free) / 1e9:,.2f} GB. "
                             "Free space, or set study.output_dir on a larger filesystem; finished units are kept")

    def _pending(self, stage: str) -> float:
        """The share of a stage's units not done yet."""
        if stage in ("train", "generate", "score"):
            if not self.runs_known():
                return 1.0
            runs = self.runs()
            keys = ([r.cell_key for r in runs if r.cell_key and r.final] if stage == "train"
                    else [self.key(stage, r) for r in runs])
            return sum(not self.store.done(stage, k) for k in keys) / max(1, len(keys))
        return 0.0 if self.store.done(stage, self.key(stage)) else 1.0

    def _startup(self, stage: str, since: float, pools: int) -> tuple[float, float]:
        """(start-up seconds, busy seconds) of a stage that just ran: its engine pools' starts against
        its wall time; for training, the cells' time outside optimizer steps against their wall time
        (cells overlap, so both are cell-seconds)."""
        if stage == "train":
            cells = [c for c in cell_timings(self.ctx) if c["start"] >= since]
            return sum(c["overhead_s"] for c in cells), sum(c["wall_s"] for c in cells)
        return sum(p.startup_s for p in self.ctx.pools.opened[pools:]), self.stage_seconds[stage]

    def time_report(self) -> list[str]:
        """Per stage: wall time, and the share of it spent starting things rather than computing."""
        lines = []
        for stage, wall in self.stage_seconds.items():
            up, busy = self.stage_startup.get(stage, (0.0, wall))
            share = f"; start-up {up:.0f}s = {up / busy:.0%} of {'cell time' if stage == 'train' else 'it'}" \
                if up and busy else ""
            lines.append(f"  {stage:<9} {wall:6.0f}s{share}")
        return lines

    def run(self, until: str = "analyze", amend: bool = False) -> Path | None:
        """Run the study up to (and including) a stage, as the study directory's one driver."""
        with StudyLock(self.root, " ".join(sys.argv) or "valind"):
            return self._run(until, amend)

    def _start(self, amend: bool, until: str = "annotate") -> None:
        """Before any compute: the directory's spec, its leftovers, tracking, models; the data
        directory where the run goes as far as generation."""
        self.store.heal = True  # this driver holds the lock: it may clear units that fail verification
        gone = sweep(self.root)
        if gone:
            say(f"removed {len(gone)} temporary file(s) left by stopped runs")
        claim(self.root, self.spec, amend)
        self.ctx.revisions.update(recorded_revisions(self.root, self.spec))
        (self.root / "spec.yaml").write_text(redact(self.spec_text))
        s = self.spec
        engines = [e for e in (s.engine, s.annotate.engine, s.generate.engine) if e]
        check_cluster_tracking(tracking_uri(s.tracking.uri, self.root),
                               max([s.train.gpus_per_worker] + [e.gpus_per_actor for e in engines]))
        _ = self.ctx.tracker  # MLflow must be reachable before any compute
        self.ctx.check_chat_templates()  # and every model must have a chat template (hub commits resolved)
        generates = list(STAGES).index(until) >= list(STAGES).index("generate")
        annotated = self.store.done("annotate", self.key("annotate"))  # the preference files are read no more
        check_inputs(self.ctx, generates, annotated)  # the files and models the spec names (runner.preflight)
        record_revisions(self.root, self.spec, self.ctx.revisions)

    def _run(self, until: str, amend: bool) -> Path | None:
        self._start(amend, until)
        s = self.spec
        t0 = time.perf_counter()
        result = None
        try:
            for stage in list(STAGES)[: list(STAGES).index(until) + 1]:
                result = self.need(stage)
            while until == "analyze" and s.seeds.adaptive and (add := self._seeds_to_add()):
                seed = self.seeds.add(add)
                self._done.clear()
                self.ctx.forget_keys()
                say(f"adaptive seeds: adding seed {seed} to {', '.join(add)} and to the controls")
                result = self.need("analyze")
        finally:
            self.ctx.pools.close()
        say(f"study {s.study.name}: finished in {time.perf_counter() - t0:.0f}s; per stage (start-up: engine "
            "starts; in training, each cell's time outside its optimizer steps):")
        for line in self.time_report():
            say(line)
        if until == "analyze" and isinstance(result, Analyzed):
            final = self.root / "report.html"
            final.write_text(result.report.read_text())
            return final
        return None

    def _seeds_to_add(self) -> list[str]:
        key = self.key("analyze")
        add, stops = self.seeds.record(read_parquet(self.store.unit("analyze", key) / "contrasts.parquet"), key)
        for cond, why in sorted(stops.items()):
            say(f"adaptive seeds: {cond}: stop ({why}, {len(self.seeds.seeds(cond))} seeds)")
        return add

    def audit(self, n: int | None = None, labels: Path | None = None) -> Path:
        with StudyLock(self.root, " ".join(sys.argv) or "valind annotate --audit"):
            self._start(amend=False)
            return annotate.audit(self.ctx, n, labels)

    def sensitivity_lines(self) -> list[str]:
        """The positive control's verdict per model (`valind run`'s last words)."""
        return analyze.sensitivity_lines(self.ctx)

    def adapter_lines(self) -> list[str]:
        """The adapter check's verdict per model (printed just before the positive control's)."""
        return analyze.adapter_verdict_lines(self.ctx)

    # ----------------------------------------------------------------- status
    def status(self) -> list[dict]:
        """Every unit of the study: stage, unit, key, state (done | failed | invalid | missing) and why."""
        units = [("annotate", "annotations", self.key("annotate"))]
        if self.spec.annotate.check:
            units.append(("annotate_check", "labeller check", self.key("annotate_check")))
        units.append(("curate", "subsets", self.key("curate")))
        if self.runs_known():  # under data.subset_size: all the runs follow from curation: none listed before it
            runs = self.runs()
            units += [("train", r.run_id, r.cell_key) for r in runs if r.cell_key and r.final]
            units.append(("items", "suite items", self.key("items")))
            per_run = ("generate", "qa", "score") if self.spec.score.benchmarks else ("generate", "score")
            units += [(stage, r.run_id, self.key(stage, r)) for stage in per_run for r in runs]
            units.append(("agreement", "refusal judge agreement", self.key("agreement")))
            if self.spec.score.check:
                units.append(("score_check", "judge check", self.key("score_check")))
            units.append(("analyze", "report", self.key("analyze")))
        return [{"stage": st, "unit": u, "key": k, **self._state(st, k)} for st, u, k in units]

    def _state(self, stage: str, key: str) -> dict:
        """A unit's state: done, failed (its error), invalid (why: it is recomputed by the next run), missing."""
        why = self.store.problem(stage, key)
        if why is None:
            return {"state": "done"}
        if (err := self.store.failed(stage, key)) is not None:
            return {"state": "failed", "why": err.get("error")}
        return {"state": "missing"} if why == MISSING else {"state": "invalid", "why": why}
