"""Secrets: read from a private directory (never from Ray's runtime env), and kept out of what valind writes.

On a cluster, a token passed in the job's runtime env (`--runtime-env-json '{"env_vars": {"HF_TOKEN": ...}}'`)
is logged by Ray on every node ("Creating runtime env: ...") and returned by the Jobs API. So secrets
live in files instead: `VALIND_SECRETS_DIR` (a path, not a secret) names a directory on the shared
filesystem holding one file per variable (`HF_TOKEN`, `MLFLOW_TRACKING_PASSWORD`, `AWS_SECRET_ACCESS_KEY`,
...), each readable by its owner only (mode 0600). The CLI loads them into the driver's own environment
at start (`load_secrets`), where huggingface_hub, MLflow and boto3 read them. Only the driver needs
them: it downloads hub models (runner.models.hub_snapshot) into the shared cache the workers load
from, and it is MLflow's only writer. A driver started by `ray job submit` whose runtime env carries a
secret-named variable, or a URI with a password, refuses to run (`check_job_runtime_env`).

`redact` replaces, in any text valind writes or prints, the values of secret-named variables, passwords
inside URIs (`https://user:pass@host`), secret-named query parameters (`?token=...`) and bearer tokens.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any
import re
import stat
from pathlib import Path

from evaluation.errors import InputError

MASK = "***"
MIN_LEN = 8  # shorter values are too likely to occur by chance ("1", "true", a port number)
SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "WANDB_API_KEY", "GITHUB_TOKEN", "RAY_AUTH_TOKEN")
_SECRET_SUFFIX = re.compile(r"(_TOKEN|_KEY|_SECRET|_PASSWORD)$", re.I)
SECRETS_DIR = "VALIND_SECRETS_DIR"
_VAR_FILE = re.compile(r"[A-Z_][A-Z0-9_]*")  # files named like an environment variable are loaded
# scheme://userinfo@ : the password (or a token given as the user name) before the "@"
_URI_USERINFO = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s/@:?#]*)(?::(?P<pw>[^\s/@?#]*))?@")
_QUERY_SECRET = re.compile(r"(?i)(?P<pre>[?&;][\w.-]*(?:token|key|secret|password|passwd|pwd|signature|sig|"
                           r"credential|auth)=)(?P<val>[^&#\s'\"]+)")
_BEARER = re.compile(r"(?i)(?P<pre>\bbearer\s+)(?P<val>[A-Za-z0-9._~+/=-]{8,})")


class SecretsError(InputError):
    """A secrets directory or a job's runtime env to fix (exit 2)."""


def is_secret_name(name: str) -> bool:
    return name.upper() in SECRET_NAMES or bool(_SECRET_SUFFIX.search(name))


def uri_password(value: str) -> str | None:
    """The password inside a URI's userinfo (`scheme://user:password@host`), if any."""
    m = _URI_USERINFO.search(value or "")
    return (m.group("pw") or None) if m else None


def secret_values(environ=None) -> list[str]:
    """Values of secret-named environment variables, and passwords inside URI-valued ones (at least
    MIN_LEN chars), longest first: a password is masked wherever it appears, not only in its URI."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if is_secret_name(k) and v}
    vals |= {p for v in env.values() if "://" in (v or "") and (p := uri_password(v))}
    return sorted((v for v in vals if len(v) >= MIN_LEN), key=len, reverse=True)


def redact(text: Any, environ: Mapping[str, str] | None = None) -> Any:
    """`text` with secrets replaced by "***" (non-str passes through): every secret value from the
    environment, passwords in URIs, secret-named query parameters and bearer tokens."""
    if not isinstance(text, str) or not text:
        return text
    for v in secret_values(environ):
        if v in text:
            text = text.replace(v, MASK)
    text = _URI_USERINFO.sub(_mask_userinfo, text)
    text = _QUERY_SECRET.sub(lambda m: m.group("pre") + MASK, text)
    return _BEARER.sub(lambda m: m.group("pre") + MASK, text)


def _mask_userinfo(m: re.Match) -> str:
    if m.group("pw") is not None:  # user:password@ keeps the user name
        return f"{m.group('pre')}{m.group('user')}:{MASK}@"
    return f"{m.group('pre')}{MASK}@" if m.group("user") else m.group(0)  # a token as the user name


def load_secrets(environ=None) -> list[str]:
    """Load `$VALIND_SECRETS_DIR/<NAME>` files into the environment (a variable already set is kept);
    the names loaded. Each file must be a regular file owned by this user and readable by no one
    else; the directory must exist."""
    env = os.environ if environ is None else environ
    where = env.get(SECRETS_DIR)
    if not where:
        return []
    d = Path(where).expanduser()
    if not d.is_dir():
        raise SecretsError(f"{SECRETS_DIR}={where}: no such directory (it holds one file per secret, "
                           "e.g. HF_TOKEN, mode 0600)")
    loaded = []
    for p in sorted(d.iterdir()):
        if not _VAR_FILE.fullmatch(p.name):
            continue  # e.g. ray_auth_token: not an environment variable
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_mode & 0o077 or st.st_uid != os.getuid():
            raise SecretsError(f"{p}: a secret must be owned by this user and readable by no one else "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): chmod 600 {p}")
        if not env.get(p.name):
            env[p.name] = p.read_text().strip()
            loaded.append(p.name)
    return loaded


def check_job_runtime_env(environ=None) -> None:
    """Refuse to run as a Ray job whose runtime env carries a secret: Ray has logged it on every node
    and the Jobs API returns it. Names the variables (never their values) and the fix."""
    env = os.environ if environ is None else environ
    raw = env.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return
    env_vars = runtime_env.get("env_vars") or {}
    bad = sorted(k for k, v in env_vars.items() if v and (is_secret_name(k) or uri_password(str(v))))
    if bad:
        raise SecretsError(
            f"the job's runtime env carries {', '.join(bad)}: Ray logs a runtime env on every node and the "
            "Jobs API returns it, so treat these values as exposed (rotate them). Put each secret in a file "
            f"$VALIND_SECRETS_DIR/<NAME> (mode 0600, e.g. /mnt/shared/valind/secrets/HF_TOKEN; a URI's "
            "password as MLFLOW_TRACKING_PASSWORD) and pass only VALIND_SECRETS_DIR in the runtime env "
            "(README: Run on a cluster)")
