"""A training cell or an engine pool that can never fit the declared cluster is refused by `valind
validate` and `valind plan` (issue 31, item 5), naming the field to change; it used to be accepted
and the training trial then waited forever."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runner import cluster_fit
from runner.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SMOKE = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())


def _spec(**sections):
    d = yaml.safe_load(yaml.safe_dump(SMOKE))
    d["cluster"] = {"nodes": 1, "gpus_per_node": 8}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return parse_spec(d)


def _cli(capsys, command: str, spec, tmp_path) -> tuple[int, str]:
    from runner.cli import main
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)))
    capsys.readouterr()
    rc = main([command, str(path)])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_sixteen_gpu_workers_per_cell_on_one_node_of_eight_are_refused(command, capsys, tmp_path):
    spec = _spec(train={"workers": 16, "gpus_per_worker": 1, "batch_size": 16})
    rc, out = _cli(capsys, command, spec, tmp_path)
    assert rc == 2, out
    assert "train.workers: a training cell needs 16 × (1 CPU and 1 GPU) at once and the cluster holds at most 8" in out


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_sixty_four_engine_actors_of_one_gpu_on_eight_gpus_are_refused(command, capsys, tmp_path):
    spec = _spec(generate={"engine": {"actors": 64, "gpus_per_actor": 1}})
    rc, out = _cli(capsys, command, spec, tmp_path)
    assert rc == 2, out
    assert "generate.engine.actors: the generate.engine pool needs 64 × (1 CPU and 1 GPU)" in out


def test_a_unit_larger_than_any_node_names_its_size_field():
    spec = _spec(annotate={"engine": {"actors": 1, "gpus_per_actor": 16}})
    found = dict(cluster_fit.problems(spec, cluster_fit.declared(spec)))
    assert "no node of the cluster has that" in found["annotate.engine.gpus_per_actor"]


def test_what_fits_passes_and_the_boundary_is_exact():
    """8 GPU actors on 1 × 8 GPUs fit, 9 do not; 2 × 8 nodes hold 16 one-GPU workers but not 3 of 6 GPUs."""
    assert cluster_fit.problems(_spec(generate={"engine": {"actors": 8, "gpus_per_actor": 1}}),
                             cluster_fit.declared(_spec())) == []
    nine = _spec(generate={"engine": {"actors": 9, "gpus_per_actor": 1}})
    assert [f for f, _ in cluster_fit.problems(nine, cluster_fit.declared(nine))] == ["generate.engine.actors"]
    two = cluster_fit.Capacity((cluster_fit.Node(None, 8), cluster_fit.Node(None, 8)), "test")
    assert cluster_fit.fits(two, 1, 1) == 16 and cluster_fit.fits(two, 1, 6) == 2  # a 6-GPU unit fits once per node


def test_cpu_demands_count_only_where_cpus_are_declared():
    """The spec's cluster: gives GPUs; CPUs per node only with cpus_per_node (then a 2-CPU node holds 2 actors)."""
    spec = _spec(engine={"actors": 4, "cpus_per_actor": 1})
    assert cluster_fit.problems(spec, cluster_fit.declared(spec)) == []
    small = parse_spec({**spec.model_dump(mode="json", exclude_none=True),
                        "cluster": {"nodes": 1, "gpus_per_node": 8, "cpus_per_node": 2}})
    assert [f for f, _ in cluster_fit.problems(small, cluster_fit.declared(small))] == ["engine.actors"]


def test_cluster_yaml_is_the_autoscalers_maximum_when_the_spec_declares_none():
    """No cluster: section: cluster.yaml's node types at max_workers (4 × 8 H100 and the CPU head)."""
    d = yaml.safe_load(yaml.safe_dump(SMOKE))
    cap = cluster_fit.declared(parse_spec(d))
    assert cap.gpus == 32 and len(cap.nodes) == 5
    d["generate"] = {**d["generate"], "engine": {"actors": 33, "gpus_per_actor": 1}}
    with pytest.raises(SpecError) as e:
        cluster_fit.check(parse_spec(d))
    assert e.value.problems[0][0] == "generate.engine.actors"


def test_every_shipped_spec_fits_its_declared_cluster():
    from runner.spec import load_spec
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        spec = load_spec(path)
        assert cluster_fit.problems(spec, cluster_fit.declared(spec)) == [], path


def test_live_limits_take_the_declared_gpus_where_more_and_size_units_by_gpus():
    """runner.capacity's sizing reads this arithmetic: live CPUs, GPUs live or declared (an autoscaler's
    maximum) whichever is more, the largest node of either; a unit that needs a GPU is counted by GPUs."""
    from runner.spec import ClusterSpec
    live = cluster_fit.of_nodes([{"CPU": 4, "GPU": 2}, {"CPU": 8}], "live")
    most = cluster_fit.limits(live, ClusterSpec(nodes=2, gpus_per_node=4))
    assert most == {"CPU": 12, "GPU": 8, "node_cpus": 8, "node_gpus": 4}
    assert cluster_fit.limits(live) == {"CPU": 12, "GPU": 2, "node_cpus": 8, "node_gpus": 2}
    gpu = cluster_fit.Room.of(most, cpus=1, gpus=0.5)
    assert (gpu.kind, gpu.need, gpu.total, gpu.node) == ("GPU", 0.5, 8, 4) and gpu.at_once() == 16
    assert gpu.at_once(per_group=3) == 5  # groups of 3 half-GPU units: 1.5 GPUs each
    cpu = cluster_fit.Room.of(most, cpus=3, gpus=0)
    assert (cpu.kind, cpu.at_once(), cpu.at_once(per_group=2)) == ("CPU", 4, 2)
    assert cluster_fit.Room.of(cluster_fit.limits(cluster_fit.of_nodes([], "none")), 1, 1).total == 0  # none seen
