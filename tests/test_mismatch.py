"""Train / inference mismatch statistics and truncated importance-sampling weights, against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlad_pl.rollout import logprob_mismatch, tis_weights

# two sequences, three response slots; row 0 has 3 tokens, row 1 has 2 (last slot is padding)
TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -3.0 - math.log(4.0), 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# d = train - sampler on the mask: [0.5, -1.0, 0.0], [0.0, ln 4]


def k3(d: float) -> float:
    return math.exp(d) - 1.0 - d


def test_mismatch_stats_by_hand():
    s = logprob_mismatch(TRAIN, SAMPLER, MASK)
    ln4 = math.log(4.0)
    assert s["mismatch/tokens"].item() == 5
    assert s["mismatch/logprob_abs_diff"].item() == pytest.approx((0.5 + 1.0 + 0.0 + 0.0 + ln4) / 5, abs=1e-6)
    assert s["mismatch/logprob_abs_diff_max"].item() == pytest.approx(ln4, abs=1e-6)  # padding (16.0) ignored
    expected_k3 = (k3(0.5) + k3(-1.0) + 0.0 + 0.0 + (4.0 - 1.0 - ln4)) / 5
    assert s["mismatch/kl_k3"].item() == pytest.approx(expected_k3, abs=1e-6)


def test_mismatch_identical_is_zero_and_k3_nonnegative():
    s = logprob_mismatch(TRAIN, TRAIN.clone(), MASK)
    assert all(v.item() == 0 for k, v in s.items() if k != "mismatch/tokens")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    assert logprob_mismatch(a, b, torch.ones(4, 7))["mismatch/kl_k3"].item() >= 0


def test_mismatch_empty_mask_and_bool_mask():
    s = logprob_mismatch(TRAIN, SAMPLER, torch.zeros_like(MASK))
    assert all(v.item() == 0 for v in s.values())
    s_bool = logprob_mismatch(TRAIN, SAMPLER, MASK.bool())
    assert s_bool["mismatch/tokens"].item() == 5


def test_tis_token_weights_by_hand():
    w, clip = tis_weights(TRAIN, SAMPLER, MASK, cap=2.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, 2.0, 0.0]])  # exp(ln 4)=4 -> cap 2
    torch.testing.assert_close(w, expected)
    assert clip.item() == pytest.approx(1 / 5)  # only the ratio-4 token is clipped; padding (exp(-16)) ignored
    w3, clip3 = tis_weights(TRAIN, SAMPLER, MASK, cap=5.0)
    assert w3[1, 1].item() == pytest.approx(4.0) and clip3.item() == 0.0


def test_tis_sequence_level_by_hand():
    w, clip = tis_weights(TRAIN, SAMPLER, MASK, cap=3.0, level="sequence")
    r0 = math.exp(0.5 - 1.0 + 0.0)  # 0.6065, not clipped
    r1 = 4.0  # exp(0 + ln 4), clipped to 3
    expected = torch.tensor([[r0, r0, r0], [min(r1, 3.0), min(r1, 3.0), 0.0]])
    torch.testing.assert_close(w, expected)
    assert clip.item() == pytest.approx(0.5)


def test_tis_is_detached_and_finite():
    train = torch.tensor([[0.0, -100.0]], requires_grad=True)
    sampler = torch.tensor([[-100.0, 0.0]])
    w, clip = tis_weights(train, sampler, torch.ones(1, 2), cap=2.0)
    assert not w.requires_grad
    assert torch.isfinite(w).all() and w[0, 0].item() == 2.0 and w[0, 1].item() == pytest.approx(math.exp(-20))
    assert clip.item() == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="cap"):
        tis_weights(TRAIN, SAMPLER, MASK, cap=0.0)
    with pytest.raises(ValueError, match="level"):
        tis_weights(TRAIN, SAMPLER, MASK, level="batch")
    with pytest.raises(ValueError, match="shape"):
        logprob_mismatch(TRAIN, SAMPLER[:, :2], MASK)
