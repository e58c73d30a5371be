"""What a set of objectives asks of the rest of the system, read once at setup: ``plan_objectives``.

Each objective declares its ``inputs`` (what its loss needs), ``responses`` (student / teacher / dataset) and
``teacher_prompt`` (same / privileged) (``rlad_pl.objectives.base``). The plan is their union, checked once: unknown
inputs, two response sources in one run, and NaN coefficients are one-line errors naming the objective. The module
computes exactly ``plan.inputs``; the rollout pipeline takes its responses from ``plan.responses`` and builds the
privileged teacher layout when ``plan.teacher_prompt`` says so.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

from rlad_pl.core.errors import ConfigError
from rlad_pl.core.topk import requested_top_k
from rlad_pl.objectives.base import (
    DATASET_PREFIXES,
    KNOWN_INPUTS,
    PRIVILEGED_PROMPT,
    RESPONSE_SOURCES,
    SOURCE_MARKERS,
    TEACHER_INPUT_NAMES,
    TEACHER_PREFIXES,
    TEACHER_PROMPTS,
    AggMode,
    Objective,
    ResponseSource,
    TeacherPrompt,
)


@dataclass(frozen=True)
class Declared:
    """One objective's declaration, in the two parts."""

    inputs: frozenset[str]
    responses: ResponseSource
    teacher_prompt: TeacherPrompt
    needs_teacher: bool


def declared(obj: Objective, field: str = "model.objectives") -> Declared:
    """``obj``'s declaration. An objective of the older API (one ``requires`` set with ``teacher_prefixes`` /
    ``dataset_prefixes`` / ``privileged_prompt`` markers, as a class attribute or set in ``__init__``) is split
    here; unknown names are one line that says what to write instead."""
    name = type(obj).__name__
    req = frozenset(getattr(obj, "requires", frozenset()) or frozenset())
    legacy = not isinstance(inspect.getattr_static(obj, "requires", None), property)
    # an older-API class attribute ``requires`` is the whole declaration (it replaces what a parent declared)
    inputs = (req if legacy else frozenset(getattr(obj, "inputs", frozenset()) or frozenset()) | req) - SOURCE_MARKERS
    unknown = inputs - KNOWN_INPUTS
    if unknown:
        raise ConfigError(field, f"{name} declares unknown inputs {sorted(unknown)}; expected names from "
                          f"{sorted(KNOWN_INPUTS)} in `inputs`, and `responses` = 'teacher' / 'dataset' or "
                          "`teacher_prompt` = 'privileged' for where responses come from")
    responses = "student" if legacy else getattr(obj, "responses", "student")
    if responses == "student":
        responses = "teacher" if TEACHER_PREFIXES in req else "dataset" if DATASET_PREFIXES in req else "student"
    if responses not in RESPONSE_SOURCES:
        raise ConfigError(field, f"{name}.responses: expected one of {', '.join(RESPONSE_SOURCES)}, got {responses!r}")
    prompt = "same" if legacy else getattr(obj, "teacher_prompt", "same")
    if PRIVILEGED_PROMPT in req:
        prompt = "privileged"
    if prompt not in TEACHER_PROMPTS:
        raise ConfigError(field, f"{name}.teacher_prompt: expected one of {', '.join(TEACHER_PROMPTS)}, got "
                          f"{prompt!r}")
    needs_teacher = bool(getattr(obj, "needs_teacher", False) or inputs & TEACHER_INPUT_NAMES
                         or responses == "teacher" or prompt == "privileged")
    return Declared(inputs, responses, prompt, needs_teacher)


@dataclass(frozen=True)
class ObjectivePlan:
    """The union of the objectives' declarations (what to compute, where responses come from)."""

    inputs: frozenset[str]
    responses: ResponseSource = "student"
    teacher_prompt: TeacherPrompt = "same"
    #: names of the objectives that need a teacher (empty: no teacher is loaded)
    teacher_users: tuple[str, ...] = ()
    #: names of the objectives that normalize advantages within a group
    group_users: tuple[str, ...] = ()
    #: the largest ``teacher_top_k`` asked for (None: no top-k teacher distribution)
    top_k: Optional[int] = None
    names: tuple[str, ...] = ()

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_users)


def check_objectives(objectives, loss_agg: AggMode) -> list[Objective]:
    """``model.objectives`` as a non-empty list of ``Objective`` with no NaN coefficient (it passes every ``< 0``
    check and poisons the loss) and distinct names; an objective without its own ``loss_agg`` gets ``loss_agg``."""
    if isinstance(objectives, Objective):
        objectives = [objectives]
    if not objectives:
        raise ConfigError("model.objectives", "expected at least one Objective")
    for i, obj in enumerate(objectives):
        if not isinstance(obj, Objective):
            raise ConfigError(f"model.objectives[{i}]", f"expected an rlad_pl Objective, got {type(obj).__name__}")
        for key, value in vars(obj).items():
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"{obj.name}.{key}", "expected a number, got nan")
        if obj.loss_agg is None:
            obj.loss_agg = loss_agg
    seen: dict[str, int] = {}
    for i, obj in enumerate(objectives):  # one name would log into (and overwrite) the same metrics
        if obj.name in seen:
            raise ConfigError(f"model.objectives[{i}].init_args.name", f"objectives {seen[obj.name]} and {i} are "
                              f"both named '{obj.name}' (their metrics would overwrite each other); give each a "
                              "distinct name")
        seen[obj.name] = i
    return list(objectives)


def plan_objectives(objectives: list[Objective]) -> ObjectivePlan:
    """Read every objective's declaration once and combine them (one-line errors, before any model loads)."""
    decl = [declared(o, f"model.objectives[{i}]") for i, o in enumerate(objectives)]
    sources = sorted({d.responses for d in decl})
    if len(sources) > 1:
        by = ", ".join(f"{type(o).__name__} -> {d.responses}" for o, d in zip(objectives, decl))
        raise ConfigError("model.objectives", f"objectives take their responses from different sources ({by}); "
                          "combine objectives that share one source")
    names = tuple(type(o).__name__ for o in objectives)
    return ObjectivePlan(
        inputs=frozenset().union(*(d.inputs for d in decl)), responses=sources[0],
        teacher_prompt="privileged" if any(d.teacher_prompt == "privileged" for d in decl) else "same",
        teacher_users=tuple(n for n, d in zip(names, decl) if d.needs_teacher),
        group_users=tuple(n for n, o in zip(names, objectives) if getattr(o, "needs_groups", False)),
        top_k=requested_top_k(objectives), names=names)


__all__ = ["Declared", "ObjectivePlan", "declared", "check_objectives", "plan_objectives"]
