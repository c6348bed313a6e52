"""bench/group_check.py, the GPU check's grouped-LoRA step, on the CPU (fp32, tolerance 1e-5): it
passes when the group equals each cell alone and fails for an adapter compared with another cell."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_group_check_passes_on_cpu_and_fails_for_another_cells_adapter(tmp_path):
    from group_check import check_group

    res = check_group("cpu", world=1, threads=2, work=tmp_path, swap=True)
    assert res["ok"] and res["precision"] == "fp32" and res["backend"] is None
    assert res["group_steps"] == [3, 3, 3, 2, 1]  # 3 adapters of 3, 5 and 4 steps in one group
    assert res["loss_first_is_ln2"]
    for name, a in res["adapters"].items():
        assert a["ok"] and a["max_abs_diff"] < 1e-5 and a["rel_diff"] < 1e-3, (name, a)
    # the check's own check: adapter 0 of the group against cell 1 trained alone fails both bounds
    bad = res["swapped"]
    assert not bad["ok"] and bad["max_abs_diff"] > 1e-3 and bad["rel_diff"] > 0.5, bad


@pytest.mark.slow
def test_group_check_data_parallel_on_two_processes(tmp_path):
    """torch.distributed with world size 2 (gloo on CPUs, where a GPU machine uses NCCL): each rank
    trains its slice of every step and apply_step averages the adapters' gradients."""
    from group_check import check_group

    res = check_group("cpu", world=2, threads=1, work=tmp_path)
    assert res["ok"] and res["world"] == 2 and res["backend"] == "gloo", res
    assert max(a["max_abs_diff"] for a in res["adapters"].values()) < 1e-5
