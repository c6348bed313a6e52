"""`valind stage` (runner.staging, runner.stage_lock) and the CUDA pin (runner.cuda_pin): fast, no Ray,
no network. The Hugging Face cache here is a real one on disk, laid out as huggingface_hub writes it
and read back by huggingface_hub itself."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from runner import cuda_pin, staging
from runner.stage_lock import LockTimeout, SharedLock

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cli(args, home, **env):
    e = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120)


def _cached_model(hub: Path, repo: str, shards: int = 2) -> Path:
    """A model in a Hugging Face cache: blobs linked from snapshots/<commit>, refs/main naming it."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (snap / "tokenizer.json").write_text("{}")
    for i in range(shards):
        save_file({f"w{i}": np.arange(64, dtype=np.float32).reshape(8, 8), f"b{i}": np.ones(3, np.float32)},
                  str(snap / f"model-{i}.safetensors"))
    return snap


# --- verification ----------------------------------------------------------------------------------

def test_verification_catches_a_truncated_file_and_a_corrupt_header(tmp_path):
    snap = _cached_model(tmp_path, "org/m")
    assert staging.verify_snapshot(snap) == []
    sizes = {p.name: p.stat().st_size for p in snap.iterdir()}
    assert staging.verify_snapshot(snap, sizes) == []

    cut = snap / "model-1.safetensors"
    data = cut.read_bytes()
    cut.write_bytes(data[:-10])  # a download cut short
    problems = staging.verify_snapshot(snap, sizes)
    assert any(str(cut) in p and "outside the file" in p for p in problems), problems
    assert any(str(cut) in p and "the hub says" in p for p in problems), problems  # and its size

    cut.write_bytes(data)
    bad = snap / "model-0.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[8:10] = b"\xff\xfe"  # the JSON header's first bytes overwritten
    bad.write_bytes(bytes(raw))
    problems = staging.verify_snapshot(snap)
    assert len(problems) == 1 and str(bad) in problems[0] and "JSON header does not parse" in problems[0], problems

    bad.write_bytes((10 ** 9).to_bytes(8, "little") + bytes(raw[8:]))  # a header length past the file's end
    assert "header of 1000000000 bytes claimed" in staging.safetensors_problem(bad)
    (snap / "model-0.safetensors").unlink()
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w0": "model-0.safetensors"}}))
    assert any("listed in model.safetensors.index.json, missing" in p for p in staging.verify_snapshot(snap))


# --- offline: staged or named ------------------------------------------------------------------------

def test_offline_a_model_not_staged_is_named_with_the_command_to_stage_it(tmp_path):
    r = _cli(["stage", "jobs/paper.yaml"], tmp_path, HF_HUB_OFFLINE="1")
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    assert "meta-llama/Llama-3.2-1B-Instruct (models[0]) is not in the Hugging Face cache" in err, err
    assert f"{tmp_path}/hub" in err and "HF_HUB_OFFLINE is set: run `valind stage jobs/paper.yaml`" in err
    assert "Qwen/Qwen2.5-72B-Instruct (annotate.judge_model" in err and "cais/mmlu" in err


def test_offline_a_staged_model_is_found_verified_and_a_broken_one_refused(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = _cached_model(tmp_path / "hub", "org/staged")
    item = staging.Item("model", "org/staged", ["models[0]"], "hub")
    assert staging._model(item, True, "s.yaml") is None  # found by huggingface_hub's own offline lookup
    assert item.where == str(snap) and "already staged" in item.notes[0]
    (snap / "model-0.safetensors").write_bytes(b"\x00" * 4)
    why = staging._model(staging.Item("model", "org/staged", ["models[0]"], "hub"), True, "s.yaml")
    assert str(snap / "model-0.safetensors") in why and "shorter than the 8-byte header length" in why


# --- the dry run --------------------------------------------------------------------------------------

def test_dry_run_lists_every_hub_model_and_dataset_of_the_paper_spec_and_where(tmp_path):
    r = _cli(["stage", "jobs/paper.yaml", "--dry-run"], tmp_path, VALIND_DATA_DIR=str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    print(out)
    paper = yaml.safe_load((ROOT / "jobs" / "paper.yaml").read_text())
    assert f"12 hub item(s) would be downloaded into HF_HOME={tmp_path}" in out.splitlines()[0]
    for i, m in enumerate(paper["models"]):
        assert f"model   {m['path']}" in out and f"named by models[{i}]" in out
        assert f"{tmp_path}/hub/models--{m['path'].replace('/', '--')}  [to download]" in out
    judge = paper["annotate"]["judge_model"]
    assert out.count(f"model   {judge}") == 1  # one download for every field that names it
    assert "annotate.judge_model, score.suites.safety.llm_judge, score.suites.anthropomorphism.judge" in out
    for ds in ("HuggingFaceH4/ultrafeedback_binarized [train_prefs]", "allenai/llama-3.1-tulu-3-8b-preference-mixture",
               "cais/mmlu [all]"):
        assert f"dataset {ds}" in out
    assert out.count("(gated: needs HF_TOKEN)") == 4  # the meta-llama models
    assert "the job runs with HF_HUB_OFFLINE=1" in out
    assert not (tmp_path / "hub").exists()  # nothing written


def test_a_source_in_the_data_directory_and_local_models_need_no_download(tmp_path, monkeypatch):
    from runner.spec import load_spec
    data = tmp_path / "data" / "preference"
    data.mkdir(parents=True)
    (data / "ultrafeedback-train_prefs.jsonl").write_text("{}\n")
    monkeypatch.setenv("VALIND_DATA_DIR", str(tmp_path / "data"))
    d = yaml.safe_load((ROOT / "jobs" / "paper.yaml").read_text())
    d["models"][0]["path"] = "tiny-llama"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    spec = load_spec(tmp_path / "s.yaml")
    items = {it.ref: it for it in staging.plan(spec)}
    assert items["tiny-llama"].source == "builtin"
    assert items[str(data / "ultrafeedback-train_prefs.jsonl")].source == "data dir"
    assert "HuggingFaceH4/ultrafeedback_binarized" not in items


# --- one writer -----------------------------------------------------------------------------------------

WRITER = """
import sys, time
from runner.stage_lock import SharedLock
lock, out, log, name = sys.argv[1:]
with SharedLock(lock, poll_s=0.05, heartbeat_s=0.1):
    open(log, "a").write(f"start {name}\\n")
    with open(out, "w") as f:  # a slow, non-atomic write: a second writer inside would interleave
        for i in range(20):
            f.write(f"{name} {i}\\n"); f.flush(); time.sleep(0.02)
    open(log, "a").write(f"end {name}\\n")
"""


def test_two_writers_one_waits_and_nothing_is_interleaved(tmp_path):
    lock, out, log = tmp_path / "shared" / ".lock", tmp_path / "file", tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(lock), str(out), str(log), n], env=env,
                              stdout=subprocess.PIPE, text=True) for n in ("a", "b")]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    events = log.read_text().split()
    assert events[0::4] == ["start", "start"] and events[2::4] == ["end", "end"], events  # one after the other
    assert events[1] == events[3] and events[5] == events[7]
    assert sum("waiting for" in o and "held by pid" in o for o in outs) == 1, outs  # the other one waited
    last = events[5]
    assert out.read_text() == "".join(f"{last} {i}\n" for i in range(20))
    assert not lock.exists()


