"""Mean@k and the unbiased Pass@k estimator, overall and per difficulty bucket."""

from __future__ import annotations

from math import comb

import pytest
import torch

from rlad_pl.core.metrics import MeanPassAtK, pass_at_k


def test_pass_at_k_closed_form():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - comb(3, 2) / comb(4, 2))  # 0.5
    assert pass_at_k(8, 3, 4) == pytest.approx(1 - comb(5, 4) / comb(8, 4))
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_mean_pass_at_k_buckets():
    m = MeanPassAtK(n=4, ks=[1, 4], buckets=["easy", "hard"])
    correct = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    idx = torch.tensor([m.bucket_index("easy"), m.bucket_index("hard"), m.bucket_index("hard")])
    m.update(correct, idx)
    out = m.compute()
    assert out["all/mean@4"].item() == pytest.approx((1 + 0.25 + 0) / 3)
    assert out["all/pass@4"].item() == pytest.approx(2 / 3)
    assert out["all/pass@1"].item() == pytest.approx(out["all/mean@4"].item())  # pass@1 == mean@n
    assert out["easy/mean@4"].item() == 1.0
    assert out["hard/mean@4"].item() == pytest.approx(0.125)
    assert out["hard/pass@4"].item() == pytest.approx(0.5)
    m.reset()
    assert m.compute() == {}
