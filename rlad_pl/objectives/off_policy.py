"""Off-policy corrections: how an objective trains on responses that an older policy sampled (docs/async.md).

With ``data.max_off_policy_steps: k > 0`` a rollout batch is sampled by the behaviour policy ``b`` (the student's
weights up to k optimizer steps ago, as the sampler reports its log-probs ``l_b``) and trained on by the current
student ``theta``. ``l_prox`` is the trainer's own log-prob of the sampled token before the update (the stored
``old_logprobs`` when a batch has several updates, else the detached current value), so ``d_t = l_prox - l_b``
measures how far the behaviour policy has drifted. Each correction is a pure function of ``d`` (no gradient):

    none       w_t = 1                                    (treat the batch as on-policy)
    ratio      w_t = exp(d_t)                             (plain importance sampling; a clipped-surrogate objective
                                                           takes its PPO ratio against l_b instead: decoupled PPO off)
    tis        w_t = min(exp(d_t), cap)                   (truncated importance sampling, Ionides / TIS)
    icepop     w_t = exp(d_t) if low <= exp(d_t) <= high else 0      (IcePop: masked importance sampling)
    seq_mask   w_t = 1[low <= exp(mean_t d_t) <= high]   (one decision per sequence, geometric-mean ratio)

``auto`` (the default) is the objective's declared correction (``Objective.declared_off_policy``) in an
asynchronous run and ``none`` in a synchronous one, so ``k = 0`` gives exactly the synchronous losses. A correction
named explicitly applies in synchronous runs too (it then corrects the engine / trainer numerical mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from rlad_pl.core.errors import ConfigError

KINDS = ("none", "ratio", "tis", "icepop", "seq_mask")
#: log-ratios are clamped before exp (exp(20) ~ 4.9e8)
_LIMIT = 20.0


@dataclass(frozen=True)
class OffPolicy:
    """A correction and its constants (see the module docstring).

    Args:
        kind: ``none``, ``ratio``, ``tis``, ``icepop`` or ``seq_mask``.
        cap: ``tis``: upper truncation of the weight (TIS papers use 2).
        low, high: ``icepop`` / ``seq_mask``: the band the ratio must stay in (IcePop: 0.5 and 5).
    """

    kind: str = "none"
    cap: float = 2.0
    low: float = 0.5
    high: float = 5.0

    @property
    def active(self) -> bool:
        return self.kind != "none"


OffPolicySetting = Union[str, dict, OffPolicy, None]


def parse_off_policy(field: str, value: OffPolicySetting) -> Optional[OffPolicy]:
    """``"auto"`` / None -> None (the objective's declared correction when asynchronous); a kind name or a dict
    ``{kind, cap, low, high}`` -> ``OffPolicy``; anything else: one line naming ``field``."""
    if value is None or value == "auto":
        return None
    if isinstance(value, OffPolicy):
        spec = value
    elif isinstance(value, str):
        spec = OffPolicy(kind=value)
    elif isinstance(value, dict):
        unknown = sorted(set(value) - {"kind", "cap", "low", "high"})
        if unknown:
            raise ConfigError(f"{field}.{unknown[0]}", "expected one of kind, cap, low, high")
        try:
            spec = OffPolicy(**{k: (str(v) if k == "kind" else float(v)) for k, v in value.items()})
        except (TypeError, ValueError):
            raise ConfigError(field, f"expected numbers for cap / low / high, got {value}") from None
    else:
        raise ConfigError(field, f"expected auto, {', '.join(KINDS)} or {{kind: ..., cap: ...}}, got {value!r}")
    if spec.kind not in KINDS:
        raise ConfigError(field, f"expected auto, {', '.join(KINDS)}, got {spec.kind!r}")
    if not spec.cap > 0:
        raise ConfigError(f"{field}.cap", f"expected a positive cap, got {spec.cap}")
    if not 0 <= spec.low < spec.high:
        raise ConfigError(f"{field}.low", f"expected 0 <= low < high, got low={spec.low}, high={spec.high}")
    return spec


@dataclass
class Correction:
    """Per-token weights ``w`` ``[N, R]`` (detached; None: all ones) and what to log."""

    weights: Optional[Tensor]
    metrics: dict[str, Tensor]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return ((values * mask).sum() / mask.sum().clamp_min(1.0)).detach()


def off_policy_weights(spec: OffPolicy, prox_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor
                       ) -> Correction:
    """The weights of ``spec`` from ``d = l_prox - l_b`` (module docstring). Metrics: ``off_policy_weight_mean``,
    ``off_policy_masked_frac`` (tokens whose weight is 0), ``off_policy_truncated_frac`` (``tis``: the cap binds),
    ``off_policy_log_ratio_abs`` (mean ``|d|``, the behaviour / trainer mismatch)."""
    m = mask.bool()
    d = (prox_logprobs.detach().float() - behaviour_logprobs.detach().float()).clamp(-_LIMIT, _LIMIT)
    d = torch.where(torch.isfinite(d), d, torch.full_like(d, -_LIMIT))
    ratio = torch.exp(d)
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    metrics = {"off_policy_log_ratio_abs": _masked_mean(d.abs(), m)}
    if spec.kind == "none":
        return Correction(None, metrics)
    if spec.kind == "ratio":
        w = ratio
    elif spec.kind == "tis":
        w = ratio.clamp_max(spec.cap)
        metrics["off_policy_truncated_frac"] = _masked_mean((ratio > spec.cap).float(), m)
    elif spec.kind == "icepop":
        inside = (ratio >= spec.low) & (ratio <= spec.high)
        w = torch.where(inside, ratio, zero)
        metrics["off_policy_masked_frac"] = _masked_mean((~inside).float(), m)
    elif spec.kind == "seq_mask":
        mf = m.to(d.dtype)
        seq = torch.exp((d * mf).sum(-1) / mf.sum(-1).clamp_min(1.0))
        keep = (seq >= spec.low) & (seq <= spec.high)
        w = keep.to(d.dtype).unsqueeze(-1).expand_as(d)
        metrics["off_policy_masked_frac"] = _masked_mean(w.eq(0).float(), m)
    else:
        raise ValueError(f"unknown off-policy correction {spec.kind!r}")
    w = w.to(prox_logprobs.dtype).detach()
    metrics["off_policy_weight_mean"] = _masked_mean(w, m)
    return Correction(w, metrics)


__all__ = ["KINDS", "OffPolicy", "OffPolicySetting", "Correction", "parse_off_policy", "off_policy_weights"]
