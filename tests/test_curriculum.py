"""Entropy-gated length curriculum: the gate rule and a real fit that advances or freezes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import CONFIGS, run_cli, scalars
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.logprobs import chunked_token_logprobs
from rlad_pl.training.curriculum import gate


def test_gate_advances_iff_entropy_at_least_h_min_and_never_after_failure():
    assert gate(1.0, 1.0, 0, 3, False) == (1, False)  # H == H_min advances
    assert gate(0.99, 1.0, 0, 3, False) == (0, True)  # failure freezes
    assert gate(5.0, 1.0, 0, 3, True) == (0, True)  # ... for good
    assert gate(5.0, 1.0, 2, 3, False) == (2, False)  # last stage: stay


def test_uniform_entropy_is_log_vocab():
    h = torch.randn(1, 3, 4)
    w = torch.zeros(17, 4)  # all logits equal
    _, ent = chunked_token_logprobs(h, w, torch.zeros(1, 3, dtype=torch.long), with_entropy=True)
    torch.testing.assert_close(ent, torch.full((1, 3), math.log(17)))


def test_bad_ladder():
    from rlad_pl.training.curriculum import LengthCurriculum

    with pytest.raises(ConfigError, match=r"^curriculum\.ladder: expected increasing"):
        LengthCurriculum(ladder=[8, 4])


@pytest.mark.parametrize("h_min,expected_lengths", [(0.0, [4, 6, 8, 8]), (1e9, [4, 4, 4, 4])])
def test_curriculum_in_fit(tmp_path, h_min, expected_lengths):
    cb = {"class_path": "rlad_pl.training.curriculum.LengthCurriculum",
          "init_args": {"ladder": [4, 6, 8], "epochs_per_stage": 1, "h_min": h_min, "heldout_prompts": 4}}
    cli = run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--trainer.max_epochs", "3",
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", json.dumps([cb]),
                  "--trainer.check_val_every_n_epoch", "100", "--export.enabled", "false")
    lengths = scalars(cli.trainer.log_dir, "curriculum/max_new_tokens")
    assert lengths == expected_lengths
    assert max(scalars(cli.trainer.log_dir, "rollout/response_length_max")) <= max(expected_lengths)
    ents = scalars(cli.trainer.log_dir, "curriculum/heldout_entropy")
    assert len(ents) == 4 and all(0 < e <= math.log(len(cli.model.tokenizer)) + 1e-4 for e in ents)
