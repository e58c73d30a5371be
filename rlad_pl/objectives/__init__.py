"""Pluggable objectives. Select one (or a list) in YAML by ``class_path``."""

from rlad_pl.objectives.base import (Denominators, LossOutput, Objective, StudentOutputs, aggregate,  # noqa: F401
                                     masked_mean)
from rlad_pl.objectives.grpo import GRPO, kl_estimate, ppo_clipped_surrogate  # noqa: F401
