"""OPSD: on-policy self-distillation (docs/methods/opsd.md; arXiv 2601.18734 as released in ReNIO).

    v_t  = sum_v clamp( p_T(v|x', y_<t) [log p_T(v|x', y_<t) - log q_S(v|x, y_<t)] , clip_lower, clip_kappa )
    loss = agg(v)          (the release: per-sample token mean, then sample mean -> ``loss_agg: seq_mean_token_mean``)

The teacher scores the student's own responses after the privileged prompt ``x'`` (problem + reference solution):
``teacher_prompt`` is ``privileged`` so the pipeline builds the teacher layout. In OPSD the teacher is the
student's initial weights: point ``model.teacher`` at the student checkpoint. No new loss: this is
``TokenKL(divergence="clipped_forward")``; wrap it in ``ReNIO`` for the sample weights.
"""

from __future__ import annotations

from typing import Optional

from rlad_pl.objectives.kl import TokenKL
from rlad_pl.objectives.off_policy import OffPolicySetting


class OPSD(TokenKL):
    """Per-entry clipped full-vocabulary forward KL at student prefixes, teacher under the privileged prompt.

    ``v_t = sum_v clamp(p_T,v (log p_T,v - log q_S,v), clip_lower, clip_kappa)``; ``loss = agg(v)``.

    Args:
        clip_kappa: per-entry upper clip (release: 0.05 for 1.7B / 4B / OPD, 0.06 for 8B); null: none.
        clip_lower: per-entry lower clip (release: 0); null: none (then with ``clip_kappa: null`` this is plain FKL).
        chunk_size, log_stats, weight, name, loss_agg, teacher_top_k: as in ``TokenKL`` (``teacher_top_k``: the
            clipped FKL over the teacher's top-k + tail buckets, e.g. on a vLLM teacher).
    """

    def __init__(self, clip_kappa: Optional[float] = 0.05, clip_lower: Optional[float] = 0.0, chunk_size: int = 256,
                 log_stats: bool = True, weight: float = 1.0, name: Optional[str] = None,
                 loss_agg: Optional[str] = None, teacher_top_k: Optional[int] = None,
                 off_policy: OffPolicySetting = "auto"):
        super().__init__("clipped_forward", clip_kappa=clip_kappa, clip_lower=clip_lower, prefix_source="student",
                         chunk_size=chunk_size, log_stats=log_stats, weight=weight, name=name, loss_agg=loss_agg,
                         teacher_top_k=teacher_top_k, off_policy=off_policy)
        self.teacher_prompt = "privileged"
