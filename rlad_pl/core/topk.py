"""Top-k teacher distributions: the teacher's k most likely tokens per position plus one tail bucket.

A served teacher (vLLM ``prompt_logprobs=k``) returns, per response position, its top-k token ids and log-probs
instead of hidden states or full logits. With ``p = softmax(z_T[:V] / T)`` (the module temperature, applied *before*
the top-k) and ``S_t`` the teacher's top-k ids at position t, the objective sees k + 1 buckets::

    p_b = p_v (v in S_t),     p_tail = 1 - sum_{v in S_t} p_v          (the teacher's remaining mass, kept)
    q_b = q_v (v in S_t),     q_tail = 1 - sum_{v in S_t} q_v = sum_{v not in S_t} q_v

where ``q = softmax(z_S[:V] / T)`` is the student's own full distribution (never renormalised over the top-k), and
any full-vocabulary divergence ``D`` (``rlad_pl.core.divergences``) is evaluated over the buckets:
``D_k = D(q_b, p_b)``. For k = V the tail is empty and ``D_k`` is the full-vocabulary value. Merging tokens into one
bucket can only lower an f-divergence (data processing), so for FKL, RKL, KL-mix, JSD and skew KL ``D_k <= D``; the
gradient of FKL over buckets is ``(q_v - p_v) / T`` on the top-k and ``(q_u - p_tail q_u / q_tail) / T`` elsewhere (the
teacher's tail mass spread in the student's proportions).

Numerics: log-probs are fp32; a tail that is empty (or below fp32 resolution) is floored at ``VOCAB_LOGPROB_FLOOR``
(``exp(-1000) == 0``), so its bucket drops out of every sum with zero gradient. A teacher with full logits
(``LocalTeacher``) computes its tail as ``logsumexp`` over the complement, exactly; a served teacher only has the
top-k values, so ``tail = log(1 - exp(logsumexp(topk)))`` (``log1mexp`` in fp64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from rlad_pl.core.divergences import VOCAB_LOGPROB_FLOOR, chunked_positions
from rlad_pl.core.errors import ConfigError


@dataclass
class TeacherTopK:
    """Per response position: the teacher's top-k ids ``[N, R, k]`` (long, by descending log-prob), their log-probs
    ``[N, R, k]`` (fp32, normalised over the whole shared vocabulary at the module temperature) and the log of the
    remaining mass ``tail [N, R]`` (fp32). Values at padding positions are arbitrary but finite."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def buckets(self) -> Tensor:
        """Teacher log-probs of the k + 1 buckets ``[N, R, k + 1]`` (top-k, then the tail), NaN / -inf floored."""
        lp = torch.cat([self.logprobs.float(), self.tail.float().unsqueeze(-1)], dim=-1)
        return torch.nan_to_num(lp, nan=VOCAB_LOGPROB_FLOOR, neginf=VOCAB_LOGPROB_FLOOR, posinf=0.0).clamp(
            VOCAB_LOGPROB_FLOOR, 0.0)

    def truncate(self, k: int) -> TeacherTopK:
        """The top-``k`` of a top-``K`` (``k <= K``): the dropped entries' mass joins the tail."""
        if k >= self.k:
            return self
        tail = torch.logsumexp(torch.cat([self.logprobs[..., k:].float(), self.tail.float().unsqueeze(-1)], -1), -1)
        return TeacherTopK(self.ids[..., :k], self.logprobs[..., :k], tail)

    def to(self, device) -> TeacherTopK:
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))


# ------------------------------------------------------------------------------------------------ pure functions
def tail_from_topk(topk_logprobs: Tensor) -> Tensor:
    """``log(1 - sum_k exp(l_k))`` over the last dim, in fp64 (``log1mexp``: ``log(-expm1(s))`` for ``s > -ln 2``,
    else ``log1p(-exp(s))``, ``s = logsumexp(l)``); a sum >= 1 (rounding) gives the floor. Returns fp32."""
    s = torch.logsumexp(torch.nan_to_num(topk_logprobs.double(), nan=VOCAB_LOGPROB_FLOOR), dim=-1).clamp_max(0.0)
    out = torch.where(s > -math.log(2.0), torch.log(-torch.expm1(s)), torch.log1p(-torch.exp(s)))
    return torch.nan_to_num(out, neginf=VOCAB_LOGPROB_FLOOR).clamp_min(VOCAB_LOGPROB_FLOOR).float()


