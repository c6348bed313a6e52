"""Submission to a Ray head started here, as on a cluster: secrets never reach Ray's logs or Jobs API. (The
study itself submitted with the README's line, its preflight and its secret: tests/test_verbatim.py.)

Stopping the head safely: `ray stop` kills every Ray process on the machine, other people's
included. So the head gets its own `--temp-dir` (a fresh directory) and non-default ports, and
teardown terminates only the processes whose command line names that directory (gcs_server,
raylet, dashboard, monitors, agents: Ray passes them the session dir) plus all their descendants
(workers, the job supervisor and the job's driver): SIGTERM, then SIGKILL after a grace period.
`ray start` also records its address in /tmp/ray/ray_current_cluster; that file is restored.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from runner.local_cluster import end_pids, free_port, pids_matching, ray_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CURRENT = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
pytestmark = pytest.mark.slow


@contextmanager
def _head(env: dict):
    """A Ray head of this test's own (temp dir, ports), ended by pid; `env` is `ray start`'s."""
    temp_dir = tempfile.mkdtemp(prefix="valind-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    saved = CURRENT.read_text() if CURRENT.exists() else None
    gcs, dash = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats",
           "--temp-dir", temp_dir, "--object-store-memory", str(1024 ** 3),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temp_dir": temp_dir}
    finally:
        end_pids(pids_matching(temp_dir), grace_s=15)
        assert not pids_matching(temp_dir), "the head's processes outlived teardown"
        if saved is not None:
            CURRENT.write_text(saved)
        elif CURRENT.exists():
            CURRENT.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------- secrets (issue 31, finding 6)

def _secrets_dir(tmp_path: Path, token: str) -> Path:
    """The README's secrets directory: mode 0700, one 0600 file per secret."""
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700, exist_ok=True)
    (d / "HF_TOKEN").write_text(token + "\n")
    (d / "HF_TOKEN").chmod(0o600)
    return d


# The job's entrypoint: valind's CLI in the driver (it loads the secrets dir), then proof that the
# driver holds the token (huggingface_hub's own lookup, as a hub download would), by its hash only.
CHECK = """import hashlib, sys
from runner.cli import main
rc = main(["validate", sys.argv[1]])
from huggingface_hub import get_token
t = get_token() or ""
print("driver token sha256:", hashlib.sha256(t.encode()).hexdigest()[:16], flush=True)
sys.exit(rc)
"""

# Every Jobs API answer about the cluster's jobs, as JSON (run with the client's own environment).
JOBS_API = """import dataclasses, json, sys
from ray.job_submission import JobSubmissionClient
def plain(x):  # JobDetails (pydantic) or JobInfo (dataclass): every field
    return x.model_dump() if hasattr(x, "model_dump") else x.dict() if hasattr(x, "dict") else dataclasses.asdict(x)
c = JobSubmissionClient(sys.argv[1])
out = {"list_jobs": [plain(j) for j in c.list_jobs()]}
for job in sys.argv[2:]:
    out[job] = {"info": plain(c.get_job_info(job)), "logs": c.get_job_logs(job)}
print(json.dumps(out, default=str))
"""


