"""Pluggable objectives. Select one (or a list) in YAML by ``class_path``."""

from rlad_pl.objectives.base import (  # noqa: F401
                                     Denominators,
                                     LossOutput,
                                     Objective,
                                     StudentOutputs,
                                     TokenObjective,
                                     aggregate,
                                     masked_mean,
                                     per_sample_token_mean,
)
from rlad_pl.objectives.grpo import GRPO, kl_estimate, ppo_clipped_surrogate  # noqa: F401
from rlad_pl.objectives.kdrl import KDRL  # noqa: F401
from rlad_pl.objectives.kl import GKDJSD, ForwardKL, KLMix, ReverseKL, SkewKL, TokenKL  # noqa: F401
from rlad_pl.objectives.opd import OPDFullVocab, OPDSampled  # noqa: F401
from rlad_pl.objectives.opsd import OPSD  # noqa: F401
from rlad_pl.objectives.renio import ReNIO  # noqa: F401
from rlad_pl.objectives.sft import SFT  # noqa: F401
from rlad_pl.objectives.trrd import RLAD, TRRD  # noqa: F401
