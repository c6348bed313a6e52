"""Calibration in the corners tests/test_calibration.py's grid does not reach (issue 33, item 9 and
6): rare binary metrics against the one-run base model, unequal seed counts between a value arm and
its controls, and coverage of the bounded rate intervals near 0 and 1.

Every simulated study goes through ``evaluation.contrasts.compare_arms``, the function the report's
contrasts call, so the same script measures the code before and after a change:

    PYTHONPATH=/path/to/checkout python bench/calibration_corners.py [--n 1000] [--quick]

Imports only ``evaluation.*`` (and numpy/pandas). Exact nulls: under "type-I" both arms have the
same per-item rates (rare) or the same distribution (unequal seeds). MC SE of a type-I rate near
.05 with n studies: √(.05·.95/n) (.007 at n = 1,000).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd

from evaluation import contrasts

ALPHA = 0.05


def compare(cond: np.ndarray, ref: np.ndarray, cond_seeds: list[int], ref_seeds: list[int],
            match_seed: bool) -> pd.DataFrame:
    """Contrast rows of n simulated studies at once: study k is metric "m<k>" of one vals table.
    cond: (n, runs, items); ref: (n, reference runs, items)."""
    n, sc, items = cond.shape
    sr = ref.shape[1]
    cond_ids, ref_ids = [f"c{j}" for j in range(sc)], [f"r{j}" for j in range(sr)]
    index = pd.MultiIndex.from_product([["sim"], [f"m{k:05d}" for k in range(n)], ["j"], range(items)])
    data = np.concatenate([cond, ref], axis=1).transpose(0, 2, 1).reshape(n * items, sc + sr)
    vals = pd.DataFrame(data, index=index, columns=cond_ids + ref_ids)
    exists = pd.DataFrame(True, index=index, columns=vals.columns)
    cr = pd.DataFrame(dict(run_id=cond_ids, _seed=cond_seeds))
    rr = pd.DataFrame(dict(run_id=ref_ids, _seed=ref_seeds))
    return pd.DataFrame(contrasts.compare_arms(vals, exists, cr, rr, match_seed, ALPHA))


def _summary(rows: pd.DataFrame, truth: float = 0.0) -> dict[str, float]:
    p = rows["p_value"].to_numpy(float)
    eff, se = rows["effect"].to_numpy(float), rows["se"].to_numpy(float)
    ok = np.isfinite(se)
    return dict(type1=float(np.mean(p[np.isfinite(p)] <= ALPHA)), mc_n=int(np.isfinite(p).sum()),
                se2_over_var=float(np.mean(se[ok] ** 2) / np.var(eff[ok] - truth)) if ok.sum() > 2 else math.nan,
                inference=str(rows["inference"].mode().iloc[0]))


def rare_against_base(n: int, rates=(0.01, 0.02, 0.05, 0.5), seeds=(2, 4, 6, 10), items=(30, 300)) -> pd.DataFrame:
    """Binary scores at the same rate in every trained run and the one base run (exact null)."""
    out = []
    for rate in rates:
        for s in seeds:
            for i in items:
                rng = np.random.default_rng([int(rate * 1000), s, i])
                cond = (rng.random((n, s, i)) < rate).astype(float)
                base = (rng.random((n, 1, i)) < rate).astype(float)
                res = _summary(compare(cond, base, list(range(s)), [-1], False))
                out.append(dict(rate=rate, seeds=s, items=i, **res,
                                base_no_event=float((base.sum(axis=(1, 2)) == 0).mean())))
    return pd.DataFrame(out)


def unequal_seeds(n: int, cases=((3, 2), (4, 2), (5, 2), (3, 0)), items=50, sd_seed=0.2, sd_item=0.1,
                  sd_resid=0.5) -> pd.DataFrame:
    """Continuous scores: a value arm with S_v seeds against 2 control conditions trained with
    seeds 0..S_c−1 (S_c = 0 in the row "3 vs 2 disjoint": seeds 10, 11, none shared). Every run
    has its own seed shift; the value arm has an item × condition term; no effect."""
    out = []
    for sv, sc in cases:
        rng = np.random.default_rng([sv, sc, 7])
        ctrl_seeds = list(range(sc)) if sc else [10, 11]
        cond = (rng.normal(0, sd_seed, (n, sv, 1)) + rng.normal(0, sd_item, (n, 1, items))
                + rng.normal(0, sd_resid, (n, sv, items)))
        k = 2 * len(ctrl_seeds)  # control-0 and control-1, one run per seed each
        ref = rng.normal(0, sd_seed, (n, k, 1)) + rng.normal(0, sd_resid, (n, k, items))
        res = _summary(compare(cond, ref, list(range(sv)), ctrl_seeds * 2, True))
        label = f"{sv} vs {len(ctrl_seeds)}" + ("" if sc else " disjoint")
        out.append(dict(case=label, **res))
    return pd.DataFrame(out)


def _expit(x: np.ndarray) -> np.ndarray:
    return np.asarray(1 / (1 + np.exp(-x)))


def bounded_coverage(n: int, pairs=((0.02, 0.02), (0.98, 0.98), (0.98, 0.02), (0.02, 0.98), (0.1, 0.02)),
                     seeds=(3, 5), items=100, sd_seed=0.3, sd_item=0.5) -> pd.DataFrame:
    """Binary scores on the logit scale: condition run s, item i: logit(rc) + a_s + b_i + g_i; the
    base run: logit(rb) + b_i (b shared, g the item × condition term). Truth: each arm's expected
    rate (by a large Monte-Carlo); coverage of the condition's and base's rate CIs and of the
    difference's CI, and how often an interval leaves its range."""
    big = np.random.default_rng(99)
    a_b_g = big.normal(0, 1, (3, 400_000))
    out = []
    for rc, rb in pairs:
        lc, lb = math.log(rc / (1 - rc)), math.log(rb / (1 - rb))
        true_c = float(_expit(lc + sd_seed * a_b_g[0] + sd_item * a_b_g[1] + sd_item * a_b_g[2]).mean())
        true_b = float(_expit(lb + sd_item * a_b_g[1]).mean())
        for s in seeds:
            rng = np.random.default_rng([int(rc * 100), int(rb * 100), s])
            b = rng.normal(0, sd_item, (n, 1, items))
            pc = _expit(lc + rng.normal(0, sd_seed, (n, s, 1)) + b + rng.normal(0, sd_item, (n, 1, items)))
            cond = (rng.random((n, s, items)) < pc).astype(float)
            base = (rng.random((n, 1, items)) < _expit(lb + b)).astype(float)
            rows = compare(cond, base, list(range(s)), [-1], False)
            lo, hi = rows["ci_lo"].to_numpy(float), rows["ci_hi"].to_numpy(float)
            rec = dict(rate_cond=rc, rate_base=rb, seeds=s, items=items,
                       diff_cover=float(np.mean((lo <= true_c - true_b) & (true_c - true_b <= hi))),
                       diff_outside=float(np.mean((lo < -1) | (hi > 1))))
            for arm, truth, (clo, chi) in [("cond", true_c, ("rate_ci_lo", "rate_ci_hi")),
                                           ("base", true_b, ("ref_rate_ci_lo", "ref_rate_ci_hi"))]:
                if clo in rows:
                    rlo, rhi = rows[clo].to_numpy(float), rows[chi].to_numpy(float)
                    rec[f"{arm}_cover"] = float(np.mean((rlo <= truth) & (truth <= rhi)))
                else:  # code without rate intervals
                    rec[f"{arm}_cover"] = math.nan
            out.append(rec)
    return pd.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="simulated studies per cell (default 1000)")
    ap.add_argument("--quick", action="store_true", help="n = 200, fewer cells (a smoke run)")
    args = ap.parse_args()
    n = 200 if args.quick else args.n
    t0 = time.time()
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.precision", 3):
        print(f"## Rare binary rates against the base model (exact null; {n} studies per cell, "
              f"MC SE of a rate near α: {math.sqrt(ALPHA * (1 - ALPHA) / n):.3f})")
        kw = dict(rates=(0.02, 0.5), seeds=(2, 6)) if args.quick else {}
        print(rare_against_base(n, **kw).to_string(index=False))
        print(f"\n## Unequal seed counts, value vs control (exact null; {n} studies per cell)")
        print(unequal_seeds(n).to_string(index=False))
        print(f"\n## Coverage of 95% intervals for binary rates near 0 and 1 ({n} studies per cell, 100 items)")
        print(bounded_coverage(n).to_string(index=False))
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
