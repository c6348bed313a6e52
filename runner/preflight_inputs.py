"""`valind preflight`'s checks of what a study reads: data files, models and their chat templates,
the token gated models need, the tracking server. Each check returns Rows (runner.preflight)."""
from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from evaluation.benchmarks import DATA_FILES, HUB_TASKS, load_task_dataset
from evaluation.suites import load_suite
from evaluation.suites import registry as suites
from runner import models
from runner.chat_render import render
from runner.data.sources import DataError, check_local, load_pairs, local_path, locate
from runner.preflight_rows import PLACEHOLDER_TOKENS, RESPONSE, TURNS, Row, sample_chat
from runner.spec import Spec, eval_suites
from runner.spec_sections import is_template_path
from runner.spec_views import judge_fields
from runner.tracking import is_local_uri, local_hosts, local_tracking_refusal, tracking_uri

DATA_FIX = "stage the data directory as the README says and set data.data_dir or VALIND_DATA_DIR to it"
# Hub model families whose repositories are gated (a license to accept, a token to download): told
# from the name, without the network
GATED = ("meta-llama/", "mistralai/", "google/gemma", "google/medgemma", "cohereforai/", "coherelabs/")
PROBE_EXPERIMENT = "valind-preflight"  # where the tracking probe creates (and deletes) its run


# --- data ----------------------------------------------------------------------------------------

def data_checks(spec: Spec) -> list[Callable[[], list[Row]]]:
    """One check per preference source, suite and benchmark the spec uses."""
    d = spec.data_dir()
    calls = [lambda i=i, s=s: [_source(spec, i, s, d)] for i, s in enumerate(spec.data.sources)]
    calls += [lambda n=n: [_suite(spec, n, d)] for n in eval_suites(spec)]
    calls += [lambda b=b: [_benchmark(b, d)] for b in spec.score.benchmarks]
    return calls


def _source(spec: Spec, i: int, src, d: Path | None) -> Row:
    where, check = f"data.sources[{i}]", f"preference data {src.name}"
    try:
        if src.name == "local":
            check_local(src, d)
            return Row(check, where, True, str(local_path(src, d)))
        path, hub = locate(src, d)
        first = src.model_copy(update={"max_pairs": 1})
        if path is None:
            if hub is None:
                return Row(check, where, False, f"no file for it under {d}/preference" if d else "no data directory",
                           DATA_FIX)
            return _hub_dataset(check, where, hub, lambda: load_pairs(first, d, spec.data.max_chars))
        pairs, _ = load_pairs(first, d, spec.data.max_chars)
        if pairs.empty:
            return Row(check, where, False, f"{path}: no valid pair", "check the file (valind annotate drops invalid rows)")
        return Row(check, where, True, str(path))
    except DataError as e:
        return Row(check, where, False, str(e), DATA_FIX)


def _hub_dataset(check: str, where: str, hub_id: str, load: Callable[[], object]) -> Row:
    """A hub dataset: offline, loaded from the local cache as the job loads it (`load`: a folder of
    that name is not enough, another config or an interrupted download leaves one); else known to the hub."""
    from huggingface_hub import constants  # deferred: huggingface_hub, for hub datasets only
    if constants.HF_HUB_OFFLINE:
        try:
            load()
        except Exception as e:
            return Row(check, where, False, f"not in the data directory, HF_HUB_OFFLINE is set and the hub dataset "
                                            f"{hub_id} does not load from the local cache ({type(e).__name__}: "
                                            f"{str(e)[-300:]})",
                       f"{DATA_FIX}, or run `valind stage SPEC` where the hub is reachable, or unset HF_HUB_OFFLINE")
        return Row(check, where, True, f"hub dataset {hub_id}, loaded from the local cache")
    try:
        from huggingface_hub import HfApi  # deferred: huggingface_hub, for hub datasets only
        HfApi().dataset_info(hub_id, timeout=10)
    except Exception as e:
        return Row(check, where, False, f"hub dataset {hub_id}: {type(e).__name__}: {str(e)[:200]}",
                   f"{DATA_FIX}, or make the hub reachable (and the token valid for a gated dataset)")
    return Row(check, where, True, f"hub dataset {hub_id}")


