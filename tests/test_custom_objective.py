"""A user adds a method by writing one Objective subclass in their own module and naming it by ``class_path``."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import CONFIGS, run_cli, scalars
from rlad_pl.objectives import Objective
from rlad_pl.objectives.base import LossOutput, masked_mean

CALLS = []


class LengthPenalty(Objective):
    """A toy user objective: push log-probs of response tokens down, ``loss = coef * agg(l_S)``."""

    def __init__(self, coef: float = 0.5, weight: float = 1.0, name=None, loss_agg=None):
        super().__init__(weight=weight, name=name, loss_agg=loss_agg)
        self.coef = coef

    def compute(self, batch, out, denom):
        CALLS.append(batch.num_sequences)
        loss = self.coef * self.aggregate(out.logprobs, batch.response_mask, denom)
        return LossOutput(loss, {"mean_logprob": masked_mean(out.logprobs, batch.response_mask),
                                 "coef": torch.tensor(self.coef)})


def test_custom_objective_by_class_path(tmp_path):
    objectives = ('[{"class_path": "rlad_pl.objectives.GRPO"}, '
                  '{"class_path": "test_custom_objective.LengthPenalty", '
                  '"init_args": {"coef": 0.25, "name": "lenpen"}}]')
    cli = run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--trainer.max_epochs", "2",
                  "--trainer.default_root_dir", str(tmp_path), "--model.objectives", objectives,
                  "--export.enabled", "false")
    assert [type(o).__name__ for o in cli.model.objectives] == ["GRPO", "LengthPenalty"]
    assert CALLS == [32, 32, 32, 32]  # 2 epochs x (8 prompts x 8 responses in micro-batches of 32)
    log_dir = Path(cli.trainer.log_dir)
    assert scalars(log_dir, "lenpen/coef") == [0.25, 0.25]
    assert len(scalars(log_dir, "lenpen/mean_logprob")) == 2
    assert len(scalars(log_dir, "grpo/loss")) == 2


def starts_with_a(completion: str, problem) -> float:
    """A user reward function: 1 if the response starts with 'a'."""
    return float(completion.startswith("a"))


def test_custom_reward_callable_by_import_path(tmp_path):
    cli = run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--trainer.max_epochs", "1",
                  "--trainer.default_root_dir", str(tmp_path), "--data.reward", "test_custom_objective.starts_with_a",
                  "--export.enabled", "false")
    dm = cli.datamodule
    assert dm.reward is starts_with_a
    rewards = scalars(Path(cli.trainer.log_dir), "rollout/reward_mean")
    texts = [c for _, c, _ in dm.samples]
    assert len(rewards) == 1 and 0.0 <= rewards[0] <= 1.0
    assert all(r in (0.0, 1.0) for _, _, r in dm.samples) and texts
