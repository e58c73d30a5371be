"""The student's forward pass for the loss: what the objectives' plan asks for, computed once per micro-batch."""

from __future__ import annotations

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.logprobs import chunked_token_logprobs, response_hidden
from rlad_pl.models.distributed import root_call
from rlad_pl.objectives.base import ENTROPY, STUDENT_HIDDEN, TEACHER_HIDDEN, TEACHER_TOPK, StudentOutputs


def student_outputs(student, batch: RolloutBatch, *, plan, teacher, temperature: float, chunk_size: int,
                vocab_size: int, log_entropy: bool, step: int) -> StudentOutputs:
    """The student's forward on one micro-batch: sampled-token log-probs (with gradient), entropy, and what the
    objectives' plan asks for besides (hidden states and LM head, the teacher's hidden states or top-k)."""
    hidden = root_call(student, response_hidden, student, batch.input_ids, batch.attention_mask,
                       batch.prompt_len)
    head = student.get_output_embeddings()
    want_entropy = ENTROPY in plan.inputs or log_entropy
    logp, ent = chunked_token_logprobs(hidden, head.weight, batch.response_ids, bias=getattr(head, "bias", None),
                                       temperature=temperature, chunk_size=chunk_size,
                                       with_entropy=want_entropy, vocab_size=vocab_size)
    out = StudentOutputs(logprobs=logp, entropy=ent, vocab_size=vocab_size, temperature=temperature,
                         step=step)
    if STUDENT_HIDDEN in plan.inputs:
        out.hidden, out.lm_head = hidden, head
    if TEACHER_HIDDEN in plan.inputs:
        out.teacher_hidden, out.teacher_lm_head = teacher.hidden(batch)
    if TEACHER_TOPK in plan.inputs:  # the largest teacher_top_k asked for; each objective truncates its own
        out.teacher_topk = teacher.topk(batch, k=plan.top_k, temperature=temperature, chunk_size=chunk_size,
                                        vocab_size=vocab_size)
    return out
