"""GRPO: the PPO-clipped surrogate with group-normalized advantages (docs/methods/grpo.md).

    rho_t   = exp(l_S - l_old)
    surr_t  = min( rho_t A_i , clip(rho_t, 1 - eps_low, 1 + eps_high) A_i )
    w_t     = sg( min(exp(l_old - l_sampler), tis_cap) )            (truncated importance sampling; 1 if off)
    loss    = agg( - w_t surr_t + beta_ref * KL_k(l_S, l_ref) )

``A_i`` is the same for every token of response i (computed by the data module, see ``rlad_pl.core.advantages``).
The per-token loss (``GRPO.per_token``) is reusable: KDRL adds a term to it, TRRD replaces the ratio, ReNIO
reweights it per sample.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.base import (
    ADVANTAGES,
    OLD_LOGPROBS,
    REF_LOGPROBS,
    SAMPLER_LOGPROBS,
    StudentOutputs,
    TokenObjective,
    masked_mean,
    old_logprobs_of,
    sanitize_logprobs,
)
from rlad_pl.objectives.off_policy import OffPolicy, OffPolicySetting

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


def truncated_is_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """TIS: ``w_t = min(exp(l_old - l_sampler), cap)``, detached. Returns ``(w, truncated)``; ``truncated`` marks
    tokens where the cap binds. Non-finite sampler log-probs are floored (``sanitize_logprobs``), so they truncate."""
    log_w = (old_logprobs.detach() - sanitize_logprobs(sampler_logprobs)).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    raw = torch.exp(log_w)
    return raw.clamp_max(cap), raw > cap


def clip_metrics(ratio: Tensor, clipped_low: Tensor, clipped_high: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Token shares ``clip_frac_low`` (r < 1 - eps_low, A < 0) and ``clip_frac_high`` (r > 1 + eps_high, A > 0),
    mean and max of ``r`` over valid tokens."""
    return {"clip_frac_low": masked_mean(clipped_low.float(), mask),
            "clip_frac_high": masked_mean(clipped_high.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": (ratio.detach() * mask).max() if mask.any() else ratio.new_zeros(())}


class GRPO(TokenObjective):
    """Group Relative Policy Optimization with clip-higher (``eps_high``), optional reference KL and TIS.

    Per token: ``v_t = - w_t min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta_ref KL_k(l_S, l_ref)``
    with ``r_t = exp(log_ratio)`` (GRPO: ``l_S - l_old``) and ``w_t = sg(min(exp(l_old - l_sampler), tis_cap))``;
    ``loss = agg(v)``.

    Args:
        eps_low: lower clip range (ratio floor ``1 - eps_low``).
        eps_high: upper clip range (ratio ceiling ``1 + eps_high``; DAPO "clip higher").
        ref_kl_coef: beta of the ``KL(pi_S || pi_ref)`` penalty; 0 skips the reference model entirely.
        ref_kl_estimator: ``k1``, ``k2`` or ``k3`` (``low_var_kl``).
        tis_cap: truncated importance sampling against the inference engine's log-probs (None: off). Each token's
            surrogate is multiplied by the detached ``min(pi_old / pi_sampler, tis_cap)``; adds ``sampler_logprobs``
            to ``inputs``. When the engine reports no log-probs (``batch.sampler_logprobs is None``) the weight is 1
            and ``tis_active`` logs 0.

    Metrics: ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``, ``ratio_max``, ``ref_kl``, ``tis_clip_frac``,
    ``tis_weight_mean``, ``tis_active``, ``advantage_abs_mean``.
    """

    inputs = frozenset({ADVANTAGES, OLD_LOGPROBS})
    needs_groups = True
    #: asynchronous runs: decoupled PPO, the clip around the trainer's own pre-update policy and a truncated
    #: importance weight from the behaviour policy to it (docs/async.md)
    declared_off_policy = "tis"
    corrects_in_per_token = True

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.28, ref_kl_coef: float = 0.0,
                 ref_kl_estimator: KLEstimator = "k3", tis_cap: Optional[float] = None, weight: float = 1.0,
                 name: Optional[str] = None, loss_agg: Optional[str] = None, off_policy: OffPolicySetting = "auto"):
        super().__init__(weight=weight, name=name, loss_agg=loss_agg, off_policy=off_policy)
        if eps_low < 0 or eps_high < 0:
            field = f"{self.name}.eps_low" if eps_low < 0 else f"{self.name}.eps_high"
            raise ConfigError(field, f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
        if eps_low >= 1:
            raise ConfigError(f"{self.name}.eps_low", f"expected a value in [0, 1), got {eps_low}")
        if ref_kl_coef < 0:
            raise ConfigError(f"{self.name}.ref_kl_coef", f"expected a value >= 0, got {ref_kl_coef}")
        if ref_kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"{self.name}.ref_kl_estimator", f"expected k1, k2 or k3, got '{ref_kl_estimator}'")
        if tis_cap is not None and not tis_cap > 0:
            raise ConfigError(f"{self.name}.tis_cap", f"expected a positive cap (e.g. 2.0) or null, got {tis_cap}")
        self.eps_low, self.eps_high = eps_low, eps_high
        self.ref_kl_coef, self.ref_kl_estimator = ref_kl_coef, ref_kl_estimator
        self.tis_cap = tis_cap
        if ref_kl_coef > 0:
            self.inputs = self.inputs | {REF_LOGPROBS}
        if tis_cap is not None:
            self.inputs = self.inputs | {SAMPLER_LOGPROBS}

    def log_ratio(self, batch: RolloutBatch, logp: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """log of the importance ratio; GRPO: ``l_S - l_old``. TRRD overrides this."""
        return logp - old_logprobs_of(batch, logp), {}

    def tis_weights(self, batch: RolloutBatch, logp: Tensor) -> tuple[Optional[Tensor], dict[str, Tensor]]:
        """Detached per-token TIS weights (None when TIS is off or the engine gave no log-probs)."""
        if self.tis_cap is None:
            return None, {}
        if batch.sampler_logprobs is None:
            return None, {"tis_active": logp.new_zeros(())}
        mask = batch.response_mask
        w, truncated = truncated_is_weights(old_logprobs_of(batch, logp), batch.sampler_logprobs, self.tis_cap)
        return w, {"tis_active": logp.new_ones(()), "tis_clip_frac": masked_mean(truncated.float(), mask),
                   "tis_weight_mean": masked_mean(w, mask)}

    def resolve_off_policy(self, asynchronous: bool) -> OffPolicy:
        if self.tis_cap is not None and self.off_policy_setting is not None:
            raise ConfigError(f"{self.name}.off_policy", "tis_cap already sets a truncated importance weight; set "
                              "either tis_cap or off_policy")
        return super().resolve_off_policy(asynchronous and self.tis_cap is None)

    def per_token(self, batch: RolloutBatch, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        mask = batch.response_mask
        ratio_batch = batch
        if self.off_policy.kind == "ratio":  # the PPO ratio and clip against the behaviour policy itself
            if batch.sampler_logprobs is None:
                self.off_policy_correction(batch, out.logprobs)  # one line: no sampler log-probs
            ratio_batch = replace(batch, old_logprobs=sanitize_logprobs(batch.sampler_logprobs))
        log_ratio, metrics = self.log_ratio(ratio_batch, out.logprobs)
        surr, ratio, c_low, c_high = ppo_clipped_surrogate(log_ratio, batch.advantages, self.eps_low, self.eps_high)
        metrics.update(clip_metrics(ratio, c_low, c_high, mask))
        metrics["advantage_abs_mean"] = batch.advantages.detach().abs().mean()
        w, tis_metrics = self.tis_weights(batch, out.logprobs)
        metrics.update(tis_metrics)
        if self.off_policy.kind != "ratio":
            corr = self.off_policy_correction(batch, out.logprobs)
            metrics.update(corr.metrics)
            w = corr.weights if w is None else w
        values = -surr if w is None else -(w * surr)
        if self.ref_kl_coef > 0:
            kl = kl_estimate(out.logprobs, sanitize_logprobs(batch.ref_logprobs), self.ref_kl_estimator)
            values = values + self.ref_kl_coef * kl
            metrics["ref_kl"] = masked_mean(kl, mask)
        return values, metrics
