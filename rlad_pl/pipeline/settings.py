"""``RolloutSettings``: the rollout pipeline's knobs (``data.*`` in YAML), checked once, one line per bad value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rlad_pl.core.errors import ConfigError
from rlad_pl.core.validation import check_float, check_int
from rlad_pl.data.prompts import PromptFormat
from rlad_pl.rollout.sampler import SamplingParams


@dataclass
class RolloutSettings:
    """How one rollout batch is made and split (see ``RolloutDataModule`` for each field's meaning)."""

    prompts_per_rollout: int = 8
    group_size: int = 8
    micro_batch_size: int = 16
    steps_per_rollout: int = 1
    ppo_epochs: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    scale_std_advantages: bool = True
    max_prompt_length: int = 1024
    correct_threshold: float = 1.0
    log_samples: int = 4
    seed: int = 0
    seed_per_prompt: bool = False
    group_by_length: bool = False
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    #: held-out evaluation: samples per problem and its decoding settings (default: ``sampling`` with ``n = val_k``)
    val_k: int = 4
    val_sampling: Optional[SamplingParams] = None
    #: asynchronous rollouts: a batch is sampled from the weights of up to this many optimizer steps before its
    #: first update (0: synchronous; ``rlad_pl.pipeline.asynchronous``)
    max_off_policy_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("prompts_per_rollout", "group_size", "micro_batch_size", "steps_per_rollout", "ppo_epochs",
                     "val_k"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"data.{name}", f"expected a positive integer, got {value}")
        check_int("data.max_prompt_length", self.max_prompt_length)
        check_int("data.log_samples", self.log_samples, minimum=0)
        check_int("data.seed", self.seed, minimum=0)
        check_int("data.max_off_policy_steps", self.max_off_policy_steps, minimum=0, hint=" (0 = synchronous)")
        check_float("data.correct_threshold", self.correct_threshold)
        if (self.prompts_per_rollout * self.group_size) % self.steps_per_rollout:
            raise ConfigError("data.steps_per_rollout", f"{self.prompts_per_rollout * self.group_size} sequences "
                              f"per rollout do not split into {self.steps_per_rollout} equal optimizer steps")
        self.sampling = (self.sampling or SamplingParams()).with_(n=self.group_size)
        self.val_sampling = (self.val_sampling or self.sampling).with_(n=self.val_k)
        self.prompt_format = self.prompt_format or PromptFormat()

    @property
    def updates_per_rollout(self) -> int:
        return self.steps_per_rollout * self.ppo_epochs

    def rollout_seed(self, epoch: int, rank: int) -> int:
        """The sampling seed of a rank's rollout batch (a fixed function of the epoch, so resumes replay it)."""
        return self.seed + 1_000_003 * epoch + 7919 * rank

    def problem_offset(self, epoch: int, rank: int, world: int) -> int:
        """Index of a rank's first training problem in an epoch (ranks take disjoint, consecutive slices)."""
        return (epoch * world + rank) * self.prompts_per_rollout
