"""CPU cores for engine actors: each actor binds its threads to cores no other actor on the node holds.

Ray schedules by CPU count but does not pin processes, and vLLM-CPU binds its OpenMP threads to
the first cores a process may use (less one it reserves for its scheduler), so without this every
engine actor on a node computes on the same core(s). An actor claims cores with an flock on a file
per core: the kernel releases the claim when the process dies, however it dies.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

_held: list = []  # open lock files: a claim lasts as long as this process


def lock_dir() -> Path:
    d = Path(os.environ.get("VALIND_CORE_LOCKS") or Path(tempfile.gettempdir()) / f"valind-cores-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def claim_cores(n: int) -> list[int]:
    """Up to `n` of this process's allowed cores that no other claiming process holds."""
    got = []
    for core in sorted(os.sched_getaffinity(0)):
        if len(got) == n:
            break
        f = open(lock_dir() / f"cpu{core}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _held.append(f)
        got.append(core)
    return got


def bind_engine_threads(n: int, tensor_parallel: int = 1) -> dict:
    """Pin this process (and the vLLM workers it starts) to `n` free cores, with `n` compute threads
    (split among tensor-parallel workers).

    When other actors hold every core (more actors than cores: several Ray nodes on one machine,
    say), the actor shares all of its cores unbound and says so.
    """
    import torch  # deferred: torch (~1 s) only in an engine actor, where the engine needs it anyway

    cores = claim_cores(n)
    if cores:
        os.sched_setaffinity(0, cores)
        per = max(1, len(cores) // tensor_parallel)
        bind = "|".join(",".join(map(str, cores[i * per:(i + 1) * per])) for i in range(tensor_parallel))
    else:
        cores = sorted(os.sched_getaffinity(0))[:n]
        bind = "nobind"
        print(f"valind engine actor: every core of this node is held by other engine actors; "
              f"running {n} thread(s) unbound, sharing cores", flush=True)
    # vLLM-CPU: threads bound to exactly these cores, none reserved for its scheduler process
    os.environ.update(OMP_NUM_THREADS=str(len(cores)), VLLM_CPU_OMP_THREADS_BIND=bind,
                      VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    torch.set_num_threads(len(cores))
    return {"cores": cores, "bound": bind != "nobind"}
