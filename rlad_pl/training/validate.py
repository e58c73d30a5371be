"""``ValidateAtStart``: a Lightning callback that runs the data module's validation (Mean@k, Pass@k per difficulty
  bucket, mean response length) once before the first optimizer step and logs it at step 0 under the same tags as
  the regular validation (``val/all/mean@k``, ``val/<bucket>/pass@k``, ``val/response_length_mean``), so every
  run has a "before" point and TensorBoard curves start at 0. Enable it with ``--trainer.callbacks+=
  rlad_pl.training.ValidateAtStart`` or in YAML under ``trainer.callbacks``.

``evaluate_policy`` (the same metrics outside a trainer) lives in ``rlad_pl.pipeline.evaluate``.
"""

from __future__ import annotations

import time

import lightning as L
import torch


class ValidateAtStart(L.Callback):
    """Run the validation metrics once at the start of ``fit`` (before any update) and log them at step 0.

    Args:
        enabled: set False to skip.
        prefix: tag prefix (default ``val``: the same tags as the trainer's validation, so "before" and "after"
            values sit on one curve).
    """

    def __init__(self, enabled: bool = True, prefix: str = "val"):
        self.enabled, self.prefix = enabled, prefix
        self.metrics: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        dm = getattr(trainer, "datamodule", None)
        if not self.enabled or dm is None or not hasattr(dm, "evaluate") or pl_module.val_metric is None:
            return
        t0 = time.perf_counter()
        metric = pl_module.val_metric
        metric.reset()
        rank, world = trainer.global_rank, trainer.world_size
        problems = dm.eval_problems("val")[rank::world]
        lengths = []
        for s in range(0, len(problems), dm.val_batch_prompts):
            res = dm.evaluate(problems[s:s + dm.val_batch_prompts])
            idx = torch.tensor([metric.bucket_index(d) for d in res.difficulties], dtype=torch.long)
            metric.update(res.correct.to(pl_module.device), idx.to(pl_module.device))
            lengths.append(res.lengths.mean())
        values = {f"{self.prefix}/{k}": float(v) for k, v in metric.compute().items()}
        metric.reset()
        if lengths:
            values[f"{self.prefix}/response_length_mean"] = float(torch.stack(lengths).mean())
        values["timing/validate_at_start"] = time.perf_counter() - t0
        self.metrics = values
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
