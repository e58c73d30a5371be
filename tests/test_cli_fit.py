"""End-to-end ``fit`` through the CLI on the shipped tiny model: GRPO learns, logs, checkpoints and exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO, run_cli, scalars, text_tags

GRPO_TINY = str(CONFIGS / "grpo_tiny.yaml")


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    cli = run_cli("fit", "--config", GRPO_TINY, "--trainer.max_epochs", "30", "--trainer.default_root_dir",
                  str(root), "--trainer.check_val_every_n_epoch", "15")
    return cli, Path(cli.trainer.log_dir)


@pytest.mark.slow  # the `grpo_run` fixture: a 30-rollout-batch GRPO fit, ~50 s on 2 busy cores
def test_grpo_mean_reward_rises(grpo_run):
    _, log_dir = grpo_run
    reward = scalars(log_dir, "rollout/reward_mean")
    assert len(reward) == 30
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    # measured with seed 0: ~0.02 over the first five rollouts, ~0.5 over the last five
    assert last > first + 0.2, (first, last)
    assert all(v == v for v in reward)  # no NaN


@pytest.mark.slow  # the `grpo_run` fixture: a 30-rollout-batch GRPO fit, ~50 s on 2 busy cores
def test_grpo_logs_metrics_and_samples(grpo_run):
    _, log_dir = grpo_run
    for tag in ("train/loss", "grpo/clip_frac_low", "grpo/clip_frac_high", "grpo/ratio_mean", "train/entropy",
                "rollout/reward_std", "rollout/accuracy", "rollout/response_length_mean", "timing/generate",
                "timing/score", "timing/train_step", "val/all/mean@4", "val/all/pass@4"):
        vals = scalars(log_dir, tag)
        assert vals and all(torch.isfinite(torch.tensor(vals))), tag
    assert len(scalars(log_dir, "val/all/pass@4")) == 2  # epochs 15 and 30
    assert any(t.startswith("rollouts/samples") for t in text_tags(log_dir))


@pytest.mark.slow  # the `grpo_run` fixture: a 30-rollout-batch GRPO fit, ~50 s on 2 busy cores
def test_checkpoint_and_hf_export(grpo_run):
    cli, log_dir = grpo_run
    ckpts = list((log_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts, "no Lightning checkpoint"
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)  # frozen models are not saved

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = log_dir / "hf_export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    trained = cli.model.student.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k], msg=k)
    ids = tok("<bos>123", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # the trained student writes mostly the target character
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.count("a") >= 3, text


def test_print_config_resolves_interpolation_and_overrides():
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config", GRPO_TINY, "--print_config",
                          "--model.optimizer.init_args.lr", "0.125", "--data.group_size", "4"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "tokenizer: assets/tiny-student" in text  # ${model.student} resolved
    assert "lr: 0.125" in text and "group_size: 4" in text
    assert "reload_dataloaders_every_n_epochs: 1" in text and "class_path: rlad_pl.objectives.GRPO" in text
