"""A multi-node Ray cluster and an MLflow tracking server on this machine, for rehearsals and tests.

    python -m runner.local_cluster up   --dir D [--workers 2] [--cpus 2]   # prints the env to export
    python -m runner.local_cluster stop-node --dir D [--node 1] [--replace]
    python -m runner.local_cluster down --dir D

Every node is its own `ray start` with its own ports, `--temp-dir` and resources, bound to
127.0.0.1; the head holds no CPUs (as on a cluster, work lands on the workers). The tracking
server is `mlflow server` over HTTP with a sqlite database backend and artifact serving. The state
(ports, temp dirs, pids) is kept in D/cluster.json; `down` and `stop-node` end only processes
this module started, found by their own temp dir or node-manager port, never `ray stop`, which
would end every Ray on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
STATE = "cluster.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    # A lost node is declared dead after ~3 s instead of ~15 s: the rehearsal's faults resolve sooner.
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    return env


def _ray_start(args: list[str], what: str, command: dict | None = None) -> None:
    """`ray start` with this machine's node arguments; with `command` (runner.verbatim), cluster.yaml's
    own start command for the role, run in its clean environment, with the arguments appended."""
    args = ["--disable-usage-stats", "--node-ip-address", "127.0.0.1", *args]
    if command:
        r = subprocess.run(["bash", "-c", f"{command['cmd']} {shlex.join(args)}"], env=command["env"],
                           capture_output=True, text=True, timeout=300)
    else:
        r = subprocess.run([str(BIN / "ray"), "start", *args], env=ray_env(), capture_output=True, text=True,
                           timeout=300)
    if r.returncode:
        raise RuntimeError(f"ray start ({what}) failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def pids_matching(needle: str) -> list[int]:
    """Pids whose command line contains `needle`, with all their descendants."""
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(needle in part for part in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    pids = {p.pid for p in roots}
    for p in roots:
        try:
            pids.update(c.pid for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    pids.discard(os.getpid())
    return sorted(pids)


def end_pids(pids: list[int], grace_s: float = 10, sig: int = signal.SIGTERM) -> None:
    """`sig` to every pid, SIGKILL to those alive after the grace period."""
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.send_signal(sig)
            procs.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


class LocalCluster:
    """The cluster described by D/cluster.json."""

    def __init__(self, d: str | Path):
        self.dir = Path(d).resolve()

    @property
    def state(self) -> dict:
        """As recorded on disk: another process (a rehearsal's fault injection) may have changed it."""
        f = self.dir / STATE
        return json.loads(f.read_text()) if f.exists() else {}

    def _save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / STATE).write_text(json.dumps(state, indent=2))

    @property
    def env(self) -> dict[str, str]:
        """What a driver on this cluster exports."""
        s = self.state
        return {"RAY_ADDRESS": f"127.0.0.1:{s['head']['gcs_port']}", "RAY_AUTH_MODE": "disabled",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s['mlflow']['port']}"}

    # ------------------------------------------------------------------ start
    def up(self, workers: int = 2, cpus: int = 2, memory_gb: float = 6,
           commands: dict | None = None) -> "LocalCluster":
        """`commands` (runner.verbatim): {"head": shell command, "worker": shell command, "env": their
        environment}, cluster.yaml's own start commands, `@GCS_PORT@` standing for the head's port."""
        if self.state:
            raise RuntimeError(f"{self.dir / STATE} exists: `down` that cluster first")
        self.dir.mkdir(parents=True, exist_ok=True)
        # Short temp dirs: Ray's socket paths are length-limited.
        head = {"temp_dir": tempfile.mkdtemp(prefix="valind-head-", dir="/tmp"), "gcs_port": free_port(),
                "dashboard_port": free_port()}
        self._save({"head": head, "workers": [], "cpus": cpus, "memory_gb": memory_gb, "started": 0,
                    # each node gets 1000 worker ports of its own, below the ephemeral range free_port() draws from
                    # and above 10001 (Ray's default client-server port, which `ray start` refuses to overlap)
                    "worker_ports": random.randrange(11000, 24000, 1000), "commands": commands})
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        saved = current.read_text() if current.exists() else None
        try:
            _ray_start(["--head", "--num-cpus", "0", "--port", str(head["gcs_port"]), "--temp-dir", head["temp_dir"],
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(head["dashboard_port"]),
                        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port",
                        str(free_port()), "--object-store-memory", str(512 * 1024 ** 2)], "head",
                       self._command("head"))
            for _ in range(workers):
                self.add_node()
            self._start_mlflow()
        except BaseException:
            self.down()
            raise
        finally:  # `ray start` records the last head as the machine's default cluster: not ours to change
            if saved is not None:
                current.write_text(saved)
            elif current.exists():
                current.unlink()
        return self

    def add_node(self) -> dict:
        """One more worker node (as an autoscaler would start to replace a lost one)."""
        s = self.state
        node = {"temp_dir": tempfile.mkdtemp(prefix="valind-node-", dir="/tmp"), "manager_port": free_port()}
        lo = s["worker_ports"] + 1000 * s["started"]
        s["started"] += 1
        s["workers"].append(node)
        self._save(s)  # before it starts: `down` finds a node that failed half-way too
        _ray_start(["--address", f"127.0.0.1:{s['head']['gcs_port']}", "--num-cpus", str(s["cpus"]),
                    "--memory", str(int(s["memory_gb"] * 1024 ** 3)), "--temp-dir", node["temp_dir"],
                    "--node-manager-port", str(node["manager_port"]), "--object-manager-port", str(free_port()),
                    "--min-worker-port", str(lo), "--max-worker-port", str(lo + 999),
                    "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port",
                    str(free_port()), "--runtime-env-agent-port", str(free_port()), "--metrics-export-port",
                    str(free_port()), "--object-store-memory", str(512 * 1024 ** 2)], "worker",
                   self._command("worker"))
        return node

    def _command(self, role: str) -> dict | None:
        s = self.state
        c = s.get("commands")
        return c and {"cmd": c[role].replace("@GCS_PORT@", str(s["head"]["gcs_port"])), "env": c["env"]}

    def _start_mlflow(self) -> None:
        d = self.dir / "mlflow"
        (d / "artifacts").mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = open(d / "server.log", "ab")
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
             "--artifacts-destination", str(d / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env={**ray_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True)
        self._save({**self.state, "mlflow": {"port": port, "pid": proc.pid, "dir": str(d)}})
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: see {d / 'server.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer on 127.0.0.1:{port} within 120 s")

    # ------------------------------------------------------------------- stop
    def stop_node(self, index: int = -1, replace: bool = False, delay_s: float = 0) -> dict:
        """Kill one worker node at once (SIGKILL: a machine lost, not a clean shutdown); with
        `replace`, start a fresh node after `delay_s`, as an autoscaler would."""
        s = self.state
        node = s["workers"].pop(index)
        s.setdefault("stopped", []).append(node)  # `down` still sweeps its temp dir
        self._save(s)
        end_pids(pids_matching(node["temp_dir"]), grace_s=5, sig=signal.SIGKILL)
        if replace:
            time.sleep(delay_s)
            self.add_node()
        return node

    def temp_dirs(self) -> list[str]:
        """Every node's temp dir: the head's, the workers', and those of stopped nodes."""
        s = self.state
        return [n["temp_dir"] for n in [s["head"], *s["workers"], *s.get("stopped", [])]] if s else []

    def down(self) -> None:
        s = self.state
        if "mlflow" in s:
            end_pids(pids_matching(s["mlflow"]["dir"]))
        for t in reversed(self.temp_dirs()):  # workers before the head
            end_pids(pids_matching(t))
            shutil.rmtree(t, ignore_errors=True)
        (self.dir / STATE).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.local_cluster", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "stop-node", "env"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True, help="where the cluster's state, MLflow database and artifacts live")
        if name == "up":
            p.add_argument("--workers", type=int, default=2)
            p.add_argument("--cpus", type=int, default=2, help="logical CPUs per worker node")
            p.add_argument("--memory-gb", type=float, default=6)
        if name == "stop-node":
            p.add_argument("--node", type=int, default=-1, help="index among the live worker nodes")
            p.add_argument("--replace", action="store_true", help="start a fresh node after stopping it")
    a = ap.parse_args(argv)
    c = LocalCluster(a.dir)
    if a.cmd == "up":
        c.up(a.workers, a.cpus, a.memory_gb)
    elif a.cmd == "down":
        c.down()
        return 0
    elif a.cmd == "stop-node":
        c.stop_node(a.node, a.replace)
    for k, v in c.env.items():
        print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
