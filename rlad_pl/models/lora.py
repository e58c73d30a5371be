"""LoRA students (PEFT): the ``model.lora`` config, the adapters-off base as a frozen model, merged weights, export.

``model.lora: {r, alpha, dropout, target_modules, ...}`` (PEFT ``LoraConfig`` fields; ``alpha`` / ``dropout`` are
short for ``lora_alpha`` / ``lora_dropout``) injects LoRA layers into the student *in place*
(``peft.get_peft_model``): ``module.student`` stays the Hugging Face model, so every code path (chunked LM head,
``generate``, FSDP2 sharding, gradient checkpointing) is unchanged. Only adapter parameters require grad, so the
optimizer sees only them and checkpoints hold only them (plus their optimizer state); the frozen base is reloaded
from ``model.student``.

Three uses of the base weights without a second copy:

* :class:`BaseModelView` is the student with adapters disabled, used as the teacher / reference of objectives whose
  teacher is the initial student (OPSD, ReNIO-OPSD, a KL reference). Every call through it runs with every LoRA
  layer's ``_disable_adapters`` flag set (no ``requires_grad`` churn, so FSDP2 is unaffected) and in eval mode.
* :func:`sync_named_weights` yields checkpoint-named weights in the base model's names (no ``.base_layer``, no
  ``lora_*``), each LoRA-targeted weight merged as ``W + scale * B @ A`` one tensor at a time: the training model is
  not modified and no second full copy exists (consumers bucket the stream: vLLM sync, unsharded copies, export).
* :func:`save_merged` / :func:`save_adapter` write the merged model (loadable by ``transformers`` and vLLM) and the
  adapter folder (loadable by ``peft.PeftModel.from_pretrained``).

:func:`adapter_named_tensors` is the adapter alone in PEFT checkpoint names, for engines that apply LoRA themselves
(``VLLMSampler(lora_sync="adapter")``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from rlad_pl.core.errors import ConfigError

#: short names accepted for PEFT fields (prime-rl / the issue's spelling)
SHORT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
#: LoraConfig fields rlad_pl cannot honour exactly, with the reason
UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vector is not merged by the weight sync / export",
    "lora_bias": "the lora_B bias is not merged by the weight sync / export",
    "layer_replication": "replicated layers change the model's layout, which the weight sync / export keep",
    "modules_to_save": "fully trained module copies are not supported; target them with LoRA",
    "target_parameters": "LoRA on bare parameters is not supported; use target_modules",
    "task_type": "always CAUSAL_LM",
    "inference_mode": "the adapters are trained",
}
_ADAPTER_COMPONENTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def build_lora_config(spec: Any, field: str = "model.lora"):
    """A ``peft.LoraConfig`` (``task_type=CAUSAL_LM``) from the YAML mapping; one-line ``ConfigError``s name the
    field: unknown or unsupported keys, ``r`` not an integer >= 1, ``lora_alpha`` not > 0, ``lora_dropout`` outside
    [0, 1), an ``init_lora_weights`` that modifies the base weights."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError(field, "LoRA needs the peft package: pip install 'rlad_pl[lora]'") from None
    if not isinstance(spec, dict):
        raise ConfigError(field, f"expected a mapping of LoraConfig fields (r, alpha, dropout, target_modules, "
                                 f"...), got {type(spec).__name__}")
    args: dict[str, Any] = {}
    for key, value in spec.items():
        name = SHORT_NAMES.get(key, key)
        if name in args:
            raise ConfigError(f"{field}.{key}", f"given twice (as '{key}' and '{name}')")
        args[name] = value
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    for name in args:
        if name in UNSUPPORTED:
            raise ConfigError(f"{field}.{name}", f"not supported: {UNSUPPORTED[name]}")
        if name not in known:
            raise ConfigError(f"{field}.{name}", "unknown LoraConfig field (expected r, alpha / lora_alpha, dropout "
                                                 "/ lora_dropout, target_modules, bias, use_rslora, ...)")
    r = args.setdefault("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{field}.r", f"expected an integer >= 1, got {r!r}")
    alpha = args.setdefault("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"{field}.alpha", f"expected a number > 0, got {alpha!r}")
    dropout = args.setdefault("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{field}.dropout", f"expected a number in [0, 1), got {dropout!r}")
    # pissa / olora / loftq / eva / corda modify the base weights, which are reloaded from model.student on resume
    # and serve as the adapters-off teacher
    init = args.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        raise ConfigError(f"{field}.init_lora_weights", f"expected true, false or 'gaussian', got {init!r} (other "
                          "initializations modify the base weights, which are reloaded from model.student)")
    try:
        return LoraConfig(task_type="CAUSAL_LM", **args)
    except (TypeError, ValueError) as e:
        raise ConfigError(field, str(e).splitlines()[0]) from None


@dataclasses.dataclass
class LoraStudent:
    """What the module keeps about its LoRA student (a plain holder, not an ``nn.Module``: the ``PeftModel`` wraps
    the same parameters as ``module.student`` and must not be registered twice)."""

    peft_model: Any
    config: Any

    @property
    def model(self) -> nn.Module:
        return self.peft_model.base_model.model

    def base_view(self) -> BaseModelView:
        return BaseModelView(self.model)


def apply_lora(model: nn.Module, spec: Any, field: str = "model.lora") -> LoraStudent:
    """Inject LoRA layers into ``model`` in place; only adapter parameters stay trainable. Only ``nn.Linear``
    modules inside the backbone may be targeted (the LM head is applied from its weight in chunks)."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    config = build_lora_config(spec, field)
    head = model.get_output_embeddings()
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as e:
        key = "target_modules" if "target" in str(e).lower() else None
        raise ConfigError(f"{field}.{key}" if key else field, str(e).splitlines()[0]) from None
    for name, m in lora_layers(model):
        if not isinstance(m, LoraLinear):
            raise ConfigError(f"{field}.target_modules", f"'{name}' is a {type(m.get_base_layer()).__name__}; "
                                                         "only nn.Linear modules can be LoRA-targeted")
        if m.get_base_layer() is head:
            raise ConfigError(f"{field}.target_modules", f"'{name}' is the LM head, which rlad_pl applies from its "
                                                         "weight in chunks; exclude it")
    return LoraStudent(peft_model, config)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every PEFT tuner layer in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def is_lora(model: Any) -> bool:
    if isinstance(model, BaseModelView):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, eval_mode: bool = True):
    """Run ``model`` as its base: every LoRA layer's adapters off (and eval mode); both restored on exit.
    Re-entrant."""
    layers = [m for _, m in lora_layers(model)]
    flags = [m._disable_adapters for m in layers]
    was_training = model.training
    for m in layers:
        m._disable_adapters = True
    if eval_mode and was_training:
        model.train(False)
    try:
        yield model
    finally:
        for m, f in zip(layers, flags):
            m._disable_adapters = f
        if eval_mode and was_training:
            model.train(True)


class BaseModelView:
    """The LoRA student's base model, usable wherever a frozen teacher / reference model is (log-probs, hidden
    states, ``generate``, weight syncs): attribute access falls through to the student; calls of its methods and
    submodules run inside :func:`adapters_disabled`. Holds no parameters of its own."""

    def __init__(self, target: nn.Module, root: Optional[nn.Module] = None):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_root", root if root is not None else target)

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if isinstance(value, nn.Module):
            return BaseModelView(value, self._root)
        if callable(value) and not isinstance(value, (Tensor, type)) and hasattr(value, "__self__"):
            root = self._root

            def call(*args, **kwargs):
                with adapters_disabled(root):
                    return value(*args, **kwargs)
            return call
        return value

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self._root):
            return self._target(*args, **kwargs)

    def __repr__(self) -> str:
        return f"BaseModelView({type(self._target).__name__})"

    @property
    def base_of(self) -> nn.Module:
        """The module this is a view of."""
        return self._target


def _full(t: Tensor) -> Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "device_mesh") else t


def merged_weight(layer: nn.Module, weight: Tensor) -> Tensor:
    """``W + sum_a scale_a * B_a @ A_a`` over the layer's active adapters, in fp32, cast back to ``W``'s dtype. A
    collective for sharded (DTensor) weights: ``W``, ``A`` and ``B`` are gathered in that order on every rank."""
    from peft.utils.other import transpose

    w = _full(weight)
    out = w.float()
    for a in layer.active_adapters:
        if a not in layer.lora_A:
            continue
        A, B = _full(layer.lora_A[a].weight).float(), _full(layer.lora_B[a].weight).float()
        out = out + transpose(B @ A, layer.fan_in_fan_out) * layer.scaling[a]
    return out.to(w.dtype)


def base_name(name: str) -> Optional[str]:
    """The base model's name of a LoRA student's tensor (``q_proj.base_layer.weight`` -> ``q_proj.weight``), or None
    for adapter tensors."""
    parts = name.split(".")
    if any(p in _ADAPTER_COMPONENTS for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def merged_named(model: nn.Module, named: Iterable[tuple[str, Tensor]], adapters: bool = True
                 ) -> Iterator[tuple[str, Tensor]]:
    """``named`` (``named_parameters()`` or ``state_dict(keep_vars=True).items()`` of a LoRA student) in base-model
    names; LoRA-targeted weights merged (``adapters``) or the plain base weights (not ``adapters``). Lazy: one merged
    tensor per item; other tensors pass through unchanged (DTensors included, for the consumer to gather)."""
    for name, t in named:
        new = base_name(name)
        if new is None:
            continue
        if adapters and name.endswith(".base_layer.weight"):
            layer = model.get_submodule(name[:-len(".base_layer.weight")])
            if not layer.disable_adapters and not layer.merged:
                t = merged_weight(layer, t)
        yield new, t


def sync_named_weights(model: Any) -> Iterator[tuple[str, Tensor]]:
    """What a weight sync sends: ``named_parameters()`` for plain models; merged weights in base names for a LoRA
    student; the base weights for a :class:`BaseModelView`."""
    if isinstance(model, BaseModelView):
        target = model.base_of
        return merged_named(target, target.named_parameters(), adapters=False)
    if is_lora(model):
        return merged_named(model, model.named_parameters())
    return model.named_parameters()


def adapter_config(model: nn.Module) -> tuple[str, Any]:
    """``(adapter name, LoraConfig)`` of a LoRA student's single active adapter (``ConfigError`` otherwise)."""
    active = {a for _, m in lora_layers(model) for a in m.active_adapters}
    configs = getattr(model, "peft_config", None) or {}
    if len(active) != 1 or next(iter(active)) not in configs:
        raise ConfigError("model.lora", f"expected one active LoRA adapter, found {sorted(active)}")
    name = next(iter(active))
    return name, configs[name]


