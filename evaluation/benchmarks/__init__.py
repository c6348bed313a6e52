"""Standard QA benchmarks through lm-evaluation-harness, on our offline data files.

The task configs live in `tasks/` as lm-eval YAML with a `@DATA_DIR@` placeholder in
`dataset_kwargs.data_files`; `write_task_dir` renders them with an absolute data dir into a
directory that lm-eval takes as `include_path` (the Python API and `lm_eval --include_path`
alike), so both see byte-identical task configs.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml

from evaluation.errors import ValindError
from evaluation.types import SCORE_COLUMNS, vllm_lora_rank

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_TASKS = ("valind_truthfulqa_mc", "valind_openbookqa", "valind_gsm8k")
HUB_TASKS = {"valind_mmlu": "cais/mmlu"}
TASKS = OFFLINE_TASKS + tuple(HUB_TASKS)
PER_ITEM_COLUMNS = tuple(c for c in SCORE_COLUMNS if c != "run_id")
SUITE, JUDGE = "qa", "lm-eval"  # the per-item score rows' suite and judge
PLACEHOLDER = "@DATA_DIR@"
DATA_FILES = {"valind_truthfulqa_mc": "qa/truthfulqa.csv", "valind_openbookqa": "qa/openbookqa-test.jsonl",
              "valind_gsm8k": "qa/gsm8k-test.jsonl"}


class BenchmarkError(ValindError):
    pass


class _TaskLoader(yaml.SafeLoader):  # type: ignore[misc]  # (PyYAML ships no types here)
    """lm-eval's task YAML: its `!function` tags (process_docs hooks) read as None, not run."""


_TaskLoader.add_multi_constructor("!", lambda loader, tag, node: None)


def task_load(task: str, tasks_dir: Path = TASKS_DIR) -> tuple[str, str | None, dict[str, Any]]:
    """(dataset_path, dataset_name, dataset_kwargs) of a valind lm-eval task, from its own YAML: lm-eval's
    Task.download calls load_dataset(path, name, **kwargs) for all splits, and the datasets cache keys its
    copy on these, so staging loads with exactly them (trust_remote_code dropped, as lm-eval drops it)."""
    t = yaml.load((tasks_dir / f"{task}.yaml").read_text(), Loader=_TaskLoader)
    kwargs = {k: v for k, v in (t.get("dataset_kwargs") or {}).items() if k != "trust_remote_code"}
    return t["dataset_path"], t.get("dataset_name"), kwargs


def load_task_dataset(task: str) -> Any:
    """A hub task's dataset (every split) as lm-eval's Task.download loads it: what `valind stage`
    stages and `valind preflight` checks offline, so both find what the task will look up."""
    import datasets  # deferred: datasets imports pyarrow and more (seconds), for hub benchmarks only
    path, name, kwargs = task_load(task)
    return datasets.load_dataset(path, name, **kwargs)


