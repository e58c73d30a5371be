"""Group-normalized advantages (GRPO; docs/methods/grpo.md).

    mu = mean_i r_i,  sigma = sqrt(mean_i (r_i - mu)^2)       (population std over the G responses of one prompt)
    A_i = (r_i - mu) / (sigma + eps)     if scale_std else     A_i = r_i - mu        (Dr. GRPO)

A group whose rewards are all equal gets A = 0 for every member.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Advantages ``[N]`` for rewards ``[N]`` laid out as consecutive groups of ``group_size``."""
    if rewards.numel() % group_size:
        raise ValueError(f"group_size: {rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    if scale_std:
        centred = centred / (r.std(-1, unbiased=False, keepdim=True) + eps)
    # exact zeros for all-equal groups (the subtraction can leave -0.0 / rounding noise)
    centred = torch.where((r == r[:, :1]).all(-1, keepdim=True), torch.zeros_like(centred), centred)
    return centred.view(-1)


def zero_variance_fraction(rewards: Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal (they carry no GRPO signal)."""
    r = rewards.view(-1, group_size)
    return float((r == r[:, :1]).all(-1).float().mean()) if r.numel() else 0.0
