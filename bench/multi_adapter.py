"""Many adapters on one base: K demo-size LoRA cells trained together vs one after another.

Baseline: the K cells trained one after another by the one-cell path (each its own Ray Tune trial,
Ray Train worker group, model load and DeepSpeed ZeRO-2 engine), which is how every LoRA cell
trained before groups existed. Ours: the same K cells as one group (runner.train.group): one worker
group over one frozen base, each cell's adapter routed its own tokens. Both go through
`runner.sweep.run_grid`, as `valind run` does, with the demo's train section (jobs/demo.yaml: 20
pairs per cell, batch 4, micro-batch 2, 2 workers × 1 CPU, 2 epochs, max_length 192, bf16 where
native); reference log-probs computed by each side (own cache).

Each side runs in a fresh process with its own local Ray (this script re-invoked with `--side`).
Peak memory is the largest sum of resident memory of the Ray Train worker processes, sampled every
0.2 s. The adapters of the two sides are compared (in bf16 they agree to bf16 rounding; the 1e-5
equality in fp32 is tests/test_group.py).

    .venv/bin/python bench/multi_adapter.py [--cells 4] [--pairs 20]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def _peak_rss(stop: threading.Event, out: list) -> None:
    import psutil

    peak = 0
    while not stop.wait(0.2):
        total = 0
        for p in psutil.process_iter(["cmdline", "memory_info"]):
            try:
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                    total += p.info["memory_info"].rss
            except (psutil.Error, TypeError):
                pass
        peak = max(peak, total)
    out.append(peak)


def run_side(side: str, cells: int, pairs: int, work: str, out: str) -> None:
    """Child process: train the cells alone (one after another) or as one group; JSON result in `out`."""
    from runner.cluster import init_ray
    from runner.data.sources import load_pairs
    from runner.models import prepare_smollm2
    from runner.spec import SourceSpec, load_spec
    from runner.sweep import run_grid
    import ray

    from runner.train.memory import adapters_per_group, model_shape, worker_budget_gb
    from runner.train.cell import Cell, Group
    from runner.train.launch import bf16_enabled

    init_ray(2)
    model = str(prepare_smollm2())
    data_dir = Path(os.environ.get("VALIND_DATA_DIR") or ROOT.parent / "shared" / "data")
    data, _ = load_pairs(SourceSpec(name="hh_rlhf", subset="harmless-base", split="test", max_pairs=cells * pairs),
                         data_dir, 2000)
    train = load_spec(ROOT / "jobs" / "demo.yaml").train
    train = train.model_copy(update={"bf16": bf16_enabled(train)})
    w = Path(work)
    grid = []
    for k in range(cells):
        data[k * pairs:(k + 1) * pairs].to_parquet(w / f"s{k}.parquet")
        grid.append(Cell(cell_id=f"c{k}", seed=k, train=train, pairs=str(w / f"s{k}.parquet"), model_path=model,
                         model_id="smollm2", out_dir=str(w / "out" / f"c{k}"), work_dir=str(w / "ray_train"),
                         ref_cache=str(w / "ref")))
    if side == "alone":
        groups, per = [Group((c,)) for c in grid], 1
    else:  # as the train stage sizes it (runner.stages.train.group_cells)
        _, per = adapters_per_group(0.135, train, worker_budget_gb(train, 80, ray.cluster_resources()), cells,
                                    model_shape(0.135, model))
        groups = [Group(tuple(grid), per)]
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=_peak_rss, args=(stop, peak))
    sampler.start()
    t0 = time.perf_counter()
    errors = run_grid(groups, train, w / "ray_tune", side, cluster=None)
    wall = time.perf_counter() - t0
    stop.set(), sampler.join()
    if any(errors.values()):
        raise SystemExit(f"{side}: {errors}")
    steps = [sum(json.loads(x)["step_s"] for x in (w / "out" / c.cell_id / "metrics.jsonl").read_text().splitlines())
             for c in grid]
    Path(out).write_text(json.dumps({"wall_s": wall, "peak_gb": peak[0] / 1e9, "bf16": train.bf16,
                                     "steps_s": steps, "per_forward": per}))


def spawn(side: str, args, work: Path) -> dict:
    (work / side).mkdir()
    out = work / f"{side}.json"
    cmd = [sys.executable, __file__, "--side", side, "--cells", str(args.cells), "--pairs", str(args.pairs),
           "--work", str(work / side), "--out", str(out)]
    rc = subprocess.run(cmd, stdout=sys.stderr).returncode  # child output to stderr: stdout is the report
    if rc != 0 or not out.exists():
        raise SystemExit(f"{side} benchmark process failed (exit {rc})")
    return json.loads(out.read_text())


def max_adapter_diff(work: Path, cells: int) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for k in range(cells):
        a = load_file(work / "alone" / "out" / f"c{k}" / "model" / "adapter_model.safetensors")
        g = load_file(work / "group" / "out" / f"c{k}" / "model" / "adapter_model.safetensors")
        worst = max(worst, max((a[n].float() - g[n].float()).abs().max().item() for n in a))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=20, help="pairs per cell (the demo's subset_size)")
    ap.add_argument("--side", choices=["alone", "group"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return run_side(args.side, args.cells, args.pairs, args.work, args.out)

    print("=" * 100)
    print(f"Many adapters on one base: {args.cells} demo-size LoRA cells (SmolLM2-135M-Instruct, {args.pairs} HH-RLHF "
          "pairs each, jobs/demo.yaml's train section)")
    print("  baseline: one after another by the one-cell path (a Tune trial, worker group and DeepSpeed engine each)")
    print("  ours:     one group (runner.train.group: one worker group, one frozen base, routed adapters)")
    print(f"  each side a fresh process with its own local Ray; load average at start {os.getloadavg()[0]:.2f}")
    print("=" * 100, flush=True)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        alone = spawn("alone", args, work)
        group = spawn("group", args, work)
        diff = max_adapter_diff(work, args.cells)
    prec = "bf16" if alone["bf16"] else "fp32"
    print(f"  alone (one after another): wall {alone['wall_s']:7.1f} s, optimizer steps "
          f"{sum(alone['steps_s']):6.1f} s, peak worker memory {alone['peak_gb']:.2f} GB")
    print(f"  group (together, {group['per_forward']} adapters per forward): wall {group['wall_s']:7.1f} s, optimizer steps "
          f"{max(group['steps_s']):6.1f} s, peak worker memory {group['peak_gb']:.2f} GB")
    print(f"  adapters, group vs alone: max |difference| {diff:.2e} ({prec})")
    print(f"RATIO time group/alone = {group['wall_s'] / alone['wall_s']:.2f} (target <= 0.6); "
          f"MEMORY group/one cell = {group['peak_gb'] / alone['peak_gb']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
