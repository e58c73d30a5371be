"""Method comparison on the embedded demo: the same budget, student, teacher and seeds for every objective.

    python tools/compare.py                                   # all methods, seeds 0 1 2 -> docs/compare/
    python tools/compare.py --methods GRPO TRRD --seeds 0     # a subset
    python tools/compare.py --epochs 4 --val-prompts 16 --out /tmp/cmp   # smoke test (a few minutes)
    python tools/compare.py --report-only                     # rebuild the table / plots from finished runs

Every run is ``python -m rlad_pl fit --config configs/demo.yaml`` with ``model.objectives`` replaced by the
method's objective (the rest of the config, the learning rate included, is shared) and ``--seed_everything S
--data.seed S``. Runs go one after the other into ``<out>/runs/<method>/seed<S>`` (``--jobs N``: N at a time, each
with ``cpu_count / N`` threads; step times then include the contention, alike for every method); a finished run
(its ``done.json`` exists) is not repeated. The report, read back
from the TensorBoard logs, is ``<out>/README.md``: per method the final validation Mean@k per difficulty level and
overall, Pass@k, the change of Mean@k from the step-0 validation, mean response length, wall time per optimizer
step (rollout generation + scoring + teacher / old log-probs + update), the teacher's share and the overhead
relative to GRPO; mean and spread (sample standard deviation) over seeds. Plots: ``<out>/curves.png``
(validation Mean@k, its change from step 0 and rollout reward against optimizer steps, mean over seeds
with a min-max band).

Methods (objectives as in ``rlad_pl.objectives``; the papers' default hyper-parameters):

    GRPO           GRPO, eps 0.2 / 0.28 (no teacher)
    KDRL           GRPO + kd_coef * k2 reverse KL(student || teacher) on the student's samples
    OPD            sampled-token on-policy distillation (REINFORCE with reward l_T - l_S)
    OPD-full       full-vocabulary reverse KL(student || teacher) at student prefixes
    FKL            full-vocabulary forward KL(teacher || student) at student prefixes
    KL-mix         0.25 reverse + 0.75 forward KL at student prefixes
    TRRD           RLAD's trust-region ratio distillation, alpha 0.5, teacher clamp 1 (the demo's own objective)
    ReNIO-OPD      ReNIO sample weights (tau 0.8, c 2.5) around sampled-token OPD
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

OBJ = "rlad_pl.objectives."
METHODS: dict[str, list[dict]] = {
    "GRPO": [{"class_path": OBJ + "GRPO", "init_args": {"eps_low": 0.2, "eps_high": 0.28}}],
    "KDRL": [{"class_path": OBJ + "KDRL", "init_args": {"kd_coef": 1e-3, "kd_estimator": "k2", "eps_low": 0.2,
                                                         "eps_high": 0.28}}],
    "OPD": [{"class_path": OBJ + "OPDSampled"}],
    "OPD-full": [{"class_path": OBJ + "OPDFullVocab"}],
    "FKL": [{"class_path": OBJ + "ForwardKL", "init_args": {"prefix_source": "student"}}],
    "KL-mix": [{"class_path": OBJ + "KLMix", "init_args": {"kl_mix_lambda": 0.25, "prefix_source": "student"}}],
    "TRRD": [{"class_path": OBJ + "TRRD", "init_args": {"alpha": 0.5, "eps_low": 0.2, "eps_high": 0.28,
                                                         "teacher_clamp": 1.0}}],
    "ReNIO-OPD": [{"class_path": OBJ + "ReNIO", "init_args": {"inner": {"class_path": OBJ + "OPDSampled"},
                                                               "tau": 0.8, "c": 2.5}}],
}
TIMING = ("timing/generate", "timing/score", "timing/annotate", "timing/train_step")


# ------------------------------------------------------------------------------------------------ running
def run_one(method: str, seed: int, args, extra: list[str], threads: Optional[int] = None) -> Path:
    out = args.out / "runs" / method / f"seed{seed}"
    if (out / "done.json").exists() and not args.force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "lightning_logs", ignore_errors=True)  # an unfinished earlier attempt
    cmd = [sys.executable, "-m", "rlad_pl", "fit", "--config", str(args.config),
           "--model.objectives", json.dumps(METHODS[method]), "--seed_everything", str(seed),
           "--data.seed", str(seed), "--trainer.default_root_dir", str(out), "--export.enabled", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]
    if args.epochs is not None:
        cmd += ["--trainer.max_epochs", str(args.epochs), "--trainer.check_val_every_n_epoch", str(args.epochs)]
    if args.val_prompts is not None:
        cmd += ["--data.val_prompts", str(args.val_prompts)]
    cmd += extra
    print(f"[compare] {method} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(out / "fit.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                 **({"OMP_NUM_THREADS": str(threads)} if threads else {})}).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (out / "fit.log").read_text().strip().splitlines()[-3:]
        raise SystemExit(f"[compare] {method} seed {seed} failed (exit {rc}): {' | '.join(tail)}")
    (out / "done.json").write_text(json.dumps({"wall_seconds": wall, "command": cmd[1:]}, indent=1))
    print(f"[compare] {method} seed {seed}: {wall:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ reading
def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard event files under ``run_dir``: ``tag -> [(step, value)]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True)):
        ea = EventAccumulator(f, size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def summarize(run_dir: Path) -> dict:
    s = read_scalars(run_dir)
    mean_tag = next((t for t in s if t.startswith("val/all/mean@")), None)
    if mean_tag is None:
        raise SystemExit(f"[compare] no validation metrics in {run_dir}")
    k = mean_tag.rsplit("@", 1)[1]
    first = {t[4:]: v[0][1] for t, v in s.items() if t.startswith("val/") and v and v[0][0] == 0}
    last = {t[4:]: v[-1][1] for t, v in s.items() if t.startswith("val/") and v}
    timing = {t: _mean(s.get(t, []), empty=0.0) for t in TIMING}
    done = json.loads((run_dir / "done.json").read_text()) if (run_dir / "done.json").exists() else {}
    return {"k": k, "before": first, "after": last, "step_seconds": sum(timing.values()), "timing": timing,
            "teacher_seconds": _mean(s.get("timing/teacher_logprobs", []), empty=0.0),
            "entropy_end": _mean(s.get("train/entropy", [])[-5:]),
            "entropy_start": s["train/entropy"][0][1] if s.get("train/entropy") else float("nan"),
            "steps": len(s.get("timing/train_step", [])), "wall_seconds": done.get("wall_seconds", float("nan")),
            "val_curve": s.get(mean_tag, []), "reward_curve": s.get("rollout/reward_mean", [])}


# ------------------------------------------------------------------------------------------------ report
def _ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    vals = [scale * v for v in values if v == v]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def report(results: dict[str, list[dict]], args, command: str) -> str:
    any_run = next(r for runs in results.values() for r in runs)
    k = any_run["k"]
    levels = sorted({t.split("/")[0] for t in any_run["after"] if "/" in t} - {"all"})
    grpo = results.get("GRPO")
    grpo_step = sum(r["step_seconds"] for r in grpo) / len(grpo) if grpo else None
    n_seeds = max(len(v) for v in results.values())
    head = (["method", *[f"{lv}" for lv in levels], f"**all Mean@{k}**", f"Δ Mean@{k}", f"Pass@{k}",
             "resp. len", "entropy", "s / step", "teacher s / step", "vs GRPO", "run wall s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # the step-0 validation of every run (one value per seed: the same student, the seed sets the sampling)
    firsts = list({json.dumps(r["before"], sort_keys=True): r["before"]
                   for runs in results.values() for r in runs}.values())

    def b(key: str, scale: float = 100.0) -> str:
        return _ms([f.get(key, float("nan")) for f in firsts], scale)

    lines.append("| *student before* | " + " | ".join(b(f"{lv}/mean@{k}") for lv in levels)
                 + f" | **{b(f'all/mean@{k}')}** | | {b(f'all/pass@{k}')} | {b('response_length_mean', 1.0)}"
                 + f" | {_ms(sorted({r['entropy_start'] for runs in results.values() for r in runs}), 1, 3)}"
                 + " | | | | |")
    for method, runs in results.items():
        cells = [_ms([r["after"].get(f"{lv}/mean@{k}", float("nan")) for r in runs], 100) for lv in levels]
        delta = [r["after"][f"all/mean@{k}"] - r["before"].get(f"all/mean@{k}", float("nan")) for r in runs]
        step = [r["step_seconds"] for r in runs]
        vs = ([100 * (s / grpo_step - 1) for s in step] if grpo_step else [])
        lines.append("| " + " | ".join([
            method, *cells, f"**{_ms([r['after'][f'all/mean@{k}'] for r in runs], 100)}**",
            _ms(delta, 100, 1), _ms([r["after"].get(f"all/pass@{k}", float("nan")) for r in runs], 100),
            _ms([r["after"].get("response_length_mean", float("nan")) for r in runs]),
            _ms([r["entropy_end"] for r in runs], 1, 3),
            _ms(step, 1, 2), _ms([r["teacher_seconds"] for r in runs], 1, 3),
            (_ms(vs, 1, 0) + " %") if vs and method != "GRPO" else "-",
            _ms([r["wall_seconds"] for r in runs], 1, 0)]) + " |")
    steps = any_run["steps"]
    return f"""# Method comparison on the embedded demo

