"""Named teachers (``model.teachers``) and how each scores the rows routed to it (docs/teachers.md).

``TeacherConfig`` is one entry of ``model.teachers``: the teacher's files, its own tokenizer, dtype, backend and
prompt format. ``TeacherRoute`` is a loaded entry: ``token_logprobs(batch)`` gives the teacher's log-probability of
each student response token, ``[N, R]``, whichever tokenizer the teacher has:

* same tokenizer as the student: the backend scores the student's own token ids (today's path, exact);
* another tokenizer (``cross``): each response's text is re-tokenized for the teacher after the teacher's own prompt
  encoding (its chat template, not the student's), the two tokenizations are aligned by character offsets into the
  finest chunks that spell the same text; chunk k's teacher log-probability ``T_k`` is split among its student tokens
  by the teacher's probability of each token's characters (prefix masses from its top-``cross_top_k`` at the chunk's
  first position: ``rlad_pl.teacher.cross_prefix``; ``cross_top_k: 0`` shares ``T_k`` equally instead;
  docs/methods/cross_tokenizer.md); a student special token inside a response (no text) gets ``LOGPROB_FLOOR``.
  Sampled-token objectives only: full-vocabulary ones compare distributions over
  one vocabulary and are refused in one line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch, build_sequences
from rlad_pl.data.prompts import PromptFormat, encode_prompt
from rlad_pl.objectives.base import LOGPROB_FLOOR
from rlad_pl.teacher.base import TeacherScorer
from rlad_pl.teacher.cross_prefix import map_prefix_logprobs, token_texts
from rlad_pl.teacher.cross_tokenizer import align_cross_tokenizer


@dataclass
class TeacherConfig:
    """One named teacher.

    Args:
        model: folder or hub id ``org/name[@revision]``.
        tokenizer: its tokenizer (default: the model's). When it differs from the student's, the teacher scores
            re-tokenized responses (sampled-token objectives only).
        revision: hub revision of ``model``.
        dtype: weights dtype (default: ``model.teacher_dtype``, else ``model.dtype``).
        backend: how it scores (``rlad_pl.teacher.LocalTeacher`` by default, ``VLLMTeacher``, ``ServerTeacher``).
        prompt_format: how a cross-tokenizer teacher encodes the prompt (default: its chat template when it has
            one, else BOS + text).
        cross_top_k: a cross-tokenizer teacher's top-k used to split a chunk's log-probability among its student
            tokens (prefix masses; 0: equal shares, one teacher pass instead of two).
    """

    model: str
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    dtype: Optional[str] = None
    backend: Optional[TeacherScorer] = None
    prompt_format: Optional[PromptFormat] = None
    cross_top_k: int = 64


@dataclass
class TeacherRoute:
    """A loaded teacher and how it scores student responses."""

    name: str
    scorer: TeacherScorer
    tokenizer: Any
    #: the teacher's torch model when it runs in the trainer, else None
    model: Optional[torch.nn.Module] = None
    #: the teacher has its own tokenizer: responses are re-tokenized and aligned
    cross: bool = False
    student_tokenizer: Any = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    tag: Optional[str] = None
    #: top-k of the teacher for the prefix rule inside chunks (0: equal shares)
    cross_top_k: int = 64

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def token_logprobs(self, batch: RolloutBatch, *, temperature: float, chunk_size: int,
                       vocab_size: int) -> Tensor:
        """The teacher's log-prob of each student response token, ``[N, R]`` (0 at padding)."""
        if not self.cross:
            return self.scorer.token_logprobs(batch, temperature=temperature, chunk_size=chunk_size,
                                              vocab_size=vocab_size)
        return self._cross_logprobs(batch, temperature, chunk_size)

    def _cross_logprobs(self, batch: RolloutBatch, temperature: float, chunk_size: int) -> Tensor:
        if batch.prompt_texts is None:
            raise ValueError(f"teacher '{self.name}' has another tokenizer and needs the prompt texts of the batch")
        stok, ttok = self.student_tokenizer, self.tokenizer
        rows, prompts, alignments = [], [], []
        for i in range(batch.num_sequences):
            resp = batch.response_ids[i][batch.response_mask[i].bool()].tolist()
            al = align_cross_tokenizer(resp, stok, ttok, batch.prompt_texts[i])
            alignments.append(al)
            prompts.append(encode_prompt(ttok, batch.prompt_texts[i], self.prompt_format))
            rows.append(al.teacher_response_ids)
        pad = ttok.pad_token_id if ttok.pad_token_id is not None else (ttok.eos_token_id or 0)
        ids, mask, P, rmask = build_sequences(prompts, rows, pad)
        n = len(rows)
        tbatch = RolloutBatch(ids.to(batch.input_ids.device), mask.to(batch.input_ids.device), P,
                              rmask.to(batch.input_ids.device), torch.zeros(n), torch.zeros(n), torch.arange(n))
        lp = self.scorer.token_logprobs(tbatch, temperature=temperature, chunk_size=chunk_size,
                                        vocab_size=self.vocab_size).float().cpu()
        top = None
        if self.cross_top_k > 0 and any(max(Counter(al.student_chunk).values(), default=0) > 1 for al in alignments):
            top = self.scorer.topk(tbatch, k=min(self.cross_top_k, self.vocab_size), temperature=temperature,
                                   chunk_size=chunk_size, vocab_size=self.vocab_size)
            top_ids, top_lp, texts = top.ids.cpu(), top.logprobs.float().cpu(), token_texts(self.tokenizer)
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        for i, al in enumerate(alignments):
            r = len(rows[i])
            mapped = (al.map_teacher_logprobs(lp[i, :r]) if top is None else
                      map_prefix_logprobs(al, lp[i, :r], top_ids[i, :r], top_lp[i, :r], texts))
            # a student special token inside the response spells no text the teacher could have produced:
            # the floor, not 0 (which would read as "the teacher is certain")
            mapped[~torch.tensor(al.student_mask, dtype=torch.bool)] = LOGPROB_FLOOR
            out[i, :mapped.shape[-1]] = mapped
        return out.to(batch.input_ids.device)


__all__ = ["TeacherConfig", "TeacherRoute"]