def _suite(spec: Spec, name: str, d: Path | None) -> Row:
    """The suite's own loader, on every file it reads (held-out suites get one sample prompt)."""
    check, where = f"suite {name}", f"generate.suites: {name}"
    extra = {"held_out_prompts": [sample_chat(spec)]} if suites.get(name).held_out else {}
    try:
        items = load_suite(name, d, None, spec.generate.sampling.seed, **extra)
    except Exception as e:
        why = "no data directory" if d is None else f"{type(e).__name__}: {str(e)[:300]}"
        return Row(check, where, False, why, DATA_FIX)
    return Row(check, where, True, f"{len(items)} items")


def _benchmark(name: str, d: Path | None) -> Row:
    task, check, where = f"valind_{name}", f"benchmark {name}", f"score.benchmarks: {name}"
    if task in HUB_TASKS:
        return _hub_dataset(check, where, HUB_TASKS[task], lambda: load_task_dataset(task))
    if d is None:
        return Row(check, where, False, "no data directory", DATA_FIX)
    path = d / DATA_FILES[task]
    try:
        with open(path, encoding="utf-8") as f:
            if not f.readline().strip():
                return Row(check, where, False, f"{path}: empty", DATA_FIX)
    except OSError as e:
        return Row(check, where, False, f"{path}: {e.strerror}", DATA_FIX)
    return Row(check, where, True, str(path))


# --- models, chat templates, tokens ----------------------------------------------------------------

def model_fields(spec: Spec) -> dict[str, list[str]]:
    """Every model the study loads (evaluated models and judges) -> the spec fields that name it."""
    out: dict[str, list[str]] = {m.name: [f"models[{i}]"] for i, m in enumerate(spec.models)}
    for field, name in judge_fields(spec).items():
        out.setdefault(name, []).append(field)
    return out


def model_rows(spec: Spec) -> list[Row]:
    """Each model's config and tokenizer load; it has a chat template (a stage: base model the spec's
    own) that renders the sample chat in the sandbox (runner.chat_render), all templates in one call."""
    fields = model_fields(spec)
    with ThreadPoolExecutor(min(8, len(fields))) as ex:
        loaded = dict(zip(fields, ex.map(lambda n: _load_model(spec, n), fields)))
    prompt = sample_chat(spec)
    chats = [[prompt, True], [prompt + [{"role": "assistant", "content": RESPONSE}], False]]
    jobs = {n: {"template": t, "chats": chats, "tokens": tok or PLACEHOLDER_TOKENS}
            for n, (why, t, tok) in loaded.items() if why is None}
    rows = []
    results = dict(zip(jobs, render(list(jobs.values()))))
    for name, (why, _, _) in loaded.items():
        where, check = ", ".join(fields[name]), f"model {name}"
        if why is None:
            r = results[name]
            if "error" in r:
                why = f"its chat template does not render: {r['error']}"
            elif TURNS[-1] not in r["renders"][0] or RESPONSE not in r["renders"][1]:
                why = "its chat template does not render the messages' content"
        rows.append(Row(check, where, why is None, why or "config, tokenizer and chat template load",
                        "" if why is None else _model_fix(spec, name)))
    return rows


def _model_fix(spec: Spec, name: str) -> str:
    m = spec.model(name)
    if m.stage == "base":
        return ("give models[i].chat_template as a Jinja string or a .jinja file (a relative path is read from "
                "the spec file's folder)")
    return "check the path or hub id (and revision); give a chat_template where the tokenizer has none"


