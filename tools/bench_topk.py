"""Top-k teacher distributions on a real model: approximation error, bytes per token, peak memory.

    python tools/build_real_model.py        # once: SmolLM2-135M-Instruct under ~/.cache/rlad_pl
    python tools/bench_topk.py              # 8 prompts x 48 sampled tokens, k = 1 8 64 256 and V
    python tools/bench_topk.py --prompts 4 --max-new-tokens 32 --ks 1 8 64

Setup: the teacher is SmolLM2-135M-Instruct (``rlad_pl.testing.real_model``, V = 49,152, H = 576); the student is the
same checkpoint with only its first ``--student-layers`` (28) of 30 decoder layers (a smaller student sharing the
vocabulary). Rollouts are sampled once from the teacher (``--prompts`` chat prompts, temperature 1) and reused for
everything.

1. Approximation error. For each full-vocabulary objective (``rlad_pl.objectives``: forward / reverse KL, KL-mix 0.25,
   JSD 0.5, skew forward / reverse KL 0.1, OPSD's clipped forward KL 0.05) the exact path (``teacher_hidden``:
   teacher hidden states + LM head, ``chunked_divergence``) and the top-k path (``teacher_top_k: k``: the teacher's
   top-k + tail bucket, ``rlad_pl.core.topk``) give per-token values and the gradient of the token-mean loss w.r.t. the
   student's final hidden states. Printed: relative error of the token-mean value, ``|D_k - D| / D``, and of the
   gradient, ``||g_k - g|| / ||g||``, plus the teacher's mean tail mass. k = V must give ~0.
2. Bytes per response token moved from the teacher to the loss: full logits (fp32 ``V * 4``), today's hidden-state
   path (``H_T * 4``, but it needs the teacher's LM head and model in the trainer), top-k tensors (int64 ids + fp32
   log-probs + fp32 tail, ``12 k + 4``), and the JSON an OpenAI-compatible vLLM server returns for
   ``prompt_logprobs: k`` (measured by encoding these rollouts' entries in the server's format).
3. Peak memory of one forward KL loss (teacher input + forward + backward) per path, from the torch CPU allocator
   (``torch.profiler`` memory events, alloc / free in order): measured side by side in one process, interleaved,
   with the seconds of each; ratios to the full-logits path. The teacher weights the hidden path keeps resident are
   printed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "How do I reverse a list in Python?", "Name three prime numbers.", "Why is the sky blue?",
           "Give me a tip for learning to cook.", "What is 12 times 7?", "Describe a cat in one sentence.",
           "What causes the seasons on Earth?", "Suggest a name for a bakery.", "What is a black hole?"]


def objectives(k=None) -> dict:
    from rlad_pl.objectives import GKDJSD, OPSD, ForwardKL, KLMix, ReverseKL, SkewKL

    kw = {"teacher_top_k": k, "chunk_size": 128, "log_stats": False}
    return {"forward": ForwardKL(**kw), "reverse": ReverseKL(**kw), "mix 0.25": KLMix(0.25, **kw),
            "jsd 0.5": GKDJSD(0.5, **kw), "skew_fwd 0.1": SkewKL(0.1, "forward", **kw),
            "skew_rev 0.1": SkewKL(0.1, "reverse", **kw), "opsd clip": OPSD(0.05, **kw)}


def load_models(student_layers: int):
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.testing.real_model import default_dir, is_complete

    if not is_complete(default_dir()):
        raise SystemExit(f"bench_topk: {default_dir()} is not built; run python tools/build_real_model.py")
    teacher = load_causal_lm(str(default_dir()), "teacher", "float32", trainable=False)
    student = load_causal_lm(str(default_dir()), "student", "float32", trainable=False)
    student.model.layers = student.model.layers[:student_layers]
    student.config.num_hidden_layers = student_layers
    return load_tokenizer(str(default_dir())), student, teacher


@torch.no_grad()
def sample_rollouts(tok, teacher, n: int, max_new_tokens: int, seed: int):
    from rlad_pl.core.batch import RolloutBatch, build_sequences

    prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                       add_generation_prompt=True, tokenize=True) for i in range(n)]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    torch.manual_seed(seed)
    L = max(len(p) for p in prompts)  # one batched, left-padded generate
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = teacher.generate(ids, attention_mask=am, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    responses = []
    for row in out[:, L:].tolist():
        responses.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    ids, mask, P, rmask = build_sequences(prompts, responses, tok.pad_token_id)
    return RolloutBatch(ids, mask, P, rmask, torch.zeros(n), torch.zeros(n), torch.arange(n))


def value_and_grad(obj, batch, out, hs):
    """Token-mean loss of ``obj`` and its gradient w.r.t. the student's final hidden states ``hs``."""
    values, _ = obj.per_token(batch, out)
    m = batch.response_mask
    loss = (values * m).sum() / m.sum()
    (g,) = torch.autograd.grad(loss, [hs])
    return float(loss.detach()), g