Student `assets/demo-student` distilled from `assets/demo-teacher` on `ChainSumTask` (reasoning-gym `chain_sum`,
levels `NtMd` = N terms of M digits, as configured in the config below), {steps} optimizer steps per run,
identical config (`{args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}`) except
`model.objectives`; {n_seeds} seed(s) per method, mean ± sample std over seeds.

Command:

```bash
{command}
```

Validation after training: Mean@{k} per difficulty level and overall (% of {k} samples per problem that are correct),
Pass@{k} (unbiased, %), mean response length (tokens), "entropy" = the student's mean token entropy (nats) on its
training rollouts over the last 5 steps (the before row: the first step); "Δ Mean@{k}" is the change from the
step-0 validation of the same run. "s / step" = mean wall time of one optimizer step (rollout generation +
scoring + old / teacher log-probs + update; validation excluded), "teacher s / step" = the teacher's
sampled-token log-prob pass (full-vocabulary objectives run the teacher inside the update instead: see
"vs GRPO"), "vs GRPO" = step time relative to GRPO's. Timings on a shared CPU are noisy; compare them only within one table.

{chr(10).join(lines)}

![learning curves](curves.png)

Curves: validation Mean@{k} (left; step 0 = before training), its change from the same run's step-0 value
(middle; removes the seed-to-seed sampling offset) and rollout reward (right, mean of the training samples at
temperature 1; every method sees the same prompts for a given seed) against optimizer steps; lines are means over
seeds, bands min-max.
"""


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for (method, runs), color in zip(results.items(), plt.cm.tab10.colors):
        for ax, key, smooth, paired in ((axes[0], "val_curve", 1, False), (axes[1], "val_curve", 1, True),
                                        (axes[2], "reward_curve", 10, False)):
            curves = [r[key] for r in runs if r[key]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = [x for x, _ in curves[0][:n]]
            ys = [_smooth([y - (c[0][1] if paired else 0.0) for _, y in c[:n]], smooth) for c in curves]
            vals = [[y[i] for y in ys] for i in range(n)]
            mean = [sum(v) / len(v) for v in vals]
            ax.plot(steps, mean, label=method, color=color, marker="o" if key == "val_curve" else None, ms=3)
            if len(curves) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.12)
    k = next(r["k"] for runs in results.values() for r in runs)
    axes[0].set(title=f"validation Mean@{k}", xlabel="optimizer step", ylabel=f"Mean@{k}")
    axes[1].set(title=f"change of validation Mean@{k} from step 0 (same seed)", xlabel="optimizer step",
                ylabel=f"Δ Mean@{k}")
    axes[2].set(title="rollout reward (moving average of 10)", xlabel="optimizer step", ylabel="reward")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean(curve: list[tuple[int, float]], empty: float = float("nan")) -> float:
    """Mean of the values of a ``[(step, value)]`` curve (``empty`` when it has none)."""
    return sum(v for _, v in curve) / len(curve) if curve else empty


def _smooth(xs: list[float], w: int) -> list[float]:
    if w <= 1:
        return xs
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Arguments after '--' are passed to every run (e.g. -- --data.val_k 4).")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs (validation at the end)")
    ap.add_argument("--val-prompts", type=int, default=None, help="override data.val_prompts")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "compare")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cpu_count / jobs threads)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.config = args.config.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    if not args.report_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for f in [pool.submit(run_one, m, s, args, extra, threads) for m in args.methods for s in args.seeds]:
                f.result()
    for method in args.methods:
        for seed in args.seeds:
            run_dir = args.out / "runs" / method / f"seed{seed}"
            if (run_dir / "done.json").exists():
                results.setdefault(method, []).append(summarize(run_dir))
    if not results:
        raise SystemExit("[compare] no finished runs")
    command = "python tools/compare.py " + " ".join(a for a in argv if a not in ("--report-only", "--force"))
    (args.out / "README.md").write_text(report(results, args, command.strip()))
    plot(results, args.out / "curves.png")
    summary = {m: [{k: v for k, v in r.items() if not k.endswith("_curve")} for r in runs]
               for m, runs in results.items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[compare] wrote {args.out / 'README.md'} and curves.png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
