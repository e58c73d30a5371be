"""``LocalTeacher`` (the default backend): the frozen teacher in the trainer, a Hugging Face forward with the chunked
LM head (``rlad_pl.core.logprobs``), FSDP2-shardable like the student; a LoRA student's adapters-off base when the
teacher is the initial student. Exact, every input (``rlad_pl.teacher.base``), any temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlad_pl.core.logprobs import response_hidden, response_logprobs
from rlad_pl.core.topk import TeacherTopK, chunked_topk
from rlad_pl.models.distributed import reshard, root_call
from rlad_pl.teacher.base import TeacherScorer, teacher_layout


class LocalTeacher(TeacherScorer):
    """The frozen teacher as a Hugging Face model in the trainer (today's behaviour, the default)."""

    def __init__(self):
        self.model = None

    def load(self, source, dtype, *, student_source=None, student_dtype=None, lora=None):
        from rlad_pl.models.loading import load_causal_lm

        # a LoRA student's base with adapters off *is* the initial student: no second copy
        if (lora is not None and student_source is not None and source.tag == student_source.tag
                and dtype == student_dtype):
            self.model = lora.base_view()
        else:
            self.model = load_causal_lm(source, "model.teacher", dtype, trainable=False)
        return self.model

    def token_logprobs(self, batch, *, temperature, chunk_size, vocab_size):
        ids, mask, P = teacher_layout(batch)
        logp, _ = root_call(self.model, response_logprobs, self.model, ids, mask, P, temperature=temperature,
                            chunk_size=chunk_size, vocab_size=vocab_size)
        return logp

    @torch.no_grad()
    def hidden(self, batch):
        ids, mask, P = teacher_layout(batch)
        return root_call(self.model, response_hidden, self.model, ids, mask, P), self.model.get_output_embeddings()

    def topk(self, batch, *, k, temperature, chunk_size, vocab_size):
        ids, mask, P = teacher_layout(batch)
        return root_call(self.model, _local_topk, self.model, ids, mask, P, k, temperature, chunk_size, vocab_size)

    def release(self):
        reshard(self.model)


@torch.no_grad()
def _local_topk(model, ids: Tensor, mask: Tensor, P: int, k: int, temperature: float, chunk_size: int,
                vocab_size: int) -> TeacherTopK:
    """Teacher forward, then the top-k from its LM head chunk by chunk (``rlad_pl.core.topk.chunked_topk``)."""
    head = model.get_output_embeddings()
    return chunked_topk(response_hidden(model, ids, mask, P), head.weight, k, bias=getattr(head, "bias", None),
                        temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size)


__all__ = ["LocalTeacher"]
