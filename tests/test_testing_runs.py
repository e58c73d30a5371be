"""``rlad_pl.testing.runs``: scalars read back from real TensorBoard event files (several files, nested folders, the
same step twice), the means and step times the tools print, and ``run_fit``'s one-line error on a bad config."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS
from rlad_pl.testing import runs


def _write(logdir: Path, points: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(logdir))
    for tag, pts in points.items():
        for step, value in pts:
            w.add_scalar(tag, value, step)
    w.close()


@pytest.fixture
def logdir(tmp_path):
    """Two versions of a run (two event files in nested folders), as a resumed or repeated fit leaves them."""
    root = tmp_path / "run"
    _write(root / "lightning_logs" / "version_0", {
        "train/loss": [(0, 2.0), (1, 1.5)], "timing/generate": [(0, 9.0), (1, 1.0)],
        "val/all/mean@2": [(0, 0.25), (0, 0.5)]})  # the same step twice: written order kept
    _write(root / "lightning_logs" / "version_1", {
        "train/loss": [(3, 0.5), (2, 1.0)], "timing/generate": [(2, 3.0), (3, 2.0)], "timing/train_step": [(3, 4.0)]})
    return root


def test_read_scalars_every_event_file_under_the_folder_in_step_order(logdir):
    assert len(runs.event_files(logdir)) == 2
    s = runs.read_scalars(logdir)
    assert set(s) == {"train/loss", "timing/generate", "timing/train_step", "val/all/mean@2"}
    assert s["train/loss"] == [(0, 2.0), (1, 1.5), (2, 1.0), (3, 0.5)]
    assert s["val/all/mean@2"] == [(0, 0.25), (0, 0.5)]
    assert runs.values(s, "train/loss") == [2.0, 1.5, 1.0, 0.5] and runs.values(s, "nope") == []
    assert runs.last_scalars(s) == {"train/loss": 0.5, "timing/generate": 2.0, "timing/train_step": 4.0,
                                    "val/all/mean@2": 0.5}
    timed = runs.read_scalars(logdir, wall_time=True)["train/loss"]
    assert [(st, v) for st, _, v in timed] == s["train/loss"] and all(w > 1e9 for _, w, _ in timed)  # epoch seconds
    assert runs.read_scalars(logdir / "empty") == {}
    assert runs.version_dirs(logdir) == [logdir / "lightning_logs" / f"version_{i}" for i in (0, 1)]


def test_means_leave_out_the_warm_up_steps(logdir):
    s = runs.read_scalars(logdir)
    assert runs.timings(s) == {"timing/generate": pytest.approx(15.0 / 4), "timing/train_step": 4.0}
    assert runs.timings(s, skip_first=1) == {"timing/generate": 2.0, "timing/train_step": 4.0}
    assert runs.scalar_means(s, ["train/loss", "timing/old_logprobs"], skip_first=2) == {
        "train/loss": 0.75, "timing/old_logprobs": 0.0}  # a tag the run did not log: the default
    assert runs.median_step_s([100.0, 110.0, 125.0, 137.0]) == 12.0  # steps 1..3: 10, 15, 12
    assert runs.median_step_s([100.0, 110.0, 125.0, 137.0], warmup=2) == 13.5
    with pytest.raises(ValueError, match="need more than warmup=3"):
        runs.median_step_s([1.0, 2.0, 3.0], warmup=3)


def test_fit_arguments():
    assert runs.fit_argv(["a.yaml", Path("b.yaml")], {"trainer.max_epochs": 2, "export.enabled": False,
                                                      "model.teacher": None, "x": [1, 2]}, ["--y", "3"]) == [
        "fit", "--config", "a.yaml", "--config", "b.yaml", "--trainer.max_epochs", "2", "--export.enabled", "false",
        "--model.teacher", "null", "--x", "[1, 2]", "--y", "3"]
    assert runs.fit_command("c.yaml")[:4] == [sys.executable, "-m", "rlad_pl", "fit"]


def test_run_logged_kills_at_the_timeout(tmp_path):
    t0 = time.perf_counter()
    done = runs.run_logged([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"],
                           tmp_path / "log.txt", timeout=3, header="===== sleeper", new_session=True)
    assert done.timed_out and done.returncode is None and time.perf_counter() - t0 < 30
    assert done.tail() == ["===== sleeper", "started"]
    ok = runs.run_logged([sys.executable, "-c", "import sys; print('x' * 10); sys.exit(3)"], tmp_path / "log.txt",
                         append=True)
    assert ok.returncode == 3 and not ok.timed_out and ok.peak_rss_gb > 0 and ok.tail(1) == ["x" * 10]


def test_run_fit_on_a_bad_config_raises_the_cli_error_line(tmp_path):
    with pytest.raises(runs.FitError) as e:
        runs.run_fit(CONFIGS / "grpo_tiny.yaml", {"model.student": "/nonexistent/student"}, tmp_path / "run",
                     timeout=300)
    assert e.value.returncode == 2
    assert e.value.line == "rlad_pl: error: model.student: no such local folder '/nonexistent/student'"
    assert str(e.value).startswith("python -m rlad_pl fit exited 2 (log ") and e.value.line in str(e.value)
    assert e.value.log == tmp_path / "run" / "fit.log" and e.value.log.exists()


def test_run_fit_reads_a_one_epoch_fit(tmp_path):
    """A dict config (an overlay written into the run folder) and a temporary run folder, removed afterwards."""
    seen = []
    run = runs.run_fit([CONFIGS / "grpo_tiny.yaml", {"trainer": {"max_epochs": 1}}],
                       {"trainer.check_val_every_n_epoch": 1000, "export.enabled": False,
                        "trainer.enable_checkpointing": False, "data.prompts_per_rollout": 2},
                       env={"OMP_NUM_THREADS": "1"}, timeout=600, on_start=seen.append)
    assert seen == [run.command] and "--trainer.default_root_dir" in run.command
    assert not run.root.exists() and run.log_dir == run.root / "lightning_logs" / "version_0"
    assert [s for s, _ in run.scalars["train/loss"]] == [0]
    assert run.timings()["timing/generate"] > 0 and run.wall_s > 0 and run.peak_rss_gb > 0.1
