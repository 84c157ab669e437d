"""Tests of lmforge.prefs.losses against hand-written float64 formulas, autograd's gradcheck, and TRL.

The TRL comparisons call TRL 1.16's own loss code: ``DPOTrainer._compute_loss`` and
``KTOTrainer._compute_loss`` compute the loss from the model's per-token log-probs, so they are
called on an instance built without ``__init__`` (``object.__new__``), with the few attributes they
read set by hand and a stand-in model that returns fixed per-token log-probs. Both sides start from
the same leaf tensor of per-token log-probs, so losses and gradients are compared end to end
through our ``sequence_logps`` as well.
"""

from __future__ import annotations

import collections
import math
import types

import numpy as np
import pytest
import torch

from lmforge.prefs.losses import (
    M_DPO_VARIANTS,
    kto_kl_estimate,
    m_dpo_loss,
    m_kto_loss,
    sequence_logps,
    single_turn_mask,
)

F64 = torch.float64


def _log_sigmoid(x: float) -> float:
    # log(1 / (1 + e^-x)), written stably without torch.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return math.exp(_log_sigmoid(x))


def _pairs(batch: int = 5, seed: int = 0):
    """Four (B,) float64 log-prob tensors of plausible magnitude (sums over tens of tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [-(20 + 30 * torch.rand(batch, generator=g, dtype=F64)) for _ in range(4)]


# --------------------------------------------------------------------------------------------
# Masks and summed log-probs
# --------------------------------------------------------------------------------------------


def test_sequence_logps_matches_numpy_and_ignores_padding_values():
    rng = np.random.default_rng(1)
    logps = -rng.random((3, 7))
    mask = rng.random((3, 7)) < 0.6
    mask[2] = False  # a row with no counted token
    padded = logps.copy()
    padded[~mask] = -np.inf  # what a padded position may hold; must not leak into the sum
    got_sum = sequence_logps(torch.tensor(padded), torch.tensor(mask))
    got_mean = sequence_logps(torch.tensor(padded), torch.tensor(mask).long(), normalize=True)
    want_sum = np.array([logps[i][mask[i]].sum() for i in range(3)])
    want_mean = np.array([logps[i][mask[i]].mean() if mask[i].any() else 0.0 for i in range(3)])
    np.testing.assert_allclose(got_sum.numpy(), want_sum, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_mean.numpy(), want_mean, rtol=0, atol=1e-12)


def test_single_turn_mask_known_answer():
    # prompt prompt | policy policy | tool tool | policy | pad
    policy = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 0],
                           [0, 1, 0, 1, 0, 0, 0, 0],
                           [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0],
                              [1, 1, 1, 1, 1, 1, 0, 0],
                              [1, 1, 1, 1, 1, 1, 1, 1]])
    want_no_attention = [[0, 0, 1, 1, 1, 1, 1, 1],
                         [0, 1, 1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0, 0, 0]]
    want = [[0, 0, 1, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0]]
    assert single_turn_mask(policy).tolist() == [[bool(v) for v in row] for row in want_no_attention]
    assert single_turn_mask(policy.long(), attention).tolist() == [[bool(v) for v in row] for row in want]


def test_multi_turn_mask_ignores_tool_tokens_single_turn_does_not():
    g = torch.Generator().manual_seed(3)
    policy = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]] * 4, dtype=torch.bool)
    tool = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0]] * 4, dtype=torch.bool)
    per_token = [-torch.rand(4, 8, generator=g, dtype=F64) for _ in range(4)]
    # The policy's log-probs of the chosen trajectory's tool tokens move; nothing else does.
    changed = [per_token[0] + 5.0 * tool] + per_token[1:]

    def loss(tokens, mask):
        return m_dpo_loss(*(sequence_logps(t, mask) for t in tokens), beta=0.3).loss.item()

    multi = policy
    single = single_turn_mask(policy)
    assert loss(per_token, multi) == loss(changed, multi)
    assert abs(loss(per_token, single) - loss(changed, single)) > 1e-3


# --------------------------------------------------------------------------------------------
# M-DPO against hand-written float64 formulas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", M_DPO_VARIANTS)
@pytest.mark.parametrize("normalize", [False, True])
def test_m_dpo_matches_hand_formula(variant, normalize):
    pc, pr, rc, rr = _pairs()
    nc = torch.tensor([30, 41, 25, 50, 33])
    nr = torch.tensor([28, 60, 19, 45, 40])
    beta = 0.2
    out = m_dpo_loss(pc, pr, rc, rr, beta=beta, variant=variant, normalize=normalize,
                     chosen_token_counts=nc, rejected_token_counts=nr)

    want = []
    for i in range(5):
        w = pc[i].item() - rc[i].item()
        l_ = pr[i].item() - rr[i].item()
        if normalize:
            w, l_ = w / nc[i].item(), l_ / nr[i].item()
        h = w - l_
        if variant == "sigmoid":
            want.append(-_log_sigmoid(beta * h))
        elif variant == "ipo":
            want.append((h - 1 / (2 * beta)) ** 2)
        else:
            want.append(max(0.0, 1 - beta * h))
    assert out.loss.dtype == F64
    np.testing.assert_allclose(out.pair_losses.numpy(), want, rtol=1e-12, atol=1e-14)
    assert out.loss.item() == pytest.approx(sum(want) / 5, rel=1e-12, abs=1e-14)


def test_m_dpo_label_smoothing_and_nll_hand_formula():
    pc, pr, rc, rr = _pairs(seed=4)
    counts = torch.tensor([10, 20, 30, 40, 50])
    beta, eps, coef = 0.5, 0.2, 0.7
    out = m_dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, nll_coef=coef,
                     chosen_token_counts=counts)
    pref = []
    for i in range(5):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        pref.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
    nll = -sum(pc.tolist()) / sum(counts.tolist())
    assert out.nll_loss.item() == pytest.approx(nll, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(pref) / 5 + coef * nll, rel=1e-12)


def test_m_dpo_statistics_hand_computed():
    # The last pair is a tie, which TRL (strict >) does not count as accurate.
    pc = torch.tensor([-10.0, -12.0, -9.0, -7.0], dtype=F64)
    pr = torch.tensor([-11.0, -10.0, -9.5, -8.0], dtype=F64)
    rc = torch.tensor([-10.5, -11.0, -9.0, -7.0], dtype=F64)
    rr = torch.tensor([-10.0, -10.0, -10.0, -8.0], dtype=F64)
    out = m_dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, -0.1, 0.0, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.0, 0.05, 0.0])
    assert out.reward_margins.tolist() == pytest.approx([0.15, -0.1, -0.05, 0.0])
    assert out.reward_accuracies.tolist() == [1.0, 0.0, 0.0, 0.0]
    m = out.metrics()
    assert m["rewards/accuracies"] == pytest.approx(1 / 4)
    assert m["logps/chosen"] == pytest.approx(-38 / 4)
    assert m["logps/rejected"] == pytest.approx(-38.5 / 4)
    assert m["nll_loss"] == 0.0
    assert not out.chosen_rewards.requires_grad


def test_m_dpo_low_precision_inputs_compute_in_float32():
    pc, pr, rc, rr = (t.to(torch.bfloat16).requires_grad_() for t in _pairs(seed=5))
    out = m_dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert pc.grad.dtype == torch.bfloat16
    want = m_dpo_loss(*(t.detach().double() for t in (pc, pr, rc, rr)), beta=0.1).loss.item()
    assert out.loss.item() == pytest.approx(want, rel=1e-6)

    # The token sum itself accumulates in float32: 2000 bf16 values of -0.01 (-0.010009765625 in
    # bf16) sum to -20.02; a bf16 running sum would stall far from that.
    tokens = torch.full((1, 2000), -0.01, dtype=torch.bfloat16)
    total = sequence_logps(tokens, torch.ones(1, 2000, dtype=torch.bool))
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(2000 * tokens[0, 0].item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# M-KTO against hand-written float64 formulas
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_shift", [0.8, -2.0])  # positive KL estimate, and one clamped to 0
def test_m_kto_matches_hand_formula(kl_shift):
    g = torch.Generator().manual_seed(7)
    policy = -(20 + 10 * torch.rand(6, generator=g, dtype=F64))
    ref = policy + torch.randn(6, generator=g, dtype=F64)
    desirable = torch.tensor([True, False, True, True, False, False])
    kl_ref = -(20 + 10 * torch.rand(4, generator=g, dtype=F64))
    kl_policy = kl_ref + kl_shift + 0.3 * torch.randn(4, generator=g, dtype=F64)
    beta, lam_d, lam_u = 0.3, 1.0, 1.5
    out = m_kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta=beta,
                     desirable_weight=lam_d, undesirable_weight=lam_u)

    z0 = max(0.0, sum(a - b for a, b in zip(kl_policy.tolist(), kl_ref.tolist())) / 4)
    want = []
    for p, r, d in zip(policy.tolist(), ref.tolist(), desirable.tolist()):
        ratio = p - r
        want.append(lam_d * (1 - _sigmoid(beta * (ratio - z0))) if d
                    else lam_u * (1 - _sigmoid(beta * (z0 - ratio))))
    assert out.kl.item() == pytest.approx(z0, abs=1e-14)
    if kl_shift < 0:
        assert out.kl.item() == 0.0
    np.testing.assert_allclose(out.losses.numpy(), want, rtol=1e-12)
    assert out.loss.item() == pytest.approx(sum(want) / 6, rel=1e-12)
    rewards = [beta * (p - r) for p, r in zip(policy.tolist(), ref.tolist())]
    assert out.chosen_rewards.tolist() == pytest.approx([rewards[i] for i in (0, 2, 3)], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([rewards[i] for i in (1, 4, 5)], rel=1e-12)
    m = out.metrics()
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"])


def test_m_kto_reference_point_is_detached_and_single_class_metrics():
    policy = torch.tensor([-5.0, -6.0], dtype=F64, requires_grad=True)
    kl_policy = torch.tensor([-4.0, -7.0], dtype=F64, requires_grad=True)
    ref = torch.tensor([-5.5, -5.0], dtype=F64)
    out = m_kto_loss(policy, ref, torch.tensor([True, True]), kl_policy, kl_policy.detach() - 1.0)
    out.loss.backward()
    assert kl_policy.grad is None  # z0 is a baseline, not trained
    assert policy.grad is not None and torch.all(policy.grad < 0)  # desirable: push log pi up
    assert set(out.metrics()) == {"kl", "rewards/chosen", "logps/chosen"}
    assert kto_kl_estimate(kl_policy, kl_policy.detach() - 1.0).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", M_DPO_VARIANTS)
def test_m_dpo_gradcheck(variant):
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in _pairs(batch=4, seed=11))
    nc = torch.tensor([30.0, 41.0, 25.0, 50.0], dtype=F64)
    nr = torch.tensor([28.0, 60.0, 19.0, 45.0], dtype=F64)
    smoothing = 0.1 if variant == "sigmoid" else 0.0
    # hinge has a kink at beta*h = 1; this beta keeps every pair away from it.
    beta = 0.05 if variant == "hinge" else 0.3

    def f(a, b, c, d):
        return m_dpo_loss(a, b, c, d, beta=beta, variant=variant, label_smoothing=smoothing,
                          nll_coef=0.3, normalize=True, chosen_token_counts=nc,
                          rejected_token_counts=nr).loss

    if variant == "hinge":
        out = m_dpo_loss(pc, pr, rc, rr, beta=beta, variant="hinge", normalize=True,
                         chosen_token_counts=nc, rejected_token_counts=nr)
        assert torch.all(out.pair_losses > 1e-3)  # every pair on the linear side of the kink
    assert torch.autograd.gradcheck(f, (pc, pr, rc, rr))


def test_m_kto_and_sequence_logps_gradcheck():
    g = torch.Generator().manual_seed(12)
    per_token = (-torch.rand(5, 9, generator=g, dtype=F64)).requires_grad_()
    mask = torch.rand(5, 9, generator=g) < 0.7
    ref = -(torch.rand(5, generator=g, dtype=F64) * 6).requires_grad_()
    desirable = torch.tensor([True, False, False, True, False])
    kl_policy, kl_ref = torch.tensor([-3.0, -2.0], dtype=F64), torch.tensor([-3.5, -2.2], dtype=F64)

    def f(tokens, r):
        return m_kto_loss(sequence_logps(tokens, mask), r, desirable, kl_policy, kl_ref, beta=0.7,
                          desirable_weight=1.3, undesirable_weight=0.8).loss

    assert torch.autograd.gradcheck(f, (per_token, ref))
    assert torch.autograd.gradcheck(lambda t: sequence_logps(t, mask, normalize=True), (per_token,))


# --------------------------------------------------------------------------------------------
# TRL 1.16: the trainers' own loss code on the same per-token log-probs
# --------------------------------------------------------------------------------------------


class _SingleProcessAccelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _trl_common_attributes() -> dict:
    return dict(
        model=types.SimpleNamespace(training=True),  # only `.training` is read (train/eval metrics)
        accelerator=_SingleProcessAccelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,  # reference log-probs come from the batch, no ref model needed
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )


def _fused_head_outputs(log_probs: torch.Tensor):
    """What TRL's fused LM head returns: per-token log-probs (0 at label -100) plus logging stats."""
    zeros = torch.zeros_like(log_probs.detach())
    return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                 is_top1=torch.zeros(log_probs.shape, dtype=torch.bool))


