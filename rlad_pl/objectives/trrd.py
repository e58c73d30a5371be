"""TRRD / RLAD: GRPO whose trust region is centred on a mixture of the old policy and the teacher
(docs/methods/trrd.md; arXiv 2602.22495).

    d_T      = clamp(l_S - l_T, -c_T, c_T)                                         (teacher log-ratio clamp, App. B)
    log r    = alpha (l_S - l_old) + (1 - alpha) d_T        = l_S - [alpha l_old + (1 - alpha) l_T]  (clamp inactive)
    surr_t   = min( r A_i , clip(r, 1 - eps_low, 1 + eps_high) A_i )
    loss     = agg( - surr )        (+ the GRPO reference-KL / TIS options)

alpha weights the OLD POLICY: alpha = 1 is exactly GRPO (the teacher is then neither required nor read).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.base import TEACHER_LOGPROBS, masked_mean, sanitize_logprobs
from rlad_pl.objectives.grpo import GRPO, KLEstimator, old_logprobs_of
from rlad_pl.objectives.off_policy import OffPolicySetting

ClampGrad = Literal["through", "straight"]


def teacher_log_ratio(logp: Tensor, teacher_logp: Tensor, clamp: Optional[float], grad: ClampGrad = "through"
                      ) -> tuple[Tensor, Tensor]:
    """``d_T = clamp(l_S - l_T, -c, c)`` and the mask where the clamp binds.

    ``grad="through"`` (the literal reading): the clamp acts on the differentiable value, so where it binds
    ``d_T`` has no gradient. ``grad="straight"`` (straight-through):
    ``clamp(sg(l_S) - l_T, -c, c) + (l_S - sg(l_S))``, same value, gradient ``dl_S`` everywhere. ``clamp=None``
    disables the clamp.
    """
    d = logp - teacher_logp
    if clamp is None:
        return d, torch.zeros_like(d, dtype=torch.bool)
    bound = d.detach().abs() > clamp
    if grad == "through":
        return d.clamp(-clamp, clamp), bound
    return (logp.detach() - teacher_logp).clamp(-clamp, clamp) + (logp - logp.detach()), bound


def trrd_log_ratio(logp: Tensor, old_logp: Tensor, teacher_logp: Optional[Tensor], alpha: float,
                   clamp: Optional[float] = 1.0, grad: ClampGrad = "through") -> tuple[Tensor, Tensor]:
    """``log r = alpha (l_S - l_old) + (1 - alpha) clamp(l_S - l_T, -c, c)``; returns ``(log r, clamp_bound)``.

    ``alpha == 1`` returns ``l_S - l_old`` exactly (GRPO) without reading ``teacher_logp``.
    """
    if alpha == 1.0:
        return logp - old_logp, torch.zeros_like(logp, dtype=torch.bool)
    d_t, bound = teacher_log_ratio(logp, teacher_logp, clamp, grad)
    return alpha * (logp - old_logp) + (1.0 - alpha) * d_t, bound


class TRRD(GRPO):
    """RLAD's Trust Region Ratio Distillation objective (GRPO with the TRRD ratio).

    ``log r = alpha (l_S - l_old) + (1 - alpha) clamp(l_S - l_T, -c_T, c_T)``, then the clipped GRPO surrogate with
    the unchanged group advantage: ``loss = agg(-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A))``.

    Args:
        alpha: weight of the old policy in the anchor ``pi_old^alpha pi_T^(1-alpha)``; 1 is GRPO (paper: 0.5).
        teacher_clamp: ``c_T`` bound on ``|l_S - l_T|`` (paper App. B: 1.0); null disables it.
        teacher_clamp_grad: ``through`` (option A, default: no gradient through the teacher term where the clamp
            binds) or ``straight`` (option B: straight-through, gradient of ``log r`` stays ``dl_S``).
        eps_low, eps_high, ref_kl_coef, ref_kl_estimator, tis_cap: as in GRPO (paper: eps 0.20 / 0.28).

    Metrics (besides GRPO's clip_frac_low/high, ratio_mean, ratio_max): ``teacher_log_ratio_mean`` (mean
    ``l_S - l_T``, unclamped), ``teacher_clamp_frac`` (share of tokens where the clamp binds), ``log_ratio_mean``.
    """

    def __init__(self, alpha: float = 0.5, teacher_clamp: Optional[float] = 1.0,
                 teacher_clamp_grad: ClampGrad = "through", eps_low: float = 0.2, eps_high: float = 0.28,
                 ref_kl_coef: float = 0.0, ref_kl_estimator: KLEstimator = "k3", tis_cap: Optional[float] = None,
                 weight: float = 1.0, name: Optional[str] = None, loss_agg: Optional[str] = None,
                 off_policy: OffPolicySetting = "auto"):
        super().__init__(eps_low=eps_low, eps_high=eps_high, ref_kl_coef=ref_kl_coef,
                         ref_kl_estimator=ref_kl_estimator, tis_cap=tis_cap, weight=weight, name=name,
                         loss_agg=loss_agg, off_policy=off_policy)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"{self.name}.alpha", f"expected a value in [0, 1] (1 = GRPO), got {alpha}")
        if teacher_clamp is not None and not teacher_clamp > 0:
            raise ConfigError(f"{self.name}.teacher_clamp", f"expected a positive bound or null, got {teacher_clamp}")
        if teacher_clamp_grad not in ("through", "straight"):
            raise ConfigError(f"{self.name}.teacher_clamp_grad",
                              f"expected 'through' or 'straight', got '{teacher_clamp_grad}'")
        self.alpha, self.teacher_clamp, self.teacher_clamp_grad = float(alpha), teacher_clamp, teacher_clamp_grad
        self.needs_teacher = self.alpha < 1.0
        if self.needs_teacher:
            self.inputs = self.inputs | {TEACHER_LOGPROBS}

    def log_ratio(self, batch: RolloutBatch, logp: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        old = old_logprobs_of(batch, logp)
        if self.alpha == 1.0:
            return trrd_log_ratio(logp, old, None, 1.0)[0], {}
        if batch.teacher_logprobs is None:
            raise ValueError(f"{self.name}: batch.teacher_logprobs is missing (alpha < 1 needs the teacher)")
        teacher = sanitize_logprobs(batch.teacher_logprobs)
        log_r, bound = trrd_log_ratio(logp, old, teacher, self.alpha, self.teacher_clamp, self.teacher_clamp_grad)
        mask = batch.response_mask
        return log_r, {"teacher_log_ratio_mean": masked_mean(logp.detach() - teacher, mask),
                       "teacher_clamp_frac": masked_mean(bound.float(), mask),
                       "log_ratio_mean": masked_mean(log_r, mask)}


#: RLAD is the paper's name for the objective built on the TRRD ratio
RLAD = TRRD
