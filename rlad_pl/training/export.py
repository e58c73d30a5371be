"""Lightning callbacks: Hugging Face export of the student.

``HFExport`` writes ``save_pretrained`` of the student model and its tokenizer when ``fit`` ends, so the result is
loadable with ``AutoModelForCausalLM.from_pretrained(dir)`` (and by vLLM) without any rlad_pl code. The folder is
checked for writability in ``setup`` (before any compute); the export comes after the run's last checkpoint, so a
failing export loses no training; resuming a finished run (``--ckpt_path`` of its final checkpoint) writes it too;
on Ctrl-C ``RolloutCheckpoint`` calls ``export`` after its checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import lightning as L

from rlad_pl.core.errors import ConfigError
from rlad_pl.core.validation import check_writable
from rlad_pl.models.distributed import full_state_dict  # noqa: F401  (re-exported: the gather used by the export)


class HFExport(L.Callback):
    """Export the trained student in Hugging Face format at the end of ``fit``.

    Args:
        dirpath: target folder; default ``<log_dir>/hf_export`` (``log_dir`` of the first logger, else the trainer's
            ``default_root_dir``).
        enabled: set False to skip the export.
        safe_serialization: write ``model.safetensors`` (else ``pytorch_model.bin``).
        adapter: LoRA students (``model.lora``) are exported merged (``W + scale * B @ A``, base-model names); with
            ``adapter: true`` also the adapter folder ``<dirpath>/adapter`` (``peft.PeftModel.from_pretrained``).
    """

    def __init__(self, dirpath: Optional[str] = None, enabled: bool = True, safe_serialization: bool = True,
                 adapter: bool = False):
        self.dirpath, self.enabled, self.safe_serialization = dirpath, enabled, safe_serialization
        self.adapter = adapter
        self.last_path: Optional[Path] = None

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "hf_export"

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self._exported = False
        if self.enabled and self.adapter and getattr(pl_module, "lora", None) is None:
            raise ConfigError("export.adapter", "only a LoRA student (model.lora) has an adapter to export")
        if stage == "fit" and self.enabled:
            out = self.resolve_dir(trainer)  # on every rank: trainer.log_dir is a broadcast
            if trainer.is_global_zero:
                check_writable(out, "export.dirpath")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # checkpoint first: a failing export must not lose training (a RolloutCheckpoint writes last.ckpt here;
        # recognised by its ``write_last`` so that this file does not import checkpointing.py, which imports it)
        for cb in trainer.checkpoint_callbacks:
            if callable(getattr(cb, "write_last", None)):
                cb.on_train_end(trainer, pl_module)
        self.export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        # fit ends without on_train_end when the restored checkpoint is already at max_epochs (a finished run)
        if not getattr(self, "_exported", False):
            self.export(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        # Ctrl-C: export here only when no RolloutCheckpoint does it (after its checkpoint)
        if isinstance(exception, KeyboardInterrupt) and not any(
                getattr(cb, "save_on_interrupt", False) for cb in trainer.callbacks):
            self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module) -> None:
        """Write ``save_pretrained`` of the student and its tokenizer (a collective under sharding)."""
        if not self.enabled:
            return
        out = self.resolve_dir(trainer)
        # a collective under sharding: every rank gathers bucket by bucket; only rank 0 keeps (and writes) the result
        lora, adapter_state = getattr(pl_module, "lora", None), None
        if lora is not None:  # merged weights in the base model's names; the adapters alone on request
            from rlad_pl.models.lora import adapter_state_dict, merged_state_dict, save_adapter

            state = merged_state_dict(pl_module.student, rank0_only=True)
            adapter_state = adapter_state_dict(lora, rank0_only=True) if self.adapter else None
        else:
            state = full_state_dict(pl_module.student, rank0_only=True)
        self._exported = True  # tried: a failure below is reported once, not retried at on_fit_end
        error = None
        if trainer.is_global_zero:
            try:
                os.makedirs(out, exist_ok=True)
                pl_module.student.save_pretrained(out, state_dict=state, safe_serialization=self.safe_serialization)
                pl_module.tokenizer.save_pretrained(out)
                if adapter_state is not None:
                    save_adapter(lora, Path(out) / "adapter", adapter_state)
            except OSError as e:
                saved = [cb.last_model_path for cb in trainer.checkpoint_callbacks
                         if getattr(cb, "last_model_path", "")]
                kept = f"; the training state is in {saved[0]}" if saved else ""
                error = ConfigError("export.dirpath", f"cannot write the export to {out}: {e.strerror or e}{kept}")
            else:
                self.last_path = out
        trainer.strategy.barrier("hf_export")
        if error is not None:
            raise error