def approximation_table(batch, hs, s_head, ht, t_head, V: int, ks: list[int]) -> tuple[list, dict]:
    from rlad_pl.core.topk import chunked_topk
    from rlad_pl.objectives.base import StudentOutputs

    exact = {}
    out = StudentOutputs(logprobs=torch.zeros(batch.response_mask.shape), hidden=hs, lm_head=s_head,
                         teacher_hidden=ht, teacher_lm_head=t_head, vocab_size=V)
    for name, obj in objectives().items():
        exact[name] = value_and_grad(obj, batch, out, hs)
    top_all = chunked_topk(ht, t_head.weight, max(ks), chunk_size=16, vocab_size=V)
    rows, tails = [], {}
    for k in ks:
        top = top_all.truncate(k) if k < top_all.k else top_all
        m = batch.response_mask > 0
        tails[k] = float(top.buckets()[..., -1].exp()[m].mean())
        out_k = StudentOutputs(logprobs=out.logprobs, hidden=hs, lm_head=s_head, teacher_topk=top, vocab_size=V)
        for name, obj in objectives(k).items():
            v, g = value_and_grad(obj, batch, out_k, hs)
            v0, g0 = exact[name]
            rows.append({"divergence": name, "k": k, "exact": v0, "value": v, "value_rel": abs(v - v0) / abs(v0),
                         "grad_rel": float((g - g0).norm() / g0.norm())})
    return rows, tails


def server_json_bytes(tok, top, mask) -> float:
    """Mean JSON bytes per response token of ``prompt_logprobs: k`` entries in the vLLM server's format."""
    m = mask > 0
    sizes = []
    for i, t in m.nonzero().tolist():
        entry = {str(int(tid)): {"logprob": float(lp), "rank": r + 1, "decoded_token": tok.decode([int(tid)])}
                 for r, (tid, lp) in enumerate(zip(top.ids[i, t].tolist(), top.logprobs[i, t].tolist()))}
        sizes.append(len(json.dumps(entry)) + 2)  # ", " between positions
    return statistics.mean(sizes)


