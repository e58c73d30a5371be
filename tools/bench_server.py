"""Rollouts from a vLLM server (``ServerSampler``) vs the in-process engine (``VLLMSampler``) on SmolLM2-135M.

    python tools/bench_server.py                     # 2 prompts x 4 samples x 48 tokens, 3 repetitions, 1 thread each
    python tools/bench_server.py --reps 5 --prompts 4 --group 8 --max-new-tokens 64 --no-train

One trainer process, one student (SmolLM2-135M-Instruct fp32, built / cached by ``python tools/build_real_model.py``),
two phases one after the other, never side by side:

1. **served**: a vLLM OpenAI server on localhost (``python -m vllm.entrypoints.openai.api_server`` with the RL
   endpoints, the gloo weight transfer and processed log-probs, as ``python -m rlad_pl serve`` starts it) and
   ``ServerSampler`` pushing into it; the server is stopped before phase 2;
2. **in-process**: ``VLLMSampler``'s engine in the trainer process, synced in place.

Each phase times, after one warm-up: ``--reps`` weight syncs alone (seconds and bytes per sync), then ``--reps``
training steps of one GRPO-shaped rollout batch (``--prompts`` chat prompts x ``--group`` samples of exactly
``--max-new-tokens`` tokens: ``ignore_eos``, temperature 1) timed as generate + sync, plus one optimizer step on the
student (forward + backward + AdamW over the batch; ``--no-train`` leaves it out). Medians; the last column is
served / in-process. "engine start" is the server's start to its first ``/health`` answer (the trainer loads the
student meanwhile) against ``VLLMSampler.setup`` (weights written to a temporary folder, engine started).

**Threads.** With ``--threads 1`` (default) the two sides never share a core: the server's engine worker binds its
one OpenMP thread to core 0 (``VLLM_CPU_OMP_THREADS_BIND=0``), the trainer pins itself to the last core
(``sched_setaffinity``, after the server is started so the server does not inherit it) with one torch thread, and
the in-process engine computes on that same one core. The model's compute has one core in both phases; the server's
HTTP front end and scheduler processes are not pinned. ``--threads 2`` gives both the server and the trainer both
cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``, no pinning): the sides then compete while a push runs. Timings on a shared
machine are noisy: the load average before and after is printed with them (the run itself keeps ~2 cores busy, so
"after" reads about 2 on a quiet 2-core machine), and a note when the machine was busy before the run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the in-process phase

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rlad_pl.testing.servers import free_port, stop_server  # noqa: E402

QUESTIONS = ["Write a short story about a dragon who learns to paint.", "Explain how a bicycle works.",
             "Describe your ideal weekend in detail.", "List some facts about the ocean.",
             "Give advice to a new student.", "Explain why the sky is blue.", "Describe a busy market.",
             "Tell me about the history of bread."]


def _start_server(folder: str, port: int, max_len: int, args, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # vLLM's own layout
    env.update(VLLM_SERVER_DEV_MODE="1", VLLM_CPU_OMP_THREADS_BIND="0" if args.threads == 1 else
               f"0-{args.threads - 1}", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len), "--generation-config", "vllm",
           "--logprobs-mode", "processed_logprobs", "--weight-transfer-config", '{"backend": "gloo"}',
           "--enforce-eager", "--no-enable-chunked-prefill", "--kv-cache-memory-bytes", str(args.kv_cache_mib << 20),
           "--max-num-seqs", str(max(8, args.prompts * args.group))]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _ignore_eos(sampler) -> None:
    """Every server request also asks ``ignore_eos`` (fixed-length rollouts, as ``VLLMSampler``'s
    ``sampling_kwargs``): ``ServerSampler`` has no such option, so its clients' ``completions`` get it."""
    for client in sampler.clients:
        def completions(*a, _orig=client.completions, extra=None, **kw):
            return _orig(*a, extra={**(extra or {}), "ignore_eos": True}, **kw)
        client.completions = completions


