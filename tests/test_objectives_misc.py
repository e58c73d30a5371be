"""KDRL (rlad-trrd check 10), SFT, sampled-token OPD, OPSD wiring, exports and YAML instantiation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_batch
from rlad_pl.core import divergences as D
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives import (
    GRPO,
    KDRL,
    OPSD,
    SFT,
    TRRD,
    Denominators,
    Objective,
    OPDSampled,
    ReNIO,
    StudentOutputs,
    TokenKL,
)
from rlad_pl.objectives.base import (
    DATASET_PREFIXES,
    OLD_LOGPROBS,
    PRIVILEGED_PROMPT,
    SAMPLER_LOGPROBS,
    TEACHER_LOGPROBS,
    TEACHER_PREFIXES,
)

V = 9


def run(obj, batch, logp, agg="token_mean"):
    logp = logp.detach().clone().requires_grad_(True)
    obj.loss_agg = obj.loss_agg or agg
    res = obj.compute(batch, StudentOutputs(logprobs=logp), Denominators.of(batch.response_mask))
    res.loss.backward()
    return res, logp.grad


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, V, generator=g) * 2).requires_grad_(True), torch.randn(1, V, generator=g) * 2


# ------------------------------------------------------------------------------------------------ KDRL
def test_kdrl_zero_coef_is_grpo_and_drops_teacher():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g) * 3
    logp = old + 0.3 * torch.randn(4, 5, generator=g)
    batch = make_batch(torch.ones(4, 5), advantages=torch.randn(4, generator=g), old_logprobs=old,
                       teacher_logprobs=-torch.rand(4, 5, generator=g) * 5)
    a, ga = run(KDRL(kd_coef=0.0), batch, logp)
    b, gb = run(GRPO(), batch, logp)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
    assert TEACHER_LOGPROBS not in KDRL(kd_coef=0.0).requires and TEACHER_LOGPROBS in KDRL().requires


@pytest.mark.parametrize("estimator,target", [("k2", "reverse"), ("k1", "zero"), ("k3", "forward")])
def test_kdrl_estimator_gradient_exact_expectation(estimator, target):
    """Check 10: averaged exactly over y ~ pi_S at one state, k2 gives the full-vocab reverse-KL gradient, k1 gives 0
    (and k3 the forward-KL gradient)."""
    z, z_t = state(1)
    lq, lp = z.log_softmax(-1)[0], z_t.log_softmax(-1)[0]
    q = lq.exp().detach()
    obj = KDRL(kd_coef=0.5, kd_estimator=estimator)
    batch = make_batch(torch.ones(V, 1), advantages=torch.zeros(V), teacher_logprobs=lp[:, None])
    values, metrics = obj.per_token(batch, StudentOutputs(logprobs=lq[:, None]))
    (q[:, None] * values).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    if target == "zero":
        expected = torch.zeros_like(z)
    else:
        (D.reverse_kl if target == "reverse" else D.forward_kl)(z_ref, z_t).sum().backward()
        expected = 0.5 * z_ref.grad
    torch.testing.assert_close(z.grad, expected, atol=1e-6, rtol=0)
    assert "kd_estimate" in metrics and "reverse_kl_sampled" in metrics


def test_kdrl_value_and_masking():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    teacher = torch.tensor([[-2.0, -2.0], [-1.5, float("-inf")]])
    batch = make_batch(torch.ones(2, 2), advantages=[0.0, 0.0], rewards=[1.0, 0.0], old_logprobs=logp,
                       teacher_logprobs=teacher)
    res, _ = run(KDRL(kd_coef=0.1), batch, logp)
    d = logp - torch.tensor([[-2.0, -2.0], [-1.5, -20.0]])  # -inf floored at -20
    assert res.loss.item() == pytest.approx(0.1 * (0.5 * d * d).mean().item(), abs=1e-6)
    assert res.metrics["reverse_kl_sampled"].item() == pytest.approx(d.mean().item(), abs=1e-6)
    res, grad = run(KDRL(kd_coef=0.1, kd_mask_correct=True, kd_correct_threshold=1.0), batch, logp)
    assert res.loss.item() == pytest.approx(0.1 * (0.5 * d[1] ** 2).sum().item() / 4, abs=1e-6)
    assert torch.equal(grad[0], torch.zeros(2)) and res.metrics["kd_masked_frac"].item() == 0.5
    # without a threshold "correct" means advantage > 0
    batch.advantages = torch.tensor([-1.0, 1.0])
    batch.old_logprobs = None
    res, _ = run(KDRL(kd_coef=0.1, kd_mask_correct=True, eps_low=0.0, eps_high=0.0), batch, logp)
    assert res.metrics["kd_masked_frac"].item() == 0.5


# ------------------------------------------------------------------------------------------------ SFT
def test_sft_nll_and_rejection_sampling():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = make_batch(mask, rewards=[1.0, 0.0])
    res, grad = run(SFT(), batch, logp)
    assert res.loss.item() == pytest.approx(7.0 / 5)
    torch.testing.assert_close(grad, -mask / 5)
    res, grad = run(SFT(min_reward=1.0), batch, logp)
    assert res.loss.item() == pytest.approx(6.0 / 5)  # rejected tokens still count in the denominator
    assert torch.equal(grad[1], torch.zeros(3))
    assert res.metrics["kept_frac"].item() == 0.5 and res.metrics["nll"].item() == pytest.approx(2.0)
    sft = SFT()
    assert sft.requires == {TEACHER_PREFIXES} and sft.needs_teacher and not sft.needs_groups
    assert SFT(prefix_source="student").requires == frozenset() and not SFT(prefix_source="student").needs_teacher
    assert SFT(prefix_source="dataset").requires == {DATASET_PREFIXES}
    with pytest.raises(ConfigError) as e:
        SFT(prefix_source="web")
    assert e.value.field == "sft.prefix_source"


# ------------------------------------------------------------------------------------------------ OPD sampled
def test_opd_sampled_gradient_is_reinforce_with_reward_teacher_minus_student():
    logp = torch.tensor([[-1.0, -0.2, -3.0]])
    teacher = torch.tensor([[-0.5, -2.0, float("nan")]])
    batch = make_batch([[1, 1, 1]], teacher_logprobs=teacher)
    obj = OPDSampled()
    assert obj.requires == {TEACHER_LOGPROBS} and obj.needs_teacher and not obj.needs_groups
    res, grad = run(obj, batch, logp)
    d = logp - torch.tensor([[-0.5, -2.0, -20.0]])
    torch.testing.assert_close(grad, d / 3)
    assert res.metrics["reverse_kl_sampled"].item() == pytest.approx(d.mean().item(), abs=1e-6)


def test_opd_sampled_importance_ratio():
    logp = torch.tensor([[-1.0, -0.2]])
    old = torch.tensor([[-1.5, -0.2]])
    teacher = torch.tensor([[-0.5, -2.0]])
    d = logp - teacher
    ratio = torch.exp(logp - old)
    batch = make_batch([[1, 1]], teacher_logprobs=teacher, old_logprobs=old)
    obj = OPDSampled(importance_ratio="old")
    assert OLD_LOGPROBS in obj.requires
    res, grad = run(obj, batch, logp)
    torch.testing.assert_close(grad, ratio * d / 2)
    assert res.metrics["ratio_mean"].item() == pytest.approx(ratio.mean().item(), abs=1e-6)
    res, grad = run(OPDSampled(importance_ratio="old", ratio_cap=1.2), batch, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, d[0, 1].item() / 2]]))  # e^0.5 > 1.2: capped, no gradient
    obj = OPDSampled(importance_ratio="sampler")
    assert SAMPLER_LOGPROBS in obj.requires
    batch.sampler_logprobs = old
    _, grad_s = run(obj, batch, logp)
    torch.testing.assert_close(grad_s, ratio * d / 2)
    with pytest.raises(ConfigError):
        OPDSampled(importance_ratio="teacher")


# ------------------------------------------------------------------------------------------------ wiring
def test_opsd_requirements_and_defaults():
    o = OPSD()
    assert PRIVILEGED_PROMPT in o.requires and o.divergence == "clipped_forward" and o.clip_kappa == 0.05
    assert o.clip_lower == 0.0 and o.prefix_source == "student"
    assert TEACHER_PREFIXES not in o.requires


def test_yaml_class_paths_instantiate_nested_objectives():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--objectives", type=list[Objective])
    objectives = [
        {"class_path": "rlad_pl.objectives.TRRD", "init_args": {"alpha": 0.5, "teacher_clamp_grad": "straight"}},
        {"class_path": "rlad_pl.objectives.RLAD"},
        {"class_path": "rlad_pl.objectives.KDRL", "init_args": {"kd_coef": 0.002, "kd_estimator": "k3"}},
        {"class_path": "rlad_pl.objectives.ReNIO",
         "init_args": {"tau": 0.8, "c": 3.0, "inner": {"class_path": "rlad_pl.objectives.OPSD",
                                                       "init_args": {"clip_kappa": 0.06}}}},
        {"class_path": "rlad_pl.objectives.KLMix", "init_args": {"kl_mix_lambda": 0.25}},
        {"class_path": "rlad_pl.objectives.ForwardKL", "init_args": {"prefix_source": "teacher"}},
        {"class_path": "rlad_pl.objectives.SFT", "init_args": {"min_reward": 1.0}},
        {"class_path": "rlad_pl.objectives.GRPO", "init_args": {"tis_cap": 2.0}},
    ]
    cfg = parser.parse_args(["--objectives", json.dumps(objectives)])
    objs = parser.instantiate(cfg).objectives
    assert [type(o).__name__ for o in objs] == ["TRRD", "TRRD", "KDRL", "ReNIO", "KLMix", "ForwardKL", "SFT", "GRPO"]
    assert objs[0].teacher_clamp_grad == "straight" and objs[2].kd_estimator == "k3"
    assert isinstance(objs[3].inner, OPSD) and objs[3].inner.clip_kappa == 0.06 and objs[3].c == 3.0
    assert objs[4].kl_mix_lambda == 0.25 and TEACHER_PREFIXES in objs[5].requires and objs[7].tis_cap == 2.0
    assert isinstance(objs[4], TokenKL) and isinstance(objs[3], ReNIO) and isinstance(objs[1], TRRD)
    assert not math.isnan(objs[6].min_reward)


def test_kdrl_coefficient_schedule_is_linear_then_constant():
    from rlad_pl.core.errors import ConfigError
    from rlad_pl.objectives import KDRL

    obj = KDRL(kd_coef=5e-3, kd_coef_end=1e-3, kd_anneal_steps=4)
    assert [round(obj.coef_at(s), 6) for s in (0, 2, 4, 10)] == [5e-3, 3e-3, 1e-3, 1e-3]
    assert KDRL(kd_coef=2e-3).coef_at(100) == 2e-3
    with pytest.raises(ConfigError, match=r"^kdrl\.kd_coef_end"):
        KDRL(kd_coef_end=1e-3)
