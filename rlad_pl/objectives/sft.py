"""SFT: token cross-entropy on teacher traces, with optional rejection sampling (docs/methods/sft.md;
the hard-label form of cell A in docs/methods/opd.md).

    v_t  = - g_i * l_S(y_t)          g_i = 1[r_i >= min_reward]  (1 when min_reward is null)
    loss = agg(v)

With ``prefix_source: teacher`` (default) the data module samples the responses from the teacher and scores them
with the task verifier, so ``batch.rewards`` holds the teacher traces' rewards and ``min_reward`` keeps only correct
traces ("reject-sampled teacher outputs"). Rejected responses get weight 0 but still count in the step's loss
denominators, so the loss scale shrinks with the rejection rate. ``prefix_source: student`` trains on the student's
own accepted samples (rejection-sampling fine-tuning); ``prefix_source: dataset`` trains on the task's reference
solutions (adds ``dataset_prefixes``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.base import StudentOutputs, TokenObjective, masked_mean
from rlad_pl.objectives.off_policy import OffPolicySetting


def rejection_weights(rewards: Tensor, min_reward: Optional[float]) -> Tensor:
    """``g_i = 1[r_i >= min_reward]`` as float ``[N]`` (all ones when ``min_reward`` is None)."""
    if min_reward is None:
        return torch.ones(rewards.shape, dtype=torch.float32, device=rewards.device)
    return (rewards >= min_reward).float()


class SFT(TokenObjective):
    """Negative log-likelihood of the response tokens: ``v_t = -g_i l_S(y_t)``, ``g_i = 1[r_i >= min_reward]``.

    Args:
        prefix_source: ``teacher`` (default; offline distillation on teacher traces, sets ``responses: teacher`` and
            needs ``model.teacher``), ``dataset`` (reference solutions)
            or ``student``.
        min_reward: keep only responses with ``reward >= min_reward`` (null: keep all).

    Metrics: ``nll`` (token-mean NLL over kept responses), ``kept_frac`` (share of responses kept).
    """

    def __init__(self, prefix_source: Literal["teacher", "dataset", "student"] = "teacher",
                 min_reward: Optional[float] = None, weight: float = 1.0, name: Optional[str] = None,
                 loss_agg: Optional[str] = None, off_policy: OffPolicySetting = "auto"):
        super().__init__(weight=weight, name=name, loss_agg=loss_agg, off_policy=off_policy)
        if prefix_source not in ("teacher", "dataset", "student"):
            raise ConfigError(f"{self.name}.prefix_source",
                              f"expected 'teacher', 'dataset' or 'student', got '{prefix_source}'")
        self.prefix_source, self.min_reward = prefix_source, min_reward
        self.needs_teacher = prefix_source == "teacher"
        self.responses = prefix_source

    def per_token(self, batch: RolloutBatch, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        keep = rejection_weights(batch.rewards, self.min_reward).to(out.logprobs.dtype)
        values = -out.logprobs * keep.unsqueeze(-1)
        kept_mask = batch.response_mask * keep.unsqueeze(-1)
        return values, {"nll": masked_mean(-out.logprobs, kept_mask),
                        "kept_frac": keep.mean().detach() if keep.numel() else keep.new_zeros(())}
