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

Variants (docs/study): KDRL-5e-3 (kd_coef 5e-3), KDRL-anneal (5e-3 -> 1e-3 linearly over 40 steps, KDRL's
schedule), TRRD-0.3 / TRRD-0.7 (alpha), TRRD-noclamp (no teacher log-ratio clamp), ReNIO-OPD-c3 (the paper's
default c 3.0).

Study mode (docs/study/README.md): ``--val-every N`` validates every N rollout batches (learning curves); the report
adds Mean@k at equal wall time (each run's validation curve read at the mean training time of the fastest method,
linear between validation points), a significance table (Welch's t-test over seeds on the change of Mean@k from
step 0, overall and on the "hard" levels where the student starts below 20 %), and per-method diagnostics
(teacher log-ratio, TRRD clamp / clip fractions, ReNIO pivotal-token statistics). ``--eval-models A B`` only
measures models (Mean@8 / Pass@8 at T=1 on 64 validation problems per level of the config's task).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package itself, also without an installed copy
    sys.path.insert(0, str(REPO))
from rlad_pl.testing.runs import FitError, read_scalars, run_fit, scalar_means  # noqa: E402

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
KD, TR, REN = METHODS["KDRL"][0]["init_args"], METHODS["TRRD"][0]["init_args"], METHODS["ReNIO-OPD"][0]["init_args"]
VARIANTS: dict[str, list[dict]] = {
    "KDRL-5e-3": [{"class_path": OBJ + "KDRL", "init_args": {**KD, "kd_coef": 5e-3}}],
    "KDRL-anneal": [{"class_path": OBJ + "KDRL", "init_args": {**KD, "kd_coef": 5e-3, "kd_coef_end": 1e-3,
                                                                "kd_anneal_steps": 40}}],
    "TRRD-0.3": [{"class_path": OBJ + "TRRD", "init_args": {**TR, "alpha": 0.3}}],
    "TRRD-0.7": [{"class_path": OBJ + "TRRD", "init_args": {**TR, "alpha": 0.7}}],
    "TRRD-noclamp": [{"class_path": OBJ + "TRRD", "init_args": {**TR, "teacher_clamp": None}}],
    "ReNIO-OPD-c3": [{"class_path": OBJ + "ReNIO", "init_args": {**REN, "c": 3.0}}],
}
METHODS.update(VARIANTS)
#: pairs whose significance the study reports besides "every method vs GRPO" (when both ran)
PAIRS = [("TRRD", "KDRL"), ("TRRD", "OPD"), ("KDRL", "OPD"), ("ReNIO-OPD", "OPD"), ("OPD-full", "TRRD"),
         ("OPD-full", "OPD"), ("TRRD-0.3", "TRRD"), ("TRRD-0.7", "TRRD"), ("TRRD-noclamp", "TRRD"),
         ("KDRL-5e-3", "KDRL"), ("KDRL-anneal", "KDRL"), ("FKL", "OPD-full"), ("KL-mix", "OPD-full")]
#: per-step metrics averaged over a run for the diagnostics table (matched as tag suffixes)
DIAGNOSTICS = ("zero_variance_groups", "reverse_kl_sampled", "kd_estimate", "teacher_log_ratio_mean",
               "teacher_clamp_frac", "clip_frac_low",
               "clip_frac_high", "pivotal_frac", "samples_with_pivotal", "weight_max", "d_mean")
TIMING = ("timing/generate", "timing/score", "timing/annotate", "timing/train_step")


# ------------------------------------------------------------------------------------------------ running
def run_one(method: str, seed: int, args, extra: list[str], threads: Optional[int] = None) -> Path:
    out = args.out / "runs" / method / f"seed{seed}"
    if (out / "done.json").exists() and not args.force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "lightning_logs", ignore_errors=True)  # an unfinished earlier attempt
    overrides = {"model.objectives": METHODS[method], "seed_everything": seed, "data.seed": seed,
                 "export.enabled": False, "trainer.enable_progress_bar": False,
                 "trainer.enable_checkpointing": False}
    if args.epochs is not None:
        overrides.update({"trainer.max_epochs": args.epochs, "trainer.check_val_every_n_epoch": args.epochs})
    if args.val_prompts is not None:
        overrides["data.val_prompts"] = args.val_prompts
    if getattr(args, "val_every", None) is not None:
        overrides["trainer.check_val_every_n_epoch"] = args.val_every
    announce = lambda cmd: print(f"[compare] {method} seed {seed}: {' '.join(cmd[1:])}", flush=True)  # noqa: E731
    try:
        run = run_fit(args.config, overrides, out, extra=extra, on_start=announce,
                      env={"OMP_NUM_THREADS": str(threads)} if threads else None)
    except FitError as e:
        tail = " | ".join(e.tail[-3:])
        raise SystemExit(f"[compare] {method} seed {seed} failed (exit {e.returncode}): {tail}") from None
    (out / "done.json").write_text(json.dumps({"wall_seconds": run.wall_s, "command": run.command[1:]}, indent=1))
    print(f"[compare] {method} seed {seed}: {run.wall_s:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ reading
def summarize(run_dir: Path) -> dict:
    s = read_scalars(run_dir)
    mean_tag = next((t for t in s if t.startswith("val/all/mean@")), None)
    if mean_tag is None:
        raise SystemExit(f"[compare] no validation metrics in {run_dir}")
    k = mean_tag.rsplit("@", 1)[1]
    first = {t[4:]: v[0][1] for t, v in s.items() if t.startswith("val/") and v and v[0][0] == 0}
    last = {t[4:]: v[-1][1] for t, v in s.items() if t.startswith("val/") and v}
    timing = scalar_means(s, TIMING)
    done = json.loads((run_dir / "done.json").read_text()) if (run_dir / "done.json").exists() else {}
    return {"k": k, "before": first, "after": last, "step_seconds": sum(timing.values()), "timing": timing,
            "teacher_seconds": scalar_means(s, ["timing/teacher_logprobs"])["timing/teacher_logprobs"],
            "entropy_end": _mean(s.get("train/entropy", [])[-5:]),
            "entropy_start": s["train/entropy"][0][1] if s.get("train/entropy") else float("nan"),
            "steps": len(s.get("timing/train_step", [])), "wall_seconds": done.get("wall_seconds", float("nan")),
            "val_curve": s.get(mean_tag, []), "reward_curve": s.get("rollout/reward_mean", []),
            "time_curve": _cumulative_seconds(s),
            "val_curves": {t[4:]: v for t, v in s.items() if t.startswith("val/")},
            "diagnostics": {d: _mean(next((v for t, v in s.items() if t.endswith("/" + d)
                                           and not t.startswith(("val/", "timing/"))), [])) for d in DIAGNOSTICS}}


def _cumulative_seconds(s: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """``[(step, training seconds spent before that step)]`` from the per-step timing tags (validation excluded);
    the entry for step ``n`` is the time of the first ``n`` optimizer steps."""
    per_step: dict[int, float] = {}
    for tag in TIMING:
        for step, v in s.get(tag, []):
            per_step[step] = per_step.get(step, 0.0) + v
    out, total = [(0, 0.0)], 0.0
    for i, step in enumerate(sorted(per_step)):
        total += per_step[step]
        out.append((i + 1, total))
    return out


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
    student, teacher = _config_models(args.config)
    return f"""# Method comparison on the embedded demo

Student `{student}` distilled from `{teacher}` on `ChainSumTask` (reasoning-gym `chain_sum`,
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
"vs GRPO"), "vs GRPO" = step time relative to GRPO's. Timings on a shared CPU are noisy; compare them only within one \
table.

{chr(10).join(lines)}

![learning curves](curves.png)

Curves: validation Mean@{k} (left; step 0 = before training), its change from the same run's step-0 value
(middle; removes the seed-to-seed sampling offset) and rollout reward (right, mean of the training samples at
temperature 1; every method sees the same prompts for a given seed) against optimizer steps; lines are means over
seeds, bands min-max.
"""


def _time_of_step(run: dict, cost: Optional[float] = None) -> dict[int, float]:
    """Validation step -> training seconds before it (or, with ``cost``, optimizer steps x ``cost``). Step 0 is the
    validation before training; a later validation is logged at the index of the last optimizer step it follows
    (step n-1 after n steps)."""
    cum = dict(run["time_curve"]) if cost is None else {n: n * cost for n in range(len(run["time_curve"]))}
    return {step: cum[min(step + 1, len(cum) - 1)] if step else 0.0 for step, _ in run["val_curve"]}


def value_at_time(curve: list[tuple[int, float]], times: dict[int, float], budget: float) -> float:
    """The validation value of ``curve`` (``[(step, value)]``) at ``budget`` training seconds: linear between the
    validation points (their time = the training seconds of the steps before them), the last value past the end."""
    pts = [(times[step], v) for step, v in curve]
    if budget >= pts[-1][0]:
        return pts[-1][1]
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if t0 <= budget <= t1:
            return v0 + (v1 - v0) * ((budget - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return pts[0][1]


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """``(mean(a) - mean(b), two-sided p of Welch's t-test)``; p is nan with fewer than 2 values per side."""
    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan")
    from scipy.stats import ttest_ind

    return diff, float(ttest_ind(a, b, equal_var=False).pvalue)


def hard_levels(results: dict[str, list[dict]], k: str, threshold: float = 0.2) -> list[str]:
    """Levels where the student's step-0 Mean@k (mean over every run) is below ``threshold``."""
    runs = [r for rs in results.values() for r in rs]
    levels = sorted({t.split("/")[0] for t in runs[0]["before"] if "/" in t} - {"all"})
    return [lv for lv in levels
            if sum(r["before"].get(f"{lv}/mean@{k}", 1.0) for r in runs) / len(runs) < threshold]


def _delta(run: dict, key: str) -> float:
    return run["after"][key] - run["before"].get(key, float("nan"))


def _hard_delta(run: dict, hard: list[str], k: str) -> float:
    return sum(_delta(run, f"{lv}/mean@{k}") for lv in hard) / len(hard)


def _config_models(config: Path) -> tuple[str, str]:
    """``model.student`` / ``model.teacher`` as the config names them (the demo pair when it does not)."""
    import yaml

    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    return model.get("student", "assets/demo-student"), model.get("teacher", "assets/demo-teacher")


def study_sections(results: dict[str, list[dict]], step_cost: Optional[dict[str, float]] = None) -> str:
    """Markdown: Mean@k at equal wall time, Welch t-tests per pair, per-method diagnostics. ``step_cost`` (method
    -> time of one step in GRPO steps) replaces the measured step times for the equal-time reading."""
    k = next(r["k"] for rs in results.values() for r in rs)
    key = f"all/mean@{k}"
    cost = {m: step_cost.get(m, 1.0) for m in results} if step_cost else {m: None for m in results}
    totals = {m: sum(max(_time_of_step(r, cost[m]).values()) for r in rs) / len(rs) for m, rs in results.items()}
    fastest = min(totals, key=totals.get)
    budget = totals[fastest]
    hard = hard_levels(results, k)
    unit = "GRPO-step units" if step_cost else "s of training"
    how = (f"step costs relative to GRPO {', '.join(f'{m} {c:g}' for m, c in cost.items())} (--step-cost)"
           if step_cost else "the measured training seconds (validation excluded); seconds on a shared CPU carry "
           "the contention of the moment: compare them only within this table")
    lines = ["## Equal rollout batches and equal wall time", "",
             f"Final Mean@{k} (all levels) after the same number of rollout batches, and read off each run's "
             f"validation curve at {budget:.0f} {unit} (the training time of the fastest method, {fastest}; "
             f"linear between validation points); time from {how}.", "",
             f"| method | train {'time' if step_cost else 's'} | Mean@{k} equal batches | Δ equal batches "
             f"| Mean@{k} equal time | Δ equal time |",
             "|---|---|---|---|---|---|"]
    for m, rs in results.items():
        eq_t = [value_at_time(r["val_curve"], _time_of_step(r, cost[m]), budget) for r in rs]
        lines.append(f"| {m} | {_ms([max(_time_of_step(r, cost[m]).values()) for r in rs], 1, 0)} | "
                     f"{_ms([r['after'][key] for r in rs], 100)} | {_ms([_delta(r, key) for r in rs], 100)} | "
                     f"{_ms(eq_t, 100)} | "
                     f"{_ms([e - r['before'].get(key, float('nan')) for e, r in zip(eq_t, rs)], 100)} |")
    pairs = [(m, "GRPO") for m in results if m != "GRPO" and "GRPO" in results]
    pairs += [p for p in PAIRS if p[0] in results and p[1] in results and p not in pairs]
    hard_txt = f" and on the hard levels ({', '.join(hard)}: student below 20 % at step 0)" if hard else ""
    lines += ["", "## Significance", "",
              f"Welch's t-test (two-sided, unequal variances) over seeds on the change of Mean@{k} from the same run's "
              f"step-0 validation (points), overall{hard_txt}, at equal rollout batches. With 3 seeds per side only "
              "large, consistent differences reach p < 0.05; p >= 0.05 means not shown, not equal.", "",
              "| pair | Δ difference (all) | p (all) |" + (" Δ difference (hard) | p (hard) |" if hard else ""),
              "|---|---|---|" + ("---|---|" if hard else "")]
    for a, b in pairs:
        d, pv = welch([100 * _delta(r, key) for r in results[a]], [100 * _delta(r, key) for r in results[b]])
        row = f"| {a} - {b} | {d:+.1f} | {pv:.3f} |"
        if hard:
            dh, ph = welch([100 * _hard_delta(r, hard, k) for r in results[a]],
                           [100 * _hard_delta(r, hard, k) for r in results[b]])
            row += f" {dh:+.1f} | {ph:.3f} |"
        lines.append(row)
    lines += ["", "## Diagnostics (mean over training steps)", "",
              "Share of groups whose 8 rewards are all equal (no GRPO / TRRD signal); sampled-token `l_S - l_T` on "
              "the student's rollouts (k1 estimate of KL(student || teacher)); KDRL: mean k2 term; TRRD: mean "
              "unclamped teacher log-ratio and the share of tokens where the ±c clamp binds, clip fractions; ReNIO: "
              "share of tokens that are pivotal (`min(l_S - l_T, c) >= tau`), share of samples with one, largest "
              "weight.", "", "| method | " + " | ".join(DIAGNOSTICS) + " |", "|---|" + "---|" * len(DIAGNOSTICS)]
    for m, rs in results.items():
        lines.append(f"| {m} | " + " | ".join(_ms([r["diagnostics"].get(d, float("nan")) for r in rs], 1, 3)
                                              for d in DIAGNOSTICS) + " |")
    return "\n".join(lines) + "\n"


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


def eval_models(config: Path, paths: list[Path]) -> str:
    """Mean@8 / Pass@8 (T=1, 64 validation problems per level, sampling seed 0) of each model on ``config``'s
    ``data.task`` (a markdown table): does the student rarely solve a level alone while the teacher does?"""
    import importlib

    import yaml

    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.pipeline.evaluate import accuracy_table, evaluate_policy

    spec = yaml.safe_load(config.read_text())["data"]["task"]
    mod, cls = spec["class_path"].rsplit(".", 1)
    task = getattr(importlib.import_module(mod), cls)(**spec.get("init_args", {}))
    n = 64 * len(getattr(task, "levels", [None]))
    res = {}
    for p in paths:
        model, tok = load_causal_lm(str(p), "model"), load_tokenizer(str(p))
        r = evaluate_policy(model, tok, task, "val", n, k=8, temperature=1.0, pass_k=[1, 8], seed=0)
        res[f"{p} Mean@8"], res[f"{p} Pass@8"] = r, r
    rows = accuracy_table({m: r for m, r in res.items() if m.endswith("Mean@8")}, "mean@8")
    rows += accuracy_table({m: r for m, r in res.items() if m.endswith("Pass@8")}, "pass@8").split("\n", 2)[2]
    return rows


def pivotal_stats(config: Path, student: Path, teacher: Path, tau: float = 0.8, c: float = 2.5, count: int = 256,
                  k: int = 4) -> dict[str, dict[str, float]]:
    """ReNIO's pivotal tokens on the student's own samples (T=1, ``count`` val problems x ``k``) scored by the
    teacher, split by correct / wrong samples: is a pivotal token (``min(l_S - l_T, c) >= tau``) a sign of a wrong
    trace here, as ReNIO assumes? Also the AUC of the sample score ``m_i`` for telling wrong from correct."""
    import importlib

    import torch
    import yaml

    from rlad_pl.data.prompts import encode_prompt
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.objectives.renio import renio_sample_scores
    from rlad_pl.rollout.hf import HFSampler
    from rlad_pl.rollout.sampler import SamplingParams

    spec = yaml.safe_load(config.read_text())["data"]["task"]
    mod, cls = spec["class_path"].rsplit(".", 1)
    task = getattr(importlib.import_module(mod), cls)(**spec.get("init_args", {}))
    s_model, tok = load_causal_lm(str(student), "model"), load_tokenizer(str(student))
    t_model = load_causal_lm(str(teacher), "model")
    problems = task.problems("val", count, offset=0)
    prompts = [encode_prompt(tok, p.prompt, None) for p in problems]
    sampler = HFSampler(batch_size=128)
    sampler.setup(s_model, tok)
    gen = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=64, n=k, seed=0))
    texts = tok.batch_decode(gen.completion_ids, skip_special_tokens=True)
    correct = torch.tensor([task.verify(t, problems[i // k]) >= 1.0 for i, t in enumerate(texts)])
    seqs = [list(prompts[i // k]) + list(c_ids) for i, c_ids in enumerate(gen.completion_ids)]
    width = max(map(len, seqs))
    ids = torch.tensor([q + [tok.pad_token_id] * (width - len(q)) for q in seqs])
    attn = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
    resp = torch.zeros_like(ids, dtype=torch.float)
    for i, q in enumerate(seqs):
        resp[i, len(prompts[i // k]):len(q)] = 1.0
    with torch.no_grad():
        lp = [torch.log_softmax(m(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
              .gather(-1, ids[:, 1:, None])[..., 0] for m in (s_model, t_model)]
    d, mask = (lp[0] - lp[1]).clamp(-20, 20), resp[:, 1:]
    m, pivotal = renio_sample_scores(d, mask, tau, c)
    out = {}
    for name, sel in (("correct", correct), ("wrong", ~correct)):
        if not sel.any():
            continue
        dv = d[sel][mask[sel] > 0]
        out[name] = {"samples": int(sel.sum()), "with_pivotal": float(pivotal[sel].any(-1).float().mean()),
                     "pivotal_token_frac": float(pivotal[sel].sum() / mask[sel].sum()), "m_mean": float(m[sel].mean()),
                     "d_mean": float(dv.mean()), "d_q50": float(dv.quantile(0.5)), "d_q90": float(dv.quantile(0.9)),
                     "d_q99": float(dv.quantile(0.99)), "clamped_frac_of_pivotal":
                         float(((d >= c) & pivotal)[sel].sum() / pivotal[sel].sum().clamp_min(1))}
    if correct.any() and (~correct).any():  # AUC: P(m_wrong > m_correct) + 0.5 P(tie)
        mw, mc = m[~correct][:, None], m[correct][None, :]
        out["auc_m_wrong_vs_correct"] = {"value": float((mw > mc).float().mean() + 0.5 * (mw == mc).float().mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Arguments after '--' are passed to every run (e.g. -- --data.val_k 4).")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs (validation at the end)")
    ap.add_argument("--val-prompts", type=int, default=None, help="override data.val_prompts")
    ap.add_argument("--val-every", type=int, default=None, help="override trainer.check_val_every_n_epoch")
    ap.add_argument("--eval-models", nargs="+", type=Path, default=None,
                    help="only measure these models on the config's task (Mean@8 / Pass@8, T=1, 64 val problems "
                         "per level) and print a table")
    ap.add_argument("--step-cost", nargs="+", default=None, metavar="METHOD=RATIO",
                    type=lambda a: (a.split("=")[0], float(a.split("=")[1])),
                    help="equal-wall-time reading with these step costs relative to GRPO (e.g. TRRD=1.69) instead "
                         "of the measured seconds (noisy on a shared CPU); methods not named cost 1")
    ap.add_argument("--pivotal-stats", nargs=2, type=Path, default=None, metavar=("STUDENT", "TEACHER"),
                    help="only print ReNIO's pivotal-token statistics (tau 0.8, c 2.5) of the student's samples on "
                         "the config's task, correct vs wrong samples")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "compare")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cpu_count / jobs threads)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.config = args.config.resolve()
    args.step_cost = dict(args.step_cost) if args.step_cost else None
    if args.eval_models:
        print(eval_models(args.config, args.eval_models))
        return
    if args.pivotal_stats:
        print(json.dumps(pivotal_stats(args.config, *args.pivotal_stats), indent=1))
        return
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
    (args.out / "README.md").write_text(report(results, args, command.strip()) + "\n"
                                        + study_sections(results, args.step_cost))
    plot(results, args.out / "curves.png")
    summary = {m: [{k: v for k, v in r.items() if "_curve" not in k} for r in runs]
               for m, runs in results.items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[compare] wrote {args.out / 'README.md'} and curves.png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
