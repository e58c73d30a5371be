"""ReNIO sample weights around any per-token objective (docs/methods/renio.md; arXiv 2606.23104).

    d_t   = l_S(y_t) - l_T(y_t)                  STUDENT minus teacher, sampled tokens, detached
    d~_t  = min(d_t, c)                           upper clamp only
    K_i   = { valid t : d~_t >= tau }             pivotal tokens of sample i
    m_i   = mean_{t in K_i} d~_t   (0 if K_i is empty)
    w^_i  = exp(m_i / T_w)
    w_i   = min( w^_i / mean_{j in B} w^_j , cap )        normalisation over the micro-batch B ("batch_mean")
    L_i   = (1 / |V_i|) sum_{t in V_i} v_it               per-sample token mean of the inner per-token loss
    loss  = (1 / N_seq_step) sum_{i in B} w_i L_i         (N_seq_step: sequences in the whole optimizer step)

With w = 1 this is the inner loss under ``seq_mean_token_mean``. The weights are computed under no-grad. Unlike the
release the weights also apply when the inner objective is the sampled-token ``OPDSampled``.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.base import (
    TEACHER_LOGPROBS,
    Denominators,
    LossOutput,
    Objective,
    StudentOutputs,
    TokenObjective,
    per_sample_token_mean,
    sanitize_logprobs,
)
from rlad_pl.objectives.off_policy import OffPolicySetting
from rlad_pl.objectives.plan import declared

WeightNorm = Literal["batch_mean", "none", "clamp", "ema"]
NormScope = Literal["micro_batch", "global"]


def renio_sample_scores(d: Tensor, mask: Tensor, tau: float, c: float) -> tuple[Tensor, Tensor]:
    """``m_i = mean_{t: min(d_t, c) >= tau} min(d_t, c)`` (0 if no pivotal token) -> ``(m [N], pivotal [N, R])``."""
    d_clip = d.clamp_max(c)
    pivotal = (d_clip >= tau) & (mask > 0)
    count = pivotal.sum(-1)
    total = torch.where(pivotal, d_clip, torch.zeros_like(d_clip)).sum(-1)
    m = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return m, pivotal


def renio_weights(m: Tensor, temperature: float = 1.0, norm: WeightNorm = "batch_mean", cap: Optional[float] = 10.0,
                  reference_mean: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``w^ = exp(m / T_w)``; ``batch_mean``: ``w = w^ / mean(w^)``; ``clamp``: ``w^`` clamped to [0.1, 10] first;
    ``ema``: ``w = w^ / reference_mean`` (an EMA of batch means kept by the caller); ``none``: ``w = w^``; then
    ``w = min(w, cap)``. ``reference_mean`` replaces the micro-batch mean (EMA, or a mean over all ranks).
    Returns ``(w, w^)``, both detached."""
    m = m.detach()
    w_hat = torch.exp(m / temperature)
    w = w_hat
    if norm == "clamp":
        w = w.clamp(0.1, 10.0)
    if norm in ("batch_mean", "clamp", "ema") and w.numel():
        w = w / (reference_mean if reference_mean is not None else w.mean())
    if cap is not None:
        w = w.clamp_max(cap)
    return w, w_hat


