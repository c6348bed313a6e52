"""Preference losses on summed sequence log-probs (policy and reference, chosen and rejected).

DPO (Rafailov et al. 2023): -log σ(β·h), h = (π_c − ref_c) − (π_r − ref_r).
Conservative DPO (label smoothing ε): −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
IPO (Azar et al. 2023): (h − 1/(2β))², on length-averaged log-probs as in TRL.
SFT: negative log-likelihood of the chosen response per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    h = (pc - rc) - (pr - rr)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2


def sft_loss(pc, n_chosen_tokens) -> torch.Tensor:
    return -pc / n_chosen_tokens.clamp(min=1)


def preference_loss(method: str, pc, pr, rc, rr, n_c, n_r, beta: float, label_smoothing: float = 0.0):
    """Per-example losses and the implicit rewards β·(π − ref) used for metrics."""
    if method in ("dpo", "cdpo"):
        losses = dpo_loss(pc, pr, rc, rr, beta, label_smoothing if method == "cdpo" else 0.0)
    elif method == "ipo":
        losses = ipo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta)
    elif method == "sft":
        losses = sft_loss(pc, n_c)
    else:
        raise ValueError(f"unknown method {method!r}")
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()
