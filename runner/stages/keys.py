"""Cache keys. Each stage declares, next to the code that reads them, the inputs its unit depends
on; one helper hashes them. A rerun recomputes nothing, a changed input recomputes only the units
downstream of it, and docs/ARCHITECTURE.md's key table is generated from these declarations."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

from runner.spec import Spec, content_hash
from runner.stages.unit import Unit

if TYPE_CHECKING:
    from runner.context import Run, StudyContext

CODE_VERSION = "valind-0.3"  # part of every key: bump when a stage's semantics change

# Spec fields no unit's key holds, because they cannot change a result: path pattern -> why.
# tests/test_keys.py changes every spec field in turn and checks that exactly these leave every key
# as it was; a field added to the spec must enter a key or this list, with its reason.
OUTSIDE_KEYS: dict[str, str] = {
    "study.name": "names the study directory, inside which the keys live",
    "study.output_dir": "where the study directory is",
    "models[].params_b": "the model size `valind plan` assumes",
    "data.data_dir": "where the data files are: their names and contents are in the keys (data dir)",
    "annotate.prompt_version": "pins this valind's value-judge prompt, whose version the annotate key holds",
    "*engine.actors": "how many engines serve the requests, not what they compute",
    "*engine.gpus_per_actor": "the devices an engine holds",
    "*engine.cpus_per_actor": "the CPU threads an engine holds",
    "*engine.tensor_parallel": "how a model is sharded over GPUs: the same weights and requests",
    "*engine.kv_cache_gb": "cache memory: how many sequences are decoded at once",
    "*engine.gpu_memory_utilization": "cache memory: how many sequences are decoded at once",
    "*engine.gpu_kv_cache_gb": "cache memory: how many sequences are decoded at once",
    "*engine.feeding": "how requests reach an engine (streamed or in batches); with greedy decoding the "
                       "same answers up to the batch-composition rounding the adapter check measures",
    "*engine.batch_size": "how requests are split into calls; with greedy decoding the same answers up to "
                          "the batch-composition rounding the adapter check measures",
    "*engine.startup_timeout_s": "how long a pool waits for its actors",
    "*engine.call_timeout_s": "how long an engine call may run before its actor is taken for hung",
    "*engine.cpu_compile": "eager or compiled execution of the same model",
    "train.adapters_per_group": "how cells are scheduled: a cell in a group equals the cell alone "
                                "(tests/test_group.py, to 1e-5)",
    "train.max_failures": "how often a failed worker group is restarted (a resume replays the same batches)",
    "train.checkpoint_every": "how often training state is saved (a resume replays the same batches)",
    "train.checkpoint_every_s": "how often training state is saved (a resume replays the same batches)",
    "train.report_every": "how often step metrics are reported",
    "generate.runs_per_chunk": "how runs are batched through the pool: each run's requests are the same, "
                               "answered up to the batch-composition rounding the adapter check measures",
    "score.benchmark_batch_size": "how QA requests are batched",
    "tracking.*": "where results are logged, not what they are",
    "plan.*": "throughput figures `valind plan` assumes",
    "cluster.*": "the cluster `valind plan` and the scheduler size work for",
}


def outside_keys(path: str) -> str | None:
    """Why a spec field (a dotted path, list indices as []) is in no key, or None if it is in one."""
    return next((why for pat, why in OUTSIDE_KEYS.items() if fnmatch(path, pat)), None)


def result_view(spec: Spec) -> dict[str, Any]:
    """The spec without the fields that cannot change a result: what a study directory is owned by
    (runner.study_dir) and what the adaptive-seeds state is keyed by."""
    def strip(d: Any, prefix: str) -> Any:
        if isinstance(d, dict):
            return {k: strip(v, f"{prefix}.{k}" if prefix else k) for k, v in d.items()
                    if outside_keys(f"{prefix}.{k}" if prefix else k) is None}
        if isinstance(d, list):
            return [strip(v, f"{prefix}[]") for v in d]
        return d
    view: dict[str, Any] = strip(spec.model_dump(mode="json"), "")
    return view


@dataclass(frozen=True)
class Key:
    """The key of a store folder (`stage`): a hash of CODE_VERSION, the folder and `inputs`, each
    a name (shown in the key table) and a getter of (ctx, run); per_run keys have one unit per run."""
    stage: str  # the store folder
    # each getter gets the context and the run (None for a study-level key); the run is Any so that
    # a per-run getter reads its fields without the None check its `per_run` flag already makes
    inputs: dict[str, Callable[[StudyContext, Any], Any]]
    per_run: bool = False

    def __call__(self, ctx: StudyContext, run: Run | None = None) -> str:
        return ctx.key(self, run)

    def unit(self, ctx: StudyContext, run: Run | None = None) -> Unit:
        """The unit this key names (`run`'s, for a per-run key)."""
        return Unit(ctx.store, self.stage, self(ctx, run))

    def compute(self, ctx: StudyContext, run: Run | None = None) -> str:
        if self.per_run and run is None:
            raise ValueError(f"the {self.stage} key is per run")
        return content_hash(CODE_VERSION, self.stage, {name: get(ctx, run) for name, get in self.inputs.items()})


def render_key_table(keys: Iterable[Key]) -> str:
    """The markdown table of declared keys (runner.stages.key_table: every one, in data-flow order)."""
    lines = ["| unit (`stages/<folder>/<key>/`) | one per | hashed inputs |", "|---|---|---|"]
    for k in keys:
        lines.append(f"| `{k.stage}` | {'run' if k.per_run else 'study'} | "
                     + ", ".join(f"`{name}`" for name in k.inputs) + " |")
    return "\n".join(lines)


# seeds.adaptive's state (runner.seeds): every spec field that can change a result, since the seeds
# it added answer that spec's contrasts only.
ADAPTIVE = Key("adaptive", {"spec (every field that can change a result)": lambda c, r: result_view(c.spec)})

# the stage that writes each store folder (a unit a later stage cannot read is recomputed by it)
FOLDER_STAGE = {"annotate": "annotate", "annotate_check": "annotate", "curate": "curate", "train": "train",
                "items": "generate", "generate": "generate", "qa": "score", "score": "score", "agreement": "score",
                "score_check": "score", "analyze": "analyze"}
