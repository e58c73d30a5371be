"""What ``VLLMSampler(lora_sync="adapter")`` needs of a LoRA student, checked in one line each.

**LoRA students** (``lora_sync``). ``"merged"`` (default): the engine holds the merged model and every sync sends
``W + scale * B @ A`` per targeted weight (the base model's bytes). ``"adapter"``: the engine holds the frozen base
with vLLM's LoRA on (``enable_lora``, ``max_loras=1``, ``max_lora_rank`` = the smallest vLLM rank >= the student's)
and a sync sends only ``lora_A`` / ``lora_B`` (copied, in PEFT names): the worker builds a ``LoRAModel`` from the
tensors (no disk), drops the previous adapter and activates the new one under a **fresh id** (vLLM's caches are keyed
by id: reusing one would keep serving the old tensors), and every request carries that id's ``LoRARequest`` (its
path does not exist, so a reload vLLM might attempt fails loudly instead of serving stale weights). Refused at
``setup`` in one line, before training (``check_adapter_sync``, before the engine starts, and
``check_engine_lora_modules``, once it runs): a non-LoRA model; trainable non-adapter tensors (``bias``); PEFT
features vLLM's LoRA lacks (its ``PEFTHelper`` list); a per-module rank / scaling vLLM would compute differently
from PEFT (alpha / r vs rsLoRA, patterns); rank > 512; modules vLLM cannot LoRA; ``sleep_level: 2`` (it would drop
the base). A sharded student's base is sent once, at the first sync.
"""

from __future__ import annotations

from typing import Any

import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.rollout.vllm_worker import _worker_lora_modules

#: values of ``VLLMSampler(lora_sync=...)``
LORA_SYNC_MODES = ("merged", "adapter")
#: ``max_lora_rank`` values vLLM 0.32 accepts (``vllm.config.lora.MaxLoRARanks``)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_adapter_sync(model: torch.nn.Module) -> tuple[int, dict]:
    """What ``lora_sync: adapter`` needs of the student, checked before the engine starts; returns the largest
    LoRA rank and the PEFT config (as vLLM's ``PEFTHelper`` reads it) for the syncs."""
    from vllm.lora.peft_helper import PEFTHelper

    from rlad_pl.models.lora import BaseModelView, adapter_config, is_lora, lora_layers, non_adapter_trainables

    field = "data.sampler.init_args.lora_sync"
    if isinstance(model, BaseModelView) or not is_lora(model):
        raise ConfigError(field, "'adapter' sends a LoRA student's adapter, but this model has no trainable "
                                 "adapters (set model.lora, or use 'merged')")
    extra = non_adapter_trainables(model)
    if extra:
        raise ConfigError("model.lora.bias" if any(n.endswith("bias") for n in extra) else field,
                          f"lora_sync 'adapter' sends only lora_A / lora_B, but {extra[0]} (and "
                          f"{len(extra) - 1} more) also train; use bias 'none' or lora_sync 'merged'")
    name, cfg = adapter_config(model)
    peft = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    try:
        helper = PEFTHelper.from_dict(peft)
    except (TypeError, ValueError) as e:
        raise ConfigError("model.lora", f"vLLM cannot read this LoRA config: {str(e).splitlines()[0]}") from None
    problems = helper._validate_features() + ([] if helper.bias == "none" else ["Adapter bias is not supported."])
    if problems:
        raise ConfigError(field, f"vLLM's LoRA cannot serve this adapter: {problems[0]} Use 'merged'")
    top = 0
    for module, layer in lora_layers(model):
        r, scale = helper.get_rank_and_scaling(module)
        if r != layer.r[name] or abs(scale - layer.scaling[name]) > 1e-6 * abs(layer.scaling[name]):
            raise ConfigError("model.lora", f"vLLM would apply '{module}' with rank {r} and scaling {scale:g}, "
                              f"PEFT trains it with rank {layer.r[name]} and scaling {layer.scaling[name]:g}; "
                              "use lora_sync 'merged'")
        top = max(top, r)
    if top > VLLM_LORA_RANKS[-1]:
        raise ConfigError("model.lora.r", f"vLLM's LoRA supports ranks up to {VLLM_LORA_RANKS[-1]}, got {top}; "
                                          "use lora_sync 'merged'")
    return top, peft


def adapter_engine_kwargs(lora_rank: int) -> dict[str, Any]:
    """The engine's LoRA settings for a student of rank ``lora_rank``: one adapter, the smallest vLLM rank >= it."""
    return dict(enable_lora=True, max_loras=1, max_cpu_loras=1,
                max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= lora_rank))


def check_max_lora_rank(kwargs: dict[str, Any], lora_rank: int) -> None:
    """``engine_kwargs`` may set ``max_lora_rank``; below the student's rank the engine could not hold the adapter."""
    if kwargs["max_lora_rank"] < lora_rank:
        raise ConfigError("data.sampler.init_args.engine_kwargs.max_lora_rank", f"the student's LoRA rank is "
                          f"{lora_rank}, above max_lora_rank {kwargs['max_lora_rank']}")


def check_engine_lora_modules(llm, model: torch.nn.Module) -> None:
    """Every LoRA-targeted module of the student must be one the engine applies LoRA to (directly or as part of
    a packed module such as ``qkv_proj``); otherwise its update would be dropped silently."""
    from rlad_pl.models.lora import lora_layers

    modules, packed = llm.collective_rpc(_worker_lora_modules)[0]
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    covered = leaves | {sub for leaf, subs in packed.items() if leaf in leaves for sub in subs}
    missing = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)} - covered)
    if missing:
        raise ConfigError("model.lora.target_modules", f"vLLM cannot apply LoRA to {missing} of this model "
                          f"(it can: {sorted(covered)}); drop them or use lora_sync 'merged'")


__all__ = ["LORA_SYNC_MODES", "VLLM_LORA_RANKS", "check_adapter_sync", "adapter_engine_kwargs", "check_max_lora_rank",
           "check_engine_lora_modules"]
