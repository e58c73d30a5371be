"""Top-k teacher distributions (``rlad_pl.core.topk``, ``teacher_top_k`` on the full-vocabulary objectives).

Checked: with k = the vocabulary the bucket divergence equals the full-vocabulary one (value and gradient, every
objective, 1e-6); a hand-computed case with a tail bucket (value, gradient, tail mass, truncation); the tail computed
stably; the vLLM backend's top-k equals the local backend's (ids, log-probs, tail) on the tiny models for real, at
temperature 1 and 0.7 (the temperature applies before the top-k); a CLI fit with a top-k forward KL lowers its
divergence; bad k and combinations that cannot work are one line.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, make_batch, run_cli, scalars
from rlad_pl.core.divergences import VOCAB_LOGPROB_FLOOR
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.topk import TeacherTopK, chunked_topk, student_buckets, tail_from_topk
from rlad_pl.objectives import GKDJSD, OPSD, ForwardKL, KLMix, ReverseKL, SkewKL
from rlad_pl.objectives.base import STUDENT_HIDDEN, TEACHER_HIDDEN, TEACHER_TOPK, StudentOutputs
from test_teacher_backends import ASSETS, ENGINE, _rollout, needs_vllm, teacher_server  # noqa: F401 (fixture)

OBJECTIVES = {
    "forward": lambda **kw: ForwardKL(**kw),
    "reverse": lambda **kw: ReverseKL(**kw),
    "mix": lambda **kw: KLMix(kl_mix_lambda=0.25, **kw),
    "jsd": lambda **kw: GKDJSD(jsd_beta=0.3, **kw),
    "skew_forward": lambda **kw: SkewKL(skew_alpha=0.1, **kw),
    "skew_reverse": lambda **kw: SkewKL(skew_alpha=0.1, direction="reverse", **kw),
    "opsd_clipped_forward": lambda **kw: OPSD(clip_kappa=0.05, **kw),
}


def _heads(seed=0, n=3, r=5, h=8, v=11):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, r, h, generator=g).requires_grad_(True)
    ws, wt = torch.nn.Linear(h, v, bias=False), torch.nn.Linear(h, v, bias=True)
    with torch.no_grad():
        ws.weight.copy_(torch.randn(v, h, generator=g) * 0.5)
        wt.weight.copy_(torch.randn(v, h, generator=g) * 0.5)
        wt.bias.copy_(torch.randn(v, generator=g))
    ht = torch.randn(n, r, h, generator=g)
    mask = torch.ones(n, r)
    mask[0, 3:] = 0  # padding positions are ignored
    return hs, ws, ht, wt, mask


def _value_and_grads(obj, batch, out, hs, ws):
    values, metrics = obj.per_token(batch, out)
    loss = (values * batch.response_mask).sum()
    return values, metrics, torch.autograd.grad(loss, [hs, ws.weight])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_k_equal_to_vocabulary_is_the_full_vocabulary_loss_and_gradient(name):
    hs, ws, ht, wt, mask = _heads()
    batch, T, V = make_batch(mask), 0.7, ws.weight.shape[0]
    full, topk = OBJECTIVES[name](), OBJECTIVES[name](teacher_top_k=V)
    assert full.requires >= {STUDENT_HIDDEN, TEACHER_HIDDEN} and TEACHER_TOPK not in full.requires
    assert topk.requires >= {STUDENT_HIDDEN, TEACHER_TOPK} and TEACHER_HIDDEN not in topk.requires
    out = StudentOutputs(logprobs=torch.zeros(mask.shape), hidden=hs, lm_head=ws, teacher_hidden=ht,
                         teacher_lm_head=wt, vocab_size=V, temperature=T)
    want, want_m, want_g = _value_and_grads(full, batch, out, hs, ws)
    teacher = chunked_topk(ht, wt.weight, V, bias=wt.bias, temperature=T, chunk_size=2)
    assert teacher.ids.shape == (3, 5, V) and teacher.ids.dtype == torch.long
    assert (teacher.tail == VOCAB_LOGPROB_FLOOR).all()  # nothing outside the top-V
    out_k = StudentOutputs(logprobs=torch.zeros(mask.shape), hidden=hs, lm_head=ws, teacher_topk=teacher,
                           vocab_size=V, temperature=T)
    got, got_m, got_g = _value_and_grads(topk, batch, out_k, hs, ws)
    assert want.abs().max() > 0.05  # a real divergence, not two zeros
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g_got, g_want in zip(got_g, want_g):
        assert g_want.abs().max() > 1e-3
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-6)
    for key in ("divergence", "fkl", "rkl", "entropy"):
        torch.testing.assert_close(got_m[key], want_m[key], atol=1e-6, rtol=1e-6)
    assert got_m["tail_mass"].item() == 0.0
    # a smaller k is a different (coarser) value: the option is not ignored
    small, _ = OBJECTIVES[name](teacher_top_k=3).per_token(batch, out_k)
    assert (small - want)[mask > 0].abs().max() > 1e-3


def _hand_case():
    """V = 4, teacher p = (0.5, 0.3, 0.15, 0.05), k = 2 -> buckets (0.5, 0.3 | tail 0.2); student q uniform
    (z = 0) -> buckets (0.25, 0.25 | 0.5). A student renormalised over the top-k would be (0.5, 0.5)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    teacher = TeacherTopK(torch.tensor([[[0, 1]]]), p[:2].log().reshape(1, 1, 2), torch.tensor([[math.log(0.2)]]))
    z = torch.zeros(1, 1, 4, requires_grad=True)  # the student's logits: hidden = z, identity LM head
    head = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4))
    out = StudentOutputs(logprobs=torch.zeros(1, 1), hidden=z, lm_head=head, teacher_topk=teacher, vocab_size=4)
    return z, out


