"""Pools and training cells sized to the cluster (issue 31, finding 5): an open GPU pool is closed
for the next one; a pool asks for no more actors than the cluster (or the spec's cluster:) can hold;
a cell that can never fit is refused, not waited for; each stage's needs are asked of the autoscaler.
GPUs are Ray's logical ones (`num_gpus`); the engines compute on CPUs."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_4cpu_2gpu():
    import ray

    from runner.cluster import worker_env
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {**worker_env(), "PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


def _study(tmp_path, tiny_model, cluster=None, **engine):
    from runner.pipeline import Study
    from runner.spec import parse_spec
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"]["output_dir"] = str(tmp_path)
    if not (tmp_path / "tiny-b").exists():
        shutil.copytree(tiny_model, tmp_path / "tiny-b")  # a second base model (a pool of its own)
    d["models"] = [{"name": "a", "path": "tiny-llama"}, {"name": "b", "path": str(tmp_path / "tiny-b")}]
    d["annotate"]["judge_model"] = "a"
    d["engine"] = {"backend": "transformers", "max_model_len": 256, "startup_timeout_s": 30, **engine}
    if cluster:
        d["cluster"] = cluster
    return Study(parse_spec(d), "", base_dir=tmp_path)


@pytest.mark.slow
def test_an_open_gpu_pool_is_closed_for_the_next_one(tmp_path, tiny_model, ray_4cpu_2gpu, capsys):
    """Two GPU actors of one CPU each hold both GPUs and leave two CPUs free: counting CPUs only,
    the next pool would wait startup_timeout_s for GPUs and fail."""
    import ray
    pools = _study(tmp_path, tiny_model, actors=2, gpus_per_actor=1).ctx.pools
    try:
        first = pools.get("a")
        assert first.size == 2 and ray.available_resources().get("GPU", 0) == 0
        second = pools.get("b")
        assert first.actors == [] and second.size == 2 and list(pools._open.values()) == [second]
        out = capsys.readouterr().out
        assert "to free its 1 CPU(s) and 1 GPU(s) per actor" in out, out
        # with an autoscaler that can add 2 GPUs beside the open pool's (a declared 1 × 4), none is closed
        growing = _study(tmp_path, tiny_model, cluster={"nodes": 1, "gpus_per_node": 4}).ctx.pools
        growing._open = pools._open
        growing._make_room({"CPU": 2, "GPU": 2})
        assert len(second.actors) == 2 and list(pools._open.values()) == [second]
    finally:
        pools.close()


@pytest.mark.slow
def test_a_pool_larger_than_the_cluster_is_capped_not_waited_for(tmp_path, tiny_model, ray_4cpu_2gpu, capsys):
    study = _study(tmp_path, tiny_model, actors=5, gpus_per_actor=1)
    pools = study.ctx.pools
    try:
        pool = pools.get("a")
        assert pool.size == 2 and pool.startup_s < 30  # not startup_timeout_s spent waiting for three more
        out = capsys.readouterr().out
        assert "engine.actors 5 capped at 2: the cluster holds at most 2 GPU (the live cluster)" in out, out
    finally:
        pools.close()
    # an autoscaler's maximum counts: a declared 1 × 3 cluster holds 3 (the third waits for its node)
    from runner.capacity import CapacityError, fit_actors
    from runner.spec import ClusterSpec
    declared = ClusterSpec(nodes=1, gpus_per_node=3)
    assert fit_actors("a", 5, 1, 1, declared) == 3
    with pytest.raises(CapacityError, match=r"engine pool for a: an actor asks for 4 GPU, and no node of the "
                                            r"cluster has that many \(at most 3 a node"):
        fit_actors("a", 1, 1, 4, declared)


@pytest.mark.slow
def test_each_stage_asks_the_autoscaler_for_its_needs_and_clears_it(tmp_path, tiny_model, ray_4cpu_2gpu):
    """request_resources on a cluster without an autoscaler: accepted, nothing else happens."""
    from ray.autoscaler._private.commands import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    from runner.capacity import stage_bundles
    study = _study(tmp_path, tiny_model, actors=5, gpus_per_actor=1)
    ctx = study.ctx
    assert stage_bundles(ctx, "generate") == [{"CPU": 1.0, "GPU": 1}] * 2  # capped at the cluster's 2 GPUs

    def asked():  # the request as the autoscaler reads it (v2: from the GCS; v1: from Ray's KV store)
        import ray
        if is_autoscaler_v2():
            status = get_cluster_status(ray.get_runtime_context().gcs_address)
            return sorted(sorted(r.resources_bundle.items()) for d in status.resource_demands.cluster_constraint_demand
                          for r in d.bundles_by_count for _ in range(r.count))
        return sorted(sorted(b.items()) for b in json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)))

    with ctx.demand.stage(lambda: stage_bundles(ctx, "generate")):
        assert ctx.demand.asked == [{"CPU": 1.0, "GPU": 1}] * 2
        assert asked() == [[("CPU", 1.0), ("GPU", 1.0)]] * 2
        with ctx.demand.stage(lambda: [{"CPU": 3.0}]):  # a stage pulled by another: both asked
            assert len(ctx.demand.asked) == 3
        assert len(ctx.demand.asked) == 2
    assert ctx.demand.asked == [] and asked() == []


def test_a_training_cell_the_cluster_can_never_hold_is_refused():
    from runner.capacity import CapacityError
    from runner.spec import ClusterSpec, TrainSpec
    from runner.sweep import max_concurrent

    wide = TrainSpec(workers=2, gpus_per_worker=8, micro_batch_size=1, batch_size=8)
    assert max_concurrent(wide, ClusterSpec(nodes=2, gpus_per_node=8), {"CPU": 8}) == 1
    with pytest.raises(CapacityError, match=r"train: a cell asks for 2 worker\(s\) of 8 GPU and the cluster holds at "
                                            r"most 8 GPU, 8 a node \(the spec's cluster: section\)"):
        max_concurrent(wide, ClusterSpec(nodes=1, gpus_per_node=8), {"CPU": 8})
    big = TrainSpec(workers=1, gpus_per_worker=16, micro_batch_size=1, batch_size=8)
    with pytest.raises(CapacityError, match=r"16 GPU .* 8 a node"):  # more than a node has: never placed
        max_concurrent(big, ClusterSpec(nodes=4, gpus_per_node=8), {"CPU": 8})
    cpu = TrainSpec(workers=4, cpus_per_worker=2, micro_batch_size=1, batch_size=8)
    with pytest.raises(CapacityError, match=r"4 worker\(s\) of 2 CPU .* at most 6 CPU"):
        max_concurrent(cpu, None, {"CPU": 6})
