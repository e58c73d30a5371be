"""No lost work: ``last.ckpt`` after every rollout batch whatever the validation schedule, atomic writes on a full
disk, a checkpoint and an export on Ctrl-C, output folders checked before compute, and the non-finite guard (a
skipped step leaves parameters and optimizer state bit-identical; N in a row stop the run; NaN weights are never
written)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, REPO, run_cli, scalars
from rlad_pl.objectives import GRPO

FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--data.prompts_per_rollout", "4", "--data.micro_batch_size", "16",
        "--data.sampling.max_new_tokens", "8", "--trainer.limit_val_batches", "0"]


class NaNGRPO(GRPO):
    """GRPO whose loss is NaN on the listed ``compute`` calls (micro-batches, counted from 0); all when None."""

    def __init__(self, nan_calls: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.nan_calls, self.calls = nan_calls, 0

    def compute(self, batch, out, denom):
        res = super().compute(batch, out, denom)
        call, self.calls = self.calls, self.calls + 1
        if self.nan_calls is None or call in self.nan_calls:
            res.loss = res.loss * float("nan")
        return res


class PoisonAdamW(torch.optim.AdamW):
    """AdamW that writes NaN into the first parameter at its ``poison_at``-th step (counted from 1)."""

    def __init__(self, params, lr: float = 1e-3, poison_at: int = 2, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.poison_at, self.steps = poison_at, 0

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        self.steps += 1
        if self.steps == self.poison_at:
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out


class BlockFolder(L.Callback):
    """Puts a file at ``path`` at the end of the first epoch: a folder that was fine at startup can no longer be
    created (as a disk that fills up or a mount that goes away would do)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            Path(self.path).write_text("in the way")


def _ckpts(root: Path) -> dict[str, dict]:
    folder = root / "lightning_logs" / "version_0" / "checkpoints"
    return {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(folder.iterdir())}


def _fit(root: Path, *args: str, config: str = "grpo_tiny.yaml"):
    return run_cli("fit", "--config", str(CONFIGS / config), "--trainer.default_root_dir", str(root), *FAST, *args)


