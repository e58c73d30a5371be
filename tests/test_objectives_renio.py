"""ReNIO sample weights and the OPSD clipped forward KL: renio-opsd.md acceptance checks 1-10."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rlad_pl.core import divergences as D
from rlad_pl.core.batch import RolloutBatch, build_sequences
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives import GRPO, OPSD, Denominators, LossOutput, Objective, OPDSampled, ReNIO, StudentOutputs
from rlad_pl.objectives.base import (
    PRIVILEGED_PROMPT,
    STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    TEACHER_LOGPROBS,
    per_sample_token_mean,
)
from rlad_pl.objectives.renio import renio_sample_scores, renio_weights

LN9, LN70 = math.log(9.0), math.log(70.0)


def make_batch(mask, logp_minus_teacher=None, logp=None, **fields) -> RolloutBatch:
    mask = torch.as_tensor(mask, dtype=torch.float32)
    n, r = mask.shape
    batch = RolloutBatch(input_ids=torch.zeros(n, 2 + r, dtype=torch.long),
                         attention_mask=torch.ones(n, 2 + r, dtype=torch.long), prompt_len=2, response_mask=mask,
                         rewards=torch.zeros(n), advantages=torch.zeros(n), group_ids=torch.arange(n), **fields)
    if logp_minus_teacher is not None:
        batch.teacher_logprobs = logp - torch.as_tensor(logp_minus_teacher, dtype=torch.float32)
    return batch


def spec_case():
    """Sample 0: d = (ln 9, ln 70, 0.3); sample 1: no pivotal token (d = (0.1, -1, 0.5))."""
    logp = torch.log(torch.tensor([[0.9, 0.7, 0.5], [0.6, 0.2, 0.4]]))
    d = torch.tensor([[LN9, LN70, 0.3], [0.1, -1.0, 0.5]])
    return logp, d


def test_check1_sign_student_minus_teacher():
    logp = torch.log(torch.tensor([[0.9]]))
    batch = make_batch([[1]], teacher_logprobs=torch.log(torch.tensor([[0.1]])))
    _, metrics = ReNIO(OPDSampled()).sample_weights(batch, logp)
    assert metrics["d_mean"].item() == pytest.approx(2.1972, abs=1e-4)


def test_check3_single_sample_numbers():
    logp, d = spec_case()
    m, pivotal = renio_sample_scores(d[:1], torch.ones(1, 3), tau=0.8, c=3.0)
    assert pivotal.tolist() == [[True, True, False]]
    assert m.item() == pytest.approx(2.5986, abs=1e-4)
    assert math.exp(m.item()) == pytest.approx(13.445, abs=1e-3)
    m, _ = renio_sample_scores(d[:1], torch.ones(1, 3), tau=0.8, c=2.5)
    assert m.item() == pytest.approx(2.3486, abs=1e-4)
    assert math.exp(m.item()) == pytest.approx(10.471, abs=1e-3)


def test_check4_micro_batch_weights():
    logp, d = spec_case()
    batch = make_batch(torch.ones(2, 3), d, logp)
    w, metrics = ReNIO(OPDSampled(), tau=0.8, c=3.0).sample_weights(batch, logp)
    torch.testing.assert_close(w, torch.tensor([1.8615, 0.1385]), atol=1e-4, rtol=0)
    assert metrics["raw_weight_mean"].item() == pytest.approx((13.445 + 1) / 2, abs=1e-3)
    assert metrics["pivotal_frac"].item() == pytest.approx(2 / 6)
    assert metrics["samples_with_pivotal"].item() == pytest.approx(0.5)
    assert metrics["weight_max"].item() == pytest.approx(1.8615, abs=1e-4)


def baseline_and_renio(inner, batch, out, **kw):
    denom = Denominators.of(batch.response_mask)
    inner.loss_agg = "seq_mean_token_mean"
    base = inner.compute(batch, out, denom).loss
    renio = ReNIO(inner, **kw).compute(batch, out, denom)
    return base, renio


def test_check2_threshold_above_every_d_reproduces_baseline_exactly():
    logp, d = spec_case()
    for mask in (torch.ones(2, 3), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])):
        batch = make_batch(mask, d, logp)
        lp_a = logp.clone().requires_grad_(True)
        lp_b = logp.clone().requires_grad_(True)
        base = OPDSampled(loss_agg="seq_mean_token_mean").compute(
            batch, StudentOutputs(logprobs=lp_a), Denominators.of(mask)).loss
        res = ReNIO(OPDSampled(), tau=10.0, c=11.0).compute(batch, StudentOutputs(logprobs=lp_b),
                                                           Denominators.of(mask))
        assert torch.equal(res.loss, base)
        base.backward()
        res.loss.backward()
        assert torch.equal(lp_a.grad, lp_b.grad)
        assert res.metrics["weight_min"].item() == 1.0 and res.metrics["weight_max"].item() == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_check5_weights_average_one_and_range(seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(8, 20, generator=g) * 2
    mask = (torch.rand(8, 20, generator=g) > 0.2).float()
    tau, c = 0.8, 2.5
    m, _ = renio_sample_scores(d, mask, tau, c)
    w, w_hat = renio_weights(m, 1.0, "batch_mean", 10.0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    in_range = (w_hat == 1.0) | ((w_hat >= math.exp(tau) - 1e-5) & (w_hat <= math.exp(c) + 1e-4))
    assert in_range.all()
    w_eq, _ = renio_weights(torch.full((5,), 1.7), 1.0, "batch_mean", 10.0)
    torch.testing.assert_close(w_eq, torch.ones(5))


def test_weight_norm_options_and_cap():
    m = torch.tensor([3.0, 0.0, 0.0])
    w, w_hat = renio_weights(m, 1.0, "none", 10.0)
    torch.testing.assert_close(w, torch.tensor([10.0, 1.0, 1.0]))  # e^3 = 20.1 capped
    w, _ = renio_weights(m, 1.0, "clamp", None)
    hat = torch.tensor([10.0, 1.0, 1.0])
    torch.testing.assert_close(w, hat / hat.mean())
    w, _ = renio_weights(torch.tensor([2.0, 0.0]), 2.0, "batch_mean", None)
    e = math.exp(1.0)
    torch.testing.assert_close(w, torch.tensor([e, 1.0]) / ((e + 1) / 2))


def test_check6_gradient_uses_detached_weights():
    logp, d = spec_case()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = make_batch(mask, d, logp)
    lp = logp.clone().requires_grad_(True)
    obj = ReNIO(OPDSampled(), tau=0.8, c=3.0)
    obj.compute(batch, StudentOutputs(logprobs=lp), Denominators.of(mask)).loss.backward()
    w, _ = obj.sample_weights(batch, logp)
    lp2 = logp.clone().requires_grad_(True)
    values, _ = OPDSampled().per_token(batch, StudentOutputs(logprobs=lp2))
    (w * per_sample_token_mean(values, mask)).sum().div(2).backward()
    torch.testing.assert_close(lp.grad, lp2.grad)


def test_bug5_weights_apply_to_sampled_token_opd():
    logp, d = spec_case()
    batch = make_batch(torch.ones(2, 3), d, logp)
    out = StudentOutputs(logprobs=logp)
    base, res = baseline_and_renio(OPDSampled(), batch, out, tau=0.8, c=3.0)
    values, _ = OPDSampled().per_token(batch, out)
    L = per_sample_token_mean(values, batch.response_mask)
    assert res.loss.item() == pytest.approx(((torch.tensor([1.8615, 0.1385]) * L).sum() / 2).item(), abs=1e-4)
    assert res.loss.item() != pytest.approx(base.item(), abs=1e-3)


def test_check7_per_entry_clip():
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 9, generator=g) * 3
    logp = z_t.log_softmax(-1)
    logq = (torch.randn(2, 9, generator=g) * 3).log_softmax(-1).requires_grad_(True)
    kappa = 0.05
    val = D.clipped_forward_kl_lp(logq, logp, kappa, 0.0)
    val.sum().backward()
    e = (logp.exp() * (logp - logq)).detach()
    above, neg = e > kappa, e < 0
    assert above.any() and neg.any()
    torch.testing.assert_close(val.detach(), (kappa * above + e * (~above & ~neg)).sum(-1))
    assert torch.equal(logq.grad[above | neg], torch.zeros_like(logq.grad[above | neg]))
    inside = ~above & ~neg
    torch.testing.assert_close(logq.grad[inside], -logp.exp()[inside])
    # kappa = inf (None) and no lower clamp: plain forward KL, logit gradient (pi_S - pi_T) / 1.1
    z_s = (torch.randn(2, 9, generator=g) * 3).requires_grad_(True)
    plain = D.clipped_forward_kl(z_s, z_t, kappa=None, lower=None, temperature=1.1)
    torch.testing.assert_close(plain, D.forward_kl(z_s, z_t, temperature=1.1))
    plain.sum().backward()
    torch.testing.assert_close(z_s.grad, ((z_s / 1.1).softmax(-1) - (z_t / 1.1).softmax(-1)).detach() / 1.1,
                               atol=1e-6, rtol=0)


def test_check8_sequence_mean_differs_from_token_mean():
    logp, d = spec_case()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    batch = make_batch(mask, d, logp)
    out = StudentOutputs(logprobs=logp)
    values, _ = OPDSampled().per_token(batch, out)
    res = ReNIO(OPDSampled(), tau=50.0, c=60.0).compute(batch, out, Denominators.of(mask))
    seq_mean = per_sample_token_mean(values, mask).mean()
    token_mean = (values * mask).sum() / mask.sum()
    assert res.loss.item() == pytest.approx(seq_mean.item(), abs=1e-7)
    assert abs(seq_mean.item() - token_mean.item()) > 1e-3
    # the step-wide sequence count is the denominator (micro-batches of a larger step)
    res4 = ReNIO(OPDSampled(), tau=50.0, c=60.0).compute(batch, out, Denominators(4.0, 8.0, 3.0))
    assert res4.loss.item() == pytest.approx(seq_mean.item() / 4, abs=1e-7)


def test_check9_student_and_teacher_score_identical_response_ids():
    responses = [[5, 6, 7, 2], [8, 2]]
    ids, _, P, rmask = build_sequences([[1, 3], [4]], responses, pad_id=0)
    t_ids, _, t_P, t_rmask = build_sequences([[9, 9, 9, 9, 1, 3], [9, 9, 4]], responses, pad_id=0)
    assert torch.equal(ids[:, P:], t_ids[:, t_P:]) and torch.equal(rmask, t_rmask)
    assert rmask.sum(-1).tolist() == [len(r) for r in responses]


def test_check10_opsd_under_renio_teacher_gets_no_gradient():
    torch.manual_seed(0)
    head, t_head = nn.Linear(4, 11), nn.Linear(4, 11)
    hidden, t_hidden = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp = torch.log_softmax(hidden @ head.weight.T + head.bias, -1)[..., 0]
    batch = make_batch(mask, teacher_logprobs=torch.full((2, 3), -3.0, requires_grad=True))
    out = StudentOutputs(logprobs=logp, hidden=hidden, lm_head=head, teacher_hidden=t_hidden, teacher_lm_head=t_head,
                         vocab_size=11, temperature=1.1)
    obj = ReNIO(OPSD(chunk_size=2), tau=0.8, c=2.5)
    assert obj.requires == {TEACHER_LOGPROBS, PRIVILEGED_PROMPT, STUDENT_HIDDEN, TEACHER_HIDDEN}
    res = obj.compute(batch, out, Denominators.of(mask))
    res.loss.backward()
    assert t_hidden.grad is None and t_head.weight.grad is None and batch.teacher_logprobs.grad is None
    assert head.weight.grad is not None and torch.isfinite(res.loss)
    assert "opsd/divergence" in res.metrics and "pivotal_frac" in res.metrics


class NotPerToken(Objective):
    def compute(self, batch, out, denom):
        return LossOutput(out.logprobs.sum())


def test_renio_config():
    assert ReNIO(GRPO()).needs_groups and not ReNIO(OPDSampled()).needs_groups
    with pytest.raises(ConfigError) as e:
        ReNIO(NotPerToken())
    assert e.value.field == "renio.inner"
    for kw, field in (({"tau": 2.0, "c": 1.0}, "renio.c"), ({"weight_norm": "median"}, "renio.weight_norm"),
                      ({"weight_norm_scope": "node"}, "renio.weight_norm_scope"),
                      ({"weight_temperature": 0.0}, "renio.weight_temperature"),
                      ({"weight_cap": -1.0}, "renio.weight_cap")):
        with pytest.raises(ConfigError) as e:
            ReNIO(OPDSampled(), **kw)
        assert e.value.field == field


def test_ema_normalisation_divides_by_moving_average_of_batch_means():
    from rlad_pl.objectives import OPDSampled, ReNIO

    obj = ReNIO(OPDSampled(), weight_norm="ema", ema_rate=0.25, weight_cap=None)
    m1, m2 = torch.tensor([0.0, math.log(3.0)]), torch.tensor([math.log(5.0), math.log(5.0)])
    r1 = obj.reference_mean(m1)  # first batch: the EMA starts at the batch mean (1 + 3) / 2
    assert r1.item() == pytest.approx(2.0)
    r2 = obj.reference_mean(m2)  # 0.75 * 2 + 0.25 * 5
    assert r2.item() == pytest.approx(2.75)
    from rlad_pl.objectives.renio import renio_weights

    w, w_hat = renio_weights(m2, norm="ema", cap=None, reference_mean=r2)
    torch.testing.assert_close(w, torch.tensor([5 / 2.75, 5 / 2.75]))


def _global_scope_worker(rank, world, port, out):
    import torch.distributed as dist

    from rlad_pl.objectives import OPDSampled, ReNIO

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    m = torch.tensor([[0.0, math.log(3.0)], [math.log(7.0), math.log(9.0)]])[rank]
    obj = ReNIO(OPDSampled(), weight_norm_scope="global", weight_cap=None)
    out[rank] = obj.reference_mean(m).item()
    dist.destroy_process_group()


def test_global_scope_normalises_over_all_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_global_scope_worker, args=(2, port, out), nprocs=2, join=True)
    assert out[0] == pytest.approx(5.0) and out[1] == pytest.approx(5.0)  # (1 + 3 + 7 + 9) / 4
    from rlad_pl.objectives import OPDSampled, ReNIO

    assert ReNIO(OPDSampled(), weight_norm_scope="global").reference_mean(torch.zeros(2)) is None  # 1 process
