"""``DistillationModule``'s own input checks, each one ``ConfigError(field, message)`` line before compute is spent.

At construction, before any model loads: the objectives (types, declared inputs, NaN coefficients, distinct names),
the scalar settings and the optimizer / scheduler factories (probed on a dummy parameter). In ``setup``, once the
data module is known: group objectives against the group size and the sampling temperature.
"""

from __future__ import annotations

import math

import torch

from rlad_pl.core.errors import ConfigError, warn_once
from rlad_pl.objectives.base import KNOWN_REQUIREMENTS, AggMode, Objective
from rlad_pl.core.validation import check_choice, check_float, check_int

#: below these, sampling is near-greedy: a group's responses are (nearly) identical
NEAR_GREEDY_TEMPERATURE, NEAR_GREEDY_TOP_P = 0.1, 0.1


def check_objectives(objectives, loss_agg: AggMode) -> list[Objective]:
    """``model.objectives`` as a non-empty list of ``Objective`` whose ``requires`` are all known, with no NaN
    coefficient (it passes every ``< 0`` check and poisons the loss) and distinct names; an objective without its
    own ``loss_agg`` gets ``loss_agg``."""
    if isinstance(objectives, Objective):
        objectives = [objectives]
    if not objectives:
        raise ConfigError("model.objectives", "expected at least one Objective")
    for i, obj in enumerate(objectives):
        if not isinstance(obj, Objective):
            raise ConfigError(f"model.objectives[{i}]", f"expected an rlad_pl Objective, got {type(obj).__name__}")
        unknown = set(obj.requires) - KNOWN_REQUIREMENTS
        if unknown:
            raise ConfigError(f"model.objectives[{i}]", f"{type(obj).__name__} requires unknown inputs "
                              f"{sorted(unknown)}")
        for key, value in vars(obj).items():
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"{obj.name}.{key}", "expected a number, got nan")
        if obj.loss_agg is None:
            obj.loss_agg = loss_agg
    check_unique_names(list(objectives))
    return list(objectives)


def check_settings(grad_clip, temperature, logprob_chunk_size, annotate_batch_size, fsdp_mixed_precision) -> None:
    """The module's scalar settings. A negative ``grad_clip`` would flip the gradient's sign, 0 would zero it:
    positive or None (no clipping); ``temperature`` positive or None (the sampling temperature)."""
    if grad_clip is not None:
        check_float("model.grad_clip", grad_clip, low=0.0, low_open=True, hint=" (null: no clipping)")
    if temperature is not None:
        check_float("model.temperature", temperature, low=0.0, low_open=True,
                    hint=" (null: the sampling temperature)")
    check_int("model.logprob_chunk_size", logprob_chunk_size)
    check_int("model.annotate_batch_size", annotate_batch_size)
    if fsdp_mixed_precision is not None:
        check_choice("model.fsdp_mixed_precision", fsdp_mixed_precision,
                     ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"))


def check_unique_names(objectives: list[Objective]) -> None:
    """Two objectives with one ``name`` would log into (and overwrite) the same metrics."""
    seen: dict[str, int] = {}
    for i, obj in enumerate(objectives):
        if obj.name in seen:
            raise ConfigError(f"model.objectives[{i}].init_args.name", f"objectives {seen[obj.name]} and {i} are "
                              f"both named '{obj.name}' (their metrics would overwrite each other); give each a "
                              "distinct name")
        seen[obj.name] = i


def check_optimizer(optimizer, lr_scheduler) -> None:
    """Build the optimizer (and scheduler) factory on a dummy parameter so that a bad ``init_args`` value fails at
    construction, naming the field, instead of in ``configure_optimizers`` after the models are loaded. Every
    param group's ``lr`` must be a finite number > 0 (``inf`` turns the weights into NaN, 0 trains nothing)."""
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        opt = optimizer([probe])
    except (ValueError, TypeError, RuntimeError) as e:
        words = {"learning rate": "lr", "weight_decay": "weight_decay", "beta": "betas", "epsilon": "eps",
                 "eps": "eps", "momentum": "momentum", "dampening": "dampening", "alpha": "alpha"}
        key = next((k for w, k in words.items() if w in str(e).lower()), None)
        raise ConfigError("model.optimizer.init_args" + (f".{key}" if key else ""), f"{e}") from None
    for group in opt.param_groups:
        lr = group.get("lr")
        lr = float(lr) if isinstance(lr, torch.Tensor) else lr
        if lr is not None:
            check_float("model.optimizer.init_args.lr", lr, low=0.0, low_open=True)
        for key in ("weight_decay", "eps", "momentum"):
            if isinstance(group.get(key), float):
                check_float(f"model.optimizer.init_args.{key}", group[key])
    if lr_scheduler is not None:
        try:
            lr_scheduler(opt)
        except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:
            raise ConfigError("model.lr_scheduler.init_args", f"{type(e).__name__}: {e}") from None


def check_groups(objectives: list[Objective], dm) -> None:
    """Objectives that normalize advantages within a group need ``data.group_size >= 2`` and non-greedy sampling
    (``check_group_sampling``); a data module without these attributes is not checked."""
    group_objs = [type(o).__name__ for o in objectives if o.needs_groups]
    if not group_objs:
        return
    if getattr(dm, "group_size", 2) < 2:
        raise ConfigError("data.group_size", f"{', '.join(group_objs)} normalizes advantages within a group "
                          f"of responses and needs group_size >= 2, got {dm.group_size}")
    if getattr(dm, "sampling", None) is not None:
        check_group_sampling(group_objs, dm.sampling)


def check_group_sampling(group_objs: list[str], sampling) -> None:
    """Group-normalized advantages need different responses within a group. Greedy decoding (temperature 0) makes
    every group identical, so every advantage is 0 and nothing trains: an error. Near-greedy sampling (temperature
    or top_p below 0.1) is legal but mostly gives zero-variance groups: one warning line."""
    names = ", ".join(group_objs)
    if sampling.temperature == 0:
        raise ConfigError("data.sampling.temperature", f"{names} normalizes advantages within a group; greedy "
                          "decoding (temperature 0) gives identical responses, all-zero advantages and no update; "
                          "expected a temperature > 0 (e.g. 1.0)")
    if sampling.temperature < NEAR_GREEDY_TEMPERATURE or sampling.top_p < NEAR_GREEDY_TOP_P:
        warn_once("data.sampling", f"temperature={sampling.temperature:g}, top_p={sampling.top_p:g} is near-greedy: "
                  f"{names} will see many zero-variance groups (watch rollout/zero_variance_groups)")
