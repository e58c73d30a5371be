"""The first screen of a fit carries what a user can act on: no third-party advertising, no deprecation inside
Lightning, no Lightning warning that does not apply to on-policy training (``rlad_pl.core.errors.quiet_startup``),
while rlad_pl's own lines stay."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from conftest import CONFIGS, REPO

TRRD_TINY = str(CONFIGS / "trrd_tiny.yaml")  # a frozen teacher: Lightning's "modules in eval mode" warning

#: ``python -c`` program: the CLI on a machine where Lightning would suggest dataloader workers (it does so only
#: when more than 2 cores are free, which this test machine may not have); ``NOISY=1`` leaves the filters off.
PROGRAM = """
import os, sys
import lightning.pytorch.trainer.connectors.data_connector as dc
dc.suggested_max_num_workers = lambda local_world_size: 8
import rlad_pl.cli as cli
if os.environ.get("NOISY") == "1":
    cli.quiet_startup = lambda: None
cli.main(sys.argv[1:])
"""

#: lines that must not reach the first screen (regexes, searched in stdout + stderr)
NOISE = {
    "advertising tip": r"Tip:|litlogger|litmodels|lightning\.ai",
    "deprecation": r"(?i)deprecat",
    "eval-mode warning": r"module\(s\) in eval mode at the start of training",
    "workers warning": r"does not have many workers",
    "logging-interval warning": r"smaller than the logging interval",
    "overridden-hook warning": r"You have overridden",
    "a third-party warning's source line": r"site-packages/.*\.py:\d+: ",
}


def _fit(tmp_path, noisy: bool) -> subprocess.CompletedProcess:
    import os

    args = ["fit", "--config", TRRD_TINY, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "5",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--export.enabled", "false"]
    env = {**os.environ, "NOISY": "1" if noisy else "0"}
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


def test_first_screen_of_a_fit_has_no_third_party_noise(tmp_path):
    out = _fit(tmp_path, noisy=False)
    assert out.returncode == 0, out.stderr[-3000:]
    screen = out.stdout + out.stderr
    found = {name: m.group(0) for name, rx in NOISE.items() for m in [re.search(rx, screen)] if m}
    assert not found, (found, screen[-4000:])
    assert "rlad_pl: first prompt as encoded for the model:" in out.stderr  # our own lines stay
    assert "GPU available:" in out.stderr  # and so do Lightning's plain facts


@pytest.mark.slow  # a second 1-epoch fit (~10 s): the noise is there without the filters, so the test above can see it
def test_without_the_filters_the_same_fit_shows_the_noise(tmp_path):
    out = _fit(tmp_path, noisy=True)
    assert out.returncode == 0, out.stderr[-3000:]
    screen = out.stdout + out.stderr
    for name in ("advertising tip", "deprecation", "eval-mode warning", "workers warning", "logging-interval warning"):
        assert re.search(NOISE[name], screen), (name, screen[-4000:])


def _tips(tmp_path) -> list[str]:
    """Messages that reach the handlers of Lightning's rank-zero logger while a Trainer with a logger and default
    checkpointing is built and its deferred litmodels tip is shown."""
    import lightning_utilities.core.rank_zero as rank_zero
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler, logger = Keep(), rank_zero.log
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer = Trainer(logger=CSVLogger(str(tmp_path)), enable_checkpointing=True, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", devices=1)
        trainer._callback_connector._maybe_show_litmodels_tip()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    return [m for m in seen if "Tip" in m]


def test_lightning_advertising_tips_are_dropped_at_their_logger(tmp_path):
    import lightning_utilities.core.rank_zero as rank_zero

    from rlad_pl.core.errors import _DropRecords, quiet_startup

    logger = rank_zero.log
    for f in [f for f in logger.filters if isinstance(f, _DropRecords)]:
        logger.removeFilter(f)
    tips = _tips(tmp_path / "a")
    assert any("litlogger" in t for t in tips) and any("litmodels" in t for t in tips), tips  # what Lightning says
    quiet_startup()
    assert _tips(tmp_path / "b") == []
    # other lines of the same logger still pass
    assert _DropRecords(["x"]).filter(logging.makeLogRecord({"msg": "GPU available: False, used: False"}))


# ----------------------------------------------------------------------------------------------- --ckpt_path last
GRPO_TINY = str(CONFIGS / "grpo_tiny.yaml")


def _fit_in_process(capsys, root, *extra):
    """A 1-epoch tiny fit through the CLI in this process: (trainer, stderr lines, warning messages)."""
    import warnings

    from conftest import run_cli

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli("fit", "--config", GRPO_TINY, "--trainer.max_epochs", "1", "--trainer.default_root_dir",
                      str(root), "--export.enabled", "false", "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false", *extra)
    return cli.trainer, capsys.readouterr().err.splitlines(), [str(w.message) for w in caught]


def test_ckpt_path_last_with_nothing_to_resume_says_so_and_starts_fresh(capsys, tmp_path):
    root = tmp_path / "runs"
    trainer, err, warned = _fit_in_process(capsys, root, "--ckpt_path", "last")
    pattern = str(root / "lightning_logs" / "*" / "checkpoints" / "last.ckpt")
    lines = [ln for ln in err if ln.startswith("rlad_pl: warning: ckpt_path")]
    assert lines == [f"rlad_pl: warning: ckpt_path: 'last', but no last.ckpt found (looked for {pattern}); "
                     "starting a fresh run"], err
    assert not [w for w in warned if "save_last" in w or "no last checkpoint" in w], warned  # Lightning's hint
    assert trainer.global_step == 1 and trainer.current_epoch == 1  # trained from scratch
    assert (root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    # the next run finds that file and resumes from it, without the line
    trainer, err, _ = _fit_in_process(capsys, root, "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert not [ln for ln in err if ln.startswith("rlad_pl: warning: ckpt_path")], err
    assert trainer.global_step == 2


def test_ckpt_path_last_with_checkpointing_off_says_so(capsys, tmp_path):
    trainer, err, warned = _fit_in_process(capsys, tmp_path / "runs", "--ckpt_path", "last",
                                           "--trainer.enable_checkpointing", "false")
    assert [ln for ln in err if ln.startswith("rlad_pl: warning: ckpt_path")] == [
        "rlad_pl: warning: ckpt_path: 'last', but checkpointing is off (trainer.enable_checkpointing: false), so "
        "there is no last.ckpt to resume; starting a fresh run"], err
    assert not [w for w in warned if "save_last" in w], warned
    assert trainer.global_step == 1
