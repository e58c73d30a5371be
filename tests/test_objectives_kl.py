"""Full-vocabulary divergences, chunked LM heads and TokenKL: decoupled-kl.md acceptance checks 1-11."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rlad_pl.core import divergences as D
from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.divergences import chunked_divergence
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives import (
    GKDJSD,
    Denominators,
    ForwardKL,
    KLMix,
    OPDFullVocab,
    OPDSampled,
    ReverseKL,
    SkewKL,
    StudentOutputs,
    TokenKL,
)
from rlad_pl.objectives.base import DATASET_PREFIXES, STUDENT_HIDDEN, TEACHER_HIDDEN, TEACHER_PREFIXES

V, H, HT = 13, 6, 5


def logits(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def make_batch(mask) -> RolloutBatch:
    mask = torch.as_tensor(mask, dtype=torch.float32)
    n, r = mask.shape
    return RolloutBatch(input_ids=torch.zeros(n, 2 + r, dtype=torch.long),
                        attention_mask=torch.ones(n, 2 + r, dtype=torch.long), prompt_len=2, response_mask=mask,
                        rewards=torch.zeros(n), advantages=torch.zeros(n), group_ids=torch.arange(n))


class Models:
    """Student / teacher final hidden states and LM heads (``nn.Linear``), the student's head padded by 3 rows."""

    def __init__(self, n=3, r=5, seed=0, bias=True, temperature=1.0, pad=3):
        torch.manual_seed(seed)
        self.head = nn.Linear(H, V + pad, bias=bias)
        self.t_head = nn.Linear(HT, V, bias=bias)
        self.hidden = torch.randn(n, r, H, requires_grad=True)
        self.t_hidden = torch.randn(n, r, HT)
        self.temperature = temperature

    def outputs(self):
        return StudentOutputs(logprobs=torch.zeros(self.hidden.shape[:2]), hidden=self.hidden, lm_head=self.head,
                              teacher_hidden=self.t_hidden, teacher_lm_head=self.t_head, vocab_size=V,
                              temperature=self.temperature)

    def full_logits(self):
        z_s = (self.hidden @ self.head.weight[:V].T + (self.head.bias[:V] if self.head.bias is not None else 0))
        z_t = (self.t_hidden @ self.t_head.weight.T + (self.t_head.bias if self.t_head.bias is not None else 0))
        return z_s / self.temperature, z_t.detach() / self.temperature


# ------------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_check1_forward_kl_gradient_is_q_minus_p(tau):
    z_s, z_t = logits(0, 4, V).requires_grad_(True), logits(1, 4, V)
    D.forward_kl(z_s, z_t, temperature=tau).sum().backward()
    q, p = (z_s / tau).softmax(-1), (z_t / tau).softmax(-1)
    torch.testing.assert_close(z_s.grad, (q - p) / tau, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 1.1])
def test_check2_reverse_kl_gradient_closed_form_and_policy_gradient(tau):
    z_s, z_t = logits(2, 3, V).requires_grad_(True), logits(3, 3, V)
    rkl = D.reverse_kl(z_s, z_t, temperature=tau)
    rkl.sum().backward()
    logq, logp = (z_s / tau).log_softmax(-1).detach(), (z_t / tau).log_softmax(-1)
    q = logq.exp()
    closed = q * (logq - logp - rkl.detach()[:, None]) / tau
    torch.testing.assert_close(z_s.grad, closed, atol=1e-6, rtol=0)
    # E_q[(log q - log p) grad log q] by explicit enumeration of the vocabulary
    z = z_s.detach().clone().requires_grad_(True)
    lq = (z / tau).log_softmax(-1)
    pg = (q * (logq - logp) * lq).sum()  # q and the reward are constants
    pg.backward()
    torch.testing.assert_close(z.grad, closed, atol=1e-6, rtol=0)


