"""On-policy distillation (OPD): the student samples, the teacher scores (docs/methods/opd.md).

Sampled-token form ("vanilla OPD", Thinking Machines / ReNIO ``use_tinker_loss``), per response token ``y_t``:

    v_t = w_t * sg(l_S - l_T) * l_S,     grad v_t = w_t (l_S - l_T) grad l_S
        = REINFORCE with dense reward l_T - l_S (Prop. 1(ii)); its expectation over y_t ~ q is grad RKL_t
    w_t = 1 (on-policy) or the importance ratio exp(l_S - l_b) w.r.t. the behaviour policy b (old or sampler),
          optionally capped at ``ratio_cap`` (where the cap binds the token has no gradient)

Only the teacher's log-prob of the sampled token is needed; no advantages, no groups. ``OPDFullVocab`` is the exact
full-vocabulary reverse KL at student prefixes (cell D of the decoupled grid; ``ReverseKL``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.base import (
    OLD_LOGPROBS,
    SAMPLER_LOGPROBS,
    TEACHER_LOGPROBS,
    StudentOutputs,
    TokenObjective,
    masked_mean,
    sanitize_logprobs,
)
from rlad_pl.objectives.grpo import LOG_RATIO_LIMIT, old_logprobs_of
from rlad_pl.objectives.kl import ReverseKL
from rlad_pl.objectives.off_policy import OffPolicySetting

ImportanceRatio = Literal["none", "old", "sampler"]


def opd_sampled_per_token(logp: Tensor, teacher_logp: Tensor, log_ratio: Optional[Tensor] = None,
                          ratio_cap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """``v = w * sg(l_S - l_T) * l_S`` with ``w = exp(log_ratio)`` (1 if None), capped at ``ratio_cap``.

    Returns ``(v, w)``. ``l_S - l_T`` is clamped to +-20 (teacher log-probs must already be finite).
    """
    d = (logp.detach() - teacher_logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if log_ratio is None:
        return d * logp, torch.ones_like(d)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    if ratio_cap is not None:
        ratio = ratio.clamp_max(ratio_cap)
    return ratio * d, ratio


class OPDSampled(TokenObjective):
    """Sampled-token OPD: ``v_t = w_t sg(l_S - l_T) l_S`` (gradient: REINFORCE with reward ``l_T - l_S``).

    With ``importance_ratio`` ``old`` / ``sampler`` the token loss is ``min(exp(l_S - l_b), ratio_cap) sg(l_S - l_T)``
    whose gradient is ``ratio (l_S - l_T) grad l_S`` (unbiased for stale rollouts from ``b``).

    Args:
        importance_ratio: ``none`` (on-policy, default), ``old`` (pi_old snapshot) or ``sampler`` (inference engine's
            log-probs; adds ``sampler_logprobs`` to ``inputs``).
        ratio_cap: upper cap on the importance ratio (null: none).

    Metrics: ``reverse_kl_sampled`` (mean ``l_S - l_T``, k1 estimate of KL(q || p)), ``teacher_logprob_mean``,
    ``ratio_mean`` (with an importance ratio).
    """

    inputs = frozenset({TEACHER_LOGPROBS})
    needs_teacher = True
    #: asynchronous runs: a truncated importance weight from the behaviour policy to the student (docs/async.md)
    declared_off_policy = "tis"

    def resolve_off_policy(self, asynchronous: bool):
        if self.importance_ratio != "none" and self.off_policy_setting is not None:
            raise ConfigError(f"{self.name}.off_policy", "importance_ratio already weights the samples; set either "
                              "importance_ratio or off_policy")
        return super().resolve_off_policy(asynchronous and self.importance_ratio == "none")

    def __init__(self, importance_ratio: ImportanceRatio = "none", ratio_cap: Optional[float] = None,
                 weight: float = 1.0, name: Optional[str] = None, loss_agg: Optional[str] = None,
                 off_policy: OffPolicySetting = "auto"):
        super().__init__(weight=weight, name=name, loss_agg=loss_agg, off_policy=off_policy)
        if importance_ratio not in ("none", "old", "sampler"):
            raise ConfigError(f"{self.name}.importance_ratio",
                              f"expected 'none', 'old' or 'sampler', got '{importance_ratio}'")
        if ratio_cap is not None and not ratio_cap > 0:
            raise ConfigError(f"{self.name}.ratio_cap", f"expected a positive cap or null, got {ratio_cap}")
        self.importance_ratio, self.ratio_cap = importance_ratio, ratio_cap
        if importance_ratio == "old":
            self.inputs = self.inputs | {OLD_LOGPROBS}
        elif importance_ratio == "sampler":
            self.inputs = self.inputs | {SAMPLER_LOGPROBS}

    def behaviour_log_ratio(self, batch: RolloutBatch, logp: Tensor) -> Optional[Tensor]:
        """``l_S - l_b`` for the configured behaviour policy (None: on-policy)."""
        if self.importance_ratio == "none":
            return None
        if self.importance_ratio == "old":
            return logp - old_logprobs_of(batch, logp)
        if batch.sampler_logprobs is None:  # engine without log-probs: it sampled from pi_old
            return logp - old_logprobs_of(batch, logp)
        return logp - sanitize_logprobs(batch.sampler_logprobs)

    def per_token(self, batch: RolloutBatch, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.teacher_logprobs is None:
            raise ValueError(f"{self.name}: batch.teacher_logprobs is missing (input teacher_logprobs)")
        mask, logp = batch.response_mask, out.logprobs
        teacher = sanitize_logprobs(batch.teacher_logprobs)
        values, ratio = opd_sampled_per_token(logp, teacher, self.behaviour_log_ratio(batch, logp), self.ratio_cap)
        metrics = {"reverse_kl_sampled": masked_mean(logp.detach() - teacher, mask),
                   "teacher_logprob_mean": masked_mean(teacher, mask)}
        if self.importance_ratio != "none":
            metrics["ratio_mean"] = masked_mean(ratio, mask)
        return values, metrics


class OPDFullVocab(ReverseKL):
    """Full-vocabulary OPD: ``v_t = KL(q_t || p_t) = sum_v q (log q - log p)`` at student prefixes (cell D).

    Its gradient is the exact expectation over ``y_t ~ q`` of the sampled form's. Args as ``ReverseKL`` without
    ``prefix_source`` (always the student).
    """

    def __init__(self, chunk_size: int = 256, log_stats: bool = True, weight: float = 1.0,
                 name: Optional[str] = None, loss_agg: Optional[str] = None,
                 off_policy: OffPolicySetting = "auto"):
        super().__init__(prefix_source="student", chunk_size=chunk_size, log_stats=log_stats, weight=weight,
                         name=name, loss_agg=loss_agg, off_policy=off_policy)
