"""GRPO: hand-computed loss and gradient, clipping, aggregation modes, micro-batch invariance, advantages, TIS."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_batch
from rlad_pl.core.advantages import group_advantages
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives import GRPO, Denominators, StudentOutputs, aggregate
from rlad_pl.objectives.base import SAMPLER_LOGPROBS, per_sample_token_mean


def run(obj, batch, logp, denom=None):
    logp = logp.detach().clone().requires_grad_(True)
    obj.loss_agg = obj.loss_agg or "token_mean"
    res = obj.compute(batch, StudentOutputs(logprobs=logp), denom or Denominators.of(batch.response_mask))
    res.loss.backward()
    return res, logp.grad


# sequence 0: A = +1, log-ratios (0, 0.5, -0.5); sequence 1: A = -1, log-ratios (0.1, -0.5, 0), last token padding
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]])
DELTA = torch.tensor([[0.0, 0.5, -0.5], [0.1, -0.5, 0.0]])
MASK = [[1, 1, 1], [1, 1, 0]]


def hand_surrogate():
    e = math.exp
    # per token min(r A, clip(r, 0.8, 1.28) A) and d surr / d l_S
    surr = [[1.0, 1.28, e(-0.5)], [-e(0.1), -0.8, -1.0]]
    dsurr = [[1.0, 0.0, e(-0.5)], [-e(0.1), 0.0, -1.0]]
    return torch.tensor(surr), torch.tensor(dsurr)


def test_grpo_loss_and_gradient_by_hand_token_mean():
    batch = make_batch(MASK, advantages=[1.0, -1.0], old_logprobs=OLD)
    res, grad = run(GRPO(loss_agg="token_mean"), batch, OLD + DELTA)
    surr, dsurr = hand_surrogate()
    m = torch.tensor(MASK, dtype=torch.float32)
    assert res.loss.item() == pytest.approx(-(surr * m).sum().item() / 5, abs=1e-6)
    torch.testing.assert_close(grad, -dsurr * m / 5, atol=1e-6, rtol=0)
    # one token clipped on each side out of 5 valid tokens
    assert res.metrics["clip_frac_high"].item() == pytest.approx(0.2)
    assert res.metrics["clip_frac_low"].item() == pytest.approx(0.2)


def test_grpo_loss_and_gradient_by_hand_seq_mean_token_mean():
    batch = make_batch(MASK, advantages=[1.0, -1.0], old_logprobs=OLD)
    res, grad = run(GRPO(loss_agg="seq_mean_token_mean"), batch, OLD + DELTA)
    surr, dsurr = hand_surrogate()
    m = torch.tensor(MASK, dtype=torch.float32)
    expected = -((surr[0].sum() / 3) + (surr[1, :2].sum() / 2)) / 2
    assert res.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(grad, -dsurr * m / torch.tensor([[6.0], [4.0]]), atol=1e-6, rtol=0)


def test_grpo_clipping_both_sides_and_no_clip_inside():
    # A > 0: ratio above 1 + eps_high is clipped (no gradient); A < 0: ratio below 1 - eps_low is clipped
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.1], [0.5], [0.9]]))
    batch = make_batch([[1]] * 4, advantages=[1.0, 1.0, -1.0, -1.0], old_logprobs=old)
    res, grad = run(GRPO(eps_low=0.2, eps_high=0.28), batch, logp)
    torch.testing.assert_close(grad.squeeze(-1), torch.tensor([0.0, -1.1, 0.0, 0.9]) / 4)
    assert res.loss.item() == pytest.approx(-(1.28 + 1.1 - 0.8 - 0.9) / 4, abs=1e-6)
    # A > 0 with a small ratio and A < 0 with a large ratio are NOT clipped (pessimistic bound)
    batch = make_batch([[1]] * 2, advantages=[1.0, -1.0], old_logprobs=torch.zeros(2, 1))
    res, grad = run(GRPO(), batch, torch.log(torch.tensor([[0.5], [1.5]])))
    torch.testing.assert_close(grad.squeeze(-1), torch.tensor([-0.5, 1.5]) / 2)
    assert res.metrics["clip_frac_low"].item() == 0 and res.metrics["clip_frac_high"].item() == 0


def test_aggregation_modes_spec_check_9():
    """rlad-trrd check 9: per-token values (1) and (0, 0, 0): seq_mean_token_mean 0.5, token_mean 0.25."""
    values = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    d = Denominators.of(mask)
    assert aggregate(values, mask, "seq_mean_token_mean", d).item() == pytest.approx(0.5)
    assert aggregate(values, mask, "token_mean", d).item() == pytest.approx(0.25)
    assert aggregate(values, mask, "seq_mean_token_sum_norm", d).item() == pytest.approx(1 / (2 * 3))
    assert aggregate(values, mask, "seq_mean_token_sum_norm", Denominators(4, 2, 10)).item() == pytest.approx(0.05)
    # equal lengths: seq_mean_token_mean == token_mean
    v = torch.randn(3, 4)
    full = torch.ones(3, 4)
    assert aggregate(v, full, "seq_mean_token_mean", Denominators.of(full)).item() == pytest.approx(
        aggregate(v, full, "token_mean", Denominators.of(full)).item(), abs=1e-6)
    torch.testing.assert_close(per_sample_token_mean(values, mask), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(v, full, "sum", Denominators.of(full))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_split_invariance(mode):
    g = torch.Generator().manual_seed(0)
    n, r = 6, 5
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = (torch.arange(r)[None] < lengths[:, None]).float()
    old = -torch.rand(n, r, generator=g) * 3
    logp = old + 0.4 * torch.randn(n, r, generator=g)
    ref = old + 0.1 * torch.randn(n, r, generator=g)
    adv = torch.randn(n, generator=g)
    batch = make_batch(mask, advantages=adv, old_logprobs=old, ref_logprobs=ref)
    denom = Denominators(float(mask.sum()), float(n), float(r))
    obj = GRPO(ref_kl_coef=0.1, loss_agg=mode)
    full, full_grad = run(obj, batch, logp, denom)
    for k in (2, 3, 6):
        size = n // k
        total, grads = 0.0, []
        for i in range(0, n, size):
            res, gr = run(obj, batch.select(slice(i, i + size)), logp[i:i + size], denom)
            total += res.loss.item()
            grads.append(gr)
        assert total == pytest.approx(full.loss.item(), abs=1e-6)
        torch.testing.assert_close(torch.cat(grads), full_grad, atol=1e-7, rtol=1e-5)


def test_all_equal_reward_group_zero_advantage_and_zero_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4)
    assert torch.equal(adv[:4], torch.zeros(4))
    assert adv[4:].abs().sum() > 0
    batch = make_batch(torch.ones(4, 3), advantages=adv[:4], old_logprobs=torch.full((4, 3), -1.0))
    res, grad = run(GRPO(), batch, torch.full((4, 3), -1.0) + torch.randn(4, 3))
    assert torch.equal(grad, torch.zeros_like(grad))
    assert res.loss.item() == 0.0 and torch.isfinite(res.loss)


def test_advantage_population_std_spec_check_8():
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2)
    a = 0.5 / (0.5 + 1e-6)  # population std 0.5 (the sample std 0.7071 would give 0.7071)
    torch.testing.assert_close(adv, torch.tensor([a, -a]), atol=1e-7, rtol=0)


def test_reference_kl_term():
    old = torch.full((2, 2), -1.0)
    ref = torch.tensor([[-1.5, -0.5], [-1.0, -2.0]])
    batch = make_batch(torch.ones(2, 2), advantages=[0.0, 0.0], old_logprobs=old, ref_logprobs=ref)
    res, grad = run(GRPO(ref_kl_coef=0.5, ref_kl_estimator="k3"), batch, old)
    d = old - ref
    k3 = torch.exp(-d) - 1 + d
    assert res.loss.item() == pytest.approx(0.5 * k3.mean().item(), abs=1e-6)
    torch.testing.assert_close(grad, 0.5 * (1 - torch.exp(-d)) / 4)
    assert res.metrics["ref_kl"].item() == pytest.approx(k3.mean().item(), abs=1e-6)


def test_truncated_importance_sampling():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.5, -0.5, float("-inf")]])  # weights e^0.5, e^-0.5, huge -> capped
    batch = make_batch([[1, 1, 1]], advantages=[1.0], old_logprobs=old, sampler_logprobs=sampler)
    obj = GRPO(tis_cap=1.5)
    assert SAMPLER_LOGPROBS in obj.requires and SAMPLER_LOGPROBS not in GRPO().requires
    res, grad = run(obj, batch, old)
    w = torch.tensor([1.5, math.exp(-0.5), 1.5])  # e^0.5 = 1.6487 > 1.5
    assert res.loss.item() == pytest.approx(-w.mean().item(), abs=1e-6)
    torch.testing.assert_close(grad, -w[None] / 3)
    assert res.metrics["tis_clip_frac"].item() == pytest.approx(2 / 3)
    assert res.metrics["tis_active"].item() == 1.0
    # no engine log-probs: weight 1, identical to plain GRPO, tis_active 0
    batch.sampler_logprobs = None
    res2, grad2 = run(obj, batch, old)
    res3, grad3 = run(GRPO(), batch, old)
    assert torch.equal(res2.loss, res3.loss) and torch.equal(grad2, grad3)
    assert res2.metrics["tis_active"].item() == 0.0


@pytest.mark.parametrize("kwargs,field", [({"eps_low": -0.1}, "grpo.eps_low"), ({"eps_high": -1}, "grpo.eps_high"),
                                          ({"tis_cap": 0.0}, "grpo.tis_cap"),
                                          ({"ref_kl_estimator": "k4"}, "grpo.ref_kl_estimator")])
def test_grpo_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as e:
        GRPO(**kwargs)
    assert e.value.field == field and "\n" not in str(e.value)
