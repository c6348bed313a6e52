"""Keep tokens from the environment out of params, tags, artifacts and logs."""
from __future__ import annotations

import os
import re

MASK = "***"
MIN_LEN = 8  # shorter values are too likely to occur by chance ("1", "true", a port number)
SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "WANDB_API_KEY", "GITHUB_TOKEN")
_SECRET_SUFFIX = re.compile(r"(_TOKEN|_KEY|_SECRET|_PASSWORD)$", re.I)


def is_secret_name(name: str) -> bool:
    return name.upper() in SECRET_NAMES or bool(_SECRET_SUFFIX.search(name))


def secret_values(environ=None) -> list[str]:
    """Values of secret-named environment variables (at least MIN_LEN chars), longest first."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if is_secret_name(k) and v and len(v) >= MIN_LEN}
    return sorted(vals, key=len, reverse=True)


def redact(text, environ=None):
    """`text` with every secret value from the environment replaced by "***" (non-str passes through)."""
    if not isinstance(text, str) or not text:
        return text
    for v in secret_values(environ):
        if v in text:
            text = text.replace(v, MASK)
    return text