def write_task_dir(data_dir: Path, dest: Path, tasks: tuple[str, ...] | list[str] = OFFLINE_TASKS) -> Path:
    """Render all task YAMLs (and their `utils.py`) into `dest` with `data_dir` made absolute;
    the data files of `tasks` must exist."""
    data_dir = Path(data_dir).expanduser().resolve()
    missing = [DATA_FILES[t] for t in tasks if t in DATA_FILES and not (data_dir / DATA_FILES[t]).exists()]
    if missing:
        raise BenchmarkError(f"{data_dir}: missing benchmark data files {missing}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # The placeholder sits inside double-quoted YAML strings; a JSON string body is valid there.
    quoted = json.dumps(str(data_dir))[1:-1]
    for src in TASKS_DIR.iterdir():
        if src.suffix == ".yaml":
            (dest / src.name).write_text(src.read_text().replace(PLACEHOLDER, quoted))
        elif src.name == "utils.py":
            shutil.copy(src, dest / src.name)
    return dest


def model_args(model_path: str, adapter: str | None, backend: str, device: str = "cpu",
               dtype: str | None = None) -> dict[str, Any]:
    """lm-eval `model_args` for the hf or vllm backend, base model plus optional LoRA adapter.

    `device` only picks the default dtype here (float32 on CPU, the model's own elsewhere):
    lm-eval takes the device from simple_evaluate and rejects it twice; vLLM ignores it (its
    platform decides)."""
    dtype = dtype or ("float32" if device == "cpu" else "auto")
    if backend == "hf":
        return {"pretrained": model_path, "dtype": dtype, **({"peft": adapter} if adapter else {})}
    if backend == "vllm":
        # lm-eval enables LoRA in vLLM whenever lora_local_path is given; the rank is the adapter's.
        args: dict[str, Any] = {"pretrained": model_path, "dtype": dtype}
        if adapter:
            r = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
            args.update(lora_local_path=adapter, max_lora_rank=vllm_lora_rank(r))
        if device == "cpu":  # as runner.engines.vllm_engine: no graph capture, bounded KV cache
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            args.update(enforce_eager=True, max_model_len=2048)
        return args
    raise BenchmarkError(f"unknown backend {backend!r} (hf or vllm)")


def _alias_vllm_cpu() -> None:
    """Let lm-eval's vllm backend import where vLLM is installed as the `vllm-cpu` distribution.

    lm-eval checks `importlib.metadata.version("vllm")`, which raises for vllm-cpu; its module
    binds `version` at import, so the alias is confined to that module."""
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    # "+cpu" as vllm.platforms does for vllm-cpu: its CPU detection may run under the alias
    cpu_version = md.version("vllm-cpu") + "+cpu"  # neither installed: let this error say so
    real = md.version

    def version(distribution_name: str) -> str:
        return cpu_version if distribution_name == "vllm" else real(distribution_name)

    if "lm_eval.models.vllm_causallms" not in sys.modules:
        import vllm  # noqa: F401  # deferred: vLLM is optional and slow; imported under the real `version`

        md.version = version
        try:
            import lm_eval.models.vllm_causallms  # noqa: F401  # deferred: binds the aliased `version`
        finally:
            md.version = real
    setattr(sys.modules["lm_eval.models.vllm_causallms"], "version", version)


def _check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BenchmarkError(f"unknown benchmark tasks {unknown}; known: {list(TASKS)}")


def _hub_error(task: str, err: BaseException) -> BenchmarkError:
    import datasets  # deferred: only on an error; datasets takes seconds to import

    offline = bool(datasets.config.HF_HUB_OFFLINE)  # as read at import, which is what counts
    why = "HF_HUB_OFFLINE is set and it is not in the local datasets cache" if offline else \
        "it could not be loaded from the hub"
    return BenchmarkError(f"{task} needs the Hugging Face dataset {HUB_TASKS[task]!r}, which is not "
                          f"available offline: {why} ({type(err).__name__}: {err})")


def _load_tasks(tasks: list[str], include: Path) -> tuple[object, list[Any]]:
    """(task manager, lm-eval Task objects with datasets loaded), one by one so a hub dataset that
    cannot load fails with an error naming it, before any model is loaded."""
    from lm_eval.tasks import TaskManager  # deferred: lm-eval is an optional, slow import

    # Only our task dir is indexed: lm-eval's default index of its thousands of task YAMLs
    # costs ~10 s per call on a small CPU.
    tm = TaskManager(include_path=str(include), include_defaults=False)
    out = []
    for t in tasks:
        try:
            out.extend(tm.load(t)["tasks"].values())
        except Exception as e:
            if t in HUB_TASKS:
                raise _hub_error(t, e) from e
            raise
    return tm, out


def _metric_name(key: str) -> str:
    """lm-eval's `acc,none` → `acc`; `exact_match,strict-match` stays (the filter matters)."""
    metric, _, flt = key.partition(",")
    return metric if flt in ("", "none") else key


def _summary(results: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for t in tasks:
        out[t] = {_metric_name(k): float(v) for k, v in results["results"][t].items()
                  if k != "alias" and isinstance(v, (int, float))}
    return out


def _per_item(samples: dict[str, Any], tasks: list[str]) -> pd.DataFrame:
    rows = []
    for t in tasks:
        # doc_id order (not string order of item_id), filters in lm-eval's order
        for s in sorted(samples.get(t, []), key=lambda s: s["doc_id"]):
            flt = s.get("filter", "none")
            raw = json.dumps({"target": s.get("target"), "resps": s.get("resps"),
                              "filtered_resps": s.get("filtered_resps")}, default=str)
            for m in s.get("metrics", []):
                v = s.get(m)
                ok = isinstance(v, (int, float)) and math.isfinite(float(v))
                rows.append({"suite": SUITE, "item_id": f"{t}/{s['doc_id']}",
                             "metric": m if flt == "none" else f"{m},{flt}",
                             "value": float(v) if ok else math.nan, "scored": bool(ok),
                             "judge": JUDGE, "raw": raw})
    return pd.DataFrame(rows, columns=list(PER_ITEM_COLUMNS))


def run_benchmarks(model_path: str, adapter: str | None, tasks: list[str], data_dir: Path,
                   limit: int | None = None, backend: Literal["hf", "vllm"] = "hf",
                   batch_size: int | str = 1, device: str = "cpu", max_gen_toks: int | None = None,
                   dtype: str | None = None) -> tuple[dict[str, dict[str, float]], pd.DataFrame]:
    """Evaluate a base model (plus optional LoRA adapter dir) on valind lm-eval tasks.

    Returns (summary: task -> {metric: value}, incl. `<metric>_stderr` and `sample_len`; per-item scores with
    `PER_ITEM_COLUMNS`, item_id `<task>/<doc_id>` where doc_id is the row index in the data file,
    so runs over the same files pair up item by item). `limit` takes the first N items per task;
    `max_gen_toks` overrides the generate_until tasks' budget (256 in the YAML); `dtype` the model's
    (default: float32 on CPU, the checkpoint's own on GPU).
    """
    import lm_eval  # deferred: lm-eval is an optional, slow import

    tasks = list(tasks)
    _check_tasks(tasks)
    with tempfile.TemporaryDirectory(prefix="valind-lm-eval-") as tmp:
        include = write_task_dir(data_dir, Path(tmp), tasks)
        manager, task_objs = _load_tasks(tasks, include)
        if backend == "vllm":
            _alias_vllm_cpu()
        results = lm_eval.simple_evaluate(
            model=backend, model_args=model_args(model_path, adapter, backend, device, dtype),
            tasks=task_objs, task_manager=manager, batch_size=batch_size, device=device, limit=limit, log_samples=True,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None)
    if results is None:  # lm-eval returns None on non-zero ranks of a distributed run
        raise BenchmarkError("lm-eval returned no results")
    return _summary(results, tasks), _per_item(results["samples"], tasks)
