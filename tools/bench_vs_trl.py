"""Seconds per step of rlad_pl against TRL on the same work, and the reward curve of each (issue #15).

    pip install -e ".[bench]"                               # TRL and datasets (never runtime dependencies)
    python tools/bench_vs_trl.py                            # both workloads, 25 steps, 2 interleaved repetitions
    python tools/bench_vs_trl.py --workload opd --reps 3
    python tools/bench_vs_trl.py --quick                    # tiny sizes, one process (the test)
    python tools/bench_vs_trl.py --workload opd --compile rlad_pl   # rlad_pl with --model.compile true, TRL eager

Workloads (the shipped demo models, reasoning-gym ``chain_sum`` prompts of ``ChainSumTask`` as in
``configs/demo.yaml``, the task's verifier as the reward, HF ``generate`` on both sides, fp32, AdamW at a constant
lr 3e-4, grad-norm clip 1, temperature 1, one optimizer step per rollout of 128-sequence micro-batches):

* ``grpo``: 128 prompts x 8 samples, 64 new tokens, token-mean GRPO loss with eps 0.2 / 0.28, no KL term. rlad_pl:
  ``configs/demo.yaml`` with ``rlad_pl.objectives.GRPO`` and ``loss_agg: token_mean``; TRL: ``GRPOTrainer`` with
  ``loss_type="dapo"`` (token mean over the accumulated batch), ``epsilon`` / ``epsilon_high``, ``beta=0``.
* ``opd``: 1024 prompts x 1 sample, 64 new tokens, full-vocabulary reverse KL(student || teacher) against the demo
  teacher, token mean. rlad_pl: ``rlad_pl.objectives.OPDFullVocab``; TRL: ``DistillationTrainer`` with ``beta=1``
  (its generalized JSD at beta 1 is the reverse KL). TRL's trainer has no reward; the rewards of its completions
  are scored with the same verifier (rlad_pl scores every rollout too), so both curves show what the student learns.

Both sides see the same prompts in the same order (rlad_pl takes prompts ``[k*P, (k+1)*P)`` at step k; TRL gets them
as an unshuffled dataset whose text is ``<bos>`` + prompt, the exact ids rlad_pl encodes). Each run is a fresh
process with the same ``torch`` thread count; the time of a step is read from per-step timestamps after the
optimizer step, so start-up (imports, model loading, the first ``--warmup`` steps) is excluded:
seconds per step = (t[steps] - t[warmup]) / (steps - warmup). Runs alternate rlad_pl, TRL, rlad_pl, TRL, ... so load
on a shared machine hits both alike. Printed: seconds per step of each repetition and their median, the ratio
rlad_pl / TRL, sequences / completion tokens / optimizer steps / dtype / threads as each side counted them, and the
per-step mean reward of each side (mean over repetitions) next to each other.

``--compile``: ``none`` (default, both eager), ``rlad_pl`` (rlad_pl with ``--model.compile true``: its training
backbones compiled, ``rlad_pl.models.compiled``; TRL eager) or ``both`` (TRL's ``torch_compile=True`` too, which
compiles the whole model and recompiles for the shapes that change every step). ``--warmup`` must then cover the
compile steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from rlad_pl.testing.runs import median_step_s, run_logged  # noqa: E402

ASSETS = REPO / "rlad_pl" / "assets"
SIDES = ("rlad_pl", "TRL")


@dataclass
class Workload:
    """One unit of work, the same on both sides."""

    name: str
    prompts: int  # prompts per rollout (= per optimizer step)
    samples: int  # samples per prompt
    new_tokens: int  # max new tokens per completion
    micro_batch: int  # sequences per forward / backward pass
    teacher: bool  # full-vocabulary reverse KL against the demo teacher (else GRPO)
    lr: float = 3e-4
    temperature: float = 1.0

    @property
    def sequences(self) -> int:
        return self.prompts * self.samples


WORKLOADS = {
    "grpo": Workload("grpo", prompts=128, samples=8, new_tokens=64, micro_batch=128, teacher=False),
    "opd": Workload("opd", prompts=1024, samples=1, new_tokens=64, micro_batch=128, teacher=True),
}
QUICK = {
    "grpo": Workload("grpo", prompts=4, samples=4, new_tokens=12, micro_batch=8, teacher=False),
    "opd": Workload("opd", prompts=8, samples=1, new_tokens=12, micro_batch=4, teacher=True),
}

DOES = {
    ("grpo", "rlad_pl"): "python -m rlad_pl fit on configs/demo.yaml: HFSampler decode loop, verifier, group "
                         "advantages, GRPO eps 0.2/0.28, loss_agg token_mean, AdamW",
    ("grpo", "TRL"): "GRPOTrainer: transformers generate, same verifier as reward_funcs, scale_rewards group, "
                     "loss_type dapo, epsilon 0.2 / epsilon_high 0.28, beta 0, adamw_torch",
    ("opd", "rlad_pl"): "python -m rlad_pl fit on configs/demo.yaml: HFSampler decode loop, verifier, OPDFullVocab "
                        "(chunked full-vocabulary reverse KL vs the demo teacher), loss_agg token_mean, AdamW",
    ("opd", "TRL"): "DistillationTrainer: transformers generate, beta 1 (reverse KL, chunked), the demo teacher, "
                    "verifier on its completions (logged only), adamw_torch",
}


# ------------------------------------------------------------------------------------------------ one run
def train_problems(count: int):
    """The first ``count`` train problems of the demo's task (rlad_pl's step k takes ``[k*P, (k+1)*P)``)."""
    from rlad_pl.data import ChainSumTask

    task = ChainSumTask(min_terms=2, max_terms=5, min_digits=1, max_digits=1)  # configs/demo.yaml data.task
    return task, task.problems("train", count)


class _Record:
    """Per-step timestamps (after the optimizer step) and rollout statistics, written as JSON at the end."""

    def __init__(self):
        self.times: list[float] = []
        self.steps: list[int] = []
        self.rollouts: list[dict] = []  # per rollout: sequences, completion tokens, mean reward

    def result(self, threads: int, dtype: str) -> dict:
        return {"times": self.times, "steps": self.steps, "rollouts": self.rollouts, "threads": threads,
                "dtype": dtype}


def _step_clock_class():
    """``StepClock``: a Lightning callback recording rlad_pl's steps (built lazily: the orchestrator needs no torch)."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self, out: str):
            self.out, self.rec = out, _Record()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rec.times.append(time.perf_counter())
            self.rec.steps.append(trainer.global_step)
            stats = trainer.datamodule.rollout_stats
            self.rec.rollouts.append({"sequences": batch.num_sequences, "tokens": batch.num_tokens,
                                      "reward": stats["rollout/reward_mean"]})

        def on_train_end(self, trainer, pl_module):
            import torch

            dtype = str(next(pl_module.student.parameters()).dtype).replace("torch.", "")
            Path(self.out).write_text(json.dumps(self.rec.result(torch.get_num_threads(), dtype)))

    return StepClock


