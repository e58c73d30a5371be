"""Every method config runs a short ``fit`` on the tiny teacher/student pair with finite losses; distillation lowers
the divergence it minimizes; OPSD scores identical response tokens under the privileged prompt."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, run_cli, scalars

METHOD_CONFIGS = {
    "kdrl_tiny": "kdrl/reverse_kl_sampled",
    "trrd_tiny": "trrd/teacher_clamp_frac",
    "opd_tiny": "opdsampled/reverse_kl_sampled",
    "opd_full_tiny": "opdfullvocab/rkl",
    "forward_kl_tiny": "forwardkl/fkl",
    "forward_kl_teacher_prefix_tiny": "forwardkl/fkl",
    "reverse_kl_teacher_prefix_tiny": "reversekl/rkl",
    "klmix_tiny": "klmix/divergence",
    "renio_opd_tiny": "renio/weight_mean",
    "opsd_tiny": "renio/opsd/fkl",
    "sft_tiny": "sft/kept_frac",
}


def _fit(tmp_path, name: str, epochs: int, *extra: str):
    return run_cli("fit", "--config", str(CONFIGS / f"{name}.yaml"), "--trainer.max_epochs", str(epochs),
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.check_val_every_n_epoch", "100",
                   "--export.enabled", "false", *extra)


def test_every_config_has_a_fit_test():
    # grpo: tests/test_cli_fit.py; the LoRA configs: tests/test_lora.py (reward rises / divergence falls)
    # multi_teacher_tiny: tests/test_multi_teacher.py
    shipped = {p.stem for p in CONFIGS.glob("*_tiny.yaml")} - {"grpo_tiny", "grpo_lora_tiny", "opsd_lora_tiny",
                                                                "multi_teacher_tiny"}
    assert shipped <= set(METHOD_CONFIGS), shipped - set(METHOD_CONFIGS)


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_config_short_fit_is_finite(tmp_path, name):
    extra = ("--data.teacher_cache_dir", str(tmp_path / "cache")) if "teacher_cache_dir" in (
        CONFIGS / f"{name}.yaml").read_text() else ()
    cli = _fit(tmp_path, name, 2, *extra)
    log_dir = Path(cli.trainer.log_dir)
    for tag in ("train/loss", "train/grad_norm", METHOD_CONFIGS[name]):
        vals = scalars(log_dir, tag)
        assert len(vals) == 2 and all(math.isfinite(v) for v in vals), (tag, vals)
    assert not any(k.startswith("nonfinite/") for k in cli.model.counters), cli.model.counters
    assert cli.model.teacher is not None and not any(p.requires_grad for p in cli.model.teacher.parameters())


@pytest.mark.slow  # a fit long enough to lower the divergence: ~20 s each on 2 busy cores
@pytest.mark.parametrize("name,tag", [("forward_kl_tiny", "forwardkl/fkl"), ("opd_full_tiny", "opdfullvocab/rkl")])
def test_distillation_lowers_its_divergence(tmp_path, name, tag):
    cli = _fit(tmp_path, name, 12)
    kl = scalars(Path(cli.trainer.log_dir), tag)
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    # measured: ~0.017 -> ~0.004 for both
    assert last < 0.5 * first, (first, last)


def test_teacher_prefixes_come_from_the_cached_teacher(tmp_path):
    cache = tmp_path / "cache"
    cli = _fit(tmp_path, "forward_kl_teacher_prefix_tiny", 1, "--data.teacher_cache_dir", str(cache))
    assert len(list(cache.glob("*.json"))) == 1
    dm = cli.datamodule
    problems = dm.task.problems("train", dm.settings.prompts_per_rollout, offset=0)
    seed = dm.settings.rollout_seed(0, 0)
    again = dm.pipeline.rollout(problems, seed=seed, step=1).batch  # same prompts, params and seed -> a cache hit
    assert dm.rollout_stats["rollout/teacher_cache_hits"] == 1.0
    teacher_gen = dm.teacher_sampler.generate([dm.pipeline.encode_prompt(p.prompt) for p in problems],
                                              dm.sampling.with_(seed=seed))
    resp = [row[again.response_mask[i].bool()].tolist() for i, row in enumerate(again.response_ids)]
    assert resp == teacher_gen.completion_ids


def test_opsd_teacher_scores_same_tokens_after_privileged_prompt(tmp_path):
    from rlad_pl.core.logprobs import response_logprobs

    cli = _fit(tmp_path, "opsd_tiny", 1)
    dm, module = cli.datamodule, cli.model
    problems = dm.task.problems("train", 3, offset=0)
    rollout = dm.pipeline.rollout(problems, seed=1, step=cli.trainer.global_step).batch
    module.annotator().annotate(rollout, need_old=False)
    R, tok = rollout.response_len, module.tokenizer
    torch.testing.assert_close(rollout.teacher_input_ids[:, -R:], rollout.input_ids[:, -R:], rtol=0, atol=0)
    for i in range(rollout.num_sequences):
        p = problems[i // dm.group_size]
        t_prompt = rollout.teacher_input_ids[i, :rollout.teacher_prompt_len]
        t_prompt = t_prompt[rollout.teacher_attention_mask[i, :rollout.teacher_prompt_len].bool()]
        assert tok.decode(t_prompt, skip_special_tokens=True).replace(" ", "") == p.privileged
        n = int(rollout.response_mask[i].sum())
        seq = torch.cat([t_prompt, rollout.response_ids[i, :n]])[None]
        ref, _ = response_logprobs(module.teacher, seq, torch.ones_like(seq), len(t_prompt),
                                   temperature=module.temperature)
        torch.testing.assert_close(rollout.teacher_logprobs[i, :n], ref[0], atol=1e-5, rtol=1e-5)