def _train_step(model, opt, tok, prompts, completions) -> None:
    """One optimizer step over the rollout batch: sampled-token log-probs, a policy-gradient-shaped loss, AdamW."""
    from rlad_pl.core.batch import build_sequences
    from rlad_pl.core.logprobs import response_logprobs

    ids, mask, P, rmask = build_sequences(prompts, completions, tok.pad_token_id)
    model.train()
    lp, _ = response_logprobs(model, ids, mask, P)
    (-(lp * rmask).sum() / rmask.sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def _phase(sampler, model, tok, prompts, params, args) -> dict:
    """Warm-up, ``reps`` syncs alone, then ``reps`` steps (generate, train, sync) on one sampler already set up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.0)  # fresh state per phase
    rows = [p for p in prompts for _ in range(params.n)]
    out = {"sync_s": [], "sync_bytes": [], "gen_s": [], "train_s": [], "step_sync_s": [], "tokens": []}
    sampler.sync_weights(model)  # warm-up: first push, first generate, first optimizer step (AdamW state)
    gen = sampler.generate(prompts, params)
    if args.train:
        _train_step(model, opt, tok, rows, gen.completion_ids)
    for _ in range(args.reps):
        t0 = time.perf_counter()
        stats = sampler.sync_weights(model)
        out["sync_s"].append(time.perf_counter() - t0)
        out["sync_bytes"].append(stats["weight_sync_bytes"])
    for rep in range(args.reps):
        t0 = time.perf_counter()
        gen = sampler.generate(prompts, params.with_(seed=rep + 1))
        out["gen_s"].append(time.perf_counter() - t0)
        out["tokens"].append(sum(len(c) for c in gen.completion_ids))
        t0 = time.perf_counter()
        if args.train:
            _train_step(model, opt, tok, rows, gen.completion_ids)
        out["train_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sampler.sync_weights(model)
        out["step_sync_s"].append(time.perf_counter() - t0)
    steps = [g + s for g, s in zip(out["gen_s"], out["step_sync_s"])]
    full = [g + t + s for g, t, s in zip(out["gen_s"], out["train_s"], out["step_sync_s"])]
    med = {k: statistics.median(v) for k, v in out.items()}
    med.update(step_s=statistics.median(steps), full_s=statistics.median(full), threads=torch.get_num_threads(),
               cores=len(os.sched_getaffinity(0)))
    return med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (n)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, choices=(1, 2), default=1,
                    help="1: server worker on core 0, trainer pinned to the last core; 2: both use both cores")
    ap.add_argument("--no-train", dest="train", action="store_false", help="time generate + sync only")
    ap.add_argument("--kv-cache-mib", type=int, default=64, help="KV cache of the server and of the engine")
    ap.add_argument("--bucket-mib", type=int, default=256, help="weight-sync bucket of both samplers")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")

    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout import SamplingParams
    from rlad_pl.rollout.server import ServerSampler
    from rlad_pl.rollout.server_client import VLLMServerClient
    from rlad_pl.rollout.vllm import VLLMSampler
    from rlad_pl.testing.real_model import build_real_model

    load_before = os.getloadavg()
    path = args.model or str(build_real_model(log=lambda msg: print(msg, flush=True)))
    tok = load_tokenizer(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                       add_generation_prompt=True) for i in range(args.prompts)]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    max_len = -(-(max(map(len, prompts)) + args.max_new_tokens) // 64) * 64  # the same for server and engine
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, n=args.group, seed=0)
    res, start = {}, {}

    # ---------------------------------------------------------------- phase 1: a server on localhost
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="bench_server_")) / "server.log"
    t0 = time.perf_counter()
    proc = _start_server(path, port, max_len, args, log)
    cpus = sorted(os.sched_getaffinity(0))
    if args.threads == 1 and len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[-1]})  # after the Popen: the server keeps every core, its worker binds core 0
    torch.set_num_threads(args.threads)
    student = load_causal_lm(path, "model.student")  # while the server starts
    student.eval()
    n_params = sum(p.numel() for p in student.parameters())
    sampler = ServerSampler(urls=[url], sync_bucket_bytes=args.bucket_mib << 20)
    try:
        try:
            VLLMServerClient(url).wait_until_ready(timeout=600, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            print(f"bench_server: error: {e}; its log ({log}) ends:\n" + "\n".join(
                log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
            return 1
        start["served"] = time.perf_counter() - t0
        sampler.setup(student, tok)
        _ignore_eos(sampler)
        res["served"] = _phase(sampler, student, tok, prompts, params, args)
    finally:
        sampler.close()
        stop_server(proc)
    gc.collect()

    # ---------------------------------------------------------------- phase 2: the in-process engine
    t0 = time.perf_counter()
    engine = VLLMSampler(dtype="float32", max_model_len=max_len, seed=0, sync_bucket_bytes=args.bucket_mib << 20,
                         sampling_kwargs={"ignore_eos": True},
                         engine_kwargs={"kv_cache_memory_bytes": args.kv_cache_mib << 20,
                                        "max_num_seqs": max(8, args.prompts * args.group)})
    try:
        engine.setup(student, tok)
        start["in-process"] = time.perf_counter() - t0
        res["in-process"] = _phase(engine, student, tok, prompts, params, args)
    finally:
        engine.close()

    # ---------------------------------------------------------------- the table
    load_after = os.getloadavg()
    s, e = res["served"], res["in-process"]
    pinned = args.threads == 1 and len(cpus) > 1
    where = f"server worker on core 0, trainer on core {cpus[-1]}" if pinned else "no pinning"
    print(f"\nmodel {path}: {n_params / 1e6:.1f}M params fp32; {os.cpu_count()} CPUs; {where}, "
          f"{args.threads} thread(s) each; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if load_before[0] > 0.5:
        print(f"  note: the load average was {load_before[0]:.2f} before the run: other processes were running, the "
              "timings are noisy")
    for name, r in res.items():
        if (r["threads"], r["cores"]) != (args.threads, 1 if pinned else len(cpus)):
            print(f"  note: the {name} phase ran with {r['threads']} torch thread(s) on {r['cores']} core(s)")
    print(f"rollout batch: {args.prompts} prompts x {args.group} samples x {args.max_new_tokens} tokens "
          f"(ignore_eos, T = 1), max_model_len {max_len}; medians of {args.reps}; the phases ran one after the other")
    rows = [("engine start (s)", start["served"], start["in-process"]),
            ("weight sync (s)", s["sync_s"], e["sync_s"]),
            ("weight sync (MB)", s["sync_bytes"] / 1e6, e["sync_bytes"] / 1e6),
            ("generate (s)", s["gen_s"], e["gen_s"]),
            ("tokens per generate", s["tokens"], e["tokens"]),
            ("sync in the step (s)", s["step_sync_s"], e["step_sync_s"]),
            ("step: generate + sync (s)", s["step_s"], e["step_s"])]
    if args.train:
        rows += [("optimizer step (s)", s["train_s"], e["train_s"]),
                 ("step: + optimizer step (s)", s["full_s"], e["full_s"])]
    print(f"{'':<28} {'served':>10} {'in-process':>11} {'served/in-process':>18}")
    for name, a, b in rows:
        fmt = ".0f" if "tokens" in name else ".1f" if "MB" in name or "start" in name else ".3f"
        print(f"{name:<28} {a:>10{fmt}} {b:>11{fmt}} {a / b if b else float('nan'):>17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
