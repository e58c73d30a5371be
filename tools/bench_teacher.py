"""Teacher-scoring seconds per step: ``LocalTeacher`` vs ``VLLMTeacher`` on the same rollouts.

    python tools/bench_teacher.py                            # the shipped tiny pair, and SmolLM2-135M if built
    python tools/bench_teacher.py --models real --sequences 32 --prompt-len 64 --response-len 128 --repeats 5

For each model two ``DistillationModule``s (a TRRD objective, so the teacher's sampled-token log-probs are the only
annotation) score one fixed random rollout batch through the ``Annotator``, exactly what a training step runs
before its updates; the time is the module's own ``timing/teacher_logprobs``. Repetitions interleave the backends
(local, vllm, local, vllm, ...) so load on a shared machine hits both alike; the vLLM engine's start (once per
run) is reported separately. Prints per-backend medians, the ratio local / vllm, and the max |vllm - local| over
the response tokens. ``real`` is SmolLM2-135M-Instruct from ``rlad_pl.testing.real_model``
(``tools/build_real_model.py``), used as its own teacher; it is skipped when not built. CPU timings are noisy: the load
average is printed.
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


def model_pairs(names: list[str]) -> list[tuple[str, str, str]]:
    """``(name, student, teacher)`` folders; ``real`` only when built."""
    assets = REPO / "rlad_pl" / "assets"
    out = []
    for name in names:
        if name == "tiny":
            out.append(("tiny", str(assets / "tiny-student"), str(assets / "tiny-teacher")))
        elif name == "demo":
            out.append(("demo", str(assets / "demo-student"), str(assets / "demo-teacher")))
        elif name == "real":
            from rlad_pl.testing.real_model import default_dir, is_complete

            if is_complete(default_dir()):
                out.append(("real", str(default_dir()), str(default_dir())))
            else:
                print(f"real: skipped ({default_dir()} not built; python tools/build_real_model.py)")
        else:
            raise SystemExit(f"bench_teacher: --models: unknown '{name}' (tiny, demo, real)")
    return out


def random_rollout(tok, n: int, prompt_len: int, response_len: int, seed: int = 0):
    """``n`` sequences of random non-special tokens; prompt and response lengths vary from half to full."""
    from rlad_pl.core.batch import RolloutBatch, build_sequences

    g = torch.Generator().manual_seed(seed)
    special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    vocab = torch.tensor([i for i in range(len(tok)) if i not in special])
    draw = lambda k: vocab[torch.randint(len(vocab), (k,), generator=g)].tolist()  # noqa: E731
    half = lambda k, i: max(1, k // 2 + (i * 7919) % (k - k // 2 + 1))  # noqa: E731
    prompts = [draw(half(prompt_len, i)) for i in range(n)]
    responses = [draw(half(response_len, i + 3)) for i in range(n)]
    ids, mask, P, rmask = build_sequences(prompts, responses, tok.pad_token_id)
    return RolloutBatch(ids, mask, P, rmask, torch.zeros(n), torch.zeros(n), torch.arange(n))


def bench(name: str, student: str, teacher: str, args) -> dict:
    from rlad_pl.objectives import TRRD
    from rlad_pl.teacher import VLLMTeacher
    from rlad_pl.training.module import DistillationModule

    max_len = args.prompt_len + args.response_len + 8
    modules = {
        "local": DistillationModule(student=student, teacher=teacher, objectives=[TRRD()], temperature=1.0,
                                    annotate_batch_size=args.batch_size),
        "vllm": DistillationModule(student=student, teacher=teacher, objectives=[TRRD()], temperature=1.0,
                                   annotate_batch_size=args.batch_size, teacher_backend=VLLMTeacher(
                                       max_model_len=max_len, engine_kwargs={
                                           "kv_cache_memory_bytes": args.kv_cache_mib << 20, "max_num_seqs": 256})),
    }
    tok = modules["local"].tokenizer
    base = random_rollout(tok, args.sequences, args.prompt_len, args.response_len)
    t0 = time.perf_counter()
    modules["vllm"].annotator().annotate(random_rollout(tok, 2, 4, 4), need_old=False)  # engine start, warm-up
    start = time.perf_counter() - t0
    modules["local"].annotator().annotate(random_rollout(tok, 2, 4, 4), need_old=False)
    seconds: dict[str, list[float]] = {"local": [], "vllm": []}
    values = {}
    for _ in range(args.repeats):
        for backend, module in modules.items():
            batch = random_rollout(tok, args.sequences, args.prompt_len, args.response_len)
            stats = module.annotator().annotate(batch, need_old=False)
            seconds[backend].append(stats["timing/teacher_logprobs"])
            values[backend] = batch.teacher_logprobs
    modules["vllm"].teacher_backend.close()
    m = base.response_mask > 0
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"model": name, "tokens": int(base.attention_mask.sum()), "response_tokens": int(m.sum()),
            "local_s": med["local"], "vllm_s": med["vllm"], "ratio": med["local"] / med["vllm"],
            "engine_start_s": start, "max_abs_diff": float((values["vllm"][m] - values["local"][m]).abs().max()),
            "spread": {k: (min(v), max(v)) for k, v in seconds.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "real"], help="tiny, demo, real")
    p.add_argument("--sequences", type=int, default=32, help="rollout sequences per step")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="model.annotate_batch_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-cache-mib", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    rows = [bench(*pair, args) for pair in model_pairs(args.models)]
    print(f"\nteacher scoring, {args.sequences} sequences (prompt <= {args.prompt_len}, response <= "
          f"{args.response_len} tokens), median of {args.repeats} interleaved repetitions, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':6} {'tokens':>7} {'local s':>9} {'vllm s':>9} {'local/vllm':>11} {'engine start s':>15} "
          f"{'max |diff|':>11}")
    for r in rows:
        print(f"{r['model']:6} {r['tokens']:7d} {r['local_s']:9.3f} {r['vllm_s']:9.3f} {r['ratio']:11.2f} "
              f"{r['engine_start_s']:15.1f} {r['max_abs_diff']:11.2e}")


if __name__ == "__main__":
    main()
