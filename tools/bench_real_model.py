"""Seconds per step on CPU of the real model (SmolLM2-135M-Instruct, 49,152-token vocabulary), one table.

    python tools/build_real_model.py               # once (see rlad_pl/testing/real_model.py)
    python tools/bench_real_model.py               # the full table: 8 cells, 4 steps of 4 prompts x 4 x 64 tokens
    python tools/bench_real_model.py --steps 3 --prompts 2 --group 4 --new-tokens 32 --chunks 8   # README table
    python tools/bench_real_model.py --only chunks --steps 2 --prompts 2 --group 4 --new-tokens 256 --chunks 32
    python tools/bench_real_model.py --quick       # 2 cells, tiny sizes (the test's run)

Measured on the shared 2-core machine: the README's table took 21 min at a load average of 14 -> 5, ``--quick``
5.5 min at ~20 (a few times less on a quiet machine).

Cells: GRPO and TRRD, each with the Hugging Face sampler (``HFSampler``) and the vLLM sampler (``VLLMSampler``),
and for TRRD the ``local`` and ``vllm`` teacher backends (``model.teacher_backend``). There is only one real model,
so the TRRD teacher is SmolLM2-135M-Instruct itself (the frozen initial weights): the teacher's cost is that of a
135M model. Extra GRPO / HF rows run the same work at smaller ``model.logprob_chunk_size`` values: the chunked LM
head's effect on the process's peak memory (the main rows use the default, 256 positions per chunk, which is one
chunk, i.e. unchunked, for responses of up to 256 tokens).

Every cell is ``python -m rlad_pl fit --config configs/smollm2_grpo_cpu.yaml`` plus the same overrides (the same
prompts, prompts per rollout, group size, new tokens, micro-batch, seed) and an overlay for its objective, sampler
and teacher backend, run as a subprocess: what a user runs. One epoch is one rollout batch and one optimizer step.
Startup is excluded by per-step timing after warm-up: the wall-clock times of the TensorBoard events of steps
1 .. N-1 (step 0 carries imports, model loading and engine starts); seconds per step is the median of the
differences. The split per step comes from the module's own ``timing/*`` tags (generation, weight sync, old
log-probs, teacher log-probs, update; ``other`` is the rest: reward scoring, batching, logging, the loop), averaged
over the same steps. Peak memory is the subprocess's resident-set high-water mark (``wait4``; the vLLM engines run
in-process). With ``--repeats`` > 1 the cells run interleaved (A B C .. A B C ..) and each cell's median is taken.
CPU timings are noisy on a shared machine: the load average before and after is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from rlad_pl.testing import runs  # noqa: E402

CONFIG = REPO / "configs" / "smollm2_grpo_cpu.yaml"
PHASES = (("generate", "timing/generate"), ("sync", "timing/weight_sync"), ("old_lp", "timing/old_logprobs"),
          ("teacher", "timing/teacher_logprobs"), ("update", "timing/train_step"))
TRRD = {"class_path": "rlad_pl.objectives.TRRD",
        "init_args": {"alpha": 0.5, "teacher_clamp": 1.0, "teacher_clamp_grad": "through", "eps_low": 0.2,
                      "eps_high": 0.28}}


@dataclass(frozen=True)
class Cell:
    """One table row: objective (``grpo`` / ``trrd``), sampler (``hf`` / ``vllm``), teacher backend (``local`` /
    ``vllm``; GRPO has none) and ``model.logprob_chunk_size`` (None: the module's default)."""

    objective: str
    sampler: str
    teacher: Optional[str] = None
    chunk: Optional[int] = None

    @property
    def name(self) -> str:
        parts = [self.objective.upper(), f"{self.sampler} sampler"]
        if self.teacher:
            parts.append(f"{self.teacher} teacher")
        if self.chunk:
            parts.append(f"chunk {self.chunk}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Sizes:
    """The work of every cell: ``steps`` rollout batches of ``prompts`` x ``group`` samples, ``new_tokens`` each."""

    steps: int
    prompts: int
    group: int
    new_tokens: int
    kv_cache_mib: int = 512


FULL = Sizes(steps=4, prompts=4, group=4, new_tokens=64)
QUICK = Sizes(steps=2, prompts=2, group=2, new_tokens=8, kv_cache_mib=128)


def cells(quick: bool, chunks: list[int], only: str = "all") -> list[Cell]:
    """The table's rows: 6 cells (``--quick``: GRPO / HF and TRRD / vLLM sampler / vLLM teacher) plus GRPO / HF at
    each chunk size of ``chunks``; ``only="chunks"``: GRPO / HF at the default chunk and at ``chunks``."""
    if only == "chunks":
        return [Cell("grpo", "hf")] + [Cell("grpo", "hf", chunk=c) for c in chunks]
    if quick:
        main = [Cell("grpo", "hf"), Cell("trrd", "vllm", "vllm")]
    else:
        main = [Cell("grpo", "hf"), Cell("grpo", "vllm"), Cell("trrd", "hf", "local"), Cell("trrd", "vllm", "local"),
                Cell("trrd", "hf", "vllm"), Cell("trrd", "vllm", "vllm")]
    return main + [Cell("grpo", "hf", chunk=c) for c in chunks]


def overlay(cell: Cell, model_dir: str, sizes: Sizes) -> dict:
    """The cell's config overlay on ``configs/smollm2_grpo_cpu.yaml``: objective, teacher, backend, sampler."""
    engine = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True,
              "engine_kwargs": {"kv_cache_memory_bytes": sizes.kv_cache_mib << 20, "max_num_seqs": 64}}
    model: dict = {}
    data: dict = {}
    if cell.objective == "trrd":
        model.update(objectives=[TRRD], teacher=model_dir)
        if cell.teacher == "vllm":
            model["teacher_backend"] = {"class_path": "rlad_pl.teacher.VLLMTeacher", "init_args": engine}
    if cell.sampler == "vllm":
        data["sampler"] = {"class_path": "rlad_pl.rollout.vllm.VLLMSampler", "init_args": {**engine, "seed": 0}}
    if cell.chunk:
        model["logprob_chunk_size"] = cell.chunk
    return {"model": model, "data": data}


def fit_overrides(model_dir: str, sizes: Sizes) -> dict:
    """The overrides every cell shares (validation, checkpoints, export off)."""
    return {"model.student": model_dir, "trainer.max_epochs": sizes.steps,
            "trainer.check_val_every_n_epoch": 1000000, "trainer.enable_checkpointing": False,
            "trainer.enable_progress_bar": False, "export.enabled": False,
            "data.prompts_per_rollout": sizes.prompts, "data.group_size": sizes.group,
            "data.micro_batch_size": sizes.prompts * sizes.group, "data.sampling.max_new_tokens": sizes.new_tokens,
            "seed_everything": 0}


def fit_command(cell_config: Path, model_dir: str, root: Path, sizes: Sizes) -> list[str]:
    """``python -m rlad_pl fit`` of one cell (what ``run_cell`` runs)."""
    overrides = {"trainer.default_root_dir": root, **fit_overrides(model_dir, sizes)}
    return runs.fit_command([CONFIG, cell_config], overrides)


def per_step(events: dict[str, list[tuple[int, float, float]]], steps: int) -> dict[str, float]:
    """Seconds per step after warm-up (median wall-time difference between the events of steps 1 .. N-1 and those
    of the step before) and each phase's mean over the same steps (0 when the run does not log it);
    ``events``: ``tag -> [(step, wall_time, value)]`` (``runs.read_scalars(..., wall_time=True)``)."""
    loss = events.get("train/loss", [])
    if len(loss) != steps:
        raise RuntimeError(f"expected {steps} logged steps of train/loss, found {len(loss)}")
    out = {"step": runs.median_step_s([w for _, w, _ in loss], warmup=1)}
    means = runs.scalar_means(events, [tag for _, tag in PHASES], skip_first=1)
    out.update({name: means[tag] for name, tag in PHASES})
    out["other"] = out["step"] - sum(out[n] for n, _ in PHASES)
    return out


def run_cell(cell: Cell, model_dir: str, sizes: Sizes, log=print) -> dict:
    """One fit subprocess; its per-step numbers, peak RSS (GB) and whole wall time. The run folder (a temporary
    one) is deleted."""
    try:
        run = runs.run_fit([CONFIG, overlay(cell, model_dir, sizes)], fit_overrides(model_dir, sizes),
                           env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    except runs.FitError as e:
        raise RuntimeError(f"{cell.name}: fit exited {e.returncode}:\n" + "\n".join(e.tail)) from None
    res = per_step(run.events, sizes.steps)
    res.update(peak_gb=run.peak_rss_gb, wall=run.wall_s)
    log(f"  {cell.name}: {res['step']:.2f} s/step, peak {res['peak_gb']:.2f} GB, {run.wall_s:.0f} s in all")
    return res


def run_table(rows: list[Cell], model_dir: str, sizes: Sizes, repeats: int, log=print) -> list[dict]:
    """Every cell ``repeats`` times, interleaved; per cell the median of each number over the repeats."""
    done: dict[Cell, list[dict]] = {c: [] for c in rows}
    for r in range(repeats):
        log(f"repeat {r + 1}/{repeats}")
        for cell in rows:
            done[cell].append(run_cell(cell, model_dir, sizes, log))
    return [{"cell": c, **{k: statistics.median(x[k] for x in rs) for k in rs[0]}} for c, rs in done.items()]


def baseline(rows: list[dict], cell: Cell) -> Optional[dict]:
    """The HF-sampler, local-teacher, default-chunk row of the cell's objective (its speed-up reference)."""
    ref = Cell(cell.objective, "hf", "local" if cell.objective == "trrd" else None)
    return next((r for r in rows if r["cell"] == ref), None)


def format_table(rows: list[dict], sizes: Sizes) -> str:
    head = (f"{'cell':<38} {'s/step':>7} {'x base':>7} {'generate':>9} {'sync':>6} {'old lp':>7} {'teacher':>8} "
            f"{'update':>7} {'other':>6} {'peak GB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        base = baseline(rows, r["cell"])
        speed = f"{base['step'] / r['step']:.2f}x" if base else "-"
        lines.append(f"{r['cell'].name:<38} {r['step']:7.2f} {speed:>7} {r['generate']:9.2f} {r['sync']:6.2f} "
                     f"{r['old_lp']:7.2f} {r['teacher']:8.2f} {r['update']:7.2f} {r['other']:6.2f} "
                     f"{r['peak_gb']:8.2f}")
    return "\n".join(lines)


def _fail(flag: str, message: str) -> int:
    """One line naming the flag and what was expected; the exit status of bad input."""
    print(f"bench_real_model: error: {flag}: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 cells, 2 steps of 2 prompts x 2 samples x 8 tokens, no chunk rows")
    p.add_argument("--model", default=None, help="the model folder (default: rlad_pl.testing.real_model.default_dir())")
    p.add_argument("--chunks", type=int, nargs="*", default=None,
                   help="extra GRPO / HF rows at these model.logprob_chunk_size values (default 8 32; --quick: none)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every cell (median)")
    p.add_argument("--steps", type=int, default=None, help="rollout batches per cell (>= 2; step 0 is the warm-up)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per rollout batch (default 4; --quick: 2)")
    p.add_argument("--group", type=int, default=None, help="samples per prompt (default 4; --quick: 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="max new tokens (default 64; --quick: 8)")
    p.add_argument("--only", choices=("all", "chunks"), default="all",
                   help="chunks: only the GRPO / HF rows (default chunk and --chunks), for the LM-head memory")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    given = {"steps": args.steps, "prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens}
    for name, value in given.items():
        least = 2 if name == "steps" else 1
        if value is not None and value < least:
            return _fail("--" + name.replace("_", "-"), f"expected an integer >= {least}"
                         f"{' (step 0 is the warm-up)' if name == 'steps' else ''}, got {value}")
    sizes = Sizes(**{k: getattr(base, k) if v is None else v for k, v in given.items()},
                  kv_cache_mib=base.kv_cache_mib)
    if args.repeats < 1:
        return _fail("--repeats", f"expected an integer >= 1, got {args.repeats}")
    chunks = args.chunks if args.chunks is not None else ([] if args.quick else [8, 32])
    if any(c < 1 for c in chunks):
        return _fail("--chunks", f"expected positive integers, got {chunks}")
    from rlad_pl.testing.real_model import default_dir, is_complete

    model_dir = str(Path(args.model).expanduser() if args.model else default_dir())
    if not is_complete(model_dir):
        return _fail("--model", f"{model_dir} is not a built model folder; run python tools/build_real_model.py")
    rows = cells(args.quick, chunks, args.only)
    load0 = os.getloadavg()[0]
    print(f"SmolLM2-135M-Instruct ({model_dir}), {len(rows)} cells x {args.repeats}: {sizes.steps} steps of "
          f"{sizes.prompts} prompts x {sizes.group} samples x {sizes.new_tokens} new tokens, micro-batch "
          f"{sizes.prompts * sizes.group}, {os.environ.get('OMP_NUM_THREADS', os.cpu_count())} threads", flush=True)
    table = run_table(rows, model_dir, sizes, args.repeats, log=lambda m: print(m, flush=True))
    over = f"steps 1..{sizes.steps - 1}" + (" and repeats" if args.repeats > 1 else "")
    print(f"\nseconds per step after warm-up (median over {over}); phases: mean s per step; x base: speed-up over "
          f"the HF-sampler, local-teacher row of the objective")
    print("TRRD's teacher is SmolLM2-135M-Instruct itself (frozen initial weights): there is only one real model.")
    print(format_table(table, sizes))
    print(f"load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    if args.json:
        Path(args.json).write_text(json.dumps([{**r, "cell": r["cell"].name} for r in table], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
