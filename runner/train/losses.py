"""Preference losses on summed sequence log-probs (policy and reference, chosen and rejected).

DPO (Rafailov et al. 2023): -log σ(β·h), h = (π_c − ref_c) − (π_r − ref_r).
Conservative DPO (label smoothing ε): −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
IPO (Azar et al. 2023): (h − 1/(2β))², on length-averaged log-probs as in TRL.
SFT: negative log-likelihood of the chosen response per token.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evaluation.registry import Registry
from runner.spec_train import TrainSpec


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    h = (pc - rc) - (pr - rr)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2


def sft_loss(pc, n_chosen_tokens) -> torch.Tensor:
    return -pc / n_chosen_tokens.clamp(min=1)


LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Core = Callable[..., torch.Tensor]  # (pc, pr, rc, rr, n_c, n_r) -> per-example losses


@dataclass(frozen=True)
class Loss:
    """A train.method: `make(train)` gives its per-example loss; bump `version` when it changes (train
    keys hold it, so its cells are trained again)."""
    make: Callable[[TrainSpec], Core]
    version: str = "1"


LOSSES: Registry[Loss] = Registry("loss")


def loss(name: str, version: str = "1") -> Callable[[Callable[[TrainSpec], Core]], Callable[[TrainSpec], Core]]:
    """Register a train.method: `@loss("dpo")` over `make(train) -> core(pc, pr, rc, rr, n_c, n_r)`."""
    def deco(make: Callable[[TrainSpec], Core]) -> Callable[[TrainSpec], Core]:
        LOSSES.add(name, Loss(make, version))
        return make
    return deco


@loss("dpo")
def _dpo(train: TrainSpec) -> Core:
    beta = train.beta
    return lambda pc, pr, rc, rr, n_c, n_r: dpo_loss(pc, pr, rc, rr, beta)


@loss("cdpo")
def _cdpo(train: TrainSpec) -> Core:
    beta, eps = train.beta, train.label_smoothing  # the spec rejects smoothing on plain dpo
    return lambda pc, pr, rc, rr, n_c, n_r: dpo_loss(pc, pr, rc, rr, beta, eps)


@loss("ipo")
def _ipo(train: TrainSpec) -> Core:
    beta = train.beta
    return lambda pc, pr, rc, rr, n_c, n_r: ipo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta)


@loss("sft")
def _sft(train: TrainSpec) -> Core:
    return lambda pc, pr, rc, rr, n_c, n_r: sft_loss(pc, n_c)


# train.method -> its loss's version (runner.stages.train's keys)
VERSIONS = {name: entry.version for name, entry in LOSSES.items()}


def make_loss(train: TrainSpec) -> LossFn:
    """The cell's loss: `loss(pc, pr, rc, rr, n_c, n_r) -> (per-example losses, reward chosen, reward rejected)`.

    The one place train.method, train.beta and train.label_smoothing are read. pc/pr are the policy's
    summed response log-probs (chosen, rejected), rc/rr the reference's, n_c/n_r the response token
    counts; the rewards are the implicit β·(π − ref), detached, for metrics."""
    try:
        core = LOSSES.get(train.method).make(train)
    except KeyError as e:
        raise ValueError(f"unknown train.method: {e.args[0]}") from None
    beta = train.beta

    def loss_fn(pc, pr, rc, rr, n_c, n_r):
        return core(pc, pr, rc, rr, n_c, n_r), beta * (pc - rc).detach(), beta * (pr - rr).detach()

    return loss_fn
