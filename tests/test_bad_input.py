"""Plausible user mistakes through the real CLI: each ends with exit code 2 and ONE stderr line
``rlad_pl: error: <field>: ...`` that names the field, no traceback, before any training step.

The table ``CASES`` holds (id, extra command-line arguments, substrings the error line must contain). Arguments may
use ``{tmp}`` (a fresh folder holding the files of ``FILES``) and ``{bad_ckpt}``. Everything is layered on
``configs/grpo_tiny.yaml`` (GRPO, tiny shipped student, CharFrequencyTask) with one rollout batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO, run_cli

GRPO_TINY = str(CONFIGS / "grpo_tiny.yaml")
TRRD_TINY = str(CONFIGS / "trrd_tiny.yaml")
BASE = ("fit", "--config", GRPO_TINY, "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--export.enabled", "false")


def objectives(*specs: tuple[str, dict]) -> list[str]:
    return ["--model.objectives", json.dumps([{"class_path": f"rlad_pl.objectives.{c}", "init_args": a}
                                              for c, a in specs])]


def callbacks(cls: str, **init_args) -> list[str]:
    return ["--trainer.callbacks", json.dumps([{"class_path": cls, "init_args": init_args}])]


def jsonl(*extra: str) -> list[str]:
    return ["--data.task", "rlad_pl.data.JSONLTask", *extra]


# files written into {tmp} before each case
FILES = {
    "interp_typo.yaml": "model:\n  tokenizer: ${model.studnt}\n",
    "syntax.yaml": "model:\n  student: [unclosed\n  grad_clip: 1.0\n",
    "tab.yaml": "model:\n\tgrad_clip: 1.0\n",
    "weight_nan.yaml": "model:\n  objectives:\n    - class_path: rlad_pl.objectives.GRPO\n"
                       "      init_args: {weight: .nan}\n",
    "dup_names.yaml": ("model:\n  objectives:\n    - class_path: rlad_pl.objectives.GRPO\n"
                       "    - class_path: rlad_pl.objectives.GRPO\n      init_args: {eps_high: 0.2}\n"),
    "eps_nan.yaml": "model:\n  objectives:\n    - class_path: rlad_pl.objectives.GRPO\n"
                    "      init_args: {eps_high: .nan}\n",
    "ok.jsonl": '{"prompt": "1+1=", "answer": "2"}\n',
    "latin1.jsonl": b'{"prompt": "caf\xe9", "answer": "1"}\n',
    "malformed.jsonl": '{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n',
    "no_answer.jsonl": '{"prompt": "1+1="}\n',
    "empty.jsonl": "\n\n",
    "not_a_folder": "a file where a folder is expected\n",
    "bad.ckpt": b"PK\x03\x04 this is not a checkpoint",
}

#: (id, extra args, substrings of the error line: the field first)
CASES = [
    # ---------------------------------------------------------------- optimizer (issue: lr=-1e-3 gave a traceback)
    ("lr_negative", ["--model.optimizer.init_args.lr=-1e-3"], ["model.optimizer.init_args.lr", "-0.001"]),
    ("lr_negative_without_equals", ["--model.optimizer.init_args.lr", "-1e-3"],
     ["model.optimizer.init_args.lr", "--model.optimizer.init_args.lr=-1e-3"]),
    ("lr_zero", ["--model.optimizer.init_args.lr=0"], ["model.optimizer.init_args.lr", "> 0"]),
    ("lr_inf", ["--model.optimizer.init_args.lr=.inf"], ["model.optimizer.init_args.lr", "inf"]),
    ("lr_nan", ["--model.optimizer.init_args.lr=.nan"], ["model.optimizer.init_args.lr", "nan"]),
    ("lr_not_a_number", ["--model.optimizer.init_args.lr=fast"], ["model.optimizer", "lr", "fast"]),
    ("weight_decay_negative", ["--model.optimizer.init_args.weight_decay=-1"],
     ["model.optimizer.init_args.weight_decay", "-1"]),
    ("betas_out_of_range", ["--model.optimizer.init_args.betas=[0.9,1.5]"], ["model.optimizer.init_args.betas", "1.5"]),
    ("optimizer_unknown_class", ["--model.optimizer", "torch.optim.AdamWW"], ["model.optimizer", "AdamWW"]),
    ("optimizer_unknown_arg", ["--model.optimizer.init_args.learning_rate=1e-3"], ["learning_rate"]),
    ("scheduler_bad_arg", ["--model.lr_scheduler", json.dumps({"class_path": "torch.optim.lr_scheduler.LinearLR",
                                                               "init_args": {"start_factor": 2.0}})],
     ["model.lr_scheduler", "factor"]),
    # ---------------------------------------------------------------- module fields
    ("grad_clip_negative", ["--model.grad_clip=-1"], ["model.grad_clip", "-1"]),  # silently flipped the gradient
    ("grad_clip_zero", ["--model.grad_clip=0"], ["model.grad_clip", "> 0"]),
    ("grad_clip_nan", ["--model.grad_clip=.nan"], ["model.grad_clip", "nan"]),
    ("grad_clip_string", ["--model.grad_clip=big"], ["model.grad_clip", "big"]),
    ("model_temperature_zero", ["--model.temperature=0"], ["model.temperature", "> 0"]),
    ("model_temperature_inf", ["--model.temperature=.inf"], ["model.temperature", "inf"]),
    ("logprob_chunk_zero", ["--model.logprob_chunk_size=0"], ["model.logprob_chunk_size", ">= 1"]),
    ("annotate_batch_zero", ["--model.annotate_batch_size=0"], ["model.annotate_batch_size", ">= 1"]),
    ("skipped_steps_zero", ["--model.max_consecutive_skipped_steps=0"],
     ["model.max_consecutive_skipped_steps", ">= 1"]),
    ("checkpoint_every_zero", ["--checkpoint.every_n_epochs=0"], ["checkpoint.every_n_epochs"]),
    ("checkpoint_keep_negative", ["--checkpoint.keep_every_n_epochs=-1"], ["checkpoint.keep_every_n_epochs"]),
    ("dtype_typo", ["--model.dtype=float33"], ["model.dtype", "float33"]),
    ("loss_agg_typo", ["--model.loss_agg=mean"], ["model.loss_agg", "mean"]),
    ("fsdp_precision_typo", ["--model.fsdp_mixed_precision=bf32"], ["model.fsdp_mixed_precision", "bf32"]),
    ("unknown_model_key", ["--model.learning_rate=1e-3"], ["model.learning_rate"]),
    ("student_missing", ["--model.student=/nonexistent/student"], ["model.student", "/nonexistent/student"]),
    ("tokenizer_missing", ["--model.tokenizer=/nonexistent/tok"], ["model.tokenizer", "/nonexistent/tok"]),
    # ---------------------------------------------------------------- objectives
    ("objective_unknown", objectives(("NoSuchMethod", {})), ["model.objectives", "NoSuchMethod"]),
    ("objective_weight_nan", ["--config", "{tmp}/weight_nan.yaml"], ["grpo.weight", "nan"]),  # skipped every update
    ("objective_weight_negative", objectives(("GRPO", {"weight": -1.0})), ["grpo.weight", "-1"]),
    ("objective_loss_agg_typo", objectives(("GRPO", {"loss_agg": "mean"})), ["grpo.loss_agg", "mean"]),
    ("objective_eps_low_negative", objectives(("GRPO", {"eps_low": -0.1})), ["grpo.eps_low"]),
    ("objective_eps_low_one", objectives(("GRPO", {"eps_low": 1.0})), ["grpo.eps_low"]),
    ("objective_eps_high_negative", objectives(("GRPO", {"eps_high": -1.0})), ["grpo.eps_high"]),
    ("objective_eps_high_nan", ["--config", "{tmp}/eps_nan.yaml"], ["grpo.eps_high", "nan"]),
    ("objective_tis_cap_zero", objectives(("GRPO", {"tis_cap": 0.0})), ["grpo.tis_cap"]),
    ("objective_ref_kl_negative", objectives(("GRPO", {"ref_kl_coef": -0.1})), ["grpo.ref_kl_coef"]),
    ("objective_kl_estimator_typo", objectives(("GRPO", {"ref_kl_estimator": "k4"})),
     ["model.objectives", "ref_kl_estimator", "k4"]),
    ("objective_unknown_arg", objectives(("GRPO", {"clip": 0.2})), ["model.objectives", "clip"]),
    ("objective_bad_name", objectives(("GRPO", {"name": "my grpo"})), ["grpo.name", "my grpo"]),
    ("objectives_same_name", ["--config", "{tmp}/dup_names.yaml"], ["model.objectives[1].init_args.name", "grpo"]),
    ("objectives_empty", ["--model.objectives", "[]"], ["model.objectives"]),
    ("trrd_alpha_out_of_range", objectives(("TRRD", {"alpha": 1.5})), ["trrd.alpha"]),
    ("kdrl_coef_negative", objectives(("KDRL", {"kd_coef": -1.0})), ["kdrl.kd_coef"]),
    ("kl_divergence_typo", objectives(("TokenKL", {"divergence": "fwd"})), ["divergence", "fwd"]),
    ("teacher_missing", objectives(("TRRD", {})), ["model.teacher", "TRRD"]),
    # ---------------------------------------------------------------- sampling
    ("max_new_tokens_zero", ["--data.sampling.max_new_tokens=0"], ["data.sampling.max_new_tokens", ">= 1"]),
    ("top_k_negative", ["--data.sampling.top_k=-1"], ["data.sampling.top_k", "-1"]),
    ("top_p_zero", ["--data.sampling.top_p=0"], ["data.sampling.top_p", "(0, 1]"]),
    ("top_p_above_one", ["--data.sampling.top_p=1.5"], ["data.sampling.top_p", "1.5"]),  # was accepted
    ("temperature_negative", ["--data.sampling.temperature=-1"], ["data.sampling.temperature", "-1"]),
    ("temperature_nan", ["--data.sampling.temperature=.nan"], ["data.sampling.temperature", "nan"]),
    ("greedy_with_grpo", ["--data.sampling.temperature=0"], ["data.sampling.temperature", "GRPO", "greedy"]),
    ("val_top_p_above_one", ["--data.val_sampling.top_p=2"], ["data.val_sampling.top_p", "2"]),
    ("sampling_unknown_key", ["--data.sampling.top_q=0.5"], ["top_q"]),
    ("vllm_max_model_len", ["--data.sampler", "rlad_pl.rollout.vllm.VLLMSampler", "--data.sampler.init_args."
                            "max_model_len=16", "--data.sampling.max_new_tokens=20"],
     ["data.sampling.max_new_tokens", "max_model_len=16"]),  # was silently capped
    ("vllm_memory_fraction", ["--data.sampler", "rlad_pl.rollout.vllm.VLLMSampler",
                              "--data.sampler.init_args.gpu_memory_utilization=1.5"],
     ["data.sampler.init_args.gpu_memory_utilization", "1.5"]),
    ("sampler_unknown", ["--data.sampler", "rlad_pl.rollout.FastSampler"], ["data.sampler", "FastSampler"]),
    # ---------------------------------------------------------------- data module
    ("max_prompt_length_negative", ["--data.max_prompt_length=-5"], ["data.max_prompt_length", "-5"]),
    ("max_prompt_length_zero", ["--data.max_prompt_length=0"], ["data.max_prompt_length", ">= 1"]),
    ("val_prompts_zero", ["--data.val_prompts=0"], ["data.val_prompts", "limit_val_batches"]),  # disabled checkpoints
    ("val_k_zero", ["--data.val_k=0"], ["data.val_k"]),
    ("pass_k_above_val_k", ["--data.pass_k=[8]"], ["data.pass_k", "val_k"]),
    ("pass_k_zero", ["--data.pass_k=[0]"], ["data.pass_k", "0"]),
    ("micro_batch_zero", ["--data.micro_batch_size=0"], ["data.micro_batch_size"]),
    ("prompts_per_rollout_zero", ["--data.prompts_per_rollout=0"], ["data.prompts_per_rollout"]),
    ("steps_do_not_divide", ["--data.steps_per_rollout=3"], ["data.steps_per_rollout", "3"]),
    ("ppo_epochs_zero", ["--data.ppo_epochs=0"], ["data.ppo_epochs"]),
    ("val_batch_prompts_zero", ["--data.val_batch_prompts=0"], ["data.val_batch_prompts"]),
    ("log_samples_negative", ["--data.log_samples=-1"], ["data.log_samples"]),
    ("correct_threshold_nan", ["--data.correct_threshold=.nan"], ["data.correct_threshold", "nan"]),
    ("group_size_one_grpo", ["--data.group_size=1"], ["data.group_size", "GRPO"]),
    ("group_size_zero", ["--data.group_size=0"], ["data.group_size"]),
    ("group_size_float", ["--data.group_size=2.5"], ["data.group_size", "2.5"]),
    ("seed_negative", ["--data.seed=-1"], ["data.seed", "-1"]),
    ("reward_not_importable", ["--data.reward", "no_such_module.reward"], ["data.reward", "no_such_module"]),
    # ---------------------------------------------------------------- tasks
    ("char_task_target_two_chars", ["--data.task.init_args.target=ab"], ["data.task.target", "ab"]),
    ("char_task_empty_alphabet", ["--data.task.init_args.alphabet="], ["data.task.alphabet"]),
    ("char_task_prompt_length_zero", ["--data.task.init_args.prompt_length=0"], ["data.task.prompt_length"]),
    ("task_unknown_class", ["--data.task", "rlad_pl.data.MathTask"], ["data.task", "MathTask"]),
    ("reasoning_gym_unknown", ["--data.task", "rlad_pl.data.ReasoningGymTask", "--data.task.dataset", "chain_summ"],
     ["data.task.dataset", "chain_summ"]),
    ("reasoning_gym_bad_config", ["--data.task", "rlad_pl.data.ReasoningGymTask", "--data.task.dataset", "chain_sum",
                                  "--data.task.config", '{"min_terms": 5, "max_terms": 2}'], ["data.task.config"]),
    ("reasoning_gym_template_field", ["--data.task", "rlad_pl.data.ReasoningGymTask", "--data.task.dataset",
                                      "chain_sum", "--data.task.prompt_template", "{problem}"],
     ["data.task.prompt_template", "{problem}"]),
    ("jsonl_missing_file", jsonl("--data.task.train_path", "{tmp}/nope.jsonl"), ["data.task.train_path", "nope.jsonl"]),
    ("jsonl_not_utf8", jsonl("--data.task.train_path", "{tmp}/latin1.jsonl"),
     ["data.task.train_path", "latin1.jsonl:1", "UTF-8"]),
    ("jsonl_malformed", jsonl("--data.task.train_path", "{tmp}/malformed.jsonl"),
     ["data.task.train_path", "malformed.jsonl:2"]),
    ("jsonl_missing_answer", jsonl("--data.task.train_path", "{tmp}/no_answer.jsonl"),
     ["data.task.train_path", "no_answer.jsonl:1", "answer"]),
    ("jsonl_empty", jsonl("--data.task.train_path", "{tmp}/empty.jsonl"), ["data.task.train_path", "no problems"]),
    ("jsonl_template_field", jsonl("--data.task.train_path", "{tmp}/ok.jsonl", "--data.task.prompt_template",
                                   "Solve {question}"), ["data.task.prompt_template", "{question}", "ok.jsonl:1"]),
    ("jsonl_template_brace", jsonl("--data.task.train_path", "{tmp}/ok.jsonl", "--data.task.prompt_template",
                                   "{prompt} in \\boxed{}"), ["data.task.prompt_template"]),
    # ---------------------------------------------------------------- trainer
    ("strategy_typo", ["--trainer.strategy=dpp"], ["trainer.strategy", "dpp"]),
    ("strategy_class_name_as_string", ["--trainer.strategy=ModelParallelStrategy"], ["trainer.strategy"]),
    ("strategy_fsdp_on_cpu", ["--trainer.strategy=fsdp"], ["trainer.strategy", "GPU"]),
    ("strategy_not_installed", ["--trainer.strategy=deepspeed"], ["trainer.strategy"]),
    ("accelerator_gpu_without_gpu", ["--trainer.accelerator=gpu"], ["trainer.accelerator"]),
    ("accelerator_tpu", ["--trainer.accelerator=tpu"], ["trainer.accelerator"]),
    ("devices_zero", ["--trainer.devices=0"], ["trainer.devices"]),
    ("precision_typo", ["--trainer.precision=17"], ["trainer.precision", "17"]),
    ("max_epochs_negative", ["--trainer.max_epochs=-2"], ["trainer.max_epochs", "-2"]),
    ("callback_bad_init_arg", callbacks("lightning.pytorch.callbacks.EarlyStopping", monitor="val/mean_at_k",
                                        mode="sideways"), ["trainer.callbacks", "sideways"]),
    ("callback_unknown", callbacks("lightning.pytorch.callbacks.NoSuchCallback"), ["trainer.callbacks", "NoSuch"]),
    ("root_dir_under_a_file", ["--trainer.default_root_dir={tmp}/not_a_folder/runs"],
     ["trainer.default_root_dir", "not_a_folder"]),
    ("root_dir_unwritable", ["--trainer.default_root_dir=/proc/rlad_pl_runs"], ["trainer.default_root_dir", "/proc"]),
    ("export_dir_under_a_file", ["--export.dirpath={tmp}/not_a_folder/export"], ["export.dirpath", "not_a_folder"]),
    ("unknown_trainer_key", ["--trainer.epochs=3"], ["trainer.epochs"]),
    ("seed_everything_string", ["--seed_everything=abc"], ["seed_everything", "abc"]),
    # ---------------------------------------------------------------- files, checkpoints, interpolation
    ("config_missing", ["--config", "{tmp}/nope.yaml"], ["nope.yaml"]),
    ("yaml_syntax", ["--config", "{tmp}/syntax.yaml"], ["syntax.yaml:3:", "YAML"]),  # file and line
    ("yaml_tab", ["--config", "{tmp}/tab.yaml"], ["tab.yaml:2:", "YAML"]),
    ("interpolation_typo", ["--config", "{tmp}/interp_typo.yaml"], ["model.tokenizer", "model.studnt"]),  # 103 lines
    ("ckpt_missing", ["--ckpt_path={tmp}/nope.ckpt"], ["ckpt_path", "nope.ckpt"]),
    ("ckpt_corrupt", ["--ckpt_path={tmp}/bad.ckpt"], ["ckpt_path", "bad.ckpt"]),
]


@pytest.fixture(autouse=True)
def _log_handlers_on_current_stderr():
    """Lightning's log handlers keep the stderr of the test that first imported it (a closed capture stream in
    later tests, which logging reports as a '--- Logging error --- Traceback'): point them at this test's stderr."""
    import logging

    for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)] + [logging.getLogger()]:
        for h in getattr(logger, "handlers", []):
            if type(h) is logging.StreamHandler and h.stream not in (sys.stdout, sys.stderr):
                h.stream = sys.stderr
    yield