@pytest.fixture
def auth_head(tmp_path):
    """A head started as cluster.yaml starts it: Ray's token auth on (RAY_AUTH_MODE=token), the token
    in a 0600 file named by RAY_AUTH_TOKEN_PATH."""
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text("raytok-" + os.urandom(16).hex())
    token_file.chmod(0o600)
    env = {**ray_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    with _head(env) as h:
        yield {**h, "ray_token": token_file.read_text()}


def _grep_head(temp_dir: str, needle: str) -> list[str]:
    """Files under the head's temp dir (every log, runtime env, session file) that contain `needle`."""
    hits = []
    for p in Path(temp_dir).rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle.encode() in p.read_bytes():
                hits.append(str(p.relative_to(temp_dir)))
        except OSError:  # a socket, a file removed meanwhile
            pass
    return hits


def test_token_file_never_reaches_ray_logs_or_the_jobs_api(auth_head, tmp_path, data_dir):
    """The README's submission (the token in $VALIND_SECRETS_DIR/HF_TOKEN, only the directory's path in
    the runtime env), on a head with Ray's token auth: the driver holds the token, and it is in no file
    under the head's temp dir (logs included), no Jobs API answer and no `ray job submit` output. The old
    way (HF_TOKEN in the runtime env's env_vars) leaks into all three, and valind refuses to run it."""
    import hashlib

    head = auth_head
    env = head["env"]  # the submitting client has the cluster's token (RAY_AUTH_MODE=token, its file)
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(tmp_path / "studies")
    spec_path = tmp_path / "smoke.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "check.py").write_text(CHECK)
    excludes = [".venv", "studies", ".git", ".pytest_cache", "__pycache__", "*.db", "mlruns"]

    def submit(job_id: str, env_vars: dict, *entrypoint: str):
        runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "VALIND_DATA_DIR": str(data_dir), **env_vars},
                       "excludes": excludes}
        return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id",
                               job_id, "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env),
                               "--", *entrypoint], env=env, capture_output=True, text=True, timeout=600)

    token = "hf_PLANTEDTOKEN123" + os.urandom(8).hex()
    new = submit("valind-secrets-file", {"VALIND_SECRETS_DIR": str(_secrets_dir(tmp_path, token))},
                 "python", str(tmp_path / "check.py"), str(spec_path))
    new_out = new.stdout + new.stderr
    assert new.returncode == 0, new_out[-4000:]
    assert f"driver token sha256: {hashlib.sha256(token.encode()).hexdigest()[:16]}" in new_out, new_out[-4000:]
    assert "valind: secrets from $VALIND_SECRETS_DIR: HF_TOKEN" in new_out

    old_token = "hf_PLANTEDOLDWAY456" + os.urandom(8).hex()  # the README's command before issue 31
    old = submit("valind-runtime-env", {"HF_TOKEN": old_token}, "python", "-m", "runner.cli", "validate",
                 str(spec_path))
    old_out = old.stdout + old.stderr
    assert old.returncode != 0 and "the job's runtime env carries HF_TOKEN" in old_out, old_out[-4000:]

    time.sleep(3)  # log lines of the ended jobs reach their files
    api = subprocess.run([sys.executable, "-c", JOBS_API, head["address"], "valind-secrets-file",
                          "valind-runtime-env"], env=env, capture_output=True, text=True, timeout=120)
    assert api.returncode == 0 and "valind-secrets-file" in api.stdout, api.stdout[-2000:] + api.stderr[-3000:]
    jobs_api = api.stdout
    logs = _grep_head(head["temp_dir"], "valind-secrets-file")
    assert logs, "the head's temp dir has no trace of the job: the search below would prove nothing"
    print(f"files naming the job under the head's temp dir: {len(logs)}")

    # the README's way: nowhere
    assert token not in new_out and token not in jobs_api
    assert not _grep_head(head["temp_dir"], token), _grep_head(head["temp_dir"], token)
    assert not _grep_head(head["temp_dir"], head["ray_token"])  # nor the cluster's own token
    # the old way: in the Jobs API's answers and the head's files (what the README's old command leaked)
    leaked = _grep_head(head["temp_dir"], old_token)
    print(f"old way: the token in {len(leaked)} file(s) under the head's temp dir: {leaked[:6]}; "
          f"in the Jobs API: {old_token in jobs_api}")
    assert old_token in jobs_api and leaked

    # Ray's token auth is on: a client without the cluster's token is refused
    no_auth = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    no_auth.update(RAY_AUTH_MODE="disabled", HOME=str(tmp_path))  # no ~/.ray/auth_token either
    r = subprocess.run([sys.executable, "-c", JOBS_API, head["address"]], env=no_auth, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "valind-secrets-file" not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
