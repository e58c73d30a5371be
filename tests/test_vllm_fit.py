"""End-to-end GRPO ``fit`` through the CLI with vLLM rollouts (``configs/grpo_tiny_vllm.yaml``): the mean reward rises,
weights are synced every rollout, and the engine's log-probs agree with the trainer's.

It runs the config as shipped: ``assets/tiny-student`` has head_dim 32, which vLLM's CPU attention supports.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, run_cli, scalars

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (pip install 'rlad_pl[cpu]' or 'rlad_pl[gpu]')"),
]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

EPOCHS = 30


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_vllm")
    t0 = time.perf_counter()
    cli = run_cli("fit", "--config", str(CONFIGS / "grpo_tiny_vllm.yaml"), "--trainer.max_epochs", str(EPOCHS),
                  "--trainer.default_root_dir", str(root), "--trainer.check_val_every_n_epoch", str(EPOCHS),
                  "--trainer.enable_checkpointing", "false", "--export.enabled", "false")
    print(f"\nfit with vLLM rollouts, {EPOCHS} epochs: {time.perf_counter() - t0:.1f}s")
    yield cli, Path(cli.trainer.log_dir)
    cli.datamodule.sampler.close()


def test_vllm_fit_reward_rises(vllm_run):
    cli, log_dir = vllm_run
    from rlad_pl.rollout.vllm import VLLMSampler

    assert isinstance(cli.datamodule.sampler, VLLMSampler)
    reward = scalars(log_dir, "rollout/reward_mean")
    assert len(reward) == EPOCHS and all(v == v for v in reward)
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    print(f"reward first 5: {first:.3f}, last 5: {last:.3f}")
    assert last > first + 0.2, (first, last)
    assert scalars(log_dir, "val/all/pass@4"), "validation through vLLM did not run"


def test_vllm_fit_syncs_and_logprobs_agree(vllm_run):
    cli, log_dir = vllm_run
    n_params = sum(p.numel() * p.element_size() for p in cli.model.student.parameters())
    sync_bytes = scalars(log_dir, "sync/weight_sync_bytes")
    assert len(sync_bytes) == EPOCHS and all(b == n_params for b in sync_bytes)
    assert all(t >= 0 for t in scalars(log_dir, "timing/weight_sync"))
    # the trainer recomputes the sampled tokens' log-probs with the current student (module.log_sampler_mismatch):
    # right after a sync they must equal what vLLM reported, up to fp32 kernel noise
    diff = scalars(log_dir, "mismatch/logprob_abs_diff_max")
    assert len(diff) == EPOCHS and max(diff) < 1e-4, max(diff)
    assert max(scalars(log_dir, "mismatch/kl_k3")) < 1e-8
    # the data module released the engine when fit ended; a fresh one synced with the final student matches HF
    sampler = cli.datamodule.sampler
    assert sampler.llm is None
    from rlad_pl.rollout import HFSampler, SamplingParams

    tok = cli.model.tokenizer
    sampler.setup(cli.model.student, tok)
    sampler.sync_weights(cli.model.student)
    hf = HFSampler()
    hf.setup(cli.model.student, tok)
    prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in ("1234", "9876", "5555")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    with torch.no_grad():
        assert sampler.generate(prompts, greedy).completion_ids == hf.generate(prompts, greedy).completion_ids