def __getattr__(name: str):  # ``bench_vs_trl.StepClock`` as a class_path for ``--trainer.callbacks``
    if name == "StepClock":
        return _step_clock_class()
    raise AttributeError(name)


def run_rlad(w: Workload, steps: int, out: Path, work: Path, compile: bool = False) -> None:
    """rlad_pl through its CLI: ``configs/demo.yaml`` with the workload's objective and sizes (``compile``:
    ``--model.compile true``)."""
    from rlad_pl.cli import main

    obj = ({"class_path": "rlad_pl.objectives.OPDFullVocab"} if w.teacher else
           {"class_path": "rlad_pl.objectives.GRPO", "init_args": {"eps_low": 0.2, "eps_high": 0.28}})
    clock = {"class_path": "bench_vs_trl.StepClock", "init_args": {"out": str(out)}}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(["fit", "--config", str(REPO / "configs" / "demo.yaml"),
          "--model.objectives", json.dumps([obj]), "--model.teacher", "assets/demo-teacher" if w.teacher else "null",
          "--model.loss_agg", "token_mean", "--model.lr_scheduler", "null",
          "--model.optimizer.init_args.lr", str(w.lr),
          "--trainer.max_epochs", str(steps), "--trainer.callbacks", json.dumps([clock]),
          "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(work),
          "--export.enabled", "false",
          "--data.prompts_per_rollout", str(w.prompts), "--data.group_size", str(w.samples),
          "--data.micro_batch_size", str(w.micro_batch), "--data.sampling.max_new_tokens", str(w.new_tokens),
          "--data.sampling.temperature", str(w.temperature), "--model.compile", str(compile).lower()])


