"""``RolloutLink``: the one place where the Lightning module and the data module meet.

At ``setup`` (after the data module's ``setup``, before the module's) it hands the module the data side's settings
(``configure_rollouts``: sampling temperature, group size, the validation metric's buckets) and hands the data
module's rollout pipeline the module's models (``connect(module.policy())``). So the module never reads the data
module and the data side never calls the module. ``DistillationModule.configure_callbacks`` adds it, so a plain
``Trainer(...).fit(module, datamodule=dm)`` is linked too.
"""

from __future__ import annotations

import lightning as L


class RolloutLink(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "connect"):
            return
        buckets = dm.buckets("test" if stage == "test" else "val")
        pl_module.configure_rollouts(dm.settings, dm.pass_k, buckets, teacher_keys=dm.task.teacher_keys())
        dm.connect(pl_module.policy())
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        dm.last_epoch(None if max_epochs is None else max_epochs - 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """After each optimizer step: asynchronous rollouts due from the new weights start (the data module's
        pipeline takes a snapshot of them)."""
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "after_step"):
            dm.after_step(trainer.current_epoch, batch_idx, trainer.global_step)


__all__ = ["RolloutLink"]
