"""Per-token full-vocabulary divergences between a student ``q`` and a teacher ``p`` (pure tensor functions).

Notation (docs/methods/opd.md, docs/methods/opsd.md): at every position,
``q = softmax(z_s / T)`` (student, trainable) and ``p = softmax(z_t / T)`` (teacher, constant). Every function maps
logits ``[..., V]`` to a per-position fp32 value ``[...]``:

    forward_kl          FKL = sum_v p (log p - log q)                                    = KL(p || q)
    reverse_kl          RKL = sum_v q (log q - log p)                                    = KL(q || p)
    kl_mix              lam * RKL + (1 - lam) * FKL               (lam weights the REVERSE KL; lam = 0 is FKL)
    generalized_jsd     beta KL(p || M) + (1 - beta) KL(q || M),  M = beta p + (1 - beta) q   (GKD; beta = 0 -> FKL,
                        beta = 1 -> RKL, special-cased as in TRL since the formula itself tends to 0 at both ends)
    skew_forward_kl     KL(p || a p + (1 - a) q)                  (DistiLLM; a = 0 is FKL)
    skew_reverse_kl     KL(q || a q + (1 - a) p)                  (DistiLLM; a = 0 is RKL)
    clipped_forward_kl  sum_v clamp(p (log p - log q), lower, kappa)     (ReNIO / OPSD release; lower 0, kappa 0.05)
    entropy             H(q) = - sum_v q log q

The teacher never receives gradient (its logits are detached). Teacher log-probabilities that are NaN or -inf (masked
vocabulary entries) are floored at ``VOCAB_LOGPROB_FLOOR = -1000``: their probability is exactly 0 in fp32, so they
drop out of every p-weighted sum, and q-weighted terms stay finite.

``chunked_divergence`` evaluates any of these from final hidden states and LM-head weights, a chunk of positions at
a time under activation checkpointing, so the ``[positions, V]`` logits of both models never exist for the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

#: floor for teacher log-probabilities over the vocabulary (exp(-1000) == 0 in fp32)
VOCAB_LOGPROB_FLOOR = -1000.0

DivergenceFn = Callable[[Tensor, Tensor], Union[Tensor, tuple[Tensor, ...]]]


# ------------------------------------------------------------------------------------------------ log-prob helpers
def student_logprobs(z_s: Tensor, temperature: float = 1.0) -> Tensor:
    """``log q = log_softmax(z_s / T)`` in fp32 (keeps the graph)."""
    z = z_s.float()
    return F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def teacher_logprobs(z_t: Tensor, temperature: float = 1.0) -> Tensor:
    """``log p = log_softmax(z_t / T)`` in fp32, detached, NaN / -inf floored at ``VOCAB_LOGPROB_FLOOR``."""
    z = z_t.detach().float()
    logp = F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
    return torch.nan_to_num(logp, nan=VOCAB_LOGPROB_FLOOR, neginf=VOCAB_LOGPROB_FLOOR).clamp_min(VOCAB_LOGPROB_FLOOR)


def forward_kl_lp(logq: Tensor, logp: Tensor) -> Tensor:
    """``FKL = sum_v p (log p - log q)`` from log-probs (p constant)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def reverse_kl_lp(logq: Tensor, logp: Tensor) -> Tensor:
    """``RKL = sum_v q (log q - log p)`` from log-probs."""
    return (logq.exp() * (logq - logp)).sum(-1)


def entropy_lp(logq: Tensor) -> Tensor:
    """``H(q) = - sum_v q log q`` from log-probs."""
    return -(logq.exp() * logq).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w a + (1 - w) b)`` computed in log space (0 < w < 1)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def generalized_jsd_lp(logq: Tensor, logp: Tensor, beta: float) -> Tensor:
    """GKD: ``beta KL(p || M) + (1 - beta) KL(q || M)``, ``M = beta p + (1 - beta) q``; beta=0 -> FKL, beta=1 -> RKL."""
    if beta == 0.0:
        return forward_kl_lp(logq, logp)
    if beta == 1.0:
        return reverse_kl_lp(logq, logp)
    logm = _log_mix(logp, logq, beta)
    return beta * forward_kl_lp(logm, logp) + (1.0 - beta) * reverse_kl_lp(logq, logm)


