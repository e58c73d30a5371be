"""KDRL: GRPO plus a sampled reverse-KL(student || teacher) regulariser on the student's own rollouts
(docs/methods/kdrl.md; arXiv 2506.02208 as RLAD defines it, Eq. 2).

    v_t  = v_t^GRPO + kd_coef * m_i * k(l_S, l_T)                    loss = agg(v)
    k1 = l_S - l_T ,   k2 = (l_S - l_T)^2 / 2 ,   k3 = exp(l_T - l_S) - 1 - (l_T - l_S)

On-policy samples, teacher detached: k2's gradient ``(l_S - l_T) dl_S`` averages to the exact reverse-KL gradient
(the default); k1's averages to 0; k3's to the forward-KL gradient. ``m_i`` masks the KD term on "correct" responses
when ``kd_mask_correct`` is set (KDRL's reward-guided masking), else 1.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.base import TEACHER_LOGPROBS, StudentOutputs, masked_mean, sanitize_logprobs
from rlad_pl.objectives.grpo import GRPO, KLEstimator, kl_estimate
from rlad_pl.objectives.off_policy import OffPolicySetting


def kd_response_mask(rewards: Tensor, advantages: Tensor, correct_threshold: Optional[float]) -> Tensor:
    """``m_i``: 0 for responses counted as correct, else 1 (``[N]`` float).

    Correct means ``reward >= correct_threshold`` when a threshold is given, else ``advantage > 0`` (better than the
    mean of its group; with all-equal groups nothing is masked).
    """
    correct = rewards >= correct_threshold if correct_threshold is not None else advantages > 0
    return (~correct).float()


class KDRL(GRPO):
    """GRPO + ``kd_coef * agg(k(l_S, l_T))`` (sampled reverse KL(pi_S || pi_T) on the student's rollouts).

    Per token ``v_t = -min(r A, clip(r) A) + kd_coef * m_i * k(l_S, l_T)`` (+ GRPO's reference-KL / TIS options).

    Args:
        kd_coef: beta_KD (recommended default 1e-3; KDRL paper 1e-3 ... 5e-3). 0 gives GRPO and drops the teacher.
        kd_estimator: ``k1``, ``k2`` (default, exact reverse-KL gradient in expectation) or ``k3``.
        kd_mask_correct: skip the KD term on correct responses (KDRL's reward-guided masking; default off).
        kd_correct_threshold: with ``kd_mask_correct``, a response is correct when ``reward >= threshold``; null
            (default) uses ``advantage > 0`` instead.
        kd_coef_end, kd_anneal_steps: optional linear schedule of the coefficient from ``kd_coef`` at step 0 to
            ``kd_coef_end`` at optimizer step ``kd_anneal_steps`` (then constant), e.g. KDRL's 5e-3 -> 1e-3.
        eps_low, eps_high, ref_kl_coef, ref_kl_estimator, tis_cap: as in GRPO.

    Metrics: GRPO's, plus ``kd_estimate`` (mean of the estimator), ``reverse_kl_sampled`` (mean ``l_S - l_T``, the k1
    estimate of KL(pi_S || pi_T)), ``kd_masked_frac`` (share of responses without KD term).
    """

    def __init__(self, kd_coef: float = 1e-3, kd_estimator: KLEstimator = "k2", kd_mask_correct: bool = False,
                 kd_correct_threshold: Optional[float] = None, kd_coef_end: Optional[float] = None,
                 kd_anneal_steps: int = 0, eps_low: float = 0.2, eps_high: float = 0.28,
                 ref_kl_coef: float = 0.0, ref_kl_estimator: KLEstimator = "k3", tis_cap: Optional[float] = None,
                 weight: float = 1.0, name: Optional[str] = None, loss_agg: Optional[str] = None,
                 off_policy: OffPolicySetting = "auto"):
        super().__init__(eps_low=eps_low, eps_high=eps_high, ref_kl_coef=ref_kl_coef,
                         ref_kl_estimator=ref_kl_estimator, tis_cap=tis_cap, weight=weight, name=name,
                         loss_agg=loss_agg, off_policy=off_policy)
        if kd_coef < 0:
            raise ConfigError(f"{self.name}.kd_coef", f"expected a value >= 0, got {kd_coef}")
        if kd_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"{self.name}.kd_estimator", f"expected k1, k2 or k3, got '{kd_estimator}'")
        self.kd_coef, self.kd_estimator = float(kd_coef), kd_estimator
        self.kd_mask_correct, self.kd_correct_threshold = kd_mask_correct, kd_correct_threshold
        if kd_coef_end is not None and (kd_coef_end < 0 or kd_anneal_steps < 1):
            raise ConfigError(f"{self.name}.kd_coef_end", "expected kd_coef_end >= 0 with kd_anneal_steps >= 1, got "
                              f"{kd_coef_end} over {kd_anneal_steps} steps")
        self.kd_coef_end, self.kd_anneal_steps = kd_coef_end, kd_anneal_steps
        self.needs_teacher = self.kd_coef > 0 or bool(kd_coef_end)
        if self.needs_teacher:
            self.inputs = self.inputs | {TEACHER_LOGPROBS}

    def coef_at(self, step: int) -> float:
        """``kd_coef + (kd_coef_end - kd_coef) * min(step / kd_anneal_steps, 1)`` (constant without a schedule)."""
        if self.kd_coef_end is None:
            return self.kd_coef
        return self.kd_coef + (self.kd_coef_end - self.kd_coef) * min(step / self.kd_anneal_steps, 1.0)

    def per_token(self, batch: RolloutBatch, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        values, metrics = super().per_token(batch, out)
        coef = self.coef_at(out.step)
        if not self.needs_teacher:
            return values, metrics
        if batch.teacher_logprobs is None:
            raise ValueError(f"{self.name}: batch.teacher_logprobs is missing (kd_coef > 0 needs the teacher)")
        mask = batch.response_mask
        teacher = sanitize_logprobs(batch.teacher_logprobs)
        kd = kl_estimate(out.logprobs, teacher, self.kd_estimator)
        if self.kd_mask_correct:
            keep = kd_response_mask(batch.rewards, batch.advantages, self.kd_correct_threshold)
            kd = kd * keep.unsqueeze(-1)
            metrics["kd_masked_frac"] = 1.0 - keep.mean()
        corr = self.off_policy_correction(batch, out.logprobs)  # the KD term's samples are stale too
        if corr.weights is not None:
            kd = kd * corr.weights.to(kd.dtype)
        metrics["kd_estimate"] = masked_mean(kd, mask)
        metrics["reverse_kl_sampled"] = masked_mean(out.logprobs.detach() - teacher, mask)
        metrics["kd_coef"] = kd.new_tensor(coef)
        return values + coef * kd, metrics
