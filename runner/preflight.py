"""Inputs checked before any compute, beyond what the spec says by itself: the files and models it
names. Each problem is (YAML path, message), raised together as one SpecError.

- `check_spec(spec)` (`valind validate`, no model loaded): local preference files, and the chat
  templates the spec gives, rendered in a sandbox (runner.chat_render).
- `check_inputs(ctx)` (`valind run`, right after the chat-template check, in the first seconds):
  the same with each model's tokenizer, plus LoRA target modules against the model's own modules
  and the prompt/response prefix rule that training tokenisation relies on.
- `preflight(spec)` (`valind preflight`, and `valind run` on a cluster before any compute): opens
  everything the study reads and checks everything it needs, in parallel, as one table of Rows
  (runner.preflight_inputs: data, models, token, tracking; runner.preflight_cluster: nodes, shared
  storage, fit).
"""
from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evaluation.errors import short_repr
from runner import cluster_fit
from runner import preflight_cluster as pc
from runner import preflight_inputs as pi
from runner.chat_render import render
from runner.cluster import init_ray
from runner.data.sources import DataError, check_local
from runner.plan import memory_problems
from runner.preflight_rows import PLACEHOLDER_TOKENS, RESPONSE, SYSTEM, TURNS, Row, sample_chat
from runner.secrets import redact
from runner.spec import Spec, SpecError
from runner.staging import staged_rows
from runner.tracking import _fail_fast

__all__ = ["PLACEHOLDER_TOKENS", "RESPONSE", "SYSTEM", "TURNS", "Row", "sample_chat", "check_spec", "check_inputs",
           "preflight", "run_preflight"]

Problems = list[tuple[str, str]]


def check_spec(spec: Spec, source: str = "spec") -> None:
    """`valind validate`'s checks of the files a spec names, and that every training cell and engine
    pool fits the declared cluster (runner.cluster_fit; raises SpecError)."""
    cap = cluster_fit.declared(spec)
    fit = cluster_fit.problems(spec, cap) if cap.nodes else []
    _raise(source, file_problems(spec) + template_problems(spec) + fit)


def check_inputs(ctx, generates: bool = True, annotated: bool = False) -> None:
    """`valind run`'s checks before any compute (ctx: runner.context.StudyContext; raises SpecError),
    a GPU training worker too small for its model's smallest layout (runner.plan.memory_problems) included.
    The preference files are read by annotation alone: once it is done (`annotated`), they are not
    needed; the data directory by generation and scoring (`generates`: the run goes that far)."""
    files = [] if annotated else file_problems(ctx.spec)
    data = data_dir_problems(ctx.spec) if generates else []
    _raise("spec", data + files + template_problems(ctx.spec, ctx) + lora_problems(ctx) + memory_problems(ctx.spec))


def data_dir_problems(spec: Spec) -> Problems:
    """The data directory is set: generation reads the suites' items there, scoring the benchmarks and
    the human labels (preflight opens each file)."""
    if spec.data_dir() is None:
        return [("data.data_dir", "not set, and VALIND_DATA_DIR is not set: the suites' items, the QA "
                 "benchmarks and the refusal judges' human labels are read from the data directory. Set "
                 "data.data_dir (on a cluster: a path on the filesystem every node mounts, where the README's "
                 "`ray rsync-up` line staged the data) or VALIND_DATA_DIR")]
    return []


def _raise(source: str, problems: Problems) -> None:
    if problems:
        raise SpecError(source, problems)


# --- local preference files ----------------------------------------------------------------------

def file_problems(spec: Spec) -> Problems:
    """Each local source's file exists, reads, has rows and the mapped columns (first rows only)."""
    problems = []
    for i, src in enumerate(spec.data.sources):
        if src.name == "local":
            try:
                check_local(src, spec.data_dir())
            except DataError as e:
                problems.append((f"data.sources[{i}].path", str(e)))
    return problems


# --- chat templates ------------------------------------------------------------------------------