def run_trl(w: Workload, steps: int, out: Path, work: Path, compile: bool = False) -> None:
    """TRL 1.16: ``GRPOTrainer`` or ``DistillationTrainer`` on the same models, prompts, sizes and settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

    from rlad_pl.data.tasks import Problem

    task, problems = train_problems(steps * w.prompts)
    student = str(ASSETS / "demo-student")
    tok = AutoTokenizer.from_pretrained(student)
    tok.padding_side = "left"
    data = Dataset.from_dict({"prompt": [tok.bos_token + p.prompt for p in problems],
                              "answer": [p.answer for p in problems]})
    rec = _Record()
    answers = {tok.bos_token + p.prompt: p.answer for p in problems}

    def score(completions: list[str], answer: list[str], completion_ids) -> list[float]:
        rewards = [task.verify(c, Problem(prompt="", answer=a)) for c, a in zip(completions, answer)]
        rec.rollouts.append({"sequences": len(rewards), "tokens": float(sum(len(c) for c in completion_ids)),
                             "reward": sum(rewards) / len(rewards)})
        return rewards

    def chain_sum_reward(prompts, completions, completion_ids, answer, **kwargs):
        return score(completions, answer, completion_ids)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rec.times.append(time.perf_counter())
            rec.steps.append(state.global_step)

    accum = w.sequences // w.micro_batch
    common = dict(output_dir=str(work), per_device_train_batch_size=w.micro_batch, gradient_accumulation_steps=accum,
                  max_completion_length=w.new_tokens, temperature=w.temperature, learning_rate=w.lr,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  optim="adamw_torch", max_steps=steps, shuffle_dataset=False, bf16=False, fp16=False,
                  gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
                  disable_tqdm=True, seed=0, use_cpu=True, dataloader_num_workers=0, torch_compile=compile)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    if w.teacher:
        class ScoredDistillation(DistillationTrainer):
            """Scores each generation batch with the verifier (logged, not trained on)."""

            def _generate(self, prompts):
                out = super()._generate(prompts)
                texts = self.processing_class.batch_decode(out[1], skip_special_tokens=True)
                score(texts, [answers[p] for p in prompts], out[1])
                return out

        teacher = AutoModelForCausalLM.from_pretrained(str(ASSETS / "demo-teacher"), dtype=torch.float32)
        trainer = ScoredDistillation(model=model, teacher_model=teacher, processing_class=tok, train_dataset=data,
                                     callbacks=[Clock()], args=DistillationConfig(beta=1.0, **common))
    else:
        trainer = GRPOTrainer(model=model, reward_funcs=chain_sum_reward, processing_class=tok, train_dataset=data,
                              callbacks=[Clock()], args=GRPOConfig(
                                  num_generations=w.samples, steps_per_generation=accum, num_iterations=1,
                                  loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group",
                                  **common))
    trainer.train()
    dtype = str(next(trainer.model.parameters()).dtype).replace("torch.", "")
    out.write_text(json.dumps(rec.result(torch.get_num_threads(), dtype)))


def run_job(job: dict) -> None:
    """One run of one side (``job``: side, workload fields, steps, threads, out, work)."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(job["threads"])
    w = Workload(**job["workload"])
    fn = run_rlad if job["side"] == "rlad_pl" else run_trl
    fn(w, job["steps"], Path(job["out"]), Path(job["work"]), compile=job.get("compile", False))


