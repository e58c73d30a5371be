"""The Lightning side: ``DistillationModule`` (models, loss, optimization), ``RolloutDataModule`` (serves the rollout
pipeline's optimizer steps) and the callbacks (checkpoints, export, validation at start, curriculum, TensorBoard)."""

from rlad_pl.training.checkpointing import RolloutCheckpoint
from rlad_pl.training.curriculum import LengthCurriculum
from rlad_pl.training.datamodule import RolloutDataModule
from rlad_pl.training.export import HFExport
from rlad_pl.training.module import DistillationModule
from rlad_pl.training.tb_layout import TensorBoardOverview
from rlad_pl.training.validate import ValidateAtStart

__all__ = ["DistillationModule", "RolloutDataModule", "RolloutCheckpoint", "HFExport", "ValidateAtStart",
           "LengthCurriculum", "TensorBoardOverview"]