class ReNIO(Objective):
    """ReNIO: reweight whole samples of an inner per-token objective by their pivotal-token severity.

    ``loss = (1/N_seq_step) sum_i w_i L_i`` with ``L_i`` the token mean of the inner per-token loss over sample i
    and ``w_i = min(exp(m_i / T_w) / mean_B exp(m_j / T_w), cap)``, ``m_i`` the mean clipped ``d = l_S - l_T`` over
    tokens with ``min(d, c) >= tau``.

    Args:
        inner: the per-token objective to reweight (``class_path`` / ``init_args``; any ``TokenObjective``, e.g.
            ``OPSD``, ``TokenKL``, ``OPDSampled``, ``GRPO``). Its own ``loss_agg`` is not used.
        tau: pivotal threshold on ``min(d_t, c)`` (release 1.7B OPSD: 0.8).
        c: upper clamp of ``d_t`` (release 2.5; paper default 3.0).
        weight_temperature: ``T_w`` (1.0 in every release script).
        weight_norm: ``batch_mean`` (release default), ``none``, ``clamp`` (w^ clamped to [0.1, 10], then divided
            by the batch mean) or ``ema`` (divided by an exponential moving average of batch means, rate
            ``ema_rate``).
        weight_norm_scope: ``micro_batch`` (release: the mean over this rank's micro-batch, so weights depend on the
            per-device batch size) or ``global`` (the mean over the same micro-batch of every rank, all-reduced).
        ema_rate: update rate of the ``ema`` normaliser (release 0.1).
        weight_cap: cap on the normalised weight (release 10); null: none.

    Metrics: ``weight_mean``, ``weight_max``, ``weight_min``, ``raw_weight_mean`` (w^), ``pivotal_frac`` (share of
    valid tokens that are pivotal), ``samples_with_pivotal``, ``d_mean`` (mean ``l_S - l_T``), ``inner_loss``
    (unweighted sequence-mean of the inner loss), and the inner objective's metrics as ``<inner name>/<metric>``.
    """

    def __init__(self, inner: Objective, tau: float = 0.8, c: float = 2.5, weight_temperature: float = 1.0,
                 weight_norm: WeightNorm = "batch_mean", weight_cap: Optional[float] = 10.0,
                 weight_norm_scope: NormScope = "micro_batch", ema_rate: float = 0.1, weight: float = 1.0,
                 name: Optional[str] = None, loss_agg: Optional[str] = None, off_policy: OffPolicySetting = "auto"):
        super().__init__(weight=weight, name=name, loss_agg=loss_agg, off_policy=off_policy)
        n = self.name
        if not isinstance(inner, TokenObjective):
            raise ConfigError(f"{n}.inner", "expected a per-token objective (a TokenObjective such as OPSD, TokenKL, "
                              f"OPDSampled or GRPO), got {type(inner).__name__}")
        if not c > tau:
            raise ConfigError(f"{n}.c", f"expected the clamp c above the threshold tau={tau}, got {c}")
        if not weight_temperature > 0:
            raise ConfigError(f"{n}.weight_temperature", f"expected a positive value, got {weight_temperature}")
        if weight_norm not in ("batch_mean", "none", "clamp", "ema"):
            raise ConfigError(f"{n}.weight_norm", f"expected batch_mean, none, clamp or ema, got '{weight_norm}'")
        if weight_norm_scope not in ("micro_batch", "global"):
            raise ConfigError(f"{n}.weight_norm_scope", f"expected micro_batch or global, got '{weight_norm_scope}'")
        if not 0 < ema_rate <= 1:
            raise ConfigError(f"{n}.ema_rate", f"expected a value in (0, 1], got {ema_rate}")
        self.weight_norm_scope, self.ema_rate = weight_norm_scope, float(ema_rate)
        self._ema_mean: Optional[Tensor] = None
        if weight_cap is not None and not weight_cap > 0:
            raise ConfigError(f"{n}.weight_cap", f"expected a positive cap or null, got {weight_cap}")
        self.inner, self.tau, self.c = inner, float(tau), float(c)
        self.weight_temperature, self.weight_norm, self.weight_cap = float(weight_temperature), weight_norm, weight_cap
        inner_decl = declared(inner, f"{n}.inner")  # the inner objective may use the older ``requires`` set
        self.inputs = inner_decl.inputs | {TEACHER_LOGPROBS}
        self.responses, self.teacher_prompt = inner_decl.responses, inner_decl.teacher_prompt
        self.needs_teacher = True
        self.needs_groups = inner.needs_groups

    def sample_weights(self, batch: RolloutBatch, logp: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Detached ``w [N]`` of this micro-batch and the weight metrics."""
        if batch.teacher_logprobs is None:
            raise ValueError(f"{self.name}: batch.teacher_logprobs is missing (input teacher_logprobs)")
        mask = batch.response_mask
        with torch.no_grad():
            d = logp.detach() - sanitize_logprobs(batch.teacher_logprobs)
            m, pivotal = renio_sample_scores(d, mask, self.tau, self.c)
            w, w_hat = renio_weights(m, self.weight_temperature, self.weight_norm, self.weight_cap,
                                     self.reference_mean(m))
            valid = (mask > 0).sum().clamp_min(1)
            metrics = {"weight_mean": w.mean(), "weight_max": w.max(), "weight_min": w.min(),
                       "raw_weight_mean": w_hat.mean(), "pivotal_frac": pivotal.sum() / valid,
                       "samples_with_pivotal": pivotal.any(-1).float().mean(),
                       "d_mean": (d * mask).sum() / valid}
        return w, metrics

    def reference_mean(self, m: Tensor) -> Optional[Tensor]:
        """The normaliser replacing the micro-batch mean of ``w^``: the mean over every rank (``global`` scope)
        and / or its EMA (``ema``); None keeps the micro-batch mean."""
        if self.weight_norm not in ("batch_mean", "clamp", "ema"):
            return None
        base = torch.exp(m / self.weight_temperature)
        if self.weight_norm == "clamp":
            base = base.clamp(0.1, 10.0)
        mean = None
        if self.weight_norm_scope == "global" and torch.distributed.is_available() and \
                torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            stats = torch.stack([base.sum(), base.new_tensor(float(base.numel()))])
            torch.distributed.all_reduce(stats)
            mean = stats[0] / stats[1].clamp_min(1.0)
        if self.weight_norm == "ema":
            batch_mean = mean if mean is not None else base.mean()
            self._ema_mean = batch_mean if self._ema_mean is None else (
                (1 - self.ema_rate) * self._ema_mean + self.ema_rate * batch_mean)
            return self._ema_mean
        return mean

    def state_dict(self) -> dict:
        """The ``ema`` normaliser (None before the first micro-batch) and the inner objective's state."""
        ema = None if self._ema_mean is None else self._ema_mean.detach().cpu().clone()
        return {"ema_mean": ema, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        ema = state.get("ema_mean")
        self._ema_mean = None if ema is None else torch.as_tensor(ema)
        self.inner.load_state_dict(state.get("inner", {}))

    def resolve_off_policy(self, asynchronous: bool):
        """The inner objective's correction (``off_policy`` set here is handed to it)."""
        if self.off_policy_setting is not None:
            self.inner.off_policy_setting = self.off_policy_setting
        self.off_policy = self.inner.resolve_off_policy(asynchronous)
        return self.off_policy

    def compute(self, batch: RolloutBatch, out: StudentOutputs, denom: Denominators) -> LossOutput:
        values, inner_metrics = self.inner.corrected_per_token(batch, out)
        per_sample = per_sample_token_mean(values, batch.response_mask)
        if per_sample.numel() == 0:
            return LossOutput(values.sum() * 0.0, {})
        w, metrics = self.sample_weights(batch, out.logprobs)
        loss = (w.to(per_sample.dtype) * per_sample).sum() / max(denom.num_sequences, 1.0)
        metrics["inner_loss"] = per_sample.detach().mean()
        metrics.update({f"{self.inner.name}/{k}": v for k, v in inner_metrics.items()})
        return LossOutput(loss, metrics)

    def __repr__(self) -> str:
        return f"ReNIO(inner={self.inner!r}, tau={self.tau}, c={self.c}, weight={self.weight})"