def template_problems(spec: Spec, ctx=None) -> Problems:
    """Every models[i].chat_template compiles and renders the sample chat, as a prompt and with the
    response, within runner.chat_render's limits, and renders its messages' content. With a context
    (the tokenizers), its special tokens are the model's, and each evaluated model's template (the
    spec's or its tokenizer's) gives the prompt's tokens as a prefix of prompt + response."""
    prompt = sample_chat(spec)
    chats = [[prompt, True], [prompt + [{"role": "assistant", "content": RESPONSE}], False]]
    found: dict[int, str] = {}  # model index -> what is wrong with its template
    jobs = {}
    for i, m in enumerate(spec.models):
        if m.chat_template is None:
            continue
        tokens = _special_tokens(ctx.tokenizer(m.name)) if ctx else PLACEHOLDER_TOKENS
        jobs[i] = {"template": m.template_text(), "chats": chats, "tokens": tokens}
    for i, result in zip(jobs, render(list(jobs.values()))):
        if "error" in result:
            found[i] = result["error"]
        elif TURNS[-1] not in result["renders"][0] or RESPONSE not in result["renders"][1]:
            found[i] = "does not render the messages' content (is it a chat template?)"
    if ctx is not None:
        for i, m in enumerate(spec.models):
            if i not in found and (why := _prefix_problem(ctx, i, prompt)):
                found[i] = why
    return [(f"models[{i}].chat_template", found[i]) for i in sorted(found)]


def _special_tokens(tokenizer) -> dict:
    # apply_chat_template passes these to the template (transformers' special_tokens_map)
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}


def _prefix_problem(ctx, i: int, prompt: list[dict]) -> str | None:
    """Training tokenises a pair as prompt ids + what the template adds for the response, and
    refuses a template whose prompt is not a prefix of prompt + response (batches.encode)."""
    from runner.train.batches import encode  # deferred: torch
    m = ctx.spec.models[i]
    try:
        encode(ctx.tokenizer(m.name), prompt, RESPONSE, ctx.chat_template(m.name))
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:300]}" + ("" if m.chat_template else " (the tokenizer's template)")
    return None


# --- LoRA target modules -------------------------------------------------------------------------

def lora_problems(ctx) -> Problems:
    """With train.finetune: lora, every train.lora.target_modules entry matches a linear layer of
    every model, by peft's rule for a list of names (the module's dotted name is the entry or ends
    with "." + the entry), and nothing else: LoRA here wraps linear layers (the routed group forward
    is peft's Linear's; vLLM serves linear layers). peft itself ignores an entry that matches
    nothing as long as another one matches."""
    spec = ctx.spec
    if spec.train.finetune != "lora":
        return []
    problems, found = [], {}  # found: (target index, what is wrong) -> the models it is wrong for
    built: dict[tuple[str, bool], dict | str] = {}
    for i, m in enumerate(spec.models):
        where = (ctx.model_path(m.name), m.trust_remote_code)
        if where not in built:
            built[where] = _modules(*where)
        modules = built[where]
        if isinstance(modules, str):
            problems.append((f"models[{i}].path", f"cannot build {m.name!r} from its config to check "
                                                  f"train.lora.target_modules: {modules}"))
            continue
        for j, target in enumerate(spec.train.lora.target_modules):
            if why := _target_problem(target, modules):
                found.setdefault((j, why), []).append(repr(m.name))
    return problems + [(f"train.lora.target_modules[{j}]",
                        f"{short_repr(spec.train.lora.target_modules[j])} in {', '.join(names)}: {why}")
                       for (j, why), names in sorted(found.items())]


def peft_matches(target: str, names) -> list[str]:
    """The module names a target_modules entry selects (peft's check_target_module_exists for a list)."""
    return [n for n in names if n == target or n.endswith(f".{target}")]


def _target_problem(target: str, modules: dict) -> str | None:
    linear = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, mod in modules.items() if _is_linear(mod)}))
    hits = peft_matches(target, modules)
    if not hits:
        return f"matches no module; its linear layers are {linear}"
    other = next((n for n in hits if not _is_linear(modules[n])), None)
    if other:
        return f"matches {other} ({type(modules[other]).__name__}), not a linear layer; its linear layers are {linear}"
    return None


