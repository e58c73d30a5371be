"""TRRD / RLAD: every acceptance check of rlad-trrd.md section 11 that concerns the TRRD ratio (1-7, 11)."""

from __future__ import annotations

import math

import pytest
import torch

from rlad_pl.core.advantages import group_advantages
from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives import GRPO, RLAD, TRRD, Denominators, StudentOutputs
from rlad_pl.objectives.base import TEACHER_LOGPROBS
from rlad_pl.objectives.trrd import trrd_log_ratio


def make_batch(mask, advantages, **fields) -> RolloutBatch:
    mask = torch.as_tensor(mask, dtype=torch.float32)
    n, r = mask.shape
    return RolloutBatch(input_ids=torch.zeros(n, 2 + r, dtype=torch.long),
                        attention_mask=torch.ones(n, 2 + r, dtype=torch.long), prompt_len=2, response_mask=mask,
                        rewards=torch.zeros(n), advantages=torch.as_tensor(advantages, dtype=torch.float32),
                        group_ids=torch.arange(n), **fields)


def run(obj, batch, logp, agg="seq_mean_token_mean"):
    logp = logp.detach().clone().requires_grad_(True)
    obj.loss_agg = agg
    res = obj.compute(batch, StudentOutputs(logprobs=logp), Denominators.of(batch.response_mask))
    res.loss.backward()
    return res, logp.grad


def random_case(seed=0, n=4, r=6):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(r)[None] < torch.tensor([6, 3, 5, 1])[:, None]).float()
    old = -torch.rand(n, r, generator=g) * 4
    logp = old + 0.5 * torch.randn(n, r, generator=g)
    teacher = -torch.rand(n, r, generator=g) * 8
    adv = torch.randn(n, generator=g)
    return mask, old, logp, teacher, adv


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_check1_alpha_one_is_exactly_grpo(agg):
    mask, old, logp, teacher, adv = random_case()
    batch = make_batch(mask, adv, old_logprobs=old, teacher_logprobs=teacher)
    r_trrd, g_trrd = run(TRRD(alpha=1.0), batch, logp, agg)
    r_grpo, g_grpo = run(GRPO(), batch, logp, agg)
    assert torch.equal(r_trrd.loss, r_grpo.loss)
    assert torch.equal(g_trrd, g_grpo)
    # the teacher is not required and not read
    obj = TRRD(alpha=1.0)
    assert TEACHER_LOGPROBS not in obj.requires and not obj.needs_teacher
    assert TEACHER_LOGPROBS in TRRD().requires and TRRD().needs_teacher
    batch.teacher_logprobs = None
    r_none, g_none = run(obj, batch, logp, agg)
    assert torch.equal(r_none.loss, r_grpo.loss) and torch.equal(g_none, g_grpo)


def test_check2_equal_policies_ratio_one_and_grpo_loss():
    mask, old, _, _, adv = random_case(1)
    batch = make_batch(mask, adv, old_logprobs=old, teacher_logprobs=old.clone())
    res, grad = run(TRRD(alpha=0.5), batch, old)
    ref, ref_grad = run(GRPO(), batch, old)
    log_r, _ = trrd_log_ratio(old, old, old, 0.5)
    assert torch.equal(torch.exp(log_r), torch.ones_like(log_r))
    assert res.metrics["ratio_mean"].item() == 1.0
    assert res.loss.item() == pytest.approx(ref.loss.item(), abs=1e-7)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_check3_log_ratio_is_mixture_anchor(alpha):
    _, old, logp, teacher, _ = random_case(2)
    teacher = logp + 0.9 * torch.tanh(teacher)  # |l_S - l_T| < 1: the clamp does not bind
    log_r, bound = trrd_log_ratio(logp, old, teacher, alpha, clamp=1.0)
    assert not bound.any()
    torch.testing.assert_close(log_r, logp - (alpha * old + (1 - alpha) * teacher), atol=1e-6, rtol=0)


def test_check4_first_step_numbers():
    """pi_S = pi_old = 0.5, pi_T = 0.2, alpha 0.5: r = sqrt(2.5) = 1.5811."""
    l_s, l_t = math.log(0.5), math.log(0.2)
    logp = torch.tensor([[l_s], [l_s]])
    batch = make_batch([[1], [1]], [1.0, -1.0], old_logprobs=logp.clone(), teacher_logprobs=torch.tensor([[l_t]] * 2))
    log_r, _ = trrd_log_ratio(logp, logp, batch.teacher_logprobs, 0.5)
    assert math.exp(log_r[0, 0].item()) == pytest.approx(1.5811, abs=1e-4)
    assert math.exp(log_r[0, 0].item()) == pytest.approx(math.sqrt(2.5), abs=1e-6)
    # per-sample view: token_mean over 1 token per sample, loss = -surr / 2 -> surr = -2 * per-sample share
    for i, (surr, dsurr) in enumerate([(1.28, 0.0), (-1.5811, -1.5811)]):
        res, grad = run(TRRD(alpha=0.5, eps_low=0.2, eps_high=0.28), batch.select(slice(i, i + 1)), logp[i:i + 1])
        assert -res.loss.item() == pytest.approx(surr, abs=1e-4)
        assert -grad.item() == pytest.approx(dsurr, abs=1e-4)  # d surr / d l_S
    assert res.metrics["clip_frac_low"].item() == 0.0


