import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# engine actors claim cores through lock files: the tests' own, apart from any study running here
os.environ.setdefault("VALIND_CORE_LOCKS", tempfile.mkdtemp(prefix="valind-cores-tests-"))
if SHARED_DATA.exists():
    os.environ.setdefault("VALIND_DATA_DIR", str(SHARED_DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("VALIND_DATA_DIR")
    if not d or not Path(d).exists():
        pytest.skip("no data directory (set VALIND_DATA_DIR)")
    return Path(d)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from runner.models import prepare_tiny
    return str(prepare_tiny())


@pytest.fixture
def offline_hub(monkeypatch):
    """Hub ids in specs of key tests resolve to a made-up commit per (id, revision), as the hub would
    answer (runner.models.hub_commit itself is tested against a local cache in tests/test_keys.py)."""
    import hashlib

    import runner.models
    monkeypatch.setattr(runner.models, "hub_commit",
                        lambda repo, revision=None: hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest())


@pytest.fixture
def ray_2cpu():
    """A local Ray cluster of 2 CPUs for the test, shut down after it."""
    import ray

    from runner.cluster import init_ray
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
