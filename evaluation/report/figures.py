"""The report's figures (matplotlib), each drawn from a table it is given and returned as an <img> tag."""
from __future__ import annotations

import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from statsmodels.stats.proportion import proportion_confint

from evaluation.coexpression import coexpression_matrix
from evaluation.report.markup import Figures, na


def _forest(figs: Figures, df: pd.DataFrame, suite: str, reference: str, part: int) -> str:
    df = df.iloc[::-1]  # matplotlib draws the first row at the bottom
    labels = [f"{r.model} · {r.condition} · {r.metric} [{r.judge}]" for r in df.itertuples()]
    y = np.arange(len(df))
    eff = df["effect"].to_numpy(float)
    lo = np.clip(eff - df["ci_lo"].to_numpy(float), 0, None)
    hi = np.clip(df["ci_hi"].to_numpy(float) - eff, 0, None)
    sig = df["significant"].to_numpy(bool)
    fig, ax = plt.subplots(figsize=(9, max(2.0, 0.26 * len(df) + 1.0)))
    for mask, color, lab in ((~sig, "#777777", "n.s."), (sig, "#c0392b", "significant (Holm)")):
        if mask.any():
            ax.errorbar(eff[mask], y[mask], xerr=[lo[mask], hi[mask]], fmt="o", color=color,
                        ms=4, capsize=2, lw=1, label=lab)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel(f"effect vs {reference} (mean paired difference, 95% CI)")
    ax.set_title(f"{suite}: effect vs {reference}" + (f" (part {part})" if part > 1 else ""))
    ax.legend(fontsize=7, loc="best")
    return figs.add(fig, f"forest_{suite}_{reference}_{part}", f"Forest plot {suite} vs {reference}")


def forest_plots(figs: Figures, c: pd.DataFrame, suite: str, chunk: int = 80) -> str:
    """One forest plot per reference (in parts of `chunk` rows) of a suite's contrasts."""
    parts = []
    for reference, d in c.groupby("reference", sort=True):
        d = d[np.isfinite(d["effect"].to_numpy(float))]
        for k, start in enumerate(range(0, len(d), chunk), start=1):
            parts.append(_forest(figs, d.iloc[start:start + chunk], suite, str(reference), k))
    return "".join(parts) or na(f"Forest plot for suite {suite}")


def heatmap(figs: Figures, co: pd.DataFrame, model: str, judge: str) -> str:
    """The co-expression matrix of one (model, judge): effects, related/contrastive/induced marks."""
    m = coexpression_matrix(co, model, judge, "effect")
    lab = coexpression_matrix(co, model, judge, "label").reindex_like(m)
    sig = coexpression_matrix(co, model, judge, "significant").reindex_like(m)
    vals = m.to_numpy(float)
    vmax = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    n_r, n_c = vals.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n_c + 2), max(3, 0.5 * n_r + 1.5)))
    im = ax.imshow(vals, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    marks = {"related": "+", "contrastive": "−"}
    for i in range(n_r):
        for j in range(n_c):
            if np.isfinite(vals[i, j]):
                mark = marks.get(lab.iat[i, j], "")
                if lab.iat[i, j] == "induced" and pd.notna(sig.iat[i, j]) and bool(sig.iat[i, j]):
                    mark = "*"
                dark = abs(vals[i, j]) > 0.6 * vmax  # white text stays readable on dark cells
                ax.text(j, i, f"{vals[i, j]:.2f}{mark}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_xticks(range(n_c), list(m.columns), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_r), list(m.index), fontsize=8)
    ax.set_xlabel("expressed value")
    ax.set_ylabel("induced value")
    ax.set_title(f"Co-expression Δ — {model} [{judge}]\n(+ related, − contrastive, * induced; Holm)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="effect (rate difference)")
    return figs.add(fig, f"coexpression_{model}_{judge}", f"Co-expression heatmap {model} {judge}")


def agreement_figure(figs: Figures, agreement: pd.DataFrame) -> str:
    """Accuracy (Wilson 95% CI) and Cohen's kappa of each judge against the human labels."""
    a = agreement.dropna(subset=["accuracy"])
    if a.empty:
        return ""
    n = a["n"].to_numpy(int)
    acc = a["accuracy"].to_numpy(float)
    lo, hi = proportion_confint(np.round(acc * n), n, alpha=0.05, method="wilson")
    y = np.arange(len(a))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.45 * len(a) + 1.4), sharey=True)
    ax1.errorbar(acc, y, xerr=[acc - lo, hi - acc], fmt="o", color="#2c3e50", capsize=3)
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("accuracy vs human labels (Wilson 95% CI)")
    ax1.set_yticks(y, [str(j) for j in a["judge"]], fontsize=8)
    ax2.barh(y, a["kappa"].to_numpy(float), color="#2980b9")
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_xlim(min(-0.2, float(np.nanmin(a["kappa"])) - 0.05), 1)
    ax2.set_xlabel("Cohen's κ (0 = chance)")
    fig.suptitle(f"Refusal judges against {int(n.max())} human-labelled responses", fontsize=9)
    return figs.add(fig, "judge_agreement", "Judge agreement with human labels")


def trajectory(figs: Figures, traj: pd.DataFrame) -> str:
    """CI half-width and p of the watched contrasts after each round of seeds.adaptive."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
    for key, d in traj.groupby(["condition", "suite", "metric"], sort=True):
        d = d.sort_values("n_seeds")
        label = " · ".join(map(str, key))
        ax1.plot(d["n_seeds"], d["ci_halfwidth"], "o-", label=label)
        ax2.plot(d["n_seeds"], d["p_holm"], "o-", label=label)
    ax1.set_xlabel("trained runs per condition")
    ax1.set_ylabel("95% CI half-width")
    ax2.set_xlabel("trained runs per condition")
    ax2.set_ylabel("Holm p")
    ax2.set_yscale("log")
    ax2.axhline(0.05, color="k", lw=0.8, ls="--")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.legend(fontsize=6)
    return figs.add(fig, "adaptive_trajectory", "Adaptive seeds trajectory")


def along_training(figs: Figures, d: pd.DataFrame, model: str, suite: str) -> str:
    """One model's and suite's arms: each effect against the share of training, or against optimizer
    steps where the points carry them (train.eval_at_steps, steps_per_condition: equal), with its 95% CI band."""
    x_col = "step" if "step" in d.columns and d["step"].notna().all() else "progress"
    metrics = sorted(d["metric"].unique(), key=lambda m: ("/" in m, m))[:6]  # headline metrics before parts
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 2.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for cond, c in d[d["metric"] == metric].groupby("condition", sort=True):
            c = c.sort_values(x_col)
            x = np.concatenate([[0.0], c[x_col].to_numpy(float)])
            ax.plot(x, np.concatenate([[0.0], c["effect"].to_numpy(float)]), "o-", ms=3, label=cond)
            ax.fill_between(x, np.concatenate([[0.0], c["ci_lo"].to_numpy(float)]),
                            np.concatenate([[0.0], c["ci_hi"].to_numpy(float)]), alpha=0.2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("optimizer steps" if x_col == "step" else "share of training")
        ax.set_title(metric, fontsize=8)
    axes[0][0].set_ylabel("effect vs " + " / ".join(sorted(d["reference"].unique())))
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"{model} — {suite}", fontsize=9, y=1.04)
    return figs.add(fig, f"along_training_{model}_{suite}", f"Effects along training {model} {suite}")