def test_check5_teacher_clamp_options():
    """pi_S = pi_old = 0.9, pi_T = 0.01: d_T clamped to 1, r = e^0.5; d log r / d l_S = 0.5 (A) or 1 (B)."""
    l_t = torch.tensor([[math.log(0.01)]])
    for grad_mode, expected in (("through", 0.5), ("straight", 1.0)):
        logp = torch.tensor([[math.log(0.9)]], requires_grad=True)
        log_r, bound = trrd_log_ratio(logp, logp.detach(), l_t, 0.5, clamp=1.0, grad=grad_mode)
        assert bound.all()
        assert math.exp(log_r.item()) == pytest.approx(math.exp(0.5), abs=1e-6)
        assert math.exp(log_r.item()) == pytest.approx(1.6487, abs=1e-4)
        log_r.sum().backward()
        assert logp.grad.item() == pytest.approx(expected, abs=1e-7)
    batch = make_batch([[1]], [-1.0], old_logprobs=torch.tensor([[math.log(0.9)]]), teacher_logprobs=l_t)
    res, _ = run(TRRD(), batch, torch.tensor([[math.log(0.9)]]))
    assert res.metrics["teacher_clamp_frac"].item() == 1.0
    assert res.metrics["teacher_log_ratio_mean"].item() == pytest.approx(math.log(90), abs=1e-5)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_check6_unclipped_gradient_is_adv_times_ratio_and_sign(seed):
    mask, old, logp, teacher, adv = random_case(seed)
    batch = make_batch(torch.ones_like(mask), adv, old_logprobs=old, teacher_logprobs=teacher)
    obj = TRRD(alpha=0.5, teacher_clamp=None)
    log_r, _ = obj.log_ratio(batch, logp)
    r = torch.exp(log_r)
    res, grad = run(obj, batch, logp, "token_mean")
    n_tok = mask.numel()
    dsurr = -grad * n_tok  # d surr_t / d l_S per token
    a = adv[:, None].expand_as(r)
    unclipped = ~(((r < 0.8) & (a < 0)) | ((r > 1.28) & (a > 0)))
    assert unclipped.any()
    torch.testing.assert_close(dsurr[unclipped], (a * r)[unclipped], atol=1e-5, rtol=1e-5)
    assert torch.equal(dsurr[~unclipped], torch.zeros_like(dsurr[~unclipped]))
    # finite differences of the summed surrogate at one unclipped token
    i, j = unclipped.nonzero()[0].tolist()
    eps = 1e-3
    def total(lp):
        with torch.no_grad():
            obj.loss_agg = "token_mean"
            return -obj.compute(batch, StudentOutputs(logprobs=lp), Denominators.of(batch.response_mask)).loss * n_tok
    up, down = logp.clone(), logp.clone()
    up[i, j] += eps
    down[i, j] -= eps
    fd = (total(up) - total(down)) / (2 * eps)
    assert fd.item() == pytest.approx((a * r)[i, j].item(), rel=1e-2)
    # the update direction of every token is sign(A) (or zero)
    assert ((torch.sign(dsurr) == torch.sign(a)) | (dsurr == 0)).all()


def test_check7_equal_reward_group_zero_gradient():
    adv = group_advantages(torch.tensor([2.0, 2.0, 2.0, 2.0]), 4)
    _, old, logp, teacher, _ = random_case(6)
    teacher[0, 0] = float("-inf")
    teacher[1, 1] = float("nan")
    batch = make_batch(torch.ones(4, 6), adv, old_logprobs=old, teacher_logprobs=teacher)
    res, grad = run(TRRD(), batch, logp)
    assert res.loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(v).all() for v in res.metrics.values())


def test_check11_teacher_and_old_receive_no_gradient():
    mask, old, logp, teacher, adv = random_case(7)
    old = old.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    batch = make_batch(mask, adv, old_logprobs=old, teacher_logprobs=teacher)
    for mode in ("through", "straight"):
        run(TRRD(teacher_clamp_grad=mode), batch, logp)
        assert old.grad is None and teacher.grad is None


def test_rlad_alias_and_config_errors():
    assert RLAD is TRRD
    for kwargs, field in (({"alpha": 1.5}, "trrd.alpha"), ({"teacher_clamp": 0.0}, "trrd.teacher_clamp"),
                          ({"teacher_clamp_grad": "stop"}, "trrd.teacher_clamp_grad")):
        with pytest.raises(ConfigError) as e:
            TRRD(**kwargs)
        assert e.value.field == field
    assert str(ConfigError("trrd.alpha", "x")) == "trrd.alpha: x"
