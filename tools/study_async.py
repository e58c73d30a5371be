"""Staleness study (issue 23): how each objective tolerates rollouts sampled from the student of k steps ago.

    python tools/study_async.py --jobs 2                      # the grid -> docs/study/async/ (resumable)
    python tools/study_async.py --report-only                 # rebuild the tables from the committed summaries
    python tools/study_async.py --plan                        # print the runs in the order they would run
    python tools/study_async.py --epochs 2 --prompts 8 --val-prompts 16 --methods GRPO --ks 0 2 \\
        --seeds 0 --summaries /tmp/sa/runs --logs /tmp/sa/logs   # smoke test (a minute)

Every run is ``python -m rlad_pl fit --config configs/demo.yaml`` on the demo pair with ``model.objectives`` the
method's objective from ``tools/compare.py`` (the committed comparison's settings), ``data.sampler`` =
``rlad_pl.rollout.stale.StaleSampler`` (the HF decode-loop sampler inside: batches sampled in-process from the
student's weights of k optimizer steps ago, the served path's batches, ``tests/test_async.py``) and
``data.max_off_policy_steps k``; ``--seed_everything S --data.seed S``. Cells, per method:

    k = 0                     ``sync``: the synchronous baseline, through the same sampler (``off_policy: auto`` is
                              ``none`` when k = 0)
    k > 0, ``corr``           the objective's declared correction (``off_policy: auto``: ``tis`` for GRPO, KDRL,
                              TRRD, OPD, ReNIO-OPD); the full-vocabulary KLs (FKL, OPD-full = reverse KL, KL-mix)
                              declare ``none``, so their corrected variant is ``off_policy: seq_mask``
    k > 0, ``none``           ``off_policy: none`` (the stale batch treated as on-policy)

Order: k = 0 and k = 2 (both variants) for every method and seed first, then k = 1 and k = 4; within a phase seed
by seed, so an interrupted grid is balanced. A run whose summary (``<summaries>/<method>_k<k>_<variant>_s<S>.json``,
the scalars the report needs, no event files) exists is skipped; a failed run is written to
``<summaries>/failed/`` with its last lines and retried by the next invocation; the grid goes on. ``--commit-every
N`` commits the new summaries (only those paths) every N finished runs.

Report (``<out>/README.md``, the part between the ``generated`` markers; text outside them is kept): per method
the change of validation Mean@8 from step 0 at each k, with and without correction (mean ± sample sd over seeds),
corrected - uncorrected (Welch's t-test), the degradation from k = 0 (per seed: Δ(k, s) - Δ(0, s), one-sample
t-test), least-squares slopes of Δ against k, the issue's comparisons (degradations of two methods, Welch; slope
differences) and the off-policy diagnostics.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from compare import METHODS, _ms, welch  # noqa: E402
from rlad_pl.testing.runs import FitError, read_scalars, run_fit, scalar_means  # noqa: E402

STUDY = ["GRPO", "KDRL", "TRRD", "OPD", "ReNIO-OPD", "FKL", "OPD-full", "KL-mix"]
FULL_VOCAB = {"FKL", "OPD-full", "KL-mix"}
LABEL = {"OPD": "OPD (sampled)", "OPD-full": "reverse KL (OPD-full)", "FKL": "forward KL", "KL-mix": "KL-mix 0.25"}
KS = [0, 1, 2, 4]
FIRST_KS = [0, 2]  # the informative half of the grid runs first
STALE = "rlad_pl.rollout.stale.StaleSampler"
KEY = "all/mean@8"
#: per-step tags averaged over a run for the diagnostics table (matched as tag suffixes)
OFF_POLICY = ("off_policy_log_ratio_abs", "off_policy_weight_mean", "off_policy_truncated_frac",
              "off_policy_masked_frac")
TIMING = ("timing/generate", "timing/score", "timing/annotate", "timing/train_step", "timing/wait_for_rollout")


def correction(method: str, variant: str) -> str:
    """The ``off_policy`` value of a cell."""
    if variant in ("sync", "none"):
        return "auto" if variant == "sync" else "none"
    return "seq_mask" if method in FULL_VOCAB else "auto"


def declared(method: str) -> str:
    """What ``corr`` means for ``method`` (for the tables)."""
    return "seq_mask" if method in FULL_VOCAB else "tis"


def cells(methods: list[str], ks: list[int], seeds: list[int]) -> list[tuple[str, int, str, int]]:
    """``(method, k, variant, seed)`` in run order: k in FIRST_KS before the rest, seed by seed within a phase."""
    out = []
    for phase in ([k for k in ks if k in FIRST_KS], [k for k in ks if k not in FIRST_KS]):
        for seed in seeds:
            for k in phase:
                for method in methods:
                    for variant in (["sync"] if k == 0 else ["corr", "none"]):
                        out.append((method, k, variant, seed))
    return out


def cell_name(method: str, k: int, variant: str, seed: int) -> str:
    return f"{method}_k{k}_{variant}_s{seed}"


# ------------------------------------------------------------------------------------------------ running
def run_one(cell: tuple[str, int, str, int], args) -> dict:
    method, k, variant, seed = cell
    name = cell_name(*cell)
    out = args.logs / method / f"k{k}-{variant}" / f"seed{seed}"
    objectives = copy.deepcopy(METHODS[method])
    objectives[0].setdefault("init_args", {})["off_policy"] = correction(method, variant)
    overrides = {"model.objectives": objectives, "seed_everything": seed, "data.seed": seed,
                 "data.sampler": {"class_path": STALE}, "data.max_off_policy_steps": k,
                 "export.enabled": False, "trainer.enable_progress_bar": False,
                 "trainer.enable_checkpointing": False, "trainer.max_epochs": args.epochs,
                 "trainer.check_val_every_n_epoch": args.val_every or args.epochs,
                 "data.prompts_per_rollout": args.prompts, "data.val_prompts": args.val_prompts}
    shutil.rmtree(out, ignore_errors=True)  # an unfinished earlier attempt
    out.mkdir(parents=True, exist_ok=True)
    print(f"[study_async] start {name}", flush=True)
    try:
        run = run_fit(args.config, overrides, out, env={"OMP_NUM_THREADS": str(args.threads)})
    except FitError as e:
        return {"name": name, "failed": True, "returncode": e.returncode, "tail": e.tail[-12:]}
    summary = summarize(out, cell, run.wall_s, args)
    summary["command"] = [str(c) for c in run.command[1:]]
    return summary


def summarize(run_dir: Path, cell: tuple[str, int, str, int], wall_s: float, args) -> dict:
    """The scalars the report needs (a few kB): validation before / after, Δ, off-policy diagnostics, timings."""
    method, k, variant, seed = cell
    s = read_scalars(run_dir)
    val = {t[4:]: v for t, v in s.items() if t.startswith("val/") and v}
    if KEY not in val:
        raise SystemExit(f"[study_async] no validation metrics in {run_dir}")
    before = {t: v[0][1] for t, v in val.items() if v[0][0] == 0}
    after = {t: v[-1][1] for t, v in val.items()}
    diag = {}
    for d in OFF_POLICY:
        tags = [t for t in s if t.endswith("/" + d)]
        if tags:  # ReNIO logs under renio/opdsampled/...: the deepest tag is the correction's own
            diag[d] = scalar_means(s, [max(tags, key=len)])[max(tags, key=len)]
    diag["mismatch"] = scalar_means(s, ["mismatch/logprob_abs_diff"], default=float("nan"))["mismatch/logprob_abs_diff"]
    stale = [v for _, v in s.get("off_policy/staleness_mean", [])]
    return {"method": method, "k": k, "variant": variant, "off_policy": correction(method, variant), "seed": seed,
            "shape": shape(args),
            "before": before, "after": after, "delta": after[KEY] - before.get(KEY, float("nan")),
            "steps": len(s.get("timing/train_step", [])), "wall_seconds": wall_s,
            "staleness_mean": sum(stale) / len(stale) if stale else 0.0,
            "staleness_max": max((v for _, v in s.get("off_policy/staleness_max", [])), default=0.0),
            "diagnostics": diag,
            "timing": scalar_means(s, TIMING),
            "reward_curve": [round(v, 4) for _, v in s.get("rollout/reward_mean", [])],
            "val_curve": [(st, round(v, 5)) for st, v in val[KEY]]}


def shape(args) -> dict:
    return {"epochs": args.epochs, "prompts_per_rollout": args.prompts, "group_size": 8,
            "val_prompts": args.val_prompts, "val_k": 8, "val_every": args.val_every or args.epochs}


def finished(args, cell: tuple[str, int, str, int]) -> bool:
    """The cell's summary exists at this shape."""
    path = args.summaries / f"{cell_name(*cell)}.json"
    return path.exists() and json.loads(path.read_text()).get("shape") == shape(args)


