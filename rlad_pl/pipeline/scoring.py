"""Verifier scores of completions: one finite float each, or one line naming the sample."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.data.tasks import Problem

Reward = Callable[[str, Problem], float]


def score_completions(fn: Reward, field: str, completions: list[str], problems: list[Problem]) -> torch.Tensor:
    """``fn(completion, problem)`` for each pair as a float32 tensor. A reward function that raises or returns None /
    NaN / a non-number stops the run with one line naming ``field``, the sample index, its prompt and the value."""
    scores = []
    for i, (c, p) in enumerate(zip(completions, problems)):
        where = f"sample {i} (prompt {p.prompt[:60]!r}, completion {c[:40]!r})"
        try:
            value = fn(c, p)
        except Exception as e:  # noqa: BLE001  (any failure of user code: name the sample)
            raise ConfigError(field, f"{type(fn).__name__} raised {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]} on {where}") from e
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = None
        if score is None or not math.isfinite(score):
            raise ConfigError(field, f"expected a finite float, got {value!r} on {where}")
        scores.append(score)
    return torch.tensor(scores, dtype=torch.float32)
