"""The rollout pipeline as plain Python (no Lightning): problems -> responses -> scores -> advantages ->
``RolloutBatch`` -> annotation -> optimizer steps. ``RolloutPipeline`` is the entry point; the Lightning data
module (``rlad_pl.training.RolloutDataModule``) only serves its steps."""

from rlad_pl.pipeline.annotator import Annotator
from rlad_pl.pipeline.evaluate import EvalResult, accuracy_table, evaluate_policy
from rlad_pl.pipeline.pipeline import Policy, Rollout, RolloutPipeline
from rlad_pl.pipeline.settings import RolloutSettings

__all__ = ["RolloutPipeline", "RolloutSettings", "Policy", "Rollout", "Annotator", "EvalResult", "evaluate_policy",
           "accuracy_table"]