def test_check3_sampled_opd_expectation_is_reverse_kl_gradient():
    z_t = logits(4, 1, V)
    logp_t = z_t.log_softmax(-1)[0]
    z = logits(5, 1, V).requires_grad_(True)
    lq = z.log_softmax(-1)[0]
    q = lq.exp().detach()
    obj = OPDSampled()
    # one single-token sequence per vocabulary entry y: its per-token loss, weighted by q(y) (exact expectation)
    batch = make_batch(torch.ones(V, 1))
    batch.teacher_logprobs = logp_t[:, None]
    values, _ = obj.per_token(batch, StudentOutputs(logprobs=lq[:, None]))
    (q[:, None] * values).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    D.reverse_kl(z_ref, z_t).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, atol=1e-6, rtol=0)
    # Monte Carlo over sampled tokens agrees within tolerance
    z.grad = None
    ys = torch.multinomial(q, 40000, replacement=True, generator=torch.Generator().manual_seed(0))
    lq = z.log_softmax(-1)[0]
    batch = make_batch(torch.ones(len(ys), 1))
    batch.teacher_logprobs = logp_t[ys][:, None]
    values, _ = obj.per_token(batch, StudentOutputs(logprobs=lq[ys][:, None]))
    values.mean().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, atol=0.03, rtol=0)


def test_check4_kl_mix_endpoints_and_linearity():
    z_t = logits(7, 3, V)
    def loss_and_grad(fn):
        z = logits(6, 3, V).requires_grad_(True)
        out = fn(z).sum()
        out.backward()
        return out.detach(), z.grad
    fkl = loss_and_grad(lambda z: D.forward_kl(z, z_t))
    rkl = loss_and_grad(lambda z: D.reverse_kl(z, z_t))
    for lam, ref in ((0.0, fkl), (1.0, rkl)):
        got = loss_and_grad(lambda z, lam=lam: D.kl_mix(z, z_t, lam))
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    for lam in (0.1, 0.25, 0.5, 0.8):
        got = loss_and_grad(lambda z, lam=lam: D.kl_mix(z, z_t, lam))
        torch.testing.assert_close(got[0], lam * rkl[0] + (1 - lam) * fkl[0])
        torch.testing.assert_close(got[1], lam * rkl[1] + (1 - lam) * fkl[1])


def test_check5_gkd_jsd_endpoints_and_symmetry():
    z_s, z_t = logits(8, 4, V), logits(9, 4, V)
    assert torch.equal(D.generalized_jsd(z_s, z_t, 0.0), D.forward_kl(z_s, z_t))
    assert torch.equal(D.generalized_jsd(z_s, z_t, 1.0), D.reverse_kl(z_s, z_t))
    torch.testing.assert_close(D.generalized_jsd(z_s, z_t, 0.5), D.generalized_jsd(z_t, z_s, 0.5))
    # the formula itself vanishes near the ends (why beta = 0 / 1 are special-cased) and is bounded by log 2
    jsd = D.generalized_jsd(z_s, z_t, 0.5)
    assert (jsd > 0).all() and (jsd <= math.log(2) + 1e-6).all()
    assert (D.generalized_jsd(z_s, z_t, 1e-4) < 1e-2 * D.forward_kl(z_s, z_t)).all()


def test_check6_skew_kl_alpha_zero():
    z_s, z_t = logits(10, 4, V), logits(11, 4, V)
    assert torch.equal(D.skew_forward_kl(z_s, z_t, 0.0), D.forward_kl(z_s, z_t))
    assert torch.equal(D.skew_reverse_kl(z_s, z_t, 0.0), D.reverse_kl(z_s, z_t))
    # skew FKL = KL(p || a p + (1 - a) q) by direct computation
    p, q = z_t.softmax(-1), z_s.softmax(-1)
    m = 0.1 * p + 0.9 * q
    torch.testing.assert_close(D.skew_forward_kl(z_s, z_t, 0.1), (p * (p.log() - m.log())).sum(-1))
    m = 0.1 * q + 0.9 * p
    torch.testing.assert_close(D.skew_reverse_kl(z_s, z_t, 0.1), (q * (q.log() - m.log())).sum(-1))


ALL = {"forward": D.forward_kl, "reverse": D.reverse_kl, "mix": lambda a, b: D.kl_mix(a, b, 0.3),
       "jsd": lambda a, b: D.generalized_jsd(a, b, 0.5), "skew_f": lambda a, b: D.skew_forward_kl(a, b, 0.1),
       "skew_r": lambda a, b: D.skew_reverse_kl(a, b, 0.1), "clipped": D.clipped_forward_kl}


