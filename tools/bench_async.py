"""Synchronous vs asynchronous rollouts on SmolLM2-135M with a vLLM server, side by side in one run.

    python tools/build_real_model.py        # once (rlad_pl/testing/real_model.py)
    python tools/bench_async.py             # k = 0, 1, 2; 8 rollout batches each (docs/async.md has the table)
    python tools/bench_async.py --ks 0 1 --epochs 5 --prompts 2 --new-tokens 32     # a quicker look

One vLLM OpenAI server on the real model (fp32, gloo weight transfer, log-probs after temperature) is started once,
pinned to CPU core 0 (its OpenMP threads bound there, ``VLLM_CPU_OMP_THREADS_BIND``); each trainer run is
``python -m rlad_pl fit --config configs/smollm2_grpo_cpu.yaml`` with ``ServerSampler`` on that server and
``data.max_off_policy_steps k``, pinned to core 1 with one thread, so the two never fight over a core. The runs
go one after another (never two at once), all from the same initial weights and seed; GRPO, one optimizer step per
rollout batch, no validation, no checkpoint.

Seconds per step are the median differences of the TensorBoard wall-clock stamps of consecutive steps, leaving out
the first ``k + 1`` steps (start-up, and the batches an asynchronous run samples from the initial weights before its
pipeline is full). The split comes from the runs' own ``timing/*`` tags: generation (the server's time for one
rollout batch), the update, the time the trainer waited for its batch and the generation that overlapped training.
The ratio is synchronous seconds per step over asynchronous. Both reward curves are printed: asynchronous runs
train on rollouts k steps stale (GRPO's declared correction, truncated importance sampling, in force).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlad_pl.testing.real_model import default_dir, is_complete  # noqa: E402
from rlad_pl.testing.runs import run_fit, values  # noqa: E402
from rlad_pl.testing.servers import RL_ARGS, free_port, start_server, stop_server, wait_ready  # noqa: E402


def step_seconds(run, skip: int) -> float:
    stamps = sorted((s, w) for s, w, _ in run.events.get("train/loss", []))
    times = [w for _, w in stamps]
    return statistics.median(b - a for a, b in zip(times[skip:], times[skip + 1:]))


def mean_after(run, tag: str, skip: int) -> float:
    vals = [v for s, _, v in run.events.get(tag, []) if s >= skip]
    return statistics.fmean(vals) if vals else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2], help="max_off_policy_steps values")
    ap.add_argument("--epochs", type=int, default=8, help="rollout batches (= optimizer steps) per run")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--model", default=None, help="SmolLM2 folder (default: tools/build_real_model.py's)")
    args = ap.parse_args()
    model = Path(args.model) if args.model else default_dir()
    if not is_complete(model):
        raise SystemExit(f"bench_async: no real model at {model}; run python tools/build_real_model.py first")
    if os.cpu_count() < 2:
        raise SystemExit("bench_async: needs 2 cores (one for the server, one for the trainer)")
    work = Path(tempfile.mkdtemp(prefix="bench_async_"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load = os.getloadavg()[0]
    server = start_server(model, port, *RL_ARGS, "--generation-config", "vllm", log=work / "server.log",
                          max_model_len=512, kv_cache_bytes=512 << 20, cores={0},
                          env={"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
                               "TOKENIZERS_PARALLELISM": "false"})
    runs, loads = {}, {}
    try:
        wait_ready(url, server, timeout=600)
        os.sched_setaffinity(0, {1})  # the trainers inherit core 1
        for k in args.ks:
            overrides = {"model.student": str(model), "data.sampler": "rlad_pl.rollout.server.ServerSampler",
                         "data.sampler.init_args.urls": f"[{url}]", "data.max_off_policy_steps": k,
                         "data.prompts_per_rollout": args.prompts, "data.group_size": args.group,
                         "data.micro_batch_size": args.prompts * args.group,
                         "data.sampling.max_new_tokens": args.new_tokens, "trainer.max_epochs": args.epochs,
                         "trainer.limit_val_batches": 0, "trainer.enable_checkpointing": "false",
                         "export.enabled": "false"}
            t0 = time.time()
            loads[k] = os.getloadavg()[0]
            runs[k] = run_fit(REPO / "configs" / "smollm2_grpo_cpu.yaml", overrides, work / f"k{k}",
                              env={"OMP_NUM_THREADS": "1"})
            print(f"k={k}: {time.time() - t0:.0f} s", flush=True)
    finally:
        stop_server(server)
    print(f"\nSmolLM2-135M-Instruct, GRPO, {args.prompts} prompts x {args.group} samples x {args.new_tokens} new "
          f"tokens per batch, {args.epochs} batches; server on core 0, trainer on core 1; load average "
          f"{load:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    base = None
    print("| k | s/step | vs k=0 | generate s | update s | waited s | overlap s | staleness | load at start |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, run in runs.items():
        skip = k + 1
        s = step_seconds(run, skip)
        base = s if base is None and k == 0 else base
        ratio = f"{base / s:.2f}x" if base else "-"
        print(f"| {k} | {s:.2f} | {ratio} | {mean_after(run, 'timing/generate', skip):.2f} | "
              f"{mean_after(run, 'timing/train_step', skip):.2f} | "
              f"{mean_after(run, 'timing/wait_for_rollout', skip):.2f} | "
              f"{mean_after(run, 'timing/overlap', skip):.2f} | "
              f"{mean_after(run, 'off_policy/staleness_mean', skip):.1f} | {loads[k]:.2f} |")
    print("\nreward per rollout batch:")
    for k, run in runs.items():
        rewards = values(run.scalars, "rollout/reward_mean")
        print(f"  k={k}: " + " ".join(f"{r:.3f}" for r in rewards))


if __name__ == "__main__":
    main()
