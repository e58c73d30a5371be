"""Exact resume through the real CLI: a run killed with SIGKILL after a checkpoint and resumed with ``--ckpt_path
last`` ends with the same student, bit for bit, as an uninterrupted run, for every objective family (GRPO-like,
TRRD, KDRL with its kd_coef schedule, ReNIO with the ``ema`` normaliser, full-vocabulary KL). Resuming builds no
discarded rollout batch, and resuming a finished run writes its export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import CONFIGS, REPO

EPOCHS = 5
#: a run of EPOCHS tiny epochs, small rollouts; validation every 2 epochs on 4 prompts (validation draws samples too)
COMMON = ["--trainer.max_epochs", str(EPOCHS), "--trainer.check_val_every_n_epoch", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.accelerator", "cpu", "--data.prompts_per_rollout", "4", "--data.val_prompts", "4",
          "--data.val_k", "2", "--data.sampling.max_new_tokens", "8",
          "--data.reward", "test_resume.counting_reward"]


def counting_reward(completion: str, problem) -> float:
    """The 'a' fraction reward of the tiny configs; appends one line per call to ``$RLAD_TEST_REWARD_LOG``."""
    with open(os.environ["RLAD_TEST_REWARD_LOG"], "a") as f:
        f.write("x\n")
    return completion.count("a") / len(completion) if completion else 0.0


def _objective_yaml(tmp: Path, name: str, objectives: list) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": {"objectives": objectives}}))
    return path


def _cases(tmp: Path) -> dict[str, list[str]]:
    """Config arguments per objective family."""
    kdrl = _objective_yaml(tmp, "kdrl_sched", [{"class_path": "rlad_pl.objectives.KDRL", "init_args": {
        "kd_coef": 5.0e-2, "kd_coef_end": 1.0e-3, "kd_anneal_steps": 4, "kd_estimator": "k2"}}])
    # tau 0: many pivotal tokens, so the per-sample weights (and their EMA normaliser) vary from batch to batch
    renio = _objective_yaml(tmp, "renio_ema", [{"class_path": "rlad_pl.objectives.ReNIO", "init_args": {
        "tau": 0.0, "c": 2.5, "weight_norm": "ema", "ema_rate": 0.3, "inner": {
            "class_path": "rlad_pl.objectives.TokenKL", "init_args": {"divergence": "clipped_forward",
                                                                      "clip_kappa": 0.05}}}}])
    return {
        "grpo": ["--config", str(CONFIGS / "grpo_tiny.yaml")],
        # two optimizer steps per rollout batch: old log-probs, PPO ratios and a reshuffled step order
        "trrd": ["--config", str(CONFIGS / "trrd_tiny.yaml"), "--data.steps_per_rollout", "2",
                 "--data.micro_batch_size", "8"],
        "kdrl_schedule": ["--config", str(CONFIGS / "kdrl_tiny.yaml"), "--config", str(kdrl)],
        # no gradient clipping: the EMA normaliser is one scale factor per micro-batch, which clipping would hide
        "renio_ema": ["--config", str(CONFIGS / "renio_opd_tiny.yaml"), "--config", str(renio),
                      "--model.grad_clip", "null"],
        "opd_full_vocab": ["--config", str(CONFIGS / "opd_full_tiny.yaml")],
    }


def _env(reward_log: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", RLAD_TEST_REWARD_LOG=str(reward_log),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    return env


def _cmd(root: Path, args: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlad_pl", "fit", *args, *COMMON, "--trainer.default_root_dir", str(root), *extra]


def _fit(root: Path, args: list[str], *extra: str) -> int:
    """Run to the end; returns the number of reward calls (= trained rollout sequences)."""
    log = root.with_suffix(".rewards")
    log.unlink(missing_ok=True)
    log.touch()
    proc = subprocess.run(_cmd(root, args, *extra), cwd=REPO, env=_env(log), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return len(log.read_text().splitlines())


def _export(root: Path, version: int) -> dict[str, torch.Tensor]:
    return load_file(root / "lightning_logs" / f"version_{version}" / "hf_export" / "model.safetensors")


def _kill_after_checkpoint(root: Path, args: list[str]) -> int:
    """Start a run, SIGKILL it as soon as its first ``last.ckpt`` exists; returns the epochs that file holds."""
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    log = root.with_suffix(".rewards")
    log.touch()
    proc = subprocess.Popen(_cmd(root, args), cwd=REPO, env=_env(log), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({proc.returncode}): {err[-2000:]}"
    assert not (ckpt.parent.parent / "hf_export").exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # a complete checkpoint under the final name
    return state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["grpo", "trrd", "kdrl_schedule", "renio_ema", "opd_full_vocab"])
def test_kill9_resume_is_exact(case, tmp_path):
    args = _cases(tmp_path)[case]
    ref_calls = _fit(tmp_path / "ref", args)
    killed = tmp_path / "killed"
    done = _kill_after_checkpoint(killed, args)
    assert 1 <= done < EPOCHS
    log = killed.with_suffix(".rewards")
    log.write_text("")
    resumed_calls = _fit(killed, args, "--ckpt_path", "last")
    # no rollout batch sampled and scored only to be discarded: exactly the missing epochs were generated
    per_epoch = ref_calls // EPOCHS
    assert ref_calls == EPOCHS * per_epoch and resumed_calls == (EPOCHS - done) * per_epoch, (ref_calls,
                                                                                             resumed_calls, done)
    ref, res = _export(tmp_path / "ref", 0), _export(killed, 1)
    assert ref.keys() == res.keys()
    diff = max((ref[k].float() - res[k].float()).abs().max().item() for k in ref)
    assert diff == 0.0, f"{case}: max |param diff| {diff} after resuming from epoch {done}"
    if case == "renio_ema":  # the EMA normaliser is part of the checkpoint
        state = torch.load(killed / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt",
                           weights_only=True)
        ema = state["rlad_pl"]["objectives"][0]["ema_mean"]
        assert ema is not None and abs(float(ema) - 1.0) > 1e-3, ema  # it moves: restoring it matters


@pytest.mark.slow
def test_resume_finished_run_writes_export_and_samples_nothing(tmp_path):
    args = _cases(tmp_path)["grpo"]
    root = tmp_path / "run"
    _fit(root, args, "--export.enabled", "false")
    assert not (root / "lightning_logs" / "version_0" / "hf_export").exists()
    calls = _fit(root, args, "--ckpt_path", "last")
    assert calls == 0  # max_epochs already reached: no rollout
    res = _export(root, 1)
    ckpt = torch.load(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    compared = [k.removeprefix("student.") for k in ckpt["state_dict"] if k.removeprefix("student.") in res]
    assert len(compared) >= 10
    for name in compared:
        assert torch.equal(res[name], ckpt["state_dict"]["student." + name]), name