def _load_model(spec: Spec, name: str) -> tuple[str | None, str | None, dict | None]:
    """(what is wrong or None, the chat template's text, the tokenizer's special tokens)."""
    from transformers import AutoConfig, AutoTokenizer  # deferred: transformers takes seconds to import
    m = spec.model(name)
    t = m.chat_template
    if t and is_template_path(t) and not Path(t).is_file():  # validated when the spec was read: deleted since
        return f"its chat template file {t} does not exist", None, None
    try:
        hub = models.is_hub_id(m.path)
        src, rev = (m.path, models.hub_commit(m.path, m.revision)) if hub else (models.resolve(m.path), None)
        AutoConfig.from_pretrained(src, revision=rev, trust_remote_code=m.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(src, revision=rev, trust_remote_code=m.trust_remote_code)
    except Exception as e:
        gated = " (a gated model: see the token row)" if is_gated(m.path) and not token_source() else ""
        return f"cannot load {m.path}: {type(e).__name__}: {str(e)[:300]}{gated}", None, None
    text = m.template_text() or (tok.chat_template if isinstance(tok.chat_template, str) else None)
    if text is None:
        return f"the tokenizer of {m.path} has no chat template and the spec gives none", None, None
    return None, text, {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}


def is_gated(path: str) -> bool:
    return models.is_hub_id(path) and path.lower().startswith(GATED)


def token_source() -> str | None:
    """Where a Hugging Face token is found (never the token): an environment variable or a token file."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return var
    from huggingface_hub import constants  # deferred: huggingface_hub, only where no token is in the environment
    files = [Path(os.environ.get("HF_TOKEN_PATH") or constants.HF_TOKEN_PATH).expanduser()]
    if os.environ.get("VALIND_SECRETS_DIR"):  # one file per secret on the shared filesystem (README)
        d = Path(os.environ["VALIND_SECRETS_DIR"]).expanduser()
        files += [d / "HF_TOKEN", d / "HUGGING_FACE_HUB_TOKEN"]
    for path in files:
        try:
            if path.read_text().strip():
                return f"token file {path}"
        except OSError:
            pass
    return None


def token_rows(spec: Spec) -> list[Row]:
    """A token where a gated model is named (judged from the hub id alone)."""
    gated = {n: w for n, w in model_fields(spec).items() if is_gated(spec.model(n).path)}
    if not gated:
        return []
    where = ", ".join(f for w in gated.values() for f in w)
    names = ", ".join(spec.model(n).path for n in gated)
    src = token_source()
    if src:
        return [Row("Hugging Face token", where, True, f"for {names}: present ({src})")]
    return [Row("Hugging Face token", where, False, f"{names} is gated and no token is set (HF_TOKEN, "
                "HUGGING_FACE_HUB_TOKEN or a token file)", "accept the model's license on the hub and give "
                "the job a token (README: Run on a cluster, tokens)")]


# --- tracking --------------------------------------------------------------------------------------

def tracking_rows(spec: Spec, root: Path, nodes: int) -> list[Row]:
    """The tracking server: reachable, and a probe run created and deleted in a probe experiment. A
    local file store is the run's to create; on a multi-node cluster it is refused."""
    uri = tracking_uri(spec.tracking.uri, root)
    shown = _without_credentials(uri)
    where = "tracking.uri" if spec.tracking.uri else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                                                      else "tracking (default)")
    if is_local_uri(uri):
        why = local_tracking_refusal(uri, nodes, os.environ.get("RAY_ADDRESS"), local_hosts())
        return [Row("tracking server", where, why is None, why or f"{shown}: a file store the run creates",
                    "" if why is None else "set tracking.uri to an http(s):// MLflow server")]
    fix = "start the MLflow server or correct tracking.uri / MLFLOW_TRACKING_URI"
    u = urlparse(uri)
    if u.scheme in ("http", "https"):
        try:
            socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=5).close()
        except OSError as e:
            return [Row("tracking server", where, False, f"{shown}: unreachable ({e.strerror or e})", fix)]
    try:
        from mlflow.tracking import MlflowClient  # deferred: mlflow takes seconds to import
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(PROBE_EXPERIMENT)
        if exp is None:
            eid = client.create_experiment(PROBE_EXPERIMENT)
        else:
            eid = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(eid)
        client.delete_run(client.create_run(eid).info.run_id)
    except Exception as e:
        return [Row("tracking server", where, False, f"{shown}: {type(e).__name__}: {str(e)[:200]}", fix)]
    return [Row("tracking server", where, True, f"{shown}: a probe run created and deleted in {PROBE_EXPERIMENT!r}")]


def _without_credentials(uri: str) -> str:
    u = urlparse(uri)
    return u._replace(netloc=u.netloc.rsplit("@", 1)[-1]).geturl() if "@" in u.netloc else uri