def skew_forward_kl_lp(logq: Tensor, logp: Tensor, alpha: float) -> Tensor:
    """DistiLLM skew FKL: ``KL(p || alpha p + (1 - alpha) q)``; alpha = 0 is FKL."""
    if alpha == 0.0:
        return forward_kl_lp(logq, logp)
    return forward_kl_lp(_log_mix(logp, logq, alpha), logp)


def skew_reverse_kl_lp(logq: Tensor, logp: Tensor, alpha: float) -> Tensor:
    """DistiLLM skew RKL: ``KL(q || alpha q + (1 - alpha) p)``; alpha = 0 is RKL."""
    if alpha == 0.0:
        return reverse_kl_lp(logq, logp)
    return reverse_kl_lp(logq, _log_mix(logq, logp, alpha))


def clipped_forward_kl_lp(logq: Tensor, logp: Tensor, kappa: Optional[float] = 0.05,
                          lower: Optional[float] = 0.0) -> Tensor:
    """ReNIO per-entry clipped FKL: ``sum_v clamp(p_v (log p_v - log q_v), lower, kappa)``.

    The clamp is per vocabulary entry, before the sum: entries above ``kappa`` contribute exactly ``kappa`` and no
    gradient; with ``lower = 0`` negative entries contribute 0. ``None`` disables a bound (both None: plain FKL).
    """
    e = logp.exp() * (logp - logq)
    if kappa is not None or lower is not None:
        e = e.clamp(min=lower, max=kappa)
    return e.sum(-1)


# ------------------------------------------------------------------------------------------------ logits API
def forward_kl(z_s: Tensor, z_t: Tensor, temperature: float = 1.0) -> Tensor:
    """``FKL = sum_v p (log p - log q)``; gradient w.r.t. ``z_s`` is ``(q - p) / T``."""
    return forward_kl_lp(student_logprobs(z_s, temperature), teacher_logprobs(z_t, temperature))


def reverse_kl(z_s: Tensor, z_t: Tensor, temperature: float = 1.0) -> Tensor:
    """``RKL = sum_v q (log q - log p)``; gradient w.r.t. ``z_s`` is ``q (log q - log p - RKL) / T``."""
    return reverse_kl_lp(student_logprobs(z_s, temperature), teacher_logprobs(z_t, temperature))


def kl_mix(z_s: Tensor, z_t: Tensor, lam: float, temperature: float = 1.0) -> Tensor:
    """``lam * RKL + (1 - lam) * FKL`` (lam weights the REVERSE KL: lam = 0 is forward, lam = 1 reverse)."""
    logq, logp = student_logprobs(z_s, temperature), teacher_logprobs(z_t, temperature)
    if lam == 0.0:
        return forward_kl_lp(logq, logp)
    if lam == 1.0:
        return reverse_kl_lp(logq, logp)
    return lam * reverse_kl_lp(logq, logp) + (1.0 - lam) * forward_kl_lp(logq, logp)


def generalized_jsd(z_s: Tensor, z_t: Tensor, beta: float, temperature: float = 1.0) -> Tensor:
    """GKD ``JSD_beta = beta KL(p || M) + (1 - beta) KL(q || M)``, ``M = beta p + (1 - beta) q`` (log space).

    ``beta = 0`` returns FKL and ``beta = 1`` returns RKL (special cases, as TRL's ``generalized_jsd_loss``).
    """
    return generalized_jsd_lp(student_logprobs(z_s, temperature), teacher_logprobs(z_t, temperature), beta)


def skew_forward_kl(z_s: Tensor, z_t: Tensor, alpha: float, temperature: float = 1.0) -> Tensor:
    """DistiLLM ``KL(p || alpha p + (1 - alpha) q)``; alpha = 0 is FKL."""
    return skew_forward_kl_lp(student_logprobs(z_s, temperature), teacher_logprobs(z_t, temperature), alpha)


