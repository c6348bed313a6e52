"""Process-group helpers for tests that kill a running `valind` and everything it started."""
import os
import signal
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Processes still in the session the killed driver led (its Ray cluster, if any survived)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session ...
            out.append(int(stat.parent.name))
    return out


def kill_session(sid: int) -> None:
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.time() + 30
    while time.time() < deadline:
        left = session_pids(sid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