def topk_from_logprobs(logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, values, tail)`` of full log-probs ``[..., V]``: the top-k and ``logsumexp`` over the rest (exact;
    the floor when k = V)."""
    values, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, torch.nan_to_num(rest, neginf=VOCAB_LOGPROB_FLOOR).clamp_min(VOCAB_LOGPROB_FLOOR)


def student_buckets(logq: Tensor, ids: Tensor) -> Tensor:
    """Student log-probs of the k + 1 buckets ``[..., k + 1]`` from its full log-probs ``logq [..., V]`` and the
    teacher's ids ``[..., k]``: ``log q_v`` at the ids, and ``log q_tail = logsumexp`` of the others (entries at the
    ids set to the floor, so an empty tail is ``~ -1000``: probability 0, finite, zero gradient)."""
    top = logq.gather(-1, ids)
    tail = logq.scatter(-1, ids, VOCAB_LOGPROB_FLOOR).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


@torch.no_grad()
def chunked_topk(hidden: Tensor, weight: Tensor, k: int, *, bias: Optional[Tensor] = None, temperature: float = 1.0,
                 chunk_size: int = 256, vocab_size: Optional[int] = None) -> TeacherTopK:
    """Top-k of ``log_softmax(W[:V] h / T)`` from final hidden states ``[N, R, H]``, ``chunk_size`` positions (of
    every sequence) at a time like ``rlad_pl.core.logprobs.chunked_token_logprobs``: only ``[N, chunk, V]`` logits
    exist."""
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    ids, values, tails = [], [], []
    for s in range(0, hidden.shape[1], chunk_size):
        z = F.linear(hidden[:, s:s + chunk_size], weight, bias).float()
        i, v, t = topk_from_logprobs(F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1), k)
        ids.append(i)
        values.append(v)
        tails.append(t)
    n, r = hidden.shape[:2]
    if not ids:
        zeros = hidden.new_zeros((n, r, k), dtype=torch.float32)
        return TeacherTopK(zeros.long(), zeros, zeros[..., 0])
    return TeacherTopK(torch.cat(ids, 1), torch.cat(values, 1), torch.cat(tails, 1))


def topk_from_entries(entries: list[list[Optional[dict[int, float]]]], k: int, length: int) -> TeacherTopK:
    """A ``TeacherTopK`` from per-sequence lists of ``{token id: log-prob}`` (an engine's top-k, already restricted
    to k entries), one per response position (``None``: padding or missing). Missing entries become floor log-probs
    with the whole mass in the tail; the tail is ``tail_from_topk``."""
    n = len(entries)
    ids = torch.zeros(n, length, k, dtype=torch.long)
    lp = torch.full((n, length, k), VOCAB_LOGPROB_FLOOR, dtype=torch.float64)
    for i, row in enumerate(entries):
        for t, entry in enumerate(row[:length]):
            if not entry:
                continue
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            ids[i, t, :len(top)] = torch.tensor([tok for tok, _ in top], dtype=torch.long)
            lp[i, t, :len(top)] = torch.tensor([max(v, VOCAB_LOGPROB_FLOOR) for _, v in top], dtype=torch.float64)
    return TeacherTopK(ids, lp.float(), tail_from_topk(lp))


def _topk_chunk(h_s: Tensor, ids: Tensor, logp_b: Tensor, w_s: Tensor, b_s: Optional[Tensor], fn: Callable,
                temperature: float):
    z_s = F.linear(h_s, w_s, b_s).float()
    return fn(z_s / temperature if temperature != 1.0 else z_s, ids, logp_b)


def chunked_topk_divergence(student_hidden: Tensor, student_weight: Tensor, topk: TeacherTopK, fn: Callable, *,
                            chunk_size: int = 256, vocab_size: Optional[int] = None, temperature: float = 1.0,
                            student_bias: Optional[Tensor] = None,
                            mask: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, ...]]:
    """Per-position ``fn(z_s / T, ids, log p_b)`` -> ``[N, R]`` fp32, the student's LM head chunk by chunk (as
    ``rlad_pl.core.divergences.chunked_divergence``, under activation checkpointing; only ``[chunk, V]`` student logits
    exist). ``fn`` gets the scaled student logits ``[n, V]``, the teacher's ids ``[n, k]`` and bucket log-probs
    ``[n, k + 1]`` (``TeacherTopK.buckets``) and typically applies a divergence to ``(student_buckets(log q, ids),
    log p_b)``."""
    w_s, b_s = student_weight, student_bias
    if vocab_size is not None:
        w_s, b_s = w_s[:vocab_size], None if b_s is None else b_s[:vocab_size]
    if topk.ids.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(f"teacher_topk: expected [{student_hidden.shape[0]}, {student_hidden.shape[1]}, k] to "
                         f"match the student, got {list(topk.ids.shape)}")
    if topk.ids.numel() and int(topk.ids.max()) >= w_s.shape[0]:
        raise ValueError(f"teacher_topk: a token id {int(topk.ids.max())} is outside the shared vocabulary "
                         f"({w_s.shape[0]})")
    ids, logp_b = topk.ids.to(student_hidden.device), topk.buckets().to(student_hidden.device)
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or w_s.requires_grad
                                              or (b_s is not None and b_s.requires_grad))

    def probe():
        with torch.no_grad():
            z = torch.zeros(1, w_s.shape[0], dtype=torch.float32, device=w_s.device)
            return fn(z, torch.zeros(1, 1, dtype=torch.long, device=w_s.device),
                      torch.tensor([[0.0, VOCAB_LOGPROB_FLOOR]], device=w_s.device))

    return chunked_positions(_topk_chunk, student_hidden, (ids, logp_b), (w_s, b_s, fn, temperature),
                             chunk_size=chunk_size, mask=mask, needs_grad=needs_grad, leaves=(student_hidden, w_s),
                             probe=probe)


# ------------------------------------------------------------------------------------------------ configuration
def objective_top_k(obj) -> Optional[int]:
    """``teacher_top_k`` of an objective, looking inside wrappers (``ReNIO.inner``); None: not a top-k objective."""
    while obj is not None:
        k = getattr(obj, "teacher_top_k", None)
        if k is not None:
            return k
        obj = getattr(obj, "inner", None)
    return None


def requested_top_k(objectives: Iterable) -> Optional[int]:
    """The largest ``teacher_top_k`` the objectives ask for (the backend computes that; each objective truncates)."""
    ks = [k for k in (objective_top_k(o) for o in objectives) if k is not None]
    return max(ks) if ks else None


def check_top_k_value(field: str, k) -> Optional[int]:
    """``k`` as given when it is null or an integer >= 1, else one line naming ``field``."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(field, f"expected an integer >= 1 (the teacher's top-k tokens per position) or null (the "
                          f"full vocabulary), got {k!r}")
    return k


def check_top_k_vocab(objectives: Iterable, vocab_size: int) -> None:
    """Refuse a ``teacher_top_k`` above the shared vocabulary (one line), before any compute."""
    for obj in objectives:
        k = objective_top_k(obj)
        if k is not None and k > vocab_size:
            raise ConfigError(f"{obj.name}.teacher_top_k", f"expected at most the shared vocabulary size "
                              f"{vocab_size}, got {k} (k = {vocab_size} is the exact full-vocabulary result)")


__all__ = ["TeacherTopK", "tail_from_topk", "topk_from_logprobs", "student_buckets", "chunked_topk",
           "topk_from_entries", "chunked_topk_divergence", "requested_top_k", "objective_top_k", "check_top_k_value",
           "check_top_k_vocab"]