def _modules(path: str, trust_remote_code: bool):
    """Module name -> module of the model built from its config on the meta device (no weights
    read, no memory taken), or why it could not be built."""
    # deferred: torch and transformers, imported when a LoRA spec's models are checked
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:300]}"
    return {n: mod for n, mod in model.named_modules() if n}


def _is_linear(module) -> bool:
    import torch  # deferred: torch (only _modules' models reach here, after it imported torch)
    return isinstance(module, torch.nn.Linear)


# --- valind preflight ----------------------------------------------------------------------------

def on_cluster() -> bool:
    """Whether this driver joins a Ray cluster (RAY_ADDRESS, as under `ray job submit`)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def preflight(spec: Spec, source: str = "SPEC") -> list[Row]:
    """Every check, in parallel threads (the node checks as Ray tasks, one per node); a check that
    itself fails becomes a problem row. With HF_HUB_OFFLINE set, every hub model staged (runner.staging)."""
    # deferred: transformers; its lazy module is not thread-safe on first import ("cannot import name AutoConfig")
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401
    connected = on_cluster()
    nodes, down = 1, ray_unreachable(os.environ["RAY_ADDRESS"]) if connected else None
    if connected and not down:
        nodes = sum(1 for n in init_ray().nodes() if n.get("Alive"))
    storage = Path(spec.study.output_dir).expanduser().resolve()
    root = spec.output_dir(Path.cwd())

    def cluster() -> list[Row]:
        if down:
            return [Row("Ray cluster", "RAY_ADDRESS", False, down, "start the cluster, or correct RAY_ADDRESS")]
        rows, live = pc.node_rows(spec, storage, connected)
        return rows + pc.fit_rows(spec, live, connected)

    # the tracking probe asks once, briefly (MLflow retries for minutes)
    calls = [cluster, lambda: pi.model_rows(spec), lambda: pi.token_rows(spec), lambda: staged_rows(spec, source),
             lambda: pi.tracking_rows(spec, root, nodes), *pi.data_checks(spec)]
    with _fail_fast(10), ThreadPoolExecutor(min(16, len(calls))) as ex:
        return [r for rows in ex.map(_guarded, calls) for r in rows]


def ray_unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why the Ray head at `address` ("host:port", "ray://host:port") cannot be reached in a few
    seconds, or None ("auto" and the like are left to Ray): ray.init would retry for much longer."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        return f"{address}: unreachable ({e.strerror or e})"
    return None


def _guarded(call) -> list[Row]:
    try:
        return call()
    except Exception as e:  # a check's own failure is reported, never a traceback that hides the rest
        return [Row("preflight", "-", False, f"a check failed: {type(e).__name__}: {str(e)[:300]}",
                    "report it as a valind bug")]


def render_rows(rows: list[Row], title: str) -> None:
    """One table (check | where | ok/problem | detail and how to fix); secrets redacted."""
    table = Table(title=title, show_lines=False)
    for col in ("check", "where", "", "detail", "how to fix"):
        table.add_column(col, overflow="fold")
    for r in sorted(rows, key=lambda r: r.ok):  # problems first
        table.add_row(r.check, r.where, "ok" if r.ok else "[bold red]problem[/]", redact(r.detail), redact(r.fix))
    Console(width=160).print(table)


def run_preflight(spec: Spec, source: str) -> int:
    """`valind preflight`: the table, then one line per problem; 0 when there is none, else 2."""
    t0 = time.perf_counter()
    rows = preflight(spec, source)
    took = time.perf_counter() - t0
    render_rows(rows, f"preflight {source} — {len(rows)} checks in {took:.1f} s")
    bad = [r for r in rows if not r.ok]
    for r in bad:
        print(redact(f"problem: {r.check} ({r.where}): {r.detail}"))
    print(f"preflight: {len(bad)} problem(s) in {len(rows)} checks, {took:.1f} s")
    return 2 if bad else 0
