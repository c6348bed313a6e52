"""Doses: how many optimizer steps each condition trains (train.steps_per_condition), the batches of
those steps, and where train.eval_at_steps points fall. Free of torch and Ray: the driver, the workers,
`Study.runs` and `valind plan` all count steps here."""
from __future__ import annotations

import math

import numpy as np

from evaluation.errors import InputError
from runner.spec_train import TrainSpec


class DoseError(InputError):
    pass


def schedule(n: int, batch: int, epochs: int, seed: int, total: int | None = None) -> list[list[int]]:
    """Each optimizer step's example indices. Epoch e shuffles the n indices with (seed, e) and yields
    floor(n / batch) whole batches (the remainder waits for a later epoch's shuffle); `total` (None:
    `epochs` epochs) cuts or extends the epochs to that many steps, the last epoch possibly partial."""
    per = n // batch
    total = epochs * per if total is None else total
    steps: list[list[int]] = []
    e = 0
    while len(steps) < total and per:
        order = np.random.default_rng([seed, e]).permutation(n).tolist()
        steps += [order[i:i + batch] for i in range(0, n - batch + 1, batch)][:total - len(steps)]
        e += 1
    return steps


def condition_steps(sizes: dict[str, int], train: TrainSpec) -> dict[str, int]:
    """Each condition's optimizer steps from its subset size: per_subset, `epochs` passes of
    floor(size / batch_size) steps; equal, the largest of those for every condition."""
    own = {c: train.epochs * (n // train.batch_size) for c, n in sizes.items()}
    small = sorted(c for c, n in sizes.items() if n < train.batch_size)
    if small:
        raise DoseError(f"{', '.join(small)}: fewer pairs than train.batch_size ({train.batch_size}): "
                        "no optimizer step would run")
    if train.steps_per_condition == "equal" and own:
        top = max(own.values())
        return {c: top for c in own}
    return own


def epochs_of(steps: int, size: int, batch: int) -> float:
    """The passes over a subset of `size` pairs that `steps` optimizer steps make (fractional)."""
    per = size // batch
    return steps / per if per else math.nan


def step_fractions(train: TrainSpec, steps: int, condition: str) -> list[float]:
    """The eval_at points of a condition of `steps` optimizer steps, as fractions of its schedule:
    train.eval_at, or each of train.eval_at_steps over `steps` (every one must lie below it: the
    final adapter is always evaluated), then 1."""
    if not train.eval_at_steps:
        return list(train.eval_at)
    late = [k for k in train.eval_at_steps if k >= steps]
    if late:
        raise DoseError(f"train.eval_at_steps: step(s) {late} not below the {steps} optimizer steps of {condition} "
                        "(its final adapter is evaluated anyway): lower them, or train every condition as long "
                        "with train.steps_per_condition: equal")
    return [k / steps for k in train.eval_at_steps] + [1.0]
