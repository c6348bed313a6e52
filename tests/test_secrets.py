"""Secrets (issue 31, finding 6): read from a private directory, refused in a Ray job's runtime env, masked in
URIs, _FAILED.json, `valind status` and every traceback the CLI prints; checkpoints load as tensors only.

The Ray side (the token in no Ray log or Jobs API response) is tests/test_job_submit.py's
`test_token_file_never_reaches_ray_logs_or_the_jobs_api` (slow).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml


ROOT = Path(__file__).resolve().parent.parent
SMOKE = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
PASSWORD = "pl4nted-Passw0rd-9f3e"
API_KEY = "sk-planted-api-key-7c21d0"
URI = f"https://valind:{PASSWORD}@mlflow.internal:5000"


def test_redact_covers_uris_query_tokens_and_bearer():
    from runner.secrets import redact, secret_values
    env = {"MLFLOW_TRACKING_URI": URI, "PATH": "/usr/bin"}
    assert secret_values(env) == [PASSWORD]  # a URI's password is a secret wherever it appears
    text = (f"MLflow at {URI} is not usable; postgresql://mlflow:dbpass@db.internal/mlflow; "
            f"retrying with {PASSWORD}; https://hub/x?token=abc123&page=2 ; s3://b/k?X-Amz-Signature=f00d&a=1; "
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30 ; https://ghp_tok3n@github.com/o/r ; http://host:5000/p")
    out = redact(text, env)
    for secret in (PASSWORD, "dbpass", "abc123", "f00d", "eyJhbGciOiJIUzI1NiJ9.e30", "ghp_tok3n"):
        assert secret not in out, (secret, out)
    assert "https://valind:***@mlflow.internal:5000" in out and "postgresql://mlflow:***@db.internal" in out
    assert "?token=***&page=2" in out and "http://host:5000/p" in out  # no credentials: left as it was


def _study_spec(tmp_path: Path) -> Path:
    d = json.loads(json.dumps(SMOKE))
    d["study"]["output_dir"] = str(tmp_path / "studies")
    d["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_a_failed_unit_its_status_and_the_printed_traceback_are_redacted(tmp_path, monkeypatch, capsys):
    """A unit fails with an error naming the tracking URI (a password inside) and a secret env var's
    value: neither reaches _FAILED.json, `valind status` or the traceback the CLI prints."""
    import runner.stages.curate
    from runner.cli import main
    from runner.pipeline import Study
    from runner.spec import load_spec

    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)  # the spec's sqlite store is the one used
    monkeypatch.setenv("VALIND_TEST_API_KEY", API_KEY)
    spec = _study_spec(tmp_path)
    study = Study(load_spec(str(spec)), spec.read_text())
    study.store.mark_done("annotate", study.key("annotate"), {"pairs": 0, "unscored": 0})

    def curate_fails(*a, **k):  # as a library's error would: the URI and the key in its message
        raise RuntimeError(f"cannot reach {os.environ['MLFLOW_TRACKING_URI']} with key "
                           f"{os.environ['VALIND_TEST_API_KEY']}")
    monkeypatch.setattr(runner.stages.curate, "_curate", curate_fails)
    rc = main(["curate", str(spec)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "RuntimeError: cannot reach https://valind:***@mlflow.internal" in err
    failed = study.store.unit("curate", study.key("curate")) / "_FAILED.json"
    rec = json.loads(failed.read_text())
    assert "cannot reach" in rec["error"] and "curate_fails" in rec["traceback"]
    assert main(["status", str(spec)]) == 0
    status = capsys.readouterr().out
    assert "failed: curate" in status and "cannot reach" in status
    for where, text in [("CLI traceback", err), ("_FAILED.json", failed.read_text()), ("valind status", status)]:
        assert PASSWORD not in text and API_KEY not in text, f"{where} leaks a secret:\n{text}"

    # a _FAILED.json written unredacted (by an older valind) is masked when `valind status` prints it
    failed.write_text(json.dumps({"error": f"old: {URI} {API_KEY}"}))
    assert main(["status", str(spec)]) == 0
    status = capsys.readouterr().out
    assert "old: https://valind:***@" in status and PASSWORD not in status and API_KEY not in status


def test_secrets_dir_is_loaded_only_when_private(tmp_path, monkeypatch):
    from runner.secrets import SecretsError, load_secrets, redact
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700)
    token = "hf_PLANTEDsecretsDIRtoken0123"
    (d / "HF_TOKEN").write_text(token + "\n")
    (d / "ray_auth_token").write_text("not an environment variable")
    for p in d.iterdir():
        p.chmod(0o600)
    env = {"VALIND_SECRETS_DIR": str(d), "MLFLOW_TRACKING_PASSWORD": "kept-as-set-0000"}
    (d / "MLFLOW_TRACKING_PASSWORD").write_text("from-the-file-1111")
    (d / "MLFLOW_TRACKING_PASSWORD").chmod(0o600)
    assert load_secrets(env) == ["HF_TOKEN"]
    assert env["HF_TOKEN"] == token and env["MLFLOW_TRACKING_PASSWORD"] == "kept-as-set-0000"
    assert "ray_auth_token" not in env and redact(f"x {token} y", env) == "x *** y"
    (d / "HF_TOKEN").chmod(0o640)  # group-readable: refused, naming the file and the fix
    with pytest.raises(SecretsError, match=r"HF_TOKEN: .*mode 0640.*chmod 600"):
        load_secrets({"VALIND_SECRETS_DIR": str(d)})
    with pytest.raises(SecretsError, match="no such directory"):
        load_secrets({"VALIND_SECRETS_DIR": str(tmp_path / "nowhere")})
    assert load_secrets({}) == []

    # the CLI loads it for the driver: huggingface_hub (hub downloads) then sees the token
    (d / "HF_TOKEN").chmod(0o600)
    code = ("import sys; from runner.cli import main; rc = main(['validate', sys.argv[1]]); "
            "from huggingface_hub import get_token; print('token ok' if get_token() == sys.argv[2] else 'no token')")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    r = subprocess.run([sys.executable, "-c", code, str(_study_spec(tmp_path)), token],
                       env={**env, "VALIND_SECRETS_DIR": str(d), "PYTHONPATH": str(ROOT),
                            "HF_TOKEN_PATH": str(tmp_path / "no-token-file")},
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "token ok" in r.stdout, r.stdout + r.stderr
    assert "valind: secrets from $VALIND_SECRETS_DIR: HF_TOKEN" in r.stderr and token not in r.stderr


def test_a_ray_job_whose_runtime_env_carries_a_secret_is_refused(tmp_path, monkeypatch, capsys):
    """`ray job submit --runtime-env-json '{"env_vars": {"HF_TOKEN": ...}}'` (the old README's way): the
    driver refuses before any work, naming the variables, never their values."""
    from runner.cli import main
    spec = _study_spec(tmp_path)
    job = {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_PLANTEDruntimeEnvToken42", "VALIND_DATA_DIR": "/data",
                                        "MLFLOW_TRACKING_URI": URI}}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "HF_TOKEN, MLFLOW_TRACKING_URI" in err and "VALIND_SECRETS_DIR" in err
    assert "hf_PLANTEDruntimeEnvToken42" not in err and PASSWORD not in err
    # a runtime env of paths and settings only is fine
    job["runtime_env"]["env_vars"] = {"VALIND_SECRETS_DIR": str(tmp_path), "VALIND_DATA_DIR": "/data",
                                      "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert main(["validate", str(spec)]) == 0


class _Payload:
    """A pickle that writes a file when it is loaded: what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the checkpoint ran code\n"))


def test_a_planted_pickle_as_an_adapter_group_checkpoint_is_refused(tmp_path):
    """runner/train/group.py resumes a slot's optimizer through load_tensors: a pickle naming code is
    refused, naming the file, and its code never runs; a real optimizer state loads unchanged."""
    from runner.train.safe_load import UnsafeCheckpointError, load_tensors
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    loaded = load_tensors(tmp_path / "optimizer.pt")
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, tmp_path / "optimizer.pt")
    with pytest.raises(UnsafeCheckpointError, match="optimizer.pt: refused"):
        load_tensors(tmp_path / "optimizer.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_checkpoints_resume_exactly_and_refuse_a_planted_pickle(tmp_path):
    """Each ZeRO stage (0-3, and 2 in bf16): a checkpoint loaded through runner.train.safe_load resumes
    to the same weights as an uninterrupted run; a checkpoint whose optimizer state is a planted pickle
    is refused and its code never runs, where DeepSpeed's own loader (weights_only=False) runs it."""
    from runner.local_cluster import free_port
    marker = tmp_path / "pwned"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "ds_resume_probe.py"), str(free_port()), str(marker)],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out.pop("deepspeed_default_ran_payload") is True  # the danger is real
    assert sorted(out) == ["zero0", "zero1", "zero2", "zero2-bf16", "zero3"]
    for name, o in out.items():
        assert o["resume_max_abs_diff"] == 0.0, (name, o)
        assert o["refused"] and "refused to load" in o["refused"] and o["planted"][0] in o["refused"], (name, o)
        assert not o["payload_ran"], (name, o)


def test_cluster_yaml_keeps_rays_token_auth_on_and_no_secret_in_its_commands():
    """cluster.yaml starts every node with Ray's token auth (the token copied from the user's
    ~/.ray/auth_token), and its submit command carries no secret in the runtime env."""
    from runner.secrets import check_job_runtime_env
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        starts = [c for c in cmds if " start " in f" {c} "]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    assert "RAY_AUTH_MODE=disabled" not in text
    assert config["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"
    # the runtime env of the README's and cluster.yaml's `ray job submit` lines passes valind's check
    for doc in (text, (ROOT / "README.md").read_text()):
        envs = [json.loads(m) for m in re.findall(r"^[ #]*--runtime-env-json '([^']*)'", doc, re.M)]
        assert envs, "no `ray job submit --runtime-env-json` line found"
        for e in envs:
            check_job_runtime_env({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": e})})
            assert "VALIND_SECRETS_DIR" in e["env_vars"]
