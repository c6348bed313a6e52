from pathlib import Path

import pytest
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


def test_vllm_settings_on_gpu_and_cpu():
    from runner.engines.base import EngineConfig
    from evaluation.types import vllm_lora_rank
    from runner.engines.vllm_engine import engine_kwargs

    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        vllm_lora_rank(513)
    cfg = EngineConfig(model="m", enable_lora=True, max_lora_rank=4, gpu_memory_utilization=0.85)
    gpu, cpu = engine_kwargs(cfg, gpu=True), engine_kwargs(cfg, gpu=False)
    assert gpu["enforce_eager"] is False and gpu["gpu_memory_utilization"] == 0.85 and gpu["max_lora_rank"] == 8
    assert "kv_cache_memory_bytes" not in gpu  # no explicit KV size: the memory share decides
    assert "kv_cache_memory_bytes" not in engine_kwargs(EngineConfig(model="m", kv_cache_gb=20), gpu=True)  # CPU's size
    assert engine_kwargs(EngineConfig(model="m", gpu_kv_cache_gb=20), gpu=True)["kv_cache_memory_bytes"] == 20 * 2 ** 30
    assert "kv_cache_memory_bytes" not in engine_kwargs(EngineConfig(model="m", gpu_kv_cache_gb=20), gpu=False)
    assert cpu["enforce_eager"] is True and "gpu_memory_utilization" not in cpu
    assert cpu["block_size"] == 32 and "block_size" not in gpu  # vLLM's GPU default stays
    assert "enable_lora" not in cpu  # on CPU the engine merges adapters into its weights instead


def test_cluster_yaml_copies_the_code_only():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert {".venv", "studies"} <= set(config["rsync_exclude"])


def test_cluster_yaml_installs_on_each_node_and_shares_the_study_disk():
    """The Python stack on each node's own disk (built once per node, node-local lock); the study store
    and the Hugging Face cache on the shared filesystem."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert any("mount -t nfs4" in c and "/mnt/shared" in c for c in config["initialization_commands"])
    setup = " ".join(config["setup_commands"])
    assert "flock /tmp/" in setup and "test -f /home/ubuntu/valind-venv/.valind-complete ||" in setup  # once per node
    assert "/mnt/shared" not in setup  # no venv on NFS
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("/home/ubuntu/valind-venv/bin/ray start" in c for c in cmds)
    paper = yaml.safe_load((ROOT / "jobs" / "paper.yaml").read_text())
    assert paper["study"]["output_dir"].startswith("/mnt/shared/")
