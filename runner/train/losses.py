"""Preference losses on summed sequence log-probs (policy and reference, chosen and rejected).

DPO (Rafailov et al. 2023): -log σ(β·h), h = (π_c − ref_c) − (π_r − ref_r).
Conservative DPO (label smoothing ε): −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
IPO (Azar et al. 2023): (h − 1/(2β))², on length-averaged log-probs as in TRL.
SFT: negative log-likelihood of the chosen response per token.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from runner.spec import TrainSpec


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    h = (pc - rc) - (pr - rr)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2


def sft_loss(pc, n_chosen_tokens) -> torch.Tensor:
    return -pc / n_chosen_tokens.clamp(min=1)


LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# Bump a method's version when its loss changes: train keys hold it, so its cells are trained again.
VERSIONS = {"dpo": "1", "cdpo": "1", "ipo": "1", "sft": "1"}


def make_loss(train: TrainSpec) -> LossFn:
    """The cell's loss: `loss(pc, pr, rc, rr, n_c, n_r) -> (per-example losses, reward chosen, reward rejected)`.

    The one place train.method, train.beta and train.label_smoothing are read. pc/pr are the policy's
    summed response log-probs (chosen, rejected), rc/rr the reference's, n_c/n_r the response token
    counts; the rewards are the implicit β·(π − ref), detached, for metrics."""
    method, beta = train.method, train.beta
    if method in ("dpo", "cdpo"):
        eps = train.label_smoothing if method == "cdpo" else 0.0  # the spec rejects smoothing on plain dpo

        def core(pc, pr, rc, rr, n_c, n_r):
            return dpo_loss(pc, pr, rc, rr, beta, eps)
    elif method == "ipo":
        def core(pc, pr, rc, rr, n_c, n_r):
            return ipo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta)
    elif method == "sft":
        def core(pc, pr, rc, rr, n_c, n_r):
            return sft_loss(pc, n_c)
    else:
        raise ValueError(f"unknown train.method {method!r}")

    def loss(pc, pr, rc, rr, n_c, n_r):
        return core(pc, pr, rc, rr, n_c, n_r), beta * (pc - rc).detach(), beta * (pr - rr).detach()

    return loss
