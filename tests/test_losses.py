"""Preference losses against the published formulas and against TRL 1.x's DPOTrainer loss code.

TRL computes its losses only inside `DPOTrainer._compute_loss`; we call that method on a minimal
stand-in trainer and a stand-in model whose per-token log-probs sum to the chosen sequence log-probs,
so the comparison runs TRL's own code with no model and no dataset.
"""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from runner.spec import TrainSpec
from runner.train.losses import dpo_loss, ipo_loss, make_loss, sft_loss

BETA = 0.1
B, L = 5, 12
F64 = torch.float64  # 1e-6 agreement must not be float32 rounding


def _logps():
    g = torch.Generator().manual_seed(0)
    pc = -40 + 10 * torch.rand(B, generator=g, dtype=F64)
    pr = -45 + 10 * torch.rand(B, generator=g, dtype=F64)
    rc, rr = pc + torch.randn(B, generator=g, dtype=F64), pr + torch.randn(B, generator=g, dtype=F64)
    n_c = torch.randint(1, L - 2, (B,), generator=g).double()
    n_r = torch.randint(1, L - 2, (B,), generator=g).double()
    return pc, pr, rc, rr, n_c, n_r


def _logsig(x):
    return -torch.log1p(torch.exp(-x))


def _loss(method: str, beta: float = BETA, label_smoothing: float = 0.0):
    return make_loss(TrainSpec(method=method, beta=beta, label_smoothing=label_smoothing))


# --- independent formulas -------------------------------------------------------------------------

def test_dpo_matches_paper_formula():
    pc, pr, rc, rr, *_ = _logps()
    # Rafailov et al. 2023, eq. 7: -log σ(β log πc/refc − β log πr/refr)
    want = -_logsig(BETA * (pc - rc) - BETA * (pr - rr))
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, BETA), want, atol=1e-10)


def test_cdpo_matches_label_smoothed_formula():
    pc, pr, rc, rr, *_ = _logps()
    eps = 0.2
    z = BETA * ((pc - rc) - (pr - rr))
    p = 1 / (1 + torch.exp(-z))
    want = -(1 - eps) * torch.log(p) - eps * torch.log(1 - p)  # cross-entropy against soft label (1-ε, ε)
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, BETA, eps), want, atol=1e-10)
    assert torch.allclose(_loss("cdpo", label_smoothing=eps)(pc, pr, rc, rr, None, None)[0], want, atol=1e-10)
    # plain DPO is unsmoothed (the spec rejects label_smoothing there; a bypassing copy is still ignored)
    forced = TrainSpec(method="dpo", beta=BETA).model_copy(update={"label_smoothing": eps})
    assert torch.allclose(make_loss(forced)(pc, pr, rc, rr, None, None)[0], dpo_loss(pc, pr, rc, rr, BETA), atol=1e-12)


def test_ipo_matches_paper_formula_on_length_averaged_logps():
    pc, pr, rc, rr, n_c, n_r = _logps()
    # Azar et al. 2023, eq. 17: (h − 1/(2τ))², h on per-token averaged log-ratios (TRL's convention)
    h = (pc - rc) / n_c - (pr - rr) / n_r
    want = (h - 1 / (2 * BETA)) ** 2
    got, _, _ = _loss("ipo")(pc, pr, rc, rr, n_c, n_r)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(ipo_loss(pc, pr, rc, rr, BETA), ((pc - rc) - (pr - rr) - 5.0) ** 2, atol=1e-10)


def test_sft_is_per_token_nll_of_chosen():
    pc, _, _, _, n_c, _ = _logps()
    assert torch.allclose(sft_loss(pc, n_c), -pc / n_c, atol=1e-12)
    assert torch.allclose(sft_loss(torch.tensor([-3.0]), torch.tensor([0.0])), torch.tensor([3.0]))  # clamp(min=1)


def test_make_loss_returns_implicit_rewards():
    pc, pr, rc, rr, n_c, n_r = _logps()
    for method in ("dpo", "cdpo", "ipo", "sft"):
        _, r_c, r_r = _loss(method, label_smoothing=0.1 if method == "cdpo" else 0.0)(pc, pr, rc, rr, n_c, n_r)
        assert torch.allclose(r_c, BETA * (pc - rc), atol=1e-12)
        assert torch.allclose(r_r, BETA * (pr - rr), atol=1e-12)
        assert not r_c.requires_grad


def test_unknown_method_raises():
    # TrainSpec's Literal rejects it; a spec built without validation must still not train silently
    with pytest.raises(ValueError, match="kto"):
        make_loss(TrainSpec.model_construct(method="kto", beta=BETA, label_smoothing=0.0))


