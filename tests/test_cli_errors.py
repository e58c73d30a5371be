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
