"""Chat templates rendered in a child process, within a time, size and memory limit.

A chat template is a program (Jinja): one with a syntax error used to fail only inside a training
worker, and one that loops or multiplies strings could hang or exhaust whatever renders it.
`render` compiles each template in transformers' own sandboxed environment (what
`apply_chat_template` uses) and renders it on sample chats in `python -m runner.chat_render`,
which gets TIME_LIMIT_S per template, SIZE_LIMIT characters per rendering and MEMORY_LIMIT bytes
beyond what its imports took.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import traceback

TIME_LIMIT_S = 5
SIZE_LIMIT = 1_000_000
MEMORY_LIMIT = 1 << 30
_STARTUP_S = 60  # the child's imports (transformers), generously: a loaded machine is slow


def render(jobs: list[dict], time_limit_s: int = TIME_LIMIT_S) -> list[dict]:
    """For each job {"template": source, "chats": [[messages, add_generation_prompt], ...],
    "tokens": {"eos_token": ..., ...}}: {"renders": [text per chat]} or {"error": what failed}."""
    if not jobs:
        return []
    timeout = _STARTUP_S + time_limit_s * len(jobs)
    try:
        proc = subprocess.run([sys.executable, "-m", "runner.chat_render"], capture_output=True, text=True,
                              input=json.dumps({"time_limit_s": time_limit_s, "jobs": jobs}), timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"the template check did not finish in {timeout} s"}] * len(jobs)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return [{"error": f"the template check failed: {why[:300]}"}] * len(jobs)
    return json.loads(lines[-1])


# --- the child -----------------------------------------------------------------------------------

class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _limit_memory() -> None:
    """At most MEMORY_LIMIT more address space than now (Linux; elsewhere no limit)."""
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (now + MEMORY_LIMIT, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (OSError, ValueError, ImportError):
        pass


def _render_one(compile_template, job: dict, time_limit_s: int) -> dict:
    signal.alarm(time_limit_s)
    try:
        template = compile_template(job["template"])
        renders = []
        for messages, add_generation_prompt in job["chats"]:
            parts, size = [], 0
            for chunk in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           tools=None, documents=None, **job["tokens"]):
                size += len(chunk)
                if size > SIZE_LIMIT:
                    return {"error": f"renders more than {SIZE_LIMIT:,} characters for a short sample chat"}
                parts.append(chunk)
            renders.append("".join(parts))
        return {"renders": renders}
    except _Timeout:
        return {"error": f"rendering a short sample chat took more than {time_limit_s} s"}
    except MemoryError:
        return {"error": f"rendering a short sample chat needed more than {MEMORY_LIMIT >> 20} MB"}
    except Exception as e:
        return {"error": _describe(e)}
    finally:
        signal.alarm(0)


def _describe(e: Exception) -> str:
    """The error with the template line it points at (a syntax error's own, else the deepest
    template frame of the traceback)."""
    line = getattr(e, "lineno", None)
    if line is None:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
        line = frames[-1].lineno if frames else None
    msg = " ".join(str(getattr(e, "message", None) or e).split())[:300]
    return (f"line {line}: " if line else "") + f"{type(e).__name__}: {msg}"


def _main() -> None:
    task = json.load(sys.stdin)
    # transformers' compiler: its sandboxed environment, filters, globals and {% generation %} tag
    # deferred: transformers (~2 s) loads in this subprocess only, not in the process that imports render()
    from transformers.utils.chat_template_utils import _compile_jinja_template
    _limit_memory()
    signal.signal(signal.SIGALRM, _alarm)
    print(json.dumps([_render_one(_compile_jinja_template, job, task["time_limit_s"]) for job in task["jobs"]]))


if __name__ == "__main__":
    _main()
