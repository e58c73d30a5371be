"""An unsharded copy of a (possibly FSDP2-sharded, possibly LoRA) student, for sampling with Hugging Face decoding."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rlad_pl.models.distributed import clean_name, is_dtensor, iter_full_tensors
from rlad_pl.models.lora import sync_named_weights


def unsharded_copy(model: nn.Module, target: Optional[nn.Module] = None, bucket_bytes: int = 256 << 20
                   ) -> tuple[nn.Module, int]:
    """A plain (unsharded, rank-local) copy of a sharded Hugging Face model with its current weights.

    ``target`` (a previous copy) is refreshed in place. A collective: every rank must call it. The copy is built on
    the meta device, materialized, re-tied (``to_empty`` unties) and filled bucket by bucket. Returns ``(copy,
    bytes gathered)``.
    """
    from transformers import AutoModelForCausalLM

    first = next(iter(model.parameters()))
    device = first.to_local().device if is_dtensor(first) else first.device
    dtype = first.dtype
    if target is None:
        with torch.device("meta"):
            target = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        target.to_empty(device=device)
        target.tie_weights()
        target.requires_grad_(False)
        target.eval()
        tbufs = dict(target.named_buffers())
        for name, buf in model.named_buffers():  # rotary tables etc. (never sharded)
            if clean_name(name) in tbufs:
                tbufs[clean_name(name)].copy_(buf)
    tparams = dict(target.named_parameters())
    nbytes = 0
    with torch.no_grad():
        # base-model names; a LoRA student's weights merged one tensor at a time (its base for a base view)
        for bucket in iter_full_tensors(sync_named_weights(model), bucket_bytes):
            for name, full in bucket:
                tparams[name].copy_(full)
                nbytes += full.numel() * full.element_size()
    return target, nbytes