def test_hand_computed_buckets_with_a_tail():
    z, out = _hand_case()
    batch = make_batch([[1.0]])
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)  # 0.218012
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(0.25 / 0.3) + 0.5 * math.log(0.5 / 0.2)  # 0.239278
    v, m = ForwardKL(teacher_top_k=2).per_token(batch, out)
    assert v.item() == pytest.approx(fkl, abs=1e-6)
    assert m["rkl"].item() == pytest.approx(rkl, abs=1e-6) and m["tail_mass"].item() == pytest.approx(0.2, abs=1e-7)
    assert m["entropy"].item() == pytest.approx(math.log(4), abs=1e-6)  # the student's full entropy
    (g,) = torch.autograd.grad(v.sum(), [z])
    # d FKL / d z_u = q_u - p_u on the top-k, q_u - p_tail q_u / q_tail outside (0.25 - 0.2 * 0.25 / 0.5 = 0.15)
    torch.testing.assert_close(g.reshape(-1), torch.tensor([-0.25, -0.05, 0.15, 0.15]), atol=1e-6, rtol=0)
    v, _ = ReverseKL(teacher_top_k=2).per_token(batch, out)
    assert v.item() == pytest.approx(rkl, abs=1e-6)
    # OPSD's per-entry clip applies to each bucket: clamp(0.5 ln 2, 0, .05) + clamp(0.3 ln 1.2, 0, .05) + 0
    v, _ = OPSD(clip_kappa=0.05, teacher_top_k=2).per_token(batch, out)
    assert v.item() == pytest.approx(0.05 + 0.05, abs=1e-6)
    # an objective asking for k = 1 of this top-2 merges token 1 into the tail: buckets (0.5 | 0.5) vs (0.25 | 0.75)
    v, _ = ForwardKL(teacher_top_k=1).per_token(batch, out)
    assert v.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)