def adapter_named_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The active adapter's ``lora_A`` / ``lora_B`` parameters in PEFT checkpoint names without the
    ``base_model.model.`` prefix (``layers.0.q_proj.lora_A.default.weight`` -> ``layers.0.q_proj.lora_A.weight``),
    as ``adapter_model.safetensors`` holds them. DTensors pass through (the consumer gathers them)."""
    adapter, _ = adapter_config(model)
    for name, p in model.named_parameters():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B") and parts[-2] == adapter:
            yield ".".join(parts[:-2] + parts[-1:]), p


def non_adapter_trainables(model: nn.Module) -> list[str]:
    """Names of trainable parameters that are not ``lora_A`` / ``lora_B`` (e.g. biases under ``bias: all``): an
    adapter-only sync would leave them stale in the engine."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and not any(c in n.split(".") for c in ("lora_A", "lora_B"))]


def export_state_items(model: Any) -> Iterator[tuple[str, Tensor]]:
    """``state_dict`` items for a Hugging Face export: merged (LoRA student), base (view) or as is."""
    if isinstance(model, BaseModelView):
        target = model.base_of
        return merged_named(target, target.state_dict(keep_vars=True).items(), adapters=False)
    items = model.state_dict(keep_vars=True).items()
    return merged_named(model, items) if is_lora(model) else iter(items)


