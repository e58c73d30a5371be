"""The backbone a forward pass runs: a model's eager transformer body, or a compiled callable registered for it.

A side table keyed by the model (``rlad_pl.models.compiled`` fills it for ``model.compile: true``), so modules,
parameters and state dicts stay untouched."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

_REGISTERED: weakref.WeakKeyDictionary[torch.nn.Module, Callable] = weakref.WeakKeyDictionary()


def backbone(model: torch.nn.Module) -> Callable:
    """The callable that computes ``model``'s final hidden states: the registered one, else the eager backbone
    module (``model.<base_model_prefix>``)."""
    fn = _REGISTERED.get(model)
    return fn if fn is not None else getattr(model, model.base_model_prefix)


def register_backbone(model: torch.nn.Module, fn: Callable) -> None:
    _REGISTERED[model] = fn


def has_registered_backbone(model: torch.nn.Module) -> bool:
    return model in _REGISTERED