def test_tail_and_buckets_numerics():
    lp = torch.tensor([math.log(0.5), math.log(0.3)])
    assert tail_from_topk(lp).item() == pytest.approx(math.log(0.2), abs=1e-6)
    # a tail of 1e-12: 1 - sum in fp32 would be 0; log1mexp in fp64 keeps it
    lp = torch.tensor([math.log1p(-1e-12)], dtype=torch.float64)
    assert tail_from_topk(lp).item() == pytest.approx(math.log(1e-12), rel=1e-6)
    assert tail_from_topk(torch.tensor([0.0, -3.0])).item() == VOCAB_LOGPROB_FLOOR  # sum > 1 (rounding): floor
    assert tail_from_topk(torch.tensor([VOCAB_LOGPROB_FLOOR])).item() == pytest.approx(0.0, abs=1e-7)
    # the student's tail is the mass outside the ids, from its own (never renormalised) distribution
    logq = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    got = student_buckets(logq, torch.tensor([3, 0])).exp()
    torch.testing.assert_close(got, torch.tensor([0.4, 0.1, 0.5]))
    z = torch.randn(4, requires_grad=True)  # an empty tail has probability 0 and no NaN gradient
    b = student_buckets(z.log_softmax(-1), torch.tensor([2, 0, 3, 1]))
    assert b[-1].exp().item() == 0.0
    (g,) = torch.autograd.grad(b[-1] * 0 + b[:-1].exp().sum(), [z])
    assert torch.isfinite(g).all()


def test_bad_k_is_one_line(tmp_path, capsys):
    for bad in (0, -3, True, 2.5, "8"):
        with pytest.raises(ConfigError, match=r"^forwardkl\.teacher_top_k: expected an integer >= 1"):
            ForwardKL(teacher_top_k=bad)
    with pytest.raises(ConfigError, match=r"^opsd\.teacher_top_k: expected an integer >= 1"):
        OPSD(teacher_top_k=0)
    # above the shared vocabulary (55 for the tiny pair): the CLI line, exit 2, before any rollout
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", str(CONFIGS / "forward_kl_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
                "--model.objectives", "[{class_path: rlad_pl.objectives.ForwardKL, init_args: {teacher_top_k: 56}}]")
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlad_pl: error: forwardkl.teacher_top_k: expected at most the shared vocabulary size 55, got 56 "
        "(k = 55 is the exact full-vocabulary result)")
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_full_vocabulary_objective_on_an_engine_backend_points_at_teacher_top_k():
    from rlad_pl.teacher import ServerTeacher

    backend = ServerTeacher(url="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"^model\.teacher_backend: ReverseKL needs \['teacher_hidden'\].*"
                                          r"or set the objective's teacher_top_k"):
        backend.check(ReverseKL().requires, ["ReverseKL"])
    backend.check(ReverseKL(teacher_top_k=8).requires, ["ReverseKL"], top_k=8)  # served: accepted
    assert backend.top_k == 8


def test_truncating_a_larger_top_k_keeps_the_mass():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    t = TeacherTopK(torch.tensor([[[1, 0, 3]]]), p[:3].log().reshape(1, 1, 3), torch.tensor([[math.log(0.1)]]))
    small = t.truncate(1)
    assert small.ids.tolist() == [[[1]]] and small.tail.exp().item() == pytest.approx(0.6, abs=1e-6)
    assert small.buckets().exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert t.truncate(3) is t


def test_cli_fit_with_top_k_forward_kl_lowers_its_divergence(tmp_path):
    cli = run_cli("fit", "--config", str(CONFIGS / "forward_kl_tiny.yaml"), "--trainer.max_epochs", "12",
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.check_val_every_n_epoch", "100",
                  "--export.enabled", "false", "--model.objectives",
                  "[{class_path: rlad_pl.objectives.ForwardKL, init_args: {teacher_top_k: 8}}]")
    obj = cli.model.objectives[0]
    assert (obj.teacher_top_k == 8 and TEACHER_TOPK in cli.model.plan.inputs
            and TEACHER_HIDDEN not in cli.model.plan.inputs)
    log_dir = Path(cli.trainer.log_dir)
    kl, tail = scalars(log_dir, "forwardkl/divergence"), scalars(log_dir, "forwardkl/tail_mass")
    assert len(kl) == 12 and all(0.0 < t < 1.0 for t in tail), tail  # measured 0.797 (near-uniform tiny teacher)
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    # measured: 0.0077 -> 0.0014
    print(f"\ntop-8 FKL {first:.4f} -> {last:.4f}, tail mass {tail[0]:.3f} -> {tail[-1]:.3f}")
    assert last < 0.5 * first, (first, last)