def test_a_dead_holders_lock_is_taken_over_and_a_live_one_waited_for(tmp_path):
    lock = tmp_path / ".lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": time.time(), "token": "x"}))
    said = []
    with SharedLock(lock, say=said.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert any("taken over" in s and f"pid {dead.pid} on this host) is gone" in s for s in said), said

    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "since": time.time(), "token": "y"}))
    with pytest.raises(LockTimeout, match="held by pid 1 on other-node"):
        SharedLock(lock, wait_s=0.3, poll_s=0.05, say=said.append).acquire()
    old = time.time() - 1000  # another node's holder stopped its heartbeat long ago
    os.utime(lock, (old, old))
    with SharedLock(lock, stale_s=300, say=said.append):
        pass
    assert "no heartbeat for" in said[-1] and not lock.exists()


# --- the CUDA pin -----------------------------------------------------------------------------------------

def test_the_cuda_pin_against_the_driver():
    banner = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"
    assert cuda_pin.driver_cuda(banner) == "12.4"
    assert "the driver supports CUDA 12.4, the pinned torch/vLLM build needs CUDA 13.0" in cuda_pin.problem("12.4")
    assert "needs CUDA 13.0" in cuda_pin.problem("12.9")  # a 12.x driver cannot load libcudart.so.13
    assert cuda_pin.problem("13.0") is None and cuda_pin.problem("13.2") is None
    assert "needs CUDA 13.0" in cuda_pin.problem("14.0")  # another major: another build
    assert "built for CUDA 12.8, not the pinned 13.0" in cuda_pin.problem("13.1", installed="12.8")
    assert "no 'CUDA Version'" in cuda_pin.problem(cuda_pin.driver_cuda("NVIDIA-SMI has failed"))


def test_cluster_yaml_pins_the_cuda_build_and_checks_it_on_each_node(tmp_path):
    setup = yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"]
    assert setup[0] == "python3 /home/ubuntu/valind/runner/cuda_pin.py"  # before the install
    assert "pip install -q -e '.[gpu]'" in setup[1] and "index-url" not in setup[1]  # PyPI's builds: CUDA 13.0
    assert setup[2].endswith("-m runner.cuda_pin --installed")  # after it
    # a node without nvidia-smi (the CPU head) skips the check, with the system python
    r = subprocess.run(["/usr/bin/env", "python3", str(ROOT / "runner" / "cuda_pin.py")], capture_output=True,
                       text=True, env={"PATH": str(tmp_path) + ":/usr/bin:/bin"})
    assert r.returncode == 0 and "the CUDA check is skipped" in r.stdout, r.stderr
    # a GPU node whose driver is too old fails, naming both versions
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| Driver Version: 570.1    CUDA Version: 12.8 |'\n")
    smi.chmod(0o755)
    r = subprocess.run(["/usr/bin/env", "python3", str(ROOT / "runner" / "cuda_pin.py")], capture_output=True,
                       text=True, env={"PATH": str(tmp_path) + ":/usr/bin:/bin"})
    assert r.returncode == 1 and "driver supports CUDA 12.8" in r.stderr and "needs CUDA 13.0" in r.stderr


def test_preflight_offline_names_each_model_not_staged_and_passes_a_staged_one(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from runner.spec import load_spec
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _cached_model(tmp_path / "hub", "meta-llama/Llama-3.2-1B-Instruct")
    rows = staging.staged_rows(load_spec(ROOT / "jobs" / "paper.yaml"), "jobs/paper.yaml")
    assert len(rows) == 9 and [r.ok for r in rows].count(True) == 1  # 8 models + the judge; one staged
    assert rows[0].ok and rows[0].where == "models[0]" and COMMIT in rows[0].detail
    bad = rows[1]
    assert "meta-llama/Llama-3.2-3B-Instruct (models[1]) is not in the Hugging Face cache" in bad.detail
    assert bad.fix == "valind stage jobs/paper.yaml (where the hub is reachable)"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert staging.staged_rows(load_spec(ROOT / "jobs" / "paper.yaml"), "x") == []  # online: the driver may fetch