def git_commit(paths: list[Path], message: str) -> None:
    """Add and commit only ``paths`` (other people's staged work stays staged; ``-f``: the repository ignores every
    ``runs/`` folder); a failure is printed, not fatal."""
    tracked = lambda r: subprocess.run(["git", "ls-files", "--error-unmatch", "--", r], cwd=REPO,  # noqa: E731
                                       capture_output=True).returncode == 0
    rel = [str(p.relative_to(REPO)) for p in dict.fromkeys(paths) if p.exists() or tracked(str(p.relative_to(REPO)))]
    if not rel:
        return
    for cmd in (["git", "add", "-f", "--", *rel], ["git", "commit", "-q", "-m", message, "--", *rel]):
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode:
            print(f"[study_async] {' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip()[-300:]}", flush=True)
            return
    print(f"[study_async] committed {len(rel)} files: {message}", flush=True)


def run_grid(args) -> None:
    todo = [c for c in cells(args.methods, args.ks, args.seeds) if not finished(args, c)]
    print(f"[study_async] {len(todo)} runs to go", flush=True)
    (args.summaries / "failed").mkdir(parents=True, exist_ok=True)
    pending: list[Path] = []
    done = failed = in_a_row = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, c, args): c for c in todo}
        for f in as_completed(futures):
            cell = futures[f]
            name = cell_name(*cell)
            fail_path = args.summaries / "failed" / f"{name}.json"
            try:
                res = f.result()
            except BaseException as e:  # noqa: BLE001 (a reading error: record it like a failed fit)
                res = {"name": name, "failed": True, "returncode": None, "tail": [repr(e)]}
            if res.get("failed"):
                failed += 1
                in_a_row += 1
                fail_path.write_text(json.dumps(res, indent=1) + "\n")
                pending.append(fail_path)
                print(f"[study_async] FAILED {name} (exit {res['returncode']}): {' | '.join(res['tail'][-3:])}",
                      flush=True)
            else:
                done += 1
                in_a_row = 0
                path = args.summaries / f"{name}.json"
                path.write_text(json.dumps(res, indent=1) + "\n")
                pending.append(path)
                if fail_path.exists():
                    fail_path.unlink()
                    pending.append(fail_path)
                print(f"[study_async] done {name}: Δ {100 * res['delta']:+.1f} points, {res['wall_seconds']:.0f} s "
                      f"({done + failed}/{len(todo)}, {time.perf_counter() - t0:.0f} s)", flush=True)
            if in_a_row >= args.stop_after_failures:
                print(f"[study_async] {in_a_row} runs failed in a row: stopping the grid", flush=True)
                for other in futures:
                    other.cancel()
                break
            if args.commit_every and len(pending) >= args.commit_every:
                git_commit(pending, f"docs/study/async: {len(pending)} more staleness-study runs (issue 23)")
                pending = []
    if args.commit_every and pending:
        git_commit(pending, f"docs/study/async: {len(pending)} more staleness-study runs (issue 23)")
    print(f"[study_async] grid: {done} finished, {failed} failed, {time.perf_counter() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------ statistics
def load(summaries: Path, want: Optional[dict] = None) -> dict[tuple[str, int, str], dict[int, dict]]:
    """``(method, k, variant) -> {seed: summary}`` (only runs of shape ``want`` when given)."""
    out: dict[tuple[str, int, str], dict[int, dict]] = {}
    for p in sorted(summaries.glob("*.json")):
        r = json.loads(p.read_text())
        if want is not None and r.get("shape") != want:
            continue
        out.setdefault((r["method"], r["k"], r["variant"]), {})[r["seed"]] = r
    return out


def deltas(res, method: str, k: int, variant: str) -> dict[int, float]:
    """seed -> Δ Mean@8 (points); k = 0 is the ``sync`` cell whatever ``variant``."""
    runs = res.get((method, 0, "sync") if k == 0 else (method, k, variant), {})
    return {s: 100 * r["delta"] for s, r in runs.items()}


def degradation(res, method: str, k: int, variant: str) -> list[float]:
    """Per seed ``Δ(k, s) - Δ(0, s)`` (points): the seed fixes the prompts, the sampling seeds and the step-0
    validation, so the pair differs only in staleness."""
    a, b = deltas(res, method, k, variant), deltas(res, method, 0, variant)
    return [a[s] - b[s] for s in sorted(a) if s in b]


def one_sample_p(xs: list[float]) -> float:
    """Two-sided p of a one-sample t-test of mean 0 (nan with fewer than 2 values or no spread: Mean@8 moves in steps
    of 1/2048, so equal values across seeds happen, and a t-test on them says nothing)."""
    if len(xs) < 2 or max(xs) - min(xs) < 1e-9:
        return float("nan")
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(xs, 0.0).pvalue)


