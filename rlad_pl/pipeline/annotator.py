"""``Annotator``: the frozen-model passes over a fresh rollout batch, before any update on it.

It fills what the objectives' plan asks for: old-policy log-probs (several updates per batch, TIS, or the
sampler-mismatch metrics), reference log-probs, and teacher log-probs through the teacher backend
(``rlad_pl.teacher``). The training side builds one with its models once (``DistillationModule.annotator``) and
hands it to the pipeline; the pipeline calls ``annotate`` and never sees the module.

All passes run without gradient in chunks of ``batch_size`` sequences of similar length, each trimmed to its own
padding; NaN / inf log-probs are floored to ``LOGPROB_FLOOR`` and counted (``nonfinite/<name>_logprobs`` in the
returned statistics).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.logprobs import response_logprobs
from rlad_pl.models.distributed import reshard, root_call
from rlad_pl.objectives.base import LOGPROB_FLOOR, OLD_LOGPROBS, REF_LOGPROBS, SAMPLER_LOGPROBS, TEACHER_LOGPROBS
from rlad_pl.rollout.mismatch import logprob_mismatch


@dataclass
class Annotator:
    """Old / reference / teacher log-probs of a rollout batch (see the module docstring).

    Args:
        student: the trainable student (its current weights are the old policy).
        inputs: the objectives' planned inputs (``ObjectivePlan.inputs``).
        teacher: the teacher backend (``TeacherScorer``), or None when no objective needs a teacher.
        routes: named teachers (``model.teachers``, ``rlad_pl.teacher.routes.TeacherRoute``) in routing order: row
            i is scored by ``routes[names[batch.teacher_ids[i]]]``; a teacher with another tokenizer scores
            re-tokenized text. None: ``teacher`` scores every row.
        reference: the frozen reference model, or None.
        temperature: logits are divided by it before every log-softmax.
        chunk_size: sequence positions per LM-head chunk; vocab_size: the shared tokenizer range.
        batch_size: sequences per no-grad forward.
        log_sampler_mismatch: recompute the sampler's log-probs with the training model and report the mismatch.
    """

    student: torch.nn.Module
    inputs: frozenset[str]
    teacher: Optional[object] = None
    routes: Optional[dict] = None
    reference: Optional[torch.nn.Module] = None
    temperature: float = 1.0
    chunk_size: int = 256
    vocab_size: Optional[int] = None
    batch_size: int = 32
    log_sampler_mismatch: bool = True

    @property
    def device(self) -> torch.device:
        p = next(self.student.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def logprobs(self, model, mb: RolloutBatch) -> Tensor:
        """``model``'s log-probs of the response tokens (the student as old policy, or the reference)."""
        logp, _ = root_call(model, response_logprobs, model, mb.input_ids, mb.attention_mask, mb.prompt_len,
                            temperature=self.temperature, chunk_size=self.chunk_size, vocab_size=self.vocab_size)
        return logp

    def teacher_logprobs(self, mb: RolloutBatch) -> Tensor:
        """The teacher's log-probs of the response tokens (each row's own teacher when routed)."""
        kw = dict(temperature=self.temperature, chunk_size=self.chunk_size, vocab_size=self.vocab_size)
        if self.routes is None:
            return self.teacher.token_logprobs(mb, **kw)
        names = list(self.routes)
        if mb.teacher_ids is None:
            if len(names) != 1:
                raise ValueError(f"a batch without teacher_ids cannot be routed to one of {names}")
            return self.routes[names[0]].token_logprobs(mb, **kw)
        out = torch.zeros(mb.response_mask.shape, dtype=torch.float32, device=mb.response_mask.device)
        for k, name in enumerate(names):
            rows = (mb.teacher_ids == k).nonzero().flatten()
            if rows.numel():
                sub = mb.select(rows).trim_padding()
                lp = self.routes[name].token_logprobs(sub, **kw)
                out[rows, :lp.shape[1]] = lp.to(out)
        return out

    def teacher_stats(self, rollout: RolloutBatch) -> dict[str, float]:
        """Per named teacher: its rows and its mean log-prob of the response tokens (``teacher/<name>/*``)."""
        if self.routes is None or rollout.teacher_ids is None or rollout.teacher_logprobs is None:
            return {}
        stats = {}
        for k, name in enumerate(self.routes):
            rows = rollout.teacher_ids == k
            m = rollout.response_mask[rows]
            stats[f"teacher/{name}/sequences"] = float(rows.sum())
            if rows.any():
                stats[f"teacher/{name}/logprob_mean"] = float((rollout.teacher_logprobs[rows] * m).sum()
                                                              / m.sum().clamp_min(1))
        return stats

    def jobs(self, rollout: RolloutBatch, need_old: bool) -> list[tuple[str, Callable[[RolloutBatch], Tensor]]]:
        """The passes this batch needs: ``old`` when several updates share it (``need_old``), for TIS, or to measure
        the sampler mismatch; ``ref``; ``teacher``."""
        has_sampler_lp = rollout.sampler_logprobs is not None
        if SAMPLER_LOGPROBS in self.inputs and not has_sampler_lp:
            raise ConfigError("data.sampler", "an objective needs the sampler's log-probs (TIS correction) but "
                              "this sampler does not report them; use rlad_pl.rollout.vllm.VLLMSampler")
        jobs = []
        if ((OLD_LOGPROBS in self.inputs and need_old) or SAMPLER_LOGPROBS in self.inputs
                or (has_sampler_lp and self.log_sampler_mismatch)):
            jobs.append(("old", lambda mb: self.logprobs(self.student, mb)))
        if REF_LOGPROBS in self.inputs:
            jobs.append(("ref", lambda mb: self.logprobs(self.reference, mb)))
        if TEACHER_LOGPROBS in self.inputs:  # whichever backend scores it (rlad_pl.teacher)
            jobs.append(("teacher", self.teacher_logprobs))
        return jobs

    @torch.no_grad()
    def annotate(self, rollout: RolloutBatch, need_old: bool) -> dict[str, float]:
        """Set ``rollout.{old,ref,teacher}_logprobs`` as needed; return timings, non-finite counts and mismatch."""
        jobs = self.jobs(rollout, need_old)
        stats: dict[str, float] = {}
        if not jobs:
            return stats
        was_training = self.student.training
        self.student.eval()
        device = self.device
        results, seconds, nonfinite = {}, defaultdict(float), defaultdict(float)
        try:
            # chunks of similar length, each trimmed to its own padding; values land back in the full layout
            order = torch.argsort(rollout.attention_mask.sum(-1), stable=True)
            for s in range(0, rollout.num_sequences, self.batch_size):
                idx = order[s:s + self.batch_size]
                mb = rollout.select(idx).trim_padding().to(device)
                for name, score in jobs:
                    t0 = time.perf_counter()
                    lp = score(mb)
                    bad = ~torch.isfinite(lp)
                    nonfinite[name] += (bad & (mb.response_mask > 0)).sum().item()
                    lp = torch.where(bad, torch.full_like(lp, LOGPROB_FLOOR), lp).cpu()
                    full = results.setdefault(name, torch.zeros(rollout.response_mask.shape, dtype=lp.dtype))
                    full[idx, :lp.shape[1]] = lp
                    seconds[name] += time.perf_counter() - t0
        finally:
            self.student.train(was_training)
            for scorer in ([self.teacher] if self.teacher is not None else []) + [
                    r.scorer for r in (self.routes or {}).values()]:
                scorer.release()  # FSDP2: free the frozen models' gathered embeddings / LM head
            reshard(self.reference)
        for name, full in results.items():
            setattr(rollout, f"{name}_logprobs", full)
            stats[f"timing/{name}_logprobs"] = seconds[name]
            if nonfinite[name]:
                stats[f"nonfinite/{name}_logprobs"] = float(nonfinite[name])
        stats.update(self.teacher_stats(rollout))
        if rollout.sampler_logprobs is not None and rollout.old_logprobs is not None:
            mism = logprob_mismatch(rollout.old_logprobs, rollout.sampler_logprobs, rollout.response_mask)
            stats.update({k: float(v) for k, v in mism.items()})
        return stats


__all__ = ["Annotator"]
