"""Ray start-up: a local cluster when RAY_ADDRESS is unset, the given cluster otherwise."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Environment every Ray worker needs; secrets are never forwarded explicitly.
def worker_env() -> dict[str, str]:
    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    for key in ("HF_HUB_OFFLINE", "DS_ACCELERATOR"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    # Workers run in other directories: a relative path would point somewhere else there (for
    # TORCH_EXTENSIONS_DIR that means rebuilding DeepSpeed's ops, ~25 s, in every training cell).
    for key in ("VALIND_CACHE_DIR", "VALIND_DATA_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(key):
            env[key] = os.path.abspath(os.environ[key])
    if not _has_gpu():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def init_ray(num_cpus: int | None = None):
    import ray

    if ray.is_initialized():
        return ray
    env = worker_env()
    os.environ.update(env)  # the driver's own imports see the same settings
    project_root = str(Path(__file__).resolve().parent.parent)
    if os.environ.get("RAY_ADDRESS") and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside `ray job submit` the job's runtime env already applies; repeating keys conflicts.
        ray.init(log_to_driver=_verbose())
    elif os.environ.get("RAY_ADDRESS"):  # a driver started on a node of a running cluster
        ray.init(log_to_driver=_verbose(), runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=_verbose(),
                 logging_level="ERROR",
                 runtime_env={"env_vars": {**env, "PYTHONPATH": os.pathsep.join([project_root, *sys.path[1:2]])}})
    return ray


def _verbose() -> bool:
    """Worker logs (vLLM, DeepSpeed, Ray Train) reach the terminal only with VALIND_VERBOSE=1."""
    return os.environ.get("VALIND_VERBOSE", "0") not in ("", "0")
