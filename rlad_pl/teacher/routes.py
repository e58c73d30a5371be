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

``RoutedTeachers`` serves the loss's top-k input (``teacher_topk``, full-vocabulary objectives with
``teacher_top_k: k``) with several named teachers: each row's top-k comes from its own teacher.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch, build_sequences
from rlad_pl.core.divergences import VOCAB_LOGPROB_FLOOR
from rlad_pl.core.topk import TeacherTopK
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


class RoutedTeachers(TeacherScorer):
    """Several routed teachers as one scorer of the loss's top-k input: row i is scored by
    ``routes[batch.teacher_ids[i]]`` (``routes`` in routing order: the pipeline's ``teacher_names``). Each teacher
    scores its own rows (``select`` + ``trim_padding``) and the results land back in ``[N, R, k]`` / ``[N, R]``;
    response positions past a teacher's rows' longest response hold the empty distribution of
    ``rlad_pl.core.topk.topk_from_entries`` (ids 0 at the floor, the whole mass in the tail): finite, masked. A
    batch that goes to one teacher (every row, or no ``teacher_ids`` with one route) is that teacher's own result.
    Hidden states are refused: several teachers give no single LM head (set the objective's ``teacher_top_k``)."""

    def __init__(self, routes: list[TeacherRoute]):
        self.routes = list(routes)

    def _route_of(self, batch: RolloutBatch) -> Optional[TeacherRoute]:
        """The one route that scores every row of ``batch``, else None (rows of several teachers)."""
        if batch.teacher_ids is None:
            if len(self.routes) != 1:
                raise ValueError(f"a batch without teacher_ids cannot be routed to one of "
                                 f"{[r.name for r in self.routes]}")
            return self.routes[0]
        ids = batch.teacher_ids
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.routes)):
            raise ValueError(f"teacher_ids {sorted(set(ids.tolist()))} outside the {len(self.routes)} routed "
                             f"teachers {[r.name for r in self.routes]}")
        if len(self.routes) == 1 or (ids.numel() and bool((ids == ids[0]).all())):
            return self.routes[int(ids[0]) if ids.numel() else 0]
        return None

    def topk(self, batch: RolloutBatch, *, k: int, temperature: float, chunk_size: int,
             vocab_size: int) -> TeacherTopK:
        kw = dict(k=k, temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size)
        route = self._route_of(batch)
        if route is not None:
            return route.scorer.topk(batch, **kw)
        (n, r), device = batch.response_mask.shape, batch.response_mask.device
        ids = torch.zeros(n, r, k, dtype=torch.long, device=device)
        logprobs = torch.full((n, r, k), VOCAB_LOGPROB_FLOOR, dtype=torch.float32, device=device)
        tail = torch.zeros(n, r, dtype=torch.float32, device=device)
        for j, route in enumerate(self.routes):
            rows = (batch.teacher_ids == j).nonzero().flatten()
            if rows.numel():
                top = route.scorer.topk(batch.select(rows).trim_padding(), **kw)
                w = top.ids.shape[1]
                ids[rows, :w], logprobs[rows, :w] = top.ids.to(device), top.logprobs.to(logprobs)
                tail[rows, :w] = top.tail.to(tail)
        return TeacherTopK(ids, logprobs, tail)

    def hidden(self, batch: RolloutBatch):
        raise NotImplementedError("several routed teachers give no teacher hidden states; set the objective's "
                                  "teacher_top_k: k (a top-k teacher distribution)")

    def token_logprobs(self, batch: RolloutBatch, *, temperature: float, chunk_size: int,
                       vocab_size: int) -> Tensor:
        raise NotImplementedError("routed teacher log-probs come from the Annotator (rlad_pl.pipeline)")

    def release(self) -> None:
        for r in self.routes:
            r.scorer.release()

    def close(self) -> None:
        for r in self.routes:
            r.scorer.close()


__all__ = ["TeacherConfig", "TeacherRoute", "RoutedTeachers"]