def _materialise(tmp_path: Path) -> None:
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def _error_line(capsys, args: list[str]) -> str:
    """Run the CLI in-process; assert exit code 2, exactly one ``rlad_pl: error:`` line and no traceback."""
    with pytest.raises(SystemExit) as exc:
        run_cli(*args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("rlad_pl: error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return lines[0]


#: mistakes only on a machine without a GPU
NEEDS_NO_GPU = {"accelerator_gpu_without_gpu", "strategy_fsdp_on_cpu", "strategy_not_installed"}


@pytest.mark.parametrize("args, expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input(args, expected, tmp_path, capsys, request):
    import torch

    if request.node.callspec.id in NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _materialise(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    line = _error_line(capsys, list(BASE) + args)
    for sub in expected:
        assert sub.replace("{tmp}", str(tmp_path)) in line, line


def test_subcommand_typo(capsys):
    assert "fitt" in _error_line(capsys, ["fitt", *BASE[1:]])


def test_case_count():
    """The closing note of issue 11 quotes this count."""
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


# -------------------------------------------------------------------------------------------- during training
def raising_reward(completion: str, problem) -> float:
    raise ZeroDivisionError("division by zero in my reward")


def none_reward(completion: str, problem):
    return None


def nan_reward(completion: str, problem) -> float:
    return float("nan")


@pytest.mark.parametrize("reward, expected", [("raising_reward", "ZeroDivisionError"), ("none_reward", "None"),
                                              ("nan_reward", "nan")])
def test_reward_errors_name_the_sample(reward, expected, capsys):
    """A reward function that raises or returns None / NaN: one line naming the field, the sample index, its prompt
    and the value (the first rollout is generated, nothing is trained)."""
    line = _error_line(capsys, list(BASE) + ["--data.reward", f"test_bad_input.{reward}"])
    assert line.startswith("rlad_pl: error: data.reward: ") and expected in line, line
    assert "sample 0 (prompt '" in line, line


def test_near_greedy_sampling_with_grpo_warns_once(tmp_path, capsys):
    """Legal but likely a mistake: one warning line, and the run still trains."""
    from rlad_pl.core.errors import _warned

    _warned.discard("data.sampling")
    cli = run_cli(*BASE, "--data.sampling.top_p=0.05", "--data.val_prompts=4",
                  f"--trainer.default_root_dir={tmp_path}")
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rlad_pl: warning:")]
    assert warnings == ["rlad_pl: warning: data.sampling: temperature=1, top_p=0.05 is near-greedy: GRPO will see many "
                        "zero-variance groups (watch rollout/zero_variance_groups)"]
    assert cli.trainer.global_step == 1


@pytest.mark.slow
def test_vllm_prompt_plus_max_new_tokens_beyond_max_model_len(capsys):
    """vLLM ends a response at ``max_model_len`` without saying so: the real engine (max_model_len 256) with a
    5-token prompt (BOS + 4 characters) and max_new_tokens 255 is refused before anything is generated."""
    line = _error_line(capsys, ["fit", "--config", str(CONFIGS / "grpo_tiny_vllm.yaml"), "--trainer.max_epochs", "1",
                                "--trainer.logger", "false", "--export.enabled", "false",
                                "--trainer.enable_checkpointing", "false", "--data.sampling.max_new_tokens", "255"])
    assert line == ("rlad_pl: error: data.sampling.max_new_tokens: the longest prompt (5 tokens) + max_new_tokens "
                    "(255) = 260 exceeds the vLLM engine's max_model_len 256; lower max_new_tokens or "
                    "data.max_prompt_length, or raise data.sampler.init_args.max_model_len")


# -------------------------------------------------------------------------------------------- what the CLI does
def test_interpolation_follows_command_line_override(tmp_path, capsys):
    """``tokenizer: ${model.student}`` is resolved after ``--model.student X``: X's tokenizer, not the YAML's."""
    import shutil

    other = tmp_path / "other-student"
    shutil.copytree(REPO / "rlad_pl" / "assets" / "tiny-student", other)
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", GRPO_TINY, "--model.student", str(other), "--print_config")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"  student: {other}\n" in out and f"  tokenizer: {other}\n" in out, out
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", GRPO_TINY, "--print_config")
    assert "  tokenizer: assets/tiny-student\n" in capsys.readouterr().out


def test_debug_flag_and_env_give_the_traceback(monkeypatch, capsys):
    from rlad_pl.core.errors import ConfigError

    with pytest.raises(ConfigError, match="model.grad_clip"):
        run_cli(*BASE, "--model.grad_clip=-1", "--debug")
    monkeypatch.setenv("RLAD_PL_DEBUG", "1")
    with pytest.raises(ConfigError, match="model.grad_clip"):
        run_cli(*BASE, "--model.grad_clip=-1")


def test_help_names_the_program(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("--help")
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: rlad_pl ")
    with pytest.raises(SystemExit):
        run_cli("fit", "--help")
    assert capsys.readouterr().out.startswith("usage: rlad_pl [options] fit ")


def test_resume_refuses_other_model_settings(tmp_path, capsys):
    """``--ckpt_path`` never swaps the user's settings for the checkpoint's: a resume whose model settings differ
    is refused with the list of differences; the same settings resume (and train on)."""
    run = ("fit", "--config", GRPO_TINY, "--trainer.logger", "false", "--export.enabled", "false",
           "--trainer.default_root_dir", str(tmp_path), "--data.val_prompts", "4", "--data.prompts_per_rollout", "2",
           "--data.group_size", "4", "--data.micro_batch_size", "8", "--trainer.check_val_every_n_epoch", "1")
    run_cli(*run, "--trainer.max_epochs", "1")
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, list(tmp_path.rglob("*"))
    ckpt = str(ckpts[-1])
    line = _error_line(capsys, [*run, "--trainer.max_epochs", "2", "--ckpt_path", ckpt, "--model.grad_clip", "0.5",
                                "--model.log_entropy", "false"])
    assert line == (f"rlad_pl: error: ckpt_path: '{ckpt}' was trained with other model settings (model.grad_clip: "
                    "checkpoint 1.0, given 0.5; model.log_entropy: checkpoint True, given False); a resume continues "
                    "the same run: give the checkpoint's values, or start a new run from its exported weights")
    line = _error_line(capsys, [*run, "--trainer.max_epochs", "2", "--ckpt_path", "last", "--model.grad_clip", "0.5"])
    assert line.startswith("rlad_pl: error: ckpt_path: '") and "model.grad_clip: checkpoint 1.0, given 0.5" in line
    cli = run_cli(*run, "--trainer.max_epochs", "2", "--ckpt_path", ckpt)
    assert cli.trainer.current_epoch == 2 and cli.model.grad_clip == 1.0


# -------------------------------------------------------------------------------------------- real processes
@pytest.mark.parametrize("args, expected", [
    (["--model.optimizer.init_args.lr=-1e-3"],
     "rlad_pl: error: model.optimizer.init_args.lr: Invalid learning rate: -0.001"),
])
def test_one_line_from_a_real_process(args, expected):
    out = subprocess.run([sys.executable, "-m", "rlad_pl", *BASE, *args], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env={**os.environ, "RLAD_PL_DEBUG": ""})
    assert out.returncode == 2, out.stderr[-2000:]
    assert [ln for ln in out.stderr.splitlines() if "error" in ln.lower()] == [expected], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_real_process_help_and_yaml_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m rlad_pl "), out.stdout[:200]
    bad = tmp_path / "bad.yaml"
    bad.write_text(FILES["syntax.yaml"])
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config", str(bad)], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (f"rlad_pl: error: {bad}:3:12: YAML syntax error: did not find "
                                                   "expected ',' or ']' (while parsing a flow sequence)")
    assert "Traceback" not in out.stderr
