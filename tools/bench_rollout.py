"""Rollout throughput of ``VLLMSampler`` vs ``HFSampler`` on the same model and batch, and weight-sync cost.

    python tools/bench_rollout.py                       # tiny (~23K params) and ~50M-parameter random char-level Qwen2s
    python tools/bench_rollout.py --sizes 50m --prompts 16 --group 8 --max-new-tokens 128

For each model (built locally into a temp dir with ``rlad_pl.models.loading.save_tiny_model``; random weights, nothing
is downloaded) both samplers answer the same prompts with the same ``SamplingParams`` (temperature 1, ``n = --group``);
every response is exactly ``--max-new-tokens`` long (vLLM: ``ignore_eos``; HF: ``generation_config.min_new_tokens``),
so generated tokens/s compare like with like. Also timed: ``VLLMSampler.sync_weights`` (in-place push of all
weights) and one optimizer step (forward + backward + AdamW over the rollout batch, micro-batches of
``--micro-batch``), giving the sync's share of an RL step ``sync + generate(vLLM) + train``. Prints one table and
the ratios from one run. Timings on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: head_dim 32 / 64: supported by vLLM's CPU attention (head_dim 16, as in rlad_pl/assets, is not)
SIZES = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64, max_positions=512),
    "50m": dict(hidden_size=640, num_layers=10, num_heads=10, intermediate_size=1792, max_positions=512),
}


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _train_step(model, tok, prompts, completions, micro_batch: int) -> None:
    from rlad_pl.core.batch import build_sequences
    from rlad_pl.core.logprobs import response_logprobs

    ids, mask, P, rmask = build_sequences(prompts, completions, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    for s in range(0, ids.shape[0], micro_batch):
        lp, _ = response_logprobs(model, ids[s:s + micro_batch], mask[s:s + micro_batch], P)
        (-(lp * rmask[s:s + micro_batch]).sum() / rmask.sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def bench_size(name: str, arch: dict, args) -> dict:
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout import HFSampler, SamplingParams
    from rlad_pl.rollout.vllm import VLLMSampler
    from rlad_pl.testing.builders import save_tiny_model

    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        path = save_tiny_model(tmp, seed=0, **arch)
        tok = load_tokenizer(path)
        model = load_causal_lm(path, "model.student")
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(0)
        chars = torch.randint(3, len(tok), (args.prompts, args.prompt_len), generator=g).tolist()
        prompts = [[tok.bos_token_id] + row for row in chars]
        params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, n=args.group, seed=0)
        expected = args.prompts * args.group * args.max_new_tokens

        # ---------------------------------------------------------------- HF generate on the live model
        model.generation_config.min_new_tokens = args.max_new_tokens  # no early eos: equal lengths
        hf = HFSampler(batch_size=args.prompts * args.group, decode="generate")  # honours min_new_tokens
        hf.setup(model, tok)
        hf.generate(prompts[:2], params.with_(max_new_tokens=4))  # warm-up
        hf_s, hf_gen = _timed(lambda: hf.generate(prompts, params), args.repeats)
        hf_tokens = sum(len(c) for c in hf_gen.completion_ids)
        model.generation_config.min_new_tokens = None

        # ---------------------------------------------------------------- vLLM, in-process, synced in place
        t0 = time.perf_counter()
        vs = VLLMSampler(dtype="float32", max_model_len=arch["max_positions"], seed=0,
                         sync_bucket_bytes=args.bucket_mib << 20, sampling_kwargs={"ignore_eos": True},
                         engine_kwargs={"kv_cache_memory_bytes": args.kv_cache_mib << 20,
                                        "max_num_seqs": args.prompts * args.group})
        vs.setup(model, tok)
        start_s = time.perf_counter() - t0
        try:
            vs.sync_weights(model)
            vs.generate(prompts[:2], params.with_(max_new_tokens=4))  # warm-up
            vllm_s, v_gen = _timed(lambda: vs.generate(prompts, params), args.repeats)
            v_tokens = sum(len(c) for c in v_gen.completion_ids)
            sync_s, stats = _timed(lambda: vs.sync_weights(model), args.repeats)
        finally:
            vs.close()
        train_s, _ = _timed(lambda: _train_step(model, tok, [p for p in prompts for _ in range(args.group)],
                                                 v_gen.completion_ids, args.micro_batch), 1)
        step_s = sync_s + vllm_s + train_s
        return dict(name=name, params=n_params, tokens=expected, hf_tokens=hf_tokens, vllm_tokens=v_tokens,
                    hf_s=hf_s, vllm_s=vllm_s, hf_tps=hf_tokens / hf_s, vllm_tps=v_tokens / vllm_s,
                    start_s=start_s, sync_s=sync_s, sync_bytes=stats["weight_sync_bytes"],
                    sync_buckets=stats["weight_sync_buckets"], train_s=train_s, step_s=step_s)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,50m", help=f"comma-separated, from {sorted(SIZES)}")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="responses per prompt (n)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions (median)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--bucket-mib", type=int, default=64)
    ap.add_argument("--kv-cache-mib", type=int, default=1024)
    args = ap.parse_args(argv)

    rows = [bench_size(s, SIZES[s], args) for s in args.sizes.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nbatch: {args.prompts} prompts x n={args.group}, prompt {args.prompt_len + 1} tokens, "
          f"{args.max_new_tokens} new tokens each; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}; device cpu; median of {args.repeats}")
    print(f"{'model':>6} {'params':>10} {'HF tok/s':>10} {'vLLM tok/s':>11} {'vLLM/HF':>8} {'engine start':>13} "
          f"{'sync':>9} {'sync MB':>8} {'buckets':>8} {'train step':>11} {'sync/step':>10}")
    for r in rows:
        if r["hf_tokens"] != r["tokens"] or r["vllm_tokens"] != r["tokens"]:
            print(f"  note: {r['name']}: lengths differ from the target ({r['hf_tokens']} HF, "
                  f"{r['vllm_tokens']} vLLM, expected {r['tokens']})")
        print(f"{r['name']:>6} {r['params'] / 1e6:>9.2f}M {r['hf_tps']:>10.0f} {r['vllm_tps']:>11.0f} "
              f"{r['vllm_tps'] / r['hf_tps']:>7.2f}x {r['start_s']:>12.1f}s {r['sync_s'] * 1e3:>7.1f}ms "
              f"{r['sync_bytes'] / 1e6:>8.1f} {r['sync_buckets']:>8.0f} {r['train_s']:>10.2f}s "
              f"{100 * r['sync_s'] / r['step_s']:>9.2f}%")


if __name__ == "__main__":
    main()
