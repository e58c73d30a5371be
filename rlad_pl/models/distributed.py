"""FSDP2 sharding of the student and the frozen teacher / reference, and full-weight gathering.

Used by ``DistillationModule.configure_model`` under Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard``;
runs on GPUs with NCCL and on CPU with gloo). Layout of one Hugging Face causal LM::

    fully_shard(block) for every transformer block      one all-gather / reduce-scatter group per block
    fully_shard(model)                                  the rest: embeddings, final norm, lm_head (tied weights stay
                                                        in this one group: torch >= 2.13 rejects a tied parameter
                                                        in two groups)

The trainable student and the frozen models are sharded alike; frozen ones have no gradients and no optimizer state.

Two FSDP2 details the module relies on:

* The module computes hidden states with the backbone (``model.model``) and applies the LM head in chunks outside
  ``model.forward``. FSDP2 only unshards the root group around ``forward`` (or a method registered with
  ``register_fsdp_forward_method``), so such calls go through :func:`root_call`. The root group is sharded with
  ``reshard_after_forward=False``: its parameters (embeddings, LM head) stay gathered until backward (trainable) or
  until :func:`reshard` (frozen), so the chunked LM head reads full weights.
* Every rank must run the same collectives in the same order. ``generate`` stops when the rank's own sequences end, so
  sampling from a sharded model would desynchronize ranks; :func:`rlad_pl.models.unsharded.unsharded_copy` gathers the
  weights (all ranks join, bucket by bucket) into a plain rank-local copy that samples without collectives.

Everything here is a no-op or a plain copy for unsharded models, so single-device and DDP runs share the code path.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from rlad_pl.core.errors import ConfigError

#: components that wrappers insert into parameter names (torch.compile, DDP, FSDP1, activation checkpointing)
WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_ROOT_CALL = "_rlad_root_call"
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def is_sharded(model: Optional[nn.Module]) -> bool:
    """True when ``model`` holds FSDP2 / DTensor parameters."""
    return model is not None and any(is_dtensor(p) for p in model.parameters())


def clean_name(name: str) -> str:
    """``name`` without wrapper components (``_orig_mod.``, ``_checkpoint_wrapped_module.``, a leading ``module.``)."""
    parts = [p for p in name.split(".") if p not in WRAPPER_COMPONENTS]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


# -------------------------------------------------------------------------------------------------------------
# sharding
# -------------------------------------------------------------------------------------------------------------

def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face model: modules whose class is in ``_no_split_modules``
    (e.g. ``Qwen2DecoderLayer``), else the children of the longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def fsdp_mesh(mesh):
    """The mesh to shard over. Lightning's ``ModelParallelStrategy`` builds a 2-D ``(data_parallel,
    tensor_parallel)`` mesh (default: nodes x devices per node). rlad_pl applies no tensor parallelism: a dimension
    of size 1 is dropped (plain FSDP over the other); two real dimensions give HSDP (replicate over
    ``data_parallel``, shard within ``tensor_parallel``, i.e. within a node by default)."""
    if mesh is None or mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if mesh.ndim == 2 and len(names) == 2:
        if mesh.size(0) == 1:
            return mesh[names[1]]
        if mesh.size(1) == 1:
            return mesh[names[0]]
    return mesh


def mixed_precision_policy(name: Optional[str]):
    """FSDP2 ``MixedPrecisionPolicy`` for ``name`` (``bf16`` / ``fp16``): compute in that dtype, reduce gradients in
    fp32, keep fp32 sharded master weights. ``None``: no policy."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ConfigError("model.fsdp_mixed_precision", f"expected one of bf16, fp16, fp32, got '{name}'")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=_DTYPES[name], reduce_dtype=torch.float32)


def _check_tied(model: nn.Module, blocks: list[nn.Module]) -> None:
    """A parameter shared between two blocks, or between a block and the rest of the model, would land in two FSDP2
    groups (torch >= 2.13 rejects it): fail with one line instead."""
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    owner: dict[int, str] = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            if owner.setdefault(id(p), f"block {i}") != f"block {i}":
                raise ConfigError("model", f"a parameter of block {i} is shared with {owner[id(p)]}: tied weights "
                                  "must be sharded in one FSDP group")
    for name, m in model.named_modules():
        if id(m) in in_blocks:
            continue
        for pname, p in m._parameters.items():
            if p is not None and id(p) in owner:
                raise ConfigError("model", f"'{name}.{pname}' is shared with {owner[id(p)]}: tied weights must be "
                                  "sharded in one FSDP group")


def shard_model(model: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every transformer block of ``model``, then the root (embeddings + final norm + LM head, tied
    weights included), and register :func:`root_call`. Idempotent."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    blocks = transformer_blocks(model)
    _check_tied(model, blocks)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)

    def _root_call(self, fn, *args, **kw):
        return fn(*args, **kw)

    setattr(model, _ROOT_CALL, types.MethodType(_root_call, model))
    register_fsdp_forward_method(model, _ROOT_CALL)
    return model


def root_call(model: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` inside ``model``'s FSDP2 root forward hooks (root parameters gathered, backward hooks
    set up); a plain call for unsharded models."""
    call = getattr(model, _ROOT_CALL, None)
    if call is None:
        return fn(*args, **kwargs)
    with warnings.catch_warnings():  # hidden-state slices are views; rlad_pl never modifies them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        return call(fn, *args, **kwargs)


def reshard(model: Optional[nn.Module]) -> None:
    """Free the gathered root parameters of a sharded frozen model (they stay gathered after a forward)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


# -------------------------------------------------------------------------------------------------------------
# gathering full weights
# -------------------------------------------------------------------------------------------------------------

def iter_full_tensors(named: Iterable[tuple[str, Tensor]], bucket_bytes: int = 256 << 20,
                      dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None
                      ) -> Iterator[list[tuple[str, Tensor]]]:
    """Buckets of ``(clean name, full tensor)`` of about ``bucket_bytes``.

    A collective: every rank must iterate the same ``named`` sequence to the end. All the gathers of a bucket are
    issued before it is yielded, so no rank acts on a bucket (writes, sends) while another still gathers. A tensor
    shared under several names (tied weights) is gathered once.
    """
    pending: list[tuple[str, Tensor]] = []
    size = 0

    def flush():
        out, done = [], {}
        for name, t in pending:
            key = id(t)
            if key not in done:
                full = t.detach()
                if is_dtensor(full):
                    full = full.full_tensor()
                if dtype is not None and full.is_floating_point():
                    full = full.to(dtype)
                if device is not None:
                    full = full.to(device)
                done[key] = full
            out.append((clean_name(name), done[key]))
        return out

    for name, t in named:
        pending.append((name, t))
        size += t.numel() * t.element_size()  # global numel for DTensors
        if size >= bucket_bytes:
            yield flush()
            pending, size = [], 0
    if pending:
        yield flush()


def full_state_dict(model: nn.Module, rank0_only: bool = True, bucket_bytes: int = 256 << 20
                    ) -> dict[str, Tensor]:
    """Unsharded CPU state dict of ``model``, names cleaned of wrapper prefixes. A collective under sharding: every
    rank must call it; with ``rank0_only`` the other ranks return ``{}`` and hold one bucket at a time."""
    keep = not rank0_only or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out: dict[str, Tensor] = {}
    for bucket in iter_full_tensors(model.state_dict(keep_vars=True).items(), bucket_bytes, device="cpu"):
        if keep:
            out.update(bucket)
    return out


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
