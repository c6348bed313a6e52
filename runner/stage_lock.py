"""One writer on a shared filesystem: a lock file made by a hard link, never over another (runner.staging).

Why not `flock`: on NFS it is as good as the mount makes it. With `local_lock=flock` or `nolock`
(common on appliances and some EFS helpers) it locks on the node only, so two nodes both "hold" it;
where it is forwarded it becomes an NFS byte-range lock that a client which lost its lease may keep
believing it holds. A hard link to a new name is atomic on NFSv3 and v4 (the server decides), and the lock is
a file anyone can read: it names its holder (host, pid, since) and the holder refreshes its mtime
(a heartbeat), so a lock whose holder died is taken over: at once when the holder was a process on
this host that is gone, otherwise once its heartbeat is `stale_s` old.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from evaluation.errors import ValindError
from runner.store import pid_alive


class LockTimeout(ValindError):
    pass


class SharedLock:
    """`with SharedLock(path):` waits for the lock (saying once who holds it), holds it with a
    heartbeat, releases it only if it is still its own."""

    def __init__(self, path: str | Path, stale_s: float = 300, heartbeat_s: float = 20, wait_s: float | None = None,
                 poll_s: float = 1.0, say: Callable[[str], None] = print):
        self.path = Path(path)
        self.stale_s, self.heartbeat_s, self.wait_s, self.poll_s, self.say = stale_s, heartbeat_s, wait_s, poll_s, say
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost = False  # the file was no longer ours at a heartbeat (taken over as stale)

    def owner(self) -> dict:
        """What the lock file says about its holder ({} when it is gone or unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        """Write the holder to a file of our own, then link it to the lock's name: link fails where a file
        exists, and a waiter never reads a lock created but not yet written (it would say "an unknown holder")."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f"{self.path.name}.{self.token}")
        with open(mine, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": self.token}, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(mine, self.path)
        except FileExistsError:
            return False
        finally:
            mine.unlink(missing_ok=True)
        return True

    def _stale(self, info: dict) -> str | None:
        """Why the present lock may be taken over, or None."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not pid_alive(info["pid"]):
            return f"its holder (pid {info['pid']} on this host) is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_s:g} s)"
        return None

    def _break(self, info: dict) -> None:
        """Move a stale lock aside (rename is atomic: of two breakers one wins); if what was moved is
        not the lock judged stale (a new holder took it meanwhile), put it back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != info.get("token"):
            try:
                os.link(aside, self.path)  # never over a newer lock: link fails where a file exists
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        start, told = time.time(), False
        while not self._create():
            info = self.owner()
            if why := self._stale(info):
                self.say(f"stage: lock {self.path} taken over: {why} ({_who(info)})")
                self._break(info)
                continue
            if not told:
                self.say(f"stage: waiting for {self.path}, held by {_who(info)}")
                told = True
            if self.wait_s is not None and time.time() - start > self.wait_s:
                raise LockTimeout(f"{self.path} is held by {_who(info)} after {self.wait_s:g} s: another `valind "
                                  "stage` is writing the cache; wait for it, or remove the file if that process is gone")
            time.sleep(self.poll_s)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.owner().get("token") != self.token:
                self.lost = True
                return
            try:
                os.utime(self.path)
            except OSError:
                self.lost = True
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat:
            self._beat.join()
        if self.owner().get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> SharedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _who(info: dict) -> str:
    if not info:
        return "an unknown holder"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {since}"
