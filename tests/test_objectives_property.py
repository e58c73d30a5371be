"""Property tests: every objective gives a finite loss and finite gradients on hostile inputs (-inf / NaN teacher
log-probs, empty responses, extreme ratios, all-equal reward groups, masked teacher vocabulary entries)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rlad_pl.core.advantages import group_advantages
from rlad_pl.core.batch import RolloutBatch
from rlad_pl.objectives import (
    GKDJSD,
    GRPO,
    KDRL,
    OPSD,
    SFT,
    TRRD,
    Denominators,
    ForwardKL,
    KLMix,
    OPDFullVocab,
    OPDSampled,
    ReNIO,
    ReverseKL,
    SkewKL,
    StudentOutputs,
    TokenKL,
)

V, H = 17, 4


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-wait overhead (10-30x faster on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLED = {
    "grpo": lambda: GRPO(),
    "grpo_tis_refkl": lambda: GRPO(tis_cap=2.0, ref_kl_coef=0.1),
    "trrd": lambda: TRRD(),
    "trrd_straight_alpha0": lambda: TRRD(alpha=0.0, teacher_clamp_grad="straight"),
    "trrd_no_clamp": lambda: TRRD(teacher_clamp=None),
    "trrd_alpha1": lambda: TRRD(alpha=1.0),
    "kdrl_k2_masked": lambda: KDRL(kd_coef=0.01, kd_mask_correct=True),
    "kdrl_k3": lambda: KDRL(kd_estimator="k3"),
    "kdrl_k1_threshold": lambda: KDRL(kd_estimator="k1", kd_mask_correct=True, kd_correct_threshold=0.5),
    "opd": lambda: OPDSampled(),
    "opd_old_capped": lambda: OPDSampled(importance_ratio="old", ratio_cap=2.0),
    "opd_sampler": lambda: OPDSampled(importance_ratio="sampler"),
    "sft": lambda: SFT(min_reward=0.5),
    "renio_opd": lambda: ReNIO(OPDSampled(), tau=0.8, c=3.0),
    "renio_grpo_none": lambda: ReNIO(GRPO(), weight_norm="none"),
    "renio_kdrl_clamp": lambda: ReNIO(KDRL(), weight_norm="clamp", tau=0.0, c=1.0),
}
FULL_VOCAB = {
    "forward": lambda: ForwardKL(chunk_size=3),
    "reverse": lambda: ReverseKL(chunk_size=5),
    "opd_full": lambda: OPDFullVocab(chunk_size=64),
    "mix": lambda: KLMix(0.25, chunk_size=2),
    "jsd": lambda: GKDJSD(0.5, chunk_size=4),
    "jsd0": lambda: GKDJSD(0.0),
    "skew_f": lambda: SkewKL(0.1, chunk_size=3),
    "skew_r": lambda: SkewKL(0.1, "reverse", chunk_size=3),
    "clipped_nolower": lambda: TokenKL("clipped_forward", clip_lower=None, clip_kappa=None),
    "opsd": lambda: OPSD(chunk_size=3),
    "renio_opsd": lambda: ReNIO(OPSD(chunk_size=4)),
    "renio_reverse": lambda: ReNIO(ReverseKL(log_stats=False), weight_norm="none", weight_cap=None),
}


@st.composite
def cases(draw):
    g = draw(st.integers(1, 4))  # group size
    groups = draw(st.integers(1, 2))
    n, r = g * groups, draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, r), min_size=n, max_size=n))
    return {
        "seed": draw(st.integers(0, 2 ** 16)), "n": n, "r": r, "g": g, "lengths": lengths,
        "reward_levels": draw(st.sampled_from([1, 2, 3])),  # 1: every group has all-equal rewards
        "logit_scale": draw(st.sampled_from([0.1, 1.0, 30.0, 300.0])),
        "ratio_shift": draw(st.sampled_from([0.0, 0.5, 25.0, -60.0])),  # old log-probs far from the student's
        "bad_teacher": draw(st.sampled_from(["none", "-inf", "nan", "both"])),
        "bad_sampler": draw(st.booleans()),
        "masked_vocab": draw(st.booleans()),
    }


def build(case, full_vocab: bool):
    gen = torch.Generator().manual_seed(case["seed"])
    n, r = case["n"], case["r"]
    mask = (torch.arange(r)[None] < torch.tensor(case["lengths"])[:, None]).float()
    head = nn.Linear(H, V)
    t_head = nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen))
        t_head.weight.copy_(torch.randn(V, H, generator=gen))
        if case["masked_vocab"]:
            t_head.bias[: V // 2] = float("-inf")  # teacher assigns probability 0 to half the vocabulary
    hidden = (torch.randn(n, r, H, generator=gen) * case["logit_scale"]).requires_grad_(True)
    t_hidden = torch.randn(n, r, H, generator=gen) * case["logit_scale"]
    targets = torch.randint(0, V, (n, r), generator=gen)
    logp = torch.log_softmax(head(hidden), -1).gather(-1, targets[..., None]).squeeze(-1)
    with torch.no_grad():
        teacher = torch.log_softmax(t_head(t_hidden), -1).gather(-1, targets[..., None]).squeeze(-1)
        bad = torch.rand(n, r, generator=gen) < 0.3
        if case["bad_teacher"] in ("-inf", "both"):
            teacher = torch.where(bad, torch.full_like(teacher, float("-inf")), teacher)
        if case["bad_teacher"] in ("nan", "both"):
            teacher = torch.where(torch.rand(n, r, generator=gen) < 0.2, torch.full_like(teacher, float("nan")),
                                  teacher)
        old = logp.detach() + case["ratio_shift"] * torch.randn(n, r, generator=gen)
        sampler = old + torch.randn(n, r, generator=gen)
        if case["bad_sampler"]:
            sampler[0] = float("-inf")
        rewards = torch.randint(0, case["reward_levels"], (n,), generator=gen).float()
    batch = RolloutBatch(input_ids=torch.zeros(n, 2 + r, dtype=torch.long),
                         attention_mask=torch.ones(n, 2 + r, dtype=torch.long), prompt_len=2, response_mask=mask,
                         rewards=rewards, advantages=group_advantages(rewards, case["g"]), group_ids=torch.zeros(n),
                         old_logprobs=old, ref_logprobs=teacher.clone(), teacher_logprobs=teacher,
                         sampler_logprobs=sampler)
    out = StudentOutputs(logprobs=logp, vocab_size=V, temperature=1.1)
    if full_vocab:
        out.hidden, out.lm_head, out.teacher_hidden, out.teacher_lm_head = hidden, head, t_hidden, t_head
    return batch, out, hidden, head


def check_finite(factory, case, full_vocab, agg):
    batch, out, hidden, head = build(case, full_vocab)
    obj = factory()
    obj.loss_agg = obj.loss_agg or agg
    res = obj.compute(batch, out, Denominators.of(batch.response_mask))
    assert res.loss.dim() == 0 and torch.isfinite(res.loss), res.loss
    res.loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()
    for k, v in res.metrics.items():
        assert torch.isfinite(v).all(), k
    if case["reward_levels"] == 1 and hasattr(obj, "eps_low") and not isinstance(obj, KDRL):
        # all-equal reward groups: zero advantages -> GRPO-family gradient exactly zero (no ref-KL / KD term)
        if getattr(obj, "ref_kl_coef", 0) == 0:
            assert torch.equal(hidden.grad, torch.zeros_like(hidden.grad))


@pytest.mark.parametrize("name", sorted(SAMPLED))
@given(case=cases(), agg=st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]))
@SETTINGS
def test_sampled_token_objectives_finite(name, case, agg):
    check_finite(SAMPLED[name], case, False, agg)


@pytest.mark.parametrize("name", sorted(FULL_VOCAB))
@given(case=cases())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_full_vocabulary_objectives_finite(name, case):
    check_finite(FULL_VOCAB[name], case, True, "token_mean")
