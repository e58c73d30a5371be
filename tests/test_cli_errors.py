"""Bad input ends in one line on stderr that names the field (exit code 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import CONFIGS, REPO, run_cli

GRPO_TINY = str(CONFIGS / "grpo_tiny.yaml")


def _error_line(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", GRPO_TINY, "--trainer.max_epochs", "1", "--trainer.logger", "false",
                "--trainer.enable_checkpointing", "false", "--export.enabled", "false", *args)
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rlad_pl: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_objective(capsys):
    line = _error_line(capsys, "--model.objectives", '[{"class_path": "rlad_pl.objectives.NoSuchMethod"}]')
    assert "model.objectives" in line and "NoSuchMethod" in line


def test_unknown_reasoning_gym_task(capsys):
    line = _error_line(capsys, "--data.task", "rlad_pl.data.ReasoningGymTask", "--data.task.dataset", "no_such_task")
    assert "data.task.dataset" in line and "no_such_task" in line


def test_missing_model_path(capsys):
    line = _error_line(capsys, "--model.student", "/nonexistent/student")
    assert "model.student" in line and "/nonexistent/student" in line


def test_group_size_one_with_grpo(capsys):
    line = _error_line(capsys, "--data.group_size", "1")
    assert "data.group_size" in line and "GRPO" in line


def test_error_is_one_line_from_the_real_cli():
    out = subprocess.run([sys.executable, "-m", "rlad_pl", "fit", "--config", GRPO_TINY, "--model.student",
                          "/nonexistent/student"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["rlad_pl: error: model.student: no such local folder '/nonexistent/student'"]


def test_init_arg_of_a_default_null_class_field_names_the_field_and_the_fix(capsys):
    """``--data.sampler.init_args.batch_size 0`` on a config that leaves ``data.sampler`` null (the default HF
    sampler): jsonargparse's "expected one of [Sampler, null], got NestedArg(...)" becomes the field and the fix."""
    line = _error_line(capsys, "--data.sampler.init_args.batch_size", "0")
    assert line == ("rlad_pl: error: data.sampler.init_args.batch_size: data.sampler is not set in the config, so "
                    "batch_size has no class to go to; name one first (the default is rlad_pl.rollout.HFSampler): "
                    "--data.sampler.class_path CLASS --data.sampler.init_args.batch_size 0")
    # ... and the fix it names is accepted (and then checks the value itself)
    line = _error_line(capsys, "--data.sampler.class_path", "rlad_pl.rollout.HFSampler",
                       "--data.sampler.init_args.batch_size", "0")
    assert line.startswith("rlad_pl: error: data.sampler") and "batch_size" in line and "NestedArg" not in line


@pytest.mark.parametrize("args, expected", [
    (["--data.prompt_format.mode", "chatt"],
     "data.prompt_format.mode: expected one of auto, chat, raw, got 'chatt' (did you mean 'chat'?)"),
    (["--model.loss_agg", "tokn_mean"],
     "model.loss_agg: expected one of token_mean, seq_mean_token_mean, seq_mean_token_sum_norm, got 'tokn_mean' "
     "(did you mean 'token_mean'?)"),
    (["--model.objectives.init_args.ref_kl_estimator=k4"],
     "model.objectives.ref_kl_estimator: expected one of k1, k2, k3, got 'k4' (in rlad_pl.objectives.GRPO)"),
    (["--data.prompt_format", '{"mode": "rawr"}'],
     "data.prompt_format.mode: expected one of auto, chat, raw, got 'rawr' (did you mean 'raw'?)"),
    # a union of Literals and null: every allowed value, in one list
    (["--trainer.precision", "bf17-mixed"],
     "trainer.precision: expected one of 64, 32, 16, transformer-engine, transformer-engine-float16, 16-true, "
     "16-mixed, bf16-true, bf16-mixed, 32-true, 64-true, bf16, null, got 'bf17-mixed' (did you mean 'bf16-mixed'?)"),
], ids=["prompt_format_mode", "loss_agg", "objective_init_arg", "prompt_format_json", "trainer_precision"])
def test_a_typo_in_an_enumerated_option_lists_the_allowed_values(capsys, args, expected):
    assert _error_line(capsys, *args) == f"rlad_pl: error: {expected}"


def test_a_typo_in_an_enumerated_option_in_a_yaml_file(capsys, tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("data:\n  prompt_format:\n    mode: chatt\nmodel:\n  loss_agg: seq_mean\n")
    line = _error_line(capsys, "--config", str(f))
    assert line.startswith("rlad_pl: error: ") and "expected one of" in line and "got '" in line, line
    assert ("data.prompt_format.mode" in line and "'chatt'" in line) or ("model.loss_agg" in line and "'seq_mean'"
                                                                         in line), line


def test_a_wrong_value_in_a_dataclass_field_left_null_names_the_field_not_a_class(capsys):
    """``data.val_sampling`` is null in the config; ``--data.val_sampling.temperature=x`` is a bad number, not a
    missing class_path."""
    line = _error_line(capsys, "--data.val_sampling.temperature=x")
    assert line.startswith("rlad_pl: error: data.val_sampling.temperature: ") and "class_path" not in line, line
    assert "float" in line and "x" in line
