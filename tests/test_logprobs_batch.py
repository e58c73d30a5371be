"""Chunked log-probs, sequence layout and step-wide aggregation on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from rlad_pl.core.batch import RolloutBatch, StepBatch, build_sequences, position_ids_from_mask
from rlad_pl.core.logprobs import chunked_token_logprobs, response_logprobs
from rlad_pl.objectives import GRPO
from rlad_pl.objectives.base import Denominators
from rlad_pl.training.module import DistillationModule


def test_build_sequences_layout():
    ids, mask, P, rmask = build_sequences([[1, 5], [1, 6, 7]], [[9, 2], [8]], pad_id=0)
    assert P == 3
    assert ids.tolist() == [[0, 1, 5, 9, 2], [1, 6, 7, 8, 0]]
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert rmask.tolist() == [[1, 1], [1, 0]]
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]]


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_full_softmax(chunk, temperature):
    torch.manual_seed(0)
    h = torch.randn(2, 7, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 9, (2, 7))
    lp, ent = chunked_token_logprobs(h, w, t, temperature=temperature, chunk_size=chunk, with_entropy=True,
                                     vocab_size=9)
    logits = (h @ w[:9].T) / temperature
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(lp, ref.gather(-1, t[..., None]).squeeze(-1))
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
    g = torch.autograd.grad(lp.sum(), (h, w))
    g_ref = torch.autograd.grad(ref.gather(-1, t[..., None]).sum(), (h, w))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_response_logprobs_match_model_logits(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids, mask, P, rmask = build_sequences([[1, 5, 6], [1, 7]], [[9, 10, 2], [11, 2]], pad_id=0)
    lp, _ = response_logprobs(model, ids, mask, P, chunk_size=2)
    # reference: the unpadded sequences one at a time through the full model
    for i, (prompt, resp) in enumerate([([1, 5, 6], [9, 10, 2]), ([1, 7], [11, 2])]):
        seq = torch.tensor([prompt + resp])
        logits = model(seq).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        ref = logits.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, :len(resp)], ref, atol=1e-5, rtol=1e-5)


def _rollout(n=6, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(3, 13, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    resps = [torch.randint(3, 13, (int(torch.randint(1, r + 1, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    ids, mask, P, rmask = build_sequences(prompts, resps, pad_id=0)
    adv = torch.randn(n, generator=g)
    return RolloutBatch(ids, mask, P, rmask, rewards=adv.clone(), advantages=adv,
                        group_ids=torch.arange(n) // 2)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_gradient_independent_of_micro_batch_split(tiny_dir, agg):
    """1 x B and k x (B/k) micro-batches with step-wide denominators give the same loss and gradient."""
    module = DistillationModule(student=str(tiny_dir), objectives=[GRPO()], loss_agg=agg)
    batch = _rollout()
    with torch.no_grad():
        batch.old_logprobs = (module.annotator().logprobs(module.student, batch)
                              + 0.05 * torch.randn(batch.response_mask.shape))
    grads = []
    for mbs in (6, 2, 1):
        step = StepBatch(batch.split(mbs))
        denom = Denominators(step.num_tokens, step.num_sequences, max_response_len=8)
        module.student.zero_grad()
        total = 0.0
        for mb in step.micro_batches:
            loss, _, _ = module.compute_loss(mb, denom)
            loss.backward()
            total += loss.item()
        grads.append((total, [p.grad.clone() for p in module.student.parameters()]))
    for total, g in grads[1:]:
        assert total == pytest.approx(grads[0][0], rel=1e-5, abs=1e-7)
        for a, b in zip(g, grads[0][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