def skew_reverse_kl(z_s: Tensor, z_t: Tensor, alpha: float, temperature: float = 1.0) -> Tensor:
    """DistiLLM ``KL(q || alpha q + (1 - alpha) p)``; alpha = 0 is RKL."""
    return skew_reverse_kl_lp(student_logprobs(z_s, temperature), teacher_logprobs(z_t, temperature), alpha)


def clipped_forward_kl(z_s: Tensor, z_t: Tensor, kappa: Optional[float] = 0.05, lower: Optional[float] = 0.0,
                       temperature: float = 1.0) -> Tensor:
    """ReNIO/OPSD ``sum_v clamp(p_v (log p_v - log q_v), lower, kappa)`` (per entry, before the sum)."""
    return clipped_forward_kl_lp(student_logprobs(z_s, temperature), teacher_logprobs(z_t, temperature), kappa,
                                 lower)


def entropy(z: Tensor, temperature: float = 1.0) -> Tensor:
    """``H(q) = - sum_v q log q`` with ``q = softmax(z / T)``."""
    return entropy_lp(student_logprobs(z, temperature))


# ------------------------------------------------------------------------------------------------ chunked heads
def _divergence_chunk(h_s: Tensor, h_t: Tensor, w_s: Tensor, b_s: Optional[Tensor], w_t: Tensor,
                      b_t: Optional[Tensor], fn: DivergenceFn, temperature: float):
    z_s = F.linear(h_s, w_s, b_s).float()
    with torch.no_grad():
        z_t = F.linear(h_t, w_t, b_t).float()
    if temperature != 1.0:
        z_s, z_t = z_s / temperature, z_t / temperature
    return fn(z_s, z_t)


