"""Training state keyed by what it trains: a cell that failed mid-training leaves checkpoints behind;
after train.lr changes, the rerun must train from scratch at the new lr, never resume (or publish)
the old lr's state. Checked on both training paths: LoRA adapters trained together (runner.train.group,
valind's own checkpoints) and each cell alone under DeepSpeed (Ray Train's checkpoints)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _valind(*args, env=None):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=full, timeout=900)


def _spec(out: Path, name: str, lr: float, alone: bool = False) -> Path:
    d = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    d["study"].update(name=name, output_dir=str(out))
    d["controls"] = {"count": 0}
    # 3 optimizer steps, a checkpoint after each, fp32: a group equals its cells alone to 1e-5
    d["train"].update(lr=lr, epochs=3, checkpoint_every=1, max_failures=0, bf16=False)
    if alone:
        d["train"]["adapters_per_group"] = 1
    path = out / f"{name}-{lr:g}-{'alone' if alone else 'group'}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _adapters(study: Path) -> dict[str, dict]:
    """Each published cell: its cell.json and its adapter's tensors."""
    out = {}
    for unit in (study / "stages" / "train").iterdir():
        if (unit / "_DONE.json").exists():
            meta = json.loads((unit / "cell.json").read_text())
            out[meta["cell_id"].rsplit("-", 1)[0]] = {"meta": meta,
                                                     "w": load_file(unit / "model" / "adapter_model.safetensors")}
    return out


def _copy_data_stages(src: Path, dst: Path) -> None:
    for stage in ("annotate", "curate"):
        shutil.copytree(src / "stages" / stage, dst / "stages" / stage)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, data_dir, tiny_model):
    """The study annotated and curated once, and its cells trained from scratch at lr 1e-5."""
    out = tmp_path_factory.mktemp("train-state")
    r = _valind("train", str(_spec(out, "clean", 1e-5)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, out / "clean"


# each cell alone (Ray Train's checkpoints, keyed by the same cell key) only in `make test-full`: CI's time
@pytest.mark.parametrize("alone", [False, pytest.param(True, marks=pytest.mark.full)], ids=["group", "alone"])
def test_a_changed_lr_never_resumes_the_old_lrs_state(tmp_path, clean, alone):
    out, clean_dir = clean
    study = tmp_path / "s"
    _copy_data_stages(clean_dir, study)
    failed = _valind("train", str(_spec(tmp_path, "s", 1e-3, alone)), env={"VALIND_FAIL_AT_STEP": "2"})
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "train: 2 cell(s) failed" in failed.stderr
    # the old lr's checkpoints are there (after step 1 of 3), as a killed or failed run leaves them
    assert list((study / "ray_train").rglob("valind-starts.txt"))

    rerun = _valind("train", str(_spec(tmp_path, "s", 1e-5, alone)), "--amend")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "study: amended train.lr (0.001 -> 1e-05)" in rerun.stdout

    got, want = _adapters(study), _adapters(clean_dir)
    assert sorted(got) == sorted(want) == ["tiny__value-fairness__s0", "tiny__value-humor__s0"]
    for cell in got:
        meta = got[cell]["meta"]
        assert meta["train"]["lr"] == 1e-5 and meta["timing"]["starts"] == [0]  # trained from step 0, once
        for name, w in want[cell]["w"].items():
            torch.testing.assert_close(got[cell]["w"][name], w, atol=1e-5, rtol=0)
