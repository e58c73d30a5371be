"""``DistillationModule``'s own input checks, each one ``ConfigError(field, message)`` line before compute is spent.

At construction, before any model loads: the scalar settings and the optimizer / scheduler factories (probed on a
dummy parameter); the objectives themselves are checked by ``rlad_pl.objectives.plan``. When the rollout settings
arrive (``configure_rollouts``): group objectives against the group size and the sampling temperature.
"""

from __future__ import annotations

import torch

from rlad_pl.core.errors import ConfigError, warn_once
from rlad_pl.core.validation import check_choice, check_float, check_int

#: below these, sampling is near-greedy: a group's responses are (nearly) identical
NEAR_GREEDY_TEMPERATURE, NEAR_GREEDY_TOP_P = 0.1, 0.1


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


def check_rollout_settings(plan, objectives, settings) -> None:
    """The data side's settings against the objectives: group sizes and sampling (``check_groups``), and each
    objective's off-policy correction for a synchronous or asynchronous run (``resolve_off_policy``)."""
    check_groups(list(plan.group_users), settings.group_size, settings.sampling)
    for obj in objectives:
        obj.resolve_off_policy(settings.max_off_policy_steps > 0)


def check_groups(group_objs: list[str], group_size: int, sampling) -> None:
    """Objectives that normalize advantages within a group (``group_objs``) need ``data.group_size >= 2`` and
    non-greedy sampling (``check_group_sampling``)."""
    if not group_objs:
        return
    if group_size < 2:
        raise ConfigError("data.group_size", f"{', '.join(group_objs)} normalizes advantages within a group "
                          f"of responses and needs group_size >= 2, got {group_size}")
    if sampling is not None:
        check_group_sampling(group_objs, sampling)


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
