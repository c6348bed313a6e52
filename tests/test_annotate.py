"""Annotation: resumable after a kill, and the judge audit round trip."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from runner.data.audit import audit_agreement, audit_sample, read_labels
from runner.data.sources import DataError

ROOT = Path(__file__).resolve().parent.parent


def _ann():
    pairs = pd.DataFrame({"pair_id": ["a", "b", "c"], "prompt": [[{"role": "user", "content": "q"}]] * 3,
                          "chosen": ["c1", "c2", "c3"], "rejected": ["r1", "r2", "r3"]})
    ann = pd.DataFrame({"pair_id": ["a", "a", "b", "b", "c", "c"], "side": ["chosen", "rejected"] * 3,
                        "values": [["empathy"], [], ["empathy", "honesty"], ["honesty"], [], []],
                        "scored": [True, True, True, True, False, True], "raw": [""] * 6})
    return pairs, ann


def test_audit_sample_is_stratified_and_skips_unscored():
    pairs, ann = _ann()
    s = audit_sample(pairs, ann, n=10)
    assert set(s.columns) >= {"pair_id", "side", "conversation", "response", "judge_values", "human_values"}
    assert not ((s.pair_id == "c") & (s.side == "chosen")).any()
    assert {"empathy", "honesty", "none"} <= {v for x in s.judge_values for v in x.split(", ")}


def test_audit_agreement_per_value(tmp_path):
    pairs, ann = _ann()
    labels = pd.DataFrame({"pair_id": ["a", "a", "b", "b"], "side": ["chosen", "rejected"] * 2,
                           "human_values": ["empathy", "none", "empathy", "empathy, honesty"]})
    p = tmp_path / "l.csv"
    labels.to_csv(p, index=False)
    agree = audit_agreement(read_labels(p), ann).set_index("value")
    assert agree.loc["empathy", "accuracy"] == 0.75 and agree.loc["honesty", "accuracy"] == 0.75
    assert agree.loc["empathy", "n"] == 4


def test_audit_labels_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.csv"
    pd.DataFrame({"pair_id": ["a"], "side": ["chosen"], "human_values": ["kindness"]}).to_csv(p, index=False)
    with pytest.raises(DataError, match="bad.csv.*kindness"):
        read_labels(p)
    p.write_text("pair_id,side\na,chosen\n")
    with pytest.raises(DataError, match="missing column"):
        read_labels(p)


@pytest.mark.slow
def test_killed_annotation_resumes_without_rejudging(tmp_path, data_dir):
    spec = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    spec["study"]["output_dir"] = str(tmp_path)
    spec["engine"]["batch_size"] = 2
    spec["data"]["sources"][0]["max_pairs"] = 40  # 80 responses → 40 batches
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "runner.cli", "annotate", str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    batches = tmp_path / "smoke" / "stages" / "annotate"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(batches.glob("*/batches/*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in batches.glob("*/batches/*.parquet")}
    assert 3 <= len(done) < 40, len(done)
    assert not list(batches.glob("*/_DONE.json"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"({len(done)} already judged)" in r.stdout
    for p, mtime in done.items():
        assert p.stat().st_mtime_ns == mtime  # finished batches were not judged again
    ann = pd.read_parquet(next(batches.glob("*/annotations.parquet")))
    assert len(ann) == 80 and ann["scored"].all()