def slope(res, method: str, variant: str, ks: list[int]) -> tuple[float, float, int]:
    """Least-squares slope of Δ (points) on k over every seed of k = 0 and the variant's k > 0 cells, its standard
    error and the residual degrees of freedom."""
    pts = [(k, d) for k in ks for d in deltas(res, method, k, variant).values()]
    n = len(pts)
    if n < 3 or len({k for k, _ in pts}) < 2:
        return float("nan"), float("nan"), 0
    mk, md = sum(k for k, _ in pts) / n, sum(d for _, d in pts) / n
    sxx = sum((k - mk) ** 2 for k, _ in pts)
    b = sum((k - mk) * (d - md) for k, d in pts) / sxx
    rss = sum((d - md - b * (k - mk)) ** 2 for k, d in pts)
    return b, math.sqrt(rss / (n - 2) / sxx), n - 2


def slope_diff_p(a: tuple[float, float, int], b: tuple[float, float, int]) -> float:
    """Two-sided p of the difference of two independent slopes (t with Welch-Satterthwaite degrees of freedom)."""
    from scipy.stats import t as student_t

    (ba, sa, da), (bb, sb, db) = a, b
    if not (da and db) or sa != sa or sb != sb:
        return float("nan")
    se2 = sa ** 2 + sb ** 2
    if se2 == 0:
        return float("nan")
    df = se2 ** 2 / (sa ** 4 / da + sb ** 4 / db)
    return float(2 * student_t.sf(abs(ba - bb) / math.sqrt(se2), df))


