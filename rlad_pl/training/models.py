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
from rlad_pl.core.validation import check_int
from rlad_pl.data.prompts import PromptFormat
from rlad_pl.models.compiled import compile_backbone
from rlad_pl.models.loading import (
    check_tokenizers_match,
    load_causal_lm,
    load_tokenizer,
    resolve_model_and_tokenizer,
    shared_vocab_size,
    warn_remote_code,
)
from rlad_pl.objectives.base import REF_LOGPROBS, TEACHER_HIDDEN, TEACHER_LOGPROBS
from rlad_pl.objectives.plan import ObjectivePlan
from rlad_pl.teacher import LocalTeacher, TeacherScorer
from rlad_pl.teacher.routes import RoutedTeachers, TeacherConfig, TeacherRoute


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
    #: named teachers (``model.teachers``), resolved and checked; their models load when routed to
    routes: Optional[dict[str, TeacherRoute]] = None
    student_source: Any = None


def load_models(plan: ObjectivePlan, *, student: str, teacher: Optional[str], tokenizer: Optional[str],
                teacher_tokenizer: Optional[str], student_revision: Optional[str], teacher_revision: Optional[str],
                tokenizer_revision: Optional[str], cache_dir: Optional[str], trust_remote_code: bool, dtype: str,
                teacher_dtype: Optional[str], lora: Optional[dict], gradient_checkpointing: bool, compile: bool,
                teacher_backend: Optional[TeacherScorer], teachers: Optional[dict] = None) -> Models:
    """Resolve, check and load the student, its tokenizer, and what ``plan`` needs (see the module docstring)."""
    if teachers:
        return _load_named(plan, teachers, teacher=teacher, student=student, tokenizer=tokenizer,
                           student_revision=student_revision, tokenizer_revision=tokenizer_revision,
                           cache_dir=cache_dir, trust_remote_code=trust_remote_code, dtype=dtype,
                           teacher_dtype=teacher_dtype, lora=lora, gradient_checkpointing=gradient_checkpointing,
                           compile=compile)
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
    teacher_model = route = None
    if plan.needs_teacher:
        t_tok = load_tokenizer(t_tok_src)
        cross = tokenizers_differ(plan, tok, t_tok, "model.teacher")
        teacher_model = backend.load(teacher_src, teacher_dtype or dtype, student_source=student_src,
                                     student_dtype=dtype, lora=lora_student)
        if cross:  # the teacher reads re-tokenized text: routed through its own tokenizer
            route = TeacherRoute("teacher", backend, t_tok, model=teacher_model, cross=True, student_tokenizer=tok,
                                 tag=teacher_src.tag)
    reference = None
    if REF_LOGPROBS in plan.inputs:
        reference = (lora_student.base_view() if lora_student is not None else
                     load_causal_lm(student_src, "model.student", dtype, trainable=False))
    frozen = [m for m in (None if route is not None else teacher_model, reference) if m is not None]
    if compile:  # a side table of compiled backbones: modules and state dicts stay as they are
        for m in (student_model, *frozen):
            compile_backbone(m)
    tags = {"student": student_src.tag, "tokenizer": tok_src.tag,
            "teacher": teacher_src.tag if teacher_src else None,
            "teacher_tokenizer": t_tok_src.tag if t_tok_src else None}
    return Models(tok, student_model, backend, teacher_model, reference, lora_student, tags,
                  shared_vocab_size(tok, student_model, *frozen), routes={"teacher": route} if route else None,
                  student_source=student_src)


def tokenizers_differ(plan: ObjectivePlan, student_tok, teacher_tok, field: str) -> bool:
    """False when the teacher shares the student's tokenizer; True when it has its own and the objectives can use
    a re-tokenized teacher (sampled-token log-probs only); else one line naming what to use instead."""
    try:
        check_tokenizers_match(student_tok, teacher_tok, field)
        return False
    except ConfigError as e:
        full = sorted(plan.inputs & {"teacher_hidden", "teacher_topk"})
        why = (f"{', '.join(plan.names)} need {full}: distributions over one shared vocabulary" if full else
               f"{', '.join(plan.names)} sample responses from the teacher" if plan.responses == "teacher" else
               f"{', '.join(plan.names)} score under a privileged prompt" if plan.teacher_prompt == "privileged"
               else "")
        if why or TEACHER_LOGPROBS not in plan.inputs:
            head = e.message.split("; distillation needs")[0]
            why = why or "no sampled-token teacher input"
            raise ConfigError(field, f"{head}; {why}: use a teacher with the student's tokenizer, or a sampled-token "
                              "objective (OPDSampled, KDRL, TRRD, ReNIO), which scores re-tokenized text") from None
        return True


