"""The models a ``DistillationModule`` holds, loaded in one place: ``load_models``.

Every name is resolved and checked (local folder / hub cache / revision / config / weight headers) before any model
loads; only what the objectives' plan needs is loaded: the teacher when an objective needs one, the reference model
when an objective asks for reference log-probs. A LoRA student's adapters-off base stands in for a teacher or a
reference that is the initial student (no second copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.models.compiled import compile_backbone
from rlad_pl.models.loading import (check_tokenizers_match, load_causal_lm, load_tokenizer,
                                    resolve_model_and_tokenizer, shared_vocab_size, warn_remote_code)
from rlad_pl.objectives.base import REF_LOGPROBS
from rlad_pl.objectives.plan import ObjectivePlan
from rlad_pl.teacher import LocalTeacher, TeacherScorer


@dataclass
class Models:
    tokenizer: Any
    student: torch.nn.Module
    teacher_backend: TeacherScorer
    #: the teacher's torch model when it runs in the trainer (LocalTeacher), else None
    teacher: Optional[torch.nn.Module]
    reference: Optional[torch.nn.Module]
    lora: Optional[Any]
    #: names of exactly the files loaded (``org/name@<commit>`` for hub ids), e.g. for the teacher cache
    tags: dict[str, Optional[str]]
    vocab_size: int


def load_models(plan: ObjectivePlan, *, student: str, teacher: Optional[str], tokenizer: Optional[str],
                teacher_tokenizer: Optional[str], student_revision: Optional[str], teacher_revision: Optional[str],
                tokenizer_revision: Optional[str], cache_dir: Optional[str], trust_remote_code: bool, dtype: str,
                teacher_dtype: Optional[str], lora: Optional[dict], gradient_checkpointing: bool, compile: bool,
                teacher_backend: Optional[TeacherScorer]) -> Models:
    """Resolve, check and load the student, its tokenizer, and what ``plan`` needs (see the module docstring)."""
    if plan.needs_teacher and teacher is None:
        raise ConfigError("model.teacher", f"{', '.join(plan.teacher_users)} needs a teacher model path")
    if teacher_backend is not None and not isinstance(teacher_backend, TeacherScorer):
        raise ConfigError("model.teacher_backend", f"expected an rlad_pl.teacher.TeacherScorer, got "
                          f"{type(teacher_backend).__name__}")
    backend = teacher_backend if teacher_backend is not None else LocalTeacher()
    if plan.needs_teacher:  # what the objectives declare, against what the backend can compute: before any load
        backend.check(plan.inputs, list(plan.names), top_k=plan.top_k, responses=plan.responses)
    hub = {"cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    student_src, tok_src = resolve_model_and_tokenizer(student, "model.student", tokenizer, "model.tokenizer",
                                                       student_revision, tokenizer_revision, **hub)
    teacher_src = t_tok_src = None
    if plan.needs_teacher:
        teacher_src, t_tok_src = resolve_model_and_tokenizer(teacher, "model.teacher", teacher_tokenizer,
                                                             "model.teacher_tokenizer", teacher_revision, **hub)
    warn_remote_code(student_src, tok_src, teacher_src, t_tok_src)
    tok = load_tokenizer(tok_src)
    student_model = load_causal_lm(student_src, "model.student", dtype)
    student_model.train()  # from_pretrained returns eval mode
    lora_student = None
    if lora is not None:  # in place: the student stays the Hugging Face model, only adapters require grad
        from rlad_pl.models.lora import apply_lora

        lora_student = apply_lora(student_model, lora, "model.lora")
    if gradient_checkpointing:
        student_model.gradient_checkpointing_enable()
    teacher_model = None
    if plan.needs_teacher:
        check_tokenizers_match(tok, load_tokenizer(t_tok_src), "model.teacher")
        teacher_model = backend.load(teacher_src, teacher_dtype or dtype, student_source=student_src,
                                     student_dtype=dtype, lora=lora_student)
    reference = None
    if REF_LOGPROBS in plan.inputs:
        reference = (lora_student.base_view() if lora_student is not None else
                     load_causal_lm(student_src, "model.student", dtype, trainable=False))
    frozen = [m for m in (teacher_model, reference) if m is not None]
    if compile:  # a side table of compiled backbones: modules and state dicts stay as they are
        for m in (student_model, *frozen):
            compile_backbone(m)
    tags = {"student": student_src.tag, "tokenizer": tok_src.tag,
            "teacher": teacher_src.tag if teacher_src else None}
    return Models(tok, student_model, backend, teacher_model, reference, lora_student, tags,
                  shared_vocab_size(tok, student_model, *frozen))


def shard_models(models, mesh, mixed_precision: Optional[str]) -> None:
    """FSDP2-shard each model (each transformer block, then the root with the embeddings and tied LM head) over the
    strategy's device mesh; a LoRA student's base view is sharded with the student (not a module: skipped)."""
    from rlad_pl.models.distributed import fsdp_mesh, mixed_precision_policy, shard_model

    mesh, policy = fsdp_mesh(mesh), mixed_precision_policy(mixed_precision)
    for m in models:
        if isinstance(m, torch.nn.Module):
            shard_model(m, mesh, policy)
