"""LoRA weight sync into vLLM, merged vs adapter (``VLLMSampler(lora_sync=...)``), on the real model.

    python tools/bench_lora_sync.py                        # SmolLM2-135M-Instruct, r 16 / alpha 32, all-linear
    python tools/bench_lora_sync.py --r 64 --alpha 128 --reps 5 --prompts 8 --group 4 --max-new-tokens 64

One LoRA student (``python tools/build_real_model.py`` builds / caches the model; adapters set to random values so
the merged weights differ from the base) and two in-process engines, one per mode, started side by side. Each
repetition gives the adapters new values, then, in alternating order, syncs each engine (seconds, bytes) and
generates one rollout batch from it (``--prompts`` x ``--group`` responses of exactly ``--max-new-tokens`` tokens,
temperature 1, same seed). Medians, the adapter / merged ratios, and a greedy check (both engines and HF's
``generate`` on the live PEFT student answer alike) are printed. Timings on a shared machine are noisy: the load
average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("merged", "adapter")
QUESTIONS = ["What is 12 + 7?", "Name a prime number above 50.", "Spell 'river' backwards.", "What is 9 * 9?",
             "Give one word that rhymes with 'cat'.", "What is 42 - 17?", "Name the largest planet.",
             "Count from 1 to 5."]


def _set_adapters(model, seed: int, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--target-modules", default="all-linear")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.models.lora import apply_lora
    from rlad_pl.rollout import HFSampler, SamplingParams
    from rlad_pl.rollout.vllm import VLLMSampler
    from rlad_pl.testing.real_model import build_real_model

    path = args.model or str(build_real_model())
    tok = load_tokenizer(path)
    student = load_causal_lm(path, "model.student")
    total = sum(p.numel() for p in student.parameters())
    torch.manual_seed(0)
    apply_lora(student, {"r": args.r, "alpha": args.alpha, "target_modules": args.target_modules})
    _set_adapters(student, seed=0)
    student.eval()
    adapter = sum(p.numel() for p in student.parameters() if p.requires_grad)
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                       add_generation_prompt=True) for i in range(args.prompts)]
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p) for p in prompts]
    engine = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  engine_kwargs={"kv_cache_memory_bytes": 256 << 20, "max_num_seqs": 64},
                  sampling_kwargs={"ignore_eos": True})
    samplers, start = {}, {}
    for mode in MODES:
        t0 = time.perf_counter()
        samplers[mode] = VLLMSampler(lora_sync=mode, **engine)
        samplers[mode].setup(student, tok)
        start[mode] = time.perf_counter() - t0
    rollout = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, n=args.group, seed=1)
    sync_s = {m: [] for m in MODES}
    sync_b = {m: [] for m in MODES}
    gen_s = {m: [] for m in MODES}
    try:
        for rep in range(args.reps):
            _set_adapters(student, seed=rep + 1)
            for mode in (MODES if rep % 2 == 0 else MODES[::-1]):  # interleaved, alternating order
                s = samplers[mode]
                t0 = time.perf_counter()
                stats = s.sync_weights(student)
                sync_s[mode].append(time.perf_counter() - t0)
                sync_b[mode].append(stats["weight_sync_bytes"])
                t0 = time.perf_counter()
                gen = s.generate(prompts, rollout)
                gen_s[mode].append(time.perf_counter() - t0)
                assert all(len(c) == args.max_new_tokens for c in gen.completion_ids)
        greedy = SamplingParams(temperature=0.0, max_new_tokens=16, n=1, seed=0)
        answers = {m: samplers[m].generate(prompts, greedy).completion_ids for m in MODES}
        hf = HFSampler(batch_size=64)
        hf.setup(student, tok)
        with torch.no_grad():
            answers["hf"] = hf.generate(prompts, greedy).completion_ids
    finally:
        for s in samplers.values():
            s.close()

    med = {k: {m: statistics.median(v[m]) for m in MODES} for k, v in
           (("sync_s", sync_s), ("sync_b", sync_b), ("gen_s", gen_s))}
    print(f"\nmodel {path}: {total / 1e6:.1f}M params; LoRA r {args.r} alpha {args.alpha:g} "
          f"{args.target_modules}: {adapter / 1e6:.2f}M adapter params; load average {os.getloadavg()[0]:.1f}")
    print(f"rollout batch: {args.prompts} prompts x {args.group} responses x {args.max_new_tokens} tokens; "
          f"medians of {args.reps} interleaved repetitions")
    print(f"{'mode':<8} {'engine start s':>14} {'sync s':>8} {'sync MB':>9} {'generate s':>11} {'sync+gen s':>11}")
    for m in MODES:
        print(f"{m:<8} {start[m]:>14.1f} {med['sync_s'][m]:>8.3f} {med['sync_b'][m] / 1e6:>9.2f} "
              f"{med['gen_s'][m]:>11.2f} {med['sync_s'][m] + med['gen_s'][m]:>11.2f}")
    ratio = {k: med[k]["adapter"] / med[k]["merged"] for k in med}
    both = ((med["sync_s"]["adapter"] + med["gen_s"]["adapter"]) / (med["sync_s"]["merged"] + med["gen_s"]["merged"]))
    print(f"adapter / merged: sync seconds {ratio['sync_s']:.3f}, sync bytes {ratio['sync_b']:.4f}, generate "
          f"seconds {ratio['gen_s']:.2f}, sync + generate {both:.2f}")
    # the engines ignore eos (fixed-length rollouts); HF stops there, so compare up to HF's length
    same = {m: sum(a[:len(h)] == h for a, h in zip(answers[m], answers["hf"])) for m in MODES}
    print(f"greedy answers equal to HF's (up to 16 tokens, {len(prompts)} prompts): merged {same['merged']}, "
          f"adapter {same['adapter']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