def _load_named(plan: ObjectivePlan, teachers: dict, *, teacher, student, tokenizer, student_revision,
                tokenizer_revision, cache_dir, trust_remote_code, dtype, teacher_dtype, lora, gradient_checkpointing,
                compile) -> Models:
    """``model.teachers``: every entry resolved and checked now (names, tokenizers, backends); models load later,
    only those that problems route to (``load_routes``)."""
    if teacher is not None:
        raise ConfigError("model.teachers", "set either model.teacher (one teacher) or model.teachers (named "
                          "teachers), not both")
    if not plan.needs_teacher:
        raise ConfigError("model.teachers", f"{', '.join(plan.names)} use no teacher; remove model.teachers")
    if len(teachers) > 1:
        check_several_teachers(plan)
    hub = {"cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    student_src, tok_src = resolve_model_and_tokenizer(student, "model.student", tokenizer, "model.tokenizer",
                                                       student_revision, tokenizer_revision, **hub)
    tok = load_tokenizer(tok_src)
    routes: dict[str, TeacherRoute] = {}
    tags = {"student": student_src.tag, "tokenizer": tok_src.tag}
    for name, cfg in teachers.items():
        field = f"model.teachers.{name}"
        if isinstance(cfg, str):
            cfg = TeacherConfig(model=cfg)
        elif isinstance(cfg, dict):
            try:
                cfg = TeacherConfig(**cfg)
            except TypeError:
                extra = sorted(set(cfg) - set(TeacherConfig.__dataclass_fields__)) or ["(model missing)"]
                raise ConfigError(field, f"expected model, tokenizer, revision, dtype, backend, prompt_format, "
                                  f"cross_top_k; got "
                                  f"{', '.join(extra)}") from None
        if not isinstance(cfg, TeacherConfig) or not cfg.model:
            raise ConfigError(field, f"expected {{model: <folder or hub id>, ...}}, got {cfg!r}")
        check_int(f"{field}.cross_top_k", cfg.cross_top_k, minimum=0, hint=" (0 = equal shares inside a chunk)")
        backend = cfg.backend if cfg.backend is not None else LocalTeacher()
        if not isinstance(backend, TeacherScorer):
            raise ConfigError(f"{field}.backend", f"expected an rlad_pl.teacher.TeacherScorer, got "
                              f"{type(backend).__name__}")
        try:
            backend.check(plan.inputs, list(plan.names), top_k=plan.top_k, responses=plan.responses)
        except ConfigError as e:
            raise ConfigError(f"{field}.backend", e.message) from None
        src, t_tok_src = resolve_model_and_tokenizer(cfg.model, f"{field}.model", cfg.tokenizer, f"{field}.tokenizer",
                                                     cfg.revision, **hub)
        t_tok = load_tokenizer(t_tok_src)
        cross = tokenizers_differ(plan, tok, t_tok, field)
        routes[name] = TeacherRoute(name, backend, t_tok, cross=cross, student_tokenizer=tok,
                                    prompt_format=cfg.prompt_format or PromptFormat(), tag=src.tag,
                                    cross_top_k=cfg.cross_top_k)
        routes[name].source, routes[name].dtype = src, cfg.dtype or teacher_dtype or dtype
        tags[f"teacher/{name}"] = src.tag
    models = load_models(plan.__class__(inputs=plan.inputs - {TEACHER_LOGPROBS}, names=plan.names),
                         student=student, teacher=None, tokenizer=tokenizer, teacher_tokenizer=None,
                         student_revision=student_revision, teacher_revision=None,
                         tokenizer_revision=tokenizer_revision, cache_dir=cache_dir,
                         trust_remote_code=trust_remote_code, dtype=dtype, teacher_dtype=None, lora=lora,
                         gradient_checkpointing=gradient_checkpointing, compile=compile, teacher_backend=None)
    models.routes, models.tags = routes, {**models.tags, **tags, "teacher": None}
    # one named teacher serves every input as model.teacher; several serve the loss's top-k through RoutedTeachers
    # (the module builds it in routing order: ``routed_scorer``)
    models.teacher_backend = next(iter(routes.values())).scorer if len(routes) == 1 else None
    return models