def chunked_positions(chunk_fn: Callable, student_hidden: Tensor, teacher_rows: tuple[Tensor, ...], consts: tuple,
                      *, chunk_size: int, mask: Optional[Tensor], needs_grad: bool, leaves: tuple[Tensor, ...],
                      probe: Callable[[], Union[Tensor, tuple[Tensor, ...]]]) -> Union[Tensor, tuple[Tensor, ...]]:
    """``chunk_fn(h_s, *teacher_chunks, *consts)`` over the ``N * R`` positions, ``chunk_size`` rows at a time.

    ``student_hidden [N, R, H]`` and each teacher row tensor ``[N, R, ...]`` are flattened to rows; with ``mask``
    only rows where ``mask > 0`` are computed (the others are 0). Each chunk runs under ``torch.utils.checkpoint``
    when ``needs_grad`` (its logits are recomputed in backward). ``chunk_fn`` returns ``[n]`` or a tuple of ``[n]``;
    the result is ``[N, R]`` (or a tuple). With no valid row, ``probe()`` tells the number of outputs and zeros
    attached to the graph of ``leaves`` (an empty sum) are returned, so backward still works.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive number of positions, got {chunk_size}")
    n, r = student_hidden.shape[:2]
    for t in teacher_rows:
        if t.shape[:2] != (n, r):
            raise ValueError(f"teacher inputs: expected [{n}, {r}, ...] to match the student, got {list(t.shape)}")
    h_s = student_hidden.reshape(n * r, -1)
    rows = [t.reshape(n * r, *t.shape[2:]) for t in teacher_rows]
    idx = None
    if mask is not None:
        idx = (mask.reshape(-1) > 0).nonzero().squeeze(-1)
        h_s, rows = h_s.index_select(0, idx), [t.index_select(0, idx) for t in rows]
    parts: list[tuple[Tensor, ...]] = []
    is_tuple = False
    for s in range(0, h_s.shape[0], chunk_size):
        args = (h_s[s:s + chunk_size], *(t[s:s + chunk_size] for t in rows), *consts)
        res = checkpoint(chunk_fn, *args, use_reentrant=False) if needs_grad else chunk_fn(*args)
        is_tuple = isinstance(res, tuple)
        parts.append(res if is_tuple else (res,))
    if not parts:
        shape = probe()
        zero = sum(x.reshape(-1)[:0].float().sum() for x in leaves)
        outs = [student_hidden.new_zeros((n, r), dtype=torch.float32) + zero
                for _ in (shape if isinstance(shape, tuple) else (shape,))]
        return tuple(outs) if isinstance(shape, tuple) else outs[0]
    outs = []
    for k in range(len(parts[0])):
        flat = torch.cat([p[k] for p in parts]).float()
        if idx is not None:
            flat = flat.new_zeros(n * r).index_put((idx,), flat)  # out-of-place, keeps the graph
        outs.append(flat.reshape(n, r))
    return tuple(outs) if is_tuple else outs[0]


def chunked_divergence(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                       teacher_weight: Tensor, fn: DivergenceFn, *, chunk_size: int = 256,
                       vocab_size: Optional[int] = None, temperature: float = 1.0,
                       student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                       mask: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, ...]]:
    """Per-position ``fn(z_s / T, z_t / T)``, ``z_s = W_s h_s + b_s``, ``z_t = W_t h_t + b_t`` -> ``[N, R]`` fp32.

    ``student_hidden [N, R, H]`` / ``teacher_hidden [N, R, H_T]`` are the final hidden states predicting each
    response token; ``*_weight [V, H]`` the LM heads. Both weights (and biases) are sliced to their first
    ``vocab_size`` rows (embeddings padded beyond the tokenizer); without ``vocab_size`` the two heads must have the
    same number of rows. ``fn`` gets temperature-scaled fp32 logits ``[n, V]`` and returns ``[n]`` (or a tuple of
    ``[n]`` tensors; a tuple of ``[N, R]`` tensors is then returned).

    Positions are flattened to ``N * R`` rows and processed ``chunk_size`` rows at a time; with ``mask [N, R]`` only
    positions where ``mask > 0`` are computed (the others are 0). When gradients are needed each chunk runs under
    ``torch.utils.checkpoint`` (``use_reentrant=False``): its logits are freed after forward and recomputed in
    backward, so peak memory grows with ``chunk_size * V``, never with ``N * R * V``. The teacher is detached.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive number of positions, got {chunk_size}")
    if vocab_size is None:
        if student_weight.shape[0] != teacher_weight.shape[0]:
            raise ValueError(f"vocab_size: the LM heads have {student_weight.shape[0]} and {teacher_weight.shape[0]} "
                             "rows; pass the shared tokenizer vocabulary size")
        vocab_size = student_weight.shape[0]
    w_s, w_t = student_weight[:vocab_size], teacher_weight.detach()[:vocab_size]
    b_s = None if student_bias is None else student_bias[:vocab_size]
    b_t = None if teacher_bias is None else teacher_bias.detach()[:vocab_size]
    n, r = student_hidden.shape[:2]
    if teacher_hidden.shape[:2] != (n, r):
        raise ValueError(f"teacher_hidden: expected [{n}, {r}, H_T] to match the student, "
                         f"got {list(teacher_hidden.shape)}")
    h_t = teacher_hidden.detach().to(w_t.dtype)
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or w_s.requires_grad
                                              or (b_s is not None and b_s.requires_grad))
    return chunked_positions(_divergence_chunk, student_hidden, (h_t,), (w_s, b_s, w_t, b_t, fn, temperature),
                             chunk_size=chunk_size, mask=mask, needs_grad=needs_grad, leaves=(student_hidden, w_s),
                             probe=lambda: _probe_outputs(fn, w_s))


def _probe_outputs(fn: DivergenceFn, w_s: Tensor):
    """``fn`` on one uniform position (no gradient): tells how many outputs it has when no position is valid."""
    with torch.no_grad():
        z = torch.zeros(1, w_s.shape[0], dtype=torch.float32, device=w_s.device)
        return fn(z, z.clone())
