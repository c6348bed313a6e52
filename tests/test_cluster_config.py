from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    assert any("'.[gpu]'" in c for c in config["setup_commands"])
    assert config["available_node_types"]["gpu_8xh100"]["resources"]["GPU"] == 8


def test_worker_env_makes_relative_paths_absolute(monkeypatch, tmp_path):
    """Ray workers run elsewhere: a relative TORCH_EXTENSIONS_DIR would rebuild DeepSpeed ops per cell."""
    from runner.cluster import worker_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", ".venv/torch_extensions")
    monkeypatch.setenv("VALIND_DATA_DIR", "data")
    env = worker_env()
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / ".venv" / "torch_extensions")
    assert env["VALIND_DATA_DIR"] == str(tmp_path / "data")


def test_tune_concurrency_is_sized_from_the_declared_cluster():
    """An autoscaling cluster shows no GPUs at start-up; the spec's cluster says what will come."""
    from runner.spec import ClusterSpec, TrainSpec
    from runner.sweep import max_concurrent

    gpu = TrainSpec(workers=2, gpus_per_worker=1, micro_batch_size=1, batch_size=8)
    assert max_concurrent(gpu, ClusterSpec(nodes=4, gpus_per_node=8), {"CPU": 8}) == 16
    assert max_concurrent(gpu, None, {"CPU": 8}) == 1  # nothing declared: what is there now
    assert max_concurrent(gpu, ClusterSpec(nodes=1, gpus_per_node=8), {"GPU": 32}) == 16  # more is there
    cpu = TrainSpec(workers=2, cpus_per_worker=1, micro_batch_size=1, batch_size=8)
    assert max_concurrent(cpu, ClusterSpec(nodes=4, gpus_per_node=8), {"CPU": 6}) == 3