def check_several_teachers(plan: ObjectivePlan) -> None:
    """Several routed teachers serve the sampled-token objectives and the full-vocabulary ones through their top-k
    (``rlad_pl.teacher.routes.RoutedTeachers``); hidden states, teacher responses and a privileged teacher prompt
    need one teacher: one line each."""
    names = ", ".join(plan.names)
    if TEACHER_HIDDEN in plan.inputs:
        raise ConfigError("model.teachers", f"{names} with several teachers need ['teacher_hidden'], which routed "
                          "teachers do not give; set the objective's teacher_top_k: k (each row's own teacher's "
                          "top-k distribution), or use one teacher (model.teacher)")
    need = ("teacher responses" if plan.responses == "teacher" else
            "a privileged teacher prompt" if plan.teacher_prompt == "privileged" else None)
    if need:
        raise ConfigError("model.teachers", f"{names} with several teachers: routed teachers serve sampled-token "
                          "objectives (OPDSampled, KDRL, TRRD, ReNIO) and full-vocabulary ones with teacher_top_k; "
                          f"{need} need one teacher (model.teacher)")


def load_routes(routes: dict[str, TeacherRoute], used, *, student_source, student_dtype: str, lora,
                vocab_size: int) -> list[torch.nn.Module]:
    """Load the models of the routed teachers in ``used`` (names); returns the torch models to register."""
    out = []
    for name in used:
        r = routes[name]
        if getattr(r, "loaded", False):
            continue
        r.model = r.scorer.load(r.source, r.dtype, student_source=student_source, student_dtype=student_dtype,
                                lora=lora)
        r.loaded = True
        if r.model is not None and not r.cross:
            shared_vocab_size(r.student_tokenizer, r.model)  # its LM head covers the shared vocabulary
        if isinstance(r.model, torch.nn.Module):
            out.append(r.model)
    return out


def shard_models(models, mesh, mixed_precision: Optional[str]) -> None:
    """FSDP2-shard each model (each transformer block, then the root with the embeddings and tied LM head) over the
    strategy's device mesh; a LoRA student's base view is sharded with the student (not a module: skipped)."""
    from rlad_pl.models.distributed import fsdp_mesh, mixed_precision_policy, shard_model

    mesh, policy = fsdp_mesh(mesh), mixed_precision_policy(mixed_precision)
    for m in models:
        if isinstance(m, torch.nn.Module):
            shard_model(m, mesh, policy)


def routed_scorer(routes: dict[str, TeacherRoute], names) -> RoutedTeachers:
    """The loss's teacher with named teachers: the routes ``names`` in routing order (``RolloutBatch.teacher_ids``
    indexes ``names``, as the pipeline's ``teacher_names``)."""
    return RoutedTeachers([routes[n] for n in names])


def routed_teachers(routes: dict[str, TeacherRoute], keys, default: Optional[str], field: str) -> list[str]:
    """The teachers that problems route to, checked in one line each: ``keys`` (``Task.teacher_keys``: the routing
    values; empty: the task routes nothing, every problem goes to ``default``; None: unknown, every teacher)."""
    names = list(routes)
    if default is not None and default not in routes:
        raise ConfigError("model.default_teacher", f"'{default}' is not in model.teachers ({', '.join(names)})")
    if keys is None:
        return names
    unknown = sorted(set(keys) - set(names))
    if unknown:
        raise ConfigError(field, f"problems route to teacher '{unknown[0]}', which model.teachers does not define "
                          f"(it has {', '.join(names)})")
    used = set(keys)
    if not used:
        if default is None and len(names) > 1:
            raise ConfigError("model.default_teacher", f"the task routes no problem to a teacher; name the one "
                              f"of {', '.join(names)} that scores them")
        used = {default or names[0]}
    idle = [n for n in names if n not in used]
    if idle:
        raise ConfigError(f"model.teachers.{idle[0]}", f"no problem routes to it (the task routes to "
                          f"{', '.join(sorted(used))}); remove it or route problems to it")
    return [n for n in names if n in used]
