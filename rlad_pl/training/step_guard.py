"""``StepGuard``: the non-finite step guard of ``DistillationModule.training_step``.

A step whose loss (any micro-batch) or gradient norm is non-finite is skipped whole: no optimizer or scheduler
step, so parameters, optimizer state and LR schedule stay bit-identical (half a step's gradient would be a
different update than asked). The guard counts the skipped steps and the current streak of them, returns the one
warning line to print the first time, and stops the run with one ``ConfigError`` line after
``max_consecutive_skipped_steps`` in a row. It holds no tensors and does no I/O: the module decides, prints and logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlad_pl.core.errors import ConfigError
from rlad_pl.core.validation import check_int

#: the counter (in ``DistillationModule.counters``, logged and checkpointed) of skipped optimizer steps
SKIPPED = "nonfinite/steps_skipped"


@dataclass
class StepGuard:
    """The skipped-step streak and its limit (``model.max_consecutive_skipped_steps``)."""

    max_consecutive: int = 5
    consecutive: int = 0

    def __post_init__(self) -> None:
        check_int("model.max_consecutive_skipped_steps", self.max_consecutive)

    def step_taken(self) -> None:
        """A finite step was applied: the streak ends."""
        self.consecutive = 0

    def skip(self, counters: dict[str, float], bad_micro_batches: int, micro_batches: int,
             epoch: int) -> Optional[str]:
        """Count a skipped step in ``counters``; the warning line to print if it is the run's first, else None.
        Raises ``ConfigError`` when this is the ``max_consecutive``-th skipped step in a row."""
        counters[SKIPPED] += 1
        self.consecutive += 1
        why = (f"non-finite loss in {bad_micro_batches} micro-batch(es) of {micro_batches}"
               if bad_micro_batches else "non-finite gradient norm")
        if self.consecutive >= self.max_consecutive:
            raise ConfigError("model.max_consecutive_skipped_steps",
                              f"{self.consecutive} optimizer steps in a row were skipped ({why}, "
                              f"epoch {epoch}); stopping. The weights are those of the last finite step; check the "
                              "learning rate, objectives and rewards")
        if counters[SKIPPED] == 1:
            return (f"rlad_pl: warning: skipped an optimizer step ({why}, epoch {epoch}): parameters and optimizer "
                    f"state unchanged; counted in {SKIPPED}")
        return None

    def state_dict(self) -> dict[str, int]:
        """The streak, for checkpoints: a resumed run stops after the same number of skipped steps in a row."""
        return {"consecutive_skipped_steps": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive_skipped_steps", 0))
