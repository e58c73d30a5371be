"""GRPO: the PPO-clipped surrogate with group-normalized advantages (spec: rlad-trrd.md section 2).

    rho_t   = exp(l_S - l_old)
    surr_t  = min( rho_t A_i , clip(rho_t, 1 - eps_low, 1 + eps_high) A_i )
    loss    = - agg(surr) + beta_ref * agg(KL_k(l_S, l_ref))

``A_i`` is the same for every token of response i (computed by the data module, see ``rlad_pl.advantages``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from rlad_pl.batch import RolloutBatch
from rlad_pl.objectives.base import (ADVANTAGES, OLD_LOGPROBS, REF_LOGPROBS, Denominators, LossOutput, Objective,
                                     StudentOutputs, masked_mean)

KLEstimator = Literal["k1", "k2", "k3"]
#: log-ratios are clamped to +-LOG_RATIO_LIMIT before exp so that extreme ratios stay finite (exp(20) ~ 4.9e8)
LOG_RATIO_LIMIT = 20.0


def ppo_clipped_surrogate(log_ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``min(r A, clip(r, 1-eps_low, 1+eps_high) A)`` with ``r = exp(log_ratio)``.

    Returns ``(surrogate, ratio, clipped_low, clipped_high)``; the clip masks mark tokens whose gradient the clip
    removes (``r < 1-eps_low`` with ``A < 0``, ``r > 1+eps_high`` with ``A > 0``).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == log_ratio.dim() - 1 else advantages
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    surr = torch.minimum(unclipped, clipped)
    clipped_low = (ratio < 1.0 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1.0 + eps_high) & (adv > 0)
    return surr, ratio, clipped_low, clipped_high


def kl_estimate(logp: Tensor, logp_ref: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    k1 = l - l_ref;  k2 = (l - l_ref)^2 / 2;  k3 = exp(l_ref - l) - 1 - (l_ref - l).
    """
    d = (logp - logp_ref).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"kl estimator: unknown '{estimator}' (expected k1, k2 or k3)")


def old_logprobs_of(batch: RolloutBatch, logp: Tensor) -> Tensor:
    """pi_old: the stored snapshot, or (one update per rollout batch) the detached current log-probs."""
    return batch.old_logprobs if batch.old_logprobs is not None else logp.detach()


def clip_metrics(ratio: Tensor, clipped_low: Tensor, clipped_high: Tensor, mask: Tensor) -> dict[str, Tensor]:
    return {"clip_frac_low": masked_mean(clipped_low.float(), mask),
            "clip_frac_high": masked_mean(clipped_high.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": (ratio.detach() * mask).max() if mask.any() else ratio.new_zeros(())}


class GRPO(Objective):
    """Group Relative Policy Optimization with clip-higher (``eps_high``) and an optional reference-KL term.

    Args:
        eps_low: lower clip range (ratio floor ``1 - eps_low``).
        eps_high: upper clip range (ratio ceiling ``1 + eps_high``; DAPO "clip higher").
        ref_kl_coef: beta of the ``KL(pi_S || pi_ref)`` penalty; 0 skips the reference model entirely.
        ref_kl_estimator: ``k1``, ``k2`` or ``k3`` (``low_var_kl``).
    """

    requires = frozenset({ADVANTAGES, OLD_LOGPROBS})
    needs_groups = True

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.28, ref_kl_coef: float = 0.0,
                 ref_kl_estimator: KLEstimator = "k3", weight: float = 1.0, name: Optional[str] = None,
                 loss_agg: Optional[str] = None):
        super().__init__(weight=weight, name=name, loss_agg=loss_agg)
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"{self.name}.eps_low/eps_high: clip ranges must be >= 0, got {eps_low}, {eps_high}")
        self.eps_low, self.eps_high = eps_low, eps_high
        self.ref_kl_coef, self.ref_kl_estimator = ref_kl_coef, ref_kl_estimator
        if ref_kl_coef > 0:
            self.requires = self.requires | {REF_LOGPROBS}

    def log_ratio(self, batch: RolloutBatch, logp: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """log of the importance ratio; GRPO: ``l_S - l_old``. TRRD overrides this."""
        return logp - old_logprobs_of(batch, logp), {}

    def compute(self, batch: RolloutBatch, out: StudentOutputs, denom: Denominators) -> LossOutput:
        mask = batch.response_mask
        log_ratio, metrics = self.log_ratio(batch, out.logprobs)
        surr, ratio, c_low, c_high = ppo_clipped_surrogate(log_ratio, batch.advantages, self.eps_low, self.eps_high)
        loss = -self.aggregate(surr, mask, denom)
        metrics.update(clip_metrics(ratio, c_low, c_high, mask))
        if self.ref_kl_coef > 0:
            kl = kl_estimate(out.logprobs, batch.ref_logprobs, self.ref_kl_estimator)
            loss = loss + self.ref_kl_coef * self.aggregate(kl, mask, denom)
            metrics["ref_kl"] = masked_mean(kl, mask)
        return LossOutput(loss, metrics)
