"""``tools/compare.py`` end to end on a tiny budget: two methods, real ``python -m rlad_pl fit`` subprocesses, the
report read back from their TensorBoard event files (table row per method, step-0 baseline, deltas, timings, plot)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, scalars


@pytest.mark.slow
def test_compare_runs_methods_and_reports_from_tensorboard(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(REPO / "tools" / "compare.py"), "--methods", "GRPO", "TRRD", "--seeds", "0",
           "--epochs", "2", "--val-prompts", "8", "--out", str(out), "--",
           "--data.prompts_per_rollout", "8", "--data.micro_batch_size", "64", "--data.val_k", "2",
           "--data.pass_k", "[1, 2]", "--data.sampling.max_new_tokens", "24",
           "--data.val_sampling.max_new_tokens", "24"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"GRPO", "TRRD"}
    for method, (run,) in summary.items():
        run_dir = out / "runs" / method / "seed0"
        assert (run_dir / "done.json").exists()
        assert run["steps"] == 2 and run["k"] == "2"
        val = scalars(run_dir, "val/all/mean@2")
        assert len(val) == 2  # step 0 (ValidateAtStart) and after the last step
        assert run["before"]["all/mean@2"] == pytest.approx(val[0])
        assert run["after"]["all/mean@2"] == pytest.approx(val[-1])
        assert run["step_seconds"] > 0
    # only TRRD runs the teacher's sampled-token pass
    assert summary["GRPO"][0]["teacher_seconds"] == 0.0 and summary["TRRD"][0]["teacher_seconds"] > 0.0

    report = (out / "README.md").read_text()
    rows: dict[str, str] = {}  # the first table (the study sections below repeat the method names)
    for line in report.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert {"GRPO", "TRRD", "*student before*"} <= set(rows)
    trrd = summary["TRRD"][0]
    after, delta = 100 * trrd["after"]["all/mean@2"], 100 * (trrd["after"]["all/mean@2"] - trrd["before"]["all/mean@2"])
    assert f"**{after:.1f}**" in rows["TRRD"] and f"| {delta:.1f} |" in rows["TRRD"]
    assert "python tools/compare.py --methods GRPO TRRD" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Equal rollout batches and equal wall time" in report and "| TRRD - GRPO |" in report


def _compare_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_tool", REPO / "tools" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_equal_wall_time_reads_the_curve_between_validation_points():
    cmp = _compare_module()
    # 4 steps of 10, 10, 20, 20 s; validations before training (0) and after steps 2 and 4 (logged at 1 and 3)
    run = {"time_curve": [(0, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (4, 60.0)],
           "val_curve": [(0, 0.40), (1, 0.50), (3, 0.70)]}
    times = cmp._time_of_step(run)
    assert times == {0: 0.0, 1: 20.0, 3: 60.0}
    assert cmp.value_at_time(run["val_curve"], times, 20.0) == pytest.approx(0.50)
    assert cmp.value_at_time(run["val_curve"], times, 40.0) == pytest.approx(0.60)  # halfway from 20 s to 60 s
    assert cmp.value_at_time(run["val_curve"], times, 10.0) == pytest.approx(0.45)
    assert cmp.value_at_time(run["val_curve"], times, 99.0) == pytest.approx(0.70)  # past the end: the last value


def test_welch_and_hard_levels():
    cmp = _compare_module()
    # a = (1, 2, 3), b = (4, 5, 6): difference -3, t = -3 / sqrt(1/3 + 1/3) = -3.674, df 4 -> p = 0.02131
    diff, p = cmp.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert diff == pytest.approx(-3.0) and p == pytest.approx(0.02131, abs=1e-4)
    assert math.isnan(cmp.welch([1.0], [2.0, 3.0])[1])
    runs = {"A": [{"before": {"all/mean@8": 0.5, "2t1d/mean@8": 0.9, "2t2d/mean@8": 0.05}},
                  {"before": {"all/mean@8": 0.5, "2t1d/mean@8": 0.8, "2t2d/mean@8": 0.25}}]}
    assert cmp.hard_levels(runs, "8") == ["2t2d"]  # mean 0.15 < 0.2; 2t1d 0.85 is not