# ------------------------------------------------------------------------------------------------ orchestration
def launch(job: dict, in_process: bool, log: Path) -> dict:
    """Run ``job`` (a fresh process unless ``in_process``) and return what it recorded."""
    if in_process:
        run_job(job)
    else:
        env = {"OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
        done = run_logged([sys.executable, __file__, "--job", json.dumps(job)], log, env=env)
        if done.returncode != 0:
            raise SystemExit(f"bench_vs_trl: the {job['side']} {job['workload']['name']} run failed (exit "
                             f"{done.returncode}); log {log}:\n" + "\n".join(done.tail(15)))
    return json.loads(Path(job["out"]).read_text())


def seconds_per_step(rec: dict, steps: int, warmup: int) -> float:
    """(t[steps] - t[warmup]) / (steps - warmup) from the per-step timestamps (start-up excluded)."""
    t = rec["times"]
    if len(t) != steps:
        raise SystemExit(f"bench_vs_trl: expected {steps} step timestamps, got {len(t)}")
    return (t[steps - 1] - t[warmup - 1]) / (steps - warmup)


def median_step(rec: dict, warmup: int) -> float:
    """Median duration of the timed steps: less sensitive than the mean to bursts of load on a shared machine."""
    return median_step_s(rec["times"], warmup)


def bench(w: Workload, args, tmp: Path) -> dict:
    """All repetitions of one workload, sides interleaved; returns the numbers the report prints."""
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for rep in range(args.reps):
        for side in SIDES:
            work = tmp / f"{w.name}-{side}-{rep}"
            work.mkdir(parents=True, exist_ok=True)
            job = {"side": side, "workload": asdict(w), "steps": args.steps, "threads": args.threads,
                   "out": str(work / "record.json"), "work": str(work),
                   "compile": args.compile == "both" or (args.compile == side)}
            t0 = time.perf_counter()
            rec = launch(job, args.in_process, work / "log.txt")
            rec["sps"] = seconds_per_step(rec, args.steps, args.warmup)
            rec["median_step"] = median_step(rec, args.warmup)
            runs[side].append(rec)
            print(f"  {w.name} rep {rep + 1} {side:7}: {rec['sps']:.3f} s/step ({time.perf_counter() - t0:.0f} s "
                  f"with start-up), load average {os.getloadavg()[0]:.1f}", flush=True)
    return {"workload": w, "runs": runs}


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def report(res: dict, args) -> list[str]:
    """The table, ratio, work check and reward curves of one workload, as lines."""
    w, runs = res["workload"], res["runs"]
    med = {s: statistics.median(r["sps"] for r in runs[s]) for s in SIDES}
    lines = [f"== {w.name}: {w.prompts} prompts x {w.samples} samples, {w.new_tokens} new tokens, micro-batches of "
             f"{w.micro_batch}, lr {w.lr:g}, {args.steps} steps (timed after {args.warmup} warm-up), {args.reps} "
             f"interleaved repetitions, {args.threads} threads, torch.compile: {args.compile}"]
    lines += [f"  {s:7} does: {DOES[(w.name, s)]}" for s in SIDES]
    lines.append(f"  {'':34}{'rlad_pl':>12}{'TRL':>12}")
    for rep in range(args.reps):
        lines.append(f"  {f'seconds per step, rep {rep + 1}':34}" + "".join(f"{runs[s][rep]['sps']:12.3f}"
                                                                          for s in SIDES))
    lines.append(f"  {'seconds per step, median':34}" + "".join(f"{med[s]:12.3f}" for s in SIDES))
    robust = {s: statistics.median(r["median_step"] for r in runs[s]) for s in SIDES}
    lines.append(f"  {'median single step (robust)':34}" + "".join(f"{robust[s]:12.3f}" for s in SIDES))
    per_step = lambda s, key: _mean([_mean([x[key] for x in r["rollouts"]]) for r in runs[s]])  # noqa: E731
    lines.append(f"  {'sequences per step':34}" + "".join(f"{per_step(s, 'sequences'):12.0f}" for s in SIDES))
    lines.append(f"  {'completion tokens per step (mean)':34}" + "".join(f"{per_step(s, 'tokens'):12.0f}"
                                                                         for s in SIDES))
    lines.append(f"  {'optimizer steps per run':34}" + "".join(f"{runs[s][0]['steps'][-1]:12d}" for s in SIDES))
    lines.append(f"  {'rollouts per run':34}" + "".join(f"{len(runs[s][0]['rollouts']):12d}" for s in SIDES))
    lines.append(f"  {'dtype, threads':34}" + "".join(f"{runs[s][0]['dtype'] + ', ' + str(runs[s][0]['threads']):>12}"
                                                       for s in SIDES))
    lines.append(f"{w.name} ratio rlad_pl / TRL: {med['rlad_pl'] / med['TRL']:.2f}x "
                 f"({med['rlad_pl']:.3f} s vs {med['TRL']:.3f} s per step)")
    lines.append(f"{w.name} ratio of median single steps rlad_pl / TRL: {robust['rlad_pl'] / robust['TRL']:.2f}x")
    lines.append(f"{w.name} reward curve (per-step mean reward, mean over repetitions): step, rlad_pl, TRL")
    curve = {s: [_mean([r["rollouts"][k]["reward"] for r in runs[s]]) for k in range(args.steps)] for s in SIDES}
    lines += [f"  {k + 1:4d} {curve['rlad_pl'][k]:8.3f} {curve['TRL'][k]:8.3f}" for k in range(args.steps)]
    last = max(1, min(5, args.steps // 2))
    lines.append(f"  first / last {last} steps mean: rlad_pl {_mean(curve['rlad_pl'][:last]):.3f} -> "
                 f"{_mean(curve['rlad_pl'][-last:]):.3f}, TRL {_mean(curve['TRL'][:last]):.3f} -> "
                 f"{_mean(curve['TRL'][-last:]):.3f}")
    return lines


def git_head() -> str:
    """Short HEAD, plus the package files that differ from it (the runs import the working tree)."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.split()
        dirty = git("diff", "--name-only", "HEAD", "--", "rlad_pl")
        return git("rev-parse", "--short", "HEAD")[0] + (f" + uncommitted {' '.join(dirty)}" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=("grpo", "opd", "both"), default="both")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 25; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the timed ones (default 2; --quick 1)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per side, interleaved (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on both sides")
    p.add_argument("--compile", choices=("none", "rlad_pl", "both"), default="none",
                   help="torch.compile: rlad_pl's --model.compile true (rlad_pl), and TRL's torch_compile (both)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, all runs in this process (the test)")
    p.add_argument("--in-process", action="store_true", help="run the sides in this process (default with --quick)")
    p.add_argument("--append-md", type=Path, default=None, help="also append the report (time, git HEAD) here")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: one run, in a fresh process
    args = p.parse_args(argv)
    if args.job:
        return run_job(json.loads(args.job))
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"bench_vs_trl: needs {' and '.join(missing)} (pip install -e \".[bench]\")")
    args.steps = args.steps if args.steps is not None else 3 if args.quick else 25
    args.warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    args.reps = args.reps if args.reps is not None else 1 if args.quick else 2
    args.in_process = args.in_process or args.quick
    for name, value, low in (("--steps", args.steps, args.warmup + 1), ("--warmup", args.warmup, 1),
                             ("--reps", args.reps, 1), ("--threads", args.threads, 1)):
        if value < low:
            raise SystemExit(f"bench_vs_trl: {name}: expected an integer >= {low}, got {value}")
    table = QUICK if args.quick else WORKLOADS
    names = ["grpo", "opd"] if args.workload == "both" else [args.workload]
    import trl

    started, head = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), git_head()  # what the runs import
    print(f"bench_vs_trl: rlad_pl (git {head}) vs TRL {trl.__version__}, {started}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        results = [bench(table[n], args, Path(tmp)) for n in names]
    lines = [line for res in results for line in report(res, args)]
    print("\n".join(lines))
    if args.append_md:
        cmd = "python tools/bench_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.append_md, "a") as f:
            f.write(f"\n## {started}, git {head}, load average {os.getloadavg()[0]:.1f}\n\n`{cmd}`\n\n```\n"
                    + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
