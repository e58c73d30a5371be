"""Evaluation metrics as ``torchmetrics``: Mean@k and the unbiased Pass@k, overall and per difficulty bucket.

For a problem with n samples of which c are correct::

    Mean@n  = c / n                                   (accuracy averaged over samples; estimates Pass@1)
    Pass@k  = 1 - C(n - c, k) / C(n, k)               (unbiased estimator, Chen et al. 2021), k <= n
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k for one problem with ``n`` samples, ``c`` of them correct."""
    if k > n:
        raise ValueError(f"pass@k: k={k} exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


class MeanPassAtK(Metric):
    """Accumulates per-problem correctness ``[P, n]`` and reports ``mean@n`` and ``pass@k`` for each ``k`` in
    ``ks``, overall and for each bucket in ``buckets`` (states are sums, reduced across ranks)."""

    full_state_update = False

    def __init__(self, n: int, ks: Sequence[int] = (1,), buckets: Sequence[str] = ()):
        super().__init__()
        self.n, self.ks, self.buckets = n, list(ks), list(buckets)
        size = len(self.buckets) + 1  # index 0 = all problems
        self.add_state("mean_sum", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pass_sum", torch.zeros(len(self.ks), size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def bucket_index(self, bucket: str | None) -> int:
        return self.buckets.index(bucket) + 1 if bucket in self.buckets else 0

    def update(self, correct: Tensor, bucket_index: Tensor) -> None:
        """``correct``: ``[P, n]`` booleans; ``bucket_index``: ``[P]`` (0 = no bucket)."""
        correct = correct.to(torch.float64)
        c = correct.sum(-1)
        mean = c / self.n
        passes = torch.tensor([[pass_at_k(self.n, int(ci), k) for ci in c.tolist()] for k in self.ks],
                              dtype=torch.float64, device=self.mean_sum.device)
        self._add(torch.zeros_like(bucket_index), mean, passes)
        has_bucket = bucket_index > 0
        if has_bucket.any():
            self._add(bucket_index[has_bucket], mean[has_bucket], passes[:, has_bucket])

    def _add(self, idx: Tensor, mean: Tensor, passes: Tensor) -> None:
        self.mean_sum.index_add_(0, idx, mean)
        self.count.index_add_(0, idx, torch.ones_like(mean))
        for j in range(len(self.ks)):
            self.pass_sum[j].index_add_(0, idx, passes[j])

    def compute(self) -> dict[str, Tensor]:
        out = {}
        names = ["all"] + self.buckets
        for b, name in enumerate(names):
            if self.count[b] == 0:
                continue
            out[f"{name}/mean@{self.n}"] = (self.mean_sum[b] / self.count[b]).float()
            for j, k in enumerate(self.ks):
                out[f"{name}/pass@{k}"] = (self.pass_sum[j, b] / self.count[b]).float()
        return out