def merged_state_dict(model: Any, rank0_only: bool = True, bucket_bytes: int = 256 << 20) -> dict[str, Tensor]:
    """Unsharded CPU state dict of the merged model (a collective under sharding; ``{}`` on other ranks with
    ``rank0_only``). The export writes it: one full CPU copy, as any ``save_pretrained`` of a sharded model."""
    from rlad_pl.models.distributed import iter_full_tensors

    keep = not rank0_only or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out: dict[str, Tensor] = {}
    for bucket in iter_full_tensors(export_state_items(model), bucket_bytes, device="cpu"):
        if keep:
            out.update(bucket)
    return out


def save_merged(model: nn.Module, out: str | os.PathLike, state: Optional[dict] = None,
                safe_serialization: bool = True) -> None:
    """``save_pretrained`` of the merged model: base-model names and config, no PEFT files."""
    state = merged_state_dict(model) if state is None else state
    model.save_pretrained(out, state_dict=state, safe_serialization=safe_serialization)


def adapter_state_dict(lora: LoraStudent, rank0_only: bool = True) -> dict[str, Tensor]:
    """The adapter tensors in ``PeftModel.state_dict()`` names (gathered: a collective under sharding)."""
    from rlad_pl.models.distributed import iter_full_tensors

    keep = not rank0_only or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    named = [(n, p) for n, p in lora.peft_model.named_parameters() if base_name(n) is None]
    out: dict[str, Tensor] = {}
    for bucket in iter_full_tensors(named, device="cpu"):
        if keep:
            out.update(bucket)
    # iter_full_tensors cleans wrapper components only; PEFT's names keep their 'base_model.model.' prefix
    return {("base_model.model." + k if not k.startswith("base_model.") else k): v for k, v in out.items()}


def save_adapter(lora: LoraStudent, out: str | os.PathLike, state: Optional[dict] = None) -> None:
    """``PeftModel.save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    state = adapter_state_dict(lora) if state is None else state
    lora.peft_model.save_pretrained(out, state_dict=state)


def drop_frozen_student_keys(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` post-hook of a module with a LoRA ``student``: keep only the student's trainable tensors (the
    adapters); the frozen base is reloaded from ``model.student``, so checkpoints stay adapter-sized."""
    keep = {prefix + "student." + n for n, p in module.student.named_parameters() if p.requires_grad}
    for k in [k for k in state_dict if k.startswith(prefix + "student.") and k not in keep]:
        del state_dict[k]


def param_bytes(*models: Optional[nn.Module]) -> int:
    """Bytes of the distinct parameters of ``models`` (shared tensors and views counted once / not at all)."""
    seen: dict[int, int] = {}
    for m in models:
        if m is None or isinstance(m, BaseModelView):
            continue
        for p in m.parameters():
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())