def _completion_masks(rows: int, length: int, generator) -> torch.Tensor:
    """(rows, length + 1) TRL completion mask: column 0 is prompt, then 1..length tokens, right pad."""
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    mask = torch.zeros(rows, length + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, 1:1 + n] = 1
    return mask


@pytest.fixture(scope="module")
def trl_trainers():
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

    return DPOTrainer, KTOTrainer


def _trl_dpo(DPOTrainer, per_token, completion_mask, ref_chosen, ref_rejected, *, beta, loss_types,
             loss_weights=None, label_smoothing=0.0):
    trainer = object.__new__(DPOTrainer)  # skip __init__ (models, datasets); set what _compute_loss reads
    for name, value in _trl_common_attributes().items():
        setattr(trainer, name, value)
    trainer.ld_alpha = None
    trainer.f_divergence_type = "reverse_kl"
    trainer.loss_types = loss_types
    trainer.loss_weights = loss_weights or [1.0] * len(loss_types)
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.use_weighting = False

    shift_mask = completion_mask[:, 1:].bool()
    masked = torch.where(shift_mask, per_token, torch.zeros((), dtype=per_token.dtype))
    inputs = dict(input_ids=torch.zeros_like(completion_mask), attention_mask=torch.ones_like(completion_mask),
                  completion_mask=completion_mask, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    loss = trainer._compute_loss(lambda **kwargs: _fused_head_outputs(masked), inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _dpo_case(batch=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    per_token = (-3 * torch.rand(2 * batch, length, generator=g, dtype=F64)).requires_grad_()
    completion_mask = _completion_masks(2 * batch, length, g)
    ref = (completion_mask[:, 1:] * -3 * torch.rand(2 * batch, length, generator=g, dtype=F64)).sum(-1)
    return per_token, completion_mask, ref[:batch], ref[batch:]


def _ours_dpo(per_token, completion_mask, ref_chosen, ref_rejected, **kwargs):
    batch = ref_chosen.shape[0]
    shift_mask = completion_mask[:, 1:].bool()
    logps = sequence_logps(per_token, shift_mask)
    counts = shift_mask.sum(-1)
    return m_dpo_loss(logps[:batch], logps[batch:], ref_chosen, ref_rejected,
                      chosen_token_counts=counts[:batch], rejected_token_counts=counts[batch:], **kwargs)


def _grad(loss, tensor):
    return torch.autograd.grad(loss, tensor)[0]


_TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


@pytest.mark.parametrize(("trl_loss", "ours"), [
    ("sigmoid", dict(variant="sigmoid")),
    ("hinge", dict(variant="hinge")),
    ("ipo", dict(variant="ipo", normalize=True)),  # TRL's IPO always averages over tokens
    ("sigmoid_norm", dict(variant="sigmoid", normalize=True)),
])
def test_m_dpo_matches_trl(trl_trainers, trl_loss, ours):
    DPOTrainer, _ = trl_trainers
    per_token, mask, ref_c, ref_r = _dpo_case(seed=21)
    beta = 0.4
    trl_loss_value, trl_metrics = _trl_dpo(DPOTrainer, per_token, mask, ref_c, ref_r, beta=beta,
                                           loss_types=[trl_loss])
    out = _ours_dpo(per_token, mask, ref_c, ref_r, beta=beta, **ours)
    assert out.loss.item() == pytest.approx(trl_loss_value.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(_grad(out.loss, per_token), _grad(trl_loss_value, per_token),
                               rtol=1e-10, atol=1e-14)
    ours_metrics = out.metrics()
    for name in _TRL_METRICS:
        assert ours_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-6, abs=1e-12), name


def test_m_dpo_nll_matches_trl_sft_term(trl_trainers):
    DPOTrainer, _ = trl_trainers
    per_token, mask, ref_c, ref_r = _dpo_case(seed=22)
    beta, coef = 0.1, 0.6
    trl_value, _ = _trl_dpo(DPOTrainer, per_token, mask, ref_c, ref_r, beta=beta,
                            loss_types=["sigmoid", "sft"], loss_weights=[1.0, coef])
    out = _ours_dpo(per_token, mask, ref_c, ref_r, beta=beta, nll_coef=coef)
    assert out.loss.item() == pytest.approx(trl_value.item(), rel=1e-12)
    torch.testing.assert_close(_grad(out.loss, per_token), _grad(trl_value, per_token), rtol=1e-10, atol=1e-14)


def test_m_dpo_label_smoothing_matches_trl_conservative_form(trl_trainers):
    """TRL 1.16 keeps cDPO's smoothed sigmoid only inside the "aot" loss, which sorts the batch's
    log-ratios first; on a batch of one pair the sort is the identity and "aot" is exactly cDPO, so
    TRL is called pair by pair and its losses averaged."""
    DPOTrainer, _ = trl_trainers
    per_token, mask, ref_c, ref_r = _dpo_case(batch=3, seed=23)
    beta, eps = 0.3, 0.15
    trl_losses = []
    for i in range(3):
        rows = [i, 3 + i]
        value, _ = _trl_dpo(DPOTrainer, per_token[rows], mask[rows], ref_c[i:i + 1], ref_r[i:i + 1],
                            beta=beta, loss_types=["aot"], label_smoothing=eps)
        trl_losses.append(value)
    trl_value = torch.stack(trl_losses).mean()
    out = _ours_dpo(per_token, mask, ref_c, ref_r, beta=beta, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(trl_value.item(), rel=1e-12)
    torch.testing.assert_close(_grad(out.loss, per_token), _grad(trl_value, per_token), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kl_shift", [0.5, -1.0])  # KL estimate used as is, and clamped to 0
def test_m_kto_matches_trl(trl_trainers, kl_shift):
    _, KTOTrainer = trl_trainers
    g = torch.Generator().manual_seed(31)
    batch, length = 6, 8
    per_token = (-3 * torch.rand(batch, length, generator=g, dtype=F64)).requires_grad_()
    mask = _completion_masks(batch, length, g)
    kl_mask = _completion_masks(batch, length + 2, g)
    kl_per_token = -3 * torch.rand(batch, length + 2, generator=g, dtype=F64)
    ref_logps = (mask[:, 1:] * -3 * torch.rand(batch, length, generator=g, dtype=F64)).sum(-1)
    kl_policy_logps = sequence_logps(kl_per_token, kl_mask[:, 1:])
    kl_ref_logps = kl_policy_logps - kl_shift + 0.2 * torch.randn(batch, generator=g, dtype=F64)
    labels = torch.tensor([True, False, False, True, False, True])
    beta, lam_d, lam_u = 0.25, 1.2, 0.9

    trainer = object.__new__(KTOTrainer)
    for name, value in _trl_common_attributes().items():
        setattr(trainer, name, value)
    trainer.calculate_KL = True
    trainer.loss_type = "kto"
    trainer.beta = beta
    trainer.desirable_weight = lam_d
    trainer.undesirable_weight = lam_u

    kl_input_ids = torch.zeros_like(kl_mask)
    main_log_probs = torch.where(mask[:, 1:].bool(), per_token, torch.zeros((), dtype=F64))
    kl_log_probs = torch.where(kl_mask[:, 1:].bool(), kl_per_token, torch.zeros((), dtype=F64))

    def model(**kwargs):  # the KL pass and the main pass are told apart by their input_ids
        return _fused_head_outputs(kl_log_probs if kwargs["input_ids"] is kl_input_ids else main_log_probs)

    inputs = dict(input_ids=torch.zeros_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask,
                  KL_input_ids=kl_input_ids, KL_attention_mask=torch.ones_like(kl_mask),
                  KL_completion_mask=kl_mask, label=labels, ref_logps=ref_logps, ref_KL_logps=kl_ref_logps)
    trl_value = trainer._compute_loss(model, inputs, False)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    out = m_kto_loss(sequence_logps(per_token, mask[:, 1:]), ref_logps, labels, kl_policy_logps, kl_ref_logps,
                     beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    assert out.loss.item() == pytest.approx(trl_value.item(), rel=1e-12)
    torch.testing.assert_close(_grad(out.loss, per_token), _grad(trl_value, per_token), rtol=1e-10, atol=1e-14)
    ours_metrics = out.metrics()
    if kl_shift < 0:
        assert ours_metrics["kl"] == 0.0
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-10, abs=1e-12), name


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _dpo_args(batch=3):
    return [torch.zeros(batch) for _ in range(4)]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(beta=float("inf")), ValueError, "beta"),
    (dict(beta="0.1"), TypeError, "beta"),
    (dict(variant="kto_pair"), ValueError, "variant"),
    (dict(label_smoothing=0.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(variant="ipo", label_smoothing=0.1), ValueError, "label_smoothing"),
    (dict(nll_coef=-1.0), ValueError, "nll_coef"),
    (dict(nll_coef=0.5), ValueError, "chosen_token_counts"),
    (dict(normalize=True, chosen_token_counts=torch.ones(3)), ValueError, "rejected_token_counts"),
    (dict(normalize=True, chosen_token_counts=torch.ones(4), rejected_token_counts=torch.ones(3)),
     ValueError, "chosen_token_counts"),
])
def test_m_dpo_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        m_dpo_loss(*_dpo_args(), **kwargs)


def test_m_dpo_rejects_bad_tensors():
    ok = _dpo_args()
    with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
        m_dpo_loss(*ok[:3], torch.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        m_dpo_loss(torch.zeros(3, 1), *ok[1:])
    with pytest.raises(ValueError, match="empty"):
        m_dpo_loss(*(torch.zeros(0) for _ in range(4)))
    with pytest.raises(TypeError, match="policy_rejected_logps must be a float tensor"):
        m_dpo_loss(ok[0], torch.zeros(3, dtype=torch.long), *ok[2:])
    with pytest.raises(TypeError, match="ref_chosen_logps must be a torch.Tensor"):
        m_dpo_loss(ok[0], ok[1], [0.0, 0.0, 0.0], ok[3])


def test_m_kto_and_helpers_reject_bad_inputs():
    z = torch.zeros(4)
    good = torch.tensor([True, False, True, False])
    with pytest.raises(TypeError, match="is_desirable must be a bool tensor"):
        m_kto_loss(z, z, good.long(), z, z)
    with pytest.raises(ValueError, match="is_desirable must have shape"):
        m_kto_loss(z, z, good[:3], z, z)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        m_kto_loss(z, torch.zeros(5), good, z, z)
    with pytest.raises(ValueError, match="kl_ref_logps has shape"):
        m_kto_loss(z, z, good, z, torch.zeros(3))
    with pytest.raises(ValueError, match="undesirable_weight"):
        m_kto_loss(z, z, good, z, z, undesirable_weight=0.0)
    with pytest.raises(ValueError, match="beta"):
        m_kto_loss(z, z, good, z, z, beta=-1.0)
    with pytest.raises(ValueError, match="mask must have the shape of per_token_logps"):
        sequence_logps(torch.zeros(2, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="per_token_logps must be a float tensor"):
        sequence_logps(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="policy_mask must have shape"):
        single_turn_mask(torch.ones(5, dtype=torch.bool))