def _topk_module(backend, k):
    from rlad_pl.training.module import DistillationModule

    return DistillationModule(student=str(ASSETS / "tiny-student"), teacher=str(ASSETS / "tiny-teacher"),
                              objectives=[ForwardKL(teacher_top_k=k)], teacher_backend=backend)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_top_k_equals_local_top_k():
    """Real vLLM-CPU engine on the tiny teacher: ids exact, log-probs and tail mass within 1e-4 of the local
    backend, at T = 1 and T = 0.7 (the worker hook scales the logits before vLLM takes its top-k), k = 8 and V."""
    from rlad_pl.teacher import VLLMTeacher

    V = 55
    local = _topk_module(None, V)
    remote = _topk_module(VLLMTeacher(**ENGINE), V)
    assert remote.teacher_backend.top_k == V and remote.teacher is None
    batch = _rollout(local.tokenizer, n=12, seed=3)
    m = batch.response_mask > 0
    worst = {}
    try:
        for T, k in ((1.0, 8), (0.7, 8), (0.7, V)):
            want = local.teacher_backend.topk(batch, k=k, temperature=T, chunk_size=4, vocab_size=V)
            got = remote.teacher_backend.topk(batch, k=k, temperature=T, chunk_size=4, vocab_size=V)
            assert got.ids.shape == want.ids.shape == (12, batch.response_len, k)
            assert torch.equal(got.ids[m], want.ids[m]), (T, k)
            d_lp = (got.logprobs[m] - want.logprobs[m]).abs().max().item()
            d_tail = (got.tail[m].exp() - want.tail[m].exp()).abs().max().item()
            worst[(T, k)] = (d_lp, d_tail)
            assert d_lp < 1e-4 and d_tail < 1e-4, (T, k, d_lp, d_tail)
            if k < V:  # a real tail, and T matters
                assert want.tail[m].exp().min() > 1e-3
        t1 = local.teacher_backend.topk(batch, k=8, temperature=1.0, chunk_size=4, vocab_size=V)
        t07 = remote.teacher_backend.topk(batch, k=8, temperature=0.7, chunk_size=4, vocab_size=V)
        assert (t1.logprobs[m] - t07.logprobs[m]).abs().max() > 1e-2
    finally:
        remote.teacher_backend.close()
    print("\nmax |vllm - local| (log-prob, tail mass):", {f"T={t},k={k}": f"{a:.1e}, {b:.1e}"
                                                          for (t, k), (a, b) in worst.items()})


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_server_top_k_equals_local_top_k(teacher_server):  # noqa: F811
    """The OpenAI-compatible server (``prompt_logprobs: k``, started with ``--max-logprobs 20``) gives the local
    top-k; a k above the server's limit is one line naming the flag."""
    from rlad_pl.teacher import ServerTeacher

    url, folder = teacher_server
    local = _topk_module(None, 21)
    served = _topk_module(ServerTeacher(url=url, model=folder, batch_size=5), 21)
    batch = _rollout(local.tokenizer, n=12, seed=5, privileged=True)  # the teacher's own (privileged) layout
    m = batch.response_mask > 0
    want = local.teacher_backend.topk(batch, k=8, temperature=1.0, chunk_size=4, vocab_size=55)
    got = served.teacher_backend.topk(batch, k=8, temperature=1.0, chunk_size=4, vocab_size=55)
    assert torch.equal(got.ids[m], want.ids[m])
    d_lp = (got.logprobs[m] - want.logprobs[m]).abs().max().item()
    d_tail = (got.tail[m].exp() - want.tail[m].exp()).abs().max().item()
    print(f"\nserver top-8: max |server - local| log-prob {d_lp:.1e}, tail mass {d_tail:.1e}")
    assert d_lp < 1e-4 and d_tail < 1e-4
    with pytest.raises(ConfigError, match=rf"^model\.teacher_backend\.init_args\.url: the teacher server at {url} "
                                          r"refused prompt_logprobs=21 \(teacher_top_k\); start it with "
                                          r"--max-logprobs 21 or more"):
        served.teacher_backend.topk(batch, k=21, temperature=1.0, chunk_size=4, vocab_size=55)
