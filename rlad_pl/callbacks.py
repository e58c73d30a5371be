"""Lightning callbacks: Hugging Face export of the student.

``HFExport`` writes ``save_pretrained`` of the student model and its tokenizer when ``fit`` ends, so the result is
loadable with ``AutoModelForCausalLM.from_pretrained(dir)`` (and by vLLM) without any rlad_pl code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import lightning as L

from rlad_pl.distributed import full_state_dict  # noqa: F401  (re-exported: the gather used by the export)


class HFExport(L.Callback):
    """Export the trained student in Hugging Face format at the end of ``fit``.

    Args:
        dirpath: target folder; default ``<log_dir>/hf_export`` (``log_dir`` of the first logger, else the trainer's
            ``default_root_dir``).
        enabled: set False to skip the export.
        safe_serialization: write ``model.safetensors`` (else ``pytorch_model.bin``).
    """

    def __init__(self, dirpath: Optional[str] = None, enabled: bool = True, safe_serialization: bool = True):
        self.dirpath, self.enabled, self.safe_serialization = dirpath, enabled, safe_serialization
        self.last_path: Optional[Path] = None

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "hf_export"

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        out = self.resolve_dir(trainer)
        # a collective under sharding: every rank gathers bucket by bucket; only rank 0 keeps (and writes) the result
        state = full_state_dict(pl_module.student, rank0_only=True)
        if trainer.is_global_zero:
            os.makedirs(out, exist_ok=True)
            pl_module.student.save_pretrained(out, state_dict=state, safe_serialization=self.safe_serialization)
            pl_module.tokenizer.save_pretrained(out)
            self.last_path = out
        trainer.strategy.barrier("hf_export")