@pytest.mark.parametrize("name", sorted(ALL))
def test_check7_nonnegative_and_zero_at_equality(name):
    fn = ALL[name]
    z_s, z_t = logits(12, 6, V), logits(13, 6, V)
    assert (fn(z_s, z_t) >= -1e-7).all()
    z = z_t.clone().requires_grad_(True)
    val = fn(z, z_t)
    val.sum().backward()
    exact = name in ("forward", "reverse", "mix", "clipped")
    if exact:
        assert torch.equal(val, torch.zeros_like(val))
    torch.testing.assert_close(val, torch.zeros_like(val), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.grad, torch.zeros_like(z.grad), atol=1e-6, rtol=0)


def test_teacher_minus_inf_and_nan_logits_stay_finite():
    z_s = logits(14, 3, V).requires_grad_(True)
    z_t = logits(15, 3, V)
    z_t[0, :5] = float("-inf")
    z_t[1] = float("nan")
    for fn in ALL.values():
        val = fn(z_s, z_t)
        val.sum().backward()
        assert torch.isfinite(val).all() and torch.isfinite(z_s.grad).all()
        z_s.grad = None
    # masked teacher entries drop out of the forward KL exactly
    p = z_t[0].softmax(-1)
    assert D.forward_kl(z_s[0], z_t[0]).item() == pytest.approx(
        (p[5:] * (p[5:].log() - z_s[0].log_softmax(-1)[5:])).sum().item(), abs=1e-5)


