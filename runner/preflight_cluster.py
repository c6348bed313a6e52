"""`valind preflight`'s checks of where a study runs: on every alive Ray node (a task pinned to it)
or, without a cluster, on this machine: the same valind code as the driver, `import vllm,
deepspeed`, the GPUs torch sees, the shared storage written by each node and read by every other;
and every training cell and engine pool fits the cluster (or the autoscaler's maximum)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

from runner import cluster_fit
from runner.preflight_rows import Row

ROOT = Path(__file__).resolve().parent.parent
IMPORT_TIMEOUT_S = 180
# In a child process: the node's own view (a Ray task without GPUs gets CUDA_VISIBLE_DEVICES="")
_IMPORTS = ("import json, torch, vllm, deepspeed; "
            "print(json.dumps({'gpus': torch.cuda.device_count(), 'vllm': vllm.__version__, "
            "'deepspeed': deepspeed.__version__}))")
PROBE_DIR = ".valind-preflight"


def code_identity() -> dict:
    """This process's valind: its version, git commit (where the code is a checkout) and a hash of
    its Python sources (nodes get the code without .git: the hash is what is compared)."""
    try:
        version = metadata.version("valind")
    except metadata.PackageNotFoundError:
        version = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    h = hashlib.sha256()
    for p in sorted(q for d in ("runner", "evaluation") for q in (ROOT / d).rglob("*.py")):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    return {"version": version, "commit": commit, "code": h.hexdigest()[:12]}


def node_probe(probe_dir: str, name: str) -> dict:
    """On one node: its code, imports and GPUs, and a file `name` written under the shared storage."""
    out = {"host": socket.gethostname(), **code_identity(), "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
           "cwd": os.getcwd()}
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    try:
        r = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, env=env,
                           timeout=IMPORT_TIMEOUT_S)
        lines = r.stdout.strip().splitlines()
        out.update(json.loads(lines[-1]) if r.returncode == 0 and lines else
                   {"import_error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]})
    except subprocess.TimeoutExpired:
        out["import_error"] = f"import vllm, deepspeed did not finish in {IMPORT_TIMEOUT_S} s"
    try:
        d = Path(probe_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(name)
        out["wrote"] = (d / name).read_text() == name
    except OSError as e:
        out["write_error"] = f"{type(e).__name__}: {e.strerror or e}"
    return out


def read_probes(probe_dir: str, names: list[str]) -> list[str]:
    """On one node: the probe files of `names` it cannot read (storage that is not shared)."""
    d = Path(probe_dir)
    return [n for n in names if not (d / n).is_file() or (d / n).read_text() != n]


def node_rows(spec, storage: Path, connected: bool) -> tuple[list[Row], cluster_fit.Capacity]:
    """Rows for every node (or this machine) and the live capacity they give."""
    driver = code_identity()
    token = uuid.uuid4().hex[:8]
    probe_dir = str(storage / PROBE_DIR / token)  # this run's own: preflights may run side by side
    if connected:
        # deferred: Ray, on a cluster only
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        alive = [n for n in ray.nodes() if n.get("Alive")]
        names = [f"{token}-{n['NodeID'][:12]}" for n in alive]

        def on(node, fn, *args):
            pin = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            return ray.remote(fn).options(num_cpus=0, scheduling_strategy=pin).remote(*args)

        probes = _gather(ray, [on(n, node_probe, probe_dir, name) for n, name in zip(alive, names)])
        written = [name for name, p in zip(names, probes) if p.get("wrote")]
        unread = _gather(ray, [on(n, read_probes, probe_dir, written) for n in alive])
        labels = [f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in alive]
        resources = [n.get("Resources", {}) for n in alive]
        cap = cluster_fit.of_nodes(resources, f"the live cluster, {len(alive)} node(s)")
    else:
        names = [f"{token}-local"]
        probes = [node_probe(probe_dir, names[0])]
        unread = [read_probes(probe_dir, [n for n, p in zip(names, probes) if p.get("wrote")])]
        labels = ["this machine (no RAY_ADDRESS)"]
        resources = [{"CPU": os.cpu_count() or 1, "GPU": probes[0].get("gpus", 0)}]
        cap = cluster_fit.of_nodes(resources, "this machine")
    shutil.rmtree(probe_dir, ignore_errors=True)
    try:
        (storage / PROBE_DIR).rmdir()  # when no other preflight is using it
    except OSError:
        pass
    rows = [_node_row(label, p, res, driver, spec) for label, p, res in zip(labels, probes, resources)]
    rows += [_storage_row(label, p, bad, storage) for label, p, bad in zip(labels, probes, unread)]
    return rows, cap


def _gather(ray, refs) -> list:
    """Each task's result, or its error as a result (one broken node must not hide the others)."""
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref, timeout=IMPORT_TIMEOUT_S + 60))
        except Exception as e:
            out.append({"task_error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
    return out


def _node_row(label: str, p: dict, res: dict, driver: dict, spec) -> Row:
    check = "node software"
    if "task_error" in p:
        return Row(check, label, False, f"the probe task failed: {p['task_error']}",
                   "install valind on the node (cluster.yaml setup_commands) and put its venv on PATH")
    problems = []
    if p["version"] != driver["version"] or p["code"] != driver["code"]:
        problems.append(f"valind {p['version']} code {p['code']} (commit {p['commit'] or '?'}), the driver runs "
                        f"{driver['version']} code {driver['code']} (commit {driver['commit'] or '?'})")
    if "import_error" in p:
        problems.append(f"import vllm, deepspeed: {p['import_error']}")
    gpus = float(res.get("GPU", 0))
    if "gpus" in p and p["gpus"] < gpus:
        problems.append(f"Ray offers {gpus:g} GPU(s) and torch sees {p['gpus']}")
    if gpus and (p.get("ds_accelerator") or "").lower() == "cpu":
        problems.append("DS_ACCELERATOR=cpu on a GPU node (DeepSpeed would train on the CPU)")
    if problems:
        return Row(check, label, False, "; ".join(problems),
                   "one valind (same code) and its GPU stack on every node: rebuild the shared venv, restart the node")
    return Row(check, label, True, f"valind {p['version']} code {p['code']}, vllm {p.get('vllm')}, "
                                   f"deepspeed {p.get('deepspeed')}, {p.get('gpus', 0)} GPU(s) visible")


def _storage_row(label: str, p: dict, unread: list[str], storage: Path) -> Row:
    check, fix = "shared storage", ("point study.output_dir at a directory every node mounts and can write "
                                    "(the shared filesystem), as an absolute path")
    if "task_error" in p or "write_error" in p:
        return Row(check, label, False, f"{storage}: cannot write: {p.get('write_error') or p.get('task_error')}", fix)
    if unread:
        return Row(check, label, False, f"{storage}: {len(unread)} other node(s)' probe files are not visible here "
                                        "(not shared storage)", fix)
    return Row(check, label, True, f"{storage}: written and read")


def fit_rows(spec, live: cluster_fit.Capacity, connected: bool) -> list[Row]:
    """Each training cell and engine pool fits the live cluster, or (on a cluster) the declared one
    that the autoscaler can grow to; without a cluster, this machine."""
    declared = cluster_fit.declared(spec) if connected else None
    rows = []
    for d in cluster_fit.demands(spec):
        unit = f"{d.count} × ({d.cpus:g} CPU" + (f", {d.gpus:g} GPU)" if d.gpus else ")")
        here = cluster_fit.fits(live, d.cpus, d.gpus)
        if here >= d.count:
            rows.append(Row("fits the cluster", d.count_field, True, f"{d.what}: {unit} on {live.describe()}"))
        elif declared is not None and declared.nodes and cluster_fit.fits(declared, d.cpus, d.gpus) >= d.count:
            rows.append(Row("fits the cluster", d.count_field, True, f"{d.what}: {unit} once the autoscaler adds "
                            f"nodes: {declared.describe()} (now {live.describe()})"))
        else:
            field = d.unit_field if here == 0 else d.count_field
            also = f"; declared: {declared.describe()}" if declared is not None and declared.nodes else ""
            rows.append(Row("fits the cluster", field, False, f"{d.what} needs {unit} and {live.describe()} holds "
                            f"{here:g}{also}", f"lower {field}, or run on a cluster that holds it"))
    return rows
