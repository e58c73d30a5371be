"""``EvaluationHooks``: what ``DistillationModule`` logs besides the loss, as ``LightningModule`` hooks (a mixin).

* validation / test: each batch is ``val_k`` scored responses per held-out problem (``EvalResult``, sampled by the
  rollout pipeline) and ``MeanPassAtK`` reports ``<prefix>/<bucket>/mean@n`` and ``pass@k`` plus
  ``<prefix>/response_length_mean``;
* training: one step's scalars, each combined across ranks the way it adds up (``cross_rank_ops``), and on the first
  step of a rollout batch the statistics and text samples that the step carries (``StepBatch.stats`` / ``samples``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import Tensor

from rlad_pl.core.metrics import MeanPassAtK


def cross_rank_ops(logs: dict) -> dict[str, list[str]]:
    """How each logged value combines across ranks: ``sum`` for partial sums (losses over step-wide denominators,
    counters), ``max`` for maxima, ``mean`` for per-rank means over equal-sized rollouts (rewards, fractions)."""
    ops: dict[str, list[str]] = defaultdict(list)
    for k in logs:
        if k.endswith("/loss") or k.startswith("nonfinite/") or k in ("rollout/prompt_truncated",
                                                                        "rollout/teacher_cache_hits"):
            ops["sum"].append(k)
        elif k.endswith("_max"):
            ops["max"].append(k)
        else:
            ops["mean"].append(k)
    return ops


class EvaluationHooks:
    """Mixin of ``DistillationModule`` (listed before ``LightningModule``): validation / test steps and logging.
    The module sets ``val_metric`` (None until ``configure_rollouts`` gets the task's difficulty buckets)."""

    val_metric: Optional[MeanPassAtK]
    _eval_lengths: list[Tensor]

    def _log_train(self, logs: dict[str, Tensor], step) -> None:
        """One training step's scalars (``on_step``); the first step of a rollout batch adds the rollout's
        statistics, its samples and the progress-bar ``reward``."""
        if step.stats is not None:
            logs.update({k: torch.tensor(float(v)) for k, v in step.stats.items()})
            self._log_samples(step.samples)
        for op, keys in cross_rank_ops(logs).items():  # partial sums add up across ranks, maxima take the max
            self.log_dict({k: logs[k].to(self.device) for k in keys}, on_step=True, on_epoch=False, prog_bar=False,
                          sync_dist=self.trainer.world_size > 1, reduce_fx=op)
        if step.stats is not None and "rollout/reward_mean" in logs:
            self.log("reward", logs["rollout/reward_mean"].to(self.device), prog_bar=True, on_step=True,
                     on_epoch=False, sync_dist=self.trainer.world_size > 1)

    def _log_samples(self, samples) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        if not samples or self.global_rank != 0:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                text = "\n\n".join(f"**prompt** `{p}`  \n**response** `{c}`  \n**reward** {r:.3f}"
                                   for p, c, r in samples)
                logger.experiment.add_text("rollouts/samples", text, self.global_step)

    def _eval_step(self, res) -> None:
        idx = torch.tensor([self.val_metric.bucket_index(d) for d in res.difficulties], dtype=torch.long)
        self.val_metric.update(res.correct.to(self.device), idx.to(self.device))
        self._eval_lengths.append(res.lengths.mean())

    def on_validation_epoch_start(self) -> None:
        self._eval_lengths = []

    def validation_step(self, res, batch_idx: int) -> None:
        self._eval_step(res)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    on_test_epoch_start = on_validation_epoch_start

    def test_step(self, res, batch_idx: int) -> None:
        self._eval_step(res)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        if self.val_metric is None:
            return
        values = self.val_metric.compute()
        self.val_metric.reset()
        logs = {f"{prefix}/{k}": v for k, v in values.items()}
        if self._eval_lengths:
            logs[f"{prefix}/response_length_mean"] = torch.stack(self._eval_lengths).mean()
        self.log_dict({k: v.to(self.device) for k, v in logs.items()}, sync_dist=True)