# ------------------------------------------------------------------------------------------------ chunked heads
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("use_mask", [False, True])
def test_chunked_divergence_equals_unchunked(chunk_size, use_mask):
    m = Models(temperature=0.7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    fn = lambda a, b: D.kl_mix(a, b, 0.3)  # noqa: E731
    out = chunked_divergence(m.hidden, m.head.weight, m.t_hidden, m.t_head.weight, fn, chunk_size=chunk_size,
                             vocab_size=V, temperature=0.7, student_bias=m.head.bias, teacher_bias=m.t_head.bias,
                             mask=mask if use_mask else None)
    (out * mask).sum().backward()
    grads = [m.hidden.grad.clone(), m.head.weight.grad.clone(), m.head.bias.grad.clone()]
    assert m.t_head.weight.grad is None and m.t_head.bias.grad is None
    for t in (m.hidden, m.head.weight, m.head.bias):
        t.grad = None
    z_s, z_t = m.full_logits()
    ref = fn(z_s, z_t)
    (ref * mask).sum().backward()
    if use_mask:
        torch.testing.assert_close(out, ref * mask, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, [m.hidden.grad, m.head.weight.grad, m.head.bias.grad]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(grads[1][V:], torch.zeros_like(grads[1][V:]))  # padded rows: no gradient


def test_chunked_divergence_saves_no_logits_for_backward_and_handles_edge_cases():
    m = Models(n=2, r=8, pad=0)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = chunked_divergence(m.hidden, m.head.weight, m.t_hidden, m.t_head.weight, D.forward_kl, chunk_size=3)
    assert max(sizes) <= max(m.head.weight.numel(), m.hidden.numel()) < 2 * 8 * V
    # tuple outputs, no-grad path, empty mask
    two = lambda a, b: (D.forward_kl(a, b), D.entropy(a))  # noqa: E731
    f, e = chunked_divergence(m.hidden, m.head.weight, m.t_hidden, m.t_head.weight, two, chunk_size=5)
    torch.testing.assert_close(f, out)
    with torch.no_grad():
        f2 = chunked_divergence(m.hidden, m.head.weight, m.t_hidden, m.t_head.weight, D.forward_kl, chunk_size=5)
    torch.testing.assert_close(f2, out.detach())
    empty = chunked_divergence(m.hidden, m.head.weight, m.t_hidden, m.t_head.weight, two, chunk_size=5,
                               mask=torch.zeros(2, 8))
    assert isinstance(empty, tuple) and torch.equal(empty[0], torch.zeros(2, 8))
    empty[0].sum().backward()  # attached to the graph, zero gradient
    assert torch.equal(m.hidden.grad, torch.zeros_like(m.hidden))
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_divergence(m.hidden, torch.zeros(V + 1, H), m.t_hidden, m.t_head.weight, D.forward_kl)


# ------------------------------------------------------------------------------------------------ TokenKL
@pytest.mark.parametrize("cls,kwargs,fn", [
    (ForwardKL, {}, D.forward_kl), (ReverseKL, {}, D.reverse_kl), (OPDFullVocab, {}, D.reverse_kl),
    (KLMix, {"kl_mix_lambda": 0.25}, lambda a, b: D.kl_mix(a, b, 0.25)),
    (GKDJSD, {"jsd_beta": 0.3}, lambda a, b: D.generalized_jsd(a, b, 0.3)),
    (SkewKL, {"skew_alpha": 0.1, "direction": "reverse"}, lambda a, b: D.skew_reverse_kl(a, b, 0.1)),
    (TokenKL, {"divergence": "clipped_forward", "clip_kappa": 0.02}, lambda a, b: D.clipped_forward_kl(a, b, 0.02)),
])
def test_token_kl_objectives_token_mean_over_valid_tokens(cls, kwargs, fn):
    """Check 9: prompt / pad positions contribute nothing; the loss is the mean over valid response tokens."""
    m = Models(temperature=1.3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    obj = cls(chunk_size=4, loss_agg="token_mean", **kwargs)
    assert {STUDENT_HIDDEN, TEACHER_HIDDEN} <= obj.requires and obj.needs_teacher
    res = obj.compute(make_batch(mask), m.outputs(), Denominators.of(mask))
    res.loss.backward()
    z_s, z_t = m.full_logits()
    ref = (fn(z_s, z_t) * mask).sum() / mask.sum()
    assert res.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.equal(m.hidden.grad[mask == 0], torch.zeros_like(m.hidden.grad[mask == 0]))
    assert m.t_head.weight.grad is None  # check 10
    for k in ("divergence", "fkl", "rkl", "entropy"):
        assert torch.isfinite(res.metrics[k])
    assert res.metrics["fkl"].item() == pytest.approx(
        ((D.forward_kl(z_s, z_t) * mask).sum() / mask.sum()).item(), abs=1e-5)
    # changing hidden states at padded positions changes nothing
    with torch.no_grad():
        m.hidden[mask == 0] += 100.0
    again = obj.compute(make_batch(mask), m.outputs(), Denominators.of(mask))
    assert again.loss.item() == pytest.approx(res.loss.item(), abs=1e-6)


def test_check8_prefix_source_only_changes_requirements():
    m = Models()
    mask = torch.ones(3, 5)
    for cls in (ForwardKL, ReverseKL):
        a, b = cls(prefix_source="teacher"), cls(prefix_source="student")
        assert a.requires - b.requires == {TEACHER_PREFIXES}
        la = a.compute(make_batch(mask), m.outputs(), Denominators.of(mask)).loss
        lb = b.compute(make_batch(mask), m.outputs(), Denominators.of(mask)).loss
        assert torch.equal(la, lb)
    assert DATASET_PREFIXES in TokenKL(prefix_source="dataset").requires


def test_check10_teacher_gets_no_gradient_even_if_trainable():
    m = Models()
    m.t_hidden.requires_grad_(True)
    mask = torch.ones(3, 5)
    ReverseKL().compute(make_batch(mask), m.outputs(), Denominators.of(mask)).loss.backward()
    assert m.t_hidden.grad is None and m.t_head.weight.grad is None and m.t_head.bias.grad is None
    assert m.hidden.grad is not None and m.head.weight.grad is not None


def test_check11_entropy_of_uniform_is_log_v():
    """(The curriculum-gate half of check 11 is tested with rlad_pl.training.curriculum in tests/test_curriculum.py.)"""
    assert D.entropy(torch.zeros(2, 151936)).tolist() == pytest.approx([math.log(151936)] * 2, abs=1e-4)
    m = Models()
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.zero_()
    res = ForwardKL().compute(make_batch(torch.ones(3, 5)), m.outputs(), Denominators.of(torch.ones(3, 5)))
    assert res.metrics["entropy"].item() == pytest.approx(math.log(V), abs=1e-5)


@pytest.mark.parametrize("kwargs,field", [
    ({"divergence": "tv"}, "tokenkl.divergence"), ({"kl_mix_lambda": 1.5}, "tokenkl.kl_mix_lambda"),
    ({"jsd_beta": -0.1}, "tokenkl.jsd_beta"), ({"skew_alpha": 1.0}, "tokenkl.skew_alpha"),
    ({"clip_kappa": 0.0}, "tokenkl.clip_kappa"), ({"prefix_source": "oracle"}, "tokenkl.prefix_source"),
    ({"chunk_size": 0}, "tokenkl.chunk_size")])
def test_token_kl_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as e:
        TokenKL(**kwargs)
    assert e.value.field == field and "\n" not in str(e.value)
    assert str(ConfigError(field, "x")).startswith(field + ": ")