def test_make_loss_reads_beta_from_the_train_spec():
    pc, pr, rc, rr, n_c, n_r = _logps()
    h = (pc - rc) - (pr - rr)
    one, _, _ = _loss("dpo", beta=BETA)(pc, pr, rc, rr, n_c, n_r)
    two, r_c, r_r = _loss("dpo", beta=2 * BETA)(pc, pr, rc, rr, n_c, n_r)
    assert torch.allclose(one, -_logsig(BETA * h), atol=1e-10)
    assert torch.allclose(two, -_logsig(2 * BETA * h), atol=1e-10)  # doubling β doubles the logit
    assert not torch.allclose(one, two)
    assert torch.allclose(r_c, 2 * BETA * (pc - rc), atol=1e-12) and torch.allclose(r_r, 2 * BETA * (pr - rr), atol=1e-12)
    # IPO's target margin is 1/(2β): doubling β halves it
    ipo, _, _ = _loss("ipo", beta=2 * BETA)(pc, pr, rc, rr, n_c, n_r)
    hn = (pc - rc) / n_c - (pr - rr) / n_r
    assert torch.allclose(ipo, (hn - 1 / (4 * BETA)) ** 2, atol=1e-10)
    # cDPO reads label_smoothing from the same spec
    eps = 0.25
    smoothed, _, _ = _loss("cdpo", beta=2 * BETA, label_smoothing=eps)(pc, pr, rc, rr, n_c, n_r)
    want = -(1 - eps) * _logsig(2 * BETA * h) - eps * _logsig(-2 * BETA * h)
    assert torch.allclose(smoothed, want, atol=1e-10)


# --- TRL -----------------------------------------------------------------------------------------

def _trl_loss(loss_type: str, pc, pr, rc, rr, n_c, n_r, label_smoothing: float = 0.0) -> float:
    """TRL's `DPOTrainer._compute_loss` on log-probs (precomputed reference, batch [chosen; rejected])."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    k = len(pc)
    completion = torch.zeros(2 * k, L, dtype=torch.long)
    per_token = torch.zeros(2 * k, L - 1, dtype=F64)
    for i, (lp, n) in enumerate(zip(torch.cat([pc, pr]), torch.cat([n_c, n_r]))):
        n = int(n)
        completion[i, L - n:] = 1  # the response is the last n tokens; position 0 is always prompt
        per_token[i, L - 1 - n:] = lp / n  # shifted: log p(token t+1 | ≤t); sums back to lp

    def model(**kw):
        labels = kw["labels"][:, 1:]
        assert ((labels != -100) == completion[:, 1:].bool()).all()
        z = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token * (labels != -100), entropy=z, mean_logits=z,
                               is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=BETA, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * k, L, dtype=torch.long), "attention_mask": torch.ones(2 * k, L, dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    m = trainer._metrics["train"]
    assert math.isclose(m["rewards/chosen"][0], float((BETA * (pc - rc)).mean()), abs_tol=1e-9)
    assert math.isclose(m["rewards/rejected"][0], float((BETA * (pr - rr)).mean()), abs_tol=1e-9)
    return float(loss)


def _ours(method, pc, pr, rc, rr, n_c, n_r, ls=0.0) -> float:
    return float(_loss(method, label_smoothing=ls)(pc, pr, rc, rr, n_c, n_r)[0].mean())  # loop.py takes .mean()


def test_dpo_equals_trl_sigmoid():
    x = _logps()
    assert math.isclose(_ours("dpo", *x), _trl_loss("sigmoid", *x), abs_tol=1e-6)


def test_ipo_equals_trl_ipo():
    x = _logps()
    assert math.isclose(_ours("ipo", *x), _trl_loss("ipo", *x), abs_tol=1e-6)


def test_cdpo_equals_trl_label_smoothed_sigmoid():
    # TRL 1.x dropped label smoothing from "sigmoid"; its (1−ε)/ε smoothed logsigmoid lives in "aot",
    # which sorts log-ratios across the batch, so it equals cDPO exactly when called one pair at a time.
    pc, pr, rc, rr, n_c, n_r = _logps()
    for eps in (0.1, 0.3):
        for i in range(B):
            one = [t[i:i + 1] for t in (pc, pr, rc, rr, n_c, n_r)]
            assert math.isclose(_ours("cdpo", *one, ls=eps), _trl_loss("aot", *one, label_smoothing=eps), abs_tol=1e-6)


def test_sft_equals_trl_sft_per_pair():
    # TRL averages over all chosen tokens of the batch, we average per pair then over pairs: equal per pair.
    pc, pr, rc, rr, n_c, n_r = _logps()
    for i in range(B):
        one = [t[i:i + 1] for t in (pc, pr, rc, rr, n_c, n_r)]
        assert math.isclose(_ours("sft", *one), _trl_loss("sft", *one), abs_tol=1e-6)
