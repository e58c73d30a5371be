"""In-place weight sync from the student into ``VLLMSampler``'s colocated engine (no serialization, no disk when the
engine runs in-process).

``push_weights`` pushes the current parameters in buckets of about ``bucket_bytes``: one RPC opens a layerwise
reload session, one RPC per bucket loads it, one RPC finalizes it (``rlad_pl.rollout.vllm_worker``). Tied embeddings
are sent once (``named_parameters`` de-duplicates them; a stray ``lm_head.weight`` of a tied model is skipped).
DTensor (FSDP2) parameters are gathered with ``full_tensor()`` for a whole bucket, on every rank in the same order,
before that bucket is sent; sends are rank-local (each rank feeds its own engine), so gathers never interleave with a
cross-rank transfer. A LoRA student sends its merged weights ``W + scale * B @ A`` in the base model's names;
``push_adapter`` sends only its ``lora_A`` / ``lora_B`` (``lora_sync: adapter``, ``rlad_pl.rollout.vllm_lora``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from rlad_pl.rollout.vllm_worker import (
    _worker_finish_update,
    _worker_load_bucket,
    _worker_set_adapter,
    _worker_start_update,
)

#: wrapper prefixes stripped from parameter names (torch.compile, DDP, FSDP1, activation checkpointing)
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _clean_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if prefix in name:
                name = name.replace(prefix, "")
                changed = True
    return name


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def named_weights(model: torch.nn.Module, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint-named parameters, tied embeddings once (``named_parameters`` skips shared tensors). A LoRA
    student sends its merged weights ``W + scale * B @ A`` in the base model's names, merged one tensor at a time
    as the buckets fill (``rlad_pl.models.lora.sync_named_weights``); its adapters-off base view sends the base."""
    from rlad_pl.models.lora import sync_named_weights

    for name, p in sync_named_weights(model):
        name = _clean_name(name)
        if tied and name.endswith("lm_head.weight"):
            continue  # a tied model's head is its embedding; vLLM ignores lm_head.* for tied models
        yield name, p


def _materialize(named: list[tuple[str, torch.Tensor]], dtype: torch.dtype, inprocess: bool):
    out = []
    for name, p in named:  # same order on every rank: the full_tensor() collectives line up
        t = p.detach()
        if _is_dtensor(t):
            t = t.full_tensor()
        if t.dtype != dtype:
            t = t.to(dtype)
        if not inprocess:
            t = t.cpu()  # a separate engine process receives the bucket serialized
        out.append((name, t))
    return out


def weight_buckets(model: torch.nn.Module, dtype: torch.dtype, *, bucket_bytes: int, tied: bool,
                   inprocess: bool) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of about ``bucket_bytes``; every DTensor of a bucket is gathered before it is yielded."""
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, p in named_weights(model, tied):
        pending.append((name, p))
        size += p.numel() * dtype.itemsize  # global numel for DTensors
        if size >= bucket_bytes:
            yield _materialize(pending, dtype, inprocess)
            pending, size = [], 0
    if pending:
        yield _materialize(pending, dtype, inprocess)


def push_weights(llm, model: torch.nn.Module, dtype: torch.dtype, *, bucket_bytes: int, tied: bool,
                 inprocess: bool) -> tuple[int, int, int]:
    """One layerwise reload session over ``model``'s (merged) weights: ``(bytes, buckets, tensors)`` sent."""
    nbytes, buckets, tensors = 0, 0, 0
    llm.collective_rpc(_worker_start_update)
    try:
        for bucket in weight_buckets(model, dtype, bucket_bytes=bucket_bytes, tied=tied, inprocess=inprocess):
            llm.collective_rpc(_worker_load_bucket, args=(bucket,))
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            buckets += 1
            tensors += len(bucket)
    finally:
        llm.collective_rpc(_worker_finish_update)
    return nbytes, buckets, tensors


def push_adapter(llm, model: torch.nn.Module, lora_id: int, peft_config: dict, *, inprocess: bool,
                 model_dir: str) -> tuple[Any, int, int]:
    """Send the student's adapter (one RPC) under the fresh ``lora_id``; later requests carry the returned
    ``LoRARequest``. Returns ``(lora_request, bytes, tensors)``."""
    from vllm.lora.request import LoRARequest

    from rlad_pl.models.lora import adapter_named_tensors

    dtype = llm.llm_engine.vllm_config.lora_config.lora_dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, p in adapter_named_tensors(model):  # same order on every rank: the full_tensor() gathers line up
        t = p.detach()
        if _is_dtensor(t):
            t = t.full_tensor()
        t = t.to(dtype=dtype, copy=True)  # a copy: vLLM folds the scaling into lora_B in place
        tensors["base_model.model." + _clean_name(name)] = t if inprocess else t.cpu()
    llm.collective_rpc(_worker_set_adapter, args=(lora_id, tensors, peft_config))
    # no file at this path: should vLLM ever try to (re)load the adapter from disk it fails, never serves stale
    request = LoRARequest(lora_name=f"rlad-student-{lora_id}", lora_int_id=lora_id,
                          lora_path=os.path.join(model_dir, f"in-memory-adapter-{lora_id}"))
    return request, sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors)


__all__ = ["named_weights", "weight_buckets", "push_weights", "push_adapter"]