def torch_peak_bytes(fn) -> tuple[int, float]:
    """Peak bytes the torch CPU allocator held above the starting point while ``fn`` ran, and its seconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, seconds


def memory_table(batch, hs0, s_head, teacher, t_head, V: int, k: int, repeats: int) -> dict:
    """Forward KL, teacher input + forward + backward, per path; each path's peak is the max over repetitions."""
    from rlad_pl.core.divergences import chunked_divergence, chunked_positions, forward_kl_lp, student_logprobs
    from rlad_pl.core.logprobs import response_hidden
    from rlad_pl.core.topk import TeacherTopK, chunked_topk, chunked_topk_divergence, student_buckets

    mask = batch.response_mask
    with torch.no_grad():
        ht = response_hidden(teacher, batch.input_ids, batch.attention_mask, batch.prompt_len)
        full_lp = torch.cat([t_head(ht[:, s:s + 16]).float().log_softmax(-1) for s in range(0, ht.shape[1], 16)], 1)
        top = chunked_topk(ht, t_head.weight, k, chunk_size=16, vocab_size=V)
    fkl = lambda z_s, z_t: forward_kl_lp(student_logprobs(z_s), z_t.detach().float().log_softmax(-1))  # noqa: E731

    def step_hidden():  # today: the teacher forward in the trainer, then both heads chunk by chunk
        hs = hs0.clone().requires_grad_(True)
        with torch.no_grad():
            h_t = response_hidden(teacher, batch.input_ids, batch.attention_mask, batch.prompt_len)
        v = chunked_divergence(hs, s_head.weight, h_t, t_head.weight, fkl, chunk_size=128, vocab_size=V, mask=mask)
        ((v * mask).sum() / mask.sum()).backward()

    def full_chunk(h, logp, w):
        return forward_kl_lp(student_logprobs(torch.nn.functional.linear(h, w)), logp)

    def step_logits():  # a served teacher's full log-probs [N, R, V] arrive, then the student head chunk by chunk
        hs = hs0.clone().requires_grad_(True)
        logp = full_lp.clone()
        v = chunked_positions(full_chunk, hs, (logp,), (s_head.weight[:V],), chunk_size=128, mask=mask,
                              needs_grad=True, leaves=(hs,), probe=lambda: torch.zeros(1))
        ((v * mask).sum() / mask.sum()).backward()

    def bucket_fkl(z_s, ids, logp_b):
        return forward_kl_lp(student_buckets(student_logprobs(z_s), ids), logp_b)

    def step_topk():  # the teacher's top-k arrive ([N, R, k] ids + log-probs, [N, R] tail), then the student head
        hs = hs0.clone().requires_grad_(True)
        t = TeacherTopK(top.ids.clone(), top.logprobs.clone(), top.tail.clone())
        v = chunked_topk_divergence(hs, s_head.weight, t, bucket_fkl, chunk_size=128, vocab_size=V, mask=mask)
        ((v * mask).sum() / mask.sum()).backward()

    steps = {"hidden (teacher in trainer)": step_hidden, "full logits": step_logits, f"top-{k}": step_topk}
    peaks: dict[str, list[int]] = {n: [] for n in steps}
    secs: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(repeats):  # interleaved: load on a shared machine hits every path alike
        for name, fn in steps.items():
            p, s = torch_peak_bytes(fn)
            peaks[name].append(p)
            secs[name].append(s)
    weights = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return {"peak": {n: max(v) for n, v in peaks.items()},
            "seconds": {n: statistics.median(v) for n, v in secs.items()},
            "teacher_weights": weights, "k": k}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--student-layers", type=int, default=28, help="decoder layers the student keeps (of 30)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--memory-k", type=int, default=64, help="k of the top-k path in the memory table")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    from rlad_pl.core.logprobs import response_hidden

    tok, student, teacher = load_models(args.student_layers)
    V = len(tok)
    t0 = time.perf_counter()
    batch = sample_rollouts(tok, teacher, args.prompts, args.max_new_tokens, args.seed)
    n_tok = int(batch.response_mask.sum())
    print(f"rollouts: {args.prompts} x <= {args.max_new_tokens} tokens sampled from the teacher ({n_tok} response "
          f"tokens, {time.perf_counter() - t0:.0f} s); V = {V}, student = first {args.student_layers} of 30 layers")
    with torch.no_grad():
        hs = response_hidden(student, batch.input_ids, batch.attention_mask, batch.prompt_len)
        ht = response_hidden(teacher, batch.input_ids, batch.attention_mask, batch.prompt_len)
    hs = hs.detach().requires_grad_(True)
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    ks = sorted(set(args.ks)) + [V]
    rows, tails = approximation_table(batch, hs, s_head, ht, t_head, V, ks)

    label = lambda k: "V" if k == V else str(k)  # noqa: E731
    print("\n1. relative error of the top-k path vs the exact full-vocabulary path: token-mean value | gradient "
          "w.r.t. the student's hidden states")
    names = list(objectives())
    print(f"{'divergence':<13} {'exact':>8} " + " ".join(f"{'k=' + label(k):>17}" for k in ks))
    for name in names:
        cells = [r for r in rows if r["divergence"] == name]
        print(f"{name:<13} {cells[0]['exact']:8.4f} " + " ".join(
            f"{r['value_rel']:8.1e}|{r['grad_rel']:8.1e}" for r in cells))
    print(f"{'tail mass':<13} {'':>8} " + " ".join(f"{tails[k]:>17.2e}" for k in ks))

    from rlad_pl.core.topk import chunked_topk

    top = chunked_topk(ht, t_head.weight, max(args.ks), chunk_size=16, vocab_size=V)
    print("\n2. bytes per response token, teacher -> loss")
    print(f"   full logits fp32: {V * 4:,}   hidden states fp32 (teacher + LM head in the trainer): "
          f"{teacher.config.hidden_size * 4:,}")
    for k in sorted(set(args.ks)):
        tk = top.truncate(k)
        print(f"   top-{k:<4} tensors: {12 * k + 4:>6,} ({(12 * k + 4) / (V * 4):.2e} of full)   server JSON: "
              f"{server_json_bytes(tok, tk, batch.response_mask):>9,.0f}")

    mem = memory_table(batch, hs.detach(), s_head, teacher, t_head, V, args.memory_k, args.repeats)
    base = mem["peak"]["full logits"]
    print(f"\n3. peak torch CPU memory of one forward-KL loss (teacher input + forward + backward), {n_tok} "
          f"response tokens, chunk 128, max of {args.repeats} interleaved repetitions")
    print(f"   {'path':<28} {'peak MB':>9} {'vs full':>8} {'seconds':>8}")
    for name, peak in mem["peak"].items():
        print(f"   {name:<28} {peak / 2**20:9.1f} {peak / base:8.3f} {mem['seconds'][name]:8.2f}")
    print(f"   (the hidden path also keeps the teacher's weights resident: {mem['teacher_weights'] / 2**20:.0f} MB "
          "fp32; the served paths keep none)")
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
