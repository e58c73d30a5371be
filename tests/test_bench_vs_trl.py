"""tools/bench_vs_trl.py --quick: both workloads through rlad_pl and TRL, both ratios, both reward curves, the same
work on both sides (sequences, optimizer steps, rollouts, dtype, threads)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,  # benchmark runs of both libraries, in subprocesses
              pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                 reason="needs TRL (pip install -e '.[bench]')")]


def row(text: str, label: str) -> list[str]:
    """The two values (rlad_pl, TRL) of one table row."""
    m = re.search(rf"^  {re.escape(label)} +(\S+(?:, \d+)?) +(\S+(?:, \d+)?)$", text, re.M)
    assert m, f"no row '{label}' in:\n{text}"
    return [m.group(1), m.group(2)]


def test_quick_prints_both_ratios_and_reward_curves():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "tools/bench_vs_trl.py", "--quick", "--threads", "1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    sections = dict(re.findall(r"^== (\w+):.*?\n(.*?)(?=^== |\Z)", text, re.M | re.S))
    assert set(sections) == {"grpo", "opd"}
    for name, sequences in (("grpo", 16), ("opd", 8)):  # QUICK: 4 prompts x 4 samples, 8 prompts x 1
        sec = sections[name]
        ratio = re.search(rf"^{name} ratio rlad_pl / TRL: (\d+\.\d+)x \((\d+\.\d+) s vs (\d+\.\d+) s per step\)",
                          sec, re.M)
        assert ratio, sec
        ours, theirs = float(ratio.group(2)), float(ratio.group(3))
        assert ours > 0 and theirs > 0
        # the times are printed to 3 decimals and the ratio (of the unrounded times) to 2: allow both roundings
        slack = 0.0051 + (ours / theirs) * (0.0005 / ours + 0.0005 / theirs)
        assert float(ratio.group(1)) == pytest.approx(ours / theirs, abs=slack)
        assert row(sec, "sequences per step") == [str(sequences)] * 2
        assert row(sec, "optimizer steps per run") == ["3", "3"]
        assert row(sec, "rollouts per run") == ["3", "3"]
        assert row(sec, "dtype, threads") == ["float32, 1"] * 2
        curve = re.findall(r"^ +(\d+) +(\d\.\d{3}) +(\d\.\d{3})$", sec.split("reward curve")[1], re.M)
        assert [int(s) for s, _, _ in curve] == [1, 2, 3]
        assert all(0.0 <= float(v) <= 1.0 for _, a, b in curve for v in (a, b))


def test_bad_steps_is_one_line():
    out = subprocess.run([sys.executable, "tools/bench_vs_trl.py", "--steps", "2", "--warmup", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip() == "bench_vs_trl: --steps: expected an integer >= 3, got 2"
