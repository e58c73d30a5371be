"""``tools/compare.py`` end to end on a tiny budget: two methods, real ``python -m rlad_pl fit`` subprocesses, the
report read back from their TensorBoard event files (table row per method, step-0 baseline, deltas, timings, plot)."""

from __future__ import annotations

import json
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
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert {"GRPO", "TRRD", "*student before*"} <= set(rows)
    trrd = summary["TRRD"][0]
    after, delta = 100 * trrd["after"]["all/mean@2"], 100 * (trrd["after"]["all/mean@2"] - trrd["before"]["all/mean@2"])
    assert f"**{after:.1f}**" in rows["TRRD"] and f"| {delta:.1f} |" in rows["TRRD"]
    assert "python tools/compare.py --methods GRPO TRRD" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