def _equal_nested(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------------------- every rollout batch
def test_last_ckpt_every_rollout_batch_without_validation(tmp_path):
    """5 epochs, validation never runs: today's configs wrote no checkpoint at all."""
    _fit(tmp_path, "--trainer.max_epochs", "5", "--export.enabled", "false")
    ckpts = _ckpts(tmp_path)
    assert list(ckpts) == ["last.ckpt"]  # one file, overwritten; no temporary file left
    assert ckpts["last.ckpt"]["global_step"] == 5
    assert ckpts["last.ckpt"]["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 5


def test_keep_every_and_interval(tmp_path):
    """``every_n_epochs: 2`` rewrites last.ckpt at epochs 2 and 4 and at the final epoch 5; ``keep_every_n_epochs:
    1`` keeps one file per epoch, each holding its own step."""
    _fit(tmp_path, "--trainer.max_epochs", "3", "--export.enabled", "false", "--checkpoint.keep_every_n_epochs", "1")
    ckpts = _ckpts(tmp_path)
    assert list(ckpts) == ["epoch=0-step=1.ckpt", "epoch=1-step=2.ckpt", "epoch=2-step=3.ckpt", "last.ckpt"]
    assert [c["global_step"] for c in ckpts.values()] == [1, 2, 3, 3]
    assert not _equal_nested(ckpts["epoch=0-step=1.ckpt"]["state_dict"], ckpts["epoch=1-step=2.ckpt"]["state_dict"])
    other = tmp_path / "interval"
    _fit(other, "--trainer.max_epochs", "5", "--export.enabled", "false", "--checkpoint.every_n_epochs", "2")
    assert _ckpts(other)["last.ckpt"]["global_step"] == 5  # the final epoch is always written


def test_unwritable_checkpoint_folder_fails_before_compute(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        _fit(tmp_path / "run", "--trainer.max_epochs", "2", "--checkpoint.dirpath", str(blocker / "ckpts"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlad_pl: error: checkpoint.dirpath: cannot create folder"), err
    logs = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert not logs or scalars(tmp_path / "run", "rollout/reward_mean") == []  # no rollout, no training


def test_failing_export_loses_no_training(tmp_path, capsys):
    export = tmp_path / "export"
    with pytest.raises(SystemExit) as e:
        _fit(tmp_path / "run", "--trainer.max_epochs", "3", "--export.dirpath", str(export),
             "--trainer.callbacks+=test_lost_work.BlockFolder", f"--trainer.callbacks.path={export}")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rlad_pl: error: export.dirpath: cannot write the export to {export}"), err
    assert "the training state is in" in err[-1] and err[-1].endswith("last.ckpt")
    assert _ckpts(tmp_path / "run")["last.ckpt"]["global_step"] == 3  # every epoch is in the checkpoint


# ------------------------------------------------------------------------------------------- disk full
def test_full_disk_keeps_previous_checkpoint(tmp_path, capsys):
    """A tmpfs that holds one checkpoint (~320 KB) but not a second next to it: the second write fails with one
    line, the first ``last.ckpt`` stays complete and loadable, no partial file sits anywhere in the folder."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=560k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(SystemExit) as e:
            _fit(tmp_path / "run", "--trainer.max_epochs", "4", "--checkpoint.dirpath", str(mnt),
                 "--export.enabled", "false")
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"rlad_pl: error: checkpoint.dirpath: cannot write {mnt / 'last.ckpt'}"), err
        assert "the previous checkpoint there is unchanged" in err[-1]
        assert sorted(os.listdir(mnt)) == ["last.ckpt"]
        state = torch.load(mnt / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == 1
        # and a resume from it runs (here to a disk with room)
        run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--trainer.default_root_dir",
                str(tmp_path / "resumed"), *FAST, "--trainer.max_epochs", "2", "--ckpt_path", str(mnt / "last.ckpt"),
                "--export.enabled", "false")
        assert _ckpts(tmp_path / "resumed")["last.ckpt"]["global_step"] == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_writes_checkpoint_and_export(tmp_path):
    root = tmp_path / "run"
    first = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "rlad_pl", "fit", "--config", str(CONFIGS / "grpo_tiny.yaml"),
           "--trainer.default_root_dir", str(root), *FAST, "--trainer.max_epochs", "500"]
    # a background shell starts pytest with SIGINT ignored, and Popen children inherit that: restore the default
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # somewhere in a later rollout batch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]  # Lightning's graceful shutdown exit code
    assert "rlad_pl: interrupted; saved" in err, err[-3000:]
    last = torch.load(first, map_location="cpu", weights_only=True)
    assert 1 <= last["global_step"] < 500
    interrupted = first.parent / "interrupted.ckpt"
    if interrupted.exists():  # steps taken after last.ckpt: their state is kept too
        assert torch.load(interrupted, map_location="cpu", weights_only=True)["global_step"] > last["global_step"]
    export = first.parent.parent / "hf_export"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    exported = load_file(export / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert sum(p.numel() for p in model.parameters()) > 0


# ------------------------------------------------------------------------------------------- non-finite guard
def _nan_objective(calls: str) -> list[str]:
    return ["--model.objectives",
            f'[{{"class_path": "test_lost_work.NaNGRPO", "init_args": {{"nan_calls": {calls}}}}}]']


def test_all_nan_step_leaves_params_and_optimizer_state_bit_identical(tmp_path, capsys):
    """Epoch 1's two micro-batches are NaN (calls 2, 3): its checkpoint equals epoch 0's in weights and AdamW state
    (moments and step counts), one warning line, then training goes on."""
    cli = _fit(tmp_path, "--trainer.max_epochs", "3", "--checkpoint.keep_every_n_epochs", "1",
               "--export.enabled", "false", *_nan_objective("[2, 3]"))
    ckpts = _ckpts(tmp_path)
    assert list(ckpts) == ["epoch=0-step=1.ckpt", "epoch=1-step=1.ckpt", "epoch=2-step=2.ckpt", "last.ckpt"]
    before, skipped = ckpts["epoch=0-step=1.ckpt"], ckpts["epoch=1-step=1.ckpt"]
    assert _equal_nested(before["state_dict"], skipped["state_dict"])
    assert _equal_nested(before["optimizer_states"], skipped["optimizer_states"])
    assert not _equal_nested(skipped["state_dict"], ckpts["epoch=2-step=2.ckpt"]["state_dict"])
    assert skipped["rlad_pl"]["counters"]["nonfinite/steps_skipped"] == 1
    assert cli.model.counters["nonfinite/steps_skipped"] == 1 and cli.model.counters["nonfinite/loss"] == 2
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "skipped an optimizer step" in ln]
    assert len(warnings) == 1 and "non-finite loss in 2 micro-batch(es) of 2" in warnings[0], warnings
    assert scalars(tmp_path, "nonfinite/steps_skipped")[-1] == 1.0


def test_one_nan_micro_batch_skips_the_whole_step(tmp_path):
    """Half a step's gradient would be a different update than asked: the step is skipped."""
    _fit(tmp_path, "--trainer.max_epochs", "2", "--checkpoint.keep_every_n_epochs", "1", "--export.enabled",
         "false", *_nan_objective("[3]"))
    ckpts = _ckpts(tmp_path)
    assert _equal_nested(ckpts["epoch=0-step=1.ckpt"]["optimizer_states"],
                         ckpts["epoch=1-step=1.ckpt"]["optimizer_states"])


def test_consecutive_skipped_steps_stop_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _fit(tmp_path, "--trainer.max_epochs", "10", "--model.max_consecutive_skipped_steps", "3",
             *_nan_objective("null"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlad_pl: error: model.max_consecutive_skipped_steps: 3 optimizer steps in a row "
                              "were skipped (non-finite loss"), err[-3:]
    last = _ckpts(tmp_path)["last.ckpt"]
    assert last["global_step"] == 0  # nothing was ever applied: the weights are the initial student's
    initial = load_file(REPO / "rlad_pl" / "assets" / "tiny-student" / "model.safetensors")
    for k, v in initial.items():
        assert torch.equal(last["state_dict"]["student." + k], v), k


def test_nan_weights_are_never_checkpointed(tmp_path, capsys):
    """An optimizer that turns a weight into NaN at its 2nd step: the epoch-1 checkpoint is refused with one line,
    last.ckpt keeps epoch 0, finite."""
    with pytest.raises(SystemExit) as e:
        _fit(tmp_path, "--trainer.max_epochs", "4", "--export.enabled", "false",
             "--model.optimizer.class_path", "test_lost_work.PoisonAdamW",
             "--model.optimizer.init_args.poison_at", "2")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlad_pl: error: model: the student's weights are not finite at optimizer step 2"), err
    ckpts = _ckpts(tmp_path)
    assert list(ckpts) == ["last.ckpt"] and ckpts["last.ckpt"]["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpts["last.ckpt"]["state_dict"].values())