def _p(p: float) -> str:
    if p != p:
        return "-"
    return f"**{p:.3f}**" if p < 0.05 else f"{p:.3f}"


def _md(xs: list[float]) -> str:
    return _ms(xs, 1.0, 1) + (f" ({len(xs)})" if len(xs) != 3 else "")


# ------------------------------------------------------------------------------------------------ report
def _welch_cells(a: list[float], b: list[float]) -> list[str]:
    """``mean(a) - mean(b)`` and Welch's p as two table cells ("-" when a side has no runs)."""
    if not (a and b):
        return ["-", "-"]
    d, p = welch(a, b)
    return [f"{d:+.1f}", _p(p)]


def report(res, args) -> str:
    methods = [m for m in STUDY if any(key[0] == m for key in res)]
    ks = [k for k in KS if any(key[1] == k for key in res)]
    kpos = [k for k in ks if k > 0]
    lines = []
    n_done = sum(len(v) for v in res.values())
    expected = cells(STUDY, KS, [0, 1, 2])
    missing = [cell_name(*c) for c in expected if c[3] not in res.get(c[:3], {})]
    failed = sorted(p.stem for p in (args.summaries / "failed").glob("*.json"))
    lines += [f"Runs finished: **{n_done} of {len(expected)}**" + (f"; failed (last attempt): {', '.join(failed)}"
                                                                   if failed else "; none failed") + ".", ""]
    if missing:
        lines += [f"Missing ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing), ""]

    # overview: Δ per method and k
    lines += ["### Δ Mean@8 from step 0 (points, mean ± sd over seeds)", "",
              "`corr` = the declared correction (`tis`; `seq_mask` for the full-vocabulary KLs, whose declared "
              "correction is `none`), `none` = no correction. k = 0 is the synchronous baseline (one cell). "
              "A number in brackets is the seed count when it is not 3.", "",
              "| method | k = 0 | " + " | ".join(f"k = {k} corr | k = {k} none" for k in kpos) + " |",
              "|---|---|" + "---|---|" * len(kpos)]
    for m in methods:
        row = [LABEL.get(m, m), _md(list(deltas(res, m, 0, "sync").values()))]
        for k in kpos:
            row += [_md(list(deltas(res, m, k, v).values())) for v in ("corr", "none")]
        lines.append("| " + " | ".join(row) + " |")

    # degradation from k = 0 and slopes
    lines += ["", "### Degradation with staleness", "",
              "Per seed `Δ(k, s) - Δ(0, s)` (points; the seed fixes prompts, sampling seeds and the step-0 "
              "validation, so a pair differs only in staleness), mean ± sd and the p of a one-sample t-test "
              "against 0; \"slope\": least-squares slope of Δ on k over all seeds of k = 0 and that variant's k > 0 "
              "cells (points per step of staleness ± its standard error, p of slope = 0). "
              "p \"-\": the seeds' values are equal (no test).", "",
              "| method | variant | " + " | ".join(f"k = {k}: Δ - Δ(0) | p" for k in kpos) + " | slope | p |",
              "|---|---|" + "---|---|" * len(kpos) + "---|---|"]
    for m in methods:
        for v in ("corr", "none"):
            row = [LABEL.get(m, m), f"{v} ({declared(m)})" if v == "corr" else v]
            for k in kpos:
                dg = degradation(res, m, k, v)
                row += [_md(dg), _p(one_sample_p(dg))]
            b, se, df = slope(res, m, v, ks)
            from scipy.stats import t as student_t

            p = float(2 * student_t.sf(abs(b / se), df)) if df and se == se and se > 0 else float("nan")
            row += [f"{b:+.2f} ± {se:.2f}" if b == b else "-", _p(p)]
            lines.append("| " + " | ".join(row) + " |")

    # what a correction buys
    lines += ["", "### What the correction buys: corr - none at the same k", "",
              "Welch's t-test (two-sided) over seeds on Δ Mean@8, corrected minus uncorrected.", "",
              "| method | correction | " + " | ".join(f"k = {k}: diff | p" for k in kpos) + " |",
              "|---|---|" + "---|---|" * len(kpos)]
    for m in methods:
        row = [LABEL.get(m, m), declared(m)]
        for k in kpos:
            row += _welch_cells(list(deltas(res, m, k, "corr").values()), list(deltas(res, m, k, "none").values()))
        lines.append("| " + " | ".join(row) + " |")

    # the comparisons
    lines += ["", "### The issue's comparisons", "",
              "Degradation `Δ(k) - Δ(0)` per seed compared between two methods (Welch, two-sided; positive = the "
              "first degrades less), and the difference of their slopes (t with Welch-Satterthwaite df).", "",
              "| comparison | variant | " + " | ".join(f"k = {k}: diff | p" for k in kpos)
              + " | slope diff | p |", "|---|---|" + "---|---|" * len(kpos) + "---|---|"]
    pairs = [("OPD-full", "FKL"), ("KL-mix", "FKL"), ("OPD-full", "KL-mix"), ("TRRD", "KDRL"), ("TRRD", "GRPO"),
             ("KDRL", "GRPO"), ("TRRD", "OPD"), ("KDRL", "OPD"), ("ReNIO-OPD", "OPD"), ("OPD", "OPD-full")]
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        for v in ("corr", "none"):
            row = [f"{LABEL.get(a, a)} - {LABEL.get(b, b)}", v]
            for k in kpos:
                row += _welch_cells(degradation(res, a, k, v), degradation(res, b, k, v))
            sa, sb = slope(res, a, v, ks), slope(res, b, v, ks)
            row += [f"{sa[0] - sb[0]:+.2f}" if sa[0] == sa[0] and sb[0] == sb[0] else "-",
                    _p(slope_diff_p(sa, sb))]
            lines.append("| " + " | ".join(row) + " |")

    # diagnostics
    lines += ["", "### Off-policy diagnostics (mean over training steps and seeds)", "",
              "abs log-ratio: mean `|l_b - l_prox|` between the sampling weights' log-probs of the sampled tokens "
              "and the trainer's before the update (`mismatch/logprob_abs_diff`, logged whatever the correction); "
              "weight mean, share of tokens truncated (`tis`, cap 2) or masked (`seq_mask`, sequence "
              "geometric-mean ratio outside [0.5, 5]); staleness: "
              "`off_policy/staleness_mean` over the run (lower than k because the first k batches are fresher); "
              "seconds per run (wall, 2 runs at a time).", "",
              "| method | k | variant | staleness | abs log-ratio | weight mean | truncated | masked | run s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for k in ks:
            for v in (["sync"] if k == 0 else ["corr", "none"]):
                runs = list(res.get((m, k, v), {}).values())
                if not runs:
                    continue
                dg = lambda key, runs=runs: _ms([r["diagnostics"].get(key, float("nan")) for r in runs], 1, 3)  # noqa: E731
                lines.append(f"| {LABEL.get(m, m)} | {k} | {v} | {_ms([r['staleness_mean'] for r in runs], 1, 2)} | "
                             f"{dg('mismatch')} | {dg('off_policy_weight_mean')} | "
                             f"{dg('off_policy_truncated_frac')} | {dg('off_policy_masked_frac')} | "
                             f"{_ms([r['wall_seconds'] for r in runs], 1, 0)} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- generated by tools/study_async.py: begin -->", "<!-- generated by tools/study_async.py: end -->"


def write_report(args) -> None:
    res = load(args.summaries, shape(args))
    if not res:
        raise SystemExit(f"[study_async] no summaries in {args.summaries}")
    body = BEGIN + "\n" + report(res, args) + END
    path = args.out / "README.md"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        text = old[:old.index(BEGIN)] + body + old[old.index(END) + len(END):]
    else:
        text = old + ("\n" if old else "# Staleness study (issue 23)\n\n") + body + "\n"
    path.write_text(text)
    print(f"[study_async] wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    ap.add_argument("--methods", nargs="+", default=STUDY, choices=STUDY)
    ap.add_argument("--ks", nargs="+", type=int, default=KS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40, help="rollout batches (= optimizer steps) per run")
    ap.add_argument("--prompts", type=int, default=128, help="data.prompts_per_rollout (x 8 samples)")
    ap.add_argument("--val-prompts", type=int, default=256, help="data.val_prompts (x 8 samples, at 0 and the end)")
    ap.add_argument("--val-every", type=int, default=None, help="validate every N batches (default: only at the end)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "study" / "async")
    ap.add_argument("--summaries", type=Path, default=None, help="default: <out>/runs")
    ap.add_argument("--logs", type=Path, default=REPO / "runs" / "study" / "async",
                    help="the runs' TensorBoard folders (not committed)")
    ap.add_argument("--commit-every", type=int, default=0, help="commit new summaries every N finished runs")
    ap.add_argument("--stop-after-failures", type=int, default=4, help="stop the grid after N failures in a row")
    ap.add_argument("--plan", action="store_true", help="print the runs still to do, in order, and stop")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.config = args.config.resolve()
    args.summaries = (args.summaries or args.out / "runs").resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.summaries.mkdir(parents=True, exist_ok=True)
    if args.plan:
        for c in cells(args.methods, args.ks, args.seeds):
            if not finished(args, c):
                print(cell_name(*c), correction(c[0], c[2]))
        return
    if not args.report_only:
        run_grid(args)
    write_report(args)


if __name__ == "__main__":
    main()
