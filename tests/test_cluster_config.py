from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    assert any("'.[gpu]'" in c for c in config["setup_commands"])
    assert config["available_node_types"]["gpu_8xh100"]["resources"]["GPU"] == 8
