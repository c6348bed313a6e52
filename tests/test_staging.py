"""`valind stage` (runner.staging, runner.stage_lock) and the CUDA pin (runner.cuda_pin): fast, no Ray,
no network. The Hugging Face cache here is a real one on disk, laid out as huggingface_hub writes it
and read back by huggingface_hub itself."""
import gzip
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import fake_hub
from fake_hub import FakeHub, Repo
from safetensors.numpy import save, save_file

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
        assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # the holder's own file, linked and removed
    assert any("taken over" in s and f"pid {dead.pid} on this host) is gone" in s for s in said), said

    lock.write_text(json.dumps({"host": "other-node", "pid": 1, "since": time.time(), "token": "y"}))
    with pytest.raises(LockTimeout, match="held by pid 1 on other-node"):
        SharedLock(lock, wait_s=0.3, poll_s=0.05, say=said.append).acquire()
    old = time.time() - 1000  # another node's holder stopped its heartbeat long ago
    os.utime(lock, (old, old))
    with SharedLock(lock, stale_s=300, say=said.append):
        pass
    assert "no heartbeat for" in said[-1] and not lock.exists()


# --- online, against a stand-in of the Hub's HTTP API (tests/fake_hub.py), with the real client ------------

def _repo() -> Repo:
    weights = save({"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(64, np.float32)})
    return Repo({"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}',
                 "tokenizer_config.json": b"{}", "model.safetensors": weights,
                 "README.md": b"# tiny", "original/consolidated.pth": b"not fetched"})  # the last two: never fetched


@pytest.fixture
def hub_spec(tmp_path):
    """The smoke spec with a hub model (acme/tiny) as every model, its data source in a data dir of its own:
    one hub item."""
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["models"][0]["path"] = "acme/tiny"
    (tmp_path / "data" / "preference").mkdir(parents=True)
    (tmp_path / "data" / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz").write_bytes(b"")
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(d))
    return tmp_path / "hub.yaml"


def _stage(spec, home, hub, **env):
    """`valind stage SPEC` in a process of its own: huggingface_hub reads HF_ENDPOINT at import."""
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "VALIND_DATA_DIR": str(spec.parent / "data"), **env}
    return _cli(["stage", str(spec)], home, **env)


def _gets(hub):
    """Each file's downloads (GET .../resolve/...) since the counts were last cleared."""
    return {k.rsplit("/", 1)[1]: n for k, n in hub.counts.items() if k.startswith("GET /acme/tiny/resolve/")}


def test_stage_downloads_from_the_hub_checks_sizes_and_offline_finds_it_with_no_request(hub_spec, tmp_path):
    repo = _repo()
    home = tmp_path / "hf"
    with FakeHub({"acme/tiny": repo}, page_size=2) as hub:  # 2: the tree listing comes in pages
        r = _stage(hub_spec, home, hub)
        print(r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "downloaded, 0.00 GB, sizes match the hub's, safetensors headers parse" in r.stdout
        snap = home / "hub" / "models--acme--tiny" / "snapshots" / fake_hub.COMMIT
        assert f"hub: {snap}" in r.stdout
        fetched = {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
        assert {p.name for p in snap.iterdir()} == fetched
        assert all((snap / f).read_bytes() == repo.files[f] for f in fetched)
        assert (snap.parent.parent / "refs" / "main").read_text() == fake_hub.COMMIT  # the offline job resolves main
        assert _gets(hub) == dict.fromkeys(fetched, 1)
        assert hub.counts[f"GET /api/models/acme/tiny/revision/{fake_hub.COMMIT}"] == 1  # the sizes, asked once

        hub.counts.clear()
        r = _stage(hub_spec, home, hub)  # online again: found in the cache, sizes checked, nothing fetched
        assert r.returncode == 0 and "already staged, 0.00 GB, sizes match the hub's" in r.stdout, r.stdout + r.stderr
        assert _gets(hub) == {}

        hub.counts.clear()
        r = _stage(hub_spec, home, hub, HF_HUB_OFFLINE="1")
        print(r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "HF_HUB_OFFLINE is set: checked, not downloaded" in r.stdout and "already staged" in r.stdout
        assert sum(hub.counts.values()) == 0, hub.counts  # not one request


def test_a_corrupted_cached_blob_is_caught_and_only_it_downloaded_again(hub_spec, tmp_path):
    repo = _repo()
    home = tmp_path / "hf"
    with FakeHub({"acme/tiny": repo}) as hub:
        assert _stage(hub_spec, home, hub).returncode == 0
        blob = home / "hub" / "models--acme--tiny" / "blobs" / repo.etag("model.safetensors")
        n = blob.stat().st_size
        blob.write_bytes(blob.read_bytes()[:-100])  # a blob cut short on the shared disk
        hub.counts.clear()
        r = _stage(hub_spec, home, hub)
        print(r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "re-downloaded: " in r.stdout and f"model.safetensors: {n - 100} bytes, the hub says {n}" in r.stdout
        assert "(truncated?)" in r.stdout  # the header check too
        assert _gets(hub) == {"model.safetensors": 1}  # that file, once; not the whole snapshot
        assert blob.read_bytes() == repo.files["model.safetensors"]


@pytest.mark.parametrize("fault", ["listed", "served", "truncated"])
def test_a_hub_serving_other_bytes_than_it_lists_fails_naming_the_file(hub_spec, tmp_path, fault):
    """listed: the API lists another size than the file has; served: GET sends fewer bytes than HEAD
    announced; truncated: the hub's own file is cut short, consistently listed."""
    repo, f = _repo(), "model.safetensors"
    whole = repo.files[f]
    if fault == "listed":
        repo.listed[f] = len(whole) + 8
    elif fault == "served":
        repo.served[f] = whole[:-100]
    else:
        repo.files[f] = whole[:-100]
    with FakeHub({"acme/tiny": repo}) as hub:
        r = _stage(hub_spec, tmp_path / "hf", hub)
    print(r.stdout, r.stderr)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stage: 1 problem(s):" in r.stderr and f in r.stderr.split("problem(s):")[1], r.stderr
    expected = {"listed": f"{f}: {len(whole)} bytes, the hub says {len(whole) + 8}",
                "served": "cannot download (OSError: Consistency check failed",
                "truncated": "lie outside the file's"}[fault]
    assert expected in r.stderr, r.stderr
    assert "sizes match" not in r.stdout and "headers parse" not in r.stdout  # the listing claims nothing untrue
    if fault != "served":  # fetched, found broken, fetched again once, still broken
        assert "re-downloaded: " in r.stdout and "downloaded, 0.00 GB, STILL BROKEN (below)" in r.stdout
        assert _gets(hub)[f] == 2 and _gets(hub)["config.json"] == 1


def test_two_stages_at_once_one_waits_and_each_file_is_downloaded_once(hub_spec, tmp_path):
    """The second starts while the first holds the lock (its download of the weights held by the hub)."""
    repo = _repo()
    repo.gate["model.safetensors"] = gate = threading.Event()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "VALIND_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    with FakeHub({"acme/tiny": repo}) as hub:
        env["HF_ENDPOINT"] = hub.url

        def start():
            return subprocess.Popen([sys.executable, "-m", "runner.cli", "stage", str(hub_spec)], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first = start()
        deadline = time.time() + 60
        while "model.safetensors" not in hub.waiting and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = start()
        waited = second.stdout.readline()  # its first line, while the first still holds the lock
        gate.set()
        outs = [first.communicate(timeout=60)[0], waited + second.communicate(timeout=60)[0]]
    print(*outs, sep="\n")
    assert [first.returncode, second.returncode] == [0, 0], outs
    assert waited.startswith(f"stage: waiting for {tmp_path / 'hf' / '.valind-stage.lock'}, held by pid {first.pid}")
    assert "[downloaded, " in outs[0] and "[already staged, 0.00 GB, sizes match the hub's" in outs[1], outs
    assert _gets(hub) == dict.fromkeys(["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"], 1)


# --- hub datasets, from the same stand-in: load_dataset with the arguments the job passes ---------------------

def _parquet(rows: list[dict], n: int) -> bytes:
    """The first n rows as a parquet file (n = 0: the columns and no row group, as an empty split is written)."""
    out, table = io.BytesIO(), pa.Table.from_pylist(rows).slice(0, n)
    with pq.ParquetWriter(out, table.schema) as w:
        if n:
            w.write_table(table)
    return out.getvalue()


def _ds_repos(test_rows: int = 3) -> dict[str, Repo]:
    """The smoke spec's two sources' hub layouts: hh-rlhf's jsonl.gz per subset folder (the job passes
    data_dir=<subset>), UltraFeedback's parquet per split under data/."""
    hh = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
          for i in range(4)]
    gz = lambda rows: gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0)  # noqa: E731
    uf = [{"prompt": f"q{i}", "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "no"}]} for i in range(4)]
    return {"Anthropic/hh-rlhf": Repo({"README.md": b"# hh", "harmless-base/train.jsonl.gz": gz(hh),
                                       "harmless-base/test.jsonl.gz": gz(hh[:2]), "helpful-base/test.jsonl.gz": gz(hh)}),
            "HuggingFaceH4/ultrafeedback_binarized": Repo({
                "data/train_prefs-00000-of-00001.parquet": _parquet(uf, 4),
                "data/test_prefs-00000-of-00001.parquet": _parquet(uf, test_rows)})}


@pytest.fixture
def ds_spec(tmp_path):
    """The smoke spec (a builtin model) reading hh-rlhf and UltraFeedback from the hub: an empty data dir."""
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["data"]["sources"].append({"name": "ultrafeedback", "split": "test"})
    (tmp_path / "data").mkdir()
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(d))
    return tmp_path / "ds.yaml"


JOB_READS = """
import sys
from runner.data.sources import load_pairs
from runner.spec import load_spec
from runner.data.registry import DataError
for s in load_spec(sys.argv[1]).data.sources:
    try:
        pairs, drops = load_pairs(s, None, 10_000)
        print(f"{s.name}: {len(pairs) + sum(drops.values())} rows read")
    except DataError as e:
        print(f"{s.name}: {e}".splitlines()[0][:200])
"""


def test_stage_loads_hub_datasets_as_the_job_does_and_offline_says_what_the_job_will_find(ds_spec, tmp_path):
    home = tmp_path / "hf"
    with FakeHub({}, datasets=_ds_repos()) as hub:
        r = _stage(ds_spec, home, hub)
        print(r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        assert "2 hub item(s) staged" in out and "dataset Anthropic/hh-rlhf [data_dir=harmless-base/test]" in out
        assert "dataset HuggingFaceH4/ultrafeedback_binarized [test_prefs]" in out
        cache = home / "datasets"
        assert re.search(f"hub: {cache}/harmless-base/default/0.0.0/[0-9a-f]+  \\[2 rows\\]", out)
        assert f"hub: {cache}/HuggingFaceH4___ultrafeedback_binarized/default/0.0.0/{fake_hub.COMMIT}  [3 rows]" in out
        assert hub.counts[f"GET /datasets/Anthropic/hh-rlhf/resolve/{fake_hub.COMMIT}/harmless-base/test.jsonl.gz"] == 1
        assert not any("helpful-base" in k and "resolve" in k for k in hub.counts)  # another subset: not fetched

        hub.counts.clear()
        offline = {"HF_HUB_OFFLINE": "1"}
        r = _stage(ds_spec, home, hub, **offline)
        print(r.stdout, r.stderr)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "HF_HUB_OFFLINE is set" in r.stdout and "[2 rows]" in r.stdout and "[3 rows]" in r.stdout
        env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.url, **offline}
        job = subprocess.run([sys.executable, "-c", JOB_READS, str(ds_spec)], env=env, capture_output=True, text=True,
                             timeout=120)  # the job's own loader (runner.data.sources), on what was staged
        print(job.stdout)
        # hh-rlhf (a data_dir load) read offline: datasets' own hub load keys it otherwise offline and
        # never finds it (huggingface/datasets#6609), so hub_rows reads the repo's folder as a local dataset
        assert job.stdout.splitlines() == ["hh_rlhf: 2 rows read", "ultrafeedback: 3 rows read"], job.stdout + job.stderr
        assert sum(hub.counts.values()) == 0, hub.counts  # not one request


def test_a_dataset_the_hub_lacks_or_an_empty_split_fails_naming_it(ds_spec, tmp_path):
    repos = _ds_repos(test_rows=0)
    del repos["Anthropic/hh-rlhf"]
    with FakeHub({}, datasets=repos) as hub:
        r = _stage(ds_spec, tmp_path / "hf", hub)
    print(r.stdout, r.stderr)
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.split("stage: 2 problem(s):")[1]
    assert "Anthropic/hh-rlhf [data_dir=harmless-base/test]: cannot load (RepositoryNotFoundError" in err, err
    # an empty split: datasets refuses it itself (split= set; "loaded with no rows" is for a split=None load)
    assert ('HuggingFaceH4/ultrafeedback_binarized [test_prefs]: cannot load (ValueError: Instruction "test_prefs" '
            "corresponds to no data!)") in err, err


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
