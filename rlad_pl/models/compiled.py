"""Opt-in ``torch.compile`` of the trainer's forward passes (``model.compile: true``).

What is compiled is the transformer backbone that ``rlad_pl.core.logprobs.response_hidden`` runs: the student's training
pass (with its backward), the no-grad annotation passes (old / reference log-probs) and a ``LocalTeacher``'s
forward. The Hugging Face sampler's decode loop and validation keep the eager model (a growing KV cache would
recompile every step). The LM head stays the chunked eager ``rlad_pl.core.logprobs`` path.

The compiled graph is ``torch.compile(backbone, dynamic=True)``: rollout micro-batches change length every step, so
one graph with symbolic shapes serves all of them (plus one recompile for the no-grad passes). The models'
modules, parameters and state dicts are untouched: the compiled callable lives in a side table keyed by the model.

Compiled kernels fuse element-wise work (RMSNorm, rotary embedding, SiLU-gated MLP), which reorders floating-point
reductions: losses and gradients agree with the eager ones to about 1e-5 (relative), they are not bit-identical
(``tests/test_compile.py``). Off by default for that reason.
"""

from __future__ import annotations

import shutil
from typing import Optional

import torch

from rlad_pl.core.backbone import backbone, has_registered_backbone, register_backbone  # noqa: F401
from rlad_pl.core.errors import ConfigError


def compile_backbone(model: Optional[torch.nn.Module]) -> None:
    """Register ``torch.compile(backbone, dynamic=True)`` for ``model`` (None / non-modules: nothing)."""
    if isinstance(model, torch.nn.Module) and not has_registered_backbone(model):
        graph = torch.compile(getattr(model, model.base_model_prefix), dynamic=True)

        def run(input_ids, attention_mask, **kwargs):
            # fresh contiguous inputs: a sliced view's storage offset / strides would each trigger a recompile
            return graph(input_ids=input_ids.clone(), attention_mask=attention_mask.clone(), **kwargs)

        register_backbone(model, run)


def is_compiled(model: torch.nn.Module) -> bool:
    return has_registered_backbone(model)


def check_compile(device: torch.device, strategy: str) -> None:
    """``model.compile`` where it cannot run, as one line before any compute: FSDP2 (``ModelParallelStrategy``)
    is not supported yet, and on CPU inductor needs a C++ compiler on ``PATH``."""
    if "ModelParallel" in strategy:
        raise ConfigError("model.compile", f"not supported with {strategy} (FSDP2) yet; set model.compile: false")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ConfigError("model.compile", "torch.compile on CPU needs a C++ compiler (g++ / clang++) on PATH; "
                          "install one or set model.compile: false")
