"""Train / inference log-prob mismatch: diagnostics and truncated importance-sampling (TIS) weights.

The rollout engine (vLLM) and the trainer compute the log-prob of the same sampled token with different kernels,
so even with identical weights ``l_train != l_sampler``. With ``d = l_train - l_sampler`` per response token:

* ``mismatch/logprob_abs_diff``: mean of ``|d|`` over the response mask; ``mismatch/logprob_abs_diff_max``: its max.
* ``mismatch/kl_k3``: the k3 estimator ``exp(d) - 1 - d`` (>= 0, unbiased for ``KL(pi_sampler || pi_train)`` because
  tokens are sampled from ``pi_sampler``), averaged over the mask.
* TIS weights ``min(exp(d), cap)``: importance weights ``pi_train / pi_sampler`` that correct an objective computed
  with ``pi_train`` on samples drawn from ``pi_sampler``, truncated at ``cap`` to bound the variance
  (Yao et al., "Your efficient RL framework secretly brings you off-policy RL training"). The weights are constants
  (detached); ``clip_fraction`` is the share of tokens (or sequences) whose ratio exceeded ``cap``.

Both sides must use the same temperature (``logits / T``) and neither may be renormalised after top-p / top-k,
otherwise ``d`` carries a spurious offset (see ``rlad_pl.rollout.vllm``). Pure functions, no state; masks are float
or bool ``[N, R]`` and positions outside the mask are ignored (weights there are 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["logprob_mismatch", "tis_weights"]

#: log-ratios are clamped to +-this before ``exp`` so a single wild token cannot produce inf / nan
MAX_LOG_RATIO = 20.0


def _masked(train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if train_logprobs.shape != sampler_logprobs.shape or train_logprobs.shape != mask.shape:
        raise ValueError(f"shape mismatch: train {tuple(train_logprobs.shape)}, sampler "
                         f"{tuple(sampler_logprobs.shape)}, mask {tuple(mask.shape)}")
    m = mask.to(torch.float32)
    d = (train_logprobs.detach().float() - sampler_logprobs.detach().float()) * m  # 0 outside the mask
    return d, m


def logprob_mismatch(train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-token mismatch statistics between trainer and sampler log-probs of the sampled tokens.

    Args:
        train_logprobs: ``[N, R]`` log-probs from the trainer (at the sampling temperature).
        sampler_logprobs: ``[N, R]`` log-probs reported by the rollout engine for the same tokens.
        mask: ``[N, R]`` response mask (1 on response tokens).

    Returns:
        0-dim float tensors: ``mismatch/logprob_abs_diff`` (mean ``|d|``), ``mismatch/logprob_abs_diff_max``,
        ``mismatch/kl_k3`` (mean ``exp(d) - 1 - d``) and ``mismatch/tokens`` (mask sum). All 0 for an empty mask.
    """
    d, m = _masked(train_logprobs, sampler_logprobs, mask)
    n = m.sum()
    denom = n.clamp_min(1.0)
    abs_d = d.abs()
    dc = d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    k3 = (torch.exp(dc) - 1.0 - dc) * m
    return {
        "mismatch/logprob_abs_diff": abs_d.sum() / denom,
        "mismatch/logprob_abs_diff_max": abs_d.max() if abs_d.numel() else abs_d.new_zeros(()),
        "mismatch/kl_k3": k3.sum() / denom,
        "mismatch/tokens": n,
    }


def tis_weights(train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, cap: float = 2.0,
                level: str = "token") -> tuple[Tensor, Tensor]:
    """Truncated importance-sampling weights ``min(exp(l_train - l_sampler), cap)`` and their clip fraction.

    Args:
        train_logprobs: ``[N, R]`` trainer log-probs (usually pi_old, at the sampling temperature).
        sampler_logprobs: ``[N, R]`` engine log-probs of the same tokens.
        mask: ``[N, R]`` response mask.
        cap: truncation level C (> 0); TIS papers use 2, TRL uses 3.
        level: ``"token"`` (one ratio per token) or ``"sequence"`` (``exp(sum_t d_t)`` per sequence, broadcast to
            its tokens).

    Returns:
        ``(weights, clip_fraction)``: detached fp32 ``[N, R]`` weights, 0 outside the mask; and the 0-dim fraction
        of masked tokens (``level="token"``) or of sequences with at least one masked token (``"sequence"``) whose
        ratio exceeded ``cap``.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    d, m = _masked(train_logprobs, sampler_logprobs, mask)
    if level == "token":
        ratio = torch.exp(d.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        clipped = (ratio > cap).float() * m
        clip_fraction = clipped.sum() / m.sum().clamp_min(1.0)
    elif level == "sequence":
        seq_ratio = torch.exp(d.sum(-1).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [N]
        has_tokens = (m.sum(-1) > 0).float()
        clip_fraction = ((seq_ratio > cap).float() * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)
        ratio = seq_ratio.unsqueeze(-1).expand_as(d)
    else:
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    weights = ratio.clamp(max=cap) * m
    return weights, clip_fraction
