"""Ray start-up: a local cluster when RAY_ADDRESS is unset, the given cluster otherwise."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Environment every Ray worker needs; secrets are never forwarded explicitly. DS_ACCELERATOR is not
# among them: each process decides its own (`local_accelerator`), or a CPU head would send `cpu` to GPU
# workers.
def worker_env() -> dict[str, str]:
    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    if os.environ.get("HF_HUB_OFFLINE"):
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    # Workers run in other directories: a relative path would point somewhere else there (for
    # TORCH_EXTENSIONS_DIR that means rebuilding DeepSpeed's ops, ~25 s, in every training cell).
    for key in ("VALIND_CACHE_DIR", "VALIND_DATA_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(key):
            env[key] = os.path.abspath(os.environ[key])
    return env


def local_accelerator() -> None:
    """DeepSpeed's accelerator for this process, decided where it runs: `cpu` without CUDA (DeepSpeed
    would otherwise probe for one and warn), left alone with it or when set."""
    if "DS_ACCELERATOR" not in os.environ and not _has_gpu():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _has_gpu() -> bool:
    try:
        import torch  # deferred: torch takes ~1 s to import, and a driver may never need it
        return torch.cuda.is_available()
    except Exception:
        return False


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime env `ray job submit` gave this driver ({} outside a job)."""
    # deferred: ray takes ~0.5 s to import; valind's CLI loads it only when a cluster is used
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.job_config import JobConfig

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    return dict((JobConfig.from_json(json.loads(raw)).runtime_env or {}).get("env_vars") or {}) if raw else {}


def init_ray(num_cpus: int | None = None):
    import ray  # deferred: ray takes ~0.5 s to import; valind's CLI loads it only when a cluster is used

    if ray.is_initialized():
        return ray
    env = worker_env()
    os.environ.update(env)  # the driver's own imports see the same settings
    local_accelerator()
    project_root = str(Path(__file__).resolve().parent.parent)
    if os.environ.get("RAY_ADDRESS"):
        # A driver on a cluster node, or inside `ray job submit`: the job's runtime env reaches every
        # worker and valind's is merged into it (Ray refuses a key both set: the job's wins).
        job = job_env_vars()
        ray.init(log_to_driver=_verbose(), runtime_env={"env_vars": {k: v for k, v in env.items() if k not in job}})
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=_verbose(),
                 logging_level="ERROR",
                 runtime_env={"env_vars": {**env, "PYTHONPATH": os.pathsep.join([project_root, *sys.path[1:2]])}})
    return ray


def _verbose() -> bool:
    """Worker logs (vLLM, DeepSpeed, Ray Train) reach the terminal only with VALIND_VERBOSE=1."""
    return os.environ.get("VALIND_VERBOSE", "0") not in ("", "0")
