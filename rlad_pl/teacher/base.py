"""Teacher scoring: one interface (``TeacherScorer``), backends chosen in YAML under ``model.teacher_backend``.

The module asks its backend for what the objectives declare in ``requires``; the objectives never see which backend
ran. Three inputs exist:

* ``teacher_logprobs``: ``log pi_T(y_t | prefix)`` at the sampled tokens, ``[N, R]`` (TRRD, KDRL, OPD, ReNIO);
* ``teacher_hidden``: the teacher's final hidden states ``[N, R, H_T]`` plus its LM head, from which the
  full-vocabulary objectives (forward / reverse KL, KL-mix, JSD, skew KL, OPSD) build distributions chunk by chunk;
* ``teacher_topk``: the teacher's top-k ids and log-probs per position plus its remaining mass
  (``rlad_pl.core.topk.TeacherTopK``), for the same objectives with ``teacher_top_k: k``; every backend provides it.

Backends (``rlad_pl.teacher``):

* ``LocalTeacher`` (default, ``rlad_pl.teacher.local``): the frozen teacher in the trainer, a Hugging Face forward;
* ``VLLMTeacher`` (``rlad_pl.teacher.vllm``): an in-process vLLM engine that scores the rollouts by prefill;
* ``ServerTeacher`` (``rlad_pl.teacher.server``): the same from an OpenAI-compatible vLLM server, T = 1.

Every backend sees the teacher's layout of a batch (``teacher_input_ids`` for OPSD's privileged prompt, else the
student's) and returns fp32 values; NaN / -inf are floored by the module as before.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.topk import TeacherTopK
from rlad_pl.objectives.base import TEACHER_HIDDEN, TEACHER_LOGPROBS, TEACHER_PREFIXES, TEACHER_TOPK

FIELD = "model.teacher_backend"
#: the inputs a teacher backend can provide
TEACHER_INPUTS = frozenset({TEACHER_LOGPROBS, TEACHER_HIDDEN, TEACHER_TOPK})


def teacher_layout(batch: RolloutBatch) -> tuple[Tensor, Tensor, int]:
    """``(input_ids, attention_mask, prompt_len)`` the teacher scores: the privileged layout when present."""
    if batch.teacher_input_ids is not None:
        return batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_prompt_len
    return batch.input_ids, batch.attention_mask, batch.prompt_len


class TeacherScorer:
    """A backend that scores rollouts with the frozen teacher.

    ``provides`` lists the objective inputs it can compute; ``check`` refuses (one line) a configuration asking for
    more. ``load`` receives the resolved teacher and returns the ``torch`` model to register on the module (moved,
    sharded and kept in eval mode with it), or ``None`` when the teacher lives elsewhere.
    """

    provides: ClassVar[frozenset[str]] = TEACHER_INPUTS
    #: the teacher is a model in the trainer, so it can also sample teacher-prefix responses
    in_trainer: ClassVar[bool] = True

    #: the largest teacher_top_k the objectives ask for (set by ``check``; an engine sizes its top-k limit by it)
    top_k: Optional[int] = None

    def check(self, requires: frozenset[str], objective_names: list[str], top_k: Optional[int] = None,
              responses: str = "student") -> None:
        """Refuse inputs this backend cannot provide (``requires``: the objectives' planned inputs), and teacher
        responses from a teacher outside the trainer, naming the objectives that want them."""
        missing = (requires & TEACHER_INPUTS) - self.provides
        if missing:
            hint = (" (or set the objective's teacher_top_k: a top-k teacher distribution)"
                    if TEACHER_HIDDEN in missing and TEACHER_TOPK in self.provides else "")
            raise ConfigError(FIELD, f"{', '.join(objective_names)} needs {sorted(missing)}, which "
                              f"{type(self).__name__} cannot provide (it gives {sorted(self.provides)}); use "
                              f"rlad_pl.teacher.LocalTeacher{hint}")
        self.top_k = top_k
        if (responses == "teacher" or TEACHER_PREFIXES in requires) and not self.in_trainer:
            raise ConfigError(FIELD, f"{', '.join(objective_names)} samples responses from the teacher, which needs "
                              "the teacher in the trainer; use rlad_pl.teacher.LocalTeacher")

    def load(self, source, dtype: str, *, student_source=None, student_dtype: Optional[str] = None,
             lora=None) -> Optional[torch.nn.Module]:
        raise NotImplementedError

    def token_logprobs(self, batch: RolloutBatch, *, temperature: float, chunk_size: int,
                       vocab_size: int) -> Tensor:
        """``log_softmax(z[:vocab_size] / temperature)`` at the response tokens, fp32 ``[N, R]``."""
        raise NotImplementedError

    def hidden(self, batch: RolloutBatch) -> tuple[Tensor, torch.nn.Module]:
        """Final hidden states predicting the response tokens ``[N, R, H_T]`` (no grad) and the LM head."""
        raise NotImplementedError(f"{type(self).__name__} provides no teacher hidden states")

    def topk(self, batch: RolloutBatch, *, k: int, temperature: float, chunk_size: int,
             vocab_size: int) -> TeacherTopK:
        """Top-``k`` of ``log_softmax(z[:vocab_size] / temperature)`` per response position, plus the tail."""
        raise NotImplementedError(f"{type(self).__name__} provides no teacher top-k")

    def release(self) -> None:
        """After a round of scoring: free what a sharded model gathered (FSDP2)."""

    def close(self) -> None:
        """Free engines / files; a later call starts again."""


__all__ = ["TeacherScorer", "teacher_layout", "TEACHER_INPUTS", "FIELD"]
