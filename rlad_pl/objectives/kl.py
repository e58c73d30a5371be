"""Full-vocabulary token-level distillation: the prefix-source x divergence grid (docs/methods/opd.md).

    v_t  = D( q(.|s_t) , p(.|s_t) )  at every response position,  q = softmax(z_S / T),  p = softmax(z_T / T)
    loss = agg(v)                    (the paper's token mean: set ``loss_agg: token_mean``)

``D`` is one of ``rlad_pl.core.divergences`` (``forward`` = KL(p||q), ``reverse`` = KL(q||p), ``mix`` = lam RKL +
(1-lam) FKL, ``jsd`` = GKD generalized JSD(beta), ``skew_forward`` / ``skew_reverse`` = DistiLLM, ``clipped_forward`` =
ReNIO/OPSD per-entry clipped FKL). Prefixes come from the student (``prefix_source: student``, on-policy, cells B/D)
or from teacher samples (``teacher``, cells A/C). The two LM heads run chunk by chunk (``chunked_divergence``).

The four decoupled cells and KL mixing as one-line configs::

    A  {class_path: rlad_pl.objectives.ForwardKL, init_args: {prefix_source: teacher}}
    B  {class_path: rlad_pl.objectives.ForwardKL}
    C  {class_path: rlad_pl.objectives.ReverseKL, init_args: {prefix_source: teacher}}
    D  {class_path: rlad_pl.objectives.ReverseKL}                       (= OPDFullVocab)
    mix {class_path: rlad_pl.objectives.KLMix, init_args: {kl_mix_lambda: 0.25}}
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.divergences import (
    chunked_divergence,
    clipped_forward_kl_lp,
    entropy_lp,
    forward_kl_lp,
    generalized_jsd_lp,
    reverse_kl_lp,
    skew_forward_kl_lp,
    skew_reverse_kl_lp,
    student_logprobs,
    teacher_logprobs,
)
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.topk import check_top_k_value, chunked_topk_divergence, student_buckets
from rlad_pl.objectives.base import (
    STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    TEACHER_TOPK,
    StudentOutputs,
    TokenObjective,
    masked_mean,
)
from rlad_pl.objectives.off_policy import OffPolicySetting

Divergence = Literal["forward", "reverse", "mix", "jsd", "skew_forward", "skew_reverse", "clipped_forward"]
PrefixSource = Literal["student", "teacher", "dataset"]
DIVERGENCES = ("forward", "reverse", "mix", "jsd", "skew_forward", "skew_reverse", "clipped_forward")


class TokenKL(TokenObjective):
    """Per-token full-vocabulary divergence ``v_t = D(q_t, p_t)`` between student and teacher, ``loss = agg(v)``.

    Args:
        divergence: ``forward`` (FKL = sum p log(p/q)), ``reverse`` (RKL = sum q log(q/p)), ``mix``
            (``kl_mix_lambda * RKL + (1 - kl_mix_lambda) * FKL``), ``jsd`` (GKD ``beta KL(p||M) + (1-beta) KL(q||M)``,
            ``M = beta p + (1-beta) q``), ``skew_forward`` (``KL(p || a p + (1-a) q)``), ``skew_reverse``
            (``KL(q || a q + (1-a) p)``) or ``clipped_forward`` (``sum_v clamp(p (log p - log q), clip_lower,
            clip_kappa)``).
        kl_mix_lambda: weight of the REVERSE KL in ``mix`` (0 = forward, 1 = reverse; default 0.25).
        jsd_beta: GKD beta in [0, 1] (0 -> FKL, 1 -> RKL, special-cased).
        skew_alpha: DistiLLM skew in [0, 1) (0 -> plain FKL / RKL; paper 0.1).
        clip_kappa: per-entry upper clip of ``clipped_forward`` (ReNIO release 0.05); null: no upper clip.
        clip_lower: per-entry lower clip of ``clipped_forward`` (release 0); null: no lower clip.
        prefix_source: ``student`` (on-policy rollouts) or ``teacher`` (the data module samples the responses from
            the teacher; sets ``responses: teacher``) or ``dataset`` (the task's reference solutions,
            outside the 2x2; adds ``dataset_prefixes``).
        teacher_top_k: null (default): the exact full-vocabulary divergence from the teacher's hidden states
            (input ``teacher_hidden``). An integer k: ``D`` over k + 1 buckets, the teacher's top-k tokens per
            position plus one tail bucket for its remaining mass (input ``teacher_topk``, which every teacher
            backend provides, vLLM / server included; ``rlad_pl.core.topk``); k = vocabulary size is the exact value.
        chunk_size: response positions per LM-head chunk (peak memory ~ ``chunk_size * V * 4 bytes * a few``).
        log_stats: also log the token-mean FKL, RKL and student entropy (a few extra elementwise ops per chunk).

    Metrics: ``divergence`` (token mean of ``v``), and with ``log_stats`` ``fkl``, ``rkl``, ``entropy``; with
    ``teacher_top_k`` also ``tail_mass`` (token mean of the teacher's mass outside its top-k). With top-k, ``fkl`` /
    ``rkl`` are over the buckets and ``entropy`` is the student's full-vocabulary entropy.
    """

    inputs = frozenset({STUDENT_HIDDEN, TEACHER_HIDDEN})
    needs_teacher = True
    #: the divergence at position t does not depend on the token sampled there, only on the prefix before it: a
    #: per-token weight corrects nothing, a whole prefix drawn far from the current student can be dropped
    off_policy_kinds = ("none", "seq_mask")

    def __init__(self, divergence: Divergence = "forward", kl_mix_lambda: float = 0.25, jsd_beta: float = 0.5,
                 skew_alpha: float = 0.1, clip_kappa: Optional[float] = 0.05, clip_lower: Optional[float] = 0.0,
                 prefix_source: PrefixSource = "student", chunk_size: int = 256, log_stats: bool = True,
                 weight: float = 1.0, name: Optional[str] = None, loss_agg: Optional[str] = None,
                 teacher_top_k: Optional[int] = None, off_policy: OffPolicySetting = "auto"):
        super().__init__(weight=weight, name=name, loss_agg=loss_agg, off_policy=off_policy)
        n = self.name
        self.teacher_top_k = check_top_k_value(f"{n}.teacher_top_k", teacher_top_k)
        if self.teacher_top_k is not None:
            self.inputs = frozenset({STUDENT_HIDDEN, TEACHER_TOPK})
        if divergence not in DIVERGENCES:
            raise ConfigError(f"{n}.divergence", f"expected one of {', '.join(DIVERGENCES)}, got '{divergence}'")
        for key, value in (("kl_mix_lambda", kl_mix_lambda), ("jsd_beta", jsd_beta)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{n}.{key}", f"expected a value in [0, 1], got {value}")
        if not 0.0 <= skew_alpha < 1.0:
            raise ConfigError(f"{n}.skew_alpha", f"expected a value in [0, 1), got {skew_alpha}")
        if clip_kappa is not None and not clip_kappa > 0:
            raise ConfigError(f"{n}.clip_kappa", f"expected a positive per-entry clip or null, got {clip_kappa}")
        if clip_kappa is not None and clip_lower is not None and clip_lower >= clip_kappa:
            raise ConfigError(f"{n}.clip_lower", f"expected a value below clip_kappa={clip_kappa}, got {clip_lower}")
        if prefix_source not in ("student", "teacher", "dataset"):
            raise ConfigError(f"{n}.prefix_source",
                              f"expected 'student', 'teacher' or 'dataset', got '{prefix_source}'")
        if chunk_size < 1:
            raise ConfigError(f"{n}.chunk_size", f"expected a positive number of positions, got {chunk_size}")
        self.divergence, self.kl_mix_lambda, self.jsd_beta = divergence, float(kl_mix_lambda), float(jsd_beta)
        self.skew_alpha, self.clip_kappa, self.clip_lower = float(skew_alpha), clip_kappa, clip_lower
        self.prefix_source, self.chunk_size, self.log_stats = prefix_source, chunk_size, log_stats
        self.responses = prefix_source

    def divergence_lp(self, logq: Tensor, logp: Tensor) -> Tensor:
        """``D`` from student / teacher log-probs ``[..., V]`` -> ``[...]``."""
        d = self.divergence
        if d == "forward":
            return forward_kl_lp(logq, logp)
        if d == "reverse":
            return reverse_kl_lp(logq, logp)
        if d == "mix":
            lam = self.kl_mix_lambda
            if lam in (0.0, 1.0):
                return reverse_kl_lp(logq, logp) if lam == 1.0 else forward_kl_lp(logq, logp)
            return lam * reverse_kl_lp(logq, logp) + (1.0 - lam) * forward_kl_lp(logq, logp)
        if d == "jsd":
            return generalized_jsd_lp(logq, logp, self.jsd_beta)
        if d == "skew_forward":
            return skew_forward_kl_lp(logq, logp, self.skew_alpha)
        if d == "skew_reverse":
            return skew_reverse_kl_lp(logq, logp, self.skew_alpha)
        return clipped_forward_kl_lp(logq, logp, self.clip_kappa, self.clip_lower)

    def chunk_fn(self, z_s: Tensor, z_t: Tensor):
        """Per-position divergence (and detached FKL, RKL, entropy with ``log_stats``) from scaled logits."""
        logq, logp = student_logprobs(z_s), teacher_logprobs(z_t)
        value = self.divergence_lp(logq, logp)
        if not self.log_stats:
            return value
        with torch.no_grad():
            lq = logq.detach()
            return value, forward_kl_lp(lq, logp), reverse_kl_lp(lq, logp), entropy_lp(lq)

    def topk_chunk_fn(self, z_s: Tensor, ids: Tensor, logp_b: Tensor):
        """As ``chunk_fn`` over the k + 1 buckets (``rlad_pl.core.topk``): the student's full log-probs at the teacher's
        ids plus its tail, against the teacher's bucket log-probs ``logp_b``; ``entropy`` over the full vocabulary."""
        logq = student_logprobs(z_s)
        logq_b = student_buckets(logq, ids)
        value = self.divergence_lp(logq_b, logp_b)
        if not self.log_stats:
            return value
        with torch.no_grad():
            lq = logq_b.detach()
            return value, forward_kl_lp(lq, logp_b), reverse_kl_lp(lq, logp_b), entropy_lp(logq.detach())

    def per_token_topk(self, batch: RolloutBatch, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        """``per_token`` from the teacher's top-k (``teacher_top_k`` set)."""
        if out.hidden is None or out.lm_head is None or out.teacher_topk is None:
            raise ValueError(f"{self.name}: needs the student hidden states, LM head and the teacher's top-k "
                             "(inputs student_hidden and teacher_topk)")
        topk = out.teacher_topk
        if topk.k < self.teacher_top_k:
            raise ValueError(f"{self.name}: teacher_topk has k = {topk.k}, this objective asks for "
                             f"{self.teacher_top_k}")
        topk = topk.truncate(self.teacher_top_k)
        mask = batch.response_mask
        res = chunked_topk_divergence(out.hidden, out.lm_head.weight, topk, self.topk_chunk_fn,
                                      chunk_size=self.chunk_size, vocab_size=out.vocab_size,
                                      temperature=out.temperature, student_bias=getattr(out.lm_head, "bias", None),
                                      mask=mask)
        values = res[0] if self.log_stats else res
        metrics = {"divergence": masked_mean(values, mask),
                   "tail_mass": masked_mean(topk.buckets()[..., -1].exp().to(values.device), mask)}
        if self.log_stats:
            metrics.update({"fkl": masked_mean(res[1], mask), "rkl": masked_mean(res[2], mask),
                            "entropy": masked_mean(res[3], mask)})
        return values, metrics

    def per_token(self, batch: RolloutBatch, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        if self.teacher_top_k is not None:
            return self.per_token_topk(batch, out)
        if out.hidden is None or out.lm_head is None or out.teacher_hidden is None or out.teacher_lm_head is None:
            raise ValueError(f"{self.name}: needs the student and teacher hidden states and LM heads "
                             "(inputs student_hidden and teacher_hidden)")
        mask = batch.response_mask
        res = chunked_divergence(out.hidden, out.lm_head.weight, out.teacher_hidden, out.teacher_lm_head.weight,
                                 self.chunk_fn, chunk_size=self.chunk_size, vocab_size=out.vocab_size,
                                 temperature=out.temperature, student_bias=getattr(out.lm_head, "bias", None),
                                 teacher_bias=getattr(out.teacher_lm_head, "bias", None), mask=mask)
        values = res[0] if self.log_stats else res
        metrics = {"divergence": masked_mean(values, mask)}
        if self.log_stats:
            metrics.update({"fkl": masked_mean(res[1], mask), "rkl": masked_mean(res[2], mask),
                            "entropy": masked_mean(res[3], mask)})
        return values, metrics

    def __repr__(self) -> str:
        top_k = "" if self.teacher_top_k is None else f", teacher_top_k={self.teacher_top_k}"
        return (f"{type(self).__name__}(divergence={self.divergence}, prefix_source={self.prefix_source}{top_k}, "
                f"weight={self.weight}, loss_agg={self.loss_agg})")


class ForwardKL(TokenKL):
    """``v_t = KL(p || q) = sum_v p (log p - log q)`` (cells A with teacher prefixes, B with student prefixes)."""

    def __init__(self, prefix_source: PrefixSource = "student", chunk_size: int = 256, log_stats: bool = True,
                 weight: float = 1.0, name: Optional[str] = None, loss_agg: Optional[str] = None,
                 teacher_top_k: Optional[int] = None, off_policy: OffPolicySetting = "auto"):
        super().__init__("forward", prefix_source=prefix_source, chunk_size=chunk_size, log_stats=log_stats,
                         weight=weight, name=name, loss_agg=loss_agg, teacher_top_k=teacher_top_k,
                         off_policy=off_policy)


class ReverseKL(TokenKL):
    """``v_t = KL(q || p) = sum_v q (log q - log p)`` (cells C with teacher prefixes, D = full-vocab OPD)."""

    def __init__(self, prefix_source: PrefixSource = "student", chunk_size: int = 256, log_stats: bool = True,
                 weight: float = 1.0, name: Optional[str] = None, loss_agg: Optional[str] = None,
                 teacher_top_k: Optional[int] = None, off_policy: OffPolicySetting = "auto"):
        super().__init__("reverse", prefix_source=prefix_source, chunk_size=chunk_size, log_stats=log_stats,
                         weight=weight, name=name, loss_agg=loss_agg, teacher_top_k=teacher_top_k,
                         off_policy=off_policy)


class KLMix(TokenKL):
    """``v_t = lam RKL_t + (1 - lam) FKL_t``; ``kl_mix_lambda`` weights the REVERSE KL (default 0.25)."""

    def __init__(self, kl_mix_lambda: float = 0.25, prefix_source: PrefixSource = "student", chunk_size: int = 256,
                 log_stats: bool = True, weight: float = 1.0, name: Optional[str] = None,
                 loss_agg: Optional[str] = None, teacher_top_k: Optional[int] = None,
                 off_policy: OffPolicySetting = "auto"):
        super().__init__("mix", kl_mix_lambda=kl_mix_lambda, prefix_source=prefix_source, chunk_size=chunk_size,
                         log_stats=log_stats, weight=weight, name=name, loss_agg=loss_agg,
                         teacher_top_k=teacher_top_k, off_policy=off_policy)


class GKDJSD(TokenKL):
    """GKD ``v_t = beta KL(p || M) + (1 - beta) KL(q || M)``, ``M = beta p + (1 - beta) q``."""

    def __init__(self, jsd_beta: float = 0.5, prefix_source: PrefixSource = "student", chunk_size: int = 256,
                 log_stats: bool = True, weight: float = 1.0, name: Optional[str] = None,
                 loss_agg: Optional[str] = None, teacher_top_k: Optional[int] = None,
                 off_policy: OffPolicySetting = "auto"):
        super().__init__("jsd", jsd_beta=jsd_beta, prefix_source=prefix_source, chunk_size=chunk_size,
                         log_stats=log_stats, weight=weight, name=name, loss_agg=loss_agg,
                         teacher_top_k=teacher_top_k, off_policy=off_policy)


class SkewKL(TokenKL):
    """DistiLLM skew KL with ``a = skew_alpha``.

    ``direction: forward``: ``v_t = KL(p || a p + (1-a) q)``; ``direction: reverse``: ``v_t = KL(q || a q + (1-a) p)``.
    """

    def __init__(self, skew_alpha: float = 0.1, direction: Literal["forward", "reverse"] = "forward",
                 prefix_source: PrefixSource = "student", chunk_size: int = 256, log_stats: bool = True,
                 weight: float = 1.0, name: Optional[str] = None, loss_agg: Optional[str] = None,
                 teacher_top_k: Optional[int] = None, off_policy: OffPolicySetting = "auto"):
        if direction not in ("forward", "reverse"):
            raise ConfigError(f"{name or 'skewkl'}.direction", f"expected 'forward' or 'reverse', got '{direction}'")
        super().__init__(f"skew_{direction}", skew_alpha=skew_alpha, prefix_source=prefix_source,
                         chunk_size=chunk_size, log_stats=log_stats, weight=weight, name=name, loss_agg=loss_agg,
                         teacher_top_k=teacher_top_k, off_policy=off_policy)
